//! Rollouts: what the operator starts and controls, and what the driver ([`crate::server::driver`]) reads of the
//! fleet to plan them and writes of its plans.

use super::Row;
use std::collections::BTreeMap;

use super::ConnExt;
use super::db::{ServerDb, ServerDbError, from_json, to_json};
use crate::rollout;
use crate::server::driver::{Busy, Frozen, PlanRecord, Saved};
use crate::server::views::{
    Control, OPERATOR_PAUSE, RolloutRequest, RolloutView, StateView, parse_spec,
};
use crate::update::Report;

/// A device's last report on a release of an app.
pub struct UpdateRow {
    pub device: String,
    pub release: String,
    pub report: Report,
    /// By the server's clock.
    pub received: u64,
}

impl ServerDb {
    /// Starts a rollout; the previous release is the one of the app's last rollout that was not aborted.
    pub fn create_rollout(
        &self,
        req: &RolloutRequest,
        now: u64,
    ) -> Result<RolloutView, ServerDbError> {
        parse_spec(req)?;
        let release = self.release(&req.release)?;
        let state = self.conn.dialect().json_text("state", &["state"]);
        let tx = self.conn.begin().map_err(self.err())?;
        // One rollout per app at a time: a newer one supersedes what is still running. Written first, so that the
        // transaction holds SQLite's write lock before it reads (a read first would fail at the write, not wait,
        // when the flush connection wrote in between); superseded is not aborted, so the read below is the same.
        tx.execute(
            &format!(
                "UPDATE rollouts SET state = ?2 WHERE app = ?1 AND {state} IN ('running', 'paused')"
            ),
            crate::args![&release.app, to_json(&StateView::Superseded)?],
        )
        .map_err(self.err())?;
        let previous: Option<String> = tx
            .row(
                &format!(
                    "SELECT release FROM rollouts WHERE app = ?1 AND release != ?2
                     AND {state} != 'aborted' ORDER BY id DESC LIMIT 1"
                ),
                crate::args![&release.app, &release.id],
                |r| r.get(0),
            )
            .map_err(self.err())?;
        let id: u64 = tx
            .one(
                "INSERT INTO rollouts (release, app, spec, previous, state, waves_started, created)
                 VALUES (?1, ?2, ?3, ?4, ?5, 0, ?6) RETURNING id",
                crate::args![
                    &release.id,
                    &release.app,
                    to_json(req)?,
                    previous,
                    to_json(&StateView::Running)?,
                    now
                ],
            )
            .map_err(self.err())?;
        tx.commit().map_err(self.err())?;
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
    pub(crate) fn rollout_rows(
        &self,
        only: Option<u64>,
    ) -> Result<Vec<(RolloutView, Frozen)>, ServerDbError> {
        let rows = self
            .conn
            .rows(
                "SELECT id, app, spec, previous, state, waves_started, plan, created, frozen, rolled_back
                 FROM rollouts WHERE CAST(?1 AS BIGINT) IS NULL OR id = ?1 ORDER BY id",
                crate::args![only],
                |r| {
                    Ok((
                        (
                            r.get::<u64>(0)?,
                            r.get::<String>(1)?,
                            r.get::<String>(2)?,
                            r.get::<Option<String>>(3)?,
                            r.get::<String>(4)?,
                        ),
                        (
                            r.get::<usize>(5)?,
                            r.get::<Option<String>>(6)?,
                            r.get::<u64>(7)?,
                            r.get::<Option<String>>(8)?,
                            r.get::<bool>(9)?,
                        ),
                    ))
                },
            )
            .map_err(self.err())?;
        rows.into_iter()
            .map(
                |(
                    (id, app, spec, previous, state),
                    (waves_started, plan, created, frozen, rolled_back),
                )| {
                    let plan: PlanRecord = match plan {
                        Some(p) => from_json("rollout plan", &p)?,
                        None => PlanRecord::default(),
                    };
                    let status = from_json("rollout state", &state)?;
                    Ok((
                        RolloutView {
                            id,
                            app,
                            spec: from_json("rollout", &spec)?,
                            previous,
                            status,
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
                            state,
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
            .one(
                "SELECT max(id) FROM rollouts WHERE app = ?1",
                crate::args![&current.app],
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
                crate::args![id, to_json(&next)?],
            )
            .map_err(self.err())?;
        // An aborted rollout is planned this once, to order its devices back; `drive` skips it afterwards.
        let devices = self.devices()?;
        for (r, frozen) in self.rollout_rows(Some(id))? {
            self.drive_one(&r, &frozen, &devices, now, Busy::Proceed)?;
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
        let event = self.conn.dialect().json_text("report", &["event"]);
        let drop_failure = format!(
            "DELETE FROM device_updates WHERE device = ?1 AND app = ?2 AND release = ?3
             AND {event} IN ('prepare-failed', 'rolled-back')"
        );
        let tx = self.conn.begin().map_err(self.err())?;
        for device in &plan.failed {
            tx.execute(
                "INSERT INTO retries (device, release, attempt, at) VALUES (?1, ?2, 1, ?3)
                 ON CONFLICT (device, release) DO UPDATE SET attempt = retries.attempt + 1, at = excluded.at",
                crate::args![device, &release.id, now],
            )
            .map_err(self.err())?;
            tx.execute(
                &drop_failure,
                crate::args![device, &release.app, &release.id],
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
            state: String::new(),
        };
        let devices = self.devices()?;
        Ok(self.plan_one(&view, &frozen, &devices, now)?.1)
    }

    /// The apps that have a rollout running or paused: the only ones a tick plans.
    pub(crate) fn active_rollout_apps(&self) -> Result<Vec<String>, ServerDbError> {
        let state = self.conn.dialect().json_text("state", &["state"]);
        self.conn
            .rows(
                &format!(
                    "SELECT DISTINCT app FROM rollouts WHERE {state} IN ('running', 'paused')"
                ),
                crate::args![],
                |r| r.get(0),
            )
            .map_err(self.err())
    }

    /// Every device's last report on each release of `app`, ordered by the device's outbox sequence, then the
    /// server's clock (agents that send no sequence).
    pub fn update_reports(&self, app: &str) -> Result<Vec<UpdateRow>, ServerDbError> {
        let rows = self
            .conn
            .rows(
                "SELECT device, release, report, received FROM device_updates WHERE app = ?1
                 ORDER BY seq, received",
                crate::args![app],
                Row::read::<(String, String, String, u64)>,
            )
            .map_err(self.err())?;
        rows.into_iter()
            .map(|(device, release, report, received)| {
                Ok(UpdateRow {
                    device,
                    release,
                    report: from_json("update report", &report)?,
                    received,
                })
            })
            .collect()
    }

    /// When each device was last ordered to retry `release`.
    pub(crate) fn retried(&self, release: &str) -> Result<BTreeMap<String, u64>, ServerDbError> {
        Ok(self
            .conn
            .rows(
                "SELECT device, at FROM retries WHERE release = ?1",
                crate::args![release],
                Row::read::<(String, u64)>,
            )
            .map_err(self.err())?
            .into_iter()
            .collect())
    }

    /// Stores rollout `r`'s new plan, and its orders that differ from the stored desire, if the stored rollout is
    /// still in the state and at the wave `r` and `frozen` were read at (and on PostgreSQL, with [`Busy::Skip`], if
    /// no other replica holds its lock); all of it or nothing. Orders are reconciled on every plan; writing only the
    /// changed ones makes a tick over a large fleet cost one read, and an unchanged order counts as no change.
    pub(crate) fn save_plan(
        &self,
        r: &RolloutView,
        frozen: &Frozen,
        plan: &rollout::Plan,
        state: &StateView,
        record: &PlanRecord,
        busy: Busy,
    ) -> Result<Saved, ServerDbError> {
        let tx = self.conn.begin().map_err(self.err())?;
        let lock = match busy {
            Busy::Skip => self.conn.dialect().try_rollout_lock("?1"),
            Busy::Proceed => None,
        };
        if let Some(lock) = lock {
            if !tx
                .one::<bool>(&lock, crate::args![r.id])
                .map_err(self.err())?
            {
                return Ok(Saved::Locked);
            }
        }
        // The compare-and-set comes first: on SQLite it takes the write lock, so that the orders read next are the
        // last committed ones (a read first would fail at the write, not wait, when another connection wrote in
        // between); on PostgreSQL a replica updating the same rollout waits here, then finds it moved.
        let stored_the_plan = tx
            .execute(
                "UPDATE rollouts SET state = ?2, waves_started = ?3, plan = ?4, frozen = ?5, rolled_back = ?6
                 WHERE id = ?1 AND waves_started = ?7 AND state = ?8",
                crate::args![
                    r.id,
                    to_json(state)?,
                    plan.waves_started,
                    to_json(record)?,
                    to_json(&plan.frozen)?,
                    plan.rolled_back,
                    r.waves_started,
                    &frozen.state
                ],
            )
            .map_err(self.err())?;
        if stored_the_plan == 0 {
            return Ok(Saved::Moved);
        }
        let stored: BTreeMap<String, Option<String>> = tx
            .rows(
                "SELECT device, release FROM desired WHERE app = ?1",
                crate::args![&r.app],
                Row::read::<(String, Option<String>)>,
            )
            .map_err(self.err())?
            .into_iter()
            .collect();
        let mut ordered = Vec::new();
        for order in &plan.orders {
            if stored.get(&order.device) == Some(&order.release) {
                continue;
            }
            tx.execute(
                "INSERT INTO desired (device, app, release) VALUES (?1, ?2, ?3)
                 ON CONFLICT (device, app) DO UPDATE SET release = excluded.release",
                crate::args![&order.device, &r.app, order.release.as_deref()],
            )
            .map_err(self.err())?;
            ordered.push(order);
        }
        tx.commit().map_err(self.err())?;
        // Logged once committed: each order in the log was given, once, whichever replica gave it.
        for order in &ordered {
            match &order.release {
                Some(release) => tracing::info!(
                    rollout = r.id,
                    device = %order.device,
                    release = %release,
                    "ordered the device to the release"
                ),
                None => tracing::info!(
                    rollout = r.id,
                    device = %order.device,
                    app = %r.app,
                    "ordered the device to remove the app"
                ),
            }
        }
        Ok(Saved::Stored {
            orders: ordered.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::db::fixtures::{open, request, token};
    use super::*;
    use crate::server::views::AppRequest;

    fn rollout_request(release: &str) -> RolloutRequest {
        RolloutRequest {
            release: release.to_string(),
            select: BTreeMap::new(),
            waves: vec!["1".into(), "2".into()],
            max_failures: "1".into(),
            soak_secs: 0,
            rollback: false,
            device_timeout_secs: 60,
            skip_timed_out: true,
        }
    }

    /// Two replicas on one database read the same rollout; the first to store its plan moves it, and the other's
    /// plan, made from what is no longer there, is refused whole: its orders are not written.
    #[test]
    fn a_plan_from_a_rollout_another_replica_moved_is_refused_with_its_orders() {
        let (dir, a) = open();
        let b = ServerDb::open(&dir.path().join("fleet.db")).unwrap();
        a.create_app(
            &AppRequest {
                name: "web".into(),
                settings: Default::default(),
            },
            0,
        )
        .unwrap();
        let digest = format!("sha256:{}", "ab".repeat(32));
        let manifests = [("linux/arm/v6".to_string(), digest.clone())].into();
        let release = a
            .create_release("web", "registry.test/web", &digest, &manifests, 0)
            .unwrap();
        let token = token(&a, None, None);
        let enroll =
            |name: &str, now: u64| a.enroll(&token, &request(name), now).unwrap().device_id;
        let (first, second) = (enroll("dev-a", 0), enroll("dev-b", 0));
        // Wave 1 (dev-a) is ordered at once.
        let created = a.create_rollout(&rollout_request(&release.id), 0).unwrap();
        assert_eq!(created.waves_started, 1);

        // At 100 dev-a has been silent past its timeout and is skipped: wave 2 starts. Replica B reads the fleet a
        // moment after A, when dev-c has enrolled too: its plan would order dev-c as well, late in the last wave.
        let now = 100;
        let read_a = (a.rollout_rows(None).unwrap(), a.devices().unwrap());
        let third = enroll("dev-c", now);
        let read_b = (b.rollout_rows(None).unwrap(), b.devices().unwrap());
        let drive = |db: &ServerDb, (rows, devices): &(Vec<(RolloutView, Frozen)>, Vec<_>)| {
            let (r, frozen) = &rows[0];
            db.drive_one(r, frozen, devices, now, Busy::Skip).unwrap()
        };
        assert_eq!(drive(&a, &read_a), Saved::Stored { orders: 1 });
        assert_eq!(drive(&b, &read_b), Saved::Moved);

        let ordered = |device: &str| -> Vec<String> {
            b.desired_for(device)
                .unwrap()
                .apps
                .into_iter()
                .map(|app| app.release)
                .collect()
        };
        assert_eq!(ordered(&first), vec![release.id.clone()]);
        assert_eq!(ordered(&second), vec![release.id.clone()]);
        assert!(
            ordered(&third).is_empty(),
            "the refused plan's order was written"
        );
        let stored = b.rollout(created.id).unwrap();
        assert_eq!(stored.waves_started, 2);
        assert_eq!(
            stored.waves[1].devices,
            vec!["dev-b"],
            "the refused plan replaced the stored one"
        );

        // The next tick plans from what is there now, and orders dev-c: once, though both replicas plan it from
        // the same reads, and the second finds the rollout where it read it (dev-c is no new wave).
        let read_a = (a.rollout_rows(None).unwrap(), a.devices().unwrap());
        let read_b = (b.rollout_rows(None).unwrap(), b.devices().unwrap());
        assert_eq!(drive(&a, &read_a), Saved::Stored { orders: 1 });
        assert_eq!(
            drive(&b, &read_b),
            Saved::Stored { orders: 0 },
            "an order given already was given again"
        );
        assert_eq!(ordered(&third), vec![release.id.clone()]);
    }
}
