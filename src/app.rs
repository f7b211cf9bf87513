//! How an app runs: the settings `flotilla run` takes on its command line and the fleet stores per app.
//!
//! One type for both, serialised into each container's state, so a container started by hand and one started by
//! the agent are described (and restarted, and health-checked) the same way.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    #[error("--env {0:?}: write NAME=VALUE")]
    Env(String),
    #[error(
        "--volume {0:?}: write NAME:/path in the container (a named volume) or /host/path:/path (a bind mount), \
         optionally followed by :ro"
    )]
    Volume(String),
    #[error("--device {0:?}: write the device's absolute path, such as /dev/i2c-1")]
    Device(String),
    #[error("--restart {0:?}: write no, always, on-failure or on-failure:N")]
    Restart(String),
    #[error("{what} {value:?}: write a number with an optional unit: k, m or g (64m)")]
    Size { what: &'static str, value: String },
    #[error(
        "{what} {value:?}: write a number of seconds, or a number with a unit: ms, s, m, h or d (1m30s is not read)"
    )]
    Duration { what: &'static str, value: String },
    #[error("--cpus {0:?}: write a positive number of CPUs, such as 0.5 or 2")]
    Cpus(String),
    #[error("--health-cmd is empty")]
    HealthCmd,
    #[error("--network {0:?}: write host or none")]
    Network(String),
    /// A setting out of bounds or malformed, named by its path in the settings (`health.interval`), as the API and
    /// the agent see them.
    #[error("{field}: {problem}")]
    Field { field: String, problem: String },
    #[error(
        "--cap-add {0:?}: not a Linux capability; write its name in upper case without CAP_, such as NET_RAW or \
         SYS_PTRACE"
    )]
    Capability(String),
    #[error(
        "--security-opt {0:?}: write seccomp=unconfined, seccomp=default, no-new-privileges=false or \
         no-new-privileges=true"
    )]
    SecurityOpt(String),
    #[error("--userns {0:?}: write host or auto")]
    Userns(String),
}

/// The longest stop grace period: a stop (an update, a shutdown) must never wait longer than this on one app.
pub const MAX_STOP_GRACE: Duration = Duration::from_secs(3600);
/// The longest health interval, timeout and start period.
pub const MAX_HEALTH_PERIOD: Duration = Duration::from_secs(24 * 3600);
/// The most CPUs a limit may name: the CFS quota (`cpus × 100 ms`) must stay far inside an i64 of microseconds.
const MAX_CPUS: f64 = 1024.0;

/// An app's run settings. Every field has a default, so a stored older form still reads.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunSettings {
    /// `NAME=VALUE`, added to (and overriding) the image's Env.
    pub env: Vec<String>,
    pub volumes: Vec<Volume>,
    /// Host device nodes passed through by path, each with a cgroup rule allowing it.
    pub devices: Vec<PathBuf>,
    pub restart: RestartPolicy,
    pub health: Option<HealthCheck>,
    /// Mount the root filesystem read-only (volumes and /run stay writable).
    pub read_only: bool,
    /// Memory limit in bytes.
    pub memory: Option<u64>,
    /// CPU limit in CPUs (a CFS quota over a 100 ms period).
    pub cpus: Option<f64>,
    /// Maximum number of processes.
    pub pids: Option<i64>,
    pub hostname: Option<String>,
    pub network: Network,
    /// `uid[:gid]` or `name[:group]`, overriding the image's User.
    pub user: Option<String>,
    /// Replaces the image's Cmd (the Entrypoint stays).
    pub command: Vec<String>,
    /// Time between SIGTERM and SIGKILL on stop; absent, the same 10 s as the command line's default.
    #[serde(with = "seconds", default = "default_stop_grace")]
    pub stop_grace: Duration,
    /// Run an image for another architecture through a registered binfmt handler.
    pub allow_emulation: bool,
    /// Capabilities added to the default set, by name without `CAP_` (`NET_RAW`). The seccomp profile then also
    /// allows the syscalls each of them gates (`SYS_PTRACE`: `ptrace`).
    #[serde(deserialize_with = "capability_names")]
    pub cap_add: Vec<String>,
    pub seccomp: SeccompMode,
    /// Lets a setuid program or file capabilities raise the container's privileges (`no_new_privileges` off).
    pub allow_new_privileges: bool,
    pub userns: UsernsMode,
}

fn default_stop_grace() -> Duration {
    RunSettings::DEFAULT_STOP_GRACE
}

impl RunSettings {
    pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);

    pub fn new() -> RunSettings {
        RunSettings {
            stop_grace: RunSettings::DEFAULT_STOP_GRACE,
            ..RunSettings::default()
        }
    }

    /// The checks the command line's parsers make, applied to settings that arrived any other way (the API's JSON,
    /// a desired state from the server, a stored container), plus the bounds that keep time arithmetic finite.
    /// The server runs it before it stores an app, and the agent again before it prepares a release: it never
    /// trusts the server to have done so.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let field = |field: String, problem: &str| SettingsError::Field {
            field,
            problem: problem.to_string(),
        };
        for (i, e) in self.env.iter().enumerate() {
            if parse_env(e).is_err() {
                return Err(field(format!("env[{i}]"), "write NAME=VALUE"));
            }
        }
        for (i, v) in self.volumes.iter().enumerate() {
            match &v.source {
                VolumeSource::Named(name) if !is_volume_name(name) => {
                    return Err(field(
                        format!("volumes[{i}].source.named"),
                        "a volume name is letters, digits, '-', '_' and '.', and does not start with '.'",
                    ));
                }
                VolumeSource::Bind(path) if !is_plain_absolute(&path.to_string_lossy()) => {
                    return Err(field(
                        format!("volumes[{i}].source.bind"),
                        "write an absolute host path without '..'",
                    ));
                }
                _ => {}
            }
            if !is_plain_absolute(&v.target) {
                return Err(field(
                    format!("volumes[{i}].target"),
                    "write an absolute path in the container without '..'",
                ));
            }
        }
        for (i, d) in self.devices.iter().enumerate() {
            let text = d.to_string_lossy();
            if parse_device(&text).is_err() || !is_plain_absolute(&text) {
                return Err(field(
                    format!("devices[{i}]"),
                    "write the device's absolute path under /dev, such as /dev/i2c-1",
                ));
            }
        }
        if self.stop_grace > MAX_STOP_GRACE {
            return Err(field("stop_grace".into(), "at most 3600 s (1 h)"));
        }
        if let Some(h) = &self.health {
            h.validate()?;
        }
        if self.memory == Some(0) {
            return Err(field(
                "memory".into(),
                "a limit of 0 bytes: leave it out for none",
            ));
        }
        if let Some(c) = self.cpus {
            if !(c.is_finite() && c > 0.0 && c <= MAX_CPUS) {
                return Err(field(
                    "cpus".into(),
                    "a number of CPUs above 0 and at most 1024",
                ));
            }
        }
        if self.pids.is_some_and(|p| p <= 0) {
            return Err(field("pids".into(), "a positive number of processes"));
        }
        if let Some(h) = &self.hostname {
            if !is_hostname(h) {
                return Err(field(
                    "hostname".into(),
                    "letters, digits, '-' and '.', at most 253 characters, labels of 1 to 63",
                ));
            }
        }
        if let Some(u) = &self.user {
            if u.is_empty() || u.contains('\0') || u.split(':').count() > 2 {
                return Err(field("user".into(), "write uid[:gid] or name[:group]"));
            }
        }
        for (i, a) in self.command.iter().enumerate() {
            if a.contains('\0') {
                return Err(field(format!("command[{i}]"), "contains a NUL byte"));
            }
        }
        Ok(())
    }
}

fn is_volume_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Absolute, with no `..` component and no NUL: what a mount target or source may be.
fn is_plain_absolute(path: &str) -> bool {
    path.starts_with('/') && !path.contains('\0') && !path.split('/').any(|c| c == "..")
}

fn is_hostname(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Network {
    /// The host's network namespace: an edge app talks to the LAN and local devices as the host does.
    #[default]
    Host,
    /// A private namespace with only loopback.
    None,
}

impl FromStr for Network {
    type Err = SettingsError;
    fn from_str(s: &str) -> Result<Network, SettingsError> {
        match s {
            "host" => Ok(Network::Host),
            "none" => Ok(Network::None),
            other => Err(SettingsError::Network(other.to_string())),
        }
    }
}

/// The container's seccomp filter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SeccompMode {
    /// flotilla's allow-list (`src/runtime/seccomp/default.json`), widened by the added capabilities.
    #[default]
    Default,
    /// No filter: every syscall the capabilities allow.
    Unconfined,
}

/// The container's user namespace.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UsernsMode {
    /// The host's: the container's root is the host's root, held in by capabilities, seccomp and namespaces.
    #[default]
    Host,
    /// A private user namespace with its own range of host ids. Not available yet (see
    /// `runtime::bundle`), so a container asking for it is refused.
    Auto,
}

impl FromStr for UsernsMode {
    type Err = SettingsError;
    fn from_str(s: &str) -> Result<UsernsMode, SettingsError> {
        match s {
            "host" => Ok(UsernsMode::Host),
            "auto" => Ok(UsernsMode::Auto),
            other => Err(SettingsError::Userns(other.to_string())),
        }
    }
}

/// One `--security-opt`, as Docker writes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecurityOpt {
    Seccomp(SeccompMode),
    NoNewPrivileges(bool),
}

impl FromStr for SecurityOpt {
    type Err = SettingsError;
    fn from_str(s: &str) -> Result<SecurityOpt, SettingsError> {
        // Docker also takes `:` as the separator (its older form).
        let (key, value) = s
            .split_once(['=', ':'])
            .map_or((s, None), |(k, v)| (k, Some(v)));
        match (key, value) {
            ("seccomp", Some("unconfined")) => Ok(SecurityOpt::Seccomp(SeccompMode::Unconfined)),
            ("seccomp", Some("default")) => Ok(SecurityOpt::Seccomp(SeccompMode::Default)),
            ("no-new-privileges", None | Some("true")) => Ok(SecurityOpt::NoNewPrivileges(true)),
            ("no-new-privileges", Some("false")) => Ok(SecurityOpt::NoNewPrivileges(false)),
            _ => Err(SettingsError::SecurityOpt(s.to_string())),
        }
    }
}

/// Every Linux capability, by its name without `CAP_`, as `--cap-add` takes them.
pub const CAPABILITIES: [&str; 41] = [
    "AUDIT_CONTROL",
    "AUDIT_READ",
    "AUDIT_WRITE",
    "BLOCK_SUSPEND",
    "BPF",
    "CHECKPOINT_RESTORE",
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "IPC_LOCK",
    "IPC_OWNER",
    "KILL",
    "LEASE",
    "LINUX_IMMUTABLE",
    "MAC_ADMIN",
    "MAC_OVERRIDE",
    "MKNOD",
    "NET_ADMIN",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_RAW",
    "PERFMON",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_CHROOT",
    "SYS_MODULE",
    "SYS_NICE",
    "SYS_PACCT",
    "SYS_PTRACE",
    "SYS_RAWIO",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "SYSLOG",
    "WAKE_ALARM",
];

/// A capability name for `--cap-add`: upper case, without `CAP_`, one of [`CAPABILITIES`].
pub fn parse_capability(s: &str) -> Result<String, SettingsError> {
    if CAPABILITIES.contains(&s) {
        Ok(s.to_string())
    } else {
        Err(SettingsError::Capability(s.to_string()))
    }
}

/// `cap_add` from stored or received settings gets the command line's check.
fn capability_names<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let names = Vec::<String>::deserialize(d)?;
    for n in &names {
        parse_capability(n).map_err(serde::de::Error::custom)?;
    }
    Ok(names)
}

/// A named volume (under the state directory, kept across updates) or a bind mount of a host path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Volume {
    pub source: VolumeSource,
    /// Absolute path inside the container.
    pub target: String,
    #[serde(default)]
    pub read_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VolumeSource {
    Named(String),
    Bind(PathBuf),
}

impl FromStr for Volume {
    type Err = SettingsError;
    fn from_str(s: &str) -> Result<Volume, SettingsError> {
        let bad = || SettingsError::Volume(s.to_string());
        let mut parts = s.split(':');
        let (source, target) = match (parts.next(), parts.next()) {
            (Some(a), Some(b)) if !a.is_empty() && b.starts_with('/') => (a, b),
            _ => return Err(bad()),
        };
        let read_only = match parts.next() {
            None | Some("rw") => false,
            Some("ro") => true,
            Some(_) => return Err(bad()),
        };
        if parts.next().is_some() || target.split('/').any(|c| c == "..") {
            return Err(bad());
        }
        let source = if source.starts_with('/') {
            VolumeSource::Bind(PathBuf::from(source))
        } else if is_volume_name(source) {
            VolumeSource::Named(source.to_string())
        } else {
            return Err(bad());
        };
        Ok(Volume {
            source,
            target: target.to_string(),
            read_only,
        })
    }
}

/// When the supervisor starts a container again after its process ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "policy")]
pub enum RestartPolicy {
    #[default]
    No,
    Always,
    /// After a non-zero exit, at most `max_retries` times in a row when set.
    OnFailure {
        max_retries: Option<u32>,
    },
}

impl FromStr for RestartPolicy {
    type Err = SettingsError;
    fn from_str(s: &str) -> Result<RestartPolicy, SettingsError> {
        let bad = || SettingsError::Restart(s.to_string());
        match s {
            "no" => Ok(RestartPolicy::No),
            "always" => Ok(RestartPolicy::Always),
            "on-failure" => Ok(RestartPolicy::OnFailure { max_retries: None }),
            _ => {
                let n = s.strip_prefix("on-failure:").ok_or_else(bad)?;
                let n = n.parse().map_err(|_| bad())?;
                Ok(RestartPolicy::OnFailure {
                    max_retries: Some(n),
                })
            }
        }
    }
}

impl fmt::Display for RestartPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RestartPolicy::No => f.write_str("no"),
            RestartPolicy::Always => f.write_str("always"),
            RestartPolicy::OnFailure { max_retries: None } => f.write_str("on-failure"),
            RestartPolicy::OnFailure {
                max_retries: Some(n),
            } => write!(f, "on-failure:{n}"),
        }
    }
}

/// A probe of the app's health; `retries` failures in a row make it unhealthy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    pub probe: Probe,
    #[serde(with = "seconds")]
    pub interval: Duration,
    #[serde(with = "seconds")]
    pub timeout: Duration,
    pub retries: u32,
    /// Failures during this time after a start do not count.
    #[serde(with = "seconds")]
    pub start_period: Duration,
}

impl HealthCheck {
    fn validate(&self) -> Result<(), SettingsError> {
        let field = |field: &str, problem: &str| SettingsError::Field {
            field: format!("health.{field}"),
            problem: problem.to_string(),
        };
        for (name, d) in [
            ("interval", self.interval),
            ("timeout", self.timeout),
            ("start_period", self.start_period),
        ] {
            if d > MAX_HEALTH_PERIOD {
                return Err(field(name, "at most 86400 s (1 day)"));
            }
        }
        if self.interval.is_zero() || self.timeout.is_zero() {
            return Err(field(
                if self.interval.is_zero() {
                    "interval"
                } else {
                    "timeout"
                },
                "above 0 s",
            ));
        }
        match &self.probe {
            Probe::Exec(argv) if argv.is_empty() || argv.iter().any(|a| a.contains('\0')) => {
                Err(field("probe.exec", "a command, with no NUL bytes"))
            }
            Probe::Http { url } if !valid_http_url(url) => Err(field(
                "probe.http.url",
                "an http:// URL, such as http://127.0.0.1:8080/health",
            )),
            Probe::Tcp { address } if !valid_tcp_address(address) => {
                Err(field("probe.tcp.address", "write host:port"))
            }
            _ => Ok(()),
        }
    }

    /// Docker's defaults, except a shorter interval: an edge app that fails should be seen failing within a minute.
    pub fn new(probe: Probe) -> HealthCheck {
        HealthCheck {
            probe,
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(5),
            retries: 3,
            start_period: Duration::from_secs(0),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Probe {
    /// A command run inside the container (`runc exec`); exit 0 is healthy.
    Exec(Vec<String>),
    /// An HTTP GET on the host's loopback (host network) answered with a 2xx or 3xx status.
    Http { url: String },
    /// A TCP connect to `host:port`.
    Tcp { address: String },
}

impl Probe {
    /// `--health-cmd` as Docker reads it: a shell command line, run with `/bin/sh -c`.
    pub fn shell(cmd: &str) -> Result<Probe, SettingsError> {
        if cmd.trim().is_empty() {
            return Err(SettingsError::HealthCmd);
        }
        Ok(Probe::Exec(vec![
            "/bin/sh".to_string(),
            "-c".to_string(),
            cmd.to_string(),
        ]))
    }
}

/// `NAME=VALUE`: a name of printable ASCII without spaces or `=`, and a value without NUL (the kernel's strings
/// end there).
pub fn parse_env(s: &str) -> Result<String, SettingsError> {
    match s.split_once('=') {
        Some((name, value))
            if !name.is_empty()
                && name.bytes().all(|b| b.is_ascii_graphic())
                && !value.contains('\0') =>
        {
            Ok(s.to_string())
        }
        _ => Err(SettingsError::Env(s.to_string())),
    }
}

pub fn parse_device(s: &str) -> Result<PathBuf, SettingsError> {
    if s.starts_with("/dev/") && !s.split('/').any(|c| c == "..") {
        Ok(PathBuf::from(s))
    } else {
        Err(SettingsError::Device(s.to_string()))
    }
}

/// `64m`, `1g`, `512k` or plain bytes, in binary units as Docker reads them.
pub fn parse_size(what: &'static str, s: &str) -> Result<u64, SettingsError> {
    let bad = || SettingsError::Size {
        what,
        value: s.to_string(),
    };
    let lower = s.trim().to_ascii_lowercase();
    let lower = lower.strip_suffix('b').unwrap_or(&lower);
    let (digits, shift) = match lower.char_indices().last() {
        Some((i, 'k')) => (&lower[..i], 10),
        Some((i, 'm')) => (&lower[..i], 20),
        Some((i, 'g')) => (&lower[..i], 30),
        _ => (lower, 0),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    n.checked_mul(1 << shift).filter(|n| *n > 0).ok_or_else(bad)
}

/// `500ms`, `30s`, `5m`, `1h`, or plain seconds.
pub fn parse_duration(what: &'static str, s: &str) -> Result<Duration, SettingsError> {
    let bad = || SettingsError::Duration {
        what,
        value: s.to_string(),
    };
    let s = s.trim();
    let (digits, unit_ms) = if let Some(d) = s.strip_suffix("ms") {
        (d, 1)
    } else if let Some(d) = s.strip_suffix('s') {
        (d, 1000)
    } else if let Some(d) = s.strip_suffix('m') {
        (d, 60_000)
    } else if let Some(d) = s.strip_suffix('h') {
        (d, 3_600_000)
    } else if let Some(d) = s.strip_suffix('d') {
        (d, 86_400_000)
    } else {
        (s, 1000)
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    n.checked_mul(unit_ms)
        .map(Duration::from_millis)
        .ok_or_else(bad)
}

/// `http://host[:port][/path]`, with a host of letter-led domain labels (no `--`, so no punycode) or an IPv4
/// address, and a path of printable ASCII: what `docs/openapi.yaml`'s pattern says, so the API and the agent
/// agree on every URL, and `url` parses each of them.
fn valid_http_url(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (authority, None),
    };
    port.is_none_or(is_port)
        && (is_ipv4(host) || is_domain(host))
        && path.bytes().all(|b| b.is_ascii_graphic())
        && url::Url::parse(url).is_ok_and(|u| u.host_str().is_some())
}

/// `host:port`, split at the last colon.
fn valid_tcp_address(address: &str) -> bool {
    address
        .rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && !h.contains('\0') && is_port(p))
}

/// A decimal port, 0 to 65535, digits only.
fn is_port(p: &str) -> bool {
    (1..=5).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok()
}

fn is_ipv4(host: &str) -> bool {
    let octets: Vec<&str> = host.split('.').collect();
    octets.len() == 4
        && octets.iter().all(|o| {
            (1..=3).contains(&o.len())
                && o.bytes().all(|b| b.is_ascii_digit())
                && o.parse::<u8>().is_ok()
                && (o.len() == 1 || !o.starts_with('0'))
        })
}

/// Labels of letters and digits joined by single hyphens; the last one starts with a letter, so no URL parser
/// takes the host for a number.
fn is_domain(host: &str) -> bool {
    let labels: Vec<&str> = host.split('.').collect();
    let label_ok = |l: &&str| {
        l.split('-')
            .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_alphanumeric()))
    };
    labels.iter().all(label_ok)
        && labels
            .last()
            .is_some_and(|l| l.bytes().next().is_some_and(|b| b.is_ascii_alphabetic()))
}

pub fn parse_cpus(s: &str) -> Result<f64, SettingsError> {
    match s.parse::<f64>() {
        Ok(n) if n.is_finite() && n > 0.0 => Ok(n),
        _ => Err(SettingsError::Cpus(s.to_string())),
    }
}

/// Durations are stored as (fractional) seconds: readable in the JSON, and what an operator writes.
mod seconds {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        // Too large for a Duration reads as the largest one, so that `validate` refuses it by the setting's name
        // rather than the whole document failing to parse: one bad app in a desired state must not hide the rest.
        // Below a nanosecond, but above 0, reads as a nanosecond: "above 0" must mean the same here as in the API's
        // document, which knows no resolution.
        match Duration::try_from_secs_f64(secs) {
            Err(_) if secs > 0.0 => Ok(Duration::MAX),
            Ok(d) if d.is_zero() && secs > 0.0 => Ok(Duration::from_nanos(1)),
            other => other.map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volumes_read_as_docker_writes_them() {
        let v: Volume = "data:/var/lib/app".parse().unwrap();
        assert_eq!(v.source, VolumeSource::Named("data".into()));
        assert!(!v.read_only);
        let v: Volume = "/etc/app:/etc/app:ro".parse().unwrap();
        assert_eq!(v.source, VolumeSource::Bind("/etc/app".into()));
        assert!(v.read_only);
        for bad in [
            "data",
            "data:relative",
            ":/x",
            "../up:/x",
            "a/b:/x",
            "d:/x:rw:extra",
            "d:/x:rx",
            "d:/a/../b",
        ] {
            assert!(bad.parse::<Volume>().is_err(), "{bad}");
        }
    }

    #[test]
    fn restart_policies() {
        assert_eq!("no".parse(), Ok(RestartPolicy::No));
        assert_eq!("always".parse(), Ok(RestartPolicy::Always));
        assert_eq!(
            "on-failure:3".parse(),
            Ok(RestartPolicy::OnFailure {
                max_retries: Some(3)
            })
        );
        assert!("on-failure:x".parse::<RestartPolicy>().is_err());
        assert!("sometimes".parse::<RestartPolicy>().is_err());
        for p in ["no", "always", "on-failure", "on-failure:5"] {
            assert_eq!(p.parse::<RestartPolicy>().unwrap().to_string(), p);
        }
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("--memory", "64m"), Ok(64 << 20));
        assert_eq!(parse_size("--memory", "1G"), Ok(1 << 30));
        assert_eq!(parse_size("--memory", "4096"), Ok(4096));
        assert_eq!(parse_size("--memory", "512kb"), Ok(512 << 10));
        assert!(parse_size("--memory", "0").is_err());
        assert!(parse_size("--memory", "lots").is_err());
        assert!(parse_size("--memory", "99999999999g").is_err());
        assert_eq!(parse_duration("--time", "5"), Ok(Duration::from_secs(5)));
        assert_eq!(
            parse_duration("--time", "250ms"),
            Ok(Duration::from_millis(250))
        );
        assert_eq!(parse_duration("--time", "2m"), Ok(Duration::from_secs(120)));
        assert_eq!(
            parse_duration("--expires", "7d"),
            Ok(Duration::from_secs(7 * 86_400))
        );
        assert!(parse_duration("--time", "1m30s").is_err());
        assert_eq!(parse_cpus("0.5"), Ok(0.5));
        assert!(parse_cpus("-1").is_err());
        assert!(parse_cpus("NaN").is_err());
    }

    #[test]
    fn env_and_devices() {
        assert!(parse_env("A=b=c").is_ok());
        assert!(parse_env("A=").is_ok());
        assert!(parse_env("=b").is_err());
        assert!(parse_env("novalue").is_err());
        assert!(parse_device("/dev/i2c-1").is_ok());
        assert!(parse_device("/etc/passwd").is_err());
        assert!(parse_device("/dev/../etc/passwd").is_err());
    }

    #[test]
    fn settings_from_json_get_the_command_line_checks_and_bounds_by_field() {
        let refused = |json: &str| -> String {
            let s: RunSettings = serde_json::from_str(json).unwrap();
            match s.validate() {
                Err(SettingsError::Field { field, .. }) => field,
                other => panic!("{json}: {other:?}"),
            }
        };
        assert_eq!(refused(r#"{"devices": ["/etc/shadow"]}"#), "devices[0]");
        assert_eq!(
            refused(r#"{"devices": ["/dev/../etc/shadow"]}"#),
            "devices[0]"
        );
        assert_eq!(
            refused(r#"{"volumes": [{"source": {"named": "../../etc"}, "target": "/x"}]}"#),
            "volumes[0].source.named"
        );
        assert_eq!(
            refused(r#"{"volumes": [{"source": {"bind": "/srv/../etc"}, "target": "/x"}]}"#),
            "volumes[0].source.bind"
        );
        assert_eq!(
            refused(r#"{"volumes": [{"source": {"named": "d"}, "target": "x"}]}"#),
            "volumes[0].target"
        );
        assert_eq!(refused(r#"{"stop_grace": 1e19}"#), "stop_grace");
        // Beyond what a Duration holds: still one refused field, not an unreadable document.
        assert_eq!(refused(r#"{"stop_grace": 1e30}"#), "stop_grace");
        assert_eq!(refused(r#"{"stop_grace": 3601}"#), "stop_grace");
        let health = |k: &str, v: &str| {
            let mut h = serde_json::json!({
                "probe": {"exec": ["true"]}, "interval": 10, "timeout": 5, "retries": 3, "start_period": 0
            });
            h[k] = serde_json::from_str(v).unwrap();
            serde_json::json!({ "health": h }).to_string()
        };
        assert_eq!(refused(&health("interval", "86401")), "health.interval");
        assert_eq!(refused(&health("interval", "0")), "health.interval");
        assert_eq!(refused(&health("timeout", "1e19")), "health.timeout");
        assert_eq!(
            refused(&health("probe", r#"{"exec": []}"#)),
            "health.probe.exec"
        );
        assert_eq!(
            refused(&health(
                "probe",
                r#"{"http": {"url": "file:///etc/passwd"}}"#
            )),
            "health.probe.http.url"
        );
        assert_eq!(
            refused(&health("probe", r#"{"tcp": {"address": "nowhere"}}"#)),
            "health.probe.tcp.address"
        );
        assert_eq!(refused(r#"{"cpus": 1e300}"#), "cpus");
        assert_eq!(refused(r#"{"pids": -1}"#), "pids");
        assert_eq!(refused(r#"{"memory": 0}"#), "memory");
        assert_eq!(refused(r#"{"hostname": "a b"}"#), "hostname");
        assert_eq!(refused(r#"{"env": ["=x"]}"#), "env[0]");

        let mut fine = RunSettings::new();
        fine.devices.push("/dev/i2c-1".into());
        fine.volumes.push("data:/data".parse().unwrap());
        fine.volumes.push("/srv/in:/in:ro".parse().unwrap());
        fine.stop_grace = MAX_STOP_GRACE;
        fine.health = Some(HealthCheck {
            interval: MAX_HEALTH_PERIOD,
            ..HealthCheck::new(Probe::shell("true").unwrap())
        });
        fine.cpus = Some(0.5);
        fine.hostname = Some("greenhouse-3.local".into());
        assert_eq!(fine.validate(), Ok(()));
    }

    #[test]
    fn settings_round_trip_through_json() {
        let mut s = RunSettings::new();
        s.env.push("A=1".into());
        s.volumes.push("data:/data".parse().unwrap());
        s.restart = "on-failure:2".parse().unwrap();
        s.health = Some(HealthCheck::new(Probe::shell("true").unwrap()));
        s.memory = Some(64 << 20);
        let json = serde_json::to_string(&s).unwrap();
        let back: RunSettings = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        assert!(serde_json::from_str::<RunSettings>(r#"{"bogus":1}"#).is_err());
    }

    #[test]
    fn hardening_opt_outs_parse_and_old_settings_keep_the_defaults() {
        assert_eq!(parse_capability("NET_RAW"), Ok("NET_RAW".into()));
        for bad in ["CAP_NET_RAW", "net_raw", "ALL", "", "NET_RAW "] {
            assert_eq!(
                parse_capability(bad),
                Err(SettingsError::Capability(bad.into()))
            );
        }
        assert_eq!(
            "seccomp=unconfined".parse(),
            Ok(SecurityOpt::Seccomp(SeccompMode::Unconfined))
        );
        assert_eq!(
            "no-new-privileges=false".parse(),
            Ok(SecurityOpt::NoNewPrivileges(false))
        );
        assert_eq!(
            "no-new-privileges".parse(),
            Ok(SecurityOpt::NoNewPrivileges(true))
        );
        for bad in [
            "seccomp=/tmp/profile.json",
            "apparmor=unconfined",
            "seccomp",
        ] {
            assert!(bad.parse::<SecurityOpt>().is_err(), "{bad}");
        }
        assert_eq!("auto".parse(), Ok(UsernsMode::Auto));
        assert!("private".parse::<UsernsMode>().is_err());

        // Settings stored before these fields existed read with the hardened defaults.
        let old: RunSettings = serde_json::from_str(r#"{"env":["A=1"],"stop_grace":10}"#).unwrap();
        assert!(old.cap_add.is_empty());
        assert_eq!(old.seccomp, SeccompMode::Default);
        assert!(!old.allow_new_privileges);
        assert_eq!(old.userns, UsernsMode::Host);
        // The serde path checks capability names as the command line does.
        let e =
            serde_json::from_str::<RunSettings>(r#"{"cap_add":["CAP_SYS_ADMIN"]}"#).unwrap_err();
        assert!(e.to_string().contains("--cap-add"), "{e}");
        let s: RunSettings = serde_json::from_str(
            r#"{"cap_add":["NET_RAW"],"seccomp":"unconfined","allow_new_privileges":true,"userns":"auto"}"#,
        )
        .unwrap();
        assert_eq!(
            (s.cap_add, s.seccomp, s.allow_new_privileges, s.userns),
            (
                vec!["NET_RAW".to_string()],
                SeccompMode::Unconfined,
                true,
                UsernsMode::Auto
            )
        );
    }
}
