//! The rollout driver: applies [`crate::rollout::plan`] to the fleet. On every tick (and after a device's update
//! report or an operator's action) it reads each active rollout and the devices, asks the planner, and stores the
//! plan and the orders that changed. What it reads and writes is the store's; the decisions are the planner's.
//!
//! Every replica of the server drives every rollout, so each plan is stored only if nobody moved the rollout since
//! it was read (a compare-and-set on its state and started waves), and on PostgreSQL under a per-rollout lock that
//! a replica finding taken leaves the rollout to its holder until the next tick. A replica killed mid-tick leaves
//! its transaction uncommitted: no order of a plan is written without the plan that gave it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::store::{ServerDb, ServerDbError};
use super::views::{
    DeviceView, Incompatible, ReleaseView, RolloutView, StateView, WaveView, parse_spec,
};
use crate::rollout::{self, Progress, RolloutState};
use crate::update::Report;

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

impl ServerDb {
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
        if !self.active_rollout_apps()?.iter().any(|a| wanted(a)) {
            return Ok(false);
        }
        let devices = self.devices()?;
        let mut changed = false;
        for (r, frozen) in self.rollout_rows(None)? {
            if matches!(r.status, StateView::Running | StateView::Paused { .. }) && wanted(&r.app) {
                changed |= self
                    .drive_one(&r, &frozen, &devices, now, Busy::Skip)?
                    .changed();
            }
        }
        Ok(changed)
    }

    /// The planner's view of rollout `r` now: its release, and the plan over every device that is not revoked.
    pub(crate) fn plan_one(
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
        // Each device's last committed release of the app other than this one: where "back" is for it. The store
        // gives them ordered by the device's outbox sequence, then the server's clock (agents that send no
        // sequence), so the last one read wins.
        let mut fallback: BTreeMap<String, String> = BTreeMap::new();
        for u in self.update_reports(&release.app)? {
            if u.release == release.id {
                reports.insert(u.device, (u.report, u.received));
            } else if matches!(u.report, Report::Committed { .. }) {
                fallback.insert(u.device, u.release);
            }
        }
        // A retried device gets a new device timeout from the retry: it may have been silent because it was down.
        let retried = self.retried(&release.id)?;
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

    /// Plans rollout `r` and stores the plan and the orders that changed, unless another replica is advancing it
    /// or has moved it since `r` was read.
    pub(crate) fn drive_one(
        &self,
        r: &RolloutView,
        frozen: &Frozen,
        devices: &[DeviceView],
        now: u64,
        busy: Busy,
    ) -> Result<Saved, ServerDbError> {
        let (_, plan) = self.plan_one(r, frozen, devices, now)?;
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
        let saved = self.save_plan(r, frozen, &plan, &view_of(&plan.state), &record, busy)?;
        match saved {
            Saved::Stored { .. } => {}
            Saved::Locked => tracing::debug!(
                rollout = r.id,
                "another replica is advancing the rollout; left to it this tick"
            ),
            Saved::Moved => tracing::debug!(
                rollout = r.id,
                "the rollout changed since it was read; planned again next tick"
            ),
        }
        Ok(saved)
    }
}

/// What a plan does when another replica is advancing the same rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Busy {
    /// Leaves the rollout to it: the timer's and the reports' ticks, which the next tick repeats.
    Skip,
    /// Takes no lock: an operator's action, whose plan no later tick repeats (an aborted rollout's orders back).
    /// The compare-and-set still holds: a replica that advanced the rollout meanwhile moved it, and one advancing
    /// it now finds it moved.
    Proceed,
}

/// What became of a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Saved {
    /// Stored, with this many orders that changed.
    Stored { orders: usize },
    /// Another replica holds the rollout's lock: nothing was written.
    Locked,
    /// The stored rollout is no longer the one the plan was made from: nothing was written.
    Moved,
}

impl Saved {
    /// Whether some device's desired state changed, so that the long polls are woken.
    pub(crate) fn changed(self) -> bool {
        matches!(self, Saved::Stored { orders } if orders > 0)
    }
}

/// What the planner keeps of a rollout besides its view.
pub(crate) struct Frozen {
    /// Device ids per wave, fixed by the first plan.
    pub(crate) waves: Option<Vec<Vec<String>>>,
    pub(crate) rolled_back: bool,
    /// The stored state's text as read: with `waves_started`, what the plan's compare-and-set expects to find.
    pub(crate) state: String,
}

/// The last plan of a rollout as stored: what its view shows of waves and devices.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct PlanRecord {
    pub(crate) waves: Vec<WaveView>,
    pub(crate) incompatible: Vec<Incompatible>,
    #[serde(default)]
    pub(crate) late: Vec<String>,
    pub(crate) devices: BTreeMap<String, String>,
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
}
