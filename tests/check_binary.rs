//! ELF inspection and `flotilla check-binary` against Debian's busybox-static for four architectures, with the
//! prediction checked for real under qemu's ARM1176 and Cortex-A7 models.
//!
//! Needs the busybox-static fixtures (`tests/setup`) and `qemu-arm-static`; without them these tests skip
//! with a printed reason, or fail when `FLOTILLA_REQUIRE_ALL=1`.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use flotilla::elf::arm_attributes::{FpArch, SimdArch};
use flotilla::elf::{self, BinaryRequirements, ElfRequirements, FloatAbi, Outcome};
use flotilla::platform::Platform;
use proptest::prelude::*;

mod common;

use common::Flotilla;

fn busybox(arch: &str) -> Option<PathBuf> {
    common::required_busybox(arch)
}

fn qemu_arm() -> Option<PathBuf> {
    common::required_tool("qemu-arm-static")
}

fn elf_requirements(path: &Path) -> ElfRequirements {
    match elf::inspect_file(path) {
        Ok(BinaryRequirements::Elf(req)) => *req,
        other => panic!(
            "{}: expected ELF requirements, got {other:?}",
            path.display()
        ),
    }
}

fn platform(s: &str) -> Platform {
    s.parse().unwrap()
}

fn check(file: &Path, extra: &[&str], dir: &Path) -> Output {
    let mut args = vec!["check-binary", "--platform", "linux/arm/v6"];
    args.extend_from_slice(extra);
    let file = file.to_str().unwrap();
    args.push(file);
    Flotilla::new().args(args).current_dir(dir).output()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn busybox_requirements_per_architecture() {
    let Some(amd64) = busybox("amd64") else {
        return;
    };
    let req = elf_requirements(&amd64);
    assert_eq!(req.platform, Some(platform("linux/amd64")));
    assert_eq!(req.machine, "x86_64");
    assert_eq!(req.class, 64);

    let Some(arm64) = busybox("arm64") else {
        return;
    };
    let req = elf_requirements(&arm64);
    assert_eq!(req.platform, Some(platform("linux/arm64/v8")));
    assert_eq!(req.load_alignment, Some(65536));

    let Some(armhf) = busybox("armhf") else {
        return;
    };
    let req = elf_requirements(&armhf);
    assert_eq!(req.platform, Some(platform("linux/arm/v7")));
    let arm = req.arm.as_ref().unwrap();
    assert_eq!(arm.float_abi, FloatAbi::Hard);
    let attributes = arm.attributes.as_ref().unwrap();
    assert_eq!(attributes.fp_arch, Some(FpArch(3)));
    assert_eq!(attributes.advanced_simd_arch, Some(SimdArch(1)));
    // The code decides: its Thumb-2 instructions, which no ARMv6 core runs, confirm the attributes' v7.
    assert_eq!(req.decided_by, Some(elf::Evidence::ReachableCode));
    assert!(
        req.reasons
            .first()
            .is_some_and(|r| r.starts_with("reachable code: ") && r.contains("32-bit Thumb-2 ×")),
        "{:?}",
        req.reasons
    );
    assert!(
        req.reasons
            .iter()
            .any(|r| r == "Tag_CPU_arch v7 (from .ARM.attributes)")
    );

    let Some(armel) = busybox("armel") else {
        return;
    };
    let req = elf_requirements(&armel);
    assert_eq!(req.platform, Some(platform("linux/arm/v5")));
    assert_eq!(req.arm.as_ref().unwrap().float_abi, FloatAbi::Soft);

    // The whole-buffer entry point agrees with the file one.
    let bytes = std::fs::read(&armel).unwrap();
    assert_eq!(
        elf::inspect(&bytes).unwrap(),
        BinaryRequirements::Elf(Box::new(req))
    );
}

#[test]
fn verdicts_for_a_pi_zero_and_a_pi_5() {
    let (Some(armhf), Some(armel), Some(arm64)) =
        (busybox("armhf"), busybox("armel"), busybox("arm64"))
    else {
        return;
    };
    let zero = [platform("linux/arm/v6"), platform("linux/arm/v5")];
    let armhf = elf::inspect_file(&armhf).unwrap();
    let verdict = elf::can_run(&armhf, &zero, Some(4096));
    assert_eq!(verdict.outcome, Outcome::CannotRun);
    assert!(
        verdict
            .reasons
            .iter()
            .any(|r| r.starts_with("needs linux/arm/v7: reachable code: ")
                && r.contains("32-bit Thumb-2 ×")
                && r.ends_with("this host runs linux/arm/v6, linux/arm/v5")),
        "{verdict:?}"
    );
    let armel = elf::inspect_file(&armel).unwrap();
    assert_eq!(
        elf::can_run(&armel, &zero, Some(4096)).outcome,
        Outcome::CanRun
    );

    // A Pi 5 kernel with 16 KiB pages runs 64-bit busybox (64 KiB aligned) but cannot map 4 KiB-aligned code.
    let pi5 = [
        platform("linux/arm64/v8"),
        platform("linux/arm/v8"),
        platform("linux/arm/v7"),
    ];
    let arm64 = elf::inspect_file(&arm64).unwrap();
    assert_eq!(
        elf::can_run(&arm64, &pi5, Some(16384)).outcome,
        Outcome::CanRun
    );
    let verdict = elf::can_run(&armhf, &pi5, Some(16384));
    assert_eq!(verdict.outcome, Outcome::CannotRun);
    assert!(
        verdict
            .reasons
            .iter()
            .any(|r| r.contains("16384-byte pages")),
        "{verdict:?}"
    );
}

/// The prediction is real: the same binaries under qemu's ARM1176 (a Pi Zero's core) and Cortex-A7.
#[test]
fn qemu_confirms_the_prediction() {
    let (Some(qemu), Some(armhf), Some(armel)) = (qemu_arm(), busybox("armhf"), busybox("armel"))
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let run = |cpu: &str, binary: &Path| {
        Command::new(&qemu)
            .args(["-cpu", cpu])
            .arg(binary)
            .args(["echo", "ok"])
            // qemu writes a core file for the crash into its working directory.
            .current_dir(dir.path())
            .output()
            .unwrap()
    };

    let died = run("arm1176", &armhf);
    let stderr = text(&died.stderr);
    assert!(
        died.status.signal() == Some(4)
            || died.status.code() == Some(132)
            || stderr.contains("uncaught target signal 4"),
        "armhf busybox on arm1176 should die with SIGILL: {:?} {stderr}",
        died.status
    );
    assert!(!died.status.success());

    let ran = run("arm1176", &armel);
    assert!(ran.status.success(), "armel on arm1176: {ran:?}");
    assert_eq!(text(&ran.stdout), "ok\n");

    let ran = run("cortex-a7", &armhf);
    assert!(ran.status.success(), "armhf on cortex-a7: {ran:?}");
    assert_eq!(text(&ran.stdout), "ok\n");

    let cannot = check(&armhf, &[], dir.path());
    assert_eq!(cannot.status.code(), Some(3), "{cannot:?}");
    let out = text(&cannot.stdout);
    assert!(out.contains("requires: linux/arm/v7"), "{out}");
    assert!(out.contains("verdict: CANNOT run"), "{out}");
    assert!(out.contains("from --platform; detection not used"), "{out}");

    let can = check(&armel, &[], dir.path());
    assert_eq!(can.status.code(), Some(0), "{can:?}");
    assert!(text(&can.stdout).contains("requires: linux/arm/v5"));
}

#[test]
fn json_report_names_the_override() {
    let Some(armhf) = busybox("armhf") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = check(&armhf, &["--json", "--page-size", "4096"], dir.path());
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["requirements"]["kind"], "elf");
    assert_eq!(report["requirements"]["platform"], "linux/arm/v7");
    assert_eq!(report["requirements"]["arm"]["float_abi"], "hard");
    assert_eq!(
        report["requirements"]["arm"]["attributes"]["fp_arch"],
        "VFPv3"
    );
    assert_eq!(report["host"]["source"], "override");
    assert_eq!(report["host"]["page_size"], 4096);
    assert_eq!(report["verdict"]["outcome"], "cannot_run");
}

/// Every failure is a message and a non-zero exit, never a panic.
fn assert_clean_failure(out: &Output, expect_in_stderr: &str) {
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stderr.starts_with("flotilla: "), "{stderr}");
    assert!(stderr.contains(expect_in_stderr), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn hostile_files_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::write(&empty, b"").unwrap();
    assert_clean_failure(&check(&empty, &[], dir.path()), "the file is empty");

    let garbage = dir.path().join("garbage");
    std::fs::write(&garbage, b"MZ\x90\x00 not an ELF").unwrap();
    assert_clean_failure(&check(&garbage, &[], dir.path()), "not an ELF executable");

    assert_clean_failure(&check(dir.path(), &[], dir.path()), "is not a regular file");
    assert_clean_failure(
        &check(&dir.path().join("nope"), &[], dir.path()),
        "cannot read",
    );

    let Some(armhf) = busybox("armhf") else {
        return;
    };
    let bytes = std::fs::read(&armhf).unwrap();
    let cut_file = dir.path().join("cut");
    for cut in [
        1,
        4,
        5,
        20,
        52,
        80,
        200,
        4096,
        bytes.len() / 2,
        bytes.len() - 100,
    ] {
        std::fs::write(&cut_file, bytes.get(..cut).unwrap()).unwrap();
        let out = check(&cut_file, &[], dir.path());
        assert_clean_failure(&out, "");
        assert!(
            text(&out.stderr).contains("truncated or corrupt"),
            "cut at {cut}: {out:?}"
        );
    }
}

#[test]
fn scripts_name_their_interpreter_and_bad_page_sizes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("run.sh");
    std::fs::write(&script, b"#!/bin/sh -e\nexec busybox echo ok\n").unwrap();
    let out = check(&script, &[], dir.path());
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("script: interpreter /bin/sh (argument -e)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("verdict: depends on its interpreter"),
        "{stdout}"
    );

    let out = Flotilla::new()
        .args(["check-binary", "--platform", "linux/arm/v6"])
        .args(["--page-size", "5000"])
        .arg(&script)
        .current_dir(dir.path())
        .output();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(text(&out.stderr).contains("power of two"));
}

/// Without --platform the live host decides: this x86-64 machine runs the amd64 busybox and not the armel one.
#[test]
fn the_detected_host_is_compared_when_no_platform_is_given() {
    let (Some(amd64), Some(armel)) = (busybox("amd64"), busybox("armel")) else {
        return;
    };
    if std::env::consts::ARCH != "x86_64" {
        eprintln!("skipping: this test knows what an x86-64 host runs");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = Flotilla::new()
        .args(["check-binary", "--json"])
        .arg(&amd64)
        .current_dir(dir.path())
        .output();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let report = common::json_of(&out);
    assert_eq!(report["host"]["source"], "detected");
    assert!(
        report["host"]["platforms"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p == "linux/amd64")),
        "{report}"
    );
    let out = Flotilla::new()
        .arg("check-binary")
        .arg(&armel)
        .current_dir(dir.path())
        .output();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
}

/// Mutations of a real binary's headers, section table and attribute section (its first and last bytes).
#[test]
fn inspect_survives_mutated_busybox() {
    let Some(path) = busybox("armhf") else { return };
    let original = std::fs::read(path).unwrap();
    let edits = proptest::collection::vec((any::<bool>(), 0usize..2048, any::<u8>()), 1..6);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(128));
    runner
        .run(&edits, |edits| {
            let mut bytes = original.clone();
            let len = bytes.len();
            for (at_end, offset, value) in edits {
                let i = if at_end { len - 1 - offset } else { offset };
                if let Some(b) = bytes.get_mut(i) {
                    *b = value;
                }
            }
            if let Ok(req) = elf::inspect(&bytes) {
                let _ = elf::can_run(&req, &[platform("linux/arm/v7")], Some(4096));
            }
            Ok(())
        })
        .unwrap();
}

/// A real Go binary: Debian's runc (installed with the test tools) records its toolchain and build settings.
#[test]
fn go_build_info_from_a_real_go_binary() {
    let runc = ["/usr/sbin/runc", "/usr/bin/runc"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file());
    let Some(runc) = common::require("runc (a Go binary)", runc) else {
        return;
    };
    let req = elf_requirements(&runc);
    let go = req.go.as_ref().expect("runc carries Go build info");
    assert!(go.version.starts_with("go1."), "{go:?}");
    assert_eq!(go.goos.as_deref(), Some("linux"));
    match req.machine.as_str() {
        "x86_64" => {
            assert_eq!(go.goarch.as_deref(), Some("amd64"));
            assert!(go.goamd64.is_some(), "{go:?}");
            assert!(
                req.reasons.iter().any(|r| r.starts_with("GOAMD64=")),
                "{req:?}"
            );
        }
        "aarch64" => assert_eq!(go.goarch.as_deref(), Some("arm64")),
        other => eprintln!("runc for {other}: only the version is checked"),
    }
}
