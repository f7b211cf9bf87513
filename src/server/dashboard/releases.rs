//! Releases: each app's releases with the digests they pin per platform, one release's coverage of the fleet
//! (which variant each kind of device takes, and the devices it cannot serve), and starting a rollout of it with a
//! preview of its waves.

use std::collections::BTreeMap;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use maud::{Markup, html};

use super::cause::platform_sql;
use super::session::Session;
use super::{
    Nav, Operator, PageError, Posted, Shared, ago, badge, csrf_field, encode, html_response, layout,
};
use crate::server::driver::serves;
use crate::server::store::{ConnExt, Row, ServerDb, ServerDbError};
use crate::server::views::{DEFAULT_DEVICE_TIMEOUT_SECS, ReleaseView, RolloutRequest};

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/releases", get(list))
        .route("/releases/{id}", get(one))
        .route("/releases/{id}/rollout", get(rollout_form).post(start))
}

/// The devices a release cannot serve are listed up to this many; the rest are counted.
const CANNOT_LIST: usize = 200;

/// How a release covers the fleet's devices (revoked ones left out).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Coverage {
    /// (the platform detection ranked first, the release's variant those devices take or None, devices), most
    /// devices first.
    pub rows: Vec<(String, Option<String>, u64)>,
    /// Variant label → devices that take it.
    pub by_variant: BTreeMap<String, u64>,
    /// The first [`CANNOT_LIST`] devices it cannot serve, by name, with their platforms.
    pub cannot: Vec<(String, Vec<String>)>,
    pub cannot_total: u64,
}

impl ServerDb {
    /// The rollouts of release `id`, newest first: id and state, without their plans.
    pub fn rollouts_of(&self, id: &str) -> Result<Vec<(u64, String)>, ServerDbError> {
        let sql = format!(
            "SELECT id, {} FROM rollouts WHERE release = ?1 ORDER BY id DESC",
            self.conn.dialect().json_text("state", &["state"])
        );
        self.conn
            .rows(&sql, crate::args![id], Row::read)
            .map_err(self.err())
    }

    /// Counted by distinct platform candidate lists, which are few however many devices there are; each list is
    /// judged once, by the planner's own [`serves`].
    pub fn coverage(
        &self,
        manifests: &BTreeMap<String, String>,
    ) -> Result<Coverage, ServerDbError> {
        let d = self.conn.dialect();
        // The list's text is as the engine gives it back: the devices unserved are then found by comparing
        // with the same expression on the same engine.
        let candidates =
            |expr: &str| format!("coalesce({}, '[]')", d.json_text(expr, &["candidates"]));
        // `+`: every row is read for its list, and SQLite would otherwise walk the platform index for the
        // revoked flag beside it, fetching each row out of order.
        let sql = format!(
            "SELECT {} AS c, {} AS p, count(*) FROM devices d WHERE +d.revoked = 0 GROUP BY c, p",
            candidates("d.platform"),
            platform_sql(d)
        );
        let lists: Vec<(String, String, u64)> =
            self.conn.rows(&sql, &[], Row::read).map_err(self.err())?;
        let mut c = Coverage::default();
        let mut rows: BTreeMap<(String, Option<String>), u64> = BTreeMap::new();
        let mut unserved: Vec<String> = Vec::new();
        for (list, best, n) in lists {
            // A list that does not read is no platform the release can be judged against: it serves none.
            let candidates: Vec<String> = serde_json::from_str(&list).unwrap_or_default();
            let variant = serves(manifests, &candidates);
            match &variant {
                Some(v) => *c.by_variant.entry(v.clone()).or_default() += n,
                None => {
                    c.cannot_total += n;
                    unserved.push(list);
                }
            }
            *rows.entry((best, variant)).or_default() += n;
        }
        c.rows = rows.into_iter().map(|((p, v), n)| (p, v, n)).collect();
        c.rows
            .sort_by(|a, b| b.2.cmp(&a.2).then_with(|| a.0.cmp(&b.0)));
        let unserved_sql = format!(
            "SELECT name FROM devices WHERE revoked = 0 AND {} = ?1 ORDER BY name LIMIT ?2",
            candidates("platform")
        );
        for list in unserved {
            let left = CANNOT_LIST.saturating_sub(c.cannot.len());
            if left == 0 {
                break;
            }
            let platforms: Vec<String> = serde_json::from_str(&list).unwrap_or_default();
            let names: Vec<String> = self
                .conn
                .rows(&unserved_sql, crate::args![&list, left], |r| r.get(0))
                .map_err(self.err())?;
            c.cannot
                .extend(names.into_iter().map(|n| (n, platforms.clone())));
        }
        c.cannot.sort();
        Ok(c)
    }
}

fn not_found(id: &str) -> PageError {
    PageError(
        StatusCode::NOT_FOUND,
        format!("There is no release {id}. The Releases page lists them."),
    )
}

/// The release `id`, or the page saying there is none.
async fn find_release(s: &Shared, id: &str) -> Result<ReleaseView, PageError> {
    let wanted = id.to_string();
    s.with_db(move |db| Ok(db.releases(Some(&wanted))?.pop()))
        .await?
        .ok_or_else(|| not_found(id))
}

async fn list(State(s): State<Shared>, Operator(session): Operator) -> Result<Response, PageError> {
    let now = s.now();
    let releases = s.with_db(|db| db.releases(None)).await?;
    let mut by_app: BTreeMap<String, Vec<ReleaseView>> = BTreeMap::new();
    // Stored oldest first; the newest is what an operator looks for.
    for r in releases.into_iter().rev() {
        by_app.entry(r.app.clone()).or_default().push(r);
    }
    let body = html! {
        @if by_app.is_empty() {
            p.muted { "No release yet. Make one with " code { "flotilla-server release create APP IMAGE" } "." }
        }
        @for (app, rs) in &by_app {
            h2 { (app) }
            table.releases {
                tr { th { "Release" } th { "Image" } th { "Variants (platform → manifest)" } th { "Made" } }
                @for r in rs {
                    tr {
                        td { a href=(format!("/releases/{}", encode(&r.id))) { code { (r.id) } } }
                        td { code { (r.image) } br; span.muted.mono { (r.pinned) } }
                        td { (digests(r)) }
                        td { (ago(now, r.created)) }
                    }
                }
            }
        }
    };
    Ok(html_response(
        StatusCode::OK,
        layout("Releases", Nav::Releases, Some(&session), body),
    ))
}

fn digests(r: &ReleaseView) -> Markup {
    html! {
        table.inner {
            @for (platform, digest) in &r.manifests {
                tr { td { code { (platform) } } td { code { (digest) } } }
            }
        }
    }
}

async fn one(
    State(s): State<Shared>,
    Operator(session): Operator,
    Path(id): Path<String>,
) -> Result<Response, PageError> {
    let now = s.now();
    let wanted = id.clone();
    let (release, coverage, rollouts) = s
        .with_db(move |db| {
            let Some(r) = db.releases(Some(&wanted))?.pop() else {
                return Ok(None);
            };
            let c = db.coverage(&r.manifests)?;
            let rollouts = db.rollouts_of(&r.id)?;
            Ok(Some((r, c, rollouts)))
        })
        .await?
        .ok_or_else(|| not_found(&id))?;
    let served: u64 = coverage.by_variant.values().sum();
    let body = html! {
        p {
            "App " strong { (release.app) } ", made " (ago(now, release.created)) ". Image " code { (release.image) }
            ", pinned to " code { (release.pinned) } "."
        }
        p { a.button href=(format!("/releases/{}/rollout", encode(&release.id))) { "Roll this release out…" } }
        h2 { "Variants" }
        table #variants {
            tr { th { "Platform" } th { "Manifest" } th.num { "Devices that take it" } }
            @for (platform, digest) in &release.manifests {
                tr {
                    td { code { (platform) } }
                    td { code { (digest) } }
                    td.num { (coverage.by_variant.get(platform).copied().unwrap_or(0)) }
                }
            }
        }
        h2 { "Coverage of the fleet" }
        p #covered { (served) " of " (served + coverage.cannot_total) " devices can run this release; "
            (coverage.cannot_total) " cannot." }
        @if !coverage.rows.is_empty() {
            table #coverage {
                tr { th { "Best platform" } th.num { "Devices" } th { "Takes the variant" } }
                @for (platform, variant, n) in &coverage.rows {
                    tr {
                        td { a href=(format!("/devices?platform={}", encode(platform))) { code { (platform) } } }
                        td.num { (n) }
                        td { @match variant {
                            Some(v) => code { (v) },
                            None => (badge("incompatible")),
                        } }
                    }
                }
            }
        }
        @if coverage.cannot_total > 0 {
            h2 { "Devices this release cannot serve" }
            p.muted { "A rollout lists them as incompatible and never orders them: none of the release's variants runs on their platforms." }
            table #cannot {
                tr { th { "Device" } th { "Its platforms, best first" } }
                @for (name, platforms) in &coverage.cannot {
                    tr {
                        td { a href=(format!("/devices/{}", encode(name))) { (name) } }
                        td { code { (platforms.join(", ")) } }
                    }
                }
            }
            @if coverage.cannot_total > coverage.cannot.len() as u64 {
                p.muted { "and " (coverage.cannot_total - coverage.cannot.len() as u64) " more." }
            }
        }
        @if !rollouts.is_empty() {
            h2 { "Rollouts of this release" }
            ul {
                @for (rollout, state) in &rollouts {
                    li { a href=(format!("/rollouts/{rollout}")) { "#" (rollout) } " " (badge(state)) }
                }
            }
        }
    };
    Ok(html_response(
        StatusCode::OK,
        layout(
            &format!("Release {}", release.id),
            Nav::Releases,
            Some(&session),
            body,
        ),
    ))
}

/// The rollout form's fields as the operator wrote them: kept as text, so that a refusal shows them unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FormValues {
    select: String,
    waves: String,
    max_failures: String,
    soak_secs: String,
    rollback: bool,
    device_timeout_secs: String,
    skip_timed_out: bool,
}

impl Default for FormValues {
    /// The command line's defaults, but in waves: a first rollout from a browser should not hit every device at
    /// once.
    fn default() -> FormValues {
        FormValues {
            select: String::new(),
            waves: "10%,50%,100%".into(),
            max_failures: "1".into(),
            soak_secs: "0".into(),
            rollback: true,
            device_timeout_secs: DEFAULT_DEVICE_TIMEOUT_SECS.to_string(),
            skip_timed_out: false,
        }
    }
}

impl FormValues {
    /// From a sent form; an unticked box is absent, which is false.
    fn from_fields<'a>(field: impl Fn(&str) -> Option<&'a str>) -> FormValues {
        let text = |name: &str| field(name).unwrap_or("").trim().to_string();
        FormValues {
            select: text("select"),
            waves: text("waves"),
            max_failures: text("max_failures"),
            soak_secs: text("soak_secs"),
            rollback: field("rollback").is_some(),
            device_timeout_secs: text("device_timeout_secs"),
            skip_timed_out: field("skip_timed_out").is_some(),
        }
    }

    /// The API's request, or what is wrong with a field that is not even of the right form; the rest is
    /// checked by the server as the API's `create_rollout` checks it.
    fn request(&self, release: &str) -> Result<RolloutRequest, String> {
        let mut select = BTreeMap::new();
        for pair in self
            .select
            .split([',', ' '])
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            let Some((k, v)) = pair.split_once('=') else {
                return Err(format!(
                    "select: {pair:?} is not TAG=VALUE; write tags as site=lab, several separated by commas"
                ));
            };
            select.insert(k.trim().to_string(), v.trim().to_string());
        }
        let secs = |name: &str, v: &str| {
            v.parse::<u64>()
                .map_err(|_| format!("{name}: {v:?} is not a whole number of seconds (0 or more)"))
        };
        Ok(RolloutRequest {
            release: release.to_string(),
            select,
            waves: self
                .waves
                .split(',')
                .map(|w| w.trim().to_string())
                .filter(|w| !w.is_empty())
                .collect(),
            max_failures: self.max_failures.clone(),
            soak_secs: secs("soak_secs", &self.soak_secs)?,
            rollback: self.rollback,
            device_timeout_secs: secs("device_timeout_secs", &self.device_timeout_secs)?,
            skip_timed_out: self.skip_timed_out,
        })
    }

    fn hidden(&self) -> Markup {
        html! {
            input type="hidden" name="select" value=(self.select);
            input type="hidden" name="waves" value=(self.waves);
            input type="hidden" name="max_failures" value=(self.max_failures);
            input type="hidden" name="soak_secs" value=(self.soak_secs);
            @if self.rollback { input type="hidden" name="rollback" value="1"; }
            input type="hidden" name="device_timeout_secs" value=(self.device_timeout_secs);
            @if self.skip_timed_out { input type="hidden" name="skip_timed_out" value="1"; }
        }
    }
}

/// What the preview shows: each wave's devices by name, and those the release cannot serve.
struct Preview {
    waves: Vec<Vec<String>>,
    incompatible: Vec<(String, Vec<String>)>,
}

fn form_page(
    session: &Session,
    release: &ReleaseView,
    values: &FormValues,
    error: Option<&str>,
    preview: Option<&Preview>,
) -> Markup {
    let action = format!("/releases/{}/rollout", encode(&release.id));
    layout(
        &format!("Roll out {}", release.id),
        Nav::Releases,
        Some(session),
        html! {
            p { "App " strong { (release.app) } ", release " a href=(format!("/releases/{}", encode(&release.id))) { code { (release.id) } } "." }
            @if let Some(e) = error { p.error #form-error { (e) } }
            form.stack method="get" action=(action) {
                label for="select" { "Devices with the tags (TAG=VALUE, comma separated; empty: every device)" }
                input #select type="text" name="select" value=(values.select) placeholder="site=lab";
                label for="waves" { "Waves (cumulative: percents or device counts)" }
                input #waves type="text" name="waves" value=(values.waves) placeholder="10%,50%,100%";
                label for="max_failures" { "Pause at this many failed devices (or a percent of those ordered)" }
                input #max_failures type="text" name="max_failures" value=(values.max_failures);
                label for="soak_secs" { "Soak: seconds a wave stays healthy before the next starts" }
                input #soak_secs type="text" name="soak_secs" value=(values.soak_secs) inputmode="numeric";
                label for="device_timeout_secs" { "Device timeout: seconds of silence before a device is timed out (0: never)" }
                input #device_timeout_secs type="text" name="device_timeout_secs" value=(values.device_timeout_secs) inputmode="numeric";
                label {
                    input type="checkbox" name="rollback" value="1" checked[values.rollback];
                    " Roll the failed waves back when the threshold pauses the rollout"
                }
                label {
                    input type="checkbox" name="skip_timed_out" value="1" checked[values.skip_timed_out];
                    " Leave timed-out devices out instead of counting them as failed"
                }
                p { button.primary type="submit" name="preview" value="1" { "Preview the waves" } }
            }
            @if let Some(p) = preview {
                h2 { "Preview" }
                p.muted { "Who each wave takes if the rollout starts now (devices that enroll later join the last wave)." }
                table #preview {
                    tr { th { "Wave" } th.num { "Devices" } th { "Which" } }
                    @for (k, ds) in p.waves.iter().enumerate() {
                        tr {
                            td { (k + 1) }
                            td.num { (ds.len()) }
                            td { @for (i, d) in ds.iter().enumerate() {
                                @if i > 0 { ", " }
                                a href=(format!("/devices/{}", encode(d))) { (d) }
                            } }
                        }
                    }
                }
                @if p.waves.is_empty() {
                    p.notice { "No device matches and can run this release: the rollout would be done at once." }
                }
                @if !p.incompatible.is_empty() {
                    p #preview-incompatible { "Selected but cannot run this release (never ordered): "
                        @for (i, (d, platforms)) in p.incompatible.iter().enumerate() {
                            @if i > 0 { ", " }
                            a href=(format!("/devices/{}", encode(d))) { (d) } " (" code { (platforms.join(", ")) } ")"
                        }
                    }
                }
                form method="post" action=(action) {
                    (csrf_field(session))
                    (values.hidden())
                    p { button.primary type="submit" { "Start this rollout" } }
                }
            }
        },
    )
}

async fn rollout_form(
    State(s): State<Shared>,
    Operator(session): Operator,
    Path(id): Path<String>,
    Query(query): Query<Vec<(String, String)>>,
) -> Result<Response, PageError> {
    let release = find_release(&s, &id).await?;
    let field = |name: &str| {
        query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    // The form was sent (not opened afresh) when it carries its fields: an unticked box then means no.
    let values = if field("waves").is_some() {
        FormValues::from_fields(field)
    } else {
        FormValues::default()
    };
    if field("preview").is_none() {
        return Ok(html_response(
            StatusCode::OK,
            form_page(&session, &release, &values, None, None),
        ));
    }
    let req = match values.request(&release.id) {
        Ok(r) => r,
        Err(e) => {
            return Ok(html_response(
                StatusCode::UNPROCESSABLE_ENTITY,
                form_page(&session, &release, &values, Some(&e), None),
            ));
        }
    };
    let now = s.now();
    match s.with_db(move |db| db.preview_rollout(&req, now)).await {
        Ok(plan) => {
            let preview = Preview {
                waves: plan.waves.into_iter().map(|w| w.devices).collect(),
                incompatible: plan.incompatible,
            };
            Ok(html_response(
                StatusCode::OK,
                form_page(&session, &release, &values, None, Some(&preview)),
            ))
        }
        Err(e) => Ok(html_response(
            StatusCode::UNPROCESSABLE_ENTITY,
            form_page(&session, &release, &values, Some(e.message()), None),
        )),
    }
}

async fn start(
    State(s): State<Shared>,
    Path(id): Path<String>,
    posted: Posted,
) -> Result<Response, PageError> {
    let release = find_release(&s, &id).await?;
    let values = FormValues::from_fields(|name| posted.get(name));
    let refused = |e: &str| {
        html_response(
            StatusCode::UNPROCESSABLE_ENTITY,
            form_page(&posted.session, &release, &values, Some(e), None),
        )
    };
    let req = match values.request(&release.id) {
        Ok(r) => r,
        Err(e) => return Ok(refused(&e)),
    };
    let now = s.now();
    match s.with_db(move |db| db.create_rollout(&req, now)).await {
        Ok(r) => {
            s.desired_changed();
            Ok(Redirect::to(&format!("/rollouts/{}", r.id)).into_response())
        }
        Err(e) => Ok(refused(e.message())),
    }
}
