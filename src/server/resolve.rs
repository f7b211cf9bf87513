//! How the server reads an image when a release is made: only through [`Resolver`], so the API and its tests
//! never reach a registry themselves ([`RegistryResolver`] is the real one, which `serve` gives the server).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

use crate::platform::Platform;
use crate::registry::{ManifestContent, Reference, RegistryClient};

/// Reads an image's index from its registry when a release is made: the release is pinned to what it read.
pub trait Resolver: Send + Sync {
    fn resolve<'a>(
        &'a self,
        image: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Resolved, ResolveError>> + Send + 'a>>;
}

/// Why a release cannot be made from an image.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error(transparent)]
    Reference(#[from] crate::registry::ReferenceError),
    #[error("{}", crate::error_chain(.0))]
    Registry(#[from] crate::registry::RegistryError),
    #[error(
        "it is a single-platform image; a release needs a multi-arch index so each device can pick its variant"
    )]
    SinglePlatform,
    #[error("its index lists no platform")]
    NoPlatform,
}

#[derive(Debug, Clone)]
pub struct Resolved {
    pub pinned: String,
    pub manifests: BTreeMap<String, String>,
}

/// Resolves images with the registry client (`serve`'s, with its `--insecure-registry` hosts).
pub struct RegistryResolver(RegistryClient);

impl RegistryResolver {
    pub fn new(client: RegistryClient) -> RegistryResolver {
        RegistryResolver(client)
    }
}

impl Resolver for RegistryResolver {
    fn resolve<'a>(
        &'a self,
        image: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Resolved, ResolveError>> + Send + 'a>> {
        Box::pin(async move {
            let reference = image.parse::<Reference>()?;
            let manifest = self.0.fetch_manifest(&reference).await?;
            Ok(Resolved {
                pinned: format!("{}@{}", reference.repository(), manifest.digest),
                manifests: platforms(&manifest.content)?,
            })
        })
    }
}

/// Each platform of an index and its manifest's digest: the first entry of a platform listed twice, and never
/// buildx's attestation entries (`unknown/unknown`), which no device runs.
fn platforms(content: &ManifestContent) -> Result<BTreeMap<String, String>, ResolveError> {
    let ManifestContent::Index(index) = content else {
        return Err(ResolveError::SinglePlatform);
    };
    let mut manifests = BTreeMap::new();
    for d in &index.manifests {
        let Some(p) = d.other.get("platform").and_then(Platform::from_oci_json) else {
            continue;
        };
        if p.os == "unknown" {
            continue;
        }
        manifests
            .entry(p.to_string())
            .or_insert_with(|| d.digest.to_string());
    }
    if manifests.is_empty() {
        return Err(ResolveError::NoPlatform);
    }
    Ok(manifests)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(entries: &[(&str, &str, char)]) -> ManifestContent {
        let manifests: Vec<serde_json::Value> = entries
            .iter()
            .map(|(os, arch, hex)| {
                serde_json::json!({
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": format!("sha256:{}", hex.to_string().repeat(64)),
                    "size": 100,
                    "platform": {"os": os, "architecture": arch},
                })
            })
            .collect();
        let index = serde_json::json!({"schemaVersion": 2, "manifests": manifests});
        ManifestContent::Index(Box::new(serde_json::from_value(index).unwrap()))
    }

    #[test]
    fn an_index_pins_each_platform_once_and_skips_attestations() {
        let got = platforms(&index(&[
            ("linux", "arm64", 'a'),
            ("unknown", "unknown", 'b'),
            ("linux", "amd64", 'c'),
            ("linux", "arm64", 'd'),
        ]))
        .unwrap();
        let want: BTreeMap<String, String> = [("linux/amd64", 'c'), ("linux/arm64/v8", 'a')]
            .into_iter()
            .map(|(p, hex)| {
                (
                    p.to_string(),
                    format!("sha256:{}", hex.to_string().repeat(64)),
                )
            })
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn an_index_of_attestations_only_names_no_platform() {
        let err = platforms(&index(&[("unknown", "unknown", 'b')])).unwrap_err();
        assert!(matches!(err, ResolveError::NoPlatform), "{err}");
    }
}
