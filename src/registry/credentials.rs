//! Registry credentials from the agent's configuration and from a Docker `config.json`.
//!
//! Nothing here prints a password: [`Credentials`] has a redacting `Debug` and no `Display`.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Deserialize;

use super::reference::DOCKER_HUB;
use crate::config::RegistryConfig;

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("cannot read credentials file {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("Docker config {path} is not valid: {reason}")]
    DockerConfig { path: PathBuf, reason: String },
    #[error(
        "registry {registry} in the configuration sets both password and password_file; keep one"
    )]
    TwoPasswords { registry: String },
    #[error("registry {registry} in the configuration has a password but no username")]
    NoUsername { registry: String },
}

#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Where a registry's credentials came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Config,
    DockerConfig(PathBuf),
}

/// Credentials by registry (`host[:port]`, `docker.io` for Docker Hub).
#[derive(Debug, Default, Clone)]
pub struct CredentialStore {
    by_registry: HashMap<String, (Credentials, Source)>,
}

impl CredentialStore {
    /// Entries of the agent's configuration win over those of the Docker config.
    pub fn load(
        registries: &[RegistryConfig],
        docker_config: Option<&Path>,
    ) -> Result<CredentialStore, CredentialsError> {
        let mut by_registry = HashMap::new();
        if let Some(path) = docker_config {
            let text = std::fs::read_to_string(path).map_err(|e| CredentialsError::Read {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
            for (registry, creds) in parse_docker_config(&text, path)? {
                by_registry.insert(registry, (creds, Source::DockerConfig(path.to_path_buf())));
            }
        }
        for r in registries {
            if let Some(creds) = from_registry_config(r)? {
                by_registry.insert(normalise_key(&r.host), (creds, Source::Config));
            }
        }
        Ok(CredentialStore { by_registry })
    }

    pub fn get(&self, registry: &str) -> Option<&(Credentials, Source)> {
        self.by_registry.get(registry)
    }
}

fn from_registry_config(r: &RegistryConfig) -> Result<Option<Credentials>, CredentialsError> {
    let password = match (&r.password, &r.password_file) {
        (Some(_), Some(_)) => {
            return Err(CredentialsError::TwoPasswords {
                registry: r.host.clone(),
            });
        }
        (Some(p), None) => Some(p.clone()),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path).map_err(|e| CredentialsError::Read {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            // Files written with `echo` end in a newline that is not part of the password.
            Some(text.trim_end_matches(['\r', '\n']).to_string())
        }
        (None, None) => None,
    };
    match (&r.username, password) {
        (Some(u), Some(p)) => Ok(Some(Credentials {
            username: u.clone(),
            password: p,
        })),
        (None, Some(_)) => Err(CredentialsError::NoUsername {
            registry: r.host.clone(),
        }),
        (_, None) => Ok(None),
    }
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, DockerAuth>,
}

#[derive(Deserialize)]
struct DockerAuth {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

/// `auths` of a Docker `config.json`, keyed by normalised registry. Entries without credentials (credential
/// helpers keep only an empty object there) are skipped.
pub fn parse_docker_config(
    text: &str,
    path: &Path,
) -> Result<Vec<(String, Credentials)>, CredentialsError> {
    let bad = |reason: String| CredentialsError::DockerConfig {
        path: path.to_path_buf(),
        reason,
    };
    let config: DockerConfig = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
    let mut out = Vec::new();
    for (key, entry) in config.auths {
        let creds = match (entry.auth.as_deref(), entry.username, entry.password) {
            (Some(auth), _, _) if !auth.is_empty() => {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(auth.trim())
                    .map_err(|_| bad(format!("the \"auth\" of {key:?} is not base64")))?;
                let decoded = String::from_utf8(decoded)
                    .map_err(|_| bad(format!("the \"auth\" of {key:?} is not UTF-8")))?;
                let (u, p) = decoded
                    .split_once(':')
                    .ok_or_else(|| bad(format!("the \"auth\" of {key:?} is not user:password")))?;
                Credentials {
                    username: u.to_string(),
                    password: p.to_string(),
                }
            }
            (_, Some(username), Some(password)) => Credentials { username, password },
            _ => continue,
        };
        out.push((normalise_key(&key), creds));
    }
    Ok(out)
}

/// `https://index.docker.io/v1/` → `docker.io`; `http://host:5000/v2/` → `host:5000`.
pub fn normalise_key(key: &str) -> String {
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = k.split('/').next().unwrap_or(k);
    match host {
        "index.docker.io" | "registry-1.docker.io" | "docker.io" => DOCKER_HUB.to_string(),
        h => h.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_config_forms() {
        let text = r#"{
            "auths": {
                "https://index.docker.io/v1/": {"auth": "aHViOnNlY3JldDpwYXJ0"},
                "registry.local:5000": {"username": "u", "password": "p"},
                "ghcr.io": {},
                "http://old.example:5000/v2/": {"auth": ""}
            },
            "credsStore": "desktop"
        }"#;
        let mut got = parse_docker_config(text, Path::new("c.json")).unwrap();
        got.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0, "docker.io");
        // The password itself may hold ':'.
        assert_eq!(got[0].1.password, "secret:part");
        assert_eq!(got[0].1.username, "hub");
        assert_eq!(got[1].0, "registry.local:5000");
    }

    #[test]
    fn bad_docker_config_is_named_without_leaking() {
        let err = parse_docker_config(
            r#"{"auths": {"r": {"auth": "!!"}}}"#,
            Path::new("/x/c.json"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("/x/c.json") && err.contains("not base64"),
            "{err}"
        );
        let err = parse_docker_config("{", Path::new("c.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("c.json"), "{err}");
    }

    #[test]
    fn debug_redacts_password() {
        let c = Credentials {
            username: "u".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
        let store = CredentialStore {
            by_registry: [("r".to_string(), (c, Source::Config))].into(),
        };
        assert!(!format!("{store:?}").contains("hunter2"));
    }

    #[test]
    fn config_wins_and_password_file_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let docker = dir.path().join("config.json");
        std::fs::write(&docker, r#"{"auths": {"r.io": {"username": "d", "password": "dp"}, "s.io": {"username": "s", "password": "sp"}}}"#).unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "filepw\n").unwrap();
        let regs = vec![RegistryConfig {
            host: "r.io".into(),
            username: Some("c".into()),
            password_file: Some(pw),
            ..Default::default()
        }];
        let store = CredentialStore::load(&regs, Some(&docker)).unwrap();
        let (c, src) = store.get("r.io").unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.as_str(), src),
            ("c", "filepw", &Source::Config)
        );
        assert_eq!(store.get("s.io").unwrap().0.password, "sp");
        assert!(store.get("t.io").is_none());

        let both = vec![RegistryConfig {
            host: "r.io".into(),
            username: Some("c".into()),
            password: Some("x".into()),
            password_file: Some(dir.path().join("pw")),
            ..Default::default()
        }];
        assert!(matches!(
            CredentialStore::load(&both, None),
            Err(CredentialsError::TwoPasswords { .. })
        ));
    }
}
