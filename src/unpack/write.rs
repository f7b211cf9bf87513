//! Writing a tree entry by entry, every path resolved inside the root by [`crate::fs_root`].
//!
//! Both the layer extractor and the flattened copy write through [`TreeWriter`]. Paths given to it are normalised
//! (no leading slash, no `.` or `..`), but that is for agreement with the index, not for safety: the parent of
//! each entry is opened inside the root (`openat2(RESOLVE_IN_ROOT)`, or the userspace walk that does the same on
//! older kernels), so a symlink anywhere on the way (`..`, absolute targets, links planted by this or an earlier
//! layer) resolves inside the root, and the last component is created, replaced or changed without following it.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{
    AtFlags, Dir, FileType, Gid, Mode, OFlags, Timespec, Timestamps, Uid, XattrFlags, chmodat,
    chownat, fchmod, fchown, fsetxattr, futimens, linkat, makedev, mkdirat, mknodat, openat,
    statat, symlinkat, unlinkat, utimensat,
};
use rustix::io::Errno;

use super::{UnpackError, io_err};
use crate::fs_root::{Resolver, Symlinks};
use crate::layers::parent_and_name;

/// Directory nesting past this is refused when removing a tree (the path length limit keeps real trees far below).
const MAX_REMOVE_DEPTH: usize = 2048;
pub(crate) const OVERLAY_OPAQUE: &str = "trusted.overlay.opaque";

/// Owner, mode, times and extended attributes of one entry.
#[derive(Debug, Clone, Default)]
pub(crate) struct Meta {
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: i64,
    pub xattrs: Vec<(String, Vec<u8>)>,
}

/// What could not be reproduced, counted rather than failed: the caller reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Skipped {
    /// Device nodes, which only root may make.
    pub devices: u64,
    /// Entries whose owner was left as the unpacking user's (not root).
    pub owners: u64,
    /// Extended attributes the filesystem or the user's privileges refused, and those on symlinks.
    pub xattrs: u64,
}

pub(crate) struct TreeWriter {
    root: OwnedFd,
    /// Taken once, so one tree is written through one resolver from start to end.
    resolver: Resolver,
    root_path: PathBuf,
    as_root: bool,
    /// Directories' modes and times, set last: writing into a directory changes its mtime, and a read-only mode
    /// would stop an unprivileged writer.
    dirs: Vec<(String, Meta)>,
    pub skipped: Skipped,
    /// False once an overlayfs whiteout or opaque marker could not be made (not root): the snapshot is then only
    /// fit for a flattened copy, which applies the whiteouts from the index.
    pub overlay_ready: bool,
}

fn errno_err(step: &'static str, path: PathBuf) -> impl FnOnce(Errno) -> UnpackError {
    move |e| UnpackError::Io {
        step,
        path,
        source: e.into(),
    }
}

impl TreeWriter {
    /// Writes under `root`, which must exist and be a directory.
    pub fn new(root: &Path) -> Result<TreeWriter, UnpackError> {
        let fd = rustix::fs::open(
            root,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(errno_err("open", root.to_path_buf()))?;
        Ok(TreeWriter {
            root: fd,
            resolver: Resolver::current(),
            root_path: root.to_path_buf(),
            as_root: rustix::process::geteuid().is_root(),
            dirs: Vec::new(),
            skipped: Skipped::default(),
            overlay_ready: true,
        })
    }

    fn shown(&self, path: &str) -> PathBuf {
        self.root_path.join(path)
    }

    /// Opens `path` (normalised, "." for the root) inside the root, symlinks on the way resolved inside it.
    fn open_in_root(&self, path: &str, flags: OFlags) -> Result<OwnedFd, Errno> {
        self.resolver
            .open(&self.root, path, flags, Symlinks::InRoot)
    }

    /// Opens directory `dir` (normalised, "" for the root) inside the root, creating missing components as
    /// directories (mode 0755, as tar extractors do for parents a layer does not list).
    fn open_dir(&self, dir: &str) -> Result<OwnedFd, UnpackError> {
        let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let target = if dir.is_empty() { "." } else { dir };
        match self.open_in_root(target, flags) {
            Ok(fd) => return Ok(fd),
            Err(Errno::NOENT) => {}
            Err(e) => return Err(errno_err("open directory", self.shown(dir))(e)),
        }
        let mut prefix = String::new();
        let mut fd = self
            .open_in_root(".", flags)
            .map_err(errno_err("open", self.root_path.clone()))?;
        for component in dir.split('/') {
            let next = if prefix.is_empty() {
                component.to_string()
            } else {
                format!("{prefix}/{component}")
            };
            match mkdirat(&fd, component, Mode::from_raw_mode(0o755)) {
                Ok(()) | Err(Errno::EXIST) => {}
                Err(e) => return Err(errno_err("create directory", self.shown(&next))(e)),
            }
            // Reopened from the root, not from `fd`: a component that exists as a symlink resolves like any other.
            fd = self
                .open_in_root(&next, flags)
                .map_err(errno_err("open directory", self.shown(&next)))?;
            prefix = next;
        }
        Ok(fd)
    }

    /// The parent directory of `path` and the last component.
    fn parent<'p>(&self, path: &'p str) -> Result<(OwnedFd, &'p str), UnpackError> {
        let (parent, name) = parent_and_name(path);
        Ok((self.open_dir(parent)?, name))
    }

    /// Removes whatever is at `name` in `dir` without following it, unless it is a directory and `keep_dir`.
    /// Returns whether something is (still) there.
    fn clear_name(
        &self,
        dir: &OwnedFd,
        name: &str,
        keep_dir: bool,
        shown: &Path,
    ) -> Result<bool, UnpackError> {
        let stat = match statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(s) => s,
            Err(Errno::NOENT) => return Ok(false),
            Err(e) => return Err(errno_err("inspect", shown.to_path_buf())(e)),
        };
        if FileType::from_raw_mode(stat.st_mode) == FileType::Directory {
            if keep_dir {
                return Ok(true);
            }
            remove_tree(dir, name, shown, 0)?;
        } else {
            unlinkat(dir, name, AtFlags::empty())
                .map_err(errno_err("remove", shown.to_path_buf()))?;
        }
        Ok(false)
    }

    fn set_owner(
        &mut self,
        dir: &OwnedFd,
        name: &str,
        meta: &Meta,
        shown: &Path,
    ) -> Result<(), UnpackError> {
        if !self.as_root {
            self.skipped.owners += 1;
            return Ok(());
        }
        let (Ok(uid), Ok(gid)) = (u32::try_from(meta.uid), u32::try_from(meta.gid)) else {
            self.skipped.owners += 1;
            return Ok(());
        };
        chownat(
            dir,
            name,
            Some(Uid::from_raw(uid)),
            Some(Gid::from_raw(gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(errno_err("set the owner of", shown.to_path_buf()))
    }

    fn set_xattrs(&mut self, fd: &OwnedFd, meta: &Meta, shown: &Path) -> Result<(), UnpackError> {
        for (name, value) in &meta.xattrs {
            // trusted.* is overlayfs's own namespace: a layer setting it could forge whiteouts or redirects.
            if name.starts_with("trusted.") {
                continue;
            }
            match fsetxattr(fd, name.as_str(), value, XattrFlags::empty()) {
                Ok(()) => {}
                Err(Errno::PERM | Errno::NOTSUP | Errno::ACCESS | Errno::INVAL) => {
                    self.skipped.xattrs += 1
                }
                Err(e) => {
                    return Err(errno_err("set extended attributes on", shown.to_path_buf())(e));
                }
            }
        }
        Ok(())
    }

    /// A directory; an existing directory is kept (and merged into), anything else there is replaced.
    pub fn dir(&mut self, path: &str, meta: Meta) -> Result<(), UnpackError> {
        let shown = self.shown(path);
        if !path.is_empty() {
            let (dir, name) = self.parent(path)?;
            if !self.clear_name(&dir, name, true, &shown)? {
                mkdirat(&dir, name, Mode::from_raw_mode(0o700))
                    .map_err(errno_err("create directory", shown.clone()))?;
            }
        }
        let fd = self.open_existing_dir(path)?;
        self.set_owner_fd(&fd, &meta, &shown)?;
        self.set_xattrs(&fd, &meta, &shown)?;
        self.dirs.push((path.to_string(), meta));
        Ok(())
    }

    /// [`Self::set_owner`] through a descriptor already open on the entry (a directory, or a file just written).
    fn set_owner_fd(&mut self, fd: &OwnedFd, meta: &Meta, shown: &Path) -> Result<(), UnpackError> {
        if !self.as_root {
            self.skipped.owners += 1;
            return Ok(());
        }
        if let (Ok(uid), Ok(gid)) = (u32::try_from(meta.uid), u32::try_from(meta.gid)) {
            fchown(fd, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
                .map_err(errno_err("set the owner of", shown.to_path_buf()))?;
        }
        Ok(())
    }

    /// Opens a directory that must be there, for reading its attributes; a symlink in its place is refused.
    fn open_existing_dir(&self, path: &str) -> Result<OwnedFd, UnpackError> {
        let target = if path.is_empty() { "." } else { path };
        self.open_in_root(
            target,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        )
        .map_err(errno_err("open directory", self.shown(path)))
    }

    /// A regular file with `size` bytes from `content`.
    pub fn file(
        &mut self,
        path: &str,
        meta: &Meta,
        content: &mut dyn Read,
    ) -> Result<u64, UnpackError> {
        let shown = self.shown(path);
        let (dir, name) = self.parent(path)?;
        self.clear_name(&dir, name, false, &shown)?;
        let fd = openat(
            &dir,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(errno_err("create", shown.clone()))?;
        let mut file = File::from(fd);
        let mut source = TrackRead {
            inner: content,
            failed: false,
        };
        let written = io::copy(&mut source, &mut file).map_err(|e| {
            if source.failed {
                // The layer failed, not the disk: the caller knows which layer and which limit.
                UnpackError::Read {
                    layer: String::new(),
                    source: e,
                }
            } else {
                UnpackError::Io {
                    step: "write",
                    path: shown.clone(),
                    source: e,
                }
            }
        })?;
        let fd: OwnedFd = file.into();
        self.set_owner_fd(&fd, meta, &shown)?;
        // After the owner: chown clears setuid and setgid, which the tar may ask for.
        fchmod(&fd, Mode::from_raw_mode(meta.mode & 0o7777))
            .map_err(errno_err("set the mode of", shown.clone()))?;
        self.set_xattrs(&fd, meta, &shown)?;
        futimens(&fd, &times(meta.mtime)).map_err(errno_err("set the times of", shown))?;
        Ok(written)
    }

    /// A symlink, target kept verbatim (absolute too): it is never followed while writing.
    pub fn symlink(&mut self, path: &str, target: &[u8], meta: &Meta) -> Result<(), UnpackError> {
        let shown = self.shown(path);
        let (dir, name) = self.parent(path)?;
        self.clear_name(&dir, name, false, &shown)?;
        symlinkat(target, &dir, name).map_err(errno_err("create symlink", shown.clone()))?;
        self.set_owner(&dir, name, meta, &shown)?;
        // No fd-based xattr call reaches a symlink itself, and only trusted/security names can sit on one.
        self.skipped.xattrs += meta.xattrs.len() as u64;
        utimensat(&dir, name, &times(meta.mtime), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(errno_err("set the times of", shown))
    }

    /// A hard link to `target` (normalised), both ends resolved inside the root. A target that is a symlink gets
    /// linked itself, never what it points to.
    pub fn hardlink(&mut self, path: &str, target: &str) -> Result<(), UnpackError> {
        if path == target {
            return Ok(());
        }
        let shown = self.shown(path);
        let (tdir, tname) = self.parent(target)?;
        let (dir, name) = self.parent(path)?;
        self.clear_name(&dir, name, false, &shown)?;
        linkat(&tdir, tname, &dir, name, AtFlags::empty()).map_err(errno_err("hard-link", shown))
    }

    /// A device node or fifo. Devices need root; without it they are counted in [`Skipped::devices`].
    pub fn special(
        &mut self,
        path: &str,
        kind: FileType,
        rdev: (u32, u32),
        meta: &Meta,
    ) -> Result<(), UnpackError> {
        let is_device = matches!(kind, FileType::CharacterDevice | FileType::BlockDevice);
        if is_device && !self.as_root {
            self.skipped.devices += 1;
            return Ok(());
        }
        let shown = self.shown(path);
        let (dir, name) = self.parent(path)?;
        self.clear_name(&dir, name, false, &shown)?;
        mknodat(
            &dir,
            name,
            kind,
            Mode::from_raw_mode(0o600),
            makedev(rdev.0, rdev.1),
        )
        .map_err(errno_err("create device node", shown.clone()))?;
        self.set_owner(&dir, name, meta, &shown)?;
        // chmodat cannot refuse to follow a symlink on Linux, but `name` is the node made just above in a
        // directory only this writer uses, so there is no symlink to follow.
        chmodat(
            &dir,
            name,
            Mode::from_raw_mode(meta.mode & 0o7777),
            AtFlags::empty(),
        )
        .map_err(errno_err("set the mode of", shown.clone()))?;
        self.skipped.xattrs += meta.xattrs.len() as u64;
        utimensat(&dir, name, &times(meta.mtime), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(errno_err("set the times of", shown))
    }

    /// An overlayfs whiteout (character device 0:0) at `path`, unless this layer already has an entry there
    /// (whiteouts hide only lower layers).
    pub fn whiteout(&mut self, path: &str) -> Result<(), UnpackError> {
        let shown = self.shown(path);
        let (dir, name) = self.parent(path)?;
        match statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(_) => return Ok(()),
            Err(Errno::NOENT) => {}
            Err(e) => return Err(errno_err("inspect", shown)(e)),
        }
        match mknodat(
            &dir,
            name,
            FileType::CharacterDevice,
            Mode::empty(),
            makedev(0, 0),
        ) {
            Ok(()) => Ok(()),
            Err(Errno::PERM) => {
                self.overlay_ready = false;
                Ok(())
            }
            Err(e) => Err(errno_err("create whiteout", shown)(e)),
        }
    }

    /// Marks directory `path` opaque for overlayfs, creating it if the layer did not list it.
    pub fn opaque(&mut self, path: &str) -> Result<(), UnpackError> {
        self.open_dir(path)?;
        let fd = self.open_existing_dir(path)?;
        match fsetxattr(&fd, OVERLAY_OPAQUE, b"y", XattrFlags::empty()) {
            Ok(()) => Ok(()),
            Err(Errno::PERM | Errno::NOTSUP) => {
                self.overlay_ready = false;
                Ok(())
            }
            Err(e) => Err(errno_err("mark opaque", self.shown(path))(e)),
        }
    }

    /// Removes whatever is at `path` (a whiteout applied to a flattened tree).
    pub fn remove(&mut self, path: &str) -> Result<(), UnpackError> {
        let (parent, name) = parent_and_name(path);
        let target = if parent.is_empty() { "." } else { parent };
        let dir =
            match self.open_in_root(target, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC) {
                Ok(fd) => fd,
                Err(Errno::NOENT | Errno::NOTDIR) => return Ok(()),
                Err(e) => return Err(errno_err("open directory", self.shown(parent))(e)),
            };
        let shown = self.shown(path);
        self.clear_name(&dir, name, false, &shown).map(|_| ())
    }

    /// Empties directory `path` (an opaque marker applied to a flattened tree), if it is one.
    pub fn clear_dir(&mut self, path: &str) -> Result<(), UnpackError> {
        let target = if path.is_empty() { "." } else { path };
        let fd = match self.open_in_root(
            target,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        ) {
            Ok(fd) => fd,
            Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP) => return Ok(()),
            Err(e) => return Err(errno_err("open directory", self.shown(path))(e)),
        };
        remove_children(&fd, &self.shown(path), 0)
    }

    /// Sets the directories' modes and times, now that nothing more is written into them.
    pub fn finish(mut self) -> Result<(Skipped, bool), UnpackError> {
        for (path, meta) in std::mem::take(&mut self.dirs) {
            let fd = match self.open_existing_dir(&path) {
                Ok(fd) => fd,
                // Replaced later in the layer by something that is not a directory.
                Err(UnpackError::Io { source, .. })
                    if matches!(
                        Errno::from_io_error(&source),
                        Some(Errno::NOTDIR | Errno::LOOP | Errno::NOENT)
                    ) =>
                {
                    continue;
                }
                Err(e) => return Err(e),
            };
            let shown = self.shown(&path);
            fchmod(&fd, Mode::from_raw_mode(meta.mode & 0o7777))
                .map_err(errno_err("set the mode of", shown.clone()))?;
            futimens(&fd, &times(meta.mtime)).map_err(errno_err("set the times of", shown))?;
        }
        Ok((self.skipped, self.overlay_ready))
    }
}

/// Remembers whether an error came from the reading side of a copy.
struct TrackRead<'a> {
    inner: &'a mut dyn Read,
    failed: bool,
}

impl Read for TrackRead<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).inspect_err(|_| self.failed = true)
    }
}

fn times(mtime: i64) -> Timestamps {
    let t = Timespec {
        tv_sec: mtime,
        tv_nsec: 0,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

/// Removes directory `name` in `dir` and everything in it, never following a symlink.
pub(crate) fn remove_tree(
    dir: &impl AsFd,
    name: &str,
    shown: &Path,
    depth: usize,
) -> Result<(), UnpackError> {
    let fd = openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(errno_err("open directory", shown.to_path_buf()))?;
    remove_children(&fd, shown, depth)?;
    unlinkat(dir, name, AtFlags::REMOVEDIR).map_err(errno_err("remove", shown.to_path_buf()))
}

fn remove_children(fd: &OwnedFd, shown: &Path, depth: usize) -> Result<(), UnpackError> {
    if depth > MAX_REMOVE_DEPTH {
        return Err(UnpackError::Io {
            step: "remove",
            path: shown.to_path_buf(),
            source: io::Error::other(format!("directories nested deeper than {MAX_REMOVE_DEPTH}")),
        });
    }
    let mut names = Vec::new();
    for entry in Dir::read_from(fd).map_err(errno_err("list", shown.to_path_buf()))? {
        let entry = entry.map_err(errno_err("list", shown.to_path_buf()))?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(entry.file_name().to_owned());
        }
    }
    for name in names {
        let text = name.to_string_lossy().into_owned();
        let child = shown.join(&text);
        let stat = statat(fd, name.as_c_str(), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(errno_err("inspect", child.clone()))?;
        if FileType::from_raw_mode(stat.st_mode) == FileType::Directory {
            remove_tree(fd, &text, &child, depth + 1)?;
        } else {
            unlinkat(fd, name.as_c_str(), AtFlags::empty()).map_err(errno_err("remove", child))?;
        }
    }
    Ok(())
}

/// Removes `path` (a directory tree flotilla made) if it is there.
pub(crate) fn remove_dir_if_present(path: &Path) -> Result<(), UnpackError> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Ok(());
    };
    let dir = match File::open(parent) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("open", parent)(e)),
    };
    let name = name.to_string_lossy();
    match statat(&dir, name.as_ref(), AtFlags::SYMLINK_NOFOLLOW) {
        Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(errno_err("inspect", path.to_path_buf())(e)),
        Ok(stat) if FileType::from_raw_mode(stat.st_mode) == FileType::Directory => {
            remove_tree(&dir, &name, path, 0)
        }
        Ok(_) => unlinkat(&dir, name.as_ref(), AtFlags::empty())
            .map_err(errno_err("remove", path.to_path_buf())),
    }
}
