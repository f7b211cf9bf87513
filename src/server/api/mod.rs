//! The HTTP JSON API under `/v1`, documented in `docs/openapi.yaml` (a test checks the two agree).
//!
//! Devices authenticate with their credential and only ever see routes about themselves (`/v1/device/...`): the
//! device is whoever the credential says, so no request can name another one. Operators use an admin token.
//! Every request passes [`guard`] before anything reads its body: a bad or missing credential is refused with 401
//! at once, each credential's rate is limited (429 with `Retry-After`), and the whole request is bounded in time.
//!
//! The devices' routes are in `device`, the operator's in `admin`; the state they share is [`Server`].

mod admin;
mod device;

use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::state::Shared;
use super::store::{ServerDbError, hash_secret};
use crate::fleet::MAX_BODY_BYTES;

// The state the routes share and the loop that serves them live beside this module; whoever starts the API (the
// CLI's serve, the tests) finds them here, with the router.
pub use super::chores::{serve, serve_metrics};
pub use super::state::{Limits, Server};

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

/// What a client is told to wait when the fleet database is away: about how long PostgreSQL takes to restart or
/// fail over, and short enough that devices come back soon after it does.
const UNAVAILABLE_RETRY_SECS: u32 = 5;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.0, Json(ErrorBody { error: self.1 })).into_response();
        // Every 503 is the database away (see `From<ServerDbError>`); the clients wait before they ask again.
        if self.0 == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut().insert(
                header::RETRY_AFTER,
                header::HeaderValue::from(UNAVAILABLE_RETRY_SECS),
            );
        }
        resp
    }
}

/// Logs an unreachable fleet database at most once per this: while it is away every request fails, and one line
/// per request would bury the rest of the log.
const UNAVAILABLE_LOG_EVERY_SECS: u64 = 10;

fn log_unavailable(e: &ServerDbError) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let last = LAST.load(Ordering::Relaxed);
    if now >= last + UNAVAILABLE_LOG_EVERY_SECS
        && LAST
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::warn!(
            "answering 503 until the fleet database is back: {}",
            crate::error_chain(e)
        );
    }
}

impl From<ServerDbError> for ApiError {
    fn from(e: ServerDbError) -> ApiError {
        if let ServerDbError::Store { source, .. } = &e {
            if source.unavailable() {
                log_unavailable(&e);
                // The cause names the database's host, which is the operator's business, not the caller's; the
                // log has it.
                return ApiError(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "the fleet database is unreachable just now; the server keeps trying to reconnect: \
                         retry after {UNAVAILABLE_RETRY_SECS} s"
                    ),
                );
            }
        }
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

/// A JSON body read strictly: it must be an object (serde would also take a struct's fields as an array, which the
/// document does not allow), and a value that does not fit is refused with 422 naming the field's path.
struct Body<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Body<T>, ApiError> {
        let Json(value) = Json::<serde_json::Value>::from_request(req, state)
            .await
            .map_err(|e| ApiError(e.status(), e.body_text()))?;
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
            .map(Body)
            .map_err(|e| ApiError(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))
    }
}

// axum's path and query extractors refuse in plain text; every refusal of this API is `{"error": ...}`.

/// The route's path parameters.
struct PathArgs<T>(T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for PathArgs<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<PathArgs<T>, ApiError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(t)) => Ok(PathArgs(t)),
            Err(e) => Err(ApiError(e.status(), e.body_text())),
        }
    }
}

/// The request's query string.
struct QueryArgs<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for QueryArgs<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<QueryArgs<T>, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(t)) => Ok(QueryArgs(t)),
            Err(e) => Err(ApiError(e.status(), e.body_text())),
        }
    }
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

/// The device whose credential the request carries.
async fn device_of(s: &Shared, headers: &HeaderMap) -> Result<String, ApiError> {
    let token = bearer(headers).ok_or_else(unauthorized)?;
    let now = s.now();
    s.with_reader(move |db| db.authenticate(&token, now))
        .await?
        .ok_or_else(unauthorized)
}

/// Whether the request carries an admin token.
async fn check_admin(s: &Shared, headers: &HeaderMap) -> Result<(), ApiError> {
    let token = bearer(headers).ok_or_else(unauthorized)?;
    if s.with_reader(move |db| db.is_admin(&token)).await? {
        Ok(())
    } else {
        Err(unauthorized())
    }
}

/// Runs before every route's handler, so before its body is read: the credential is checked (401 for a bad or
/// missing one), its rate limited (429), and the whole request, body included, bounded by the request timeout.
async fn guard(State(s): State<Shared>, mut req: Request, next: Next) -> Response {
    let caller = caller_of(req.uri().path());
    let limit = match caller {
        // The long poll's hold comes on top of the request's own time.
        Caller::Device if req.uri().path() == "/v1/device/desired" => {
            s.limits().request_timeout + device::MAX_WAIT
        }
        _ => s.limits().request_timeout,
    };
    let run = async {
        let token = bearer(req.headers());
        let key = match caller {
            Caller::Enrollment => {
                // The token's own checks (expiry, uses, a retried enrollment) need the body; a token this server
                // never made needs nothing more to be refused.
                let token = token.ok_or_else(enrollment_needs_token)?;
                if !s.with_reader(move |db| db.token_known(&token)).await? {
                    return Err(ApiError::from(ServerDbError::BadToken).into_response());
                }
                None
            }
            Caller::Device => {
                let id = device_of(&s, req.headers()).await?;
                req.extensions_mut().insert(Device(id.clone()));
                Some(format!("device {id}"))
            }
            Caller::Admin => {
                check_admin(&s, req.headers()).await?;
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
        .route("/v1/enroll", post(device::enroll))
        .route("/v1/device/desired", get(device::desired))
        .route("/v1/device/reports", post(device::reports))
        .route("/v1/tokens", get(admin::tokens).post(admin::create_token))
        .route("/v1/tokens/{id}/revoke", post(admin::revoke_token))
        .route("/v1/devices", get(admin::devices))
        .route("/v1/devices/{name}/revoke", post(admin::revoke))
        .route("/v1/devices/{name}/tags", post(admin::device_tags))
        .route("/v1/apps", get(admin::apps).post(admin::create_app))
        .route(
            "/v1/releases",
            get(admin::releases).post(admin::create_release),
        )
        .route("/v1/releases/{id}", get(admin::release))
        .route(
            "/v1/rollouts",
            get(admin::rollouts).post(admin::create_rollout),
        )
        .route("/v1/rollouts/{id}", get(admin::rollout))
        .route("/v1/rollouts/{id}/{action}", post(admin::control_rollout))
        // Not under /v1: Prometheus's own path. The guard takes it as an admin route (the admin token).
        .route("/metrics", get(super::metrics::scrape))
        .route_layer(axum::middleware::from_fn_with_state(server.clone(), guard))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(server)
}

fn created<T>(body: T) -> (StatusCode, Json<T>) {
    (StatusCode::CREATED, Json(body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::store::{PgError, StoreError};

    fn store(source: StoreError) -> ServerDbError {
        ServerDbError::Store {
            place: "postgres://fleet:***@db.internal/fleet".into(),
            source,
        }
    }

    async fn answer(e: ServerDbError) -> (StatusCode, Option<String>, String) {
        let resp = ApiError::from(e).into_response();
        let status = resp.status();
        let retry = resp
            .headers()
            .get(header::RETRY_AFTER)
            .map(|v| v.to_str().unwrap().to_string());
        let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
            .await
            .unwrap();
        let body: ErrorBody = serde_json::from_slice(&body).unwrap();
        (status, retry, body.error)
    }

    #[tokio::test]
    async fn a_database_away_is_503_with_retry_after_and_other_errors_keep_their_status() {
        let away = store(StoreError::Postgres(PgError::PoolTimeout {
            url: "postgres://fleet:***@db.internal/fleet".into(),
            secs: 15,
        }));
        let (status, retry, message) = answer(away).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(retry.as_deref(), Some("5"));
        assert!(
            message.contains("fleet database is unreachable"),
            "{message}"
        );
        assert!(message.contains("retry after 5 s"), "{message}");
        assert!(!message.contains("db.internal"), "{message}");

        // A database that answers but refuses is no outage: asking again would fail again.
        let refused = store(StoreError::Postgres(PgError::Tls {
            url: "postgres://fleet:***@db.internal/fleet".into(),
            reason: "bad certificate".into(),
        }));
        let (status, retry, _) = answer(refused).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(retry, None);
        let too_new = store(StoreError::TooNew { found: 9, known: 3 });
        assert_eq!(answer(too_new).await.0, StatusCode::INTERNAL_SERVER_ERROR);
        let (status, retry, _) = answer(ServerDbError::NotFound("rollout 7".into())).await;
        assert_eq!((status, retry), (StatusCode::NOT_FOUND, None));
    }
}
