//! The SQLite engine: one file, the default for a single `flotilla-server`.

use std::path::Path;

use rusqlite::types::{ToSqlOutput, ValueRef};

use super::{Conn, Dialect, Row, StoreError, Value};

pub struct SqliteConn {
    conn: rusqlite::Connection,
}

impl SqliteConn {
    pub fn new(conn: rusqlite::Connection) -> SqliteConn {
        SqliteConn { conn }
    }

    /// Opens the fleet's file as the server uses it: WAL, foreign keys, and commits that survive a power cut.
    pub fn open(path: &Path) -> Result<SqliteConn, rusqlite::Error> {
        let conn = rusqlite::Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // FULL: a report batch is acknowledged once its transaction commits, and the agent then deletes those
        // events. Under NORMAL a power cut could lose the last commits of the WAL after the acknowledgement had
        // gone out, and the events with them: nobody would send them again.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // Every query goes through the cache (`Conn` prepares by text): the fleet's and the dashboard's distinct
        // statements are several dozen, more than rusqlite's default of 16, which would re-prepare in turn.
        conn.set_prepared_statement_cache_capacity(128);
        Ok(SqliteConn { conn })
    }

    /// The connection itself, for what only SQLite has (its migrations' `user_version`, query plans in tests).
    pub fn raw(&self) -> &rusqlite::Connection {
        &self.conn
    }
}

/// The fleet's schema on SQLite, one step per release that changed it; `crate::sqlite::migrate` applies the steps a
/// file lacks. PostgreSQL has its own set, equivalent at the end.
pub const SCHEMA: &[&str] = &["CREATE TABLE tokens (hash TEXT PRIMARY KEY, expires INTEGER, uses_left INTEGER);
     CREATE TABLE devices (id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, credential_hash TEXT NOT NULL UNIQUE,
                           tags TEXT NOT NULL, platform TEXT NOT NULL, agent_version TEXT NOT NULL,
                           enrolled INTEGER NOT NULL, last_seen INTEGER NOT NULL, revoked INTEGER NOT NULL DEFAULT 0);
     CREATE TABLE events (device TEXT NOT NULL REFERENCES devices(id), id TEXT NOT NULL, at INTEGER NOT NULL,
                          received INTEGER NOT NULL, body TEXT NOT NULL, PRIMARY KEY (device, id));",
    // The fleet model. Heartbeats only refresh `devices.metrics`: kept as events they would cost about 2 MB per
    // device per day, for numbers nobody reads once newer ones arrived.
    "ALTER TABLE devices ADD COLUMN metrics TEXT;
     CREATE TABLE admin_tokens (hash TEXT PRIMARY KEY, created INTEGER NOT NULL);
     CREATE TABLE apps (name TEXT PRIMARY KEY, settings TEXT NOT NULL, created INTEGER NOT NULL);
     CREATE TABLE releases (id TEXT PRIMARY KEY, app TEXT NOT NULL REFERENCES apps(name), image TEXT NOT NULL,
                            pinned TEXT NOT NULL, manifests TEXT NOT NULL, created INTEGER NOT NULL);
     CREATE TABLE rollouts (id INTEGER PRIMARY KEY, release TEXT NOT NULL REFERENCES releases(id),
                            app TEXT NOT NULL, spec TEXT NOT NULL, previous TEXT, state TEXT NOT NULL,
                            waves_started INTEGER NOT NULL, plan TEXT, created INTEGER NOT NULL);
     CREATE TABLE desired (device TEXT NOT NULL REFERENCES devices(id), app TEXT NOT NULL, release TEXT,
                           PRIMARY KEY (device, app));
     CREATE TABLE device_apps (device TEXT NOT NULL REFERENCES devices(id), app TEXT NOT NULL,
                               status TEXT NOT NULL, PRIMARY KEY (device, app));
     CREATE TABLE device_updates (device TEXT NOT NULL REFERENCES devices(id), app TEXT NOT NULL,
                                  release TEXT NOT NULL, report TEXT NOT NULL, at INTEGER NOT NULL,
                                  received INTEGER NOT NULL, PRIMARY KEY (device, app, release));",
    // Reports are ordered by the device's outbox sequence, not its clock (0: an agent that sent none).
    "ALTER TABLE device_updates ADD COLUMN seq INTEGER NOT NULL DEFAULT 0;",
    // Idempotent enrollment: the hash of the id the device drew, the token it came with, and whether the device has
    // used its credential since (devices enrolled before this schema have).
    "ALTER TABLE devices ADD COLUMN enrollment_hash TEXT;
     ALTER TABLE devices ADD COLUMN token_hash TEXT;
     ALTER TABLE devices ADD COLUMN confirmed INTEGER NOT NULL DEFAULT 1;
     CREATE UNIQUE INDEX devices_enrollment ON devices (enrollment_hash) WHERE enrollment_hash IS NOT NULL;",
    // Rollouts freeze their waves' membership when they start, and remember that they ordered failed waves back.
    // Superseded is a state of its own: it was a pause, which the planner kept reconciling.
    "ALTER TABLE rollouts ADD COLUMN frozen TEXT;
     ALTER TABLE rollouts ADD COLUMN rolled_back INTEGER NOT NULL DEFAULT 0;
     UPDATE rollouts SET state = '{\"state\":\"superseded\"}'
      WHERE json_extract(state, '$.reason') = 'superseded by a newer rollout';",
    // Tokens the operator can list and revoke, by an id that is not the secret, and that carry the tags their
    // devices get. Tokens made before keep their uses and expiry; they give no tags, and take none from devices.
    "ALTER TABLE tokens ADD COLUMN id TEXT;
     ALTER TABLE tokens ADD COLUMN created INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE tokens ADD COLUMN tags TEXT NOT NULL DEFAULT '{}';
     ALTER TABLE tokens ADD COLUMN device_tags INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE tokens ADD COLUMN revoked INTEGER NOT NULL DEFAULT 0;
     UPDATE tokens SET id = substr(hash, 1, 12);
     CREATE UNIQUE INDEX tokens_id ON tokens (id);",
    // The dashboard: operators' sessions (hashes only, tied to the admin token that opened them), a thin history
    // of each device's metrics for its charts, and the indexes its pages filter and count by at 100,000 devices
    // (and the one event pruning deletes by, which scanned the whole table).
    "CREATE TABLE sessions (hash TEXT PRIMARY KEY, csrf TEXT NOT NULL, admin_hash TEXT NOT NULL,
                           created INTEGER NOT NULL, expires INTEGER NOT NULL);
     CREATE TABLE device_samples (device TEXT NOT NULL REFERENCES devices(id), at INTEGER NOT NULL,
                                  metrics TEXT NOT NULL, PRIMARY KEY (device, at));
     CREATE INDEX devices_last_seen ON devices (last_seen);
     CREATE INDEX events_received ON events (received);",
    // Retries of failed devices: how many times the operator asked each device to try a release again (sent with
    // its desired app, so its agent tries a release that failed on it once more), and when, for its new timeout.
    "CREATE TABLE retries (device TEXT NOT NULL REFERENCES devices(id), release TEXT NOT NULL REFERENCES releases(id),
                           attempt INTEGER NOT NULL, at INTEGER NOT NULL, PRIMARY KEY (device, release));",
    // The devices page at 100,000 devices: its platform filter and choice read this index instead of parsing
    // every device's platform report. The expression is dashboard::cause::PLATFORM_SQL's, which SQLite matches
    // as written (a test checks the plan uses it).
    // So is its state filter, which asks of every device's wanted release whether it committed or failed: this
    // index answers from the report's event without reading and parsing the report.
    // With `revoked` beside it, counting devices by platform reads the index alone; the overview's releases count
    // reads the last one alone.
    "CREATE INDEX devices_platform ON devices (coalesce(json_extract(platform, '$.candidates[0]'), 'unknown'), revoked);
     CREATE INDEX device_updates_event ON device_updates (device, app, release, json_extract(report, '$.event'));
     CREATE INDEX device_apps_release ON device_apps (app, json_extract(status, '$.release'), device);",
];

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self {
            Value::Null => ValueRef::Null,
            Value::Int(i) => ValueRef::Integer(*i),
            Value::Real(r) => ValueRef::Real(*r),
            Value::Text(s) => ValueRef::Text(s.as_bytes()),
            Value::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

fn value_of(v: ValueRef<'_>) -> Value {
    match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Int(i),
        ValueRef::Real(r) => Value::Real(r),
        // SQLite hands back what was stored; text the fleet wrote is UTF-8, and damage shows as U+FFFD rather
        // than failing a whole page.
        ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Value::Blob(b.to_vec()),
    }
}

impl Conn for SqliteConn {
    fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }

    fn query(&self, sql: &str, args: &[Value]) -> Result<Vec<Row>, StoreError> {
        let mut stmt = self.conn.prepare_cached(sql)?;
        let width = stmt.column_count();
        let mut rows = stmt.query(rusqlite::params_from_iter(args.iter()))?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let mut row = Vec::with_capacity(width);
            for i in 0..width {
                row.push(value_of(r.get_ref(i)?));
            }
            out.push(Row(row));
        }
        Ok(out)
    }

    fn execute(&self, sql: &str, args: &[Value]) -> Result<u64, StoreError> {
        let mut stmt = self.conn.prepare_cached(sql)?;
        Ok(stmt.execute(rusqlite::params_from_iter(args.iter()))? as u64)
    }

    fn batch(&self, sql: &str) -> Result<(), StoreError> {
        Ok(self.conn.execute_batch(sql)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::store::ConnExt;

    #[test]
    fn a_dropped_transaction_is_rolled_back() {
        let c = SqliteConn::new(rusqlite::Connection::open_in_memory().unwrap());
        let c: &dyn Conn = &c;
        c.batch("CREATE TABLE t (a INTEGER, b TEXT)").unwrap();
        {
            let tx = c.begin().unwrap();
            tx.execute("INSERT INTO t VALUES (?1, ?2)", crate::args![1u64, "x"])
                .unwrap();
        }
        assert_eq!(c.one::<i64>("SELECT count(*) FROM t", &[]).unwrap(), 0);
        let tx = c.begin().unwrap();
        tx.execute(
            "INSERT INTO t VALUES (?1, ?2)",
            crate::args![2u64, None::<String>],
        )
        .unwrap();
        tx.commit().unwrap();
        let rows = c
            .rows("SELECT a, b FROM t", &[], |r| {
                Ok((r.get::<u64>(0)?, r.get::<Option<String>>(1)?))
            })
            .unwrap();
        assert_eq!(rows, vec![(2, None)]);
        assert_eq!(
            c.row("SELECT a FROM t WHERE a = ?1", crate::args![9u64], |r| r
                .get::<u64>(0))
                .unwrap(),
            None
        );
    }
}
