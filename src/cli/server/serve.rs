//! `flotilla-server serve`: opens the database, makes the admin token on first start, and runs the API (and the
//! token-less `/metrics` listener) until SIGTERM or Ctrl-C.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use super::{DEFAULT_DB, DEFAULT_LISTEN, ServerCliError, admin_token_path};
use crate::clock::{Clock, SystemClock};
use crate::server::api;
use crate::server::resolve::RegistryResolver;
use crate::server::store::{Database, DbUrl};

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    #[arg(long, default_value = DEFAULT_LISTEN)]
    pub listen: std::net::SocketAddr,
    /// The database: a SQLite file (a path or sqlite:///path; made when needed), or a PostgreSQL URL
    /// (postgres://user:password@host:port/db?sslmode=verify-full) that any number of replicas share. Either is
    /// migrated at start. From the environment, a URL's password stays out of the process list
    #[arg(
        long,
        env = "FLOTILLA_SERVER_DB",
        hide_env_values = true,
        default_value = DEFAULT_DB,
        value_name = "PATH|URL"
    )]
    pub db: DbUrl,
    /// PostgreSQL connections this replica holds at most
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub db_connections: u32,
    /// Serve HTTPS with this certificate chain (PEM)
    #[arg(long, requires = "tls_key", value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM: PKCS#8, PKCS#1 or SEC1)
    #[arg(long, requires = "tls_cert", value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// Serve plain HTTP on an address that is not loopback (the devices' credentials then cross the network in
    /// clear; for a TLS proxy in front)
    #[arg(long, conflicts_with = "tls_cert")]
    pub insecure_http: bool,
    /// A registry reached over plain HTTP when releases are resolved (repeatable)
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
    pub insecure_registries: Vec<String>,
    /// How often rollouts are re-planned (soak timers); reports re-plan their apps' rollouts at once
    #[arg(long, default_value = "2s", value_parser = |s: &str| crate::app::parse_duration("--tick", s))]
    pub tick: Duration,
    /// A request's head must arrive within this of its first byte, or the connection is closed
    #[arg(long, default_value = "10s", value_parser = |s: &str| positive("--header-timeout", s))]
    pub header_timeout: Duration,
    /// A kept-alive connection with no request begun is closed after this (above the agents' heartbeat interval)
    #[arg(long, default_value = "120s", value_parser = |s: &str| positive("--idle-timeout", s))]
    pub idle_timeout: Duration,
    /// A whole request, body included, must be done within this (408); a long poll's wait comes on top
    #[arg(long, default_value = "30s", value_parser = |s: &str| positive("--request-timeout", s))]
    pub request_timeout: Duration,
    /// Connections open at once; more wait in the listen backlog (the descriptor limit must be above it)
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Requests a second allowed per device credential and per admin token, on average (429 with Retry-After
    /// beyond)
    #[arg(long, default_value_t = 20.0, value_parser = rate)]
    pub rate_limit: f64,
    /// Requests per credential allowed at once, above the average rate
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    pub rate_burst: u32,
    /// How often last_seen and heartbeat metrics are written (a device at most once per interval)
    #[arg(long, default_value = "5s", value_parser = |s: &str| positive("--flush-interval", s))]
    pub flush_interval: Duration,
    /// Events received longer ago than this are deleted (checked hourly)
    #[arg(long, default_value = "720h", value_parser = |s: &str| positive("--event-retention", s))]
    pub event_retention: Duration,
    /// Also serve /metrics without a token on this loopback address, for a Prometheus on this host (the main
    /// listener's /metrics takes the admin token)
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

impl ServeArgs {
    pub fn limits(&self) -> api::Limits {
        api::Limits {
            header_timeout: self.header_timeout,
            idle_timeout: self.idle_timeout,
            request_timeout: self.request_timeout,
            max_connections: self.max_connections as usize,
            rate: crate::server::ratelimit::Rate {
                per_second: self.rate_limit,
                burst: self.rate_burst,
            },
            flush_interval: self.flush_interval,
            event_retention: self.event_retention,
        }
    }
}

/// A duration above zero: a zero timeout or interval would refuse everything, or spin.
fn positive(what: &'static str, s: &str) -> Result<Duration, String> {
    match crate::app::parse_duration(what, s) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err(format!("{what} must be above zero")),
        Err(e) => Err(e.to_string()),
    }
}

fn rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        _ => Err(format!(
            "--rate-limit must be a number of requests a second above zero, not {s:?}"
        )),
    }
}

/// Where `serve` writes a new admin token: `--token-file`, else beside a SQLite database, else where operator
/// commands look by default.
fn token_path(args: &ServeArgs, token_file: Option<&Path>) -> PathBuf {
    match (token_file, &args.db) {
        (Some(path), _) => path.to_path_buf(),
        (None, DbUrl::Sqlite(db)) => admin_token_path(db),
        (None, DbUrl::Postgres(_)) => admin_token_path(Path::new(DEFAULT_DB)),
    }
}

pub(super) async fn serve(
    args: &ServeArgs,
    token_file: Option<&Path>,
) -> Result<ExitCode, ServerCliError> {
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(crate::server::tls::server_config(cert, key)?),
        _ => None,
    };
    if tls.is_none() && !args.listen.ip().is_loopback() && !args.insecure_http {
        return Err(ServerCliError::PlainHttp(args.listen));
    }
    if let Some(addr) = args.metrics_listen.filter(|a| !a.ip().is_loopback()) {
        return Err(ServerCliError::MetricsNotLoopback(addr));
    }
    let sqlite_dir = match &args.db {
        DbUrl::Sqlite(path) => path.parent().filter(|d| !d.as_os_str().is_empty()),
        DbUrl::Postgres(_) => None,
    };
    if let Some(dir) = sqlite_dir {
        std::fs::create_dir_all(dir).map_err(|source| ServerCliError::Io {
            what: format!("cannot make {}", dir.display()),
            source,
        })?;
    }
    let clock: std::sync::Arc<dyn Clock> = std::sync::Arc::new(SystemClock);
    let db = Database::open(&args.db, args.db_connections as usize).await?;
    // Storage calls block (PostgreSQL's on its pool): this one runs where blocking is allowed.
    let now = clock.unix_seconds();
    if let Some(token) = tokio::task::block_in_place(|| db.write(|d| d.ensure_admin_token(now)))? {
        let path = token_path(args, token_file);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| ServerCliError::Io {
                what: format!("cannot make {}", dir.display()),
                source,
            })?;
        }
        write_private(&path, &token)?;
        eprintln!(
            "flotilla-server: a new admin token is in {} (operator commands read it from there)",
            path.display()
        );
    }
    let config = crate::config::Config::default();
    let client = crate::registry::RegistryClient::new(&config, &args.insecure_registries)?;
    let server = api::Server::with_limits(
        db,
        Box::new(RegistryResolver::new(client)),
        clock,
        args.limits(),
    );
    let listener = crate::server::listen(args.listen).map_err(|source| ServerCliError::Listen {
        addr: args.listen,
        source,
    })?;
    eprintln!(
        "flotilla-server: serving the fleet API on http://{}/v1",
        args.listen
    );
    let metrics = match args.metrics_listen {
        Some(addr) => {
            let listener = crate::server::listen(addr)
                .map_err(|source| ServerCliError::Listen { addr, source })?;
            eprintln!("flotilla-server: serving /metrics without a token on http://{addr}/metrics");
            Some(tokio::spawn(api::serve_metrics(server.clone(), listener)))
        }
        None => None,
    };
    let shutdown = async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    let served = match tls {
        Some(config) => {
            server.set_tls();
            let listener =
                crate::server::tls::TlsListener::new(listener, config).map_err(|source| {
                    ServerCliError::Listen {
                        addr: args.listen,
                        source,
                    }
                })?;
            api::serve(server.clone(), listener, args.tick, shutdown).await
        }
        None => api::serve(server.clone(), listener, args.tick, shutdown).await,
    };
    if let Some(task) = metrics {
        task.abort();
    }
    served.map_err(|source| ServerCliError::Io {
        what: "serving the API".into(),
        source,
    })?;
    // What the devices' traffic cost the database, for capacity planning (bench/fleet-load.sh reads it).
    let w = server.write_stats();
    eprintln!(
        "flotilla-server: {} heartbeats; {} rows written for last_seen and metrics, in {} transactions",
        w.heartbeats, w.seen_writes, w.flushes
    );
    Ok(ExitCode::SUCCESS)
}

fn write_private(path: &Path, text: &str) -> Result<(), ServerCliError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |source| ServerCliError::Io {
        what: format!("cannot write {}", path.display()),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    f.write_all(format!("{text}\n").as_bytes()).map_err(io)
}
