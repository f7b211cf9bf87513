//! Rollout planning, as a plain function over data: given a rollout, what each device is doing and the time, which
//! release each device should run now, and whether the rollout moves on, pauses or is done.
//!
//! The server calls [`plan`] on every tick and on every report, and stores what it returns; nothing here reads a
//! clock or a database, so the rules are tested with tables.
//!
//! The rules:
//! - Only devices that match the rollout's selector take part. Among them, a device that can run no variant of the
//!   release is *incompatible*: it is listed with its platforms, never ordered, and neither counted healthy nor
//!   waited for. The waves are cut from the compatible devices, in a stable order (by name), so a device's wave
//!   never changes while the rollout runs.
//! - Waves are cumulative sizes: `10%, 50%, 100%` or absolute counts. Wave `k + 1` is ordered once every device of
//!   waves `0..=k` is healthy on the release and the soak time has passed since the last of them became healthy.
//! - A device that failed (rolled back, or failed to start) counts against the failure threshold. At the threshold
//!   the rollout pauses by itself; with `rollback` set, the devices that failed and the rest of their wave are
//!   ordered back to the previous release.
//! - Paused: no new wave starts, and devices already ordered keep their orders. Aborted: every device that was
//!   ordered the release is ordered back to the previous one.

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
    Paused { reason: String },
    Aborted,
    Done,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rollout {
    /// The release this rollout installs.
    pub release: String,
    /// What failed devices (and, on abort, every ordered device) go back to; `None` when there is none.
    pub previous: Option<String>,
    pub waves: Vec<WaveSize>,
    pub max_failures: Threshold,
    pub soak: Duration,
    /// Order the failed wave back to `previous` when the threshold pauses the rollout.
    pub rollback: bool,
    pub state: RolloutState,
    /// Waves ordered so far (0 before the first).
    pub waves_started: usize,
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
    pub name: String,
    /// The device matches the rollout's selector.
    pub selected: bool,
    /// The release has a variant this device runs; its platforms are listed when not.
    pub compatible: bool,
    pub platforms: Vec<String>,
    pub progress: Progress,
}

/// The release a device should run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
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
    /// Per wave: (size, healthy, failed).
    pub waves: Vec<WaveStatus>,
    /// Selected devices that cannot run the release: name and platforms.
    pub incompatible: Vec<(String, Vec<String>)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaveStatus {
    pub devices: Vec<String>,
    pub healthy: usize,
    pub failed: usize,
}

/// One step of `--waves`: `10%` of the compatible devices, or `5` devices.
pub fn parse_wave(s: &str) -> Result<WaveSize, String> {
    let s = s.trim();
    let bad = || format!("the wave {s:?} is neither a percent (10%) nor a device count (5)");
    match s.strip_suffix('%') {
        Some(p) => {
            let p: f64 = p.trim().parse().map_err(|_| bad())?;
            if !(p > 0.0 && p <= 100.0) {
                return Err(format!("the wave {s:?} is not between 0% and 100%"));
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
pub fn parse_threshold(s: &str) -> Result<Threshold, String> {
    let s = s.trim();
    let bad = || format!("the failure threshold {s:?} is neither a percent (10%) nor a count (3)");
    match s.strip_suffix('%') {
        Some(p) => {
            let p: f64 = p.trim().parse().map_err(|_| bad())?;
            if !(p > 0.0 && p <= 100.0) {
                return Err(format!(
                    "the failure threshold {s:?} is not between 0% and 100%"
                ));
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

/// The plan for `rollout` over `devices` at `now`.
pub fn plan(rollout: &Rollout, devices: &[Device], now: Timestamp) -> Plan {
    let mut selected: Vec<&Device> = devices.iter().filter(|d| d.selected).collect();
    selected.sort_by(|a, b| a.name.cmp(&b.name));
    let incompatible = selected
        .iter()
        .filter(|d| !d.compatible)
        .map(|d| (d.name.clone(), d.platforms.clone()))
        .collect();
    let compatible: Vec<&Device> = selected.into_iter().filter(|d| d.compatible).collect();
    let bounds = wave_bounds(&rollout.waves, compatible.len());
    let wave_devices = |k: usize| -> &[&Device] {
        let start = if k == 0 { 0 } else { bounds[k - 1] };
        &compatible[start..bounds[k]]
    };
    let status_of = |k: usize| -> WaveStatus {
        let ds = wave_devices(k);
        WaveStatus {
            devices: ds.iter().map(|d| d.name.clone()).collect(),
            healthy: ds
                .iter()
                .filter(|d| matches!(d.progress, Progress::Healthy { .. }))
                .count(),
            failed: ds
                .iter()
                .filter(|d| matches!(d.progress, Progress::Failed { .. }))
                .count(),
        }
    };
    let mut started = rollout.waves_started.min(bounds.len());
    let mut state = rollout.state.clone();
    let mut orders = Vec::new();
    let order_wave = |k: usize, release: Option<&String>, orders: &mut Vec<Order>| {
        for d in wave_devices(k) {
            orders.push(Order {
                device: d.name.clone(),
                release: release.cloned(),
            });
        }
    };

    match state {
        RolloutState::Aborted => {
            for k in 0..started {
                order_wave(k, rollout.previous.as_ref(), &mut orders);
            }
        }
        RolloutState::Done | RolloutState::Paused { .. } => {}
        RolloutState::Running => {
            let ordered: usize = (0..started).map(|k| wave_devices(k).len()).sum();
            let failed: usize = (0..started).map(|k| status_of(k).failed).sum();
            if started > 0 && over_threshold(rollout.max_failures, failed, ordered) {
                state = RolloutState::Paused {
                    reason: format!(
                        "{failed} of {ordered} devices failed the release, at the threshold {}",
                        match rollout.max_failures {
                            Threshold::Count(c) => format!("of {c}"),
                            Threshold::Ratio(r) => format!("of {:.0}%", r * 100.0),
                        }
                    ),
                };
                if rollout.rollback {
                    for k in 0..started {
                        if status_of(k).failed > 0 {
                            order_wave(k, rollout.previous.as_ref(), &mut orders);
                        }
                    }
                }
            } else if started == 0 {
                if !bounds.is_empty() {
                    order_wave(0, Some(&rollout.release), &mut orders);
                    started = 1;
                }
            } else {
                let last = started - 1;
                let settled = (0..started).all(|k| {
                    wave_devices(k).iter().all(|d| {
                        matches!(
                            d.progress,
                            Progress::Healthy { .. } | Progress::Failed { .. }
                        )
                    })
                });
                let soaked_since = (0..started)
                    .flat_map(|k| wave_devices(k).iter())
                    .filter_map(|d| match d.progress {
                        Progress::Healthy { since } => Some(since),
                        _ => None,
                    })
                    .max();
                let soaked =
                    soaked_since.is_none_or(|s| now >= s.saturating_add(rollout.soak.as_secs()));
                if settled && soaked {
                    if last + 1 < bounds.len() {
                        order_wave(last + 1, Some(&rollout.release), &mut orders);
                        started += 1;
                    } else {
                        state = RolloutState::Done;
                    }
                }
            }
        }
    }
    if bounds.is_empty() && state == RolloutState::Running {
        state = RolloutState::Done;
    }
    Plan {
        state,
        waves_started: started,
        orders,
        waves: (0..bounds.len()).map(status_of).collect(),
        incompatible,
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
            name: name.to_string(),
            selected: true,
            compatible: true,
            platforms: vec!["linux/arm/v6".to_string()],
            progress,
        }
    }

    fn rollout(waves: &[WaveSize], started: usize) -> Rollout {
        Rollout {
            release: "v2".to_string(),
            previous: Some("v1".to_string()),
            waves: waves.to_vec(),
            max_failures: Threshold::Count(1),
            soak: Duration::from_secs(300),
            rollback: true,
            state: RolloutState::Running,
            waves_started: started,
        }
    }

    fn ordered(plan: &Plan) -> Vec<(String, Option<String>)> {
        plan.orders
            .iter()
            .map(|o| (o.device.clone(), o.release.clone()))
            .collect()
    }

    fn v(s: &str) -> Option<String> {
        Some(s.to_string())
    }

    #[test]
    fn the_first_wave_is_ordered_at_once() {
        let ds: Vec<Device> = ["d", "a", "c", "b"]
            .iter()
            .map(|n| device(n, Progress::Waiting))
            .collect();
        let p = plan(&rollout(&[Percent(50.0)], 0), &ds, 1000);
        assert_eq!(ordered(&p), [("a".into(), v("v2")), ("b".into(), v("v2"))]);
        assert_eq!(p.waves_started, 1);
        assert_eq!(p.state, RolloutState::Running);
    }

    #[test]
    fn the_next_wave_waits_for_health_and_the_soak() {
        let r = rollout(&[Percent(50.0)], 1);
        let wave0_updating = [
            device("a", Progress::Healthy { since: 1000 }),
            device("b", Progress::Updating),
            device("c", Progress::Waiting),
            device("d", Progress::Waiting),
        ];
        assert!(
            plan(&r, &wave0_updating, 5000).orders.is_empty(),
            "b is not healthy yet"
        );
        let wave0_healthy = [
            device("a", Progress::Healthy { since: 1000 }),
            device("b", Progress::Healthy { since: 1100 }),
            device("c", Progress::Waiting),
            device("d", Progress::Waiting),
        ];
        let early = plan(&r, &wave0_healthy, 1100 + 299);
        assert!(early.orders.is_empty(), "soak not over");
        let p = plan(&r, &wave0_healthy, 1100 + 300);
        assert_eq!(ordered(&p), [("c".into(), v("v2")), ("d".into(), v("v2"))]);
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
    fn failures_at_the_threshold_pause_and_roll_the_failed_wave_back() {
        let mut r = rollout(&[Percent(50.0)], 1);
        let ds = [
            device(
                "a",
                Progress::Failed {
                    reason: "wrong architecture variant".into(),
                },
            ),
            device("b", Progress::Healthy { since: 1000 }),
            device("c", Progress::Waiting),
            device("d", Progress::Waiting),
        ];
        let p = plan(&r, &ds, 9999);
        assert!(
            matches!(p.state, RolloutState::Paused { .. }),
            "{:?}",
            p.state
        );
        assert_eq!(ordered(&p), [("a".into(), v("v1")), ("b".into(), v("v1"))]);
        assert_eq!(p.waves_started, 1, "no new wave");
        r.rollback = false;
        let p = plan(&r, &ds, 9999);
        assert!(matches!(p.state, RolloutState::Paused { .. }));
        assert!(
            p.orders.is_empty(),
            "without rollback the devices keep their orders"
        );
        r.max_failures = Threshold::Ratio(0.6);
        let p = plan(&r, &ds, 9999);
        assert_eq!(p.state, RolloutState::Running, "1 of 2 is under 60%");
    }

    #[test]
    fn paused_starts_nothing_and_aborted_orders_everyone_back() {
        let ds: Vec<Device> = ["a", "b", "c", "d"]
            .iter()
            .map(|n| device(n, Progress::Healthy { since: 0 }))
            .collect();
        let mut r = rollout(&[Percent(25.0), Percent(50.0)], 2);
        r.state = RolloutState::Paused {
            reason: "operator".into(),
        };
        let p = plan(&r, &ds, 10_000);
        assert!(p.orders.is_empty());
        assert_eq!(p.waves_started, 2);
        r.state = RolloutState::Aborted;
        let p = plan(&r, &ds, 10_000);
        assert_eq!(ordered(&p), [("a".into(), v("v1")), ("b".into(), v("v1"))]);
    }

    #[test]
    fn incompatible_and_unselected_devices_are_neither_ordered_nor_waited_for() {
        let mut pi_zero = device("zero", Progress::Waiting);
        pi_zero.compatible = false;
        let mut other = device("elsewhere", Progress::Waiting);
        other.selected = false;
        let ds = [device("a", Progress::Waiting), pi_zero, other];
        let p = plan(&rollout(&[Percent(100.0)], 0), &ds, 0);
        assert_eq!(ordered(&p), [("a".into(), v("v2"))]);
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
}
