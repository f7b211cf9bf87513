//! The fleet's database as one server process holds it: SQLite's one writer and its readers, or a pool of
//! PostgreSQL connections shared by any number of replicas. There is no lock around the whole database: SQLite
//! has one writer, which its connection's mutex orders, while reads go on beside it on connections of their own
//! (WAL); PostgreSQL orders what it must itself (row locks, the driver's advisory locks).
//!
//! Both are sync, for the blocking threads the server runs storage work on (`Server::with_db`).

use std::sync::{Arc, Condvar, Mutex};

use super::dburl::{DbUrl, PgUrl};
use super::news::{News, Seen};
use super::postgres::PgPool;
use super::{ServerDb, ServerDbError};

/// SQLite readers open at most: more reads at once wait for one (10,000 long polls woken together would otherwise
/// open a connection, and its page cache, per blocking thread).
const READERS: usize = 8;

pub struct Database {
    engine: Engine,
    news: Arc<News>,
}

enum Engine {
    Sqlite {
        writer: Mutex<ServerDb>,
        readers: Readers,
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
                readers: Readers::default(),
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
                let reader = match readers.take() {
                    Some(r) => r,
                    None => {
                        let sibling = writer.lock().unwrap_or_else(|e| e.into_inner()).sibling();
                        match sibling {
                            Ok(Some(r)) => r,
                            Ok(None) => {
                                readers.give_back(None);
                                // An in-memory or borrowed connection has no file to open again: read on the writer.
                                return self.write(f);
                            }
                            Err(e) => {
                                readers.give_back(None);
                                return Err(e);
                            }
                        }
                    }
                };
                let out = f(&reader);
                readers.give_back(Some(reader));
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

    /// How many reads can run at once: SQLite's readers, or PostgreSQL's pool.
    pub fn readers(&self) -> usize {
        match &self.engine {
            Engine::Sqlite { .. } => READERS,
            Engine::Postgres(pool, _) => pool.size(),
        }
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

/// SQLite's readers: the idle ones, and how many are open in all.
#[derive(Default)]
struct Readers {
    state: Mutex<(Vec<ServerDb>, usize)>,
    freed: Condvar,
}

impl Readers {
    /// An idle reader, or `None` when the caller may open one (counted as open from now); waits while [`READERS`]
    /// are busy.
    fn take(&self) -> Option<ServerDb> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(r) = state.0.pop() {
                return Some(r);
            }
            if state.1 < READERS {
                state.1 += 1;
                return None;
            }
            state = self.freed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Returns a reader after use, or the place of one that could not be opened.
    fn give_back(&self, reader: Option<ServerDb>) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match reader {
            Some(r) => state.0.push(r),
            None => state.1 -= 1,
        }
        self.freed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[test]
    fn reads_at_once_share_at_most_the_readers_there_are() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Database::from(
            ServerDb::open(&dir.path().join("fleet.db")).unwrap(),
        ));
        let busy = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..32)
            .map(|_| {
                let (db, busy, most) = (db.clone(), busy.clone(), most.clone());
                std::thread::spawn(move || {
                    db.read(|r| {
                        let now = busy.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        std::thread::sleep(std::time::Duration::from_millis(20));
                        busy.fetch_sub(1, Ordering::SeqCst);
                        r.write_stats();
                        Ok(())
                    })
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap().unwrap();
        }
        let most = most.load(Ordering::SeqCst);
        assert!(most > 1, "reads ran one at a time");
        assert!(most <= READERS, "{most} readers at once");
        let Engine::Sqlite { readers, .. } = &db.engine else {
            unreachable!("a SQLite database")
        };
        let state = readers.state.lock().unwrap();
        assert_eq!(state.0.len(), state.1, "every reader opened is idle again");
    }
}
