//! Reading an OCI image layout directory: the store itself, or removable media (`oci:/media/usb/images:app-v2`).
//!
//! A layout from outside is as untrusted as a registry: every read is bounded, every blob is checked against the
//! digest its file name claims while it is copied, and a mismatch names the file.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Deserialize;

use super::{Partial, StoreError, VerifiedBlob, io_err};
use crate::digest::{Digest, Verifier};
use crate::oci::{
    DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, Descriptor, ImageIndex, OCI_INDEX, OCI_MANIFEST,
};

/// Largest `index.json` read; a store with thousands of references stays far below it.
pub const MAX_INDEX_JSON_BYTES: u64 = 16 << 20;
const MAX_OCI_LAYOUT_BYTES: u64 = 4096;

/// What a manifest or index points at, whatever its flavour; used to walk the graph of blobs.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Links {
    #[serde(default)]
    pub media_type: Option<String>,
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
    #[serde(default)]
    pub config: Option<Descriptor>,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
}

/// How flotilla treats a blob of a given media type when following references.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Index,
    Manifest,
    Other,
}

pub(crate) fn kind_of(media_type: &str) -> Kind {
    match media_type {
        OCI_INDEX | DOCKER_MANIFEST_LIST => Kind::Index,
        OCI_MANIFEST | DOCKER_MANIFEST => Kind::Manifest,
        _ => Kind::Other,
    }
}

/// Parses a manifest or index blob and returns the descriptors it points at; `media_type` is the descriptor's,
/// falling back to the blob's own `mediaType` field when the descriptor had none flotilla knows.
pub(crate) fn children(
    path: &Path,
    media_type: &str,
    bytes: &[u8],
) -> Result<Vec<Descriptor>, StoreError> {
    let links: Links = serde_json::from_slice(bytes).map_err(|source| StoreError::Json {
        path: path.to_path_buf(),
        what: "manifest or image index",
        source,
    })?;
    let kind = match kind_of(media_type) {
        Kind::Other => kind_of(links.media_type.as_deref().unwrap_or("")),
        k => k,
    };
    Ok(match kind {
        Kind::Index => links.manifests,
        Kind::Manifest => links.config.into_iter().chain(links.layers).collect(),
        Kind::Other => Vec::new(),
    })
}

/// Opens a file that must be a regular file (following symlinks). `O_NONBLOCK` keeps a FIFO planted in a hostile
/// layout from hanging the open; it changes nothing for regular files.
pub(crate) fn open_regular(path: &Path) -> Result<(File, u64), StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)
        .map_err(io_err("open", path))?;
    let meta = file.metadata().map_err(io_err("stat", path))?;
    if !meta.is_file() {
        return Err(StoreError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    Ok((file, meta.len()))
}

/// Reads a whole file, refusing it when it is larger than `limit`, whether the size shows up front or only while
/// reading (a file that grows underneath).
pub(crate) fn read_bounded(
    path: &Path,
    limit: u64,
    what: &'static str,
) -> Result<Vec<u8>, StoreError> {
    let (file, len) = open_regular(path)?;
    if len > limit {
        return Err(StoreError::TooLarge {
            path: path.to_path_buf(),
            what,
            size: len,
            limit,
        });
    }
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io_err("read", path))?;
    if bytes.len() as u64 > limit {
        return Err(StoreError::TooLarge {
            path: path.to_path_buf(),
            what,
            size: bytes.len() as u64,
            limit,
        });
    }
    Ok(bytes)
}

/// Where an OCI layout source is: `oci:DIR[:NAME]`, split at the first colon after the scheme as skopeo does, so
/// a name may itself hold colons (`oci:/media/usb/images:docker.io/library/alpine:3.20`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciLayoutRef {
    pub dir: PathBuf,
    pub name: Option<String>,
}

/// The prefix that marks an OCI layout source where an image reference is expected.
pub const OCI_SCHEME: &str = "oci:";

impl FromStr for OciLayoutRef {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<OciLayoutRef, StoreError> {
        let bad = |reason: &str| StoreError::BadSource {
            spec: s.to_string(),
            reason: reason.to_string(),
        };
        let rest = s
            .strip_prefix(OCI_SCHEME)
            .ok_or_else(|| bad("it does not start with oci:"))?;
        let (dir, name) = match rest.split_once(':') {
            Some((dir, name)) => (dir, Some(name)),
            None => (rest, None),
        };
        if dir.is_empty() {
            return Err(bad(
                "the directory is empty; write oci:/path/to/layout[:name]",
            ));
        }
        let name = match name {
            None | Some("") => None,
            Some(n) => {
                super::validate_ref_name(n)?;
                Some(n.to_string())
            }
        };
        Ok(OciLayoutRef {
            dir: PathBuf::from(dir),
            name,
        })
    }
}

/// An OCI image layout directory opened for reading.
#[derive(Debug, Clone)]
pub struct OciLayout {
    root: PathBuf,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LayoutMarker {
    image_layout_version: String,
}

impl OciLayout {
    /// Opens `root` after checking its `oci-layout` marker.
    pub fn open(root: &Path) -> Result<OciLayout, StoreError> {
        let marker_path = root.join("oci-layout");
        let bytes = read_bounded(&marker_path, MAX_OCI_LAYOUT_BYTES, "an oci-layout marker")
            .map_err(|e| match e {
                StoreError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                    StoreError::NotLayout {
                        path: root.to_path_buf(),
                        reason: "it has no oci-layout file".to_string(),
                    }
                }
                other => other,
            })?;
        let marker: LayoutMarker =
            serde_json::from_slice(&bytes).map_err(|source| StoreError::Json {
                path: marker_path.clone(),
                what: "oci-layout marker",
                source,
            })?;
        if !marker.image_layout_version.starts_with("1.") {
            return Err(StoreError::NotLayout {
                path: root.to_path_buf(),
                reason: format!(
                    "imageLayoutVersion {:?} is not 1.x",
                    marker.image_layout_version
                ),
            });
        }
        Ok(OciLayout {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn index_path(&self) -> PathBuf {
        self.root.join("index.json")
    }

    /// Safe to join: a [`Digest`] is validated lowercase hex of fixed length.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root
            .join("blobs")
            .join(digest.algorithm().name())
            .join(digest.hex())
    }

    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    pub fn index(&self) -> Result<ImageIndex, StoreError> {
        let path = self.index_path();
        let bytes = read_bounded(&path, MAX_INDEX_JSON_BYTES, "an index.json")?;
        serde_json::from_slice(&bytes).map_err(|source| StoreError::Json {
            path,
            what: "index.json",
            source,
        })
    }

    /// The names in `index.json`, in file order.
    pub fn names(&self) -> Result<Vec<String>, StoreError> {
        Ok(self
            .index()?
            .manifests
            .iter()
            .filter_map(|d| d.ref_name().map(str::to_string))
            .collect())
    }

    /// The descriptor named `name`; without a name, the layout's only image, or an error listing the names.
    pub fn resolve(&self, name: Option<&str>) -> Result<Descriptor, StoreError> {
        let index = self.index()?;
        let names = || {
            index
                .manifests
                .iter()
                .map(|d| d.ref_name().unwrap_or("<unnamed>").to_string())
                .collect::<Vec<_>>()
        };
        match name {
            Some(name) => index
                .manifests
                .iter()
                .find(|d| d.ref_name() == Some(name))
                .cloned()
                .ok_or_else(|| StoreError::RefNotFound {
                    layout: self.root.clone(),
                    name: name.to_string(),
                    available: names(),
                }),
            None => match index.manifests.as_slice() {
                [] => Err(StoreError::EmptyLayout {
                    layout: self.root.clone(),
                }),
                [only] => Ok(only.clone()),
                _ => Err(StoreError::AmbiguousRef {
                    layout: self.root.clone(),
                    names: names(),
                }),
            },
        }
    }

    /// Reads a small blob (manifest, index, config), checking its size against the descriptor and `limit`, and its
    /// digest.
    pub fn read_blob(&self, digest: &Digest, size: u64, limit: u64) -> Result<Vec<u8>, StoreError> {
        let path = self.blob_path(digest);
        if size > limit {
            return Err(StoreError::TooLarge {
                path,
                what: "a manifest or configuration",
                size,
                limit,
            });
        }
        let bytes = read_bounded(&path, limit, "a manifest or configuration")
            .map_err(|e| self.missing(e, digest))?;
        if bytes.len() as u64 != size {
            return Err(StoreError::SizeMismatch {
                path,
                expected: size,
                actual: bytes.len() as u64,
            });
        }
        let mut v = Verifier::new(digest.algorithm());
        v.update(&bytes);
        let actual = v.finish();
        if &actual != digest {
            return Err(StoreError::DigestMismatch {
                path,
                expected: digest.clone(),
                actual,
            });
        }
        Ok(bytes)
    }

    pub(crate) fn missing(&self, e: StoreError, digest: &Digest) -> StoreError {
        match e {
            StoreError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                StoreError::BlobMissing {
                    layout: self.root.clone(),
                    digest: digest.clone(),
                }
            }
            other => other,
        }
    }

    /// Copies a blob into `partial`, resuming after what it already holds, hashing while copying; a blob whose
    /// bytes do not match its name or descriptor size is refused and the partial discarded.
    pub fn copy_blob(&self, partial: Partial) -> Result<VerifiedBlob, StoreError> {
        let path = self.blob_path(partial.digest());
        let (mut src, len) = open_regular(&path).map_err(|e| self.missing(e, partial.digest()))?;
        if len != partial.size() {
            return Err(StoreError::SizeMismatch {
                path,
                expected: partial.size(),
                actual: len,
            });
        }
        let (mut verifier, offset) = partial.resume()?;
        src.seek(SeekFrom::Start(offset))
            .map_err(io_err("seek", &path))?;
        let mut out = partial.append()?;
        let mut src = src.take(partial.size() - offset);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = src.read(&mut buf).map_err(io_err("read", &path))?;
            let Some(chunk) = buf.get(..n) else { break };
            if chunk.is_empty() {
                break;
            }
            verifier.update(chunk);
            out.write_all(chunk)
                .map_err(io_err("write", partial.path()))?;
        }
        drop(out);
        let actual = verifier.clone().finish();
        if &actual != partial.digest() || verifier.len() != partial.size() {
            let expected = partial.digest().clone();
            partial.discard();
            return Err(StoreError::DigestMismatch {
                path,
                expected,
                actual,
            });
        }
        partial.finish(verifier)
    }
}
