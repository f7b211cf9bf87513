//! Manifests: fetching one (verified against its digest, capped in size), listing referrers, and telling the
//! four manifest kinds apart from Content-Type and the body's own `mediaType`.

use reqwest::StatusCode;
use reqwest::header::{self, HeaderMap, HeaderValue};

use super::client::{Endpoint, RegistryClient};
use super::transport::{Fault, check_status, media_type_of, read_capped};
use super::{At, RegistryError};
use crate::digest::{Digest, Verifier};

use crate::oci::{
    DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, ImageIndex, ImageManifest, MAX_MANIFEST_BYTES,
    OCI_INDEX, OCI_MANIFEST,
};

const SCHEMA1: [&str; 2] = [
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestKind {
    OciIndex,
    OciManifest,
    DockerManifestList,
    DockerManifest,
}

impl ManifestKind {
    pub fn media_type(self) -> &'static str {
        match self {
            ManifestKind::OciIndex => OCI_INDEX,
            ManifestKind::OciManifest => OCI_MANIFEST,
            ManifestKind::DockerManifestList => DOCKER_MANIFEST_LIST,
            ManifestKind::DockerManifest => DOCKER_MANIFEST,
        }
    }

    pub fn from_media_type(s: &str) -> Option<ManifestKind> {
        [
            ManifestKind::OciIndex,
            ManifestKind::OciManifest,
            ManifestKind::DockerManifestList,
            ManifestKind::DockerManifest,
        ]
        .into_iter()
        .find(|k| k.media_type() == s)
    }

    pub fn is_index(self) -> bool {
        matches!(
            self,
            ManifestKind::OciIndex | ManifestKind::DockerManifestList
        )
    }
}

/// A manifest exactly as the registry served it (the bytes the digest covers) and parsed.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub digest: Digest,
    pub kind: ManifestKind,
    pub bytes: Vec<u8>,
    pub content: ManifestContent,
}

#[derive(Debug, Clone)]
pub enum ManifestContent {
    Index(Box<ImageIndex>),
    Image(Box<ImageManifest>),
}

impl RegistryClient {
    /// The one capped read of a manifest or index body: refused as soon as it passes [`MAX_MANIFEST_BYTES`].
    async fn read_manifest_body(
        &self,
        resp: &mut reqwest::Response,
        ep: &Endpoint,
        at: &At,
    ) -> Result<Vec<u8>, Fault> {
        read_capped(
            resp,
            at,
            &ep.base,
            MAX_MANIFEST_BYTES,
            self.inner.options.read_timeout,
        )
        .await
    }

    pub(super) async fn manifest_attempt(
        &self,
        ep: &Endpoint,
        at: &At,
        pinned: Option<&Digest>,
        mref: &str,
    ) -> Result<Manifest, Fault> {
        let url = self.url(ep, at, &format!("manifests/{mref}"))?;
        let accept = [
            OCI_INDEX,
            OCI_MANIFEST,
            DOCKER_MANIFEST_LIST,
            DOCKER_MANIFEST,
        ]
        .join(", ");
        let mut headers = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(&accept) {
            headers.insert(header::ACCEPT, v);
        }
        let mut resp = self.send(ep, at, url, headers, true).await?;
        check_status(at, &resp, self.inner.clock.now())?;
        let content_type = media_type_of(&resp);
        if let Some(ct) = &content_type {
            if SCHEMA1.contains(&ct.as_str()) {
                return Err(Fault::fatal(RegistryError::Schema1 {
                    at: Box::new(at.clone()),
                }));
            }
        }
        if let Some(ct) = &content_type {
            if ManifestKind::from_media_type(ct).is_none() && ct != "application/json" {
                let hint = if ct.starts_with("text/html") {
                    "; an HTML page usually means a login portal or proxy answered instead of a registry"
                } else {
                    ""
                };
                return Err(Fault::fatal(RegistryError::UnsupportedMediaType {
                    at: Box::new(at.clone()),
                    media_type: ct.clone(),
                    hint,
                }));
            }
        }
        let hinted = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<Digest>().ok());
        let bytes = self.read_manifest_body(&mut resp, ep, at).await?;
        let algorithm = pinned
            .map(|d| d.algorithm())
            .unwrap_or(crate::digest::Algorithm::Sha256);
        let mut v = Verifier::new(algorithm);
        v.update(&bytes);
        let digest = v.finish();
        if let Some(expected) = pinned {
            if *expected != digest {
                return Err(Fault::fatal(RegistryError::DigestMismatch {
                    at: Box::new(at.clone()),
                    expected: expected.clone(),
                    actual: digest,
                }));
            }
        }
        if let Some(h) = hinted {
            if h.algorithm() == digest.algorithm() && h != digest {
                tracing::warn!(registry = %at.registry, "Docker-Content-Digest {h} differs from the computed {digest}; using the computed one");
            }
        }
        let (kind, content) =
            parse_manifest(at, content_type.as_deref(), &bytes).map_err(Fault::fatal)?;
        Ok(Manifest {
            digest,
            kind,
            bytes,
            content,
        })
    }

    /// `Ok(None)` when the registry has no referrers API (404), so the caller falls back to the tag schema.
    pub(super) async fn referrers_attempt(
        &self,
        ep: &Endpoint,
        at: &At,
        subject: &Digest,
    ) -> Result<Option<ImageIndex>, Fault> {
        let url = self.url(ep, at, &format!("referrers/{subject}"))?;
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_static(OCI_INDEX));
        let mut resp = self.send(ep, at, url, headers, true).await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        check_status(at, &resp, self.inner.clock.now())?;
        match media_type_of(&resp).as_deref() {
            Some(OCI_INDEX) => {}
            other => {
                return Err(Fault::fatal(RegistryError::UnsupportedMediaType {
                    at: Box::new(at.clone()),
                    media_type: other.unwrap_or("none").to_string(),
                    hint: "; the referrers API must answer with an OCI image index",
                }));
            }
        }
        let bytes = self.read_manifest_body(&mut resp, ep, at).await?;
        serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            Fault::fatal(RegistryError::Malformed {
                at: Box::new(at.clone()),
                reason: format!("the referrers index is not valid JSON: {e}"),
            })
        })
    }
}

/// Decides the manifest's kind from Content-Type and the body's own `mediaType`, refusing schema 1 and anything
/// unknown, then parses it.
pub(super) fn parse_manifest(
    at: &At,
    content_type: Option<&str>,
    bytes: &[u8],
) -> Result<(ManifestKind, ManifestContent), RegistryError> {
    let malformed = |reason: String| RegistryError::Malformed {
        at: Box::new(at.clone()),
        reason,
    };
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| malformed(format!("the manifest is not JSON: {e}")))?;
    let obj = value
        .as_object()
        .ok_or_else(|| malformed("the manifest is not a JSON object".into()))?;
    if obj.get("schemaVersion").and_then(|v| v.as_u64()) == Some(1) {
        return Err(RegistryError::Schema1 {
            at: Box::new(at.clone()),
        });
    }
    let declared = obj.get("mediaType").and_then(|v| v.as_str());
    if let Some(d) = declared {
        if SCHEMA1.contains(&d) {
            return Err(RegistryError::Schema1 {
                at: Box::new(at.clone()),
            });
        }
    }
    let from_header = content_type.and_then(ManifestKind::from_media_type);
    let kind = match (from_header, declared) {
        (Some(h), Some(d)) if d != h.media_type() => {
            return Err(malformed(format!(
                "Content-Type says {} but the manifest says {d}",
                h.media_type()
            )));
        }
        (Some(h), _) => h,
        (None, Some(d)) => {
            ManifestKind::from_media_type(d).ok_or_else(|| RegistryError::UnsupportedMediaType {
                at: Box::new(at.clone()),
                media_type: d.to_string(),
                hint: "",
            })?
        }
        // OCI allows leaving mediaType out; the shape tells.
        (None, None) if obj.contains_key("manifests") => ManifestKind::OciIndex,
        (None, None) if obj.contains_key("layers") => ManifestKind::OciManifest,
        (None, None) => {
            return Err(malformed(
                "no media type in the answer or the manifest, and it has neither manifests nor layers".into(),
            ));
        }
    };
    let content = if kind.is_index() {
        ManifestContent::Index(
            serde_json::from_value(value)
                .map_err(|e| malformed(format!("not a valid image index: {e}")))?,
        )
    } else {
        ManifestContent::Image(
            serde_json::from_value(value)
                .map_err(|e| malformed(format!("not a valid image manifest: {e}")))?,
        )
    };
    Ok((kind, content))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Step;

    fn at() -> At {
        At {
            registry: "r.io".into(),
            repository: "app".into(),
            step: Step::Manifest("latest".into()),
        }
    }

    #[test]
    fn manifest_kinds() {
        let index = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;
        let (k, c) = parse_manifest(&at(), Some(OCI_INDEX), index).unwrap();
        assert_eq!(k, ManifestKind::OciIndex);
        assert!(matches!(c, ManifestContent::Index(_)));
        // No mediaType anywhere: the shape decides.
        let (k, _) = parse_manifest(
            &at(),
            Some("application/json"),
            br#"{"schemaVersion":2,"manifests":[]}"#,
        )
        .unwrap();
        assert_eq!(k, ManifestKind::OciIndex);
        let s1 = br#"{"schemaVersion":1,"name":"x","tag":"y","fsLayers":[]}"#;
        let err = parse_manifest(&at(), None, s1).unwrap_err().to_string();
        assert!(err.contains("schema 1 manifests are deprecated"), "{err}");
        let err = parse_manifest(&at(), Some(OCI_MANIFEST), index)
            .unwrap_err()
            .to_string();
        assert!(err.contains("Content-Type says"), "{err}");
        let err = parse_manifest(
            &at(),
            None,
            br#"{"mediaType":"application/x-weird","layers":[]}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("application/x-weird") && err.contains("r.io"),
            "{err}"
        );
        let err = parse_manifest(&at(), Some(OCI_INDEX), b"<html>")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("not JSON") && err.contains("fetching manifest latest"),
            "{err}"
        );
        let err = parse_manifest(&at(), Some(OCI_INDEX), br#"{"manifests": 7}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a valid image index"), "{err}");
    }
}
