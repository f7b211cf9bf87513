//! The command line: global options, one module per command, and the error type `main` reports.
//!
//! Commands take a [`Context`] built once from the global options and the configuration file, so every command
//! sees the same precedence: command line over configuration file over defaults.

pub mod agent;
pub mod check_binary;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub mod gc;
pub mod images;
pub mod inspect;
pub mod lint;
pub mod logs;
pub mod platform;
pub mod ps;
pub mod pull;
pub mod rm;
pub mod run;
#[cfg(feature = "server")]
pub mod server;
pub mod stop;
pub mod supervise;

use crate::config::{self, Config, ConfigError};
use crate::platform::detect::DetectError;
use crate::platform::select::SelectError;
use crate::platform::{Platform, PlatformError};
use crate::pull::PullError;
use crate::registry::RegistryError;
use crate::store::StoreError;

#[derive(Debug, Parser)]
#[command(
    name = "flotilla",
    version = crate::VERSION,
    about = "Architecture-correct container deployment for ARM edge devices",
    long_about = "flotilla detects exactly which image platforms this device can run, from every host signal, \
                  and checks the ELF headers of an image's own binaries before anything runs."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Args)]
pub struct GlobalArgs {
    /// Configuration file; a missing file at the default path means defaults
    #[arg(long, global = true, value_name = "FILE", env = "FLOTILLA_CONFIG")]
    pub config: Option<PathBuf>,
    /// Where images and agent state live [default: /var/lib/flotilla]
    #[arg(long, global = true, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Allow plain HTTP for this registry (repeatable)
    #[arg(long, global = true, value_name = "HOST[:PORT]")]
    pub insecure_registry: Vec<String>,
    /// Use this platform instead of detecting it, like `docker run --platform` (e.g. linux/arm/v6)
    #[arg(long, global = true, value_name = "PLATFORM")]
    pub platform: Option<String>,
    /// Detect from a saved evidence snapshot (see `flotilla platform --dump`) instead of this host, to see or
    /// prepare what another device would run
    #[arg(long, global = true, value_name = "DIR")]
    pub evidence: Option<PathBuf>,
    /// More log output (repeat for more)
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Fetch, verify and prove the variant of an image this device runs
    Pull(pull::Args),
    /// Show an image's variants, which one this device would take, and why not the others
    Inspect(inspect::Args),
    /// List the images in the store
    Images(images::Args),
    /// Remove blobs no image needs, partial downloads and stale temporary files
    Gc(gc::Args),
    /// Show which image platforms this device runs, best first, and why
    Platform(platform::Args),
    /// Check that every entry of an image index holds code for its own label (for CI, after the push)
    Lint(lint::Args),
    /// Show what an executable needs (architecture version, FP/SIMD, loader, page size) and whether this host can run it
    CheckBinary(check_binary::Args),
    /// Run an image as a supervised container (pulls and unpacks it when needed)
    Run(Box<run::Args>),
    /// List containers
    Ps(ps::Args),
    /// Show a container's output
    Logs(logs::Args),
    /// Stop a container: SIGTERM, the grace period, then SIGKILL
    Stop(stop::Args),
    /// Remove a stopped container
    Rm(rm::Args),
    /// Keep this device's apps at the fleet's desired releases (the daemon systemd runs)
    Agent(agent::Args),
    /// Keep one container running (started by run; not for direct use)
    #[command(hide = true)]
    Supervise(supervise::Args),
}

/// What every command gets: the configuration with the command line applied on top.
#[derive(Debug)]
pub struct Context {
    pub config: Config,
    pub state_dir: PathBuf,
    /// `--insecure-registry` hosts; the registry client adds those the configuration marks insecure.
    pub insecure_registries: Vec<String>,
    /// Set when the user overrode detection; commands must report that they used it.
    pub platform_override: Option<Platform>,
    /// A snapshot to detect from instead of the live host.
    pub evidence: Option<PathBuf>,
}

impl Context {
    pub fn from_args(global: &GlobalArgs) -> Result<Context, CliError> {
        let (path, must_exist) = match &global.config {
            Some(p) => (p.clone(), true),
            None => (PathBuf::from(config::DEFAULT_CONFIG_PATH), false),
        };
        let config = Config::load(&path, must_exist)?;
        let state_dir = global
            .state_dir
            .clone()
            .or_else(|| config.state_dir.clone())
            .unwrap_or_else(|| PathBuf::from(config::DEFAULT_STATE_DIR));
        let insecure_registries = global.insecure_registry.clone();
        let platform_override = match global.platform.as_deref().or(config.platform.as_deref()) {
            Some(p) => Some(p.parse::<Platform>()?),
            None => None,
        };
        Ok(Context {
            config,
            state_dir,
            insecure_registries,
            platform_override,
            evidence: global.evidence.clone(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("--platform: {0}")]
    Platform(#[from] PlatformError),
    #[error("--require: {0}")]
    Require(PlatformError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot write the JSON output: {0}")]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Detect(#[from] DetectError),
    #[error(transparent)]
    CheckBinary(#[from] check_binary::CheckBinaryError),
    #[error(transparent)]
    Pull(#[from] PullError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Select(#[from] SelectError),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error(transparent)]
    Container(#[from] crate::supervise::container::ContainerError),
    #[error(transparent)]
    Supervise(#[from] crate::supervise::supervisor::SuperviseError),
    #[error(transparent)]
    Run(#[from] run::RunError),
    #[error(transparent)]
    Deploy(Box<crate::deploy::DeployError>),
    #[error(transparent)]
    Agent(#[from] crate::agent::AgentError),
    #[error(transparent)]
    Rm(#[from] rm::RmError),
    #[error(transparent)]
    ContainerRuntime(#[from] crate::runtime::RuntimeError),
    #[error(transparent)]
    Unpack(#[from] crate::unpack::UnpackError),
    #[error("cannot read {what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

/// Each deploy error keeps the variant, and so the exit code, it has when a command meets it directly.
impl From<crate::deploy::DeployError> for CliError {
    fn from(e: crate::deploy::DeployError) -> CliError {
        use crate::deploy::DeployError;
        match e {
            DeployError::Registry(e) => CliError::Registry(e),
            DeployError::Store(e) => CliError::Store(e),
            DeployError::Unpack(e) => CliError::Unpack(e),
            DeployError::Pull(e) => CliError::Pull(e),
            e @ (DeployError::Emulation(_) | DeployError::Launch(_)) => {
                CliError::Deploy(Box::new(e))
            }
        }
    }
}

impl CliError {
    /// 2 is for what the user asked wrongly, 1 for what went wrong while doing it.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Config(_) | CliError::Platform(_) | CliError::Require(_) => 2,
            CliError::Store(StoreError::BadSource { .. } | StoreError::BadRefName { .. }) => 2,
            CliError::Detect(_) => 1,
            CliError::CheckBinary(e) => e.exit_code(),
            CliError::Registry(RegistryError::Reference(_)) => 2,
            CliError::Pull(PullError::Registry(RegistryError::Reference(_))) => 2,
            CliError::Pull(PullError::Store(StoreError::BadSource { .. })) => 2,
            CliError::Container(crate::supervise::container::ContainerError::BadName(_)) => 2,
            CliError::Run(run::RunError::Settings(_) | run::RunError::NoName(_)) => 2,
            CliError::Container(_)
            | CliError::Supervise(_)
            | CliError::Run(_)
            | CliError::Deploy(_)
            | CliError::Rm(_)
            | CliError::ContainerRuntime(_)
            | CliError::Unpack(_)
            | CliError::Io { .. }
            | CliError::Agent(_) => 1,
            CliError::Store(_)
            | CliError::Json(_)
            | CliError::Pull(_)
            | CliError::Registry(_)
            | CliError::Select(_)
            | CliError::Runtime(_) => 1,
        }
    }
}

pub fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLOTILLA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Under systemd (which sets JOURNAL_STREAM on the service's stdio) messages go to the journal with their
    // fields; elsewhere to stderr.
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        if let Ok(journald) = tracing_journald::layer() {
            use tracing_subscriber::prelude::*;
            // Containers' output lines are info events of their own target: the journal gets them at any -v.
            let filter = match "container=info".parse() {
                Ok(d) if std::env::var_os("FLOTILLA_LOG").is_none() => filter.add_directive(d),
                _ => filter,
            };
            tracing_subscriber::registry()
                .with(filter)
                .with(journald)
                .init();
            return;
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

/// The OCI runtime the configuration names, checked to exist.
pub fn open_runtime(ctx: &Context) -> Result<crate::runtime::runc::Runc, CliError> {
    Ok(crate::runtime::runc::Runc::new(
        &ctx.config.run.runtime,
        &ctx.state_dir,
    )?)
}

pub fn run(cli: Cli) -> Result<ExitCode, CliError> {
    init_logging(cli.global.verbose);
    let ctx = Context::from_args(&cli.global)?;
    match cli.command {
        Command::Pull(args) => pull::run(args, &ctx),
        Command::Inspect(args) => inspect::run(args, &ctx),
        Command::Images(args) => images::run(args, &ctx),
        Command::Gc(args) => gc::run(args, &ctx),
        Command::Platform(args) => platform::run(args, &ctx),
        Command::CheckBinary(args) => check_binary::run(args, &ctx),
        Command::Lint(args) => lint::run(args, &ctx),
        Command::Run(args) => run::run(*args, &ctx),
        Command::Ps(args) => ps::run(args, &ctx),
        Command::Logs(args) => logs::run(args, &ctx),
        Command::Stop(args) => stop::run(args, &ctx),
        Command::Rm(args) => rm::run(args, &ctx),
        Command::Supervise(args) => supervise::run(args, &ctx),
        Command::Agent(args) => agent::run(args, &ctx),
    }
}

/// The runtime for commands that talk to registries: a few worker threads, since hashing and decompression of
/// parallel layers are CPU work and edge devices have two to four cores.
pub fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(runtime_workers())
        .enable_all()
        .build()
        .map_err(CliError::Runtime)
}

/// The async worker threads of a runtime: one per core, at most 4.
pub(crate) fn runtime_workers() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().min(4))
}

/// A plain-text table: the header, then one line per row, columns padded to their widest cell. Every cell is made
/// inert ([`crate::human::inert`]): tables show what devices, images and containers said.
pub(crate) fn table<const N: usize>(header: [&str; N], rows: &[[String; N]]) -> String {
    let header = header.map(str::to_string);
    let rows: Vec<[String; N]> = rows
        .iter()
        .map(|r| r.clone().map(|c| crate::human::inert(&c).into_owned()))
        .collect();
    let rows = rows.as_slice();
    let mut widths = header.clone().map(|h| h.chars().count());
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// The deploy service for `host`, the platform that chooses variants. The emulation gate is this machine,
/// whatever `--platform` or `--evidence` chose: they pick a variant, they do not make this CPU run it.
pub(crate) fn deployer(
    ctx: &Context,
    host: crate::platform::host::Host,
) -> Result<crate::deploy::Deployer, CliError> {
    let live = if ctx.platform_override.is_none() && ctx.evidence.is_none() {
        host.clone()
    } else {
        crate::platform::host::decide(crate::platform::host::read_evidence(None), None)?
            .0
            .host()
    };
    Ok(crate::deploy::Deployer {
        state_dir: ctx.state_dir.clone(),
        config: ctx.config.clone(),
        insecure_registries: ctx.insecure_registries.clone(),
        host,
        live,
        clock: std::sync::Arc::new(crate::clock::SystemClock),
    })
}

/// stdout records to stdout and stderr records to stderr, as the container wrote them.
pub(crate) fn print_record(
    r: &crate::supervise::logs::Record,
    timestamps: bool,
) -> std::io::Result<()> {
    let mut line = Vec::with_capacity(r.text.len() + 32);
    if timestamps {
        line.extend_from_slice(r.time.as_bytes());
        line.push(b' ');
    }
    line.extend_from_slice(&r.text);
    line.push(b'\n');
    match r.stream {
        crate::supervise::logs::Stream::Stdout => {
            std::io::Write::write_all(&mut std::io::stdout().lock(), &line)
        }
        crate::supervise::logs::Stream::Stderr => {
            std::io::Write::write_all(&mut std::io::stderr().lock(), &line)
        }
    }
}

/// For `flotilla run` in the foreground: prints the container's output until its supervisor is done with it.
/// Ctrl-C stops the container.
pub(crate) fn follow_until_done(
    container: &crate::supervise::container::Container,
    runtime: &std::sync::Arc<dyn crate::runtime::Runtime>,
) -> Result<(), CliError> {
    let interrupted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = interrupted.clone();
    // A thread with its own small runtime waits for Ctrl-C, so the follow loop stays plain blocking code.
    std::thread::spawn(move || {
        if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            rt.block_on(async {
                if tokio::signal::ctrl_c().await.is_ok() {
                    flag.store(true, std::sync::atomic::Ordering::SeqCst);
                }
            });
        }
    });
    let mut stopping = false;
    crate::supervise::logs::follow(
        &container.log_dir(),
        None,
        |r| print_record(r, false),
        || {
            if interrupted.load(std::sync::atomic::Ordering::SeqCst) && !stopping {
                stopping = true;
                eprintln!("stopping {}", container.name);
                let grace = container
                    .spec()
                    .map(|s| s.settings.stop_grace)
                    .unwrap_or_default();
                if let Err(e) = crate::supervise::control::stop(container, runtime, grace) {
                    eprintln!("{}", crate::error_chain(&e));
                }
            }
            container.supervisor_pid().is_some() && !container.status().state.is_final()
        },
    )
    .map_err(|e| CliError::Io {
        what: format!("the logs of {}", container.name),
        source: e,
    })
}
