//! Garbage collection: mark everything reachable from `index.json`, sweep the rest.
//!
//! Marking follows index → manifests (OCI and Docker media types, nested indexes) → configuration and layers,
//! plus the blobs a reference keeps through its `dev.flotilla.keep` annotation (index blob, cosign signatures and
//! referrers) and whatever those point at. A reachable manifest that cannot be parsed stops the collection with
//! an error rather than risk deleting what it names. Blobs named by a descriptor but absent (the other platforms of
//! an index) are simply not there to keep.
//!
//! Layer snapshots are `unpack`'s: the store only says which diff_ids its images still use, and a
//! [`SnapshotSweep`] removes the rest while the store is held exclusively, so no pull is unpacking meanwhile.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::layout::{self, Kind, OciLayout, read_bounded};
use super::{ANNOTATION_KEEP, PARTIAL_DIR, Store, StoreError, io_err};
use crate::digest::{Algorithm, Digest};
use crate::durable::{TMP_PREFIX, fsync_dir};
use crate::oci::{Descriptor, ImageConfig, ImageManifest, MAX_MANIFEST_BYTES};

/// Image configs are a few KiB; the pull refuses those over this too.
const MAX_CONFIG_BYTES: u64 = 8 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RemovedKind {
    /// A blob no reference reaches.
    Blob,
    /// A partial download no pull is working on.
    Partial,
    /// A temporary file left by an interrupted write.
    TempFile,
    /// A layer snapshot no stored image uses.
    Snapshot,
    /// A snapshot directory left by an interrupted unpack.
    SnapshotTemp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Removed {
    pub kind: RemovedKind,
    pub path: PathBuf,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GcReport {
    /// Nothing was deleted; `removed` is what would have been.
    pub dry_run: bool,
    /// Blobs kept because a reference reaches them.
    pub kept: usize,
    pub removed: Vec<Removed>,
}

impl GcReport {
    pub fn bytes_freed(&self) -> u64 {
        self.removed
            .iter()
            .map(|r| r.bytes)
            .fold(0, u64::saturating_add)
    }

    pub fn count(&self, kind: RemovedKind) -> usize {
        self.removed.iter().filter(|r| r.kind == kind).count()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcOptions {
    /// Report, delete nothing.
    pub dry_run: bool,
    /// Wait for running pulls instead of failing with [`StoreError::Busy`].
    pub wait: bool,
    /// Snapshots to keep although no stored image uses them: the layers of existing containers, whose roots are
    /// made of them (an image pulled again under the same name no longer references the old layers).
    pub keep_snapshots: BTreeSet<Digest>,
}

/// Whatever keeps layer snapshots beside the store.
pub trait SnapshotSweep {
    /// Reports the snapshots whose diff_id is not in `used`, and those an interrupted unpack left; removes them
    /// unless `dry_run`. Called while gc holds the store exclusively.
    fn sweep(&self, used: &BTreeSet<Digest>, dry_run: bool) -> Result<Vec<Removed>, StoreError>;
}

/// Collects the store under `state_dir`, holding `store.lock` exclusively, and sweeps `snapshots` meanwhile.
pub fn collect_garbage(
    state_dir: &Path,
    options: GcOptions,
    snapshots: &dyn SnapshotSweep,
) -> Result<GcReport, StoreError> {
    let dry_run = options.dry_run;
    let store = Store::open_exclusive(state_dir, options.wait)?;
    let layout = store.layout();
    let marked = mark(layout)?;
    let mut removed = Vec::new();
    for alg in [Algorithm::Sha256, Algorithm::Sha512] {
        let dir = layout.root().join("blobs").join(alg.name());
        for (name, bytes) in files(&dir)? {
            let kind = if name.starts_with(TMP_PREFIX) {
                RemovedKind::TempFile
            } else {
                match format!("{}:{name}", alg.name()).parse::<Digest>() {
                    Ok(d) if !marked.contains(&d) => RemovedKind::Blob,
                    // Kept, or a file flotilla did not write: not ours to delete.
                    _ => continue,
                }
            };
            removed.push(Removed {
                kind,
                path: dir.join(name),
                bytes,
            });
        }
    }
    for (name, bytes) in files(layout.root())? {
        if name.starts_with(TMP_PREFIX) {
            removed.push(Removed {
                kind: RemovedKind::TempFile,
                path: layout.root().join(name),
                bytes,
            });
        }
    }
    let partial_dir = state_dir.join(PARTIAL_DIR);
    for (name, bytes) in files(&partial_dir)? {
        removed.push(Removed {
            kind: RemovedKind::Partial,
            path: partial_dir.join(name),
            bytes,
        });
    }
    let mut used = options.keep_snapshots.clone();
    for digest in &marked {
        if let Some(diff_ids) = manifest_diff_ids(layout, digest) {
            used.extend(diff_ids);
        }
    }
    removed.extend(snapshots.sweep(&used, dry_run)?);
    if !dry_run {
        let mut dirs = BTreeSet::new();
        for r in removed
            .iter()
            .filter(|r| !matches!(r.kind, RemovedKind::Snapshot | RemovedKind::SnapshotTemp))
        {
            fs::remove_file(&r.path).map_err(io_err("remove", &r.path))?;
            if let Some(dir) = r.path.parent() {
                dirs.insert(dir.to_path_buf());
            }
        }
        for dir in dirs {
            fsync_dir(&dir)?;
        }
    }
    Ok(GcReport {
        dry_run,
        kept: marked.len(),
        removed,
    })
}

/// The diff_ids (base first) of `digest` if it is an image manifest in the layout with a readable config; `None`
/// for any other blob.
fn manifest_diff_ids(layout: &OciLayout, digest: &Digest) -> Option<Vec<Digest>> {
    let path = layout.blob_path(digest);
    if path.symlink_metadata().ok()?.len() > MAX_MANIFEST_BYTES {
        return None;
    }
    let bytes = read_bounded(&path, MAX_MANIFEST_BYTES, "a manifest").ok()?;
    let manifest: ImageManifest = serde_json::from_slice(&bytes).ok()?;
    image_diff_ids(layout, &manifest).ok()
}

/// The diff_ids, base first, that the config of `manifest` lists.
pub fn image_diff_ids(
    layout: &OciLayout,
    manifest: &ImageManifest,
) -> Result<Vec<Digest>, StoreError> {
    let config = manifest
        .config
        .as_ref()
        .ok_or_else(|| StoreError::NotLayout {
            path: layout.root().to_path_buf(),
            reason: "an image manifest has no config".into(),
        })?;
    let path = layout.blob_path(&config.digest);
    let bytes = read_bounded(&path, MAX_CONFIG_BYTES, "an image config")?;
    let config: ImageConfig =
        serde_json::from_slice(&bytes).map_err(|source| StoreError::Json {
            path,
            what: "image config",
            source,
        })?;
    Ok(config.rootfs.map(|r| r.diff_ids).unwrap_or_default())
}

/// Regular files and symlinks directly in `dir`, with their sizes; names that are not UTF-8 are not flotilla's.
fn files(dir: &Path) -> Result<Vec<(String, u64)>, StoreError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err("list", dir))? {
        let entry = entry.map_err(io_err("list", dir))?;
        let meta = entry
            .path()
            .symlink_metadata()
            .map_err(io_err("stat", &entry.path()))?;
        if meta.is_dir() {
            continue;
        }
        if let Ok(name) = entry.file_name().into_string() {
            out.push((name, meta.len()));
        }
    }
    out.sort();
    Ok(out)
}

/// Every digest reachable from the layout's `index.json` that is present in the layout.
pub fn mark(layout: &OciLayout) -> Result<BTreeSet<Digest>, StoreError> {
    let index = layout.index()?;
    let mut todo: Vec<(Digest, String)> = Vec::new();
    for d in &index.manifests {
        todo.push((d.digest.clone(), d.media_type.clone()));
        if let Some(keep) = d.annotations.get(ANNOTATION_KEEP) {
            for k in keep.split(',').filter(|k| !k.is_empty()) {
                let digest = k.parse::<Digest>().map_err(|e| StoreError::NotLayout {
                    path: layout.index_path(),
                    reason: format!("annotation {ANNOTATION_KEEP} holds {k:?}: {e}"),
                })?;
                todo.push((digest, String::new()));
            }
        }
    }
    let mut marked = BTreeSet::new();
    while let Some((digest, media_type)) = todo.pop() {
        if marked.contains(&digest) || !layout.has_blob(&digest) {
            continue;
        }
        marked.insert(digest.clone());
        let path = layout.blob_path(&digest);
        let known = layout::kind_of(&media_type) != Kind::Other;
        if known {
            let bytes = read_bounded(&path, MAX_MANIFEST_BYTES, "a manifest or image index")?;
            for c in layout::children(&path, &media_type, &bytes)? {
                todo.push((c.digest, c.media_type));
            }
        } else if media_type.is_empty() {
            // A kept blob of unstated type (a signature manifest, a referrer): follow it if it is a manifest.
            for c in sniff(&path).unwrap_or_default() {
                todo.push((c.digest, c.media_type));
            }
        }
    }
    Ok(marked)
}

fn sniff(path: &Path) -> Option<Vec<Descriptor>> {
    let len = path.metadata().ok()?.len();
    if len > MAX_MANIFEST_BYTES {
        return None;
    }
    let bytes = read_bounded(path, MAX_MANIFEST_BYTES, "a manifest").ok()?;
    layout::children(path, "", &bytes).ok()
}
