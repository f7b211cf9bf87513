//! Which code of a 32-bit ARM program can run, found by following it from where the program starts (recursive
//! descent), in the state (ARM or Thumb) it runs in. [`super::arm_code`] then judges only that code.
//!
//! Counting encodings over whole executable sections confuses data with code (literal pools and constant tables
//! live in `.text`) and, without mapping symbols (`$a`/`$t`/`$d`), ARM with Thumb. Following the code answers
//! both: what a branch reaches is code, in the state the branch selects.
//!
//! **Where the walk starts**: the entry point; `DT_INIT`/`DT_FINI`; the words of `.init_array`, `.fini_array`,
//! `.preinit_array`, `.data.rel.ro` and `.got` that point into executable sections; defined function symbols of
//! `.dynsym`; every word of `.plt` (ARM stubs); and the resolvers named by `R_ARM_IRELATIVE` relocations and
//! `STT_GNU_IFUNC` symbols. Bit 0 of an address selects Thumb; an even address must be word-aligned to be ARM.
//!
//! **What it follows**: `B`, `BL`, `BLX` (immediate, switching state), conditional branches, `CBZ`/`CBNZ`, IT
//! blocks (a return inside one is conditional); `BX`/`BLX` and `LDR pc` through a register whose value the same
//! run of code set; addresses loaded from literal pools (`LDR Rd, [pc, #n]`), built by `MOVW`/`MOVT`, or made
//! position-independent by `ADD Rd, pc, Rd` — each taken for a function when it points into executable code;
//! `TBB`/`TBH`, `LDR pc, [pc, Rm, LSL #2]` and `ADD pc, pc, Rm, LSL #2` jump tables bounded by a `CMP Rm, #n`
//! before them. Where mapping symbols exist they correct the state and stop the walk at data.
//!
//! **Where it stops**: a return (`BX lr`, `POP {.., pc}`, `LDM .., {.., pc}`, `MOV pc, ..`), an indirect jump
//! it cannot bound, an undefined instruction, the end of a section or data marked by `$d`. After a call it goes
//! on with the next instruction, so after a call that never returns (`abort`) it may read a literal pool as
//! code; encodings found on a word that some instruction loads as a literal, or in a jump table, do not count.
//! Code reached only through function pointers in writable data (`.data`), C++ vtables in `.rodata`, or
//! computed in ways other than those above, is not reached; nor is Thumb-1 switch code that calls
//! `__gnu_thumb1_case_*` helpers (the table after the call is read as code). Binaries without section headers
//! are walked from the entry point alone.
//!
//! **Code behind a CPU-feature check** is walked but not counted:
//!
//! - a call whose `r0` was just set to `AT_HWCAP` (16) or `AT_HWCAP2` (26) — `getauxval(AT_HWCAP)` — or a load
//!   of the address of `OPENSSL_armcap_P` (ring's and OpenSSL's capability word, found by name, so only in
//!   unstripped binaries) or glibc's `_dl_hwcap`, opens a window of a few instructions; once a bit of the value
//!   is tested there (`TST`, `ANDS`, `LSLS`; a comparison with zero is no test of a feature), the first
//!   conditional branch guards the code it skips to and over: for `beq L` the instructions up to `L`, and when
//!   they end in `B J` (an if/else) also those from `L` up to `J`; conditional calls and address loads after the
//!   test select guarded functions. Everything those guarded blocks call, or whose address they load, is guarded;
//!   branches out of a guarded block lead back to ordinary code.
//! - an IFUNC resolver runs everywhere, but every function whose address it loads is chosen by it at run time
//!   and guarded.
//!
//! ARMv7 encodings followed, with no branch between, by an Advanced SIMD (NEON) instruction do not count either:
//! NEON exists only from ARMv7 on, so that code runs only where NEON does, behind the run-time choice that NEON
//! code always sits behind (OpenSSL's and ring's NEON routines start with an errata `DMB`). VFP, which an
//! ARM1176 has, does not have this effect.
//!
//! Limits: a capability word kept in a register or variable and tested later, `/proc/self/auxv` parsed by hand,
//! a stripped OpenSSL/ring `OPENSSL_armcap_P`, or a table of implementations indexed by a capability are not
//! recognised, so their ARMv7 routines count (a false refusal, never a false acceptance). Conversely code a
//! guard selects is trusted to need the feature the guard tested.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use serde::Serialize;

use super::arm_code::{A32, CodeRegion, Mapping, T32, V7Encoding, classify_a32, classify_t32};

/// Jump tables larger than this are taken for a misread bound.
const MAX_TABLE_ENTRIES: u32 = 4096;
/// How many instructions after a capability read its test and branch must follow.
const GUARD_WINDOW: u8 = 6;
/// An if/else guarded by a capability test spans at most this many bytes; farther targets are not taken for one.
const MAX_GUARDED_SPAN: u64 = 0x2000;

/// Where a walk starts, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Root {
    Entry,
    InitFini,
    DataPointer,
    Got,
    DynamicSymbol,
    Plt,
    IfuncResolver,
}

impl Root {
    fn label(self) -> &'static str {
        match self {
            Root::Entry => "entry",
            Root::InitFini => "init/fini",
            Root::DataPointer => "data pointer",
            Root::Got => ".got",
            Root::DynamicSymbol => "dynamic symbol",
            Root::Plt => ".plt",
            Root::IfuncResolver => "IFUNC resolver",
        }
    }
}

/// What the walk needs from the file.
#[derive(Debug, Default)]
pub struct Program<'a> {
    /// Executable bytes, sorted by address or not.
    pub regions: Vec<CodeRegion<'a>>,
    /// Addresses to start from, bit 0 set for Thumb.
    pub roots: Vec<(u64, Root)>,
    /// Words to read as function addresses (from `.init_array`, `.got`, ...): kept only if they point into code.
    pub pointers: Vec<(u64, Root)>,
    /// IFUNC resolvers (bit 0 for Thumb).
    pub resolvers: Vec<u64>,
    /// Mapping symbols, where the symbol table has them.
    pub mappings: Vec<(u64, Mapping)>,
    /// Function names by address (bit 0 clear), for the path to the first ARMv7 instruction.
    pub names: BTreeMap<u64, String>,
    /// Addresses of capability words (`OPENSSL_armcap_P`, `_dl_hwcap`): loading one opens a guard window.
    pub capability_words: Vec<u64>,
}

/// The first counted ARMv7 instruction and how the walk got there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FirstV7 {
    pub address: u64,
    pub instruction: V7Encoding,
    /// `arm` or `thumb`.
    pub state: &'static str,
    /// From where the walk started to the function holding the instruction, e.g. `["entry 0x10100",
    /// "0x10480", "main 0x10530"]`.
    pub path: Vec<String>,
}

/// What the walk found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reach {
    pub functions: u64,
    pub code_bytes: u64,
    pub simd: u64,
    pub v7: BTreeMap<V7Encoding, u64>,
    pub first_v7: Option<FirstV7>,
    /// Functions reached only behind a CPU-feature check, and the ARMv7 instructions there or running straight
    /// into Advanced SIMD code: reported, not counted.
    pub guarded_functions: u64,
    pub guarded_v7: u64,
    /// The reached code as mapping symbols, sorted: what the walk gives back to a binary that lacks them.
    pub recovered: Vec<(u64, Mapping)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Guard {
    #[default]
    None,
    /// Reached only through a guarded call or address: all of it is guarded.
    Whole,
    /// The blocks a capability test skips to or over, `[from, to)` within one function.
    Range(u64, u64),
}

#[derive(Debug, Clone, Copy)]
struct Item {
    address: u64,
    thumb: bool,
    function: usize,
    guard: Guard,
}

#[derive(Debug, Clone)]
struct Function {
    address: u64,
    thumb: bool,
    from: Result<usize, Root>,
    guarded: bool,
    resolver: bool,
    /// Found only as a value in data or a literal: it may be data that looks like an address.
    weak: bool,
    /// A weak function whose code ran into data or into code already walked in the other state: it was no
    /// function, and its encodings do not count.
    invalid: bool,
}

#[derive(Debug, Clone, Copy)]
struct Hit {
    address: u64,
    kind: V7Encoding,
    thumb: bool,
    function: usize,
    guarded: bool,
    /// Followed, with no branch between, by an Advanced SIMD instruction.
    neon_run: bool,
}

/// Visited flags, per halfword of each region.
const SEEN: u8 = 1;
const SEEN_GUARDED: u8 = 2;
const SEEN_THUMB: u8 = 4;

struct Walker<'p, 'a> {
    program: &'p Program<'a>,
    /// Regions sorted by address.
    regions: Vec<CodeRegion<'a>>,
    seen: Vec<Vec<u8>>,
    mappings: Vec<(u64, Mapping)>,
    functions: Vec<Function>,
    by_address: HashMap<u64, usize>,
    queue: VecDeque<Item>,
    weak_queue: VecDeque<Item>,
    guarded_queue: VecDeque<Item>,
    data_words: HashSet<u64>,
    hits: Vec<Hit>,
    hit_at: HashMap<u64, usize>,
    resolvers: HashSet<u64>,
    capability_words: HashSet<u64>,
    code_bytes: u64,
    simd: u64,
    /// The function whose code is being decoded.
    current: usize,
}

/// How [`Walker::visit`] found an address.
enum Visit {
    /// Walked before in the other state: one of the two walks read it wrongly.
    Conflict,
    /// Never reached before.
    First,
    /// Reached before only behind a guard, and now in the open.
    Again,
    /// Already walked in a way that covers this walk.
    Covered,
}

/// Walks `program` and counts what it reaches.
pub fn walk(program: &Program<'_>) -> Reach {
    let mut regions = program.regions.clone();
    regions.sort_by_key(|r| r.address);
    let seen = regions
        .iter()
        .map(|r| vec![0u8; r.bytes.len() / 2 + 1])
        .collect();
    let mut mappings = program.mappings.clone();
    mappings.sort_by_key(|m| m.0);
    let mut walker = Walker {
        program,
        regions,
        seen,
        mappings,
        functions: Vec::new(),
        by_address: HashMap::new(),
        queue: VecDeque::new(),
        weak_queue: VecDeque::new(),
        guarded_queue: VecDeque::new(),
        data_words: HashSet::new(),
        hits: Vec::new(),
        hit_at: HashMap::new(),
        resolvers: program.resolvers.iter().copied().collect(),
        capability_words: program.capability_words.iter().copied().collect(),
        code_bytes: 0,
        simd: 0,
        current: 0,
    };
    walker.run();
    walker.finish()
}

fn sign_extend(value: u32, bits: u32) -> i64 {
    let shift = 32 - bits;
    i64::from(((value << shift) as i32) >> shift)
}

fn offset(address: u64, delta: i64) -> u64 {
    address.wrapping_add_signed(delta) & 0xffff_ffff
}

/// An ARM modified immediate: 8 bits rotated right by twice the 4-bit rotation.
fn arm_immediate(word: u32) -> u32 {
    (word & 0xff).rotate_right(((word >> 8) & 0xf) * 2)
}

/// The branch offset of Thumb-2 `BL`/`BLX`/`B.W` (encoding T4): S:I1:I2:imm10:imm11:0.
fn t32_long_offset(first: u16, second: u16) -> i64 {
    let s = u32::from((first >> 10) & 1);
    let j1 = u32::from((second >> 13) & 1);
    let j2 = u32::from((second >> 11) & 1);
    let i1 = !(j1 ^ s) & 1;
    let i2 = !(j2 ^ s) & 1;
    let imm = (s << 24)
        | (i1 << 23)
        | (i2 << 22)
        | (u32::from(first & 0x3ff) << 12)
        | (u32::from(second & 0x7ff) << 1);
    sign_extend(imm, 25)
}

/// The offset of the conditional `B<c>.W` (encoding T3): S:J2:J1:imm6:imm11:0.
fn t32_cond_offset(first: u16, second: u16) -> i64 {
    let s = u32::from((first >> 10) & 1);
    let j1 = u32::from((second >> 13) & 1);
    let j2 = u32::from((second >> 11) & 1);
    let imm = (s << 20)
        | (j2 << 19)
        | (j1 << 18)
        | (u32::from(first & 0x3f) << 12)
        | (u32::from(second & 0x7ff) << 1);
    sign_extend(imm, 21)
}

/// What one instruction does to the flow of control.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Next,
    /// A jump to a known target; `conditional` ones also fall through.
    Jump {
        target: u64,
        thumb: bool,
        conditional: bool,
    },
    /// A call: the walk goes on after it.
    Call {
        target: u64,
        thumb: bool,
        conditional: bool,
    },
    /// The end of the run: a return, an unbounded indirect jump, a trap.
    Stop,
}

impl<'a> Walker<'_, 'a> {
    fn region_index(&self, address: u64) -> Option<usize> {
        let i = self
            .regions
            .partition_point(|r| r.address <= address)
            .checked_sub(1)?;
        let region = self.regions.get(i)?;
        (address - region.address < region.bytes.len() as u64).then_some(i)
    }

    fn bytes_at(&self, address: u64, len: usize) -> Option<&'a [u8]> {
        let region = *self.regions.get(self.region_index(address)?)?;
        let at = usize::try_from(address - region.address).ok()?;
        region.bytes.get(at..at.checked_add(len)?)
    }

    fn word_at(&self, address: u64) -> Option<u32> {
        self.bytes_at(address, 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn half_at(&self, address: u64) -> Option<u16> {
        self.bytes_at(address, 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    }

    /// A code address from data, or `None` when it cannot be one: Thumb with bit 0 set, ARM word-aligned.
    fn code_pointer(&self, value: u64) -> Option<(u64, bool)> {
        let (address, thumb) = if value & 1 == 1 {
            (value & !1, true)
        } else if value % 4 == 0 {
            (value, false)
        } else {
            return None;
        };
        self.region_index(address)?;
        Some((address, thumb))
    }

    fn mapping_at(&self, address: u64) -> Option<(Mapping, u64)> {
        let i = self.mappings.partition_point(|m| m.0 <= address);
        let current = self.mappings.get(i.checked_sub(1)?)?.1;
        let next = self.mappings.get(i).map_or(u64::MAX, |m| m.0);
        Some((current, next))
    }

    fn add_function(
        &mut self,
        address: u64,
        thumb: bool,
        from: Result<usize, Root>,
        guarded: bool,
        weak: bool,
    ) {
        let key = address | u64::from(thumb);
        let resolver = self.resolvers.contains(&key);
        // What a weak function calls is as doubtful as it is.
        let weak = weak
            || from
                .ok()
                .and_then(|parent| self.functions.get(parent))
                .is_some_and(|p| p.weak);
        let index = match self.by_address.get(&key) {
            Some(&i) => {
                let Some(function) = self.functions.get_mut(i) else {
                    return;
                };
                // A function first reached behind a guard and then in the open is ordinary code after all.
                if guarded || !function.guarded {
                    return;
                }
                function.guarded = false;
                function.from = from;
                i
            }
            None => {
                self.functions.push(Function {
                    address,
                    thumb,
                    from,
                    guarded,
                    resolver,
                    weak,
                    invalid: false,
                });
                self.by_address.insert(key, self.functions.len() - 1);
                self.functions.len() - 1
            }
        };
        let guard = if guarded { Guard::Whole } else { Guard::None };
        self.push(Item {
            address,
            thumb,
            function: index,
            guard,
        });
    }

    /// Queues a run: ordinary code first, then code found only through values that may be addresses (so that
    /// their walks meet the code and literals already known, and show themselves as data read as code), then
    /// code behind CPU-feature checks (so that code also reached in the open is known as such first).
    fn push(&mut self, item: Item) {
        let weak = self.functions.get(item.function).is_some_and(|f| f.weak);
        if item.guard != Guard::None {
            self.guarded_queue.push_back(item);
        } else if weak {
            self.weak_queue.push_back(item);
        } else {
            self.queue.push_back(item);
        }
    }

    fn run(&mut self) {
        for &(address, root) in &self.program.roots {
            if let Some((address, thumb)) = self.code_pointer(address) {
                self.add_function(address, thumb, Err(root), false, false);
            }
        }
        for &resolver in &self.program.resolvers {
            if let Some((address, thumb)) = self.code_pointer(resolver) {
                self.add_function(address, thumb, Err(Root::IfuncResolver), false, false);
            }
        }
        // In the order of [`Walker::push`]; words of data that may be addresses join the weak ones once the
        // code the roots reach is known.
        let mut pointers_added = false;
        loop {
            if let Some(item) = self.queue.pop_front() {
                self.run_from(item);
                continue;
            }
            if let Some(item) = self.weak_queue.pop_front() {
                self.run_from(item);
                continue;
            }
            if !pointers_added {
                pointers_added = true;
                for &(value, root) in &self.program.pointers {
                    // `.init_array` and `.fini_array` hold only functions; `.got` holds the addresses of symbols
                    // (an odd one in code is a Thumb function); other data may hold anything.
                    let weak = root != Root::InitFini;
                    if let Some((address, thumb)) = self.code_pointer(value) {
                        if root == Root::DataPointer && thumb && !self.thumb_prologue(address) {
                            continue;
                        }
                        self.add_function(address, thumb, Err(root), false, weak);
                    }
                }
                continue;
            }
            match self.guarded_queue.pop_front() {
                Some(item) => self.run_from(item),
                None => break,
            }
        }
    }

    fn finish(self) -> Reach {
        let mut reach = Reach {
            code_bytes: self.code_bytes,
            simd: self.simd,
            ..Reach::default()
        };
        for f in self.functions.iter().filter(|f| !f.invalid) {
            if f.guarded {
                reach.guarded_functions += 1;
            } else {
                reach.functions += 1;
            }
        }
        for hit in &self.hits {
            // A hit on a word some instruction loads as a literal, or in a jump table, is data read as code.
            let data = [hit.address & !3, (hit.address + 2) & !3]
                .iter()
                .any(|w| self.data_words.contains(w));
            let invalid = self.functions.get(hit.function).is_some_and(|f| f.invalid);
            if data || invalid {
                continue;
            }
            if hit.guarded || hit.neon_run {
                reach.guarded_v7 += 1;
                continue;
            }
            *reach.v7.entry(hit.kind).or_default() += 1;
            if reach.first_v7.is_none() {
                reach.first_v7 = Some(FirstV7 {
                    address: hit.address,
                    instruction: hit.kind,
                    state: if hit.thumb { "thumb" } else { "arm" },
                    path: self.path(hit.function),
                });
            }
        }
        // Runs of reached halfwords in one state, as mapping symbols.
        for (region, seen) in self.regions.iter().zip(&self.seen) {
            let mut current: Option<Mapping> = None;
            for (i, &flags) in seen.iter().enumerate() {
                let state = match (flags & (SEEN | SEEN_GUARDED) != 0, flags & SEEN_THUMB != 0) {
                    (false, _) => None,
                    (true, true) => Some(Mapping::Thumb),
                    (true, false) => Some(Mapping::Arm),
                };
                if state != current {
                    reach.recovered.push((
                        region.address + 2 * i as u64,
                        state.unwrap_or(Mapping::Data),
                    ));
                    current = state;
                }
            }
        }
        reach
    }

    fn path(&self, function: usize) -> Vec<String> {
        let mut path = Vec::new();
        let mut at = Some(function);
        // The parent chain has no cycles (a function's parent is found before it), but bound it anyway.
        while let Some(i) = at.filter(|_| path.len() < 64) {
            let Some(f) = self.functions.get(i) else {
                break;
            };
            let name = self.program.names.get(&f.address);
            let mut step = match name {
                Some(name) => format!("{name} {:#x}", f.address),
                None => format!("{:#x}", f.address),
            };
            if f.thumb {
                step.push_str(" (thumb)");
            }
            match f.from {
                Ok(parent) => at = Some(parent),
                Err(root) => {
                    step = format!("{} {step}", root.label());
                    at = None;
                }
            }
            path.push(step);
        }
        path.reverse();
        path
    }

    /// Marks `address` as reached; `None` outside the executable regions.
    fn visit(&mut self, address: u64, thumb: bool, guarded: bool) -> Option<Visit> {
        let i = self.region_index(address)?;
        let region = self.regions.get(i)?;
        let slot = usize::try_from((address - region.address) / 2).ok()?;
        let flags = self.seen.get_mut(i)?.get_mut(slot)?;
        let covered = if guarded { SEEN | SEEN_GUARDED } else { SEEN };
        if *flags & (SEEN | SEEN_GUARDED) != 0 && (*flags & SEEN_THUMB != 0) != thumb {
            return Some(Visit::Conflict);
        }
        if *flags & covered != 0 {
            return Some(Visit::Covered);
        }
        let first = *flags == 0;
        *flags |= if guarded { SEEN_GUARDED } else { SEEN };
        if thumb {
            *flags |= SEEN_THUMB;
        }
        Some(if first { Visit::First } else { Visit::Again })
    }

    fn hit(
        &mut self,
        address: u64,
        kind: V7Encoding,
        thumb: bool,
        function: usize,
        guarded: bool,
    ) -> usize {
        match self.hit_at.get(&address) {
            Some(&i) => {
                if let Some(hit) = self.hits.get_mut(i).filter(|h| h.guarded && !guarded) {
                    hit.guarded = false;
                    hit.function = function;
                }
                i
            }
            None => {
                self.hit_at.insert(address, self.hits.len());
                self.hits.push(Hit {
                    address,
                    kind,
                    thumb,
                    function,
                    guarded,
                    neon_run: false,
                });
                self.hits.len() - 1
            }
        }
    }

    /// Decodes from `item` on until the flow stops.
    fn run_from(&mut self, item: Item) {
        let mut state = Run {
            thumb: item.thumb,
            guard: item.guard,
            ..Run::default()
        };
        self.current = item.function;
        // Hits since the last branch, call or return: what runs straight on from them.
        let mut straight: Vec<usize> = Vec::new();
        let mut address = item.address;
        let mut boundary = 0u64;
        loop {
            if let Guard::Range(_, to) = state.guard {
                if address >= to {
                    // The guarded blocks end here; what follows is reached in the open if at all.
                    break;
                }
            }
            if address >= boundary {
                // Mapping symbols decide where the flow crosses one, or where one sits exactly at a branch
                // target. A branch target after a symbol of an earlier object (binaries that have them only
                // partly: objects assembled without them, or stripped of local symbols) keeps the state the
                // walk found; the walk then stands in for the missing symbols.
                let exact_or_crossed = address > item.address
                    || self
                        .mappings
                        .binary_search_by_key(&address, |m| m.0)
                        .is_ok();
                match self.mapping_at(address) {
                    Some((Mapping::Data, _)) if exact_or_crossed => break,
                    Some((mapping, next)) => {
                        if exact_or_crossed && mapping != Mapping::Data {
                            state.thumb = mapping == Mapping::Thumb;
                        }
                        boundary = next;
                    }
                    None => boundary = self.mappings.first().map_or(u64::MAX, |m| m.0),
                }
            }
            let guarded = state.guard != Guard::None;
            // A weak function that runs into a literal or into code of the other state is data read as code.
            let data = self.data_words.contains(&(address & !3));
            let visit = self.visit(address, state.thumb, guarded);
            if data || matches!(visit, Some(Visit::Conflict)) {
                if let Some(f) = self.functions.get_mut(item.function).filter(|f| f.weak) {
                    f.invalid = true;
                }
                break;
            }
            // Already walked: the rest of this run was walked too.
            let first = match visit {
                None | Some(Visit::Covered | Visit::Conflict) => break,
                Some(Visit::First) => true,
                Some(Visit::Again) => false,
            };
            let decoded = if state.thumb {
                self.decode_thumb(address, &mut state)
            } else {
                self.decode_arm(address, &mut state)
            };
            let Some((size, flow, kind)) = decoded else {
                break;
            };
            if first {
                self.code_bytes += size;
            }
            if size == 4 {
                // The second halfword too, so that a walk into the middle of the instruction finds it taken.
                let _ = self.visit(address + 2, state.thumb, guarded);
            }
            match kind {
                Some(Some(kind)) => {
                    let i = self.hit(address, kind, state.thumb, item.function, guarded);
                    straight.push(i);
                }
                Some(None) => {
                    if first {
                        self.simd += 1;
                    }
                    // Advanced SIMD exists only from ARMv7 on: ARMv7 encodings that run straight into it (the
                    // errata DMB at the top of OpenSSL's NEON routines) run only where it runs, behind the
                    // same run-time choice.
                    if self.is_neon(address, state.thumb) {
                        for &i in &straight {
                            if let Some(hit) = self.hits.get_mut(i) {
                                hit.neon_run = true;
                            }
                        }
                        straight.clear();
                    }
                }
                None => {}
            }
            if flow != Flow::Next {
                straight.clear();
            }
            let next = address + size;
            let stop = self.follow(next, flow, &mut state, item.function);
            if stop {
                break;
            }
            if !state.flushed.is_empty() {
                self.flush(&mut state, item.function, false);
            }
            address = next;
            state.tick();
        }
    }

    /// Acts on one instruction's flow; true when the run ends.
    fn follow(&mut self, next: u64, flow: Flow, state: &mut Run, function: usize) -> bool {
        // A branch on a capability is a branch on one of its bits, tested just before (TST, ANDS, LSLS):
        // `if (!getauxval(AT_HWCAP)) goto fail` compares it with zero and guards nothing.
        let conditional_in_window = state.window > 0 && state.tested;
        match flow {
            Flow::Next => false,
            Flow::Stop => !state.conditional(),
            Flow::Call {
                target,
                thumb,
                conditional,
            } => {
                let guarded = state.guard != Guard::None || (conditional_in_window && conditional);
                state.tested = false;
                if state.hwcap_argument > 0 {
                    state.window = GUARD_WINDOW;
                } else {
                    state.window = 0;
                }
                self.flush(state, function, true);
                state.registers = [None; 16];
                self.add_function(target, thumb, Ok(function), guarded, false);
                false
            }
            Flow::Jump {
                target,
                thumb,
                conditional,
            } => {
                let conditional = conditional || state.conditional();
                if conditional && conditional_in_window && state.guard == Guard::None {
                    state.window = 0;
                    if target > next && target - next <= MAX_GUARDED_SPAN && thumb == state.thumb {
                        let then = Guard::Range(next, target);
                        let otherwise = self
                            .else_part(target, state.thumb)
                            .map(|join| Guard::Range(target, join));
                        self.push(Item {
                            address: next,
                            thumb: state.thumb,
                            function,
                            guard: then,
                        });
                        self.push(Item {
                            address: target,
                            thumb,
                            function,
                            guard: otherwise.unwrap_or(Guard::None),
                        });
                        return true;
                    }
                    // A capability test that jumps elsewhere (a tail call, a loop): the target is guarded.
                    self.add_function(target, thumb, Ok(function), true, false);
                    return false;
                }
                let guard = match state.guard {
                    Guard::Range(from, to) if target < from || target >= to => Guard::None,
                    other => other,
                };
                // A branch into another function (a tail call) lands in its code all the same: it is walked as
                // part of this one, which only changes the path reported.
                self.push(Item {
                    address: target,
                    thumb,
                    function,
                    guard,
                });
                !conditional
            }
        }
    }

    /// For a capability test that skips to `target`: when the skipped blocks end in `B join` past `target`, the
    /// code from `target` to `join` is the other arm of an if/else.
    fn else_part(&self, target: u64, thumb: bool) -> Option<u64> {
        if thumb {
            let before = self.half_at(target.checked_sub(2)?)?;
            if before & 0xf800 == 0xe000 {
                let join = offset(target + 2, sign_extend(u32::from(before & 0x7ff) << 1, 12));
                return (join > target).then_some(join);
            }
            let first = self.half_at(target.checked_sub(4)?)?;
            if first >> 11 == 0b11110 && before & 0xd000 == 0x9000 {
                let join = offset(target, t32_long_offset(first, before));
                return (join > target).then_some(join);
            }
            None
        } else {
            let before = self.word_at(target.checked_sub(4)?)?;
            if before & 0xff00_0000 == 0xea00_0000 {
                let join = offset(target + 4, sign_extend((before & 0x00ff_ffff) << 2, 26));
                return (join > target).then_some(join);
            }
            None
        }
    }

    /// Whether an address the current instruction produces is chosen by a capability test or a resolver.
    fn chosen(&self, state: &Run, function: usize, conditional: bool) -> bool {
        let resolver = self.functions.get(function).is_some_and(|f| f.resolver);
        state.guard != Guard::None
            || resolver
            || (state.window > 0 && state.tested && (conditional || state.conditional()))
    }

    /// An address an instruction computed (MOVW/MOVT, pc-relative): a pointer into code becomes a function,
    /// a capability word's address opens a guard window.
    fn value(&mut self, value: u64, state: &mut Run, function: usize, conditional: bool) {
        if self.capability_words.contains(&value) {
            state.window = GUARD_WINDOW + 2;
            state.tested = false;
            return;
        }
        let guarded = self.chosen(state, function, conditional);
        self.candidate(value, function, guarded);
    }

    fn candidate(&mut self, value: u64, function: usize, guarded: bool) {
        if let Some((target, thumb)) = self.code_pointer(value) {
            // A constant with bit 0 set that only looks like an address would send the walk into ARM code or
            // data read as Thumb, where nearly every other halfword looks like Thumb-2: an odd value is taken
            // for a Thumb function only if it starts as one does, by saving registers.
            if thumb && !self.thumb_prologue(target) {
                return;
            }
            self.add_function(target, thumb, Ok(function), guarded, true);
        }
    }

    /// Whether the SIMD/VFP instruction at `address` is Advanced SIMD (NEON), which ARMv6 never has, rather
    /// than VFP, which an ARM1176 has.
    fn is_neon(&self, address: u64, thumb: bool) -> bool {
        if thumb {
            // Data processing 111x 1111, element/structure loads and stores 1111 1001 xxx0. The transfers
            // between core and SIMD registers in the coprocessor space are left to VFP, as in ARM state.
            self.half_at(address)
                .is_some_and(|first| first & 0xef00 == 0xef00 || first & 0xff10 == 0xf900)
        } else {
            self.word_at(address)
                .is_some_and(|w| (w >> 25) == 0b111_1001 || (w >> 20) & 0xff1 == 0xf40)
        }
    }

    /// `PUSH {..}`, `PUSH.W {..}` / `STMDB sp!`, `SUB sp, #n` or `STR.W lr, [sp, #-n]!` at `address`.
    fn thumb_prologue(&self, address: u64) -> bool {
        let Some(first) = self.half_at(address) else {
            return false;
        };
        let second = self.half_at(address + 2).unwrap_or_default();
        first & 0xfe00 == 0xb400
            || first & 0xff80 == 0xb080
            || first == 0xe92d
            || (first == 0xf84d && second & 0x0fff == 0x0d04)
    }

    /// A literal loaded into `register`: position-independent code adds pc to it (an offset, not an address),
    /// and constants look like addresses in a program linked low, so it is taken for an address only when it is
    /// passed on or returned unchanged (see [`Walker::flush`]).
    fn literal_value(
        &mut self,
        value: u32,
        register: usize,
        state: &mut Run,
        function: usize,
        conditional: bool,
    ) {
        if self.capability_words.contains(&u64::from(value)) {
            state.window = GUARD_WINDOW + 2;
            state.tested = false;
            return;
        }
        let guarded = self.chosen(state, function, conditional);
        if let Some(slot) = state.pending.get_mut(register) {
            *slot = Some((value, guarded));
        }
    }

    /// Literals that turned out to be addresses: those in the argument registers `r0`–`r3` at a call or where
    /// the flow stops (passed to a function, as `_start` passes `main`, or returned, as a resolver does).
    fn flush(&mut self, state: &mut Run, function: usize, arguments: bool) {
        if arguments {
            for slot in state.pending.iter_mut().take(4) {
                if let Some(p) = slot.take() {
                    state.flushed.push(p);
                }
            }
            state.pending = [None; 16];
        }
        for (value, guarded) in std::mem::take(&mut state.flushed) {
            self.candidate(u64::from(value), function, guarded);
        }
    }

    /// A literal the code loads: the word is data, and its value may be an address.
    fn literal(&mut self, at: u64) -> Option<u32> {
        let value = self.word_at(at)?;
        self.data_words.insert(at & !3);
        Some(value)
    }

    /// A jump table's entry count from the `CMP Rm, #n` before it.
    fn table_len(state: &Run, register: u32) -> Option<u32> {
        let bound = state.bounds.get(register as usize).copied().flatten()?;
        let entries = bound.checked_add(1)?;
        (entries <= MAX_TABLE_ENTRIES).then_some(entries)
    }

    fn decode_arm(
        &mut self,
        address: u64,
        state: &mut Run,
    ) -> Option<(u64, Flow, Option<Option<V7Encoding>>)> {
        if address % 4 != 0 {
            return None;
        }
        let word = self.word_at(address)?;
        let function = self.current;
        let kind = classify_a32(word).map(|c| match c {
            A32::Simd => None,
            A32::V7(kind) => Some(kind),
        });
        let cond = word >> 28;
        let pc = address + 8;
        let rd = ((word >> 12) & 0xf) as usize;
        state.instruction_conditional = cond != 0xe && cond != 0xf;
        // TST and ANDS (immediate or register), MOVS/LSLS by an immediate: a bit of the capability word tested.
        if state.window > 0
            && (word & 0x0ff0_0000 == 0x0310_0000
                || word & 0x0ff0_0010 == 0x0110_0000
                || word & 0x0ff0_0000 == 0x0210_0000
                || word & 0x0ff0_0010 == 0x0010_0000
                || word & 0x0fff_0010 == 0x01b0_0000)
        {
            state.tested = true;
        }
        let conditional = state.instruction_conditional;
        // mov r0, #16 / #26: AT_HWCAP, AT_HWCAP2 for the call that follows.
        if word == 0xe3a0_0010 || word == 0xe3a0_001a {
            state.hwcap_argument = 3;
        }
        if cond == 0xf {
            // BLX immediate: to Thumb, H adds a halfword.
            if word & 0xfe00_0000 == 0xfa00_0000 {
                let delta =
                    sign_extend((word & 0x00ff_ffff) << 2, 26) + i64::from((word >> 24) & 1) * 2;
                return Some((
                    4,
                    Flow::Call {
                        target: offset(pc, delta),
                        thumb: true,
                        conditional: false,
                    },
                    kind,
                ));
            }
            return Some((4, Flow::Next, kind));
        }
        // B, BL.
        if word & 0x0e00_0000 == 0x0a00_0000 {
            let target = offset(pc, sign_extend((word & 0x00ff_ffff) << 2, 26));
            let flow = if word & 0x0100_0000 != 0 {
                Flow::Call {
                    target,
                    thumb: false,
                    conditional,
                }
            } else {
                Flow::Jump {
                    target,
                    thumb: false,
                    conditional,
                }
            };
            return Some((4, flow, kind));
        }
        // BX Rm, BLX Rm.
        if word & 0x0fff_ffd0 == 0x012f_ff10 {
            let rm = (word & 0xf) as usize;
            let known = state.registers.get(rm).copied().flatten();
            let call = word & 0x20 != 0 || state.lr_set;
            let flow = match known.and_then(|v| self.code_pointer(u64::from(v))) {
                Some((target, thumb)) if call => Flow::Call {
                    target,
                    thumb,
                    conditional,
                },
                Some((target, thumb)) => Flow::Jump {
                    target,
                    thumb,
                    conditional,
                },
                None if call => Flow::Next,
                None => Flow::Stop,
            };
            state.lr_set = false;
            return Some((4, flow, kind));
        }
        // UDF and the permanently undefined space.
        if word & 0x0ff0_00f0 == 0x07f0_00f0 {
            return Some((4, Flow::Stop, kind));
        }
        let lr_set = std::mem::take(&mut state.lr_set);
        // mov lr, pc: the old call sequence before an LDR pc or BX.
        if word == 0xe1a0_e00f {
            state.lr_set = true;
            return Some((4, Flow::Next, kind));
        }
        // LDR Rd, [pc, #±imm12]: a literal.
        if word & 0x0f7f_0000 == 0x051f_0000 {
            let imm = i64::from(word & 0xfff);
            let at = offset(pc, if word & 0x0080_0000 != 0 { imm } else { -imm });
            let value = self.literal(at);
            if rd == 15 {
                let target = value.and_then(|v| self.code_pointer(u64::from(v)));
                let flow = match target {
                    Some((target, thumb)) if lr_set => Flow::Call {
                        target,
                        thumb,
                        conditional,
                    },
                    Some((target, thumb)) => Flow::Jump {
                        target,
                        thumb,
                        conditional,
                    },
                    None if lr_set => Flow::Next,
                    None => Flow::Stop,
                };
                return Some((4, flow, kind));
            }
            state.set(rd, value);
            if let Some(v) = value {
                self.literal_value(v, rd, state, function, conditional);
            }
            return Some((4, Flow::Next, kind));
        }
        // LDR pc, [pc, Rm, LSL #2]: a table of addresses after the next instruction (the default branch).
        if word & 0x0fff_fff0 == 0x079f_f100 {
            let rm = word & 0xf;
            let Some(entries) = Self::table_len(state, rm) else {
                return Some((4, Flow::Stop, kind));
            };
            for i in 0..u64::from(entries) {
                let at = pc + 4 * i;
                if let Some((target, thumb)) = self
                    .literal(at)
                    .and_then(|v| self.code_pointer(u64::from(v)))
                {
                    self.push(Item {
                        address: target,
                        thumb,
                        function,
                        guard: state.guard,
                    });
                }
            }
            return Some((4, if conditional { Flow::Next } else { Flow::Stop }, kind));
        }
        // ADD pc, pc, Rm, LSL #2: a table of branch instructions after the next instruction.
        if word & 0x0fff_fff0 == 0x008f_f100 {
            let rm = word & 0xf;
            let Some(entries) = Self::table_len(state, rm) else {
                return Some((4, Flow::Stop, kind));
            };
            for i in 0..u64::from(entries) {
                self.push(Item {
                    address: pc + 4 * i,
                    thumb: false,
                    function,
                    guard: state.guard,
                });
            }
            return Some((4, if conditional { Flow::Next } else { Flow::Stop }, kind));
        }
        // CMP Rn, #imm: the bound of a jump table that may follow.
        if word & 0x0ff0_f000 == 0x0350_0000 {
            let rn = ((word >> 16) & 0xf) as usize;
            if let Some(slot) = state.bounds.get_mut(rn) {
                *slot = Some(arm_immediate(word));
            }
            return Some((4, Flow::Next, kind));
        }
        // MOVW, MOVT: an address built in two halves.
        if word & 0x0ff0_0000 == 0x0300_0000 || word & 0x0ff0_0000 == 0x0340_0000 {
            let imm = ((word >> 4) & 0xf000) | (word & 0xfff);
            if word & 0x0040_0000 == 0 {
                state.set(rd, Some(imm));
            } else if let Some(low) = state.registers.get(rd).copied().flatten() {
                let value = (imm << 16) | (low & 0xffff);
                state.set(rd, Some(value));
                self.value(u64::from(value), state, function, conditional);
            }
            return Some((4, Flow::Next, kind));
        }
        // ADD Rd, pc, Rm: a position-independent address from a literal offset.
        if word & 0x0fff_0ff0 == 0x008f_0000 {
            let rm = (word & 0xf) as usize;
            state.consume(rm);
            let known = state.registers.get(rm).copied().flatten();
            let value = known.map(|v| v.wrapping_add(pc as u32));
            if rd == 15 {
                return Some((4, Flow::Stop, kind));
            }
            if let Some(v) = value {
                self.value(u64::from(v), state, function, conditional);
            }
            state.set(rd, value);
            return Some((4, Flow::Next, kind));
        }
        // LDM/POP with pc in the list: a return.
        if word & 0x0e10_8000 == 0x0810_8000 {
            return Some((4, if lr_set { Flow::Next } else { Flow::Stop }, kind));
        }
        // Any other load into pc (LDR pc, [sp], #4 and friends); the media space (SDIV, USAT) shares the bits.
        if word & 0x0c10_f000 == 0x0410_f000 && word & 0x0200_0010 != 0x0200_0010 {
            return Some((4, if lr_set { Flow::Next } else { Flow::Stop }, kind));
        }
        // Data processing into pc (MOV pc, lr; SUB pc, lr, #4): a return or a jump it cannot follow.
        if word & 0x0c00_f000 == 0x0000_f000 && word & 0x0190_0000 != 0x0100_0000 {
            let multiply = word & 0x0200_0090 == 0x0000_0090;
            if !multiply {
                return Some((4, if lr_set { Flow::Next } else { Flow::Stop }, kind));
            }
        }
        // A register offset (LDR Rt, [Rn, Rm]): a literal used there was an offset (into the GOT), not an address.
        if word & 0x0e00_0010 == 0x0600_0000 {
            state.consume((word & 0xf) as usize);
            state.consume(((word >> 16) & 0xf) as usize);
        }
        // Other writes to a register forget what it held (data processing, loads).
        if word & 0x0c00_0000 == 0x0000_0000 || word & 0x0c10_0000 == 0x0410_0000 {
            state.set(rd, None);
        }
        Some((4, Flow::Next, kind))
    }

    fn decode_thumb(
        &mut self,
        address: u64,
        state: &mut Run,
    ) -> Option<(u64, Flow, Option<Option<V7Encoding>>)> {
        if address % 2 != 0 {
            return None;
        }
        let first = self.half_at(address)?;
        let function = self.current;
        let pc = address + 4;
        let aligned_pc = pc & !3;
        let in_it = state.it > 0;
        state.instruction_conditional = in_it;
        // TST, ANDS, LSLS/LSRS by an immediate (16-bit); TST.W/ANDS.W immediate or register: a bit tested.
        if state.window > 0 {
            let second = self.half_at(address + 2).unwrap_or_default();
            let narrow =
                first & 0xffc0 == 0x4200 || first & 0xffc0 == 0x4000 || first & 0xf000 == 0x0000;
            let wide =
                (first & 0xfbf0 == 0xf010 && second & 0x8000 == 0) || first & 0xfff0 == 0xea10;
            if narrow || wide {
                state.tested = true;
            }
        }
        if first >> 11 >= 0b11101 {
            let second = self.half_at(address + 2)?;
            let kind = match classify_t32(first, second) {
                T32::Thumb1 => None,
                T32::Simd => Some(None),
                T32::V7 => Some(Some(V7Encoding::Thumb2)),
            };
            // mov.w r0, #16 / #26.
            if first == 0xf04f && (second == 0x0010 || second == 0x001a) {
                state.hwcap_argument = 3;
            }
            if first >> 11 == 0b11110 && second & 0x8000 != 0 {
                match second & 0xd000 {
                    // BL.
                    0xd000 => {
                        let target = offset(pc, t32_long_offset(first, second));
                        return Some((
                            4,
                            Flow::Call {
                                target,
                                thumb: true,
                                conditional: in_it,
                            },
                            kind,
                        ));
                    }
                    // BLX to ARM: the target is word-aligned.
                    0xc000 => {
                        let target = offset(aligned_pc, t32_long_offset(first, second)) & !3;
                        return Some((
                            4,
                            Flow::Call {
                                target,
                                thumb: false,
                                conditional: in_it,
                            },
                            kind,
                        ));
                    }
                    // B.W.
                    0x9000 => {
                        let target = offset(pc, t32_long_offset(first, second));
                        return Some((
                            4,
                            Flow::Jump {
                                target,
                                thumb: true,
                                conditional: in_it,
                            },
                            kind,
                        ));
                    }
                    // B<c>.W, or the miscellaneous control space when the condition is 111x.
                    _ => {
                        if (first >> 6) & 0xe != 0xe {
                            let target = offset(pc, t32_cond_offset(first, second));
                            return Some((
                                4,
                                Flow::Jump {
                                    target,
                                    thumb: true,
                                    conditional: true,
                                },
                                kind,
                            ));
                        }
                        return Some((4, Flow::Next, kind));
                    }
                }
            }
            // TBB, TBH [pc, Rm].
            if first == 0xe8df && second & 0xffe0 == 0xf000 {
                let half = second & 0x10 != 0;
                let rm = u32::from(second & 0xf);
                if let Some(entries) = Self::table_len(state, rm) {
                    for i in 0..u64::from(entries) {
                        let (at, entry) = if half {
                            (pc + 2 * i, self.half_at(pc + 2 * i).map(u64::from))
                        } else {
                            (
                                pc + i,
                                self.bytes_at(pc + i, 1)
                                    .and_then(|b| b.first())
                                    .map(|&b| u64::from(b)),
                            )
                        };
                        // Words wholly in the table: its first may share a word with the TBB itself.
                        if at & !3 >= pc {
                            self.data_words.insert(at & !3);
                        }
                        if let Some(entry) = entry {
                            self.push(Item {
                                address: pc + 2 * entry,
                                thumb: true,
                                function,
                                guard: state.guard,
                            });
                        }
                    }
                }
                return Some((4, Flow::Stop, kind));
            }
            // LDR.W Rt, [pc, #±imm12].
            if first & 0xff7f == 0xf85f {
                let imm = i64::from(second & 0xfff);
                let at = offset(aligned_pc, if first & 0x80 != 0 { imm } else { -imm });
                let value = self.literal(at);
                let rt = usize::from(second >> 12);
                if rt == 15 {
                    return Some((4, self.indirect(value, in_it, false), kind));
                }
                state.set(rt, value);
                if let Some(v) = value {
                    self.literal_value(v, rt, state, function, in_it);
                }
                return Some((4, Flow::Next, kind));
            }
            // MOVW, MOVT (T3, T1).
            if first & 0xfbf0 == 0xf240 || first & 0xfbf0 == 0xf2c0 {
                let imm = (u32::from(first & 0xf) << 12)
                    | (u32::from((first >> 10) & 1) << 11)
                    | (u32::from((second >> 12) & 7) << 8)
                    | u32::from(second & 0xff);
                let rd = usize::from((second >> 8) & 0xf);
                if first & 0x80 == 0 {
                    state.set(rd, Some(imm));
                } else if let Some(low) = state.registers.get(rd).copied().flatten() {
                    let value = (imm << 16) | (low & 0xffff);
                    state.set(rd, Some(value));
                    self.value(u64::from(value), state, function, in_it);
                }
                return Some((4, Flow::Next, kind));
            }
            // CMP.W Rn, #imm8 (no rotation): a table bound.
            if first & 0xfbf0 == 0xf1b0
                && second & 0x8f00 == 0x0f00
                && first & 0x0400 == 0
                && second & 0x7000 == 0
            {
                if let Some(slot) = state.bounds.get_mut(usize::from(first & 0xf)) {
                    *slot = Some(u32::from(second & 0xff));
                }
                return Some((4, Flow::Next, kind));
            }
            // LDM/POP.W with pc, LDR.W pc: a return.
            let load_multiple = first & 0xfe50 == 0xe810 && second & 0x8000 != 0;
            let load_pc =
                first & 0xff10 == 0xf810 && second >> 12 == 0xf && first & 0x0060 == 0x0040;
            if load_multiple || load_pc {
                return Some((4, if in_it { Flow::Next } else { Flow::Stop }, kind));
            }
            // Other 32-bit writes: forget the destination where it is the usual Rd field.
            state.set(usize::from((second >> 8) & 0xf), None);
            return Some((4, Flow::Next, kind));
        }

        // 16-bit instructions.
        let mut kind = None;
        let flow = if first & 0xf800 == 0xe000 {
            // B (T2).
            let target = offset(pc, sign_extend(u32::from(first & 0x7ff) << 1, 12));
            Flow::Jump {
                target,
                thumb: true,
                conditional: in_it,
            }
        } else if first & 0xf000 == 0xd000 {
            match (first >> 8) & 0xf {
                // UDF.
                0xe => Flow::Stop,
                // SVC.
                0xf => Flow::Next,
                _ => {
                    let target = offset(pc, sign_extend(u32::from(first & 0xff) << 1, 9));
                    Flow::Jump {
                        target,
                        thumb: true,
                        conditional: true,
                    }
                }
            }
        } else if first & 0xf500 == 0xb100 {
            // CBZ, CBNZ: Thumb-2.
            kind = Some(Some(V7Encoding::ThumbNarrow));
            let imm = (u32::from((first >> 9) & 1) << 6) | (u32::from((first >> 3) & 0x1f) << 1);
            Flow::Jump {
                target: pc + u64::from(imm),
                thumb: true,
                conditional: true,
            }
        } else if first & 0xff00 == 0xbf00 && first & 0xf != 0 {
            // IT: Thumb-2. The next one to four instructions are conditional.
            kind = Some(Some(V7Encoding::ThumbNarrow));
            let mask = u32::from(first & 0xf);
            state.it_next = (4 - mask.trailing_zeros()) as u8;
            Flow::Next
        } else if first & 0xff00 == 0xbe00 {
            // BKPT.
            Flow::Stop
        } else if first & 0xff00 == 0xbd00 {
            // POP {.., pc}.
            if in_it { Flow::Next } else { Flow::Stop }
        } else if first & 0xff00 == 0x4700 {
            // BX Rm, BLX Rm; BX pc switches to ARM at the next word (PLT stubs).
            let rm = usize::from((first >> 3) & 0xf);
            let call = first & 0x80 != 0;
            if rm == 15 && !call {
                Flow::Jump {
                    target: aligned_pc,
                    thumb: false,
                    conditional: in_it,
                }
            } else {
                let known = state.registers.get(rm).copied().flatten();
                match known.and_then(|v| self.code_pointer(u64::from(v))) {
                    Some((target, thumb)) if call => Flow::Call {
                        target,
                        thumb,
                        conditional: in_it,
                    },
                    Some((target, thumb)) => Flow::Jump {
                        target,
                        thumb,
                        conditional: in_it,
                    },
                    None if call => Flow::Next,
                    None => Flow::Stop,
                }
            }
        } else if first & 0xff87 == 0x4687 || first & 0xff87 == 0x4487 {
            // MOV pc, Rm; ADD pc, Rm.
            Flow::Stop
        } else if first & 0xf800 == 0x4800 {
            // LDR Rt, [pc, #imm8 * 4].
            let at = aligned_pc + u64::from(first & 0xff) * 4;
            let value = self.literal(at);
            let rt = usize::from((first >> 8) & 7);
            state.set(rt, value);
            if let Some(v) = value {
                self.literal_value(v, rt, state, function, in_it);
            }
            Flow::Next
        } else if first & 0xff78 == 0x4478 {
            // ADD Rdn, pc: a position-independent address.
            let rdn = usize::from(((first >> 4) & 8) | (first & 7));
            state.consume(rdn);
            let value = state
                .registers
                .get(rdn)
                .copied()
                .flatten()
                .map(|v| v.wrapping_add(pc as u32));
            if let Some(v) = value {
                self.value(u64::from(v), state, function, in_it);
            }
            state.set(rdn, value);
            Flow::Next
        } else if first & 0xf000 == 0x5000 {
            // Load/store with a register offset: a literal used there was an offset.
            state.consume(usize::from((first >> 6) & 7));
            state.consume(usize::from((first >> 3) & 7));
            state.set(usize::from(first & 7), None);
            Flow::Next
        } else if first & 0xf800 == 0x2800 {
            // CMP Rn, #imm8.
            if let Some(slot) = state.bounds.get_mut(usize::from((first >> 8) & 7)) {
                *slot = Some(u32::from(first & 0xff));
            }
            Flow::Next
        } else {
            // movs r0, #16 / #26.
            if first == 0x2010 || first == 0x201a {
                state.hwcap_argument = 3;
            }
            // Forget the low destination register of the common data-processing forms.
            if first & 0xe000 == 0x0000 || first & 0xe000 == 0x2000 && first & 0x1800 != 0x0800 {
                let rd = if first & 0xe000 == 0x2000 {
                    (first >> 8) & 7
                } else {
                    first & 7
                };
                state.set(usize::from(rd), None);
            }
            Flow::Next
        };
        Some((2, flow, kind))
    }

    fn indirect(&self, value: Option<u32>, conditional: bool, call: bool) -> Flow {
        match value.and_then(|v| self.code_pointer(u64::from(v))) {
            Some((target, thumb)) if call => Flow::Call {
                target,
                thumb,
                conditional,
            },
            Some((target, thumb)) => Flow::Jump {
                target,
                thumb,
                conditional,
            },
            None if call || conditional => Flow::Next,
            None => Flow::Stop,
        }
    }
}

/// What the walk knows inside one run of instructions.
#[derive(Debug, Default, Clone)]
struct Run {
    thumb: bool,
    guard: Guard,
    /// Values that this run put in registers (literals, MOVW/MOVT, pc-relative sums).
    registers: [Option<u32>; 16],
    /// Literals loaded and not yet known to be offsets, with whether a capability test chose them.
    pending: [Option<(u32, bool)>; 16],
    /// Literals found to be addresses, to be walked.
    flushed: Vec<(u32, bool)>,
    /// The last `CMP Rn, #imm` per register: a jump table's bound.
    bounds: [Option<u32>; 16],
    /// Instructions left in which a call takes `r0` as `AT_HWCAP`.
    hwcap_argument: u8,
    /// Instructions left in which a conditional branch tests a capability.
    window: u8,
    /// Whether a bit of the capability was tested in the window.
    tested: bool,
    /// Instructions left in the current IT block, and the count an IT just set for the next ones.
    it: u8,
    it_next: u8,
    instruction_conditional: bool,
    lr_set: bool,
}

impl Run {
    /// A pending literal used as an offset: no address.
    fn consume(&mut self, register: usize) {
        if let Some(slot) = self.pending.get_mut(register) {
            *slot = None;
        }
    }

    /// A register written: a literal pending in it was used as data (stored, compared, computed with): a
    /// constant that may only look like an address, so it is dropped.
    fn set(&mut self, register: usize, value: Option<u32>) {
        if let Some(slot) = self.pending.get_mut(register) {
            *slot = None;
        }
        if let Some(slot) = self.registers.get_mut(register) {
            *slot = value;
        }
        if let Some(slot) = self.bounds.get_mut(register) {
            if value.is_some() {
                *slot = None;
            }
        }
    }

    fn conditional(&self) -> bool {
        self.instruction_conditional
    }

    /// Moves the per-instruction countdowns on by one instruction.
    fn tick(&mut self) {
        self.hwcap_argument = self.hwcap_argument.saturating_sub(1);
        self.window = self.window.saturating_sub(1);
        if self.it_next > 0 {
            self.it = self.it_next;
            self.it_next = 0;
        } else {
            self.it = self.it.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: u64 = 0x1000;

    /// Hand-assembled code at `BASE`: ARM words and Thumb halfwords placed at given addresses.
    struct Asm(Vec<u8>);

    impl Asm {
        fn new() -> Asm {
            Asm(vec![0; 0x200])
        }
        fn arm(&mut self, at: u64, words: &[u32]) -> &mut Asm {
            for (i, w) in words.iter().enumerate() {
                let o = (at - BASE) as usize + 4 * i;
                self.0.splice(o..o + 4, w.to_le_bytes());
            }
            self
        }
        fn thumb(&mut self, at: u64, halves: &[u16]) -> &mut Asm {
            for (i, h) in halves.iter().enumerate() {
                let o = (at - BASE) as usize + 2 * i;
                self.0.splice(o..o + 2, h.to_le_bytes());
            }
            self
        }
        fn walk(&self, entry: u64, resolvers: &[u64]) -> Reach {
            walk(&Program {
                regions: vec![CodeRegion {
                    address: BASE,
                    bytes: &self.0,
                }],
                roots: vec![(entry, Root::Entry)],
                resolvers: resolvers.to_vec(),
                ..Program::default()
            })
        }
    }

    fn branch(op: u32, from: u64, to: u64) -> u32 {
        let delta = to.wrapping_sub(from + 8) as u32;
        op | ((delta >> 2) & 0x00ff_ffff)
    }
    fn bl(from: u64, to: u64) -> u32 {
        branch(0xeb00_0000, from, to)
    }
    fn b(from: u64, to: u64) -> u32 {
        branch(0xea00_0000, from, to)
    }
    fn beq(from: u64, to: u64) -> u32 {
        branch(0x0a00_0000, from, to)
    }
    const BX_LR: u32 = 0xe12f_ff1e;
    const NOP: u32 = 0xe1a0_0000;
    const MOVW: u32 = 0xe301_0234;
    const MOVT: u32 = 0xe345_0678;

    #[test]
    fn calls_are_followed_and_what_is_not_reached_does_not_count() {
        let mut asm = Asm::new();
        // entry: bl f; bx lr; then a word that looks like MOVT but nothing reaches. f: movw r0; bx lr.
        asm.arm(0x1000, &[bl(0x1000, 0x1040), BX_LR, MOVT])
            .arm(0x1040, &[MOVW, BX_LR]);
        let reach = asm.walk(0x1000, &[]);
        assert_eq!(reach.v7, BTreeMap::from([(V7Encoding::Movw, 1)]));
        assert_eq!(reach.functions, 2);
        assert_eq!(reach.code_bytes, 16);
        let first = reach.first_v7.unwrap();
        assert_eq!((first.address, first.state), (0x1040, "arm"));
        assert_eq!(first.path, vec!["entry 0x1000", "0x1040"]);
    }

    #[test]
    fn blx_switches_to_thumb_and_thumb2_counts_there() {
        let mut asm = Asm::new();
        // entry (ARM): blx t; bx lr. t (Thumb): push {r4, lr}; ldr.w r0, [r1, #4]; pop {r4, pc}.
        let delta = 0x1010u32.wrapping_sub(0x1008);
        asm.arm(
            0x1000,
            &[0xfa00_0000 | ((delta >> 1) & 1) << 24 | (delta >> 2), BX_LR],
        )
        .thumb(0x1010, &[0xb510, 0xf8d1, 0x0004, 0xbd10]);
        let reach = asm.walk(0x1000, &[]);
        assert_eq!(reach.v7, BTreeMap::from([(V7Encoding::Thumb2, 1)]));
        let first = reach.first_v7.unwrap();
        assert_eq!((first.address, first.state), (0x1012, "thumb"));
        assert_eq!(first.path, vec!["entry 0x1000", "0x1010 (thumb)"]);
        // The same bytes entered in ARM state (an even entry point) are ARM code: no Thumb-2.
        let arm_only = asm.walk(0x1010, &[]);
        assert!(!arm_only.v7.contains_key(&V7Encoding::Thumb2));
        // Thumb entry point: bit 0.
        let thumb = asm.walk(0x1011, &[]);
        assert_eq!(thumb.v7.get(&V7Encoding::Thumb2), Some(&1));
    }

    #[test]
    fn a_literal_after_a_call_that_never_returns_is_data() {
        // ldr r1, [pc, #0] (the word at 0x1008); bl 0x1020 (never returns: b .); the literal, MOVT-like.
        let mut asm = Asm::new();
        asm.arm(0x1000, &[0xe59f_1000, bl(0x1004, 0x1020), MOVT, BX_LR])
            .arm(0x1020, &[b(0x1020, 0x1020)]);
        assert!(asm.walk(0x1000, &[]).v7.is_empty());
        // Without the load that marks it, the walk after the call takes the word for code: the test can fail.
        asm.arm(0x1000, &[NOP]);
        assert_eq!(asm.walk(0x1000, &[]).v7.get(&V7Encoding::Movt), Some(&1));
    }

    /// `if (getauxval(AT_HWCAP) & HWCAP_NEON) v7(); else v6(); after();`
    fn hwcap_dispatch(after: u32) -> Asm {
        let mut asm = Asm::new();
        asm.arm(
            0x1000,
            &[
                0xe3a0_0010,         // mov r0, #16 (AT_HWCAP)
                bl(0x1004, 0x1040),  // bl getauxval
                0xe310_0a01,         // tst r0, #0x1000
                beq(0x100c, 0x1018), // beq else
                bl(0x1010, 0x1050),  // bl v7
                b(0x1014, 0x101c),   // b join
                bl(0x1018, 0x1060),  // else: bl v6
                bl(0x101c, 0x1070),  // join: bl after
                BX_LR,
            ],
        )
        .arm(0x1040, &[0xe3a0_0000, BX_LR])
        .arm(0x1050, &[MOVW, BX_LR])
        .arm(0x1060, &[0xe3a0_0001, BX_LR])
        .arm(0x1070, &[after, BX_LR]);
        asm
    }

    #[test]
    fn code_behind_a_hwcap_test_does_not_count_but_code_after_it_does() {
        let reach = hwcap_dispatch(NOP).walk(0x1000, &[]);
        assert!(reach.v7.is_empty(), "{reach:?}");
        assert_eq!(reach.guarded_v7, 1);
        assert_eq!(reach.guarded_functions, 2);
        // The join after the if/else is ordinary code again.
        let reach = hwcap_dispatch(MOVT).walk(0x1000, &[]);
        assert_eq!(reach.v7, BTreeMap::from([(V7Encoding::Movt, 1)]));
        assert_eq!(reach.guarded_v7, 1);
        // Compared with zero rather than a bit tested: no guard.
        let mut compared = hwcap_dispatch(NOP);
        compared.arm(0x1008, &[0xe350_0000]);
        assert_eq!(
            compared.walk(0x1000, &[]).v7,
            BTreeMap::from([(V7Encoding::Movw, 1)])
        );
        // Without the AT_HWCAP argument the same branch is no guard.
        let mut plain = hwcap_dispatch(NOP);
        plain.arm(0x1000, &[0xe3a0_0011]);
        assert_eq!(
            plain.walk(0x1000, &[]).v7,
            BTreeMap::from([(V7Encoding::Movw, 1)])
        );
    }

    #[test]
    fn a_barrier_running_into_neon_code_does_not_count() {
        // dmb sy; vadd.i32 q0, q1, q2; bx lr: the routine runs only where NEON is.
        let mut asm = Asm::new();
        asm.arm(0x1000, &[0xf57f_f05f, 0xf222_0844, BX_LR]);
        let reach = asm.walk(0x1000, &[]);
        assert!(reach.v7.is_empty(), "{reach:?}");
        assert_eq!((reach.simd, reach.guarded_v7), (1, 1));
        // A VFP instruction (vldr, which an ARM1176 has) after it does not excuse it, nor NEON after a call.
        asm.arm(0x1004, &[0xedd0_1b00]);
        assert_eq!(asm.walk(0x1000, &[]).v7.get(&V7Encoding::Barrier), Some(&1));
        asm.arm(0x1004, &[bl(0x1004, 0x1100), 0xf222_0844, BX_LR])
            .arm(0x1100, &[BX_LR]);
        assert_eq!(asm.walk(0x1000, &[]).v7.get(&V7Encoding::Barrier), Some(&1));
    }

    #[test]
    fn what_an_ifunc_resolver_chooses_does_not_count() {
        let mut asm = Asm::new();
        // resolver: ldr r3, [pc, #4]; add r0, pc, r3 (pc-relative address of 0x1020); bx lr; .word offset.
        asm.arm(0x1000, &[0xe59f_3004, 0xe08f_0003, BX_LR, 0x1020 - 0x100c])
            .arm(0x1020, &[MOVW, BX_LR])
            .arm(0x1100, &[BX_LR]);
        let reach = asm.walk(0x1100, &[0x1000]);
        assert!(reach.v7.is_empty(), "{reach:?}");
        assert_eq!((reach.guarded_v7, reach.guarded_functions), (1, 1));
        // Called as an ordinary function, the same address counts.
        let reach = asm.walk(0x1000, &[]);
        assert_eq!(reach.v7, BTreeMap::from([(V7Encoding::Movw, 1)]));
    }

    #[test]
    fn bounded_tbb_tables_are_followed_and_not_decoded() {
        let mut asm = Asm::new();
        // cmp r0, #2; tbb [pc, r0]; table (2, 3, 4, pad); bx lr; bx lr; ldr.w r0, [r1, #4]; bx lr
        asm.thumb(
            0x1000,
            &[
                0x2802, 0xe8df, 0xf000, 0x0302, 0x0004, 0x4770, 0x4770, 0xf8d1, 0x0004, 0x4770,
            ],
        );
        let reach = asm.walk(0x1001, &[]);
        // TBB itself and the ldr.w at 0x100e (0x1006 + 2 × 4); not the table's bytes.
        assert_eq!(reach.v7.get(&V7Encoding::Thumb2), Some(&2), "{reach:?}");
        // Unbounded: the walk stops at the TBB.
        asm.thumb(0x1000, &[0x4600]);
        assert_eq!(asm.walk(0x1001, &[]).v7.get(&V7Encoding::Thumb2), Some(&1));
    }

    #[test]
    fn it_blocks_make_returns_conditional() {
        let mut asm = Asm::new();
        // cmp r0, #0; it eq; bxeq lr; ldr.w r0, [r1, #4]; bx lr
        asm.thumb(0x1000, &[0x2800, 0xbf08, 0x4770, 0xf8d1, 0x0004, 0x4770]);
        let reach = asm.walk(0x1001, &[]);
        assert_eq!(reach.v7.get(&V7Encoding::ThumbNarrow), Some(&1));
        assert_eq!(reach.v7.get(&V7Encoding::Thumb2), Some(&1), "{reach:?}");
    }

    proptest::proptest! {
        /// Any bytes, any entry points, any mapping symbols: the walk ends, without panicking, and reaches no
        /// more bytes than there are.
        #[test]
        fn walks_arbitrary_bytes(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
            entries in proptest::collection::vec(0x0ff0u64..0x1300, 1..4),
            mappings in proptest::collection::vec((0x1000u64..0x1300, 0u8..3), 0..4),
        ) {
            let mappings = mappings
                .into_iter()
                .map(|(a, m)| (a, [Mapping::Arm, Mapping::Thumb, Mapping::Data][usize::from(m)]))
                .collect();
            let reach = walk(&Program {
                regions: vec![CodeRegion { address: BASE, bytes: &bytes }],
                roots: entries.iter().map(|&e| (e, Root::Entry)).collect(),
                pointers: vec![(0x1001, Root::DataPointer), (0x1004, Root::Got)],
                resolvers: vec![0x1008],
                mappings,
                ..Program::default()
            });
            proptest::prop_assert!(reach.code_bytes <= bytes.len() as u64 + 4);
        }
    }

    #[test]
    fn mapping_symbols_stop_the_walk_at_data() {
        let mut asm = Asm::new();
        // entry: nop; (data from 0x1004:) a MOVT-like word the flow runs into; bx lr.
        asm.arm(0x1000, &[NOP, MOVT, BX_LR]);
        let bytes = &asm.0;
        let run = |mappings: Vec<(u64, Mapping)>| {
            walk(&Program {
                regions: vec![CodeRegion {
                    address: BASE,
                    bytes,
                }],
                roots: vec![(0x1000, Root::Entry)],
                mappings,
                ..Program::default()
            })
        };
        assert_eq!(run(vec![]).v7.get(&V7Encoding::Movt), Some(&1));
        assert!(
            run(vec![(0x1000, Mapping::Arm), (0x1004, Mapping::Data)])
                .v7
                .is_empty()
        );
        let recovered = run(vec![]).recovered;
        assert_eq!(recovered.first(), Some(&(0x1000, Mapping::Arm)));
    }
}
