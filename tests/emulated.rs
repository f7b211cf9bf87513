//! The ARM builds on emulated Raspberry Pi CPUs: qemu-user runs the static binaries from `packaging/build` with a
//! chosen CPU model (uname and HWCAP follow the model; /proc/cpuinfo stays the host's, and detection must not be
//! fooled by it).
//!
//! The binaries are found through `FLOTILLA_ARM_DIST`, a directory holding `flotilla-<target triple>` as
//! `packaging/build aarch64 armv6` leaves them in `dist/`. `flotilla-armv7-unknown-linux-gnueabihf` is optional
//! (CI does not build it); its cases run when it is there.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

mod common;

use common::Flotilla;

const ARMV6: &str = "arm-unknown-linux-gnueabi";
const ARMV7: &str = "armv7-unknown-linux-gnueabihf";
const AARCH64: &str = "aarch64-unknown-linux-gnu";

/// One emulated board: the qemu-user binary, its CPU model and the build it runs.
struct Device {
    name: &'static str,
    qemu: &'static str,
    cpu: &'static str,
    target: &'static str,
}

const PI_ZERO: Device = Device {
    name: "Pi Zero / Pi 1 (ARM1176)",
    qemu: "qemu-arm-static",
    cpu: "arm1176",
    target: ARMV6,
};
const PI_2_ARMV6_BUILD: Device = Device {
    name: "Pi 2 (Cortex-A7) running the ARMv6 build",
    qemu: "qemu-arm-static",
    cpu: "cortex-a7",
    target: ARMV6,
};
const PI_2_ARMV7_BUILD: Device = Device {
    name: "Pi 2 (Cortex-A7) running the ARMv7 build",
    qemu: "qemu-arm-static",
    cpu: "cortex-a7",
    target: ARMV7,
};
const PI_3: Device = Device {
    name: "Pi 3 (Cortex-A53)",
    qemu: "qemu-aarch64-static",
    cpu: "cortex-a53",
    target: AARCH64,
};
const PI_4: Device = Device {
    name: "Pi 4 (Cortex-A72)",
    qemu: "qemu-aarch64-static",
    cpu: "cortex-a72",
    target: AARCH64,
};

/// Skips, or fails under `FLOTILLA_REQUIRE_ALL=1`, naming what is missing.
fn unavailable(what: &str) {
    common::require::<()>(what, None);
}

fn have_tool(tool: &str) -> bool {
    common::tool(tool).is_some()
}

/// The dist directory with the required ARMv6 and aarch64 builds, and the qemu-user binaries; `None` after
/// reporting what is missing.
fn setup() -> Option<PathBuf> {
    let Some(dist) = std::env::var_os("FLOTILLA_ARM_DIST").map(PathBuf::from) else {
        unavailable(
            "FLOTILLA_ARM_DIST is not set: run `packaging/build aarch64 armv6` and set it to the dist/ directory",
        );
        return None;
    };
    for target in [ARMV6, AARCH64] {
        let bin = binary(&dist, target);
        if !bin.is_file() {
            unavailable(&format!(
                "{} missing: run `packaging/build aarch64 armv6`",
                bin.display()
            ));
            return None;
        }
    }
    for tool in ["qemu-arm-static", "qemu-aarch64-static"] {
        if !have_tool(tool) {
            unavailable(&format!(
                "{tool} not installed (Debian package qemu-user-static)"
            ));
            return None;
        }
    }
    Some(dist)
}

fn binary(dist: &Path, target: &str) -> PathBuf {
    dist.join(format!("flotilla-{target}"))
}

/// The devices whose build is in `dist`: the ARMv7 build is optional.
fn devices(dist: &Path) -> Vec<&'static Device> {
    [&PI_ZERO, &PI_2_ARMV6_BUILD, &PI_2_ARMV7_BUILD, &PI_3, &PI_4]
        .into_iter()
        .filter(|d| d.target != ARMV7 || binary(dist, ARMV7).is_file())
        .collect()
}

/// Runs the device's build under its CPU model, isolated from the host's configuration and state.
fn emulate(dist: &Path, device: &Device, args: &[&str]) -> Output {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("config.toml");
    std::fs::write(&config, "").unwrap();
    Command::new(device.qemu)
        .args(["-cpu", device.cpu])
        .arg(binary(dist, device.target))
        .args(args)
        .env("FLOTILLA_CONFIG", &config)
        .arg("--state-dir")
        .arg(tmp.path().join("state"))
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{}: cannot start {}: {e}", device.name, device.qemu))
}

fn describe(device: &Device, out: &Output) -> String {
    format!(
        "{} ({} -cpu {}, {}): {}\nstdout: {}\nstderr: {}",
        device.name,
        device.qemu,
        device.cpu,
        device.target,
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn version_runs_on_every_emulated_pi_and_names_its_target() {
    let Some(dist) = setup() else { return };
    for device in devices(&dist) {
        let out = emulate(&dist, device, &["--version"]);
        let context = describe(device, &out);
        assert!(out.status.success(), "{context}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout.trim_end();
        assert!(
            line.starts_with(&format!("flotilla {} (", env!("CARGO_PKG_VERSION"))),
            "{context}"
        );
        assert!(
            line.ends_with(&format!(", {})", device.target)),
            "{context}"
        );
    }
}

#[test]
fn platform_on_every_emulated_pi_puts_its_own_platform_first() {
    let Some(dist) = setup() else { return };
    for device in devices(&dist) {
        let expected = match device.cpu {
            "arm1176" => "linux/arm/v6",
            "cortex-a7" => "linux/arm/v7",
            _ => "linux/arm64/v8",
        };
        let out = emulate(&dist, device, &["platform"]);
        let context = describe(device, &out);
        assert!(out.status.success(), "{context}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(stdout.lines().next(), Some(expected), "{context}");
    }
}

/// The ARMv6 build must use the soft-float calling convention, must not have been linked against Debian's
/// armhf C library (whose ARMv7 start-up code would die on an ARM1176; the emulated runs above prove that part),
/// and flotilla's own check must accept it for linux/arm/v6.
///
/// Its `Tag_CPU_arch` says v7: the linker records the newest architecture of any object, and ring's assembly
/// objects carry NEON routines that ring selects at run time only on CPUs with NEON. check-binary judges the
/// code, which has no ARMv7 encodings outside those routines; the TLS pull on the ARM1176 model above proves they
/// are never entered there.
#[test]
fn armv6_build_is_soft_float_and_not_linked_against_armhf_libc() {
    let Some(dist) = setup() else { return };
    if !have_tool("readelf") {
        return unavailable("readelf not installed (Debian package binutils)");
    }
    let bin = binary(&dist, ARMV6);
    let out = Command::new("readelf")
        .args(["-A", "-h", "-l"])
        .arg(&bin)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "readelf {}: {}",
        bin.display(),
        out.status
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains("Tag_ABI_VFP_args: VFP registers") && text.contains("soft-float ABI"),
        "{}: not a soft-float build\n{text}",
        bin.display()
    );
    assert!(
        !text.contains("Requesting program interpreter"),
        "{}: not static\n{text}",
        bin.display()
    );

    let check = Flotilla::new()
        .args(["--platform", "linux/arm/v6", "check-binary"])
        .arg(&bin)
        .output();
    assert!(
        check.status.success(),
        "flotilla --platform linux/arm/v6 check-binary {}: {}\n{}{}",
        bin.display(),
        check.status,
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
}

/// The ARMv7 build must not start on an ARM1176; if it did, the CPU model would not be enforced and the ARMv6
/// cases above would prove nothing.
#[test]
fn armv7_build_is_refused_by_the_arm1176_model() {
    let Some(dist) = setup() else { return };
    if !binary(&dist, ARMV7).is_file() {
        eprintln!(
            "skipped: the optional ARMv7 build is not in {}",
            dist.display()
        );
        return;
    }
    let device = Device {
        name: "Pi Zero (ARM1176) running the ARMv7 build",
        target: ARMV7,
        ..PI_ZERO
    };
    let out = emulate(&dist, &device, &["--version"]);
    assert!(!out.status.success(), "{}", describe(&device, &out));
}

/// Extracts `/bin/busybox` from the image flotilla stored under `state`, by following its `index.json` to the
/// manifest and the manifest to its one layer, as a runtime would.
fn stored_busybox(state: &Path, dest: &Path) -> PathBuf {
    let images = state.join("images");
    let read_json = |digest: &str| -> serde_json::Value {
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        let bytes = std::fs::read(images.join("blobs/sha256").join(hex)).expect("blob");
        serde_json::from_slice(&bytes).expect("json blob")
    };
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(images.join("index.json")).expect("index.json"))
            .expect("index json");
    let manifest = read_json(index["manifests"][0]["digest"].as_str().expect("digest"));
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .expect("layer digest");
    let blob = std::fs::File::open(images.join("blobs/sha256").join(&layer[7..])).expect("layer");
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(blob));
    for entry in archive.entries().expect("tar") {
        let mut entry = entry.expect("tar entry");
        if entry.path().expect("path").to_str() == Some("bin/busybox") {
            let out = dest.join("busybox");
            entry.unpack(&out).expect("unpack busybox");
            return out;
        }
    }
    panic!("no bin/busybox in the stored image");
}

/// Each emulated Pi pulls over TLS from a loopback registry named `localhost`, takes the variant its CPU runs (refusing an `arm/v6`
/// entry whose binaries are ARMv7), and the binary it took then runs on that same CPU model. TLS matters here: ring
/// carries NEON code for ARMv7 beside its ARMv4 code and picks one at run time, so only a handshake on the ARM1176
/// model proves the ARMv6 build never takes the ARMv7 path there.
#[test]
fn each_emulated_pi_pulls_the_variant_it_runs_and_that_binary_runs_there() {
    let Some(dist) = setup() else { return };
    if common::registry::registry_prerequisites().is_none() {
        return;
    }
    use common::registry::{
        LayoutImage, OciLayoutBuilder, Registry, RegistryOptions, TestCa, busybox, skopeo_copy,
    };
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::generate(tmp.path());
    let registry = Registry::start(
        &tmp.path().join("registry"),
        RegistryOptions {
            tls: Some(&ca),
            users: Vec::new(),
        },
    );
    let config = tmp.path().join("config.toml");
    std::fs::write(
        &config,
        format!("ca_bundle = \"{}\"\n", ca.ca_pem.display()),
    )
    .unwrap();
    let image = |architecture, variant, arch: &str| LayoutImage {
        os: "linux",
        architecture,
        variant,
        busybox: busybox(arch).expect("checked by registry_prerequisites"),
    };
    let layout = OciLayoutBuilder::new(&tmp.path().join("layout"));
    let written = layout.write(
        "v1",
        &[
            image("arm64", Some("v8"), "arm64"),
            image("arm", Some("v7"), "armhf"),
            // The lie a Pi Zero must catch: labelled v6, built for v7.
            image("arm", Some("v6"), "armhf"),
            image("arm", Some("v5"), "armel"),
        ],
    );
    let host = registry.host();
    skopeo_copy(layout.dir(), "v1", &host, "fleet/app", "v1", None, None);
    // By name, not by IP literal: the static builds resolve names from /etc/hosts and resolv.conf without NSS,
    // which could not load the host's (x86-64) NSS modules into an emulated ARM process anyway.
    let reference = format!("{}/fleet/app:v1", registry.localhost());

    for (device, expected, taken) in [
        (&PI_ZERO, "linux/arm/v5", 3),
        (&PI_2_ARMV6_BUILD, "linux/arm/v7", 1),
        (&PI_3, "linux/arm64/v8", 0),
    ] {
        let state = tmp.path().join(format!("state-{}", device.cpu));
        let out = Command::new(device.qemu)
            .args(["-cpu", device.cpu])
            .arg(binary(&dist, device.target))
            .arg("--config")
            .arg(&config)
            .arg("--state-dir")
            .arg(&state)
            .args(["pull", "--json", &reference])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let context = describe(device, &out);
        assert!(out.status.success(), "{context}");
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json report");
        assert_eq!(report["platform"], expected, "{context}");
        assert_eq!(
            report["manifest_digest"],
            written.images[taken].manifest.to_string(),
            "{context}"
        );
        if device.cpu == "arm1176" {
            let refused = report["refused"].to_string();
            assert!(
                refused.contains(&written.images[2].manifest.to_string()),
                "the lying v6 entry must be refused on a Pi Zero: {context}"
            );
        }

        let extracted = tempfile::tempdir().unwrap();
        let pulled = stored_busybox(&state, extracted.path());
        let run = Command::new(device.qemu)
            .args(["-cpu", device.cpu])
            .arg(&pulled)
            .args(["echo", "pulled-and-ran"])
            .output()
            .unwrap();
        assert!(
            run.status.success() && String::from_utf8_lossy(&run.stdout).contains("pulled-and-ran"),
            "{}: the pulled busybox must run on the CPU it was chosen for: {run:?}",
            device.name
        );
    }

    // The choice was right, not lucky: the refused v6-labelled binary dies on the Pi Zero's CPU.
    let lying = busybox("armhf").expect("armhf busybox");
    let run = Command::new("qemu-arm-static")
        .args(["-cpu", "arm1176"])
        .arg(&lying)
        .args(["echo", "should-not-run"])
        .output()
        .unwrap();
    assert!(
        !run.status.success(),
        "armhf busybox ran on arm1176: {run:?}"
    );
}

/// Issue 15: containers get the default seccomp profile when emulated too, and it has what qemu-user asks of the
/// host kernel (qemu runs inside the container and makes host syscalls for the ARM program). An armhf and an
/// armel busybox run a shell, a pipe, a file, a sleep and a child process under qemu through binfmt; the bundle
/// carries the filter, and a syscall outside it is refused to the ARM program as on the host.
#[test]
fn armhf_and_armel_containers_run_under_qemu_with_the_seccomp_profile_on() {
    use common::binfmt::Binfmt;
    use common::registry::{OciLayoutBuilder, busybox_images};

    let root = rustix::process::geteuid().is_root().then_some(());
    if common::require("root (runc needs it)", root).is_none()
        || common::required_tool("runc").is_none()
        || common::require("busybox-static fixtures (tests/setup)", busybox_images()).is_none()
    {
        return;
    }
    let Some(binfmt) = common::require("binfmt_misc and qemu-user-static", Binfmt::take()) else {
        return;
    };
    binfmt.register_all();
    let tmp = tempfile::tempdir().unwrap();
    let layout = OciLayoutBuilder::new(&tmp.path().join("layout"));
    layout.write("v1", &busybox_images().expect("checked"));
    let image = format!("oci:{}:v1", layout.dir().display());
    let state = tmp.path().join("state");
    let probe = "busybox uname -m; echo data > /run/f && busybox cat /run/f | busybox wc -c; \
                 busybox sleep 0.1; (echo child) & wait; busybox unshare -U true; echo unshare=$?";
    for (platform, name) in [("linux/arm/v7", "armhf"), ("linux/arm/v6", "armel")] {
        let out = Flotilla::new()
            .state(&state)
            .args(["--platform", platform, "run", &image, "--name", name])
            .args(["--allow-emulation", "--", "-c", probe])
            .output();
        let text = common::output_text(&out);
        let config = std::fs::read_to_string(
            state
                .join("containers")
                .join(name)
                .join("bundle/config.json"),
        )
        .unwrap_or_default();
        let _ = Flotilla::new()
            .state(&state)
            .args(["rm", "--force", name])
            .output();
        assert_eq!(out.status.code(), Some(0), "{name}: {text}");
        assert!(text.contains("armv"), "{name}: {text}");
        assert!(
            text.contains("\n5\n") && text.contains("child"),
            "{name}: {text}"
        );
        assert!(
            text.contains("unshare=1"),
            "{name}: the filter was not there: {text}"
        );
        let spec: serde_json::Value =
            serde_json::from_str(&config).expect("the bundle's config.json");
        assert_eq!(
            spec["linux"]["seccomp"]["defaultAction"], "SCMP_ACT_ERRNO",
            "{name}"
        );
    }
    drop(binfmt);
}
