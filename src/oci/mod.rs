//! The OCI image model that every part of flotilla shares: media types, descriptors, image indexes, image
//! manifests and image configurations, and the one size limit for a manifest.
//!
//! Written here rather than taken from `oci-spec`'s image types for two reasons. Rewriting the store's
//! `index.json` must keep every field another tool wrote there (`other` holds what flotilla does not interpret),
//! and `oci-spec` drops unknown fields. And input from registries and removable media is parsed leniently where
//! the specification allows (a missing `mediaType`, an entry without `platform`) and checked by the caller, which
//! can then say which entry was wrong and why.

pub mod config;
pub mod media_type;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::digest::Digest;
pub use config::{ExecConfig, ImageConfig, RootFs};
pub use media_type::{DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST};

/// The largest manifest or image index flotilla reads, from a registry or a layout (containerd's limit): a
/// manifest is a few KiB, anything near this is an attack or a mistake.
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;

/// The annotation that names a reference in a layout's `index.json`.
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";

/// An OCI content descriptor. Fields flotilla does not interpret (`urls`, `data` ...) are kept in `other` as they
/// were, so rewriting `index.json` never loses what another tool wrote there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

impl Descriptor {
    pub fn new(media_type: &str, digest: Digest, size: u64) -> Descriptor {
        Descriptor {
            media_type: media_type.to_string(),
            digest,
            size,
            annotations: BTreeMap::new(),
            artifact_type: None,
            other: Map::new(),
        }
    }

    pub fn ref_name(&self) -> Option<&str> {
        self.annotations
            .get(ANNOTATION_REF_NAME)
            .map(String::as_str)
    }
}

/// An image index or a Docker manifest list, and a layout's `index.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageIndex {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

impl ImageIndex {
    pub fn empty() -> ImageIndex {
        ImageIndex {
            schema_version: 2,
            media_type: Some(OCI_INDEX.to_string()),
            manifests: Vec::new(),
            other: Map::new(),
        }
    }
}

/// The manifest of one image (OCI or Docker schema 2), or of an artifact such as a signature.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageManifest {
    #[serde(default)]
    pub media_type: Option<String>,
    #[serde(default)]
    pub artifact_type: Option<String>,
    /// Required by the specification; absent only in malformed input, which the reader refuses by name.
    #[serde(default)]
    pub config: Option<Descriptor>,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    #[serde(default)]
    pub subject: Option<Descriptor>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_descriptor_fields_survive_a_rewrite() {
        let text = r#"{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","size":7,"platform":{"architecture":"arm","os":"linux","variant":"v6"},"urls":["https://x"]}],"x-extra":1}"#;
        let index: ImageIndex = serde_json::from_str(text).unwrap();
        let again: Value = serde_json::to_value(&index).unwrap();
        let original: Value = serde_json::from_str(text).unwrap();
        assert_eq!(again, original);
    }

    #[test]
    fn a_manifest_without_media_type_or_subject_parses() {
        let m: ImageManifest = serde_json::from_str(r#"{"schemaVersion":2,"layers":[]}"#).unwrap();
        assert!(m.media_type.is_none() && m.config.is_none() && m.subject.is_none());
    }
}
