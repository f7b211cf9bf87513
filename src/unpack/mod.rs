//! Unpacking layers: safe extraction into per-layer snapshots, and a container root made from them.
//!
//! Every path a layer names is resolved inside the directory being written: the parent is opened through
//! [`crate::fs_root`] (the kernel's `openat2(root, parent, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`, or on kernels
//! before 5.6 a userspace walk with the same outcome), then the last component is made relative to that directory
//! with `*at` calls that never follow it (`O_NOFOLLOW`, `AT_SYMLINK_NOFOLLOW`). A symlink planted by a layer,
//! pointing anywhere, can only ever lead back inside the root, so no string check on paths is the defence (paths
//! are normalised only so that the index and the disk agree).
//!
//! A layer is read once: the same pass writes the files, hashes the uncompressed stream against the config's
//! `diff_id`, and builds the [`LayerIndex`](crate::layers::LayerIndex) the architecture proof uses.
//!
//! - [`extract`]: one layer's tar stream into a directory, with [`Limits`].
//! - [`snapshots`]: one directory per layer, keyed by `diff_id`, published atomically and shared by images.
//! - [`rootfs`]: a container's root from a stack of snapshots: overlayfs, or a flattened copy where overlayfs is
//!   not available.

pub mod extract;
pub mod rootfs;
pub mod snapshots;
mod write;

use std::path::PathBuf;

use crate::digest::Digest;
use crate::durable::DurableError;
use crate::layers::LayerError;

pub use extract::{Extracted, Skipped, extract};
pub use rootfs::{PreparedRoot, RootKind, prepare, prepare_as, release};
pub use snapshots::Snapshots;

/// Bounds on what one layer may expand to. The defaults take any real image; a hostile or broken layer stops
/// with [`UnpackError::Limit`], which names the environment variable that raises the bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Uncompressed bytes of one layer's tar stream (a decompression bomb stops here).
    pub max_bytes: u64,
    /// Entries in one layer.
    pub max_entries: u64,
    /// Bytes in one entry's path or link target.
    pub max_path: usize,
    /// Bytes of extended attributes (names and values) on one entry.
    pub max_xattr_bytes: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_bytes: 32 << 30,
            max_entries: 2_000_000,
            max_path: 4096,
            max_xattr_bytes: 64 << 10,
        }
    }
}

/// How each limit is named to the user, and the variable that raises it.
pub(crate) const ENV_MAX_BYTES: &str = "FLOTILLA_UNPACK_MAX_BYTES";
pub(crate) const ENV_MAX_ENTRIES: &str = "FLOTILLA_UNPACK_MAX_ENTRIES";
pub(crate) const ENV_MAX_PATH: &str = "FLOTILLA_UNPACK_MAX_PATH";
pub(crate) const ENV_MAX_XATTR: &str = "FLOTILLA_UNPACK_MAX_XATTR_BYTES";

impl Limits {
    /// The defaults, with each bound the environment sets (`FLOTILLA_UNPACK_MAX_BYTES`, `…_MAX_ENTRIES`,
    /// `…_MAX_PATH`, `…_MAX_XATTR_BYTES`) taken instead.
    pub fn from_env() -> Result<Limits, UnpackError> {
        fn read(name: &'static str) -> Result<Option<u64>, UnpackError> {
            match std::env::var(name) {
                Err(_) => Ok(None),
                Ok(v) => v
                    .trim()
                    .parse()
                    .map(Some)
                    .map_err(|_| UnpackError::BadLimit { name, value: v }),
            }
        }
        let mut limits = Limits::default();
        if let Some(v) = read(ENV_MAX_BYTES)? {
            limits.max_bytes = v;
        }
        if let Some(v) = read(ENV_MAX_ENTRIES)? {
            limits.max_entries = v;
        }
        if let Some(v) = read(ENV_MAX_PATH)? {
            limits.max_path = usize::try_from(v).unwrap_or(usize::MAX);
        }
        if let Some(v) = read(ENV_MAX_XATTR)? {
            limits.max_xattr_bytes = usize::try_from(v).unwrap_or(usize::MAX);
        }
        Ok(limits)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error(transparent)]
    Layer(#[from] LayerError),
    #[error(
        "cannot read layer {layer}: {source}; the blob is corrupt or truncated, remove it and pull again"
    )]
    Read {
        layer: String,
        source: std::io::Error,
    },
    #[error(
        "layer {layer} goes past the {what} limit of {max}; if you trust the image, raise it with {env}=<number>"
    )]
    Limit {
        layer: String,
        what: &'static str,
        max: u64,
        env: &'static str,
    },
    #[error("{name}={value:?} is not a number")]
    BadLimit { name: &'static str, value: String },
    #[error(
        "layer {layer} does not match the image config: its uncompressed content is {actual}, the config's diff_id \
         is {expected}; the image is corrupt or was tampered with, pull it again from a trusted source"
    )]
    DiffIdMismatch {
        layer: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("cannot {step} {path}: {source}")]
    Io {
        step: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Durable(#[from] DurableError),
    #[error(
        "snapshot {path} has an unreadable index ({reason}); remove the directory and pull the image again"
    )]
    BadIndex { path: PathBuf, reason: String },
    #[error(
        "layer {layer} has no diff_id to key its snapshot; the image config must list one per layer (a bug in the \
         caller if it does)"
    )]
    NoDiffId { layer: Digest },
    #[error("layer {diff_id} is not unpacked; pull the image with --unpack first")]
    NotUnpacked { diff_id: Digest },
    #[error("cannot mount the container root at {path}: {source}")]
    Mount {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub(crate) fn io_err(
    step: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(std::io::Error) -> UnpackError {
    let path = path.into();
    move |source| UnpackError::Io { step, path, source }
}
