//! The OCI distribution client, pull side: references, manifests, blobs, referrers, authentication, retries.
//!
//! [`RegistryClient`] is the one entry point; everything it fetches is checked against a digest before it is
//! handed out, and every failure is a [`RegistryError`] that names the registry, the repository and the step.

pub mod auth;
mod blobs;
pub mod client;
pub mod credentials;
pub mod dns;
mod manifests;
pub mod mdns;
pub mod reference;
pub mod retry;
pub mod tls;
mod transport;

use std::fmt;
use std::path::PathBuf;

pub use client::{
    BlobSpec, ClientOptions, RegistryClient, cosign_signature_tag, referrers_fallback_tag,
};
pub use credentials::{Credentials, CredentialsError};
pub use manifests::{Manifest, ManifestContent, ManifestKind};
pub use reference::{Reference, ReferenceError, Repository};
pub use retry::RetryPolicy;

use crate::digest::Digest;

/// What the client was doing when something failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Manifest(String),
    Blob(Digest),
    Referrers(Digest),
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Manifest(r) => write!(f, "fetching manifest {r}"),
            Step::Blob(d) => write!(f, "fetching blob {d}"),
            Step::Referrers(d) => write!(f, "listing referrers of {d}"),
        }
    }
}

/// Where a failure happened: registry (as the user named it), repository path, step. Boxed in the error so a
/// `Result` stays small on the hot path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct At {
    pub registry: String,
    pub repository: String,
    pub step: Step,
}

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (repository {}, {})",
            self.registry, self.repository, self.step
        )
    }
}

const CONFIG_HINT: &str = "/etc/flotilla/config.toml or ~/.docker/config.json";

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
    #[error("CA bundle {path}: {reason}")]
    CaBundle { path: PathBuf, reason: String },
    #[error("cannot set up the HTTP client: {0}")]
    HttpClient(String),
    #[error(
        "{at}: cannot reach {endpoint}: {reason}; check the network and that the registry is running"
    )]
    Connect {
        at: Box<At>,
        endpoint: String,
        reason: String,
    },
    #[error(
        "{at}: {endpoint} did not answer within {secs} s; check the network, or whether the server hangs"
    )]
    Timeout {
        at: Box<At>,
        endpoint: String,
        secs: u64,
    },
    #[error("{at}: the registry answered HTTP {status}{detail}")]
    Status {
        at: Box<At>,
        status: u16,
        detail: String,
    },
    #[error(
        "401 from {} for repository {} ({}): check the credentials for {} in {CONFIG_HINT}",
        .at.registry, .at.repository, .at.step, .at.registry
    )]
    Unauthorized { at: Box<At> },
    #[error(
        "403 from {} for repository {} ({}): the account may not pull it; check the repository name and its permissions",
        .at.registry, .at.repository, .at.step
    )]
    Denied { at: Box<At> },
    #[error("{at}: not found; check the image name, tag or digest")]
    NotFound { at: Box<At> },
    #[error("{at}: token endpoint {realm} failed: {reason}")]
    Token {
        at: Box<At>,
        realm: String,
        reason: String,
    },
    #[error(
        "{at}: it is a schema 1 manifest; schema 1 manifests are deprecated; push the image again with a current tool"
    )]
    Schema1 { at: Box<At> },
    #[error(
        "{at}: the registry answered with media type {media_type:?}, which is not a manifest flotilla accepts (OCI index or manifest, Docker manifest list or schema 2){hint}"
    )]
    UnsupportedMediaType {
        at: Box<At>,
        media_type: String,
        hint: &'static str,
    },
    #[error(
        "{at}: the manifest is larger than {limit} bytes; refused (a real manifest is far smaller)"
    )]
    ManifestTooLarge { at: Box<At>, limit: u64 },
    #[error("{at}: malformed answer: {reason}")]
    Malformed { at: Box<At>, reason: String },
    #[error(
        "{at}: digest mismatch: expected {expected}, got {actual}; the content was corrupted in the registry or on the way, and nothing was kept"
    )]
    DigestMismatch {
        at: Box<At>,
        expected: Digest,
        actual: Digest,
    },
    #[error(
        "{at}: the descriptor says {expected} bytes but the registry sent {got}; refused and nothing was kept"
    )]
    SizeMismatch {
        at: Box<At>,
        expected: u64,
        got: String,
    },
    #[error(
        "{at}: more than {limit} redirects (last to {last}); the registry or a proxy in front of it loops"
    )]
    TooManyRedirects {
        at: Box<At>,
        limit: u32,
        last: String,
    },
    #[error("{at}: refused redirect to {location}: {reason}")]
    BadRedirect {
        at: Box<At>,
        location: String,
        reason: String,
    },
    #[error("{at}: {path}: {source}")]
    Io {
        at: Box<At>,
        path: PathBuf,
        source: std::io::Error,
    },
}

impl RegistryError {
    /// The registry says the manifest, tag or blob does not exist (as opposed to any failure to ask).
    pub fn is_not_found(&self) -> bool {
        matches!(self, RegistryError::NotFound { .. })
    }

    /// Where it happened, for errors that happened while talking to a registry.
    pub fn at(&self) -> Option<&At> {
        use RegistryError::*;
        match self {
            Reference(_) | Credentials(_) | CaBundle { .. } | HttpClient(_) => None,
            Connect { at, .. }
            | Timeout { at, .. }
            | Status { at, .. }
            | Unauthorized { at }
            | Denied { at }
            | NotFound { at }
            | Token { at, .. }
            | Schema1 { at }
            | UnsupportedMediaType { at, .. }
            | ManifestTooLarge { at, .. }
            | Malformed { at, .. }
            | DigestMismatch { at, .. }
            | SizeMismatch { at, .. }
            | TooManyRedirects { at, .. }
            | BadRedirect { at, .. }
            | Io { at, .. } => Some(at),
        }
    }
}
