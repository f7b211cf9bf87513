//! The operator's routes. The guard has checked the admin token and the extractors the path and body; what is
//! left of most is one database call, answered as JSON.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;

use super::{ApiError, Body, PathArgs, created};
use crate::server::state::Shared;
use crate::server::store::ServerDbError;
use crate::server::views::{
    AppRequest, Control, ReleaseRequest, RolloutRequest, TagsRequest, TokenRequest, check_field,
    check_tags,
};

pub(super) async fn tokens(State(s): State<Shared>) -> Result<impl IntoResponse, ApiError> {
    s.with_db(|db| db.tokens()).await.map(Json)
}

pub(super) async fn create_token(
    State(s): State<Shared>,
    Body(req): Body<TokenRequest>,
) -> Result<impl IntoResponse, ApiError> {
    s.create_token(req).await.map(created)
}

pub(super) async fn revoke_token(
    State(s): State<Shared>,
    PathArgs(id): PathArgs<String>,
) -> Result<impl IntoResponse, ApiError> {
    s.with_db(move |db| db.revoke_token(&id)).await.map(Json)
}

pub(super) async fn devices(State(s): State<Shared>) -> Result<impl IntoResponse, ApiError> {
    s.with_db(|db| db.devices()).await.map(Json)
}

pub(super) async fn revoke(
    State(s): State<Shared>,
    PathArgs(name): PathArgs<String>,
) -> Result<impl IntoResponse, ApiError> {
    let done = s
        .with_db(move |db| {
            let id = db.live_device(&name)?;
            db.revoke(&id)
        })
        .await?;
    Ok(Json(serde_json::json!({ "revoked": done })))
}

pub(super) async fn device_tags(
    State(s): State<Shared>,
    PathArgs(name): PathArgs<String>,
    Body(req): Body<TagsRequest>,
) -> Result<impl IntoResponse, ApiError> {
    check_tags("set", &req.set)?;
    for (i, k) in req.remove.iter().enumerate() {
        check_field(&format!("remove[{i}]"), "tag", k)?;
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

pub(super) async fn apps(State(s): State<Shared>) -> Result<impl IntoResponse, ApiError> {
    s.with_db(|db| db.apps()).await.map(Json)
}

pub(super) async fn create_app(
    State(s): State<Shared>,
    Body(req): Body<AppRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let now = s.now();
    s.with_db(move |db| db.create_app(&req, now))
        .await
        .map(created)
}

pub(super) async fn releases(State(s): State<Shared>) -> Result<impl IntoResponse, ApiError> {
    s.with_db(|db| db.releases(None)).await.map(Json)
}

pub(super) async fn release(
    State(s): State<Shared>,
    PathArgs(id): PathArgs<String>,
) -> Result<impl IntoResponse, ApiError> {
    s.with_db(move |db| db.release(&id)).await.map(Json)
}

pub(super) async fn create_release(
    State(s): State<Shared>,
    Body(req): Body<ReleaseRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let app = req.app.clone();
    if !s
        .with_db(move |db| Ok(db.apps()?.iter().any(|a| a.name == app)))
        .await?
    {
        return Err(ServerDbError::NotFound(format!("the app {}", req.app)).into());
    }
    let resolved = s.resolve(&req.image).await.map_err(|e| {
        ApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("cannot read the image {}: {e}", req.image),
        )
    })?;
    let now = s.now();
    s.with_db(move |db| {
        db.create_release(
            &req.app,
            &req.image,
            &resolved.pinned,
            &resolved.manifests,
            now,
        )
    })
    .await
    .map(created)
}

pub(super) async fn rollouts(State(s): State<Shared>) -> Result<impl IntoResponse, ApiError> {
    s.with_db(|db| db.rollouts(None)).await.map(Json)
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

pub(super) async fn rollout(
    State(s): State<Shared>,
    PathArgs(id): PathArgs<String>,
) -> Result<impl IntoResponse, ApiError> {
    let id = rollout_id(&id)?;
    s.with_db(move |db| db.rollout(id)).await.map(Json)
}

pub(super) async fn create_rollout(
    State(s): State<Shared>,
    Body(req): Body<RolloutRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let now = s.now();
    let r = s.with_db(move |db| db.create_rollout(&req, now)).await?;
    s.desired_changed();
    Ok(created(r))
}

pub(super) async fn control_rollout(
    State(s): State<Shared>,
    PathArgs((id, action)): PathArgs<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
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
