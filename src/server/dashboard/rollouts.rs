//! Rollouts: the list, and one rollout's waves as progress bars (ordered, updating, healthy, failed, timed out),
//! its failures grouped by cause with the devices under each, its late and incompatible devices, and the
//! operator's actions on it: pause, resume, abort and retry the failed devices.

use std::collections::{BTreeMap, BTreeSet};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use maud::{Markup, html};

use super::cause::{Cause, cause_of};
use super::{
    Nav, Operator, PageError, Posted, Shared, ago, badge, csrf_field, encode, html_response,
    layout, width_class,
};
use crate::server::store::{ConnExt, Row, ServerDb, ServerDbError};
use crate::server::views::{Control, RolloutView, StateView};
use crate::update::Report;

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/rollouts", get(list))
        .route("/rollouts/{id}", get(one))
        .route("/rollouts/{id}/{action}", post(act))
}

/// Each cause lists this many devices; the rest are counted.
const PER_CAUSE: usize = 100;

pub fn state_slug(s: &StateView) -> &'static str {
    match s {
        StateView::Running => "running",
        StateView::Paused { .. } => "paused",
        StateView::Aborted => "aborted",
        StateView::Done => "done",
        StateView::Superseded => "superseded",
    }
}

/// A failed device of a rollout: its name and the report that failed it.
pub type Failure = (String, Report);

impl ServerDb {
    /// The failure reports on `release` of the devices named in `members`, by device name.
    pub fn rollout_failures(
        &self,
        release: &str,
        members: &BTreeSet<String>,
    ) -> Result<Vec<Failure>, ServerDbError> {
        let sql = format!(
            "SELECT d.name, u.report FROM device_updates u JOIN devices d ON d.id = u.device
              WHERE u.release = ?1 AND d.revoked = 0
                AND {} IN ('prepare-failed', 'rolled-back')
              ORDER BY d.name",
            self.conn.dialect().json_text("u.report", &["event"])
        );
        let rows: Vec<(String, String)> = self
            .conn
            .rows(&sql, crate::args![release], Row::read)
            .map_err(self.err())?;
        rows.into_iter()
            .filter(|(name, _)| members.contains(name))
            .map(|(name, report)| {
                let report: Report =
                    serde_json::from_str(&report).map_err(|e| ServerDbError::Damaged {
                        what: "update report".into(),
                        message: e.to_string(),
                    })?;
                Ok((name, report))
            })
            .collect()
    }
}

fn rollout_id(id: &str) -> Result<u64, PageError> {
    id.parse::<u64>()
        .ok()
        .filter(|n| i64::try_from(*n).is_ok())
        .ok_or_else(|| {
            PageError(
                StatusCode::NOT_FOUND,
                format!("There is no rollout {id}: rollouts are numbered."),
            )
        })
}

/// One wave's devices by what they are doing.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counts {
    total: usize,
    /// Ordered, not reporting on the release yet.
    ordered: usize,
    updating: usize,
    healthy: usize,
    failed: usize,
    timed_out: usize,
    /// In a wave not started yet.
    waiting: usize,
}

fn counts(r: &RolloutView, k: usize) -> Counts {
    let started = k < r.waves_started;
    let mut c = Counts::default();
    for name in &r.waves[k].devices {
        c.total += 1;
        match r.devices.get(name).map(String::as_str).unwrap_or("waiting") {
            "healthy" => c.healthy += 1,
            "updating" => c.updating += 1,
            "timed out" => c.timed_out += 1,
            s if s.starts_with("failed") => c.failed += 1,
            _ if started => c.ordered += 1,
            _ => c.waiting += 1,
        }
    }
    c
}

fn bar(c: &Counts) -> Markup {
    let parts = [
        ("healthy", c.healthy),
        ("updating", c.updating),
        ("ordered", c.ordered),
        ("failed", c.failed),
        ("timed-out", c.timed_out),
    ];
    html! {
        div.bar {
            @for (class, n) in parts {
                @if n > 0 { span class=(format!("{class} {}", width_class(n, c.total))) {} }
            }
        }
    }
}

async fn list(State(s): State<Shared>, Operator(session): Operator) -> Result<Response, PageError> {
    let now = s.now();
    let mut rollouts = s.with_db(|db| db.rollouts(None)).await?;
    rollouts.reverse();
    let body = html! {
        @if rollouts.is_empty() {
            p.muted { "No rollout yet. Start one from a release on the " a href="/releases" { "Releases" } " page." }
        } @else {
            table #rollouts data-refresh="5" {
                tr { th { "Rollout" } th { "App" } th { "Release" } th { "State" } th { "Waves" } th.num { "Healthy" } th.num { "Failed" } th { "Started" } }
                @for r in &rollouts {
                    @let devices: usize = r.waves.iter().map(|w| w.devices.len()).sum();
                    @let healthy: usize = r.waves.iter().map(|w| w.healthy).sum();
                    @let failed: usize = r.waves.iter().map(|w| w.failed).sum();
                    tr {
                        td { a href=(format!("/rollouts/{}", r.id)) { "#" (r.id) } }
                        td { (r.app) }
                        td { a href=(format!("/releases/{}", encode(&r.spec.release))) { code { (r.spec.release) } } }
                        td { (badge(state_slug(&r.status))) }
                        td { (r.waves_started) " of " (r.waves.len()) }
                        td.num { (healthy) " / " (devices) }
                        td.num { (failed) }
                        td { (ago(now, r.created)) }
                    }
                }
            }
        }
    };
    Ok(html_response(
        StatusCode::OK,
        layout("Rollouts", Nav::Rollouts, Some(&session), body),
    ))
}

async fn one(
    State(s): State<Shared>,
    Operator(session): Operator,
    Path(id): Path<String>,
) -> Result<Response, PageError> {
    let id = rollout_id(&id)?;
    let now = s.now();
    let (r, failures) = s
        .with_db(move |db| {
            let r = db.rollout(id)?;
            let failed: BTreeSet<String> = r
                .devices
                .iter()
                .filter(|(_, s)| s.starts_with("failed"))
                .map(|(n, _)| n.clone())
                .collect();
            let failures = db.rollout_failures(&r.spec.release, &failed)?;
            Ok((r, failures))
        })
        .await?;
    let mut by_cause: BTreeMap<Cause, Vec<(String, String)>> = BTreeMap::new();
    for (name, report) in &failures {
        let reason = match report {
            Report::RolledBack { reason, .. } | Report::PrepareFailed { reason, .. } => {
                reason.clone()
            }
            _ => String::new(),
        };
        if let Some(c) = cause_of(report) {
            by_cause.entry(c).or_default().push((name.clone(), reason));
        }
    }
    let timed_out: Vec<&String> = r
        .devices
        .iter()
        .filter(|(_, s)| s.as_str() == "timed out")
        .map(|(n, _)| n)
        .collect();
    let selected = r.waves.iter().map(|w| w.devices.len()).sum::<usize>() + r.incompatible.len();
    let ended = matches!(
        r.status,
        StateView::Done | StateView::Aborted | StateView::Superseded
    );
    let retryable = !failures.is_empty() || !timed_out.is_empty();
    let spec = &r.spec;
    let body = html! {
        p {
            "App " strong { (r.app) } ", release "
            a href=(format!("/releases/{}", encode(&spec.release))) { code { (spec.release) } }
            @if let Some(p) = &r.previous { " (after " code { (p) } ")" }
            ", started " (ago(now, r.created)) "."
        }
        p.muted {
            "Devices: "
            @if spec.select.is_empty() { "every device" } @else {
                @for (i, (k, v)) in spec.select.iter().enumerate() { @if i > 0 { ", " } code { (k) "=" (v) } }
            }
            ". Waves " code { (spec.waves.join(", ")) } ", pause at " code { (spec.max_failures) } " failed, soak "
            (spec.soak_secs) " s, device timeout "
            @if spec.device_timeout_secs == 0 { "none" } @else { (spec.device_timeout_secs) " s" }
            @if spec.skip_timed_out { " (timed-out devices left out)" }
            ", " @if spec.rollback { "failed waves rolled back" } @else { "no rollback" } "."
        }
        section #progress data-refresh="5" {
            p #state {
                "State: " (badge(state_slug(&r.status)))
                @if let StateView::Paused { reason } = &r.status { " " span { (reason) } }
                " · wave " (r.waves_started) " of " (r.waves.len()) " ordered"
            }
            @if !ended {
                div #actions {
                    @match &r.status {
                        StateView::Paused { .. } => (action(&session, r.id, "resume", "Resume", "primary")),
                        _ => (action(&session, r.id, "pause", "Pause", "")),
                    }
                    " "
                    @if retryable { (action(&session, r.id, "retry", "Retry the failed devices", "primary")) " " }
                    (action(&session, r.id, "abort", "Abort", "danger"))
                }
            } @else if r.status == StateView::Done && retryable {
                // Done with failures below the threshold: a retry opens it again (the app's newest rollout only).
                div #actions { (action(&session, r.id, "retry", "Retry the failed devices", "primary")) }
            }
            table #waves {
                tr { th { "Wave" } th { "Progress" } th { "Devices" } }
                @for k in 0..r.waves.len() {
                    @let c = counts(&r, k);
                    tr id=(format!("wave-{}", k + 1)) {
                        td { (k + 1) }
                        td { (bar(&c)) }
                        td.counts {
                            (c.total) @if c.total == 1 { " device" } @else { " devices" }
                            @if k >= r.waves_started { ": not ordered yet" } @else {
                                ": " (c.ordered) " ordered · " (c.updating) " updating · " (c.healthy) " healthy · "
                                (c.failed) " failed · " (c.timed_out) " timed out"
                            }
                        }
                    }
                }
                @if !r.incompatible.is_empty() {
                    tr #incompatible-row {
                        td { "—" }
                        td { div.bar { span class=(format!("incompatible {}", width_class(r.incompatible.len(), selected))) {} } }
                        td.counts { (r.incompatible.len()) " incompatible (never ordered)" }
                    }
                }
            }
            h2 { "Failures by cause" }
            @if by_cause.is_empty() {
                p.muted #no-failures { "No device failed the release." }
            }
            @for (cause, devices) in &by_cause {
                div.cause id=(format!("cause-{}", cause.slug())) {
                    h3 { (badge("failed")) " " (cause.label()) " — " (devices.len()) }
                    table {
                        tr { th { "Device" } th { "Reason" } }
                        @for (name, reason) in devices.iter().take(PER_CAUSE) {
                            tr {
                                td { a href=(format!("/devices/{}", encode(name))) { (name) } }
                                td.mono { (reason) }
                            }
                        }
                    }
                    @if devices.len() > PER_CAUSE { p.muted { "and " (devices.len() - PER_CAUSE) " more." } }
                }
            }
            @if !timed_out.is_empty() {
                h2 { "Timed out" }
                p #timed-out { @for (i, n) in timed_out.iter().enumerate() {
                    @if i > 0 { ", " } a href=(format!("/devices/{}", encode(n))) { (n) }
                } }
            }
            @if !r.late.is_empty() {
                h2 { "Late (joined the last wave after the start)" }
                p #late { @for (i, n) in r.late.iter().enumerate() {
                    @if i > 0 { ", " } a href=(format!("/devices/{}", encode(n))) { (n) }
                } }
            }
            @if !r.incompatible.is_empty() {
                h2 { "Incompatible (no variant runs on them)" }
                table #incompatible {
                    tr { th { "Device" } th { "Its platforms" } }
                    @for i in &r.incompatible {
                        tr {
                            td { a href=(format!("/devices/{}", encode(&i.device))) { (i.device) } }
                            td { code { (i.platforms.join(", ")) } }
                        }
                    }
                }
            }
        }
    };
    Ok(html_response(
        StatusCode::OK,
        layout(
            &format!("Rollout #{}", r.id),
            Nav::Rollouts,
            Some(&session),
            body,
        ),
    ))
}

fn action(
    session: &super::session::Session,
    id: u64,
    action: &str,
    label: &str,
    class: &str,
) -> Markup {
    html! {
        form.inline method="post" action=(format!("/rollouts/{id}/{action}")) {
            (csrf_field(session))
            button type="submit" class=[(!class.is_empty()).then_some(class)] { (label) }
        }
    }
}

async fn act(
    State(s): State<Shared>,
    Path((id, action)): Path<(String, String)>,
    _posted: Posted,
) -> Result<Response, PageError> {
    let id = rollout_id(&id)?;
    let control = Control::named(&action).ok_or_else(|| {
        PageError(
            StatusCode::NOT_FOUND,
            format!("A rollout has no action {action:?}: pause, resume, abort or retry."),
        )
    })?;
    let now = s.now();
    s.with_db(move |db| db.control_rollout(id, control, now))
        .await?;
    s.desired_changed();
    Ok(Redirect::to(&format!("/rollouts/{id}")).into_response())
}
