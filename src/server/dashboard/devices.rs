//! The devices list: every device, filtered and paginated by the database so that a page costs the same at
//! 100,000 devices as at ten. Filters are a GET form (they work with JavaScript off and can be bookmarked), and
//! the pager's links keep them.

use std::collections::BTreeMap;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::get;
use maud::{Markup, html};
use serde::Deserialize;

use super::cause::{
    DeviceState, OFFLINE_AFTER_SECS, platform_sql, state_clause, state_sets, state_sql,
};
use super::{Nav, Operator, PageError, Shared, ago, badge, encode, html_response, layout};
use crate::server::store::{ConnExt, Row, ServerDb, ServerDbError, Value};
use crate::server::views::check_field;

pub const PAGE_SIZE: u64 = 50;

pub fn routes() -> Router<Shared> {
    Router::new().route("/devices", get(page))
}

/// How recently a device was heard from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    Hour,
    Day,
    Week,
    /// Silent for a day or more.
    NotInDay,
}

impl Seen {
    const ALL: [Seen; 4] = [Seen::Hour, Seen::Day, Seen::Week, Seen::NotInDay];

    fn slug(self) -> &'static str {
        match self {
            Seen::Hour => "1h",
            Seen::Day => "1d",
            Seen::Week => "7d",
            Seen::NotInDay => "never-in-1d",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Seen::Hour => "in the last hour",
            Seen::Day => "in the last day",
            Seen::Week => "in the last 7 days",
            Seen::NotInDay => "not in the last day",
        }
    }

    fn from_slug(s: &str) -> Option<Seen> {
        Seen::ALL.into_iter().find(|x| x.slug() == s)
    }
}

/// The query string as the form sends it: every field may be empty.
#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    q: Option<String>,
    tag: Option<String>,
    platform: Option<String>,
    app: Option<String>,
    release: Option<String>,
    state: Option<String>,
    seen: Option<String>,
    page: Option<String>,
}

/// What the list is narrowed to, checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub q: String,
    pub tag: Option<(String, String)>,
    pub platform: String,
    pub app: String,
    pub release: String,
    pub state: Option<DeviceState>,
    pub seen: Option<Seen>,
    /// From 1.
    pub page: u64,
}

fn nonempty(v: &Option<String>) -> String {
    v.as_deref().unwrap_or("").trim().to_string()
}

impl Filter {
    /// The filter, and what was wrong with the query (that part is then left out, and the page says so).
    fn parse(q: &ListQuery) -> (Filter, Vec<String>) {
        let mut problems = Vec::new();
        let tag_text = nonempty(&q.tag);
        let tag = if tag_text.is_empty() {
            None
        } else {
            match tag_text.split_once('=') {
                Some((k, v))
                    if check_field("tag", "tag", k.trim()).is_ok()
                        && check_field("tag", "tag value", v.trim()).is_ok() =>
                {
                    Some((k.trim().to_string(), v.trim().to_string()))
                }
                _ => {
                    problems.push(format!(
                        "The tag filter {tag_text:?} is not key=value with a tag name and value (letters, digits, '-', '_', '.'); it was left out."
                    ));
                    None
                }
            }
        };
        let state_text = nonempty(&q.state);
        let state = DeviceState::from_slug(&state_text);
        if state.is_none() && !state_text.is_empty() {
            problems.push(format!(
                "There is no state {state_text:?}; choose one from the list."
            ));
        }
        let seen_text = nonempty(&q.seen);
        let seen = Seen::from_slug(&seen_text);
        if seen.is_none() && !seen_text.is_empty() {
            problems.push(format!(
                "There is no last-seen choice {seen_text:?}; choose one from the list."
            ));
        }
        // Bounded so that the offset stays an SQLite integer and the page's arithmetic cannot overflow.
        let page = nonempty(&q.page)
            .parse::<u64>()
            .unwrap_or(1)
            .clamp(1, i64::MAX as u64 / PAGE_SIZE);
        (
            Filter {
                q: nonempty(&q.q),
                tag,
                platform: nonempty(&q.platform),
                app: nonempty(&q.app),
                release: nonempty(&q.release),
                state,
                seen,
                page,
            },
            problems,
        )
    }

    /// This filter's query string at `page` (no `?`), leaving out what is empty.
    pub fn query(&self, page: u64) -> String {
        let tag = self.tag.as_ref().map(|(k, v)| format!("{k}={v}"));
        let pairs: [(&str, Option<&str>); 7] = [
            ("q", Some(self.q.as_str())),
            ("tag", tag.as_deref()),
            ("platform", Some(self.platform.as_str())),
            ("app", Some(self.app.as_str())),
            ("release", Some(self.release.as_str())),
            ("state", self.state.map(DeviceState::slug)),
            ("seen", self.seen.map(Seen::slug)),
        ];
        let mut parts: Vec<String> = pairs
            .iter()
            .filter_map(|(k, v)| {
                v.filter(|v| !v.is_empty())
                    .map(|v| format!("{k}={}", encode(v)))
            })
            .collect();
        if page > 1 {
            parts.push(format!("page={page}"));
        }
        parts.join("&")
    }
}

/// `%` and `_` mean themselves in a name search.
fn like_pattern(text: &str) -> String {
    let mut p = String::with_capacity(text.len() + 2);
    p.push('%');
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            p.push('\\');
        }
        p.push(c);
    }
    p.push('%');
    p
}

/// A row of the list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRow {
    pub name: String,
    pub state: String,
    pub platform: String,
    pub tags: BTreeMap<String, String>,
    /// (app, release it runs as the device says).
    pub apps: Vec<(String, Option<String>)>,
    pub last_seen: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceList {
    pub total: u64,
    pub rows: Vec<DeviceRow>,
    /// Every platform enrolled devices have, for the filter's choice.
    pub platforms: Vec<String>,
}

/// The arguments of a statement built piece by piece, each piece taking the next placeholder.
#[derive(Default)]
struct Args(Vec<Value>);

impl Args {
    /// The placeholder of `v`, bound next.
    fn bind(&mut self, v: impl Into<Value>) -> String {
        self.0.push(v.into());
        format!("?{}", self.0.len())
    }
}

impl ServerDb {
    /// One page of the devices `f` selects, by name, and how many it selects in all.
    pub fn device_list(&self, f: &Filter, now: u64) -> Result<DeviceList, ServerDbError> {
        let d = self.conn.dialect();
        let platform = platform_sql(d);
        let offline_at = now.saturating_sub(OFFLINE_AFTER_SECS);
        let mut args = Args::default();
        let mut offline_before = None;
        let mut clauses: Vec<String> = Vec::new();
        match f.state {
            Some(state) => {
                // Revoked devices' clause reads no time, and PostgreSQL cannot type a placeholder nothing reads.
                if state != DeviceState::Revoked {
                    offline_before = Some(args.bind(offline_at));
                }
                clauses.push(state_clause(
                    state,
                    offline_before.as_deref().unwrap_or("NULL"),
                ));
            }
            // Revoked devices are history: listed only when asked for.
            None => clauses.push("d.revoked = 0".into()),
        }
        if !f.q.is_empty() {
            let q = args.bind(like_pattern(&f.q));
            clauses.push(d.like_ignoring_case("d.name", &q));
        }
        if let Some((k, v)) = &f.tag {
            // The key is a checked tag name: no quote can end SQLite's JSON path early.
            let key = args.bind(k);
            let value = args.bind(v);
            clauses.push(format!("{} = {value}", d.json_key_text("d.tags", &key)));
        }
        if !f.platform.is_empty() {
            clauses.push(format!("{platform} = {}", args.bind(&f.platform)));
        }
        if !f.app.is_empty() || !f.release.is_empty() {
            let mut sub = String::from("EXISTS (SELECT 1 FROM device_apps a WHERE a.device = d.id");
            if !f.app.is_empty() {
                sub.push_str(&format!(" AND a.app = {}", args.bind(&f.app)));
            }
            if !f.release.is_empty() {
                sub.push_str(&format!(
                    " AND {} = {}",
                    d.json_text("a.status", &["release"]),
                    args.bind(&f.release)
                ));
            }
            sub.push(')');
            clauses.push(sub);
        }
        if let Some(seen) = f.seen {
            // Most devices were seen lately: `+` keeps SQLite from walking the last_seen index for those and
            // sorting them all by name, instead of walking names and stopping at a page.
            let (op, secs) = match seen {
                Seen::Hour => ("+d.last_seen >=", 3600),
                Seen::Day => ("+d.last_seen >=", 86_400),
                Seen::Week => ("+d.last_seen >=", 7 * 86_400),
                Seen::NotInDay => ("d.last_seen <", 86_400),
            };
            clauses.push(format!("{op} {}", args.bind(now.saturating_sub(secs))));
        }
        let filter = clauses.join(" AND ");
        let sets = state_sets(d);
        let count_sql = format!("{sets} SELECT count(*) FROM devices d WHERE {filter}");
        let count_args = args.0.len();
        // The page shows each device's state, whatever the filter read.
        let offline_before = match offline_before {
            Some(p) => p,
            None => args.bind(offline_at),
        };
        let offset = args.bind((f.page - 1) * PAGE_SIZE);
        // One statement for the page and the count, so that the state sets are computed once for both (the
        // count is a subquery of no row of the page: the database runs it once).
        let sql = format!(
            "{sets}
             SELECT d.id, d.name, {}, {platform}, d.tags, d.last_seen,
                    (SELECT {} FROM device_apps a WHERE a.device = d.id),
                    (SELECT count(*) FROM devices d WHERE {filter})
               FROM devices d WHERE {filter} ORDER BY d.name LIMIT {PAGE_SIZE} OFFSET {offset}",
            state_sql(d, &offline_before),
            d.json_agg_arrays(&["a.app", &d.json_text("a.status", &["release"])]),
        );
        type Raw = (String, String, String, String, String, u64, String, u64);
        let raw: Vec<Raw> = self
            .conn
            .rows(&sql, &args.0, Row::read)
            .map_err(self.err())?;
        let total = match raw.first() {
            Some(row) => row.7,
            // Past the last page (or nothing matches): the count alone.
            None => self
                .conn
                .one(&count_sql, &args.0[..count_args])
                .map_err(self.err())?,
        };
        let seen = self.news.seen();
        let rows = raw
            .into_iter()
            .map(|(id, name, state, platform, tags, last_seen, apps, _)| {
                let damaged = |what: &str, e: serde_json::Error| ServerDbError::Damaged {
                    what: format!("{what} of the device {name}"),
                    message: e.to_string(),
                };
                let tags = serde_json::from_str(&tags).map_err(|e| damaged("tags", e))?;
                let mut apps: Vec<(String, Option<String>)> =
                    serde_json::from_str(&apps).map_err(|e| damaged("apps", e))?;
                apps.sort();
                // Heard from since the last flush: the list shows it, as the API's does.
                let last_seen = seen
                    .get(&id)
                    .map_or(last_seen, |n| n.last_seen.max(last_seen));
                Ok(DeviceRow {
                    name,
                    state,
                    platform,
                    tags,
                    apps,
                    last_seen,
                })
            })
            .collect::<Result<_, ServerDbError>>()?;
        // Read from the platform index alone; a platform only revoked devices had stays a choice. Sorted here by
        // bytes: a computed text sorts by the database's collation on PostgreSQL, which may be linguistic.
        let mut platforms: Vec<String> = self
            .conn
            .rows(
                &format!("SELECT DISTINCT {platform} AS p FROM devices d ORDER BY p"),
                &[],
                |r| r.get(0),
            )
            .map_err(self.err())?;
        platforms.sort();
        Ok(DeviceList {
            total,
            rows,
            platforms,
        })
    }
}

async fn page(
    State(s): State<Shared>,
    Operator(session): Operator,
    Query(q): Query<ListQuery>,
) -> Result<Response, PageError> {
    let (f, problems) = Filter::parse(&q);
    let now = s.now();
    let query = f.clone();
    let list = s.with_db(move |db| db.device_list(&query, now)).await?;
    let pages = list.total.div_ceil(PAGE_SIZE).max(1);
    let first = (f.page - 1) * PAGE_SIZE + 1;
    let last = first + list.rows.len() as u64 - 1;
    let body = html! {
        (filter_form(&f, &list.platforms))
        @for p in &problems { p.error { (p) } }
        section #list data-refresh="10" {
        p #count {
            @if list.rows.is_empty() {
                @if list.total == 0 { "No device matches." } @else { "No device on page " (f.page) " of " (pages) "." }
            } @else {
                "Devices " (first) "–" (last) " of " strong { (list.total) } "."
            }
        }
        @if !list.rows.is_empty() {
            table #devices {
                tr { th { "Name" } th { "State" } th { "Platform" } th { "Tags" } th { "Apps" } th { "Last seen" } }
                @for d in &list.rows {
                    tr {
                        td { a href=(format!("/devices/{}", encode_path(&d.name))) { (d.name) } }
                        td { (badge(&d.state)) }
                        td { code { (d.platform) } }
                        td { @for (k, v) in &d.tags { code { (k) "=" (v) } " " } }
                        td {
                            @for (app, release) in &d.apps {
                                div { (app) " " @match release {
                                    Some(r) => code { (r) },
                                    None => span.muted { "none" },
                                } }
                            }
                        }
                        td { (ago(now, d.last_seen)) }
                    }
                }
            }
        }
        }
        (pager(&f, pages))
    };
    Ok(html_response(
        StatusCode::OK,
        layout("Devices", Nav::Devices, Some(&session), body),
    ))
}

/// A device name in a path: names are checked at enrollment, but a revoked one carries `~revoked~`.
pub fn encode_path(name: &str) -> String {
    encode(name).replace('+', "%20")
}

fn filter_form(f: &Filter, platforms: &[String]) -> Markup {
    let tag = f
        .tag
        .as_ref()
        .map(|(k, v)| format!("{k}={v}"))
        .unwrap_or_default();
    html! {
        form.filters method="get" action="/devices" {
            label { "Name" br; input type="search" name="q" value=(f.q) placeholder="part of a name"; }
            label { "Tag" br; input type="text" name="tag" value=(tag) placeholder="site=roof"; }
            label { "Platform" br;
                select name="platform" {
                    option value="" { "any" }
                    @for p in platforms {
                        option value=(p) selected[*p == f.platform] { (p) }
                    }
                }
            }
            label { "App" br; input type="text" name="app" value=(f.app) size="12"; }
            label { "Release" br; input type="text" name="release" value=(f.release) size="12"; }
            label { "State" br;
                select name="state" {
                    option value="" { "any but revoked" }
                    @for st in DeviceState::ALL {
                        option value=(st.slug()) selected[f.state == Some(st)] { (st.slug()) }
                    }
                }
            }
            label { "Last seen" br;
                select name="seen" {
                    option value="" { "any time" }
                    @for s in Seen::ALL {
                        option value=(s.slug()) selected[f.seen == Some(s)] { (s.label()) }
                    }
                }
            }
            button.primary type="submit" { "Filter" }
            a href="/devices" { "Clear" }
        }
    }
}

fn pager(f: &Filter, pages: u64) -> Markup {
    let link = |page: u64| {
        let q = f.query(page);
        if q.is_empty() {
            "/devices".to_string()
        } else {
            format!("/devices?{q}")
        }
    };
    html! {
        nav.pager {
            @if f.page > 1 { a rel="prev" href=(link((f.page - 1).min(pages))) { "← Previous" } }
            span.muted { "Page " (f.page) " of " (pages) }
            @if f.page < pages { a rel="next" href=(link(f.page + 1)) { "Next →" } }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::store::{Dialect, Row};

    /// Every combination of revoked, silent, and an app's wanted release with each report (or none, or no
    /// release wanted), on two apps: the state filter puts each device where STATE_SQL says it is.
    #[test]
    fn the_state_filter_agrees_with_the_state_sql() {
        let dir = tempfile::tempdir().unwrap();
        let db = ServerDb::open(&dir.path().join("server.db")).unwrap();
        let reports = [
            None,
            Some("committed"),
            Some("preparing"),
            Some("rolled-back"),
            Some("prepare-failed"),
            Some("probation"),
        ];
        let mut n = 0;
        let c = &db.conn;
        let d = c.dialect();
        // One transaction: the database syncs every commit.
        let tx = c.begin().unwrap();
        for revoked in [false, true] {
            for last_seen in [100u64, 1000] {
                for a in reports {
                    for b in reports {
                        for wanted_b in [true, false] {
                            n += 1;
                            let id = format!("d{n}");
                            tx.execute(
                                "INSERT INTO devices (id, name, credential_hash, tags, platform, agent_version,
                                                      enrolled, last_seen, revoked)
                                 VALUES (?1, ?1, ?1, '{}', '{}', '0', 0, ?2, ?3)",
                                crate::args![&id, last_seen, revoked],
                            )
                            .unwrap();
                            for (app, report, wanted) in [("a", a, true), ("b", b, wanted_b)] {
                                tx.execute(
                                    "INSERT INTO desired (device, app, release) VALUES (?1, ?2, ?3)",
                                    crate::args![&id, app, wanted.then_some("r2")],
                                )
                                .unwrap();
                                if let Some(event) = report {
                                    let report =
                                        serde_json::json!({"event": event, "release": "r2"});
                                    tx.execute(
                                        "INSERT INTO device_updates (device, app, release, report, at, received)
                                         VALUES (?1, ?2, 'r2', ?3, 0, 0)",
                                        crate::args![&id, app, report.to_string()],
                                    )
                                    .unwrap();
                                }
                            }
                        }
                    }
                }
            }
        }
        tx.commit().unwrap();
        let ob = 500u64;
        let pair = |r: &Row| Ok((r.get::<String>(0)?, r.get::<String>(1)?));
        let want: Vec<(String, String)> = c
            .rows(
                &format!("SELECT d.id, {} FROM devices d", state_sql(d, "?1")),
                crate::args![ob],
                pair,
            )
            .unwrap();
        for state in DeviceState::ALL {
            let sql = format!(
                "{} SELECT d.id FROM devices d WHERE {}",
                state_sets(d),
                state_clause(state, "?1")
            );
            // The revoked devices' clause reads no time, and is given none.
            let args = if state == DeviceState::Revoked {
                crate::args![]
            } else {
                crate::args![ob]
            };
            let mut got: Vec<String> = c.rows(&sql, args, |r| r.get(0)).unwrap();
            got.sort();
            let mut expected: Vec<String> = want
                .iter()
                .filter(|(_, s)| s == state.slug())
                .map(|(id, _)| id.clone())
                .collect();
            expected.sort();
            assert!(!expected.is_empty(), "{state:?} has devices");
            assert_eq!(got, expected, "{state:?}");
        }
        // The overview's and /metrics' counts.
        let counts = db.device_state_counts(ob + OFFLINE_AFTER_SECS).unwrap();
        for (state, n) in counts {
            let expected = want.iter().filter(|(_, s)| s == state.slug()).count();
            assert_eq!(n as usize, expected, "{state:?}");
        }
    }

    /// SQLite only: its plans are what EXPLAIN QUERY PLAN shows, and it matches an index on an expression only
    /// when the query spells the expression as the index does. PostgreSQL's planner needs no such care.
    #[test]
    fn the_platform_and_state_filters_read_their_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let db = ServerDb::open(&dir.path().join("server.db")).unwrap();
        let d = db.conn.dialect();
        assert_eq!(d, Dialect::Sqlite, "ServerDb::open opens SQLite");
        let platform = platform_sql(d);
        let running = state_clause(DeviceState::Running, "0");
        for (sql, index) in [
            (
                format!("SELECT DISTINCT {platform} AS p FROM devices d ORDER BY p"),
                "devices_platform",
            ),
            (
                format!("SELECT count(*) FROM devices d WHERE {platform} = 'linux/arm64'"),
                "devices_platform",
            ),
            (
                format!(
                    "SELECT count(*) FROM devices d WHERE d.revoked = 0 AND {platform} = 'linux/arm64'"
                ),
                "devices_platform",
            ),
            (
                format!(
                    "{} SELECT count(*) FROM devices d WHERE {running}",
                    state_sets(d)
                ),
                "device_updates_event",
            ),
        ] {
            let plan: Vec<String> = db
                .conn
                .rows(&format!("EXPLAIN QUERY PLAN {sql}"), &[], |r| r.get(3))
                .unwrap();
            assert!(plan.iter().any(|p| p.contains(index)), "{sql}: {plan:?}");
        }
    }

    #[test]
    fn searches_take_wildcards_literally() {
        assert_eq!(like_pattern("a%b_c\\"), "%a\\%b\\_c\\\\%");
    }

    #[test]
    fn the_pager_keeps_the_filters() {
        let q = ListQuery {
            tag: Some("site=roof".into()),
            platform: Some("linux/arm/v6".into()),
            state: Some("failed".into()),
            seen: Some("bogus".into()),
            page: Some("3".into()),
            ..ListQuery::default()
        };
        let (f, problems) = Filter::parse(&q);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(f.page, 3);
        assert_eq!(
            f.query(4),
            "tag=site%3Droof&platform=linux%2Farm%2Fv6&state=failed&page=4"
        );
        assert_eq!(
            f.query(1),
            "tag=site%3Droof&platform=linux%2Farm%2Fv6&state=failed"
        );
        let (bad, problems) = Filter::parse(&ListQuery {
            tag: Some("no-equals".into()),
            ..ListQuery::default()
        });
        assert_eq!(bad.tag, None);
        assert_eq!(problems.len(), 1);
    }
}
