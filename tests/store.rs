//! The content store against real readers (skopeo, umoci) and against what a crash, a full disk or a hostile
//! layout leaves behind.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, UNIX_EPOCH};

use flate2::Compression;
use flate2::write::GzEncoder;
use flotilla::clock::FakeClock;
use flotilla::config::Config;
use flotilla::deploy::Deployer;
use flotilla::digest::{Digest, Verifier};
use flotilla::oci::{
    DOCKER_MANIFEST_LIST, Descriptor, MAX_MANIFEST_BYTES, OCI_INDEX, OCI_MANIFEST,
};
use flotilla::platform::Platform;
use flotilla::platform::host::Host;
use flotilla::store::gc::{GcOptions, GcReport, RemovedKind, collect_garbage};
use flotilla::store::{
    ANNOTATION_INDEX_DIGEST, ANNOTATION_PLATFORM, FreeSpace, OciLayout, OciLayoutRef, RefRecord,
    Slot, Store, StoreError,
};
use flotilla::unpack::Snapshots;

mod common;

use common::Flotilla;

const LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const CONFIG: &str = "application/vnd.oci.image.config.v1+json";

fn tool(name: &str) -> Option<PathBuf> {
    common::required_tool(name)
}

fn busybox_amd64() -> Option<Vec<u8>> {
    let path = common::required_busybox("amd64")?;
    Some(std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display())))
}

/// A one-layer image built in memory: `/bin/busybox` (or any bytes) in a gzip tar, with a correct `diff_ids`.
struct TestImage {
    layer: Vec<u8>,
    config: Vec<u8>,
    manifest: Vec<u8>,
}

impl TestImage {
    fn new(binary: &[u8]) -> TestImage {
        let mut tar = tar::Builder::new(Vec::new());
        let mut dir = tar::Header::new_gnu();
        dir.set_entry_type(tar::EntryType::Directory);
        dir.set_mode(0o755);
        dir.set_size(0);
        tar.append_data(&mut dir, "bin/", std::io::empty()).unwrap();
        let mut file = tar::Header::new_gnu();
        file.set_mode(0o755);
        file.set_size(binary.len() as u64);
        tar.append_data(&mut file, "bin/busybox", binary).unwrap();
        let tar = tar.into_inner().unwrap();
        let diff_id = Digest::sha256_of(&tar);
        let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
        gz.write_all(&tar).unwrap();
        let layer = gz.finish().unwrap();
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {"Entrypoint": ["/bin/busybox"], "Cmd": ["true"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id.to_string()]},
        }))
        .unwrap();
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": CONFIG, "digest": Digest::sha256_of(&config), "size": config.len()},
            "layers": [{"mediaType": LAYER_GZIP, "digest": Digest::sha256_of(&layer), "size": layer.len()}],
        }))
        .unwrap();
        TestImage {
            layer,
            config,
            manifest,
        }
    }

    fn small(tag: &str) -> TestImage {
        TestImage::new(format!("#!/bin/sh\necho {tag}\n").as_bytes())
    }

    fn layer_digest(&self) -> Digest {
        Digest::sha256_of(&self.layer)
    }

    fn config_digest(&self) -> Digest {
        Digest::sha256_of(&self.config)
    }

    fn manifest_descriptor(&self) -> Descriptor {
        Descriptor::new(
            OCI_MANIFEST,
            Digest::sha256_of(&self.manifest),
            self.manifest.len() as u64,
        )
    }

    fn record(&self, name: &str) -> RefRecord {
        RefRecord {
            name: name.to_string(),
            target: self.manifest_descriptor(),
            source: format!("registry.local:5000/{name}"),
            index_digest: None,
            platform: Some(Platform::linux("amd64", None)),
            pulled_at: UNIX_EPOCH + Duration::from_secs(1_738_324_800),
            keep: Vec::new(),
        }
    }

    /// Publishes every blob the way a pull does: config and manifest whole, the layer streamed into a partial.
    fn publish(&self, store: &Store) {
        store.put_blob(&self.config_digest(), &self.config).unwrap();
        stream_blob(store, &self.layer);
        store
            .put_blob(&Digest::sha256_of(&self.manifest), &self.manifest)
            .unwrap();
    }
}

/// What a registry client does with a partial: resume, append the rest while hashing, finish, publish.
fn stream_blob(store: &Store, bytes: &[u8]) {
    let digest = Digest::sha256_of(bytes);
    let Slot::Fetch(partial) = store.partial(&digest, bytes.len() as u64).unwrap() else {
        return;
    };
    let (mut verifier, offset) = partial.resume().unwrap();
    let rest = &bytes[offset as usize..];
    verifier.update(rest);
    partial.append().unwrap().write_all(rest).unwrap();
    let proof = partial.finish(verifier).unwrap();
    store.publish(proof).unwrap();
}

/// Tests wait for the store lock: another test's child process may hold a copy of it between fork and exec.
fn gc(dry_run: bool, wait: bool) -> GcOptions {
    GcOptions {
        dry_run,
        wait,
        keep_snapshots: Default::default(),
    }
}

/// gc with the state directory's layer snapshots, as `flotilla gc` runs it.
fn collect(state: &Path, options: GcOptions) -> Result<GcReport, StoreError> {
    let snapshots = Snapshots::open(state).expect("snapshots directory");
    collect_garbage(state, options, &snapshots)
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn skopeo_and_umoci_read_what_the_store_wrote() {
    let (Some(skopeo), Some(umoci), Some(busybox)) =
        (tool("skopeo"), tool("umoci"), busybox_amd64())
    else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("state")).unwrap();
    let image = TestImage::new(&busybox);
    image.publish(&store);
    store.commit(&[image.record("app-v1")]).unwrap();
    let layout = store.layout().root().to_str().unwrap().to_string();

    let inspect = run_ok(Command::new(&skopeo).args(["inspect", &format!("oci:{layout}:app-v1")]));
    let inspect: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    assert_eq!(inspect["Architecture"], "amd64");
    assert_eq!(
        inspect["Digest"],
        image.manifest_descriptor().digest.to_string()
    );
    let raw =
        run_ok(Command::new(&skopeo).args(["inspect", "--raw", &format!("oci:{layout}:app-v1")]));
    assert_eq!(raw.as_bytes(), image.manifest.as_slice());

    let ls = run_ok(Command::new(&umoci).args(["ls", "--layout", &layout]));
    assert_eq!(ls.lines().collect::<Vec<_>>(), ["app-v1"]);
    let bundle = tmp.path().join("bundle");
    run_ok(Command::new(&umoci).args([
        "unpack",
        "--rootless",
        "--image",
        &format!("{layout}:app-v1"),
        bundle.to_str().unwrap(),
    ]));
    assert_eq!(
        std::fs::read(bundle.join("rootfs/bin/busybox")).unwrap(),
        busybox
    );
}

#[test]
fn a_name_with_colons_reaches_skopeo() {
    let Some(skopeo) = tool("skopeo") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    let image = TestImage::small("colon");
    image.publish(&store);
    let name = "registry.local:5000/ns/app:v2";
    store.commit(&[image.record(name)]).unwrap();
    let layout = store.layout().root().to_str().unwrap().to_string();
    let raw =
        run_ok(Command::new(&skopeo).args(["inspect", "--raw", &format!("oci:{layout}:{name}")]));
    assert_eq!(raw.as_bytes(), image.manifest.as_slice());
}

#[test]
fn interrupted_download_resumes_from_its_partial_and_gc_removes_leftovers() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path();
    let image = TestImage::small("resume");
    let half = image.layer.len() / 2;
    {
        let store = Store::open(state).unwrap();
        let Slot::Fetch(partial) = store
            .partial(&image.layer_digest(), image.layer.len() as u64)
            .unwrap()
        else {
            panic!("the layer is not in a fresh store")
        };
        partial
            .append()
            .unwrap()
            .write_all(&image.layer[..half])
            .unwrap();
        // The process dies here: the handle goes away without finish.
    }
    let store = Store::open(state).unwrap();
    assert!(
        store.images().unwrap().is_empty(),
        "no reference before commit"
    );
    assert_eq!(
        store.bytes_to_fetch(&[(image.layer_digest(), image.layer.len() as u64)]),
        (image.layer.len() - half) as u64
    );
    let Slot::Fetch(partial) = store
        .partial(&image.layer_digest(), image.layer.len() as u64)
        .unwrap()
    else {
        panic!("the layer was published without finish")
    };
    let (_, offset) = partial.resume().unwrap();
    assert_eq!(
        offset, half as u64,
        "resume starts after the bytes already there"
    );
    drop(partial);
    image.publish(&store);
    assert!(store.has_blob(&image.layer_digest()));
    store.commit(&[image.record("resumed")]).unwrap();

    // Leftovers of another interrupted pull: a partial and a temporary file.
    let other = TestImage::small("abandoned");
    let Slot::Fetch(p) = store.partial(&other.layer_digest(), 10).unwrap() else {
        panic!()
    };
    p.append().unwrap().write_all(b"12345").unwrap();
    drop(p);
    let tmp_file = store.layout().root().join("blobs/sha256/.tmp-1-0-abc");
    std::fs::write(&tmp_file, b"torn").unwrap();
    drop(store);

    let report = collect(state, gc(false, true)).unwrap();
    assert_eq!(report.count(RemovedKind::Partial), 1, "{report:?}");
    assert_eq!(report.count(RemovedKind::TempFile), 1, "{report:?}");
    assert_eq!(report.count(RemovedKind::Blob), 0, "{report:?}");
    assert_eq!(report.bytes_freed(), 5 + 4);
    assert!(!tmp_file.exists());
    assert_eq!(std::fs::read_dir(state.join("partial")).unwrap().count(), 0);
}

#[test]
fn a_failed_pull_leaves_index_json_as_it_was() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    let old = TestImage::small("old");
    old.publish(&store);
    store.commit(&[old.record("app")]).unwrap();
    let index_path = store.layout().index_path();
    let before = std::fs::read(&index_path).unwrap();

    // The new pull publishes its configuration, then fails before its layer.
    let new = TestImage::small("new");
    store.put_blob(&new.config_digest(), &new.config).unwrap();
    store
        .put_blob(&Digest::sha256_of(&new.manifest), &new.manifest)
        .unwrap();
    let err = store.commit(&[new.record("app")]).unwrap_err();
    assert!(
        matches!(&err, StoreError::Incomplete { digest, .. } if *digest == new.layer_digest()),
        "{err}"
    );
    assert_eq!(std::fs::read(&index_path).unwrap(), before);
    let images = store.images().unwrap();
    assert_eq!(images.len(), 1);
    assert_eq!(images[0].digest, old.manifest_descriptor().digest);

    // Finishing the pull replaces the reference by name, in one step.
    stream_blob(&store, &new.layer);
    store.commit(&[new.record("app")]).unwrap();
    let images = store.images().unwrap();
    assert_eq!(images.len(), 1);
    assert_eq!(images[0].digest, new.manifest_descriptor().digest);
    assert_eq!(images[0].platform.as_deref(), Some("linux/amd64"));
    assert_eq!(images[0].pulled.as_deref(), Some("2025-01-31T12:00:00Z"));
    let size = (new.manifest.len() + new.config.len() + new.layer.len()) as u64;
    assert_eq!(images[0].size, Some(size));
    assert!(store.remove_ref("app").unwrap());
    assert!(!store.remove_ref("app").unwrap());
    assert!(store.images().unwrap().is_empty());
}

#[test]
fn bad_bytes_never_reach_the_store() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    let digest = Digest::sha256_of(b"right");
    let err = store.put_blob(&digest, b"wrong").unwrap_err();
    assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
    let Slot::Fetch(partial) = store.partial(&digest, 5).unwrap() else {
        panic!()
    };
    let path = partial.path().to_path_buf();
    partial.append().unwrap().write_all(b"wrong").unwrap();
    let mut v = Verifier::new(digest.algorithm());
    v.update(b"wrong");
    let err = partial.finish(v).unwrap_err();
    assert!(
        err.to_string().contains("does not match its digest"),
        "{err}"
    );
    assert!(!path.exists(), "a bad partial is discarded, never resumed");
    assert!(!store.has_blob(&digest));
}

#[test]
fn gc_keeps_what_references_reach_through_nested_indexes_and_removes_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path();
    let store = Store::open(state).unwrap();
    let kept = TestImage::small("kept");
    kept.publish(&store);
    let nested_image = TestImage::small("nested");
    nested_image.publish(&store);
    let docker_image = TestImage::small("docker");
    docker_image.publish(&store);
    let signature = TestImage::small("signature");
    signature.publish(&store);
    let garbage = TestImage::small("garbage");
    garbage.publish(&store);

    // outer OCI index → inner Docker manifest list → manifest, plus a second manifest straight from the outer.
    let entry = |d: Descriptor| serde_json::json!({"mediaType": d.media_type, "digest": d.digest, "size": d.size});
    let inner = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": DOCKER_MANIFEST_LIST,
        "manifests": [entry(nested_image.manifest_descriptor()),
                      // Another platform that was never pulled: named, absent, not an error.
                      entry(Descriptor::new(OCI_MANIFEST, Digest::sha256_of(b"absent"), 6))],
    }))
    .unwrap();
    let inner_d = Descriptor::new(
        DOCKER_MANIFEST_LIST,
        Digest::sha256_of(&inner),
        inner.len() as u64,
    );
    store.put_blob(&inner_d.digest, &inner).unwrap();
    let outer = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [entry(inner_d.clone()), entry(docker_image.manifest_descriptor())],
    }))
    .unwrap();
    let outer_d = Descriptor::new(OCI_INDEX, Digest::sha256_of(&outer), outer.len() as u64);
    store.put_blob(&outer_d.digest, &outer).unwrap();

    let mut by_index = kept.record("by-index");
    by_index.target = outer_d.clone();
    let mut with_signature = kept.record("kept");
    with_signature.keep = vec![signature.manifest_descriptor().digest];
    with_signature.index_digest = Some(outer_d.digest.clone());
    store.commit(&[by_index, with_signature]).unwrap();
    let stray_tmp = store.layout().root().join(".tmp-9-9-index.json");
    std::fs::write(&stray_tmp, b"{").unwrap();
    drop(store);

    let garbage_digests = [
        Digest::sha256_of(&garbage.manifest),
        garbage.config_digest(),
        garbage.layer_digest(),
    ];
    let dry = collect(state, gc(true, true)).unwrap();
    assert!(dry.dry_run);
    let mut would: Vec<PathBuf> = dry
        .removed
        .iter()
        .filter(|r| r.kind == RemovedKind::Blob)
        .map(|r| r.path.clone())
        .collect();
    would.sort();
    let layout = OciLayout::open(&state.join("images")).unwrap();
    let mut expected: Vec<PathBuf> = garbage_digests
        .iter()
        .map(|d| layout.blob_path(d))
        .collect();
    expected.sort();
    assert_eq!(would, expected);
    assert_eq!(dry.count(RemovedKind::TempFile), 1);
    assert!(
        expected.iter().all(|p| p.exists()),
        "--dry-run removed something"
    );
    assert!(stray_tmp.exists());

    let report = collect(state, gc(false, true)).unwrap();
    assert_eq!(report.removed, dry.removed);
    assert!(expected.iter().all(|p| !p.exists()));
    assert!(!stray_tmp.exists());
    for image in [&kept, &nested_image, &docker_image, &signature] {
        for d in [
            Digest::sha256_of(&image.manifest),
            image.config_digest(),
            image.layer_digest(),
        ] {
            assert!(layout.has_blob(&d), "gc removed reachable {d}");
        }
    }
    assert!(layout.has_blob(&outer_d.digest) && layout.has_blob(&inner_d.digest));
    assert_eq!(collect(state, gc(false, true)).unwrap().removed, vec![]);
    let entries = Store::open(state).unwrap().images().unwrap();
    let kept_entry = entries
        .iter()
        .find(|e| e.name.as_deref() == Some("kept"))
        .unwrap();
    assert_eq!(kept_entry.index_digest, Some(outer_d.digest.to_string()));
    let raw = std::fs::read_to_string(layout.index_path()).unwrap();
    assert!(raw.contains(ANNOTATION_INDEX_DIGEST) && raw.contains(ANNOTATION_PLATFORM));
}

#[test]
fn gc_waits_for_no_pull() {
    let tmp = tempfile::tempdir().unwrap();
    let pulling = Store::open(tmp.path()).unwrap();
    let err = collect(tmp.path(), gc(true, false)).unwrap_err();
    assert!(matches!(err, StoreError::Busy { .. }), "{err}");
    drop(pulling);
    collect(tmp.path(), gc(true, true)).unwrap();
}

struct FixedSpace(u64);

impl FreeSpace for FixedSpace {
    fn available_bytes(&self, _: &Path) -> std::io::Result<u64> {
        Ok(self.0)
    }
}

#[test]
fn a_full_disk_is_refused_before_downloading_with_the_numbers() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    const MIB: u64 = 1 << 20;
    let err = store
        .check_space(&FixedSpace(120 * MIB), 200 * MIB, 48 * MIB)
        .unwrap_err();
    let text = err.to_string();
    // 248 MiB + 10% + 64 MiB = 336.8 MiB, rounded up.
    let expected = format!("needs 337 MiB, 120 MiB free on {}", tmp.path().display());
    assert!(text.contains(&expected), "{text}");
    store
        .check_space(&FixedSpace(400 * MIB), 200 * MIB, 48 * MIB)
        .unwrap();
    // The real filesystem answers too.
    store.check_space(&flotilla::store::Statvfs, 0, 0).unwrap();
}

/// Copies one image from `source` into `store` the way `flotilla pull oci:…` will.
fn copy_image(
    source: &OciLayout,
    name: Option<&str>,
    store: &Store,
    as_name: &str,
) -> Result<(), StoreError> {
    let target = source.resolve(name)?;
    let manifest = source.read_blob(&target.digest, target.size, MAX_MANIFEST_BYTES)?;
    let parsed: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    let mut blobs = vec![&parsed["config"]];
    blobs.extend(parsed["layers"].as_array().unwrap());
    for b in blobs {
        let digest: Digest = b["digest"].as_str().unwrap().parse().unwrap();
        let size = b["size"].as_u64().unwrap();
        if let Slot::Fetch(partial) = store.partial(&digest, size)? {
            store.publish(source.copy_blob(partial)?)?;
        }
    }
    store.put_blob(&target.digest, &manifest)?;
    let record = RefRecord {
        name: as_name.to_string(),
        target: Descriptor::new(&target.media_type, target.digest.clone(), target.size),
        source: format!("oci:{}", source.root().display()),
        index_digest: None,
        platform: None,
        pulled_at: UNIX_EPOCH,
        keep: vec![],
    };
    store.commit(&[record])
}

#[test]
fn an_oci_layout_written_by_skopeo_is_a_source() {
    let Some(skopeo) = tool("skopeo") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let first = Store::open(&tmp.path().join("first")).unwrap();
    let image = TestImage::small("usb");
    image.publish(&first);
    first.commit(&[image.record("app-v1")]).unwrap();
    let usb = tmp.path().join("usb");
    run_ok(Command::new(&skopeo).args([
        "copy",
        &format!("oci:{}:app-v1", first.layout().root().display()),
        &format!("oci:{}:app-v2", usb.display()),
    ]));

    let source: OciLayoutRef = format!("oci:{}:app-v2", usb.display()).parse().unwrap();
    assert_eq!(source.name.as_deref(), Some("app-v2"));
    let layout = OciLayout::open(&source.dir).unwrap();
    let second = Store::open(&tmp.path().join("second")).unwrap();
    copy_image(&layout, source.name.as_deref(), &second, "app").unwrap();
    // Without a name, the layout's only image.
    copy_image(&layout, None, &second, "app-unnamed").unwrap();
    let images = second.images().unwrap();
    assert_eq!(images.len(), 2);
    assert_eq!(images[0].digest, image.manifest_descriptor().digest);
    assert!(second.has_blob(&image.layer_digest()));
    // And the store is itself a source.
    let third = Store::open(&tmp.path().join("third")).unwrap();
    copy_image(second.layout(), Some("app"), &third, "again").unwrap();
    assert!(third.has_blob(&image.layer_digest()));
}

#[test]
fn a_tampered_source_layout_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let usb_state = tmp.path().join("usb");
    let image = TestImage::small("tampered");
    let other = TestImage::small("other");
    let usb_root = {
        let usb = Store::open(&usb_state).unwrap();
        image.publish(&usb);
        other.publish(&usb);
        usb.commit(&[image.record("app"), other.record("other")])
            .unwrap();
        usb.layout().root().to_path_buf()
    };
    let source = OciLayout::open(&usb_root).unwrap();
    let store = Store::open(&tmp.path().join("device")).unwrap();

    let err = copy_image(&source, None, &store, "x").unwrap_err();
    assert!(
        matches!(&err, StoreError::AmbiguousRef { names, .. } if names.len() == 2),
        "{err}"
    );
    assert!(err.to_string().contains("app, other"), "{err}");
    let err = copy_image(&source, Some("nope"), &store, "x").unwrap_err();
    assert!(err.to_string().contains("no image named \"nope\""), "{err}");

    let layer_path = source.blob_path(&image.layer_digest());
    let mut bytes = std::fs::read(&layer_path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&layer_path, &bytes).unwrap();
    let err = copy_image(&source, Some("app"), &store, "x").unwrap_err();
    match &err {
        StoreError::DigestMismatch { path, .. } => assert_eq!(path, &layer_path),
        other => panic!("expected a digest mismatch, got {other}"),
    }
    assert!(!store.has_blob(&image.layer_digest()));
    assert_eq!(
        std::fs::read_dir(tmp.path().join("device/partial"))
            .unwrap()
            .count(),
        0
    );
    assert!(store.images().unwrap().is_empty());

    let manifest_path = source.blob_path(&Digest::sha256_of(&other.manifest));
    std::fs::write(&manifest_path, b"{}").unwrap();
    let err = copy_image(&source, Some("other"), &store, "x").unwrap_err();
    assert!(matches!(err, StoreError::SizeMismatch { .. }), "{err}");
}

#[test]
fn hostile_layouts_give_errors_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path();
    let image = TestImage::small("hostile");
    let store = Store::open(state).unwrap();
    image.publish(&store);
    store.commit(&[image.record("app")]).unwrap();
    let layout = store.layout().clone();
    drop(store);
    let index = layout.index_path();

    for junk in [
        &b"not json"[..],
        br#"{"schemaVersion":2,"manifests":[{"mediaType":"x","digest":"sha256:../../etc/passwd","size":1}]}"#,
        br#"{"schemaVersion":2,"manifests":[{"mediaType":"x","digest":"md5:abc","size":-1}]}"#,
        br#"{"schemaVersion":2,"manifests":{"nested":[[[[[[[[]]]]]]]]}}"#,
    ] {
        std::fs::write(&index, junk).unwrap();
        let err = layout.resolve(None).unwrap_err();
        assert!(err.to_string().contains(&index.display().to_string()), "{err}");
        let err = collect(state, gc(false, true)).unwrap_err();
        assert!(matches!(err, StoreError::Json { .. }), "{err}");
    }
    let deep = "[".repeat(100_000);
    std::fs::write(&index, deep).unwrap();
    assert!(matches!(
        layout.index().unwrap_err(),
        StoreError::Json { .. }
    ));

    std::fs::File::create(&index)
        .unwrap()
        .set_len(16 * 1024 * 1024 + 1)
        .unwrap();
    let err = layout.index().unwrap_err();
    assert!(matches!(err, StoreError::TooLarge { .. }), "{err}");

    let err = layout
        .read_blob(
            &image.layer_digest(),
            MAX_MANIFEST_BYTES + 1,
            MAX_MANIFEST_BYTES,
        )
        .unwrap_err();
    assert!(matches!(err, StoreError::TooLarge { .. }), "{err}");

    // A reachable manifest that is not JSON stops gc instead of deleting what it might name.
    std::fs::write(
        &index,
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "manifests": [image.manifest_descriptor()],
        }))
        .unwrap(),
    )
    .unwrap();
    let manifest_path = layout.blob_path(&image.manifest_descriptor().digest);
    std::fs::write(&manifest_path, b"\x00\xff garbage").unwrap();
    let err = collect(state, gc(false, true)).unwrap_err();
    assert!(
        err.to_string()
            .contains(&manifest_path.display().to_string()),
        "{err}"
    );
    assert!(layout.has_blob(&image.layer_digest()));

    // A FIFO planted as a blob must not hang the reader.
    let config_path = layout.blob_path(&image.config_digest());
    std::fs::remove_file(&config_path).unwrap();
    run_ok(Command::new("mkfifo").arg(&config_path));
    let err = layout
        .read_blob(
            &image.config_digest(),
            image.config.len() as u64,
            MAX_MANIFEST_BYTES,
        )
        .unwrap_err();
    assert!(matches!(err, StoreError::NotAFile { .. }), "{err}");

    std::fs::write(
        layout.root().join("oci-layout"),
        br#"{"imageLayoutVersion":"9"}"#,
    )
    .unwrap();
    let err = Store::open(state).unwrap_err();
    assert!(matches!(err, StoreError::NotLayout { .. }), "{err}");
    let err = OciLayout::open(&tmp.path().join("nowhere")).unwrap_err();
    assert!(err.to_string().contains("no oci-layout file"), "{err}");
}

#[test]
fn the_cli_lists_and_collects() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let config = tmp.path().join("config.toml");
    let flotilla = |args: &[&str]| {
        Flotilla::new()
            .empty_config(&config)
            .state(&state)
            .args(args)
            .stdout()
    };
    assert_eq!(flotilla(&["images", "--json"]).trim(), "[]");
    let image = TestImage::small("cli");
    {
        let store = Store::open(&state).unwrap();
        image.publish(&store);
        store.commit(&[image.record("app")]).unwrap();
        store
            .put_blob(&Digest::sha256_of(b"stray"), b"stray")
            .unwrap();
    }
    let json = Flotilla::new()
        .empty_config(&config)
        .state(&state)
        .args(["images", "--json"])
        .json();
    assert_eq!(json[0]["name"], "app");
    assert_eq!(json[0]["platform"], "linux/amd64");
    let table = flotilla(&["images"]);
    assert!(
        table.starts_with("REFERENCE") && table.contains("app"),
        "{table}"
    );
    let dry = flotilla(&["gc", "--dry-run"]);
    assert!(dry.contains("would remove 1 blobs"), "{dry}");
    assert!(
        Store::open(&state)
            .unwrap()
            .has_blob(&Digest::sha256_of(b"stray"))
    );
    let done = flotilla(&["gc"]);
    assert!(
        done.contains("removed 1 blobs") && done.contains("5 B freed"),
        "{done}"
    );
    assert!(
        !Store::open(&state)
            .unwrap()
            .has_blob(&Digest::sha256_of(b"stray"))
    );
}

/// `flotilla run` and the agent take a stored image without pulling only when it is a variant for the device and
/// every layer is unpacked; anything else is pulled again.
#[test]
fn a_stored_image_serves_a_deploy_only_for_its_platform_once_unpacked() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let image = TestImage::small("deploy");
    {
        let store = Store::open(&state).unwrap();
        image.publish(&store);
        store.commit(&[image.record("app")]).unwrap();
    }
    let deployer = |platform: &str| {
        let host = Host {
            candidates: vec![platform.parse().unwrap()],
            page_size: None,
        };
        Deployer {
            state_dir: state.clone(),
            config: Config::default(),
            insecure_registries: Vec::new(),
            live: host.clone(),
            host,
            clock: FakeClock::new(0.0),
        }
    };
    let amd64 = deployer("linux/amd64");
    assert!(
        amd64.ready("app").unwrap().is_none(),
        "its layer is not unpacked"
    );

    // A published snapshot is a directory with its index; what is in it does not matter here.
    let diff_ids = amd64.image("app").unwrap().config.rootfs.unwrap().diff_ids;
    let snapshots = Snapshots::open(&state).unwrap();
    for d in &diff_ids {
        std::fs::create_dir_all(snapshots.path(d)).unwrap();
        std::fs::write(snapshots.path(d).join("index.json"), "{}").unwrap();
    }
    assert!(amd64.ready("app").unwrap().is_some());
    assert!(deployer("linux/arm64").ready("app").unwrap().is_none());
    assert!(amd64.ready("other").unwrap().is_none());
}
