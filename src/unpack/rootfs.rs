//! A container's root filesystem from a stack of snapshots.
//!
//! The usual case is an overlayfs at `<container_dir>/rootfs`: the snapshots' `rootfs/` directories as lower
//! layers (top first), with the container's own `upper/` and `work/`. Nothing is copied and images share their
//! layers. Where overlayfs cannot be mounted (no overlay module, no privilege, a snapshot unpacked without root
//! so its whiteouts are not overlayfs's, or `FLOTILLA_NO_OVERLAY=1`), the layers are copied into
//! `<container_dir>/rootfs` base first, whiteouts and opaque directories applied from the snapshot indexes, and
//! `<container_dir>/rootfs.complete` marks the copy whole. [`PreparedRoot::kind`] says which was done.

use std::collections::HashMap;
use std::fs::{self, File};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use rustix::fs::FileType;
use rustix::io::Errno;
use rustix::mount::{MountFlags, UnmountFlags, mount, unmount};

use super::snapshots::Snapshots;
use super::write::{Meta, OVERLAY_OPAQUE, TreeWriter, remove_dir_if_present};
use super::{UnpackError, io_err};
use crate::digest::Digest;

/// Set to `1` to take the flattened copy even where overlayfs works (tests, and filesystems overlayfs mishandles).
pub const ENV_NO_OVERLAY: &str = "FLOTILLA_NO_OVERLAY";
const COPY_MARKER: &str = "rootfs.complete";
/// Extended attributes of one file in a snapshot; the kernel's own bound is 64 KiB per list.
const XATTR_LIST_BYTES: usize = 64 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RootKind {
    Overlay,
    /// A flattened copy: overlayfs was not available.
    Copy,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedRoot {
    /// The container's root directory (`<container_dir>/rootfs`).
    pub path: PathBuf,
    pub kind: RootKind,
}

fn is_mount_point(path: &Path, parent: &Path) -> Result<bool, UnpackError> {
    let (Ok(inner), Ok(outer)) = (fs::symlink_metadata(path), fs::symlink_metadata(parent)) else {
        return Ok(false);
    };
    Ok(inner.is_dir() && inner.dev() != outer.dev())
}

/// Makes `<container_dir>/rootfs` from the snapshots of `diff_ids` (base first). Idempotent: a root already
/// mounted or copied is reused, and after a reboot the overlay is mounted again over the same `upper/`.
pub fn prepare(
    snapshots: &Snapshots,
    diff_ids: &[Digest],
    container_dir: &Path,
) -> Result<PreparedRoot, UnpackError> {
    let overlay = std::env::var(ENV_NO_OVERLAY).as_deref() != Ok("1");
    prepare_as(snapshots, diff_ids, container_dir, overlay)
}

/// [`prepare`], with the overlay tried only when `overlay` is true (tests take the copy without the environment).
pub fn prepare_as(
    snapshots: &Snapshots,
    diff_ids: &[Digest],
    container_dir: &Path,
    overlay: bool,
) -> Result<PreparedRoot, UnpackError> {
    fs::create_dir_all(container_dir).map_err(io_err("create", container_dir))?;
    let rootfs = container_dir.join("rootfs");
    if container_dir.join(COPY_MARKER).is_file() {
        return Ok(PreparedRoot {
            path: rootfs,
            kind: RootKind::Copy,
        });
    }
    if is_mount_point(&rootfs, container_dir)? {
        return Ok(PreparedRoot {
            path: rootfs,
            kind: RootKind::Overlay,
        });
    }
    let mut metas = Vec::new();
    for d in diff_ids {
        metas.push((snapshots.meta(d)?, snapshots.path(d).join("rootfs")));
    }
    // A half-made copy from an interrupted prepare.
    remove_dir_if_present(&rootfs)?;
    fs::create_dir(&rootfs).map_err(io_err("create", &rootfs))?;
    if overlay && metas.iter().all(|(m, _)| m.overlay_ready) {
        let lowers: Vec<&Path> = metas.iter().map(|(_, p)| p.as_path()).collect();
        if mount_overlay(&lowers, container_dir, &rootfs)? {
            return Ok(PreparedRoot {
                path: rootfs,
                kind: RootKind::Overlay,
            });
        }
    }
    copy_layers(&metas, &rootfs)?;
    crate::durable::write_atomic(container_dir, COPY_MARKER, b"")?;
    Ok(PreparedRoot {
        path: rootfs,
        kind: RootKind::Copy,
    })
}

/// Mounts the overlay; false when overlayfs is not available here, so the caller copies instead.
///
/// The mount options must fit in one page, and an image's snapshot paths are ~100 bytes each, so dozens of layers
/// would not fit. Each lower directory is therefore named through a short symlink `<container_dir>/l/<n>` (as
/// Docker's overlay2 does); the kernel follows it when it looks the lower directory up. Should even that be more
/// than a page (hundreds of layers, or a long state directory), the flattened copy is taken.
fn mount_overlay(
    lowers: &[&Path],
    container_dir: &Path,
    rootfs: &Path,
) -> Result<bool, UnpackError> {
    let links = container_dir.join("l");
    remove_dir_if_present(&links)?;
    fs::create_dir(&links).map_err(io_err("create", &links))?;
    let mut names = Vec::new();
    for (n, lower) in lowers.iter().enumerate().rev() {
        let link = links.join(n.to_string());
        std::os::unix::fs::symlink(lower, &link).map_err(io_err("create symlink", &link))?;
        names.push(link.display().to_string());
    }
    let upper = container_dir.join("upper");
    let work = container_dir.join("work");
    for d in [&upper, &work] {
        fs::create_dir_all(d).map_err(io_err("create", d.as_path()))?;
    }
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        names.join(":"),
        upper.display(),
        work.display()
    );
    if data.len() >= rustix::param::page_size() {
        return Ok(false);
    }
    let data = std::ffi::CString::new(data).map_err(|e| UnpackError::Mount {
        path: rootfs.to_path_buf(),
        source: std::io::Error::other(e),
    })?;
    match mount(
        "overlay",
        rootfs,
        "overlay",
        MountFlags::empty(),
        data.as_c_str(),
    ) {
        Ok(()) => Ok(true),
        Err(Errno::NODEV | Errno::PERM | Errno::ACCESS | Errno::NOTSUP | Errno::INVAL) => Ok(false),
        Err(e) => Err(UnpackError::Mount {
            path: rootfs.to_path_buf(),
            source: e.into(),
        }),
    }
}

/// Unmounts (lazily when busy) and removes what [`prepare`] made under `container_dir`.
pub fn release(container_dir: &Path) -> Result<(), UnpackError> {
    let rootfs = container_dir.join("rootfs");
    if is_mount_point(&rootfs, container_dir)? {
        match unmount(&rootfs, UnmountFlags::empty()) {
            Ok(()) => {}
            Err(Errno::BUSY) => {
                unmount(&rootfs, UnmountFlags::DETACH).map_err(|e| UnpackError::Mount {
                    path: rootfs.clone(),
                    source: e.into(),
                })?
            }
            Err(e) => {
                return Err(UnpackError::Mount {
                    path: rootfs.clone(),
                    source: e.into(),
                });
            }
        }
    }
    match fs::remove_file(container_dir.join(COPY_MARKER)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("remove", container_dir.join(COPY_MARKER))(e)),
    }
    for name in ["rootfs", "upper", "work", "l"] {
        remove_dir_if_present(&container_dir.join(name))?;
    }
    Ok(())
}

fn copy_layers(
    layers: &[(super::snapshots::SnapshotMeta, PathBuf)],
    rootfs: &Path,
) -> Result<(), UnpackError> {
    let mut writer = TreeWriter::new(rootfs)?;
    for (meta, src) in layers {
        // What this layer hides in the layers below goes before its own content.
        let mut opaque: Vec<&str> = meta.index.opaque_dirs().collect();
        opaque.sort();
        for dir in opaque {
            writer.clear_dir(dir)?;
        }
        let mut whiteouts: Vec<&str> = meta.index.whiteouts().collect();
        whiteouts.sort();
        for path in whiteouts {
            writer.remove(path)?;
        }
        let mut links = HashMap::new();
        copy_dir(src, "", &mut writer, &mut links)?;
    }
    writer.finish()?;
    Ok(())
}

fn child(rel: &str, name: &str) -> String {
    if rel.is_empty() {
        name.to_string()
    } else {
        format!("{rel}/{name}")
    }
}

/// Copies the snapshot directory `src` (flotilla's own, walked without following symlinks) into the writer at
/// `rel`. Files hard-linked within the layer stay linked.
fn copy_dir(
    src: &Path,
    rel: &str,
    writer: &mut TreeWriter,
    links: &mut HashMap<(u64, u64), String>,
) -> Result<(), UnpackError> {
    let mut entries: Vec<_> = fs::read_dir(src)
        .map_err(io_err("list", src))?
        .collect::<Result<_, _>>()
        .map_err(io_err("list", src))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let to = child(rel, &name);
        let md = fs::symlink_metadata(&path).map_err(io_err("inspect", &path))?;
        let meta = Meta {
            mode: md.mode() & 0o7777,
            uid: u64::from(md.uid()),
            gid: u64::from(md.gid()),
            mtime: md.mtime(),
            xattrs: read_xattrs(&path),
        };
        let ft = md.file_type();
        if ft.is_char_device() && md.rdev() == 0 {
            // A whiteout: the index already removed what it hides.
            continue;
        } else if ft.is_dir() {
            writer.dir(&to, meta)?;
            copy_dir(&path, &to, writer, links)?;
        } else if ft.is_file() {
            if md.nlink() > 1 {
                if let Some(first) = links.get(&(md.dev(), md.ino())) {
                    writer.hardlink(&to, first)?;
                    continue;
                }
                links.insert((md.dev(), md.ino()), to.clone());
            }
            let mut file = File::open(&path).map_err(io_err("open", &path))?;
            writer.file(&to, &meta, &mut file).map_err(|e| match e {
                UnpackError::Read { source, .. } => io_err("read", &path)(source),
                other => other,
            })?;
        } else if ft.is_symlink() {
            let target = fs::read_link(&path).map_err(io_err("read symlink", &path))?;
            writer.symlink(&to, target.as_os_str().as_encoded_bytes(), &meta)?;
        } else {
            let kind = if ft.is_char_device() {
                FileType::CharacterDevice
            } else if ft.is_block_device() {
                FileType::BlockDevice
            } else if ft.is_fifo() {
                FileType::Fifo
            } else {
                continue;
            };
            let rdev = md.rdev();
            writer.special(
                &to,
                kind,
                (rustix::fs::major(rdev), rustix::fs::minor(rdev)),
                &meta,
            )?;
        }
    }
    Ok(())
}

/// A snapshot file's extended attributes but overlayfs's own; none when the filesystem has none to give.
fn read_xattrs(path: &Path) -> Vec<(String, Vec<u8>)> {
    let mut names = vec![0u8; XATTR_LIST_BYTES];
    let Ok(n) = rustix::fs::llistxattr(path, &mut names[..]) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for name in names[..n].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let name = String::from_utf8_lossy(name).into_owned();
        if name == OVERLAY_OPAQUE || name.starts_with("trusted.") {
            continue;
        }
        let mut value = vec![0u8; XATTR_LIST_BYTES];
        if let Ok(len) = rustix::fs::lgetxattr(path, name.as_str(), &mut value[..]) {
            value.truncate(len);
            out.push((name, value));
        }
    }
    out
}
