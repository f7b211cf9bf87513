//! The overview: the fleet's devices by state, by platform and by app release, and the rollouts under way.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use maud::html;

use super::cause::{DeviceState, OFFLINE_AFTER_SECS, platform_sql, state_clause, state_sets};
use super::{Nav, Operator, PageError, Shared, badge, encode, html_response, layout};
use crate::server::store::{ConnExt, Row, ServerDb, ServerDbError};

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
    /// Devices by state over the whole fleet, in [`DeviceState::ALL`]'s order, by the conditions the devices page
    /// filters with; running is what is left of the live devices, which spares a pass over all of them (about
    /// 110 ms at 100,000 devices where a state per device took 150).
    pub fn device_state_counts(&self, now: u64) -> Result<Vec<(DeviceState, u64)>, ServerDbError> {
        let offline_before = now.saturating_sub(OFFLINE_AFTER_SECS);
        let d = self.conn.dialect();
        let count = |s| {
            format!(
                "(SELECT count(*) FROM devices d WHERE {})",
                state_clause(s, "?1")
            )
        };
        let sql = format!(
            "{} SELECT {}, {}, (SELECT count(*) FROM devices d WHERE d.revoked = 0), {}, {}",
            state_sets(d),
            count(DeviceState::Revoked),
            count(DeviceState::Offline),
            count(DeviceState::Failed),
            count(DeviceState::Updating),
        );
        let (revoked, offline, kept, failed, updating): (u64, u64, u64, u64, u64) = self
            .conn
            .row(&sql, crate::args![offline_before], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })
            .map_err(self.err())?
            .unwrap_or_default();
        let running = kept.saturating_sub(offline + failed + updating);
        Ok(DeviceState::ALL
            .into_iter()
            .map(|s| {
                let n = match s {
                    DeviceState::Running => running,
                    DeviceState::Updating => updating,
                    DeviceState::Failed => failed,
                    DeviceState::Offline => offline,
                    DeviceState::Revoked => revoked,
                };
                (s, n)
            })
            .collect())
    }

    /// Devices not revoked by the platform their detection ranked first, most devices first.
    pub fn platform_counts(&self) -> Result<Vec<(String, u64)>, ServerDbError> {
        let sql = format!(
            "SELECT {} AS p, count(*) AS n FROM devices d WHERE d.revoked = 0
              GROUP BY p ORDER BY n DESC, p",
            platform_sql(self.conn.dialect())
        );
        let mut counts: Vec<(String, u64)> =
            self.conn.rows(&sql, &[], Row::read).map_err(self.err())?;
        // Ties by bytes, as SQLite orders them: PostgreSQL orders a computed text by the database's collation.
        counts.sort_by(|(p, n), (q, m)| m.cmp(n).then_with(|| p.cmp(q)));
        Ok(counts)
    }

    pub fn overview(&self, now: u64) -> Result<Overview, ServerDbError> {
        let d = self.conn.dialect();
        let mut o = Overview::default();
        o.by_state = self.device_state_counts(now)?;
        o.total = o.by_state.iter().map(|(_, n)| n).sum();
        o.by_platform = self.platform_counts()?;
        // What runs, as the devices say (their app status), not what the fleet wants.
        let sql = format!(
            "SELECT a.app, {} AS r, count(*) FROM device_apps a
              WHERE a.device NOT IN (SELECT id FROM devices WHERE revoked <> 0)
              GROUP BY a.app, r ORDER BY a.app, count(*) DESC",
            d.json_text("a.status", &["release"])
        );
        o.by_release = self.conn.rows(&sql, &[], Row::read).map_err(self.err())?;
        // Releases as many devices run are in the engine's order, whatever it is: ordered here, "not running any"
        // first, so both engines show the same.
        o.by_release
            .sort_by(|(a, r, n), (b, s, m)| a.cmp(b).then(m.cmp(n)).then_with(|| r.cmp(s)));
        let state = d.json_text("state", &["state"]);
        let sql = format!(
            "SELECT id, app, release, {state} FROM rollouts
              WHERE {state} IN ('running', 'paused') ORDER BY id DESC"
        );
        o.active_rollouts = self
            .conn
            .rows(&sql, &[], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .map_err(self.err())?;
        Ok(o)
    }
}

pub async fn page(
    State(s): State<Shared>,
    Operator(session): Operator,
) -> Result<Response, PageError> {
    let now = s.now();
    // On the reading connection: counting 100,000 devices must not hold up their heartbeats.
    let o = s.with_reader(move |db| db.overview(now)).await?;
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
