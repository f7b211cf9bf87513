//! The agent's configuration file (`/etc/flotilla/config.toml`).
//!
//! Unknown keys are refused rather than ignored: a misspelt `insecure = true` that silently did nothing would be a
//! security decision the user never made.

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/flotilla/config.toml";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/flotilla";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("configuration file {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where images and agent state live.
    pub state_dir: Option<PathBuf>,
    /// Overrides platform detection, like `--platform`.
    pub platform: Option<String>,
    /// Extra CA certificates (PEM) trusted for every registry, beside the system store.
    pub ca_bundle: Option<PathBuf>,
    /// A Docker `config.json` whose `auths` supply registry credentials.
    pub docker_config: Option<PathBuf>,
    #[serde(default)]
    pub pull: PullConfig,
    #[serde(default)]
    pub run: RunConfig,
    #[serde(default)]
    pub fleet: FleetConfig,
    /// What the device owner allows the fleet server to order (see [`crate::policy`]).
    #[serde(default)]
    pub policy: PolicyConfig,
    #[serde(default, rename = "registry")]
    pub registries: Vec<RegistryConfig>,
    #[serde(default, rename = "signature_policy")]
    pub signature_policies: Vec<SignaturePolicyConfig>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PullConfig {
    /// Layers downloaded at once.
    pub parallel_layers: usize,
    /// Attempts per request before giving up (429, 5xx and connection errors are retried).
    pub retries: u32,
    /// Download cap in bytes per second across all layers; none when unset.
    pub max_bytes_per_second: Option<u64>,
}

impl Default for PullConfig {
    fn default() -> PullConfig {
        PullConfig {
            parallel_layers: 3,
            retries: 5,
            max_bytes_per_second: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// The OCI runtime binary; crun and youki take the same command line as runc.
    pub runtime: PathBuf,
    /// Run images for another architecture when a binfmt handler for it is registered, like `--allow-emulation`.
    pub allow_emulation: bool,
}

impl Default for RunConfig {
    fn default() -> RunConfig {
        RunConfig {
            runtime: PathBuf::from("/usr/sbin/runc"),
            allow_emulation: false,
        }
    }
}

/// `[fleet]`: what `flotilla agent` needs to join a fleet server. Without `server`, the agent keeps the apps it
/// committed running and reports to nobody.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FleetConfig {
    /// `https://fleet.example:8470`. Plain `http://` only to loopback, or with `insecure`.
    pub server: Option<String>,
    /// Allow plain `http://` to a fleet server that is not on loopback (a network you trust); warned at every
    /// start.
    pub insecure: bool,
    /// A file holding the enrollment token, read once, at the first enrollment.
    pub token_file: PathBuf,
    /// The device's name in the fleet [default: the hostname].
    pub name: Option<String>,
    /// Tags rollouts select devices by: `tags = { site = "north", ring = "canary" }`.
    pub tags: std::collections::BTreeMap<String, String>,
    /// How long one long poll of the desired state may wait for a change.
    #[serde(deserialize_with = "duration")]
    pub poll_interval: std::time::Duration,
    /// How long a new release must stay up and healthy, without a restart, before it is committed.
    #[serde(deserialize_with = "duration")]
    pub probation: std::time::Duration,
    #[serde(deserialize_with = "duration")]
    pub heartbeat_interval: std::time::Duration,
}

impl Default for FleetConfig {
    fn default() -> FleetConfig {
        FleetConfig {
            server: None,
            insecure: false,
            token_file: PathBuf::from("/etc/flotilla/enroll-token"),
            name: None,
            tags: Default::default(),
            poll_interval: std::time::Duration::from_secs(30),
            probation: std::time::Duration::from_secs(30),
            heartbeat_interval: std::time::Duration::from_secs(60),
        }
    }
}

/// `[policy]`: the device owner's limits on what a fleet server may order. The server cannot change this file, so
/// a compromised server, or anyone holding its admin token, gets no further than the owner allows.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Host device nodes an app may be given, as globs (`/dev/i2c-*`); none by default.
    pub devices: Vec<String>,
    /// Host paths an app may bind-mount, as globs; a path below a matching directory is allowed too. Flotilla's
    /// own volumes directory is always allowed; nothing else by default.
    pub bind_paths: Vec<String>,
    /// Whether an app may share the host's network namespace (the default network of an app).
    pub host_network: bool,
    /// Registries (`host[:port]` as written in image references, globs) images may come from; any by default.
    pub registries: Vec<String>,
    /// Capabilities an app may add to the default set (`NET_RAW`, or `*` for any); none by default.
    pub capabilities: Vec<String>,
    /// Whether an app may run without the seccomp profile.
    pub seccomp_unconfined: bool,
    /// Whether an app may turn `no_new_privileges` off (setuid programs and file capabilities raise privileges).
    pub new_privileges: bool,
}

impl Default for PolicyConfig {
    fn default() -> PolicyConfig {
        PolicyConfig {
            devices: Vec::new(),
            bind_paths: Vec::new(),
            host_network: true,
            registries: vec!["*".to_string()],
            capabilities: Vec::new(),
            seccomp_unconfined: false,
            new_privileges: false,
        }
    }
}

/// `30s`, `5m`, `1h`: the same durations the command line takes.
fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<std::time::Duration, D::Error> {
    let text = String::deserialize(d)?;
    crate::app::parse_duration("duration", &text).map_err(serde::de::Error::custom)
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// `host[:port]` as written in image references (`docker.io` for Docker Hub).
    pub host: String,
    /// Plain HTTP for this registry.
    #[serde(default)]
    pub insecure: bool,
    /// Pull-through caches tried in order before `host`.
    #[serde(default)]
    pub mirrors: Vec<String>,
    /// CA certificates (PEM) trusted for this registry only.
    pub ca_bundle: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// A file holding the password, so the configuration itself can stay world-readable.
    pub password_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum SignatureMode {
    /// Refuse an image without a valid signature.
    Require,
    /// Check a signature when one exists; refuse an invalid one.
    IfPresent,
    #[default]
    Off,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SignaturePolicyConfig {
    /// A registry (`ghcr.io`) or repository prefix (`ghcr.io/org/app`); the longest matching scope wins.
    pub scope: String,
    pub mode: SignatureMode,
    /// cosign public keys (PEM, ECDSA P-256); any one of them may sign.
    #[serde(default)]
    pub public_keys: Vec<PathBuf>,
}

impl Config {
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            source: Box::new(e),
        })
    }

    /// Reads the file at `path`; a missing file at the default path is an empty configuration, a missing file the
    /// user named is an error.
    pub fn load(path: &Path, must_exist: bool) -> Result<Config, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Config::parse(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => {
                Ok(Config::default())
            }
            Err(source) => Err(ConfigError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_example_parses() {
        let text = r#"
            state_dir = "/data/flotilla"
            platform = "linux/arm/v6"
            docker_config = "/root/.docker/config.json"
            [run]
            runtime = "/usr/bin/crun"
            allow_emulation = true
            [pull]
            parallel_layers = 2
            max_bytes_per_second = 1048576
            [[registry]]
            host = "registry.local:5000"
            insecure = true
            mirrors = ["mirror.local:5000"]
            [[signature_policy]]
            scope = "ghcr.io/org"
            mode = "if-present"
            public_keys = ["/etc/flotilla/cosign.pub"]
        "#;
        let c = Config::parse(text, Path::new("t.toml")).unwrap();
        assert_eq!(c.pull.parallel_layers, 2);
        assert_eq!(c.run.runtime, PathBuf::from("/usr/bin/crun"));
        assert!(c.run.allow_emulation);
        assert_eq!(c.pull.retries, 5);
        assert!(c.registries[0].insecure);
        assert_eq!(c.signature_policies[0].mode, SignatureMode::IfPresent);
    }

    #[test]
    fn misspelt_key_is_refused() {
        let err = Config::parse(
            "[[registry]]\nhost = \"x\"\ninsecur = true\n",
            Path::new("t.toml"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("insecur"), "{err}");
    }

    #[test]
    fn missing_default_file_is_empty() {
        let c = Config::load(Path::new("/nonexistent/flotilla.toml"), false).unwrap();
        assert_eq!(c, Config::default());
        assert!(Config::load(Path::new("/nonexistent/flotilla.toml"), true).is_err());
    }
}
