//! Which signature policy governs a repository, and whether an image passes it.
//!
//! A policy's `scope` is a registry (`ghcr.io`) or a repository prefix (`ghcr.io/org`); it matches a repository
//! (`registry/namespace/repo`) equal to it or below it at a `/` boundary, so `ghcr.io/org` covers `ghcr.io/org/app`
//! but not `ghcr.io/organisation/app`. The scope `*` matches every repository, below every other scope: with
//! `mode = "require"` it makes signatures required for everything. The longest matching scope wins; a repository no
//! scope matches is `off`.

use super::{TrustedKey, Verified, VerifyError, load_key, mode_name};
use crate::config::{SignatureMode, SignaturePolicyConfig};
use crate::digest::Digest;

/// Whether `scope` covers `repository` at a path-segment boundary.
pub fn scope_matches(scope: &str, repository: &str) -> bool {
    if scope == "*" {
        return true;
    }
    let scope = scope.trim_end_matches('/');
    !scope.is_empty()
        && repository
            .strip_prefix(scope)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// The configured policy with the longest scope matching `repository`.
pub fn matching_policy<'a>(
    policies: &'a [SignaturePolicyConfig],
    repository: &str,
) -> Option<&'a SignaturePolicyConfig> {
    policies
        .iter()
        .filter(|p| scope_matches(&p.scope, repository))
        .max_by_key(|p| match p.scope.as_str() {
            "*" => 0,
            scope => scope.trim_end_matches('/').len() + 1,
        })
}

/// A policy ready to apply: mode and loaded keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The scope that matched; `None` when no policy covers the repository.
    pub scope: Option<String>,
    pub mode: SignatureMode,
    pub keys: Vec<TrustedKey>,
}

/// Why an image was accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acceptance {
    Verified(Verified),
    /// `if-present` and the image carries no signature.
    Unsigned,
    /// `off`: signatures were not looked at.
    NotChecked,
}

impl Policy {
    /// Picks the policy for `repository` and loads its keys (reading the PEM files it names).
    pub fn for_repository(
        policies: &[SignaturePolicyConfig],
        repository: &str,
    ) -> Result<Policy, VerifyError> {
        let Some(config) = matching_policy(policies, repository) else {
            return Ok(Policy {
                scope: None,
                mode: SignatureMode::Off,
                keys: Vec::new(),
            });
        };
        Policy::from_config(config)
    }

    /// Builds a policy from its configuration, reading its key files; `off` reads none.
    pub fn from_config(config: &SignaturePolicyConfig) -> Result<Policy, VerifyError> {
        if config.mode == SignatureMode::Off {
            return Ok(Policy {
                scope: Some(config.scope.clone()),
                mode: SignatureMode::Off,
                keys: Vec::new(),
            });
        }
        if config.public_keys.is_empty() {
            return Err(VerifyError::NoKeys {
                scope: config.scope.clone(),
                mode: mode_name(config.mode).to_string(),
            });
        }
        let keys = config
            .public_keys
            .iter()
            .map(|p| load_key(p))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Policy {
            scope: Some(config.scope.clone()),
            mode: config.mode,
            keys,
        })
    }

    /// Whether signatures must be fetched and verified at all; `off` never looks.
    pub fn needs_signatures(&self) -> bool {
        self.mode != SignatureMode::Off
    }

    /// Decides from the outcome of verifying every signature found for `repository@digest` (an empty slice: none
    /// found). Bundles that turned out to be attestations ([`VerifyError::NotASignature`]) count as not found.
    pub fn decide(
        &self,
        repository: &str,
        digest: &Digest,
        outcomes: &[Result<Verified, VerifyError>],
    ) -> Result<Acceptance, VerifyError> {
        if self.mode == SignatureMode::Off {
            return Ok(Acceptance::NotChecked);
        }
        if let Some(v) = outcomes.iter().find_map(|o| o.as_ref().ok()) {
            return Ok(Acceptance::Verified(v.clone()));
        }
        let errors: Vec<String> = outcomes
            .iter()
            .filter_map(|o| o.as_ref().err())
            .filter(|e| !matches!(e, VerifyError::NotASignature { .. }))
            .map(ToString::to_string)
            .collect();
        let image = format!("{repository}@{digest}");
        let scope = self.scope.clone().unwrap_or_default();
        if !errors.is_empty() {
            return Err(VerifyError::AllInvalid {
                image,
                scope,
                errors,
            });
        }
        match self.mode {
            SignatureMode::Require => Err(VerifyError::Unsigned { image, scope }),
            SignatureMode::IfPresent | SignatureMode::Off => Ok(Acceptance::Unsigned),
        }
    }
}
