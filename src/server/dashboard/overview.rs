//! The overview: the fleet's devices by state, by platform and by app release, and the rollouts under way.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use maud::html;
use rusqlite::named_params;

use super::cause::{DeviceState, OFFLINE_AFTER_SECS, PLATFORM_SQL, STATE_BY_SETS_SQL, STATE_SETS};
use super::{Nav, Operator, PageError, Shared, badge, encode, html_response, layout};
use crate::server::db::{ServerDb, ServerDbError};

/// What the overview shows, counted by the database.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overview {
    pub total: u64,
    /// Per [`DeviceState`], in its order.
    pub by_state: Vec<(DeviceState, u64)>,
    /// Platform → devices, most devices first.
    pub by_platform: Vec<(String, u64)>,
    /// (app, release or None for "not running any") → devices, by app.
    pub by_release: Vec<(String, Option<String>, u64)>,
    /// Rollouts running or paused: id, app, release, state.
    pub active_rollouts: Vec<(u64, String, String, String)>,
}

impl ServerDb {
    pub fn overview(&self, now: u64) -> Result<Overview, ServerDbError> {
        let offline_before = now.saturating_sub(OFFLINE_AFTER_SECS);
        let mut o = Overview::default();
        let mut st = self
            .conn
            .prepare(&format!(
                "{STATE_SETS} SELECT state, count(*) FROM (SELECT {STATE_BY_SETS_SQL} AS state FROM devices d)
                 GROUP BY state"
            ))
            .map_err(self.err())?;
        let counts: Vec<(String, u64)> = st
            .query_map(named_params! {":offline_before": offline_before}, |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .map_err(self.err())?
            .collect::<Result<_, _>>()
            .map_err(self.err())?;
        o.by_state = DeviceState::ALL
            .into_iter()
            .map(|s| {
                let n = counts
                    .iter()
                    .find(|(k, _)| k == s.slug())
                    .map_or(0, |(_, n)| *n);
                (s, n)
            })
            .collect();
        o.total = o.by_state.iter().map(|(_, n)| n).sum();
        let mut st = self
            .conn
            .prepare(&format!(
                "SELECT {PLATFORM_SQL} AS p, count(*) AS n FROM devices d WHERE NOT d.revoked
                 GROUP BY p ORDER BY n DESC, p"
            ))
            .map_err(self.err())?;
        o.by_platform = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(self.err())?
            .collect::<Result<_, _>>()
            .map_err(self.err())?;
        // What runs, as the devices say (their app status), not what the fleet wants.
        let mut st = self
            .conn
            .prepare(
                "SELECT a.app, json_extract(a.status, '$.release') AS r, count(*) FROM device_apps a
                   JOIN devices d ON d.id = a.device WHERE NOT d.revoked
                  GROUP BY a.app, r ORDER BY a.app, count(*) DESC",
            )
            .map_err(self.err())?;
        o.by_release = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(self.err())?
            .collect::<Result<_, _>>()
            .map_err(self.err())?;
        let mut st = self
            .conn
            .prepare(
                "SELECT id, app, release, json_extract(state, '$.state') FROM rollouts
                  WHERE json_extract(state, '$.state') IN ('running', 'paused') ORDER BY id DESC",
            )
            .map_err(self.err())?;
        o.active_rollouts = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .map_err(self.err())?
            .collect::<Result<_, _>>()
            .map_err(self.err())?;
        Ok(o)
    }
}

pub async fn page(
    State(s): State<Shared>,
    Operator(session): Operator,
) -> Result<Response, PageError> {
    let now = s.now();
    let o = s.with_db(move |db| db.overview(now)).await?;
    let body = html! {
        section #counts data-refresh="5" {
            div.cards {
                div.card { div.n { (o.total) } div.muted { "devices" } }
                @for (state, n) in &o.by_state {
                    a.card href=(format!("/devices?state={}", state.slug())) {
                        div.n { (n) } (badge(state.slug()))
                    }
                }
            }
        }
        h2 { "Platforms" }
        @if o.by_platform.is_empty() {
            p.muted { "No device has enrolled yet. Make a token on the Tokens page and enroll one." }
        } @else {
            table #platforms {
                tr { th { "Platform" } th.num { "Devices" } }
                @for (platform, n) in &o.by_platform {
                    tr {
                        td { a href=(format!("/devices?platform={}", encode(platform))) { code { (platform) } } }
                        td.num { (n) }
                    }
                }
            }
        }
        h2 { "Releases running" }
        @if o.by_release.is_empty() {
            p.muted { "No device has reported an app yet." }
        } @else {
            table #releases {
                tr { th { "App" } th { "Release" } th.num { "Devices" } }
                @for (app, release, n) in &o.by_release {
                    tr {
                        td { (app) }
                        td { @match release {
                            Some(r) => a href=(format!("/devices?app={}&release={}", encode(app), encode(r))) { code { (r) } },
                            None => span.muted { "none" },
                        } }
                        td.num { (n) }
                    }
                }
            }
        }
        h2 { "Rollouts under way" }
        section #active data-refresh="5" {
            @if o.active_rollouts.is_empty() {
                p.muted { "None." }
            } @else {
                table {
                    tr { th { "Rollout" } th { "App" } th { "Release" } th { "State" } }
                    @for (id, app, release, state) in &o.active_rollouts {
                        tr {
                            td { a href=(format!("/rollouts/{id}")) { "#" (id) } }
                            td { (app) }
                            td { code { (release) } }
                            td { (badge(state)) }
                        }
                    }
                }
            }
        }
    };
    Ok(html_response(
        StatusCode::OK,
        layout("Overview", Nav::Overview, Some(&session), body),
    ))
}
