//! The server's state, which every request and chore shares: the database (reached only through
//! [`Server::with_db`] and [`Server::with_reader`]), the resolver, the clock, the limits and rates, and the version
//! that wakes the long polls.
//!
//! SQLite work runs on the blocking pool behind one mutex: the database serialises writers anyway, and this keeps
//! the async workers free for the long polls. The lock is held only for the database work itself, never while a
//! request waits on the network (a body, a registry, a long poll). Heartbeats and `last_seen` are kept in memory
//! and written every `flush_interval`, a device at most once per flush.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::sync::watch;

use super::api::ApiError;
use super::ratelimit::{Rate, RateLimiter};
use super::resolve::{ResolveError, Resolved, Resolver};
use super::store::{Database, ServerDb, ServerDbError, WriteStats};
use super::views::{MAX_TOKEN_TTL_SECS, TokenCreated, TokenRequest};
use crate::clock::Clock;

/// What the server allows each connection and credential, and how often it writes what it keeps in memory.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// From a request's first byte to the end of its head.
    pub header_timeout: Duration,
    /// A kept-alive connection with no request begun is closed after this: above the agent's heartbeat interval.
    pub idle_timeout: Duration,
    /// A whole request, its body included; a long poll may take its wait on top.
    pub request_timeout: Duration,
    pub max_connections: usize,
    /// Per device credential and per admin token.
    pub rate: Rate,
    /// How often `last_seen` and heartbeat metrics are written.
    pub flush_interval: Duration,
    /// Events received longer ago are pruned.
    pub event_retention: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            request_timeout: Duration::from_secs(30),
            // 10,000 devices each with a report connection and a held long poll.
            max_connections: 20_000,
            // An agent makes a request every few seconds; an operator's script may do more in bursts.
            rate: Rate {
                per_second: 20.0,
                burst: 200,
            },
            flush_interval: Duration::from_secs(5),
            event_retention: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// Rows per transaction when flushing and pruning: a write made on the main connection (an event) waits for at
/// most one slice, and a prune holds the lock for one slice at a time.
const WRITE_SLICE: usize = 200;

/// What every request, page and chore of one server process shares, as an `Arc` ([`Shared`]).
pub struct Server {
    db: Database,
    /// A random name for this process, which its `NOTIFY`s carry.
    replica: String,
    resolver: Box<dyn Resolver>,
    /// Bumped whenever a device's desired state may have changed, to wake its long poll.
    desired_version: watch::Sender<u64>,
    clock: Arc<dyn Clock>,
    limits: Limits,
    rates: Mutex<RateLimiter>,
    /// Served over TLS: the dashboard's session cookie is marked Secure.
    tls: std::sync::atomic::AtomicBool,
    /// This replica's request latencies, for `/metrics`.
    http_metrics: super::metrics::HttpMetrics,
    /// The rollouts waiting to be planned, and the one plan under way.
    drives: Drives,
    /// Reads of woken long polls under way at once: half of the database's readers.
    rereads: tokio::sync::Semaphore,
}

/// One plan of the rollouts at a time, and the requests that ask for one while it runs share the next.
///
/// Every update report and enrollment re-plans, and a plan reads every device: 10,000 devices reporting through a
/// wave, each with its own plan over the 10,000, is quadratic work. Here the reports that arrive while a plan runs
/// wait for one plan that covers all of their apps, which starts once that one ends; each request still returns
/// only after a plan that began after it was made, as when each made its own.
#[derive(Default)]
struct Drives {
    queue: Mutex<DriveQueue>,
    /// Held while a plan runs.
    running: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct DriveQueue {
    /// The apps the next plan covers; `Some(None)`: every app.
    pending: Option<Option<BTreeSet<String>>>,
    /// Plans begun, and plans ended (with or without an error); a request waits for plan `begun + 1`.
    begun: u64,
    ended: u64,
}

pub(super) type Shared = Arc<Server>;

impl Server {
    pub fn new(
        db: impl Into<Database>,
        resolver: Box<dyn Resolver>,
        clock: Arc<dyn Clock>,
    ) -> Shared {
        Server::with_limits(db, resolver, clock, Limits::default())
    }

    pub fn with_limits(
        db: impl Into<Database>,
        resolver: Box<dyn Resolver>,
        clock: Arc<dyn Clock>,
        limits: Limits,
    ) -> Shared {
        let db: Database = db.into();
        Arc::new(Server {
            rereads: tokio::sync::Semaphore::new((db.readers() / 2).max(1)),
            db,
            replica: super::store::new_secret()[..12].to_string(),
            resolver,
            desired_version: watch::channel(0).0,
            clock,
            limits,
            rates: Mutex::new(RateLimiter::new(limits.rate)),
            tls: std::sync::atomic::AtomicBool::new(false),
            http_metrics: super::metrics::HttpMetrics::default(),
            drives: Drives::default(),
        })
    }

    /// Says the server is reached over TLS (its own, or a proxy's that forwards to it).
    pub fn set_tls(&self) {
        self.tls.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub(super) fn tls(&self) -> bool {
        self.tls.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(super) fn http_metrics(&self) -> &super::metrics::HttpMetrics {
        &self.http_metrics
    }

    pub(super) fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Writes every device's news kept in memory (`last_seen`, heartbeat metrics), a slice per transaction, on a
    /// connection other than SQLite's writer, so requests go on meanwhile. A device whose slice is being written
    /// shows its older `last_seen` for those milliseconds; a slice that fails goes back for the next flush.
    pub async fn flush(self: &Arc<Self>) -> Result<(), ApiError> {
        loop {
            let batch = self.db.news().take(WRITE_SLICE);
            if batch.is_empty() {
                return Ok(());
            }
            let me = self.clone();
            let (written, batch) =
                tokio::task::spawn_blocking(move || (me.db.write_news(&batch), batch))
                    .await
                    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
            match written {
                Ok(()) => self.db.news().count_flush(batch.len()),
                Err(e) => {
                    self.db.news().restore(batch);
                    return Err(e.into());
                }
            }
        }
    }

    /// What the devices' traffic has cost the database so far.
    pub fn write_stats(&self) -> WriteStats {
        self.db.news().stats()
    }

    /// Deletes the events older than the retention, a slice at a time; how many. Old metrics samples go too.
    pub async fn prune_events(self: &Arc<Self>) -> Result<usize, ApiError> {
        let before = self
            .now()
            .saturating_sub(self.limits.event_retention.as_secs());
        let mut pruned = 0;
        loop {
            let n = self
                .with_db(move |db| db.prune_events(before, WRITE_SLICE))
                .await?;
            pruned += n;
            if n < WRITE_SLICE {
                break;
            }
        }
        // The dashboard's metrics charts: kept as long as events, and never more than a week (a sample every
        // five minutes is 2,016 rows a device a week).
        let before = before.max(self.now().saturating_sub(super::store::SAMPLES_KEPT_SECS));
        loop {
            let n = self
                .with_db(move |db| db.prune_samples(before, WRITE_SLICE))
                .await?;
            if n < WRITE_SLICE {
                return Ok(pruned);
            }
        }
    }

    /// Takes one request from `key`'s bucket, or says how long until there is one.
    pub(super) fn throttle(&self, key: &str) -> Result<(), Duration> {
        self.rates
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .check(key, Instant::now())
    }

    /// 429, with `Retry-After` in whole seconds rounded up: a client that waits what it is told finds a request
    /// in its bucket.
    pub(super) fn too_many(&self, wait: Duration) -> Response {
        let secs = (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1);
        let mut resp = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "too many requests with this credential (at most {}/s, {} at once); retry after {secs} s",
                self.limits.rate.per_second, self.limits.rate.burst
            ),
        )
        .into_response();
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        resp
    }

    /// The server's clock in seconds: soaks, timeouts and `last_seen` count by it, never by a device's.
    pub(super) fn now(&self) -> u64 {
        self.clock.unix_seconds()
    }

    /// Runs `f` where it may write (SQLite's writer, or a pooled PostgreSQL connection), off the async workers.
    pub(super) async fn with_db<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&ServerDb) -> Result<T, ServerDbError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.db.write(f).map_err(ApiError::from))
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    }

    /// Runs a read on a connection of its own, off the async workers: on SQLite, WAL lets it read while the writer
    /// writes, so a scrape counting 100,000 devices (about 170 ms) does not hold up heartbeats. It sees what is
    /// committed, and the news kept in memory.
    pub(super) async fn with_reader<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&ServerDb) -> Result<T, ServerDbError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.db.read(f).map_err(ApiError::from))
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    }

    /// Reads `image` through the resolver: the only way the server reaches a registry.
    pub(super) async fn resolve(&self, image: &str) -> Result<Resolved, ResolveError> {
        self.resolver.resolve(image).await
    }

    /// What a long poll waits on: it changes whenever a device's desired state may have.
    pub(super) fn desired_version(&self) -> watch::Receiver<u64> {
        self.desired_version.subscribe()
    }

    /// A turn to re-read a woken long poll's desired state. A wake reaches every held poll at once: 5,000 reads
    /// queued together would hold every connection, and the heartbeats behind them waited seconds. Half of the
    /// readers are left to everything else.
    pub(super) async fn reread_turn(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        // Never closed, so never None in practice; a closed semaphore would only lift the bound.
        self.rereads.acquire().await.ok()
    }

    /// Drops the rate buckets of credentials that have been quiet long enough to be full again.
    pub(super) fn forget_idle_rates(&self) {
        self.rates
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .forget_idle(Instant::now());
    }

    /// Wakes the devices' long polls: after [`Server::drive`] changed an order, and after a change made outside it
    /// (a rollout started or controlled), which plans and writes the orders itself. On PostgreSQL the other
    /// replicas are told too (`NOTIFY`), after the change committed; a notification lost on the way costs the
    /// devices there one long poll's timeout.
    pub(super) fn desired_changed(self: &Arc<Self>) {
        self.wake_long_polls();
        if self.db.postgres().is_some() {
            let me = self.clone();
            tokio::task::spawn_blocking(move || {
                if let Err(e) = me.db.write(|db| {
                    super::store::notify::notify(&*db.conn, &me.replica).map_err(db.err())
                }) {
                    tracing::warn!("telling the other replicas of a new order failed: {e}");
                }
            });
        }
    }

    /// Wakes this replica's long polls, which read their desired state again.
    pub(super) fn wake_long_polls(&self) {
        self.desired_version.send_modify(|v| *v += 1);
    }

    /// This replica's name among the others on one PostgreSQL: its own notifications are not news to it.
    pub(super) fn replica(&self) -> &str {
        &self.replica
    }

    /// The PostgreSQL database the replicas share; none on SQLite.
    pub(super) fn postgres(&self) -> Option<&super::store::dburl::PgUrl> {
        self.db.postgres()
    }

    /// Checks a token request as every client's is checked (the API's and the dashboard's), and makes the token.
    pub(super) async fn create_token(
        self: &Arc<Self>,
        req: TokenRequest,
    ) -> Result<TokenCreated, ApiError> {
        if req.uses == Some(0) {
            return Err(ServerDbError::Field {
                path: "uses".into(),
                message: "a token of 0 uses enrolls nobody; give 1 or more, or null for unlimited"
                    .into(),
            }
            .into());
        }
        if let Some(d) = req
            .expires_in
            .filter(|d| *d == 0 || *d > MAX_TOKEN_TTL_SECS)
        {
            return Err(ServerDbError::Field {
                path: "expires_in".into(),
                message: format!(
                    "{d} s is not between 1 s and ten years ({MAX_TOKEN_TTL_SECS} s); null never expires"
                ),
            }
            .into());
        }
        super::views::check_tags("tags", &req.tags)?;
        let now = self.now();
        let expires = req.expires_in.map(|d| now.saturating_add(d));
        self.with_db(move |db| db.create_token(expires, req.uses, &req.tags, req.device_tags, now))
            .await
    }

    /// Re-plans the rollouts, and wakes the long polls when a desired state changed: waking 10,000 held polls
    /// on every tick queued their database work ahead of the heartbeats (p99 200 ms instead of 2 ms).
    pub async fn drive(self: &Arc<Self>) -> Result<(), ApiError> {
        self.drive_apps(None).await
    }

    /// As [`Server::drive`], for the rollouts of `apps` only (every rollout with `None`). Returns once a plan
    /// that began after the call covered them: its own, or one another request started (whose error, if it had
    /// one, that request reports; the next tick plans again).
    pub(super) async fn drive_apps(
        self: &Arc<Self>,
        apps: Option<BTreeSet<String>>,
    ) -> Result<(), ApiError> {
        let mine = {
            let mut q = self.drives.queue.lock().unwrap_or_else(|e| e.into_inner());
            q.pending = Some(match (q.pending.take(), apps) {
                (None, apps) => apps,
                (Some(Some(mut a)), Some(b)) => {
                    a.extend(b);
                    Some(a)
                }
                (Some(_), _) => None,
            });
            q.begun + 1
        };
        let _running = self.drives.running.lock().await;
        let (apps, plan) = {
            let mut q = self.drives.queue.lock().unwrap_or_else(|e| e.into_inner());
            if q.ended >= mine {
                return Ok(());
            }
            q.begun += 1;
            (q.pending.take().flatten(), q.begun)
        };
        let now = self.now();
        let started = Instant::now();
        let planned = self
            .with_db(move |db| db.drive_apps(now, apps.as_ref()))
            .await;
        self.http_metrics.plan_took(started.elapsed());
        self.drives
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ended = plan;
        if planned? {
            self.desired_changed();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Requests that ask for a plan while one runs share the next: ten of them, queued behind a running plan, make
    /// one plan between them, of all their apps, and none returns before it ended.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_asking_for_a_plan_while_one_runs_share_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let db = ServerDb::open(&dir.path().join("fleet.db")).unwrap();
        let server = Server::new(
            db,
            Box::new(super::super::resolve::RegistryResolver::new(
                crate::registry::RegistryClient::new(&Default::default(), &[]).unwrap(),
            )),
            Arc::new(crate::clock::SystemClock),
        );
        let running = server.drives.running.lock().await;
        let asked: Vec<_> = (0..10)
            .map(|i| {
                let s = server.clone();
                tokio::spawn(async move {
                    s.drive_apps(Some([format!("app-{i}")].into()))
                        .await
                        .unwrap();
                    let q = s.drives.queue.lock().unwrap();
                    q.ended
                })
            })
            .collect();
        let all_queued = || {
            let q = server.drives.queue.lock().unwrap();
            matches!(&q.pending, Some(Some(apps)) if apps.len() == 10)
        };
        for _ in 0..500 {
            if all_queued() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(all_queued(), "the ten requests did not queue their apps");
        drop(running);
        for a in asked {
            assert_eq!(
                a.await.unwrap(),
                1,
                "a request returned before the plan ended"
            );
        }
        let q = server.drives.queue.lock().unwrap();
        assert_eq!((q.begun, q.ended), (1, 1), "one plan for the ten requests");
        assert!(q.pending.is_none());
    }
}
