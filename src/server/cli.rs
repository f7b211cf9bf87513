//! `flotilla-server`: `serve` runs the fleet server; every other command is an operator's client of its API, and
//! `--json` prints the API's own answer.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::api::{self, ResolveError, Resolved, Resolver};
use super::store::{ServerDb, ServerDbError};
use super::views::{
    AppRequest, AppView, DeviceView, ReleaseRequest, ReleaseView, RolloutRequest, RolloutView,
    StateView, TagsRequest, TokenCreated, TokenRequest, TokenView,
};
use crate::cli::run::SettingsArgs;
use crate::clock::{Clock, SystemClock};

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
    Serve(ServeArgs),
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

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    #[arg(long, default_value = DEFAULT_LISTEN)]
    pub listen: std::net::SocketAddr,
    /// The SQLite database (made, and migrated, when needed)
    #[arg(long, default_value = DEFAULT_DB)]
    pub db: PathBuf,
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
            rate: super::ratelimit::Rate {
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

/// `TAG=VALUE` pairs of a flag.
fn tag_pairs(flag: &str, pairs: &[String]) -> Result<BTreeMap<String, String>, ServerCliError> {
    let mut out = BTreeMap::new();
    for s in pairs {
        let (k, v) = s
            .split_once('=')
            .ok_or_else(|| ServerCliError::Usage(format!("{flag} {s:?} is not TAG=VALUE")))?;
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
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
    Tls(#[from] super::tls::TlsError),
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
    let rt = crate::cli::runtime().map_err(|e| ServerCliError::Usage(e.to_string()))?;
    match &cli.command {
        Command::Serve(args) => rt.block_on(serve(args)),
        _ => rt.block_on(operate(&cli)),
    }
}

fn admin_token_path(db: &Path) -> PathBuf {
    db.with_file_name("admin-token")
}

async fn serve(args: &ServeArgs) -> Result<ExitCode, ServerCliError> {
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(super::tls::server_config(cert, key)?),
        _ => None,
    };
    if tls.is_none() && !args.listen.ip().is_loopback() && !args.insecure_http {
        return Err(ServerCliError::PlainHttp(args.listen));
    }
    if let Some(addr) = args.metrics_listen.filter(|a| !a.ip().is_loopback()) {
        return Err(ServerCliError::MetricsNotLoopback(addr));
    }
    if let Some(dir) = args.db.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| ServerCliError::Io {
            what: format!("cannot make {}", dir.display()),
            source,
        })?;
    }
    let clock: std::sync::Arc<dyn Clock> = std::sync::Arc::new(SystemClock);
    let db = ServerDb::open(&args.db)?;
    if let Some(token) = db.ensure_admin_token(clock.unix_seconds())? {
        let path = admin_token_path(&args.db);
        write_private(&path, &token)?;
        eprintln!(
            "flotilla-server: a new admin token is in {} (operator commands read it from there)",
            path.display()
        );
    }
    let config = crate::config::Config::default();
    let client = crate::registry::RegistryClient::new(&config, &args.insecure_registries)?;
    let server =
        api::Server::with_limits(db, Box::new(RegistryResolver(client)), clock, args.limits());
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|source| ServerCliError::Listen {
            addr: args.listen,
            source,
        })?;
    eprintln!(
        "flotilla-server: serving the fleet API on http://{}/v1",
        args.listen
    );
    let metrics = match args.metrics_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
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
            let listener = super::tls::TlsListener::new(listener, config).map_err(|source| {
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
    if let Ok(w) = server.write_stats().await {
        eprintln!(
            "flotilla-server: {} heartbeats; {} rows written for last_seen and metrics, in {} transactions",
            w.heartbeats, w.seen_writes, w.flushes
        );
    }
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

struct RegistryResolver(crate::registry::RegistryClient);

impl Resolver for RegistryResolver {
    fn resolve<'a>(
        &'a self,
        image: &'a str,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Resolved, ResolveError>> + Send + 'a>,
    > {
        Box::pin(async move {
            let reference = image.parse::<crate::registry::Reference>()?;
            let manifest = self.0.fetch_manifest(&reference).await?;
            let pinned = format!("{}@{}", reference.repository(), manifest.digest);
            let mut manifests = BTreeMap::new();
            match &manifest.content {
                crate::registry::ManifestContent::Index(index) => {
                    for d in &index.manifests {
                        let Some(p) = d
                            .other
                            .get("platform")
                            .and_then(crate::platform::Platform::from_oci_json)
                        else {
                            continue;
                        };
                        // Attestation entries of buildx are `unknown/unknown`: nothing a device runs.
                        if p.os == "unknown" {
                            continue;
                        }
                        manifests
                            .entry(p.to_string())
                            .or_insert_with(|| d.digest.to_string());
                    }
                }
                crate::registry::ManifestContent::Image(_) => {
                    return Err(ResolveError::SinglePlatform);
                }
            }
            if manifests.is_empty() {
                return Err(ResolveError::NoPlatform);
            }
            Ok(Resolved { pinned, manifests })
        })
    }
}

struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    fn new(cli: &Cli) -> Result<Client, ServerCliError> {
        let path = cli
            .token_file
            .clone()
            .unwrap_or_else(|| admin_token_path(Path::new(DEFAULT_DB)));
        let token = std::fs::read_to_string(&path)
            .map_err(|source| ServerCliError::NoToken {
                path: path.clone(),
                source,
            })?
            .trim()
            .to_string();
        Ok(Client {
            http: crate::fleet::http_client(cli.ca_bundle.as_deref(), Duration::from_secs(60))?,
            base: cli.server.trim_end_matches('/').to_string(),
            token,
        })
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<(T, serde_json::Value), ServerCliError> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url).bearer_auth(&self.token);
        if let Some(b) = body {
            let bytes = serde_json::to_vec(b)
                .map_err(|e| ServerCliError::Usage(format!("cannot encode the request: {e}")))?;
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(bytes);
        }
        let unreachable = |e: reqwest::Error| ServerCliError::Unreachable {
            url: url.clone(),
            message: crate::error_chain(&e),
        };
        let resp = req.send().await.map_err(unreachable)?;
        let status = resp.status();
        let text = resp.text().await.map_err(unreachable)?;
        if !status.is_success() {
            let message = serde_json::from_str::<api::ErrorBody>(&text)
                .map(|e| e.error)
                .unwrap_or(text);
            return Err(ServerCliError::Refused(format!("{status}: {message}")));
        }
        let raw: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ServerCliError::Refused(format!("an answer that is not JSON: {e}")))?;
        let typed = serde_json::from_value(raw.clone()).map_err(|e| {
            ServerCliError::Refused(format!("an answer this CLI does not understand: {e}"))
        })?;
        Ok((typed, raw))
    }
}

const NONE: Option<&()> = None;

async fn operate(cli: &Cli) -> Result<ExitCode, ServerCliError> {
    use reqwest::Method;
    let c = Client::new(cli)?;
    let print_json = |v: &serde_json::Value| {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    };
    match &cli.command {
        Command::Serve(_) => unreachable!("serve is handled by run"),
        Command::Token(TokenCommand::Create {
            expires,
            uses,
            tags,
            device_tags,
        }) => {
            let req = TokenRequest {
                expires_in: expires.0.map(|d| d.as_secs()),
                uses: uses.0,
                tags: tag_pairs("--tag", tags)?,
                device_tags: *device_tags,
            };
            let (t, raw): (TokenCreated, _) =
                c.call(Method::POST, "/v1/tokens", Some(&req)).await?;
            if cli.json {
                print_json(&raw);
            } else {
                // The secret alone on stdout, for `> token-file`; what it allows to stderr.
                println!("{}", t.token);
                eprintln!(
                    "token {}: {}, {}",
                    t.id,
                    match t.uses {
                        Some(n) => format!("{n} use(s)"),
                        None => "unlimited uses".into(),
                    },
                    match t.expires {
                        Some(e) => format!("expires {}", date(e)),
                        None => "never expires".into(),
                    }
                );
            }
        }
        Command::Token(TokenCommand::List) => {
            let (ts, raw): (Vec<TokenView>, _) = c.call(Method::GET, "/v1/tokens", NONE).await?;
            if cli.json {
                print_json(&raw);
            } else {
                print!("{}", tokens_table(&ts, SystemClock.unix_seconds()));
            }
        }
        Command::Token(TokenCommand::Revoke { id }) => {
            let (_, raw): (TokenView, _) = c
                .call(Method::POST, &format!("/v1/tokens/{id}/revoke"), NONE)
                .await?;
            if cli.json {
                print_json(&raw);
            } else {
                println!("revoked token {id}");
            }
        }
        Command::Device(DeviceCommand::Tag { name, set, remove }) => {
            let req = TagsRequest {
                set: tag_pairs("TAG=VALUE", set)?,
                remove: remove.clone(),
            };
            let (d, raw): (DeviceView, _) = c
                .call(
                    Method::POST,
                    &format!("/v1/devices/{name}/tags"),
                    Some(&req),
                )
                .await?;
            if cli.json {
                print_json(&raw);
            } else {
                println!("{}", crate::human::inert(&format_tags(&d.tags)));
            }
        }
        Command::App(app) => match &**app {
            AppCommand::Create { name, settings } => {
                let settings = settings
                    .settings(false)
                    .map_err(|e| ServerCliError::Usage(e.to_string()))?;
                let req = AppRequest {
                    name: name.clone(),
                    settings,
                };
                let (a, raw): (AppView, _) = c.call(Method::POST, "/v1/apps", Some(&req)).await?;
                if cli.json {
                    print_json(&raw);
                } else {
                    println!("{}", a.name);
                }
            }
            AppCommand::List => {
                let (apps, raw): (Vec<AppView>, _) = c.call(Method::GET, "/v1/apps", NONE).await?;
                if cli.json {
                    print_json(&raw);
                } else {
                    let rows: Vec<[String; 2]> = apps
                        .iter()
                        .map(|a| [a.name.clone(), a.settings.restart.to_string()])
                        .collect();
                    print!("{}", crate::cli::table(["APP", "RESTART"], &rows));
                }
            }
        },
        Command::Release(ReleaseCommand::Create { app, image }) => {
            let req = ReleaseRequest {
                app: app.clone(),
                image: image.clone(),
            };
            let (r, raw): (ReleaseView, _) =
                c.call(Method::POST, "/v1/releases", Some(&req)).await?;
            if cli.json {
                print_json(&raw);
            } else {
                println!("{}", r.id);
                for (platform, digest) in &r.manifests {
                    eprintln!("  {platform}  {digest}");
                }
            }
        }
        Command::Release(ReleaseCommand::List) => {
            let (rs, raw): (Vec<ReleaseView>, _) =
                c.call(Method::GET, "/v1/releases", NONE).await?;
            if cli.json {
                print_json(&raw);
            } else {
                let rows: Vec<[String; 4]> = rs
                    .iter()
                    .map(|r| {
                        [
                            r.id.clone(),
                            r.app.clone(),
                            r.image.clone(),
                            r.manifests.keys().cloned().collect::<Vec<_>>().join(", "),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    crate::cli::table(["RELEASE", "APP", "IMAGE", "PLATFORMS"], &rows)
                );
            }
        }
        Command::Rollout(RolloutCommand::Start {
            release,
            select,
            waves,
            counts,
            max_failures,
            soak,
            no_rollback,
            device_timeout,
            skip_timed_out,
        }) => {
            let mut selector = BTreeMap::new();
            for s in select {
                let (k, v) = s.split_once('=').ok_or_else(|| {
                    ServerCliError::Usage(format!("--select {s:?} is not TAG=VALUE"))
                })?;
                selector.insert(k.to_string(), v.to_string());
            }
            let waves = waves
                .iter()
                .map(|w| {
                    let w = w.trim();
                    if *counts || w.ends_with('%') {
                        w.to_string()
                    } else {
                        format!("{w}%")
                    }
                })
                .collect();
            let req = RolloutRequest {
                release: release.clone(),
                select: selector,
                waves,
                max_failures: max_failures.clone(),
                soak_secs: soak.as_secs(),
                rollback: !no_rollback,
                device_timeout_secs: device_timeout.as_secs(),
                skip_timed_out: *skip_timed_out,
            };
            let (r, raw): (RolloutView, _) =
                c.call(Method::POST, "/v1/rollouts", Some(&req)).await?;
            if cli.json {
                print_json(&raw);
            } else {
                println!("{}", r.id);
            }
        }
        Command::Rollout(RolloutCommand::Status { id }) => {
            let (r, raw): (RolloutView, _) = c
                .call(Method::GET, &format!("/v1/rollouts/{id}"), NONE)
                .await?;
            if cli.json {
                print_json(&raw);
            } else {
                print!("{}", describe_rollout(&r));
            }
        }
        Command::Rollout(RolloutCommand::List) => {
            let (rs, raw): (Vec<RolloutView>, _) =
                c.call(Method::GET, "/v1/rollouts", NONE).await?;
            if cli.json {
                print_json(&raw);
            } else {
                let rows: Vec<[String; 4]> = rs
                    .iter()
                    .map(|r| {
                        [
                            r.id.to_string(),
                            r.spec.release.clone(),
                            state_word(&r.status),
                            format!("{}/{}", r.waves_started, r.waves.len()),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    crate::cli::table(["ID", "RELEASE", "STATE", "WAVES"], &rows)
                );
            }
        }
        Command::Rollout(RolloutCommand::Pause { id })
        | Command::Rollout(RolloutCommand::Resume { id })
        | Command::Rollout(RolloutCommand::Abort { id })
        | Command::Rollout(RolloutCommand::Retry { id }) => {
            let action = match &cli.command {
                Command::Rollout(RolloutCommand::Pause { .. }) => "pause",
                Command::Rollout(RolloutCommand::Resume { .. }) => "resume",
                Command::Rollout(RolloutCommand::Retry { .. }) => "retry",
                _ => "abort",
            };
            let (r, raw): (RolloutView, _) = c
                .call(Method::POST, &format!("/v1/rollouts/{id}/{action}"), NONE)
                .await?;
            if cli.json {
                print_json(&raw);
            } else {
                print!("{}", describe_rollout(&r));
            }
        }
        Command::Devices => {
            let (ds, raw): (Vec<DeviceView>, _) = c.call(Method::GET, "/v1/devices", NONE).await?;
            if cli.json {
                print_json(&raw);
            } else {
                print!("{}", devices_table(&ds, SystemClock.unix_seconds()));
            }
        }
        Command::Revoke { name } => {
            let (_, raw): (serde_json::Value, _) = c
                .call(Method::POST, &format!("/v1/devices/{name}/revoke"), NONE)
                .await?;
            if cli.json {
                print_json(&raw);
            } else {
                println!("revoked {name}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn state_word(s: &StateView) -> String {
    match s {
        StateView::Running => "running".into(),
        StateView::Paused { reason } => format!("paused: {}", crate::human::inert(reason)),
        StateView::Aborted => "aborted".into(),
        StateView::Done => "done".into(),
        StateView::Superseded => "superseded by a newer rollout".into(),
    }
}

fn describe_rollout(r: &RolloutView) -> String {
    let mut out = format!(
        "rollout {} of {} ({}): {}\n",
        r.id,
        r.spec.release,
        r.app,
        state_word(&r.status)
    );
    for (k, w) in r.waves.iter().enumerate() {
        let started = if k < r.waves_started {
            "ordered"
        } else {
            "waiting"
        };
        let timed_out = if w.timed_out > 0 {
            format!(", {} timed out", w.timed_out)
        } else {
            String::new()
        };
        out.push_str(&format!(
            "  wave {}: {} devices, {} healthy, {} failed{timed_out} ({started})\n",
            k + 1,
            w.devices.len(),
            w.healthy,
            w.failed
        ));
    }
    if !r.late.is_empty() {
        out.push_str(&format!(
            "  joined the last wave late: {}\n",
            crate::human::inert(&r.late.join(", "))
        ));
    }
    for i in &r.incompatible {
        out.push_str(&format!(
            "  incompatible: {} ({})\n",
            crate::human::inert(&i.device),
            crate::human::inert(&i.platforms.join(", "))
        ));
    }
    let rows: Vec<[String; 2]> = r
        .devices
        .iter()
        .map(|(d, s)| [d.clone(), s.clone()])
        .collect();
    out.push_str(&crate::cli::table(["DEVICE", "PROGRESS"], &rows));
    out
}

fn date(secs: u64) -> String {
    httpdate::fmt_http_date(std::time::UNIX_EPOCH + Duration::from_secs(secs))
}

fn format_tags(tags: &BTreeMap<String, String>) -> String {
    let pairs: Vec<String> = tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
    if pairs.is_empty() {
        "-".into()
    } else {
        pairs.join(",")
    }
}

/// Id, created, expires, uses left, devices enrolled, tags and state: never a secret, which the server does not
/// have.
pub fn tokens_table(tokens: &[TokenView], now: u64) -> String {
    let rows: Vec<[String; 7]> = tokens
        .iter()
        .map(|t| {
            let state = t.state(now).label();
            let mut tags = format_tags(&t.tags);
            if t.device_tags {
                tags.push_str(" (+ the device's)");
            }
            [
                t.id.clone(),
                // Tokens made before the server kept a creation time.
                if t.created == 0 {
                    "-".into()
                } else {
                    date(t.created)
                },
                t.expires.map(date).unwrap_or_else(|| "never".into()),
                t.uses_left
                    .map(|n| n.to_string())
                    .unwrap_or_else(|| "unlimited".into()),
                t.enrolled.to_string(),
                tags,
                state.into(),
            ]
        })
        .collect();
    crate::cli::table(
        [
            "ID",
            "CREATED",
            "EXPIRES",
            "USES LEFT",
            "ENROLLED",
            "TAGS",
            "STATE",
        ],
        &rows,
    )
}

fn ago(now: u64, then: u64) -> String {
    let s = now.saturating_sub(then);
    match s {
        0..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m ago", s / 60),
        3600..=86399 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

/// Name, platform, app, release, state and last seen: one line per device and app.
pub fn devices_table(devices: &[DeviceView], now: u64) -> String {
    let mut rows: Vec<[String; 6]> = Vec::new();
    for d in devices.iter().filter(|d| !d.revoked) {
        let platform = d.platform.candidates.first().cloned().unwrap_or_default();
        let seen = ago(now, d.last_seen);
        if d.apps.is_empty() {
            rows.push([
                d.name.clone(),
                platform,
                "-".into(),
                "-".into(),
                "-".into(),
                seen,
            ]);
            continue;
        }
        for a in &d.apps {
            let status = a.status.as_ref();
            let release = status
                .and_then(|s| s.release.clone())
                .unwrap_or_else(|| "-".into());
            let mut state = status
                .map(|s| s.state.clone())
                .unwrap_or_else(|| "-".into());
            if let Some(h) = status.and_then(|s| s.health.as_ref()) {
                state = format!("{state} ({h})");
            }
            if let Some(w) = status.and_then(|s| s.wrong_variant.as_ref()) {
                state = format!("{state}; wrong variant: {w}");
            }
            if let Some(want) = a
                .desired
                .as_ref()
                .filter(|w| Some(*w) != status.and_then(|s| s.release.as_ref()))
            {
                state = format!("{state} → {want}");
            }
            let variant = match (
                status.and_then(|s| s.platform.as_ref()),
                status.and_then(|s| s.manifest.as_ref()),
            ) {
                (Some(p), Some(m)) => format!("{release} ({p} {})", short(m)),
                (None, Some(m)) => format!("{release} ({})", short(m)),
                _ => release,
            };
            rows.push([
                d.name.clone(),
                platform.clone(),
                a.app.clone(),
                variant,
                state,
                seen.clone(),
            ]);
        }
    }
    crate::cli::table(
        ["DEVICE", "PLATFORM", "APP", "RELEASE", "STATE", "LAST SEEN"],
        &rows,
    )
}

fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    &hex[..hex.len().min(12)]
}
