//! The fleet's database as one server process holds it: SQLite's one writer and its readers, or a pool of
//! PostgreSQL connections shared by any number of replicas. There is no lock around the whole database: SQLite
//! has one writer, which its connection's mutex orders, while reads go on beside it on connections of their own
//! (WAL); PostgreSQL orders what it must itself (row locks, the driver's advisory locks).
//!
//! Both are sync, for the blocking threads the server runs storage work on (`Server::with_db`).

use std::sync::{Arc, Mutex};

use super::dburl::{DbUrl, PgUrl};
use super::news::{News, Seen};
use super::postgres::PgPool;
use super::{ServerDb, ServerDbError};

/// SQLite readers kept open between reads; more are opened when more reads run at once, and closed after.
const IDLE_READERS: usize = 8;

pub struct Database {
    engine: Engine,
    news: Arc<News>,
}

enum Engine {
    Sqlite {
        writer: Mutex<ServerDb>,
        readers: Mutex<Vec<ServerDb>>,
        /// The news writer's own connection, so a flush does not hold the writer's lock while it writes.
        flusher: Mutex<Option<ServerDb>>,
    },
    Postgres(PgPool, PgUrl),
}

impl From<ServerDb> for Database {
    /// A SQLite database opened by [`ServerDb::open`]: its connection becomes the writer.
    fn from(db: ServerDb) -> Database {
        let news = db.news.clone();
        Database {
            engine: Engine::Sqlite {
                writer: Mutex::new(db),
                readers: Mutex::default(),
                flusher: Mutex::default(),
            },
            news,
        }
    }
}

impl Database {
    /// Opens the database `--db` names, made and migrated when needed. PostgreSQL's pool holds at most
    /// `connections`; call this on a multi-threaded tokio runtime.
    pub async fn open(url: &DbUrl, connections: usize) -> Result<Database, ServerDbError> {
        match url {
            DbUrl::Sqlite(path) => {
                let path = path.clone();
                let db = tokio::task::spawn_blocking(move || ServerDb::open(&path))
                    .await
                    .map_err(|e| ServerDbError::Invalid(format!("opening the database: {e}")))??;
                Ok(Database::from(db))
            }
            DbUrl::Postgres(pg) => {
                let pool = PgPool::connect(pg, connections)
                    .await
                    .map_err(ServerDbError::Open)?;
                Ok(Database {
                    engine: Engine::Postgres(pool, pg.clone()),
                    news: Arc::default(),
                })
            }
        }
    }

    /// Runs `f` where it may write: SQLite's writer, or a pooled PostgreSQL connection.
    pub fn write<T>(
        &self,
        f: impl FnOnce(&ServerDb) -> Result<T, ServerDbError>,
    ) -> Result<T, ServerDbError> {
        match &self.engine {
            Engine::Sqlite { writer, .. } => f(&writer.lock().unwrap_or_else(|e| e.into_inner())),
            Engine::Postgres(pool, _) => f(&self.pooled(pool)?),
        }
    }

    /// Runs a read that must not wait for SQLite's writer: on a reader of its own, which sees what is committed.
    /// The news kept in memory is shared, so what it says of `last_seen` is as fresh as the writer's.
    pub fn read<T>(
        &self,
        f: impl FnOnce(&ServerDb) -> Result<T, ServerDbError>,
    ) -> Result<T, ServerDbError> {
        match &self.engine {
            Engine::Sqlite {
                writer, readers, ..
            } => {
                let idle = readers.lock().unwrap_or_else(|e| e.into_inner()).pop();
                let reader = match idle {
                    Some(r) => r,
                    None => {
                        let sibling = writer.lock().unwrap_or_else(|e| e.into_inner()).sibling()?;
                        match sibling {
                            Some(r) => r,
                            // An in-memory or borrowed connection has no file to open again: read on the writer.
                            None => return self.write(f),
                        }
                    }
                };
                let out = f(&reader);
                let mut idle = readers.lock().unwrap_or_else(|e| e.into_inner());
                if idle.len() < IDLE_READERS {
                    idle.push(reader);
                }
                out
            }
            Engine::Postgres(pool, _) => f(&self.pooled(pool)?),
        }
    }

    /// Writes a batch of devices' news in one transaction, on a connection other than SQLite's writer.
    pub(crate) fn write_news(&self, batch: &[(String, Seen)]) -> Result<(), ServerDbError> {
        match &self.engine {
            Engine::Sqlite {
                writer, flusher, ..
            } => {
                let mut flusher = flusher.lock().unwrap_or_else(|e| e.into_inner());
                if flusher.is_none() {
                    let sibling = writer.lock().unwrap_or_else(|e| e.into_inner()).sibling()?;
                    match sibling {
                        Some(db) => *flusher = Some(db),
                        None => {
                            return writer
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .write_news(batch);
                        }
                    }
                }
                match flusher.as_mut() {
                    Some(w) => w.write_news(batch),
                    None => Ok(()),
                }
            }
            Engine::Postgres(pool, _) => self.pooled(pool)?.write_news(batch),
        }
    }

    /// What this process keeps in memory until it is written.
    pub(crate) fn news(&self) -> &News {
        &self.news
    }

    /// The PostgreSQL database's URL, for a connection of its own (LISTEN); none on SQLite.
    pub fn postgres(&self) -> Option<&PgUrl> {
        match &self.engine {
            Engine::Sqlite { .. } => None,
            Engine::Postgres(_, url) => Some(url),
        }
    }

    fn pooled(&self, pool: &PgPool) -> Result<ServerDb, ServerDbError> {
        let conn = pool.conn().map_err(|source| ServerDbError::Store {
            place: pool.url().to_string(),
            source,
        })?;
        Ok(ServerDb::on(
            Box::new(conn),
            pool.url().to_string(),
            self.news.clone(),
        ))
    }
}
