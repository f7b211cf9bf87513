//! Which image platforms this host can run, from every signal in an [`Evidence`] snapshot.
//!
//! [`detect`] is a pure function. It records every signal it read and, in words, every rule that decided
//! something, because the answer is only trusted when a user can see why it was given. Known lies it corrects:
//! - ARMv6 cores (ARM1176: Pi Zero, Pi 1) print `CPU architecture: 7`. The model name `(v6l)`, the CPU part,
//!   `uname -m` and AT_PLATFORM tell the truth; the ARM version is the lowest any trustworthy signal gives, so no
//!   single line (not even a missing `model name` on old kernels) decides it.
//! - A 32-bit OS on a 64-bit kernel (`uname -m` aarch64, userland 32-bit): arm64 images still run and come first,
//!   since containers bring their own userland.
//! - 32-bit ARM on a 64-bit kernel needs 4 KiB pages and CPUs with AArch32 at EL0: it is only offered when
//!   something proves it (a known AArch32-capable CPU part on every core, a 32-bit userland that runs, the kernel's
//!   `aarch32_el0` list), never assumed.
//! - Under qemu-user, `uname -m` and the auxiliary vector describe the emulated CPU while /proc/cpuinfo is the
//!   host's: a cpuinfo of another architecture family is discarded as foreign.

use serde::Serialize;

use super::cpuinfo::{self, CpuInfo};
use super::evidence::{AuxValue, Evidence, EvidenceError, LinuxHost};
use super::{Platform, normalize_arch, x86};

#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    #[error(transparent)]
    Evidence(#[from] EvidenceError),
    #[error(
        "cannot tell this host's architecture from the {origin}: {missing}; capture `uname -m` and /proc/cpuinfo as the \
         boards README says, or give --platform"
    )]
    NoUsableSignal { origin: String, missing: String },
}

/// One signal read, where it came from, and its value as text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Signal {
    pub source: String,
    pub name: String,
    pub value: String,
}

/// The answer: platforms best first, and everything that led to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Detection {
    pub candidates: Vec<Platform>,
    pub signals: Vec<Signal>,
    pub rules: Vec<String>,
    pub page_size: Option<u64>,
}

impl Detection {
    /// The platform images should be pulled for.
    pub fn best(&self) -> Option<&Platform> {
        self.candidates.first()
    }
}

/// Reads the live host once and detects.
pub fn detect_live() -> Result<Detection, DetectError> {
    detect(&Evidence::from_probe(&LinuxHost)?)
}

/// The architecture family a signal points to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Family {
    Arm32,
    Arm64,
    Amd64,
    X86,
    Other(String),
}

impl Family {
    fn describe(&self) -> &str {
        match self {
            Family::Arm32 => "32-bit ARM",
            Family::Arm64 => "64-bit ARM",
            Family::Amd64 => "x86-64",
            Family::X86 => "32-bit x86",
            Family::Other(name) => name,
        }
    }
}

/// What `uname -m` says: the family of the running kernel (as this process sees it) and an ARM version.
fn uname_family(machine: &str) -> (Family, Option<u8>) {
    // arm64 kernels print armv8l to tasks under the PER_LINUX32 personality; no 32-bit ARM kernel prints it.
    if machine == "armv8l" || machine == "armv8b" {
        return (Family::Arm64, Some(8));
    }
    let (arch, variant) = normalize_arch(machine, None);
    let version = variant
        .as_deref()
        .and_then(|v| v.strip_prefix('v'))
        .and_then(|v| v.parse().ok());
    let family = match arch.as_str() {
        "arm" => Family::Arm32,
        "arm64" => Family::Arm64,
        "amd64" => Family::Amd64,
        "386" => Family::X86,
        _ if machine.starts_with("armv") => Family::Arm32,
        other => Family::Other(other.to_string()),
    };
    (family, version)
}

/// What AT_PLATFORM says about the process that printed it.
fn at_platform_family(platform: &str) -> Option<(Family, Option<u8>)> {
    match platform {
        "x86_64" => Some((Family::Amd64, None)),
        "i386" | "i486" | "i586" | "i686" => Some((Family::X86, None)),
        "aarch64" | "aarch64_be" => Some((Family::Arm64, None)),
        _ => {
            let digits = platform.strip_prefix('v')?;
            let digits = digits
                .strip_suffix('l')
                .or_else(|| digits.strip_suffix('b'))?;
            Some((Family::Arm32, Some(digits.parse().ok()?)))
        }
    }
}

/// The family the cpuinfo text describes, from the way its kernel prints features.
fn cpuinfo_family(info: &CpuInfo) -> Option<Family> {
    let features = info.common_features();
    let any_core = |f: &dyn Fn(&cpuinfo::Core) -> bool| info.cores.iter().any(f);
    if any_core(&|c| c.vendor_id.is_some()) || features.contains("sse2") {
        return Some(if features.contains("lm") {
            Family::Amd64
        } else {
            Family::X86
        });
    }
    if features.contains("asimd") || any_core(&|c| c.architecture.as_deref() == Some("AArch64")) {
        return Some(Family::Arm64);
    }
    let arm32_names = ["half", "thumb", "swp", "vfp", "edsp"];
    if arm32_names.iter().any(|n| features.contains(*n))
        || any_core(&|c| c.model_name_arm_version().is_some())
    {
        return Some(Family::Arm32);
    }
    None
}

/// Whether AArch32 code runs at EL0 on a core: `Some(true)`, `Some(false)`, or `None` when flotilla does not
/// know the core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Aarch32 {
    Yes,
    No,
}

struct CoreModel {
    implementer: u32,
    part: u32,
    name: &'static str,
    arm_version: u8,
    aarch32: Option<Aarch32>,
}

const fn core(
    implementer: u32,
    part: u32,
    name: &'static str,
    arm_version: u8,
    aarch32: Option<Aarch32>,
) -> CoreModel {
    CoreModel {
        implementer,
        part,
        name,
        arm_version,
        aarch32,
    }
}

use Aarch32::{No, Yes};

/// Cores by `CPU implementer`/`CPU part`. AArch32 support from the vendors' technical reference manuals: Arm
/// dropped AArch32 from its big cores with Cortex-X2/A715 and from its little cores with A520; the A65/E1 family,
/// Apple, Cavium ThunderX, Fujitsu A64FX, Qualcomm Falkor and Ampere's own cores never had it. Cores whose
/// support flotilla could not confirm are left out, so they count as unproven.
const CORES: &[CoreModel] = &[
    core(0x41, 0x926, "ARM926EJ-S", 5, None),
    core(0x41, 0xb02, "ARM11 MPCore", 6, None),
    core(0x41, 0xb36, "ARM1136", 6, None),
    core(0x41, 0xb56, "ARM1156", 6, None),
    core(0x41, 0xb76, "ARM1176", 6, None),
    core(0x41, 0xc05, "Cortex-A5", 7, None),
    core(0x41, 0xc07, "Cortex-A7", 7, None),
    core(0x41, 0xc08, "Cortex-A8", 7, None),
    core(0x41, 0xc09, "Cortex-A9", 7, None),
    core(0x41, 0xc0d, "Cortex-A12", 7, None),
    core(0x41, 0xc0e, "Cortex-A17", 7, None),
    core(0x41, 0xc0f, "Cortex-A15", 7, None),
    core(0x41, 0xd01, "Cortex-A32", 8, Some(Yes)),
    core(0x41, 0xd02, "Cortex-A34", 8, Some(No)),
    core(0x41, 0xd03, "Cortex-A53", 8, Some(Yes)),
    core(0x41, 0xd04, "Cortex-A35", 8, Some(Yes)),
    core(0x41, 0xd05, "Cortex-A55", 8, Some(Yes)),
    core(0x41, 0xd06, "Cortex-A65", 8, Some(No)),
    core(0x41, 0xd07, "Cortex-A57", 8, Some(Yes)),
    core(0x41, 0xd08, "Cortex-A72", 8, Some(Yes)),
    core(0x41, 0xd09, "Cortex-A73", 8, Some(Yes)),
    core(0x41, 0xd0a, "Cortex-A75", 8, Some(Yes)),
    core(0x41, 0xd0b, "Cortex-A76", 8, Some(Yes)),
    core(0x41, 0xd0c, "Neoverse N1", 8, Some(Yes)),
    core(0x41, 0xd0d, "Cortex-A77", 8, Some(Yes)),
    core(0x41, 0xd0e, "Cortex-A76AE", 8, Some(Yes)),
    core(0x41, 0xd40, "Neoverse V1", 8, None),
    core(0x41, 0xd41, "Cortex-A78", 8, Some(Yes)),
    core(0x41, 0xd42, "Cortex-A78AE", 8, Some(Yes)),
    core(0x41, 0xd43, "Cortex-A65AE", 8, Some(No)),
    core(0x41, 0xd44, "Cortex-X1", 8, Some(Yes)),
    core(0x41, 0xd46, "Cortex-A510", 8, Some(Yes)),
    core(0x41, 0xd47, "Cortex-A710", 8, Some(Yes)),
    core(0x41, 0xd48, "Cortex-X2", 8, Some(No)),
    core(0x41, 0xd49, "Neoverse N2", 8, None),
    core(0x41, 0xd4a, "Neoverse E1", 8, Some(No)),
    core(0x41, 0xd4d, "Cortex-A715", 8, Some(No)),
    core(0x41, 0xd4e, "Cortex-X3", 8, Some(No)),
    core(0x41, 0xd4f, "Neoverse V2", 8, Some(No)),
    core(0x41, 0xd80, "Cortex-A520", 8, Some(No)),
    core(0x41, 0xd81, "Cortex-A720", 8, Some(No)),
    core(0x41, 0xd82, "Cortex-X4", 8, Some(No)),
    core(0x41, 0xd84, "Neoverse V3", 8, Some(No)),
    core(0x41, 0xd85, "Cortex-X925", 8, Some(No)),
    core(0x41, 0xd87, "Cortex-A725", 8, Some(No)),
    core(0x41, 0xd8e, "Neoverse N3", 8, Some(No)),
    core(0x42, 0x00f, "Broadcom Brahma-B15", 7, None),
    core(0x42, 0x100, "Broadcom Brahma-B53", 8, Some(Yes)),
    core(0x42, 0x516, "Broadcom Vulcan", 8, Some(No)),
    core(0x43, 0x0a1, "Cavium ThunderX", 8, Some(No)),
    core(0x43, 0x0af, "Cavium ThunderX2", 8, Some(No)),
    core(0x46, 0x001, "Fujitsu A64FX", 8, Some(No)),
    core(0x4e, 0x004, "Nvidia Carmel", 8, Some(Yes)),
    core(0x51, 0x00f, "Qualcomm Scorpion", 7, None),
    core(0x51, 0x02d, "Qualcomm Scorpion", 7, None),
    core(0x51, 0x04d, "Qualcomm Krait", 7, None),
    core(0x51, 0x06f, "Qualcomm Krait", 7, None),
    core(0x51, 0x800, "Qualcomm Kryo 2xx Gold", 8, Some(Yes)),
    core(0x51, 0x801, "Qualcomm Kryo 2xx Silver", 8, Some(Yes)),
    core(0x51, 0x802, "Qualcomm Kryo 3xx Gold", 8, Some(Yes)),
    core(0x51, 0x803, "Qualcomm Kryo 3xx Silver", 8, Some(Yes)),
    core(0x51, 0x804, "Qualcomm Kryo 4xx Gold", 8, Some(Yes)),
    core(0x51, 0x805, "Qualcomm Kryo 4xx/5xx Silver", 8, Some(Yes)),
    core(0x51, 0xc00, "Qualcomm Falkor", 8, Some(No)),
];

/// Implementers none of whose 64-bit cores run AArch32.
const AARCH64_ONLY_IMPLEMENTERS: &[(u32, &str)] = &[(0x61, "Apple"), (0xc0, "Ampere")];

fn core_model(implementer: u32, part: u32) -> Option<&'static CoreModel> {
    CORES
        .iter()
        .find(|c| c.implementer == implementer && c.part == part)
}

fn describe_part(implementer: u32, part: u32) -> String {
    match core_model(implementer, part) {
        Some(model) => format!("{implementer:#04x}/{part:#05x} ({})", model.name),
        None => match AARCH64_ONLY_IMPLEMENTERS
            .iter()
            .find(|(i, _)| *i == implementer)
        {
            Some((_, vendor)) => format!("{implementer:#04x}/{part:#05x} ({vendor})"),
            None => format!("{implementer:#04x}/{part:#05x}"),
        },
    }
}

/// AT_HWCAP bit names of 32-bit ARM kernels, bit 0 first (arch/arm/include/uapi/asm/hwcap.h).
const ARM32_HWCAP: [&str; 22] = [
    "swp", "half", "thumb", "26bit", "fastmult", "fpa", "vfp", "edsp", "java", "iwmmxt", "crunch",
    "thumbee", "neon", "vfpv3", "vfpv3d16", "tls", "vfpv4", "idiva", "idivt", "vfpd32", "lpae",
    "evtstrm",
];

fn describe_aux(value: &AuxValue, arm32_names: bool) -> String {
    match value {
        AuxValue::Bits(bits) if arm32_names => {
            let names: Vec<&str> = ARM32_HWCAP
                .iter()
                .enumerate()
                .filter(|(i, _)| bits >> i & 1 == 1)
                .map(|(_, n)| *n)
                .collect();
            format!("{bits:#x} ({})", names.join(" "))
        }
        AuxValue::Bits(bits) => format!("{bits:#x}"),
        AuxValue::Names(names) => names.iter().cloned().collect::<Vec<_>>().join(" "),
    }
}

/// Formats core indexes as `0-3,6`.
fn core_ranges(indexes: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut iter = indexes.iter().copied().peekable();
    while let Some(start) = iter.next() {
        let mut end = start;
        while iter.peek() == Some(&(end + 1)) {
            end += 1;
            iter.next();
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
    }
    out.join(",")
}

struct Record {
    signals: Vec<Signal>,
    rules: Vec<String>,
}

impl Record {
    fn signal(&mut self, source: &str, name: &str, value: impl Into<String>) {
        self.signals.push(Signal {
            source: source.to_string(),
            name: name.to_string(),
            value: value.into(),
        });
    }

    fn rule(&mut self, text: impl Into<String>) {
        self.rules.push(text.into());
    }
}

/// Decides the platforms `evidence` can run, best first.
pub fn detect(evidence: &Evidence) -> Result<Detection, DetectError> {
    let mut rec = Record {
        signals: Vec::new(),
        rules: Vec::new(),
    };

    let machine = evidence.uname_machine.as_deref();
    if let Some(m) = machine {
        rec.signal("uname -m", "machine", m);
    }
    let uname = machine.map(uname_family);
    let at_platform = evidence.auxv.platform.as_deref();
    let at_family = at_platform.and_then(at_platform_family);
    let arm32_hwcap = matches!(&at_family, Some((Family::Arm32, _)))
        || (at_family.is_none() && matches!(&uname, Some((Family::Arm32, _))));
    record_auxv(&mut rec, evidence, arm32_hwcap);
    if let (Some(bits), Some(source)) = (evidence.long_bit, evidence.long_bit_source.as_deref()) {
        rec.signal(source, "userland bits", bits.to_string());
    }
    if let Some(p) = evidence.page_size {
        rec.signal("getconf PAGESIZE", "page size", p.to_string());
    }
    if let Some(features) = &evidence.cpuid_features {
        let (level, _) = x86::level(features);
        rec.signal("CPUID", "x86-64 level", format!("v{level}"));
    }
    if let Some(list) = &evidence.aarch32_el0 {
        rec.signal(
            "/sys/devices/system/cpu/aarch32_el0",
            "CPUs running 32-bit code",
            list.as_str(),
        );
    }

    let parsed = evidence.cpuinfo.as_deref().map(cpuinfo::parse);
    if let Some(info) = &parsed {
        record_cpuinfo(&mut rec, info);
    }
    let cpu_family = parsed.as_ref().and_then(cpuinfo_family);

    // The kernel's family: uname -m first, AT_PLATFORM next, cpuinfo last.
    let (family, uname_version) = match (&uname, &at_family, &cpu_family) {
        (Some((f, v)), _, _) => (f.clone(), *v),
        (None, Some((f, v)), _) => {
            rec.rule(format!(
                "no uname -m: AT_PLATFORM {} decides the family",
                at_platform.unwrap_or("")
            ));
            (f.clone(), *v)
        }
        (None, None, Some(f)) => {
            rec.rule(format!(
                "no uname -m and no AT_PLATFORM: the cpuinfo format ({}) decides the family",
                f.describe()
            ));
            (f.clone(), None)
        }
        (None, None, None) => {
            let mut missing = vec!["no uname -m", "no AT_PLATFORM in auxv"];
            missing.push(match &parsed {
                None => "no cpuinfo",
                Some(info) if info.is_empty() => "a cpuinfo with no recognisable line",
                Some(_) => "a cpuinfo that names no architecture",
            });
            return Err(DetectError::NoUsableSignal {
                origin: evidence.origin.clone(),
                missing: missing.join(", "),
            });
        }
    };

    if let (Some((af, _)), Some(p)) = (&at_family, at_platform) {
        let compat = family == Family::Arm64 && *af == Family::Arm32;
        if *af != family && !compat {
            rec.rule(format!(
                "AT_PLATFORM {p} ({}) disagrees with uname -m ({}): uname -m decides",
                af.describe(),
                family.describe()
            ));
        }
    }

    let cpu = match (parsed, &cpu_family) {
        (Some(_), Some(cf)) if is_foreign(&family, machine, cf) => {
            rec.rule(format!(
                "cpuinfo discarded as foreign: it describes a {} CPU while uname -m and auxv describe {} \
                 (an emulator such as qemu-user passes the host's /proc/cpuinfo through); deciding from uname -m \
                 and auxv",
                cf.describe(),
                family.describe()
            ));
            None
        }
        (info, _) => info,
    };

    let page_size = match (evidence.auxv.page_size, evidence.page_size) {
        (Some(a), Some(p)) if a != p => {
            rec.rule(format!(
                "AT_PAGESZ {a} and getconf PAGESIZE {p} disagree: AT_PAGESZ is the kernel's own value and decides"
            ));
            Some(a)
        }
        (a, p) => a.or(p),
    };

    let candidates = match &family {
        Family::Arm32 => {
            let version = arm32_version(&mut rec, uname_version, at_family.as_ref(), cpu.as_ref());
            arm_list(version)
        }
        Family::Arm64 => arm64_candidates(
            &mut rec,
            evidence,
            at_family.as_ref(),
            cpu.as_ref(),
            page_size,
        ),
        Family::Amd64 => amd64_candidates(&mut rec, evidence, cpu.as_ref()),
        Family::X86 => vec![Platform::linux("386", None)],
        Family::Other(name) => {
            rec.rule(format!(
                "{name}: flotilla ranks no variants for this architecture; the kernel's architecture is the platform"
            ));
            vec![Platform::linux(name, None)]
        }
    };

    Ok(Detection {
        candidates,
        signals: rec.signals,
        rules: rec.rules,
        page_size,
    })
}

fn record_auxv(rec: &mut Record, evidence: &Evidence, arm32_names: bool) {
    let auxv = &evidence.auxv;
    if let Some(v) = &auxv.hwcap {
        rec.signal("auxv", "AT_HWCAP", describe_aux(v, arm32_names));
    }
    if let Some(v) = &auxv.hwcap2 {
        rec.signal("auxv", "AT_HWCAP2", describe_aux(v, false));
    }
    if let Some(p) = &auxv.platform {
        rec.signal("auxv", "AT_PLATFORM", p.as_str());
    }
    if let Some(p) = auxv.page_size {
        rec.signal("auxv", "AT_PAGESZ", p.to_string());
    }
}

fn record_cpuinfo(rec: &mut Record, info: &CpuInfo) {
    rec.signal("cpuinfo", "cores", info.cores.len().to_string());
    let mut groups: Vec<(String, Vec<usize>)> = Vec::new();
    for (i, core) in info.cores.iter().enumerate() {
        let mut parts = Vec::new();
        if let Some(name) = &core.model_name {
            parts.push(format!("model name {name:?}"));
        }
        if let Some(arch) = &core.architecture {
            parts.push(format!("CPU architecture {arch}"));
        }
        if let (Some(imp), Some(part)) = (core.implementer, core.part) {
            parts.push(format!("implementer/part {}", describe_part(imp, part)));
        }
        if let Some(vendor) = &core.vendor_id {
            parts.push(format!("vendor {vendor}"));
        }
        let key = parts.join(", ");
        if key.is_empty() {
            continue;
        }
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, cores)) => cores.push(i),
            None => groups.push((key, vec![i])),
        }
    }
    for (key, cores) in groups {
        rec.signal("cpuinfo", &format!("cores {}", core_ranges(&cores)), key);
    }
    let features = info.common_features();
    if !features.is_empty() {
        rec.signal(
            "cpuinfo",
            "features on every core",
            features.into_iter().collect::<Vec<_>>().join(" "),
        );
    }
    if let Some(hw) = &info.hardware {
        rec.signal("cpuinfo", "Hardware", hw.as_str());
    }
    if let Some(model) = &info.model {
        rec.signal("cpuinfo", "Model", model.as_str());
    }
}

fn is_foreign(kernel: &Family, machine: Option<&str>, cpu: &Family) -> bool {
    if kernel == cpu {
        return false;
    }
    match (kernel, cpu) {
        // The same 64-bit ARM kernel prints either format, following the reader's personality (armv8l).
        (Family::Arm64, Family::Arm32) => !matches!(machine, Some("armv8l" | "armv8b")),
        // A 32-bit x86 kernel on an x86-64 CPU still prints `lm`.
        (Family::X86, Family::Amd64) => false,
        _ => true,
    }
}

/// `linux/arm/vN` down to v5.
fn arm_list(version: u8) -> Vec<Platform> {
    (5..=version.clamp(5, 8))
        .rev()
        .map(|v| Platform::linux("arm", Some(&format!("v{v}"))))
        .collect()
}

fn arm32_version(
    rec: &mut Record,
    uname_version: Option<u8>,
    at_family: Option<&(Family, Option<u8>)>,
    cpu: Option<&CpuInfo>,
) -> u8 {
    let mut votes: Vec<(u8, String)> = Vec::new();
    // Identical cores vote once.
    let mut vote = |v: u8, source: String| {
        if !votes.contains(&(v, source.clone())) {
            votes.push((v, source));
        }
    };
    if let Some(v) = uname_version {
        vote(v, "uname -m".to_string());
    }
    if let Some((Family::Arm32, Some(v))) = at_family {
        vote(*v, "AT_PLATFORM".to_string());
    }
    let mut claimed_architecture = None;
    for core in cpu.map(|info| info.cores.as_slice()).unwrap_or_default() {
        if let Some(v) = core.model_name_arm_version() {
            vote(v, "cpuinfo model name".to_string());
        }
        let model = core
            .implementer
            .zip(core.part)
            .and_then(|(imp, part)| Some((imp, part, core_model(imp, part)?)));
        if let Some((imp, part, model)) = model {
            vote(
                model.arm_version,
                format!("CPU part {}", describe_part(imp, part)),
            );
        }
        if let Some(arch) = core.architecture.as_deref() {
            // Kernels print 7 for every core with the revised CPUID scheme, ARMv6 ARM1176 included, so 7 is only
            // an upper bound; older formats (5TEJ, 6TEJ) and 8 are exact.
            let digits: String = arch.chars().take_while(char::is_ascii_digit).collect();
            match digits.parse::<u8>() {
                Ok(7) => claimed_architecture = Some(7),
                Ok(v) => vote(v, format!("cpuinfo CPU architecture {arch}")),
                Err(_) => {}
            }
        }
    }
    if votes.is_empty() {
        if let Some(v) = claimed_architecture {
            rec.rule("only cpuinfo's CPU architecture 7 names a version: ARMv7 assumed");
            return v;
        }
        rec.rule("no signal names the ARM version: the ARMv5 baseline is the only safe choice");
        return 5;
    }
    let version = votes.iter().map(|(v, _)| *v).min().unwrap_or(5);
    let said: Vec<String> = votes
        .iter()
        .map(|(v, s)| format!("{s} says v{v}"))
        .collect();
    let agree = votes.iter().all(|(v, _)| *v == version);
    if agree {
        rec.rule(format!("ARM version v{version}: {}", said.join(", ")));
    } else {
        rec.rule(format!(
            "ARM version v{version}, the lowest of: {} (the lowest wins: the kernel and every core must run the \
             image, and code for a higher version stops on an illegal instruction)",
            said.join(", ")
        ));
    }
    if claimed_architecture == Some(7) && version < 7 {
        rec.rule(format!(
            "cpuinfo's `CPU architecture: 7` overruled: kernels print 7 for ARMv6 cores such as the ARM1176; v{version} \
             stands"
        ));
    }
    version
}

fn arm64_candidates(
    rec: &mut Record,
    evidence: &Evidence,
    at_family: Option<&(Family, Option<u8>)>,
    cpu: Option<&CpuInfo>,
    page_size: Option<u64>,
) -> Vec<Platform> {
    let mut list = vec![Platform::linux("arm64", Some("v8"))];
    if evidence.long_bit == Some(32) {
        rec.rule(
            "64-bit kernel with a 32-bit userland: containers bring their own userland, so arm64 images run and \
             come first",
        );
    }
    if aarch32_runs(rec, evidence, at_family, cpu, page_size) {
        list.extend(arm_list(8));
    }
    list
}

/// Whether this arm64 kernel runs 32-bit ARM images, recording why.
fn aarch32_runs(
    rec: &mut Record,
    evidence: &Evidence,
    at_family: Option<&(Family, Option<u8>)>,
    cpu: Option<&CpuInfo>,
    page_size: Option<u64>,
) -> bool {
    match page_size {
        Some(4096) => {}
        Some(other) => {
            rec.rule(format!(
                "no linux/arm/*: the kernel uses {} KiB pages, and 32-bit ARM binaries are built for 4 KiB pages",
                other / 1024
            ));
            return false;
        }
        None => rec.rule(
            "page size not in the evidence: 4 KiB assumed, as arm64 distributions ship by default",
        ),
    }
    if let Some((Family::Arm32, _)) = at_family {
        rec.rule(
            "linux/arm/* runs: the process that printed the auxiliary vector is itself 32-bit ARM",
        );
        return true;
    }
    if evidence.long_bit == Some(32) {
        rec.rule("linux/arm/* runs: this OS's own 32-bit userland runs on this kernel");
        return true;
    }
    if let Some(list) = evidence.aarch32_el0.as_deref().filter(|l| !l.is_empty()) {
        rec.rule(format!(
            "linux/arm/* runs: the kernel lists CPUs {list} as running 32-bit code (aarch32_el0); 32-bit tasks stay \
             on them"
        ));
        return true;
    }
    let Some(info) = cpu else {
        rec.rule("no linux/arm/*: no CPU part is known (no usable cpuinfo), so AArch32 support is not proven");
        return false;
    };
    let parts = info.distinct_parts();
    if parts.is_empty() {
        rec.rule("no linux/arm/*: cpuinfo names no CPU part, so AArch32 support is not proven");
        return false;
    }
    let mut lacking = Vec::new();
    let mut unknown = Vec::new();
    for (imp, part) in &parts {
        let verdict = match core_model(*imp, *part) {
            Some(model) => model.aarch32,
            None if AARCH64_ONLY_IMPLEMENTERS.iter().any(|(i, _)| i == imp) => Some(No),
            None => None,
        };
        match verdict {
            Some(Yes) => {}
            Some(No) => lacking.push(describe_part(*imp, *part)),
            None => unknown.push(describe_part(*imp, *part)),
        }
    }
    if !lacking.is_empty() {
        rec.rule(format!(
            "no linux/arm/*: CPU {} has no AArch32 at EL0, and the kernel refuses 32-bit tasks unless every CPU \
             runs them",
            lacking.join(", ")
        ));
        return false;
    }
    if !unknown.is_empty() {
        rec.rule(format!(
            "no linux/arm/*: flotilla does not know whether CPU {} runs AArch32; give --platform linux/arm/v7 if it \
             does",
            unknown.join(", ")
        ));
        return false;
    }
    let names: Vec<String> = parts.iter().map(|(i, p)| describe_part(*i, *p)).collect();
    rec.rule(format!(
        "linux/arm/* runs: every CPU ({}) has AArch32 at EL0 and pages are 4 KiB",
        names.join(", ")
    ));
    true
}

fn amd64_candidates(rec: &mut Record, evidence: &Evidence, cpu: Option<&CpuInfo>) -> Vec<Platform> {
    if evidence.long_bit == Some(32) {
        rec.rule("x86-64 kernel with a 32-bit userland: containers bring their own userland, so amd64 images run");
    }
    let flags = cpu.map(CpuInfo::common_features).filter(|f| !f.is_empty());
    let (level, missing, source) = match (&evidence.cpuid_features, &flags) {
        (Some(live), _) => {
            let (level, missing) = x86::level(live);
            if let Some(flags) = &flags {
                let (from_flags, _) = x86::level(flags);
                if from_flags != level {
                    rec.rule(format!(
                        "cpuinfo flags reach v{from_flags} but CPUID reaches v{level}: CPUID decides, as it checks \
                         what the OS enabled"
                    ));
                }
            }
            (level, missing, "CPUID")
        }
        (None, Some(flags)) => {
            let (level, missing) = x86::level(flags);
            (level, missing, "cpuinfo flags on every core")
        }
        (None, None) => {
            rec.rule("neither CPUID nor cpuinfo flags: only the x86-64 baseline is certain");
            (1, Vec::new(), "")
        }
    };
    if !source.is_empty() {
        if missing.is_empty() {
            rec.rule(format!(
                "x86-64-v{level} from {source}: every level's features present"
            ));
        } else {
            rec.rule(format!(
                "x86-64-v{level} from {source}: v{} needs {}, which this CPU lacks",
                level + 1,
                missing.join(" ")
            ));
        }
    }
    (1..=level)
        .rev()
        .map(|l| {
            let variant = format!("v{l}");
            Platform::linux("amd64", (l > 1).then_some(variant.as_str()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::evidence::Auxv;

    fn ev(uname: Option<&str>, cpuinfo: Option<&str>) -> Evidence {
        Evidence {
            origin: "test".to_string(),
            uname_machine: uname.map(str::to_string),
            cpuinfo: cpuinfo.map(str::to_string),
            page_size: Some(4096),
            ..Evidence::default()
        }
    }

    fn names(d: &Detection) -> Vec<String> {
        d.candidates.iter().map(Platform::to_string).collect()
    }

    const ARM1176_NO_MODEL_NAME: &str = "processor\t: 0\nFeatures\t: half thumb fastmult vfp edsp java tls\nCPU implementer\t: 0x41\n\
         CPU architecture: 7\nCPU part\t: 0xb76\n";

    #[test]
    fn armv6_without_model_name_is_still_v6() {
        // containerd's Pi Zero special case reads `model name`; the CPU part alone must suffice.
        let d = detect(&ev(Some("armv7l"), Some(ARM1176_NO_MODEL_NAME))).unwrap();
        assert_eq!(names(&d), ["linux/arm/v6", "linux/arm/v5"]);
        assert!(
            d.rules.iter().any(|r| r.contains("CPU architecture: 7")),
            "{:?}",
            d.rules
        );
    }

    #[test]
    fn sixteen_k_pages_or_an_aarch64_only_core_drop_arm32() {
        let a715 = "processor\t: 0\nFeatures\t: fp asimd\nCPU implementer\t: 0x41\nCPU architecture: 8\n\
                    CPU part\t: 0xd4d\n\nprocessor\t: 1\nFeatures\t: fp asimd\nCPU implementer\t: 0x41\n\
                    CPU architecture: 8\nCPU part\t: 0xd46\n";
        let d = detect(&ev(Some("aarch64"), Some(a715))).unwrap();
        assert_eq!(names(&d), ["linux/arm64/v8"]);
        assert!(
            d.rules.iter().any(|r| r.contains("Cortex-A715")),
            "{:?}",
            d.rules
        );

        let apple =
            "processor\t: 0\nFeatures\t: fp asimd\nCPU implementer\t: 0x61\nCPU part\t: 0x022\n";
        let d = detect(&ev(Some("aarch64"), Some(apple))).unwrap();
        assert_eq!(names(&d), ["linux/arm64/v8"]);
    }

    #[test]
    fn a_32_bit_process_on_an_arm64_kernel_proves_aarch32() {
        let mut e = ev(Some("aarch64"), None);
        e.auxv = Auxv {
            platform: Some("v8l".to_string()),
            ..Auxv::default()
        };
        let d = detect(&e).unwrap();
        assert_eq!(d.candidates.len(), 5);
        assert_eq!(names(&d)[0], "linux/arm64/v8");
    }

    #[test]
    fn x86_cpuinfo_under_an_arm_uname_is_foreign() {
        let x86 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse sse2 lm avx\n";
        let d = detect(&ev(Some("armv6l"), Some(x86))).unwrap();
        assert_eq!(names(&d), ["linux/arm/v6", "linux/arm/v5"]);
        assert!(
            d.rules.iter().any(|r| r.contains("foreign")),
            "{:?}",
            d.rules
        );
    }

    #[test]
    fn aarch64_cpuinfo_under_armv7l_is_foreign() {
        let a72 = "processor\t: 0\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\n\
                   CPU architecture: 8\nCPU part\t: 0xd08\n";
        let d = detect(&ev(Some("armv7l"), Some(a72))).unwrap();
        assert_eq!(names(&d), ["linux/arm/v7", "linux/arm/v6", "linux/arm/v5"]);
        assert!(
            d.rules.iter().any(|r| r.contains("foreign")),
            "{:?}",
            d.rules
        );
    }

    #[test]
    fn unknown_architectures_pass_through() {
        let d = detect(&ev(
            Some("riscv64"),
            Some("processor\t: 0\nisa\t\t: rv64imafdc\n"),
        ))
        .unwrap();
        assert_eq!(names(&d), ["linux/riscv64"]);
        let d = detect(&ev(Some("ppc64le"), None)).unwrap();
        assert_eq!(names(&d), ["linux/ppc64le"]);
    }

    #[test]
    fn nothing_usable_is_an_error_naming_what_is_missing() {
        let err = detect(&ev(None, Some("garbage\n"))).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("no uname -m") && text.contains("cpuinfo"),
            "{text}"
        );
    }

    #[test]
    fn live_cpuid_outranks_cpuinfo_flags() {
        let mut e = ev(
            Some("x86_64"),
            Some("processor: 0\nflags: fpu sse sse2 lm\n"),
        );
        e.cpuid_features = Some(
            "cx16 lahf_lm popcnt pni sse4_1 sse4_2 ssse3"
                .split(' ')
                .map(str::to_string)
                .collect(),
        );
        let d = detect(&e).unwrap();
        assert_eq!(names(&d), ["linux/amd64/v2", "linux/amd64"]);
        assert!(
            d.rules.iter().any(|r| r.contains("CPUID decides")),
            "{:?}",
            d.rules
        );
    }

    proptest::proptest! {
        #[test]
        fn never_panics(
            cpuinfo in proptest::option::of(".{0,600}"),
            machine in proptest::option::of("(armv5tel|armv6l|armv7l|armv8l|aarch64|x86_64|i686|riscv64|[a-z0-9_]{1,8})"),
            platform in proptest::option::of("(v5l|v6l|v7l|v8l|aarch64|x86_64|[a-z0-9]{1,6})"),
            page_size in proptest::option::of(proptest::sample::select(vec![4096u64, 16384, 65536])),
            long_bit in proptest::option::of(proptest::sample::select(vec![32u32, 64])),
        ) {
            let mut e = ev(machine.as_deref(), cpuinfo.as_deref());
            e.page_size = page_size;
            e.long_bit = long_bit;
            e.long_bit_source = long_bit.map(|_| "test".to_string());
            e.auxv.platform = platform;
            if let Ok(d) = detect(&e) {
                proptest::prop_assert!(!d.candidates.is_empty());
            }
        }
    }

    #[test]
    fn json_candidates_are_strings() {
        let d = detect(&ev(Some("armv6l"), None)).unwrap();
        let json = serde_json::to_value(&d).unwrap();
        assert_eq!(json["candidates"][0], "linux/arm/v6");
        assert_eq!(json["page_size"], 4096);
    }
}
