//! x86-64 micro-architecture levels (x86-64-v1..v4) from CPU features.
//!
//! The levels are the x86-64 psABI's lists. Features are named as Linux prints them in `/proc/cpuinfo` `flags`
//! (`pni` for SSE3, `abm` for LZCNT, `lahf_lm` for LAHF/SAHF in 64-bit mode), so a snapshot's flags and a live
//! CPUID probe (see [`live_features`]) feed the same check.

use std::collections::BTreeSet;

/// What each level adds over the one below, in cpuinfo names.
const LEVELS: [(u8, &[&str]); 3] = [
    (
        2,
        &[
            "cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3",
        ],
    ),
    // The psABI also lists OSXSAVE; Linux does not print it in cpuinfo, and the live probe only reports AVX when the
    // OS saves the AVX state, so `xsave` together with `avx` stands for it.
    (
        3,
        &[
            "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave",
        ],
    ),
    (
        4,
        &["avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"],
    ),
];

/// The level a feature set reaches, and the features missing for the next level (empty at v4).
pub fn level(features: &BTreeSet<String>) -> (u8, Vec<&'static str>) {
    let mut reached = 1;
    for (level, required) in LEVELS {
        let missing: Vec<&'static str> = required
            .iter()
            .copied()
            .filter(|f| !features.contains(*f))
            .collect();
        if !missing.is_empty() {
            return (reached, missing);
        }
        reached = level;
    }
    (reached, Vec::new())
}

/// The level-relevant features of the CPU this process runs on, from CPUID, in cpuinfo names.
#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
pub fn live_features() -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut add = |present: bool, name: &str| {
        if present {
            found.insert(name.to_string());
        }
    };
    add(is_x86_feature_detected!("cmpxchg16b"), "cx16");
    add(crate::sys::has_lahf_lm(), "lahf_lm");
    add(is_x86_feature_detected!("popcnt"), "popcnt");
    add(is_x86_feature_detected!("sse3"), "pni");
    add(is_x86_feature_detected!("sse4.1"), "sse4_1");
    add(is_x86_feature_detected!("sse4.2"), "sse4_2");
    add(is_x86_feature_detected!("ssse3"), "ssse3");
    // std reports AVX and AVX-512 only when XCR0 shows the OS saves their registers (OSXSAVE), as the psABI wants.
    add(is_x86_feature_detected!("avx"), "avx");
    add(is_x86_feature_detected!("avx2"), "avx2");
    add(is_x86_feature_detected!("bmi1"), "bmi1");
    add(is_x86_feature_detected!("bmi2"), "bmi2");
    add(is_x86_feature_detected!("f16c"), "f16c");
    add(is_x86_feature_detected!("fma"), "fma");
    add(is_x86_feature_detected!("lzcnt"), "abm");
    add(is_x86_feature_detected!("movbe"), "movbe");
    add(is_x86_feature_detected!("xsave"), "xsave");
    add(is_x86_feature_detected!("avx512f"), "avx512f");
    add(is_x86_feature_detected!("avx512bw"), "avx512bw");
    add(is_x86_feature_detected!("avx512cd"), "avx512cd");
    add(is_x86_feature_detected!("avx512dq"), "avx512dq");
    add(is_x86_feature_detected!("avx512vl"), "avx512vl");
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(s: &str) -> BTreeSet<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    const V2: &str = "cx16 lahf_lm popcnt pni sse4_1 sse4_2 ssse3";
    const V3: &str = "avx avx2 bmi1 bmi2 f16c fma abm movbe xsave";
    const V4: &str = "avx512f avx512bw avx512cd avx512dq avx512vl";

    #[test]
    fn levels_follow_the_psabi_lists() {
        assert_eq!(level(&set("")).0, 1);
        assert_eq!(level(&set(V2)).0, 2);
        assert_eq!(level(&set(&format!("{V2} {V3}"))).0, 3);
        assert_eq!(level(&set(&format!("{V2} {V3} {V4}"))), (4, vec![]));
    }

    #[test]
    fn a_gap_stops_the_climb_and_is_named() {
        // AVX-512 without LZCNT (abm) cannot be v4: the levels are cumulative.
        let flags = format!("{V2} {}", V3.replace("abm", "")) + " " + V4;
        assert_eq!(level(&set(&flags)), (2, vec!["abm"]));
    }
}
