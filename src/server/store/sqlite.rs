//! The SQLite engine: one file, the default for a single `flotilla-server`.

use rusqlite::types::{ToSqlOutput, ValueRef};

use super::{Conn, Dialect, Row, StoreError, Value};

pub struct SqliteConn {
    conn: rusqlite::Connection,
}

impl SqliteConn {
    pub fn new(conn: rusqlite::Connection) -> SqliteConn {
        SqliteConn { conn }
    }

    /// The connection itself, for what only SQLite has (its migrations' `user_version`, query plans in tests).
    pub fn raw(&self) -> &rusqlite::Connection {
        &self.conn
    }
}

// While the fleet's queries move from rusqlite's API to `Conn`'s, code not moved yet reaches rusqlite through this.
impl std::ops::Deref for SqliteConn {
    type Target = rusqlite::Connection;
    fn deref(&self) -> &rusqlite::Connection {
        &self.conn
    }
}

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
