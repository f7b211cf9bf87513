//! One device: what detection found and why, its metrics over the last days, each app as the fleet wants it and
//! as the device runs it, its update history with each failure's cause; and the operator's actions on it (revoke,
//! tags), which go through the same database functions and checks as the API's.

use std::collections::BTreeMap;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use maud::{Markup, html};

use super::cause::{OFFLINE_AFTER_SECS, cause_of, state_sql};
use super::devices::encode_path;
use super::session::Session;
use super::{
    Nav, Operator, PageError, Posted, Shared, ago, badge, csrf_field, html_response, layout,
};
use crate::fleet::{AppStatus, EventBody, Metrics, PlatformReport};
use crate::server::store::{ConnExt, FromValue, SAMPLES_KEPT_SECS, ServerDb, ServerDbError};
use crate::server::views::{check_field, check_tags};
use crate::update::Report;

/// Update events shown, newest first: enough to see a pattern, bounded for a device that flaps.
const HISTORY: u32 = 50;

/// Points in a chart at most: a 12em-wide line shows no more.
const SPARK_POINTS: usize = 120;

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/devices/{name}", get(page))
        .route("/devices/{name}/revoke", post(revoke))
        .route("/devices/{name}/tags", post(tags))
}

/// An app on the device: what the fleet wants, what runs, and the latest report about it.
#[derive(Debug, Clone, PartialEq)]
pub struct AppRow {
    pub app: String,
    /// `None`: the fleet has no say; `Some(None)`: it wants the app removed.
    pub desired: Option<Option<String>>,
    pub status: Option<AppStatus>,
    pub update: Option<Report>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DeviceDetail {
    pub name: String,
    pub state: String,
    pub revoked: bool,
    pub platform: PlatformReport,
    pub agent_version: String,
    pub enrolled: u64,
    pub last_seen: u64,
    pub tags: BTreeMap<String, String>,
    pub metrics: Option<Metrics>,
    /// (server time, metrics), oldest first.
    pub samples: Vec<(u64, Metrics)>,
    pub apps: Vec<AppRow>,
    /// (received, app, report), newest first.
    pub history: Vec<(u64, String, Report)>,
}

fn damaged(what: String) -> impl FnOnce(serde_json::Error) -> ServerDbError {
    move |e| ServerDbError::Damaged {
        what,
        message: e.to_string(),
    }
}

impl ServerDb {
    /// Everything the device page shows of the device named `name`; `None` when there is none.
    pub fn device_detail(
        &self,
        name: &str,
        now: u64,
    ) -> Result<Option<DeviceDetail>, ServerDbError> {
        type Row = (
            String,
            String,
            bool,
            String,
            String,
            u64,
            u64,
            String,
            Option<String>,
        );
        let d = self.conn.dialect();
        let sql = format!(
            "SELECT d.id, {}, d.revoked, d.platform, d.agent_version, d.enrolled, d.last_seen, d.tags, d.metrics
               FROM devices d WHERE d.name = ?2",
            state_sql(d, "?1")
        );
        let row: Option<Row> = self
            .conn
            .row(
                &sql,
                crate::args![now.saturating_sub(OFFLINE_AFTER_SECS), name],
                crate::server::store::Row::read,
            )
            .map_err(self.err())?;
        let Some((id, state, revoked, platform, agent_version, enrolled, last_seen, tags, metrics)) =
            row
        else {
            return Ok(None);
        };
        let of = |what: &str| format!("{what} of the device {name}");
        let platform: PlatformReport =
            serde_json::from_str(&platform).map_err(damaged(of("platform")))?;
        let tags = serde_json::from_str(&tags).map_err(damaged(of("tags")))?;
        let mut metrics: Option<Metrics> = metrics
            .map(|m| serde_json::from_str(&m))
            .transpose()
            .map_err(damaged(of("metrics")))?;
        let mut last_seen = last_seen;
        // Heard from since the last flush: shown as the API's devices list shows it.
        if let Some(news) = self.news.seen().get(&id) {
            last_seen = last_seen.max(news.last_seen);
            if news.metrics.is_some() {
                metrics.clone_from(&news.metrics);
            }
        }

        let samples = self
            .conn
            .rows(
                "SELECT at, metrics FROM device_samples WHERE device = ?1 AND at >= ?2 ORDER BY at",
                crate::args![&id, now.saturating_sub(SAMPLES_KEPT_SECS)],
                crate::server::store::Row::read::<(u64, String)>,
            )
            .map_err(self.err())?
            .into_iter()
            .map(|(at, m)| {
                Ok((
                    at,
                    serde_json::from_str(&m).map_err(damaged(of("metrics sample")))?,
                ))
            })
            .collect::<Result<Vec<_>, ServerDbError>>()?;

        let mut apps: BTreeMap<String, AppRow> = BTreeMap::new();
        fn app(apps: &mut BTreeMap<String, AppRow>, name: String) -> &mut AppRow {
            apps.entry(name.clone()).or_insert(AppRow {
                app: name,
                desired: None,
                status: None,
                update: None,
            })
        }
        for (name, release) in
            self.rows2::<Option<String>>("SELECT app, release FROM desired WHERE device = ?1", &id)?
        {
            app(&mut apps, name).desired = Some(release);
        }
        for (name, status) in
            self.rows2::<String>("SELECT app, status FROM device_apps WHERE device = ?1", &id)?
        {
            app(&mut apps, name).status =
                Some(serde_json::from_str(&status).map_err(damaged(of("app status")))?);
        }
        for (name, report) in self.rows2::<String>(
            // (device, app, release) is the table's key: the release names the latest report of an app.
            "SELECT app, report FROM device_updates u WHERE device = ?1 AND release = (
               SELECT release FROM device_updates e WHERE e.device = u.device AND e.app = u.app
                ORDER BY seq DESC, at DESC LIMIT 1)",
            &id,
        )? {
            app(&mut apps, name).update =
                Some(serde_json::from_str(&report).map_err(damaged(of("update report")))?);
        }

        let sql = format!(
            "SELECT received, body FROM events WHERE device = ?1 AND {} = 'update'
              ORDER BY received DESC, at DESC LIMIT ?2",
            d.json_text("body", &["kind"])
        );
        let raw: Vec<(u64, String)> = self
            .conn
            .rows(&sql, crate::args![&id, HISTORY], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .map_err(self.err())?;
        let mut history = Vec::with_capacity(raw.len());
        for (received, body) in raw {
            let body: EventBody = serde_json::from_str(&body).map_err(damaged(of("event")))?;
            if let EventBody::Update { app, report } = body {
                history.push((received, app, report));
            }
        }

        Ok(Some(DeviceDetail {
            name: name.to_string(),
            state,
            revoked,
            platform,
            agent_version,
            enrolled,
            last_seen,
            tags,
            metrics,
            samples,
            apps: apps.into_values().collect(),
            history,
        }))
    }

    /// (text, T) rows of a query about one device.
    fn rows2<T: FromValue>(
        &self,
        sql: &str,
        device: &str,
    ) -> Result<Vec<(String, T)>, ServerDbError> {
        self.conn
            .rows(sql, crate::args![device], crate::server::store::Row::read)
            .map_err(self.err())
    }
}

/// The tags form as the operator filled it in, kept when it was refused.
#[derive(Debug, Clone, Default)]
struct TagForm {
    set: String,
    remove: Vec<String>,
    error: Option<String>,
}

/// `k=v` lines into tags to set; the first line that is not one, as an error for the operator.
fn parse_tag_lines(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut set = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            return Err(format!(
                "Line {}: {line:?} is not key=value. Write one tag a line, such as site=roof.",
                i + 1
            ));
        };
        set.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(set)
}

async fn page(
    State(s): State<Shared>,
    Operator(session): Operator,
    Path(name): Path<String>,
) -> Result<Response, PageError> {
    render(&s, &session, name, TagForm::default(), StatusCode::OK).await
}

async fn render(
    s: &Shared,
    session: &Session,
    name: String,
    form: TagForm,
    status: StatusCode,
) -> Result<Response, PageError> {
    let now = s.now();
    let lookup = name.clone();
    let Some(d) = s.with_db(move |db| db.device_detail(&lookup, now)).await? else {
        return Err(PageError(
            StatusCode::NOT_FOUND,
            format!("There is no device named {name}. The devices page lists them all."),
        ));
    };
    Ok(html_response(
        status,
        layout(
            &d.name,
            Nav::Devices,
            Some(session),
            device_body(&d, session, &form, now),
        ),
    ))
}

fn device_body(d: &DeviceDetail, session: &Session, form: &TagForm, now: u64) -> Markup {
    let path = format!("/devices/{}", encode_path(&d.name));
    html! {
        p #status data-refresh="10" {
            (badge(&d.state)) " "
            span.muted { "last seen " (ago(now, d.last_seen)) ", enrolled " (ago(now, d.enrolled)) }
        }
        @if d.revoked {
            p.notice { "This device is revoked: its credential is refused, and no rollout orders it." }
        }
        h2 { "Platform" }
        table #platform {
            tr { th { "Candidates, best first" } td {
                @if d.platform.candidates.is_empty() { span.muted { "none reported" } }
                ol { @for c in &d.platform.candidates { li { code { (c) } } } }
            } }
            tr { th { "Detection said" } td.mono { (d.platform.description) } }
            tr { th { "Page size" } td { @match d.platform.page_size {
                Some(p) => { (p / 1024) " KiB" },
                None => span.muted { "unknown" },
            } } }
            tr { th { "Agent" } td { code { (d.agent_version) } } }
        }
        // What the device reports changes while the page is open; the tags form below is left alone.
        section #live data-refresh="10" {
        h2 { "Metrics" }
        (metrics(d))
        h2 { "Apps" }
        @if d.apps.is_empty() {
            p.muted { "No app is ordered to this device or reported by it." }
        } @else {
            table #apps {
                tr { th { "App" } th { "State" } th.num { "Restarts" } th { "Health" } th { "Runs" } th { "Manifest" } th { "Fleet wants" } th { "Latest report" } }
                @for a in &d.apps {
                    tr {
                        td { (a.app) }
                        @match &a.status {
                            Some(st) => {
                                td { (st.state) @if let Some(w) = &st.wrong_variant { br; span.error { "wrong variant: " (w) } } }
                                td.num { (st.restarts) }
                                td { @match &st.health { Some(h) => (h), None => span.muted { "no check" } } }
                                td { @match &st.release { Some(r) => code { (r) }, None => span.muted { "none" } } }
                                td { @match &st.manifest { Some(m) => code { (m) }, None => span.muted { "none" } } }
                            }
                            None => td colspan="5" { span.muted { "not reported yet" } }
                        }
                        td { @match &a.desired {
                            Some(Some(r)) => code { (r) },
                            Some(None) => span.muted { "removed" },
                            None => span.muted { "no order" },
                        } }
                        td { @if let Some(r) = &a.update { (report_kind(r)) " " code { (r.release()) } } }
                    }
                }
            }
        }
        h2 { "Update history" }
        @if d.history.is_empty() {
            p.muted { "No update reported." }
        } @else {
            table #history {
                tr { th { "When" } th { "App" } th { "Release" } th { "Event" } th { "Cause" } th { "Reason" } }
                @for (at, app, report) in &d.history {
                    tr {
                        td { (ago(now, *at)) }
                        td { (app) }
                        td { code { (report.release()) } }
                        td { (report_kind(report)) }
                        td { @if let Some(c) = cause_of(report) {
                            span class=(format!("cause cause-{}", c.slug())) { (c.label()) }
                        } }
                        td.mono { @if let Some(r) = reason(report) { (r) } }
                    }
                }
            }
        }
        }
        h2 { "Tags" }
        @if d.tags.is_empty() { p.muted { "No tags." } }
        @if let Some(e) = &form.error { p.error #tags-error { (e) } }
        @if d.revoked {
            table #tags { @for (k, v) in &d.tags { tr { th { (k) } td { code { (v) } } } } }
        } @else {
            form.stack #tags method="post" action=(format!("{path}/tags")) {
                (csrf_field(session))
                @if !d.tags.is_empty() {
                    table {
                        tr { th { "Tag" } th { "Value" } th { "Remove" } }
                        @for (k, v) in &d.tags {
                            tr {
                                td { code { (k) } }
                                td { code { (v) } }
                                td { input type="checkbox" name="remove" value=(k) checked[form.remove.contains(k)]; }
                            }
                        }
                    }
                }
                label for="set" { "Set tags, one key=value a line" }
                textarea #set name="set" rows="3" cols="40" placeholder="site=roof" { (form.set) }
                p { button.primary type="submit" { "Save tags" } }
            }
            h2 { "Revoke" }
            form.inline method="post" action=(format!("{path}/revoke")) {
                (csrf_field(session))
                p.muted { "A revoked device's credential is refused from then on; to come back it enrolls again with a new token." }
                button.danger type="submit" { "Revoke…" }
            }
        }
    }
}

fn report_kind(r: &Report) -> &'static str {
    match r {
        Report::Preparing { .. } => "preparing",
        Report::PrepareFailed { .. } => "prepare failed",
        Report::Probation { .. } => "probation",
        Report::Committed { .. } => "committed",
        Report::RolledBack { .. } => "rolled back",
        Report::Removed { .. } => "removed",
    }
}

fn reason(r: &Report) -> Option<&str> {
    match r {
        Report::PrepareFailed { reason, .. } | Report::RolledBack { reason, .. } => Some(reason),
        _ => None,
    }
}

/// A metric over time, for a chart.
struct Series {
    label: &'static str,
    unit: &'static str,
    now: Option<f64>,
    points: Vec<f64>,
}

fn percent(used: Option<u64>, total: Option<u64>) -> Option<f64> {
    match (used, total) {
        (Some(u), Some(t)) if t > 0 => Some(u as f64 * 100.0 / t as f64),
        _ => None,
    }
}

fn series(d: &DeviceDetail) -> Vec<Series> {
    type Pick = fn(&Metrics) -> Option<f64>;
    let pick: [(&'static str, &'static str, Pick); 4] = [
        ("CPU", "%", |m| m.cpu_percent.map(f64::from)),
        ("Memory", "%", |m| percent(m.memory_used, m.memory_total)),
        ("Disk", "%", |m| percent(m.disk_used, m.disk_total)),
        ("Temperature", "°C", |m| {
            m.temperature_celsius.map(f64::from)
        }),
    ];
    pick.into_iter()
        .map(|(label, unit, f)| Series {
            label,
            unit,
            now: d.metrics.as_ref().and_then(f),
            points: d.samples.iter().filter_map(|(_, m)| f(m)).collect(),
        })
        // "Where reported": a board without a thermal sensor gets no temperature row.
        .filter(|s| s.now.is_some() || !s.points.is_empty())
        .collect()
}

fn metrics(d: &DeviceDetail) -> Markup {
    let all = series(d);
    html! {
        @if all.is_empty() {
            p.muted { "No metrics reported yet." }
        } @else {
            table #metrics {
                tr { th { "Metric" } th.num { "Now" } th { "Last " (SAMPLES_KEPT_SECS / 86_400) " days (a sample every 5 min at most)" } }
                @for s in &all {
                    tr {
                        td { (s.label) }
                        td.num { @match s.now { Some(v) => { (format!("{v:.1}")) " " (s.unit) }, None => span.muted { "–" } } }
                        td { @match spark_points(&s.points) {
                            Some(points) => svg.spark viewBox="0 0 100 30" preserveAspectRatio="none" role="img" aria-label=(format!("{} over time", s.label)) {
                                polyline points=(points) {}
                            },
                            None => span.muted { "a chart needs two samples" },
                        } }
                    }
                }
            }
        }
    }
}

/// A polyline's points for `values` in a 100×30 box, averaged down to [`SPARK_POINTS`]; `None` under two values.
fn spark_points(values: &[f64]) -> Option<String> {
    if values.len() < 2 {
        return None;
    }
    let per = values.len().div_ceil(SPARK_POINTS);
    let avg: Vec<f64> = values
        .chunks(per)
        .map(|c| c.iter().sum::<f64>() / c.len() as f64)
        .collect();
    if avg.len() < 2 {
        return None;
    }
    let lo = avg.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = avg.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let span = hi - lo;
    let last = (avg.len() - 1) as f64;
    let points: Vec<String> = avg
        .iter()
        .enumerate()
        .map(|(i, v)| {
            // A flat line sits in the middle; otherwise the range fills the box, 1 unit from each edge.
            let y = if span > 0.0 {
                29.0 - (v - lo) / span * 28.0
            } else {
                15.0
            };
            format!("{:.1},{y:.1}", i as f64 * 100.0 / last)
        })
        .collect();
    Some(points.join(" "))
}

async fn revoke(
    State(s): State<Shared>,
    Path(name): Path<String>,
    posted: Posted,
) -> Result<Response, PageError> {
    let path = format!("/devices/{}", encode_path(&name));
    if posted.get("confirm") != Some("yes") {
        let session = &posted.session;
        let body = html! {
            p { "Revoke " strong { (name) } "? Its credential is refused from then on, its apps are no longer ordered, and running rollouts drop it. To come back it must enroll again with a new token." }
            form.inline method="post" action=(format!("{path}/revoke")) {
                (csrf_field(session))
                input type="hidden" name="confirm" value="yes";
                button.danger type="submit" { "Revoke " (name) }
            }
            " " a href=(path) { "Keep it" }
        };
        return Ok(html_response(
            StatusCode::OK,
            layout("Revoke a device", Nav::Devices, Some(session), body),
        ));
    }
    s.with_db(move |db| {
        let id = db.live_device(&name)?;
        db.revoke(&id)
    })
    .await?;
    // Its rollouts re-plan without it, as after the API's revoke.
    s.drive().await?;
    Ok(Redirect::to(&path).into_response())
}

async fn tags(
    State(s): State<Shared>,
    Path(name): Path<String>,
    posted: Posted,
) -> Result<Response, PageError> {
    let form = TagForm {
        set: posted.get("set").unwrap_or("").to_string(),
        remove: posted.all("remove").map(str::to_string).collect(),
        error: None,
    };
    let checked = parse_tag_lines(&form.set).and_then(|set| {
        check_tags("set", &set).map_err(|e| e.to_string())?;
        for k in &form.remove {
            check_field("remove", "tag", k).map_err(|e| e.to_string())?;
        }
        Ok(set)
    });
    let set = match checked {
        Ok(set) => set,
        Err(error) => {
            let session = posted.session.clone();
            let form = TagForm {
                error: Some(error),
                ..form
            };
            return render(&s, &session, name, form, StatusCode::UNPROCESSABLE_ENTITY).await;
        }
    };
    let path = format!("/devices/{}", encode_path(&name));
    let remove = form.remove;
    s.with_db(move |db| db.set_device_tags(&name, &set, &remove))
        .await?;
    // Rollouts select by tags: a device that now matches one (or no longer does) is ordered at once.
    s.drive().await?;
    Ok(Redirect::to(&path).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_lines_need_an_equals_sign() {
        let set = parse_tag_lines("site = roof\n\nring=canary\n").unwrap();
        assert_eq!(set.len(), 2);
        assert_eq!(set["site"], "roof");
        let e = parse_tag_lines("site=roof\nroof").unwrap_err();
        assert!(e.starts_with("Line 2:"), "{e}");
    }

    #[test]
    fn sparklines_fill_the_box_and_average_long_series() {
        assert_eq!(spark_points(&[1.0]), None);
        assert_eq!(
            spark_points(&[10.0, 20.0]).as_deref(),
            Some("0.0,29.0 100.0,1.0")
        );
        assert_eq!(
            spark_points(&[5.0, 5.0, 5.0]).as_deref(),
            Some("0.0,15.0 50.0,15.0 100.0,15.0")
        );
        let long: Vec<f64> = (0..2016).map(f64::from).collect();
        let points = spark_points(&long).unwrap();
        assert!(points.split(' ').count() <= SPARK_POINTS, "{points}");
    }
}
