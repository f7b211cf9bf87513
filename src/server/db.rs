//! The fleet server's SQLite: enrollment tokens, devices and their credentials, and the events devices report.
//!
//! Secrets are 256 random bits, shown once; only their SHA-256 is stored. A slow password hash would add nothing for
//! secrets that were never chosen by a person, and a lookup by hash keeps authentication one indexed query.
//! Events are keyed by (device, event id), so a batch an agent sends again after a lost answer is taken once.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use base64::Engine;
use rand::RngCore;
use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest as _, Sha256};

use super::model::{TokenCreated, TokenView};
use crate::fleet::{EnrollRequest, Enrolled, Event, EventBody, Metrics};

const SCHEMA: &[&str] = &["CREATE TABLE tokens (hash TEXT PRIMARY KEY, expires INTEGER, uses_left INTEGER);
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

#[derive(Debug, thiserror::Error)]
pub enum ServerDbError {
    #[error("the fleet database {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "the fleet database {path} has schema version {found}, newer than this flotilla-server knows ({known})"
    )]
    TooNew {
        path: PathBuf,
        found: usize,
        known: usize,
    },
    #[error(
        "the enrollment token is unknown to this server; create one with flotilla-server token create and put it in the device's token file"
    )]
    BadToken,
    #[error(
        "the enrollment token {0} is used up; create another with flotilla-server token create (--uses N for several devices)"
    )]
    TokenUsedUp(String),
    #[error(
        "the enrollment token {id} expired at {at}; create another with flotilla-server token create (--expires for longer)"
    )]
    TokenExpired { id: String, at: String },
    #[error(
        "the enrollment token {0} was revoked by the operator; ask them for a new one (flotilla-server token create)"
    )]
    TokenRevoked(String),
    #[error("{path}: {message}")]
    Field { path: String, message: String },
    #[error("a device named {0} is enrolled already; choose another name or revoke it first")]
    NameTaken(String),
    #[error(
        "this enrollment id enrolled the device {0}, which has used its credential since; a device that lost its state enrolls again with a new enrollment id"
    )]
    EnrolledAlready(String),
    #[error(
        "this enrollment id enrolled the device {0}, which is revoked; enroll again with a new enrollment id and a new token"
    )]
    EnrollmentRevoked(String),
    #[error("cannot encode {0}")]
    Encode(String),
    #[error("the stored {what} is damaged: {message}")]
    Damaged { what: String, message: String },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Spec(#[from] crate::rollout::SpecError),
    #[error("{0} does not exist")]
    NotFound(String),
    #[error("{0} exists already")]
    Exists(String),
}

pub struct ServerDb {
    pub(super) conn: super::store::sqlite::SqliteConn,
    path: PathBuf,
    /// What devices' requests said of them since the last flush (`api::Server::flush`): a heartbeat costs no write,
    /// and a device heard from many times between two flushes is written once.
    pub(super) seen: RefCell<HashMap<String, Seen>>,
    stats: Cell<WriteStats>,
}

/// A device's news not yet written: when it was last heard from, its latest metrics, and whether it has used its
/// credential for the first time (which ends its enrollment's retries; [`ServerDb::enroll`] looks here too).
#[derive(Debug, Clone, Default)]
pub(super) struct Seen {
    pub(super) last_seen: u64,
    pub(super) metrics: Option<Metrics>,
    pub(super) confirmed: bool,
}

/// What the devices' traffic cost the database, since the server started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Heartbeats received.
    pub heartbeats: u64,
    /// Rows written for `last_seen` and metrics.
    pub seen_writes: u64,
    /// The transactions those rows took.
    pub flushes: u64,
}

fn open_connection(path: &Path) -> Result<Connection, ServerDbError> {
    let err = |source| ServerDbError::Sqlite {
        path: path.to_path_buf(),
        source,
    };
    let conn = Connection::open(path).map_err(err)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(err)?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(err)?;
    // FULL: a report batch is acknowledged once its transaction commits, and the agent then deletes those
    // events. Under NORMAL a power cut could lose the last commits of the WAL after the acknowledgement had
    // gone out, and the events with them: nobody would send them again.
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(err)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(err)?;
    Ok(conn)
}

/// A device's metrics are kept for its charts at most this often.
pub const SAMPLE_EVERY_SECS: u64 = 5 * 60;

/// How long samples are kept at most (the dashboard charts them all): 2,016 rows a device.
pub const SAMPLES_KEPT_SECS: u64 = 7 * 86_400;

/// Writes devices' news (`last_seen`, metrics) on a connection of its own, so that the server's lock is not held
/// meanwhile: under WAL the requests' reads go on while it writes, and only another write waits for it.
pub struct NewsWriter {
    conn: Connection,
    path: PathBuf,
}

impl NewsWriter {
    pub(super) fn write(&mut self, batch: &[(String, Seen)]) -> Result<(), ServerDbError> {
        let err = |source| ServerDbError::Sqlite {
            path: self.path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(err)?;
        {
            let mut st = tx
                .prepare_cached(
                    "UPDATE devices SET last_seen = MAX(last_seen, ?2), metrics = COALESCE(?3, metrics),
                     confirmed = MAX(confirmed, ?4) WHERE id = ?1",
                )
                .map_err(err)?;
            // The dashboard's charts: a sample when the device's last one is older than SAMPLE_EVERY_SECS. The
            // check is a lookup in the table's primary key, so a flush still writes one row per device, and one
            // more every five minutes per device that sends metrics.
            let mut sample = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO device_samples (device, at, metrics)
                     SELECT ?1, ?2, ?3 WHERE NOT EXISTS
                       (SELECT 1 FROM device_samples WHERE device = ?1 AND at > ?2 - ?4)",
                )
                .map_err(err)?;
            for (id, news) in batch {
                let metrics = news.metrics.as_ref().map(to_json).transpose()?;
                st.execute(params![id, news.last_seen, metrics, news.confirmed])
                    .map_err(err)?;
                if let Some(m) = &news.metrics {
                    sample
                        .execute(params![
                            id,
                            news.last_seen,
                            chart_sample(m),
                            SAMPLE_EVERY_SECS
                        ])
                        .map_err(err)?;
                }
            }
        }
        tx.commit().map_err(err)
    }
}

/// What the dashboard charts of a heartbeat's metrics, as JSON without the rest (uptime, load, nulls): a sample
/// row is then about 200 bytes instead of 310, which counts at 2,016 rows a device.
fn chart_sample(m: &Metrics) -> String {
    let mut o = serde_json::Map::new();
    let fields: [(&str, Option<serde_json::Value>); 6] = [
        ("cpu_percent", m.cpu_percent.map(Into::into)),
        ("memory_used", m.memory_used.map(Into::into)),
        ("memory_total", m.memory_total.map(Into::into)),
        ("disk_used", m.disk_used.map(Into::into)),
        ("disk_total", m.disk_total.map(Into::into)),
        ("temperature_celsius", m.temperature_celsius.map(Into::into)),
    ];
    for (k, v) in fields {
        if let Some(v) = v {
            o.insert(k.to_string(), v);
        }
    }
    serde_json::Value::Object(o).to_string()
}

/// 256 random bits, base64url without padding.
pub fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The credential of an enrollment that carries the device's enrollment id. It is derived, not drawn, so that a
/// retry whose first reply was lost gets the same credential back although the server keeps only hashes. Its
/// secrecy is the enrollment id's: at least 192 bits the device drew and sends nowhere else, over the fleet link.
fn derived_credential(device_id: &str, enrollment_id: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"flotilla device credential\0");
    h.update(device_id.as_bytes());
    h.update([0]);
    h.update(enrollment_id.as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(h.finalize())
}

pub fn hash_secret(secret: &str) -> String {
    let d = Sha256::digest(secret.as_bytes());
    d.iter().map(|b| format!("{b:02x}")).collect()
}

impl ServerDb {
    pub fn open(path: &Path) -> Result<ServerDb, ServerDbError> {
        let conn = open_connection(path)?;
        let db = ServerDb {
            conn: super::store::sqlite::SqliteConn::new(conn),
            path: path.to_path_buf(),
            seen: RefCell::default(),
            stats: Cell::default(),
        };
        db.migrate()?;
        Ok(db)
    }

    /// The database file, for another connection to it.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    pub(super) fn err(&self) -> impl Fn(rusqlite::Error) -> ServerDbError + '_ {
        move |source| ServerDbError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    fn migrate(&self) -> Result<(), ServerDbError> {
        crate::sqlite::migrate(&self.conn, SCHEMA).map_err(|e| match e {
            crate::sqlite::MigrateError::Sqlite(source) => ServerDbError::Sqlite {
                path: self.path.clone(),
                source,
            },
            crate::sqlite::MigrateError::TooNew { found, known } => ServerDbError::TooNew {
                path: self.path.clone(),
                found,
                known,
            },
        })
    }

    /// A new enrollment token, valid until `expires` (seconds since the epoch) for `uses` enrollments; `None`:
    /// never, unlimited.
    pub fn create_token(
        &self,
        expires: Option<u64>,
        uses: Option<u32>,
        tags: &BTreeMap<String, String>,
        device_tags: bool,
        now: u64,
    ) -> Result<TokenCreated, ServerDbError> {
        let token = new_secret();
        let hash = hash_secret(&token);
        let id = token_id(&hash);
        self.conn
            .execute(
                "INSERT INTO tokens (hash, expires, uses_left, id, created, tags, device_tags)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![hash, expires, uses, id, now, to_json(tags)?, device_tags],
            )
            .map_err(self.err())?;
        Ok(TokenCreated {
            id,
            token,
            expires,
            uses,
            tags: tags.clone(),
            device_tags,
        })
    }

    /// Every enrollment token, oldest first, without its secret or hash.
    pub fn tokens(&self) -> Result<Vec<TokenView>, ServerDbError> {
        let mut st = self
            .conn
            .prepare(
                "SELECT t.id, t.created, t.expires, t.uses_left, t.tags, t.device_tags, t.revoked,
                        (SELECT COUNT(*) FROM devices d WHERE d.token_hash = t.hash)
                 FROM tokens t ORDER BY t.created, t.id",
            )
            .map_err(self.err())?;
        type Row = (
            String,
            u64,
            Option<u64>,
            Option<u32>,
            String,
            bool,
            bool,
            u64,
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
                ))
            })
            .map_err(self.err())?
            .collect::<Result<_, _>>()
            .map_err(self.err())?;
        rows.into_iter()
            .map(
                |(id, created, expires, uses_left, tags, device_tags, revoked, enrolled)| {
                    Ok(TokenView {
                        tags: serde_json::from_str(&tags).map_err(|e| ServerDbError::Damaged {
                            what: format!("tags of the token {id}"),
                            message: e.to_string(),
                        })?,
                        id,
                        created,
                        expires,
                        uses_left,
                        enrolled,
                        device_tags,
                        revoked,
                    })
                },
            )
            .collect()
    }

    /// Refuses the token for any enrollment from now on. Devices enrolled with it keep their credentials.
    pub fn revoke_token(&self, id: &str) -> Result<TokenView, ServerDbError> {
        let n = self
            .conn
            .execute("UPDATE tokens SET revoked = 1 WHERE id = ?1", [id])
            .map_err(self.err())?;
        if n == 0 {
            return Err(ServerDbError::NotFound(format!(
                "the enrollment token {id} (flotilla-server token list shows the ids)"
            )));
        }
        self.tokens()?
            .into_iter()
            .find(|t| t.id == id)
            .ok_or_else(|| ServerDbError::NotFound(format!("the enrollment token {id}")))
    }

    /// Enrolls a device with a token: the token's use is taken and the device's credential made in one transaction.
    ///
    /// With an enrollment id, enrollment is idempotent: the same token and id get the same device and credential
    /// back, even once the token is used up, until the device has used that credential. A reply lost on the way
    /// then costs neither a token use nor a second device.
    pub fn enroll(
        &self,
        token: &str,
        req: &EnrollRequest,
        now: u64,
    ) -> Result<Enrolled, ServerDbError> {
        let tx = self.conn.unchecked_transaction().map_err(self.err())?;
        let hash = hash_secret(token);
        if let Some(eid) = &req.enrollment_id {
            let prior: Option<(String, String, Option<String>, bool, bool)> = tx
                .query_row(
                    "SELECT id, name, token_hash, revoked, confirmed FROM devices WHERE enrollment_hash = ?1",
                    [hash_secret(eid)],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
                )
                .optional()
                .map_err(self.err())?;
            if let Some((id, name, token_hash, revoked, confirmed)) = prior {
                // Another token with a known id is a guess or a copy, not a retry: it learns nothing.
                if token_hash.as_deref() != Some(hash.as_str()) {
                    return Err(ServerDbError::BadToken);
                }
                if revoked {
                    return Err(ServerDbError::EnrollmentRevoked(name));
                }
                // A first use not flushed yet counts as much as a written one.
                let confirmed =
                    confirmed || self.seen.borrow().get(&id).is_some_and(|n| n.confirmed);
                if confirmed || name != req.name {
                    return Err(ServerDbError::EnrolledAlready(name));
                }
                let credential = derived_credential(&id, eid);
                return Ok(Enrolled {
                    device_id: id,
                    credential,
                });
            }
        }
        type TokenRow = (String, Option<u64>, Option<i64>, bool, String, bool);
        let row: Option<TokenRow> = tx
            .query_row(
                "SELECT id, expires, uses_left, revoked, tags, device_tags FROM tokens WHERE hash = ?1",
                [&hash],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
            )
            .optional()
            .map_err(self.err())?;
        let Some((token_id, expires, uses, revoked, token_tags, device_tags)) = row else {
            return Err(ServerDbError::BadToken);
        };
        if revoked {
            return Err(ServerDbError::TokenRevoked(token_id));
        }
        if let Some(e) = expires.filter(|e| now >= *e) {
            return Err(ServerDbError::TokenExpired {
                id: token_id,
                at: httpdate::fmt_http_date(
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs(e),
                ),
            });
        }
        match uses {
            Some(u) if u <= 0 => return Err(ServerDbError::TokenUsedUp(token_id)),
            Some(_) => {
                tx.execute(
                    "UPDATE tokens SET uses_left = uses_left - 1 WHERE hash = ?1",
                    [&hash],
                )
                .map_err(self.err())?;
            }
            None => {}
        }
        // Tags decide which rollouts reach a device: they are the operator's, given by the token. What the device
        // asks for counts only where the token says so, and never over the token's own.
        let mut tags: BTreeMap<String, String> =
            serde_json::from_str(&token_tags).map_err(|e| ServerDbError::Damaged {
                what: format!("tags of the token {token_id}"),
                message: e.to_string(),
            })?;
        if device_tags {
            for (k, v) in &req.tags {
                tags.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        let taken: bool = tx
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM devices WHERE name = ?1 AND revoked = 0)",
                [&req.name],
                |r| r.get(0),
            )
            .map_err(self.err())?;
        if taken {
            return Err(ServerDbError::NameTaken(req.name.clone()));
        }
        // A revoked device's name may be taken by a new enrollment; the old row keeps its history under a new name.
        tx.execute(
            "UPDATE devices SET name = name || '~revoked~' || id WHERE name = ?1 AND revoked = 1",
            [&req.name],
        )
        .map_err(self.err())?;
        let device_id = new_secret()[..16].to_string();
        let credential = match &req.enrollment_id {
            Some(eid) => derived_credential(&device_id, eid),
            None => new_secret(),
        };
        tx.execute(
            "INSERT INTO devices (id, name, credential_hash, tags, platform, agent_version, enrolled, last_seen,
                                  enrollment_hash, token_hash, confirmed)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7, ?8, ?9, ?10)",
            params![
                device_id,
                req.name,
                hash_secret(&credential),
                to_json(&tags)?,
                to_json(&req.platform)?,
                req.agent_version,
                now,
                req.enrollment_id.as_deref().map(hash_secret),
                hash,
                req.enrollment_id.is_none()
            ],
        )
        .map_err(self.err())?;
        tx.commit().map_err(self.err())?;
        Ok(Enrolled {
            device_id,
            credential,
        })
    }

    /// The device a credential belongs to, unless it is revoked. Marks it seen (and its credential used), in
    /// memory until the next flush: no request of a known device writes here.
    pub fn authenticate(
        &self,
        credential: &str,
        now: u64,
    ) -> Result<Option<String>, ServerDbError> {
        let row: Option<(String, bool)> = self
            .conn
            .query_row(
                "SELECT id, confirmed FROM devices WHERE credential_hash = ?1 AND revoked = 0",
                [hash_secret(credential)],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(self.err())?;
        let Some((id, confirmed)) = row else {
            return Ok(None);
        };
        let mut seen = self.seen.borrow_mut();
        let entry = seen.entry(id.clone()).or_default();
        entry.last_seen = entry.last_seen.max(now);
        entry.confirmed |= !confirmed;
        Ok(Some(id))
    }

    fn count(&self, f: impl FnOnce(&mut WriteStats)) {
        let mut s = self.stats.get();
        f(&mut s);
        self.stats.set(s);
    }

    pub fn write_stats(&self) -> WriteStats {
        self.stats.get()
    }

    /// Takes the news of up to `limit` devices out of memory, for a [`NewsWriter`].
    pub(super) fn take_news(&self, limit: usize) -> Vec<(String, Seen)> {
        let mut seen = self.seen.borrow_mut();
        let ids: Vec<String> = seen.keys().take(limit).cloned().collect();
        ids.into_iter()
            .filter_map(|id| seen.remove_entry(&id))
            .collect()
    }

    /// Puts back news a [`NewsWriter`] could not write, under what arrived meanwhile, for the next flush.
    pub(super) fn restore_news(&self, batch: Vec<(String, Seen)>) {
        let mut seen = self.seen.borrow_mut();
        for (id, old) in batch {
            let entry = seen.entry(id).or_default();
            entry.last_seen = entry.last_seen.max(old.last_seen);
            entry.confirmed |= old.confirmed;
            if entry.metrics.is_none() {
                entry.metrics = old.metrics;
            }
        }
    }

    pub(super) fn count_flush(&self, rows: usize) {
        self.count(|s| {
            s.seen_writes += rows as u64;
            s.flushes += 1;
        });
    }

    /// A second connection to this database for writing the devices' news.
    pub(super) fn news_writer(&self) -> Result<NewsWriter, ServerDbError> {
        let conn = open_connection(&self.path)?;
        Ok(NewsWriter {
            conn,
            path: self.path.clone(),
        })
    }

    /// Whether `token` is an enrollment token this server made, usable or not: a request with anything else is
    /// refused before its body is read.
    pub fn token_known(&self, token: &str) -> Result<bool, ServerDbError> {
        self.conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM tokens WHERE hash = ?1)",
                [hash_secret(token)],
                |r| r.get(0),
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
                "DELETE FROM events WHERE rowid IN (SELECT rowid FROM events WHERE received < ?1 LIMIT ?2)",
                params![before.min(i64::MAX as u64), limit.min(i64::MAX as usize) as i64],
            )
            .map_err(self.err())
    }

    /// Deletes the metrics samples taken before `before` among the `limit` oldest rows; how many it deleted.
    /// Rows are added in time order, so the oldest rowids are the oldest samples: a slice reads `limit` rows, where
    /// a search by `at` (which has no index) would read the whole table, 20 million rows at 10,000 devices, under
    /// the server's lock. A sample written a flush late waits for the next prune.
    pub fn prune_samples(&self, before: u64, limit: usize) -> Result<usize, ServerDbError> {
        self.conn
            .execute(
                "DELETE FROM device_samples WHERE rowid IN
                   (SELECT rowid FROM (SELECT rowid, at FROM device_samples ORDER BY rowid LIMIT ?2)
                     WHERE at < ?1)",
                params![
                    before.min(i64::MAX as u64),
                    limit.min(i64::MAX as usize) as i64
                ],
            )
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
        let tx = self.conn.unchecked_transaction().map_err(self.err())?;
        let row: Option<(String, String)> = tx
            .query_row(
                "SELECT id, tags FROM devices WHERE name = ?1 AND revoked = 0",
                [name],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(self.err())?;
        let Some((id, tags)) = row else {
            return Err(ServerDbError::NotFound(format!("the device {name}")));
        };
        let mut tags: BTreeMap<String, String> =
            serde_json::from_str(&tags).map_err(|e| ServerDbError::Damaged {
                what: format!("tags of the device {name}"),
                message: e.to_string(),
            })?;
        tags.extend(set.iter().map(|(k, v)| (k.clone(), v.clone())));
        for k in remove {
            tags.remove(k);
        }
        tx.execute(
            "UPDATE devices SET tags = ?2 WHERE id = ?1",
            params![id, to_json(&tags)?],
        )
        .map_err(self.err())?;
        tx.commit().map_err(self.err())
    }

    /// The id of the unrevoked device named `name`.
    pub fn live_device(&self, name: &str) -> Result<String, ServerDbError> {
        self.conn
            .query_row(
                "SELECT id FROM devices WHERE name = ?1 AND revoked = 0",
                [name],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.err())?
            .ok_or_else(|| ServerDbError::NotFound(format!("the device {name}")))
    }

    pub fn revoke(&self, device_id: &str) -> Result<bool, ServerDbError> {
        self.conn
            .execute("UPDATE devices SET revoked = 1 WHERE id = ?1", [device_id])
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
                    self.seen
                        .borrow_mut()
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
        let tx = self.conn.unchecked_transaction().map_err(self.err())?;
        for e in rest {
            let body = to_json(&e.body)?;
            let fresh = tx
                .execute(
                    "INSERT OR IGNORE INTO events (device, id, at, received, body) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![device_id, e.id, e.at, now, body],
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
                        params![device_id, to_json(p)?],
                    )
                    .map_err(self.err())?;
                }
                EventBody::App(status) => {
                    tx.execute(
                        "INSERT INTO device_apps (device, app, status) VALUES (?1, ?2, ?3)
                         ON CONFLICT (device, app) DO UPDATE SET status = excluded.status",
                        params![device_id, status.app, to_json(status)?],
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
                        params![
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
            .query_row(
                "SELECT COUNT(*) FROM events WHERE device = ?1",
                [device_id],
                |r| r.get(0),
            )
            .map_err(self.err())
    }
}

/// The public id of a token: the start of its hash, so rows made before ids existed have one too. 48 bits of a
/// hash of 256 random bits tell nothing about the secret.
fn token_id(hash: &str) -> String {
    hash[..12].to_string()
}

pub(super) fn to_json<T: serde::Serialize>(v: &T) -> Result<String, ServerDbError> {
    serde_json::to_string(v).map_err(|e| ServerDbError::Encode(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::{AppStatus, PlatformReport};

    fn request(name: &str) -> EnrollRequest {
        EnrollRequest {
            name: name.to_string(),
            tags: [("site".to_string(), "north".to_string())].into(),
            agent_version: "0.1.0".into(),
            platform: PlatformReport {
                candidates: vec!["linux/arm/v6".into()],
                page_size: Some(4096),
                description: "Pi Zero".into(),
            },
            enrollment_id: None,
        }
    }

    fn token(db: &ServerDb, expires: Option<u64>, uses: Option<u32>) -> String {
        db.create_token(expires, uses, &BTreeMap::new(), false, 0)
            .unwrap()
            .token
    }

    fn app_event(id: &str) -> Event {
        Event {
            id: id.into(),
            at: 1,
            seq: None,
            body: EventBody::App(AppStatus {
                app: "sensor".into(),
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

    #[test]
    fn a_report_made_after_the_device_clock_stepped_back_still_replaces_the_older_one() {
        let dir = tempfile::tempdir().unwrap();
        let db = ServerDb::open(&dir.path().join("fleet.db")).unwrap();
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
                .query_row(
                    "SELECT report FROM device_updates WHERE device = ?1 AND release = 'r2'",
                    [&a.device_id],
                    |r| r.get(0),
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

    #[test]
    fn a_retried_enrollment_gets_the_same_device_and_credential_until_the_credential_is_used() {
        let dir = tempfile::tempdir().unwrap();
        let db = ServerDb::open(&dir.path().join("fleet.db")).unwrap();
        let once = token(&db, Some(100), Some(1));
        let mut req = request("a");
        req.enrollment_id = Some(new_secret());
        let first = db.enroll(&once, &req, 10).unwrap();
        // The reply was lost: the retry finds the token used up, and is answered with the same enrollment.
        let again = db.enroll(&once, &req, 20).unwrap();
        assert_eq!(again, first);
        let devices: u32 = db
            .conn
            .query_row("SELECT COUNT(*) FROM devices", [], |r| r.get(0))
            .unwrap();
        assert_eq!(devices, 1);
        // Someone holding the id but another token learns nothing.
        let other = token(&db, None, None);
        assert!(matches!(
            db.enroll(&other, &req, 20),
            Err(ServerDbError::BadToken)
        ));
        // Once the device has used its credential the enrollment is over: a replay is refused.
        assert_eq!(
            db.authenticate(&first.credential, 30).unwrap(),
            Some(first.device_id.clone())
        );
        assert!(matches!(
            db.enroll(&once, &req, 40),
            Err(ServerDbError::EnrolledAlready(_))
        ));
        // A revoked device's id is refused with a reason.
        let mut b = request("b");
        b.enrollment_id = Some(new_secret());
        let enrolled_b = db.enroll(&other, &b, 50).unwrap();
        db.revoke(&enrolled_b.device_id).unwrap();
        assert!(matches!(
            db.enroll(&other, &b, 60),
            Err(ServerDbError::EnrollmentRevoked(_))
        ));
        // Without an id (an older agent) a retry is a second enrollment, as before.
        let open = token(&db, None, None);
        let c = db.enroll(&open, &request("c"), 70).unwrap();
        assert_ne!(c.credential, first.credential);
        assert!(matches!(
            db.enroll(&open, &request("c"), 80),
            Err(ServerDbError::NameTaken(_))
        ));
    }

    #[test]
    fn samples_are_pruned_oldest_first_a_slice_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let db = ServerDb::open(&dir.path().join("fleet.db")).unwrap();
        let token = token(&db, None, None);
        let a = db.enroll(&token, &request("a"), 0).unwrap();
        let count = |db: &ServerDb| -> usize {
            db.conn
                .query_row("SELECT count(*) FROM device_samples", [], |r| r.get(0))
                .unwrap()
        };
        db.conn.execute_batch("BEGIN").unwrap();
        for at in 0..1000u64 {
            db.conn
                .execute(
                    "INSERT INTO device_samples (device, at, metrics) VALUES (?1, ?2, '{}')",
                    params![a.device_id, at],
                )
                .unwrap();
        }
        db.conn.execute_batch("COMMIT").unwrap();
        assert_eq!(db.prune_samples(450, 200).unwrap(), 200);
        assert_eq!(db.prune_samples(450, 200).unwrap(), 200);
        assert_eq!(
            db.prune_samples(450, 200).unwrap(),
            50,
            "stops at the young"
        );
        assert_eq!(db.prune_samples(450, 200).unwrap(), 0);
        assert_eq!(count(&db), 550);
    }

    #[test]
    fn tokens_expire_and_run_out() {
        let dir = tempfile::tempdir().unwrap();
        let db = ServerDb::open(&dir.path().join("fleet.db")).unwrap();
        let once = token(&db, Some(100), Some(1));
        db.enroll(&once, &request("a"), 50).unwrap();
        assert!(matches!(
            db.enroll(&once, &request("b"), 50),
            Err(ServerDbError::TokenUsedUp(_))
        ));
        let expired = token(&db, Some(100), None);
        assert!(matches!(
            db.enroll(&expired, &request("b"), 100),
            Err(ServerDbError::TokenExpired { .. })
        ));
        assert!(matches!(
            db.enroll("forged", &request("b"), 0),
            Err(ServerDbError::BadToken)
        ));
        let open = token(&db, None, None);
        assert!(matches!(
            db.enroll(&open, &request("a"), 0),
            Err(ServerDbError::NameTaken(_))
        ));
    }

    #[test]
    fn a_revoked_token_enrolls_nobody_and_its_tags_are_the_devices_own() {
        let dir = tempfile::tempdir().unwrap();
        let db = ServerDb::open(&dir.path().join("fleet.db")).unwrap();
        let canary: BTreeMap<String, String> = [("ring".to_string(), "canary".to_string())].into();
        let strict = db.create_token(None, None, &canary, false, 0).unwrap();
        let a = db.enroll(&strict.token, &request("a"), 1).unwrap();
        let open = db.create_token(None, None, &canary, true, 0).unwrap();
        let mut asks = request("b");
        asks.tags.insert("ring".into(), "stable".into());
        let b = db.enroll(&open.token, &asks, 1).unwrap();
        let tags = |id: &str| -> BTreeMap<String, String> {
            let text: String = db
                .conn
                .query_row("SELECT tags FROM devices WHERE id = ?1", [id], |r| r.get(0))
                .unwrap();
            serde_json::from_str(&text).unwrap()
        };
        // The device asked for site=north: only a token that allows it gives it, and never over its own.
        assert_eq!(tags(&a.device_id), canary);
        assert_eq!(
            tags(&b.device_id),
            [
                ("ring".to_string(), "canary".to_string()),
                ("site".to_string(), "north".to_string())
            ]
            .into()
        );
        db.revoke_token(&strict.id).unwrap();
        assert!(matches!(
            db.enroll(&strict.token, &request("c"), 2),
            Err(ServerDbError::TokenRevoked(_))
        ));
        let listed = db.tokens().unwrap();
        assert_eq!(listed.len(), 2);
        let revoked = listed.iter().find(|t| t.id == strict.id).unwrap();
        assert!(revoked.revoked && revoked.enrolled == 1);
    }

    #[test]
    fn credentials_are_stored_hashed_revocation_refuses_and_events_are_taken_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleet.db");
        let db = ServerDb::open(&path).unwrap();
        let token = token(&db, None, None);
        let a = db.enroll(&token, &request("a"), 0).unwrap();
        let b = db.enroll(&token, &request("b"), 0).unwrap();
        assert_eq!(a.credential.len(), 43, "256 bits in base64url");
        assert_eq!(
            db.authenticate(&a.credential, 5).unwrap(),
            Some(a.device_id.clone())
        );
        assert_eq!(
            db.authenticate(&b.credential, 5).unwrap(),
            Some(b.device_id.clone())
        );
        let raw = std::fs::read(&path).unwrap();
        let needle = a.credential.as_bytes();
        assert!(
            !raw.windows(needle.len()).any(|w| w == needle),
            "the credential itself is not stored"
        );

        let accepted = db
            .record(&a.device_id, &[app_event("e1"), app_event("e2")], 6)
            .unwrap();
        assert_eq!(accepted, ["e1", "e2"]);
        db.record(&a.device_id, &[app_event("e2"), app_event("e3")], 7)
            .unwrap();
        assert_eq!(
            db.event_count(&a.device_id).unwrap(),
            3,
            "a replayed id is taken once"
        );
        assert_eq!(db.event_count(&b.device_id).unwrap(), 0);

        assert!(db.revoke(&a.device_id).unwrap());
        assert_eq!(db.authenticate(&a.credential, 8).unwrap(), None);
        let again = db.enroll(&token, &request("a"), 9).unwrap();
        assert_ne!(
            again.device_id, a.device_id,
            "a revoked name can enroll anew"
        );
    }
}
