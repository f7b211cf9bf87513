//! A fleet of simulated devices against a running flotilla-server, speaking the real protocol (`flotilla::fleet`).
//!
//! Each device enrolls (at most `--enroll-concurrency` at once), then sends one heartbeat report every
//! `--interval`; device `i` starts at `interval * i / devices`, so the fleet's reports are spread evenly over the
//! interval and the load is uniform. With `--long-poll` each device also keeps one long poll of its desired state
//! open (`?wait=--poll-wait` with `If-None-Match`), as the agent does between its reports.
//!
//! Each device has its own HTTP client, so its own keep-alive connection, as an agent has; a long poll needs a
//! second one (HTTP/1.1 carries one request at a time). `--shared-heartbeats` sends every heartbeat through one
//! client instead, whose pool opens only as many connections as are busy at once: that halves the descriptors a
//! long-polling fleet needs, on both ends.
//!
//! Every request's latency is recorded, from the moment it is sent to the end of its answer's body; the run prints
//! count, errors, p50/p90/p99/max and the achieved rate per kind of request. With `--db` it reads the server's
//! database size (logical: `page_count * page_size`, WAL included) after enrollment, after the first heartbeat
//! round and at the end; with `--server-pid`, the server's CPU time and memory over the run.
//!
//! `--server` may be repeated (replicas sharing one PostgreSQL database): device `i` enrolls, reports and polls at
//! the `i % N`th only, as behind a load balancer with keep-alive. `--pg-pid` and `--pg-stats` add PostgreSQL's CPU
//! and its commits and row writes per heartbeat. `--order` (the wake-up) runs a command that orders a release to
//! every device once all hold their long poll, and prints how long after it 50/90/99/100 % of them had it.
//!
//! bench/fleet-load.sh builds and starts everything; alone:
//!
//!     cargo run --release --example fleet-load -- --server http://127.0.0.1:8470 --token-file T --devices 1000

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Parser;
use flotilla::fleet::{
    Accepted, Desired, EnrollRequest, Enrolled, Event, EventBody, Metrics, PlatformReport,
    ReportBatch,
};
use reqwest::{StatusCode, header};
use tokio::time::Instant;

#[derive(Parser)]
#[command(about = "Simulated devices speaking the fleet protocol to a flotilla-server")]
struct Args {
    /// The server's base URL; repeated for replicas, device `i` talks to the `i % N`th only (as behind a load
    /// balancer with keep-alive)
    #[arg(long, required_unless_present = "merge")]
    server: Vec<String>,
    /// A file holding an enrollment token good for --devices enrollments
    #[arg(long, required_unless_present = "merge")]
    token_file: Option<PathBuf>,
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// How long the heartbeat phase runs, after enrollment
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Seconds between one device's heartbeats
    #[arg(long, default_value_t = 10)]
    interval: u64,
    #[arg(long, default_value_t = 16)]
    enroll_concurrency: usize,
    /// Each device also holds a long poll of its desired state
    #[arg(long)]
    long_poll: bool,
    /// The long poll's wait, in seconds (the agent's default poll_interval is 30 s)
    #[arg(long, default_value_t = 30)]
    poll_wait: u64,
    /// Send heartbeats through one shared client instead of one connection per device
    #[arg(long)]
    shared_heartbeats: bool,
    /// Device names are PREFIX-00000, PREFIX-00001…
    #[arg(long, default_value = "load")]
    prefix: String,
    /// The server's SQLite database, to read its size (read-only)
    #[arg(long)]
    db: Option<PathBuf>,
    /// The server's process id, to read its CPU time and memory; repeated, in --server's order
    #[arg(long)]
    server_pid: Vec<u32>,
    /// Bind device `i`'s connections to 127.0.0.(2 + i % N): one source address has only ~64,000 ports, too few
    /// for 100,000 devices with two connections each
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=250))]
    local_addresses: u8,
    /// PostgreSQL's postmaster: its CPU and its backends' (live ones, and reaped ones through its children's
    /// times) over the run
    #[arg(long)]
    pg_pid: Option<u32>,
    /// A shell command printing the database's `xact_commit tup_inserted tup_updated tup_deleted` (from
    /// pg_stat_database), run before and after the run: the writes per heartbeat
    #[arg(long)]
    pg_stats: Option<String>,
    /// Wake-up: once every device holds its long poll, run this shell command (it orders a release to every
    /// device, through the admin API) and time until each device's poll brings the release --order-release
    #[arg(long, requires_all = ["order_release", "long_poll"])]
    order: Option<String>,
    /// The release --order gives, as the desired state names it
    #[arg(long, requires = "order")]
    order_release: Option<String>,
    /// Worker threads of this generator's runtime
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Also write every request's kind, latency and error to FILE, for --merge
    #[arg(long)]
    samples: Option<PathBuf>,
    /// Print the tables and targets of several generators' --samples files as one fleet (a process holds only so
    /// many connections: 100,000 long polls take several generators), and run nothing
    #[arg(long, num_args = 1.., conflicts_with_all = ["server", "token_file"])]
    merge: Vec<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Enroll,
    Heartbeat,
    /// A poll answered at once (the first one, with no ETag yet): a database read and a body.
    Desired,
    /// A poll the server held for its wait and answered 304.
    LongPoll,
    /// A held poll answered with a new desired state (the wake-up's order).
    Changed,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Enroll => "enroll",
            Kind::Heartbeat => "heartbeat",
            Kind::Desired => "desired (immediate)",
            Kind::LongPoll => "long poll (held)",
            Kind::Changed => "long poll (changed)",
        }
    }
}

struct Sample {
    kind: Kind,
    latency: Duration,
    /// How late the request was sent after its scheduled time: the generator keeping up, or not.
    lag: Duration,
    error: Option<String>,
}

#[derive(Default)]
struct Recorder {
    samples: Mutex<Vec<Sample>>,
}

impl Recorder {
    fn record(&self, kind: Kind, latency: Duration, lag: Duration, error: Option<String>) {
        let mut s = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        s.push(Sample {
            kind,
            latency,
            lag,
            error,
        });
    }

    fn take(&self) -> Vec<Sample> {
        std::mem::take(&mut *self.samples.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// One client per device: its own keep-alive connection, plain HTTP on loopback, rustls set up as the agent's
/// (no roots: nothing here speaks TLS).
fn client(
    tls: &rustls::ClientConfig,
    timeout: Duration,
    local: Option<IpAddr>,
) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .use_preconfigured_tls(tls.clone())
        .local_address(local)
        .connect_timeout(Duration::from_secs(10))
        .timeout(timeout)
        .user_agent("flotilla/fleet-load")
        .build()
        .map_err(|e| format!("cannot build an HTTP client: {e}"))
}

fn error_text(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

async fn enroll(
    http: &reqwest::Client,
    server: &str,
    token: &str,
    name: String,
) -> Result<Enrolled, String> {
    let req = EnrollRequest {
        name,
        tags: [("site".to_string(), "load".to_string())].into(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        platform: PlatformReport {
            candidates: vec!["linux/arm/v7".into(), "linux/arm/v6".into()],
            page_size: Some(4096),
            description: "Raspberry Pi 3 Model B Rev 1.2, Raspbian 12 armhf (simulated)".into(),
        },
        enrollment_id: Some(EnrollRequest::new_enrollment_id()),
    };
    let resp = http
        .post(format!("{server}/v1/enroll"))
        .bearer_auth(token)
        .header(header::CONTENT_TYPE, "application/json")
        .body(serde_json::to_vec(&req).map_err(|e| e.to_string())?)
        .send()
        .await
        .map_err(|e| error_text(&e))?;
    let status = resp.status();
    let body = resp.bytes().await.map_err(|e| error_text(&e))?;
    if status != StatusCode::CREATED {
        return Err(format!("{status}: {}", String::from_utf8_lossy(&body)));
    }
    serde_json::from_slice(&body).map_err(|e| format!("a garbled enrollment: {e}"))
}

fn heartbeat(seq: u64) -> ReportBatch {
    // What a Pi reports: every field present, so the body is as large as a real one.
    let jitter = (seq % 7) as f32;
    ReportBatch {
        events: vec![Event {
            id: format!("hb-{seq}"),
            at: unix_now(),
            seq: None,
            body: EventBody::Heartbeat(Metrics {
                cpu_percent: Some(12.5 + jitter),
                memory_used: Some(183_500_800 + seq * 4096),
                memory_total: Some(969_748_480),
                disk_used: Some(3_221_225_472),
                disk_total: Some(15_634_268_160),
                uptime: Some(86_400 + seq * 10),
                load: Some([0.42, 0.37, 0.31]),
                temperature_celsius: Some(48.3 + jitter / 10.0),
                dead_letters: None,
                outbox_pending: Some(1),
                outbox_oldest_age_secs: Some(0),
            }),
        }],
    }
}

async fn report(
    http: &reqwest::Client,
    server: &str,
    credential: &str,
    seq: u64,
) -> Result<(), String> {
    let batch = heartbeat(seq);
    let resp = http
        .post(format!("{server}/v1/device/reports"))
        .bearer_auth(credential)
        .header(header::CONTENT_TYPE, "application/json")
        .body(serde_json::to_vec(&batch).map_err(|e| e.to_string())?)
        .send()
        .await
        .map_err(|e| error_text(&e))?;
    let status = resp.status();
    let body = resp.bytes().await.map_err(|e| error_text(&e))?;
    if status != StatusCode::OK {
        return Err(format!("{status}: {}", String::from_utf8_lossy(&body)));
    }
    let accepted: Accepted =
        serde_json::from_slice(&body).map_err(|e| format!("a garbled answer: {e}"))?;
    if accepted.accepted != [batch.events[0].id.clone()] {
        return Err(format!("the server took {:?}", accepted.accepted));
    }
    Ok(())
}

/// One poll: `Ok(Some((etag, has)))` for a 200, `has` telling whether the desired state names the release `want`;
/// `Ok(None)` for a 304.
async fn poll(
    http: &reqwest::Client,
    server: &str,
    credential: &str,
    etag: Option<&str>,
    wait: u64,
    want: Option<&str>,
) -> Result<Option<(String, bool)>, String> {
    let mut req = http
        .get(format!("{server}/v1/device/desired?wait={wait}"))
        .bearer_auth(credential);
    if let Some(t) = etag {
        req = req.header(header::IF_NONE_MATCH, t);
    }
    let resp = req.send().await.map_err(|e| error_text(&e))?;
    let status = resp.status();
    let tag = resp
        .headers()
        .get(header::ETAG)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = resp.bytes().await.map_err(|e| error_text(&e))?;
    match status {
        StatusCode::NOT_MODIFIED => Ok(None),
        StatusCode::OK => {
            let tag = tag.ok_or_else(|| "a 200 without an ETag".to_string())?;
            let has = match want {
                Some(release) => serde_json::from_slice::<Desired>(&body)
                    .map_err(|e| format!("a garbled desired state: {e}"))?
                    .apps
                    .iter()
                    .any(|a| a.release == release),
                None => false,
            };
            Ok(Some((tag, has)))
        }
        _ => Err(format!("{status}: {}", String::from_utf8_lossy(&body))),
    }
}

/// The server's database size: logical bytes (`page_count * page_size`, what the WAL holds included) and the
/// bytes of its files on disk (database and WAL).
fn db_size(path: &Path) -> Result<(u64, u64), String> {
    let conn = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| format!("{}: {e}", path.display()))?;
    let logical: u64 = conn
        .query_row(
            "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()",
            [],
            |r| r.get(0),
        )
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let on_disk = ["", "-wal"]
        .iter()
        .filter_map(|s| {
            let mut p = path.as_os_str().to_owned();
            p.push(s);
            std::fs::metadata(p).ok()
        })
        .map(|m| m.len())
        .sum();
    Ok((logical, on_disk))
}

/// The fields of /proc/PID/stat after the command name (which may hold spaces, closed by the last ')'): the
/// state is field 0, the parent 1, utime 11, stime 12, the reaped children's cutime 13 and cstime 14.
fn stat_fields(pid: &str) -> Option<Vec<u64>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    // The state is a letter: it reads as 0, which no caller uses.
    Some(rest.split(' ').map(|f| f.parse().unwrap_or(0)).collect())
}

fn ticks_to_seconds(ticks: u64) -> f64 {
    ticks as f64 / rustix::param::clock_ticks_per_second() as f64
}

/// CPU seconds of a process and of its children, the live ones and those it reaped: PostgreSQL's, whose
/// postmaster forks a backend per connection.
fn tree_cpu(pid: u32) -> Option<f64> {
    let own = stat_fields(&pid.to_string())?;
    let mut ticks = own.get(11..15)?.iter().sum::<u64>();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        let Some(child) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        if let Some(f) = stat_fields(child).filter(|f| f.get(1) == Some(&u64::from(pid))) {
            ticks += f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
        }
    }
    Some(ticks_to_seconds(ticks))
}

/// `xact_commit tup_inserted tup_updated tup_deleted`, as the --pg-stats command prints them.
fn pg_stats(command: &str) -> Result<[u64; 4], String> {
    let out = std::process::Command::new("sh")
        .args(["-c", command])
        .output()
        .map_err(|e| format!("cannot run --pg-stats: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let numbers: Vec<u64> = text
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    match (out.status.success(), <[u64; 4]>::try_from(numbers)) {
        (true, Ok(n)) => Ok(n),
        _ => Err(format!(
            "--pg-stats printed {text:?} ({}), not four numbers: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

/// CPU seconds (user + system) and VmRSS/VmHWM in KiB of a process, from /proc.
fn process_usage(pid: &str) -> Option<(f64, u64, u64)> {
    let f = stat_fields(pid)?;
    let ticks = f.get(11)? + f.get(12)?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    };
    Some((ticks_to_seconds(ticks), kib("VmRSS:")?, kib("VmHWM:")?))
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

/// Nearest-rank percentile of sorted values.
fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Prints one line per kind of request; returns `target`'s p99.
fn print_table(samples: &[Sample], seconds: f64, target: Kind) -> Option<Duration> {
    let mut by_kind: BTreeMap<Kind, Vec<&Sample>> = BTreeMap::new();
    for s in samples {
        by_kind.entry(s.kind).or_default().push(s);
    }
    println!(
        "{:<20} {:>8} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "request", "count", "errors", "p50 ms", "p90 ms", "p99 ms", "max ms", "req/s"
    );
    let mut p99 = None;
    for (kind, list) in &by_kind {
        let mut ok: Vec<Duration> = list
            .iter()
            .filter(|s| s.error.is_none())
            .map(|s| s.latency)
            .collect();
        ok.sort();
        let errors = list.len() - ok.len();
        if *kind == target {
            p99 = Some(pct(&ok, 99.0));
        }
        println!(
            "{:<20} {:>8} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9.1}",
            kind.name(),
            list.len(),
            errors,
            ms(pct(&ok, 50.0)),
            ms(pct(&ok, 90.0)),
            ms(pct(&ok, 99.0)),
            ms(ok.last().copied().unwrap_or_default()),
            list.len() as f64 / seconds,
        );
    }
    let mut errors: BTreeMap<&str, usize> = BTreeMap::new();
    for s in samples {
        if let Some(e) = &s.error {
            *errors.entry(e.as_str()).or_default() += 1;
        }
    }
    for (e, n) in errors.iter().take(5) {
        println!("  error x{n}: {e}");
    }
    p99
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.workers.max(1))
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
        .and_then(|rt| {
            if args.merge.is_empty() {
                rt.block_on(run(args))
            } else {
                merge(&args.merge)
            }
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleet-load: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Device `i`'s source address with `--local-addresses n`: 127.0.0.(2 + i % n).
fn local_address(i: usize, n: u8) -> Option<IpAddr> {
    (n > 0).then(|| {
        let k = (i % usize::from(n)) as u8;
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + k))
    })
}

/// The wake-up: when the order was sent, and how long after it each device's poll brought the release.
#[derive(Default)]
struct Wake {
    ordered: OnceLock<Instant>,
    got: Mutex<Vec<Duration>>,
}

async fn run(args: Args) -> Result<(), String> {
    let servers: Vec<String> = args
        .server
        .iter()
        .map(|s| s.trim_end_matches('/').to_string())
        .collect();
    let token_file = args
        .token_file
        .as_deref()
        .ok_or("--token-file is needed to enroll")?;
    let token = std::fs::read_to_string(token_file)
        .map_err(|e| format!("{}: {e}", token_file.display()))?
        .trim()
        .to_string();
    let n = args.devices;
    let conns_per_device = usize::from(!args.shared_heartbeats) + usize::from(args.long_poll);
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX);
    let needed = (n * conns_per_device + 256) as u64;
    if needed > limit {
        return Err(format!(
            "{n} devices with {conns_per_device} connection(s) each need about {needed} descriptors, above this \
             process's limit of {limit}: raise it (ulimit -n), or pass --shared-heartbeats"
        ));
    }
    let interval = Duration::from_secs(args.interval.max(1));
    let run_for = Duration::from_secs(args.seconds);
    // Every device's first poll starts within the first interval; the order comes once they are all held.
    let order_after = interval + Duration::from_secs(5);
    if args.order.is_some() && order_after + Duration::from_secs(10) > run_for {
        return Err(format!(
            "--order is sent {} s into the run (once every device holds its poll): --seconds must be above {}",
            order_after.as_secs(),
            order_after.as_secs() + 10
        ));
    }
    let tls = flotilla::registry::tls::client_config(&[], &[]).map_err(|e| e.to_string())?;
    let recorder = Arc::new(Recorder::default());
    let pids: Vec<String> = args.server_pid.iter().map(u32::to_string).collect();
    println!(
        "fleet-load: {n} devices over {} server(s), a heartbeat every {} s each ({:.0}/s expected), {} s run, long \
         polls {}, heartbeats over {}, {}",
        servers.len(),
        args.interval,
        n as f64 / args.interval as f64,
        args.seconds,
        if args.long_poll {
            format!("ON (one per device, wait={} s)", args.poll_wait)
        } else {
            "OFF".to_string()
        },
        if args.shared_heartbeats {
            "one shared client pool"
        } else {
            "one keep-alive connection per device"
        },
        match args.local_addresses {
            0 => "from 127.0.0.1".to_string(),
            k => format!("from 127.0.0.2..=127.0.0.{}", 1 + k),
        },
    );

    let shared = args
        .shared_heartbeats
        .then(|| client(&tls, Duration::from_secs(10), None))
        .transpose()?;
    // Enrollment, bounded.
    let started = Instant::now();
    let gate = Arc::new(tokio::sync::Semaphore::new(args.enroll_concurrency.max(1)));
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let permit = gate
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| e.to_string())?;
        // A shared pool enrolls too: a client per device would keep a connection per device open after it.
        let http = match &shared {
            Some(shared) => shared.clone(),
            None => client(
                &tls,
                Duration::from_secs(60),
                local_address(i, args.local_addresses),
            )?,
        };
        let (server, token, rec) = (
            servers[i % servers.len()].clone(),
            token.clone(),
            recorder.clone(),
        );
        let name = format!("{}-{i:05}", args.prefix);
        set.spawn(async move {
            let t = Instant::now();
            let r = enroll(&http, &server, &token, name).await;
            rec.record(
                Kind::Enroll,
                t.elapsed(),
                Duration::ZERO,
                r.as_ref().err().cloned(),
            );
            drop(permit);
            (i, http, r.ok())
        });
    }
    let mut devices: Vec<Option<(reqwest::Client, Enrolled)>> = (0..n).map(|_| None).collect();
    while let Some(joined) = set.join_next().await {
        let (i, http, enrolled) = joined.map_err(|e| e.to_string())?;
        devices[i] = enrolled.map(|e| (http, e));
    }
    let enroll_secs = started.elapsed().as_secs_f64();
    let enroll_samples = recorder.take();
    println!("\n== enrollment: {n} devices in {enroll_secs:.1} s");
    let enroll_p99 = print_table(&enroll_samples, enroll_secs, Kind::Enroll);
    let enroll_failed = enroll_samples.iter().any(|s| s.error.is_some());
    // Devices keep their index: device i talks to server i % N, through source address i % local_addresses.
    let devices: Vec<(usize, reqwest::Client, Enrolled)> = devices
        .into_iter()
        .enumerate()
        .filter_map(|(i, d)| d.map(|(http, e)| (i, http, e)))
        .collect();
    if devices.is_empty() {
        return Err("no device enrolled".into());
    }
    let db_enrolled = args.db.as_deref().map(db_size).transpose()?;

    // The run: device i's heartbeats at t0 + interval * i / n + k * interval, for as long as they fall before the end.
    let t0 = Instant::now() + Duration::from_secs(1);
    let end = t0 + run_for;
    let servers_before: Vec<_> = pids.iter().map(|p| process_usage(p)).collect();
    let self_before = process_usage("self");
    let pg_before = args.pg_pid.and_then(tree_cpu);
    let stats_before = args.pg_stats.as_deref().map(pg_stats).transpose()?;
    let wake = Arc::new(Wake::default());
    let mut heartbeats = tokio::task::JoinSet::new();
    let mut polls = tokio::task::JoinSet::new();
    let count = devices.len();
    for (i, own, enrolled) in devices {
        let offset = interval.mul_f64(i as f64 / n as f64);
        let server = servers[i % servers.len()].clone();
        // `own` is the shared client with --shared-heartbeats.
        let http = own;
        let credential = enrolled.credential;
        if args.long_poll {
            let http = client(
                &tls,
                Duration::from_secs(args.poll_wait + 30),
                local_address(i, args.local_addresses),
            )?;
            let (server, credential, rec, wait, wake) = (
                server.clone(),
                credential.clone(),
                recorder.clone(),
                args.poll_wait,
                wake.clone(),
            );
            let want = args.order_release.clone();
            polls.spawn(async move {
                tokio::time::sleep_until(t0 + offset).await;
                let mut etag: Option<String> = None;
                let mut has = false;
                while Instant::now() < end {
                    let sent = Instant::now();
                    let r = poll(
                        &http,
                        &server,
                        &credential,
                        etag.as_deref(),
                        wait,
                        want.as_deref(),
                    )
                    .await;
                    let kind = match (&etag, &r) {
                        (Some(_), Ok(None)) => Kind::LongPoll,
                        (Some(_), Ok(Some(_))) => Kind::Changed,
                        _ => Kind::Desired,
                    };
                    rec.record(
                        kind,
                        sent.elapsed(),
                        Duration::ZERO,
                        r.as_ref().err().cloned(),
                    );
                    match r {
                        Ok(Some((tag, now_has))) => {
                            if now_has && !has {
                                if let Some(at) = wake.ordered.get() {
                                    let took = at.elapsed();
                                    wake.got
                                        .lock()
                                        .unwrap_or_else(|e| e.into_inner())
                                        .push(took);
                                }
                            }
                            has = now_has;
                            etag = Some(tag);
                        }
                        Ok(None) => {}
                        // As the agent: back off before trying again.
                        Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
                    }
                }
            });
        }
        let rec = recorder.clone();
        heartbeats.spawn(async move {
            let mut at = t0 + offset;
            let mut seq = 0u64;
            while at < end {
                tokio::time::sleep_until(at).await;
                let sent = Instant::now();
                let r = report(&http, &server, &credential, seq).await;
                rec.record(Kind::Heartbeat, sent.elapsed(), sent - at, r.err());
                seq += 1;
                at += interval;
            }
        });
    }
    let order = args.order.clone().map(|command| {
        let wake = wake.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(t0 + order_after).await;
            let sent = Instant::now();
            let _ = wake.ordered.set(sent);
            let out = tokio::task::spawn_blocking(move || {
                std::process::Command::new("sh")
                    .args(["-c", &command])
                    .output()
            })
            .await;
            (sent.elapsed(), out)
        })
    });
    let mut first_round = None;
    tokio::time::sleep_until(t0 + interval).await;
    if let Some(db) = &args.db {
        first_round = Some(db_size(db)?);
    }
    // Heartbeats end by themselves (their timeout is 10 s); long polls still held at the end are dropped uncounted.
    let deadline = end + Duration::from_secs(15);
    while tokio::time::timeout_at(deadline, heartbeats.join_next())
        .await
        .ok()
        .flatten()
        .is_some()
    {}
    let unfinished = heartbeats.len();
    heartbeats.abort_all();
    polls.abort_all();
    let servers_after: Vec<_> = pids.iter().map(|p| process_usage(p)).collect();
    let self_after = process_usage("self");
    let pg_after = args.pg_pid.and_then(tree_cpu);
    let stats_after = args.pg_stats.as_deref().map(pg_stats).transpose()?;
    let secs = run_for.as_secs_f64();
    let samples = recorder.take();
    println!("\n== run: {secs:.0} s (heartbeats not finished 15 s after the end: {unfinished})");
    let p99 = print_table(&samples, secs, Kind::Heartbeat);
    let mut lags: Vec<Duration> = samples
        .iter()
        .filter(|s| s.kind == Kind::Heartbeat)
        .map(|s| s.lag)
        .collect();
    lags.sort();
    println!(
        "all requests: {} in {secs:.0} s = {:.1} req/s; heartbeat send lag behind schedule p99 {} ms, max {} ms",
        samples.len(),
        samples.len() as f64 / secs,
        ms(pct(&lags, 99.0)),
        ms(lags.last().copied().unwrap_or_default()),
    );
    let cpu = |before: Option<(f64, u64, u64)>, after: Option<(f64, u64, u64)>, who: &str| {
        if let (Some(b), Some(a)) = (before, after) {
            println!(
                "{who}: CPU {:.1} s over the run = {:.0}% of one core; VmRSS {:.1} MiB, VmHWM {:.1} MiB",
                a.0 - b.0,
                (a.0 - b.0) / secs * 100.0,
                a.1 as f64 / 1024.0,
                a.2 as f64 / 1024.0
            );
        }
    };
    for (k, (before, after)) in servers_before.into_iter().zip(servers_after).enumerate() {
        let who = if pids.len() == 1 {
            "server   ".to_string()
        } else {
            format!("server {k} ({})", servers.get(k).map_or("", String::as_str))
        };
        cpu(before, after, &who);
    }
    cpu(self_before, self_after, "generator");
    if let (Some(b), Some(a)) = (pg_before, pg_after) {
        println!(
            "postgres : CPU {:.1} s over the run = {:.0}% of one core (postmaster and backends)",
            a - b,
            (a - b) / secs * 100.0
        );
    }
    let heartbeats_ok = samples
        .iter()
        .filter(|s| s.kind == Kind::Heartbeat && s.error.is_none())
        .count();
    if let (Some(b), Some(a)) = (stats_before, stats_after) {
        let d: Vec<u64> = a.iter().zip(b).map(|(a, b)| a.saturating_sub(b)).collect();
        let per = |x: u64| x as f64 / heartbeats_ok.max(1) as f64;
        println!(
            "database writes over the run ({heartbeats_ok} heartbeats): {} commits, {} rows inserted, {} updated, \
             {} deleted = per heartbeat {:.4} commits, {:.4} inserted, {:.4} updated, {:.4} deleted",
            d[0],
            d[1],
            d[2],
            d[3],
            per(d[0]),
            per(d[1]),
            per(d[2]),
            per(d[3])
        );
    }
    if let (Some(db), Some(enrolled), Some(first)) = (&args.db, db_enrolled, first_round) {
        let last = db_size(db)?;
        let steady = secs - interval.as_secs_f64();
        let per_day = (last.0 as f64 - first.0 as f64) / count as f64 / steady * 86_400.0;
        println!(
            "database (logical bytes, WAL included / files on disk): after enrollment {} / {}, after the first \
             heartbeat round {} / {}, at the end {} / {}",
            enrolled.0, enrolled.1, first.0, first.1, last.0, last.1
        );
        println!(
            "database growth after the first round: {} bytes in {steady:.0} s = {per_day:.0} bytes per device per \
             day (heartbeats update one row per device in place; the first round grew it {:.0} bytes per device)",
            last.0 as i64 - first.0 as i64,
            (first.0 as f64 - enrolled.0 as f64) / count as f64,
        );
    }
    if let Some(task) = order {
        let (took, out) = task.await.map_err(|e| e.to_string())?;
        let out = out
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot run --order: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "--order failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let mut got = std::mem::take(&mut *wake.got.lock().unwrap_or_else(|e| e.into_inner()));
        got.sort();
        // Percentiles of the whole fleet: a device that never got the release counts as never.
        let fleet = |p: f64| {
            let rank = ((p / 100.0) * count as f64).ceil() as usize;
            got.get(rank.clamp(1, count) - 1)
                .map_or("not reached".to_string(), |d| format!("{} ms", ms(*d)))
        };
        println!(
            "\n== wake-up: the order ({} ms for the command) reached {} of {count} devices' long polls; after the \
             order: 50 % {}, 90 % {}, 99 % {}, 100 % {}",
            ms(took),
            got.len(),
            fleet(50.0),
            fleet(90.0),
            fleet(99.0),
            fleet(100.0),
        );
    }
    if let Some(path) = &args.samples {
        write_samples(
            path,
            &enroll_samples,
            enroll_secs,
            &samples,
            secs,
            unfinished,
        )?;
    }
    print_targets(
        &samples,
        p99,
        unfinished,
        count,
        enroll_p99,
        enroll_failed,
        n,
    );
    Ok(())
}

/// The verdicts on the targets: heartbeat and enrollment p99 under 50 ms, with no error.
fn print_targets(
    samples: &[Sample],
    p99: Option<Duration>,
    unfinished: usize,
    count: usize,
    enroll_p99: Option<Duration>,
    enroll_failed: bool,
    enrolling: usize,
) {
    if let Some(p) = p99 {
        let failed = samples
            .iter()
            .any(|s| s.kind == Kind::Heartbeat && s.error.is_some());
        let met = p < Duration::from_millis(50) && !failed && unfinished == 0;
        println!(
            "TARGET heartbeat p99 < 50 ms with no error at {count} devices: {} (p99 {} ms)",
            if met { "MET" } else { "NOT MET" },
            ms(p)
        );
    }
    if let Some(p) = enroll_p99 {
        let met = p < Duration::from_millis(50) && !enroll_failed;
        println!(
            "TARGET enrollment p99 < 50 ms with no error at {enrolling} devices: {} (p99 {} ms)",
            if met { "MET" } else { "NOT MET" },
            ms(p)
        );
    }
}

fn kind_of(name: &str) -> Option<Kind> {
    [
        Kind::Enroll,
        Kind::Heartbeat,
        Kind::Desired,
        Kind::LongPoll,
        Kind::Changed,
    ]
    .into_iter()
    .find(|k| k.name() == name)
}

/// One line per request: phase, kind, latency and lag in microseconds, error (tabs and newlines made spaces); the
/// phases' lengths and the heartbeats left unfinished first, as `#` lines.
fn write_samples(
    path: &Path,
    enroll: &[Sample],
    enroll_secs: f64,
    run: &[Sample],
    run_secs: f64,
    unfinished: usize,
) -> Result<(), String> {
    use std::fmt::Write as _;
    let mut out =
        format!("#enroll_secs\t{enroll_secs}\n#run_secs\t{run_secs}\n#unfinished\t{unfinished}\n");
    for (phase, list) in [("enroll", enroll), ("run", run)] {
        for s in list {
            let error = s
                .error
                .as_deref()
                .map(|e| e.replace(['\t', '\n'], " "))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "{phase}\t{}\t{}\t{}\t{error}",
                s.kind.name(),
                s.latency.as_micros(),
                s.lag.as_micros()
            );
        }
    }
    std::fs::write(path, out).map_err(|e| format!("{}: {e}", path.display()))
}

/// `--merge`: the generators' samples as one fleet. The phases ran side by side, so a phase's length is the
/// longest generator's and the rates are the sums.
fn merge(files: &[PathBuf]) -> Result<(), String> {
    let (mut enroll, mut run) = (Vec::new(), Vec::new());
    let (mut enroll_secs, mut run_secs, mut unfinished) = (0f64, 0f64, 0usize);
    for path in files {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        for (i, line) in text.lines().enumerate() {
            let bad = || format!("{}:{}: not a --samples line: {line}", path.display(), i + 1);
            let fields: Vec<&str> = line.splitn(5, '\t').collect();
            let number = |f: &str| f.parse::<f64>().map_err(|_| bad());
            match fields.as_slice() {
                ["#enroll_secs", v] => enroll_secs = enroll_secs.max(number(v)?),
                ["#run_secs", v] => run_secs = run_secs.max(number(v)?),
                ["#unfinished", v] => unfinished += number(v)? as usize,
                [phase, kind, latency, lag, error] => {
                    let micros = |f: &str| {
                        f.parse::<u64>()
                            .map(Duration::from_micros)
                            .map_err(|_| bad())
                    };
                    let sample = Sample {
                        kind: kind_of(kind).ok_or_else(bad)?,
                        latency: micros(latency)?,
                        lag: micros(lag)?,
                        error: (!error.is_empty()).then(|| error.to_string()),
                    };
                    match *phase {
                        "enroll" => enroll.push(sample),
                        "run" => run.push(sample),
                        _ => return Err(bad()),
                    }
                }
                _ => return Err(bad()),
            }
        }
    }
    println!(
        "\n== {} generators together: enrollment of {} devices in {enroll_secs:.1} s",
        files.len(),
        enroll.len()
    );
    let enroll_p99 = print_table(&enroll, enroll_secs, Kind::Enroll);
    let enroll_failed = enroll.iter().any(|s| s.error.is_some());
    println!(
        "\n== {} generators together: run of {run_secs:.0} s (heartbeats not finished 15 s after the end: \
         {unfinished})",
        files.len()
    );
    let p99 = print_table(&run, run_secs, Kind::Heartbeat);
    let devices = enroll.iter().filter(|s| s.error.is_none()).count();
    print_targets(
        &run,
        p99,
        unfinished,
        devices,
        enroll_p99,
        enroll_failed,
        enroll.len(),
    );
    Ok(())
}
