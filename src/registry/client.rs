//! The client: endpoints (mirrors, then the registry), and the public fetches, each retried per endpoint.
//! `transport` does one request with authentication and redirects, `manifests` and `blobs` the two kinds of content.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use url::Url;

use super::auth::TokenCache;
use super::credentials::{CredentialStore, Credentials};
use super::dns::SystemResolver;
use super::manifests::{Manifest, ManifestContent};
use super::reference::{Reference, Repository, api_host};
use super::retry::{self, RetryPolicy, TokenBucket};
use super::transport::{Fault, outcome_fut};
use super::{At, RegistryError, Step, tls};
use crate::clock::{Clock, SystemClock};
use crate::config::{Config, RegistryConfig};
use crate::digest::{Digest, Verifier};

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
pub(super) struct Endpoint {
    /// `host[:port]` the requests go to.
    pub(super) host: String,
    /// `https://host/` or, for insecure ones, `http://host/`.
    pub(super) base: Url,
    /// Credentials of this endpoint (looked up under the registry's own name for the registry itself).
    pub(super) credentials: Option<Credentials>,
    pub(super) http: reqwest::Client,
}

/// A pull-side registry client; cheap to clone and share between parallel downloads.
#[derive(Clone)]
pub struct RegistryClient {
    pub(super) inner: Arc<Inner>,
}

pub(super) struct Inner {
    pub(super) options: ClientOptions,
    pub(super) registries: HashMap<String, RegistryConfig>,
    pub(super) credentials: CredentialStore,
    pub(super) default_http: reqwest::Client,
    /// Clients for registries with their own CA bundle.
    pub(super) http_by_host: HashMap<String, reqwest::Client>,
    pub(super) tokens: TokenCache,
    /// Endpoints that asked for Basic auth; they get it up front from then on.
    pub(super) basic_hosts: Mutex<HashSet<String>>,
    pub(super) bucket: Option<TokenBucket>,
    pub(super) clock: Arc<dyn Clock>,
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

    pub(super) fn is_insecure(&self, host: &str) -> bool {
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

    pub(super) fn at(&self, repo: &Repository, step: Step) -> At {
        At {
            registry: repo.registry().to_string(),
            repository: repo.path().to_string(),
            step,
        }
    }

    pub(super) fn url(&self, ep: &Endpoint, at: &At, tail: &str) -> Result<Url, Fault> {
        ep.base
            .join(&format!("v2/{}/{tail}", at.repository))
            .map_err(|e| {
                Fault::fatal(RegistryError::HttpClient(format!(
                    "cannot build a URL for {}: {e}",
                    at.repository
                )))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
