//! Reading image layers: decompression, the tar stream, whiteouts, and path resolution across layers.
//!
//! The pull uses this to find the image's own executables (the entrypoint through `PATH` and symlinks, then its
//! ELF interpreter) and prove their architecture before the image is marked ready. Layers are indexed lazily from
//! the top down and a lookup stops at the first layer that decides a path, so an entrypoint in a small top layer
//! never costs a decompression of the large base layers beneath it. A layer that is indexed is read to its end, and
//! its uncompressed digest is checked against the config's `diff_ids` in that same pass.
//!
//! Paths are resolved the way the kernel would inside the container: absolute symlinks restart at the image root,
//! `..` stops at the root, and symlink hops are bounded (40, as Linux's `MAXSYMLINKS`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::digest::{Algorithm, Digest, Verifier};

const MAX_SYMLINK_HOPS: usize = 40;
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
pub(crate) const OPAQUE_MARKER: &str = ".wh..wh..opq";
pub(crate) const WHITEOUT_PREFIX: &str = ".wh.";

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error(
        "layer {layer} has media type {media_type:?}, which is not an image layer flotilla can read"
    )]
    UnsupportedMediaType { layer: Digest, media_type: String },
    #[error("cannot read layer {layer} ({path}): {source}")]
    Read {
        layer: Digest,
        path: PathBuf,
        source: io::Error,
    },
    #[error(
        "layer {layer} does not match the image config: its uncompressed content is {actual}, the config's diff_id is \
         {expected}; the image is corrupt or was tampered with, pull it again from a trusted source"
    )]
    DiffIdMismatch {
        layer: Digest,
        expected: Digest,
        actual: Digest,
    },
    #[error("{path} does not exist in the image")]
    NotFound { path: String },
    #[error("{path} is reached through a component that is not a directory")]
    NotADirectory { path: String },
    #[error("{path} is a directory, not a program")]
    IsADirectory { path: String },
    #[error(
        "resolving {path} in the image takes more than {MAX_SYMLINK_HOPS} symbolic links (a loop?)"
    )]
    SymlinkLoop { path: String },
    #[error("{name} is not found in the image's PATH ({path_env})")]
    NotInPath { name: String, path_env: String },
    #[error(
        "{path} in layer {layer} is {size} bytes, more than the {limit} bytes flotilla will extract to inspect"
    )]
    TooLarge {
        path: String,
        layer: Digest,
        size: u64,
        limit: u64,
    },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

/// One layer blob on disk, as the manifest and config describe it.
#[derive(Debug, Clone)]
pub struct LayerSource {
    pub digest: Digest,
    pub media_type: String,
    pub path: PathBuf,
    /// The config's `diff_ids` entry for this layer, checked whenever the layer is read to its end.
    pub diff_id: Option<Digest>,
}

/// What a path is in one layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Node {
    File {
        size: u64,
    },
    Dir,
    Symlink(String),
    /// A tar hard link: the content is that of the named path earlier in the same layer.
    Hardlink(String),
    /// Devices, fifos: present, but nothing to inspect.
    Special,
}

/// A path found in the merged view of the layers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The path after following symlinks, without a leading slash.
    pub path: String,
    /// Index of the layer (base first) that provides it.
    pub layer: usize,
    pub node: Node,
}

impl Resolved {
    pub fn display_path(&self) -> String {
        format!("/{}", self.path)
    }
}

/// What one layer holds, by normalised path: all the proof needs, built in the one pass that reads the layer (by
/// the proof itself, or by the snapshot writer, which stores it beside the snapshot).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerIndex {
    nodes: HashMap<String, Node>,
    /// Parents of entries that have no entry of their own: tar does not require them, and an extractor creates
    /// them as directories only where no lower layer already has that path (a symlink there is followed).
    implied_dirs: HashSet<String>,
    whiteouts: HashSet<String>,
    opaque: HashSet<String>,
}

/// What one tar entry means for the layer, once whiteouts are told apart from content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryMeaning {
    /// `.wh..wh..opq`: the directory (normalised, "" for the root) hides what lower layers have in it.
    Opaque(String),
    /// `.wh.NAME`: the path hides the lower layers' entry of that name.
    Whiteout(String),
    /// Content at this normalised path.
    Node(String, Node),
    /// The root itself, or a path that normalises to it: nothing to record.
    Root,
}

impl LayerIndex {
    /// Classifies one entry and records it.
    pub fn record(
        &mut self,
        raw_path: &[u8],
        entry: &tar::Header,
        link: Option<&[u8]>,
        size: u64,
    ) -> EntryMeaning {
        let path = normalize(&String::from_utf8_lossy(raw_path));
        if path.is_empty() {
            return EntryMeaning::Root;
        }
        let (parent, name) = parent_and_name(&path);
        if name == OPAQUE_MARKER {
            self.opaque.insert(parent.to_string());
            return EntryMeaning::Opaque(parent.to_string());
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            // `.wh..` or `.wh...` would hide the directory itself or its parent: normalised, never the root.
            let hidden = normalize(&join(parent, hidden));
            if hidden.is_empty() {
                return EntryMeaning::Root;
            }
            self.whiteouts.insert(hidden.clone());
            return EntryMeaning::Whiteout(hidden);
        }
        let link = || {
            link.map(|l| String::from_utf8_lossy(l).into_owned())
                .unwrap_or_default()
        };
        let kind = entry.entry_type();
        let node = if kind.is_dir() {
            Node::Dir
        } else if kind.is_symlink() {
            Node::Symlink(link())
        } else if kind.is_hard_link() {
            Node::Hardlink(normalize(&link()))
        } else if kind.is_file() || kind.is_contiguous() {
            Node::File { size }
        } else {
            Node::Special
        };
        let mut parent = parent;
        while !parent.is_empty() && self.implied_dirs.insert(parent.to_string()) {
            parent = parent_and_name(parent).0;
        }
        self.nodes.insert(path.clone(), node.clone());
        EntryMeaning::Node(path, node)
    }

    /// Paths hidden by `.wh.` entries, normalised.
    pub fn whiteouts(&self) -> impl Iterator<Item = &str> {
        self.whiteouts.iter().map(String::as_str)
    }

    /// Directories marked opaque, normalised ("" is the root).
    pub fn opaque_dirs(&self) -> impl Iterator<Item = &str> {
        self.opaque.iter().map(String::as_str)
    }
}

fn is_layer_media_type(media_type: &str) -> bool {
    matches!(
        media_type,
        "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.diff.tar"
    )
}

/// Opens a layer for reading its uncompressed tar stream.
///
/// The compression is read from the stream's magic bytes rather than trusted from the media type: Docker's
/// `diff.tar.gzip` type has been used for uncompressed layers by some tools, and the bytes cannot lie.
pub fn open_layer(layer: &LayerSource) -> Result<Box<dyn Read>, LayerError> {
    if !is_layer_media_type(&layer.media_type) {
        return Err(LayerError::UnsupportedMediaType {
            layer: layer.digest.clone(),
            media_type: layer.media_type.clone(),
        });
    }
    let read_err = |source| LayerError::Read {
        layer: layer.digest.clone(),
        path: layer.path.clone(),
        source,
    };
    let mut file = BufReader::with_capacity(64 * 1024, File::open(&layer.path).map_err(read_err)?);
    let magic = {
        use std::io::BufRead;
        let buf = file.fill_buf().map_err(read_err)?;
        buf.get(..4).map(|m| [m[0], m[1], m[2], m[3]])
    };
    Ok(match magic {
        Some([0x1f, 0x8b, _, _]) => Box::new(flate2::bufread::MultiGzDecoder::new(file)),
        Some([0x28, 0xb5, 0x2f, 0xfd]) => {
            Box::new(zstd::stream::read::Decoder::with_buffer(file).map_err(read_err)?)
        }
        _ => Box::new(file),
    })
}

/// Hashes everything read through it, so the diff_id comes from the same pass that reads the tar.
pub(crate) struct HashingReader<R> {
    pub(crate) inner: R,
    pub(crate) verifier: Verifier,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.verifier.update(&buf[..n]);
        Ok(n)
    }
}

/// Lexically normalises a path inside the image: no leading slash, no `.`, `..` clamped at the root.
pub(crate) fn normalize(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            other => parts.push(other),
        }
    }
    parts.join("/")
}

pub(crate) fn parent_and_name(path: &str) -> (&str, &str) {
    match path.rsplit_once('/') {
        Some((parent, name)) => (parent, name),
        None => ("", path),
    }
}

pub(crate) fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

fn build_index(layer: &LayerSource) -> Result<LayerIndex, LayerError> {
    let read_err = |source| LayerError::Read {
        layer: layer.digest.clone(),
        path: layer.path.clone(),
        source,
    };
    let algorithm = layer
        .diff_id
        .as_ref()
        .map_or(Algorithm::Sha256, Digest::algorithm);
    let mut reader = HashingReader {
        inner: open_layer(layer)?,
        verifier: Verifier::new(algorithm),
    };
    let mut index = LayerIndex::default();
    {
        let mut archive = tar::Archive::new(&mut reader);
        for entry in archive.entries().map_err(read_err)? {
            let entry = entry.map_err(read_err)?;
            let link = entry.link_name_bytes();
            index.record(
                &entry.path_bytes(),
                entry.header(),
                link.as_deref(),
                entry.size(),
            );
        }
    }
    // The diff_id covers the whole uncompressed stream, including the end-of-archive blocks tar stops before.
    io::copy(&mut reader, &mut io::sink()).map_err(read_err)?;
    if let Some(expected) = &layer.diff_id {
        let actual = reader.verifier.finish();
        if &actual != expected {
            return Err(LayerError::DiffIdMismatch {
                layer: layer.digest.clone(),
                expected: expected.clone(),
                actual,
            });
        }
    }
    Ok(index)
}

/// Where one layer of the merged view is read from.
#[derive(Debug, Clone)]
enum TreeLayer {
    /// The compressed blob: indexed by reading it, files extracted by reading it again.
    Blob(LayerSource),
    /// An unpacked snapshot: its index was built when it was unpacked, and files are read from its directory.
    Snapshot { diff_id: Digest, rootfs: PathBuf },
}

/// The merged view of an image's layers, indexed on demand.
pub struct ImageTree {
    layers: Vec<TreeLayer>,
    indexes: Vec<Option<LayerIndex>>,
}

impl ImageTree {
    /// `layers` base first, as in the manifest.
    pub fn new(layers: Vec<LayerSource>) -> ImageTree {
        let indexes = layers.iter().map(|_| None).collect();
        ImageTree {
            layers: layers.into_iter().map(TreeLayer::Blob).collect(),
            indexes,
        }
    }

    /// Over unpacked snapshots, base first: (diff_id, the snapshot's root directory, its index). Nothing is
    /// decompressed again; [`Self::extract`] reads the snapshot's file.
    pub fn from_snapshots(layers: Vec<(Digest, PathBuf, LayerIndex)>) -> ImageTree {
        let mut tree = ImageTree {
            layers: Vec::new(),
            indexes: Vec::new(),
        };
        for (diff_id, rootfs, index) in layers {
            tree.layers.push(TreeLayer::Snapshot { diff_id, rootfs });
            tree.indexes.push(Some(index));
        }
        tree
    }

    /// How many layers have been read so far: the top-down laziness, made observable.
    pub fn layers_read(&self) -> usize {
        self.indexes.iter().filter(|i| i.is_some()).count()
    }

    fn index(&mut self, i: usize) -> Result<&LayerIndex, LayerError> {
        if self.indexes[i].is_none() {
            if let TreeLayer::Blob(source) = &self.layers[i] {
                self.indexes[i] = Some(build_index(source)?);
            }
        }
        Ok(self.indexes[i].get_or_insert_with(LayerIndex::default))
    }

    /// The node at a normalised path in the merged view, with the layer that provides it.
    fn lookup(&mut self, path: &str) -> Result<Option<(usize, Node)>, LayerError> {
        if path.is_empty() {
            return Ok(Some((0, Node::Dir)));
        }
        let ancestors: Vec<&str> = path.match_indices('/').map(|(i, _)| &path[..i]).collect();
        let mut implied = None;
        for i in (0..self.layers.len()).rev() {
            let index = self.index(i)?;
            if let Some(node) = index.nodes.get(path) {
                return Ok(Some((i, node.clone())));
            }
            let hidden = index.whiteouts.contains(path)
                || ancestors.iter().any(|a| {
                    index.whiteouts.contains(*a)
                        || index.opaque.contains(*a)
                        || matches!(index.nodes.get(*a), Some(n) if *n != Node::Dir)
                })
                // The root's own opaque marker (`.wh..wh..opq` at the top level) hides everything beneath.
                || index.opaque.contains("");
            if implied.is_none() && index.implied_dirs.contains(path) {
                implied = Some(i);
            }
            if hidden {
                break;
            }
        }
        Ok(implied.map(|i| (i, Node::Dir)))
    }

    /// Follows `path` through symlinks to a non-directory node.
    pub fn resolve(&mut self, path: &str) -> Result<Resolved, LayerError> {
        let shown = || format!("/{}", normalize(path));
        let mut pending: VecDeque<String> = path
            .split('/')
            .filter(|c| !c.is_empty())
            .map(str::to_string)
            .collect();
        let mut current: Vec<String> = Vec::new();
        let mut hops = 0;
        while let Some(component) = pending.pop_front() {
            match component.as_str() {
                "." => continue,
                ".." => {
                    current.pop();
                    continue;
                }
                _ => {}
            }
            let candidate = join(&current.join("/"), &component);
            match self.lookup(&candidate)? {
                None => return Err(LayerError::NotFound { path: shown() }),
                Some((_, Node::Symlink(target))) => {
                    hops += 1;
                    if hops > MAX_SYMLINK_HOPS {
                        return Err(LayerError::SymlinkLoop { path: shown() });
                    }
                    if target.starts_with('/') {
                        current.clear();
                    }
                    for c in target.split('/').filter(|c| !c.is_empty()).rev() {
                        pending.push_front(c.to_string());
                    }
                }
                Some((_, Node::Dir)) => current.push(component),
                Some((layer, node)) => {
                    if pending.iter().all(|c| c == ".") {
                        return Ok(Resolved {
                            path: candidate,
                            layer,
                            node,
                        });
                    }
                    return Err(LayerError::NotADirectory { path: shown() });
                }
            }
        }
        Err(LayerError::IsADirectory { path: shown() })
    }

    /// Finds a program the way `execvp` would inside the container: a name with a slash is a path (relative to the
    /// working directory), a bare name is searched in `PATH`.
    pub fn find_executable(
        &mut self,
        name: &str,
        path_env: Option<&str>,
        working_dir: Option<&str>,
    ) -> Result<Resolved, LayerError> {
        if name.contains('/') {
            let full = if name.starts_with('/') {
                name.to_string()
            } else {
                format!("{}/{name}", working_dir.unwrap_or("/"))
            };
            return self.resolve(&full);
        }
        let path_env = path_env.unwrap_or(DEFAULT_PATH);
        for dir in path_env.split(':').filter(|d| !d.is_empty()) {
            match self.resolve(&format!("{dir}/{name}")) {
                Ok(found) => return Ok(found),
                Err(
                    LayerError::NotFound { .. }
                    | LayerError::NotADirectory { .. }
                    | LayerError::IsADirectory { .. },
                ) => continue,
                Err(other) => return Err(other),
            }
        }
        Err(LayerError::NotInPath {
            name: name.to_string(),
            path_env: path_env.to_string(),
        })
    }

    /// Copies a resolved regular file (or hard link to one) out of its layer into `dest`, at most `limit` bytes.
    pub fn extract(
        &mut self,
        resolved: &Resolved,
        dest: &Path,
        limit: u64,
    ) -> Result<(), LayerError> {
        let layer_no = resolved.layer;
        let mut wanted = resolved.path.clone();
        // Hard links point at an earlier entry of the same layer; follow them to the entry holding the bytes.
        for _ in 0..MAX_SYMLINK_HOPS {
            match self.index(layer_no)?.nodes.get(&wanted) {
                Some(Node::Hardlink(target)) => wanted = target.clone(),
                _ => break,
            }
        }
        let size = match self.index(layer_no)?.nodes.get(&wanted) {
            Some(Node::File { size }) => *size,
            _ => {
                return Err(LayerError::NotFound {
                    path: format!("/{wanted}"),
                });
            }
        };
        let layer = match self.layers[layer_no].clone() {
            TreeLayer::Blob(layer) => layer,
            TreeLayer::Snapshot { diff_id, rootfs } => {
                return extract_from_snapshot(&diff_id, &rootfs, &wanted, size, dest, limit);
            }
        };
        if size > limit {
            return Err(LayerError::TooLarge {
                path: format!("/{wanted}"),
                layer: layer.digest.clone(),
                size,
                limit,
            });
        }
        let read_err = |source| LayerError::Read {
            layer: layer.digest.clone(),
            path: layer.path.clone(),
            source,
        };
        let write_err = |source| LayerError::Write {
            path: dest.to_path_buf(),
            source,
        };
        let mut archive = tar::Archive::new(open_layer(&layer)?);
        for entry in archive.entries().map_err(read_err)? {
            let mut entry = entry.map_err(read_err)?;
            if normalize(&String::from_utf8_lossy(&entry.path_bytes())) != wanted {
                continue;
            }
            let mut out = File::create(dest).map_err(write_err)?;
            let copied = io::copy(&mut (&mut entry).take(limit), &mut out).map_err(read_err)?;
            out.flush().map_err(write_err)?;
            if copied != size {
                return Err(read_err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("/{wanted} ended after {copied} of {size} bytes"),
                )));
            }
            return Ok(());
        }
        Err(LayerError::NotFound {
            path: format!("/{wanted}"),
        })
    }
}

/// Copies `wanted` (normalised, a regular file in the index) out of a snapshot. The open stays inside the snapshot
/// and refuses symlinks on the way ([`crate::fs_root`]): the index said it is a file reached through directories.
fn extract_from_snapshot(
    diff_id: &Digest,
    rootfs: &Path,
    wanted: &str,
    size: u64,
    dest: &Path,
    limit: u64,
) -> Result<(), LayerError> {
    use crate::fs_root::{Symlinks, open_in_root};
    use rustix::fs::OFlags;
    let shown = rootfs.join(wanted);
    let read_err = |source: io::Error| LayerError::Read {
        layer: diff_id.clone(),
        path: shown.clone(),
        source,
    };
    if size > limit {
        return Err(LayerError::TooLarge {
            path: format!("/{wanted}"),
            layer: diff_id.clone(),
            size,
            limit,
        });
    }
    let root = File::open(rootfs).map_err(read_err)?;
    let fd = open_in_root(
        &root,
        wanted,
        OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Symlinks::Refuse,
    )
    .map_err(|e| read_err(e.into()))?;
    let mut out = File::create(dest).map_err(|source| LayerError::Write {
        path: dest.to_path_buf(),
        source,
    })?;
    let copied = io::copy(&mut File::from(fd).take(limit), &mut out).map_err(read_err)?;
    if copied != size {
        return Err(read_err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "/{wanted} is {copied} bytes in the snapshot, the layer said {size}; remove the snapshot with `flotilla gc` after removing the image, and pull again"
            ),
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    enum E<'a> {
        File(&'a str, &'a [u8]),
        Dir(&'a str),
        Sym(&'a str, &'a str),
        Hard(&'a str, &'a str),
    }

    fn layer_tar(entries: &[E]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o755);
            match e {
                E::File(p, data) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(data.len() as u64);
                    b.append_data(&mut h, p, *data).unwrap();
                }
                E::Dir(p) => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_size(0);
                    b.append_data(&mut h, p, io::empty()).unwrap();
                }
                E::Sym(p, t) => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_size(0);
                    b.append_link(&mut h, p, t).unwrap();
                }
                E::Hard(p, t) => {
                    h.set_entry_type(tar::EntryType::Link);
                    h.set_size(0);
                    b.append_link(&mut h, p, t).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    struct Fixture {
        dir: tempfile::TempDir,
        layers: Vec<LayerSource>,
    }

    impl Fixture {
        fn new() -> Fixture {
            Fixture {
                dir: tempfile::tempdir().unwrap(),
                layers: Vec::new(),
            }
        }

        fn add(&mut self, entries: &[E], compress: bool) -> &mut Fixture {
            let tar = layer_tar(entries);
            let blob = if compress { gzip(&tar) } else { tar.clone() };
            let digest = Digest::sha256_of(&blob);
            let path = self.dir.path().join(digest.hex());
            std::fs::write(&path, &blob).unwrap();
            self.layers.push(LayerSource {
                digest,
                media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
                path,
                diff_id: Some(Digest::sha256_of(&tar)),
            });
            self
        }

        fn tree(&self) -> ImageTree {
            ImageTree::new(self.layers.clone())
        }
    }

    #[test]
    fn entrypoint_through_path_and_symlinks() {
        let mut f = Fixture::new();
        f.add(
            &[
                E::Dir("bin/"),
                E::File("bin/busybox", b"\x7fELF-base"),
                E::Sym("bin/sh", "busybox"),
                E::Dir("usr/"),
                E::Sym("usr/bin", "../bin"),
            ],
            true,
        );
        let mut t = f.tree();
        let found = t
            .find_executable("sh", Some("/usr/bin:/bin"), None)
            .unwrap();
        assert_eq!(found.path, "bin/busybox");
        let dest = f.dir.path().join("out");
        t.extract(&found, &dest, 1 << 20).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"\x7fELF-base");
    }

    #[test]
    fn upper_layer_wins_and_only_it_is_read() {
        let mut f = Fixture::new();
        f.add(&[E::Dir("app/"), E::File("app/run", b"old")], true);
        f.add(&[E::Dir("app/"), E::File("app/run", b"new")], false);
        let mut t = f.tree();
        let found = t.resolve("/app/run").unwrap();
        assert_eq!(found.layer, 1);
        assert_eq!(t.layers_read(), 1, "the base layer need not be read");
    }

    #[test]
    fn whiteouts_and_opaque_dirs_hide_lower_files() {
        let mut f = Fixture::new();
        f.add(
            &[
                E::Dir("a/"),
                E::File("a/gone", b"x"),
                E::Dir("b/"),
                E::File("b/hidden", b"x"),
            ],
            true,
        );
        f.add(
            &[
                E::File("a/.wh.gone", b""),
                E::Dir("b/"),
                E::File("b/.wh..wh..opq", b""),
            ],
            true,
        );
        let mut t = f.tree();
        assert!(matches!(
            t.resolve("/a/gone"),
            Err(LayerError::NotFound { .. })
        ));
        assert!(matches!(
            t.resolve("/b/hidden"),
            Err(LayerError::NotFound { .. })
        ));
    }

    #[test]
    fn parents_without_entries_are_directories_unless_a_lower_layer_says_otherwise() {
        let mut f = Fixture::new();
        f.add(
            &[E::Dir("usr/"), E::Dir("usr/bin/"), E::Sym("bin", "usr/bin")],
            true,
        );
        f.add(
            &[E::File("bin/app", b"app"), E::File("opt/tool/run", b"run")],
            true,
        );
        let mut t = f.tree();
        assert_eq!(t.resolve("/opt/tool/run").unwrap().path, "opt/tool/run");
        assert!(matches!(
            t.resolve("/opt/tool"),
            Err(LayerError::IsADirectory { .. })
        ));
        // The lower layer's symlink stays what `bin` is; the implied directory does not replace it.
        assert_eq!(
            t.lookup("bin").unwrap(),
            Some((0, Node::Symlink("usr/bin".into())))
        );
    }

    #[test]
    fn hard_links_extract_their_target() {
        let mut f = Fixture::new();
        f.add(
            &[
                E::Dir("bin/"),
                E::File("bin/busybox", b"payload"),
                E::Hard("bin/ls", "bin/busybox"),
            ],
            true,
        );
        let mut t = f.tree();
        let found = t.resolve("/bin/ls").unwrap();
        let dest = f.dir.path().join("ls");
        t.extract(&found, &dest, 100).unwrap();
        assert_eq!(std::fs::read(dest).unwrap(), b"payload");
    }

    #[test]
    fn symlink_loops_and_escapes_are_contained() {
        let mut f = Fixture::new();
        f.add(
            &[
                E::Sym("loop1", "loop2"),
                E::Sym("loop2", "/loop1"),
                E::Sym("escape", "../../../../bin/sh"),
                E::Dir("bin/"),
                E::File("bin/sh", b"sh"),
            ],
            true,
        );
        let mut t = f.tree();
        assert!(matches!(
            t.resolve("/loop1"),
            Err(LayerError::SymlinkLoop { .. })
        ));
        assert_eq!(t.resolve("/escape").unwrap().path, "bin/sh");
        assert!(matches!(
            t.find_executable("nothere", Some("/bin"), None),
            Err(LayerError::NotInPath { .. })
        ));
        assert!(matches!(
            t.resolve("/bin"),
            Err(LayerError::IsADirectory { .. })
        ));
        assert!(matches!(
            t.resolve("/bin/sh/x"),
            Err(LayerError::NotADirectory { .. })
        ));
    }

    #[test]
    fn whiteouts_of_the_directory_itself_or_its_parent_hide_nothing() {
        let mut index = LayerIndex::default();
        let h = tar::Header::new_gnu();
        let expected = [
            (".wh..", EntryMeaning::Root),
            (".wh...", EntryMeaning::Root),
            ("a/.wh...", EntryMeaning::Root),
            ("a/.wh..", EntryMeaning::Whiteout("a".into())),
        ];
        for (raw, meaning) in expected {
            assert_eq!(index.record(raw.as_bytes(), &h, None, 0), meaning, "{raw}");
        }
        assert!(index.whiteouts().all(|w| !w.is_empty() && !w.contains('.')));
        let json = serde_json::to_string(&index).unwrap();
        assert_eq!(serde_json::from_str::<LayerIndex>(&json).unwrap(), index);
    }

    #[test]
    fn diff_id_mismatch_is_refused() {
        let mut f = Fixture::new();
        f.add(&[E::File("x", b"x")], true);
        f.layers[0].diff_id = Some(Digest::sha256_of(b"something else"));
        let mut t = f.tree();
        assert!(matches!(
            t.resolve("/x"),
            Err(LayerError::DiffIdMismatch { .. })
        ));
    }

    #[test]
    fn limits_and_bad_media_types() {
        let mut f = Fixture::new();
        f.add(&[E::File("big", &[0u8; 4096])], true);
        let mut t = f.tree();
        let found = t.resolve("/big").unwrap();
        let dest = f.dir.path().join("big");
        assert!(matches!(
            t.extract(&found, &dest, 100),
            Err(LayerError::TooLarge { .. })
        ));
        let mut bad = f.layers[0].clone();
        bad.media_type = "application/vnd.oci.image.config.v1+json".into();
        assert!(matches!(
            ImageTree::new(vec![bad]).resolve("/big"),
            Err(LayerError::UnsupportedMediaType { .. })
        ));
    }

    #[test]
    fn a_snapshot_file_is_read_inside_the_snapshot_and_never_through_a_symlink() {
        use crate::fs_root::{Resolver, with_resolver};
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("secret"), b"host").unwrap();
        let rootfs = dir.path().join("rootfs");
        std::fs::create_dir_all(rootfs.join("bin")).unwrap();
        std::fs::write(rootfs.join("bin/app"), b"app!").unwrap();
        // A snapshot changed after it was indexed: the index says lib/secret is a file under a directory.
        std::os::unix::fs::symlink(&outside, rootfs.join("lib")).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(4);
        let mut index = LayerIndex::default();
        index.record(b"bin/app", &h, None, 4);
        index.record(b"lib/secret", &h, None, 4);
        let diff_id = Digest::sha256_of(b"snapshot");
        for resolver in Resolver::available() {
            with_resolver(resolver, || {
                let mut t = ImageTree::from_snapshots(vec![(
                    diff_id.clone(),
                    rootfs.clone(),
                    index.clone(),
                )]);
                let dest = dir.path().join("out");
                let found = t.resolve("/bin/app").unwrap();
                t.extract(&found, &dest, 100).unwrap();
                assert_eq!(std::fs::read(&dest).unwrap(), b"app!", "{resolver:?}");
                let found = t.resolve("/lib/secret").unwrap();
                match t.extract(&found, &dest, 100) {
                    Err(LayerError::Read { source, .. }) => assert_eq!(
                        source.raw_os_error(),
                        Some(rustix::io::Errno::LOOP.raw_os_error()),
                        "{resolver:?}"
                    ),
                    other => panic!("{resolver:?}: {other:?}"),
                }
            });
        }
    }

    #[test]
    fn garbage_layer_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        for (i, junk) in [&b"\x1f\x8b\x08garbage"[..], &[0xffu8; 1500][..]]
            .iter()
            .enumerate()
        {
            let path = dir.path().join(format!("junk{i}"));
            std::fs::write(&path, junk).unwrap();
            let mut t = ImageTree::new(vec![LayerSource {
                digest: Digest::sha256_of(junk),
                media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
                path,
                diff_id: None,
            }]);
            assert!(t.resolve("/bin/sh").is_err());
        }
    }
}
