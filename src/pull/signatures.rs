//! Finding and checking an image's cosign signatures: the legacy `sha256-<hex>.sig` tag and OCI 1.1 referrers.
//!
//! Every signature found is verified, and all outcomes go to the policy, which decides: one valid signature is
//! enough, invalid ones alone refuse, none found is for the mode (`require` or `if-present`) to judge.

use crate::digest::Digest;
use crate::registry::{BlobSpec, ManifestContent, Reference, RegistryClient};
use crate::verify::cosign;
use crate::verify::{TrustedKey, Verified, VerifyError};

use super::PullError;

/// Signature payloads and bundles are small JSON documents.
const MAX_SIGNATURE_BLOB: u64 = 1 << 20;
/// Signatures looked at per image; a registry listing more is not taken at its word.
const MAX_SIGNATURES: usize = 32;

pub async fn gather(
    client: &RegistryClient,
    reference: &Reference,
    digest: &Digest,
    keys: &[TrustedKey],
) -> Result<Vec<Result<Verified, VerifyError>>, PullError> {
    let repo = reference.repository();
    let mut outcomes = Vec::new();

    match client
        .fetch_manifest_by_tag(repo, &cosign::signature_tag(digest))
        .await
    {
        Ok(manifest) => match cosign::parse_signature_manifest(&manifest.bytes) {
            Ok(signatures) => {
                for sig in signatures.into_iter().take(MAX_SIGNATURES) {
                    let spec = BlobSpec {
                        digest: sig.payload.clone(),
                        size: sig.payload_size,
                    };
                    let payload = client
                        .fetch_blob_bytes(repo, &spec, MAX_SIGNATURE_BLOB)
                        .await?;
                    outcomes.push(cosign::verify_simple_signing(&payload, &sig, keys, digest));
                }
            }
            Err(e) => outcomes.push(Err(e)),
        },
        Err(e) if e.is_not_found() => {}
        Err(e) => return Err(e.into()),
    }

    for referrer in client
        .fetch_referrers(repo, digest, None)
        .await?
        .into_iter()
        .take(MAX_SIGNATURES)
    {
        if !cosign::is_signature_referrer(referrer.artifact_type.as_deref(), &referrer.annotations)
        {
            continue;
        }
        let manifest = client
            .fetch_manifest(&reference.with_digest(referrer.digest))
            .await?;
        if !matches!(manifest.content, ManifestContent::Image(_)) {
            continue;
        }
        let layer = match cosign::parse_bundle_manifest(&manifest.bytes, digest) {
            Ok(layer) => layer,
            Err(e) => {
                outcomes.push(Err(e));
                continue;
            }
        };
        let spec = BlobSpec {
            digest: layer.digest,
            size: layer.size,
        };
        let bundle = client
            .fetch_blob_bytes(repo, &spec, MAX_SIGNATURE_BLOB)
            .await?;
        outcomes.push(cosign::verify_bundle(&bundle, keys, digest));
    }
    Ok(outcomes)
}
