//! Opening a path inside a directory as if that directory were `/`: the one way flotilla opens a path an image
//! controls. The unpack writer ([`crate::unpack`]), the layer reader ([`crate::layers`]) and the container's user
//! lookup ([`crate::runtime::user`]) all open through [`open_in_root`].
//!
//! Two resolvers give the same answers:
//! - [`Resolver::Openat2`]: the kernel's `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)` (Linux 5.6 and newer).
//! - [`Resolver::Userspace`]: where `openat2` is missing (ENOSYS on Linux before 5.6: Raspberry Pi OS Buster,
//!   Jetson L4T, most vendor BSPs) or refused (EPERM or ENOSYS from a container runtime's seccomp profile), the
//!   same walk done here, one component at a time, from a descriptor of the root.
//!
//! The choice is made once per process ([`Resolver::current`]): one probe call of `openat2`, its outcome kept.
//! `flotilla platform` reports it.
//!
//! The userspace walk, as libpathrs's fallback and Go's securejoin do it, in short:
//! - Each component is opened with `openat(dir, name, O_PATH | O_NOFOLLOW)` from the directory reached so far: the
//!   kernel never follows a symlink for us, and never sees more than one name.
//! - A symlink's target is read (`readlinkat`) and put in front of what remains of the path. An absolute target
//!   starts again at the root. After 40 symlinks (the kernel's own bound) the walk stops with ELOOP.
//! - `..` goes back to the parent *as walked*: the names from the root down are kept, and the parent is opened again
//!   from the root through them, each with `O_NOFOLLOW`. At the root, `..` stays at the root. `openat(dir, "..")` is
//!   never used: were a directory moved out of the root while the walk stands in it, its `..` would lead outside
//!   (the rename race libpathrs detects after the fact); walking down again from the root cannot.
//! - Symlinks on procfs are refused with ELOOP, as `RESOLVE_NO_MAGICLINKS` refuses magic links (stricter: it
//!   refuses `/proc/self` too, which no image root flotilla writes has).
//! - The last component is opened with the caller's flags plus `O_NOFOLLOW`, once the walk knows it is not a symlink
//!   to follow; if it was swapped for one in between, that open fails rather than following it.
//!
//! Only opening what exists is supported (`O_CREAT` and `O_TMPFILE` are refused with EINVAL by both resolvers):
//! flotilla creates entries with `*at` calls on a parent opened here.

use std::cell::Cell;
use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::OnceLock;

use rustix::fs::{
    FileType, Mode, OFlags, ResolveFlags, fstat, fstatfs, openat, openat2, readlinkat,
};
use rustix::io::Errno;

/// The kernel's `MAXSYMLINKS`: more symlinks than this in one lookup is ELOOP for it, and so here.
const MAX_SYMLINKS: usize = 40;
/// The kernel's `PATH_MAX` (with its NUL): a longer path is ENAMETOOLONG for it, and so here.
const PATH_MAX: usize = 4096;

/// Which implementation resolves paths inside a root.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Resolver {
    /// The kernel: `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`.
    Openat2,
    /// The walk in this module, for kernels without a usable `openat2`.
    Userspace,
}

/// Whether symlinks met on the way are followed (always inside the root) or refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Symlinks {
    /// Followed inside the root: `RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS`.
    InRoot,
    /// Any symlink on the way is ELOOP: `RESOLVE_IN_ROOT | RESOLVE_NO_SYMLINKS`. A last component that is a symlink
    /// is opened itself with `O_PATH | O_NOFOLLOW`, and ELOOP otherwise, as for the kernel.
    Refuse,
}

/// What the probe found, kept for the life of the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub resolver: Resolver,
    /// Why `openat2` is not used, when it is not.
    pub openat2_error: Option<Errno>,
}

static PROBE: OnceLock<Probe> = OnceLock::new();

thread_local! {
    static FORCED: Cell<Option<Resolver>> = const { Cell::new(None) };
}

/// Probes `openat2` once per process.
pub fn probe() -> Probe {
    *PROBE.get_or_init(|| {
        // Any failure, not only ENOSYS and EPERM, means the walk is used: it is as safe, only slower.
        match openat2(
            rustix::fs::CWD,
            "/",
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
        ) {
            Ok(_) => Probe {
                resolver: Resolver::Openat2,
                openat2_error: None,
            },
            Err(e) => Probe {
                resolver: Resolver::Userspace,
                openat2_error: Some(e),
            },
        }
    })
}

/// Runs `f` with `resolver` used on this thread instead of the probed one, so tests run the same cases through
/// both resolvers in one process. Nested calls restore the outer choice when they return or unwind.
pub fn with_resolver<T>(resolver: Resolver, f: impl FnOnce() -> T) -> T {
    struct Restore(Option<Resolver>);
    impl Drop for Restore {
        fn drop(&mut self) {
            FORCED.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(FORCED.with(|c| c.replace(Some(resolver))));
    f()
}

impl Resolver {
    /// The resolver this process uses (or this thread, inside [`with_resolver`]).
    pub fn current() -> Resolver {
        FORCED.with(Cell::get).unwrap_or_else(|| probe().resolver)
    }

    /// The resolvers that work here, the kernel's first: the userspace walk always does.
    pub fn available() -> Vec<Resolver> {
        match probe().resolver {
            Resolver::Openat2 => vec![Resolver::Openat2, Resolver::Userspace],
            Resolver::Userspace => vec![Resolver::Userspace],
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Resolver::Openat2 => "openat2",
            Resolver::Userspace => "userspace",
        }
    }

    /// Opens `path` inside `root` (a directory descriptor) with `flags`, as if `root` were `/`: absolute paths,
    /// absolute symlink targets and `..` never lead above it.
    pub fn open(
        self,
        root: impl AsFd,
        path: impl AsRef<Path>,
        flags: OFlags,
        symlinks: Symlinks,
    ) -> Result<OwnedFd, Errno> {
        // O_TMPFILE holds the O_DIRECTORY bit: only the whole of it means a temporary file.
        if flags.contains(OFlags::CREATE) || flags.contains(OFlags::TMPFILE) {
            return Err(Errno::INVAL);
        }
        let path = path.as_ref();
        match self {
            Resolver::Openat2 => {
                let resolve = match symlinks {
                    Symlinks::InRoot => ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
                    Symlinks::Refuse => ResolveFlags::IN_ROOT | ResolveFlags::NO_SYMLINKS,
                };
                openat2(root, path, flags | OFlags::CLOEXEC, Mode::empty(), resolve)
            }
            Resolver::Userspace => walk(
                root.as_fd(),
                path.as_os_str().as_bytes(),
                flags | OFlags::CLOEXEC,
                symlinks,
            ),
        }
    }
}

/// [`Resolver::open`] with [`Resolver::current`].
pub fn open_in_root(
    root: impl AsFd,
    path: impl AsRef<Path>,
    flags: OFlags,
    symlinks: Symlinks,
) -> Result<OwnedFd, Errno> {
    Resolver::current().open(root, path, flags, symlinks)
}

/// Puts the components of `path` on `todo` so that the first is popped first. A trailing slash becomes a trailing
/// `.`, so the name before it must be a directory (and a symlink there is followed), as for the kernel.
fn push_components(todo: &mut Vec<Vec<u8>>, path: &[u8]) {
    if path.ends_with(b"/") {
        todo.push(b".".to_vec());
    }
    for name in path.rsplit(|b| *b == b'/') {
        if !name.is_empty() && name != b"." {
            todo.push(name.to_vec());
        }
    }
}

fn dir_flags() -> OFlags {
    OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

/// The directory at `names` under `root`, walked down again: plain names the walk already went through, none a
/// symlink then, and none allowed to be one now.
fn rewalk(root: BorrowedFd<'_>, names: &[Vec<u8>]) -> Result<OwnedFd, Errno> {
    let mut dir = openat(root, ".", dir_flags(), Mode::empty())?;
    for name in names {
        dir = openat(&dir, OsStr::from_bytes(name), dir_flags(), Mode::empty())?;
    }
    Ok(dir)
}

fn walk(
    root: BorrowedFd<'_>,
    path: &[u8],
    flags: OFlags,
    symlinks: Symlinks,
) -> Result<OwnedFd, Errno> {
    if path.is_empty() {
        return Err(Errno::NOENT);
    }
    if path.len() >= PATH_MAX {
        return Err(Errno::NAMETOOLONG);
    }
    let mut todo = Vec::new();
    push_components(&mut todo, path);
    // The names from the root to `dir`, for `..`.
    let mut walked: Vec<Vec<u8>> = Vec::new();
    let mut dir = rewalk(root, &walked)?;
    let mut hops = 0;
    while let Some(name) = todo.pop() {
        if name == b"." {
            continue;
        }
        if name == b".." {
            walked.pop();
            dir = rewalk(root, &walked)?;
            continue;
        }
        let last = todo.is_empty();
        let os_name = OsStr::from_bytes(&name);
        let entry = openat(
            &dir,
            os_name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let kind = FileType::from_raw_mode(fstat(&entry)?.st_mode);
        if kind == FileType::Symlink {
            if last && flags.contains(OFlags::NOFOLLOW) {
                // The link itself with O_PATH, ELOOP otherwise: what openat2 gives for a trailing symlink here.
                return openat(&dir, os_name, flags, Mode::empty());
            }
            if symlinks == Symlinks::Refuse || is_procfs(&entry)? {
                return Err(Errno::LOOP);
            }
            hops += 1;
            if hops > MAX_SYMLINKS {
                return Err(Errno::LOOP);
            }
            let target = readlinkat(&entry, "", Vec::new())?;
            let target = target.as_bytes();
            if target.is_empty() {
                return Err(Errno::NOENT);
            }
            if target.starts_with(b"/") {
                walked.clear();
                dir = rewalk(root, &walked)?;
            }
            push_components(&mut todo, target);
            continue;
        }
        if last {
            // NOFOLLOW: a symlink put here since the check above is refused, never followed.
            return openat(&dir, os_name, flags | OFlags::NOFOLLOW, Mode::empty());
        }
        if kind != FileType::Directory {
            return Err(Errno::NOTDIR);
        }
        dir = entry;
        walked.push(name);
    }
    // The path ended on a directory: the root itself, or a trailing `.` or `..`.
    openat(&dir, ".", flags, Mode::empty())
}

fn is_procfs(fd: &OwnedFd) -> Result<bool, Errno> {
    Ok(fstatfs(fd)?.f_type == rustix::fs::PROC_SUPER_MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{MetadataExt, symlink};

    /// A root with hostile symlinks, beside an `outside` directory holding a `canary`.
    struct Tree {
        _dir: tempfile::TempDir,
        root: std::path::PathBuf,
        outside: std::path::PathBuf,
    }

    fn tree() -> Tree {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        fs::create_dir_all(root.join("etc/sub")).unwrap();
        fs::create_dir_all(&outside).unwrap();
        fs::write(outside.join("canary"), b"outside").unwrap();
        fs::write(root.join("etc/passwd"), b"inside").unwrap();
        fs::write(root.join("etc/sub/file"), b"sub").unwrap();
        // Where an escaping link would land if resolved inside the root: present, so "inside" is not just ENOENT.
        let mirror = root.join(outside.strip_prefix("/").unwrap());
        fs::create_dir_all(&mirror).unwrap();
        fs::write(mirror.join("canary"), b"mirror").unwrap();
        let links: &[(&str, String)] = &[
            ("abs", outside.display().to_string()),
            ("abs_file", outside.join("canary").display().to_string()),
            ("up", "../../../../..".into()),
            (
                "up_canary",
                format!("../../../../..{}/canary", outside.display()),
            ),
            ("etc/sub/up", "../../..".into()),
            ("etc/sub/rel", "../passwd".into()),
            ("slash", "/".into()),
            ("loop_a", "loop_b".into()),
            ("loop_b", "loop_a".into()),
            ("self", "self".into()),
            ("dangling", "nowhere/at/all".into()),
            ("dangling_abs", "/nowhere".into()),
            ("to_file", "etc/passwd".into()),
            ("to_dir", "etc/sub".into()),
            ("chain", "to_dir/rel".into()),
            ("to_up", "up/etc".into()),
            ("empty_dir_link", "etc/sub/.".into()),
            ("proc_self", "/proc/self/root".into()),
        ];
        for (at, target) in links {
            symlink(target, root.join(at)).unwrap();
        }
        Tree {
            _dir: dir,
            root,
            outside,
        }
    }

    const PATHS: &[&str] = &[
        ".",
        "/",
        "..",
        "../../..",
        "etc/passwd",
        "/etc/passwd",
        "../../etc/passwd",
        "etc/../etc/./passwd",
        "etc/passwd/",
        "etc/passwd/x",
        "etc/sub/",
        "etc/sub/up/etc/passwd",
        "etc/sub/rel",
        "abs",
        "abs/canary",
        "abs/../abs/canary",
        "abs_file",
        "up",
        "up/etc/passwd",
        "up_canary",
        "slash/etc/passwd",
        "loop_a",
        "loop_a/x",
        "self",
        "dangling",
        "dangling/x",
        "dangling_abs",
        "to_file",
        "to_file/x",
        "to_file/",
        "to_dir/file",
        "chain",
        "to_up/passwd",
        "empty_dir_link/file",
        "proc_self",
        "missing",
        "missing/x",
        "",
    ];

    /// What an open came to: the inode reached, or the errno.
    fn outcome(r: Result<OwnedFd, Errno>) -> Result<(u64, u64), Errno> {
        r.map(|fd| {
            let md = fs::File::from(fd).metadata().unwrap();
            (md.dev(), md.ino())
        })
    }

    fn ino(path: &Path) -> (u64, u64) {
        let md = fs::symlink_metadata(path).unwrap();
        (md.dev(), md.ino())
    }

    /// Every flag set flotilla uses, with the symlink rule it uses it with.
    fn modes() -> Vec<(OFlags, Symlinks)> {
        vec![
            (OFlags::PATH | OFlags::DIRECTORY, Symlinks::InRoot),
            (
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW,
                Symlinks::InRoot,
            ),
            (OFlags::RDONLY | OFlags::NOCTTY, Symlinks::InRoot),
            (OFlags::RDONLY | OFlags::NOFOLLOW, Symlinks::Refuse),
            (OFlags::PATH | OFlags::NOFOLLOW, Symlinks::InRoot),
            (OFlags::PATH, Symlinks::Refuse),
        ]
    }

    #[test]
    fn the_walk_never_leaves_the_root() {
        let t = tree();
        let root = fs::File::open(&t.root).unwrap();
        let outside = [ino(&t.outside), ino(&t.outside.join("canary"))];
        let above = ino(t.root.parent().unwrap());
        for (flags, symlinks) in modes() {
            for path in PATHS {
                let got = outcome(Resolver::Userspace.open(&root, path, flags, symlinks));
                if let Ok(i) = got {
                    assert!(
                        !outside.contains(&i) && i != above,
                        "{path:?} ({flags:?}, {symlinks:?}) reached outside the root"
                    );
                }
            }
        }
        let read = |path: &str| {
            let fd = Resolver::Userspace
                .open(&root, path, OFlags::RDONLY, Symlinks::InRoot)
                .unwrap();
            std::io::read_to_string(fs::File::from(fd)).unwrap()
        };
        assert_eq!(read("abs/canary"), "mirror");
        assert_eq!(read("up_canary"), "mirror");
        assert_eq!(read("abs_file"), "mirror");
        assert_eq!(read("up/etc/passwd"), "inside");
        assert_eq!(read("chain"), "inside");
        let errno = |path: &str, flags, symlinks| {
            Resolver::Userspace
                .open(&root, path, flags, symlinks)
                .unwrap_err()
        };
        assert_eq!(
            errno("loop_a", OFlags::RDONLY, Symlinks::InRoot),
            Errno::LOOP
        );
        assert_eq!(errno("self", OFlags::RDONLY, Symlinks::InRoot), Errno::LOOP);
        assert_eq!(
            errno("dangling", OFlags::RDONLY, Symlinks::InRoot),
            Errno::NOENT
        );
        assert_eq!(
            errno("to_file/x", OFlags::RDONLY, Symlinks::InRoot),
            Errno::NOTDIR
        );
        assert_eq!(
            errno(
                "to_file",
                OFlags::RDONLY | OFlags::DIRECTORY,
                Symlinks::InRoot
            ),
            Errno::NOTDIR
        );
        assert_eq!(
            errno("etc/sub/rel", OFlags::RDONLY, Symlinks::Refuse),
            Errno::LOOP
        );
        assert_eq!(
            errno("proc_self", OFlags::RDONLY, Symlinks::InRoot),
            Errno::NOENT,
            "/proc/self/root is resolved inside the root, where there is no /proc"
        );
        assert_eq!(
            errno("x", OFlags::RDONLY | OFlags::CREATE, Symlinks::InRoot),
            Errno::INVAL
        );
    }

    #[test]
    fn a_chain_longer_than_the_kernel_allows_is_eloop() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("l0"), b"end").unwrap();
        for i in 1..=41 {
            symlink(format!("l{}", i - 1), dir.path().join(format!("l{i}"))).unwrap();
        }
        let root = fs::File::open(dir.path()).unwrap();
        for resolver in Resolver::available() {
            let open = |p: &str| outcome(resolver.open(&root, p, OFlags::RDONLY, Symlinks::InRoot));
            assert!(open("l40").is_ok(), "{resolver:?}: 40 hops are allowed");
            assert_eq!(open("l41"), Err(Errno::LOOP), "{resolver:?}");
        }
    }

    #[test]
    fn the_walk_matches_the_kernel() {
        if probe().resolver != Resolver::Openat2 {
            eprintln!(
                "skipping: openat2 is not usable here ({:?})",
                probe().openat2_error
            );
            return;
        }
        let t = tree();
        let root = fs::File::open(&t.root).unwrap();
        let mut opened = 0;
        let mut errors = std::collections::BTreeSet::new();
        for (flags, symlinks) in modes() {
            for path in PATHS {
                let kernel = outcome(Resolver::Openat2.open(&root, path, flags, symlinks));
                let ours = outcome(Resolver::Userspace.open(&root, path, flags, symlinks));
                assert_eq!(ours, kernel, "{path:?} with {flags:?}, {symlinks:?}");
                match kernel {
                    Ok(_) => opened += 1,
                    Err(e) => {
                        errors.insert(e.raw_os_error());
                    }
                }
            }
        }
        // Not agreement by failing alike: most opens succeed, and each kind of refusal is met.
        assert!(opened > PATHS.len() * 2, "only {opened} opens succeeded");
        for e in [Errno::LOOP, Errno::NOENT, Errno::NOTDIR] {
            assert!(errors.contains(&e.raw_os_error()), "{e:?} never met");
        }
    }

    #[test]
    fn magic_links_are_refused_by_both() {
        // /proc/self as the root: its `root` and `cwd` entries are magic links, which lead anywhere.
        let proc_self = fs::File::open("/proc/self").unwrap();
        for resolver in Resolver::available() {
            for path in ["root/etc", "cwd", "root"] {
                let got = outcome(resolver.open(
                    &proc_self,
                    path,
                    OFlags::PATH | OFlags::DIRECTORY,
                    Symlinks::InRoot,
                ));
                assert_eq!(got, Err(Errno::LOOP), "{resolver:?} {path}");
            }
        }
    }

    #[test]
    fn a_forced_resolver_holds_on_its_thread_only_and_is_restored() {
        let probed = Resolver::current();
        with_resolver(Resolver::Userspace, || {
            assert_eq!(Resolver::current(), Resolver::Userspace);
            std::thread::scope(|s| {
                s.spawn(|| assert_eq!(Resolver::current(), probed));
            });
        });
        assert_eq!(Resolver::current(), probed);
    }
}
