//! On this x86-64 host, `flotilla platform --json` must agree with what the system itself reports: the auxiliary
//! vector as glibc prints it (`LD_SHOW_AUXV=1 /bin/true`) and the CPU's x86-64 level from /proc/cpuinfo flags and
//! from CPUID as seen by this test process.
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

use std::collections::BTreeSet;
use std::process::Command;

use flotilla::platform::evidence::{AuxValue, Auxv};
use flotilla::platform::{cpuinfo, x86};
use serde_json::Value;

mod common;

use common::Flotilla;

fn signal<'a>(json: &'a Value, source: &str, name: &str) -> Option<&'a str> {
    json["signals"]
        .as_array()?
        .iter()
        .find(|s| s["source"] == source && s["name"] == name)?["value"]
        .as_str()
}

fn hex(text: &str) -> u64 {
    let digits = text.split_whitespace().next().unwrap_or("");
    u64::from_str_radix(digits.trim_start_matches("0x"), 16)
        .unwrap_or_else(|_| panic!("{text:?} is not hex"))
}

fn glibc_auxv() -> Auxv {
    let out = Command::new("/bin/true")
        .env("LD_SHOW_AUXV", "1")
        .output()
        .expect("run LD_SHOW_AUXV=1 /bin/true");
    Auxv::parse_text(&String::from_utf8_lossy(&out.stdout)).expect("glibc's auxv text parses")
}

fn bits(value: &Option<AuxValue>) -> u64 {
    match value {
        Some(AuxValue::Bits(b)) => *b,
        other => panic!("x86 glibc prints AT_HWCAP as hex, got {other:?}"),
    }
}

#[test]
fn auxv_signals_match_ld_show_auxv() {
    let json = Flotilla::new().args(["platform", "--json"]).json();
    let glibc = glibc_auxv();
    assert_eq!(
        signal(&json, "auxv", "AT_HWCAP").map(hex),
        Some(bits(&glibc.hwcap))
    );
    assert_eq!(
        signal(&json, "auxv", "AT_HWCAP2").map(hex),
        Some(bits(&glibc.hwcap2))
    );
    assert_eq!(
        signal(&json, "auxv", "AT_PLATFORM"),
        glibc.platform.as_deref()
    );
    let pagesz = glibc.page_size.expect("glibc prints AT_PAGESZ");
    assert_eq!(
        signal(&json, "auxv", "AT_PAGESZ").map(|v| v.parse::<u64>().unwrap()),
        Some(pagesz)
    );
    assert_eq!(json["page_size"].as_u64(), Some(pagesz));
    assert_eq!(signal(&json, "uname -m", "machine"), Some("x86_64"));
}

/// The level this test process sees through std's CPUID detection, independent of flotilla's probe.
fn level_from_std() -> u8 {
    let v2 = is_x86_feature_detected!("cmpxchg16b")
        && is_x86_feature_detected!("popcnt")
        && is_x86_feature_detected!("sse3")
        && is_x86_feature_detected!("sse4.1")
        && is_x86_feature_detected!("sse4.2")
        && is_x86_feature_detected!("ssse3");
    let v3 = v2
        && is_x86_feature_detected!("avx")
        && is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("bmi1")
        && is_x86_feature_detected!("bmi2")
        && is_x86_feature_detected!("f16c")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("lzcnt")
        && is_x86_feature_detected!("movbe")
        && is_x86_feature_detected!("xsave");
    let v4 = v3
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512cd")
        && is_x86_feature_detected!("avx512dq")
        && is_x86_feature_detected!("avx512vl");
    [v2, v3, v4].iter().filter(|reached| **reached).count() as u8 + 1
}

#[test]
fn level_matches_cpuid_and_cpuinfo_flags() {
    let json = Flotilla::new().args(["platform", "--json"]).json();
    let candidates: Vec<&str> = json["candidates"]
        .as_array()
        .expect("candidates")
        .iter()
        .filter_map(Value::as_str)
        .collect();

    let from_std = level_from_std();
    let text = std::fs::read_to_string("/proc/cpuinfo").expect("read /proc/cpuinfo");
    let flags: BTreeSet<String> = cpuinfo::parse(&text).common_features();
    let (from_flags, _) = x86::level(&flags);
    assert_eq!(
        from_std, from_flags,
        "CPUID and /proc/cpuinfo flags disagree on this host"
    );

    let expected: Vec<String> = (1..=from_std)
        .rev()
        .map(|l| {
            if l == 1 {
                "linux/amd64".to_string()
            } else {
                format!("linux/amd64/v{l}")
            }
        })
        .collect();
    assert_eq!(candidates, expected);
    assert_eq!(
        signal(&json, "CPUID", "x86-64 level"),
        Some(format!("v{from_std}").as_str())
    );
}

#[test]
fn a_dump_replays_to_the_same_answer() {
    let dir = tempfile::tempdir().expect("temp dir");
    let dump = dir.path().join("evidence");
    let dump_arg = dump.to_str().expect("utf-8 temp path");
    let live = Flotilla::new()
        .args(["platform", "--json", "--dump", dump_arg])
        .json();
    let replayed = Flotilla::new()
        .args(["platform", "--json", "--evidence", dump_arg])
        .json();
    assert_eq!(live["candidates"], replayed["candidates"]);
    assert_eq!(live["page_size"], replayed["page_size"]);
    let source = std::fs::read_to_string(dump.join("SOURCE")).expect("SOURCE written");
    assert!(source.contains("--dump on host"), "{source}");
}
