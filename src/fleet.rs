//! The fleet protocol: the JSON the agent and the server exchange under `/v1`, and nothing else. The agent never
//! imports the server and the server never imports the agent; both import this.
//!
//! - `POST /v1/enroll` (enrollment token in `Authorization: Bearer`): [`EnrollRequest`] → [`Enrolled`], whose
//!   credential is shown once; the server keeps only its hash.
//! - `GET /v1/device/desired` (device credential; `If-None-Match` with the last ETag, `?wait=` seconds to hold the
//!   request while nothing changes): [`Desired`].
//! - `POST /v1/device/reports`: [`ReportBatch`], answered with [`Accepted`]. Every event carries an id the
//!   agent chose, so a batch sent again after a lost answer is taken once.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::app::RunSettings;
use crate::update::Report;

/// The longest request body the server reads; a larger one is refused with 413 before it is parsed.
pub const MAX_BODY_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    pub name: String,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    pub agent_version: String,
    pub platform: PlatformReport,
    /// A secret the device drew once and keeps until it has a credential (base64url, at least 32 characters): a
    /// retry with the same token and id gets the same device and credential, so a lost reply is harmless.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrollment_id: Option<String>,
}

impl EnrollRequest {
    /// A fresh enrollment id: 256 bits from the OS's generator, base64url.
    pub fn new_enrollment_id() -> String {
        let mut bytes = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
        base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, bytes)
    }

    /// An enrollment id the server accepts: 192 bits or more, base64url, so that the credential derived from it
    /// cannot be guessed.
    pub fn enrollment_id_is_valid(id: &str) -> bool {
        (32..=128).contains(&id.len())
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    }
}

/// What the device runs, as its detection decided: the candidates best first, and the evidence summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlatformReport {
    pub candidates: Vec<String>,
    pub page_size: Option<u64>,
    /// The host as detection described it (CPU model, kernel, userland), for people reading the fleet's view.
    pub description: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Enrolled {
    pub device_id: String,
    /// 256 random bits, base64url; the device's only credential.
    pub credential: String,
}

/// The device's desired state: each app at a release.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Desired {
    pub apps: Vec<DesiredApp>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredApp {
    pub name: String,
    pub release: String,
    /// The image as the release resolved it: the index digest, pinned.
    pub image: String,
    /// Each platform's manifest digest at release time: the agent checks that what it pulls is what was released.
    pub manifests: BTreeMap<String, String>,
    pub settings: RunSettings,
    /// How many times the operator has asked this device to try the release again after it failed here. A device
    /// does not try a release that failed on it again unless this grew. Omitted when 0, so that agents older than
    /// the field still read every order that is not a retry.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attempt: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// A desired state as a device reads it: app by app, so that one order it cannot read (a hostile value, a newer
/// server's field) is refused on its own, reported, and leaves that app as it is, while the others apply. Read
/// whole, one such order would make the device ignore every change, and tell the server nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredOrders {
    pub apps: Vec<DesiredApp>,
    pub unreadable: Vec<UnreadableOrder>,
}

/// An app's order that does not read, named by what of it does.
#[derive(Debug, Clone, PartialEq)]
pub struct UnreadableOrder {
    pub name: String,
    pub release: String,
    pub error: String,
}

impl DesiredOrders {
    /// Fails only when the document itself, or an order's app name or release, does not read: then there is
    /// nothing to refuse by name.
    pub fn from_value(value: serde_json::Value) -> Result<DesiredOrders, serde_json::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Wire {
            apps: Vec<serde_json::Value>,
        }
        #[derive(Deserialize)]
        struct Named {
            name: String,
            release: String,
        }
        let wire = Wire::deserialize(value)?;
        let mut orders = DesiredOrders {
            apps: Vec::new(),
            unreadable: Vec::new(),
        };
        for app in wire.apps {
            match DesiredApp::deserialize(&app) {
                Ok(a) => orders.apps.push(a),
                Err(e) => {
                    let named = Named::deserialize(&app)?;
                    orders.unreadable.push(UnreadableOrder {
                        name: named.name,
                        release: named.release,
                        error: e.to_string(),
                    });
                }
            }
        }
        Ok(orders)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportBatch {
    pub events: Vec<Event>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// Chosen by the agent, unique per device: the server takes an id once.
    pub id: String,
    /// Seconds since the Unix epoch, by the device's clock.
    pub at: u64,
    /// The event's place in the device's outbox, rising for the life of the device's database: what orders its
    /// reports. The device's clock cannot: a Pi without a real-time clock steps back when NTP syncs. Absent from
    /// agents before it existed; their reports order by `at`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    pub body: EventBody,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
// Adjacently tagged: an internal tag would be an unknown field to the variants' strict structs.
#[serde(tag = "kind", content = "data", rename_all = "kebab-case")]
pub enum EventBody {
    Heartbeat(Metrics),
    Platform(PlatformReport),
    App(AppStatus),
    Update { app: String, report: Report },
}

/// System metrics; each is absent when the board cannot tell (no thermal sensor, for one).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Metrics {
    pub cpu_percent: Option<f32>,
    pub memory_used: Option<u64>,
    pub memory_total: Option<u64>,
    pub disk_used: Option<u64>,
    pub disk_total: Option<u64>,
    pub uptime: Option<u64>,
    pub load: Option<[f64; 3]>,
    pub temperature_celsius: Option<f32>,
    /// Reports this device holds back because the server refused each of them alone as malformed (a newer agent's
    /// event an older server cannot read): kept in the agent's `dead_letter` table instead of blocking the rest.
    pub dead_letters: Option<u64>,
    /// Reports waiting in the agent's outbox for the server, this heartbeat included.
    pub outbox_pending: Option<u64>,
    /// How long the oldest of them has waited, by the device's clock: how far behind the fleet's view of it is.
    pub outbox_oldest_age_secs: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppStatus {
    pub app: String,
    pub release: Option<String>,
    pub manifest: Option<String>,
    /// The platform of the variant that runs.
    pub platform: Option<String>,
    /// As `flotilla ps` says it: running, exited, restarting…
    pub state: String,
    pub restarts: u32,
    pub health: Option<String>,
    /// Set when a run failed in a way that shows the variant is wrong for this device.
    pub wrong_variant: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Accepted {
    /// Ids taken now, or taken before (a replay): the agent drops both from its outbox.
    pub accepted: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_and_unknown_fields_are_refused() {
        let batch = ReportBatch {
            events: vec![
                Event {
                    id: "e1".into(),
                    at: 1_700_000_000,
                    seq: None,
                    body: EventBody::Heartbeat(Metrics {
                        load: Some([0.1, 0.2, 0.3]),
                        ..Metrics::default()
                    }),
                },
                Event {
                    id: "e2".into(),
                    at: 1_700_000_001,
                    seq: None,
                    body: EventBody::Update {
                        app: "sensor".into(),
                        report: Report::RolledBack {
                            release: "r2".into(),
                            to: Some("r1".into()),
                            reason: "exit code 132".into(),
                            wrong_variant: true,
                        },
                    },
                },
            ],
        };
        let json = serde_json::to_string(&batch).unwrap();
        assert_eq!(serde_json::from_str::<ReportBatch>(&json).unwrap(), batch);
        assert!(json.contains(r#""kind":"update""#), "{json}");
        let forged = json.replacen(r#""id":"e1""#, r#""id":"e1","device":"someone-else""#, 1);
        assert!(serde_json::from_str::<ReportBatch>(&forged).is_err());
    }
}
