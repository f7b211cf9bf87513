//! Devices: what they report (events, their apps' status and update reports), what the operator changes of them,
//! and what the fleet wants each to run.
//!
//! Events are keyed by (device, event id), so a batch an agent sends again after a lost answer is taken once.

use super::Row;
use std::collections::BTreeMap;

use super::ConnExt;
use super::db::{ServerDb, ServerDbError, from_json, to_json};
use crate::fleet::{Desired, DesiredApp, Event, EventBody};
use crate::server::views::{DeviceApp, DeviceView};

impl ServerDb {
    /// Every device, with what it runs and what the fleet wants of it.
    pub fn devices(&self) -> Result<Vec<DeviceView>, ServerDbError> {
        let rows = self
            .conn
            .rows(
                "SELECT id, name, tags, platform, agent_version, enrolled, last_seen, revoked, metrics
                 FROM devices ORDER BY name",
                crate::args![],
                Row::read::<(String, String, String, String, String, u64, u64, bool, Option<String>)>,
            )
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
        // The newest report per app. A report is one row per (device, app, release), so the release names it.
        for (device, app, report) in self.query3(
            "SELECT device, app, report FROM device_updates d WHERE d.release = (SELECT e.release FROM device_updates e
             WHERE e.device = d.device AND e.app = d.app ORDER BY e.seq DESC, e.at DESC LIMIT 1)",
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
                    let news = self.news.seen().get(&id).cloned().unwrap_or_default();
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
        self.conn
            .rows(sql, crate::args![], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .map_err(self.err())
    }

    /// The operator's change to an unrevoked device's tags: `set` first, then `remove`. Devices cannot change
    /// their tags; this is the only way after enrollment.
    pub fn set_device_tags(
        &self,
        name: &str,
        set: &BTreeMap<String, String>,
        remove: &[String],
    ) -> Result<(), ServerDbError> {
        let tx = self.conn.begin().map_err(self.err())?;
        let row = tx
            .row(
                "SELECT id, tags FROM devices WHERE name = ?1 AND revoked = 0",
                crate::args![name],
                Row::read::<(String, String)>,
            )
            .map_err(self.err())?;
        let Some((id, tags)) = row else {
            return Err(ServerDbError::NotFound(format!("the device {name}")));
        };
        let mut tags: BTreeMap<String, String> =
            from_json(&format!("tags of the device {name}"), &tags)?;
        tags.extend(set.iter().map(|(k, v)| (k.clone(), v.clone())));
        for k in remove {
            tags.remove(k);
        }
        tx.execute(
            "UPDATE devices SET tags = ?2 WHERE id = ?1",
            crate::args![id, to_json(&tags)?],
        )
        .map_err(self.err())?;
        tx.commit().map_err(self.err())
    }

    /// The id of the unrevoked device named `name`.
    pub fn live_device(&self, name: &str) -> Result<String, ServerDbError> {
        self.conn
            .row(
                "SELECT id FROM devices WHERE name = ?1 AND revoked = 0",
                crate::args![name],
                |r| r.get(0),
            )
            .map_err(self.err())?
            .ok_or_else(|| ServerDbError::NotFound(format!("the device {name}")))
    }

    pub fn revoke(&self, device_id: &str) -> Result<bool, ServerDbError> {
        self.conn
            .execute(
                "UPDATE devices SET revoked = 1 WHERE id = ?1",
                crate::args![device_id],
            )
            .map(|n| n > 0)
            .map_err(self.err())
    }

    /// Stores a device's events and applies them to what the server knows of it; returns every id of the batch,
    /// those taken before included (the agent may drop them all from its outbox). A replayed event changes nothing.
    pub fn record(
        &self,
        device_id: &str,
        events: &[Event],
        now: u64,
    ) -> Result<Vec<String>, ServerDbError> {
        // Heartbeats only refresh the device's metrics, in memory until the next flush; the last one wins.
        let mut rest = Vec::with_capacity(events.len());
        for e in events {
            match &e.body {
                EventBody::Heartbeat(m) => {
                    self.count(|s| s.heartbeats += 1);
                    self.news
                        .seen()
                        .entry(device_id.to_string())
                        .or_default()
                        .metrics = Some(m.clone());
                }
                _ => rest.push(e),
            }
        }
        if rest.is_empty() {
            return Ok(events.iter().map(|e| e.id.clone()).collect());
        }
        let tx = self.conn.begin().map_err(self.err())?;
        for e in rest {
            let body = to_json(&e.body)?;
            let fresh = tx
                .execute(
                    "INSERT INTO events (device, id, at, received, body) VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (device, id) DO NOTHING",
                    crate::args![device_id, &e.id, e.at, now, body],
                )
                .map_err(self.err())?
                > 0;
            if !fresh {
                continue;
            }
            match &e.body {
                // Taken above.
                EventBody::Heartbeat(_) => {}
                EventBody::Platform(p) => {
                    tx.execute(
                        "UPDATE devices SET platform = ?2 WHERE id = ?1",
                        crate::args![device_id, to_json(p)?],
                    )
                    .map_err(self.err())?;
                }
                EventBody::App(status) => {
                    tx.execute(
                        "INSERT INTO device_apps (device, app, status) VALUES (?1, ?2, ?3)
                         ON CONFLICT (device, app) DO UPDATE SET status = excluded.status",
                        crate::args![device_id, &status.app, to_json(status)?],
                    )
                    .map_err(self.err())?;
                }
                EventBody::Update { app, report } => {
                    // An older report never replaces a newer one. Older by the device's outbox sequence: its clock
                    // may have stepped back (no RTC, then NTP) between two reports. Agents that send no sequence
                    // (0) are ordered by their clock, as before.
                    tx.execute(
                        "INSERT INTO device_updates (device, app, release, report, at, received, seq)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                         ON CONFLICT (device, app, release) DO UPDATE SET report = excluded.report,
                         at = excluded.at, received = excluded.received, seq = excluded.seq
                         WHERE (excluded.seq, excluded.at) >= (device_updates.seq, device_updates.at)",
                        crate::args![
                            device_id,
                            app,
                            report.release(),
                            to_json(report)?,
                            e.at,
                            now,
                            e.seq.unwrap_or(0)
                        ],
                    )
                    .map_err(self.err())?;
                }
            }
        }
        tx.commit().map_err(self.err())?;
        Ok(events.iter().map(|e| e.id.clone()).collect())
    }

    pub fn event_count(&self, device_id: &str) -> Result<usize, ServerDbError> {
        self.conn
            .one(
                "SELECT count(*) FROM events WHERE device = ?1",
                crate::args![device_id],
            )
            .map_err(self.err())
    }

    /// Deletes up to `limit` events received before `before` (seconds since the epoch); how many it deleted.
    /// Events are history: what the server acts on (a device's platform, app status, update reports) lives in its
    /// own tables. A batch replayed after its events were pruned would be taken again, which needs an agent that
    /// kept an acknowledged event for longer than the retention.
    pub fn prune_events(&self, before: u64, limit: usize) -> Result<usize, ServerDbError> {
        self.conn
            .execute(
                "DELETE FROM events WHERE (device, id) IN
                   (SELECT device, id FROM events WHERE received < ?1 LIMIT ?2)",
                crate::args![before, limit],
            )
            .map(|n| n as usize)
            .map_err(self.err())
    }

    /// What `device_id` should run: only its own rows, pinned to digests.
    pub fn desired_for(&self, device_id: &str) -> Result<Desired, ServerDbError> {
        let rows = self
            .conn
            .rows(
                "SELECT d.app, r.id, r.pinned, r.manifests, a.settings, coalesce(t.attempt, 0) FROM desired d
                 JOIN releases r ON r.id = d.release JOIN apps a ON a.name = d.app
                 LEFT JOIN retries t ON t.device = d.device AND t.release = d.release
                 WHERE d.device = ?1 ORDER BY d.app",
                crate::args![device_id],
                Row::read::<(String, String, String, String, String, u32)>,
            )
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
}

#[cfg(test)]
mod tests {
    use super::super::db::fixtures::{open, request, token};
    use super::*;

    #[test]
    fn a_report_made_after_the_device_clock_stepped_back_still_replaces_the_older_one() {
        let (_dir, db) = open();
        let token = token(&db, None, None);
        let a = db.enroll(&token, &request("a"), 0).unwrap();
        let update = |id: &str, at: u64, seq: Option<u64>, report: crate::update::Report| Event {
            id: id.into(),
            at,
            seq,
            body: EventBody::Update {
                app: "sensor".into(),
                report,
            },
        };
        let probation = crate::update::Report::Probation {
            release: "r2".into(),
        };
        let committed = crate::update::Report::Committed {
            release: "r2".into(),
        };
        let latest = |db: &ServerDb| -> String {
            db.conn
                .one(
                    "SELECT report FROM device_updates WHERE device = ?1 AND release = 'r2'",
                    crate::args![&a.device_id],
                )
                .unwrap()
        };
        // The commit is made an hour "earlier" by the device's clock (NTP stepped it back), later in its outbox.
        db.record(
            &a.device_id,
            &[update("p", 10_000, Some(7), probation.clone())],
            1,
        )
        .unwrap();
        db.record(&a.device_id, &[update("c", 6_400, Some(8), committed)], 2)
            .unwrap();
        assert!(latest(&db).contains("committed"), "{}", latest(&db));
        // An older report arriving late (a lower sequence) changes nothing, whatever its clock says.
        db.record(&a.device_id, &[update("p2", 20_000, Some(5), probation)], 3)
            .unwrap();
        assert!(latest(&db).contains("committed"), "{}", latest(&db));
    }
}
