//! The container's user: `uid[:gid]` or `name[:group]`, resolved the way runc and Docker resolve it, against the
//! image's own `/etc/passwd` and `/etc/group` (never the host's).
//!
//! Parsing and resolving are pure ([`resolve`]); reading the two files is [`EtcFiles::read`], which opens them
//! inside the rootfs ([`crate::fs_root`]: `openat2(RESOLVE_IN_ROOT)`, or its userspace walk on older kernels): the
//! image is untrusted, and a `/etc/passwd` symlinked to `/../../etc/shadow` must resolve inside the rootfs, as it
//! would for the container, instead of reading a host file.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use rustix::fs::OFlags;

use crate::fs_root::{Symlinks, open_in_root};

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error(
        "user {user:?} is not in the image's /etc/passwd: give a numeric uid[:gid] with --user, or a user the image \
         defines"
    )]
    UnknownUser { user: String },
    #[error(
        "group {group:?} is not in the image's /etc/group: give a numeric gid with --user uid:gid, or a group the \
         image defines"
    )]
    UnknownGroup { group: String },
    #[error("user {0:?}: write uid[:gid] or name[:group]")]
    Malformed(String),
    #[error("reading {path} inside the image's root filesystem {rootfs} failed")]
    Read {
        rootfs: PathBuf,
        path: &'static str,
        source: io::Error,
    },
}

/// Whom the container's process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    pub uid: u32,
    pub gid: u32,
    /// The groups listing the user by name in `/etc/group`, besides `gid`.
    pub additional_gids: Vec<u32>,
}

impl ResolvedUser {
    pub const ROOT: ResolvedUser = ResolvedUser {
        uid: 0,
        gid: 0,
        additional_gids: Vec::new(),
    };
}

/// The image's `/etc/passwd` and `/etc/group`; a missing file reads as empty, as it does for runc.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EtcFiles {
    pub passwd: String,
    pub group: String,
}

impl EtcFiles {
    pub fn read(rootfs: &Path) -> Result<EtcFiles, UserError> {
        Ok(EtcFiles {
            passwd: read_in_root(rootfs, "/etc/passwd")?,
            group: read_in_root(rootfs, "/etc/group")?,
        })
    }
}

fn read_in_root(rootfs: &Path, path: &'static str) -> Result<String, UserError> {
    let err = |source: io::Error| UserError::Read {
        rootfs: rootfs.to_path_buf(),
        path,
        source,
    };
    let root = File::open(rootfs).map_err(err)?;
    let fd = match open_in_root(
        &root,
        path,
        OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY,
        Symlinks::InRoot,
    ) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) => return Ok(String::new()),
        Err(e) => return Err(err(e.into())),
    };
    let mut bytes = Vec::new();
    // An image could make /etc/passwd a FIFO or /dev/zero; a real one is far smaller than this.
    File::from(fd)
        .take(4 << 20)
        .read_to_end(&mut bytes)
        .map_err(err)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
}

struct GroupEntry<'a> {
    name: &'a str,
    gid: u32,
    members: Vec<&'a str>,
}

/// Lines that do not parse are skipped, as libc skips them.
fn passwd_entries(text: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    text.lines().filter_map(|line| {
        let mut f = line.split(':');
        let name = f.next()?;
        let _password = f.next()?;
        let uid = f.next()?.parse().ok()?;
        let gid = f.next()?.parse().ok()?;
        Some(PasswdEntry { name, uid, gid })
    })
}

fn group_entries(text: &str) -> impl Iterator<Item = GroupEntry<'_>> {
    text.lines().filter_map(|line| {
        let mut f = line.split(':');
        let name = f.next()?;
        let _password = f.next()?;
        let gid = f.next()?.parse().ok()?;
        let members = f
            .next()
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .collect();
        Some(GroupEntry { name, gid, members })
    })
}

/// `spec` (`uid`, `uid:gid`, `name`, `name:group`, mixed forms too) against the image's files.
///
/// A numeric uid need not be in `/etc/passwd` (its gid is then 0, as with runc); a name must be. Supplementary
/// groups come from `/etc/group` memberships of the user's name, and only when no group was given explicitly, as
/// Docker does.
pub fn resolve(spec: &str, etc: &EtcFiles) -> Result<ResolvedUser, UserError> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if user.is_empty() || group == Some("") {
        return Err(UserError::Malformed(spec.to_string()));
    }
    let entry = passwd_entries(&etc.passwd).find(|e| match user.parse::<u32>() {
        Ok(uid) => e.uid == uid,
        Err(_) => e.name == user,
    });
    let (uid, mut gid, name) = match (user.parse::<u32>(), &entry) {
        (_, Some(e)) => (e.uid, e.gid, Some(e.name)),
        (Ok(uid), None) => (uid, 0, None),
        (Err(_), None) => {
            return Err(UserError::UnknownUser {
                user: user.to_string(),
            });
        }
    };
    if let Some(group) = group {
        gid = match group.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => group_entries(&etc.group)
                .find(|g| g.name == group)
                .map(|g| g.gid)
                .ok_or_else(|| UserError::UnknownGroup {
                    group: group.to_string(),
                })?,
        };
    }
    let mut additional_gids = Vec::new();
    if let (None, Some(name)) = (group, name) {
        for g in group_entries(&etc.group) {
            if g.gid != gid && g.members.contains(&name) && !additional_gids.contains(&g.gid) {
                additional_gids.push(g.gid);
            }
        }
    }
    Ok(ResolvedUser {
        uid,
        gid,
        additional_gids,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn etc() -> EtcFiles {
        EtcFiles {
            passwd: "root:x:0:0:root:/root:/bin/sh\n\
                     app:x:1000:1000::/home/app:/bin/sh\n\
                     broken line\n\
                     daemon:x:2:2::/:/sbin/nologin\n"
                .to_string(),
            group: "root:x:0:\n\
                    app:x:1000:\n\
                    dialout:x:20:app,daemon\n\
                    i2c:x:998: app \n\
                    video:x:44:daemon\n"
                .to_string(),
        }
    }

    #[test]
    fn resolves_like_runc() {
        let rows: &[(&str, u32, u32, &[u32])] = &[
            ("0", 0, 0, &[]),
            ("root", 0, 0, &[]),
            ("app", 1000, 1000, &[20, 998]),
            ("1000", 1000, 1000, &[20, 998]),
            ("app:video", 1000, 44, &[]),
            ("app:7", 1000, 7, &[]),
            ("4242", 4242, 0, &[]),
            ("4242:4242", 4242, 4242, &[]),
            ("daemon", 2, 2, &[20, 44]),
        ];
        for (spec, uid, gid, extra) in rows {
            let r = resolve(spec, &etc()).unwrap_or_else(|e| panic!("{spec}: {e}"));
            assert_eq!(
                (r.uid, r.gid, r.additional_gids.as_slice()),
                (*uid, *gid, *extra),
                "{spec}"
            );
        }
    }

    #[test]
    fn unknown_names_say_what_to_do() {
        let e = resolve("nobody", &etc()).unwrap_err();
        assert!(matches!(e, UserError::UnknownUser { .. }), "{e}");
        assert!(e.to_string().contains("numeric uid"), "{e}");
        let e = resolve("app:wheel", &etc()).unwrap_err();
        assert!(matches!(e, UserError::UnknownGroup { .. }), "{e}");
        for bad in ["", ":1", "app:"] {
            assert!(
                matches!(resolve(bad, &etc()), Err(UserError::Malformed(_))),
                "{bad}"
            );
        }
        assert!(resolve("app", &EtcFiles::default()).is_err());
    }

    #[test]
    fn a_symlinked_passwd_stays_inside_the_rootfs() {
        for resolver in crate::fs_root::Resolver::available() {
            crate::fs_root::with_resolver(resolver, a_symlinked_passwd_stays_inside);
        }
    }

    fn a_symlinked_passwd_stays_inside() {
        let host = tempfile::tempdir().unwrap();
        std::fs::write(host.path().join("secret"), "host:x:7:7::/:/bin/sh\n").unwrap();
        let rootfs = tempfile::tempdir().unwrap();
        std::fs::create_dir(rootfs.path().join("etc")).unwrap();
        // An absolute link and a relative one climbing out: both must land inside the rootfs.
        std::os::unix::fs::symlink(host.path().join("secret"), rootfs.path().join("etc/passwd"))
            .unwrap();
        let relative = format!("../../../../../../..{}", host.path().display());
        std::os::unix::fs::symlink(
            format!("{relative}/secret"),
            rootfs.path().join("etc/group"),
        )
        .unwrap();
        let files = EtcFiles::read(rootfs.path()).unwrap();
        assert_eq!(files, EtcFiles::default());

        std::fs::create_dir_all(rootfs.path().join(host.path().strip_prefix("/").unwrap()))
            .unwrap();
        std::fs::write(
            rootfs
                .path()
                .join(host.path().strip_prefix("/").unwrap())
                .join("secret"),
            "inside:x:9:9::/:/bin/sh\n",
        )
        .unwrap();
        let files = EtcFiles::read(rootfs.path()).unwrap();
        assert_eq!(files.passwd, "inside:x:9:9::/:/bin/sh\n");
        assert_eq!(files.group, "inside:x:9:9::/:/bin/sh\n");
    }
}
