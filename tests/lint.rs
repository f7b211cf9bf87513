//! `flotilla lint` end to end: multi-arch images built from Debian's busybox-static, pushed by skopeo to Debian's
//! docker-registry on loopback or read from an OCI layout, each entry proven against its own label.

mod common;

use std::path::Path;
use std::process::Output;

use common::output_text as text;
use common::registry::*;
use common::{Flotilla, json_of};
use serde_json::Value;

const EXIT_LINT_FAILED: i32 = 3;

/// Runs flotilla with an empty configuration, a state directory lint must leave alone, and its own `TMPDIR`
/// (`root/tmp`), which lint must leave empty.
fn flotilla(root: &Path, registry: &str, args: &[&str]) -> Output {
    std::fs::create_dir_all(root.join("tmp")).expect("tmp");
    Flotilla::new()
        .env("TMPDIR", root.join("tmp"))
        .empty_config(root.join("empty.toml"))
        .state(root.join("state"))
        .registry(registry)
        .args(args)
        .output()
}

/// The entry labelled `platform`, from `--json` output.
fn entry<'a>(report: &'a Value, platform: &str) -> &'a Value {
    report["entries"]
        .as_array()
        .and_then(|es| es.iter().find(|e| e["platform"] == platform))
        .unwrap_or_else(|| panic!("no entry {platform} in {report:#}"))
}

/// The table row for `platform`.
fn row<'a>(stdout: &'a str, platform: &str) -> &'a str {
    stdout
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{platform} ")))
        .unwrap_or_else(|| panic!("no row for {platform}:\n{stdout}"))
}

/// `flotilla ARGS` against the lab's registry.
fn lint(s: &Lab, args: &[&str]) -> Output {
    flotilla(&s.root, &s.registry.host(), args)
}

/// `<registry>/<repo>:v1`, where [`Lab::push`] puts an image.
fn pushed(s: &Lab, repo: &str) -> String {
    format!("{}/{repo}:v1", s.registry.host())
}

#[test]
fn a_v6_entry_holding_armv7_code_fails_and_names_both_sides() {
    let Some(s) = Lab::start() else { return };
    let written = s.push_with(
        "liar",
        &[
            busybox_image("amd64", None, "amd64"),
            busybox_image("arm", Some("v7"), "armhf"),
            // The lie: labelled v6, built for v7 (Debian's armhf busybox dies on an ARM1176).
            busybox_image("arm", Some("v6"), "armhf"),
        ],
        &[],
        None,
    );
    let out = lint(&s, &["lint", &pushed(&s, "liar")]);
    assert_eq!(out.status.code(), Some(EXIT_LINT_FAILED), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v6 = row(&stdout, "linux/arm/v6");
    assert!(
        v6.contains(" fail ")
            && v6.contains("/bin/busybox")
            && v6.contains("needs linux/arm/v7")
            && v6.contains("its label is linux/arm/v6"),
        "the failing row names the binary, what it needs and its label: {v6}"
    );
    assert!(row(&stdout, "linux/arm/v7").contains(" pass "), "{stdout}");
    assert!(row(&stdout, "linux/amd64").contains(" pass "), "{stdout}");
    assert!(stdout.contains("lint fail: 2 pass, 1 fail"), "{stdout}");
    assert!(
        !s.root.join("state").exists(),
        "lint writes nothing into the store"
    );
    assert_eq!(
        std::fs::read_dir(s.root.join("tmp"))
            .map(Iterator::count)
            .ok(),
        Some(0),
        "lint removes its scratch directory"
    );

    // Pinned by digest, the v6 manifest alone: its config's platform is the label it is held to.
    let v6 = &written.images[2];
    let pinned = format!("{}/liar@{}", s.registry.host(), v6.manifest);
    let out = lint(&s, &["lint", "--json", &pinned]);
    assert_eq!(out.status.code(), Some(EXIT_LINT_FAILED), "{}", text(&out));
    let report = json_of(&out);
    let single = entry(&report, "linux/arm/v6");
    assert_eq!(single["verdict"], "fail", "{single:#}");
    assert_eq!(single["digest"], v6.manifest.to_string());
    assert_eq!(report["entries"].as_array().map(Vec::len), Some(1));
}

#[test]
fn an_honest_oci_index_passes_and_its_attestation_is_skipped() {
    let Some(s) = Lab::start() else { return };
    let layout = OciLayoutBuilder::new(&s.root.join("layouts/honest"));
    let written = layout.write("v1", &busybox_images().expect("busybox"));
    let attestation = layout.add_attestation("v1", &written, &written.images[0]);
    skopeo_copy(
        layout.dir(),
        "v1",
        &s.registry.host(),
        "honest",
        "v1",
        None,
        None,
    );
    let out = lint(
        &s,
        &[
            "lint",
            "--json",
            "--require",
            "linux/amd64,linux/arm64,linux/arm/v6",
            &pushed(&s, "honest"),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let report = json_of(&out);
    assert_eq!(report["result"], "pass");
    assert_eq!(
        report["media_type"],
        "application/vnd.oci.image.index.v1+json"
    );
    assert_eq!(report["missing"], serde_json::json!([]));
    // Normalised as everywhere in flotilla: arm64 is arm64/v8.
    assert_eq!(
        report["required"],
        serde_json::json!(["linux/amd64", "linux/arm64/v8", "linux/arm/v6"])
    );
    for img in &written.images {
        let e = entry(&report, &img.platform);
        assert_eq!(e["verdict"], "pass", "{e:#}");
        assert_eq!(e["digest"], img.manifest.to_string());
        assert!(
            e["checked"][0]
                .as_str()
                .is_some_and(|c| c.starts_with("/bin/busybox needs linux/")),
            "{e:#}"
        );
    }
    // armel busybox is v5 code: honest under a v6 label.
    assert!(
        entry(&report, "linux/arm/v6")["reason"]
            .as_str()
            .is_some_and(|r| r.contains("needs linux/arm/v5") && r.contains("runs on linux/arm/v6")),
        "{report:#}"
    );
    let skipped = entry(&report, "unknown/unknown");
    assert_eq!(skipped["verdict"], "skipped");
    assert_eq!(skipped["digest"], attestation.to_string());
    assert!(
        skipped["reason"]
            .as_str()
            .is_some_and(|r| r.contains("attestation")),
        "{skipped:#}"
    );
    assert_eq!(report["entries"].as_array().map(Vec::len), Some(5));
}

#[test]
fn a_docker_v2s2_manifest_list_is_linted_like_an_oci_index() {
    let Some(s) = Lab::start() else { return };
    let written = s.push_with(
        "docker",
        &busybox_images().expect("busybox"),
        &[],
        Some("v2s2"),
    );
    let out = lint(&s, &["lint", "--json", &pushed(&s, "docker")]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let report = json_of(&out);
    assert_eq!(
        report["media_type"],
        "application/vnd.docker.distribution.manifest.list.v2+json"
    );
    for img in &written.images {
        assert_eq!(
            entry(&report, &img.platform)["verdict"],
            "pass",
            "{report:#}"
        );
    }
}

#[test]
fn require_names_the_platforms_the_index_lacks() {
    let Some(s) = Lab::start() else { return };
    s.push_with(
        "partial",
        &[
            busybox_image("amd64", None, "amd64"),
            busybox_image("arm64", Some("v8"), "arm64"),
        ],
        &[],
        None,
    );
    let reference = pushed(&s, "partial");
    let out = lint(
        &s,
        &[
            "lint",
            "--require",
            "linux/amd64,linux/arm64,linux/arm/v6",
            &reference,
        ],
    );
    assert_eq!(out.status.code(), Some(EXIT_LINT_FAILED), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("required platforms missing: linux/arm/v6\n"),
        "{stdout}"
    );

    let out = lint(
        &s,
        &[
            "lint",
            "--json",
            "--require",
            "linux/arm/v6,linux/riscv64,linux/arm64/v8",
            &reference,
        ],
    );
    assert_eq!(out.status.code(), Some(EXIT_LINT_FAILED), "{}", text(&out));
    let report = json_of(&out);
    assert_eq!(report["result"], "fail");
    assert_eq!(
        report["missing"],
        serde_json::json!(["linux/arm/v6", "linux/riscv64"])
    );

    let out = lint(&s, &["lint", "--require", "linux//arm", &reference]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--require"),
        "{}",
        text(&out)
    );
}

#[test]
fn an_oci_layout_is_a_source_and_arm64_code_under_amd64_fails() {
    if registry_prerequisites().is_none() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let layout = OciLayoutBuilder::new(&dir.path().join("usb"));
    layout.write(
        "app",
        &[
            busybox_image("amd64", None, "arm64"),
            busybox_image("arm64", Some("v8"), "arm64"),
        ],
    );
    let source = format!("oci:{}:app", layout.dir().display());
    let out = flotilla(dir.path(), "unused", &["lint", "--json", &source]);
    assert_eq!(out.status.code(), Some(EXIT_LINT_FAILED), "{}", text(&out));
    let report = json_of(&out);
    let amd64 = entry(&report, "linux/amd64");
    assert_eq!(amd64["verdict"], "fail", "{amd64:#}");
    assert!(
        amd64["reason"].as_str().is_some_and(
            |r| r.contains("needs linux/arm64") && r.contains("its label is linux/amd64")
        ),
        "{amd64:#}"
    );
    assert_eq!(entry(&report, "linux/arm64/v8")["verdict"], "pass");
    assert!(!dir.path().join("state").exists());
}

#[test]
fn all_binaries_finds_a_wrong_binary_that_is_not_the_entrypoint() {
    let Some(s) = Lab::start() else { return };
    let stowaway = busybox("arm64").expect("busybox checked by registry_prerequisites");
    s.push_with(
        "stowaway",
        &[
            busybox_image("amd64", None, "amd64"),
            busybox_image("arm", Some("v6"), "armel"),
        ],
        &[vec![("usr/libexec/helper", stowaway)]],
        None,
    );
    let reference = pushed(&s, "stowaway");
    let out = lint(&s, &["lint", &reference]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "the entrypoint alone is right: {}",
        text(&out)
    );

    let out = lint(&s, &["lint", "--all-binaries", "--json", &reference]);
    assert_eq!(out.status.code(), Some(EXIT_LINT_FAILED), "{}", text(&out));
    let report = json_of(&out);
    let amd64 = entry(&report, "linux/amd64");
    assert_eq!(amd64["verdict"], "fail", "{amd64:#}");
    assert_eq!(amd64["binaries_checked"], 2);
    let wrong = amd64["wrong_binaries"].as_array().expect("wrong_binaries");
    assert_eq!(wrong.len(), 1, "{amd64:#}");
    assert!(
        wrong[0]
            .as_str()
            .is_some_and(|w| w.starts_with("/usr/libexec/helper: needs linux/arm64")),
        "{amd64:#}"
    );
    let v6 = entry(&report, "linux/arm/v6");
    assert_eq!(v6["verdict"], "pass", "{v6:#}");
    assert_eq!(v6["binaries_checked"], 1);
}

#[test]
fn an_entry_that_cannot_be_fetched_is_an_error_and_exits_1() {
    let Some(s) = Lab::start() else { return };
    let written = s.push_with(
        "broken",
        &[
            busybox_image("amd64", None, "amd64"),
            busybox_image("arm64", Some("v8"), "arm64"),
        ],
        &[],
        None,
    );
    let arm64 = &written.images[1];
    let data = s.registry.blob_data_path(&arm64.layer);
    let mut bytes = std::fs::read(&data).expect("blob in registry storage");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&data, bytes).expect("corrupt");

    let out = lint(&s, &["lint", "--json", &pushed(&s, "broken")]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let report = json_of(&out);
    assert_eq!(report["result"], "error");
    let e = entry(&report, &arm64.platform);
    assert_eq!(e["verdict"], "error", "{e:#}");
    assert!(
        e["reason"]
            .as_str()
            .is_some_and(|r| r.contains("digest mismatch")),
        "{e:#}"
    );
    assert_eq!(entry(&report, "linux/amd64")["verdict"], "pass");
}

#[test]
fn only_the_layers_the_proof_reads_are_fetched_and_all_binaries_reads_the_rest() {
    let Some(s) = Lab::start() else { return };
    let layout = OciLayoutBuilder::new(&s.root.join("layouts/lazy"));
    // The base holds ARMv7 code the entrypoint never uses: invisible to the proof, wrong under a v6 label.
    let armhf = busybox("armhf").expect("busybox checked by registry_prerequisites");
    let (_, base) = layout.write_on_base(
        "v1",
        &[busybox_image("arm", Some("v6"), "armel")],
        &[("usr/lib/armhf-helper", armhf)],
        &[],
    );
    skopeo_copy(
        layout.dir(),
        "v1",
        &s.registry.host(),
        "lazy",
        "v1",
        None,
        None,
    );
    let base_fetches = || {
        s.registry
            .log_text()
            .lines()
            .filter(|l| l.contains("GET /v2/lazy/blobs/") && l.contains(base.hex()))
            .count()
    };
    let before = base_fetches();

    let out = lint(&s, &["lint", &pushed(&s, "lazy")]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(
        base_fetches(),
        before,
        "the entrypoint is in the top layer: the base is not fetched"
    );

    let out = lint(
        &s,
        &["lint", "--all-binaries", "--json", &pushed(&s, "lazy")],
    );
    assert_eq!(out.status.code(), Some(EXIT_LINT_FAILED), "{}", text(&out));
    assert!(base_fetches() > before, "--all-binaries reads every layer");
    let v6 = entry(&json_of(&out), "linux/arm/v6").clone();
    assert_eq!(v6["binaries_checked"], 2, "{v6:#}");
    assert!(
        v6["wrong_binaries"][0]
            .as_str()
            .is_some_and(|w| w.starts_with("/usr/lib/armhf-helper: needs linux/arm/v7")),
        "{v6:#}"
    );
}

#[test]
fn all_binaries_skips_what_an_upper_layer_deleted() {
    if registry_prerequisites().is_none() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let layout = OciLayoutBuilder::new(&dir.path().join("layout"));
    let armhf = busybox("armhf").expect("busybox checked by registry_prerequisites");
    // The top layer's whiteout deletes the base's ARMv7 binary: it is not in the image the container sees.
    let marker = dir.path().join("whiteout");
    std::fs::write(&marker, b"").expect("whiteout marker");
    layout.write_on_base(
        "v1",
        &[busybox_image("arm", Some("v6"), "armel")],
        &[("usr/lib/armhf-helper", armhf)],
        &[vec![("usr/lib/.wh.armhf-helper", marker)]],
    );
    let source = format!("oci:{}:v1", layout.dir().display());
    let out = flotilla(
        dir.path(),
        "unused",
        &["lint", "--all-binaries", "--json", &source],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v6 = entry(&json_of(&out), "linux/arm/v6").clone();
    assert_eq!(v6["verdict"], "pass", "{v6:#}");
    assert_eq!(v6["binaries_checked"], 1, "{v6:#}");
    assert!(
        v6["reason"].as_str().is_some_and(
            |r| r.ends_with("so does every ELF executable and shared object (1 checked)")
        ),
        "{v6:#}"
    );
}
