//! Rollout planning, as a plain function over data: given a rollout, what each device is doing and the time, which
//! release each device should run now, and whether the rollout moves on, pauses or is done.
//!
//! The server calls [`plan`] on every tick and on every report, and stores what it returns; nothing here reads a
//! clock or a database, so the rules are tested with tables.
//!
//! The rules:
//! - Membership is frozen when the rollout starts: the devices that match the selector and can run a variant of
//!   the release are cut into waves, in a stable order (by name), and those waves are stored. A device that is
//!   revoked later drops out of its wave; one that enrolls (or becomes compatible) later joins the last wave, and
//!   the plan lists it as late. A selected device that can run no variant is *incompatible*: listed with its
//!   platforms, never ordered, and neither counted healthy nor waited for.
//! - Waves are cumulative sizes: `10%, 50%, 100%` or absolute counts. Wave `k + 1` is ordered once every device of
//!   waves `0..=k` has settled (healthy, failed or timed out) and the soak time has passed since the last of them
//!   became healthy.
//! - Orders are reconciled on every plan, not only when a wave starts: every device of a started wave is ordered
//!   what it should run now, and the server writes only what differs. A device that missed an order (a revoked
//!   and re-enrolled device, a lost write) gets it on the next tick.
//! - A device that has not been heard from for the device timeout while the rollout waits for it is *timed out*:
//!   settled, and counted as failed unless the rollout says to skip such devices. A silent device never holds its
//!   wave for ever.
//! - A device that failed (rolled back, or failed to start) counts against the failure threshold. At the threshold
//!   the rollout pauses by itself; with `rollback` set, the failed waves are ordered back, for good.
//! - Back means each device's own last committed release (its *fallback*), not the release of the rollout
//!   before: a device that never ran that one is not sent to it. A device that never committed any release of the
//!   app is ordered to run none.
//! - Paused: no new wave starts, and devices already ordered keep their orders. Aborted: every device that was
//!   ordered the release is ordered back. Superseded (a newer rollout of the app started): nothing more.
//! - Done is final: a device that enrolls (or becomes compatible) after the last wave settled is not ordered the
//!   release, since a finished rollout no longer plans. Its desired state stays what it was (none, for a new
//!   device) until the operator starts another rollout of the app, which takes it in its waves. The one way back
//!   is the operator retrying the failed devices of the app's newest rollout: it runs again (the server decides
//!   that), and then plans as any running rollout does, late devices included.

use std::time::Duration;

/// Seconds since the Unix epoch: the server's clock, passed in.
pub type Timestamp = u64;

/// One step of the waves: how many devices have the release once the wave is ordered.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WaveSize {
    /// Percent of the compatible devices, rounded up (1% of 10 devices is 1 device).
    Percent(f64),
    Count(u32),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Threshold {
    Count(u32),
    /// Of the devices ordered so far.
    Ratio(f64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RolloutState {
    Running,
    Paused {
        reason: String,
    },
    Aborted,
    Done,
    /// A newer rollout of the same app took over; this one orders nothing more.
    Superseded,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rollout {
    /// The release this rollout installs.
    pub release: String,
    pub waves: Vec<WaveSize>,
    pub max_failures: Threshold,
    pub soak: Duration,
    /// Order the failed waves back when the threshold pauses the rollout.
    pub rollback: bool,
    /// A device not heard from for this long, while the rollout waits for it, is timed out.
    pub device_timeout: Option<Duration>,
    /// A timed-out device is left out (neither healthy nor failed) instead of counting as failed.
    pub skip_timed_out: bool,
    pub state: RolloutState,
    /// Waves ordered so far (0 before the first).
    pub waves_started: usize,
    /// The device ids of each wave, fixed by the first plan; `None` before it.
    pub frozen: Option<Vec<Vec<String>>>,
    /// The failed waves were ordered back; they stay so.
    pub rolled_back: bool,
}

/// What one device reports about this rollout's release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Not ordered yet, or ordered and not yet reporting on the release.
    Waiting,
    Updating,
    /// Running the release and healthy since this time.
    Healthy {
        since: Timestamp,
    },
    /// Rolled back or could not start it; why.
    Failed {
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// Stable across renames; a device revoked and enrolled again under the same name is another device.
    pub id: String,
    pub name: String,
    /// The device matches the rollout's selector.
    pub selected: bool,
    /// The release has a variant this device runs; its platforms are listed when not.
    pub compatible: bool,
    pub platforms: Vec<String>,
    pub progress: Progress,
    /// When the server last heard from the device.
    pub last_seen: Timestamp,
    /// The device's own last committed release of the app, other than this rollout's: where "back" is for it.
    pub fallback: Option<String>,
}

/// The release a device should run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    /// The device's id.
    pub device: String,
    pub release: Option<String>,
}

/// What the rollout looks like now, and what to do.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub state: RolloutState,
    pub waves_started: usize,
    /// Desired releases for the devices whose desire this plan sets; others are left as they are.
    pub orders: Vec<Order>,
    pub waves: Vec<WaveStatus>,
    /// Selected devices that cannot run the release: name and platforms.
    pub incompatible: Vec<(String, Vec<String>)>,
    /// The wave membership to store (device ids).
    pub frozen: Vec<Vec<String>>,
    pub rolled_back: bool,
    /// Devices that joined the last wave after the rollout started, by name.
    pub late: Vec<String>,
    /// What each device of the rollout is doing, by name: waiting, updating, healthy, failed: why, timed out.
    pub devices: Vec<(String, String)>,
    /// The ids of the ordered devices that failed or timed out: what retrying the failed devices orders again.
    pub failed: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaveStatus {
    /// Names.
    pub devices: Vec<String>,
    pub healthy: usize,
    pub failed: usize,
    pub timed_out: usize,
}

/// A rollout's waves or failure threshold, as the operator wrote them, that mean nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("the wave {0:?} is neither a percent (10%) nor a device count (5)")]
    Wave(String),
    #[error("the wave {0:?} is not between 0% and 100%")]
    WavePercent(String),
    #[error("the failure threshold {0:?} is neither a percent (10%) nor a count (3)")]
    Threshold(String),
    #[error("the failure threshold {0:?} is not between 0% and 100%")]
    ThresholdPercent(String),
}

/// One step of `--waves`: `10%` of the compatible devices, or `5` devices.
pub fn parse_wave(s: &str) -> Result<WaveSize, SpecError> {
    let s = s.trim();
    let bad = || SpecError::Wave(s.to_string());
    match s.strip_suffix('%') {
        Some(p) => {
            let p: f64 = p.trim().parse().map_err(|_| bad())?;
            if !(p > 0.0 && p <= 100.0) {
                return Err(SpecError::WavePercent(s.to_string()));
            }
            Ok(WaveSize::Percent(p))
        }
        None => match s.parse::<u32>() {
            Ok(0) | Err(_) => Err(bad()),
            Ok(n) => Ok(WaveSize::Count(n)),
        },
    }
}

/// `10%` (of the devices ordered so far) or `3` (devices).
pub fn parse_threshold(s: &str) -> Result<Threshold, SpecError> {
    let s = s.trim();
    let bad = || SpecError::Threshold(s.to_string());
    match s.strip_suffix('%') {
        Some(p) => {
            let p: f64 = p.trim().parse().map_err(|_| bad())?;
            if !(p > 0.0 && p <= 100.0) {
                return Err(SpecError::ThresholdPercent(s.to_string()));
            }
            Ok(Threshold::Ratio(p / 100.0))
        }
        None => s.parse::<u32>().map(Threshold::Count).map_err(|_| bad()),
    }
}

/// Cumulative device counts of the waves for `n` compatible devices: non-decreasing, at most `n`, the last one
/// `n` (a rollout always ends with every device, whatever its last wave says).
pub fn wave_bounds(waves: &[WaveSize], n: usize) -> Vec<usize> {
    let mut out: Vec<usize> = Vec::with_capacity(waves.len() + 1);
    for w in waves {
        let size = match *w {
            WaveSize::Percent(p) => {
                let p = p.clamp(0.0, 100.0);
                // Rounded up: a 1% wave of a small fleet is one device, not none.
                ((p * n as f64) / 100.0).ceil() as usize
            }
            WaveSize::Count(c) => c as usize,
        };
        let prev = out.last().copied().unwrap_or(0);
        out.push(size.min(n).max(prev));
    }
    if out.last().copied() != Some(n) {
        out.push(n);
    }
    out.dedup();
    out.retain(|b| *b > 0);
    out
}

fn over_threshold(t: Threshold, failed: usize, ordered: usize) -> bool {
    match t {
        Threshold::Count(c) => failed as u64 >= u64::from(c.max(1)),
        Threshold::Ratio(r) => ordered > 0 && failed as f64 / ordered as f64 >= r && failed > 0,
    }
}

/// What the plan makes of a device's progress: its report, or its silence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    Waiting,
    Updating,
    Healthy { since: Timestamp },
    Failed,
    TimedOut,
}

fn standing(rollout: &Rollout, d: &Device, now: Timestamp) -> Standing {
    match &d.progress {
        Progress::Healthy { since } => Standing::Healthy { since: *since },
        Progress::Failed { .. } => Standing::Failed,
        Progress::Waiting | Progress::Updating => {
            let silent = rollout
                .device_timeout
                .is_some_and(|t| now.saturating_sub(d.last_seen) >= t.as_secs());
            match (&d.progress, silent) {
                (_, true) => Standing::TimedOut,
                (Progress::Updating, false) => Standing::Updating,
                _ => Standing::Waiting,
            }
        }
    }
}

fn describe(rollout: &Rollout, d: &Device, now: Timestamp) -> String {
    match (standing(rollout, d, now), &d.progress) {
        (Standing::Failed, Progress::Failed { reason }) => format!("failed: {reason}"),
        (Standing::Waiting, _) => "waiting".into(),
        (Standing::Updating, _) => "updating".into(),
        (Standing::Healthy { .. }, _) => "healthy".into(),
        (Standing::TimedOut, _) => "timed out".into(),
        (Standing::Failed, _) => "failed".into(),
    }
}

/// The plan for `rollout` over `devices` at `now`.
pub fn plan(rollout: &Rollout, devices: &[Device], now: Timestamp) -> Plan {
    let mut selected: Vec<&Device> = devices.iter().filter(|d| d.selected).collect();
    selected.sort_by(|a, b| a.name.cmp(&b.name));
    let incompatible = selected
        .iter()
        .filter(|d| !d.compatible)
        .map(|d| (d.name.clone(), d.platforms.clone()))
        .collect();
    let frozen: Vec<Vec<String>> = rollout.frozen.clone().unwrap_or_else(|| {
        let compatible: Vec<&&Device> = selected.iter().filter(|d| d.compatible).collect();
        let mut start = 0;
        wave_bounds(&rollout.waves, compatible.len())
            .into_iter()
            .map(|end| {
                let ids = compatible[start..end]
                    .iter()
                    .map(|d| d.id.clone())
                    .collect();
                start = end;
                ids
            })
            .collect()
    });
    let member: std::collections::BTreeSet<&str> =
        frozen.iter().flatten().map(String::as_str).collect();
    // Late: they matched after the start; they go last, so that earlier waves keep what they were promised.
    let late: Vec<&Device> = selected
        .iter()
        .filter(|d| d.compatible && !member.contains(d.id.as_str()))
        .copied()
        .collect();
    let by_id: std::collections::BTreeMap<&str, &Device> =
        devices.iter().map(|d| (d.id.as_str(), d)).collect();
    let waves: Vec<Vec<&Device>> = frozen
        .iter()
        .enumerate()
        .map(|(k, ids)| {
            let mut ds: Vec<&Device> = ids
                .iter()
                .filter_map(|id| by_id.get(id.as_str()).copied())
                .filter(|d| d.compatible)
                .collect();
            if k + 1 == frozen.len() {
                ds.extend(late.iter().copied());
            }
            ds
        })
        .collect();
    let counts_failed = |st: Standing| {
        st == Standing::Failed || (st == Standing::TimedOut && !rollout.skip_timed_out)
    };
    let status_of = |k: usize| -> WaveStatus {
        let ds = &waves[k];
        let st: Vec<Standing> = ds.iter().map(|d| standing(rollout, d, now)).collect();
        WaveStatus {
            devices: ds.iter().map(|d| d.name.clone()).collect(),
            healthy: st
                .iter()
                .filter(|s| matches!(s, Standing::Healthy { .. }))
                .count(),
            failed: st.iter().filter(|s| counts_failed(**s)).count(),
            timed_out: st.iter().filter(|s| **s == Standing::TimedOut).count(),
        }
    };
    let mut started = rollout.waves_started.min(waves.len());
    let mut state = rollout.state.clone();
    let mut rolled_back = rollout.rolled_back;

    if state == RolloutState::Running && started > 0 {
        let ordered: usize = waves[..started].iter().map(Vec::len).sum();
        let failed: usize = (0..started).map(|k| status_of(k).failed).sum();
        if over_threshold(rollout.max_failures, failed, ordered) {
            state = RolloutState::Paused {
                reason: format!(
                    "{failed} of {ordered} devices failed the release, at the threshold {}",
                    match rollout.max_failures {
                        Threshold::Count(c) => format!("of {c}"),
                        Threshold::Ratio(r) => format!("of {:.0}%", r * 100.0),
                    }
                ),
            };
            rolled_back |= rollout.rollback;
        }
    }
    if state == RolloutState::Running {
        if started == 0 {
            if !waves.is_empty() {
                started = 1;
            }
        } else {
            let settled = waves[..started].iter().flatten().all(|d| {
                !matches!(
                    standing(rollout, d, now),
                    Standing::Waiting | Standing::Updating
                )
            });
            let soaked_since = waves[..started]
                .iter()
                .flatten()
                .filter_map(|d| match standing(rollout, d, now) {
                    Standing::Healthy { since } => Some(since),
                    _ => None,
                })
                .max();
            let soaked =
                soaked_since.is_none_or(|s| now >= s.saturating_add(rollout.soak.as_secs()));
            if settled && soaked {
                if started < waves.len() {
                    started += 1;
                } else {
                    state = RolloutState::Done;
                }
            }
        }
    }
    if waves.is_empty() && state == RolloutState::Running {
        state = RolloutState::Done;
    }

    let mut orders = Vec::new();
    let mut order = |d: &Device, release: Option<&String>| {
        orders.push(Order {
            device: d.id.clone(),
            release: release.cloned(),
        })
    };
    match state {
        RolloutState::Done | RolloutState::Superseded => {}
        RolloutState::Aborted => {
            for d in waves[..started].iter().flatten() {
                order(d, d.fallback.as_ref());
            }
        }
        RolloutState::Running | RolloutState::Paused { .. } => {
            for (k, ds) in waves[..started].iter().enumerate() {
                let back = rolled_back && status_of(k).failed > 0;
                for d in ds {
                    order(
                        d,
                        if back {
                            d.fallback.as_ref()
                        } else {
                            Some(&rollout.release)
                        },
                    );
                }
            }
        }
    }
    let mut described: Vec<(String, String)> = selected
        .iter()
        .map(|d| (d.name.clone(), describe(rollout, d, now)))
        .collect();
    // Frozen members whose tags changed since still belong to the rollout.
    described.extend(
        waves
            .iter()
            .flatten()
            .filter(|d| !d.selected)
            .map(|d| (d.name.clone(), describe(rollout, d, now))),
    );
    Plan {
        state,
        waves_started: started,
        orders,
        waves: (0..waves.len()).map(status_of).collect(),
        incompatible,
        frozen,
        rolled_back,
        late: late.iter().map(|d| d.name.clone()).collect(),
        devices: described,
        failed: waves[..started]
            .iter()
            .flatten()
            .filter(|d| {
                matches!(
                    standing(rollout, d, now),
                    Standing::Failed | Standing::TimedOut
                )
            })
            .map(|d| d.id.clone())
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use WaveSize::{Count, Percent};

    #[test]
    fn wave_bounds_are_cumulative_rounded_up_and_end_with_everyone() {
        let cases: &[(&[WaveSize], usize, &[usize])] = &[
            (
                &[Percent(1.0), Percent(10.0), Percent(50.0), Percent(100.0)],
                10,
                &[1, 5, 10],
            ),
            (
                &[Percent(1.0), Percent(10.0), Percent(50.0), Percent(100.0)],
                200,
                &[2, 20, 100, 200],
            ),
            (&[Percent(10.0), Percent(50.0)], 10, &[1, 5, 10]),
            (&[Count(1), Count(5)], 3, &[1, 3]),
            (&[Count(2), Count(1)], 10, &[2, 10]),
            (&[Percent(100.0)], 0, &[]),
            (&[], 4, &[4]),
        ];
        for (waves, n, want) in cases {
            assert_eq!(wave_bounds(waves, *n), *want, "{waves:?} over {n}");
        }
    }

    fn device(name: &str, progress: Progress) -> Device {
        Device {
            id: format!("id-{name}"),
            name: name.to_string(),
            selected: true,
            compatible: true,
            platforms: vec!["linux/arm/v6".to_string()],
            progress,
            last_seen: 1_000_000,
            fallback: Some("v1".to_string()),
        }
    }

    fn rollout(waves: &[WaveSize], started: usize) -> Rollout {
        Rollout {
            release: "v2".to_string(),
            waves: waves.to_vec(),
            max_failures: Threshold::Count(1),
            soak: Duration::from_secs(300),
            rollback: true,
            device_timeout: None,
            skip_timed_out: false,
            state: RolloutState::Running,
            waves_started: started,
            frozen: None,
            rolled_back: false,
        }
    }

    /// The orders by device name (ids are `id-<name>`), sorted.
    fn ordered(plan: &Plan) -> Vec<(String, Option<String>)> {
        let mut o: Vec<_> = plan
            .orders
            .iter()
            .map(|o| {
                (
                    o.device.trim_start_matches("id-").to_string(),
                    o.release.clone(),
                )
            })
            .collect();
        o.sort();
        o
    }

    fn v(s: &str) -> Option<String> {
        Some(s.to_string())
    }

    fn all(names: &[&str], release: &str) -> Vec<(String, Option<String>)> {
        names.iter().map(|n| (n.to_string(), v(release))).collect()
    }

    #[test]
    fn the_first_wave_is_ordered_at_once() {
        let ds: Vec<Device> = ["d", "a", "c", "b"]
            .iter()
            .map(|n| device(n, Progress::Waiting))
            .collect();
        let p = plan(&rollout(&[Percent(50.0)], 0), &ds, 1000);
        assert_eq!(ordered(&p), all(&["a", "b"], "v2"));
        assert_eq!(p.waves_started, 1);
        assert_eq!(p.state, RolloutState::Running);
        assert_eq!(
            p.frozen,
            [
                vec!["id-a".to_string(), "id-b".into()],
                vec!["id-c".into(), "id-d".into()]
            ]
        );
    }

    #[test]
    fn the_next_wave_waits_for_health_and_the_soak_and_orders_are_reconciled_every_time() {
        let r = rollout(&[Percent(50.0)], 1);
        let wave0_updating = [
            device("a", Progress::Healthy { since: 1000 }),
            device("b", Progress::Updating),
            device("c", Progress::Waiting),
            device("d", Progress::Waiting),
        ];
        let p = plan(&r, &wave0_updating, 5000);
        assert_eq!(p.waves_started, 1, "b is not healthy yet");
        assert_eq!(
            ordered(&p),
            all(&["a", "b"], "v2"),
            "the started wave, again"
        );
        let wave0_healthy = [
            device("a", Progress::Healthy { since: 1000 }),
            device("b", Progress::Healthy { since: 1100 }),
            device("c", Progress::Waiting),
            device("d", Progress::Waiting),
        ];
        let early = plan(&r, &wave0_healthy, 1100 + 299);
        assert_eq!(early.waves_started, 1, "soak not over");
        let p = plan(&r, &wave0_healthy, 1100 + 300);
        assert_eq!(ordered(&p), all(&["a", "b", "c", "d"], "v2"));
        assert_eq!(p.waves_started, 2);
        let all_healthy: Vec<Device> = ["a", "b", "c", "d"]
            .iter()
            .map(|n| device(n, Progress::Healthy { since: 2000 }))
            .collect();
        let done = plan(&rollout(&[Percent(50.0)], 2), &all_healthy, 2300);
        assert_eq!(done.state, RolloutState::Done);
        assert!(done.orders.is_empty());
    }

    #[test]
    fn failures_at_the_threshold_pause_and_roll_the_failed_wave_back_to_each_devices_own_release() {
        let mut r = rollout(&[Percent(50.0)], 1);
        let mut b = device("b", Progress::Healthy { since: 1000 });
        // b never ran v1: its own last committed release is v0.
        b.fallback = v("v0");
        let ds = [
            device(
                "a",
                Progress::Failed {
                    reason: "wrong architecture variant".into(),
                },
            ),
            b,
            device("c", Progress::Waiting),
            device("d", Progress::Waiting),
        ];
        let p = plan(&r, &ds, 9999);
        assert!(
            matches!(p.state, RolloutState::Paused { .. }),
            "{:?}",
            p.state
        );
        assert!(p.rolled_back);
        assert_eq!(ordered(&p), [("a".into(), v("v1")), ("b".into(), v("v0"))]);
        assert_eq!(p.waves_started, 1, "no new wave");
        // The next plans, paused, keep the devices back: the rollback is not undone by reconciling.
        r.state = p.state.clone();
        r.rolled_back = p.rolled_back;
        r.frozen = Some(p.frozen.clone());
        assert_eq!(ordered(&plan(&r, &ds, 10_000)), ordered(&p));
        // A device that never committed any release of the app is ordered to run none.
        let mut fresh = ds.clone();
        fresh[0].fallback = None;
        assert_eq!(ordered(&plan(&r, &fresh, 10_000))[0], ("a".into(), None));

        let mut r = rollout(&[Percent(50.0)], 1);
        r.rollback = false;
        let p = plan(&r, &ds, 9999);
        assert!(matches!(p.state, RolloutState::Paused { .. }));
        assert_eq!(
            ordered(&p),
            all(&["a", "b"], "v2"),
            "without rollback the devices keep their orders"
        );
        r.max_failures = Threshold::Ratio(0.6);
        let p = plan(&r, &ds, 9999);
        assert_eq!(p.state, RolloutState::Running, "1 of 2 is under 60%");
    }

    #[test]
    fn paused_starts_nothing_aborted_orders_everyone_back_and_superseded_orders_nothing() {
        let ds: Vec<Device> = ["a", "b", "c", "d"]
            .iter()
            .map(|n| device(n, Progress::Healthy { since: 0 }))
            .collect();
        let mut r = rollout(&[Percent(25.0), Percent(50.0)], 2);
        r.state = RolloutState::Paused {
            reason: "operator".into(),
        };
        let p = plan(&r, &ds, 10_000);
        assert_eq!(ordered(&p), all(&["a", "b"], "v2"));
        assert_eq!(p.waves_started, 2);
        r.state = RolloutState::Aborted;
        let p = plan(&r, &ds, 10_000);
        assert_eq!(ordered(&p), all(&["a", "b"], "v1"));
        r.state = RolloutState::Superseded;
        let p = plan(&r, &ds, 10_000);
        assert!(p.orders.is_empty());
        assert_eq!(p.state, RolloutState::Superseded);
    }

    #[test]
    fn incompatible_and_unselected_devices_are_neither_ordered_nor_waited_for() {
        let mut pi_zero = device("zero", Progress::Waiting);
        pi_zero.compatible = false;
        let mut other = device("elsewhere", Progress::Waiting);
        other.selected = false;
        let ds = [device("a", Progress::Waiting), pi_zero, other];
        let p = plan(&rollout(&[Percent(100.0)], 0), &ds, 0);
        assert_eq!(ordered(&p), all(&["a"], "v2"));
        assert_eq!(
            p.incompatible,
            [("zero".to_string(), vec!["linux/arm/v6".to_string()])]
        );
        let healthy = [device("a", Progress::Healthy { since: 0 })];
        let p = plan(&rollout(&[Percent(100.0)], 1), &healthy, 300);
        assert_eq!(p.state, RolloutState::Done);
        let none: [Device; 0] = [];
        assert_eq!(
            plan(&rollout(&[Percent(100.0)], 0), &none, 0).state,
            RolloutState::Done
        );
    }

    #[test]
    fn membership_is_frozen_revoked_devices_drop_out_and_late_ones_join_the_last_wave() {
        let ds: Vec<Device> = ["a", "b", "c", "d"]
            .iter()
            .map(|n| device(n, Progress::Waiting))
            .collect();
        let first = plan(&rollout(&[Percent(50.0)], 0), &ds, 1000);
        let mut r = rollout(&[Percent(50.0)], first.waves_started);
        r.frozen = Some(first.frozen.clone());
        // "a" enrolls as "a2" after a revoke, "e" enrolls mid-rollout: neither shifts a wave.
        let mut now: Vec<Device> = ds[1..].to_vec();
        now.push(device("e", Progress::Waiting));
        now.push(device("0-first-by-name", Progress::Waiting));
        let p = plan(&r, &now, 1001);
        assert_eq!(
            p.waves[0].devices,
            ["b"],
            "a is gone, and nobody took its place"
        );
        assert_eq!(p.waves[1].devices, ["c", "d", "0-first-by-name", "e"]);
        assert_eq!(p.late, ["0-first-by-name", "e"]);
        assert_eq!(ordered(&p), all(&["b"], "v2"));
        // Once b is healthy and soaked the last wave, the late devices with it, is ordered, and the rollout
        // waits for them too.
        now[0].progress = Progress::Healthy { since: 1000 };
        let p = plan(&r, &now, 1300);
        assert_eq!(
            ordered(&p),
            all(&["0-first-by-name", "b", "c", "d", "e"], "v2")
        );
        r.waves_started = 2;
        for d in &mut now[..3] {
            d.progress = Progress::Healthy { since: 1400 };
        }
        assert_eq!(plan(&r, &now, 9000).state, RolloutState::Running, "e waits");
        for d in &mut now {
            d.progress = Progress::Healthy { since: 1400 };
        }
        assert_eq!(plan(&r, &now, 9000).state, RolloutState::Done);
    }

    #[test]
    fn the_ordered_devices_that_failed_or_timed_out_are_the_ones_a_retry_takes() {
        let mut silent = device("c", Progress::Updating);
        silent.last_seen = 0;
        let ds = [
            device(
                "a",
                Progress::Failed {
                    reason: "exit code 1".into(),
                },
            ),
            device("b", Progress::Healthy { since: 0 }),
            silent,
            device(
                "d",
                Progress::Failed {
                    reason: "not ordered yet".into(),
                },
            ),
        ];
        let mut r = rollout(&[Count(3)], 1);
        r.device_timeout = Some(Duration::from_secs(60));
        let p = plan(&r, &ds, 1000);
        assert_eq!(p.failed, ["id-a", "id-c"], "d's wave has not started");
        // Once a retry cleared a's failure and gave c a new window, they are ordered and waited for again, and
        // the rollout runs on below its threshold.
        let mut retried = ds.clone();
        retried[0].progress = Progress::Waiting;
        retried[2].last_seen = 1000;
        let p = plan(&r, &retried, 1000);
        assert!(p.failed.is_empty());
        assert_eq!(p.state, RolloutState::Running);
        assert_eq!(ordered(&p), all(&["a", "b", "c"], "v2"));
    }

    #[test]
    fn a_silent_device_times_out_and_counts_as_failed_unless_skipped() {
        let mut silent = device("b", Progress::Updating);
        silent.last_seen = 1000;
        let ds = [device("a", Progress::Healthy { since: 1000 }), silent];
        let mut r = rollout(&[Percent(100.0)], 1);
        r.soak = Duration::ZERO;
        assert_eq!(
            plan(&r, &ds, 1_000_000).state,
            RolloutState::Running,
            "no timeout: b is waited for, for ever"
        );
        r.device_timeout = Some(Duration::from_secs(1800));
        let p = plan(&r, &ds, 1000 + 1799);
        assert_eq!(p.state, RolloutState::Running);
        let p = plan(&r, &ds, 1000 + 1800);
        assert!(
            matches!(p.state, RolloutState::Paused { .. }),
            "{:?}",
            p.state
        );
        assert_eq!(p.waves[0].timed_out, 1);
        assert_eq!(p.waves[0].failed, 1);
        assert!(
            p.devices
                .contains(&("b".to_string(), "timed out".to_string()))
        );
        r.skip_timed_out = true;
        let p = plan(&r, &ds, 1000 + 1800);
        assert_eq!(p.state, RolloutState::Done);
        assert_eq!(p.waves[0].failed, 0);
    }
}
