//! What the code of a 32-bit ARM binary needs, read from its executable bytes rather than from its attributes.
//!
//! `Tag_CPU_arch` is a merge: the linker records the highest version of all its input objects. ring, OpenSSL and
//! libjpeg-turbo link NEON routines built for ARMv7 into programs built for ARMv6 and choose them at run time
//! only when the CPU has NEON, so such a program says v7 and runs on an ARM1176. The code tells the two apart:
//!
//! - **Counted** (the program needs ARMv6T2/ARMv7): encodings a compiler emits in ordinary code once it may use
//!   v7 — in ARM state MOVW/MOVT, SDIV/UDIV, MLS, UBFX/SBFX/BFI/BFC, RBIT and the DMB/DSB/ISB barriers; in Thumb
//!   state every 32-bit Thumb-2 instruction except the BL/BLX pair, which Thumb-1 already has, and the 16-bit
//!   IT, CBZ and CBNZ.
//! - **Not counted**: Advanced SIMD (NEON) and VFP/coprocessor encodings, which is what run-time-dispatched
//!   routines consist of, nor the ARMv6K instructions an ARM1176JZF-S has (LDREX/STREX of every size, CLREX,
//!   YIELD/WFE/WFI/SEV).
//!
//! Which bytes are counted, and in which state, is decided by following the code from where the program starts
//! ([`super::arm_reach`], through [`judge`]): only what a branch, a call or an address the code loads can reach is
//! code, in the state (ARM or Thumb) it is reached in, and a single counted encoding there means the program
//! needs ARMv7. Mapping symbols (`$a`, `$t`, `$d`), where the symbol table keeps them, correct the walk's state
//! and stop it at data; stripped binaries, as images ship them, are walked the same way. Code reached only behind
//! a CPU-feature check (AT_HWCAP, `OPENSSL_armcap_P`, an IFUNC resolver's choice), or running straight into NEON
//! code, is reported and not counted; [`super::arm_reach`] says how far that recognition goes.
//!
//! Measured on the corpus of `tests/check_binary_corpus.rs` (Debian armel and armhf busybox, dash, hello and ls;
//! ring, Go and C programs; flotilla's ARMv6 build), stripped and not, every verdict agrees with qemu's ARM1176
//! and Cortex-A7. flotilla's ARMv6 build reaches 3.4 MB of code in 7,400 functions, with one ARMv7 encoding (the
//! errata `DMB` of ring's SHA-512 NEON routine) not counted; a C `main` built for ARMv7 has a handful.
//!
//! Before the walk, a linear scan ([`scan`]) counted every executable byte: split by mapping symbols where there
//! were some, and otherwise taking each region for ARM or Thumb by the share of words with the `AL` condition and
//! counting an ARM hit only between two `AL` words, [`STRIPPED_THRESHOLD`] hits or more. It took a stripped
//! program with a single MOVT in an ARMv7 `main`, or a Thumb-2 `main` in an ARM program, for ARMv6 (issue 19).
//! It stays for `bench/arm-code.sh`, which compares the two.
//!
//! Limits of the counting itself: a program whose only v7 code is a routine it selects at run time in a way the
//! walk does not recognise is judged to need v7. Go binaries are left to GOARM: Go's runtime picks SDIV/UDIV and
//! DMB at run time by CPU feature or GOARM. Hand-written matching is deliberate: a full disassembler (capstone)
//! needs a C toolchain and cmake to build, and these few patterns (and the control flow of [`super::arm_reach`])
//! are all the question needs.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use super::arm_reach::{self, FirstV7, Program};

/// In the linear scan of a stripped binary, fewer hits than this were taken for data that looks like instructions.
pub const STRIPPED_THRESHOLD: u64 = 2;

/// The share of aligned words with the `AL` condition above which a region without mapping symbols is taken
/// for ARM code: compilers make nearly every ARM instruction unconditional, so ARM code scores far above it,
/// Thumb code far below.
const ARM_STATE_SHARE: f64 = 0.5;

/// Executable bytes mapped at `address`.
#[derive(Debug, Clone, Copy)]
pub struct CodeRegion<'a> {
    pub address: u64,
    pub bytes: &'a [u8],
}

/// What a mapping symbol says the bytes from its address on are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    Arm,
    Thumb,
    Data,
}

impl Mapping {
    /// `$a`, `$t` and `$d`, with or without the `.suffix` some assemblers add.
    pub fn from_symbol_name(name: &[u8]) -> Option<Mapping> {
        let base = name.split(|&b| b == b'.').next().unwrap_or_default();
        match base {
            b"$a" => Some(Mapping::Arm),
            b"$t" => Some(Mapping::Thumb),
            b"$d" => Some(Mapping::Data),
            _ => None,
        }
    }
}

/// A non-SIMD encoding that ARMv6 (without T2) cores such as the ARM1176 lack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum V7Encoding {
    #[serde(rename = "MOVW")]
    Movw,
    #[serde(rename = "MOVT")]
    Movt,
    #[serde(rename = "SDIV/UDIV")]
    Divide,
    #[serde(rename = "MLS")]
    Mls,
    #[serde(rename = "UBFX/SBFX/BFI/BFC")]
    BitField,
    #[serde(rename = "RBIT")]
    Rbit,
    #[serde(rename = "DMB/DSB/ISB")]
    Barrier,
    #[serde(rename = "32-bit Thumb-2")]
    Thumb2,
    /// The 16-bit instructions Thumb-2 added: IT, CBZ, CBNZ.
    #[serde(rename = "IT/CBZ/CBNZ")]
    ThumbNarrow,
}

impl fmt::Display for V7Encoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            V7Encoding::Movw => "MOVW",
            V7Encoding::Movt => "MOVT",
            V7Encoding::Divide => "SDIV/UDIV",
            V7Encoding::Mls => "MLS",
            V7Encoding::BitField => "UBFX/SBFX/BFI/BFC",
            V7Encoding::Rbit => "RBIT",
            V7Encoding::Barrier => "DMB/DSB/ISB",
            V7Encoding::Thumb2 => "32-bit Thumb-2",
            V7Encoding::ThumbNarrow => "IT/CBZ/CBNZ",
        })
    }
}

/// What the walk of the reachable code found ([`judge`]), or what a linear scan found ([`scan`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CodeScan {
    /// Whether mapping symbols said where ARM, Thumb and data are.
    #[serde(rename = "mapping_symbols")]
    pub mapped: bool,
    /// How the code was found: `reachable code` (followed from the entry point) or `linear scan`.
    pub method: &'static str,
    /// Functions reached (entry points of the walk and the targets of calls), outside CPU-feature checks.
    pub functions: u64,
    /// Bytes of code reached (or scanned).
    pub code_bytes: u64,
    /// Advanced SIMD and VFP/coprocessor instructions: reported, never counted.
    #[serde(rename = "simd_instructions")]
    pub simd: u64,
    /// Counted encodings, by kind.
    #[serde(rename = "v7_instructions")]
    pub v7: BTreeMap<V7Encoding, u64>,
    /// The address of the first counted encoding, to look at with objdump.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_v7: Option<u64>,
    /// The first counted encoding, the state it ran in and the path of calls that reached it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_v7_reached: Option<FirstV7>,
    /// Functions reached only behind a CPU-feature check (AT_HWCAP, OPENSSL_armcap, IFUNC resolvers).
    pub guarded_functions: u64,
    /// ARMv7 encodings in those functions, or running straight into NEON code: they run only where the CPU
    /// has the feature, so not counted.
    #[serde(rename = "guarded_v7_instructions")]
    pub guarded_v7: u64,
}

/// Judges the code of `program` that can run: found by [`arm_reach::walk`], counted in the state it runs in.
pub fn judge(program: &Program<'_>) -> CodeScan {
    let reach = arm_reach::walk(program);
    CodeScan {
        mapped: !program.mappings.is_empty(),
        method: "reachable code",
        functions: reach.functions,
        code_bytes: reach.code_bytes,
        simd: reach.simd,
        first_v7: reach.first_v7.as_ref().map(|f| f.address),
        v7: reach.v7,
        first_v7_reached: reach.first_v7,
        guarded_functions: reach.guarded_functions,
        guarded_v7: reach.guarded_v7,
    }
}

impl CodeScan {
    pub fn v7_total(&self) -> u64 {
        self.v7.values().sum()
    }

    /// Whether the code needs ARMv6T2/ARMv7: for the walk, any counted encoding on reachable code; for the
    /// linear scan, the rule in the module doc.
    pub fn needs_v7(&self) -> bool {
        let hits = self.v7_total();
        if self.mapped || self.method == "reachable code" {
            hits > 0
        } else {
            hits >= STRIPPED_THRESHOLD
        }
    }

    /// The counted encodings, e.g. "MOVW ×12, MOVT ×12".
    pub fn describe_v7(&self) -> String {
        self.v7
            .iter()
            .map(|(kind, n)| format!("{kind} ×{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn hit(&mut self, kind: V7Encoding, address: u64) {
        *self.v7.entry(kind).or_default() += 1;
        if self.first_v7.is_none_or(|a| address < a) {
            self.first_v7 = Some(address);
        }
    }
}

/// The linear scan that came before the walk, kept to compare with it (`bench/arm-code.sh`): every byte of the
/// code regions, split by `mappings` (address, kind) where there are some, by the stripped-binary rule of the
/// module doc where there are none.
pub fn scan(regions: &[CodeRegion<'_>], mappings: &[(u64, Mapping)]) -> CodeScan {
    let mut sorted = mappings.to_vec();
    sorted.sort_by_key(|m| m.0);
    let mut result = CodeScan {
        mapped: !sorted.is_empty(),
        method: "linear scan",
        ..CodeScan::default()
    };
    for region in regions {
        if result.mapped {
            scan_mapped(region, &sorted, &mut result);
        } else {
            let state = if looks_like_arm(region.bytes) {
                Mapping::Arm
            } else {
                Mapping::Thumb
            };
            scan_run(region.address, region.bytes, state, true, &mut result);
        }
    }
    result
}

fn scan_mapped(region: &CodeRegion<'_>, sorted: &[(u64, Mapping)], result: &mut CodeScan) {
    let start = region.address;
    let end = start.saturating_add(region.bytes.len() as u64);
    // The mapping in force at the region's start is the last one before it, if any; bytes before the first
    // mapping symbol of a region are left alone, as objdump does.
    let first = sorted.partition_point(|m| m.0 <= start);
    let mut state = first
        .checked_sub(1)
        .and_then(|i| sorted.get(i))
        .map(|m| m.1);
    let mut from = start;
    for &(address, next) in sorted.get(first..).unwrap_or_default() {
        if address >= end {
            break;
        }
        run(region, from, address, state, result);
        from = address;
        state = Some(next);
    }
    run(region, from, end, state, result);
}

fn run(region: &CodeRegion<'_>, from: u64, to: u64, state: Option<Mapping>, result: &mut CodeScan) {
    let Some(state) = state.filter(|s| *s != Mapping::Data) else {
        return;
    };
    let lo = usize::try_from(from - region.address).unwrap_or(usize::MAX);
    let hi = usize::try_from(to - region.address).unwrap_or(usize::MAX);
    if let Some(bytes) = region.bytes.get(lo..hi) {
        scan_run(from, bytes, state, false, result);
    }
}

/// Whether most aligned words carry the `AL` condition, as ARM code does.
fn looks_like_arm(bytes: &[u8]) -> bool {
    let mut words = 0u64;
    let mut always = 0u64;
    for chunk in bytes.chunks_exact(4) {
        let word = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        words += 1;
        if word >> 28 == 0xe {
            always += 1;
        }
    }
    words > 0 && always as f64 / words as f64 >= ARM_STATE_SHARE
}

fn scan_run(address: u64, bytes: &[u8], state: Mapping, stripped: bool, result: &mut CodeScan) {
    result.code_bytes += bytes.len() as u64;
    match state {
        Mapping::Arm => {
            // ARM instructions are word-aligned; a run that starts off alignment starts with padding.
            let skip = ((4 - (address % 4)) % 4) as usize;
            let aligned = bytes.get(skip..).unwrap_or_default();
            let words: Vec<u32> = aligned
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let always =
                |i: Option<usize>| i.and_then(|i| words.get(i)).is_some_and(|w| w >> 28 == 0xe);
            for (i, &word) in words.iter().enumerate() {
                let at = address + skip as u64 + 4 * i as u64;
                match classify_a32(word) {
                    Some(A32::Simd) => result.simd += 1,
                    // Without mapping symbols, a hit counts only as an AL instruction between two AL words:
                    // compiled ARM code is nearly all AL, while a constant in a literal pool or table sits
                    // among other constants.
                    Some(A32::V7(kind))
                        if !stripped
                            || (always(Some(i))
                                && always(i.checked_sub(1))
                                && always(Some(i + 1))) =>
                    {
                        result.hit(kind, at)
                    }
                    _ => {}
                }
            }
        }
        Mapping::Thumb => {
            let skip = (address % 2) as usize;
            let mut i = skip;
            while let Some(pair) = bytes.get(i..i + 2) {
                let first = u16::from_le_bytes([pair[0], pair[1]]);
                if !is_thumb32_prefix(first) {
                    i += 2;
                    continue;
                }
                let Some(pair2) = bytes.get(i + 2..i + 4) else {
                    break;
                };
                let second = u16::from_le_bytes([pair2[0], pair2[1]]);
                match classify_t32(first, second) {
                    T32::Simd => result.simd += 1,
                    T32::V7 => result.hit(V7Encoding::Thumb2, address + i as u64),
                    T32::Thumb1 => {}
                }
                i += 4;
            }
        }
        Mapping::Data => {}
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum A32 {
    Simd,
    V7(V7Encoding),
}

/// Classifies one ARM-state word; `None` for everything ARMv6K already has.
pub(super) fn classify_a32(word: u32) -> Option<A32> {
    let cond = word >> 28;
    if cond == 0xf {
        // The unconditional space: Advanced SIMD data processing (1111 001x) and element/structure loads and
        // stores (1111 0100 xxx0), and the v7 barriers (DSB 0xf57ff04x, DMB 0xf57ff05x, ISB 0xf57ff06x). CLREX
        // (0xf57ff01f) is ARMv6K.
        if (word >> 25) & 0x7f == 0b111_1001 || (word >> 20) & 0xff1 == 0xf40 {
            return Some(A32::Simd);
        }
        return matches!(word & 0xffff_fff0, 0xf57f_f040 | 0xf57f_f050 | 0xf57f_f060)
            .then_some(A32::V7(V7Encoding::Barrier));
    }
    // VFP and Advanced SIMD transfers are coprocessor instructions on coprocessors 10 and 11:
    // cond 110x xxxx (loads/stores, 64-bit moves) and cond 1110 (data processing, register moves).
    if (word >> 25) & 0b111 == 0b110 || (word >> 24) & 0b1111 == 0b1110 {
        return ((word >> 8) & 0b1110 == 0b1010).then_some(A32::Simd);
    }
    let kind = match word & 0x0ff0_0000 {
        // MOVW: cond 0011 0000 imm4 Rd imm12; MOVT: cond 0011 0100 imm4 Rd imm12.
        0x0300_0000 => V7Encoding::Movw,
        0x0340_0000 => V7Encoding::Movt,
        _ if word & 0x0ff0_f0f0 == 0x0710_f010 || word & 0x0ff0_f0f0 == 0x0730_f010 => {
            // SDIV: cond 0111 0001 Rd 1111 Rm 0001 Rn; UDIV: cond 0111 0011 Rd 1111 Rm 0001 Rn.
            V7Encoding::Divide
        }
        // MLS: cond 0000 0110 Rd Ra Rm 1001 Rn.
        _ if word & 0x0ff0_00f0 == 0x0060_0090 => V7Encoding::Mls,
        // SBFX: cond 0111 101w ...101 Rn; UBFX: cond 0111 111w ...101 Rn; BFI/BFC: cond 0111 110m ...001 Rn.
        _ if word & 0x0fe0_0070 == 0x07a0_0050
            || word & 0x0fe0_0070 == 0x07e0_0050
            || word & 0x0fe0_0070 == 0x07c0_0010 =>
        {
            V7Encoding::BitField
        }
        // RBIT: cond 0110 1111 1111 Rd 1111 0011 Rm.
        _ if word & 0x0fff_0ff0 == 0x06ff_0f30 => V7Encoding::Rbit,
        _ => return None,
    };
    Some(A32::V7(kind))
}

/// The first halfword of a 32-bit Thumb instruction starts 11101, 11110 or 11111.
fn is_thumb32_prefix(first: u16) -> bool {
    first >> 11 >= 0b11101
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum T32 {
    /// BL, and BLX to ARM: Thumb-1 (ARMv5T/ARMv6) already has them as a pair of halfwords.
    Thumb1,
    Simd,
    V7,
}

pub(super) fn classify_t32(first: u16, second: u16) -> T32 {
    // BL: 11110 S imm10, 11 J1 1 J2 imm11; BLX (to ARM): 11110 S imm10, 11 J1 0 J2 imm10 0.
    if first >> 11 == 0b11110 && second >> 14 == 0b11 {
        return T32::Thumb1;
    }
    // Coprocessor, VFP and Advanced SIMD: 111x 11xx (0xec00..=0xefff, 0xfc00..=0xffff), and Advanced SIMD
    // element/structure loads and stores: 1111 1001 xxx0.
    if first & 0xec00 == 0xec00 || first & 0xff10 == 0xf900 {
        return T32::Simd;
    }
    T32::V7
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(list: &[u32]) -> Vec<u8> {
        list.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    fn halves(list: &[u16]) -> Vec<u8> {
        list.iter().flat_map(|h| h.to_le_bytes()).collect()
    }

    fn kinds(scan: &CodeScan) -> Vec<V7Encoding> {
        scan.v7.keys().copied().collect()
    }

    #[test]
    fn a32_encodings_by_hand() {
        use V7Encoding::*;
        let v7 = |w| classify_a32(w).and_then(|c| if let A32::V7(k) = c { Some(k) } else { None });
        // movw r0, #0x1234; movt r0, #0x5678; movweq r1, #0
        assert_eq!(v7(0xe301_0234), Some(Movw));
        assert_eq!(v7(0xe345_0678), Some(Movt));
        assert_eq!(v7(0x0300_1000), Some(Movw));
        // sdiv r0, r1, r2; udiv r3, r4, r5
        assert_eq!(v7(0xe710_f211), Some(Divide));
        assert_eq!(v7(0xe733_f514), Some(Divide));
        // mls r0, r1, r2, r3
        assert_eq!(v7(0xe060_3291), Some(Mls));
        // ubfx r0, r1, #4, #8; sbfx r0, r1, #0, #16; bfi r0, r1, #8, #8; bfc r0, #0, #4
        assert_eq!(v7(0xe7e7_0251), Some(BitField));
        assert_eq!(v7(0xe7af_0051), Some(BitField));
        assert_eq!(v7(0xe7cf_0411), Some(BitField));
        assert_eq!(v7(0xe7c3_001f), Some(BitField));
        // rbit r0, r1
        assert_eq!(v7(0xe6ff_0f31), Some(Rbit));
        // dmb ish; dsb sy; isb sy
        assert_eq!(v7(0xf57f_f05b), Some(Barrier));
        assert_eq!(v7(0xf57f_f04f), Some(Barrier));
        assert_eq!(v7(0xf57f_f06f), Some(Barrier));

        // ARMv6/v6K instructions an ARM1176 runs: mov, ldr, bl, ldrex, strexd, ldrexb, clrex, the CP15
        // barrier (mcr p15, 0, r0, c7, c10, 5), uxth, rev, wfe, mul, bx lr.
        for word in [
            0xe1a0_0001,
            0xe59f_0010,
            0xeb00_0010,
            0xe190_0f9f,
            0xe1a2_0f93,
            0xe1d0_0f9f,
            0xf57f_f01f,
            0xee07_0fba,
            0xe6ff_0071,
            0xe6bf_0f31,
            0xe320_f002,
            0xe000_0291,
            0xe12f_ff1e,
        ] {
            assert_eq!(classify_a32(word), None, "{word:#010x}");
        }
        // NEON and VFP: vadd.i32 q0, q1, q2; vld1.8 {d0}, [r0]; vmov.f64 d16, #1.0 (VFPv3, D16); vldr d17, [r0]
        for word in [0xf222_0844, 0xf420_070f, 0xeef7_0b00, 0xedd0_1b00] {
            assert_eq!(classify_a32(word), Some(A32::Simd), "{word:#010x}");
        }
    }

    #[test]
    fn t32_encodings_by_hand() {
        // bl (Thumb-1 pair), blx to ARM
        assert_eq!(classify_t32(0xf000, 0xf800), T32::Thumb1);
        assert_eq!(classify_t32(0xf7ff, 0xeffe), T32::Thumb1);
        // movw r0, #0x1234 (T3); ldr.w r0, [r1, #4]; sdiv r0, r1, r2; dmb ish
        assert_eq!(classify_t32(0xf241, 0x2034), T32::V7);
        assert_eq!(classify_t32(0xf8d1, 0x0004), T32::V7);
        assert_eq!(classify_t32(0xfb91, 0xf0f2), T32::V7);
        assert_eq!(classify_t32(0xf3bf, 0x8f5b), T32::V7);
        // vadd.i32 q0, q1, q2 (T32); vld1.8 {d0}, [r0]; vldr d16, [r0]
        assert_eq!(classify_t32(0xef22, 0x0844), T32::Simd);
        assert_eq!(classify_t32(0xf920, 0x070f), T32::Simd);
        assert_eq!(classify_t32(0xedd0, 0x0b00), T32::Simd);
    }

    #[test]
    fn mapping_symbols_separate_code_from_data() {
        // ARM code with a movw, then a literal pool whose word looks like movt, then Thumb with a Thumb-2 ldr.w
        // and a bl pair.
        let mut bytes = words(&[0xe1a0_0001, 0xe301_0234, 0xe345_0678]);
        bytes.extend(halves(&[0x4770, 0xf000, 0xf800, 0xf8d1, 0x0004, 0x4770]));
        let region = CodeRegion {
            address: 0x1000,
            bytes: &bytes,
        };
        let scan_with = |maps: &[(u64, Mapping)]| scan(&[region], maps);

        let all = scan_with(&[(0x1000, Mapping::Arm), (0x100c, Mapping::Thumb)]);
        assert!(all.mapped);
        assert_eq!(
            kinds(&all),
            vec![V7Encoding::Movw, V7Encoding::Movt, V7Encoding::Thumb2]
        );
        assert_eq!(all.first_v7, Some(0x1004));
        assert!(all.needs_v7());

        let pool = scan_with(&[
            (0x1000, Mapping::Arm),
            (0x1004, Mapping::Data),
            (0x100c, Mapping::Thumb),
            (0x1012, Mapping::Data),
        ]);
        assert_eq!(pool.v7_total(), 0);
        assert!(!pool.needs_v7());

        // Bytes before the region's first mapping symbol belong to no known state and are skipped.
        let late = scan_with(&[(0x1008, Mapping::Arm), (0x100c, Mapping::Data)]);
        assert_eq!(kinds(&late), vec![V7Encoding::Movt]);
    }

    #[test]
    fn neon_alone_does_not_need_v7() {
        let bytes = words(&[
            0xe1a0_0001,
            0xf222_0844,
            0xf420_070f,
            0xeef7_0b00,
            0xe12f_ff1e,
        ]);
        let region = CodeRegion {
            address: 0x2000,
            bytes: &bytes,
        };
        let mapped = scan(&[region], &[(0x2000, Mapping::Arm)]);
        assert_eq!(mapped.simd, 3);
        assert!(!mapped.needs_v7());
        assert!(!scan(&[region], &[]).needs_v7());
    }

    #[test]
    fn stripped_rule_needs_several_unconditional_hits() {
        let ordinary = 0xe1a0_0001;
        let with = |movws: usize, cond: u32| {
            let mut list = vec![ordinary; 64];
            // From the second word on: a hit needs code on both sides.
            for slot in list.iter_mut().skip(1).take(movws) {
                *slot = (cond << 28) | 0x0301_0234;
            }
            words(&list)
        };
        let judge = |bytes: &[u8]| {
            scan(
                &[CodeRegion {
                    address: 0x8000,
                    bytes,
                }],
                &[],
            )
        };
        let few = judge(&with(STRIPPED_THRESHOLD as usize - 1, 0xe));
        assert!(!few.mapped && !few.needs_v7());
        assert!(judge(&with(STRIPPED_THRESHOLD as usize, 0xe)).needs_v7());
        // Conditional look-alikes (small constants in literal pools start 0x03...) do not count when stripped.
        assert_eq!(judge(&with(20, 0x0)).v7_total(), 0);
        // Nor does an AL look-alike among constants: flotilla's own SHA-2 table holds 0xe3418acb (MOVT).
        let mut table = vec![0xe1a0_0001; 64];
        for at in [10, 40] {
            table.splice(at..at + 3, [0x391c_0cb3, 0xe341_8acb, 0x4ed8_aa4a]);
        }
        assert_eq!(judge(&words(&table)).v7_total(), 0);

        // Thumb-2 code (few AL-looking words): its 32-bit instructions count.
        let thumb = halves(&[0xf8d1, 0x0004].repeat(STRIPPED_THRESHOLD as usize));
        let scanned = judge(&thumb);
        assert_eq!(
            scanned.v7.get(&V7Encoding::Thumb2),
            Some(&STRIPPED_THRESHOLD)
        );
        assert!(scanned.needs_v7());
    }

    #[test]
    fn mapping_symbol_names() {
        assert_eq!(Mapping::from_symbol_name(b"$a"), Some(Mapping::Arm));
        assert_eq!(Mapping::from_symbol_name(b"$t.12"), Some(Mapping::Thumb));
        assert_eq!(Mapping::from_symbol_name(b"$d"), Some(Mapping::Data));
        assert_eq!(Mapping::from_symbol_name(b"$x"), None);
        assert_eq!(Mapping::from_symbol_name(b"main"), None);
    }
}
