//! `flotilla pull` end to end against Debian's docker-registry on loopback, with multi-arch images built from
//! Debian's busybox-static and pushed by skopeo.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::output_text as text;
use common::registry::*;
use common::{Flotilla, json_of};
use flotilla::digest::Digest;
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::{EncodePublicKey, LineEnding};
use serde_json::{Value, json};

/// Runs flotilla with an empty configuration, so the machine's /etc/flotilla/config.toml plays no part.
fn flotilla(state: &Path, registry: &str, args: &[&str]) -> Output {
    Flotilla::new()
        .empty_config(state.with_extension("toml"))
        .state(state)
        .registry(registry)
        .args(args)
        .output()
}

fn stored_refs(state: &Path) -> Vec<String> {
    let Ok(bytes) = std::fs::read(state.join("images/index.json")) else {
        return Vec::new();
    };
    let index: Value = serde_json::from_slice(&bytes).expect("index.json");
    index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["annotations"]["org.opencontainers.image.ref.name"].as_str())
        .map(str::to_string)
        .collect()
}

#[test]
fn each_platform_gets_its_own_variant_oci_and_docker_formats() {
    let Some(s) = Lab::start() else { return };
    let layout = OciLayoutBuilder::new(&s.root.join("layout"));
    let written = layout.write("v1", &busybox_images().expect("busybox"));
    let host = s.registry.host();
    skopeo_copy(layout.dir(), "v1", &host, "multi", "oci", None, None);
    skopeo_copy(
        layout.dir(),
        "v1",
        &host,
        "multi",
        "docker",
        Some("v2s2"),
        None,
    );

    for (tag, format) in [("oci", "OCI index"), ("docker", "Docker manifest list")] {
        for (platform, expected) in [
            ("linux/arm/v6", "linux/arm/v6"),
            ("linux/arm/v7", "linux/arm/v7"),
            ("linux/arm64/v8", "linux/arm64/v8"),
            ("linux/amd64", "linux/amd64"),
        ] {
            let state = s
                .root
                .join(format!("state-{tag}-{}", platform.replace('/', "-")));
            let reference = format!("{host}/multi:{tag}");
            let out = flotilla(
                &state,
                &host,
                &["--platform", platform, "pull", "--json", &reference],
            );
            let report = json_of(&out);
            assert_eq!(report["platform"], expected, "{format}: {}", text(&out));
            if tag == "oci" {
                let want = written
                    .images
                    .iter()
                    .find(|i| i.platform == expected)
                    .expect("written image");
                assert_eq!(report["manifest_digest"], want.manifest.to_string());
                assert_eq!(report["index_digest"], written.index.to_string());
            }
            assert_eq!(stored_refs(&state), vec![reference.clone()]);
        }
    }

    // Without --platform this x86-64 host detects amd64 and takes that variant.
    let state = s.root.join("state-detected");
    let out = flotilla(
        &state,
        &host,
        &["pull", "--json", &format!("{host}/multi:oci")],
    );
    assert_eq!(json_of(&out)["platform"], "linux/amd64");
}

#[test]
fn a_platform_the_index_lacks_fails_and_lists_what_exists() {
    let Some(s) = Lab::start() else { return };
    s.push(
        "nov6",
        &[
            busybox_image("amd64", None, "amd64"),
            busybox_image("arm64", Some("v8"), "arm64"),
            busybox_image("arm", Some("v7"), "armhf"),
        ],
    );
    let host = s.registry.host();
    let state = s.root.join("state");
    let out = flotilla(
        &state,
        &host,
        &[
            "--platform",
            "linux/arm/v6",
            "pull",
            &format!("{host}/nov6:v1"),
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    for offered in ["linux/amd64", "linux/arm64/v8", "linux/arm/v7"] {
        assert!(err.contains(offered), "error should list {offered}: {err}");
    }
    assert!(stored_refs(&state).is_empty());
}

#[test]
fn a_mislabelled_v6_entry_holding_armhf_binaries_is_refused_for_v6() {
    let Some(s) = Lab::start() else { return };
    s.push(
        "liar",
        &[
            busybox_image("arm", Some("v7"), "armhf"),
            // The lie: labelled v6, built for v7.
            busybox_image("arm", Some("v6"), "armhf"),
        ],
    );
    let host = s.registry.host();
    let state = s.root.join("state");
    let out = flotilla(
        &state,
        &host,
        &[
            "--platform",
            "linux/arm/v6",
            "pull",
            &format!("{host}/liar:v1"),
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/bin/busybox") && err.contains("linux/arm/v7"),
        "the refusal names the binary and what it needs: {err}"
    );
    assert!(
        stored_refs(&state).is_empty(),
        "a refused pull leaves no reference"
    );

    // The same index for a v7 device is fine: the v7 entry is taken.
    let out = flotilla(
        &state,
        &host,
        &[
            "--platform",
            "linux/arm/v7",
            "pull",
            "--json",
            &format!("{host}/liar:v1"),
        ],
    );
    assert_eq!(json_of(&out)["platform"], "linux/arm/v7");
}

#[test]
fn a_blob_corrupted_in_the_registry_is_refused_and_nothing_is_stored() {
    let Some(s) = Lab::start() else { return };
    let written = s.push("corrupt", &[busybox_image("amd64", None, "amd64")]);
    let host = s.registry.host();
    let layer = &written.images[0].layer;
    let data = s.registry.blob_data_path(layer);
    let mut bytes = std::fs::read(&data).expect("blob in registry storage");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&data, bytes).expect("corrupt");

    let state = s.root.join("state");
    let out = flotilla(
        &state,
        &host,
        &[
            "--platform",
            "linux/amd64",
            "pull",
            &format!("{host}/corrupt:v1"),
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("digest mismatch"),
        "{}",
        text(&out)
    );
    assert!(stored_refs(&state).is_empty());
    assert!(
        !state.join("images/blobs/sha256").join(layer.hex()).exists(),
        "the bad layer must not be in the store"
    );
}

/// Regression (commit cadcb64): a layer resumed from a partial file left by an interrupted pull is reported as
/// the bytes that really crossed the network, not the whole layer.
#[test]
fn a_resumed_layer_reports_only_the_bytes_it_transferred() {
    let Some(s) = Lab::start() else { return };
    let written = s.push("resume", &[busybox_image("amd64", None, "amd64")]);
    let host = s.registry.host();
    let layer = &written.images[0].layer;
    let whole = std::fs::read(s.registry.blob_data_path(layer)).expect("blob in registry storage");
    let kept = whole.len() / 3;

    let state = s.root.join("state");
    let partial_dir = state.join("partial");
    std::fs::create_dir_all(&partial_dir).unwrap();
    std::fs::write(
        partial_dir.join(format!("sha256-{}", layer.hex())),
        &whole[..kept],
    )
    .unwrap();
    let out = flotilla(
        &state,
        &host,
        &[
            "--platform",
            "linux/amd64",
            "pull",
            "--json",
            &format!("{host}/resume:v1"),
        ],
    );
    let report = json_of(&out);
    assert_eq!(report["layers_fetched"], 1, "{}", text(&out));
    assert_eq!(
        report["bytes_fetched"],
        (whole.len() - kept) as u64,
        "only the missing part was transferred: {}",
        text(&out)
    );
    let stored = std::fs::read(state.join("images/blobs/sha256").join(layer.hex())).unwrap();
    assert_eq!(stored, whole, "the resumed layer is whole in the store");
}

/// The time stamped on a stored reference is the pull's clock's, not the machine's: the clock is injected.
#[test]
fn the_stored_reference_is_stamped_by_the_pull_clock() {
    use flotilla::clock::FakeClock;
    use flotilla::platform::host::Host;
    use flotilla::pull::progress::Reporter;
    use flotilla::pull::{PullOptions, Source};
    use flotilla::store::{ANNOTATION_PULLED, Store};

    let Some(images) = busybox_images() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let layout = OciLayoutBuilder::new(&dir.path().join("usb"));
    layout.write("app", &images);
    let state = dir.path().join("state");
    let store = Store::open(&state).unwrap();
    let source: Source = format!("oci:{}:app", layout.dir().display())
        .parse()
        .unwrap();
    let host = Host {
        candidates: vec!["linux/arm64/v8".parse().unwrap()],
        page_size: None,
    };
    let options = PullOptions {
        parallel_layers: 2,
        clock: FakeClock::new(0.0),
        unpack: None,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime
        .block_on(flotilla::pull::pull(
            &flotilla::config::Config::default(),
            None,
            &store,
            &source,
            &host,
            &options,
            &Reporter::for_stderr(),
        ))
        .unwrap();
    let index: Value =
        serde_json::from_slice(&std::fs::read(state.join("images/index.json")).unwrap()).unwrap();
    assert_eq!(
        index["manifests"][0]["annotations"][ANNOTATION_PULLED],
        "2023-11-14T22:13:20Z"
    );
}

#[test]
fn an_oci_layout_on_removable_media_is_a_source() {
    let Some(s) = Lab::start() else { return };
    let layout = OciLayoutBuilder::new(&s.root.join("usb"));
    let written = layout.write("app-v2", &busybox_images().expect("busybox"));
    let state = s.root.join("state");
    let source = format!("oci:{}:app-v2", layout.dir().display());
    let out = flotilla(
        &state,
        "unused",
        &["--platform", "linux/arm64", "pull", "--json", &source],
    );
    let report = json_of(&out);
    assert_eq!(report["platform"], "linux/arm64/v8");
    let arm64 = written
        .images
        .iter()
        .find(|i| i.platform == "linux/arm64/v8")
        .expect("arm64 image");
    assert_eq!(report["manifest_digest"], arm64.manifest.to_string());
    assert_eq!(stored_refs(&state), vec!["app-v2".to_string()]);

    // What flotilla stored is an OCI layout its peers read.
    if let Some(skopeo) = tool("skopeo") {
        let out = Command::new(skopeo)
            .args(["inspect", "--raw"])
            .arg(format!("oci:{}:app-v2", state.join("images").display()))
            .output()
            .expect("skopeo inspect");
        assert!(out.status.success(), "{}", text(&out));
        assert_eq!(Digest::sha256_of(&out.stdout), arm64.manifest);
    }
}

/// Writes a cosign legacy signature image (`sha256-<hex>.sig`) for `signed` into an OCI layout, tagged `tag`.
fn signature_layout(dir: &Path, tag: &str, signed: &Digest, key: &SigningKey) {
    std::fs::create_dir_all(dir.join("blobs/sha256")).expect("dir");
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).expect("layout");
    let put = |bytes: &[u8]| {
        let d = Digest::sha256_of(bytes);
        std::fs::write(dir.join("blobs/sha256").join(d.hex()), bytes).expect("blob");
        (d, bytes.len())
    };
    let payload = json!({
        "critical": {
            "identity": {"docker-reference": "registry/app"},
            "image": {"docker-manifest-digest": signed.to_string()},
            "type": "cosign container image signature",
        },
        "optional": null,
    })
    .to_string();
    let signature: Signature = key.sign(payload.as_bytes());
    let (payload_digest, payload_size) = put(payload.as_bytes());
    let (config_digest, config_size) = put(b"{}");
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest.to_string(), "size": config_size},
        "layers": [{
            "mediaType": "application/vnd.dev.cosign.simplesigning.v1+json",
            "digest": payload_digest.to_string(), "size": payload_size,
            "annotations": {"dev.cosignproject.cosign/signature": STANDARD.encode(signature.to_der())},
        }],
    })
    .to_string();
    let (manifest_digest, manifest_size) = put(manifest.as_bytes());
    let index = json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": manifest_digest.to_string(), "size": manifest_size,
        "annotations": {"org.opencontainers.image.ref.name": tag},
    }]});
    std::fs::write(dir.join("index.json"), index.to_string()).expect("index.json");
}

#[test]
fn signature_policy_refuses_wrong_missing_and_misdirected_signatures() {
    let Some(s) = Lab::start() else { return };
    let host = s.registry.host();
    let layout = OciLayoutBuilder::new(&s.root.join("layout"));
    let written = layout.write("v1", &[busybox_image("amd64", None, "amd64")]);
    let other = OciLayoutBuilder::new(&s.root.join("other"))
        .write("v1", &[busybox_image("arm64", Some("v8"), "arm64")]);
    for repo in ["signed", "wrongkey", "unsigned", "otherdigest"] {
        skopeo_copy(layout.dir(), "v1", &host, repo, "v1", None, None);
    }
    let trusted = SigningKey::from_bytes(&p256::FieldBytes::from([7u8; 32])).expect("key");
    let stranger = SigningKey::from_bytes(&p256::FieldBytes::from([9u8; 32])).expect("key");
    let tag = format!("sha256-{}.sig", written.index.hex());
    for (repo, key, signed) in [
        ("signed", &trusted, &written.index),
        ("wrongkey", &stranger, &written.index),
        ("otherdigest", &trusted, &other.index),
    ] {
        let dir = s.root.join(format!("sig-{repo}"));
        signature_layout(&dir, "sig", signed, key);
        skopeo_copy(&dir, "sig", &host, repo, &tag, None, None);
    }

    let key_path = s.root.join("cosign.pub");
    std::fs::write(
        &key_path,
        trusted
            .verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .expect("pem"),
    )
    .expect("key");
    let config = s.root.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[[signature_policy]]\nscope = \"{host}\"\nmode = \"require\"\npublic_keys = [\"{}\"]\n",
            key_path.display()
        ),
    )
    .expect("config");

    let pull = |repo: &str| {
        let state = s.root.join(format!("state-{repo}"));
        let out = Flotilla::new()
            .config(&config)
            .state(&state)
            .registry(&host)
            .args(["--platform", "linux/amd64", "pull"])
            .arg(format!("{host}/{repo}:v1"))
            .output();
        (out, stored_refs(&state))
    };
    let (out, refs) = pull("signed");
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("verified"),
        "{}",
        text(&out)
    );
    assert_eq!(refs.len(), 1);
    for repo in ["wrongkey", "unsigned", "otherdigest"] {
        let (out, refs) = pull(repo);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{repo} must be refused: {}",
            text(&out)
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("signature"),
            "{repo}: {}",
            text(&out)
        );
        assert!(refs.is_empty(), "{repo}: nothing stored");
    }
}

/// The shared board captures: `../shared/fixtures/boards`, or `FLOTILLA_BOARDS_DIR`.
fn board(name: &str) -> std::path::PathBuf {
    std::env::var_os("FLOTILLA_BOARDS_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/boards"))
        .join(name)
}

#[test]
fn a_pi_zero_refuses_the_lying_v6_entry_then_takes_the_next_that_proves_itself() {
    let Some(s) = Lab::start() else { return };
    let zero = board("rpi-zero-w");
    let Some(zero) = require("board capture rpi-zero-w", zero.is_dir().then_some(zero)) else {
        return;
    };
    let written = s.push(
        "fallback",
        &[
            busybox_image("arm", Some("v7"), "armhf"),
            busybox_image("arm", Some("v6"), "armhf"),
            busybox_image("arm", Some("v5"), "armel"),
        ],
    );
    let host = s.registry.host();
    let state = s.root.join("state");
    let evidence = zero.to_str().expect("utf-8 path");
    let out = flotilla(
        &state,
        &host,
        &[
            "--evidence",
            evidence,
            "pull",
            "--json",
            &format!("{host}/fallback:v1"),
        ],
    );
    let report = json_of(&out);
    assert_eq!(report["platform"], "linux/arm/v5", "{}", text(&out));
    assert_eq!(
        report["manifest_digest"],
        written.images[2].manifest.to_string()
    );
    let refused = report["refused"].to_string();
    assert!(
        refused.contains(&written.images[1].manifest.to_string()) && refused.contains("arm/v7"),
        "the mislabelled v6 entry is refused for its v7 binaries: {refused}"
    );
}

#[test]
fn inspect_names_the_choice_and_why_others_were_passed_over_and_digests_pin_exactly() {
    let Some(s) = Lab::start() else { return };
    let written = s.push("multi", &busybox_images().expect("busybox"));
    let host = s.registry.host();
    let state = s.root.join("state");

    let out = flotilla(
        &state,
        &host,
        &[
            "--platform",
            "linux/arm/v7",
            "inspect",
            "--json",
            &format!("{host}/multi:v1"),
        ],
    );
    let report = json_of(&out);
    assert_eq!(report["digest"], written.index.to_string());
    let entries = report["entries"].as_array().expect("entries");
    assert_eq!(entries.len(), 4, "{report}");
    let taken: Vec<&Value> = entries.iter().filter(|e| e["rank"] == 1).collect();
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0]["platform"], "linux/arm/v7");
    assert!(
        entries
            .iter()
            .filter(|e| e["rank"].is_null())
            .all(|e| !e["verdict"].as_str().unwrap_or_default().is_empty()),
        "every entry passed over has a reason: {report}"
    );

    // A manifest digest pins that manifest, whatever the tag says; an index digest pins the index.
    let arm64 = &written.images[1];
    let out = flotilla(
        &state,
        &host,
        &[
            "--platform",
            "linux/arm64",
            "pull",
            "--json",
            &format!("{host}/multi@{}", arm64.manifest),
        ],
    );
    let report = json_of(&out);
    assert_eq!(report["manifest_digest"], arm64.manifest.to_string());
    assert!(report["index_digest"].is_null());
    let out = flotilla(
        &state,
        &host,
        &[
            "--platform",
            "linux/arm64",
            "pull",
            "--json",
            &format!("{host}/multi@{}", written.index),
        ],
    );
    assert_eq!(json_of(&out)["index_digest"], written.index.to_string());

    // A digest the registry does not have is an error naming the registry, and leaves nothing behind.
    let missing = Digest::sha256_of(b"nothing");
    let fresh = s.root.join("fresh");
    let out = flotilla(&fresh, &host, &["pull", &format!("{host}/multi@{missing}")]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&host),
        "{}",
        text(&out)
    );
    assert!(stored_refs(&fresh).is_empty());
}
