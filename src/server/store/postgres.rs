//! The PostgreSQL engine: one database shared by any number of `flotilla-server` replicas.
//!
//! [`Conn`] is sync and the client is async: a [`PgConn`] keeps the runtime's handle and blocks on each call. The
//! server calls `Conn` on tokio's blocking threads (`spawn_blocking`), where that is allowed; on an async worker
//! it would panic, as any blocking call there should. The runtime must be multi-threaded, since `Handle::block_on`
//! on a current-thread runtime does not drive its I/O.
//!
//! A transaction is `BEGIN` … `COMMIT` sent on one connection, so a [`PgConn`] holds one pooled connection for its
//! whole life; it goes back to the pool when dropped, and a connection the server closed is not handed out again.

use std::error::Error as StdError;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use tokio::runtime::Handle;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{FromSql, IsNull, ToSql, Type, to_sql_checked};

use super::dburl::PgUrl;
use super::pg_tls::tls_config;
use super::{Conn, Dialect, Row, StoreError, Value};

type BoxError = Box<dyn StdError + Sync + Send>;

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("cannot connect to the fleet database {url}: {}; {hint}", chain(.source))]
    Connect {
        url: String,
        source: tokio_postgres::Error,
        hint: &'static str,
    },
    #[error("the fleet database {url}: {}", chain(.source))]
    Statement {
        url: String,
        source: tokio_postgres::Error,
    },
    #[error(
        "no connection to the fleet database {url} came free within {secs} s: PostgreSQL is slow or unreachable, \
         or the pool is too small for the load"
    )]
    PoolTimeout { url: String, secs: u64 },
    #[error("the connection pool of the fleet database {url} is closed (the server is stopping)")]
    PoolClosed { url: String },
    #[error("TLS to the fleet database {url}: {reason}")]
    Tls { url: String, reason: String },
}

/// An error and every cause under it: tokio-postgres keeps the server's own message in the cause.
fn chain(e: &dyn StdError) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// Whether the server is gone or going (refused, closed, shut down, full), as opposed to refusing the request.
fn lost(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    if let Some(code) = e.code() {
        return [
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CRASH_SHUTDOWN,
            SqlState::CANNOT_CONNECT_NOW,
            SqlState::CONNECTION_EXCEPTION,
            SqlState::CONNECTION_FAILURE,
            SqlState::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
            SqlState::TOO_MANY_CONNECTIONS,
        ]
        .contains(code);
    }
    // A certificate refused is a configuration to fix, although it comes as an I/O error.
    if e.to_string().contains("TLS") {
        return false;
    }
    let mut cause = e.source();
    while let Some(c) = cause {
        if c.is::<std::io::Error>() {
            return true;
        }
        cause = c.source();
    }
    // A connect timeout carries no cause.
    e.to_string().starts_with("timeout")
}

impl PgError {
    /// The database cannot be reached now, and asking again later may work.
    pub fn unavailable(&self) -> bool {
        match self {
            PgError::Connect { source, .. } | PgError::Statement { source, .. } => lost(source),
            PgError::PoolTimeout { .. } | PgError::PoolClosed { .. } => true,
            PgError::Tls { .. } => false,
        }
    }

    /// PostgreSQL's code for the error (`23505` for a unique violation, …), when the server gave one.
    pub fn code(&self) -> Option<&SqlState> {
        match self {
            PgError::Connect { source, .. } | PgError::Statement { source, .. } => source.code(),
            _ => None,
        }
    }
}

/// What to check when a connection fails, by how it failed.
fn connect_hint(e: &tokio_postgres::Error) -> &'static str {
    match e.code() {
        Some(c)
            if *c == SqlState::INVALID_PASSWORD
                || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION =>
        {
            "check the user and password in the URL, and pg_hba.conf's line for this host"
        }
        Some(c) if *c == SqlState::INVALID_CATALOG_NAME => {
            "create the database (createdb -O USER DATABASE), or name the one that exists"
        }
        _ if e.to_string().contains("TLS") => {
            "the server's certificate did not pass the URL's sslmode: give the CA that signed it as \
             sslrootcert=FILE, and with verify-full connect by a name the certificate holds"
        }
        _ => {
            "check that PostgreSQL runs there and listens on that address and port (listen_addresses), that \
             pg_hba.conf lets this host in, and the URL's sslmode"
        }
    }
}

/// The fleet database's connection pool.
#[derive(Clone)]
pub struct PgPool {
    pool: Pool,
    handle: Handle,
    url: Arc<str>,
    wait: Duration,
    size: usize,
}

impl PgPool {
    /// Opens a pool of at most `size` connections, proves the URL with a first connection, and brings the schema
    /// up to date. Call it on a multi-threaded tokio runtime.
    pub async fn connect(url: &PgUrl, size: usize) -> Result<PgPool, StoreError> {
        let tls = tls_config(url)?;
        let manager = Manager::from_config(
            url.config(),
            tokio_postgres_rustls::MakeRustlsConnect::new(tls),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        // Waiting for a free connection is bounded too, so a stuck database turns into errors, not a pile of
        // blocked threads.
        let wait = url.connect_timeout + Duration::from_secs(5);
        let pool = Pool::builder(manager)
            .max_size(size.max(1))
            .wait_timeout(Some(wait))
            .create_timeout(Some(url.connect_timeout))
            .recycle_timeout(Some(url.connect_timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .expect("only a missing runtime fails the build, and one is given");
        let me = PgPool {
            pool,
            handle: Handle::current(),
            url: url.redacted.as_str().into(),
            wait,
            size: size.max(1),
        };
        let conn = me.conn_async().await?;
        match tokio::task::spawn_blocking(move || migrate_postgres(&conn)).await {
            Ok(migrated) => migrated?,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // Cancelled: the runtime is shutting down.
            Err(_) => {
                return Err(PgError::PoolClosed {
                    url: me.url.to_string(),
                }
                .into());
            }
        }
        Ok(me)
    }

    /// One connection, held until dropped. Call it off the async workers (see the module's note), and take one
    /// per unit of work (a request's queries): a connection held across an outage stays broken, while the pool
    /// hands out working ones as soon as the server is back.
    pub fn conn(&self) -> Result<PgConn, StoreError> {
        self.handle.block_on(self.conn_async())
    }

    /// [`PgPool::conn`] from async code; the connection itself is still used off the async workers.
    pub async fn conn_async(&self) -> Result<PgConn, StoreError> {
        let client = self.pool.get().await.map_err(|e| self.pool_error(e))?;
        Ok(PgConn {
            client,
            handle: self.handle.clone(),
            url: self.url.clone(),
        })
    }

    /// Connections it holds at most.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The URL, its password hidden.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn pool_error(&self, e: PoolError) -> StoreError {
        let url = self.url.to_string();
        StoreError::Postgres(match e {
            PoolError::Backend(source) => PgError::Connect {
                url,
                hint: connect_hint(&source),
                source,
            },
            PoolError::Timeout(_) => PgError::PoolTimeout {
                url,
                secs: self.wait.as_secs(),
            },
            PoolError::Closed | PoolError::NoRuntimeSpecified | PoolError::PostCreateHook(_) => {
                PgError::PoolClosed { url }
            }
        })
    }
}

/// One pooled connection to the fleet database.
pub struct PgConn {
    client: deadpool_postgres::Object,
    handle: Handle,
    url: Arc<str>,
}

impl PgConn {
    fn err(&self, source: tokio_postgres::Error) -> StoreError {
        StoreError::Postgres(PgError::Statement {
            url: self.url.to_string(),
            source,
        })
    }
}

impl Conn for PgConn {
    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }

    fn query(&self, sql: &str, args: &[Value]) -> Result<Vec<Row>, StoreError> {
        let sql = numbered(sql);
        let params: Vec<&(dyn ToSql + Sync)> = args.iter().map(|a| a as _).collect();
        let rows = self
            .handle
            .block_on(async {
                let stmt = self.client.prepare_cached(&sql).await?;
                self.client.query(&stmt, &params).await
            })
            .map_err(|e| self.err(e))?;
        rows.iter()
            .map(|r| {
                (0..r.len())
                    .map(|i| r.try_get::<_, Value>(i))
                    .collect::<Result<Vec<_>, _>>()
                    .map(Row)
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))
    }

    fn execute(&self, sql: &str, args: &[Value]) -> Result<u64, StoreError> {
        let sql = numbered(sql);
        let params: Vec<&(dyn ToSql + Sync)> = args.iter().map(|a| a as _).collect();
        self.handle
            .block_on(async {
                let stmt = self.client.prepare_cached(&sql).await?;
                self.client.execute(&stmt, &params).await
            })
            .map_err(|e| self.err(e))
    }

    fn batch(&self, sql: &str) -> Result<(), StoreError> {
        self.handle
            .block_on(self.client.batch_execute(sql))
            .map_err(|e| self.err(e))
    }
}

/// `?N` placeholders as PostgreSQL's `$N`. String literals, quoted identifiers, dollar-quoted bodies and comments
/// are copied as they are; a `?` followed by no digit stays (it is a jsonb operator on PostgreSQL).
pub fn numbered(sql: &str) -> String {
    let b = sql.as_bytes();
    let mut out = String::with_capacity(sql.len() + 8);
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80;
    let mut i = 0;
    // Every cut below falls on an ASCII byte, so each slice copied is whole UTF-8.
    let mut from = 0;
    while i < b.len() {
        match b[i] {
            q @ (b'\'' | b'"') => {
                let escapes = q == b'\''
                    && i > 0
                    && b[i - 1].eq_ignore_ascii_case(&b'e')
                    && (i < 2 || !ident(b[i - 2]));
                i += 1;
                while i < b.len() {
                    if escapes && b[i] == b'\\' {
                        i += 2;
                    } else if b[i] == q {
                        // A doubled quote is one quote inside; the loop goes on past it.
                        i += 1;
                        if i < b.len() && b[i] == q {
                            i += 1;
                        } else {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let mut depth = 0;
                while i < b.len() {
                    if b[i..].starts_with(b"/*") {
                        depth += 1;
                        i += 2;
                    } else if b[i..].starts_with(b"*/") {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
            }
            b'$' if i == 0 || !ident(b[i - 1]) => {
                // `$tag$ … $tag$`; `$1` is a parameter, since a tag cannot start with a digit.
                let tag_end = b[i + 1..]
                    .iter()
                    .position(|&c| !ident(c))
                    .map(|p| i + 1 + p);
                match tag_end {
                    Some(e) if b[e] == b'$' && !b.get(i + 1).is_some_and(u8::is_ascii_digit) => {
                        let tag = &b[i..=e];
                        let body = e + 1;
                        i = b[body..]
                            .windows(tag.len())
                            .position(|w| w == tag)
                            .map_or(b.len(), |p| body + p + tag.len());
                    }
                    _ => i += 1,
                }
            }
            b'?' if b.get(i + 1).is_some_and(u8::is_ascii_digit) => {
                out.push_str(&sql[from..i]);
                out.push('$');
                i += 1;
                from = i;
            }
            _ => i += 1,
        }
    }
    out.push_str(&sql[from.min(sql.len())..]);
    out
}

impl ToSql for Value {
    /// Writes the value as the type PostgreSQL inferred for the parameter: the fleet's values are few and loose
    /// (flags are integers, JSON is text), and the column decides.
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, BoxError> {
        let range = |what: &str| format!("{self} does not fit PostgreSQL's {what}");
        match (self, ty) {
            (Value::Null, _) => Ok(IsNull::Yes),
            (Value::Int(i), &Type::INT8) => i.to_sql(ty, out),
            (Value::Int(i), &Type::INT4) => i32::try_from(*i)
                .map_err(|_| range("integer (int4)"))?
                .to_sql(ty, out),
            (Value::Int(i), &Type::INT2) => i16::try_from(*i)
                .map_err(|_| range("smallint (int2)"))?
                .to_sql(ty, out),
            (Value::Int(i @ (0 | 1)), &Type::BOOL) => (*i == 1).to_sql(ty, out),
            // Precision lost above 2^53 is the query's asking: it compares with a float.
            (Value::Int(i), &Type::FLOAT8) => (*i as f64).to_sql(ty, out),
            (Value::Real(r), &Type::FLOAT8) => r.to_sql(ty, out),
            (Value::Real(r), &Type::FLOAT4) => (*r as f32).to_sql(ty, out),
            (Value::Text(s), &Type::JSON) => {
                out.put_slice(s.as_bytes());
                Ok(IsNull::No)
            }
            (Value::Text(s), &Type::JSONB) => {
                // jsonb's binary form is a version byte, then the text.
                out.put_u8(1);
                out.put_slice(s.as_bytes());
                Ok(IsNull::No)
            }
            (Value::Text(s), _) if <&str as ToSql>::accepts(ty) => s.as_str().to_sql(ty, out),
            (Value::Blob(b), &Type::BYTEA) => b.as_slice().to_sql(ty, out),
            _ => Err(format!(
                "{self} cannot be sent where PostgreSQL expects {ty}; write the parameter as \
                 CAST(?N AS BIGINT), CAST(?N AS TEXT) or the like, or pass the type the column holds"
            )
            .into()),
        }
    }

    fn accepts(_: &Type) -> bool {
        // Every type is tried, so a mismatch is reported by `to_sql` with what to change.
        true
    }

    to_sql_checked!();
}

impl<'a> FromSql<'a> for Value {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Value, BoxError> {
        Ok(match *ty {
            Type::INT8 => Value::Int(i64::from_sql(ty, raw)?),
            Type::INT4 => Value::Int(i32::from_sql(ty, raw)?.into()),
            Type::INT2 => Value::Int(i16::from_sql(ty, raw)?.into()),
            Type::OID => Value::Int(u32::from_sql(ty, raw)?.into()),
            // Booleans a query computes (EXISTS, comparisons) read as the fleet's flags.
            Type::BOOL => Value::Int(bool::from_sql(ty, raw)?.into()),
            Type::FLOAT8 => Value::Real(f64::from_sql(ty, raw)?),
            Type::FLOAT4 => Value::Real(f32::from_sql(ty, raw)?.into()),
            Type::BYTEA => Value::Blob(raw.to_vec()),
            Type::JSON => Value::Text(std::str::from_utf8(raw)?.to_string()),
            Type::JSONB => match raw.split_first() {
                Some((1, text)) => Value::Text(std::str::from_utf8(text)?.to_string()),
                _ => return Err("jsonb in a binary version other than 1".into()),
            },
            Type::NUMERIC => {
                return Err("the column is NUMERIC (as sum() and avg() give on PostgreSQL), which flotilla \
                            does not read: cast it in the SQL, CAST(sum(x) AS BIGINT) or \
                            CAST(avg(x) AS DOUBLE PRECISION)"
                    .into());
            }
            _ if <String as FromSql>::accepts(ty) => Value::Text(String::from_sql(ty, raw)?),
            _ => {
                return Err(format!(
                    "the column's type {ty} has no flotilla value; cast it to BIGINT, TEXT, \
                     DOUBLE PRECISION or BYTEA in the SQL"
                )
                .into());
            }
        })
    }

    fn from_sql_null(_: &Type) -> Result<Value, BoxError> {
        Ok(Value::Null)
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

/// The key of the advisory lock that the replicas' migrations take: "flotilla" in ASCII. Whoever holds it (a restore
/// in progress) holds every replica's start.
pub const MIGRATION_LOCK: i64 = 0x666c_6f74_696c_6c61;

/// Brings the schema up to the last step of `pg_schema::SCHEMA`, in one transaction under an advisory lock:
/// replicas starting together wait for each other, and the later ones find nothing left to do.
pub fn migrate_postgres(conn: &dyn Conn) -> Result<(), StoreError> {
    use super::ConnExt;
    let steps = super::pg_schema::SCHEMA;
    let tx = conn.begin()?;
    tx.batch(&format!(
        "SELECT pg_advisory_xact_lock({MIGRATION_LOCK});
         CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)"
    ))?;
    let found = match tx.row("SELECT version FROM schema_version", &[], |r| {
        r.get::<u64>(0)
    })? {
        Some(v) => v,
        None => {
            tx.execute("INSERT INTO schema_version (version) VALUES (0)", &[])?;
            0
        }
    };
    let known = steps.len() as u64;
    if found > known {
        return Err(StoreError::TooNew { found, known });
    }
    for step in steps.iter().skip(found as usize) {
        tx.batch(step)?;
    }
    tx.execute(
        "UPDATE schema_version SET version = ?1",
        crate::args![known],
    )?;
    tx.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_renumbered_outside_quotes_and_comments() {
        assert_eq!(
            numbered("SELECT a FROM t WHERE a = ?1 AND b IN (?2,?10)"),
            "SELECT a FROM t WHERE a = $1 AND b IN ($2,$10)"
        );
        assert_eq!(
            numbered("SELECT '?1', 'it''s ?2', \"?3\"\"x\", ?4 -- ?5\n, ?6"),
            "SELECT '?1', 'it''s ?2', \"?3\"\"x\", $4 -- ?5\n, $6"
        );
        assert_eq!(
            numbered("/* ?1 /* ?2 */ ?3 */ ?4 E'\\' ?5' e'?6' ?7"),
            "/* ?1 /* ?2 */ ?3 */ $4 E'\\' ?5' e'?6' $7"
        );
        assert_eq!(
            numbered("SELECT $$ ?1 $$, $t$ ?2 $ ?3 $t$, $1, a$b, ?4"),
            "SELECT $$ ?1 $$, $t$ ?2 $ ?3 $t$, $1, a$b, $4"
        );
        assert_eq!(
            numbered("SELECT tags::jsonb ? 'k', tags::jsonb ?| ?1, 'é' || ?2"),
            "SELECT tags::jsonb ? 'k', tags::jsonb ?| $1, 'é' || $2"
        );
        assert_eq!(
            numbered("SELECT 'unterminated ?1"),
            "SELECT 'unterminated ?1"
        );
        assert_eq!(numbered("SELECT ?"), "SELECT ?");
        assert_eq!(numbered("?1"), "$1");
    }

    #[test]
    fn values_are_written_as_the_parameter_type_asks() {
        let mut out = BytesMut::new();
        let mut put = |v: Value, ty: Type| {
            out.clear();
            v.to_sql_checked(&ty, &mut out)
                .map(|n| (matches!(n, IsNull::Yes), out.to_vec()))
                .map_err(|e| e.to_string())
        };
        assert_eq!(
            put(Value::Int(7), Type::INT8).unwrap().1,
            7i64.to_be_bytes()
        );
        assert_eq!(
            put(Value::Int(7), Type::INT4).unwrap().1,
            7i32.to_be_bytes()
        );
        assert!(put(Value::Int(1 << 40), Type::INT4).is_err());
        assert_eq!(put(Value::Int(1), Type::BOOL).unwrap().1, [1]);
        assert!(put(Value::Int(2), Type::BOOL).is_err(), "flags are 0 or 1");
        assert_eq!(
            put(Value::Text("{}".into()), Type::JSONB).unwrap().1,
            b"\x01{}"
        );
        assert_eq!(put(Value::Text("x".into()), Type::VARCHAR).unwrap().1, b"x");
        assert!(put(Value::Null, Type::INT8).unwrap().0);
        let err = put(Value::Text("x".into()), Type::INT8).unwrap_err();
        assert!(err.contains("CAST(?N AS"), "{err}");
        assert!(put(Value::Int(1), Type::TEXT).is_err());
    }

    #[test]
    fn columns_are_read_into_the_fleet_values() {
        assert_eq!(Value::from_sql(&Type::BOOL, &[1]).unwrap(), Value::Int(1));
        assert_eq!(
            Value::from_sql(&Type::INT2, &(-3i16).to_be_bytes()).unwrap(),
            Value::Int(-3)
        );
        assert_eq!(
            Value::from_sql(&Type::JSONB, b"\x01[1]").unwrap(),
            Value::Text("[1]".into())
        );
        let err = Value::from_sql(&Type::NUMERIC, &[0; 8]).unwrap_err();
        assert!(err.to_string().contains("CAST(sum(x) AS BIGINT)"), "{err}");
    }
}
