//! Evidence as qemu-user gives it to an emulated process, replayed through `flotilla platform --evidence`.
//!
//! Under qemu-user, `uname -m` and the auxiliary vector follow the emulated CPU while /proc/cpuinfo is the host's
//! (x86 here). Each test captures what an emulated busybox sees (`uname -m`, the binary /proc/self/auxv that qemu
//! synthesises, /proc/cpuinfo), writes it as an evidence directory, and checks that detection discards the foreign
//! cpuinfo and answers for the emulated CPU.
//!
//! Needs qemu-user-static on PATH and the busybox-static fixtures from `tests/setup` (`armel/busybox`,
//! `armhf/busybox`, `arm64/busybox`); missing pieces skip the test, or fail it when `FLOTILLA_REQUIRE_ALL=1`.

use std::path::{Path, PathBuf};
use std::process::Command;

use flotilla::platform::evidence::Auxv;
use serde_json::Value;

mod common;

use common::{Flotilla, require, tool};

struct Emulated {
    qemu: PathBuf,
    cpu: Option<&'static str>,
    busybox: PathBuf,
}

impl Emulated {
    fn run(&self, args: &[&str]) -> Vec<u8> {
        let mut cmd = Command::new(&self.qemu);
        if let Some(cpu) = self.cpu {
            cmd.args(["-cpu", cpu]);
        }
        let out = cmd
            .arg(&self.busybox)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", self.qemu.display()));
        assert!(
            out.status.success(),
            "{} {:?} {args:?}: {}",
            self.qemu.display(),
            self.cpu,
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// Writes what the emulated process sees as an evidence directory.
    fn capture(&self, dir: &Path, word_bytes: usize) {
        let uname = self.run(&["uname", "-m"]);
        let auxv = Auxv::parse_raw(&self.run(&["cat", "/proc/self/auxv"]), word_bytes)
            .expect("qemu's /proc/self/auxv parses");
        let cpuinfo = self.run(&["cat", "/proc/cpuinfo"]);
        std::fs::write(dir.join("uname-m"), uname).expect("write uname-m");
        std::fs::write(dir.join("auxv"), auxv.to_text()).expect("write auxv");
        std::fs::write(dir.join("cpuinfo"), cpuinfo).expect("write cpuinfo");
        std::fs::write(
            dir.join("SOURCE"),
            format!(
                "tests/emulated_detection.rs: {} -cpu {} {}\n",
                self.qemu.display(),
                self.cpu.unwrap_or("(default)"),
                self.busybox.display()
            ),
        )
        .expect("write SOURCE");
    }
}

fn check(
    qemu: &str,
    cpu: Option<&'static str>,
    busybox_arch: &str,
    word_bytes: usize,
    expected: &[&str],
) {
    let Some(qemu) = require(qemu, tool(qemu)) else {
        return;
    };
    let Some(busybox) = common::required_busybox(busybox_arch) else {
        return;
    };
    let emulated = Emulated { qemu, cpu, busybox };
    let tmp = tempfile::tempdir().expect("temp dir");
    emulated.capture(tmp.path(), word_bytes);

    let json = Flotilla::new()
        .args(["platform", "--json", "--evidence"])
        .arg(tmp.path())
        .json();
    let got: Vec<&str> = json["candidates"]
        .as_array()
        .expect("candidates")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(got, expected, "{json:#}");

    let host_cpuinfo = std::fs::read_to_string(tmp.path().join("cpuinfo")).unwrap_or_default();
    if host_cpuinfo.contains("vendor_id") {
        let rules = json["rules"].to_string();
        assert!(rules.contains("cpuinfo discarded as foreign"), "{rules}");
    }
}

#[test]
fn arm1176_under_qemu_is_armv6() {
    check(
        "qemu-arm-static",
        Some("arm1176"),
        "armel",
        4,
        &["linux/arm/v6", "linux/arm/v5"],
    );
}

#[test]
fn cortex_a7_under_qemu_is_armv7() {
    check(
        "qemu-arm-static",
        Some("cortex-a7"),
        "armhf",
        4,
        &["linux/arm/v7", "linux/arm/v6", "linux/arm/v5"],
    );
}

#[test]
fn aarch64_under_qemu_is_arm64_without_unproven_arm32() {
    // The host's cpuinfo is foreign, so no CPU part can prove AArch32: only arm64 is offered.
    check("qemu-aarch64-static", None, "arm64", 8, &["linux/arm64/v8"]);
}
