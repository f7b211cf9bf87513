//! cosign signatures made with a key (ECDSA P-256), in both forms cosign stores them in a registry.
//!
//! **Legacy form** (cosign v1/v2): a manifest tagged `sha256-<hex>.sig` ([`signature_tag`]) whose layers have media
//! type `application/vnd.dev.cosign.simplesigning.v1+json`. Each layer blob is a simple-signing payload
//! (`{"critical":{"identity":{"docker-reference":…},"image":{"docker-manifest-digest":"sha256:…"},"type":"cosign
//! container image signature"},"optional":…}`) and the layer annotation `dev.cosignproject.cosign/signature` is the
//! base64 ASN.1 DER ECDSA signature over the payload's SHA-256. Use [`parse_signature_manifest`], fetch each
//! [`LegacySignature::payload`] blob, then [`verify_simple_signing`].
//!
//! **Bundle form** (cosign v3 default, OCI 1.1 referrers): a manifest with `artifactType`
//! `application/vnd.dev.sigstore.bundle.v0.3+json`, `subject` = the signed image, and one layer of that media type
//! holding a sigstore bundle (protobuf-specs `Bundle` as JSON). Use [`is_signature_referrer`] on the referrers
//! list, [`parse_bundle_manifest`] on the referrer manifest, fetch the layer blob, then [`verify_bundle`].
//! Accepted bundle contents, signed with a key (`verificationMaterial.publicKey`; certificate-based keyless bundles
//! are refused, and transparency-log entries are not checked):
//! - `dsseEnvelope` with `payloadType` `application/vnd.in-toto+json`: each signature is over the DSSE
//!   pre-authentication encoding `"DSSEv1" SP len(type) SP type SP len(payload) SP payload`; the payload is an
//!   in-toto statement with `predicateType` `https://sigstore.dev/cosign/sign/v1` (what `cosign sign` writes) and
//!   a `subject` whose digest must equal the image digest. Other predicate types are attestations, not signatures
//!   ([`VerifyError::NotASignature`]).
//! - `messageSignature`: `messageDigest` (SHA2_256) must equal the image digest, i.e. the signed message is the
//!   image manifest itself; the signature is verified over that digest.
//!
//! In every form the signed content must name the digest being pulled: a valid signature for another digest is
//! refused ([`VerifyError::DigestMismatch`]).

use std::collections::BTreeMap;

use base64::Engine;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use p256::ecdsa::Signature;
use p256::ecdsa::signature::Verifier as _;
use p256::ecdsa::signature::hazmat::PrehashVerifier;
use serde::Deserialize;

use super::{SignatureForm, TrustedKey, Verified, VerifyError};
use crate::digest::{Algorithm, Digest, Verifier};

pub const SIMPLE_SIGNING_MEDIA_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
pub const BUNDLE_MEDIA_TYPE: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";
/// Every bundle version starts so (`…bundle.v0.3+json`, `…bundle+json;version=0.2`).
const BUNDLE_MEDIA_TYPE_PREFIX: &str = "application/vnd.dev.sigstore.bundle";
pub const BUNDLE_PREDICATE_ANNOTATION: &str = "dev.sigstore.bundle.predicateType";
pub const IN_TOTO_PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
pub const COSIGN_SIGN_PREDICATE: &str = "https://sigstore.dev/cosign/sign/v1";
const SIMPLE_SIGNING_TYPE: &str = "cosign container image signature";
const IN_TOTO_STATEMENT_PREFIX: &str = "https://in-toto.io/Statement/";

/// The tag cosign's legacy form stores the signatures of `image` under.
pub fn signature_tag(image: &Digest) -> String {
    format!("{}-{}.sig", image.algorithm().name(), image.hex())
}

/// One signature of a legacy signature manifest: the payload blob to fetch and its base64 signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacySignature {
    pub payload: Digest,
    pub payload_size: u64,
    /// Base64 as found in the annotation; decoded by [`verify_simple_signing`] so one bad layer does not hide the
    /// others.
    pub signature: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    #[serde(default)]
    artifact_type: Option<String>,
    #[serde(default)]
    layers: Vec<RawDescriptor>,
    subject: Option<RawDescriptor>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDescriptor {
    #[serde(default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

fn parse_digest(s: &str, bad: impl Fn(String) -> VerifyError) -> Result<Digest, VerifyError> {
    s.parse()
        .map_err(|e: crate::digest::DigestError| bad(e.to_string()))
}

/// Reads a legacy `.sig` manifest; layers of other media types, and simple-signing layers without a signature
/// annotation, are not signatures and are left out.
pub fn parse_signature_manifest(bytes: &[u8]) -> Result<Vec<LegacySignature>, VerifyError> {
    let bad = |reason: String| VerifyError::BadSignatureManifest { reason };
    let manifest: RawManifest =
        serde_json::from_slice(bytes).map_err(|e| bad(format!("not a manifest: {e}")))?;
    let mut out = Vec::new();
    for layer in manifest.layers {
        if layer.media_type != SIMPLE_SIGNING_MEDIA_TYPE {
            continue;
        }
        let Some(signature) = layer.annotations.get(SIGNATURE_ANNOTATION) else {
            continue;
        };
        out.push(LegacySignature {
            payload: parse_digest(&layer.digest, bad)?,
            payload_size: layer.size,
            signature: signature.clone(),
        });
    }
    Ok(out)
}

/// Verifies one legacy signature: `payload` is the blob at `sig.payload`.
pub fn verify_simple_signing(
    payload: &[u8],
    sig: &LegacySignature,
    keys: &[TrustedKey],
    expected: &Digest,
) -> Result<Verified, VerifyError> {
    let mut hasher = Verifier::new(sig.payload.algorithm());
    hasher.update(payload);
    let actual = hasher.finish();
    if actual != sig.payload {
        return Err(VerifyError::PayloadDigestMismatch {
            expected: sig.payload.clone(),
            actual,
        });
    }
    let signature = decode_signature(&sig.signature)?;
    let key = verify_with_any(keys, |k| k.key.verify(payload, &signature).is_ok())?;

    let doc: SimpleSigning =
        serde_json::from_slice(payload).map_err(|e| VerifyError::BadPayload {
            reason: format!("not simple-signing JSON: {e}"),
        })?;
    if doc.critical.kind != SIMPLE_SIGNING_TYPE {
        return Err(VerifyError::BadPayload {
            reason: format!(
                "critical.type is {:?}, expected {SIMPLE_SIGNING_TYPE:?}",
                doc.critical.kind
            ),
        });
    }
    let signed = doc.critical.image.docker_manifest_digest;
    if signed != expected.to_string() {
        return Err(VerifyError::DigestMismatch {
            signed,
            expected: expected.clone(),
        });
    }
    Ok(Verified {
        digest: expected.clone(),
        key,
        form: SignatureForm::Legacy,
    })
}

#[derive(Deserialize)]
struct SimpleSigning {
    critical: Critical,
}

#[derive(Deserialize)]
struct Critical {
    #[serde(rename = "type")]
    kind: String,
    image: CriticalImage,
}

#[derive(Deserialize)]
struct CriticalImage {
    #[serde(rename = "docker-manifest-digest")]
    docker_manifest_digest: String,
}

/// Whether an entry of a referrers list is a sigstore bundle that may be an image signature (attestations
/// announced by their predicate-type annotation are not).
pub fn is_signature_referrer(
    artifact_type: Option<&str>,
    annotations: &BTreeMap<String, String>,
) -> bool {
    artifact_type.is_some_and(|t| t.starts_with(BUNDLE_MEDIA_TYPE_PREFIX))
        && annotations
            .get(BUNDLE_PREDICATE_ANNOTATION)
            .is_none_or(|p| p == COSIGN_SIGN_PREDICATE)
}

/// The bundle blob a referrer manifest points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleLayer {
    pub digest: Digest,
    pub size: u64,
}

/// Reads a bundle referrer manifest and checks that its `subject` is `image`.
pub fn parse_bundle_manifest(bytes: &[u8], image: &Digest) -> Result<BundleLayer, VerifyError> {
    let bad = |reason: String| VerifyError::BadBundle { reason };
    let manifest: RawManifest = serde_json::from_slice(bytes)
        .map_err(|e| bad(format!("referrer manifest is not JSON of a manifest: {e}")))?;
    if !manifest
        .artifact_type
        .as_deref()
        .is_some_and(|t| t.starts_with(BUNDLE_MEDIA_TYPE_PREFIX))
    {
        return Err(bad(format!(
            "referrer manifest has artifactType {:?}, not a sigstore bundle",
            manifest.artifact_type.unwrap_or_default()
        )));
    }
    let subject = manifest
        .subject
        .ok_or_else(|| bad("referrer manifest has no subject".to_string()))?;
    let subject = parse_digest(&subject.digest, bad)?;
    if subject != *image {
        return Err(bad(format!(
            "referrer manifest is about {subject}, not {image}"
        )));
    }
    let layer = manifest
        .layers
        .into_iter()
        .find(|l| l.media_type.starts_with(BUNDLE_MEDIA_TYPE_PREFIX))
        .ok_or_else(|| bad("referrer manifest has no sigstore bundle layer".to_string()))?;
    Ok(BundleLayer {
        digest: parse_digest(&layer.digest, bad)?,
        size: layer.size,
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Bundle {
    media_type: String,
    #[serde(default)]
    verification_material: Option<VerificationMaterial>,
    message_signature: Option<MessageSignature>,
    dsse_envelope: Option<Envelope>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct VerificationMaterial {
    public_key: Option<serde_json::Value>,
    x509_certificate_chain: Option<serde_json::Value>,
    certificate: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MessageSignature {
    message_digest: MessageDigest,
    signature: String,
}

#[derive(Deserialize)]
struct MessageDigest {
    algorithm: String,
    digest: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope {
    payload: String,
    payload_type: String,
    #[serde(default)]
    signatures: Vec<EnvelopeSignature>,
}

#[derive(Deserialize)]
struct EnvelopeSignature {
    sig: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Statement {
    #[serde(rename = "_type")]
    kind: String,
    #[serde(default)]
    subject: Vec<Subject>,
    predicate_type: String,
}

#[derive(Deserialize)]
struct Subject {
    #[serde(default)]
    digest: BTreeMap<String, String>,
}

/// Verifies a sigstore bundle (the referrer's layer blob) for `expected`.
pub fn verify_bundle(
    bundle: &[u8],
    keys: &[TrustedKey],
    expected: &Digest,
) -> Result<Verified, VerifyError> {
    let bad = |reason: String| VerifyError::BadBundle { reason };
    let bundle: Bundle = serde_json::from_slice(bundle)
        .map_err(|e| bad(format!("not sigstore bundle JSON: {e}")))?;
    if !bundle.media_type.starts_with(BUNDLE_MEDIA_TYPE_PREFIX) {
        return Err(bad(format!(
            "mediaType is {:?}, not a sigstore bundle",
            bundle.media_type
        )));
    }
    if let Some(m) = &bundle.verification_material {
        if m.public_key.is_none() && (m.x509_certificate_chain.is_some() || m.certificate.is_some())
        {
            return Err(VerifyError::KeylessBundle);
        }
    }
    match (bundle.dsse_envelope, bundle.message_signature) {
        (Some(envelope), None) => verify_dsse(&envelope, keys, expected),
        (None, Some(message)) => verify_message(&message, keys, expected),
        (Some(_), Some(_)) => Err(bad(
            "it holds both a DSSE envelope and a message signature".to_string()
        )),
        (None, None) => Err(bad(
            "it holds neither a DSSE envelope nor a message signature".to_string(),
        )),
    }
}

fn verify_dsse(
    envelope: &Envelope,
    keys: &[TrustedKey],
    expected: &Digest,
) -> Result<Verified, VerifyError> {
    if envelope.payload_type != IN_TOTO_PAYLOAD_TYPE {
        return Err(VerifyError::BadBundle {
            reason: format!(
                "DSSE payloadType is {:?}, expected {IN_TOTO_PAYLOAD_TYPE:?}",
                envelope.payload_type
            ),
        });
    }
    let payload = decode_base64(&envelope.payload, "DSSE payload")?;
    let statement: Statement =
        serde_json::from_slice(&payload).map_err(|e| VerifyError::BadPayload {
            reason: format!("DSSE payload is not an in-toto statement: {e}"),
        })?;
    if !statement.kind.starts_with(IN_TOTO_STATEMENT_PREFIX) {
        return Err(VerifyError::BadPayload {
            reason: format!(
                "statement _type is {:?}, not an in-toto statement",
                statement.kind
            ),
        });
    }
    // Attestations (SBOM, provenance) share the referrers list with signatures; they are not signatures.
    if statement.predicate_type != COSIGN_SIGN_PREDICATE {
        return Err(VerifyError::NotASignature {
            predicate_type: statement.predicate_type,
        });
    }
    if envelope.signatures.is_empty() {
        return Err(VerifyError::BadBundle {
            reason: "the DSSE envelope has no signatures".to_string(),
        });
    }
    let pae = pae(&envelope.payload_type, &payload);
    let mut signatures = Vec::with_capacity(envelope.signatures.len());
    for s in &envelope.signatures {
        signatures.push(decode_signature(&s.sig)?);
    }
    let key = verify_with_any(keys, |k| {
        signatures.iter().any(|s| k.key.verify(&pae, s).is_ok())
    })?;
    let name = expected.algorithm().name();
    if !statement
        .subject
        .iter()
        .any(|s| s.digest.get(name).map(String::as_str) == Some(expected.hex()))
    {
        let signed: Vec<String> = statement
            .subject
            .iter()
            .flat_map(|s| s.digest.iter().map(|(a, h)| format!("{a}:{h}")))
            .collect();
        return Err(VerifyError::DigestMismatch {
            signed: if signed.is_empty() {
                "no subject".to_string()
            } else {
                signed.join(", ")
            },
            expected: expected.clone(),
        });
    }
    Ok(Verified {
        digest: expected.clone(),
        key,
        form: SignatureForm::BundleDsse,
    })
}

fn verify_message(
    message: &MessageSignature,
    keys: &[TrustedKey],
    expected: &Digest,
) -> Result<Verified, VerifyError> {
    if message.message_digest.algorithm != "SHA2_256" {
        return Err(VerifyError::BadBundle {
            reason: format!(
                "messageDigest algorithm is {:?}; flotilla verifies SHA2_256 message signatures",
                message.message_digest.algorithm
            ),
        });
    }
    let digest = decode_base64(&message.message_digest.digest, "message digest")?;
    if digest.len() != 32 {
        return Err(VerifyError::BadBundle {
            reason: format!(
                "messageDigest is {} bytes long, a SHA-256 digest is 32",
                digest.len()
            ),
        });
    }
    let signature = decode_signature(&message.signature)?;
    let key = verify_with_any(keys, |k| k.key.verify_prehash(&digest, &signature).is_ok())?;
    let signed = hex(&digest);
    if expected.algorithm() != Algorithm::Sha256 || signed != expected.hex() {
        return Err(VerifyError::DigestMismatch {
            signed: format!("a message with sha256:{signed}"),
            expected: expected.clone(),
        });
    }
    Ok(Verified {
        digest: expected.clone(),
        key,
        form: SignatureForm::BundleMessage,
    })
}

/// DSSE's pre-authentication encoding: what a DSSE signature is computed over.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "DSSEv1 {} {} {} ",
        payload_type.len(),
        payload_type,
        payload.len()
    )
    .into_bytes();
    out.extend_from_slice(payload);
    out
}

fn verify_with_any(
    keys: &[TrustedKey],
    verifies: impl Fn(&TrustedKey) -> bool,
) -> Result<String, VerifyError> {
    keys.iter()
        .find(|k| verifies(k))
        .map(|k| k.source.clone())
        .ok_or_else(|| VerifyError::SignatureMismatch {
            keys: if keys.is_empty() {
                "none configured".to_string()
            } else {
                keys.iter()
                    .map(|k| k.source.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        })
}

/// cosign writes standard base64; protobuf JSON readers also accept the URL-safe alphabet, so both are accepted,
/// with or without padding.
fn decode_base64(text: &str, what: &'static str) -> Result<Vec<u8>, VerifyError> {
    let config =
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    let standard = GeneralPurpose::new(&alphabet::STANDARD, config);
    let url_safe = GeneralPurpose::new(&alphabet::URL_SAFE, config);
    let text = text.trim();
    standard
        .decode(text)
        .or_else(|e| url_safe.decode(text).map_err(|_| e))
        .map_err(|source| VerifyError::BadBase64 { what, source })
}

fn decode_signature(text: &str) -> Result<Signature, VerifyError> {
    let der = decode_base64(text, "signature")?;
    Signature::from_der(&der).map_err(|_| VerifyError::BadSignatureEncoding)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
