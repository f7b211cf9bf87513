//! Prometheus metrics at `/metrics` (OpenMetrics text, with `prometheus-client`).
//!
//! Two kinds, kept apart because several replicas may one day serve one database (issue 17):
//! - the fleet's: devices by state and platform, rollout progress and the devices' outbox lag. They are counted
//!   from the database at scrape time, so every replica gives the same numbers; aggregate them with `max`, never
//!   `sum`. Their HELP says so.
//! - this replica's: request latency by route template and status class, counted in memory as requests end.
//!
//! Label values a device chose (its platform) are escaped here: `prometheus-client` 0.24 writes label values as
//! they are, and a `"` or a newline in one would let a device write lines of its own into the scrape.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::api::{ApiError, Server};
use super::dashboard::cause::{DeviceState, OFFLINE_AFTER_SECS};
use super::store::{ConnExt, ServerDb, ServerDbError};

type Shared = std::sync::Arc<Server>;

/// What Prometheus is told the answer is.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Request durations, in seconds: from half a millisecond (a heartbeat) to the minute a long poll is held.
const LATENCY_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 65.0,
];

/// Reports waiting in a device's outbox: one is the heartbeat itself; thousands are days offline.
const OUTBOX_BUCKETS: [f64; 8] = [1.0, 2.0, 5.0, 10.0, 100.0, 1_000.0, 10_000.0, 100_000.0];

const REPLICA_NOTE: &str = "computed from the fleet database at scrape time: every replica reports the \
                            whole fleet, so aggregate with max, not sum";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    /// The route's template (`/v1/rollouts/{id}`), never the raw path: one series per route, not per id.
    route: String,
    /// `2xx`, `4xx`, ...
    status: String,
}

type LatencyFamily = Family<RequestLabels, Histogram, fn() -> Histogram>;

/// What this replica measures of its own requests and rollout plans.
#[derive(Debug)]
pub struct HttpMetrics {
    registry: Registry,
    durations: LatencyFamily,
    plans: Histogram,
}

impl Default for HttpMetrics {
    fn default() -> HttpMetrics {
        let durations: LatencyFamily =
            Family::new_with_constructor(|| Histogram::new(LATENCY_BUCKETS));
        let mut registry = Registry::default();
        registry.register(
            "flotilla_http_request_duration_seconds",
            "Time to answer a request, by route template and status class; this replica only (sum across \
             replicas)",
            durations.clone(),
        );
        let plans = Histogram::new(LATENCY_BUCKETS);
        registry.register(
            "flotilla_rollout_plan_duration_seconds",
            "Time to plan the rollouts, on the tick or for the reports and enrollments that asked while the plan \
             before ran (one plan covers them all); this replica only",
            plans.clone(),
        );
        HttpMetrics {
            registry,
            durations,
            plans,
        }
    }
}

impl HttpMetrics {
    pub(super) fn plan_took(&self, took: std::time::Duration) {
        self.plans.observe(took.as_secs_f64());
    }
}

/// The middleware timing every request of the API and the dashboard. Applied per route (`Router::layer`), so the
/// route's template is known; what no route matched counts as `unmatched`.
pub async fn time_request(State(s): State<Shared>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_string();
    let started = Instant::now();
    let resp = next.run(req).await;
    let labels = RequestLabels {
        route: escape(&route),
        status: format!("{}xx", resp.status().as_u16() / 100),
    };
    s.http_metrics()
        .durations
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    resp
}

/// `GET /metrics`. On the main listener the API's guard has checked the admin token before this runs.
pub async fn scrape(State(s): State<Shared>) -> Result<Response, ApiError> {
    let now = s.now();
    let fleet = s.with_reader(move |db| db.fleet_metrics(now)).await?;
    let text = render(&fleet, s.http_metrics()).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the metrics: {e}"),
        )
    })?;
    Ok(([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response())
}

/// The fleet as the gauges show it, counted by the database.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FleetMetrics {
    /// Every [`DeviceState`], in its order, zeros included.
    pub by_state: Vec<(DeviceState, u64)>,
    /// Platform → devices not revoked.
    pub by_platform: Vec<(String, u64)>,
    pub rollouts: Vec<RolloutProgress>,
    pub outbox: OutboxLag,
}

/// A running or paused rollout, from its stored plan.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RolloutProgress {
    pub id: u64,
    pub app: String,
    pub paused: bool,
    pub waves_started: u64,
    pub waves: u64,
    /// State → devices: ordered (in a started wave), waiting (for its wave, or ordered and silent), updating,
    /// healthy, failed, timed_out, incompatible (never ordered, counted nowhere else).
    pub devices: Vec<(&'static str, u64)>,
}

/// The devices' outbox lag, over the devices heard from lately that report it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OutboxLag {
    /// Per bucket of [`OUTBOX_BUCKETS`] and a last one for larger: devices (not cumulative).
    pub buckets: Vec<u64>,
    pub devices: u64,
    pub pending_sum: f64,
    pub oldest_age_max: f64,
}

/// Rollout device states, as the gauges name them; the plan's own words are mapped onto them in SQL.
const ROLLOUT_STATES: [&str; 7] = [
    "ordered",
    "waiting",
    "updating",
    "healthy",
    "failed",
    "timed_out",
    "incompatible",
];

impl ServerDb {
    /// One query per family of gauges; nothing per device is read into memory.
    pub fn fleet_metrics(&self, now: u64) -> Result<FleetMetrics, ServerDbError> {
        let offline_before = now.saturating_sub(OFFLINE_AFTER_SECS);
        let mut m = FleetMetrics {
            by_state: self.device_state_counts(now)?,
            by_platform: self.platform_counts()?,
            ..FleetMetrics::default()
        };

        let d = self.conn.dialect();
        let state = d.json_text("r.state", &["state"]);
        let sql = format!(
            "SELECT r.id, r.app, {state} = 'paused', r.waves_started, {}, {},
                    (SELECT coalesce(CAST(sum({}) AS BIGINT), 0)
                       FROM {} WHERE w.key < r.waves_started)
               FROM rollouts r
              WHERE {state} IN ('running', 'paused') ORDER BY r.id",
            d.json_array_len("r.plan", &["waves"]),
            d.json_array_len("r.plan", &["incompatible"]),
            d.json_array_len("w.value", &["devices"]),
            d.json_elements("r.plan", &["waves"], "w"),
        );
        type Row = (u64, String, bool, u64, u64, u64, u64);
        let rows: Vec<Row> = self
            .conn
            .rows(&sql, &[], crate::server::store::Row::read)
            .map_err(self.err())?;
        let sql = format!(
            "SELECT r.id,
                    CASE WHEN e.value = 'timed out' THEN 'timed_out'
                         WHEN e.value LIKE 'failed%' THEN 'failed'
                         ELSE e.value END AS s,
                    count(*)
               FROM rollouts r, {}
              WHERE {state} IN ('running', 'paused')
                AND NOT EXISTS (SELECT 1 FROM {} WHERE {} = e.key)
              GROUP BY r.id, s",
            d.json_members("r.plan", &["devices"], "e"),
            d.json_elements("r.plan", &["incompatible"], "i"),
            d.json_text("i.value", &["device"]),
        );
        let standing: Vec<(u64, String, u64)> = self
            .conn
            .rows(&sql, &[], crate::server::store::Row::read)
            .map_err(self.err())?;
        m.rollouts = rows
            .into_iter()
            .map(
                |(id, app, paused, waves_started, waves, incompatible, ordered)| {
                    let devices = ROLLOUT_STATES
                        .into_iter()
                        .map(|state| {
                            let n = match state {
                                "ordered" => ordered,
                                "incompatible" => incompatible,
                                _ => standing
                                    .iter()
                                    .filter(|(r, s, _)| *r == id && s == state)
                                    .map(|(_, _, n)| n)
                                    .sum(),
                            };
                            (state, n)
                        })
                        .collect();
                    RolloutProgress {
                        id,
                        app,
                        paused,
                        waves_started,
                        waves,
                        devices,
                    }
                },
            )
            .collect();

        // Device-supplied numbers up to 2^64 - 1 are stored as JSON; SQLite reads the largest as reals, so they
        // are read as reals throughout: a device cannot make the scrape fail.
        let bucket_of = OUTBOX_BUCKETS
            .iter()
            .enumerate()
            .map(|(i, le)| format!("WHEN v <= {le:?} THEN {i}"))
            .collect::<Vec<_>>()
            .join(" ");
        // DOUBLE PRECISION: a REAL is 4 bytes on PostgreSQL (SQLite reads the name as its REAL).
        let number = |key: &str| {
            format!(
                "CAST({} AS DOUBLE PRECISION)",
                d.json_text("d.metrics", &[key])
            )
        };
        let sql = format!(
            "SELECT CAST(CASE {bucket_of} ELSE {} END AS BIGINT) AS b, count(*), sum(v), max(age)
               FROM (SELECT {} AS v, {} AS age
                       FROM devices d
                      WHERE d.revoked = 0 AND d.last_seen >= ?1
                        AND {} IS NOT NULL) AS lag
              GROUP BY b",
            OUTBOX_BUCKETS.len(),
            number("outbox_pending"),
            number("outbox_oldest_age_secs"),
            d.json_text("d.metrics", &["outbox_pending"]),
        );
        let lag: Vec<(usize, u64, f64, Option<f64>)> = self
            .conn
            .rows(&sql, crate::args![offline_before], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .map_err(self.err())?;
        let mut outbox = OutboxLag {
            buckets: vec![0; OUTBOX_BUCKETS.len() + 1],
            ..OutboxLag::default()
        };
        for (b, n, sum, age) in lag {
            if let Some(slot) = outbox.buckets.get_mut(b) {
                *slot += n;
            }
            outbox.devices += n;
            outbox.pending_sum += sum;
            outbox.oldest_age_max = outbox.oldest_age_max.max(age.unwrap_or(0.0));
        }
        m.outbox = outbox;
        Ok(m)
    }
}

/// A histogram whose buckets the database counted: `prometheus-client`'s own only counts observations.
#[derive(Debug)]
struct Counted {
    sum: f64,
    count: u64,
    /// Upper bound (`f64::MAX`: +Inf) → observations in this bucket alone; the encoder sums them up.
    buckets: Vec<(f64, u64)>,
}

impl EncodeMetric for Counted {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_histogram::<NoLabelSet>(self.sum, self.count, &self.buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PlatformLabels {
    platform: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RolloutLabels {
    rollout: String,
    app: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RolloutStateLabels {
    rollout: String,
    app: String,
    state: String,
}

fn gauge(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The whole scrape: the fleet's gauges, then this replica's.
pub fn render(fleet: &FleetMetrics, http: &HttpMetrics) -> Result<String, std::fmt::Error> {
    let mut r = Registry::default();

    let devices = Family::<StateLabels, Gauge>::default();
    for (state, n) in &fleet.by_state {
        devices
            .get_or_create(&StateLabels {
                state: state.slug().to_string(),
            })
            .set(gauge(*n));
    }
    r.register(
        "flotilla_devices",
        format!("Devices by state (running, updating, failed, offline, revoked); {REPLICA_NOTE}"),
        devices,
    );

    let platforms = Family::<PlatformLabels, Gauge>::default();
    for (platform, n) in &fleet.by_platform {
        platforms
            .get_or_create(&PlatformLabels {
                platform: escape(platform),
            })
            .set(gauge(*n));
    }
    r.register(
        "flotilla_devices_by_platform",
        format!("Devices not revoked by the platform their detection ranked first; {REPLICA_NOTE}"),
        platforms,
    );

    let rollout_devices = Family::<RolloutStateLabels, Gauge>::default();
    let wave = Family::<RolloutLabels, Gauge>::default();
    let waves = Family::<RolloutLabels, Gauge>::default();
    let paused = Family::<RolloutLabels, Gauge>::default();
    for ro in &fleet.rollouts {
        let labels = RolloutLabels {
            rollout: ro.id.to_string(),
            app: escape(&ro.app),
        };
        wave.get_or_create(&labels).set(gauge(ro.waves_started));
        waves.get_or_create(&labels).set(gauge(ro.waves));
        paused.get_or_create(&labels).set(i64::from(ro.paused));
        for (state, n) in &ro.devices {
            rollout_devices
                .get_or_create(&RolloutStateLabels {
                    rollout: labels.rollout.clone(),
                    app: labels.app.clone(),
                    state: state.to_string(),
                })
                .set(gauge(*n));
        }
    }
    r.register(
        "flotilla_rollout_devices",
        format!(
            "Devices of each running or paused rollout by state (ordered: in a started wave; failed includes \
             timed-out devices only where the rollout counts them so); {REPLICA_NOTE}"
        ),
        rollout_devices,
    );
    r.register(
        "flotilla_rollout_wave",
        format!("Waves started of each running or paused rollout; {REPLICA_NOTE}"),
        wave,
    );
    r.register(
        "flotilla_rollout_waves",
        format!("Waves of each running or paused rollout; {REPLICA_NOTE}"),
        waves,
    );
    r.register(
        "flotilla_rollout_paused",
        format!("1 for a paused rollout, 0 for a running one; {REPLICA_NOTE}"),
        paused,
    );

    let mut buckets: Vec<(f64, u64)> = OUTBOX_BUCKETS
        .iter()
        .copied()
        .zip(fleet.outbox.buckets.iter().copied())
        .collect();
    buckets.push((
        f64::MAX,
        fleet
            .outbox
            .buckets
            .get(OUTBOX_BUCKETS.len())
            .copied()
            .unwrap_or(0),
    ));
    r.register(
        "flotilla_device_outbox_pending",
        format!(
            "Reports waiting in the devices' outboxes, one observation per device heard from in the last 5 \
             minutes, as its last heartbeat said; {REPLICA_NOTE}"
        ),
        Counted {
            sum: fleet.outbox.pending_sum,
            count: fleet.outbox.devices,
            buckets,
        },
    );
    let oldest = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
    oldest.set(fleet.outbox.oldest_age_max);
    r.register(
        "flotilla_device_outbox_oldest_age_seconds_max",
        format!(
            "The longest any device heard from in the last 5 minutes has had a report waiting in its outbox; \
             {REPLICA_NOTE}"
        ),
        oldest,
    );

    let mut out = String::new();
    prometheus_client::encoding::text::encode_registry(&mut out, &r)?;
    prometheus_client::encoding::text::encode_registry(&mut out, &http.registry)?;
    prometheus_client::encoding::text::encode_eof(&mut out)?;
    Ok(out)
}

/// A label value as the OpenMetrics text format must carry it.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_cannot_break_out_of_their_quotes() {
        assert_eq!(escape("linux/arm/v6"), "linux/arm/v6");
        assert_eq!(escape("a\"} 1\nevil 2\\"), "a\\\"} 1\\nevil 2\\\\");
    }
}
