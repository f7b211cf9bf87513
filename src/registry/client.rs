//! The HTTP side: endpoints (mirrors, then the registry), authentication, redirects, retries, manifests, blobs.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{self, HeaderMap, HeaderValue};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use url::Url;

use super::auth::{self, Challenge, TokenCache};
use super::credentials::{CredentialStore, Credentials};
use super::dns::SystemResolver;
use super::reference::{Reference, Repository, api_host};
use super::retry::{self, Outcome, RetryPolicy, TokenBucket};
use super::{At, RegistryError, Step, tls};
use crate::clock::{Clock, SystemClock};
use crate::config::{Config, RegistryConfig};
use crate::digest::{Digest, Verifier};

/// containerd's limit; a manifest is a few KiB, anything near this is an attack or a mistake.
pub const MAX_MANIFEST_BYTES: u64 = 4 * 1024 * 1024;

pub use crate::media_type::{DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST};
const SCHEMA1: [&str; 2] = [
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestKind {
    OciIndex,
    OciManifest,
    DockerManifestList,
    DockerManifest,
}

impl ManifestKind {
    pub fn media_type(self) -> &'static str {
        match self {
            ManifestKind::OciIndex => OCI_INDEX,
            ManifestKind::OciManifest => OCI_MANIFEST,
            ManifestKind::DockerManifestList => DOCKER_MANIFEST_LIST,
            ManifestKind::DockerManifest => DOCKER_MANIFEST,
        }
    }

    pub fn from_media_type(s: &str) -> Option<ManifestKind> {
        [
            ManifestKind::OciIndex,
            ManifestKind::OciManifest,
            ManifestKind::DockerManifestList,
            ManifestKind::DockerManifest,
        ]
        .into_iter()
        .find(|k| k.media_type() == s)
    }

    pub fn is_index(self) -> bool {
        matches!(
            self,
            ManifestKind::OciIndex | ManifestKind::DockerManifestList
        )
    }
}

/// A manifest exactly as the registry served it (the bytes the digest covers) and parsed.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub digest: Digest,
    pub kind: ManifestKind,
    pub bytes: Vec<u8>,
    pub content: ManifestContent,
}

#[derive(Debug, Clone)]
pub enum ManifestContent {
    Index(Box<oci_spec::image::ImageIndex>),
    Image(Box<oci_spec::image::ImageManifest>),
}

/// The blob to fetch: its digest and the size its descriptor states.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobSpec {
    pub digest: Digest,
    pub size: u64,
}

/// The tag cosign stores a signature under: `sha256-<hex>.sig`.
pub fn cosign_signature_tag(digest: &Digest) -> String {
    format!("{}-{}.sig", digest.algorithm().name(), digest.hex())
}

/// The OCI 1.1 referrers tag schema for registries without the referrers API: `sha256-<hex>`.
pub fn referrers_fallback_tag(digest: &Digest) -> String {
    format!("{}-{}", digest.algorithm().name(), digest.hex())
}

#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub retry: RetryPolicy,
    pub connect_timeout: Duration,
    /// A connection that delivers no byte for this long is given up (and retried).
    pub read_timeout: Duration,
    /// Whole-request limit for small answers (manifests, tokens, referrers); blobs have only the read timeout.
    pub request_timeout: Duration,
    pub max_redirects: u32,
    pub max_bytes_per_second: Option<u64>,
    /// `host[:port]` spoken to over plain HTTP.
    pub insecure: Vec<String>,
}

impl ClientOptions {
    pub fn from_config(config: &Config, insecure_registries: &[String]) -> ClientOptions {
        let mut insecure: Vec<String> = insecure_registries.to_vec();
        insecure.extend(
            config
                .registries
                .iter()
                .filter(|r| r.insecure)
                .map(|r| r.host.clone()),
        );
        ClientOptions {
            retry: RetryPolicy {
                attempts: config.pull.retries.max(1),
                ..RetryPolicy::default()
            },
            connect_timeout: Duration::from_secs(15),
            read_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(60),
            max_redirects: 5,
            max_bytes_per_second: config.pull.max_bytes_per_second,
            insecure,
        }
    }
}

/// One place to fetch from: a mirror or the registry itself.
#[derive(Clone)]
struct Endpoint {
    /// `host[:port]` the requests go to.
    host: String,
    /// `https://host/` or, for insecure ones, `http://host/`.
    base: Url,
    /// Credentials of this endpoint (looked up under the registry's own name for the registry itself).
    credentials: Option<Credentials>,
    http: reqwest::Client,
}

/// A failed attempt and whether trying again may help (with the server's `Retry-After`).
struct Fault {
    error: RegistryError,
    retry: Option<Option<Duration>>,
}

impl Fault {
    fn fatal(error: RegistryError) -> Fault {
        Fault { error, retry: None }
    }
    fn retry(error: RegistryError, after: Option<Duration>) -> Fault {
        Fault {
            error,
            retry: Some(after),
        }
    }
}

fn outcome<T>(r: Result<T, Fault>) -> Outcome<T, RegistryError> {
    match r {
        Ok(v) => Outcome::Done(v),
        Err(Fault {
            error,
            retry: Some(after),
        }) => Outcome::Retry(error, after),
        Err(Fault { error, retry: None }) => Outcome::Fail(error),
    }
}

/// A partial blob file and the hash of what it holds so far.
struct Partial<'a> {
    file: tokio::fs::File,
    path: &'a Path,
    verifier: Verifier,
}

impl Partial<'_> {
    async fn restart(&mut self, at: &At, blob: &BlobSpec) -> Result<(), Fault> {
        self.file
            .set_len(0)
            .await
            .map_err(io_fault(at, self.path))?;
        self.verifier = Verifier::new(blob.digest.algorithm());
        Ok(())
    }
}

fn io_fault(at: &At, path: &Path) -> impl Fn(std::io::Error) -> Fault {
    let at = at.clone();
    let path = path.to_path_buf();
    move |source| {
        Fault::fatal(RegistryError::Io {
            at: Box::new(at.clone()),
            path: path.clone(),
            source,
        })
    }
}

/// Flushes and fsyncs the file, then checks the digest of everything it holds.
async fn finish_blob(at: &At, blob: &BlobSpec, partial: &mut Partial<'_>) -> Result<(), Fault> {
    let io = io_fault(at, partial.path);
    partial.file.flush().await.map_err(&io)?;
    partial.file.sync_all().await.map_err(&io)?;
    let actual = partial.verifier.clone().finish();
    if actual != blob.digest {
        return Err(Fault::fatal(RegistryError::DigestMismatch {
            at: Box::new(at.clone()),
            expected: blob.digest.clone(),
            actual,
        }));
    }
    Ok(())
}

/// A pull-side registry client; cheap to clone and share between parallel downloads.
#[derive(Clone)]
pub struct RegistryClient {
    inner: Arc<Inner>,
}

struct Inner {
    options: ClientOptions,
    registries: HashMap<String, RegistryConfig>,
    credentials: CredentialStore,
    default_http: reqwest::Client,
    /// Clients for registries with their own CA bundle.
    http_by_host: HashMap<String, reqwest::Client>,
    tokens: TokenCache,
    /// Endpoints that asked for Basic auth; they get it up front from then on.
    basic_hosts: Mutex<HashSet<String>>,
    bucket: Option<TokenBucket>,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryClient")
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

/// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`, when it exists.
fn default_docker_config() -> Option<PathBuf> {
    let path = match std::env::var_os("DOCKER_CONFIG") {
        Some(dir) => PathBuf::from(dir).join("config.json"),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".docker/config.json"),
    };
    path.is_file().then_some(path)
}

impl RegistryClient {
    /// The client the agent uses: options from the configuration, `--insecure-registry` hosts, the real clock.
    pub fn new(
        config: &Config,
        insecure_registries: &[String],
    ) -> Result<RegistryClient, RegistryError> {
        RegistryClient::with_options(
            config,
            ClientOptions::from_config(config, insecure_registries),
            Arc::new(SystemClock),
        )
    }

    pub fn with_options(
        config: &Config,
        options: ClientOptions,
        clock: Arc<dyn Clock>,
    ) -> Result<RegistryClient, RegistryError> {
        let docker_config = config.docker_config.clone().or_else(default_docker_config);
        let credentials = CredentialStore::load(&config.registries, docker_config.as_deref())?;
        let system = tls::system_roots();
        let global: Vec<PathBuf> = config.ca_bundle.iter().cloned().collect();
        let resolver = Arc::new(SystemResolver::default());
        let build = |bundles: &[PathBuf]| -> Result<reqwest::Client, RegistryError> {
            let tls = tls::client_config(&system, bundles)?;
            reqwest::Client::builder()
                .use_preconfigured_tls(tls)
                .dns_resolver(Arc::clone(&resolver))
                .redirect(reqwest::redirect::Policy::none())
                .connect_timeout(options.connect_timeout)
                .read_timeout(options.read_timeout)
                .user_agent(concat!("flotilla/", env!("CARGO_PKG_VERSION")))
                .build()
                .map_err(|e| RegistryError::HttpClient(e.to_string()))
        };
        let default_http = build(&global)?;
        let mut http_by_host = HashMap::new();
        let mut registries = HashMap::new();
        for r in &config.registries {
            if let Some(bundle) = &r.ca_bundle {
                let mut bundles = global.clone();
                bundles.push(bundle.clone());
                http_by_host.insert(r.host.clone(), build(&bundles)?);
            }
            registries.insert(r.host.clone(), r.clone());
        }
        let bucket = options.max_bytes_per_second.map(TokenBucket::new);
        Ok(RegistryClient {
            inner: Arc::new(Inner {
                options,
                registries,
                credentials,
                default_http,
                http_by_host,
                tokens: TokenCache::default(),
                basic_hosts: Mutex::new(HashSet::new()),
                bucket,
                clock,
            }),
        })
    }

    fn is_insecure(&self, host: &str) -> bool {
        self.inner.options.insecure.iter().any(|h| h == host)
    }

    fn endpoint(
        &self,
        host: &str,
        creds_key: &str,
        config_key: &str,
    ) -> Result<Endpoint, RegistryError> {
        let scheme = if self.is_insecure(host) || self.is_insecure(config_key) {
            "http"
        } else {
            "https"
        };
        let base = Url::parse(&format!("{scheme}://{host}/"))
            .map_err(|e| RegistryError::HttpClient(format!("registry host {host:?}: {e}")))?;
        let http = self
            .inner
            .http_by_host
            .get(config_key)
            .unwrap_or(&self.inner.default_http)
            .clone();
        Ok(Endpoint {
            host: host.to_string(),
            base,
            credentials: self
                .inner
                .credentials
                .get(creds_key)
                .map(|(c, _)| c.clone()),
            http,
        })
    }

    /// The configured mirrors in order, then the registry itself.
    fn endpoints(&self, registry: &str) -> Result<Vec<Endpoint>, RegistryError> {
        let mut out = Vec::new();
        if let Some(rc) = self.inner.registries.get(registry) {
            for m in &rc.mirrors {
                let host = m
                    .strip_prefix("https://")
                    .unwrap_or(m)
                    .trim_end_matches('/');
                out.push(self.endpoint(host, host, host)?);
            }
        }
        out.push(self.endpoint(api_host(registry), registry, registry)?);
        Ok(out)
    }

    /// Tries each endpoint in turn; the first success wins, the registry's own error is the one reported.
    async fn across_endpoints<T, F, Fut>(
        &self,
        repo: &Repository,
        mut op: F,
    ) -> Result<T, RegistryError>
    where
        F: FnMut(Endpoint) -> Fut,
        Fut: std::future::Future<Output = Result<T, RegistryError>>,
    {
        let endpoints = self.endpoints(repo.registry())?;
        let last = endpoints.len().saturating_sub(1);
        let mut result = None;
        for (i, ep) in endpoints.into_iter().enumerate() {
            let host = ep.host.clone();
            match op(ep).await {
                Ok(v) => return Ok(v),
                // "Not found" on a mirror is worth asking the registry; so is anything else.
                Err(e) if i < last => tracing::warn!("mirror {host} failed, trying the next: {e}"),
                Err(e) => result = Some(e),
            }
        }
        Err(result.unwrap_or_else(|| RegistryError::HttpClient("no endpoint to try".into())))
    }

    /// The manifest `reference` names: by digest when it has one (verified against it), else by tag.
    pub async fn fetch_manifest(&self, reference: &Reference) -> Result<Manifest, RegistryError> {
        let repo = reference.repository();
        let mref = reference.manifest_reference();
        self.across_endpoints(repo, |ep| {
            let mref = mref.clone();
            async move {
                let at = self.at(repo, Step::Manifest(mref.clone()));
                retry::retry(&self.inner.options.retry, self.inner.clock.as_ref(), |_| {
                    outcome_fut(self.manifest_attempt(&ep, &at, reference.digest(), &mref))
                })
                .await
            }
        })
        .await
    }

    /// The manifest tagged `tag` in `repo` (cosign's `sha256-<hex>.sig`, for instance).
    pub async fn fetch_manifest_by_tag(
        &self,
        repo: &Repository,
        tag: &str,
    ) -> Result<Manifest, RegistryError> {
        let reference: Reference = format!("{repo}:{tag}").parse()?;
        self.fetch_manifest(&reference).await
    }

    /// Manifests that refer to `subject` (signatures, SBOMs), optionally only those of `artifact_type`: the OCI
    /// 1.1 referrers API, or the `sha256-<hex>` fallback tag when the registry lacks the API. None is an empty list.
    pub async fn fetch_referrers(
        &self,
        repo: &Repository,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Vec<oci_spec::image::Descriptor>, RegistryError> {
        let at = self.at(repo, Step::Referrers(subject.clone()));
        let listed = self
            .across_endpoints(repo, |ep| {
                let at = at.clone();
                async move {
                    retry::retry(&self.inner.options.retry, self.inner.clock.as_ref(), |_| {
                        outcome_fut(self.referrers_attempt(&ep, &at, subject))
                    })
                    .await
                }
            })
            .await;
        let descriptors = match listed {
            Ok(Some(index)) => index.manifests().clone(),
            Ok(None) => match self
                .fetch_manifest_by_tag(repo, &referrers_fallback_tag(subject))
                .await
            {
                Ok(Manifest {
                    content: ManifestContent::Index(index),
                    ..
                }) => index.manifests().clone(),
                Ok(_) => {
                    return Err(RegistryError::Malformed {
                        at: Box::new(at),
                        reason: format!(
                            "the referrers fallback tag {} is not an index",
                            referrers_fallback_tag(subject)
                        ),
                    });
                }
                Err(e) if e.is_not_found() => Vec::new(),
                Err(e) => return Err(e),
            },
            Err(e) => return Err(e),
        };
        Ok(descriptors
            .into_iter()
            .filter(|d| {
                artifact_type.is_none_or(|t| {
                    d.artifact_type().as_ref().map(|a| a.to_string()).as_deref() == Some(t)
                })
            })
            .collect())
    }

    /// A small blob (an image config, a signature payload) into memory, verified; `limit` caps what is accepted.
    pub async fn fetch_blob_bytes(
        &self,
        repo: &Repository,
        blob: &BlobSpec,
        limit: u64,
    ) -> Result<Vec<u8>, RegistryError> {
        let at = self.at(repo, Step::Blob(blob.digest.clone()));
        if blob.size > limit {
            return Err(RegistryError::SizeMismatch {
                at: Box::new(at),
                expected: blob.size,
                got: format!(
                    "nothing: flotilla reads at most {limit} bytes of this kind of blob into memory"
                ),
            });
        }
        self.across_endpoints(repo, |ep| {
            let at = at.clone();
            async move {
                retry::retry(&self.inner.options.retry, self.inner.clock.as_ref(), |_| {
                    outcome_fut(self.small_blob_attempt(&ep, &at, blob))
                })
                .await
            }
        })
        .await
    }

    /// Downloads a blob into `partial` (a path the content store chose), resuming what is already there, and
    /// returns once the file holds exactly the blob, verified and fsynced. On a digest or size mismatch the file is
    /// removed. `progress` gets (bytes so far, total). Returns the hash state over the whole file, so the store can
    /// publish it without hashing the bytes again, and how many bytes this call transferred.
    pub async fn fetch_blob(
        &self,
        repo: &Repository,
        blob: &BlobSpec,
        partial: &Path,
        progress: &(dyn Fn(u64, u64) + Send + Sync),
    ) -> Result<(Verifier, u64), RegistryError> {
        self.across_endpoints(repo, |ep| async move {
            self.fetch_blob_from(&ep, repo, blob, partial, progress)
                .await
        })
        .await
    }

    fn at(&self, repo: &Repository, step: Step) -> At {
        At {
            registry: repo.registry().to_string(),
            repository: repo.path().to_string(),
            step,
        }
    }

    fn url(&self, ep: &Endpoint, at: &At, tail: &str) -> Result<Url, Fault> {
        ep.base
            .join(&format!("v2/{}/{tail}", at.repository))
            .map_err(|e| {
                Fault::fatal(RegistryError::HttpClient(format!(
                    "cannot build a URL for {}: {e}",
                    at.repository
                )))
            })
    }

    async fn manifest_attempt(
        &self,
        ep: &Endpoint,
        at: &At,
        pinned: Option<&Digest>,
        mref: &str,
    ) -> Result<Manifest, Fault> {
        let url = self.url(ep, at, &format!("manifests/{mref}"))?;
        let accept = [
            OCI_INDEX,
            OCI_MANIFEST,
            DOCKER_MANIFEST_LIST,
            DOCKER_MANIFEST,
        ]
        .join(", ");
        let mut headers = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(&accept) {
            headers.insert(header::ACCEPT, v);
        }
        let mut resp = self.send(ep, at, url, headers, true).await?;
        check_status(at, &resp, self.inner.clock.now())?;
        let content_type = media_type_of(&resp);
        if let Some(ct) = &content_type {
            if SCHEMA1.contains(&ct.as_str()) {
                return Err(Fault::fatal(RegistryError::Schema1 {
                    at: Box::new(at.clone()),
                }));
            }
        }
        if let Some(ct) = &content_type {
            if ManifestKind::from_media_type(ct).is_none() && ct != "application/json" {
                let hint = if ct.starts_with("text/html") {
                    "; an HTML page usually means a login portal or proxy answered instead of a registry"
                } else {
                    ""
                };
                return Err(Fault::fatal(RegistryError::UnsupportedMediaType {
                    at: Box::new(at.clone()),
                    media_type: ct.clone(),
                    hint,
                }));
            }
        }
        let hinted = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<Digest>().ok());
        let bytes = read_capped(
            &mut resp,
            at,
            &ep.base,
            MAX_MANIFEST_BYTES,
            self.inner.options.read_timeout,
        )
        .await?;
        let algorithm = pinned
            .map(|d| d.algorithm())
            .unwrap_or(crate::digest::Algorithm::Sha256);
        let mut v = Verifier::new(algorithm);
        v.update(&bytes);
        let digest = v.finish();
        if let Some(expected) = pinned {
            if *expected != digest {
                return Err(Fault::fatal(RegistryError::DigestMismatch {
                    at: Box::new(at.clone()),
                    expected: expected.clone(),
                    actual: digest,
                }));
            }
        }
        if let Some(h) = hinted {
            if h.algorithm() == digest.algorithm() && h != digest {
                tracing::warn!(registry = %at.registry, "Docker-Content-Digest {h} differs from the computed {digest}; using the computed one");
            }
        }
        let (kind, content) =
            parse_manifest(at, content_type.as_deref(), &bytes).map_err(Fault::fatal)?;
        Ok(Manifest {
            digest,
            kind,
            bytes,
            content,
        })
    }

    /// `Ok(None)` when the registry has no referrers API (404), so the caller falls back to the tag schema.
    async fn referrers_attempt(
        &self,
        ep: &Endpoint,
        at: &At,
        subject: &Digest,
    ) -> Result<Option<oci_spec::image::ImageIndex>, Fault> {
        let url = self.url(ep, at, &format!("referrers/{subject}"))?;
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_static(OCI_INDEX));
        let mut resp = self.send(ep, at, url, headers, true).await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        check_status(at, &resp, self.inner.clock.now())?;
        match media_type_of(&resp).as_deref() {
            Some(OCI_INDEX) => {}
            other => {
                return Err(Fault::fatal(RegistryError::UnsupportedMediaType {
                    at: Box::new(at.clone()),
                    media_type: other.unwrap_or("none").to_string(),
                    hint: "; the referrers API must answer with an OCI image index",
                }));
            }
        }
        let bytes = read_capped(
            &mut resp,
            at,
            &ep.base,
            MAX_MANIFEST_BYTES,
            self.inner.options.read_timeout,
        )
        .await?;
        serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            Fault::fatal(RegistryError::Malformed {
                at: Box::new(at.clone()),
                reason: format!("the referrers index is not valid JSON: {e}"),
            })
        })
    }

    async fn small_blob_attempt(
        &self,
        ep: &Endpoint,
        at: &At,
        blob: &BlobSpec,
    ) -> Result<Vec<u8>, Fault> {
        let url = self.url(ep, at, &format!("blobs/{}", blob.digest))?;
        let mut resp = self.send(ep, at, url, HeaderMap::new(), false).await?;
        check_status(at, &resp, self.inner.clock.now())?;
        let mut bytes = Vec::new();
        let mut v = Verifier::new(blob.digest.algorithm());
        while let Some(chunk) =
            next_chunk(&mut resp, at, &ep.base, self.inner.options.read_timeout).await?
        {
            if bytes.len() as u64 + chunk.len() as u64 > blob.size {
                return Err(Fault::fatal(RegistryError::SizeMismatch {
                    at: Box::new(at.clone()),
                    expected: blob.size,
                    got: "more".into(),
                }));
            }
            v.update(&chunk);
            bytes.extend_from_slice(&chunk);
        }
        if bytes.len() as u64 != blob.size {
            return Err(Fault::fatal(RegistryError::SizeMismatch {
                at: Box::new(at.clone()),
                expected: blob.size,
                got: bytes.len().to_string(),
            }));
        }
        let actual = v.finish();
        if actual != blob.digest {
            return Err(Fault::fatal(RegistryError::DigestMismatch {
                at: Box::new(at.clone()),
                expected: blob.digest.clone(),
                actual,
            }));
        }
        Ok(bytes)
    }

    async fn fetch_blob_from(
        &self,
        ep: &Endpoint,
        repo: &Repository,
        blob: &BlobSpec,
        path: &Path,
        progress: &(dyn Fn(u64, u64) + Send + Sync),
    ) -> Result<(Verifier, u64), RegistryError> {
        let at = self.at(repo, Step::Blob(blob.digest.clone()));
        let mut partial = self
            .open_partial(&at, blob, path)
            .await
            .map_err(|f| f.error)?;
        let resumed_at = partial.verifier.len();
        progress(resumed_at, blob.size);
        let policy = self.inner.options.retry;
        let attempts = policy.attempts.max(1);
        let mut failed = 0u32;
        loop {
            let before = partial.verifier.len();
            let mut r = Ok(());
            if before < blob.size {
                r = self
                    .blob_attempt(ep, &at, blob, &mut partial, progress)
                    .await;
            }
            if r.is_ok() {
                r = finish_blob(&at, blob, &mut partial).await;
            }
            match r {
                Ok(()) => {
                    let fetched = partial.verifier.len().saturating_sub(resumed_at);
                    return Ok((partial.verifier.clone(), fetched));
                }
                Err(Fault {
                    error,
                    retry: Some(after),
                }) => {
                    // An attempt that moved the download forward is not held against it: on a flaky link every
                    // try gets further, and the total stays bounded by the blob's size.
                    if partial.verifier.len() <= before {
                        failed += 1;
                    }
                    if failed >= attempts {
                        return Err(error);
                    }
                    let d = policy.delay(failed.max(1), after, self.inner.clock.random());
                    tracing::info!(
                        "{error}; resuming at byte {} in {d:?}",
                        partial.verifier.len()
                    );
                    self.inner.clock.sleep(d).await;
                }
                Err(Fault { error, retry: None }) => {
                    if matches!(
                        error,
                        RegistryError::DigestMismatch { .. } | RegistryError::SizeMismatch { .. }
                    ) {
                        drop(partial);
                        if let Err(e) = tokio::fs::remove_file(path).await {
                            tracing::warn!("cannot remove {}: {e}", path.display());
                        }
                    }
                    return Err(error);
                }
            }
        }
    }

    /// Opens (or creates) the partial file and hashes what it already holds: bytes another process wrote are
    /// hashed again rather than trusted. A file that is too long, or complete but wrong, starts over.
    async fn open_partial<'a>(
        &self,
        at: &At,
        blob: &BlobSpec,
        path: &'a Path,
    ) -> Result<Partial<'a>, Fault> {
        let io = io_fault(at, path);
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .await
            .map_err(&io)?;
        let mut partial = Partial {
            file,
            path,
            verifier: Verifier::new(blob.digest.algorithm()),
        };
        let existing = partial.file.metadata().await.map_err(&io)?.len();
        if existing > blob.size {
            partial.restart(at, blob).await?;
        } else if existing > 0 {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = partial.file.read(&mut buf).await.map_err(&io)?;
                let Some(read) = buf.get(..n).filter(|r| !r.is_empty()) else {
                    break;
                };
                partial.verifier.update(read);
            }
            if existing == blob.size && partial.verifier.clone().finish() != blob.digest {
                partial.restart(at, blob).await?;
            }
            tracing::debug!(
                bytes = partial.verifier.len(),
                "resuming partial blob {}",
                blob.digest
            );
        }
        Ok(partial)
    }

    async fn blob_attempt(
        &self,
        ep: &Endpoint,
        at: &At,
        blob: &BlobSpec,
        partial: &mut Partial<'_>,
        progress: &(dyn Fn(u64, u64) + Send + Sync),
    ) -> Result<(), Fault> {
        let io = io_fault(at, partial.path);
        let offset = partial.verifier.len();
        let url = self.url(ep, at, &format!("blobs/{}", blob.digest))?;
        let mut headers = HeaderMap::new();
        if offset > 0 {
            // The value is ASCII digits: it always converts.
            if let Ok(v) = HeaderValue::from_str(&format!("bytes={offset}-")) {
                headers.insert(header::RANGE, v);
            }
        }
        let mut resp = self.send(ep, at, url, headers, false).await?;
        let restarting = |reason: &str| {
            tracing::info!("{at}: {reason}; downloading {} from the start", blob.digest);
        };
        match resp.status() {
            StatusCode::PARTIAL_CONTENT if offset > 0 => {
                let start = resp
                    .headers()
                    .get(header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(content_range_start);
                if start != Some(offset) {
                    restarting("the registry answered a different range than asked");
                    partial.restart(at, blob).await?;
                    return Err(Fault::retry(
                        RegistryError::Malformed {
                            at: Box::new(at.clone()),
                            reason: format!("asked for bytes {offset}- and got a different range"),
                        },
                        Some(Duration::ZERO),
                    ));
                }
            }
            StatusCode::RANGE_NOT_SATISFIABLE if offset > 0 => {
                restarting("the registry refused the range");
                partial.restart(at, blob).await?;
                return Err(Fault::retry(
                    RegistryError::Status {
                        at: Box::new(at.clone()),
                        status: 416,
                        detail: " (range not satisfiable)".into(),
                    },
                    Some(Duration::ZERO),
                ));
            }
            StatusCode::PARTIAL_CONTENT => {
                return Err(Fault::fatal(RegistryError::Malformed {
                    at: Box::new(at.clone()),
                    reason: "answered 206 to a request without a range".into(),
                }));
            }
            StatusCode::OK => {
                if offset > 0 {
                    restarting("the registry ignored the range");
                    partial.restart(at, blob).await?;
                }
            }
            _ => check_status(at, &resp, self.inner.clock.now())?,
        }
        let from = partial.verifier.len();
        partial
            .file
            .seek(std::io::SeekFrom::Start(from))
            .await
            .map_err(&io)?;
        progress(from, blob.size);
        loop {
            let chunk =
                match next_chunk(&mut resp, at, &ep.base, self.inner.options.read_timeout).await {
                    Ok(Some(c)) => c,
                    Ok(None) => break,
                    Err(f) => {
                        partial.file.flush().await.map_err(&io)?;
                        return Err(f);
                    }
                };
            let room = blob.size - partial.verifier.len();
            if chunk.len() as u64 > room {
                return Err(Fault::fatal(RegistryError::SizeMismatch {
                    at: Box::new(at.clone()),
                    expected: blob.size,
                    got: "more (the download was cut at the stated size)".into(),
                }));
            }
            partial.file.write_all(&chunk).await.map_err(&io)?;
            partial.verifier.update(&chunk);
            progress(partial.verifier.len(), blob.size);
            if let Some(bucket) = &self.inner.bucket {
                let wait = bucket.take(chunk.len() as u64, self.inner.clock.instant());
                if !wait.is_zero() {
                    self.inner.clock.sleep(wait).await;
                }
            }
        }
        if partial.verifier.len() != blob.size {
            return Err(Fault::fatal(RegistryError::SizeMismatch {
                at: Box::new(at.clone()),
                expected: blob.size,
                got: partial.verifier.len().to_string(),
            }));
        }
        Ok(())
    }

    /// The Authorization header this endpoint gets for `scope`, if any is known yet.
    fn auth_header(&self, ep: &Endpoint, scope: &str) -> Option<HeaderValue> {
        if let Some(token) = self
            .inner
            .tokens
            .get(&ep.host, scope, self.inner.clock.instant())
        {
            return sensitive(&format!("Bearer {token}"));
        }
        let basic = self
            .inner
            .basic_hosts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&ep.host);
        match (&ep.credentials, basic) {
            (Some(c), true) => basic_header(c),
            _ => None,
        }
    }

    /// One request with authentication (answering one 401 challenge) and redirects handled here.
    async fn send(
        &self,
        ep: &Endpoint,
        at: &At,
        url: Url,
        headers: HeaderMap,
        small: bool,
    ) -> Result<reqwest::Response, Fault> {
        let scope = format!("repository:{}:pull", at.repository);
        let mut answered = false;
        loop {
            let auth = self.auth_header(ep, &scope);
            let had_auth = auth.is_some();
            let resp = self
                .follow(ep, at, url.clone(), &headers, auth, small)
                .await?;
            if resp.status() != StatusCode::UNAUTHORIZED {
                return Ok(resp);
            }
            if had_auth {
                self.inner.tokens.forget(&ep.host, &scope);
            }
            let challenge = resp
                .headers()
                .get(header::WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .and_then(auth::parse_challenge);
            let unauthorized = || {
                Fault::fatal(RegistryError::Unauthorized {
                    at: Box::new(at.clone()),
                })
            };
            if answered {
                return Err(unauthorized());
            }
            answered = true;
            match challenge {
                Some(Challenge::Bearer { realm, service, .. }) => {
                    let token = self
                        .fetch_token(ep, at, &realm, service.as_deref(), &scope)
                        .await?;
                    self.inner
                        .tokens
                        .put(&ep.host, &scope, &token, self.inner.clock.instant());
                }
                Some(Challenge::Basic) if ep.credentials.is_some() => {
                    self.inner
                        .basic_hosts
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(ep.host.clone());
                }
                _ => return Err(unauthorized()),
            }
        }
    }

    async fn fetch_token(
        &self,
        ep: &Endpoint,
        at: &At,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<auth::Token, Fault> {
        let token_err = |reason: String| RegistryError::Token {
            at: Box::new(at.clone()),
            realm: realm.to_string(),
            reason,
        };
        let mut url = Url::parse(realm)
            .map_err(|e| Fault::fatal(token_err(format!("the realm is not a URL: {e}"))))?;
        if url.scheme() != "https" && !(url.scheme() == "http" && ep.base.scheme() == "http") {
            return Err(Fault::fatal(token_err(
                "the registry sent its clients to a token endpoint that is not HTTPS; credentials are not sent there".into(),
            )));
        }
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            q.append_pair("scope", scope);
        }
        let endpoint = url.origin().ascii_serialization();
        let mut req = ep.http.get(url).timeout(self.inner.options.request_timeout);
        if let Some(c) = &ep.credentials {
            req = req.basic_auth(&c.username, Some(&c.password));
        }
        let mut resp = req
            .send()
            .await
            .map_err(|e| self.net_fault(at, &format!("token endpoint {endpoint}"), e))?;
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(Fault::fatal(RegistryError::Unauthorized {
                at: Box::new(at.clone()),
            }));
        }
        if !status.is_success() {
            let e = token_err(format!("HTTP {status}"));
            return Err(
                if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
                    Fault::retry(e, retry_after(&resp, self.inner.clock.now()))
                } else {
                    Fault::fatal(e)
                },
            );
        }
        let body = read_capped(
            &mut resp,
            at,
            &ep.base,
            1024 * 1024,
            self.inner.options.read_timeout,
        )
        .await?;
        auth::parse_token(&body).map_err(|reason| Fault::fatal(token_err(reason)))
    }

    /// GET `url`, following up to `max_redirects` redirects; Authorization goes only to the endpoint itself.
    async fn follow(
        &self,
        ep: &Endpoint,
        at: &At,
        url: Url,
        headers: &HeaderMap,
        auth: Option<HeaderValue>,
        small: bool,
    ) -> Result<reqwest::Response, Fault> {
        let limit = self.inner.options.max_redirects;
        let mut current = url;
        for _ in 0..=limit {
            let mut req = ep.http.get(current.clone()).headers(headers.clone());
            if let Some(a) = &auth {
                if current.origin() == ep.base.origin() {
                    req = req.header(header::AUTHORIZATION, a.clone());
                }
            }
            if small {
                req = req.timeout(self.inner.options.request_timeout);
            }
            let host = current.host_str().unwrap_or_default().to_string();
            let resp = req.send().await.map_err(|e| self.net_fault(at, &host, e))?;
            if !resp.status().is_redirection() || resp.status() == StatusCode::NOT_MODIFIED {
                return Ok(resp);
            }
            let location = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| {
                    Fault::fatal(RegistryError::Malformed {
                        at: Box::new(at.clone()),
                        reason: format!("HTTP {} without a Location", resp.status()),
                    })
                })?;
            let bad = |reason: &str| {
                Fault::fatal(RegistryError::BadRedirect {
                    at: Box::new(at.clone()),
                    location: location.to_string(),
                    reason: reason.to_string(),
                })
            };
            let next = current.join(location).map_err(|_| bad("not a URL"))?;
            match (current.scheme(), next.scheme()) {
                ("https", "https") | ("http", "http") | ("http", "https") => {}
                ("https", "http") => {
                    let h = host_port(&next);
                    if !self.is_insecure(&h) {
                        return Err(bad("it would downgrade HTTPS to plain HTTP"));
                    }
                }
                _ => return Err(bad("only http and https are followed")),
            }
            current = next;
        }
        Err(Fault::fatal(RegistryError::TooManyRedirects {
            at: Box::new(at.clone()),
            limit,
            last: current.to_string(),
        }))
    }

    fn net_fault(&self, at: &At, endpoint: &str, e: reqwest::Error) -> Fault {
        let at = Box::new(at.clone());
        if e.is_timeout() {
            let secs = self
                .inner
                .options
                .read_timeout
                .min(self.inner.options.request_timeout)
                .as_secs();
            Fault::retry(
                RegistryError::Timeout {
                    at,
                    endpoint: endpoint.to_string(),
                    secs,
                },
                None,
            )
        } else {
            Fault::retry(
                RegistryError::Connect {
                    at,
                    endpoint: endpoint.to_string(),
                    reason: crate::error_chain(&e).replace('\n', " "),
                },
                None,
            )
        }
    }
}

async fn outcome_fut<T>(
    f: impl std::future::Future<Output = Result<T, Fault>>,
) -> Outcome<T, RegistryError> {
    outcome(f.await)
}

fn sensitive(s: &str) -> Option<HeaderValue> {
    let mut v = HeaderValue::from_str(s).ok()?;
    v.set_sensitive(true);
    Some(v)
}

fn basic_header(c: &Credentials) -> Option<HeaderValue> {
    use base64::Engine as _;
    let raw = format!("{}:{}", c.username, c.password);
    sensitive(&format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    ))
}

fn host_port(u: &Url) -> String {
    match (u.host_str(), u.port()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_string(),
        _ => String::new(),
    }
}

fn media_type_of(resp: &reqwest::Response) -> Option<String> {
    resp.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or(v).trim().to_ascii_lowercase())
        .filter(|v| !v.is_empty())
}

fn retry_after(resp: &reqwest::Response, now: std::time::SystemTime) -> Option<Duration> {
    resp.headers()
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| retry::parse_retry_after(v, now))
}

/// Turns an unwanted status into the error users can act on; 429 and 5xx are worth retrying.
fn check_status(
    at: &At,
    resp: &reqwest::Response,
    now: std::time::SystemTime,
) -> Result<(), Fault> {
    let status = resp.status();
    if status.is_success() {
        return Ok(());
    }
    let at = Box::new(at.clone());
    Err(match status {
        StatusCode::NOT_FOUND => Fault::fatal(RegistryError::NotFound { at }),
        StatusCode::UNAUTHORIZED => Fault::fatal(RegistryError::Unauthorized { at }),
        StatusCode::FORBIDDEN => Fault::fatal(RegistryError::Denied { at }),
        s if s == StatusCode::TOO_MANY_REQUESTS || s.is_server_error() => {
            let after = retry_after(resp, now);
            Fault::retry(
                RegistryError::Status {
                    at,
                    status: s.as_u16(),
                    detail: if s == StatusCode::TOO_MANY_REQUESTS {
                        " (too many requests) after every retry; try again later".into()
                    } else {
                        " (server error) after every retry; the registry is failing".into()
                    },
                },
                after,
            )
        }
        s => Fault::fatal(RegistryError::Status {
            at,
            status: s.as_u16(),
            detail: String::new(),
        }),
    })
}

/// `bytes N-M/T` → N.
fn content_range_start(v: &str) -> Option<u64> {
    let range = v.trim().strip_prefix("bytes")?.trim_start();
    let (start, _) = range.split_once('-')?;
    start.trim().parse().ok()
}

async fn next_chunk(
    resp: &mut reqwest::Response,
    at: &At,
    base: &Url,
    read_timeout: Duration,
) -> Result<Option<bytes::Bytes>, Fault> {
    resp.chunk().await.map_err(|e| {
        let at = Box::new(at.clone());
        let endpoint = host_port(base);
        if e.is_timeout() {
            Fault::retry(
                RegistryError::Timeout {
                    at,
                    endpoint,
                    secs: read_timeout.as_secs(),
                },
                None,
            )
        } else {
            Fault::retry(
                RegistryError::Connect {
                    at,
                    endpoint,
                    reason: format!(
                        "the connection broke mid-transfer: {}",
                        crate::error_chain(&e).replace('\n', " ")
                    ),
                },
                None,
            )
        }
    })
}

/// Reads a whole body, refusing it as soon as it passes `limit` (Content-Length is not trusted for this).
async fn read_capped(
    resp: &mut reqwest::Response,
    at: &At,
    base: &Url,
    limit: u64,
    read_timeout: Duration,
) -> Result<Vec<u8>, Fault> {
    let too_large = || {
        Fault::fatal(RegistryError::ManifestTooLarge {
            at: Box::new(at.clone()),
            limit,
        })
    };
    if resp.content_length().is_some_and(|l| l > limit) {
        return Err(too_large());
    }
    let mut out = Vec::new();
    while let Some(chunk) = next_chunk(resp, at, base, read_timeout).await? {
        if out.len() as u64 + chunk.len() as u64 > limit {
            return Err(too_large());
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// Decides the manifest's kind from Content-Type and the body's own `mediaType`, refusing schema 1 and anything
/// unknown, then parses it.
fn parse_manifest(
    at: &At,
    content_type: Option<&str>,
    bytes: &[u8],
) -> Result<(ManifestKind, ManifestContent), RegistryError> {
    let malformed = |reason: String| RegistryError::Malformed {
        at: Box::new(at.clone()),
        reason,
    };
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| malformed(format!("the manifest is not JSON: {e}")))?;
    let obj = value
        .as_object()
        .ok_or_else(|| malformed("the manifest is not a JSON object".into()))?;
    if obj.get("schemaVersion").and_then(|v| v.as_u64()) == Some(1) {
        return Err(RegistryError::Schema1 {
            at: Box::new(at.clone()),
        });
    }
    let declared = obj.get("mediaType").and_then(|v| v.as_str());
    if let Some(d) = declared {
        if SCHEMA1.contains(&d) {
            return Err(RegistryError::Schema1 {
                at: Box::new(at.clone()),
            });
        }
    }
    let from_header = content_type.and_then(ManifestKind::from_media_type);
    let kind = match (from_header, declared) {
        (Some(h), Some(d)) if d != h.media_type() => {
            return Err(malformed(format!(
                "Content-Type says {} but the manifest says {d}",
                h.media_type()
            )));
        }
        (Some(h), _) => h,
        (None, Some(d)) => {
            ManifestKind::from_media_type(d).ok_or_else(|| RegistryError::UnsupportedMediaType {
                at: Box::new(at.clone()),
                media_type: d.to_string(),
                hint: "",
            })?
        }
        // OCI allows leaving mediaType out; the shape tells.
        (None, None) if obj.contains_key("manifests") => ManifestKind::OciIndex,
        (None, None) if obj.contains_key("layers") => ManifestKind::OciManifest,
        (None, None) => {
            return Err(malformed(
                "no media type in the answer or the manifest, and it has neither manifests nor layers".into(),
            ));
        }
    };
    let content = if kind.is_index() {
        ManifestContent::Index(
            serde_json::from_value(value)
                .map_err(|e| malformed(format!("not a valid image index: {e}")))?,
        )
    } else {
        ManifestContent::Image(
            serde_json::from_value(value)
                .map_err(|e| malformed(format!("not a valid image manifest: {e}")))?,
        )
    };
    Ok((kind, content))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at() -> At {
        At {
            registry: "r.io".into(),
            repository: "app".into(),
            step: Step::Manifest("latest".into()),
        }
    }

    #[test]
    fn manifest_kinds() {
        let index = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;
        let (k, c) = parse_manifest(&at(), Some(OCI_INDEX), index).unwrap();
        assert_eq!(k, ManifestKind::OciIndex);
        assert!(matches!(c, ManifestContent::Index(_)));
        // No mediaType anywhere: the shape decides.
        let (k, _) = parse_manifest(
            &at(),
            Some("application/json"),
            br#"{"schemaVersion":2,"manifests":[]}"#,
        )
        .unwrap();
        assert_eq!(k, ManifestKind::OciIndex);
        let s1 = br#"{"schemaVersion":1,"name":"x","tag":"y","fsLayers":[]}"#;
        let err = parse_manifest(&at(), None, s1).unwrap_err().to_string();
        assert!(err.contains("schema 1 manifests are deprecated"), "{err}");
        let err = parse_manifest(&at(), Some(OCI_MANIFEST), index)
            .unwrap_err()
            .to_string();
        assert!(err.contains("Content-Type says"), "{err}");
        let err = parse_manifest(
            &at(),
            None,
            br#"{"mediaType":"application/x-weird","layers":[]}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("application/x-weird") && err.contains("r.io"),
            "{err}"
        );
        let err = parse_manifest(&at(), Some(OCI_INDEX), b"<html>")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("not JSON") && err.contains("fetching manifest latest"),
            "{err}"
        );
        let err = parse_manifest(&at(), Some(OCI_INDEX), br#"{"manifests": 7}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a valid image index"), "{err}");
    }

    #[test]
    fn content_range() {
        assert_eq!(content_range_start("bytes 100-199/200"), Some(100));
        assert_eq!(content_range_start("bytes 0-0/*"), Some(0));
        assert_eq!(content_range_start("bytes */200"), None);
        assert_eq!(content_range_start("items 1-2/3"), None);
    }

    #[test]
    fn tags_for_signatures() {
        let d = Digest::sha256_of(b"");
        assert_eq!(
            cosign_signature_tag(&d),
            "sha256-e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855.sig"
        );
        assert_eq!(
            referrers_fallback_tag(&d),
            "sha256-e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    /// The pull orchestration runs fetches in spawned tasks, so the futures must be `Send`.
    #[test]
    fn futures_are_send() {
        fn send<T: Send>(_: T) {}
        let client = RegistryClient::new(&Config::default(), &[]).unwrap();
        let r: Reference = "alpine".parse().unwrap();
        let blob = BlobSpec {
            digest: Digest::sha256_of(b""),
            size: 0,
        };
        send(client.fetch_manifest(&r));
        send(client.fetch_referrers(r.repository(), &blob.digest, None));
        send(client.fetch_blob_bytes(r.repository(), &blob, 1));
        send(client.fetch_blob(r.repository(), &blob, Path::new("/nonexistent"), &|_, _| {}));
    }
}
