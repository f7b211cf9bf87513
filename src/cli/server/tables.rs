//! The operator CLI's tables and descriptions of what the API answers.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::server::views::{DeviceView, RolloutView, StateView, TokenView};

pub(super) fn state_word(s: &StateView) -> String {
    match s {
        StateView::Running => "running".into(),
        StateView::Paused { reason } => format!("paused: {}", crate::human::inert(reason)),
        StateView::Aborted => "aborted".into(),
        StateView::Done => "done".into(),
        StateView::Superseded => "superseded by a newer rollout".into(),
    }
}

pub(super) fn describe_rollout(r: &RolloutView) -> String {
    let mut out = format!(
        "rollout {} of {} ({}): {}\n",
        r.id,
        r.spec.release,
        r.app,
        state_word(&r.status)
    );
    for (k, w) in r.waves.iter().enumerate() {
        let started = if k < r.waves_started {
            "ordered"
        } else {
            "waiting"
        };
        let timed_out = if w.timed_out > 0 {
            format!(", {} timed out", w.timed_out)
        } else {
            String::new()
        };
        out.push_str(&format!(
            "  wave {}: {} devices, {} healthy, {} failed{timed_out} ({started})\n",
            k + 1,
            w.devices.len(),
            w.healthy,
            w.failed
        ));
    }
    if !r.late.is_empty() {
        out.push_str(&format!(
            "  joined the last wave late: {}\n",
            crate::human::inert(&r.late.join(", "))
        ));
    }
    for i in &r.incompatible {
        out.push_str(&format!(
            "  incompatible: {} ({})\n",
            crate::human::inert(&i.device),
            crate::human::inert(&i.platforms.join(", "))
        ));
    }
    let rows: Vec<[String; 2]> = r
        .devices
        .iter()
        .map(|(d, s)| [d.clone(), s.clone()])
        .collect();
    out.push_str(&crate::cli::table(["DEVICE", "PROGRESS"], &rows));
    out
}

pub(super) fn date(secs: u64) -> String {
    httpdate::fmt_http_date(std::time::UNIX_EPOCH + Duration::from_secs(secs))
}

pub(super) fn format_tags(tags: &BTreeMap<String, String>) -> String {
    let pairs: Vec<String> = tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
    if pairs.is_empty() {
        "-".into()
    } else {
        pairs.join(",")
    }
}

/// Id, created, expires, uses left, devices enrolled, tags and state: never a secret, which the server does not
/// have.
pub(super) fn tokens_table(tokens: &[TokenView], now: u64) -> String {
    let rows: Vec<[String; 7]> = tokens
        .iter()
        .map(|t| {
            let state = t.state(now).label();
            let mut tags = format_tags(&t.tags);
            if t.device_tags {
                tags.push_str(" (+ the device's)");
            }
            [
                t.id.clone(),
                // Tokens made before the server kept a creation time.
                if t.created == 0 {
                    "-".into()
                } else {
                    date(t.created)
                },
                t.expires.map(date).unwrap_or_else(|| "never".into()),
                t.uses_left
                    .map(|n| n.to_string())
                    .unwrap_or_else(|| "unlimited".into()),
                t.enrolled.to_string(),
                tags,
                state.into(),
            ]
        })
        .collect();
    crate::cli::table(
        [
            "ID",
            "CREATED",
            "EXPIRES",
            "USES LEFT",
            "ENROLLED",
            "TAGS",
            "STATE",
        ],
        &rows,
    )
}

fn ago(now: u64, then: u64) -> String {
    let s = now.saturating_sub(then);
    match s {
        0..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m ago", s / 60),
        3600..=86399 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

/// Name, platform, app, release, state and last seen: one line per device and app.
pub(super) fn devices_table(devices: &[DeviceView], now: u64) -> String {
    let mut rows: Vec<[String; 6]> = Vec::new();
    for d in devices.iter().filter(|d| !d.revoked) {
        let platform = d.platform.candidates.first().cloned().unwrap_or_default();
        let seen = ago(now, d.last_seen);
        if d.apps.is_empty() {
            rows.push([
                d.name.clone(),
                platform,
                "-".into(),
                "-".into(),
                "-".into(),
                seen,
            ]);
            continue;
        }
        for a in &d.apps {
            let status = a.status.as_ref();
            let release = status
                .and_then(|s| s.release.clone())
                .unwrap_or_else(|| "-".into());
            let mut state = status
                .map(|s| s.state.clone())
                .unwrap_or_else(|| "-".into());
            if let Some(h) = status.and_then(|s| s.health.as_ref()) {
                state = format!("{state} ({h})");
            }
            if let Some(w) = status.and_then(|s| s.wrong_variant.as_ref()) {
                state = format!("{state}; wrong variant: {w}");
            }
            if let Some(want) = a
                .desired
                .as_ref()
                .filter(|w| Some(*w) != status.and_then(|s| s.release.as_ref()))
            {
                state = format!("{state} → {want}");
            }
            let variant = match (
                status.and_then(|s| s.platform.as_ref()),
                status.and_then(|s| s.manifest.as_ref()),
            ) {
                (Some(p), Some(m)) => format!("{release} ({p} {})", short(m)),
                (None, Some(m)) => format!("{release} ({})", short(m)),
                _ => release,
            };
            rows.push([
                d.name.clone(),
                platform.clone(),
                a.app.clone(),
                variant,
                state,
                seen.clone(),
            ]);
        }
    }
    crate::cli::table(
        ["DEVICE", "PLATFORM", "APP", "RELEASE", "STATE", "LAST SEEN"],
        &rows,
    )
}

fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    &hex[..hex.len().min(12)]
}
