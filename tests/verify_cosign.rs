//! cosign verification and signature policy, with keys and signatures generated here by `p256` the way cosign
//! makes them (ECDSA P-256, SHA-256, ASN.1 DER, base64).

use std::collections::BTreeMap;
use std::path::PathBuf;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use flotilla::config::{SignatureMode, SignaturePolicyConfig};
use flotilla::digest::Digest;
use flotilla::verify::cosign::{
    self, BUNDLE_MEDIA_TYPE, BUNDLE_PREDICATE_ANNOTATION, COSIGN_SIGN_PREDICATE,
    IN_TOTO_PAYLOAD_TYPE, LegacySignature, SIGNATURE_ANNOTATION, SIMPLE_SIGNING_MEDIA_TYPE,
};
use flotilla::verify::policy::{Acceptance, Policy, matching_policy, scope_matches};
use flotilla::verify::{SignatureForm, TrustedKey, Verified, VerifyError, load_key};
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::{EncodePublicKey, LineEnding};
use serde_json::json;

fn signing_key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&p256::FieldBytes::from([seed; 32])).unwrap()
}

fn pem(sk: &SigningKey) -> String {
    sk.verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .unwrap()
}

fn trusted(sk: &SigningKey, name: &str) -> TrustedKey {
    TrustedKey::from_pem(&pem(sk), name).unwrap()
}

fn sign(sk: &SigningKey, message: &[u8]) -> String {
    let sig: Signature = sk.sign(message);
    STANDARD.encode(sig.to_der())
}

fn image_digest(seed: &str) -> Digest {
    Digest::sha256_of(seed.as_bytes())
}

fn simple_signing(digest: &Digest) -> Vec<u8> {
    json!({
        "critical": {
            "identity": { "docker-reference": "registry.local:5000/app" },
            "image": { "docker-manifest-digest": digest.to_string() },
            "type": "cosign container image signature",
        },
        "optional": null,
    })
    .to_string()
    .into_bytes()
}

fn legacy(payload: &[u8], signature: String) -> LegacySignature {
    LegacySignature {
        payload: Digest::sha256_of(payload),
        payload_size: payload.len() as u64,
        signature,
    }
}

// ---- legacy `.sig` form ----

#[test]
fn signature_tag_is_cosigns() {
    let d = image_digest("app");
    assert_eq!(cosign::signature_tag(&d), format!("sha256-{}.sig", d.hex()));
}

#[test]
fn parse_signature_manifest_lists_signed_layers() {
    let p1 = simple_signing(&image_digest("app"));
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "size": 233,
                    "digest": image_digest("config").to_string() },
        "layers": [
            { "mediaType": SIMPLE_SIGNING_MEDIA_TYPE, "size": p1.len(), "digest": Digest::sha256_of(&p1).to_string(),
              "annotations": { SIGNATURE_ANNOTATION: "MEUCIQ==", "dev.sigstore.cosign/bundle": "{}" } },
            { "mediaType": SIMPLE_SIGNING_MEDIA_TYPE, "size": 3, "digest": image_digest("unsigned").to_string() },
            { "mediaType": "application/vnd.oci.image.layer.v1.tar", "size": 3,
              "digest": image_digest("other").to_string(), "annotations": { SIGNATURE_ANNOTATION: "x" } },
        ],
    });
    let sigs = cosign::parse_signature_manifest(manifest.to_string().as_bytes()).unwrap();
    assert_eq!(
        sigs,
        [LegacySignature {
            payload: Digest::sha256_of(&p1),
            payload_size: p1.len() as u64,
            signature: "MEUCIQ==".to_string(),
        }]
    );
    assert!(matches!(
        cosign::parse_signature_manifest(b"{\"layers\": 7}"),
        Err(VerifyError::BadSignatureManifest { .. })
    ));
}

#[test]
fn valid_legacy_signature_is_accepted_with_any_listed_key() {
    let sk = signing_key(7);
    let keys = [
        trusted(&signing_key(3), "other.pub"),
        trusted(&sk, "cosign.pub"),
    ];
    let d = image_digest("app");
    let payload = simple_signing(&d);
    let v =
        cosign::verify_simple_signing(&payload, &legacy(&payload, sign(&sk, &payload)), &keys, &d)
            .unwrap();
    assert_eq!(
        v,
        Verified {
            digest: d,
            key: "cosign.pub".to_string(),
            form: SignatureForm::Legacy
        }
    );
}

#[test]
fn high_s_signatures_verify_as_go_makes_them() {
    // Go's crypto/ecdsa does not normalise s; half of real cosign signatures have a high s.
    let sk = signing_key(7);
    let d = image_digest("app");
    let payload = simple_signing(&d);
    let low: Signature = sk.sign(&payload);
    let (r, s) = low.split_scalars();
    let high = Signature::from_scalars(r, -s).unwrap();
    assert_ne!(high, low);
    let sig = legacy(&payload, STANDARD.encode(high.to_der()));
    assert!(
        cosign::verify_simple_signing(&payload, &sig, &[trusted(&sk, "cosign.pub")], &d).is_ok()
    );
}

#[test]
fn legacy_wrong_key_is_refused() {
    let d = image_digest("app");
    let payload = simple_signing(&d);
    let sig = legacy(&payload, sign(&signing_key(9), &payload));
    let err = cosign::verify_simple_signing(
        &payload,
        &sig,
        &[trusted(&signing_key(7), "cosign.pub")],
        &d,
    )
    .unwrap_err();
    assert!(
        matches!(err, VerifyError::SignatureMismatch { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("cosign.pub"), "{err}");
}

#[test]
fn legacy_tampered_payload_is_refused() {
    let sk = signing_key(7);
    let keys = [trusted(&sk, "cosign.pub")];
    let d = image_digest("app");
    let payload = simple_signing(&d);
    let signature = sign(&sk, &payload);
    // The registry serves other bytes than the manifest named.
    let mut tampered = payload.clone();
    tampered[0] = b' ';
    let err =
        cosign::verify_simple_signing(&tampered, &legacy(&payload, signature.clone()), &keys, &d)
            .unwrap_err();
    assert!(
        matches!(err, VerifyError::PayloadDigestMismatch { .. }),
        "{err}"
    );
    // Whoever rewrote the payload also rewrote the manifest to match: the signature no longer fits.
    let err = cosign::verify_simple_signing(&tampered, &legacy(&tampered, signature), &keys, &d)
        .unwrap_err();
    assert!(
        matches!(err, VerifyError::SignatureMismatch { .. }),
        "{err}"
    );
}

#[test]
fn legacy_signature_for_another_digest_is_refused() {
    let sk = signing_key(7);
    let keys = [trusted(&sk, "cosign.pub")];
    let other = image_digest("other image");
    let payload = simple_signing(&other);
    let sig = legacy(&payload, sign(&sk, &payload));
    let pulled = image_digest("app");
    let err = cosign::verify_simple_signing(&payload, &sig, &keys, &pulled).unwrap_err();
    match &err {
        VerifyError::DigestMismatch { signed, expected } => {
            assert_eq!(signed, &other.to_string());
            assert_eq!(expected, &pulled);
        }
        e => panic!("wrong error: {e}"),
    }
    assert!(err.to_string().contains("does not cover this one"), "{err}");
}

#[test]
fn legacy_malformed_inputs_are_refused_distinctly() {
    let sk = signing_key(7);
    let keys = [trusted(&sk, "cosign.pub")];
    let d = image_digest("app");
    let payload = simple_signing(&d);

    let err = cosign::verify_simple_signing(
        &payload,
        &legacy(&payload, "not base64 !!".into()),
        &keys,
        &d,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            VerifyError::BadBase64 {
                what: "signature",
                ..
            }
        ),
        "{err}"
    );

    let not_der = STANDARD.encode(b"definitely not DER");
    let err =
        cosign::verify_simple_signing(&payload, &legacy(&payload, not_der), &keys, &d).unwrap_err();
    assert!(matches!(err, VerifyError::BadSignatureEncoding), "{err}");

    let not_json = b"{\"critical\": ".to_vec();
    let err = cosign::verify_simple_signing(
        &not_json,
        &legacy(&not_json, sign(&sk, &not_json)),
        &keys,
        &d,
    )
    .unwrap_err();
    assert!(matches!(err, VerifyError::BadPayload { .. }), "{err}");

    let wrong_type =
        json!({"critical": {"identity": {}, "image": {"docker-manifest-digest": d.to_string()},
                                         "type": "something else"}})
        .to_string()
        .into_bytes();
    let err = cosign::verify_simple_signing(
        &wrong_type,
        &legacy(&wrong_type, sign(&sk, &wrong_type)),
        &keys,
        &d,
    )
    .unwrap_err();
    assert!(matches!(err, VerifyError::BadPayload { .. }), "{err}");
}

// ---- sigstore bundle form ----

fn statement(subject: &Digest, predicate_type: &str) -> Vec<u8> {
    json!({
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{ "name": "registry.local:5000/app", "digest": { "sha256": subject.hex() } }],
        "predicateType": predicate_type,
        "predicate": {},
    })
    .to_string()
    .into_bytes()
}

fn dsse_bundle(payload: &[u8], signature: &str) -> Vec<u8> {
    json!({
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": { "publicKey": { "hint": "pgs3fV6Ib6V3Ygv3ODmfZ6+HXVSAR1mNYMOTAbZq4jM=" },
                                  "tlogEntries": [] },
        "dsseEnvelope": {
            "payload": STANDARD.encode(payload),
            "payloadType": IN_TOTO_PAYLOAD_TYPE,
            "signatures": [{ "sig": signature, "keyid": "" }],
        },
    })
    .to_string()
    .into_bytes()
}

fn signed_dsse(sk: &SigningKey, payload: &[u8]) -> Vec<u8> {
    dsse_bundle(
        payload,
        &sign(sk, &cosign::pae(IN_TOTO_PAYLOAD_TYPE, payload)),
    )
}

#[test]
fn pae_matches_the_dsse_spec_example() {
    assert_eq!(
        cosign::pae("http://example.com/HelloWorld", b"hello world"),
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    );
}

#[test]
fn valid_dsse_bundle_is_accepted() {
    let sk = signing_key(7);
    let d = image_digest("app");
    let bundle = signed_dsse(&sk, &statement(&d, COSIGN_SIGN_PREDICATE));
    let v = cosign::verify_bundle(&bundle, &[trusted(&sk, "cosign.pub")], &d).unwrap();
    assert_eq!(v.form, SignatureForm::BundleDsse);
    assert_eq!(v.key, "cosign.pub");
}

#[test]
fn dsse_bundle_refusals_are_distinct() {
    let sk = signing_key(7);
    let keys = [trusted(&sk, "cosign.pub")];
    let d = image_digest("app");

    let wrong_key = signed_dsse(&signing_key(8), &statement(&d, COSIGN_SIGN_PREDICATE));
    let err = cosign::verify_bundle(&wrong_key, &keys, &d).unwrap_err();
    assert!(
        matches!(err, VerifyError::SignatureMismatch { .. }),
        "{err}"
    );

    let other = image_digest("other image");
    let for_other = signed_dsse(&sk, &statement(&other, COSIGN_SIGN_PREDICATE));
    let err = cosign::verify_bundle(&for_other, &keys, &d).unwrap_err();
    assert!(
        matches!(err, VerifyError::DigestMismatch { ref signed, .. } if *signed == other.to_string()),
        "{err}"
    );

    // Signed for the other digest, then the subject rewritten to this one: the signature no longer fits.
    let good_sig = sign(
        &sk,
        &cosign::pae(
            IN_TOTO_PAYLOAD_TYPE,
            &statement(&other, COSIGN_SIGN_PREDICATE),
        ),
    );
    let tampered = dsse_bundle(&statement(&d, COSIGN_SIGN_PREDICATE), &good_sig);
    let err = cosign::verify_bundle(&tampered, &keys, &d).unwrap_err();
    assert!(
        matches!(err, VerifyError::SignatureMismatch { .. }),
        "{err}"
    );

    // A signature over the bare payload instead of its PAE is not a DSSE signature.
    let payload = statement(&d, COSIGN_SIGN_PREDICATE);
    let err =
        cosign::verify_bundle(&dsse_bundle(&payload, &sign(&sk, &payload)), &keys, &d).unwrap_err();
    assert!(
        matches!(err, VerifyError::SignatureMismatch { .. }),
        "{err}"
    );

    let provenance = signed_dsse(&sk, &statement(&d, "https://slsa.dev/provenance/v1"));
    let err = cosign::verify_bundle(&provenance, &keys, &d).unwrap_err();
    assert!(matches!(err, VerifyError::NotASignature { .. }), "{err}");

    let err = cosign::verify_bundle(b"{\"mediaType\": 3}", &keys, &d).unwrap_err();
    assert!(matches!(err, VerifyError::BadBundle { .. }), "{err}");

    let mut bundle: serde_json::Value =
        serde_json::from_slice(&signed_dsse(&sk, &payload)).unwrap();
    bundle["dsseEnvelope"]["payload"] = "%%%".into();
    let err = cosign::verify_bundle(bundle.to_string().as_bytes(), &keys, &d).unwrap_err();
    assert!(
        matches!(
            err,
            VerifyError::BadBase64 {
                what: "DSSE payload",
                ..
            }
        ),
        "{err}"
    );

    let mut keyless: serde_json::Value =
        serde_json::from_slice(&signed_dsse(&sk, &payload)).unwrap();
    keyless["verificationMaterial"] = json!({ "certificate": { "rawBytes": "MIIB" } });
    let err = cosign::verify_bundle(keyless.to_string().as_bytes(), &keys, &d).unwrap_err();
    assert!(matches!(err, VerifyError::KeylessBundle), "{err}");
}

fn message_bundle(sk: &SigningKey, message: &[u8]) -> Vec<u8> {
    json!({
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": { "publicKey": { "hint": "" } },
        "messageSignature": {
            "messageDigest": { "algorithm": "SHA2_256",
                               "digest": STANDARD.encode(hex_bytes(Digest::sha256_of(message).hex())) },
            "signature": sign(sk, message),
        },
    })
    .to_string()
    .into_bytes()
}

fn hex_bytes(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn message_signature_over_the_manifest_is_accepted_and_over_anything_else_refused() {
    let sk = signing_key(7);
    let keys = [trusted(&sk, "cosign.pub")];
    let manifest =
        br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#;
    let d = Digest::sha256_of(manifest);
    let v = cosign::verify_bundle(&message_bundle(&sk, manifest), &keys, &d).unwrap();
    assert_eq!(v.form, SignatureForm::BundleMessage);

    let err =
        cosign::verify_bundle(&message_bundle(&sk, b"another manifest"), &keys, &d).unwrap_err();
    assert!(matches!(err, VerifyError::DigestMismatch { .. }), "{err}");
    let err =
        cosign::verify_bundle(&message_bundle(&signing_key(1), manifest), &keys, &d).unwrap_err();
    assert!(
        matches!(err, VerifyError::SignatureMismatch { .. }),
        "{err}"
    );
}

#[test]
fn bundle_referrer_manifest_points_at_the_bundle_of_this_image() {
    let d = image_digest("app");
    let layer = image_digest("bundle blob");
    let manifest = |subject: &Digest| {
        json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "artifactType": BUNDLE_MEDIA_TYPE,
            "config": { "mediaType": "application/vnd.oci.empty.v1+json", "size": 2,
                        "digest": "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a" },
            "layers": [{ "mediaType": BUNDLE_MEDIA_TYPE, "size": 4971, "digest": layer.to_string(),
                         "annotations": { "org.opencontainers.image.title": "sha256-x.sigstore.json" } }],
            "subject": { "mediaType": "application/vnd.oci.image.index.v1+json", "digest": subject.to_string(),
                         "size": 1000 },
        })
        .to_string()
    };
    let got = cosign::parse_bundle_manifest(manifest(&d).as_bytes(), &d).unwrap();
    assert_eq!(got.digest, layer);
    assert_eq!(got.size, 4971);
    let err =
        cosign::parse_bundle_manifest(manifest(&image_digest("x")).as_bytes(), &d).unwrap_err();
    assert!(matches!(err, VerifyError::BadBundle { .. }), "{err}");

    let mut ann = BTreeMap::new();
    assert!(cosign::is_signature_referrer(Some(BUNDLE_MEDIA_TYPE), &ann));
    ann.insert(
        BUNDLE_PREDICATE_ANNOTATION.to_string(),
        COSIGN_SIGN_PREDICATE.to_string(),
    );
    assert!(cosign::is_signature_referrer(Some(BUNDLE_MEDIA_TYPE), &ann));
    ann.insert(
        BUNDLE_PREDICATE_ANNOTATION.to_string(),
        "https://spdx.dev/Document".to_string(),
    );
    assert!(!cosign::is_signature_referrer(
        Some(BUNDLE_MEDIA_TYPE),
        &ann
    ));
    assert!(!cosign::is_signature_referrer(
        Some("application/spdx+json"),
        &BTreeMap::new()
    ));
    assert!(!cosign::is_signature_referrer(None, &BTreeMap::new()));
}

// ---- keys ----

#[test]
fn key_files_load_and_errors_name_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("cosign.pub");
    std::fs::write(&good, pem(&signing_key(7))).unwrap();
    let key = load_key(&good).unwrap();
    assert_eq!(key.source, good.display().to_string());
    assert_eq!(&key.key, signing_key(7).verifying_key());

    let missing = dir.path().join("missing.pub");
    let err = load_key(&missing).unwrap_err();
    assert!(matches!(err, VerifyError::KeyRead { .. }));
    assert!(
        err.to_string().contains(&missing.display().to_string()),
        "{err}"
    );

    let junk = dir.path().join("junk.pub");
    std::fs::write(
        &junk,
        "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
    )
    .unwrap();
    let err = load_key(&junk).unwrap_err();
    assert!(matches!(err, VerifyError::KeyParse { .. }));
    assert!(
        err.to_string().contains(&junk.display().to_string()),
        "{err}"
    );
}

// ---- policy ----

fn policy_config(scope: &str, mode: SignatureMode, keys: &[PathBuf]) -> SignaturePolicyConfig {
    SignaturePolicyConfig {
        scope: scope.to_string(),
        mode,
        public_keys: keys.to_vec(),
    }
}

#[test]
fn longest_scope_wins_at_segment_boundaries() {
    let policies = [
        policy_config("ghcr.io", SignatureMode::IfPresent, &[]),
        policy_config("ghcr.io/org/", SignatureMode::Require, &[]),
        policy_config("ghcr.io/org/app", SignatureMode::Off, &[]),
    ];
    let scope = |repo: &str| matching_policy(&policies, repo).map(|p| p.scope.as_str());
    assert_eq!(scope("ghcr.io/org/app"), Some("ghcr.io/org/app"));
    assert_eq!(scope("ghcr.io/org/app/sub"), Some("ghcr.io/org/app"));
    assert_eq!(scope("ghcr.io/org/application"), Some("ghcr.io/org/"));
    assert_eq!(scope("ghcr.io/organisation/app"), Some("ghcr.io"));
    assert_eq!(scope("ghcr.iox/org/app"), None);
    assert_eq!(scope("docker.io/library/busybox"), None);
    assert!(!scope_matches("", "ghcr.io/x"));

    // `*` covers everything the others leave, whatever order the file lists them in.
    let mut with_star = policies.to_vec();
    with_star.insert(0, policy_config("*", SignatureMode::Require, &[]));
    with_star.push(policy_config("*", SignatureMode::Require, &[]));
    let scope = |repo: &str| matching_policy(&with_star, repo).map(|p| p.scope.as_str());
    assert_eq!(scope("docker.io/library/busybox"), Some("*"));
    assert_eq!(scope("ghcr.iox/org/app"), Some("*"));
    assert_eq!(scope("ghcr.io/organisation/app"), Some("ghcr.io"));
    assert_eq!(scope("g/a"), Some("*"));
    let one_letter = [
        policy_config("*", SignatureMode::Require, &[]),
        policy_config("g", SignatureMode::Off, &[]),
    ];
    assert_eq!(
        matching_policy(&one_letter, "g/a").map(|p| p.scope.as_str()),
        Some("g")
    );
}

fn policy(mode: SignatureMode) -> Policy {
    Policy {
        scope: Some("registry.local:5000".to_string()),
        mode,
        keys: vec![trusted(&signing_key(7), "cosign.pub")],
    }
}

fn verified(d: &Digest) -> Result<Verified, VerifyError> {
    Ok(Verified {
        digest: d.clone(),
        key: "cosign.pub".to_string(),
        form: SignatureForm::Legacy,
    })
}

#[test]
fn policy_decisions() {
    let repo = "registry.local:5000/app";
    let d = image_digest("app");
    let mismatch = || {
        Err(VerifyError::SignatureMismatch {
            keys: "cosign.pub".to_string(),
        })
    };
    let attestation = || {
        Err(VerifyError::NotASignature {
            predicate_type: "https://slsa.dev/provenance/v1".into(),
        })
    };

    let require = policy(SignatureMode::Require);
    assert!(require.needs_signatures());
    let err = require.decide(repo, &d, &[]).unwrap_err();
    assert!(matches!(err, VerifyError::Unsigned { .. }), "{err}");
    assert!(err.to_string().contains("cosign sign --key"), "{err}");
    let err = require.decide(repo, &d, &[attestation()]).unwrap_err();
    assert!(matches!(err, VerifyError::Unsigned { .. }), "{err}");
    let err = require
        .decide(repo, &d, &[mismatch(), attestation()])
        .unwrap_err();
    assert!(
        matches!(err, VerifyError::AllInvalid { ref errors, .. } if errors.len() == 1),
        "{err}"
    );
    assert!(matches!(
        require.decide(repo, &d, &[mismatch(), verified(&d)]),
        Ok(Acceptance::Verified(_))
    ));

    let if_present = policy(SignatureMode::IfPresent);
    assert_eq!(
        if_present.decide(repo, &d, &[]).unwrap(),
        Acceptance::Unsigned
    );
    assert_eq!(
        if_present.decide(repo, &d, &[attestation()]).unwrap(),
        Acceptance::Unsigned
    );
    assert!(matches!(
        if_present.decide(repo, &d, &[mismatch()]),
        Err(VerifyError::AllInvalid { .. })
    ));
    assert!(matches!(
        if_present.decide(repo, &d, &[verified(&d)]),
        Ok(Acceptance::Verified(_))
    ));

    let off = policy(SignatureMode::Off);
    assert!(!off.needs_signatures());
    assert_eq!(off.decide(repo, &d, &[]).unwrap(), Acceptance::NotChecked);
    assert_eq!(
        off.decide(repo, &d, &[mismatch()]).unwrap(),
        Acceptance::NotChecked
    );
}

#[test]
fn policy_for_repository_loads_its_keys() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("cosign.pub");
    std::fs::write(&key, pem(&signing_key(7))).unwrap();
    let missing = dir.path().join("nope.pub");
    let policies = [
        policy_config(
            "registry.local:5000",
            SignatureMode::Require,
            std::slice::from_ref(&key),
        ),
        policy_config(
            "registry.local:5000/broken",
            SignatureMode::Require,
            std::slice::from_ref(&missing),
        ),
        policy_config("registry.local:5000/keyless", SignatureMode::IfPresent, &[]),
        policy_config(
            "registry.local:5000/open",
            SignatureMode::Off,
            std::slice::from_ref(&missing),
        ),
    ];

    let p = Policy::for_repository(&policies, "registry.local:5000/app").unwrap();
    assert_eq!(p.mode, SignatureMode::Require);
    assert_eq!(p.keys.len(), 1);

    let err = Policy::for_repository(&policies, "registry.local:5000/broken/app").unwrap_err();
    assert!(
        err.to_string().contains(&missing.display().to_string()),
        "{err}"
    );

    let err = Policy::for_repository(&policies, "registry.local:5000/keyless").unwrap_err();
    assert!(matches!(err, VerifyError::NoKeys { .. }), "{err}");

    // `off` never reads keys, so a stale path there is harmless.
    let p = Policy::for_repository(&policies, "registry.local:5000/open").unwrap();
    assert!(!p.needs_signatures());

    let p = Policy::for_repository(&policies, "ghcr.io/org/app").unwrap();
    assert_eq!((p.scope, p.mode), (None, SignatureMode::Off));
}

#[test]
fn end_to_end_legacy_signature_under_require() {
    let sk = signing_key(7);
    let repo = "registry.local:5000/app";
    let d = image_digest("app");
    let payload = simple_signing(&d);
    let manifest = json!({
        "schemaVersion": 2,
        "layers": [{ "mediaType": SIMPLE_SIGNING_MEDIA_TYPE, "size": payload.len(),
                     "digest": Digest::sha256_of(&payload).to_string(),
                     "annotations": { SIGNATURE_ANNOTATION: sign(&sk, &payload) } }],
    });
    let p = policy(SignatureMode::Require);
    let outcomes: Vec<_> = cosign::parse_signature_manifest(manifest.to_string().as_bytes())
        .unwrap()
        .iter()
        .map(|s| cosign::verify_simple_signing(&payload, s, &p.keys, &d))
        .collect();
    assert!(matches!(
        p.decide(repo, &d, &outcomes),
        Ok(Acceptance::Verified(_))
    ));
    // The same signature presented for another image of the repository is refused.
    let other = image_digest("other");
    let outcomes: Vec<_> = cosign::parse_signature_manifest(manifest.to_string().as_bytes())
        .unwrap()
        .iter()
        .map(|s| cosign::verify_simple_signing(&payload, s, &p.keys, &other))
        .collect();
    let err = p.decide(repo, &other, &outcomes).unwrap_err();
    assert!(err.to_string().contains("not for"), "{err}");
}
