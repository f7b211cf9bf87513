//! Crash-safe files: a file appears under its name only whole and on disk, and a lock file serialises writers.
//!
//! The steps for a whole file, in order ([`write_atomic`]):
//! 1. Write the bytes to `.tmp-<pid>-<n>-<name>` in the destination directory (same filesystem, so step 3 is a
//!    rename, never a copy).
//! 2. `fsync` it, so the rename can never expose a name whose data is still in the page cache.
//! 3. `rename` it over the name, which replaces atomically.
//! 4. `fsync` the directory, so the rename itself survives a power cut.
//!
//! After a crash the name holds the old bytes or the new ones, never a mix; what can remain is a `.tmp-` file,
//! which the owner's clean-up ([`TMP_PREFIX`]) removes. The content store, and the runtime and agent state after
//! it, all write through here.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{FlockOperation, flock};

/// Names starting with this in a directory written through [`write_atomic`] are leftovers of a crash.
pub const TMP_PREFIX: &str = ".tmp-";

#[derive(Debug, thiserror::Error)]
pub enum DurableError {
    #[error("cannot {step} {path}: {source}")]
    Io {
        step: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// A non-blocking lock that another process holds.
    #[error("{path} is locked by another process")]
    Locked { path: PathBuf },
}

fn io_err(step: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DurableError {
    let path = path.to_path_buf();
    move |source| DurableError::Io { step, path, source }
}

/// Makes a rename or a new entry in `dir` durable.
pub fn fsync_dir(dir: &Path) -> Result<(), DurableError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

pub fn create_dir(dir: &Path) -> Result<(), DurableError> {
    fs::create_dir_all(dir).map_err(io_err("create directory", dir))
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Replaces `dir/name` with `bytes`, following the steps of the module doc.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), DurableError> {
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!("{TMP_PREFIX}{}-{n}-{name}", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        f.write_all(bytes).map_err(io_err("write", &tmp))?;
        f.sync_all().map_err(io_err("fsync", &tmp))?;
        let dest = dir.join(name);
        fs::rename(&tmp, &dest).map_err(io_err("rename into place", &dest))?;
        fsync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    } else {
        // A name made unique by a pid (`instance.1234`) is named without it, so that a test can aim at it.
        crate::crash_points::passed(|| match name.rsplit_once('.') {
            Some((stem, pid)) if !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()) => {
                format!("file {stem}")
            }
            _ => format!("file {name}"),
        });
    }
    result
}

/// Takes an `flock` on `path` (created if missing), held until the returned file is dropped. With a
/// non-blocking `op`, a lock held elsewhere is [`DurableError::Locked`].
pub fn lock_file(path: &Path, op: FlockOperation) -> Result<File, DurableError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io_err("open lock file", path))?;
    match flock(&file, op) {
        Ok(()) => Ok(file),
        Err(e) if e == rustix::io::Errno::WOULDBLOCK => Err(DurableError::Locked {
            path: path.to_path_buf(),
        }),
        Err(e) => Err(DurableError::Io {
            step: "lock",
            path: path.to_path_buf(),
            source: e.into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_replaces_whole_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        write_atomic(dir.path(), "state.json", b"old").unwrap();
        write_atomic(dir.path(), "state.json", b"new").unwrap();
        assert_eq!(fs::read(dir.path().join("state.json")).unwrap(), b"new");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["state.json"]);
    }

    #[test]
    fn failed_write_leaves_the_old_file_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        write_atomic(dir.path(), "f", b"old").unwrap();
        // A directory in the way of the rename makes step 3 fail after the temporary file was written.
        fs::create_dir(dir.path().join("g")).unwrap();
        fs::write(dir.path().join("g/x"), b"").unwrap();
        assert!(write_atomic(dir.path(), "g", b"new").is_err());
        assert_eq!(fs::read(dir.path().join("f")).unwrap(), b"old");
        assert!(fs::read_dir(dir.path()).unwrap().all(|e| {
            !e.unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(TMP_PREFIX)
        }));
    }

    #[test]
    fn second_exclusive_lock_is_refused_while_the_first_is_held() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let held = lock_file(&path, FlockOperation::LockExclusive).unwrap();
        let second = lock_file(&path, FlockOperation::NonBlockingLockExclusive);
        assert!(matches!(second, Err(DurableError::Locked { .. })));
        drop(held);
        lock_file(&path, FlockOperation::NonBlockingLockExclusive).unwrap();
    }
}
