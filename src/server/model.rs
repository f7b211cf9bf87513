//! The fleet model the operator works with: apps, releases pinned to digests, rollouts and the devices' view, and
//! the rollout driver that turns [`crate::rollout::plan`] into each device's desired releases.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};

use super::db::{ServerDb, ServerDbError, hash_secret, new_secret, to_json};
use crate::app::{RunSettings, SettingsError};
use crate::fleet::{AppStatus, Desired, DesiredApp, Metrics, PlatformReport};
use crate::rollout::{self, Progress, RolloutState};
use crate::update::Report;

/// A day: long enough to provision a device, short enough that a token found in a drawer later is worth nothing.
pub const DEFAULT_TOKEN_TTL_SECS: u64 = 24 * 3600;
/// Ten years: anything longer is meant as "never", which is said with null.
pub const MAX_TOKEN_TTL_SECS: u64 = 10 * 365 * 24 * 3600;

fn default_token_ttl() -> Option<u64> {
    Some(DEFAULT_TOKEN_TTL_SECS)
}

fn default_token_uses() -> Option<u32> {
    Some(1)
}

/// An enrollment token to make. Absent fields take the safe defaults (one use, a day); unlimited is asked for
/// with an explicit null, so a client that forgets a field never makes an everlasting token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// Seconds from now; null: never.
    #[serde(default = "default_token_ttl")]
    pub expires_in: Option<u64>,
    /// How many devices may enroll with it; null: unlimited.
    #[serde(default = "default_token_uses")]
    pub uses: Option<u32>,
    /// Tags every device enrolled with it gets.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Also take the tags a device asks for when it enrolls (the token's own win a conflict). Off: the device's
    /// wishes are ignored, since tags decide which rollouts, and so which secrets, reach it.
    #[serde(default)]
    pub device_tags: bool,
}

impl Default for TokenRequest {
    fn default() -> TokenRequest {
        TokenRequest {
            expires_in: default_token_ttl(),
            uses: default_token_uses(),
            tags: BTreeMap::new(),
            device_tags: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenCreated {
    /// What `token list` and `token revoke` name it by; not a secret.
    pub id: String,
    /// The secret, shown this once.
    pub token: String,
    pub expires: Option<u64>,
    pub uses: Option<u32>,
    pub tags: BTreeMap<String, String>,
    pub device_tags: bool,
}

/// A token as `token list` shows it: never its secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenView {
    pub id: String,
    pub created: u64,
    pub expires: Option<u64>,
    /// None: unlimited.
    pub uses_left: Option<u32>,
    /// Devices enrolled with it.
    pub enrolled: u64,
    pub tags: BTreeMap<String, String>,
    pub device_tags: bool,
    pub revoked: bool,
}

/// Whether a token still enrolls devices, and if not, why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenState {
    Valid,
    Expired,
    UsedUp,
    Revoked,
}

impl TokenState {
    /// For CSS classes.
    pub fn slug(self) -> &'static str {
        match self {
            TokenState::Valid => "valid",
            TokenState::Expired => "expired",
            TokenState::UsedUp => "used-up",
            TokenState::Revoked => "revoked",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            TokenState::UsedUp => "used up",
            other => other.slug(),
        }
    }
}

impl TokenView {
    /// A revoked token says so first, whatever else holds of it; then expiry, then its uses.
    pub fn state(&self, now: u64) -> TokenState {
        if self.revoked {
            TokenState::Revoked
        } else if self.expires.is_some_and(|e| now >= e) {
            TokenState::Expired
        } else if self.uses_left == Some(0) {
            TokenState::UsedUp
        } else {
            TokenState::Valid
        }
    }
}

/// The operator's change to a device's tags: `set` first, then `remove`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TagsRequest {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppRequest {
    pub name: String,
    #[serde(default)]
    pub settings: RunSettings,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppView {
    pub name: String,
    pub settings: RunSettings,
    pub created: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseRequest {
    pub app: String,
    pub image: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseView {
    pub id: String,
    pub app: String,
    /// As the operator gave it.
    pub image: String,
    /// `repo@sha256:…` of the index: what devices pull.
    pub pinned: String,
    /// Platform (`linux/arm/v6`) → manifest digest, read from the index when the release was made.
    pub manifests: BTreeMap<String, String>,
    pub created: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutRequest {
    pub release: String,
    /// Tag selector: every pair must match; empty selects every device.
    #[serde(default)]
    pub select: BTreeMap<String, String>,
    /// Cumulative waves: `["10%", "50%", "100%"]` or device counts `["1", "5"]`.
    pub waves: Vec<String>,
    /// `10%` or a count.
    pub max_failures: String,
    #[serde(default)]
    pub soak_secs: u64,
    /// Order the failed waves back, each device to its own last committed release, when the threshold pauses
    /// the rollout.
    #[serde(default)]
    pub rollback: bool,
    /// A device not heard from for this long while the rollout waits for it is timed out; 0: never.
    #[serde(default = "default_device_timeout")]
    pub device_timeout_secs: u64,
    /// A timed-out device is left out instead of counting as failed.
    #[serde(default)]
    pub skip_timed_out: bool,
}

/// 30 minutes: many heartbeats (and long polls) missed, so the device is down, not slow; a slow update still
/// heartbeats.
pub const DEFAULT_DEVICE_TIMEOUT_SECS: u64 = 30 * 60;

fn default_device_timeout() -> u64 {
    DEFAULT_DEVICE_TIMEOUT_SECS
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case", deny_unknown_fields)]
pub enum StateView {
    Running,
    Paused {
        reason: String,
    },
    Aborted,
    Done,
    /// A newer rollout of the app started; this one orders nothing more.
    Superseded,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaveView {
    pub devices: Vec<String>,
    pub healthy: usize,
    /// Timed-out devices included, unless the rollout skips them.
    pub failed: usize,
    #[serde(default)]
    pub timed_out: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Incompatible {
    pub device: String,
    pub platforms: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutView {
    pub id: u64,
    pub app: String,
    pub spec: RolloutRequest,
    pub previous: Option<String>,
    pub status: StateView,
    pub waves_started: usize,
    pub waves: Vec<WaveView>,
    pub incompatible: Vec<Incompatible>,
    /// Devices that joined the last wave after the rollout started.
    pub late: Vec<String>,
    /// Per device of the rollout: what it reports about the release, or "timed out".
    pub devices: BTreeMap<String, String>,
    pub created: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceApp {
    pub app: String,
    /// The release the fleet wants here.
    pub desired: Option<String>,
    /// What the device last said of the app.
    pub status: Option<AppStatus>,
    /// Its last update report.
    pub update: Option<Report>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceView {
    pub id: String,
    pub name: String,
    pub tags: BTreeMap<String, String>,
    pub platform: PlatformReport,
    pub agent_version: String,
    pub enrolled: u64,
    pub last_seen: u64,
    pub revoked: bool,
    pub metrics: Option<Metrics>,
    pub apps: Vec<DeviceApp>,
}

/// Operator actions on a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Pause,
    Resume,
    Abort,
    /// Order the devices that failed or timed out the release again (see [`ServerDb::control_rollout`]).
    Retry,
}

impl Control {
    /// The action as the API's path and the dashboard's forms name it.
    pub fn named(name: &str) -> Option<Control> {
        match name {
            "pause" => Some(Control::Pause),
            "resume" => Some(Control::Resume),
            "abort" => Some(Control::Abort),
            "retry" => Some(Control::Retry),
            _ => None,
        }
    }
}

/// What a pause by the operator says; a pause with any other reason is the failure threshold's, which a retry
/// lifts.
pub const OPERATOR_PAUSE: &str = "paused by the operator";

fn from_json<T: serde::de::DeserializeOwned>(what: &str, text: &str) -> Result<T, ServerDbError> {
    serde_json::from_str(text).map_err(|e| ServerDbError::Damaged {
        what: what.to_string(),
        message: e.to_string(),
    })
}

fn state_of(v: &StateView) -> RolloutState {
    match v {
        StateView::Running => RolloutState::Running,
        StateView::Paused { reason } => RolloutState::Paused {
            reason: reason.clone(),
        },
        StateView::Aborted => RolloutState::Aborted,
        StateView::Done => RolloutState::Done,
        StateView::Superseded => RolloutState::Superseded,
    }
}

fn view_of(s: &RolloutState) -> StateView {
    match s {
        RolloutState::Running => StateView::Running,
        RolloutState::Paused { reason } => StateView::Paused {
            reason: reason.clone(),
        },
        RolloutState::Aborted => StateView::Aborted,
        RolloutState::Done => StateView::Done,
        RolloutState::Superseded => StateView::Superseded,
    }
}

/// The waves and threshold of a request, checked.
pub fn parse_spec(
    req: &RolloutRequest,
) -> Result<(Vec<rollout::WaveSize>, rollout::Threshold), ServerDbError> {
    if req.waves.is_empty() {
        return Err(ServerDbError::Field {
            path: "waves".into(),
            message: "a rollout needs at least one wave (--waves 10%,50%,100%)".into(),
        });
    }
    for (i, w) in req.waves.iter().enumerate() {
        if !wave_syntax(w) {
            return Err(ServerDbError::Field {
                path: format!("waves[{i}]"),
                message: format!(
                    "the wave {w:?} is neither a percent above 0 up to 100 (10%, 2.5%) nor a device count (5)"
                ),
            });
        }
    }
    if !threshold_syntax(&req.max_failures) {
        return Err(ServerDbError::Field {
            path: "max_failures".into(),
            message: format!(
                "the failure threshold {:?} is neither a percent above 0 up to 100 (10%) nor a count (3)",
                req.max_failures
            ),
        });
    }
    let field = |path: String| {
        move |e: rollout::SpecError| ServerDbError::Field {
            path,
            message: e.to_string(),
        }
    };
    let waves = req
        .waves
        .iter()
        .enumerate()
        .map(|(i, w)| rollout::parse_wave(w).map_err(field(format!("waves[{i}]"))))
        .collect::<Result<Vec<_>, _>>()?;
    let threshold =
        rollout::parse_threshold(&req.max_failures).map_err(field("max_failures".into()))?;
    for (k, v) in &req.select {
        check_field("select", "tag", k)?;
        check_field(&format!("select.{k}"), "tag value", v)?;
    }
    Ok((waves, threshold))
}

/// An app's settings through the checks the command line and every agent make (`RunSettings::validate`), so an
/// app the devices would refuse is never stored; refused naming the field.
fn check_settings(settings: &RunSettings) -> Result<(), ServerDbError> {
    settings.validate().map_err(|e| match e {
        SettingsError::Field { field, problem } => ServerDbError::Field {
            path: format!("settings.{field}"),
            message: problem,
        },
        other => ServerDbError::Field {
            path: "settings".into(),
            message: other.to_string(),
        },
    })
}

/// A wave exactly as `docs/openapi.yaml` writes its pattern: a percent above 0 up to 100, or a count from 1 with
/// at most 9 digits. The parser is laxer (spaces, `1e1%`); the API is not, so the document is the whole truth.
pub fn wave_syntax(s: &str) -> bool {
    match s.strip_suffix('%') {
        Some(p) => percent_syntax(p),
        None => count_syntax(s) && !s.starts_with('0'),
    }
}

/// The failure threshold: a percent as for waves, or a count from 0.
pub fn threshold_syntax(s: &str) -> bool {
    match s.strip_suffix('%') {
        Some(p) => percent_syntax(p),
        None => s == "0" || (count_syntax(s) && !s.starts_with('0')),
    }
}

fn count_syntax(s: &str) -> bool {
    (1..=9).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit())
}

/// `(100(\.0+)?|[1-9][0-9]?(\.[0-9]+)?|0\.[0-9]*[1-9][0-9]*)`: above 0, up to 100.
fn percent_syntax(p: &str) -> bool {
    let (whole, frac) = match p.split_once('.') {
        Some((w, f)) => (w, Some(f)),
        None => (p, None),
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if frac.is_some_and(|f| !digits(f)) {
        return false;
    }
    match whole {
        "100" => frac.is_none_or(|f| f.bytes().all(|b| b == b'0')),
        "0" => frac.is_some_and(|f| f.bytes().any(|b| b != b'0')),
        w => digits(w) && w.len() <= 2 && !w.starts_with('0'),
    }
}

/// The variant of a release (its `manifests` key) that a device with these platform candidates takes, by the
/// selection the device's own pull makes ([`crate::platform::select::select`]), not by comparing strings: an index
/// labelled `linux/arm64` serves a device that says `linux/arm64/v8`, and an unlabelled `linux/arm` serves a v7
/// device. `None`: the release has nothing this device runs. The planner's `incompatible` and the dashboard's
/// coverage both ask this.
pub fn serves(manifests: &BTreeMap<String, String>, candidates: &[String]) -> Option<String> {
    use crate::platform::Platform;
    use crate::platform::select::{EntryPlatform, IndexEntry, select};
    let labels: Vec<&String> = manifests.keys().collect();
    let entries: Vec<IndexEntry> = manifests
        .iter()
        .enumerate()
        .filter_map(|(position, (label, digest))| {
            let p: Platform = label.parse().ok()?;
            Some(IndexEntry {
                position,
                digest: digest.parse().ok()?,
                media_type: crate::oci::OCI_MANIFEST.to_string(),
                size: 0,
                platform: Some(EntryPlatform {
                    os: p.os,
                    architecture: p.architecture,
                    variant: p.variant,
                    os_version: None,
                    os_features: Vec::new(),
                }),
                annotations: BTreeMap::new(),
                artifact_type: None,
            })
        })
        .collect();
    let candidates: Vec<Platform> = candidates.iter().filter_map(|c| c.parse().ok()).collect();
    let chosen = select(&candidates, &entries).chosen;
    chosen
        .first()
        .and_then(|c| labels.get(c.entry.position))
        .map(|l| l.to_string())
}

/// Device names, tags and app names are plain words: they end up in container names, tables and URLs.
pub fn check_name(what: &str, name: &str) -> Result<(), ServerDbError> {
    if is_name(name) {
        Ok(())
    } else {
        Err(ServerDbError::Invalid(name_rule(what, name)))
    }
}

/// [`check_name`] for a field of a request body: refused as unprocessable, naming the field's path.
pub fn check_field(path: &str, what: &str, name: &str) -> Result<(), ServerDbError> {
    if is_name(name) {
        Ok(())
    } else {
        Err(ServerDbError::Field {
            path: path.to_string(),
            message: name_rule(what, name),
        })
    }
}

/// Tag names and values of a request body, at `path`.
pub fn check_tags(path: &str, tags: &BTreeMap<String, String>) -> Result<(), ServerDbError> {
    for (k, v) in tags {
        check_field(path, "tag", k)?;
        check_field(&format!("{path}.{k}"), "tag value", v)?;
    }
    Ok(())
}

fn is_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with(['.', '-'])
}

fn name_rule(what: &str, name: &str) -> String {
    format!(
        "the {what} {name:?} must be 1 to 63 letters, digits, '-', '_' or '.', not starting with '.' or '-'"
    )
}

impl ServerDb {
    /// Makes the first admin token when there is none; `None` when one exists.
    pub fn ensure_admin_token(&self, now: u64) -> Result<Option<String>, ServerDbError> {
        let any: bool = self
            .conn
            .query_row("SELECT EXISTS (SELECT 1 FROM admin_tokens)", [], |r| {
                r.get(0)
            })
            .map_err(self.err())?;
        if any {
            return Ok(None);
        }
        let token = new_secret();
        self.conn
            .execute(
                "INSERT INTO admin_tokens (hash, created) VALUES (?1, ?2)",
                params![hash_secret(&token), now],
            )
            .map_err(self.err())?;
        Ok(Some(token))
    }

    pub fn is_admin(&self, token: &str) -> Result<bool, ServerDbError> {
        self.conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM admin_tokens WHERE hash = ?1)",
                [hash_secret(token)],
                |r| r.get(0),
            )
            .map_err(self.err())
    }

    pub fn create_app(&self, req: &AppRequest, now: u64) -> Result<AppView, ServerDbError> {
        check_field("name", "app name", &req.name)?;
        check_settings(&req.settings)?;
        let n = self
            .conn
            .execute(
                "INSERT OR IGNORE INTO apps (name, settings, created) VALUES (?1, ?2, ?3)",
                params![req.name, to_json(&req.settings)?, now],
            )
            .map_err(self.err())?;
        if n == 0 {
            return Err(ServerDbError::Exists(format!("the app {}", req.name)));
        }
        Ok(AppView {
            name: req.name.clone(),
            settings: req.settings.clone(),
            created: now,
        })
    }

    pub fn apps(&self) -> Result<Vec<AppView>, ServerDbError> {
        let mut st = self
            .conn
            .prepare("SELECT name, settings, created FROM apps ORDER BY name")
            .map_err(self.err())?;
        let rows = st
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, u64>(2)?,
                ))
            })
            .map_err(self.err())?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.err())?;
        rows.into_iter()
            .map(|(name, settings, created)| {
                Ok(AppView {
                    settings: from_json("app settings", &settings)?,
                    name,
                    created,
                })
            })
            .collect()
    }

    fn app_exists(&self, name: &str) -> Result<bool, ServerDbError> {
        self.conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM apps WHERE name = ?1)",
                [name],
                |r| r.get(0),
            )
            .map_err(self.err())
    }

    /// A release of `app`: `pinned` and `manifests` come from the registry, read by the caller.
    pub fn create_release(
        &self,
        app: &str,
        image: &str,
        pinned: &str,
        manifests: &BTreeMap<String, String>,
        now: u64,
    ) -> Result<ReleaseView, ServerDbError> {
        if !self.app_exists(app)? {
            return Err(ServerDbError::NotFound(format!("the app {app}")));
        }
        // Immediate: a deferred transaction that reads, then writes, fails at once (not after the busy timeout)
        // when the flush connection wrote in between.
        let tx = rusqlite::Transaction::new_unchecked(
            &self.conn,
            rusqlite::TransactionBehavior::Immediate,
        )
        .map_err(self.err())?;
        let n: u64 = tx
            .query_row("SELECT COUNT(*) FROM releases WHERE app = ?1", [app], |r| {
                r.get(0)
            })
            .map_err(self.err())?;
        let id = format!("{app}-{}", n + 1);
        tx.execute(
            "INSERT INTO releases (id, app, image, pinned, manifests, created) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![id, app, image, pinned, to_json(manifests)?, now],
        )
        .map_err(self.err())?;
        tx.commit().map_err(self.err())?;
        Ok(ReleaseView {
            id,
            app: app.to_string(),
            image: image.to_string(),
            pinned: pinned.to_string(),
            manifests: manifests.clone(),
            created: now,
        })
    }

    pub fn releases(&self, only: Option<&str>) -> Result<Vec<ReleaseView>, ServerDbError> {
        let mut st = self
            .conn
            .prepare(
                "SELECT id, app, image, pinned, manifests, created FROM releases
                 WHERE ?1 IS NULL OR id = ?1 ORDER BY created, id",
            )
            .map_err(self.err())?;
        let rows = st
            .query_map([only], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, u64>(5)?,
                ))
            })
            .map_err(self.err())?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.err())?;
        rows.into_iter()
            .map(|(id, app, image, pinned, manifests, created)| {
                Ok(ReleaseView {
                    manifests: from_json("release manifests", &manifests)?,
                    id,
                    app,
                    image,
                    pinned,
                    created,
                })
            })
            .collect()
    }

    pub fn release(&self, id: &str) -> Result<ReleaseView, ServerDbError> {
        self.releases(Some(id))?
            .pop()
            .ok_or_else(|| ServerDbError::NotFound(format!("the release {id}")))
    }

    /// Starts a rollout; the previous release is the one of the app's last rollout that was not aborted.
    pub fn create_rollout(
        &self,
        req: &RolloutRequest,
        now: u64,
    ) -> Result<RolloutView, ServerDbError> {
        parse_spec(req)?;
        let release = self.release(&req.release)?;
        let previous: Option<String> = self
            .conn
            .query_row(
                "SELECT release FROM rollouts WHERE app = ?1 AND release != ?2
                 AND json_extract(state, '$.state') != 'aborted' ORDER BY id DESC LIMIT 1",
                params![release.app, release.id],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.err())?;
        // One rollout per app at a time: a newer one supersedes what is still running.
        self.conn
            .execute(
                "UPDATE rollouts SET state = ?2 WHERE app = ?1
                 AND json_extract(state, '$.state') IN ('running', 'paused')",
                params![release.app, to_json(&StateView::Superseded)?],
            )
            .map_err(self.err())?;
        self.conn
            .execute(
                "INSERT INTO rollouts (release, app, spec, previous, state, waves_started, created)
                 VALUES (?1, ?2, ?3, ?4, ?5, 0, ?6)",
                params![
                    release.id,
                    release.app,
                    to_json(req)?,
                    previous,
                    to_json(&StateView::Running)?,
                    now
                ],
            )
            .map_err(self.err())?;
        let id = self.conn.last_insert_rowid() as u64;
        self.drive(now)?;
        self.rollout(id)
    }

    pub fn rollouts(&self, only: Option<u64>) -> Result<Vec<RolloutView>, ServerDbError> {
        Ok(self
            .rollout_rows(only)?
            .into_iter()
            .map(|(view, _)| view)
            .collect())
    }

    /// Rollouts with what only the planner reads: the frozen waves and whether they were ordered back.
    fn rollout_rows(&self, only: Option<u64>) -> Result<Vec<(RolloutView, Frozen)>, ServerDbError> {
        let mut st = self
            .conn
            .prepare(
                "SELECT id, app, spec, previous, state, waves_started, plan, created, frozen, rolled_back
                 FROM rollouts WHERE ?1 IS NULL OR id = ?1 ORDER BY id",
            )
            .map_err(self.err())?;
        let rows = st
            .query_map([only], |r| {
                Ok((
                    r.get::<_, u64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, Option<String>>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, usize>(5)?,
                    r.get::<_, Option<String>>(6)?,
                    r.get::<_, u64>(7)?,
                    r.get::<_, Option<String>>(8)?,
                    r.get::<_, bool>(9)?,
                ))
            })
            .map_err(self.err())?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.err())?;
        rows.into_iter()
            .map(
                |(
                    id,
                    app,
                    spec,
                    previous,
                    state,
                    waves_started,
                    plan,
                    created,
                    frozen,
                    rolled_back,
                )| {
                    let plan: PlanRecord = match plan {
                        Some(p) => from_json("rollout plan", &p)?,
                        None => PlanRecord::default(),
                    };
                    Ok((
                        RolloutView {
                            id,
                            app,
                            spec: from_json("rollout", &spec)?,
                            previous,
                            status: from_json("rollout state", &state)?,
                            waves_started,
                            waves: plan.waves,
                            incompatible: plan.incompatible,
                            late: plan.late,
                            devices: plan.devices,
                            created,
                        },
                        Frozen {
                            waves: frozen
                                .map(|f| from_json("rollout membership", &f))
                                .transpose()?,
                            rolled_back,
                        },
                    ))
                },
            )
            .collect()
    }

    pub fn rollout(&self, id: u64) -> Result<RolloutView, ServerDbError> {
        self.rollouts(Some(id))?
            .pop()
            .ok_or_else(|| ServerDbError::NotFound(format!("the rollout {id}")))
    }

    pub fn control_rollout(
        &self,
        id: u64,
        control: Control,
        now: u64,
    ) -> Result<RolloutView, ServerDbError> {
        let current = self.rollout(id)?;
        // A rollout that finished with failures below its threshold is the one place its failed devices can be
        // retried (a new rollout of the release orders them the attempt they refused): it opens again, as long
        // as no newer rollout of the app has taken over the devices.
        let newest: u64 = self
            .conn
            .query_row(
                "SELECT max(id) FROM rollouts WHERE app = ?1",
                [&current.app],
                |r| r.get(0),
            )
            .map_err(self.err())?;
        let next = match (control, &current.status) {
            (Control::Retry, StateView::Done) if newest == id => StateView::Running,
            (Control::Retry, StateView::Done) => {
                return Err(ServerDbError::Invalid(format!(
                    "the rollout {id} is done, and the newer rollout {newest} of the app {} orders its devices now; \
                     retry that one's failed devices, or start a new rollout",
                    current.app
                )));
            }
            (_, StateView::Done | StateView::Aborted | StateView::Superseded) => {
                return Err(ServerDbError::Invalid(format!(
                    "the rollout {id} has ended ({}); start a new one",
                    match current.status {
                        StateView::Done => "done",
                        StateView::Superseded => "superseded by a newer rollout of the app",
                        _ => "aborted",
                    }
                )));
            }
            (Control::Pause, _) => StateView::Paused {
                reason: OPERATOR_PAUSE.into(),
            },
            (Control::Resume, _) => StateView::Running,
            (Control::Abort, _) => StateView::Aborted,
            (Control::Retry, StateView::Paused { reason }) if reason == OPERATOR_PAUSE => {
                current.status.clone()
            }
            // The threshold paused it for the failures being retried: with them cleared it runs on (and pauses
            // again if they fail again).
            (Control::Retry, _) => StateView::Running,
        };
        if control == Control::Retry {
            self.retry_failed(&current, now)?;
        }
        self.conn
            .execute(
                "UPDATE rollouts SET state = ?2 WHERE id = ?1",
                params![id, to_json(&next)?],
            )
            .map_err(self.err())?;
        // An aborted rollout is planned this once, to order its devices back; `drive` skips it afterwards.
        let devices = self.devices()?;
        for (r, frozen) in self.rollout_rows(Some(id))? {
            self.drive_one(&r, &frozen, &devices, now)?;
        }
        self.rollout(id)
    }

    /// Gives each device of rollout `r` that failed or timed out the release another attempt: its attempt for the
    /// release grows (its agent tries a release that failed on it only at a new attempt), and its failure report
    /// on the release is dropped from the planner's view (the events keep it), so the planner counts it as ordered
    /// and waits for it again, with a new device timeout from now. How many devices.
    fn retry_failed(&self, r: &RolloutView, now: u64) -> Result<usize, ServerDbError> {
        let frozen = self
            .rollout_rows(Some(r.id))?
            .pop()
            .map(|(_, f)| f)
            .ok_or_else(|| ServerDbError::NotFound(format!("the rollout {}", r.id)))?;
        let devices = self.devices()?;
        let (release, plan) = self.plan_one(r, &frozen, &devices, now)?;
        let tx = self.conn.unchecked_transaction().map_err(self.err())?;
        for device in &plan.failed {
            tx.execute(
                "INSERT INTO retries (device, release, attempt, at) VALUES (?1, ?2, 1, ?3)
                 ON CONFLICT (device, release) DO UPDATE SET attempt = attempt + 1, at = excluded.at",
                params![device, release.id, now],
            )
            .map_err(self.err())?;
            tx.execute(
                "DELETE FROM device_updates WHERE device = ?1 AND app = ?2 AND release = ?3
                 AND json_extract(report, '$.event') IN ('prepare-failed', 'rolled-back')",
                params![device, release.app, release.id],
            )
            .map_err(self.err())?;
        }
        tx.commit().map_err(self.err())?;
        Ok(plan.failed.len())
    }

    /// What a rollout of `req` would do if it started now: the planner's own first plan (its waves, by device
    /// name, and the devices it cannot serve), checked as [`ServerDb::create_rollout`] checks, and stored nowhere.
    pub fn preview_rollout(
        &self,
        req: &RolloutRequest,
        now: u64,
    ) -> Result<rollout::Plan, ServerDbError> {
        parse_spec(req)?;
        let release = self.release(&req.release)?;
        let view = RolloutView {
            id: 0,
            app: release.app,
            spec: req.clone(),
            previous: None,
            status: StateView::Running,
            waves_started: 0,
            waves: Vec::new(),
            incompatible: Vec::new(),
            late: Vec::new(),
            devices: BTreeMap::new(),
            created: now,
        };
        let frozen = Frozen {
            waves: None,
            rolled_back: false,
        };
        let devices = self.devices()?;
        Ok(self.plan_one(&view, &frozen, &devices, now)?.1)
    }

    /// Every device, with what it runs and what the fleet wants of it.
    pub fn devices(&self) -> Result<Vec<DeviceView>, ServerDbError> {
        let mut st = self
            .conn
            .prepare(
                "SELECT id, name, tags, platform, agent_version, enrolled, last_seen, revoked, metrics
                 FROM devices ORDER BY name",
            )
            .map_err(self.err())?;
        type Row = (
            String,
            String,
            String,
            String,
            String,
            u64,
            u64,
            bool,
            Option<String>,
        );
        let rows: Vec<Row> = st
            .query_map([], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                    r.get(8)?,
                ))
            })
            .map_err(self.err())?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.err())?;
        let mut apps: BTreeMap<String, BTreeMap<String, DeviceApp>> = BTreeMap::new();
        fn entry(
            apps: &mut BTreeMap<String, BTreeMap<String, DeviceApp>>,
            device: String,
            app: String,
        ) -> &mut DeviceApp {
            apps.entry(device)
                .or_default()
                .entry(app.clone())
                .or_insert(DeviceApp {
                    app,
                    desired: None,
                    status: None,
                    update: None,
                })
        }
        for (device, app, release) in self.query3("SELECT device, app, release FROM desired")? {
            entry(&mut apps, device, app).desired = release;
        }
        for (device, app, status) in self.query3("SELECT device, app, status FROM device_apps")? {
            if let Some(s) = status {
                entry(&mut apps, device, app).status = Some(from_json("app status", &s)?);
            }
        }
        // The newest report per app.
        for (device, app, report) in self.query3(
            "SELECT device, app, report FROM device_updates d WHERE rowid = (SELECT rowid FROM device_updates e
             WHERE e.device = d.device AND e.app = d.app ORDER BY seq DESC, at DESC LIMIT 1)",
        )? {
            if let Some(r) = report {
                entry(&mut apps, device, app).update = Some(from_json("update report", &r)?);
            }
        }
        rows.into_iter()
            .map(
                |(
                    id,
                    name,
                    tags,
                    platform,
                    agent_version,
                    enrolled,
                    last_seen,
                    revoked,
                    metrics,
                )| {
                    // News not flushed yet is newer than the row.
                    let news = self.seen.borrow().get(&id).cloned().unwrap_or_default();
                    Ok(DeviceView {
                        apps: apps.remove(&id).unwrap_or_default().into_values().collect(),
                        tags: from_json("device tags", &tags)?,
                        platform: from_json("device platform", &platform)?,
                        metrics: match news.metrics {
                            Some(m) => Some(m),
                            None => metrics
                                .map(|m| from_json("device metrics", &m))
                                .transpose()?,
                        },
                        id,
                        name,
                        agent_version,
                        enrolled,
                        last_seen: last_seen.max(news.last_seen),
                        revoked,
                    })
                },
            )
            .collect()
    }

    fn query3(&self, sql: &str) -> Result<Vec<(String, String, Option<String>)>, ServerDbError> {
        let mut st = self.conn.prepare(sql).map_err(self.err())?;
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(self.err())?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.err())
    }

    /// What `device_id` should run: only its own rows, pinned to digests.
    pub fn desired_for(&self, device_id: &str) -> Result<Desired, ServerDbError> {
        let mut st = self
            .conn
            .prepare(
                "SELECT d.app, r.id, r.pinned, r.manifests, a.settings, coalesce(t.attempt, 0) FROM desired d
                 JOIN releases r ON r.id = d.release JOIN apps a ON a.name = d.app
                 LEFT JOIN retries t ON t.device = d.device AND t.release = d.release
                 WHERE d.device = ?1 ORDER BY d.app",
            )
            .map_err(self.err())?;
        let rows = st
            .query_map([device_id], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, u32>(5)?,
                ))
            })
            .map_err(self.err())?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.err())?;
        let apps = rows
            .into_iter()
            .map(|(name, release, image, manifests, settings, attempt)| {
                Ok(DesiredApp {
                    name,
                    release,
                    image,
                    manifests: from_json("release manifests", &manifests)?,
                    settings: from_json("app settings", &settings)?,
                    attempt,
                })
            })
            .collect::<Result<Vec<_>, ServerDbError>>()?;
        Ok(Desired { apps })
    }

    /// Plans every rollout that is running or paused and applies its orders. Called on a timer. True when some
    /// device's desired state changed: only then are the long polls woken.
    pub fn drive(&self, now: u64) -> Result<bool, ServerDbError> {
        self.drive_apps(now, None)
    }

    /// As [`ServerDb::drive`], for the rollouts of `apps` only (all with `None`): a device's update report can
    /// move only the rollouts of the apps it reports on.
    pub fn drive_apps(
        &self,
        now: u64,
        apps: Option<&BTreeSet<String>>,
    ) -> Result<bool, ServerDbError> {
        let wanted = |app: &str| apps.is_none_or(|a| a.contains(app));
        // Most ticks have nothing to plan; reading every device for nothing would hold the database for
        // milliseconds per thousand devices.
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT DISTINCT app FROM rollouts WHERE json_extract(state, '$.state') IN ('running', 'paused')",
            )
            .map_err(self.err())?;
        let active: Vec<String> = st
            .query_map([], |r| r.get(0))
            .map_err(self.err())?
            .collect::<Result<_, _>>()
            .map_err(self.err())?;
        if !active.iter().any(|a| wanted(a)) {
            return Ok(false);
        }
        let devices = self.devices()?;
        let mut changed = false;
        for (r, frozen) in self.rollout_rows(None)? {
            if matches!(r.status, StateView::Running | StateView::Paused { .. }) && wanted(&r.app) {
                changed |= self.drive_one(&r, &frozen, &devices, now)?;
            }
        }
        Ok(changed)
    }

    /// The planner's view of rollout `r` now: its release, and the plan over every device that is not revoked.
    fn plan_one(
        &self,
        r: &RolloutView,
        frozen: &Frozen,
        devices: &[DeviceView],
        now: u64,
    ) -> Result<(ReleaseView, rollout::Plan), ServerDbError> {
        let release = self.release(&r.spec.release)?;
        let (waves, max_failures) = parse_spec(&r.spec)?;
        let current = rollout::Rollout {
            release: release.id.clone(),
            waves,
            max_failures,
            soak: Duration::from_secs(r.spec.soak_secs),
            rollback: r.spec.rollback,
            device_timeout: (r.spec.device_timeout_secs > 0)
                .then(|| Duration::from_secs(r.spec.device_timeout_secs)),
            skip_timed_out: r.spec.skip_timed_out,
            state: state_of(&r.status),
            waves_started: r.waves_started,
            frozen: frozen.waves.clone(),
            rolled_back: frozen.rolled_back,
        };
        let mut reports: BTreeMap<String, (Report, u64)> = BTreeMap::new();
        // Each device's last committed release of the app other than this one: where "back" is for it. Ordered by
        // the device's outbox sequence, then the server's clock (agents that send no sequence).
        let mut fallback: BTreeMap<String, String> = BTreeMap::new();
        let mut st = self
            .conn
            .prepare(
                "SELECT device, release, report, received FROM device_updates WHERE app = ?1
                 ORDER BY seq, received",
            )
            .map_err(self.err())?;
        for row in st
            .query_map(params![release.app], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, u64>(3)?,
                ))
            })
            .map_err(self.err())?
        {
            let (device, on, report, received) = row.map_err(self.err())?;
            let report: Report = from_json("update report", &report)?;
            if on == release.id {
                reports.insert(device, (report, received));
            } else if matches!(report, Report::Committed { .. }) {
                fallback.insert(device, on);
            }
        }
        // A retried device gets a new device timeout from the retry: it may have been silent because it was down.
        let mut st = self
            .conn
            .prepare("SELECT device, at FROM retries WHERE release = ?1")
            .map_err(self.err())?;
        let retried: BTreeMap<String, u64> = st
            .query_map([&release.id], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(self.err())?
            .collect::<Result<_, _>>()
            .map_err(self.err())?;
        // A fleet has a handful of distinct candidate lists: the selection is made once for each, not for each of
        // 10,000 devices on every tick.
        let mut compatible: BTreeMap<&[String], bool> = BTreeMap::new();
        let input: Vec<rollout::Device> =
            devices
                .iter()
                .filter(|d| !d.revoked)
                .map(|d| rollout::Device {
                    id: d.id.clone(),
                    name: d.name.clone(),
                    selected: r.spec.select.iter().all(|(k, v)| d.tags.get(k) == Some(v)),
                    compatible: *compatible.entry(&d.platform.candidates[..]).or_insert_with(
                        || serves(&release.manifests, &d.platform.candidates).is_some(),
                    ),
                    platforms: d.platform.candidates.clone(),
                    progress: progress(reports.get(&d.id)),
                    last_seen: d
                        .last_seen
                        .max(retried.get(&d.id).copied().unwrap_or_default()),
                    fallback: fallback.get(&d.id).cloned(),
                })
                .collect();
        let plan = rollout::plan(&current, &input, now);
        Ok((release, plan))
    }

    fn drive_one(
        &self,
        r: &RolloutView,
        frozen: &Frozen,
        devices: &[DeviceView],
        now: u64,
    ) -> Result<bool, ServerDbError> {
        let (release, plan) = self.plan_one(r, frozen, devices, now)?;
        let record = PlanRecord {
            waves: plan
                .waves
                .iter()
                .map(|w| WaveView {
                    devices: w.devices.clone(),
                    healthy: w.healthy,
                    failed: w.failed,
                    timed_out: w.timed_out,
                })
                .collect(),
            incompatible: plan
                .incompatible
                .iter()
                .map(|(device, platforms)| Incompatible {
                    device: device.clone(),
                    platforms: platforms.clone(),
                })
                .collect(),
            late: plan.late.clone(),
            devices: plan.devices.iter().cloned().collect(),
        };
        // Orders are reconciled on every plan; only those that differ from the stored desire are written, so a
        // tick over a large fleet costs one read, and an unchanged order counts as no change.
        let mut st = self
            .conn
            .prepare("SELECT device, release FROM desired WHERE app = ?1")
            .map_err(self.err())?;
        let stored: BTreeMap<String, Option<String>> = st
            .query_map([&release.app], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(self.err())?
            .collect::<Result<_, _>>()
            .map_err(self.err())?;
        let tx = self.conn.unchecked_transaction().map_err(self.err())?;
        let mut changed = false;
        for order in &plan.orders {
            if stored.get(&order.device) == Some(&order.release) {
                continue;
            }
            tx.execute(
                "INSERT INTO desired (device, app, release) VALUES (?1, ?2, ?3)
                 ON CONFLICT (device, app) DO UPDATE SET release = excluded.release",
                params![order.device, release.app, order.release],
            )
            .map_err(self.err())?;
            changed = true;
        }
        tx.execute(
            "UPDATE rollouts SET state = ?2, waves_started = ?3, plan = ?4, frozen = ?5, rolled_back = ?6
             WHERE id = ?1",
            params![
                r.id,
                to_json(&view_of(&plan.state))?,
                plan.waves_started,
                to_json(&record)?,
                to_json(&plan.frozen)?,
                plan.rolled_back
            ],
        )
        .map_err(self.err())?;
        tx.commit().map_err(self.err())?;
        Ok(changed)
    }
}

/// What the planner keeps of a rollout besides its view.
struct Frozen {
    /// Device ids per wave, fixed by the first plan.
    waves: Option<Vec<Vec<String>>>,
    rolled_back: bool,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct PlanRecord {
    waves: Vec<WaveView>,
    incompatible: Vec<Incompatible>,
    #[serde(default)]
    late: Vec<String>,
    devices: BTreeMap<String, String>,
}

/// What a device's last report on a release says; `received` is the server's clock, so the soak does not depend
/// on a device's (a Pi has no real-time clock).
fn progress(report: Option<&(Report, u64)>) -> Progress {
    match report {
        Some((Report::Preparing { .. } | Report::Probation { .. }, _)) => Progress::Updating,
        Some((Report::Committed { .. }, received)) => Progress::Healthy { since: *received },
        Some((Report::PrepareFailed { reason, .. } | Report::RolledBack { reason, .. }, _)) => {
            Progress::Failed {
                reason: reason.clone(),
            }
        }
        Some((Report::Removed { .. }, _)) | None => Progress::Waiting,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_says_revoked_before_expired_before_used_up() {
        let t = TokenView {
            id: "t".into(),
            created: 0,
            expires: Some(100),
            uses_left: Some(0),
            enrolled: 1,
            tags: BTreeMap::new(),
            device_tags: false,
            revoked: true,
        };
        assert_eq!(t.state(200), TokenState::Revoked);
        let t = TokenView {
            revoked: false,
            ..t
        };
        assert_eq!(t.state(200), TokenState::Expired);
        assert_eq!(t.state(99), TokenState::UsedUp);
        assert_eq!(t.state(99).slug(), "used-up");
        assert_eq!(t.state(99).label(), "used up");
        let t = TokenView {
            uses_left: None,
            expires: None,
            ..t
        };
        assert_eq!(t.state(u64::MAX).label(), "valid");
    }

    #[test]
    fn a_release_serves_a_device_by_the_pulls_own_selection_not_by_string() {
        let digest = |n: u8| format!("sha256:{}", format!("{n:02x}").repeat(32));
        let manifests: BTreeMap<String, String> = [
            ("linux/arm64".to_string(), digest(1)),
            ("linux/arm".to_string(), digest(2)),
        ]
        .into();
        let s = |c: &[&str]| {
            serves(
                &manifests,
                &c.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
            )
        };
        assert_eq!(
            s(&["linux/arm64/v8", "linux/arm/v7"]).as_deref(),
            Some("linux/arm64")
        );
        assert_eq!(
            s(&["linux/arm/v7"]).as_deref(),
            Some("linux/arm"),
            "unlabelled arm is v7"
        );
        assert_eq!(s(&["linux/amd64"]), None);
        assert_eq!(s(&["not a platform"]), None);
        let v6_only: BTreeMap<String, String> = [("linux/arm/v7".to_string(), digest(3))].into();
        assert_eq!(
            serves(&v6_only, &["linux/arm/v6".to_string()]),
            None,
            "v7 code on a v6 device"
        );
    }

    #[test]
    fn waves_and_thresholds_take_exactly_what_the_document_patterns_say() {
        for ok in [
            "1",
            "5",
            "123456789",
            "1%",
            "10%",
            "99.5%",
            "100%",
            "100.00%",
            "0.5%",
            "0.01%",
        ] {
            assert!(wave_syntax(ok), "{ok}");
            assert!(threshold_syntax(ok), "{ok}");
            rollout::parse_wave(ok).unwrap();
        }
        for bad in [
            "",
            "0",
            "01",
            "1234567890",
            "%",
            "0%",
            "0.0%",
            "100.5%",
            "101%",
            "1e1%",
            " 5",
            "5 ",
            "5.%",
            ".5%",
            "-1",
            "+1",
            "5\n",
            "05%",
        ] {
            assert!(!wave_syntax(bad), "{bad:?}");
        }
        assert!(threshold_syntax("0"));
        assert!(!threshold_syntax("00"));
    }
}
