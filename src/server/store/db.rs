//! The fleet's database as the server holds it: one connection, its errors, and what is kept in memory between
//! flushes. The queries live beside it by concern (tokens, devices, apps, rollouts, news).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::StoreError;
use super::news::News;
use super::sqlite::SqliteConn;

#[derive(Debug, thiserror::Error)]
pub enum ServerDbError {
    #[error("the fleet database {place}: {source}")]
    Store { place: String, source: StoreError },
    /// PostgreSQL could not be reached or set up at start; its message names the URL (without its password).
    #[error(transparent)]
    Open(StoreError),
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
    pub(crate) conn: Box<dyn super::Conn>,
    /// What errors name the database by: its file.
    pub(super) place: String,
    /// The SQLite file, for another connection to it; none on PostgreSQL.
    path: Option<PathBuf>,
    /// What devices' requests said of them since the last flush, shared by every connection of this process.
    pub(crate) news: Arc<News>,
}

impl ServerDb {
    pub fn open(path: &Path) -> Result<ServerDb, ServerDbError> {
        let place = path.display().to_string();
        let err = |source: rusqlite::Error| ServerDbError::Store {
            place: place.clone(),
            source: source.into(),
        };
        let conn = SqliteConn::open(path).map_err(err)?;
        // SQLite's own migrations, counted by its `user_version`, before the connection serves any query.
        crate::sqlite::migrate(conn.raw(), super::sqlite::SCHEMA).map_err(|e| match e {
            crate::sqlite::MigrateError::Sqlite(source) => err(source),
            crate::sqlite::MigrateError::TooNew { found, known } => ServerDbError::TooNew {
                path: path.to_path_buf(),
                found,
                known,
            },
        })?;
        Ok(ServerDb {
            conn: Box::new(conn),
            place,
            path: Some(path.to_path_buf()),
            news: Arc::default(),
        })
    }

    /// The fleet's storage on a connection whose schema is migrated already, as a PostgreSQL pool's are when it
    /// connects. `place` names the database in errors (a URL without its password); `news` is shared with the
    /// process's other connections.
    pub fn on(conn: Box<dyn super::Conn>, place: String, news: Arc<News>) -> ServerDb {
        ServerDb {
            conn,
            place,
            path: None,
            news,
        }
    }

    /// Another connection to the same SQLite file, sharing this one's news: a reader, or the news writer's.
    pub(crate) fn sibling(&self) -> Result<Option<ServerDb>, ServerDbError> {
        let Some(path) = &self.path else {
            return Ok(None);
        };
        let conn = SqliteConn::open(path).map_err(self.err())?;
        Ok(Some(ServerDb {
            conn: Box::new(conn),
            place: self.place.clone(),
            path: Some(path.clone()),
            news: self.news.clone(),
        }))
    }

    /// Names the database in a storage error.
    pub(crate) fn err<E: Into<StoreError>>(&self) -> impl Fn(E) -> ServerDbError + '_ {
        move |source| ServerDbError::Store {
            place: self.place.clone(),
            source: source.into(),
        }
    }
}

pub(crate) fn to_json<T: serde::Serialize>(v: &T) -> Result<String, ServerDbError> {
    serde_json::to_string(v).map_err(|e| ServerDbError::Encode(e.to_string()))
}

pub(crate) fn from_json<T: serde::de::DeserializeOwned>(
    what: &str,
    text: &str,
) -> Result<T, ServerDbError> {
    serde_json::from_str(text).map_err(|e| ServerDbError::Damaged {
        what: what.to_string(),
        message: e.to_string(),
    })
}

/// What the store's tests share: a database in a temporary directory, a device's enrollment request, a token.
#[cfg(test)]
pub(crate) mod fixtures {
    use std::collections::BTreeMap;

    use super::ServerDb;
    use crate::fleet::{EnrollRequest, PlatformReport};

    pub(crate) fn open() -> (tempfile::TempDir, ServerDb) {
        let dir = tempfile::tempdir().unwrap();
        let db = ServerDb::open(&dir.path().join("fleet.db")).unwrap();
        (dir, db)
    }

    pub(crate) fn request(name: &str) -> EnrollRequest {
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

    pub(crate) fn token(db: &ServerDb, expires: Option<u64>, uses: Option<u32>) -> String {
        db.create_token(expires, uses, &BTreeMap::new(), false, 0)
            .unwrap()
            .token
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_that_cannot_be_opened_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing/fleet.db");
        let e = match ServerDb::open(&path) {
            Ok(_) => panic!("opened a file in a directory that does not exist"),
            Err(e) => e,
        };
        assert!(matches!(e, ServerDbError::Store { .. }), "{e:?}");
        let text = crate::error_chain(&e);
        assert!(
            text.starts_with(&format!("the fleet database {}: ", path.display())),
            "{text}"
        );
        assert!(text.contains("unable to open"), "{text}");
    }
}
