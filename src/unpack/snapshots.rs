//! Snapshots: each layer unpacked once, into `<state_dir>/snapshots/<alg>/<hex>/`, keyed by its `diff_id` and
//! shared by every image that has the layer.
//!
//! A snapshot directory holds `rootfs/` (the layer's files, whiteouts as overlayfs reads them) and `index.json`
//! (the [`LayerIndex`] the architecture proof reads, and what could not be reproduced). It is published in these
//! steps, under `locks/<alg>-<hex>.lock`:
//! 1. Remove any `tmp-<hex>-*` left by a writer that died (the lock says none is running).
//! 2. Extract into `tmp-<hex>-<random>/rootfs` and write `index.json` beside it.
//! 3. `syncfs` the filesystem once: one call instead of an fsync per file of a layer with thousands.
//! 4. `rename` the directory to `<alg>/<hex>`, then fsync `<alg>/`.
//!
//! So `<alg>/<hex>` exists only whole; a crash leaves a `tmp-*` directory, which is never read, and which the next
//! unpack of that layer or `flotilla gc` removes.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use rustix::fs::FlockOperation;
use serde::{Deserialize, Serialize};

use super::extract::{Extracted, Skipped, extract};
use super::write::remove_dir_if_present;
use super::{Limits, UnpackError, io_err};
use crate::digest::{Algorithm, Digest};
use crate::durable::{create_dir, fsync_dir, lock_file, write_atomic};
use crate::layers::{LayerIndex, LayerSource};
use crate::store::StoreError;
use crate::store::gc::{Removed, RemovedKind, SnapshotSweep};

pub const SNAPSHOTS_DIR: &str = "snapshots";
/// Names of directories being written (or left by a crash) directly under `snapshots/`.
pub const TMP_SNAPSHOT_PREFIX: &str = "tmp-";
const INDEX_FILE: &str = "index.json";
const ROOTFS_DIR: &str = "rootfs";
/// Index files are a few MiB even for layers with a hundred thousand entries.
const MAX_INDEX_BYTES: u64 = 512 << 20;

/// What is stored beside a snapshot's `rootfs/`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub diff_id: Digest,
    pub index: LayerIndex,
    /// Whiteouts and opaque markers are overlayfs's own; when false only a flattened copy is right.
    pub overlay_ready: bool,
    pub skipped: Skipped,
}

/// The snapshots under one state directory.
#[derive(Debug, Clone)]
pub struct Snapshots {
    dir: PathBuf,
}

/// What [`Snapshots::ensure`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ensured {
    /// The snapshot was already there; the layer was not read.
    Present,
    /// The layer was unpacked now.
    Unpacked(Skipped),
}

impl Snapshots {
    /// Opens (creating) `<state_dir>/snapshots`.
    pub fn open(state_dir: &Path) -> Result<Snapshots, UnpackError> {
        let dir = state_dir.join(SNAPSHOTS_DIR);
        for alg in [Algorithm::Sha256, Algorithm::Sha512] {
            create_dir(&dir.join(alg.name()))?;
        }
        create_dir(&dir.join("locks"))?;
        Ok(Snapshots { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the snapshot of `diff_id` lives once published.
    pub fn path(&self, diff_id: &Digest) -> PathBuf {
        self.dir
            .join(diff_id.algorithm().name())
            .join(diff_id.hex())
    }

    /// The snapshot's files, if it has been published.
    pub fn rootfs(&self, diff_id: &Digest) -> Option<PathBuf> {
        let dir = self.path(diff_id);
        dir.join(INDEX_FILE).is_file().then(|| dir.join(ROOTFS_DIR))
    }

    /// The diff_ids among `diff_ids` that have no snapshot yet.
    pub fn missing(&self, diff_ids: &[Digest]) -> Vec<Digest> {
        diff_ids
            .iter()
            .filter(|d| self.rootfs(d).is_none())
            .cloned()
            .collect()
    }

    /// The stored index and flags of a published snapshot.
    pub fn meta(&self, diff_id: &Digest) -> Result<SnapshotMeta, UnpackError> {
        let path = self.path(diff_id).join(INDEX_FILE);
        if !path.is_file() {
            return Err(UnpackError::NotUnpacked {
                diff_id: diff_id.clone(),
            });
        }
        let bytes = crate::store::layout::read_bounded(&path, MAX_INDEX_BYTES, "a snapshot index")
            .map_err(|e| UnpackError::BadIndex {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        serde_json::from_slice(&bytes).map_err(|e| UnpackError::BadIndex {
            path,
            reason: e.to_string(),
        })
    }

    /// Unpacks `layer` (its `diff_id` must be set) into its snapshot unless it is there already.
    pub fn ensure(&self, layer: &LayerSource, limits: &Limits) -> Result<Ensured, UnpackError> {
        let diff_id = layer.diff_id.clone().ok_or_else(|| UnpackError::NoDiffId {
            layer: layer.digest.clone(),
        })?;
        let lock_path = self.dir.join("locks").join(format!(
            "{}-{}.lock",
            diff_id.algorithm().name(),
            diff_id.hex()
        ));
        let _lock = lock_file(&lock_path, FlockOperation::LockExclusive)?;
        if self.rootfs(&diff_id).is_some() {
            return Ok(Ensured::Present);
        }
        self.remove_stale(Some(&diff_id))?;
        let tmp = self.dir.join(format!(
            "{TMP_SNAPSHOT_PREFIX}{}-{:016x}",
            diff_id.hex(),
            rand::random::<u64>()
        ));
        let result = self.build(layer, &diff_id, &tmp, limits);
        if result.is_err() {
            let _ = remove_dir_if_present(&tmp);
        }
        result.map(|e| Ensured::Unpacked(e.skipped))
    }

    fn build(
        &self,
        layer: &LayerSource,
        diff_id: &Digest,
        tmp: &Path,
        limits: &Limits,
    ) -> Result<Extracted, UnpackError> {
        let rootfs = tmp.join(ROOTFS_DIR);
        fs::create_dir(tmp).map_err(io_err("create", tmp))?;
        fs::create_dir(&rootfs).map_err(io_err("create", &rootfs))?;
        let extracted = extract(layer, &rootfs, limits)?;
        let meta = SnapshotMeta {
            diff_id: diff_id.clone(),
            index: extracted.index.clone(),
            overlay_ready: extracted.overlay_ready,
            skipped: extracted.skipped,
        };
        let bytes = serde_json::to_vec(&meta).map_err(|e| UnpackError::BadIndex {
            path: tmp.join(INDEX_FILE),
            reason: e.to_string(),
        })?;
        write_atomic(tmp, INDEX_FILE, &bytes)?;
        let dir = File::open(tmp).map_err(io_err("open", tmp))?;
        rustix::fs::syncfs(&dir).map_err(|e| io_err("sync the filesystem of", tmp)(e.into()))?;
        let dest = self.path(diff_id);
        fs::rename(tmp, &dest).map_err(io_err("publish snapshot", &dest))?;
        if let Some(parent) = dest.parent() {
            fsync_dir(parent)?;
        }
        Ok(extracted)
    }

    /// Removes `tmp-*` directories: those of `diff_id` (its lock held), or all of them (the caller holds the
    /// store exclusively, so no pull is writing one). Returns what was removed.
    pub fn remove_stale(&self, diff_id: Option<&Digest>) -> Result<Vec<PathBuf>, UnpackError> {
        let prefix = match diff_id {
            Some(d) => format!("{TMP_SNAPSHOT_PREFIX}{}-", d.hex()),
            None => TMP_SNAPSHOT_PREFIX.to_string(),
        };
        let mut removed = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_err("list", &self.dir))? {
            let entry = entry.map_err(io_err("list", &self.dir))?;
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                remove_dir_if_present(&entry.path())?;
                removed.push(entry.path());
            }
        }
        Ok(removed)
    }

    /// Every published snapshot's diff_id.
    pub fn list(&self) -> Result<Vec<Digest>, UnpackError> {
        let mut out = Vec::new();
        for alg in [Algorithm::Sha256, Algorithm::Sha512] {
            let dir = self.dir.join(alg.name());
            for entry in fs::read_dir(&dir).map_err(io_err("list", &dir))? {
                let entry = entry.map_err(io_err("list", &dir))?;
                if let Ok(d) =
                    format!("{}:{}", alg.name(), entry.file_name().to_string_lossy()).parse()
                {
                    out.push(d);
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Removes the published snapshot of `diff_id` (gc, holding the store exclusively).
    pub fn remove(&self, diff_id: &Digest) -> Result<(), UnpackError> {
        let path = self.path(diff_id);
        // Its index goes first, so a snapshot half removed by a crash is no longer taken for whole.
        match fs::remove_file(path.join(INDEX_FILE)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove", path.join(INDEX_FILE))(e)),
        }
        remove_dir_if_present(&path)
    }
}

impl SnapshotSweep for Snapshots {
    fn sweep(&self, used: &BTreeSet<Digest>, dry_run: bool) -> Result<Vec<Removed>, StoreError> {
        let err = |e: UnpackError| StoreError::Io {
            step: "collect snapshots in",
            path: self.dir.clone(),
            source: std::io::Error::other(e.to_string()),
        };
        let list_err = |source| StoreError::Io {
            step: "list",
            path: self.dir.clone(),
            source,
        };
        let mut removed = Vec::new();
        let mut doomed = Vec::new();
        for diff_id in self.list().map_err(err)? {
            if !used.contains(&diff_id) {
                let path = self.path(&diff_id);
                removed.push(Removed {
                    kind: RemovedKind::Snapshot,
                    bytes: tree_bytes(&path),
                    path,
                });
                doomed.push(diff_id);
            }
        }
        for entry in fs::read_dir(&self.dir).map_err(list_err)? {
            let entry = entry.map_err(list_err)?;
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(TMP_SNAPSHOT_PREFIX)
            {
                removed.push(Removed {
                    kind: RemovedKind::SnapshotTemp,
                    bytes: tree_bytes(&entry.path()),
                    path: entry.path(),
                });
            }
        }
        if !dry_run {
            // gc holds the store exclusively, so no pull is unpacking: every tmp- snapshot is a crash's leftover.
            self.remove_stale(None).map_err(err)?;
            for diff_id in &doomed {
                self.remove(diff_id).map_err(err)?;
            }
        }
        Ok(removed)
    }
}

/// Bytes of the files under `path`, not following symlinks; what removing it frees, near enough for a report.
fn tree_bytes(path: &Path) -> u64 {
    let mut total = 0u64;
    let mut todo = vec![path.to_path_buf()];
    while let Some(dir) = todo.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(md) = entry.path().symlink_metadata() else {
                continue;
            };
            if md.is_dir() {
                todo.push(entry.path());
            } else {
                total = total.saturating_add(md.len());
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(dir: &Path, files: &[(&str, &[u8])]) -> LayerSource {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, path, *data).unwrap();
        }
        let tar = b.into_inner().unwrap();
        let digest = Digest::sha256_of(&tar);
        let path = dir.join(digest.hex());
        fs::write(&path, &tar).unwrap();
        LayerSource {
            digest,
            media_type: "application/vnd.oci.image.layer.v1.tar".into(),
            path,
            diff_id: Some(Digest::sha256_of(&tar)),
        }
    }

    #[test]
    fn a_leftover_of_the_same_layer_is_removed_and_never_read() {
        for resolver in crate::fs_root::Resolver::available() {
            crate::fs_root::with_resolver(resolver, a_leftover_is_removed_and_never_read);
        }
    }

    fn a_leftover_is_removed_and_never_read() {
        let dir = tempfile::tempdir().unwrap();
        let snapshots = Snapshots::open(dir.path()).unwrap();
        let source = layer(dir.path(), &[("bin/app", b"app")]);
        let diff_id = source.diff_id.clone().unwrap();
        let leftover = snapshots
            .dir()
            .join(format!("{TMP_SNAPSHOT_PREFIX}{}-dead", diff_id.hex()));
        fs::create_dir_all(leftover.join("rootfs/bin")).unwrap();
        fs::write(leftover.join("rootfs/bin/app"), b"half").unwrap();
        assert!(
            snapshots.rootfs(&diff_id).is_none(),
            "a tmp- directory is not a snapshot"
        );
        assert!(matches!(
            snapshots.ensure(&source, &Limits::default()).unwrap(),
            Ensured::Unpacked(_)
        ));
        assert!(!leftover.exists());
        let rootfs = snapshots.rootfs(&diff_id).unwrap();
        assert_eq!(fs::read(rootfs.join("bin/app")).unwrap(), b"app");
        let meta = snapshots.meta(&diff_id).unwrap();
        assert_eq!(meta.diff_id, diff_id);
        assert_eq!(
            snapshots.ensure(&source, &Limits::default()).unwrap(),
            Ensured::Present
        );
        assert_eq!(snapshots.list().unwrap(), std::slice::from_ref(&diff_id));
        snapshots.remove(&diff_id).unwrap();
        assert!(snapshots.rootfs(&diff_id).is_none());
        assert!(snapshots.list().unwrap().is_empty());
    }
}
