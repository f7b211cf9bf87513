//! `flotilla-server`: `serve` runs the fleet server (`serve`); every other command is an operator's client of its
//! API (`operate`), and `--json` prints the API's own answer.

mod operate;
mod serve;
mod tables;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::cli::run::SettingsArgs;
use crate::server::store::ServerDbError;
pub use serve::ServeArgs;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8470";
pub const DEFAULT_DB: &str = "/var/lib/flotilla-server/server.db";

#[derive(Debug, Parser)]
#[command(
    name = "flotilla-server",
    version,
    about = "The flotilla fleet server, and its operator CLI"
)]
pub struct Cli {
    /// The server's URL, for the operator commands
    #[arg(
        long,
        global = true,
        env = "FLOTILLA_SERVER",
        default_value = "http://127.0.0.1:8470"
    )]
    pub server: String,
    /// A file holding the admin token [default: admin-token beside the default database]
    #[arg(long, global = true, env = "FLOTILLA_ADMIN_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Extra CA certificates (PEM) to trust for the server's TLS
    #[arg(long, global = true)]
    pub ca_bundle: Option<PathBuf>,
    /// Print the API's JSON instead of a table
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the fleet server
    Serve(Box<ServeArgs>),
    /// Enrollment tokens
    #[command(subcommand)]
    Token(TokenCommand),
    /// Apps and their run settings
    #[command(subcommand)]
    App(Box<AppCommand>),
    /// Releases: an app at an image, pinned to its digests
    #[command(subcommand)]
    Release(ReleaseCommand),
    /// Rollouts of a release in waves
    #[command(subcommand)]
    Rollout(RolloutCommand),
    /// The devices, what they run and when they were last seen
    Devices,
    /// One device: its tags
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Refuse a device's credential from now on
    Revoke { name: String },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// A new enrollment token (one device, for a day, unless told otherwise); prints the secret, once
    Create {
        /// How long it is valid (24h, 30m, 7d…), or "never"
        #[arg(long, default_value = "24h", value_parser = parse_expiry)]
        expires: Expiry,
        /// How many devices may enroll with it, or "unlimited"
        #[arg(long, default_value = "1", value_parser = parse_uses)]
        uses: Uses,
        /// A tag every device enrolled with it gets (repeatable)
        #[arg(long = "tag", value_name = "TAG=VALUE")]
        tags: Vec<String>,
        /// Also give devices the tags they ask for (`[fleet] tags`), under the token's own
        #[arg(long)]
        device_tags: bool,
    },
    /// Every token: id, expiry, uses left, tags; never the secret
    List,
    /// Refuse a token for any enrollment from now on (its devices stay enrolled)
    Revoke { id: String },
}

/// `--expires`: a duration, or never.
#[derive(Debug, Clone, Copy)]
pub struct Expiry(pub Option<Duration>);

/// `--uses`: a count, or unlimited.
#[derive(Debug, Clone, Copy)]
pub struct Uses(pub Option<u32>);

fn parse_expiry(s: &str) -> Result<Expiry, String> {
    if s == "never" {
        return Ok(Expiry(None));
    }
    match crate::app::parse_duration("--expires", s) {
        Ok(d) if d.is_zero() => Err("a token that expires at once enrolls nobody".into()),
        Ok(d) => Ok(Expiry(Some(d))),
        Err(e) => Err(format!("{e} (or \"never\")")),
    }
}

fn parse_uses(s: &str) -> Result<Uses, String> {
    if s == "unlimited" {
        return Ok(Uses(None));
    }
    match s.parse::<u32>() {
        Ok(0) => Err("a token of 0 uses enrolls nobody".into()),
        Ok(n) => Ok(Uses(Some(n))),
        Err(_) => Err(format!(
            "{s:?} is neither a count (1, 10) nor \"unlimited\""
        )),
    }
}

#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// Set (TAG=VALUE) or remove (--remove TAG) a device's tags; rollouts select by them
    Tag {
        name: String,
        #[arg(value_name = "TAG=VALUE")]
        set: Vec<String>,
        /// A tag to remove (repeatable)
        #[arg(long, value_name = "TAG")]
        remove: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum AppCommand {
    /// Define an app and how its containers run
    Create {
        name: String,
        #[command(flatten)]
        settings: Box<SettingsArgs>,
    },
    List,
}

#[derive(Debug, Subcommand)]
pub enum ReleaseCommand {
    /// Pin APP to IMAGE as it is now in its registry (the index digest and each platform's manifest)
    Create {
        app: String,
        image: String,
    },
    List,
}

#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Roll RELEASE out to the selected devices in waves
    Start {
        release: String,
        /// Only devices with this tag (repeatable; all must match)
        #[arg(long = "select", value_name = "TAG=VALUE")]
        select: Vec<String>,
        /// Cumulative waves: percents (1%,10%,100% or 1,10,100) or device counts (2,5,#all)
        #[arg(long, default_value = "100", value_delimiter = ',')]
        waves: Vec<String>,
        /// Interpret the waves as device counts instead of percents
        #[arg(long)]
        counts: bool,
        /// Pause at this many failed devices, or this share of those ordered (10%)
        #[arg(long, default_value = "1")]
        max_failures: String,
        /// How long a wave stays healthy before the next one starts
        #[arg(long, default_value = "0s", value_parser = |s: &str| crate::app::parse_duration("--soak", s))]
        soak: Duration,
        /// Do not order the failed waves back (each device to its own last committed release) when the
        /// rollout pauses
        #[arg(long)]
        no_rollback: bool,
        /// A device not heard from for this long while the rollout waits for it is timed out, and counts as
        /// failed ("0s": wait for ever)
        #[arg(long, default_value = "30m", value_parser = |s: &str| crate::app::parse_duration("--device-timeout", s))]
        device_timeout: Duration,
        /// Leave timed-out devices out instead of counting them as failed
        #[arg(long)]
        skip_timed_out: bool,
    },
    Status {
        id: u64,
    },
    List,
    Pause {
        id: u64,
    },
    Resume {
        id: u64,
    },
    Abort {
        id: u64,
    },
    /// Order the rollout's failed and timed-out devices to try its release again (lifts a pause by the failure
    /// threshold)
    Retry {
        id: u64,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ServerCliError {
    #[error(transparent)]
    Db(#[from] ServerDbError),
    #[error(transparent)]
    Tls(#[from] crate::server::tls::TlsError),
    #[error(
        "refusing plain HTTP on {0}, which is not a loopback address: devices would send their credentials in \
         clear. Give --tls-cert and --tls-key, or put a TLS proxy in front and pass --insecure-http"
    )]
    PlainHttp(std::net::SocketAddr),
    #[error(
        "refusing --metrics-listen {0}, which is not a loopback address: it answers /metrics to anyone, without a \
         token. Scrape /metrics on the main listener with the admin token instead (Prometheus: \
         authorization.credentials_file = the admin-token file), or keep --metrics-listen on 127.0.0.1"
    )]
    MetricsNotLoopback(std::net::SocketAddr),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    #[error("cannot reach the fleet server at {url}: {message}")]
    Unreachable { url: String, message: String },
    #[error("the fleet server refused: {0}")]
    Refused(String),
    #[error(
        "cannot read the admin token from {path}: {source}; pass --token-file or set FLOTILLA_ADMIN_TOKEN_FILE"
    )]
    NoToken {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Usage(String),
}

impl ServerCliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            ServerCliError::Usage(_) => 2,
            _ => 1,
        }
    }
}

pub fn run(cli: Cli) -> Result<ExitCode, ServerCliError> {
    match &cli.command {
        Command::Serve(args) => serve_runtime(args.db_connections)?
            .block_on(serve::serve(args, cli.token_file.as_deref())),
        _ => crate::cli::runtime()
            .map_err(|e| ServerCliError::Usage(e.to_string()))?
            .block_on(operate::operate(&cli)),
    }
}

/// The server's runtime: the async workers of every command's, and blocking threads bounded by what can use them.
/// All database work runs on blocking threads, where it waits for one of at most `db_connections` connections (or
/// SQLite's writer and 8 readers). tokio's default bound of 512 let a fleet-wide order's wake-up start 512 threads
/// that only waited, each with its stack and malloc arena: a replica stayed at 870 MiB afterwards. Work past the
/// bound waits in tokio's queue, a few bytes a task; each thread it waits for already holds what it needs.
fn serve_runtime(db_connections: u32) -> Result<tokio::runtime::Runtime, ServerCliError> {
    crate::sys::limit_malloc_arenas(2);
    let blocking = (db_connections as usize).max(16) * 2;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(crate::cli::runtime_workers())
        .max_blocking_threads(blocking)
        .enable_all()
        .build()
        .map_err(|e| ServerCliError::Usage(format!("cannot start the async runtime: {e}")))
}

fn admin_token_path(db: &Path) -> PathBuf {
    db.with_file_name("admin-token")
}
