//! One layer's tar stream into a directory, in one pass that also hashes the stream and indexes it.
//!
//! Entries are read with `tar::Archive::entries()`, which takes a PAX `size` (and `path`, `linkpath`) over the
//! ustar header's: a PAX header that disagrees with the ustar size cannot make the reader take file content for
//! headers (CVE-2025-62518). The tar crate's own `unpack` is never used: it follows symlinks.
//!
//! In the snapshot a layer's `.wh.NAME` becomes an overlayfs whiteout (character device 0:0) and `.wh..wh..opq`
//! the `trusted.overlay.opaque=y` attribute on its directory, so the snapshot can be a lower layer as it is.

use std::io::{self, Read};
use std::path::Path;

use rustix::fs::FileType;

use super::write::{Meta, TreeWriter};
use super::{ENV_MAX_BYTES, ENV_MAX_ENTRIES, ENV_MAX_PATH, ENV_MAX_XATTR, Limits, UnpackError};
use crate::digest::{Algorithm, Digest, Verifier};
use crate::layers::{EntryMeaning, HashingReader, LayerIndex, LayerSource, Node, open_layer};

pub use super::write::Skipped;

/// What one layer became.
#[derive(Debug, Clone)]
pub struct Extracted {
    pub index: LayerIndex,
    /// The digest of the uncompressed stream (checked against the expected diff_id when one was given).
    pub diff_id: Digest,
    /// Uncompressed bytes read.
    pub bytes: u64,
    pub entries: u64,
    pub skipped: Skipped,
    /// Whiteouts and opaque markers were written as overlayfs reads them (false when not running as root).
    pub overlay_ready: bool,
}

/// Extracts the layer blob `layer` (gzip, zstd or plain tar, told by its magic bytes) into `dest`, an existing
/// empty directory, checking its `diff_id`.
pub fn extract(
    layer: &LayerSource,
    dest: &Path,
    limits: &Limits,
) -> Result<Extracted, UnpackError> {
    let reader = open_layer(layer)?;
    extract_stream(
        reader,
        &layer.digest.to_string(),
        layer.diff_id.as_ref(),
        dest,
        limits,
    )
}

/// Counts the uncompressed stream and stops it past the limit.
struct Bounded<R> {
    inner: R,
    left: u64,
    exceeded: bool,
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf
            .len()
            .min(usize::try_from(self.left.saturating_add(1)).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n as u64 > self.left {
            self.exceeded = true;
            return Err(io::Error::other(
                "the layer is larger than the unpack limit",
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// [`extract`] over an uncompressed tar stream; `layer` names it in errors.
pub fn extract_stream(
    reader: impl Read,
    layer: &str,
    expected: Option<&Digest>,
    dest: &Path,
    limits: &Limits,
) -> Result<Extracted, UnpackError> {
    let algorithm = expected.map_or(Algorithm::Sha256, Digest::algorithm);
    let mut stream = HashingReader {
        inner: Bounded {
            inner: reader,
            left: limits.max_bytes,
            exceeded: false,
        },
        verifier: Verifier::new(algorithm),
    };
    let limit = |what, max: u64, env| UnpackError::Limit {
        layer: layer.to_string(),
        what,
        max,
        env,
    };
    let mut writer = TreeWriter::new(dest)?;
    let mut index = LayerIndex::default();
    let mut entries = 0u64;
    let result = write_entries(
        &mut stream,
        &mut writer,
        &mut index,
        &mut entries,
        limits,
        &limit,
    );
    let result = result.and_then(|()| {
        // The diff_id covers the whole uncompressed stream, including the end-of-archive blocks tar stops before.
        io::copy(&mut stream, &mut io::sink())
            .map(|_| ())
            .map_err(|source| UnpackError::Read {
                layer: String::new(),
                source,
            })
    });
    if stream.inner.exceeded {
        return Err(limit("uncompressed size", limits.max_bytes, ENV_MAX_BYTES));
    }
    match result {
        Err(UnpackError::Read { layer: l, source }) if l.is_empty() => {
            return Err(UnpackError::Read {
                layer: layer.to_string(),
                source,
            });
        }
        other => other?,
    }
    let bytes = stream.inner.left;
    let actual = stream.verifier.finish();
    if let Some(expected) = expected {
        if &actual != expected {
            return Err(UnpackError::DiffIdMismatch {
                layer: layer.to_string(),
                expected: expected.clone(),
                actual,
            });
        }
    }
    let (skipped, overlay_ready) = writer.finish()?;
    Ok(Extracted {
        index,
        diff_id: actual,
        bytes: limits.max_bytes - bytes,
        entries,
        skipped,
        overlay_ready,
    })
}

fn write_entries<R: Read>(
    stream: &mut R,
    writer: &mut TreeWriter,
    index: &mut LayerIndex,
    entries: &mut u64,
    limits: &Limits,
    limit: &dyn Fn(&'static str, u64, &'static str) -> UnpackError,
) -> Result<(), UnpackError> {
    let read = |source| UnpackError::Read {
        layer: String::new(),
        source,
    };
    let mut content_bytes = 0u64;
    let mut archive = tar::Archive::new(stream);
    for entry in archive.entries().map_err(read)? {
        let mut entry = entry.map_err(read)?;
        *entries += 1;
        if *entries > limits.max_entries {
            return Err(limit("entry count", limits.max_entries, ENV_MAX_ENTRIES));
        }
        let path = entry.path_bytes().into_owned();
        let link = entry.link_name_bytes().map(|l| l.into_owned());
        if path.len() > limits.max_path || link.as_ref().is_some_and(|l| l.len() > limits.max_path)
        {
            return Err(limit("path length", limits.max_path as u64, ENV_MAX_PATH));
        }
        // Sparse entries expand on disk past what the stream carries; their declared sizes count too.
        let size = entry.size();
        content_bytes = content_bytes.saturating_add(size);
        if content_bytes > limits.max_bytes {
            return Err(limit("uncompressed size", limits.max_bytes, ENV_MAX_BYTES));
        }
        let header = entry.header().clone();
        let mut meta = Meta {
            mode: header.mode().map_err(read)?,
            // Some writers leave these fields blank; GNU tar reads blank as 0, and so does this.
            uid: header.uid().unwrap_or(0),
            gid: header.gid().unwrap_or(0),
            mtime: header
                .mtime()
                .map_or(0, |t| i64::try_from(t).unwrap_or(i64::MAX)),
            xattrs: Vec::new(),
        };
        let mut xattr_bytes = 0usize;
        if let Some(extensions) = entry.pax_extensions().map_err(read)? {
            for ext in extensions {
                let ext = ext.map_err(read)?;
                let Ok(key) = ext.key() else { continue };
                let value = ext.value_bytes();
                if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                    xattr_bytes = xattr_bytes.saturating_add(name.len() + value.len());
                    if xattr_bytes > limits.max_xattr_bytes {
                        return Err(limit(
                            "extended attribute size",
                            limits.max_xattr_bytes as u64,
                            ENV_MAX_XATTR,
                        ));
                    }
                    meta.xattrs.push((name.to_string(), value.to_vec()));
                    continue;
                }
                let number = || {
                    std::str::from_utf8(value)
                        .ok()
                        .and_then(|v| v.split('.').next()?.parse::<i64>().ok())
                };
                match key {
                    "uid" => {
                        meta.uid = number()
                            .and_then(|n| u64::try_from(n).ok())
                            .unwrap_or(meta.uid)
                    }
                    "gid" => {
                        meta.gid = number()
                            .and_then(|n| u64::try_from(n).ok())
                            .unwrap_or(meta.gid)
                    }
                    "mtime" => meta.mtime = number().unwrap_or(meta.mtime),
                    _ => {}
                }
            }
        }
        match index.record(&path, &header, link.as_deref(), size) {
            EntryMeaning::Root => {
                if header.entry_type().is_dir() {
                    writer.dir("", meta)?;
                }
            }
            EntryMeaning::Opaque(dir) => writer.opaque(&dir)?,
            EntryMeaning::Whiteout(hidden) => writer.whiteout(&hidden)?,
            EntryMeaning::Node(p, Node::Dir) => writer.dir(&p, meta)?,
            EntryMeaning::Node(p, Node::File { .. }) => {
                writer.file(&p, &meta, &mut entry)?;
            }
            EntryMeaning::Node(p, Node::Symlink(_)) => {
                writer.symlink(&p, link.as_deref().unwrap_or_default(), &meta)?;
            }
            EntryMeaning::Node(p, Node::Hardlink(target)) => writer.hardlink(&p, &target)?,
            EntryMeaning::Node(p, Node::Special) => {
                let kind = match header.entry_type() {
                    tar::EntryType::Char => FileType::CharacterDevice,
                    tar::EntryType::Block => FileType::BlockDevice,
                    tar::EntryType::Fifo => FileType::Fifo,
                    // Global PAX headers, GNU volume labels and the like carry no file.
                    _ => continue,
                };
                let major = header.device_major().ok().flatten().unwrap_or(0);
                let minor = header.device_minor().ok().flatten().unwrap_or(0);
                writer.special(&p, kind, (major, minor), &meta)?;
            }
        }
    }
    Ok(())
}
