//! Real registries and hostile network parts for integration tests.
//!
//! - [`Registry`]: Debian's `docker-registry` (the CNCF distribution registry) on a free loopback port, plain HTTP
//!   or TLS from a [`TestCa`] with htpasswd auth; killed on drop; storage in its own temp dir.
//! - [`OciLayoutBuilder`]: writes a multi-arch OCI image layout from the busybox-static binaries, and
//!   [`skopeo_copy`] pushes it.
//! - [`HttpServer`]: a tiny HTTP/1.1 server with an async handler, for fake registries, token issuers, hanging or
//!   looping endpoints.
//! - [`CutProxy`]: a loopback TCP proxy that cuts its first connection after N bytes and counts what it relays.
//!
//! Every external piece is found through [`require`]: with `FLOTILLA_REQUIRE_ALL=1` a missing piece fails the test,
//! otherwise the test prints why it is skipped.
#![allow(dead_code)] // Each test binary uses its own part of this module.

use std::collections::HashMap;
use std::future::Future;
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla::digest::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const DOCKER_REGISTRY: &str = "/usr/bin/docker-registry";

pub use super::{busybox, require, tool};

/// `docker-registry`, `skopeo` and the four busybox binaries, or `None` (after `require`'s verdict).
pub fn registry_prerequisites() -> Option<()> {
    require(
        "docker-registry (/usr/bin/docker-registry)",
        tool(DOCKER_REGISTRY),
    )?;
    require("skopeo", tool("skopeo"))?;
    for arch in ["amd64", "arm64", "armhf", "armel"] {
        require(
            &format!("busybox-static for {arch} (run tests/setup, or set FLOTILLA_BUSYBOX_DIR)"),
            busybox(arch),
        )?;
    }
    Some(())
}

pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}

/// A certificate authority and a server certificate for `127.0.0.1` and `localhost`, written as PEM files.
pub struct TestCa {
    pub ca_pem: PathBuf,
    pub cert_pem: PathBuf,
    pub key_pem: PathBuf,
}

impl TestCa {
    pub fn generate(dir: &Path) -> TestCa {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
        };
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "flotilla test CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate().expect("CA key");
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA cert");
        let issuer = Issuer::new(ca_params, ca_key);
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("params");
        params
            .distinguished_name
            .push(DnType::CommonName, "127.0.0.1");
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().expect("server key");
        let cert = params.signed_by(&key, &issuer).expect("server cert");
        let ca = TestCa {
            ca_pem: dir.join("ca.pem"),
            cert_pem: dir.join("server.pem"),
            key_pem: dir.join("server.key"),
        };
        std::fs::write(&ca.ca_pem, ca_cert.pem()).expect("write ca.pem");
        std::fs::write(&ca.cert_pem, cert.pem()).expect("write server.pem");
        std::fs::write(&ca.key_pem, key.serialize_pem()).expect("write server.key");
        ca
    }
}

/// What a [`Registry`] is started with.
#[derive(Default)]
pub struct RegistryOptions<'a> {
    pub tls: Option<&'a TestCa>,
    /// Users and passwords for htpasswd auth (bcrypt through `htpasswd -Bbn`).
    pub users: Vec<(&'a str, &'a str)>,
}

/// A running `docker-registry`; killed when dropped.
pub struct Registry {
    child: Child,
    pub port: u16,
    pub dir: PathBuf,
    pub log: PathBuf,
    pub tls: bool,
}

impl Registry {
    pub fn start(dir: &Path, options: RegistryOptions<'_>) -> Registry {
        std::fs::create_dir_all(dir).expect("registry dir");
        let port = free_port();
        let mut yaml = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.join("storage").display()
        );
        if let Some(ca) = options.tls {
            yaml.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                ca.cert_pem.display(),
                ca.key_pem.display()
            ));
        }
        if !options.users.is_empty() {
            let htpasswd = require("htpasswd (apache2-utils)", tool("htpasswd")).expect("htpasswd");
            let mut lines = String::new();
            for (user, pass) in &options.users {
                let out = Command::new(&htpasswd)
                    .args(["-Bbn", user, pass])
                    .output()
                    .expect("run htpasswd");
                assert!(out.status.success(), "htpasswd failed");
                lines.push_str(String::from_utf8_lossy(&out.stdout).trim());
                lines.push('\n');
            }
            let path = dir.join("htpasswd");
            std::fs::write(&path, lines).expect("write htpasswd");
            yaml.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: flotilla-test\n    path: {}\n",
                path.display()
            ));
        }
        let config = dir.join("config.yml");
        std::fs::write(&config, yaml).expect("write registry config");
        let log = dir.join("registry.log");
        let log_file = std::fs::File::create(&log).expect("registry log");
        let child = Command::new(DOCKER_REGISTRY)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log fd"))
            .stderr(log_file)
            .spawn()
            .expect("start docker-registry");
        let mut registry = Registry {
            child,
            port,
            dir: dir.to_path_buf(),
            log,
            tls: options.tls.is_some(),
        };
        registry.wait_ready();
        registry
    }

    /// Bounded: 200 tries, 50 ms apart.
    fn wait_ready(&mut self) {
        for _ in 0..200 {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("docker-registry exited with {status}: {}", self.log_text());
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "docker-registry did not listen on {}: {}",
            self.port,
            self.log_text()
        );
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `127.0.0.1:<port>`, as it goes in references and in the insecure list.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `localhost:<port>`: the same registry by name, which flotilla must resolve itself (from /etc/hosts).
    pub fn localhost(&self) -> String {
        format!("localhost:{}", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Where the registry keeps a blob's bytes.
    pub fn blob_data_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.dir
            .join("storage/docker/registry/v2/blobs")
            .join(digest.algorithm().name())
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Pushes `oci:<layout>:<tag>` to `docker://<host>/<repo>:<dest_tag>` with skopeo (all platforms of an index).
/// `format` is `None` to keep OCI, or `Some("v2s2")` for Docker schema 2 and a Docker manifest list.
pub fn skopeo_copy(
    layout: &Path,
    tag: &str,
    host: &str,
    repo: &str,
    dest_tag: &str,
    format: Option<&str>,
    creds: Option<(&str, &str)>,
) {
    let policy = layout.with_extension("policy.json");
    std::fs::write(
        &policy,
        r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
    )
    .expect("policy");
    let mut cmd = Command::new("skopeo");
    cmd.arg("--policy")
        .arg(&policy)
        .args(["copy", "--all", "--dest-tls-verify=false"]);
    if let Some(f) = format {
        cmd.args(["--format", f]);
    }
    if let Some((u, p)) = creds {
        cmd.arg("--dest-creds").arg(format!("{u}:{p}"));
    }
    cmd.arg(format!("oci:{}:{tag}", layout.display()))
        .arg(format!("docker://{host}/{repo}:{dest_tag}"));
    let out = cmd.output().expect("run skopeo");
    assert!(
        out.status.success(),
        "skopeo copy failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One image of a layout: what it is labelled and which busybox it holds.
pub struct LayoutImage {
    pub os: &'static str,
    pub architecture: &'static str,
    pub variant: Option<&'static str>,
    pub busybox: PathBuf,
}

/// What was written: digests to check fetches against.
#[derive(Debug, Clone)]
pub struct WrittenImage {
    pub platform: String,
    pub manifest: Digest,
    pub manifest_size: u64,
    pub config: Digest,
    pub config_size: u64,
    pub layer: Digest,
    pub layer_size: u64,
    pub diff_id: Digest,
}

#[derive(Debug, Clone)]
pub struct WrittenLayout {
    pub index: Digest,
    pub images: Vec<WrittenImage>,
}

/// The usual four: amd64, arm64/v8, arm/v7 (armhf), arm/v6 (armel busybox, which is v5-compatible code).
/// Debian's busybox-static for `busybox_arch` (amd64, arm64, armhf, armel), labelled `linux/<architecture>`
/// with `variant`; the label may lie on purpose.
pub fn busybox_image(
    architecture: &'static str,
    variant: Option<&'static str>,
    busybox_arch: &str,
) -> LayoutImage {
    LayoutImage {
        os: "linux",
        architecture,
        variant,
        busybox: busybox(busybox_arch).expect("busybox checked by registry_prerequisites"),
    }
}

/// A registry on loopback in a temporary directory of its own, where a test pushes images and runs flotilla.
pub struct Lab {
    _dir: tempfile::TempDir,
    pub root: PathBuf,
    pub registry: Registry,
}

impl Lab {
    /// `None` when the registry's tools or the fixtures are missing (the test skips, or fails in CI).
    pub fn start() -> Option<Lab> {
        registry_prerequisites()?;
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().to_path_buf();
        let registry = Registry::start(&root.join("registry"), RegistryOptions::default());
        Some(Lab {
            _dir: dir,
            root,
            registry,
        })
    }

    /// Writes these images as a multi-arch OCI layout and pushes it to `<registry>/<repo>:v1` with skopeo.
    pub fn push(&self, repo: &str, images: &[LayoutImage]) -> WrittenLayout {
        self.push_with(repo, images, &[], None)
    }

    /// [`Lab::push`] with `extra` files in some images' layers, in skopeo's `format` (`None` keeps OCI).
    pub fn push_with(
        &self,
        repo: &str,
        images: &[LayoutImage],
        extra: &[Vec<(&str, PathBuf)>],
        format: Option<&str>,
    ) -> WrittenLayout {
        let layout = OciLayoutBuilder::new(&self.root.join("layouts").join(repo));
        let written = layout.write_with_files("v1", images, extra);
        skopeo_copy(
            layout.dir(),
            "v1",
            &self.registry.host(),
            repo,
            "v1",
            format,
            None,
        );
        written
    }
}

pub fn busybox_images() -> Option<Vec<LayoutImage>> {
    let image = |architecture, variant, arch: &str| {
        Some(LayoutImage {
            os: "linux",
            architecture,
            variant,
            busybox: busybox(arch)?,
        })
    };
    Some(vec![
        image("amd64", None, "amd64")?,
        image("arm64", Some("v8"), "arm64")?,
        image("arm", Some("v7"), "armhf")?,
        image("arm", Some("v6"), "armel")?,
    ])
}

/// Writes OCI image layouts: one layer per image (`bin/busybox` plus `bin/sh` as a symlink, tar+gzip), a config
/// stating the platform and the layer's diff_id, one manifest per image, one index tagged in `index.json`.
pub struct OciLayoutBuilder {
    dir: PathBuf,
}

impl OciLayoutBuilder {
    pub fn new(dir: &Path) -> OciLayoutBuilder {
        std::fs::create_dir_all(dir.join("blobs/sha256")).expect("layout dir");
        std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)
            .expect("oci-layout");
        OciLayoutBuilder {
            dir: dir.to_path_buf(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn put(&self, bytes: &[u8]) -> (Digest, u64) {
        let d = Digest::sha256_of(bytes);
        std::fs::write(self.dir.join("blobs/sha256").join(d.hex()), bytes).expect("write blob");
        (d, bytes.len() as u64)
    }

    fn layer(&self, busybox: &Path, extra: &[(&str, PathBuf)]) -> (Digest, u64, Digest) {
        let bin = std::fs::read(busybox).expect("read busybox");
        let mut tar = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        h.set_mtime(0);
        tar.append_data(&mut h, "bin/", std::io::empty())
            .expect("tar dir");
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o755);
        h.set_size(bin.len() as u64);
        h.set_mtime(0);
        tar.append_data(&mut h, "bin/busybox", bin.as_slice())
            .expect("tar file");
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        h.set_mtime(0);
        tar.append_link(&mut h, "bin/sh", "busybox")
            .expect("tar link");
        for (path, file) in extra {
            let bytes = std::fs::read(file).expect("read extra file");
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o755);
            h.set_size(bytes.len() as u64);
            h.set_mtime(0);
            tar.append_data(&mut h, path, bytes.as_slice())
                .expect("tar extra file");
        }
        let raw = tar.into_inner().expect("tar");
        let diff_id = Digest::sha256_of(&raw);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&raw).expect("gzip");
        let gz = gz.finish().expect("gzip");
        let (d, size) = self.put(&gz);
        (d, size, diff_id)
    }

    /// Writes the images and an index naming them, tagged `tag` in `index.json`.
    pub fn write(&self, tag: &str, images: &[LayoutImage]) -> WrittenLayout {
        self.write_with_files(tag, images, &[])
    }

    /// [`Self::write`], with more files in some images' layer: `extra[i]` lists (path in the image, file to copy
    /// there) for `images[i]`; images past the end of `extra` get none.
    pub fn write_with_files(
        &self,
        tag: &str,
        images: &[LayoutImage],
        extra: &[Vec<(&str, PathBuf)>],
    ) -> WrittenLayout {
        self.write_layers(tag, images, extra, &[])
    }

    /// [`Self::write_with_files`], every image on one shared base layer holding `base_files` (path in the image,
    /// file to copy there), as images built `FROM` one base are. Returns the base layer's digest too.
    pub fn write_on_base(
        &self,
        tag: &str,
        images: &[LayoutImage],
        base_files: &[(&str, PathBuf)],
        extra: &[Vec<(&str, PathBuf)>],
    ) -> (WrittenLayout, Digest) {
        let mut tar = tar::Builder::new(Vec::new());
        for (path, file) in base_files {
            let bytes = std::fs::read(file).expect("read base file");
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o755);
            h.set_size(bytes.len() as u64);
            h.set_mtime(0);
            tar.append_data(&mut h, path, bytes.as_slice())
                .expect("tar base file");
        }
        let raw = tar.into_inner().expect("tar");
        self.write_on_raw_base(tag, images, &[raw], extra)
    }

    /// [`Self::write_on_base`], the base layers being the tar streams `raw` as they are (crafted, hostile layers),
    /// base first.
    pub fn write_on_raw_base(
        &self,
        tag: &str,
        images: &[LayoutImage],
        raw: &[Vec<u8>],
        extra: &[Vec<(&str, PathBuf)>],
    ) -> (WrittenLayout, Digest) {
        let mut bases = Vec::new();
        for tar in raw {
            let diff_id = Digest::sha256_of(tar);
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(tar).expect("gzip");
            let (digest, size) = self.put(&gz.finish().expect("gzip"));
            bases.push((digest, size, diff_id));
        }
        let first = bases.first().expect("a base layer").0.clone();
        (self.write_layers(tag, images, extra, &bases), first)
    }

    fn write_layers(
        &self,
        tag: &str,
        images: &[LayoutImage],
        extra: &[Vec<(&str, PathBuf)>],
        base: &[(Digest, u64, Digest)],
    ) -> WrittenLayout {
        let mut written = Vec::new();
        let mut entries = Vec::new();
        for (n, img) in images.iter().enumerate() {
            let files = extra.get(n).map_or(&[][..], Vec::as_slice);
            let (layer, layer_size, diff_id) = self.layer(&img.busybox, files);
            let mut platform = serde_json::json!({"architecture": img.architecture, "os": img.os});
            if let Some(v) = img.variant {
                platform["variant"] = v.into();
            }
            let mut config = platform.clone();
            config["config"] = serde_json::json!({"Entrypoint": ["/bin/sh"], "Env": ["PATH=/bin"]});
            let mut diff_ids: Vec<String> = base.iter().map(|b| b.2.to_string()).collect();
            diff_ids.push(diff_id.to_string());
            config["rootfs"] = serde_json::json!({"type": "layers", "diff_ids": diff_ids});
            let (config_digest, config_size) =
                self.put(&serde_json::to_vec(&config).expect("json"));
            let manifest = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest.to_string(), "size": config_size},
                "layers": base
                    .iter()
                    .map(|b| (&b.0, b.1))
                    .chain([(&layer, layer_size)])
                    .map(|(d, size)| serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d.to_string(), "size": size}))
                    .collect::<Vec<_>>(),
            });
            let (m, msize) = self.put(&serde_json::to_vec(&manifest).expect("json"));
            entries.push(serde_json::json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": m.to_string(), "size": msize, "platform": platform,
            }));
            written.push(WrittenImage {
                platform: match img.variant {
                    Some(v) => format!("{}/{}/{v}", img.os, img.architecture),
                    None => format!("{}/{}", img.os, img.architecture),
                },
                manifest: m,
                manifest_size: msize,
                config: config_digest,
                config_size,
                layer,
                layer_size,
                diff_id,
            });
        }
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": entries,
        });
        let (index_digest, index_size) = self.put(&serde_json::to_vec(&index).expect("json"));
        self.tag_index(tag, &index_digest, index_size);
        WrittenLayout {
            index: index_digest,
            images: written,
        }
    }
}

impl OciLayoutBuilder {
    /// Points the layout's `index.json` at the image index `index_digest`, named `tag`.
    fn tag_index(&self, tag: &str, index_digest: &Digest, index_size: u64) {
        let top = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "digest": index_digest.to_string(), "size": index_size,
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }],
        });
        std::fs::write(
            self.dir.join("index.json"),
            serde_json::to_vec(&top).expect("json"),
        )
        .expect("index.json");
    }

    /// Adds a buildx-style attestation entry (`unknown/unknown`, `vnd.docker.reference.type`) to the index tagged
    /// `tag`, describing `image`. Its manifest is a small OCI manifest with an in-toto layer, as buildx writes it.
    pub fn add_attestation(
        &self,
        tag: &str,
        written: &WrittenLayout,
        image: &WrittenImage,
    ) -> Digest {
        let statement = br#"{"_type":"https://in-toto.io/Statement/v0.1","predicateType":"https://spdx.dev/Document"}"#;
        let (layer, layer_size) = self.put(statement);
        let (config, config_size) = self.put(b"{}");
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.to_string(), "size": config_size},
            "layers": [{"mediaType": "application/vnd.in-toto+json", "digest": layer.to_string(), "size": layer_size,
                        "annotations": {"in-toto.io/predicate-type": "https://spdx.dev/Document"}}],
        });
        let (m, msize) = self.put(&serde_json::to_vec(&manifest).expect("json"));
        let index_path = self.dir.join("blobs/sha256").join(written.index.hex());
        let mut index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&index_path).expect("read index"))
                .expect("index json");
        index["manifests"]
            .as_array_mut()
            .expect("manifests")
            .push(serde_json::json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": m.to_string(), "size": msize,
                "platform": {"architecture": "unknown", "os": "unknown"},
                "annotations": {
                    "vnd.docker.reference.type": "attestation-manifest",
                    "vnd.docker.reference.digest": image.manifest.to_string(),
                },
            }));
        let (index_digest, index_size) = self.put(&serde_json::to_vec(&index).expect("json"));
        self.tag_index(tag, &index_digest, index_size);
        m
    }
}

/// A request as the [`HttpServer`] saw it. Header names are lowercase.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub headers: HashMap<String, String>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

#[derive(Debug, Clone, Default)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Never answer (the connection stays open until the test ends).
    pub hang: bool,
    /// Send the body chunked, without Content-Length, so a client cannot size it up front.
    pub chunked: bool,
    /// Bytes written as they are instead of a response built from the fields (see [`forward`]).
    pub raw: Option<Vec<u8>>,
}

impl Response {
    pub fn new(status: u16) -> Response {
        Response {
            status,
            ..Response::default()
        }
    }
    pub fn header(mut self, k: &str, v: &str) -> Response {
        self.headers.push((k.to_string(), v.to_string()));
        self
    }
    pub fn body(mut self, b: impl Into<Vec<u8>>) -> Response {
        self.body = b.into();
        self
    }
    pub fn chunked(mut self) -> Response {
        self.chunked = true;
        self
    }
    pub fn hang() -> Response {
        Response {
            hang: true,
            ..Response::default()
        }
    }
}

type Handler = Arc<dyn Fn(Request) -> Pin<Box<dyn Future<Output = Response> + Send>> + Send + Sync>;

/// A minimal HTTP/1.1 server on loopback: one request per connection, `Connection: close`. It records every request.
pub struct HttpServer {
    pub addr: SocketAddr,
    pub requests: Arc<Mutex<Vec<Request>>>,
    task: tokio::task::JoinHandle<()>,
}

impl HttpServer {
    pub async fn start<F, Fut>(handler: F) -> HttpServer
    where
        F: Fn(Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |r| Box::pin(handler(r)));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let recorded = requests.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let handler = handler.clone();
                let recorded = recorded.clone();
                tokio::spawn(async move {
                    let _ = serve_one(stream, handler, recorded).await;
                });
            }
        });
        HttpServer {
            addr,
            requests,
            task,
        }
    }

    /// `127.0.0.1:<port>`.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().expect("lock").clone()
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_one(
    mut stream: TcpStream,
    handler: Handler,
    recorded: Arc<Mutex<Vec<Request>>>,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > 64 * 1024 {
            return Ok(());
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or_default().split(' ');
    let method = first.next().unwrap_or_default().to_string();
    let path = first.next().unwrap_or_default().to_string();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let request = Request {
        method,
        path,
        headers,
    };
    recorded.lock().expect("lock").push(request.clone());
    let response = handler(request).await;
    if response.hang {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        return Ok(());
    }
    if let Some(raw) = &response.raw {
        stream.write_all(raw).await?;
        return stream.shutdown().await;
    }
    let mut out = format!("HTTP/1.1 {} X\r\n", response.status);
    for (k, v) in &response.headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    if response.chunked {
        out.push_str("Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n");
        stream.write_all(out.as_bytes()).await?;
        for piece in response.body.chunks(64 * 1024) {
            stream
                .write_all(format!("{:x}\r\n", piece.len()).as_bytes())
                .await?;
            stream.write_all(piece).await?;
            stream.write_all(b"\r\n").await?;
        }
        stream.write_all(b"0\r\n\r\n").await?;
    } else {
        out.push_str(&format!(
            "Content-Length: {}\r\nConnection: close\r\n\r\n",
            response.body.len()
        ));
        stream.write_all(out.as_bytes()).await?;
        stream.write_all(&response.body).await?;
    }
    stream.shutdown().await
}

/// Relays `request` to a plain-HTTP server (a [`Registry`]) over HTTP/1.0 and returns its answer verbatim, so a
/// test server can gate a real registry behind its own authentication.
pub async fn forward(upstream: SocketAddr, request: &Request) -> Response {
    let mut head = format!(
        "{} {} HTTP/1.0\r\nHost: {upstream}\r\n",
        request.method, request.path
    );
    for name in ["accept", "range"] {
        if let Some(v) = request.header(name) {
            head.push_str(&format!("{name}: {v}\r\n"));
        }
    }
    head.push_str("\r\n");
    let mut raw = Vec::new();
    let mut s = TcpStream::connect(upstream)
        .await
        .expect("connect upstream");
    s.write_all(head.as_bytes()).await.expect("forward");
    s.read_to_end(&mut raw).await.expect("forward read");
    Response {
        raw: Some(raw),
        ..Response::default()
    }
}

/// What one proxied connection carried.
#[derive(Debug, Clone, Default)]
pub struct Relayed {
    /// Everything the client sent (its requests, headers included).
    pub request: Vec<u8>,
    /// Bytes passed on to the client (response heads and bodies).
    pub to_client: u64,
}

type RelayLog = Arc<Mutex<Vec<Relayed>>>;

/// A loopback TCP proxy to `upstream`. Its first connection is closed after `cut_after` bytes went to the client;
/// later ones pass everything. It keeps what each connection sent in both directions.
pub struct CutProxy {
    pub addr: SocketAddr,
    /// One entry per connection, in order.
    pub connections: RelayLog,
    task: tokio::task::JoinHandle<()>,
}

impl CutProxy {
    pub async fn start(upstream: SocketAddr, cut_after: u64) -> CutProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let connections = Arc::new(Mutex::new(Vec::new()));
        let conns = connections.clone();
        let count = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let n = count.fetch_add(1, Ordering::SeqCst);
                let limit = if n == 0 { cut_after } else { u64::MAX };
                let conns = conns.clone();
                let slot = {
                    let mut c = conns.lock().expect("lock");
                    c.push(Relayed::default());
                    c.len() - 1
                };
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    relay(client, server, limit, conns, slot).await;
                });
            }
        });
        CutProxy {
            addr,
            connections,
            task,
        }
    }

    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn connections(&self) -> Vec<Relayed> {
        self.connections.lock().expect("lock").clone()
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(client: TcpStream, server: TcpStream, limit: u64, conns: RelayLog, slot: usize) {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up_conns = conns.clone();
    let up = tokio::spawn(async move {
        let mut buf = [0u8; 16 * 1024];
        while let Ok(n) = cr.read(&mut buf).await {
            if n == 0 || sw.write_all(&buf[..n]).await.is_err() {
                break;
            }
            if let Some(c) = up_conns.lock().expect("lock").get_mut(slot) {
                c.request.extend_from_slice(&buf[..n]);
            }
        }
    });
    let mut sent = 0u64;
    let mut buf = [0u8; 16 * 1024];
    while let Ok(n) = sr.read(&mut buf).await {
        if n == 0 {
            break;
        }
        let allowed = (limit - sent).min(n as u64) as usize;
        if cw.write_all(&buf[..allowed]).await.is_err() {
            break;
        }
        sent += allowed as u64;
        if let Some(c) = conns.lock().expect("lock").get_mut(slot) {
            c.to_client += allowed as u64;
        }
        if allowed < n || sent >= limit {
            break;
        }
    }
    up.abort();
    // Dropping both halves closes the client's connection mid-body.
}
