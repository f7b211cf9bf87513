//! What a binary needs from the machine: the lowest OCI platform that runs it, with one reason per piece of
//! evidence.

use object::elf;
use serde::Serialize;

use super::reading::{ByteOrder, ElfRequirements, FloatAbi};
use crate::platform::Platform;

/// The kind of evidence that set a binary's platform variant (`check-binary --json` says which).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Evidence {
    /// The build settings the Go linker records (GOARM, GOAMD64, GOARM64).
    #[serde(rename = "go build info")]
    GoBuildInfo,
    /// The encodings found in the code that can run, followed from the entry point ([`super::arm_reach`]).
    #[serde(rename = "reachable code")]
    ReachableCode,
    /// `.ARM.attributes`.
    #[serde(rename = "attributes")]
    Attributes,
    /// The hard-float ABI (from `e_flags`, `Tag_ABI_VFP_args` or the loader's name): it needs a VFP unit.
    #[serde(rename = "float abi")]
    FloatAbi,
}

/// The OCI operating system an OS ABI byte means. Linux binaries mostly say "System V" (0); ARM's old
/// toolchains wrote their own values.
fn os_name(os_abi: u8) -> &'static str {
    match os_abi {
        elf::ELFOSABI_SYSV | elf::ELFOSABI_GNU | elf::ELFOSABI_ARM_AEABI | elf::ELFOSABI_ARM => {
            "linux"
        }
        elf::ELFOSABI_NETBSD => "netbsd",
        elf::ELFOSABI_SOLARIS => "solaris",
        elf::ELFOSABI_FREEBSD => "freebsd",
        elf::ELFOSABI_OPENBSD => "openbsd",
        _ => "unknown",
    }
}

/// The platform the binary needs, with the evidence for it.
pub(super) fn required_platform(
    req: &ElfRequirements,
    os_abi: u8,
) -> (Option<Platform>, Option<Evidence>, Vec<String>) {
    let mut reasons = Vec::new();
    let os = os_name(os_abi);
    let little = req.endianness == ByteOrder::Little;
    let arch = match (req.e_machine, req.class, little) {
        (elf::EM_386, 32, true) => "386",
        (elf::EM_X86_64, 64, true) => "amd64",
        (elf::EM_ARM, 32, true) => "arm",
        (elf::EM_AARCH64, 64, true) => "arm64",
        (elf::EM_RISCV, 64, true) => "riscv64",
        (elf::EM_PPC64, 64, true) => "ppc64le",
        (elf::EM_PPC64, 64, false) => "ppc64",
        (elf::EM_S390, 64, false) => "s390x",
        (elf::EM_MIPS, 32, false) => "mips",
        (elf::EM_MIPS, 32, true) => "mipsle",
        (elf::EM_MIPS, 64, false) => "mips64",
        (elf::EM_MIPS, 64, true) => "mips64le",
        (elf::EM_LOONGARCH, 64, true) => "loong64",
        _ => {
            reasons.push(format!(
                "{} {}-bit {} has no OCI platform name",
                req.machine,
                req.class,
                if little {
                    "little-endian"
                } else {
                    "big-endian"
                }
            ));
            return (None, None, reasons);
        }
    };
    let (variant, decided_by) = match arch {
        "arm" => arm_variant(req, &mut reasons),
        "amd64" => amd64_variant(req, &mut reasons),
        "arm64" => arm64_variant(req, &mut reasons),
        _ => {
            reasons.push(format!("e_machine {} ({}-bit)", req.machine, req.class));
            (None, None)
        }
    };
    (
        Some(Platform::new(os, arch, variant.as_deref())),
        decided_by,
        reasons,
    )
}

/// ARM: every piece of evidence sets a lowest version; the binary needs the highest of them. The attributes'
/// v7 is a merge over all linked objects, so where the reachable code has no ARMv7 encodings outside SIMD and
/// VFP the code decides (see [`super::arm_code`]); Go binaries are judged by GOARM alone, since Go's runtime picks
/// its barriers by GOARM at run time.
fn arm_variant(
    req: &ElfRequirements,
    reasons: &mut Vec<String>,
) -> (Option<String>, Option<Evidence>) {
    let mut evidence: Vec<(u8, Evidence, String)> = Vec::new();
    let arm = req.arm.as_ref();
    let attributes = arm.and_then(|a| a.attributes.as_ref());
    if let Some(a) = attributes {
        if let Some(arch) = a.cpu_arch {
            let (version, why) = match arch.0 {
                0..=2 => (
                    5,
                    ": older than ARMv5, and linux/arm/v5 is the lowest platform",
                ),
                3..=5 => (5, ""),
                6 | 7 | 9 => (6, ""),
                8 => (7, ": Thumb-2, which ARMv6 cores such as the ARM1176 lack"),
                10 => (7, ""),
                11..=13 => (
                    7,
                    ": M-profile code uses Thumb-2 instructions ARMv6 cores lack",
                ),
                14..=22 => (8, ""),
                _ => (8, ": newer than this table, so at least ARMv8"),
            };
            evidence.push((
                version,
                Evidence::Attributes,
                format!("Tag_CPU_arch {arch} (from .ARM.attributes){why}"),
            ));
        }
        if let Some(thumb) = a.thumb_isa_use.filter(|t| t.0 == 2) {
            evidence.push((
                7,
                Evidence::Attributes,
                format!(
                    "Tag_THUMB_ISA_use {thumb} (from .ARM.attributes): ARMv6 cores lack Thumb-2"
                ),
            ));
        }
        if let Some(fp) = a.fp_arch {
            let version = match fp.0 {
                0 => None,
                1 | 2 => Some(6),
                3..=6 => Some(7),
                _ => Some(8),
            };
            if let Some(v) = version {
                evidence.push((
                    v,
                    Evidence::Attributes,
                    format!("Tag_FP_arch {fp} (from .ARM.attributes)"),
                ));
            }
        }
        if let Some(simd) = a.advanced_simd_arch {
            let version = match simd.0 {
                0 => None,
                1 | 2 => Some(7),
                _ => Some(8),
            };
            if let Some(v) = version {
                evidence.push((
                    v,
                    Evidence::Attributes,
                    format!("Tag_Advanced_SIMD_arch {simd} (NEON, from .ARM.attributes)"),
                ));
            }
        }
        if a.cpu_arch_profile.is_some_and(|p| p.0 == 0x4d) {
            reasons.push("Tag_CPU_arch_profile Microcontroller: built for M-profile cores".into());
        }
    }
    let goarm = req.go.as_ref().and_then(|g| g.goarm.as_deref());
    if let Some(goarm) = goarm {
        let level = goarm.split(',').next().unwrap_or_default();
        match level.parse::<u8>() {
            Ok(v @ 5..=7) => evidence.push((
                v,
                Evidence::GoBuildInfo,
                format!("GOARM={goarm} (from Go build info)"),
            )),
            _ => reasons.push(format!(
                "GOARM={goarm} (from Go build info) is not 5, 6 or 7: ignored"
            )),
        }
    }
    match (arm.and_then(|a| a.code.as_ref()), goarm) {
        (Some(code), Some(_)) if code.needs_v7() => reasons.push(format!(
            "reachable code: {} (not used: Go's runtime chooses its ARMv7 barriers by GOARM at run time)",
            code.describe_v7()
        )),
        (Some(code), None) if code.needs_v7() => {
            let (state, path) = match &code.first_v7_reached {
                Some(first) => (
                    format!(" in {} state", first.state),
                    format!(", reached by {}", first.path.join(" → ")),
                ),
                None => (String::new(), String::new()),
            };
            evidence.push((
                7,
                Evidence::ReachableCode,
                format!(
                    "reachable code: {} in {} bytes of code reached in {} functions{}, first at {:#x}{state}{path}: \
                     ARMv6 cores such as the ARM1176 lack them",
                    code.describe_v7(),
                    code.code_bytes,
                    code.functions,
                    if code.mapped {
                        " (with mapping symbols)"
                    } else {
                        " (no mapping symbols)"
                    },
                    code.first_v7.unwrap_or_default()
                ),
            ))
        }
        (Some(code), None) if code.code_bytes > 0 => {
            // The attributes' v7 came from objects whose only v7 code is SIMD, or code behind a CPU-feature
            // check, chosen at run time: what the program runs otherwise is ARMv6 at most.
            let merged = evidence
                .iter()
                .any(|(v, kind, _)| *v == 7 && *kind == Evidence::Attributes);
            for (version, kind, why) in evidence.iter_mut() {
                if *version == 7 && *kind == Evidence::Attributes {
                    *version = 6;
                    why.push_str("; a merge over the linked objects, overruled by the reachable code");
                }
            }
            let guarded = if code.guarded_v7 > 0 {
                format!(
                    "; {} ARMv7 instructions behind a CPU-feature check ({} functions reached only through one) \
                     or running straight into NEON code, not counted",
                    code.guarded_v7, code.guarded_functions
                )
            } else {
                String::new()
            };
            let why = format!(
                "reachable code: no ARMv7 encodings outside SIMD and VFP in {} bytes of code reached in {} \
                 functions; {} SIMD/VFP instructions, which run only where the program finds the CPU has them{guarded}",
                code.code_bytes, code.functions, code.simd
            );
            if merged {
                evidence.push((6, Evidence::ReachableCode, why));
            } else {
                reasons.push(why);
            }
        }
        _ => {}
    }
    // Go's calling convention never passes floats in VFP registers, so its e_flags say nothing about VFP.
    let hard_float = arm.filter(|a| a.float_abi == FloatAbi::Hard);
    if let (None, Some(arm)) = (&req.go, hard_float) {
        evidence.push((
            6,
            Evidence::FloatAbi,
            format!(
                "hard-float ABI (from {}): needs a VFP unit, which linux/arm/v5 does not promise",
                arm.float_abi_source.unwrap_or("e_flags")
            ),
        ));
    }
    // The deciding evidence first: a verdict quotes the first reason. At the same version, the more direct
    // evidence decides: Go build info, then the code, then the attributes, then the float ABI.
    evidence.sort_by_key(|e| (std::cmp::Reverse(e.0), e.1));
    let decided = evidence.first().map(|(v, kind, _)| (*v, *kind));
    let mut ordered: Vec<String> = evidence.into_iter().map(|(_, _, why)| why).collect();
    ordered.append(reasons);
    *reasons = ordered;
    match decided {
        Some((v, kind)) => (Some(format!("v{v}")), Some(kind)),
        None => {
            reasons.insert(
                0,
                "no ARM architecture version recorded (no .ARM.attributes CPU tags, no GOARM)"
                    .into(),
            );
            (None, None)
        }
    }
}

fn amd64_variant(
    req: &ElfRequirements,
    reasons: &mut Vec<String>,
) -> (Option<String>, Option<Evidence>) {
    match req.go.as_ref().and_then(|g| g.goamd64.as_deref()) {
        Some(level @ ("v2" | "v3" | "v4")) => {
            reasons.push(format!("GOAMD64={level} (from Go build info)"));
            (Some(level.to_string()), Some(Evidence::GoBuildInfo))
        }
        Some(level) => {
            reasons.push(format!(
                "GOAMD64={level} (from Go build info): the x86-64 baseline"
            ));
            (None, Some(Evidence::GoBuildInfo))
        }
        None => {
            reasons.push(
                "e_machine x86_64: no micro-architecture level recorded, the x86-64 baseline"
                    .into(),
            );
            (None, None)
        }
    }
}

fn arm64_variant(
    req: &ElfRequirements,
    reasons: &mut Vec<String>,
) -> (Option<String>, Option<Evidence>) {
    if let Some(goarm64) = req.go.as_ref().and_then(|g| g.goarm64.as_deref()) {
        let level = goarm64.split(',').next().unwrap_or_default();
        if let Some((major, minor)) = arm64_level(level) {
            reasons.push(format!("GOARM64={goarm64} (from Go build info)"));
            let variant = if minor == 0 {
                format!("v{major}")
            } else {
                format!("v{major}.{minor}")
            };
            return (Some(variant), Some(Evidence::GoBuildInfo));
        }
        reasons.push(format!(
            "GOARM64={goarm64} (from Go build info) is not a version: ignored"
        ));
    }
    reasons.push("e_machine aarch64: ARMv8-A baseline".into());
    (Some("v8".into()), None)
}

/// `v8`, `v8.2`, `v9.0` as (major, minor).
pub(super) fn arm64_level(variant: &str) -> Option<(u8, u8)> {
    let digits = variant.strip_prefix('v').unwrap_or(variant);
    let (major, minor) = digits.split_once('.').unwrap_or((digits, "0"));
    Some((major.parse().ok()?, minor.parse().ok()?))
}
