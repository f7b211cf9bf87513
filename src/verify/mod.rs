//! Image signature verification: cosign key-based signatures ([`cosign`]) and the per-repository policy that
//! decides what to do with the result ([`policy`]).
//!
//! Everything here works on bytes the registry client has already fetched (and digest-checked); nothing here does
//! I/O except [`load_key`], which reads a PEM file named in the configuration.

use std::fmt;
use std::path::{Path, PathBuf};

use p256::ecdsa::VerifyingKey;
use p256::pkcs8::DecodePublicKey;

use crate::config::SignatureMode;
use crate::digest::Digest;

pub mod cosign;
pub mod policy;

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(
        "cannot read cosign public key {path}: {source}; fix the path in public_keys of the signature_policy"
    )]
    KeyRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{key} is not an ECDSA P-256 public key in PEM (the cosign.pub that `cosign generate-key-pair` writes): \
         {reason}"
    )]
    KeyParse { key: String, reason: String },
    #[error(
        "signature policy for {scope:?} has mode {mode} but lists no public_keys: add the cosign.pub that signs \
         these images"
    )]
    NoKeys { scope: String, mode: String },
    #[error(
        "the {what} is not valid base64 ({source}): the signature is corrupted or is not a cosign signature"
    )]
    BadBase64 {
        what: &'static str,
        source: base64::DecodeError,
    },
    #[error(
        "the signature is not an ASN.1 DER ECDSA signature: it is corrupted or was made with a key type flotilla \
         does not verify (only ECDSA P-256 keys are supported)"
    )]
    BadSignatureEncoding,
    #[error(
        "the signature does not verify with any trusted key ({keys}): the image was signed with another key, or \
         the signed payload was altered"
    )]
    SignatureMismatch { keys: String },
    #[error(
        "the signature payload was fetched as {expected} but hashes to {actual}: the registry served other bytes; \
         pull again or check the registry"
    )]
    PayloadDigestMismatch { expected: Digest, actual: Digest },
    #[error("the signed payload is not a cosign signature payload: {reason}")]
    BadPayload { reason: String },
    #[error(
        "the signature is valid but vouches for {signed}, not for {expected}: a signature for another image does \
         not cover this one"
    )]
    DigestMismatch { signed: String, expected: Digest },
    #[error("the cosign signature manifest is not valid: {reason}")]
    BadSignatureManifest { reason: String },
    #[error("the sigstore bundle is not valid: {reason}")]
    BadBundle { reason: String },
    #[error(
        "the sigstore bundle is signed with a certificate (keyless signing); flotilla verifies bundles signed with \
         a cosign key only: sign with `cosign sign --key`"
    )]
    KeylessBundle,
    #[error(
        "the sigstore bundle holds an attestation of type {predicate_type}, not an image signature"
    )]
    NotASignature { predicate_type: String },
    #[error(
        "no cosign signature found for {image}, and the signature policy for {scope:?} requires one: sign the \
         image with `cosign sign --key`, or set mode = \"if-present\" or \"off\" for this scope"
    )]
    Unsigned { image: String, scope: String },
    #[error(
        "no valid cosign signature for {image} (signature policy {scope:?}): {}; sign the image with a key listed \
         in the policy",
        .errors.join("; ")
    )]
    AllInvalid {
        image: String,
        scope: String,
        errors: Vec<String>,
    },
}

/// A public key that may sign images, with where it came from so errors and logs can name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedKey {
    pub source: String,
    pub key: VerifyingKey,
}

impl TrustedKey {
    /// Parses a PEM `PUBLIC KEY` (SubjectPublicKeyInfo) holding an ECDSA P-256 key; `source` names it in errors.
    pub fn from_pem(pem: &str, source: &str) -> Result<TrustedKey, VerifyError> {
        let key =
            VerifyingKey::from_public_key_pem(pem.trim()).map_err(|e| VerifyError::KeyParse {
                key: source.to_string(),
                reason: e.to_string(),
            })?;
        Ok(TrustedKey {
            source: source.to_string(),
            key,
        })
    }
}

/// Reads one PEM public key file.
pub fn load_key(path: &Path) -> Result<TrustedKey, VerifyError> {
    let text = std::fs::read_to_string(path).map_err(|source| VerifyError::KeyRead {
        path: path.to_path_buf(),
        source,
    })?;
    TrustedKey::from_pem(&text, &path.display().to_string())
}

/// Which of cosign's storage forms a verified signature came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureForm {
    /// `sha256-<hex>.sig` tag with simple-signing layers.
    Legacy,
    /// OCI 1.1 referrer holding a sigstore bundle with a DSSE envelope.
    BundleDsse,
    /// OCI 1.1 referrer holding a sigstore bundle with a message signature over the image manifest.
    BundleMessage,
}

/// A signature that verified with a trusted key and vouches for the expected digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub digest: Digest,
    /// [`TrustedKey::source`] of the key that verified it.
    pub key: String,
    pub form: SignatureForm,
}

impl fmt::Display for SignatureForm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SignatureForm::Legacy => "cosign signature (.sig tag)",
            SignatureForm::BundleDsse => "sigstore bundle (DSSE)",
            SignatureForm::BundleMessage => "sigstore bundle (message signature)",
        })
    }
}

pub(crate) fn mode_name(mode: SignatureMode) -> &'static str {
    match mode {
        SignatureMode::Require => "require",
        SignatureMode::IfPresent => "if-present",
        SignatureMode::Off => "off",
    }
}
