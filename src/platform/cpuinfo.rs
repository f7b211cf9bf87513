//! `/proc/cpuinfo` as data: one entry per core plus the lines that describe the whole machine.
//!
//! The text comes from every kernel generation flotilla meets, so the parser accepts what they print rather than
//! one canonical form: per-core blocks opened by `processor : N`, the old ARM header `Processor : ARMv6-compatible
//! processor rev 7 (v6l)` that stands in for `model name` on 3.x kernels, features under `Features` (ARM) or
//! `flags` (x86), and machine-wide lines (`Hardware`, `Revision`, `Model`). Heterogeneous (big.LITTLE) machines
//! print different `CPU part` lines per core; every core is kept so detection can judge each one.
//!
//! Parsing never fails: unknown lines are counted and skipped. Whether the result is usable is for detection to
//! say, because only detection knows which of the other signals could stand in.

use std::collections::BTreeSet;

/// One core's block.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Core {
    /// The `processor : N` number; `None` for old kernels that print no such line.
    pub index: Option<u32>,
    /// `model name`, or the old `Processor` header.
    pub model_name: Option<String>,
    /// `Features` (ARM) or `flags` (x86), split on whitespace.
    pub features: BTreeSet<String>,
    /// `CPU implementer` (ARM), e.g. 0x41 for Arm Ltd.
    pub implementer: Option<u32>,
    /// `CPU part` (ARM), e.g. 0xb76 for the ARM1176.
    pub part: Option<u32>,
    /// `CPU architecture` as printed: `7`, `8`, `AArch64`, `5TEJ`.
    pub architecture: Option<String>,
    /// `vendor_id` (x86), e.g. `GenuineIntel`.
    pub vendor_id: Option<String>,
}

impl Core {
    fn is_empty(&self) -> bool {
        self == &Core::default()
    }

    /// The ARM version a `(v6l)`-style suffix of the model name states, e.g. 6 for
    /// `ARMv6-compatible processor rev 7 (v6l)`.
    pub fn model_name_arm_version(&self) -> Option<u8> {
        let name = self.model_name.as_deref()?;
        let open = name.rfind('(')?;
        let inner = name.get(open + 1..)?.strip_suffix(')')?;
        let digits = inner.strip_prefix('v')?.strip_suffix('l')?;
        digits.parse().ok()
    }
}

/// A parsed `/proc/cpuinfo`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuInfo {
    pub cores: Vec<Core>,
    /// `Hardware` (ARM SoC name), if printed.
    pub hardware: Option<String>,
    /// `Model` (board name on Raspberry Pi kernels), if printed.
    pub model: Option<String>,
    /// Lines that were neither `key : value` nor blank.
    pub unparsed_lines: usize,
}

impl CpuInfo {
    /// Features present on every core that lists features: what any core the scheduler picks can do.
    pub fn common_features(&self) -> BTreeSet<String> {
        let mut with_features = self.cores.iter().filter(|c| !c.features.is_empty());
        let Some(first) = with_features.next() else {
            return BTreeSet::new();
        };
        with_features.fold(first.features.clone(), |acc, core| {
            acc.intersection(&core.features).cloned().collect()
        })
    }

    /// The distinct `(implementer, part)` pairs, in core order.
    pub fn distinct_parts(&self) -> Vec<(u32, u32)> {
        let mut seen = Vec::new();
        for core in &self.cores {
            if let (Some(imp), Some(part)) = (core.implementer, core.part) {
                if !seen.contains(&(imp, part)) {
                    seen.push((imp, part));
                }
            }
        }
        seen
    }

    /// Whether any core says anything at all.
    pub fn is_empty(&self) -> bool {
        self.cores.is_empty() && self.hardware.is_none() && self.model.is_none()
    }
}

/// Parses cpuinfo text. Total: any input gives a value.
pub fn parse(text: &str) -> CpuInfo {
    let mut info = CpuInfo::default();
    let mut current: Option<Core> = None;
    // The old ARM header names the processor once for the whole machine, before or outside any block.
    let mut processor_header: Option<String> = None;

    for raw in text.lines() {
        let line = raw.trim();
        if line.is_empty() {
            finish(&mut info, current.take());
            continue;
        }
        let Some((key, value)) = line.split_once(':') else {
            info.unparsed_lines += 1;
            continue;
        };
        let key = key.trim();
        let value = value.trim();
        match key {
            "processor" | "Processor" => {
                if let Ok(n) = value.parse::<u32>() {
                    finish(&mut info, current.take());
                    current = Some(Core {
                        index: Some(n),
                        ..Core::default()
                    });
                } else if !value.is_empty() {
                    processor_header = Some(value.to_string());
                }
            }
            "Hardware" => info.hardware = Some(value.to_string()),
            "Model" => info.model = Some(value.to_string()),
            _ => {
                if let Some(apply) = per_core_field(key) {
                    apply(current.get_or_insert_with(Core::default), value);
                }
            }
        }
    }
    finish(&mut info, current.take());

    if let Some(header) = processor_header {
        for core in info.cores.iter_mut().filter(|c| c.model_name.is_none()) {
            core.model_name = Some(header.clone());
        }
        if info.cores.is_empty() {
            info.cores.push(Core {
                model_name: Some(header),
                ..Core::default()
            });
        }
    }
    info
}

fn finish(info: &mut CpuInfo, core: Option<Core>) {
    if let Some(core) = core.filter(|c| !c.is_empty()) {
        info.cores.push(core);
    }
}

type FieldSetter = fn(&mut Core, &str);

fn per_core_field(key: &str) -> Option<FieldSetter> {
    let setter: FieldSetter = match key {
        "model name" => |c, v| c.model_name = Some(v.to_string()),
        "Features" | "flags" => {
            |c, v| c.features = v.split_whitespace().map(str::to_string).collect()
        }
        "CPU implementer" => |c, v| c.implementer = parse_number(v),
        "CPU part" => |c, v| c.part = parse_number(v),
        "CPU architecture" => |c, v| c.architecture = Some(v.to_string()),
        "vendor_id" => |c, v| c.vendor_id = Some(v.to_string()),
        _ => return None,
    };
    Some(setter)
}

/// `0x41`, `0X41` or `65`.
pub fn parse_number(v: &str) -> Option<u32> {
    let v = v.trim();
    match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const OLD_PI1: &str = "Processor\t: ARMv6-compatible processor rev 7 (v6l)\nBogoMIPS\t: 697.95\n\
        Features\t: swp half thumb fastmult vfp edsp java tls\nCPU implementer\t: 0x41\nCPU architecture: 7\n\
        CPU variant\t: 0x0\nCPU part\t: 0xb76\nCPU revision\t: 7\n\nHardware\t: BCM2708\nRevision\t: 000d\n";

    #[test]
    fn old_kernel_processor_header_is_the_model_name() {
        let info = parse(OLD_PI1);
        assert_eq!(info.cores.len(), 1);
        let core = &info.cores[0];
        assert_eq!(core.index, None);
        assert_eq!(core.model_name_arm_version(), Some(6));
        assert_eq!(core.part, Some(0xb76));
        assert_eq!(core.implementer, Some(0x41));
        assert_eq!(core.architecture.as_deref(), Some("7"));
        assert!(core.features.contains("java"));
        assert_eq!(info.hardware.as_deref(), Some("BCM2708"));
    }

    #[test]
    fn big_little_keeps_every_core() {
        let text = "processor\t: 0\nCPU implementer\t: 0x41\nCPU part\t: 0xd05\n\n\
                    processor\t: 1\nCPU implementer\t: 0x41\nCPU part\t: 0xd0b\n\n";
        let info = parse(text);
        assert_eq!(info.cores.len(), 2);
        assert_eq!(info.distinct_parts(), vec![(0x41, 0xd05), (0x41, 0xd0b)]);
    }

    #[test]
    fn common_features_are_the_intersection() {
        let text = "processor: 0\nflags: sse avx avx512f\n\nprocessor: 1\nflags: sse avx\n";
        let common = parse(text).common_features();
        assert!(common.contains("avx"));
        assert!(!common.contains("avx512f"));
    }

    #[test]
    fn garbage_gives_an_empty_result() {
        let info = parse("\u{0}\u{1}garbage without colons\n\n:::\n");
        assert!(info.cores.is_empty());
        assert_eq!(info.unparsed_lines, 1);
    }

    proptest! {
        #[test]
        fn never_panics(text in ".{0,2000}") {
            let info = parse(&text);
            let _ = info.common_features();
            let _ = info.distinct_parts();
            for core in &info.cores {
                let _ = core.model_name_arm_version();
            }
        }

        #[test]
        fn never_panics_on_cpuinfo_shaped_lines(
            lines in proptest::collection::vec(
                ("(processor|Processor|model name|Features|flags|CPU part|CPU implementer|CPU architecture|\
                   Hardware|x)", "[ \t]{0,2}", "[ -~(]{0,40}"),
                0..40,
            )
        ) {
            let text: String = lines
                .iter()
                .map(|(k, ws, v)| format!("{k}{ws}:{v}\n"))
                .collect();
            let _ = parse(&text);
        }
    }
}
