use std::io::Write;
use std::time::{Duration, UNIX_EPOCH};

use super::layout::{DOCKER_MANIFEST, children};
use super::*;

#[test]
fn times_are_rfc3339_utc() {
    assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
    let t = UNIX_EPOCH + Duration::from_secs(951_782_400 + 3661);
    assert_eq!(rfc3339(t), "2000-02-29T01:01:01Z");
    let t = UNIX_EPOCH + Duration::from_secs(4_102_444_799);
    assert_eq!(rfc3339(t), "2099-12-31T23:59:59Z");
}

#[test]
fn margin_is_ten_percent_plus_64_mib() {
    assert_eq!(space_needed(0, 0), 64 << 20);
    assert_eq!(space_needed(1000 << 20, 0), (1100 + 64) << 20);
    assert_eq!(space_needed(u64::MAX, 1), u64::MAX);
}

#[test]
fn oci_sources_split_like_skopeo() {
    let r: OciLayoutRef = "oci:/media/usb/images:app-v2".parse().unwrap();
    assert_eq!(r.dir, Path::new("/media/usb/images"));
    assert_eq!(r.name.as_deref(), Some("app-v2"));
    let r: OciLayoutRef = "oci:/media/usb/images:docker.io/library/alpine:3.20"
        .parse()
        .unwrap();
    assert_eq!(r.name.as_deref(), Some("docker.io/library/alpine:3.20"));
    for bare in ["oci:/media/usb/images", "oci:/media/usb/images:"] {
        let r: OciLayoutRef = bare.parse().unwrap();
        assert_eq!(r.name, None);
    }
    for bad in [
        "docker://x",
        "oci:",
        "oci::name",
        "oci:/d:bad name",
        "oci:/d:a\nb",
    ] {
        assert!(bad.parse::<OciLayoutRef>().is_err(), "{bad:?} was accepted");
    }
}

#[test]
fn reference_names_are_checked() {
    validate_ref_name("registry.local:5000/ns/app@sha256:0a").unwrap();
    for bad in ["", "a b", "a\u{0}", "ä", &"x".repeat(MAX_REF_NAME + 1)] {
        assert!(matches!(
            validate_ref_name(bad),
            Err(StoreError::BadRefName { .. })
        ));
    }
}

#[test]
fn docker_manifests_and_untyped_blobs_are_walked_by_their_own_media_type() {
    let d = Digest::sha256_of(b"x");
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": d, "size": 1},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": d, "size": 1}],
    });
    let bytes = serde_json::to_vec(&manifest).unwrap();
    let p = Path::new("m");
    assert_eq!(children(p, DOCKER_MANIFEST, &bytes).unwrap().len(), 2);
    assert_eq!(children(p, "", &bytes).unwrap().len(), 2);
    assert!(
        children(p, "application/octet-stream", br#"{"layers":[]}"#)
            .unwrap()
            .is_empty()
    );
    let err = children(
        p,
        DOCKER_MANIFEST,
        br#"{"layers":[{"digest":"sha256:zz","size":1}]}"#,
    )
    .unwrap_err();
    assert!(
        err.to_string().starts_with("m is not a valid manifest"),
        "{err}"
    );
}

#[test]
fn a_partial_longer_than_its_blob_starts_over() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    let digest = Digest::sha256_of(b"abc");
    let Slot::Fetch(partial) = store.partial(&digest, 3).unwrap() else {
        panic!("fresh store")
    };
    fs::write(partial.path(), b"abcdef").unwrap();
    let (verifier, offset) = partial.resume().unwrap();
    assert_eq!((offset, verifier.len()), (0, 0));
    assert_eq!(fs::metadata(partial.path()).unwrap().len(), 0);
    partial.append().unwrap().write_all(b"abc").unwrap();
    let mut v = verifier;
    v.update(b"abc");
    store.publish(partial.finish(v).unwrap()).unwrap();
    assert!(store.has_blob(&digest));
    assert!(matches!(store.partial(&digest, 3).unwrap(), Slot::Present));
    assert_eq!(store.bytes_to_fetch(&[(digest, 3)]), 0);
}

#[test]
fn a_sha512_blob_lands_under_its_algorithm() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    let mut v = Verifier::new(Algorithm::Sha512);
    v.update(b"five!");
    let digest = v.finish();
    store.put_blob(&digest, b"five!").unwrap();
    let path = store.layout().blob_path(&digest);
    assert!(path.starts_with(tmp.path().join("images/blobs/sha512")));
    assert_eq!(store.read_blob(&digest, 5, 5).unwrap(), b"five!");
}
