//! Unpacking layers: hostile layers stay inside the root, whatever the layer tries; OCI layer semantics hold with
//! overlayfs and with the flattened copy; a crash mid-unpack is never taken for a whole snapshot.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use common::Flotilla;
use common::tarcraft::RawTar;
use flotilla::digest::Digest;
use flotilla::fs_root::{Resolver, with_resolver};
use flotilla::layers::LayerSource;
use flotilla::unpack::extract::extract_stream;
use flotilla::unpack::{Limits, RootKind, Snapshots, UnpackError, prepare_as, release};

const CANARY: &[u8] = b"precious";
const CANARY_MTIME: u64 = 1_234_567_890;

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// A directory with a canary outside the root being written, and a record of everything outside the root.
struct Sandbox {
    _dir: tempfile::TempDir,
    base: PathBuf,
    canary: PathBuf,
    before: BTreeMap<PathBuf, String>,
}

/// Where the tests write: the root, the snapshots, the container. Everything else under `base` is "outside".
const INSIDE: [&str; 3] = ["work/root", "work/state", "work/ctr"];

impl Sandbox {
    fn new() -> Sandbox {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().to_path_buf();
        fs::create_dir_all(base.join("outside")).unwrap();
        for d in INSIDE {
            fs::create_dir_all(base.join(d)).unwrap();
        }
        let canary = base.join("outside/canary");
        fs::write(&canary, CANARY).unwrap();
        fs::set_permissions(&canary, fs::Permissions::from_mode(0o644)).unwrap();
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(CANARY_MTIME);
        fs::File::options()
            .write(true)
            .open(&canary)
            .unwrap()
            .set_times(fs::FileTimes::new().set_modified(t).set_accessed(t))
            .unwrap();
        let mut s = Sandbox {
            _dir: dir,
            base,
            canary,
            before: BTreeMap::new(),
        };
        s.before = s.outside();
        s
    }

    fn root(&self) -> PathBuf {
        self.base.join("work/root")
    }

    fn state(&self) -> PathBuf {
        self.base.join("work/state")
    }

    fn ctr(&self) -> PathBuf {
        self.base.join("work/ctr")
    }

    /// Every path outside the written directories, with what it is.
    fn outside(&self) -> BTreeMap<PathBuf, String> {
        let mut out = BTreeMap::new();
        let mut todo = vec![self.base.clone()];
        while let Some(dir) = todo.pop() {
            for e in fs::read_dir(&dir).unwrap() {
                let p = e.unwrap().path();
                let rel = p.strip_prefix(&self.base).unwrap().to_path_buf();
                if INSIDE.iter().any(|i| rel == Path::new(i)) {
                    continue;
                }
                let md = fs::symlink_metadata(&p).unwrap();
                out.insert(
                    rel,
                    format!(
                        "{:?} mode {:o} len {} mtime {} nlink {}",
                        md.file_type(),
                        md.mode(),
                        md.len(),
                        md.mtime(),
                        md.nlink()
                    ),
                );
                if md.is_dir() {
                    todo.push(p);
                }
            }
        }
        out
    }

    fn check(&self, what: &str) {
        assert_eq!(
            fs::read(&self.canary).unwrap(),
            CANARY,
            "{what}: canary content"
        );
        let md = fs::symlink_metadata(&self.canary).unwrap();
        assert_eq!(md.mode() & 0o7777, 0o644, "{what}: canary mode");
        assert_eq!(md.mtime() as u64, CANARY_MTIME, "{what}: canary mtime");
        assert_eq!(md.nlink(), 1, "{what}: a hard link to the canary was made");
        assert_eq!(
            self.outside(),
            self.before,
            "{what}: something changed outside the root"
        );
    }

    fn abs(&self, rel: &str) -> String {
        self.base.join(rel).display().to_string()
    }

    /// Writes `tar` as a layer blob (gzip when `gz`) and describes it.
    fn layer(&self, tar: &[u8], gz: bool) -> LayerSource {
        let blob = if gz {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(tar).unwrap();
            e.finish().unwrap()
        } else {
            tar.to_vec()
        };
        let digest = Digest::sha256_of(&blob);
        let blobs = self.base.join("work/state/blobs");
        fs::create_dir_all(&blobs).unwrap();
        let path = blobs.join(digest.hex());
        fs::write(&path, &blob).unwrap();
        LayerSource {
            digest,
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            path,
            diff_id: Some(Digest::sha256_of(tar)),
        }
    }

    /// Unpacks each layer into its snapshot; the diff_ids of those that were made, base first.
    fn snapshots(&self, layers: &[Vec<u8>]) -> (Snapshots, Vec<Digest>) {
        let snapshots = Snapshots::open(&self.state()).unwrap();
        let mut ids = Vec::new();
        for tar in layers {
            let source = self.layer(tar, true);
            match snapshots.ensure(&source, &Limits::default()) {
                Ok(_) => ids.push(source.diff_id.unwrap()),
                Err(e) => eprintln!("layer refused: {}", flotilla::error_chain(&e)),
            }
        }
        (snapshots, ids)
    }
}

/// One crafted stream per attack; some need several layers. Each layer ends with the write that would escape, so
/// an entry refused early cannot hide a later one. Each is run three ways below.
fn attacks(s: &Sandbox) -> Vec<(&'static str, Vec<Vec<u8>>)> {
    let outside = s.abs("outside");
    let canary = s.abs("outside/canary");
    let pwn = b"pwned".as_slice();
    vec![
        (
            "dot-dot paths",
            vec![
                RawTar::new()
                    .file("../outside/canary", pwn)
                    .file("../../../../../../../../outside/new", pwn)
                    .file("../escaped", pwn)
                    .dir("../newdir/")
                    .file("a/../../../outside/canary", pwn)
                    .finish(),
            ],
        ),
        (
            "absolute paths",
            vec![
                RawTar::new()
                    .file(&canary, pwn)
                    .file(&format!("../../..{canary}"), pwn)
                    .finish(),
            ],
        ),
        (
            "relative symlink planted then written through, same layer",
            vec![
                RawTar::new()
                    .symlink("rel", "../../outside")
                    .file("rel/canary", pwn)
                    .finish(),
            ],
        ),
        (
            "absolute symlink planted then written through, same layer",
            vec![
                RawTar::new()
                    .symlink("abs", &outside)
                    .file("abs/new", pwn)
                    .file("abs/canary", pwn)
                    .finish(),
            ],
        ),
        (
            "symlink to a file, then the file written, same layer",
            vec![
                RawTar::new()
                    .symlink("file", &canary)
                    .file("file", pwn)
                    .finish(),
            ],
        ),
        (
            "absolute symlink in an earlier layer, written through in the next",
            vec![
                RawTar::new().symlink("abs", &outside).finish(),
                RawTar::new().dir("abs/newdir/").finish(),
                RawTar::new().file("abs/canary", pwn).finish(),
            ],
        ),
        (
            "relative symlink in an earlier layer, written through in the next",
            vec![
                RawTar::new().symlink("rel", "../../outside").finish(),
                RawTar::new().file("rel/canary", pwn).finish(),
            ],
        ),
        (
            "symlink to a file in an earlier layer, the file written in the next",
            vec![
                RawTar::new().symlink("file", &canary).finish(),
                RawTar::new().file("file", pwn).finish(),
            ],
        ),
        (
            "hard link to an absolute outside file, then written through",
            vec![
                RawTar::new()
                    .hardlink("h1", &canary)
                    .file("h1", pwn)
                    .finish(),
            ],
        ),
        (
            "hard link to a dot-dot outside file, then written through",
            vec![
                RawTar::new()
                    .hardlink("h2", "../../outside/canary")
                    .file("h2", pwn)
                    .finish(),
            ],
        ),
        (
            "directory replaced by a symlink, then written into",
            vec![
                RawTar::new()
                    .dir("d/")
                    .file("d/inner", b"ok")
                    .symlink("d", &outside)
                    .file("d/new", pwn)
                    .file("d/canary", pwn)
                    .finish(),
            ],
        ),
        (
            "symlink replaced by a directory in the next layer, then written into",
            vec![
                RawTar::new().symlink("e", &outside).finish(),
                RawTar::new().dir("e/").file("e/canary", pwn).finish(),
            ],
        ),
        (
            "CVE-2018-20990: hard link through an absolute symlink",
            vec![
                RawTar::new()
                    .symlink("s", &outside)
                    .hardlink("h", "s/canary")
                    .file("h", pwn)
                    .finish(),
            ],
        ),
        (
            "CVE-2018-20990: hard link through a dot-dot symlink",
            vec![
                RawTar::new()
                    .symlink("up", "../..")
                    .hardlink("h2", "up/outside/canary")
                    .file("h2", pwn)
                    .finish(),
            ],
        ),
        (
            "CVE-2021-38511: directories created through a symlink",
            vec![
                RawTar::new()
                    .symlink("s", &outside)
                    .dir("s/newdir/")
                    .dir("s/newdir/deeper/")
                    .file("s/newdir/deeper/f", pwn)
                    .finish(),
            ],
        ),
        (
            "CVE-2021-29136: the root replaced by a symlink (entry and whiteout)",
            vec![
                RawTar::new()
                    .symlink(".", &outside)
                    .symlink("./", &outside)
                    .symlink("/", &outside)
                    .file(".wh..", b"")
                    .file(".wh...", b"")
                    .file("canary", pwn)
                    .finish(),
                RawTar::new()
                    .file("./.wh..wh..opq", b"")
                    .symlink(".", &outside)
                    .file("canary", pwn)
                    .finish(),
            ],
        ),
        (
            "CVE-2021-32760: chmod through a symlink",
            vec![
                RawTar::new()
                    .raw_mode("s", b'2', &canary, 0o777)
                    .raw_mode("d", b'2', &outside, 0o777)
                    .finish(),
                RawTar::new()
                    .raw_mode("d", b'5', "", 0o777)
                    .raw_mode("s", b'0', "", 0o777)
                    .finish(),
            ],
        ),
        (
            "CVE-2025-62518: PAX size against the ustar size",
            vec![smuggling_layer(&canary)],
        ),
    ]
}

/// A file whose PAX header says 1536 bytes while its ustar header says 0; the 1536 bytes hold a whole tar
/// header and content, which a reader trusting the ustar size would take for an entry.
fn smuggling_layer(target: &str) -> Vec<u8> {
    let mut inner = common::tarcraft::header(target.as_bytes(), b'0', b"", 5, 0o644, 0).to_vec();
    inner.extend_from_slice(b"pwned");
    inner.resize(1536, 0);
    RawTar::new()
        .pax(&[("size", b"1536")])
        .raw("carrier", b'0', "", 0, &inner)
        .file("after", b"after")
        .finish()
}

/// What a layer came to, the sandbox's own path taken out so that two sandboxes compare.
fn outcome<T>(s: &Sandbox, result: Result<T, UnpackError>) -> String {
    match result {
        Ok(_) => "ok".to_string(),
        Err(e) => flotilla::error_chain(&e).replace(&s.base.display().to_string(), "<base>"),
    }
}

/// Each path under `root` with its type, and a file's content or a link's target (times and owners left out: a
/// directory a layer does not list is made at the time of the unpack).
fn shape(s: &Sandbox, root: &Path) -> BTreeMap<String, String> {
    tree(root)
        .into_keys()
        .map(|rel| {
            let p = root.join(&rel);
            let md = fs::symlink_metadata(&p).unwrap();
            let what = if md.is_file() {
                // Larger files by size: the smuggled tar header, say, holds the sandbox's path and its checksum.
                let bytes = fs::read(&p).unwrap();
                if bytes.len() < 64 {
                    format!("file {:?}", String::from_utf8_lossy(&bytes))
                } else {
                    format!("file of {} bytes", bytes.len())
                }
            } else if md.is_symlink() {
                let target = fs::read_link(&p).unwrap().display().to_string();
                format!(
                    "symlink {}",
                    target.replace(&s.base.display().to_string(), "<base>")
                )
            } else {
                format!("{:?} {:o}", md.file_type(), md.mode() & 0o7777)
            };
            // An escaping path mirrored inside the root holds the sandbox's own name.
            let inner = s.base.strip_prefix("/").unwrap().display().to_string();
            (rel.replace(&inner, "<base>"), what)
        })
        .collect()
}

#[test]
fn hostile_layers_stay_inside_the_root_in_one_tree() {
    let probe = Sandbox::new();
    for (name, _) in attacks(&probe) {
        let mut seen: Vec<(Resolver, Vec<String>, BTreeMap<String, String>)> = Vec::new();
        for resolver in Resolver::available() {
            let s = Sandbox::new();
            let (_, layers) = attacks(&s).into_iter().find(|(n, _)| *n == name).unwrap();
            let results = with_resolver(resolver, || {
                layers
                    .iter()
                    // Refusing is as good as containing; either way nothing outside may change.
                    .map(|tar| {
                        let r = extract_stream(&tar[..], name, None, &s.root(), &Limits::default());
                        outcome(&s, r)
                    })
                    .collect()
            });
            s.check(&format!("{name} ({})", resolver.name()));
            seen.push((resolver, results, shape(&s, &s.root())));
        }
        // The userspace walk refuses what the kernel refuses, with the same error, and writes the same tree.
        for pair in seen.windows(2) {
            assert_eq!(
                (&pair[0].1, &pair[0].2),
                (&pair[1].1, &pair[1].2),
                "{name}: {} and {} differ",
                pair[0].0.name(),
                pair[1].0.name()
            );
        }
    }
}

#[test]
fn hostile_layers_stay_inside_the_root_through_snapshots_and_the_flattened_copy() {
    let probe = Sandbox::new();
    for (name, _) in attacks(&probe) {
        let mut accepted = Vec::new();
        for resolver in Resolver::available() {
            let s = Sandbox::new();
            let (_, layers) = attacks(&s).into_iter().find(|(n, _)| *n == name).unwrap();
            let name = format!("{name} ({})", resolver.name());
            with_resolver(resolver, || {
                let (snapshots, ids) = s.snapshots(&layers);
                accepted.push(ids.len());
                s.check(&format!("{name} (snapshots)"));
                let _ = prepare_as(&snapshots, &ids, &s.ctr(), false);
                s.check(&format!("{name} (flattened copy)"));
                if is_root() {
                    let _ = release(&s.ctr());
                    if let Ok(root) = prepare_as(&snapshots, &ids, &s.ctr(), true) {
                        // Writing into the mounted root as a container would: through whatever the layers left
                        // there.
                        for rel in [
                            "abs/canary",
                            "rel/canary",
                            "d/canary",
                            "e/canary",
                            "file",
                            "s",
                        ] {
                            let _ = fs::write(root.path.join(rel), b"pwned");
                        }
                        release(&s.ctr()).unwrap();
                        s.check(&format!("{name} (overlay)"));
                    }
                }
            });
        }
        assert!(
            accepted.windows(2).all(|w| w[0] == w[1]),
            "{name}: layers accepted by each resolver: {accepted:?}"
        );
    }
}

#[test]
fn pax_size_wins_over_the_ustar_size_as_gnu_tar_reads_it() {
    let s = Sandbox::new();
    let tar = smuggling_layer("smuggled");
    let out = extract_stream(&tar[..], "pax", None, &s.root(), &Limits::default()).unwrap();
    assert_eq!(fs::metadata(s.root().join("carrier")).unwrap().len(), 1536);
    assert!(!s.root().join("smuggled").exists(), "an entry was smuggled");
    assert_eq!(fs::read(s.root().join("after")).unwrap(), b"after");
    assert_eq!(out.entries, 2);
    if let Some(gnu) = common::required_tool("tar") {
        let path = s.base.join("work/state/pax.tar");
        fs::write(&path, &tar).unwrap();
        let listed = std::process::Command::new(gnu)
            .arg("-tf")
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&listed.stdout), "carrier\nafter\n");
    }
}

#[test]
fn decompression_bomb_stops_at_the_limit_and_leaves_no_snapshot() {
    let s = Sandbox::new();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(64 << 20);
    h.set_mode(0o644);
    let zeros = std::io::Read::take(std::io::repeat(0), 64 << 20);
    b.append_data(&mut h, "zeros", zeros).unwrap();
    let tar = b.into_inner().unwrap();
    let source = s.layer(&tar, true);
    assert!(
        fs::metadata(&source.path).unwrap().len() < 1 << 20,
        "a small blob"
    );
    let snapshots = Snapshots::open(&s.state()).unwrap();
    let limits = Limits {
        max_bytes: 8 << 20,
        ..Limits::default()
    };
    let err = snapshots.ensure(&source, &limits).unwrap_err();
    assert!(
        matches!(
            err,
            UnpackError::Limit {
                what: "uncompressed size",
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("FLOTILLA_UNPACK_MAX_BYTES"),
        "{err}"
    );
    assert!(snapshots.rootfs(source.diff_id.as_ref().unwrap()).is_none());
    let left: Vec<_> = fs::read_dir(snapshots.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("tmp-"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn other_limits_name_themselves() {
    let s = Sandbox::new();
    let many = {
        let mut t = RawTar::new();
        for i in 0..20 {
            t.file(&format!("f{i}"), b"x");
        }
        t.finish()
    };
    let limits = Limits {
        max_entries: 10,
        ..Limits::default()
    };
    let err = extract_stream(&many[..], "many", None, &s.root(), &limits).unwrap_err();
    assert!(
        err.to_string().contains("FLOTILLA_UNPACK_MAX_ENTRIES"),
        "{err}"
    );
    let long = RawTar::new().file(&"a".repeat(90), b"x").finish();
    let limits = Limits {
        max_path: 50,
        ..Limits::default()
    };
    let err = extract_stream(&long[..], "long", None, &s.root(), &limits).unwrap_err();
    assert!(
        err.to_string().contains("FLOTILLA_UNPACK_MAX_PATH"),
        "{err}"
    );
    let big = vec![b'v'; 2000];
    let xattr = RawTar::new()
        .pax(&[("SCHILY.xattr.user.big", &big)])
        .file("x", b"x")
        .finish();
    let limits = Limits {
        max_xattr_bytes: 1000,
        ..Limits::default()
    };
    let err = extract_stream(&xattr[..], "xattr", None, &s.root(), &limits).unwrap_err();
    assert!(
        err.to_string().contains("FLOTILLA_UNPACK_MAX_XATTR_BYTES"),
        "{err}"
    );
}

#[test]
fn diff_id_mismatch_is_refused_and_leaves_no_snapshot() {
    let s = Sandbox::new();
    let tar = RawTar::new().file("x", b"x").finish();
    let mut source = s.layer(&tar, false);
    source.diff_id = Some(Digest::sha256_of(b"another layer"));
    let snapshots = Snapshots::open(&s.state()).unwrap();
    let err = snapshots.ensure(&source, &Limits::default()).unwrap_err();
    assert!(matches!(err, UnpackError::DiffIdMismatch { .. }), "{err}");
    assert!(snapshots.rootfs(source.diff_id.as_ref().unwrap()).is_none());
}

/// Entries of a behaviour layer, built with the tar crate (PAX records through a raw 'x' header).
enum E<'a> {
    Dir(&'a str, u32, u64),
    File(&'a str, &'a [u8], u32, u64),
    Owned(
        &'a str,
        &'a [u8],
        u32,
        (u64, u64),
        &'a [(&'a str, &'a [u8])],
    ),
    Sym(&'a str, &'a str),
    Hard(&'a str, &'a str),
    Dev(&'a str, (u32, u32)),
    Fifo(&'a str),
}

fn layer(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_ustar();
        h.set_mtime(1_000_000);
        h.set_mode(0o644);
        h.set_size(0);
        match e {
            E::Dir(p, mode, mtime) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                h.set_mtime(*mtime);
                b.append_data(&mut h, p, std::io::empty()).unwrap();
            }
            E::File(p, data, mode, mtime) => {
                h.set_mode(*mode);
                h.set_mtime(*mtime);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, p, *data).unwrap();
            }
            E::Owned(p, data, mode, (uid, gid), xattrs) => {
                let records: Vec<u8> = xattrs
                    .iter()
                    .flat_map(|(k, v)| {
                        common::tarcraft::pax_record(&format!("SCHILY.xattr.{k}"), v)
                    })
                    .collect();
                let mut x = tar::Header::new_ustar();
                x.set_entry_type(tar::EntryType::XHeader);
                x.set_path("PaxHeaders/x").unwrap();
                x.set_size(records.len() as u64);
                x.set_cksum();
                b.append(&x, &records[..]).unwrap();
                h.set_mode(*mode);
                h.set_uid(*uid);
                h.set_gid(*gid);
                h.set_mtime(1_500_000);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, p, *data).unwrap();
            }
            E::Sym(p, t) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                b.append_link(&mut h, p, t).unwrap();
            }
            E::Hard(p, t) => {
                h.set_entry_type(tar::EntryType::Link);
                b.append_link(&mut h, p, t).unwrap();
            }
            E::Dev(p, (major, minor)) => {
                h.set_entry_type(tar::EntryType::Char);
                h.set_mode(0o666);
                h.set_device_major(*major).unwrap();
                h.set_device_minor(*minor).unwrap();
                b.append_data(&mut h, p, std::io::empty()).unwrap();
            }
            E::Fifo(p) => {
                h.set_entry_type(tar::EntryType::Fifo);
                b.append_data(&mut h, p, std::io::empty()).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 4096];
    let n = rustix::fs::lgetxattr(path, name, &mut buf[..]).ok()?;
    buf.truncate(n);
    Some(buf)
}

/// What the two layers below must look like merged, whichever way the root was made.
fn check_merged(root: &Path, kind: RootKind) {
    let what = format!("{kind:?}");
    let p = |rel: &str| root.join(rel);
    assert_eq!(fs::read(p("a/keep")).unwrap(), b"keep", "{what}");
    assert_eq!(fs::read(p("a/keep2")).unwrap(), b"keep2", "{what}");
    assert!(
        fs::symlink_metadata(p("a/gone")).is_err(),
        "{what}: whiteout"
    );
    assert!(
        fs::symlink_metadata(p("b/hidden")).is_err(),
        "{what}: opaque"
    );
    assert_eq!(fs::read(p("b/new")).unwrap(), b"new", "{what}");
    assert_eq!(
        fs::read_link(p("c")).unwrap(),
        Path::new("a"),
        "{what}: dir replaced by symlink"
    );
    assert_eq!(
        fs::read_link(p("abs")).unwrap(),
        Path::new("/etc/passwd"),
        "{what}"
    );
    let suid = fs::symlink_metadata(p("suid")).unwrap();
    assert_eq!(suid.mode() & 0o7777, 0o4755, "{what}: setuid kept");
    assert_eq!(suid.mtime(), 1_500_000, "{what}");
    assert_eq!(
        xattr(&p("suid"), "user.test").as_deref(),
        Some(&b"hello"[..]),
        "{what}"
    );
    assert_eq!(
        xattr(&p("suid"), "trusted.evil"),
        None,
        "{what}: trusted.* dropped"
    );
    assert_eq!(
        fs::symlink_metadata(p("a")).unwrap().mtime(),
        1_000_000,
        "{what}: directory times last"
    );
    assert_eq!(
        fs::symlink_metadata(p("a")).unwrap().mode() & 0o7777,
        0o750,
        "{what}"
    );
    assert_eq!(
        fs::symlink_metadata(p("a/hl")).unwrap().ino(),
        fs::symlink_metadata(p("a/keep")).unwrap().ino(),
        "{what}: hard link"
    );
    assert!(
        fs::symlink_metadata(p("fifo"))
            .unwrap()
            .file_type()
            .is_fifo(),
        "{what}"
    );
    if is_root() {
        assert_eq!((suid.uid(), suid.gid()), (1234, 5678), "{what}: owner");
        let null = fs::symlink_metadata(p("dev/null")).unwrap();
        assert!(null.file_type().is_char_device(), "{what}");
        assert_eq!(null.rdev(), rustix::fs::makedev(1, 3), "{what}");
    }
}

#[test]
fn layer_semantics_hold_with_overlay_and_with_the_flattened_copy() {
    for resolver in Resolver::available() {
        eprintln!("resolver: {}", resolver.name());
        with_resolver(resolver, layer_semantics_hold);
    }
}

fn layer_semantics_hold() {
    let s = Sandbox::new();
    let base = layer(&[
        E::Dir("a/", 0o750, 1_000_000),
        E::File("a/keep", b"keep", 0o644, 1_000_000),
        E::File("a/gone", b"gone", 0o644, 1_000_000),
        E::Dir("b/", 0o755, 1_000_000),
        E::File("b/hidden", b"hidden", 0o644, 1_000_000),
        E::Dir("c/", 0o755, 1_000_000),
        E::File("c/inside", b"inside", 0o644, 1_000_000),
        E::Owned(
            "suid",
            b"suid",
            0o4755,
            (1234, 5678),
            &[("user.test", b"hello"), ("trusted.evil", b"x")],
        ),
        E::Sym("abs", "/etc/passwd"),
        E::Hard("a/hl", "a/keep"),
        E::Dir("dev/", 0o755, 1_000_000),
        E::Dev("dev/null", (1, 3)),
        E::Fifo("fifo"),
    ]);
    let top = layer(&[
        E::Dir("a/", 0o750, 1_000_000),
        E::File("a/.wh.gone", b"", 0o644, 1_000_000),
        E::File("a/keep2", b"keep2", 0o644, 1_000_000),
        E::Dir("b/", 0o755, 1_000_000),
        E::File("b/.wh..wh..opq", b"", 0o644, 1_000_000),
        E::File("b/new", b"new", 0o644, 1_000_000),
        E::Sym("c", "a"),
    ]);
    let (snapshots, ids) = s.snapshots(&[base, top]);
    assert_eq!(ids.len(), 2, "both layers unpack");
    let top_root = snapshots.rootfs(&ids[1]).unwrap();
    if is_root() {
        let wh = fs::symlink_metadata(top_root.join("a/gone")).unwrap();
        assert!(
            wh.file_type().is_char_device() && wh.rdev() == 0,
            "an overlayfs whiteout"
        );
        assert_eq!(
            xattr(&top_root.join("b"), "trusted.overlay.opaque").as_deref(),
            Some(&b"y"[..])
        );
    }

    let copy = prepare_as(&snapshots, &ids, &s.ctr(), false).unwrap();
    assert_eq!(copy.kind, RootKind::Copy);
    check_merged(&copy.path, copy.kind);
    // Idempotent: the finished copy is reused as it is.
    assert_eq!(prepare_as(&snapshots, &ids, &s.ctr(), true).unwrap(), copy);
    release(&s.ctr()).unwrap();
    assert!(!copy.path.exists());

    if is_root() {
        let overlay = prepare_as(&snapshots, &ids, &s.ctr(), true).unwrap();
        if overlay.kind == RootKind::Overlay {
            check_merged(&overlay.path, overlay.kind);
            assert_eq!(
                prepare_as(&snapshots, &ids, &s.ctr(), true).unwrap(),
                overlay,
                "reused"
            );
            fs::write(overlay.path.join("written"), b"upper").unwrap();
            assert!(
                !snapshots.rootfs(&ids[1]).unwrap().join("written").exists(),
                "writes go to upper/"
            );
            release(&s.ctr()).unwrap();
            assert!(!s.ctr().join("upper").exists());
        } else {
            eprintln!("overlayfs could not be mounted here; the copy was checked");
        }
    }
    s.check("behaviour layers");
}

/// flotilla as an amd64 host, with an empty configuration, so the machine's /etc/flotilla/config.toml plays no
/// part.
fn flotilla(state: &Path) -> Flotilla {
    Flotilla::new()
        .empty_config(state.with_extension("toml"))
        .state(state)
        .args(["--platform", "linux/amd64"])
}

fn pull_unpack(state: &Path, source: &str) -> serde_json::Value {
    flotilla(state)
        .args(["pull", "--unpack", "--json", source])
        .json()
}

/// Each path under `root` with its type, mode, size, link target, owner and mtime.
fn tree(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let md = fs::symlink_metadata(&p).unwrap();
            let link = fs::read_link(&p).ok();
            out.insert(
                p.strip_prefix(root).unwrap().display().to_string(),
                format!(
                    "{:?} {:o} {} {:?} {}:{} {}",
                    md.file_type(),
                    md.mode() & 0o7777,
                    if md.is_dir() { 0 } else { md.len() },
                    link,
                    md.uid(),
                    md.gid(),
                    md.mtime()
                ),
            );
            if md.is_dir() {
                todo.push(p);
            }
        }
    }
    out
}

fn stale_snapshots(state: &Path) -> Vec<String> {
    fs::read_dir(state.join("snapshots"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("tmp-"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn pull_unpack_of_busybox_matches_umoci_and_gc_removes_unused_snapshots() {
    let (Some(busybox), Some(umoci), Some(skopeo)) = (
        common::required_busybox("amd64"),
        common::required_tool("umoci"),
        common::required_tool("skopeo"),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let layout = common::registry::OciLayoutBuilder::new(&dir.path().join("layout"));
    let written = layout.write(
        "v1",
        &[common::registry::LayoutImage {
            os: "linux",
            architecture: "amd64",
            variant: None,
            busybox,
        }],
    );
    let state = dir.path().join("state");
    let source = format!("oci:{}:v1", layout.dir().display());
    let diff_id = &written.images[0].diff_id;
    // A plain pull stores the image but unpacks nothing; the run command asks before it runs.
    flotilla(&state).args(["pull", &source]).ok();
    let snapshots = Snapshots::open(&state).unwrap();
    let state_of = || {
        let store = flotilla::store::Store::open(&state).unwrap();
        flotilla::pull::unpack_state(&store, &snapshots, "v1").unwrap()
    };
    let before = state_of();
    assert!(!before.is_complete());
    assert_eq!(before.diff_ids, std::slice::from_ref(diff_id));
    assert_eq!(before.missing, std::slice::from_ref(diff_id));

    let report = pull_unpack(&state, &source);
    assert_eq!(report["layers_unpacked"], 1, "{report}");
    assert_eq!(report["layers_fetched"], 0, "the blob was there: {report}");
    assert_eq!(report["proof_from_snapshots"], true, "{report}");
    assert!(state_of().is_complete());
    let ours = snapshots
        .rootfs(diff_id)
        .expect("the snapshot is published");

    // umoci unpacks a single manifest: skopeo picks the amd64 one out of the index first.
    let single = dir.path().join("single");
    let policy = dir.path().join("policy.json");
    fs::write(
        &policy,
        r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
    )
    .unwrap();
    let out = std::process::Command::new(skopeo)
        .arg("--policy")
        .arg(&policy)
        .args(["--override-arch", "amd64", "copy"])
        .arg(&source)
        .arg(format!("oci:{}:v1", single.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::output_text(&out));
    let bundle = dir.path().join("bundle");
    let out = std::process::Command::new(umoci)
        .args(["unpack", "--image"])
        .arg(format!("{}:v1", single.display()))
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::output_text(&out));
    let theirs = tree(&bundle.join("rootfs"));
    assert!(!theirs.is_empty());
    assert_eq!(tree(&ours), theirs);

    // A second pull finds the snapshot and leaves it alone.
    let again = pull_unpack(&state, &source);
    assert_eq!(again["layers_unpacked"], 0, "{again}");

    // Without a reference, gc removes the snapshot, and any interrupted one.
    fs::create_dir_all(state.join("snapshots/tmp-dead-0/rootfs")).unwrap();
    let store = flotilla::store::Store::open(&state).unwrap();
    assert!(store.remove_ref("v1").unwrap());
    drop(store);
    let out = flotilla(&state).arg("gc").ok();
    assert!(
        snapshots.rootfs(diff_id).is_none(),
        "{}",
        common::output_text(&out)
    );
    assert!(stale_snapshots(&state).is_empty());
}

#[test]
fn a_pull_killed_mid_unpack_leaves_no_snapshot_and_the_next_pull_redoes_it() {
    let Some(busybox) = common::required_busybox("amd64") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // Many small files: the unpack takes long enough to be caught in the middle.
    let files = dir.path().join("files");
    fs::create_dir(&files).unwrap();
    let mut extra = Vec::new();
    let names: Vec<String> = (0..20_000).map(|i| format!("data/f{i:05}")).collect();
    for (i, name) in names.iter().enumerate() {
        let path = files.join(i.to_string());
        fs::write(&path, format!("{i}").repeat(100)).unwrap();
        extra.push((name.as_str(), path));
    }
    let layout = common::registry::OciLayoutBuilder::new(&dir.path().join("layout"));
    let written = layout.write_with_files(
        "v1",
        &[common::registry::LayoutImage {
            os: "linux",
            architecture: "amd64",
            variant: None,
            busybox,
        }],
        &[extra],
    );
    let state = dir.path().join("state");
    let source = format!("oci:{}:v1", layout.dir().display());
    let mut child = flotilla(&state)
        .args(["pull", "--unpack", &source])
        .command()
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut caught = false;
    for _ in 0..20_000 {
        if !stale_snapshots(&state).is_empty() {
            child.kill().unwrap();
            caught = true;
            break;
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let status = child.wait().unwrap();
    assert!(
        caught,
        "the pull ended ({status}) before a tmp- snapshot was seen"
    );
    let diff_id = &written.images[0].diff_id;
    let snapshots = Snapshots::open(&state).unwrap();
    assert!(
        snapshots.rootfs(diff_id).is_none(),
        "a half-made snapshot was published"
    );
    assert!(!stale_snapshots(&state).is_empty());

    let report = pull_unpack(&state, &source);
    assert_eq!(report["layers_unpacked"], 1, "{report}");
    assert!(
        stale_snapshots(&state).is_empty(),
        "the leftover was removed"
    );
    let rootfs = snapshots.rootfs(diff_id).unwrap();
    assert_eq!(
        fs::read_dir(rootfs.join("data")).unwrap().count(),
        names.len()
    );
    assert_eq!(
        fs::read(rootfs.join("data/f19999")).unwrap(),
        "19999".repeat(100).as_bytes()
    );
}

#[test]
fn images_on_one_base_share_its_snapshot_through_the_registry() {
    let Some(lab) = common::registry::Lab::start() else {
        return;
    };
    let Some(sh) = common::required_busybox("amd64") else {
        return;
    };
    let layout = common::registry::OciLayoutBuilder::new(&lab.root.join("layout"));
    let image = || common::registry::LayoutImage {
        os: "linux",
        architecture: "amd64",
        variant: None,
        busybox: sh.clone(),
    };
    let base_file = lab.root.join("base-file");
    fs::write(&base_file, b"shared").unwrap();
    let (_, base) =
        layout.write_on_base("v1", &[image()], &[("etc/shared", base_file.clone())], &[]);
    let host = lab.registry.host();
    common::registry::skopeo_copy(layout.dir(), "v1", &host, "one", "v1", None, None);
    let extra = lab.root.join("extra");
    fs::write(&extra, b"two").unwrap();
    let layout2 = common::registry::OciLayoutBuilder::new(&lab.root.join("layout2"));
    let (_, base2) = layout2.write_on_base(
        "v1",
        &[image()],
        &[("etc/shared", base_file)],
        &[vec![("etc/two", extra)]],
    );
    assert_eq!(base, base2, "one base layer");
    common::registry::skopeo_copy(layout2.dir(), "v1", &host, "two", "v1", None, None);

    let state = lab.root.join("state");
    let pull = |repo: &str| {
        flotilla(&state)
            .registry(&host)
            .args(["pull", "--unpack", "--json", &format!("{host}/{repo}:v1")])
            .json()
    };
    let one = pull("one");
    assert_eq!(one["layers_unpacked"], 2, "{one}");
    let two = pull("two");
    assert_eq!(two["layers_unpacked"], 1, "only its own top layer: {two}");
    assert_eq!(two["proof_from_snapshots"], true);
    let snapshots = Snapshots::open(&state).unwrap();
    let store = flotilla::store::Store::open(&state).unwrap();
    let unpacked =
        flotilla::pull::unpack_state(&store, &snapshots, &format!("{host}/two:v1")).unwrap();
    assert!(unpacked.is_complete());
    let root = prepare_as(&snapshots, &unpacked.diff_ids, &lab.root.join("ctr"), false).unwrap();
    assert_eq!(fs::read(root.path.join("etc/shared")).unwrap(), b"shared");
    assert_eq!(fs::read(root.path.join("etc/two")).unwrap(), b"two");
    assert!(root.path.join("bin/busybox").is_file());
    release(&lab.root.join("ctr")).unwrap();
}

#[test]
fn multi_member_gzip_zstd_and_plain_layers_unpack_alike() {
    let s = Sandbox::new();
    let first = RawTar::new().dir("d/").file("d/one", b"one").finish();
    // Two gzip members, split inside the tar stream, as parallel compressors write them.
    let (head, tail) = first.split_at(700);
    let mut blob = Vec::new();
    for part in [head, tail] {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(part).unwrap();
        blob.extend(e.finish().unwrap());
    }
    let zstd = zstd::encode_all(&first[..], 3).unwrap();
    for (name, bytes) in [("gzip", blob), ("zstd", zstd), ("plain", first.clone())] {
        let path = s.state().join(name);
        fs::write(&path, &bytes).unwrap();
        let source = LayerSource {
            digest: Digest::sha256_of(&bytes),
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            path,
            diff_id: Some(Digest::sha256_of(&first)),
        };
        let extracted = flotilla::unpack::extract(&source, &s.root(), &Limits::default()).unwrap();
        assert_eq!(extracted.diff_id, Digest::sha256_of(&first), "{name}");
        assert_eq!(fs::read(s.root().join("d/one")).unwrap(), b"one", "{name}");
        fs::remove_dir_all(s.root()).unwrap();
        fs::create_dir(s.root()).unwrap();
    }
}

/// Set in the re-run of this file under the filter of [`common::seccomp`], where `openat2` is ENOSYS.
const ENV_WITHOUT_OPENAT2: &str = "FLOTILLA_TEST_WITHOUT_OPENAT2";
const RERUN: &str = "the_unpack_tests_pass_again_on_a_kernel_without_openat2";
const PULL_WITHOUT_OPENAT2: &str = "pull_unpack_without_openat2_unpacks_and_refuses_as_with_it";
const FILTER_HOLDS: &str = "under_the_test_filter_openat2_is_enosys_and_the_walk_is_used";

#[test]
fn under_the_test_filter_openat2_is_enosys_and_the_walk_is_used() {
    if std::env::var_os(ENV_WITHOUT_OPENAT2).is_none() {
        return;
    }
    let root = fs::File::open("/").unwrap();
    let direct = rustix::fs::openat2(
        &root,
        ".",
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
        rustix::fs::ResolveFlags::IN_ROOT,
    );
    assert_eq!(
        direct.err(),
        Some(rustix::io::Errno::NOSYS),
        "the filter is in place"
    );
    assert_eq!(Resolver::current(), Resolver::Userspace);
    assert_eq!(Resolver::available(), [Resolver::Userspace]);
}

/// Every test of this file again, in a process whose `openat2` fails as on Linux before 5.6: the corpus, the layer
/// semantics and the pulls of the flotilla binary (which inherits the filter) all through the userspace walk.
#[test]
fn the_unpack_tests_pass_again_on_a_kernel_without_openat2() {
    if std::env::var_os(ENV_WITHOUT_OPENAT2).is_some() {
        return;
    }
    let me = std::env::current_exe().unwrap();
    let list = std::process::Command::new(&me)
        .arg("--list")
        .output()
        .unwrap();
    let skipped = [RERUN, PULL_WITHOUT_OPENAT2];
    let expected = String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .filter(|name| !skipped.contains(name))
        .count();
    assert!(expected > 10, "{}", common::output_text(&list));
    let mut cmd = std::process::Command::new(&me);
    cmd.env(ENV_WITHOUT_OPENAT2, "1").arg("--exact");
    for name in skipped {
        cmd.args(["--skip", name]);
    }
    let out = common::seccomp::without_openat2(&mut cmd).output().unwrap();
    let text = common::output_text(&out);
    assert!(out.status.success(), "{text}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("test {FILTER_HOLDS} ... ok")),
        "the filter was checked: {text}"
    );
    assert!(
        stdout.contains(&format!("test result: ok. {expected} passed; 0 failed")),
        "every test ran: {text}"
    );
}

/// `text` with the random part of snapshot directories being written (`tmp-<hex>-<random>`) taken out.
fn without_tmp_names(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find("/tmp-") {
        out.push_str(&rest[..at]);
        out.push_str("/tmp-*");
        rest = &rest[at + 1..];
        rest = &rest[rest.find('/').unwrap_or(rest.len())..];
    }
    out.push_str(rest);
    out
}

/// The snapshots of `layers` a pull published, each as [`shape`] gives it.
fn published(
    s: &Sandbox,
    state: &Path,
    layers: &[Vec<u8>],
) -> BTreeMap<String, BTreeMap<String, String>> {
    let snapshots = Snapshots::open(state).unwrap();
    layers
        .iter()
        .map(|tar| Digest::sha256_of(tar))
        .filter_map(|d| Some((d.to_string(), shape(s, &snapshots.rootfs(&d)?))))
        .collect()
}

/// What a pull ended with: its error (from `flotilla:` on; the progress lines before it come in the order the
/// layers' downloads finish) and the snapshots of `layers` it published.
type PullEnd = (
    Option<i32>,
    String,
    BTreeMap<String, BTreeMap<String, String>>,
);

/// `flotilla pull --unpack` of images made of each hostile corpus entry (and of a legitimate tree of symlinks),
/// under the filter and without it: the same refusals with the same messages, the same snapshots, nothing outside
/// touched; and `flotilla platform` says which resolver it used.
#[test]
fn pull_unpack_without_openat2_unpacks_and_refuses_as_with_it() {
    let Some(busybox) = common::required_busybox("amd64") else {
        return;
    };
    let s = Sandbox::new();
    let platform = |filtered: bool, json: bool| {
        let mut cmd = flotilla(&s.state().join("platform")).command();
        if filtered {
            common::seccomp::without_openat2(&mut cmd);
        }
        cmd.arg("platform");
        if json {
            cmd.arg("--json");
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", common::output_text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let walk: serde_json::Value = serde_json::from_str(&platform(true, true)).unwrap();
    assert_eq!(walk["path_resolver"], "userspace", "{walk}");
    assert!(
        walk["openat2_error"]
            .as_str()
            .is_some_and(|e| e.contains("Function not implemented")),
        "{walk}"
    );
    let here: serde_json::Value = serde_json::from_str(&platform(false, true)).unwrap();
    assert_eq!(
        here["path_resolver"],
        Resolver::current().name(),
        "this kernel's own: {here}"
    );
    let line = platform(true, false);
    assert!(
        line.lines()
            .any(|l| l.starts_with("path resolver: userspace (openat2 is not usable here")),
        "{line}"
    );

    let legitimate = RawTar::new()
        .dir("usr/")
        .dir("usr/lib/")
        .dir("usr/etc/")
        .symlink("lib", "usr/lib")
        .file("lib/libc.so", b"libc")
        .symlink("etc", "/usr/etc")
        .file("etc/hostname", b"device")
        .symlink("up", "../../..")
        .file("up/usr/through-up", b"up")
        .finish();
    let mut cases = attacks(&s);
    cases.push(("legitimate symlinks", vec![legitimate]));
    for (n, (name, layers)) in cases.iter().enumerate() {
        let layout =
            common::registry::OciLayoutBuilder::new(&s.state().join(format!("layout-{n}")));
        let image = common::registry::LayoutImage {
            os: "linux",
            architecture: "amd64",
            variant: None,
            busybox: busybox.clone(),
        };
        layout.write_on_raw_base("v1", &[image], layers, &[]);
        let source = format!("oci:{}:v1", layout.dir().display());
        let mut seen: Vec<PullEnd> = Vec::new();
        for filtered in [false, true] {
            let state = s.state().join(format!("{n}-{filtered}"));
            let mut cmd = flotilla(&state).command();
            if filtered {
                common::seccomp::without_openat2(&mut cmd);
            }
            let out = cmd
                .args(["pull", "--unpack", "--json", &source])
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            let error = stderr.find("flotilla: ").map_or("", |at| &stderr[at..]);
            let error = without_tmp_names(
                &error
                    .replace(&state.display().to_string(), "<state>")
                    .replace(&s.base.display().to_string(), "<base>"),
            );
            seen.push((out.status.code(), error, published(&s, &state, layers)));
        }
        s.check(name);
        let (kernel, walk) = (&seen[0], &seen[1]);
        assert_eq!(
            (kernel.0, &kernel.1),
            (walk.0, &walk.1),
            "{name}: with openat2, then without"
        );
        // Layers unpack in parallel: one failing may stop another before it is published, in either run.
        for (diff_id, tree) in &kernel.2 {
            if let Some(other) = walk.2.get(diff_id) {
                assert_eq!(tree, other, "{name}: snapshot {diff_id}");
            }
        }
        if *name == "legitimate symlinks" {
            let (code, stderr, snapshots) = &seen[1];
            assert_eq!(*code, Some(0), "{stderr}");
            assert_eq!(snapshots.len(), 1, "the base layer's snapshot");
            assert_eq!(kernel.2, walk.2);
            let base = snapshots.values().next().unwrap();
            assert_eq!(base["usr/lib/libc.so"], r#"file "libc""#);
            assert_eq!(base["usr/etc/hostname"], r#"file "device""#);
            assert_eq!(base["usr/through-up"], r#"file "up""#);
            assert_eq!(base["lib"], "symlink usr/lib");
        }
    }
}
