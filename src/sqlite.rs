//! Schema migrations for the agent's and the server's SQLite files. `PRAGMA user_version` counts the steps applied;
//! each step runs in its own transaction with the version bump, so a crash leaves the file at a step boundary.

use rusqlite::Connection;

pub enum MigrateError {
    Sqlite(rusqlite::Error),
    /// The file was written by a newer flotilla.
    TooNew {
        found: usize,
        known: usize,
    },
}

impl From<rusqlite::Error> for MigrateError {
    fn from(e: rusqlite::Error) -> MigrateError {
        MigrateError::Sqlite(e)
    }
}

/// Applies the steps of `schema` the file lacks.
pub fn migrate(conn: &Connection, schema: &[&str]) -> Result<(), MigrateError> {
    let version: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > schema.len() {
        return Err(MigrateError::TooNew {
            found: version,
            known: schema.len(),
        });
    }
    for (i, sql) in schema.iter().enumerate().skip(version) {
        let tx = conn.unchecked_transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i + 1)?;
        tx.commit()?;
    }
    Ok(())
}
