//! `flotilla run`: the deploy service resolves, pulls and launches the image; this prints what it did and follows
//! the container.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use super::{CliError, Context};
use crate::app::{
    self as settings, HealthCheck, Probe, RunSettings, SeccompMode, SecurityOpt, SettingsError,
};
use crate::pull::Source;
use crate::runtime::Runtime;
use crate::supervise::container::{Container, State};
use crate::supervise::control;
use crate::unpack::rootfs;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The image: a registry reference, or oci:DIR[:NAME]
    pub reference: String,
    /// The container's name [default: the image's repository name]
    #[arg(long)]
    pub name: Option<String>,
    #[command(flatten)]
    pub settings: SettingsArgs,
    /// Pull the image even when the store has it
    #[arg(long)]
    pub pull: bool,
    /// Return once the container started, instead of following its output until it ends
    #[arg(short, long)]
    pub detach: bool,
}

/// The app settings `run` takes, and the fleet server's `app create`.
#[derive(Debug, Clone, clap::Args)]
pub struct SettingsArgs {
    /// Set an environment variable (repeatable)
    #[arg(short, long = "env", value_name = "NAME=VALUE", value_parser = settings::parse_env)]
    pub env: Vec<String>,
    /// A named volume (NAME:/path, kept under the state directory across updates) or a bind mount
    /// (/host/path:/path), optionally :ro (repeatable)
    #[arg(long = "volume", value_name = "SOURCE:/PATH[:ro]")]
    pub volume: Vec<settings::Volume>,
    /// Pass a host device through (repeatable), e.g. /dev/i2c-1
    #[arg(long = "device", value_name = "/dev/…", value_parser = settings::parse_device)]
    pub device: Vec<PathBuf>,
    /// Restart policy: no, always, on-failure or on-failure:N
    #[arg(long, default_value = "no")]
    pub restart: settings::RestartPolicy,
    /// A shell command run inside the container to check its health (exit 0 is healthy)
    #[arg(long, value_name = "CMD")]
    pub health_cmd: Option<String>,
    /// An http:// URL whose GET must answer 2xx or 3xx to be healthy
    #[arg(long, value_name = "URL", conflicts_with = "health_cmd")]
    pub health_http: Option<String>,
    /// A host:port that must accept a TCP connection to be healthy
    #[arg(long, value_name = "HOST:PORT", conflicts_with_all = ["health_cmd", "health_http"])]
    pub health_tcp: Option<String>,
    /// Time between health checks
    #[arg(long, default_value = "10s", value_parser = |s: &str| settings::parse_duration("--health-interval", s))]
    pub health_interval: Duration,
    /// Time a health check may take
    #[arg(long, default_value = "5s", value_parser = |s: &str| settings::parse_duration("--health-timeout", s))]
    pub health_timeout: Duration,
    /// Failed checks in a row that make the container unhealthy
    #[arg(long, default_value_t = 3)]
    pub health_retries: u32,
    /// Failures in this time after a start do not count
    #[arg(long, default_value = "0s", value_parser = |s: &str| settings::parse_duration("--health-start-period", s))]
    pub health_start_period: Duration,
    /// Mount the container's root filesystem read-only
    #[arg(long)]
    pub read_only: bool,
    /// Memory limit, e.g. 64m
    #[arg(long, value_parser = |s: &str| settings::parse_size("--memory", s))]
    pub memory: Option<u64>,
    /// CPU limit in CPUs, e.g. 0.5
    #[arg(long, value_parser = settings::parse_cpus)]
    pub cpus: Option<f64>,
    /// Maximum number of processes
    #[arg(long)]
    pub pids_limit: Option<i64>,
    /// The container's hostname [default: its name]
    #[arg(long)]
    pub hostname: Option<String>,
    /// host (the default: an edge app talks to the LAN as the host does) or none (loopback only)
    #[arg(long, default_value = "host")]
    pub network: settings::Network,
    /// Run as this user: uid[:gid] or name[:group] from the image's /etc/passwd and /etc/group
    #[arg(short, long)]
    pub user: Option<String>,
    /// Time between SIGTERM and SIGKILL when the container is stopped
    #[arg(long, default_value = "10s", value_parser = |s: &str| settings::parse_duration("--stop-timeout", s))]
    pub stop_timeout: Duration,
    /// Run an image built for another architecture through a registered binfmt handler (qemu-user)
    #[arg(long)]
    pub allow_emulation: bool,
    /// Add a Linux capability to the default set, by name without CAP_ (NET_RAW, SYS_PTRACE); the seccomp
    /// profile then allows the syscalls it gates (repeatable)
    #[arg(long = "cap-add", value_name = "NAME", value_parser = settings::parse_capability)]
    pub cap_add: Vec<String>,
    /// seccomp=unconfined (no syscall filter) or no-new-privileges=false (setuid programs may raise privileges)
    /// (repeatable)
    #[arg(long = "security-opt", value_name = "OPT")]
    pub security_opt: Vec<settings::SecurityOpt>,
    /// host (the default), or auto: a private user namespace (refused for now, saying why)
    #[arg(long, default_value = "host")]
    pub userns: settings::UsernsMode,
    /// Replaces the image's Cmd
    #[arg(trailing_var_arg = true)]
    pub command: Vec<String>,
}

impl SettingsArgs {
    /// `allow_emulation`: the configuration allows it, whatever the flag says.
    pub fn settings(&self, allow_emulation: bool) -> Result<RunSettings, SettingsError> {
        let probe = match (&self.health_cmd, &self.health_http, &self.health_tcp) {
            (Some(cmd), _, _) => Some(Probe::shell(cmd)?),
            (_, Some(url), _) => Some(Probe::Http { url: url.clone() }),
            (_, _, Some(address)) => Some(Probe::Tcp {
                address: address.clone(),
            }),
            _ => None,
        };
        let health = probe.map(|p| HealthCheck {
            interval: self.health_interval,
            timeout: self.health_timeout,
            retries: self.health_retries,
            start_period: self.health_start_period,
            ..HealthCheck::new(p)
        });
        // Later options win, as in Docker.
        let mut seccomp = SeccompMode::Default;
        let mut allow_new_privileges = false;
        for opt in &self.security_opt {
            match *opt {
                SecurityOpt::Seccomp(mode) => seccomp = mode,
                SecurityOpt::NoNewPrivileges(on) => allow_new_privileges = !on,
            }
        }
        let settings = RunSettings {
            env: self.env.clone(),
            volumes: self.volume.clone(),
            devices: self.device.clone(),
            restart: self.restart,
            health,
            read_only: self.read_only,
            memory: self.memory,
            cpus: self.cpus,
            pids: self.pids_limit,
            hostname: self.hostname.clone(),
            network: self.network,
            user: self.user.clone(),
            command: self.command.clone(),
            stop_grace: self.stop_timeout,
            allow_emulation: allow_emulation || self.allow_emulation,
            cap_add: self.cap_add.clone(),
            seccomp,
            allow_new_privileges,
            userns: self.userns,
        };
        settings.validate()?;
        Ok(settings)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(
        "flotilla run needs root: the runtime makes namespaces, cgroups and mounts. Run it with sudo, or as the \
         flotilla service"
    )]
    NotRoot,
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error("cannot name the container after {0:?}: give it one with --name")]
    NoName(String),
    #[error("container {name} could not start: {reason}")]
    StartFailed { name: String, reason: String },
}

pub fn run(args: Args, ctx: &Context) -> Result<ExitCode, CliError> {
    if !rustix::process::geteuid().is_root() {
        return Err(RunError::NotRoot.into());
    }
    let runtime: Arc<dyn Runtime> = Arc::new(super::open_runtime(ctx)?);
    let settings = args
        .settings
        .settings(ctx.config.run.allow_emulation)
        .map_err(RunError::from)?;
    let source: Source = args.reference.parse()?;
    let stored_name = match &source {
        Source::Registry(r) => r.to_string(),
        Source::Layout(l) => l.name.clone().unwrap_or_else(|| args.reference.clone()),
    };
    let name = match &args.name {
        Some(n) => n.clone(),
        None => default_name(&stored_name).ok_or_else(|| RunError::NoName(stored_name.clone()))?,
    };
    crate::supervise::container::validate_name(&name)?;
    if Container::open(&ctx.state_dir, &name).is_ok() {
        return Err(crate::supervise::container::ContainerError::Exists(name).into());
    }

    let detection = super::platform::host_detection(ctx)?;
    let deployer = super::deployer(ctx, detection.host())?;
    let resolved =
        super::runtime()?.block_on(deployer.resolve(&source, &stored_name, !args.pull))?;
    if let Some(report) = &resolved.pulled {
        eprintln!("pulled {} ({})", report.name, report.platform);
    }
    let launched = deployer.launch(&name, &stored_name, &resolved.image, &settings)?;
    if let Some(handler) = &launched.emulated_by {
        eprintln!(
            "{name}: {} runs here only through the binfmt handler {handler} (emulated)",
            launched.platform
        );
    }
    if launched.root == rootfs::RootKind::Copy {
        eprintln!(
            "{name}: overlayfs is not available here; the root is a flattened copy of the layers"
        );
    }
    let container = launched.container;
    let state = control::wait_started(&container, Duration::from_secs(60));
    let status = container.status();
    if state == State::Failed {
        return Err(RunError::StartFailed {
            name,
            reason: status
                .message
                .unwrap_or_else(|| "see flotilla logs".to_string()),
        }
        .into());
    }
    if args.detach {
        println!("{name}");
        return Ok(ExitCode::SUCCESS);
    }
    super::follow_until_done(&container, &runtime)?;
    let status = container.status();
    if let Some(w) = &status.wrong_architecture {
        eprintln!(
            "{name}: wrong architecture variant for this device: {} (device: {})",
            w.evidence, w.host
        );
    }
    let code = status
        .exit
        .and_then(|e| e.code.or(e.signal.map(|s| 128 + s)))
        .unwrap_or(0);
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

/// `ghcr.io/org/web-ui:1.2` → `web-ui`.
fn default_name(image: &str) -> Option<String> {
    let without_digest = image.split('@').next()?;
    let last = without_digest.rsplit('/').next()?;
    let repo = last.split(':').next()?;
    crate::supervise::container::validate_name(repo).ok()?;
    Some(repo.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names_come_from_the_repository() {
        assert_eq!(
            default_name("ghcr.io/org/web-ui:1.2").as_deref(),
            Some("web-ui")
        );
        assert_eq!(
            default_name("localhost:5000/busybox@sha256:ab").as_deref(),
            Some("busybox")
        );
        assert_eq!(default_name("busybox").as_deref(), Some("busybox"));
    }
}
