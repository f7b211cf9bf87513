//! The agent's SQLite database under the state directory: the device's identity, each app's update state, and the
//! outbox of events for the fleet server.
//!
//! WAL with `synchronous = FULL`: an update state is written before its actions run, so it must survive a power cut
//! the moment the write returns.
//!
//! The outbox is bounded. When it is full, heartbeats are coalesced (the oldest go first: the server only needs the
//! latest metrics), while update, app and platform events are never dropped: they are the fleet's record of what
//! happened, and there are few of them.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};

use crate::fleet::{Event, EventBody};
use crate::update::State;

/// A release as the agent keeps it: what the fleet ordered, and the name its image is stored under once pulled.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AppRelease {
    pub id: String,
    pub app: String,
    /// The pinned index (`repo@sha256:…`).
    pub image: String,
    pub manifests: std::collections::BTreeMap<String, String>,
    pub settings: crate::app::RunSettings,
    /// Set once prepared.
    pub stored: Option<String>,
}

pub const DB_FILE: &str = "agent.db";
/// Outbox rows kept before heartbeats are coalesced: a week offline at one heartbeat a minute, and then some.
pub const DEFAULT_OUTBOX_LIMIT: usize = 12_000;

const SCHEMA: &[&str] = &[
    // 1: the first schema.
    "CREATE TABLE identity (key TEXT PRIMARY KEY, value TEXT NOT NULL);
     CREATE TABLE app_state (app TEXT PRIMARY KEY, state TEXT NOT NULL);
     CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
                          heartbeat INTEGER NOT NULL, event TEXT NOT NULL);",
    // 2: the releases the fleet ordered, with their settings, so a committed one starts again offline.
    "CREATE TABLE releases (id TEXT PRIMARY KEY, app TEXT NOT NULL, body TEXT NOT NULL);",
    // 3: events the server refused on their own, kept aside so they block nothing, with the server's reason.
    "CREATE TABLE dead_letter (id TEXT PRIMARY KEY, event TEXT NOT NULL, reason TEXT NOT NULL);",
];

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error(
        "the agent database {path}: {source}; if it is damaged, move it aside and enroll the device again"
    )]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("the agent database {path} holds a value that does not read: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "the agent database {path} has schema version {found}, newer than this flotilla knows ({known}); \
         install the newer flotilla again, or move the file aside"
    )]
    TooNew {
        path: PathBuf,
        found: usize,
        known: usize,
    },
}

pub struct Db {
    conn: Connection,
    path: PathBuf,
    outbox_limit: usize,
}

impl Db {
    pub fn open(state_dir: &Path) -> Result<Db, DbError> {
        Db::open_with_limit(state_dir, DEFAULT_OUTBOX_LIMIT)
    }

    pub fn open_with_limit(state_dir: &Path, outbox_limit: usize) -> Result<Db, DbError> {
        let path = state_dir.join(DB_FILE);
        let err = |source| DbError::Sqlite {
            path: path.clone(),
            source,
        };
        let conn = Connection::open(&path).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(err)?;
        let db = Db {
            conn,
            path,
            outbox_limit: outbox_limit.max(1),
        };
        db.migrate()?;
        Ok(db)
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> DbError + '_ {
        move |source| DbError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    fn migrate(&self) -> Result<(), DbError> {
        crate::sqlite::migrate(&self.conn, SCHEMA).map_err(|e| match e {
            crate::sqlite::MigrateError::Sqlite(source) => DbError::Sqlite {
                path: self.path.clone(),
                source,
            },
            crate::sqlite::MigrateError::TooNew { found, known } => DbError::TooNew {
                path: self.path.clone(),
                found,
                known,
            },
        })
    }

    pub fn identity(&self, key: &str) -> Result<Option<String>, DbError> {
        self.conn
            .query_row("SELECT value FROM identity WHERE key = ?1", [key], |r| {
                r.get(0)
            })
            .optional()
            .map_err(self.err())
    }

    pub fn set_identity(&self, key: &str, value: &str) -> Result<(), DbError> {
        self.set_identities(&[(key, value)])
    }

    /// Several identity keys in one transaction: a device id is never kept without its credential.
    pub fn set_identities(&self, pairs: &[(&str, &str)]) -> Result<(), DbError> {
        let tx = self.conn.unchecked_transaction().map_err(self.err())?;
        for (key, value) in pairs {
            tx.execute(
                "INSERT INTO identity (key, value) VALUES (?1, ?2)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                [key, value],
            )
            .map_err(self.err())?;
        }
        tx.commit().map_err(self.err())?;
        crate::crash_points::passed(|| {
            let first = pairs.first().map_or("", |(key, _)| key);
            format!("identity {first}")
        });
        Ok(())
    }

    /// The app's update state; a new app starts steady with nothing.
    pub fn app_state(&self, app: &str) -> Result<State, DbError> {
        let json: Option<String> = self
            .conn
            .query_row("SELECT state FROM app_state WHERE app = ?1", [app], |r| {
                r.get(0)
            })
            .optional()
            .map_err(self.err())?;
        match json {
            None => Ok(State::initial()),
            Some(j) => serde_json::from_str(&j).map_err(|e| DbError::Corrupt {
                path: self.path.clone(),
                reason: format!("the update state of {app}: {e}"),
            }),
        }
    }

    /// Persists the state, durably, before the caller runs its actions.
    fn set_app_state_in(
        &self,
        tx: &rusqlite::Transaction<'_>,
        app: &str,
        state: &State,
    ) -> Result<(), DbError> {
        let json = serde_json::to_string(state).map_err(|e| DbError::Corrupt {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        tx.execute(
            "INSERT INTO app_state (app, state) VALUES (?1, ?2)
                 ON CONFLICT(app) DO UPDATE SET state = excluded.state",
            params![app, json],
        )
        .map(|_| ())
        .map_err(self.err())
    }

    /// Every app with an update state.
    pub fn apps(&self) -> Result<Vec<String>, DbError> {
        let mut st = self
            .conn
            .prepare("SELECT app FROM app_state ORDER BY app")
            .map_err(self.err())?;
        let rows = st
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(self.err())?;
        rows.collect::<Result<Vec<_>, _>>().map_err(self.err())
    }

    pub fn put_release(&self, release: &AppRelease) -> Result<(), DbError> {
        let json = serde_json::to_string(release).map_err(|e| DbError::Corrupt {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        self.conn
            .execute(
                "INSERT INTO releases (id, app, body) VALUES (?1, ?2, ?3)
                 ON CONFLICT(id) DO UPDATE SET body = excluded.body",
                params![release.id, release.app, json],
            )
            .map_err(self.err())?;
        crate::crash_points::passed(|| "release".into());
        Ok(())
    }

    pub fn release(&self, id: &str) -> Result<Option<AppRelease>, DbError> {
        let json: Option<String> = self
            .conn
            .query_row("SELECT body FROM releases WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()
            .map_err(self.err())?;
        json.map(|j| {
            serde_json::from_str(&j).map_err(|e| DbError::Corrupt {
                path: self.path.clone(),
                reason: format!("the release {id}: {e}"),
            })
        })
        .transpose()
    }

    /// Queues an event. A full outbox drops its oldest heartbeats to make room; other events always go in.
    pub fn push(&self, event: &Event) -> Result<(), DbError> {
        let tx = self.conn.unchecked_transaction().map_err(self.err())?;
        self.push_in(&tx, event)?;
        tx.commit().map_err(self.err())?;
        // Heartbeats come on a timer: crashing after one would make the sweep's numbering depend on timing.
        if !matches!(event.body, EventBody::Heartbeat(_)) {
            crate::crash_points::passed(|| match &event.body {
                EventBody::Update { report, .. } => format!("event {}", report.release()),
                EventBody::App(status) => format!("event app {}", status.state),
                _ => "event platform".into(),
            });
        }
        Ok(())
    }

    /// An app's new update state and the reports the change owes the fleet, in one transaction: a power cut
    /// between two writes lost a Committed or RolledBack report, and the rollout then waited for it forever.
    pub fn transition(&self, app: &str, state: &State, reports: &[Event]) -> Result<(), DbError> {
        let tx = self.conn.unchecked_transaction().map_err(self.err())?;
        self.set_app_state_in(&tx, app, state)?;
        for event in reports {
            self.push_in(&tx, event)?;
        }
        tx.commit().map_err(self.err())?;
        crate::crash_points::passed(|| format!("state {}", state.name()));
        Ok(())
    }

    fn push_in(&self, tx: &rusqlite::Transaction<'_>, event: &Event) -> Result<(), DbError> {
        let heartbeat = matches!(event.body, EventBody::Heartbeat(_));
        let json = serde_json::to_string(event).map_err(|e| DbError::Corrupt {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        let count: usize = tx
            .query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0))
            .map_err(self.err())?;
        if count >= self.outbox_limit {
            let excess = count + 1 - self.outbox_limit;
            let dropped = tx
                .execute(
                    "DELETE FROM outbox WHERE seq IN
                     (SELECT seq FROM outbox WHERE heartbeat = 1 ORDER BY seq LIMIT ?1)",
                    [excess],
                )
                .map_err(self.err())?;
            // Nothing left to coalesce but this heartbeat itself: the outbox holds only events worth more.
            if dropped < excess && heartbeat {
                return Ok(());
            }
        }
        tx.execute(
            "INSERT OR IGNORE INTO outbox (id, heartbeat, event) VALUES (?1, ?2, ?3)",
            params![event.id, heartbeat, json],
        )
        .map(|_| ())
        .map_err(self.err())
    }

    /// The oldest `limit` events, in order.
    pub fn pending(&self, limit: usize) -> Result<Vec<Event>, DbError> {
        let mut stmt = self
            .conn
            .prepare("SELECT seq, event FROM outbox ORDER BY seq LIMIT ?1")
            .map_err(self.err())?;
        let rows = stmt
            .query_map([limit], |r| {
                Ok((r.get::<_, u64>(0)?, r.get::<_, String>(1)?))
            })
            .map_err(self.err())?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, json) = row.map_err(self.err())?;
            let mut event: Event = serde_json::from_str(&json).map_err(|e| DbError::Corrupt {
                path: self.path.clone(),
                reason: format!("an outbox event: {e}"),
            })?;
            // The outbox's own counter (AUTOINCREMENT never reuses one): the order the server keeps.
            event.seq = Some(seq);
            out.push(event);
        }
        Ok(out)
    }

    /// Moves an event the server refused on its own out of the outbox, keeping it and the reason.
    pub fn dead_letter(&self, id: &str, reason: &str) -> Result<(), DbError> {
        let tx = self.conn.unchecked_transaction().map_err(self.err())?;
        tx.execute(
            "INSERT OR REPLACE INTO dead_letter (id, event, reason)
             SELECT id, event, ?2 FROM outbox WHERE id = ?1",
            params![id, reason],
        )
        .map_err(self.err())?;
        tx.execute("DELETE FROM outbox WHERE id = ?1", [id])
            .map_err(self.err())?;
        tx.commit().map_err(self.err())?;
        crate::crash_points::passed(|| "dead letter".into());
        Ok(())
    }

    /// How many events are kept aside.
    pub fn dead_letters(&self) -> Result<u64, DbError> {
        self.conn
            .query_row("SELECT COUNT(*) FROM dead_letter", [], |r| r.get(0))
            .map_err(self.err())
    }

    /// How many events wait in the outbox, and when the oldest of them was made (by this device's clock).
    pub fn outbox_backlog(&self) -> Result<(u64, Option<u64>), DbError> {
        self.conn
            .query_row(
                "SELECT COUNT(*), (SELECT json_extract(event, '$.at') FROM outbox ORDER BY seq LIMIT 1)
                 FROM outbox",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(self.err())
    }

    /// Drops events the server accepted.
    pub fn acknowledge(&self, ids: &[String]) -> Result<(), DbError> {
        let tx = self.conn.unchecked_transaction().map_err(self.err())?;
        for id in ids {
            tx.execute("DELETE FROM outbox WHERE id = ?1", [id])
                .map_err(self.err())?;
        }
        tx.commit().map_err(self.err())?;
        crate::crash_points::passed(|| "acknowledge".into());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::{AppStatus, Metrics};
    use crate::update::Release;

    fn heartbeat(id: &str) -> Event {
        Event {
            id: id.to_string(),
            at: 0,
            seq: None,
            body: EventBody::Heartbeat(Metrics::default()),
        }
    }

    fn app_event(id: &str) -> Event {
        Event {
            id: id.to_string(),
            at: 0,
            seq: None,
            body: EventBody::App(AppStatus {
                app: "a".into(),
                release: None,
                manifest: None,
                platform: None,
                state: "running".into(),
                restarts: 0,
                health: None,
                wrong_variant: None,
            }),
        }
    }

    fn ids(db: &Db) -> Vec<String> {
        db.pending(100).unwrap().into_iter().map(|e| e.id).collect()
    }

    #[test]
    fn state_and_identity_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::Steady {
            committed: Some(Release {
                id: "r1".into(),
                image: "x@sha256:1".into(),
                attempt: 0,
            }),
            rejected: None,
        };
        {
            let db = Db::open(dir.path()).unwrap();
            assert_eq!(db.app_state("a").unwrap(), State::initial());
            db.transition("a", &state, &[]).unwrap();
            db.set_identity("device_id", "d1").unwrap();
        }
        let db = Db::open(dir.path()).unwrap();
        assert_eq!(db.app_state("a").unwrap(), state);
        assert_eq!(db.identity("device_id").unwrap().as_deref(), Some("d1"));
        assert_eq!(db.identity("credential").unwrap(), None);
    }

    #[test]
    fn a_dead_letter_leaves_the_outbox_and_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        db.push(&app_event("a1")).unwrap();
        db.push(&app_event("a2")).unwrap();
        db.dead_letter("a1", "422: unknown variant").unwrap();
        assert_eq!(ids(&db), ["a2"]);
        assert_eq!(db.dead_letters().unwrap(), 1);
    }

    #[test]
    fn the_backlog_counts_the_outbox_and_dates_its_oldest_event() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        assert_eq!(db.outbox_backlog().unwrap(), (0, None));
        let mut first = app_event("a1");
        first.at = 1_000;
        db.push(&first).unwrap();
        let mut second = heartbeat("h1");
        second.at = 1_060;
        db.push(&second).unwrap();
        assert_eq!(db.outbox_backlog().unwrap(), (2, Some(1_000)));
        db.acknowledge(&["a1".to_string()]).unwrap();
        assert_eq!(db.outbox_backlog().unwrap(), (1, Some(1_060)));
    }

    #[test]
    fn a_transition_writes_the_state_and_its_reports_together() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        let state = State::Steady {
            committed: None,
            rejected: None,
        };
        db.transition("a", &state, &[app_event("r1"), app_event("r2")])
            .unwrap();
        assert_eq!(db.app_state("a").unwrap(), state);
        assert_eq!(ids(&db), ["r1", "r2"]);
    }

    #[test]
    fn a_full_outbox_coalesces_heartbeats_and_keeps_every_other_event() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open_with_limit(dir.path(), 3).unwrap();
        db.push(&heartbeat("h1")).unwrap();
        db.push(&app_event("a1")).unwrap();
        db.push(&heartbeat("h2")).unwrap();
        db.push(&heartbeat("h3")).unwrap();
        assert_eq!(
            ids(&db),
            ["a1", "h2", "h3"],
            "the oldest heartbeat made room"
        );
        db.push(&app_event("a2")).unwrap();
        db.push(&app_event("a3")).unwrap();
        assert_eq!(ids(&db), ["a1", "a2", "a3"]);
        db.push(&heartbeat("h4")).unwrap();
        assert_eq!(
            ids(&db),
            ["a1", "a2", "a3"],
            "no heartbeat displaces an app event"
        );
        db.push(&app_event("a4")).unwrap();
        assert_eq!(
            ids(&db),
            ["a1", "a2", "a3", "a4"],
            "app events are never dropped"
        );
        db.push(&app_event("a4")).unwrap();
        assert_eq!(ids(&db).len(), 4, "an id is queued once");
        db.acknowledge(&["a1".into(), "a3".into(), "unknown".into()])
            .unwrap();
        assert_eq!(ids(&db), ["a2", "a4"]);
    }

    #[test]
    fn a_newer_schema_is_refused_with_advice() {
        let dir = tempfile::tempdir().unwrap();
        {
            let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
            conn.pragma_update(None, "user_version", 99).unwrap();
        }
        let err = Db::open(dir.path()).err().unwrap();
        assert!(err.to_string().contains("move the file aside"), "{err}");
    }
}
