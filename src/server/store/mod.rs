//! The fleet server's storage engines: SQLite (one file, the default) and PostgreSQL (for several replicas).
//!
//! The fleet's queries are written once, in SQL both engines run, against [`Conn`]. Two copies of every query, one
//! per engine, would drift apart with only the conformance tests holding them together. What the engines spell
//! differently is asked of [`Dialect`]. Placeholders are written `?1`, `?2`… as SQLite reads them; the PostgreSQL
//! connection renumbers them `$1`, `$2`….
//!
//! A [`Conn`] is sync: the server runs storage work on blocking threads, as it always has, so one request's
//! queries read as straight-line code on either engine.

mod apps;
mod database;
mod db;
pub mod dburl;
mod devices;
mod news;
pub mod notify;
mod pg_schema;
mod pg_tls;
pub mod postgres;
mod rollouts;
pub mod sqlite;
mod tokens;

pub use database::Database;
pub use db::{ServerDb, ServerDbError};
pub use news::{News, SAMPLE_EVERY_SECS, SAMPLES_KEPT_SECS, WriteStats};
pub use tokens::{hash_secret, new_secret};

pub use dburl::DbUrl;
pub use postgres::{PgConn, PgError, PgPool, migrate_postgres};

use std::fmt;

/// A value bound to a query or read from a row. Integers are 64-bit on both engines; flags are 0 and 1.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

/// One row of a result, its columns in the order the query named them.
#[derive(Debug, Clone, Default)]
pub struct Row(pub(crate) Vec<Value>);

/// What a column could not be read as.
#[derive(Debug, thiserror::Error)]
#[error("column {index} holds {found}, not {wanted}")]
pub struct TypeError {
    pub index: usize,
    pub found: String,
    pub wanted: &'static str,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error(transparent)]
    Type(#[from] TypeError),
    #[error(transparent)]
    Postgres(#[from] PgError),
    #[error(
        "the fleet database has schema version {found}, newer than this flotilla-server knows ({known}): run the \
         newer flotilla-server, or restore the backup taken before it"
    )]
    TooNew { found: u64, known: u64 },
}

impl StoreError {
    /// The database cannot be reached now (refused, closed, shutting down, no free connection): the API answers
    /// 503 with Retry-After, and asking again later may work.
    pub fn unavailable(&self) -> bool {
        match self {
            StoreError::Postgres(e) => e.unavailable(),
            // A busy SQLite file is waited for (busy_timeout), and it cannot go away.
            StoreError::Sqlite(_) | StoreError::Type(_) | StoreError::TooNew { .. } => false,
        }
    }
}

/// Where the engines' SQL differs. Everything else in the fleet's queries is written once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// The text at `path` (object keys; array indexes as numbers) of the JSON held in the text column `expr`, or
    /// NULL. Numbers come back as text on PostgreSQL: compare with text, or cast.
    pub fn json_text(self, expr: &str, path: &[&str]) -> String {
        match self {
            Dialect::Sqlite => format!("json_extract({expr}, '{}')", sqlite_json_path(path)),
            Dialect::Postgres => format!("(({expr})::jsonb #>> '{{{}}}')", path.join(",")),
        }
    }

    /// The larger of two values.
    pub fn greatest(self, a: &str, b: &str) -> String {
        match self {
            Dialect::Sqlite => format!("max({a}, {b})"),
            Dialect::Postgres => format!("greatest({a}, {b})"),
        }
    }

    // The dashboard's and /metrics' JSON: keys chosen at run time, arrays and objects read as rows.

    /// The text under the key that the text parameter `key` (`?3`) names, in the JSON object held in `expr`: for
    /// a key the operator chose, which the statement's text cannot spell. SQLite reads the key inside a JSON
    /// path, so it must hold no `"`.
    pub fn json_key_text(self, expr: &str, key: &str) -> String {
        match self {
            Dialect::Sqlite => format!("json_extract({expr}, '$.\"' || {key} || '\"')"),
            Dialect::Postgres => format!("(({expr})::jsonb ->> CAST({key} AS TEXT))"),
        }
    }

    /// The length of the array at `path` in the JSON held in `expr`, as an integer; 0 when there is none there.
    pub fn json_array_len(self, expr: &str, path: &[&str]) -> String {
        match self {
            Dialect::Sqlite => format!(
                "coalesce(json_array_length({expr}, '{}'), 0)",
                sqlite_json_path(path)
            ),
            Dialect::Postgres => {
                let at = pg_json_at(expr, path);
                format!(
                    "(CASE WHEN jsonb_typeof({at}) = 'array' THEN CAST(jsonb_array_length({at}) AS BIGINT) ELSE 0 END)"
                )
            }
        }
    }

    /// A FROM item named `alias` with a row per element of the array at `path` in the JSON held in `expr` (none
    /// when there is none there): `alias.key` is the element's index from 0, `alias.value` the element, for
    /// [`Dialect::json_text`] and the like. `expr` may name columns of the FROM items before it.
    pub fn json_elements(self, expr: &str, path: &[&str], alias: &str) -> String {
        match self {
            Dialect::Sqlite => {
                format!("json_each({expr}, '{}') AS {alias}", sqlite_json_path(path))
            }
            Dialect::Postgres => {
                let at = pg_json_at(expr, path);
                format!(
                    "LATERAL (SELECT {alias}_e.value, {alias}_e.n - 1 AS key
                                FROM jsonb_array_elements(CASE WHEN jsonb_typeof({at}) = 'array' THEN {at} END)
                                     WITH ORDINALITY AS {alias}_e(value, n)) AS {alias}"
                )
            }
        }
    }

    /// A FROM item named `alias` with a row per member of the object at `path` in the JSON held in `expr` (none
    /// when there is none there): `alias.key` is the member's name, `alias.value` its value as text when it is a
    /// string. `expr` may name columns of the FROM items before it.
    pub fn json_members(self, expr: &str, path: &[&str], alias: &str) -> String {
        match self {
            Dialect::Sqlite => {
                format!("json_each({expr}, '{}') AS {alias}", sqlite_json_path(path))
            }
            Dialect::Postgres => {
                let at = pg_json_at(expr, path);
                format!(
                    "jsonb_each_text(CASE WHEN jsonb_typeof({at}) = 'object' THEN {at} END) AS {alias}(key, value)"
                )
            }
        }
    }

    /// Whether `expr` matches the LIKE `pattern` ignoring ASCII case, with `\` escaping `%` and `_`. SQLite's LIKE
    /// ignores ASCII case already, and is twice as fast over 100,000 names as `lower(a) LIKE lower(b)`.
    pub fn like_ignoring_case(self, expr: &str, pattern: &str) -> String {
        match self {
            Dialect::Sqlite => format!("{expr} LIKE {pattern} ESCAPE '\\'"),
            Dialect::Postgres => format!("{expr} ILIKE {pattern} ESCAPE '\\'"),
        }
    }

    /// An aggregate: the text of a JSON array holding, per row of the group, the JSON array of `items`; `[]` for
    /// no rows.
    pub fn json_agg_arrays(self, items: &[&str]) -> String {
        match self {
            Dialect::Sqlite => format!("json_group_array(json_array({}))", items.join(", ")),
            Dialect::Postgres => format!(
                "coalesce(CAST(json_agg(json_build_array({})) AS TEXT), '[]')",
                items.join(", ")
            ),
        }
    }
}

/// A path as SQLite's JSON functions take it: `$.candidates[0]`.
fn sqlite_json_path(path: &[&str]) -> String {
    let mut p = String::from("$");
    for k in path {
        if k.bytes().all(|b| b.is_ascii_digit()) {
            p.push_str(&format!("[{k}]"));
        } else {
            p.push('.');
            p.push_str(k);
        }
    }
    p
}

/// The JSON value at `path` in the text column `expr`, as PostgreSQL's `jsonb` (NULL when there is none).
fn pg_json_at(expr: &str, path: &[&str]) -> String {
    format!("(({expr})::jsonb #> '{{{}}}')", path.join(","))
}

/// One connection to the fleet's database. Statements are cached per connection by their text.
pub trait Conn: Send {
    fn dialect(&self) -> Dialect;
    /// Every row the statement gives.
    fn query(&self, sql: &str, args: &[Value]) -> Result<Vec<Row>, StoreError>;
    /// Runs a statement; how many rows it changed.
    fn execute(&self, sql: &str, args: &[Value]) -> Result<u64, StoreError>;
    /// Runs statements separated by `;`, with no arguments (migrations, BEGIN and COMMIT).
    fn batch(&self, sql: &str) -> Result<(), StoreError>;
}

/// Reading helpers for every connection.
pub trait ConnExt: Conn {
    /// The first row, read by `f`, or `None` when there is none.
    fn row<T>(
        &self,
        sql: &str,
        args: &[Value],
        f: impl FnOnce(&Row) -> Result<T, StoreError>,
    ) -> Result<Option<T>, StoreError> {
        self.query(sql, args)?.first().map(f).transpose()
    }

    /// The first column of the first row: for `count(*)`, `EXISTS (…)` and the like, which always give one.
    fn one<T: FromValue>(&self, sql: &str, args: &[Value]) -> Result<T, StoreError> {
        let rows = self.query(sql, args)?;
        let first = rows.first().map(|r| r.0.first()).unwrap_or(None);
        T::from_value(first.unwrap_or(&Value::Null), 0).map_err(StoreError::from)
    }

    /// Every row, each read by `f`.
    fn rows<T>(
        &self,
        sql: &str,
        args: &[Value],
        f: impl FnMut(&Row) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        self.query(sql, args)?.iter().map(f).collect()
    }

    /// Starts a transaction, rolled back unless [`Tx::commit`] is called.
    fn begin(&self) -> Result<Tx<'_, Self>, StoreError> {
        self.batch("BEGIN")?;
        Ok(Tx {
            conn: self,
            open: true,
        })
    }
}

impl<C: Conn + ?Sized> ConnExt for C {}

// What the fleet store's own queries need of the dialect.
impl Dialect {
    /// What orders a table's rows oldest first when it is written in time order, for pruning a slice of its
    /// oldest rows without an index on the time: SQLite's rowid, which only grows. PostgreSQL reuses the space of
    /// deleted rows, so its physical order is no age: there it is the time column `at`, which it indexes.
    pub fn insertion_order(self, at: &str) -> String {
        match self {
            Dialect::Sqlite => "rowid".to_string(),
            Dialect::Postgres => at.to_string(),
        }
    }

    /// A query giving whether this transaction took the lock of the rollout whose id is the integer `id` (`?1`)
    /// until it ends, without waiting: false while another replica holds it to advance that rollout. `None` on
    /// SQLite, whose writers take turns anyway. Ids 2^31 apart share a key, which costs one of them a tick at worst.
    pub fn try_rollout_lock(self, id: &str) -> Option<String> {
        match self {
            Dialect::Sqlite => None,
            Dialect::Postgres => Some(format!(
                "SELECT pg_try_advisory_xact_lock({ROLLOUT_LOCK}, CAST(CAST({id} AS BIGINT) % 2147483648 AS INTEGER))"
            )),
        }
    }

    /// A statement that makes this transaction the only writer of `table` until it ends, for a check-then-insert
    /// that replicas may race (the first admin token). `None` on SQLite, whose one writer is the server's own.
    pub fn lock_for_writing(self, table: &str) -> Option<String> {
        match self {
            Dialect::Sqlite => None,
            Dialect::Postgres => Some(format!("LOCK TABLE {table} IN SHARE ROW EXCLUSIVE MODE")),
        }
    }
}

/// The class of the PostgreSQL advisory locks the rollout driver takes, one per rollout id: "roll" in ASCII. Locks
/// of two keys share none with the migrations' lock of one key.
pub const ROLLOUT_LOCK: i32 = 0x726f_6c6c;

/// An open transaction on a connection: rolled back when dropped uncommitted, as on an early `?`.
pub struct Tx<'c, C: Conn + ?Sized> {
    conn: &'c C,
    open: bool,
}

impl<C: Conn + ?Sized> Tx<'_, C> {
    pub fn commit(mut self) -> Result<(), StoreError> {
        self.open = false;
        self.conn.batch("COMMIT")
    }
}

impl<C: Conn + ?Sized> std::ops::Deref for Tx<'_, C> {
    type Target = C;
    fn deref(&self) -> &Self::Target {
        self.conn
    }
}

impl<C: Conn + ?Sized> Drop for Tx<'_, C> {
    fn drop(&mut self) {
        if self.open {
            // A failed rollback leaves nothing to undo: the connection's next BEGIN or its close ends it.
            let _ = self.conn.batch("ROLLBACK");
        }
    }
}

impl Row {
    pub fn get<T: FromValue>(&self, index: usize) -> Result<T, StoreError> {
        T::from_value(self.0.get(index).unwrap_or(&Value::Null), index).map_err(StoreError::from)
    }

    /// The row's first columns as a tuple, in order: `conn.rows(sql, args, Row::read::<(String, u64)>)`.
    pub fn read<T: FromRow>(&self) -> Result<T, StoreError> {
        T::from_row(self)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => f.write_str("NULL"),
            Value::Int(i) => write!(f, "the integer {i}"),
            Value::Real(r) => write!(f, "the number {r}"),
            Value::Text(_) => f.write_str("text"),
            Value::Blob(b) => write!(f, "{} bytes", b.len()),
        }
    }
}

/// A tuple of columns a row can be read as ([`Row::read`]).
pub trait FromRow: Sized {
    fn from_row(row: &Row) -> Result<Self, StoreError>;
}

macro_rules! from_row {
    ($($t:ident $i:tt),+) => {
        impl<$($t: FromValue),+> FromRow for ($($t,)+) {
            fn from_row(row: &Row) -> Result<Self, StoreError> {
                Ok(($(row.get::<$t>($i)?,)+))
            }
        }
    };
}
from_row!(A 0, B 1);
from_row!(A 0, B 1, C 2);
from_row!(A 0, B 1, C 2, D 3);
from_row!(A 0, B 1, C 2, D 3, E 4);
from_row!(A 0, B 1, C 2, D 3, E 4, F 5);
from_row!(A 0, B 1, C 2, D 3, E 4, F 5, G 6);
from_row!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7);
from_row!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8);
from_row!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9);
from_row!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9, K 10);
from_row!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9, K 10, L 11);

/// A type a column can be read as.
pub trait FromValue: Sized {
    fn from_value(v: &Value, index: usize) -> Result<Self, TypeError>;
}

fn mismatch<T>(v: &Value, index: usize, wanted: &'static str) -> Result<T, TypeError> {
    Err(TypeError {
        index,
        found: v.to_string(),
        wanted,
    })
}

impl FromValue for Value {
    fn from_value(v: &Value, _: usize) -> Result<Self, TypeError> {
        Ok(v.clone())
    }
}

impl FromValue for i64 {
    fn from_value(v: &Value, index: usize) -> Result<Self, TypeError> {
        match v {
            Value::Int(i) => Ok(*i),
            _ => mismatch(v, index, "an integer"),
        }
    }
}

macro_rules! from_int {
    ($($t:ty),*) => {$(
        impl FromValue for $t {
            fn from_value(v: &Value, index: usize) -> Result<Self, TypeError> {
                match v {
                    Value::Int(i) => <$t>::try_from(*i).or_else(|_| mismatch(v, index, stringify!($t))),
                    _ => mismatch(v, index, stringify!($t)),
                }
            }
        }
    )*};
}
from_int!(u64, u32, i32, usize);

impl FromValue for bool {
    fn from_value(v: &Value, index: usize) -> Result<Self, TypeError> {
        match v {
            Value::Int(i) => Ok(*i != 0),
            _ => mismatch(v, index, "a flag"),
        }
    }
}

impl FromValue for f64 {
    fn from_value(v: &Value, index: usize) -> Result<Self, TypeError> {
        match v {
            Value::Real(r) => Ok(*r),
            // Precision lost above 2^53 is the caller's asking: it wanted a float.
            Value::Int(i) => Ok(*i as f64),
            _ => mismatch(v, index, "a number"),
        }
    }
}

impl FromValue for String {
    fn from_value(v: &Value, index: usize) -> Result<Self, TypeError> {
        match v {
            Value::Text(s) => Ok(s.clone()),
            _ => mismatch(v, index, "text"),
        }
    }
}

impl FromValue for Vec<u8> {
    fn from_value(v: &Value, index: usize) -> Result<Self, TypeError> {
        match v {
            Value::Blob(b) => Ok(b.clone()),
            _ => mismatch(v, index, "bytes"),
        }
    }
}

impl<T: FromValue> FromValue for Option<T> {
    fn from_value(v: &Value, index: usize) -> Result<Self, TypeError> {
        match v {
            Value::Null => Ok(None),
            _ => T::from_value(v, index).map(Some),
        }
    }
}

impl From<i64> for Value {
    fn from(v: i64) -> Value {
        Value::Int(v)
    }
}

impl From<u64> for Value {
    /// Saturates: the fleet's counts and seconds are far below 2^63, and a value above it is refused by the
    /// column's meaning, not its type.
    fn from(v: u64) -> Value {
        Value::Int(i64::try_from(v).unwrap_or(i64::MAX))
    }
}

impl From<usize> for Value {
    fn from(v: usize) -> Value {
        Value::from(v as u64)
    }
}

impl From<u32> for Value {
    fn from(v: u32) -> Value {
        Value::Int(i64::from(v))
    }
}

impl From<i32> for Value {
    fn from(v: i32) -> Value {
        Value::Int(i64::from(v))
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Value {
        Value::Int(i64::from(v))
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Value {
        Value::Real(v)
    }
}

impl From<String> for Value {
    fn from(v: String) -> Value {
        Value::Text(v)
    }
}

impl From<&String> for Value {
    fn from(v: &String) -> Value {
        Value::Text(v.clone())
    }
}

impl From<&str> for Value {
    fn from(v: &str) -> Value {
        Value::Text(v.to_string())
    }
}

impl From<Vec<u8>> for Value {
    fn from(v: Vec<u8>) -> Value {
        Value::Blob(v)
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Value {
        v.map_or(Value::Null, Into::into)
    }
}

/// The arguments of a query: `args![id, now]`.
#[macro_export]
macro_rules! args {
    () => { &[] as &[$crate::server::store::Value] };
    ($($v:expr),+ $(,)?) => { &[$($crate::server::store::Value::from($v)),+] };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_paths_are_spelled_for_each_engine() {
        let path = ["candidates", "0"];
        assert_eq!(
            Dialect::Sqlite.json_text("platform", &path),
            "json_extract(platform, '$.candidates[0]')"
        );
        assert_eq!(
            Dialect::Postgres.json_text("platform", &path),
            "((platform)::jsonb #>> '{candidates,0}')"
        );
    }

    // The dashboard's and /metrics' JSON, run on SQLite; PostgreSQL's spelling is checked for its shape here and
    // run by the conformance suite.

    fn sqlite_with_plan() -> sqlite::SqliteConn {
        let c = sqlite::SqliteConn::new(rusqlite::Connection::open_in_memory().unwrap());
        c.batch(
            r#"CREATE TABLE t (id INTEGER, doc TEXT);
               INSERT INTO t VALUES (1, '{"tags": {"site.a": "roof"}, "waves": [{"devices": ["a", "b"]}, {"devices": ["c"]}],
                                         "devices": {"a": "healthy", "c": "failed: x"}}');
               INSERT INTO t VALUES (2, '{"waves": {}}');
               INSERT INTO t VALUES (3, NULL);"#,
        )
        .unwrap();
        c
    }

    #[test]
    fn a_key_chosen_at_run_time_is_read_whole() {
        let c = sqlite_with_plan();
        let sql = format!(
            "SELECT id FROM t WHERE {} = ?2",
            Dialect::Sqlite.json_key_text("json_extract(doc, '$.tags')", "?1")
        );
        let ids = c
            .rows(&sql, crate::args!["site.a", "roof"], |r| r.get::<i64>(0))
            .unwrap();
        assert_eq!(ids, vec![1], "a key with a dot is one key, not a path");
        assert_eq!(
            Dialect::Postgres.json_key_text("d.tags", "?4"),
            "((d.tags)::jsonb ->> CAST(?4 AS TEXT))"
        );
    }

    #[test]
    fn arrays_and_objects_are_read_as_rows() {
        let c = sqlite_with_plan();
        let d = Dialect::Sqlite;
        let sql = format!(
            "SELECT t.id, {},
                    (SELECT CAST(sum({}) AS BIGINT) FROM {} WHERE w.key < 1),
                    (SELECT {} FROM {} WHERE e.value LIKE 'failed%')
               FROM t ORDER BY t.id",
            d.json_array_len("t.doc", &["waves"]),
            d.json_array_len("w.value", &["devices"]),
            d.json_elements("t.doc", &["waves"], "w"),
            d.json_agg_arrays(&["e.key", "e.value"]),
            d.json_members("t.doc", &["devices"], "e"),
        );
        let rows = c
            .rows(&sql, &[], Row::read::<(i64, i64, Option<i64>, String)>)
            .unwrap();
        assert_eq!(
            rows,
            vec![
                (1, 2, Some(2), r#"[["c","failed: x"]]"#.to_string()),
                (2, 0, None, "[]".to_string()),
                (3, 0, None, "[]".to_string()),
            ]
        );
        let pg = Dialect::Postgres;
        assert_eq!(
            pg.json_array_len("r.plan", &["waves"]),
            "(CASE WHEN jsonb_typeof(((r.plan)::jsonb #> '{waves}')) = 'array' \
             THEN CAST(jsonb_array_length(((r.plan)::jsonb #> '{waves}')) AS BIGINT) ELSE 0 END)"
        );
        assert!(
            pg.json_elements("r.plan", &["waves"], "w")
                .starts_with("LATERAL (SELECT w_e.value, w_e.n - 1 AS key")
        );
        assert!(
            pg.json_members("r.plan", &["devices"], "e")
                .ends_with(" AS e(key, value)")
        );
        assert_eq!(
            pg.json_agg_arrays(&["a", "b"]),
            "coalesce(CAST(json_agg(json_build_array(a, b)) AS TEXT), '[]')"
        );
    }

    #[test]
    fn like_ignores_case_and_takes_escaped_wildcards_literally() {
        let c = sqlite_with_plan();
        let sql = format!(
            "SELECT count(*) FROM (SELECT 'Dev_1' AS n UNION ALL SELECT 'devX1') WHERE {}",
            Dialect::Sqlite.like_ignoring_case("n", "?1")
        );
        assert_eq!(c.one::<i64>(&sql, crate::args!["%DEV\\_1%"]).unwrap(), 1);
        assert_eq!(c.one::<i64>(&sql, crate::args!["%dev_1%"]).unwrap(), 2);
        assert_eq!(
            Dialect::Postgres.like_ignoring_case("d.name", "?2"),
            "d.name ILIKE ?2 ESCAPE '\\'"
        );
    }

    #[test]
    fn the_oldest_rows_are_found_by_each_engines_own_order() {
        assert_eq!(Dialect::Sqlite.insertion_order("at"), "rowid");
        assert_eq!(Dialect::Postgres.insertion_order("at"), "at");
    }

    #[test]
    fn only_postgresql_locks_a_rollout_and_by_two_keys() {
        assert_eq!(Dialect::Sqlite.try_rollout_lock("?1"), None);
        let sql = Dialect::Postgres.try_rollout_lock("?1").unwrap();
        assert_eq!(
            sql,
            "SELECT pg_try_advisory_xact_lock(1919904876, CAST(CAST(?1 AS BIGINT) % 2147483648 AS INTEGER))"
        );
        assert_eq!(ROLLOUT_LOCK.to_be_bytes(), *b"roll");
    }

    #[test]
    fn columns_are_read_only_as_what_they_hold() {
        let row = Row(vec![Value::Int(-1), Value::Null, Value::Text("x".into())]);
        assert_eq!(row.get::<i64>(0).unwrap(), -1);
        assert!(row.get::<u64>(0).is_err(), "a negative count is damage");
        assert_eq!(row.get::<Option<String>>(1).unwrap(), None);
        assert!(row.get::<String>(1).is_err());
        assert_eq!(row.get::<String>(2).unwrap(), "x");
        assert!(row.get::<i64>(2).is_err());
        assert!(
            row.get::<i64>(7).is_err(),
            "a column past the end reads as NULL"
        );
    }
}
