//! The content store: what flotilla pulled, kept as an OCI image layout that skopeo and umoci can read.
//!
//! # On disk
//!
//! ```text
//! <state_dir>/store.lock          pulls hold it shared, gc exclusive
//! <state_dir>/index.lock          held exclusive for each read-modify-write of index.json
//! <state_dir>/partial/<alg>-<hex> blobs being downloaded (resumable); never read as content
//! <state_dir>/images/             the OCI image layout: `skopeo inspect oci:<state_dir>/images:<name>`
//!     oci-layout                  {"imageLayoutVersion":"1.0.0"}
//!     index.json                  one descriptor per reference, named by org.opencontainers.image.ref.name
//!     blobs/sha256/<hex>          content, only ever verified bytes
//!     blobs/sha512/<hex>
//! ```
//!
//! Each reference's descriptor in `index.json` points at the chosen platform's manifest (so `umoci unpack` takes
//! it directly) and carries flotilla's facts as annotations in the `dev.flotilla.` namespace: the source reference
//! as the user wrote it, the resolved index digest, the chosen platform, the time of the pull, and the digests of
//! further blobs the reference keeps alive (the index itself, signatures).
//!
//! Partial files live outside the layout so that the layout only ever holds verified content: skopeo, umoci or a
//! copy of the directory never see half a blob. `partial/` and `images/` must be on one filesystem, since publishing a blob is a rename between them; they are
//! siblings under the state directory, so that holds unless someone mounts over `images/` (then publishing fails
//! with the rename's error rather than copying).
//!
//! # Crash safety
//!
//! A file becomes visible under its final name only by `rename(2)`, which replaces atomically, and only after its
//! bytes are on disk ([`crate::durable`] does the whole-file case). The steps, in order, for every file the store
//! writes:
//!
//! 1. Write the bytes to a temporary file: `.tmp-<pid>-<n>-<name>` in the destination directory for whole files
//!    (`index.json`, blobs handed in whole, `oci-layout`), or `partial/<alg>-<hex>` for streamed blobs.
//! 2. `fsync` the temporary file, so the rename can never expose a name whose data is still in the page cache.
//! 3. Verify: a blob handed in whole is hashed here; a streamed blob is accepted only as a [`VerifiedBlob`], which
//!    exists only if the [`Verifier`] that saw every byte on its way into the partial file produced the expected
//!    digest and length (re-hashing on publish would hash each byte twice).
//! 4. `rename` into place.
//! 5. `fsync` the destination directory (and, for a partial, the `partial/` directory), so the rename itself is
//!    durable.
//!
//! A pull is all-or-nothing because references are written last: blobs first, in any order, then one atomic
//! replacement of `index.json` adding every reference of the pull ([`Store::commit`]), which first checks that the
//! manifest and all blobs it names are present. A crash before that leaves `index.json` as it was; what remains is
//! published but unreferenced blobs (kept until gc) and partial files, which the next pull resumes
//! ([`Partial::resume`]) and `flotilla gc` removes. After a crash at any step the store is one of: the old state,
//! the old state plus unreferenced files, or the new state.
//!
//! # Concurrency
//!
//! `store.lock` is an `flock`: every [`Store::open`] holds it shared for the life of the [`Store`], garbage
//! collection ([`gc::collect_garbage`]) takes it exclusive (waiting for running pulls, or failing at once, as the
//! caller chooses), so gc never deletes a blob a pull has published but not yet referenced. Waiting is also what
//! makes gc robust against a lock briefly inherited by a child process between its `fork` and `exec`. Two pulls may run together: each partial file is
//! itself `flock`ed while written, and `index.json` updates serialise on `index.lock`. Readers (`flotilla images`)
//! take no lock: `index.json` is only ever replaced whole.

pub mod gc;
pub mod layout;
pub mod space;

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rustix::fs::FlockOperation;
use serde::Serialize;

use crate::digest::{Algorithm, Digest, Verifier};
use crate::durable::{DurableError, create_dir, fsync_dir, lock_file, write_atomic};
use crate::oci::{
    ANNOTATION_REF_NAME, Descriptor, ImageConfig, ImageIndex, ImageManifest, MAX_MANIFEST_BYTES,
};
use crate::platform::Platform;
pub use layout::{MAX_INDEX_JSON_BYTES, OCI_SCHEME, OciLayout, OciLayoutRef};
pub use space::{FreeSpace, Statvfs, check_space, space_needed};

/// The layout directory under the state directory.
pub const IMAGES_DIR: &str = "images";
pub const PARTIAL_DIR: &str = "partial";

pub const ANNOTATION_SOURCE: &str = "dev.flotilla.source";
pub const ANNOTATION_INDEX_DIGEST: &str = "dev.flotilla.index.digest";
pub const ANNOTATION_PLATFORM: &str = "dev.flotilla.platform";
pub const ANNOTATION_PULLED: &str = "dev.flotilla.pulled";
/// Comma-separated digests of further blobs the reference keeps (the image index, signature manifests); gc marks
/// them and whatever they point at.
pub const ANNOTATION_KEEP: &str = "dev.flotilla.keep";

const MAX_REF_NAME: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot {step} {path}: {source}")]
    Io {
        step: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is {size} bytes, more than the {limit} bytes flotilla accepts for {what}; refusing it"
    )]
    TooLarge {
        path: PathBuf,
        what: &'static str,
        size: u64,
        limit: u64,
    },
    #[error("{path} is not a valid {what}: {source}")]
    Json {
        path: PathBuf,
        what: &'static str,
        source: serde_json::Error,
    },
    #[error("{path} is not a regular file; refusing to read it")]
    NotAFile { path: PathBuf },
    #[error("{path} is not an OCI image layout: {reason}")]
    NotLayout { path: PathBuf, reason: String },
    #[error(
        "blob {path} does not match its digest: expected {expected}, got {actual}; the source is corrupt or was tampered with"
    )]
    DigestMismatch {
        path: PathBuf,
        expected: Digest,
        actual: Digest,
    },
    #[error(
        "blob {path} is {actual} bytes but its descriptor says {expected}; the source is corrupt or was tampered with"
    )]
    SizeMismatch {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("blob {digest} is missing from the OCI layout {layout}")]
    BlobMissing { layout: PathBuf, digest: Digest },
    #[error(
        "no image named {name:?} in the OCI layout {layout}; it holds: {}",
        list(available)
    )]
    RefNotFound {
        layout: PathBuf,
        name: String,
        available: Vec<String>,
    },
    #[error(
        "the OCI layout {} holds several images ({}); name one as oci:{}:NAME",
        layout.display(), list(names), layout.display()
    )]
    AmbiguousRef { layout: PathBuf, names: Vec<String> },
    #[error("the OCI layout {layout} holds no images")]
    EmptyLayout { layout: PathBuf },
    #[error(
        "not enough disk space: needs {} MiB, {} MiB free on {} ({} MiB to download + {} MiB unpacked + 10% + 64 MiB margin); free some space or run `flotilla gc`",
        needed.div_ceil(MIB), available / MIB, path.display(), download.div_ceil(MIB), unpacked.div_ceil(MIB)
    )]
    InsufficientSpace {
        path: PathBuf,
        needed: u64,
        available: u64,
        download: u64,
        unpacked: u64,
    },
    #[error(
        "the store {path} is in use by another flotilla process (a pull); try again when it has finished"
    )]
    Busy { path: PathBuf },
    #[error(
        "{name:?} is not a valid reference name: use 1 to {MAX_REF_NAME} characters from A-Z a-z 0-9 . _ - : / @ +"
    )]
    BadRefName { name: String },
    #[error(transparent)]
    Durable(DurableError),
    #[error("invalid OCI layout source {spec:?}: {reason}")]
    BadSource { spec: String, reason: String },
    #[error(
        "cannot record {name:?}: blob {digest} it needs is not in the store; the pull must fetch it first"
    )]
    Incomplete { name: String, digest: Digest },
}

const MIB: u64 = 1 << 20;

impl From<DurableError> for StoreError {
    fn from(e: DurableError) -> StoreError {
        match e {
            // The store's locks are held by pulls (shared) and gc (exclusive); say which, not just "locked".
            DurableError::Locked { path } => StoreError::Busy { path },
            e => StoreError::Durable(e),
        }
    }
}

fn list(names: &[String]) -> String {
    if names.is_empty() {
        "nothing".to_string()
    } else {
        names.join(", ")
    }
}

pub(crate) fn io_err(step: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { step, path, source }
}

/// Reference names as OCI's `ref.name` grammar and skopeo's `oci:` transport accept them.
pub(crate) fn validate_ref_name(name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_REF_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-:/@+".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(StoreError::BadRefName {
            name: name.to_string(),
        })
    }
}

/// The store, open with `store.lock` held (shared for [`Store::open`]).
#[derive(Debug)]
pub struct Store {
    state_dir: PathBuf,
    layout: OciLayout,
    partial_dir: PathBuf,
    _lock: File,
}

/// What [`Store::partial`] found for a blob.
#[derive(Debug)]
pub enum Slot {
    /// The blob is already in the store; nothing to fetch.
    Present,
    /// Fetch into this partial file.
    Fetch(Partial),
}

/// A blob's partial file, locked against other writers while this handle lives.
///
/// The handshake with a fetcher (registry client, [`OciLayout::copy_blob`]):
/// 1. `let (verifier, offset) = partial.resume()?` — the hash state of the bytes already in the file (re-hashed
///    once, so a download interrupted in an earlier process resumes too) and where to continue (`Range: bytes=
///    offset-`).
/// 2. Append the remaining bytes to [`Partial::path`] (or [`Partial::append`]), feeding each to `verifier`, and
///    stop at [`Partial::size`]. To restart from zero instead, call [`Partial::restart`].
/// 3. `partial.finish(verifier)?` checks the verifier's digest and length against the descriptor and returns the
///    [`VerifiedBlob`] proof; on a mismatch it deletes the partial file, so bad bytes are never resumed.
/// 4. [`Store::publish`] moves it into the store.
///
/// Dropping a `Partial` without `finish` (a cut connection, a crash) keeps its bytes for the next pull. One process
/// must not hold two `Partial`s for the same digest: the second [`Store::partial`] would wait for the first.
#[derive(Debug)]
pub struct Partial {
    path: PathBuf,
    digest: Digest,
    size: u64,
    file: File,
}

/// Proof that a partial file's bytes hashed to its digest while they were written; only [`Partial::finish`]
/// makes one.
#[derive(Debug)]
#[must_use = "a verified blob is not in the store until Store::publish"]
pub struct VerifiedBlob {
    path: PathBuf,
    digest: Digest,
    size: u64,
    file: File,
}

impl VerifiedBlob {
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    pub fn size(&self) -> u64 {
        self.size
    }
}

impl Partial {
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The hasher state after the bytes already in the partial file, and their count. A file longer than the
    /// descriptor is emptied first.
    pub fn resume(&self) -> Result<(Verifier, u64), StoreError> {
        let mut verifier = Verifier::new(self.digest.algorithm());
        let len = self
            .file
            .metadata()
            .map_err(io_err("stat", &self.path))?
            .len();
        if len > self.size {
            self.restart()?;
            return Ok((verifier, 0));
        }
        let mut f = File::open(&self.path).map_err(io_err("open", &self.path))?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut f = (&mut f).take(len);
        loop {
            let n = f.read(&mut buf).map_err(io_err("read", &self.path))?;
            match buf.get(..n) {
                Some(chunk) if !chunk.is_empty() => verifier.update(chunk),
                _ => break,
            }
        }
        let hashed = verifier.len();
        Ok((verifier, hashed))
    }

    /// Empties the partial file, for a fetcher that cannot resume (e.g. a server that ignored `Range`).
    pub fn restart(&self) -> Result<(), StoreError> {
        self.file.set_len(0).map_err(io_err("truncate", &self.path))
    }

    /// The partial file opened for appending.
    pub fn append(&self) -> Result<File, StoreError> {
        OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(io_err("open for append", &self.path))
    }

    /// Checks the fetcher's verifier against the descriptor; see the type's doc.
    pub fn finish(self, verifier: Verifier) -> Result<VerifiedBlob, StoreError> {
        let hashed = verifier.len();
        let actual = verifier.finish();
        let on_disk = self
            .file
            .metadata()
            .map_err(io_err("stat", &self.path))?
            .len();
        if actual != self.digest {
            let (path, expected) = (self.path.clone(), self.digest.clone());
            self.discard();
            return Err(StoreError::DigestMismatch {
                path,
                expected,
                actual,
            });
        }
        if hashed != self.size || on_disk != self.size {
            let (path, expected) = (self.path.clone(), self.size);
            self.discard();
            return Err(StoreError::SizeMismatch {
                path,
                expected,
                actual: on_disk,
            });
        }
        Ok(VerifiedBlob {
            path: self.path,
            digest: self.digest,
            size: self.size,
            file: self.file,
        })
    }

    /// Deletes the partial file: its bytes are known bad.
    pub fn discard(self) {
        if let Err(e) = fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot remove a bad partial blob");
        }
    }
}

/// A reference to record at the end of a pull.
#[derive(Debug, Clone)]
pub struct RefRecord {
    /// The name in `index.json` (`org.opencontainers.image.ref.name`).
    pub name: String,
    /// The chosen platform's manifest (media type, digest, size).
    pub target: Descriptor,
    /// The reference as the user wrote it.
    pub source: String,
    /// The image index the tag resolved to, when there was one.
    pub index_digest: Option<Digest>,
    pub platform: Option<Platform>,
    pub pulled_at: SystemTime,
    /// Further blobs to keep with the reference (the index blob, signature manifests); must be in the store.
    pub keep: Vec<Digest>,
}

/// An image in the store, read back for running it.
#[derive(Debug, Clone)]
pub struct StoredImage {
    pub descriptor: Descriptor,
    pub manifest: ImageManifest,
    pub config: ImageConfig,
}

/// Image configs are small JSON; this bounds what a damaged store can make us read.
const MAX_CONFIG_BYTES: u64 = 8 << 20;

/// One line of `flotilla images`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ImageEntry {
    pub name: Option<String>,
    pub digest: Digest,
    pub media_type: String,
    pub platform: Option<String>,
    /// Manifest, configuration and layers (compressed), when the manifest is readable.
    pub size: Option<u64>,
    pub pulled: Option<String>,
    pub source: Option<String>,
    pub index_digest: Option<String>,
}

impl Store {
    /// Opens (creating if needed) the store under `state_dir`, holding `store.lock` shared; waits while gc runs.
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        Store::open_with(state_dir, FlockOperation::LockShared)
    }

    /// Opens the store holding `store.lock` exclusively: waiting while pulls run, or failing with
    /// [`StoreError::Busy`] at once.
    pub fn open_exclusive(state_dir: &Path, wait: bool) -> Result<Store, StoreError> {
        let op = if wait {
            FlockOperation::LockExclusive
        } else {
            FlockOperation::NonBlockingLockExclusive
        };
        Store::open_with(state_dir, op)
    }

    fn open_with(state_dir: &Path, op: FlockOperation) -> Result<Store, StoreError> {
        create_dir(state_dir)?;
        let lock = lock_file(&state_dir.join("store.lock"), op)?;
        let root = state_dir.join(IMAGES_DIR);
        let partial_dir = state_dir.join(PARTIAL_DIR);
        for alg in [Algorithm::Sha256, Algorithm::Sha512] {
            create_dir(&root.join("blobs").join(alg.name()))?;
        }
        create_dir(&partial_dir)?;
        if !root.join("oci-layout").exists() {
            write_atomic(&root, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        let layout = OciLayout::open(&root)?;
        if !layout.index_path().exists() {
            let _guard = lock_file(&state_dir.join("index.lock"), FlockOperation::LockExclusive)?;
            if !layout.index_path().exists() {
                write_index(&layout, &ImageIndex::empty())?;
            }
        }
        fsync_dir(state_dir)?;
        Ok(Store {
            state_dir: state_dir.to_path_buf(),
            layout,
            partial_dir,
            _lock: lock,
        })
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The store read as an OCI layout: a source like any other (`read_blob`, `copy_blob`, `resolve`).
    pub fn layout(&self) -> &OciLayout {
        &self.layout
    }

    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.layout.has_blob(digest)
    }

    fn partial_path(&self, digest: &Digest) -> PathBuf {
        self.partial_dir
            .join(format!("{}-{}", digest.algorithm().name(), digest.hex()))
    }

    /// The partial file to fetch `digest` into, or [`Slot::Present`]. Blocks while another process writes the
    /// same partial (call from a blocking thread).
    pub fn partial(&self, digest: &Digest, size: u64) -> Result<Slot, StoreError> {
        if self.has_blob(digest) {
            return Ok(Slot::Present);
        }
        let path = self.partial_path(digest);
        let file = lock_file(&path, FlockOperation::LockExclusive)?;
        // Another pull may have published it while this one waited for the lock.
        if self.has_blob(digest) {
            return Ok(Slot::Present);
        }
        Ok(Slot::Fetch(Partial {
            path,
            digest: digest.clone(),
            size,
            file,
        }))
    }

    /// Moves a verified partial into `blobs/` (steps 2, 4, 5 of the module doc).
    pub fn publish(&self, blob: VerifiedBlob) -> Result<(), StoreError> {
        blob.file.sync_all().map_err(io_err("fsync", &blob.path))?;
        let dest = self.layout.blob_path(&blob.digest);
        fs::rename(&blob.path, &dest).map_err(io_err("rename into place", &dest))?;
        if let Some(dir) = dest.parent() {
            fsync_dir(dir)?;
        }
        Ok(fsync_dir(&self.partial_dir)?)
    }

    /// Stores bytes handed in whole (a manifest, an index, a configuration) after checking them against `digest`.
    pub fn put_blob(&self, digest: &Digest, bytes: &[u8]) -> Result<(), StoreError> {
        let mut v = Verifier::new(digest.algorithm());
        v.update(bytes);
        let actual = v.finish();
        let dest = self.layout.blob_path(digest);
        if &actual != digest {
            return Err(StoreError::DigestMismatch {
                path: dest,
                expected: digest.clone(),
                actual,
            });
        }
        if dest.is_file() {
            return Ok(());
        }
        let dir = dest.parent().unwrap_or(self.layout.root());
        Ok(write_atomic(dir, digest.hex(), bytes)?)
    }

    /// Reads a small blob from the store, verified (see [`OciLayout::read_blob`]).
    pub fn read_blob(&self, digest: &Digest, size: u64, limit: u64) -> Result<Vec<u8>, StoreError> {
        self.layout.read_blob(digest, size, limit)
    }

    /// Opens a (large) blob for streaming. Not re-hashed: it was verified when published, and unpacking checks
    /// the configuration's `diff_ids` anyway.
    pub fn open_blob(&self, digest: &Digest) -> Result<File, StoreError> {
        layout::open_regular(&self.layout.blob_path(digest))
            .map(|(file, _)| file)
            .map_err(|e| self.layout.missing(e, digest))
    }

    /// Bytes still to download for these blobs: those not in the store, less what their partial files hold.
    pub fn bytes_to_fetch(&self, blobs: &[(Digest, u64)]) -> u64 {
        blobs
            .iter()
            .filter(|(d, _)| !self.has_blob(d))
            .map(|(d, size)| {
                let have = fs::metadata(self.partial_path(d)).map_or(0, |m| m.len());
                size.saturating_sub(have)
            })
            .fold(0u64, u64::saturating_add)
    }

    /// Refuses early when the state directory's filesystem cannot take `download` + `unpacked` bytes with margin.
    pub fn check_space(
        &self,
        space: &dyn FreeSpace,
        download: u64,
        unpacked: u64,
    ) -> Result<(), StoreError> {
        check_space(space, &self.state_dir, download, unpacked)
    }

    /// Adds (or replaces, by name) these references in one atomic replacement of `index.json`. Refuses, changing
    /// nothing, if any reference's manifest, configuration, layers or kept blobs are not all in the store.
    pub fn commit(&self, refs: &[RefRecord]) -> Result<(), StoreError> {
        let mut entries = Vec::with_capacity(refs.len());
        for r in refs {
            validate_ref_name(&r.name)?;
            self.check_complete(r)?;
            entries.push(ref_descriptor(r));
        }
        self.update_index(|index| {
            index
                .manifests
                .retain(|d| !refs.iter().any(|r| d.ref_name() == Some(r.name.as_str())));
            index.manifests.extend(entries);
            true
        })
        .map(|_| ())
    }

    /// Removes the reference `name`; false when there was none.
    pub fn remove_ref(&self, name: &str) -> Result<bool, StoreError> {
        self.update_index(|index| {
            let before = index.manifests.len();
            index.manifests.retain(|d| d.ref_name() != Some(name));
            index.manifests.len() != before
        })
    }

    /// Read-modify-write of `index.json` under `index.lock`; `change` says whether it changed anything.
    fn update_index(
        &self,
        change: impl FnOnce(&mut ImageIndex) -> bool,
    ) -> Result<bool, StoreError> {
        let _guard = lock_file(
            &self.state_dir.join("index.lock"),
            FlockOperation::LockExclusive,
        )?;
        let mut index = self.layout.index()?;
        if !change(&mut index) {
            return Ok(false);
        }
        write_index(&self.layout, &index)?;
        Ok(true)
    }

    fn check_complete(&self, r: &RefRecord) -> Result<(), StoreError> {
        let missing = |digest: &Digest| StoreError::Incomplete {
            name: r.name.clone(),
            digest: digest.clone(),
        };
        for d in r.keep.iter().chain([&r.target.digest]) {
            if !self.has_blob(d) {
                return Err(missing(d));
            }
        }
        if layout::kind_of(&r.target.media_type) == layout::Kind::Manifest {
            let bytes = self.read_blob(&r.target.digest, r.target.size, MAX_MANIFEST_BYTES)?;
            let path = self.layout.blob_path(&r.target.digest);
            for child in layout::children(&path, &r.target.media_type, &bytes)? {
                if !self.has_blob(&child.digest) {
                    return Err(missing(&child.digest));
                }
            }
        }
        Ok(())
    }

    /// The image stored under `name`: its manifest's descriptor, the manifest and the config, read and checked
    /// against their digests. A name that holds an index (a pull for every platform) has no single config and is
    /// refused as not found.
    pub fn image(&self, name: &str) -> Result<StoredImage, StoreError> {
        let descriptor = self.layout.resolve(Some(name))?;
        let path = self.layout.blob_path(&descriptor.digest);
        let bytes = self.read_blob(&descriptor.digest, descriptor.size, MAX_MANIFEST_BYTES)?;
        let json = |what, source| StoreError::Json {
            path: path.clone(),
            what,
            source,
        };
        let manifest: ImageManifest =
            serde_json::from_slice(&bytes).map_err(|e| json("image manifest", e))?;
        let config_desc = manifest
            .config
            .clone()
            .ok_or_else(|| StoreError::NotLayout {
                path: path.clone(),
                reason: "the manifest names no config".to_string(),
            })?;
        let config_bytes =
            self.read_blob(&config_desc.digest, config_desc.size, MAX_CONFIG_BYTES)?;
        let config: ImageConfig =
            serde_json::from_slice(&config_bytes).map_err(|source| StoreError::Json {
                path: self.layout.blob_path(&config_desc.digest),
                what: "image config",
                source,
            })?;
        Ok(StoredImage {
            descriptor,
            manifest,
            config,
        })
    }

    /// What `flotilla images` lists.
    pub fn images(&self) -> Result<Vec<ImageEntry>, StoreError> {
        images_in(&self.layout)
    }
}

fn write_index(layout: &OciLayout, index: &ImageIndex) -> Result<(), StoreError> {
    let path = layout.index_path();
    let bytes = serde_json::to_vec(index).map_err(|source| StoreError::Json {
        path,
        what: "index.json",
        source,
    })?;
    Ok(write_atomic(layout.root(), "index.json", &bytes)?)
}

fn ref_descriptor(r: &RefRecord) -> Descriptor {
    let mut d = r.target.clone();
    let mut a = BTreeMap::new();
    a.insert(ANNOTATION_REF_NAME.to_string(), r.name.clone());
    a.insert(ANNOTATION_SOURCE.to_string(), r.source.clone());
    a.insert(ANNOTATION_PULLED.to_string(), rfc3339(r.pulled_at));
    if let Some(i) = &r.index_digest {
        a.insert(ANNOTATION_INDEX_DIGEST.to_string(), i.to_string());
    }
    if let Some(p) = &r.platform {
        a.insert(ANNOTATION_PLATFORM.to_string(), p.to_string());
        d.other.insert("platform".to_string(), p.to_oci_json());
    }
    if !r.keep.is_empty() {
        let keep: Vec<String> = r.keep.iter().map(Digest::to_string).collect();
        a.insert(ANNOTATION_KEEP.to_string(), keep.join(","));
    }
    d.annotations.extend(a);
    d
}

/// Lists the references of the store under `state_dir` without creating or locking anything; an absent store
/// lists nothing.
pub fn list_images(state_dir: &Path) -> Result<Vec<ImageEntry>, StoreError> {
    let root = state_dir.join(IMAGES_DIR);
    if !root.exists() {
        return Ok(Vec::new());
    }
    images_in(&OciLayout::open(&root)?)
}

fn images_in(layout: &OciLayout) -> Result<Vec<ImageEntry>, StoreError> {
    let index = layout.index()?;
    Ok(index
        .manifests
        .iter()
        .map(|d| {
            let a = |k: &str| d.annotations.get(k).cloned();
            let platform = a(ANNOTATION_PLATFORM).or_else(|| {
                d.other
                    .get("platform")
                    .and_then(Platform::from_oci_json)
                    .map(|p| p.to_string())
            });
            ImageEntry {
                name: a(ANNOTATION_REF_NAME),
                digest: d.digest.clone(),
                media_type: d.media_type.clone(),
                platform,
                size: image_size(layout, d),
                pulled: a(ANNOTATION_PULLED),
                source: a(ANNOTATION_SOURCE),
                index_digest: a(ANNOTATION_INDEX_DIGEST),
            }
        })
        .collect())
}

/// A listing shows what it can: an unreadable manifest leaves the size unknown rather than failing the list.
fn image_size(layout: &OciLayout, d: &Descriptor) -> Option<u64> {
    if layout::kind_of(&d.media_type) != layout::Kind::Manifest {
        return None;
    }
    let bytes = layout
        .read_blob(&d.digest, d.size, MAX_MANIFEST_BYTES)
        .ok()?;
    let children = layout::children(&layout.blob_path(&d.digest), &d.media_type, &bytes).ok()?;
    Some(
        children
            .iter()
            .map(|c| c.size)
            .fold(d.size, u64::saturating_add),
    )
}

/// UTC, second precision: `2025-01-31T12:00:00Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil-from-days (proleptic Gregorian), after Howard Hinnant's public-domain algorithm.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests;
