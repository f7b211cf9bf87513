//! The devices' routes: enrollment, the desired state's long poll, and reports.

use std::collections::BTreeSet;
use std::time::Duration;

use axum::Json;
use axum::extract::{Extension, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use super::{ApiError, Body, Device, QueryArgs, bearer, created, enrollment_needs_token};
use crate::fleet::{Accepted, EnrollRequest, EventBody, ReportBatch};
use crate::server::state::Shared;
use crate::server::store::ServerDbError;
use crate::server::views::{check_field, check_tags};

pub(super) async fn enroll(
    State(s): State<Shared>,
    headers: HeaderMap,
    Body(req): Body<EnrollRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let token = bearer(&headers).ok_or_else(enrollment_needs_token)?;
    check_field("name", "device name", &req.name)?;
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
    check_tags("tags", &req.tags)?;
    let now = s.now();
    let enrolled = s.with_db(move |db| db.enroll(&token, &req, now)).await?;
    s.drive().await?;
    Ok(created(enrolled))
}

#[derive(Deserialize)]
pub(super) struct WaitQuery {
    /// Seconds to hold the request while the desired state equals the caller's `If-None-Match`.
    wait: Option<u64>,
}

/// The longest a long poll is held: below the agent's HTTP timeout and common proxy idle limits.
pub(super) const MAX_WAIT: Duration = Duration::from_secs(60);

pub(super) async fn desired(
    State(s): State<Shared>,
    Extension(Device(device)): Extension<Device>,
    headers: HeaderMap,
    QueryArgs(q): QueryArgs<WaitQuery>,
) -> Result<Response, ApiError> {
    let known = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let deadline =
        tokio::time::Instant::now() + Duration::from_secs(q.wait.unwrap_or(0)).min(MAX_WAIT);
    let mut version = s.desired_version();
    let mut woken = false;
    loop {
        version.borrow_and_update();
        let id = device.clone();
        let turn = if woken { s.reread_turn().await } else { None };
        let desired = s.with_reader(move |db| db.desired_for(&id)).await?;
        drop(turn);
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
        woken = true;
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

pub(super) async fn reports(
    State(s): State<Shared>,
    Extension(Device(device)): Extension<Device>,
    Body(batch): Body<ReportBatch>,
) -> Result<Json<Accepted>, ApiError> {
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
