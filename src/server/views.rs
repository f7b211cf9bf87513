//! The API's wire types: what operators and the dashboard send (requests) and are shown (views), the actions on a
//! rollout, and the checks a request passes before anything is stored.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::store::ServerDbError;
use crate::app::{RunSettings, SettingsError};
use crate::fleet::{AppStatus, Metrics, PlatformReport};
use crate::rollout;
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
    /// Order the devices that failed or timed out the release again (see [`super::store::ServerDb::control_rollout`]).
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
pub(crate) fn check_settings(settings: &RunSettings) -> Result<(), ServerDbError> {
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
