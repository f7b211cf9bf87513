//! `flotilla check-binary` for linux/arm/v6 and linux/arm/v7 against qemu's ARM1176 and Cortex-A7 models, over a
//! corpus of real binaries: Debian's armel and armhf busybox-static, dash, hello and coreutils' ls (with their
//! loader and libraries, stripped as shipped); a Rust program using ring for three ARM targets, Go programs with
//! GOARM 5, 6 and 7, C programs against the armel libc whose `main` is ARMv7 (ARM and Thumb state) or which reach
//! an ARMv7 routine only through an AT_HWCAP test or an IFUNC (stripped and unstripped copies of those); and
//! flotilla's own ARMv6 build. Every verdict must agree with what qemu does: a binary that runs on the model is
//! accepted, one that dies with SIGILL is refused.
//!
//! `tests/setup` lays the corpus out (it calls `tests/build-corpus`); flotilla's build comes from
//! `FLOTILLA_ARM_DIST` (`packaging/build armv6`). Missing pieces skip, or fail under `FLOTILLA_REQUIRE_ALL=1`.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use flotilla::elf::{self, BinaryRequirements, ElfRequirements, Evidence};

mod common;

use common::Flotilla;

/// SIGILL: what an instruction the CPU model lacks ends in.
const SIGILL: i32 = 4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-fixtures")
}

/// One program of the corpus and how to run it on its normal path.
struct Case {
    path: PathBuf,
    args: Vec<&'static str>,
    /// The unpacked Debian root with its loader and libraries, for dynamically linked programs.
    sysroot: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ran {
    Normally,
    Sigill,
}

fn corpus() -> Option<Vec<Case>> {
    let root = fixtures();
    let mut cases = Vec::new();
    let mut add = |path: PathBuf, args: &[&'static str], sysroot: Option<PathBuf>| {
        cases.push(Case {
            path,
            args: args.to_vec(),
            sysroot,
        })
    };
    let built = root.join("corpus");
    let mut names: Vec<String> = [
        "arm-unknown-linux-gnueabi",
        "arm-unknown-linux-gnueabihf",
        "armv7-unknown-linux-gnueabihf",
        "a7-as-v6",
    ]
    .iter()
    .map(|t| format!("ring-probe-{t}"))
    .collect();
    names.extend((5..=7).map(|goarm| format!("go-goarm{goarm}")));
    names.extend(
        ["c-v7-main-arm", "c-v7-main-thumb", "c-hwcap", "c-ifunc"]
            .iter()
            .map(|n| n.to_string()),
    );
    for name in names {
        for file in [name.clone(), format!("{name}.stripped")] {
            let path = built.join(&file);
            common::require(
                &format!("{} (run tests/setup or tests/build-corpus)", path.display()),
                path.is_file().then_some(()),
            )?;
            add(path, &[], None);
        }
    }
    for arch in ["armel", "armhf"] {
        add(common::required_busybox(arch)?, &["echo", "ok"], None);
        let sysroot = root.join("debian").join(arch);
        for (program, args) in [
            ("bin/dash", &["-c", "echo ok"][..]),
            ("usr/bin/hello", &[]),
            ("bin/ls", &["/"]),
        ] {
            let path = sysroot.join(program);
            common::require(
                &format!("Debian's {program} for {arch} (run tests/setup)"),
                path.is_file().then_some(()),
            )?;
            add(path, args, Some(sysroot.clone()));
        }
    }
    let dist = common::require(
        "FLOTILLA_ARM_DIST (the dist/ directory of `packaging/build armv6`)",
        std::env::var_os("FLOTILLA_ARM_DIST").map(PathBuf::from),
    )?;
    let armv6 = dist.join("flotilla-arm-unknown-linux-gnueabi");
    common::require(
        &format!("{} (run packaging/build armv6)", armv6.display()),
        armv6.is_file().then_some(()),
    )?;
    add(armv6, &["--version"], None);
    // The ARMv7 build is optional in dist/, as in tests/emulated.rs.
    let armv7 = dist.join("flotilla-armv7-unknown-linux-gnueabihf");
    if armv7.is_file() {
        add(armv7, &["--version"], None);
    }
    Some(cases)
}

fn qemu(qemu: &Path, cpu: &str, case: &Case) -> Ran {
    let mut command = Command::new(qemu);
    command.args(["-cpu", cpu]);
    if let Some(sysroot) = &case.sysroot {
        command.arg("-L").arg(sysroot);
    }
    let out = command
        .arg(&case.path)
        .args(&case.args)
        .env_clear()
        .output()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", qemu.display()));
    match (out.status.success(), out.status.signal()) {
        (true, _) => Ran::Normally,
        (false, Some(SIGILL)) => Ran::Sigill,
        _ => panic!(
            "{} on {cpu} neither ran nor died with SIGILL: {}\nstdout: {}\nstderr: {}",
            case.path.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

fn check_binary(platform: &str, path: &Path) -> Output {
    Flotilla::new()
        .args(["--platform", platform, "check-binary", "--json"])
        .arg(path)
        .output()
}

/// flotilla's verdict, from its exit status: 0 runs, 3 does not.
fn verdict(platform: &str, path: &Path) -> Ran {
    let out = check_binary(platform, path);
    match out.status.code() {
        Some(0) => Ran::Normally,
        Some(3) => Ran::Sigill,
        _ => panic!(
            "check-binary --platform {platform} {}: {}\n{}",
            path.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

fn requirements(path: &Path) -> ElfRequirements {
    match elf::inspect_file(path) {
        Ok(BinaryRequirements::Elf(req)) => *req,
        other => panic!("{}: expected an ELF binary, got {other:?}", path.display()),
    }
}

#[test]
fn every_verdict_agrees_with_qemu() {
    let (Some(qemu_arm), Some(cases)) = (common::required_tool("qemu-arm-static"), corpus()) else {
        return;
    };
    let mut table = Vec::new();
    let mut disagreements = Vec::new();
    for case in &cases {
        let on_v6 = qemu(&qemu_arm, "arm1176", case);
        let on_v7 = qemu(&qemu_arm, "cortex-a7", case);
        let said_v6 = verdict("linux/arm/v6", &case.path);
        let said_v7 = verdict("linux/arm/v7", &case.path);
        let req = requirements(&case.path);
        let row = format!(
            "{:<55} arm1176 {:<8?} cortex-a7 {:<8?} flotilla v6 {:<8?} v7 {:<8?} needs {} by {:?}",
            case.path
                .strip_prefix(fixtures())
                .unwrap_or(&case.path)
                .display(),
            on_v6,
            on_v7,
            said_v6,
            said_v7,
            req.platform.map(|p| p.to_string()).unwrap_or_default(),
            req.decided_by,
        );
        if on_v6 != said_v6 || on_v7 != said_v7 {
            disagreements.push(row.clone());
        }
        table.push(row);
    }
    eprintln!("{}", table.join("\n"));
    assert!(
        disagreements.is_empty(),
        "flotilla disagrees with qemu:\n{}",
        disagreements.join("\n")
    );
    // Both outcomes must occur, or agreement would prove nothing about the ARM1176 model or the verdicts.
    assert!(table.iter().any(|r| r.contains("arm1176 Sigill")));
    assert!(table.iter().any(|r| r.contains("arm1176 Normally")));
}

/// The corpus binary named `name`.
fn corpus_file(cases: &[Case], name: &str) -> PathBuf {
    cases
        .iter()
        .find(|c| c.path.file_name().is_some_and(|f| f == name))
        .map(|c| c.path.clone())
        .unwrap_or_else(|| panic!("{name} is not in the corpus"))
}

/// The ARMv6 ring program and the same program with its own code built for a Cortex-A7 (tests/build-corpus gives
/// it the ARMv6 build's `.ARM.attributes`): identical attributes, and only the first runs on an ARM1176. The
/// attributes cannot tell them apart; the code does, with mapping symbols and without.
#[test]
fn identical_attributes_are_told_apart_by_the_code() {
    let Some(cases) = corpus() else { return };
    let find = |name: &str| corpus_file(&cases, name);
    for suffix in ["", ".stripped"] {
        let v6 = requirements(&find(&format!(
            "ring-probe-arm-unknown-linux-gnueabi{suffix}"
        )));
        let a7 = requirements(&find(&format!("ring-probe-a7-as-v6{suffix}")));
        let attributes = |r: &ElfRequirements| r.arm.as_ref().and_then(|a| a.attributes.clone());
        assert!(attributes(&v6).is_some());
        assert_eq!(attributes(&v6), attributes(&a7), "{suffix}");
        assert_eq!(
            v6.platform.map(|p| p.to_string()).as_deref(),
            Some("linux/arm/v6")
        );
        assert_eq!(v6.decided_by, Some(Evidence::ReachableCode));
        assert_eq!(
            a7.platform.map(|p| p.to_string()).as_deref(),
            Some("linux/arm/v7")
        );
        assert_eq!(a7.decided_by, Some(Evidence::ReachableCode));
    }
}

/// Issue 19: three static armel programs whose attributes all say v7 (Thumb-2, NEON). Only the one that reaches its
/// ARMv7 routine through an AT_HWCAP test (or an IFUNC) runs on an ARM1176; the ARMv7 `main`s, in ARM and in Thumb
/// state, must be refused with and without their symbols, and the JSON must say which instruction and how the
/// walk got there.
#[test]
fn stripped_v7_mains_are_refused_and_hwcap_dispatch_accepted() {
    let Some(cases) = corpus() else { return };
    let path = |name: &str| corpus_file(&cases, name);
    for suffix in ["", ".stripped"] {
        for (name, needs) in [
            ("c-v7-main-arm", "linux/arm/v7"),
            ("c-v7-main-thumb", "linux/arm/v7"),
            ("c-hwcap", "linux/arm/v6"),
            ("c-ifunc", "linux/arm/v6"),
        ] {
            let file = path(&format!("{name}{suffix}"));
            let req = requirements(&file);
            assert_eq!(
                req.platform.map(|p| p.to_string()).as_deref(),
                Some(needs),
                "{name}{suffix}: {:?}",
                req.reasons
            );
            assert_eq!(
                req.decided_by,
                Some(Evidence::ReachableCode),
                "{name}{suffix}"
            );
            let out = check_binary("linux/arm/v6", &file);
            let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let code = &json["requirements"]["arm"]["code"];
            assert_eq!(json["requirements"]["decided_by"], "reachable code");
            assert!(code["functions"].as_u64().unwrap_or_default() > 0, "{code}");
            assert!(
                code["code_bytes"].as_u64().unwrap_or_default() > 0,
                "{code}"
            );
            if needs == "linux/arm/v7" {
                let first = &code["first_v7_reached"];
                let state = if name.ends_with("thumb") {
                    "thumb"
                } else {
                    "arm"
                };
                assert_eq!(first["state"], state, "{name}{suffix}: {first}");
                assert!(first["address"].as_u64().is_some(), "{first}");
                assert!(
                    first["path"].as_array().is_some_and(|p| !p.is_empty()),
                    "{first}"
                );
            } else {
                // The ARMv7 routine is reached, but only behind the check.
                assert!(
                    code["guarded_v7_instructions"].as_u64().unwrap_or_default() > 0,
                    "{code}"
                );
                assert!(code.get("first_v7_reached").is_none(), "{code}");
            }
        }
    }
}

/// `--json` names the evidence that decided: the code for ring's merged v7, Go's build info for Go, the
/// attributes for Debian's armel busybox (ARMv5TE, nothing newer in its code).
#[test]
fn json_names_the_deciding_evidence() {
    let Some(cases) = corpus() else { return };
    let decided = |suffix: &str| -> String {
        let case = cases
            .iter()
            .find(|c| c.path.ends_with(suffix))
            .unwrap_or_else(|| panic!("{suffix} is not in the corpus"));
        let out = check_binary("linux/arm/v6", &case.path);
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        json["requirements"]["decided_by"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(
        decided("ring-probe-arm-unknown-linux-gnueabi.stripped"),
        "reachable code"
    );
    assert_eq!(decided("go-goarm7.stripped"), "go build info");
    assert_eq!(decided("armel/busybox"), "attributes");
}
