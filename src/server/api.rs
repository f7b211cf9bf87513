//! The HTTP JSON API under `/v1`, documented in `docs/openapi.yaml` (a test checks the two agree).
//!
//! Devices authenticate with their credential and only ever see routes about themselves (`/v1/device/...`): the
//! device is whoever the credential says, so no request can name another one. Operators use an admin token.
//! Every request passes [`guard`] before anything reads its body: a bad or missing credential is refused with 401
//! at once, each credential's rate is limited (429 with `Retry-After`), and the whole request is bounded in time.
//!
//! SQLite work runs on the blocking pool behind one mutex: the database serialises writers anyway, and this keeps
//! the async workers free for the long polls. The lock is held only for the database work itself, never while a
//! request waits on the network (a body, a registry, a long poll). Heartbeats and `last_seen` are kept in memory
//! and written every `flush_interval`, a device at most once per flush.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::clock::Clock;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Extension, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::sync::watch;

use super::ratelimit::{Rate, RateLimiter};
use super::store::{NewsWriter, ServerDb, ServerDbError, WriteStats, hash_secret};
use super::views::{
    AppRequest, Control, MAX_TOKEN_TTL_SECS, ReleaseRequest, RolloutRequest, TagsRequest,
    TokenRequest,
};
use crate::fleet::{Accepted, EnrollRequest, EventBody, MAX_BODY_BYTES, ReportBatch};

/// Every route, as `METHOD /path`, for the OpenAPI check.
pub const ROUTES: &[&str] = &[
    "POST /v1/enroll",
    "GET /v1/device/desired",
    "POST /v1/device/reports",
    "GET /v1/tokens",
    "POST /v1/tokens",
    "POST /v1/tokens/{id}/revoke",
    "GET /v1/devices",
    "POST /v1/devices/{name}/revoke",
    "POST /v1/devices/{name}/tags",
    "GET /v1/apps",
    "POST /v1/apps",
    "GET /v1/releases",
    "POST /v1/releases",
    "GET /v1/releases/{id}",
    "GET /v1/rollouts",
    "POST /v1/rollouts",
    "GET /v1/rollouts/{id}",
    "POST /v1/rollouts/{id}/{action}",
];

/// Reads an image's index from its registry when a release is made: the release is pinned to what it read.
pub trait Resolver: Send + Sync {
    fn resolve<'a>(
        &'a self,
        image: &'a str,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Resolved, ResolveError>> + Send + 'a>,
    >;
}

/// Why a release cannot be made from an image.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error(transparent)]
    Reference(#[from] crate::registry::ReferenceError),
    #[error("{}", crate::error_chain(.0))]
    Registry(#[from] crate::registry::RegistryError),
    #[error(
        "it is a single-platform image; a release needs a multi-arch index so each device can pick its variant"
    )]
    SinglePlatform,
    #[error("its index lists no platform")]
    NoPlatform,
}

#[derive(Debug, Clone)]
pub struct Resolved {
    pub pinned: String,
    pub manifests: std::collections::BTreeMap<String, String>,
}

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

/// How often old events are looked for.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Rows per transaction when flushing and pruning: a write made on the main connection (an event) waits for at
/// most one slice, and a prune holds the lock for one slice at a time.
const WRITE_SLICE: usize = 200;

pub struct Server {
    db: Mutex<ServerDb>,
    resolver: Box<dyn Resolver>,
    /// Bumped whenever a device's desired state may have changed, to wake its long poll.
    desired_version: watch::Sender<u64>,
    clock: Arc<dyn Clock>,
    limits: Limits,
    rates: Mutex<RateLimiter>,
    /// Opened at the first flush.
    news: Mutex<Option<NewsWriter>>,
    /// Served over TLS: the dashboard's session cookie is marked Secure.
    tls: std::sync::atomic::AtomicBool,
    /// This replica's request latencies, for `/metrics`.
    http_metrics: super::metrics::HttpMetrics,
    /// A connection of its own for long reads (opened at the first), so they do not hold `db`'s lock.
    reader: Mutex<Option<ServerDb>>,
}

/// A refusal: its status and a message for the caller.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

#[derive(Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError(status, message.into())
    }

    pub fn status(&self) -> StatusCode {
        self.0
    }

    pub fn message(&self) -> &str {
        &self.1
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

impl From<ServerDbError> for ApiError {
    fn from(e: ServerDbError) -> ApiError {
        let status = match &e {
            ServerDbError::BadToken
            | ServerDbError::TokenUsedUp(_)
            | ServerDbError::TokenExpired { .. }
            | ServerDbError::TokenRevoked(_) => StatusCode::UNAUTHORIZED,
            ServerDbError::Field { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ServerDbError::NameTaken(_)
            | ServerDbError::Exists(_)
            | ServerDbError::EnrolledAlready(_) => StatusCode::CONFLICT,
            ServerDbError::EnrollmentRevoked(_) => StatusCode::FORBIDDEN,
            ServerDbError::Invalid(_) | ServerDbError::Spec(_) => StatusCode::BAD_REQUEST,
            ServerDbError::NotFound(_) => StatusCode::NOT_FOUND,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!("{}", crate::error_chain(&e));
        }
        ApiError(status, e.to_string())
    }
}

fn rejected(e: JsonRejection) -> ApiError {
    ApiError(e.status(), e.body_text())
}

/// A JSON body read strictly: it must be an object (serde would also take a struct's fields as an array, which the
/// document does not allow), and a value that does not fit is refused with 422 naming the field's path.
fn strict<T: serde::de::DeserializeOwned>(
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> Result<T, ApiError> {
    let Json(value) = body.map_err(rejected)?;
    if !value.is_object() {
        return Err(ApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "the body must be a JSON object, not {}",
                match value {
                    serde_json::Value::Null => "null",
                    serde_json::Value::Bool(_) => "a boolean",
                    serde_json::Value::Number(_) => "a number",
                    serde_json::Value::String(_) => "a string",
                    serde_json::Value::Array(_) => "an array",
                    serde_json::Value::Object(_) => "an object",
                }
            ),
        ));
    }
    super::strict::from_value(value)
        .map_err(|e| ApiError(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))
}

// The path and query extractors' own rejections are plain text; every refusal of this API is `{"error": ...}`.
fn bad_path(e: PathRejection) -> ApiError {
    ApiError(e.status(), e.body_text())
}

fn bad_query(e: QueryRejection) -> ApiError {
    ApiError(e.status(), e.body_text())
}

fn enrollment_needs_token() -> ApiError {
    ApiError(
        StatusCode::UNAUTHORIZED,
        "enrollment needs a token (Authorization: Bearer ...); create one with flotilla-server token create"
            .into(),
    )
}

fn unauthorized() -> ApiError {
    ApiError(
        StatusCode::UNAUTHORIZED,
        "missing, unknown or revoked credential (Authorization: Bearer ...)".into(),
    )
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let t = v.strip_prefix("Bearer ")?.trim();
    (!t.is_empty() && t.len() <= 256).then(|| t.to_string())
}

type Shared = Arc<Server>;

impl Server {
    pub fn new(db: ServerDb, resolver: Box<dyn Resolver>, clock: Arc<dyn Clock>) -> Shared {
        Server::with_limits(db, resolver, clock, Limits::default())
    }

    pub fn with_limits(
        db: ServerDb,
        resolver: Box<dyn Resolver>,
        clock: Arc<dyn Clock>,
        limits: Limits,
    ) -> Shared {
        Arc::new(Server {
            db: Mutex::new(db),
            resolver,
            desired_version: watch::channel(0).0,
            clock,
            limits,
            rates: Mutex::new(RateLimiter::new(limits.rate)),
            news: Mutex::new(None),
            tls: std::sync::atomic::AtomicBool::new(false),
            http_metrics: super::metrics::HttpMetrics::default(),
            reader: Mutex::new(None),
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

    /// Writes every device's news kept in memory (`last_seen`, heartbeat metrics), a slice per transaction, on
    /// a connection of its own: the lock is taken only to hand the slice over, so requests go on meanwhile. A
    /// device whose slice is being written shows its older `last_seen` for those milliseconds.
    pub async fn flush(self: &Arc<Self>) -> Result<(), ApiError> {
        loop {
            let batch = self.with_db(|db| Ok(db.take_news(WRITE_SLICE))).await?;
            if batch.is_empty() {
                return Ok(());
            }
            let me = self.clone();
            let written = tokio::task::spawn_blocking(move || {
                let mut news = me.news.lock().unwrap_or_else(|e| e.into_inner());
                let result = match news.as_mut() {
                    Some(w) => w.write(&batch),
                    None => me
                        .db
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .news_writer()
                        .and_then(|w| news.insert(w).write(&batch)),
                };
                (result, batch)
            })
            .await
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
            match written {
                (Ok(()), batch) => {
                    let rows = batch.len();
                    self.with_db(move |db| {
                        db.count_flush(rows);
                        Ok(())
                    })
                    .await?;
                }
                (Err(e), batch) => {
                    self.with_db(move |db| {
                        db.restore_news(batch);
                        Ok(())
                    })
                    .await?;
                    return Err(e.into());
                }
            }
        }
    }

    /// What the devices' traffic has cost the database so far.
    pub async fn write_stats(self: &Arc<Self>) -> Result<WriteStats, ApiError> {
        self.with_db(|db| Ok(db.write_stats())).await
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
        let mut resp = ApiError(
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

    /// Runs `f` on the database, off the async workers.
    pub(super) async fn with_db<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&ServerDb) -> Result<T, ServerDbError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let db = me.db.lock().map_err(|_| {
                ApiError(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "database lock poisoned".into(),
                )
            })?;
            f(&db).map_err(ApiError::from)
        })
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    }

    /// Runs a read on a connection of its own, off the async workers: WAL lets it read while the main connection
    /// writes, so a scrape counting 100,000 devices (about 170 ms) does not hold up heartbeats. It sees what is
    /// committed, not the news kept in memory until the next flush.
    pub(super) async fn with_reader<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&ServerDb) -> Result<T, ServerDbError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut reader = me.reader.lock().unwrap_or_else(|e| e.into_inner());
            let db = match reader.take() {
                Some(db) => db,
                None => {
                    let path = me
                        .db
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .path()
                        .to_path_buf();
                    ServerDb::open(&path)?
                }
            };
            let out = f(&db);
            *reader = Some(db);
            out.map_err(ApiError::from)
        })
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    }

    async fn device(self: &Arc<Self>, headers: &HeaderMap) -> Result<String, ApiError> {
        let token = bearer(headers).ok_or_else(unauthorized)?;
        let now = self.now();
        self.with_db(move |db| db.authenticate(&token, now))
            .await?
            .ok_or_else(unauthorized)
    }

    async fn admin(self: &Arc<Self>, headers: &HeaderMap) -> Result<(), ApiError> {
        let token = bearer(headers).ok_or_else(unauthorized)?;
        if self.with_db(move |db| db.is_admin(&token)).await? {
            Ok(())
        } else {
            Err(unauthorized())
        }
    }

    /// Wakes the devices' long polls: after [`Server::drive`] changed an order, and after a change made outside it
    /// (a rollout started or controlled), which plans and writes the orders itself.
    pub(super) fn desired_changed(&self) {
        self.desired_version.send_modify(|v| *v += 1);
    }

    /// Checks a token request as every client's is checked (the API's and the dashboard's), and makes the token.
    pub(super) async fn create_token(
        self: &Arc<Self>,
        req: TokenRequest,
    ) -> Result<super::views::TokenCreated, ApiError> {
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

    /// As [`Server::drive`], for the rollouts of `apps` only (every rollout with `None`).
    pub(super) async fn drive_apps(
        self: &Arc<Self>,
        apps: Option<BTreeSet<String>>,
    ) -> Result<(), ApiError> {
        let now = self.now();
        if self
            .with_db(move |db| db.drive_apps(now, apps.as_ref()))
            .await?
        {
            self.desired_changed();
        }
        Ok(())
    }
}

/// The device a request's credential belongs to, as [`guard`] found it.
#[derive(Clone)]
struct Device(String);

/// Who may call a route: decided by its path alone, before anything is read.
enum Caller {
    Enrollment,
    Device,
    Admin,
}

fn caller_of(path: &str) -> Caller {
    if path == "/v1/enroll" {
        Caller::Enrollment
    } else if path.starts_with("/v1/device/") {
        Caller::Device
    } else {
        Caller::Admin
    }
}

/// Runs before every route's handler, so before its body is read: the credential is checked (401 for a bad or
/// missing one), its rate limited (429), and the whole request, body included, bounded by the request timeout.
async fn guard(State(s): State<Shared>, mut req: Request, next: Next) -> Response {
    let caller = caller_of(req.uri().path());
    let limit = match caller {
        // The long poll's hold comes on top of the request's own time.
        Caller::Device if req.uri().path() == "/v1/device/desired" => {
            s.limits.request_timeout + MAX_WAIT
        }
        _ => s.limits.request_timeout,
    };
    let run = async {
        let token = bearer(req.headers());
        let key = match caller {
            Caller::Enrollment => {
                // The token's own checks (expiry, uses, a retried enrollment) need the body; a token this server
                // never made needs nothing more to be refused.
                let token = token.ok_or_else(enrollment_needs_token)?;
                if !s.with_db(move |db| db.token_known(&token)).await? {
                    return Err(ApiError::from(ServerDbError::BadToken).into_response());
                }
                None
            }
            Caller::Device => {
                let id = s.device(req.headers()).await?;
                req.extensions_mut().insert(Device(id.clone()));
                Some(format!("device {id}"))
            }
            Caller::Admin => {
                s.admin(req.headers()).await?;
                token.map(|t| format!("admin {}", hash_secret(&t)))
            }
        };
        if let Some(key) = key {
            s.throttle(&key).map_err(|wait| s.too_many(wait))?;
        }
        Ok::<_, Response>(next.run(req).await)
    };
    match tokio::time::timeout(limit, run).await {
        Ok(Ok(resp) | Err(resp)) => resp,
        Err(_) => ApiError(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request was not complete within {} s; send it again without pausing",
                limit.as_secs()
            ),
        )
        .into_response(),
    }
}

impl From<ApiError> for Response {
    fn from(e: ApiError) -> Response {
        e.into_response()
    }
}

pub fn router(server: Shared) -> Router {
    Router::new()
        .route("/v1/enroll", post(enroll))
        .route("/v1/device/desired", get(desired))
        .route("/v1/device/reports", post(reports))
        .route("/v1/tokens", get(tokens).post(create_token))
        .route("/v1/tokens/{id}/revoke", post(revoke_token))
        .route("/v1/devices", get(devices))
        .route("/v1/devices/{name}/revoke", post(revoke))
        .route("/v1/devices/{name}/tags", post(device_tags))
        .route("/v1/apps", get(apps).post(create_app))
        .route("/v1/releases", get(releases).post(create_release))
        .route("/v1/releases/{id}", get(release))
        .route("/v1/rollouts", get(rollouts).post(create_rollout))
        .route("/v1/rollouts/{id}", get(rollout))
        .route("/v1/rollouts/{id}/{action}", post(control_rollout))
        // Not under /v1: Prometheus's own path. The guard takes it as an admin route (the admin token).
        .route("/metrics", get(super::metrics::scrape))
        .route_layer(axum::middleware::from_fn_with_state(server.clone(), guard))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(server)
}

async fn enroll(
    State(s): State<Shared>,
    headers: HeaderMap,
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let token = bearer(&headers).ok_or_else(enrollment_needs_token)?;
    let req: EnrollRequest = strict(body)?;
    super::views::check_field("name", "device name", &req.name)?;
    if let Some(id) = &req.enrollment_id {
        if !EnrollRequest::enrollment_id_is_valid(id) {
            return Err(ServerDbError::Field {
                path: "enrollment_id".into(),
                message: "the enrollment id must be 32 to 128 base64url characters (256 random bits, as the agent draws)"
                    .into(),
            }
            .into());
        }
    }
    // Checked although the token may ignore them: a refusal says what is wrong instead of dropping it silently.
    super::views::check_tags("tags", &req.tags)?;
    let now = s.now();
    let enrolled = s.with_db(move |db| db.enroll(&token, &req, now)).await?;
    s.drive().await?;
    Ok((StatusCode::CREATED, Json(enrolled)))
}

#[derive(Deserialize)]
struct WaitQuery {
    /// Seconds to hold the request while the desired state equals the caller's `If-None-Match`.
    wait: Option<u64>,
}

/// The longest a long poll is held: below the agent's HTTP timeout and common proxy idle limits.
const MAX_WAIT: Duration = Duration::from_secs(60);

async fn desired(
    State(s): State<Shared>,
    Extension(Device(device)): Extension<Device>,
    headers: HeaderMap,
    query: Result<Query<WaitQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(bad_query)?;
    let known = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let deadline =
        tokio::time::Instant::now() + Duration::from_secs(q.wait.unwrap_or(0)).min(MAX_WAIT);
    let mut version = s.desired_version.subscribe();
    loop {
        version.borrow_and_update();
        let id = device.clone();
        let desired = s.with_db(move |db| db.desired_for(&id)).await?;
        let body = serde_json::to_vec(&desired)
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        let etag = format!("\"{:x}\"", Sha256::digest(&body));
        if known.as_deref() != Some(etag.as_str()) {
            let mut resp = (StatusCode::OK, body).into_response();
            let h = resp.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            if let Ok(v) = HeaderValue::from_str(&etag) {
                h.insert(header::ETAG, v);
            }
            return Ok(resp);
        }
        if tokio::time::timeout_at(deadline, version.changed())
            .await
            .is_err()
        {
            let mut resp = StatusCode::NOT_MODIFIED.into_response();
            if let Ok(v) = HeaderValue::from_str(&etag) {
                resp.headers_mut().insert(header::ETAG, v);
            }
            return Ok(resp);
        }
    }
}

async fn reports(
    State(s): State<Shared>,
    Extension(Device(device)): Extension<Device>,
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> Result<Json<Accepted>, ApiError> {
    let batch: ReportBatch = strict(body)?;
    if batch.events.len() > 1000 {
        return Err(ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            "at most 1000 events per batch".into(),
        ));
    }
    // SQLite stores i64: a larger time or sequence would fail to bind, a 500 for what is the device's mistake.
    for (i, e) in batch.events.iter().enumerate() {
        if i64::try_from(e.at).is_err() {
            return Err(ServerDbError::Field {
                path: format!("events[{i}].at"),
                message: format!(
                    "the event {:?} has at = {}, beyond any time (seconds since the epoch)",
                    e.id, e.at
                ),
            }
            .into());
        }
        // 0 is how the database says "no sequence" (agents that send none); an agent's outbox starts at 1.
        if let Some(seq) = e.seq.filter(|s| *s == 0 || i64::try_from(*s).is_err()) {
            return Err(ServerDbError::Field {
                path: format!("events[{i}].seq"),
                message: format!(
                    "the event {:?} has seq = {seq}, not between 1 and 2^63 - 1",
                    e.id
                ),
            }
            .into());
        }
    }
    // An update report moves only the rollouts of its app.
    let apps: BTreeSet<String> = batch
        .events
        .iter()
        .filter_map(|e| match &e.body {
            EventBody::Update { app, .. } => Some(app.clone()),
            _ => None,
        })
        .collect();
    let now = s.now();
    let accepted = s
        .with_db(move |db| db.record(&device, &batch.events, now))
        .await?;
    if !apps.is_empty() {
        s.drive_apps(Some(apps)).await?;
    }
    Ok(Json(Accepted { accepted }))
}

async fn create_token(
    State(s): State<Shared>,
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let req: TokenRequest = strict(body)?;
    Ok((StatusCode::CREATED, Json(s.create_token(req).await?)))
}

async fn tokens(State(s): State<Shared>) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(s.with_db(|db| db.tokens()).await?))
}

async fn revoke_token(
    State(s): State<Shared>,
    path: Result<Path<String>, PathRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Path(id) = path.map_err(bad_path)?;
    Ok(Json(s.with_db(move |db| db.revoke_token(&id)).await?))
}

async fn device_tags(
    State(s): State<Shared>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Path(name) = path.map_err(bad_path)?;
    let req: TagsRequest = strict(body)?;
    super::views::check_tags("set", &req.set)?;
    for (i, k) in req.remove.iter().enumerate() {
        super::views::check_field(&format!("remove[{i}]"), "tag", k)?;
    }
    let device = s
        .with_db(move |db| {
            db.set_device_tags(&name, &req.set, &req.remove)?;
            db.devices()?
                .into_iter()
                .find(|d| d.name == name && !d.revoked)
                .ok_or_else(|| ServerDbError::NotFound(format!("the device {name}")))
        })
        .await?;
    // Rollouts select by tags: a device that now matches one (or no longer does) is ordered at once.
    s.drive().await?;
    Ok(Json(device))
}

async fn devices(State(s): State<Shared>) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(s.with_db(|db| db.devices()).await?))
}

async fn revoke(
    State(s): State<Shared>,
    path: Result<Path<String>, PathRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Path(name) = path.map_err(bad_path)?;
    let done = s
        .with_db(move |db| {
            let id = db.live_device(&name)?;
            db.revoke(&id)
        })
        .await?;
    Ok(Json(serde_json::json!({ "revoked": done })))
}

async fn apps(State(s): State<Shared>) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(s.with_db(|db| db.apps()).await?))
}

async fn create_app(
    State(s): State<Shared>,
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let req: AppRequest = strict(body)?;
    let now = s.now();
    let app = s.with_db(move |db| db.create_app(&req, now)).await?;
    Ok((StatusCode::CREATED, Json(app)))
}

async fn releases(State(s): State<Shared>) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(s.with_db(|db| db.releases(None)).await?))
}

async fn release(
    State(s): State<Shared>,
    path: Result<Path<String>, PathRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Path(id) = path.map_err(bad_path)?;
    Ok(Json(s.with_db(move |db| db.release(&id)).await?))
}

async fn create_release(
    State(s): State<Shared>,
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let req: ReleaseRequest = strict(body)?;
    let app = req.app.clone();
    if !s
        .with_db(move |db| Ok(db.apps()?.iter().any(|a| a.name == app)))
        .await?
    {
        return Err(ServerDbError::NotFound(format!("the app {}", req.app)).into());
    }
    let resolved = s.resolver.resolve(&req.image).await.map_err(|e| {
        ApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("cannot read the image {}: {e}", req.image),
        )
    })?;
    let now = s.now();
    let r = s
        .with_db(move |db| {
            db.create_release(
                &req.app,
                &req.image,
                &resolved.pinned,
                &resolved.manifests,
                now,
            )
        })
        .await?;
    Ok((StatusCode::CREATED, Json(r)))
}

async fn rollouts(State(s): State<Shared>) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(s.with_db(|db| db.rollouts(None)).await?))
}

fn rollout_id(id: &str) -> Result<u64, ApiError> {
    // Rollout ids are SQLite rowids (i64): a larger number names none, and would fail to bind.
    id.parse::<u64>()
        .ok()
        .filter(|n| i64::try_from(*n).is_ok())
        .ok_or_else(|| {
            ApiError(
                StatusCode::NOT_FOUND,
                format!("no rollout {id:?}: ids are numbers"),
            )
        })
}

async fn rollout(
    State(s): State<Shared>,
    path: Result<Path<String>, PathRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Path(id) = path.map_err(bad_path)?;
    let id = rollout_id(&id)?;
    Ok(Json(s.with_db(move |db| db.rollout(id)).await?))
}

async fn create_rollout(
    State(s): State<Shared>,
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let req: RolloutRequest = strict(body)?;
    let now = s.now();
    let r = s.with_db(move |db| db.create_rollout(&req, now)).await?;
    s.desired_changed();
    Ok((StatusCode::CREATED, Json(r)))
}

async fn control_rollout(
    State(s): State<Shared>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Path((id, action)) = path.map_err(bad_path)?;
    let id = rollout_id(&id)?;
    let control = Control::named(&action).ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("no rollout action {action:?}: use retry, or pause, resume or abort"),
        )
    })?;
    let now = s.now();
    let r = s
        .with_db(move |db| db.control_rollout(id, control, now))
        .await?;
    s.desired_changed();
    Ok(Json(r))
}

/// Serves the API on `listener` (plain TCP, or [`super::tls::TlsListener`]) until `shutdown` resolves; re-plans the
/// rollouts every `tick` (soak timers), writes what devices said every flush interval, and prunes old events.
/// What is still in memory at the end is written before it returns.
pub async fn serve<L: axum::serve::Listener>(
    server: Shared,
    listener: L,
    tick: Duration,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let chores = tokio::spawn(chores(server.clone(), tick));
    let limits = super::http::ConnLimits {
        header_timeout: server.limits.header_timeout,
        idle_timeout: server.limits.idle_timeout,
        max_connections: server.limits.max_connections,
    };
    let app = router(server.clone())
        .merge(super::dashboard::router(server.clone()))
        .layer(axum::middleware::from_fn_with_state(
            server.clone(),
            super::metrics::time_request,
        ));
    super::http::serve_connections(listener, app, limits, shutdown).await;
    chores.abort();
    server.flush().await.map_err(|e| {
        std::io::Error::other(format!("writing last_seen and metrics failed: {}", e.1))
    })
}

/// Serves only `/metrics`, without a token (`serve --metrics-listen`, loopback only), until the task is aborted.
pub async fn serve_metrics(server: Shared, listener: tokio::net::TcpListener) {
    let limits = super::http::ConnLimits {
        header_timeout: server.limits.header_timeout,
        idle_timeout: server.limits.idle_timeout,
        max_connections: server.limits.max_connections,
    };
    let app = Router::new()
        .route("/metrics", get(super::metrics::scrape))
        .layer(axum::middleware::from_fn_with_state(
            server.clone(),
            super::metrics::time_request,
        ))
        .with_state(server);
    super::http::serve_connections(listener, app, limits, std::future::pending()).await;
}

/// The server's timed work, each on its own schedule; a failure is logged and tried again next time.
async fn chores(server: Shared, tick: Duration) {
    let mut plan = tokio::time::interval(tick);
    let mut flush = tokio::time::interval(server.limits.flush_interval);
    let mut prune = tokio::time::interval(PRUNE_EVERY);
    for timer in [&mut plan, &mut flush, &mut prune] {
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    loop {
        tokio::select! {
            _ = plan.tick() => {
                if let Err(e) = server.drive().await {
                    tracing::warn!("planning the rollouts failed: {}", e.1);
                }
            }
            _ = flush.tick() => {
                if let Err(e) = server.flush().await {
                    tracing::warn!("writing last_seen and metrics failed: {}", e.1);
                }
                server
                    .rates
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .forget_idle(Instant::now());
            }
            _ = prune.tick() => match server.prune_events().await {
                Ok(0) => {}
                Ok(n) => tracing::info!("pruned {n} events older than the retention"),
                Err(e) => tracing::warn!("pruning old events failed: {}", e.1),
            },
        }
    }
}
