//! The `--db` value: a SQLite file (a plain path, or `sqlite:///abs/path`) or a PostgreSQL URL
//! (`postgres://user:pass@host:port/db?sslmode=…`).
//!
//! PostgreSQL's `sslmode` means what it means to libpq, so a URL that works with `psql` works here:
//! `disable` (plain), `prefer` (the default: TLS when the server offers it), `require` (TLS, the certificate is not
//! checked), `verify-ca` (the certificate chains to a trusted root) and `verify-full` (and names the host). With
//! `sslrootcert=FILE`, `prefer` and `require` check the chain against that file too, as libpq does. The trusted
//! roots are the system's (as for registries), or only that file's when it is given.
//!
//! The password never leaves this module in text: [`DbUrl`]'s `Display` shows `***` in its place.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use percent_encoding::percent_decode_str;

#[derive(Debug, thiserror::Error)]
pub enum DbUrlError {
    #[error(
        "the database URL {0} is not understood: write a SQLite path (/var/lib/flotilla-server/server.db or \
         sqlite:///var/lib/flotilla-server/server.db) or postgres://user:password@host:port/database"
    )]
    Malformed(String),
    #[error(
        "the database URL scheme {0}: is not one flotilla-server knows; use sqlite:///absolute/path or postgres://"
    )]
    Scheme(String),
    #[error(
        "{0}: a SQLite URL holds an absolute path (sqlite:///var/lib/flotilla-server/server.db); give a relative \
         path without the sqlite: prefix"
    )]
    SqliteHost(String),
    #[error(
        "{url}: name the PostgreSQL user before the host: postgres://USER:PASSWORD@host/database"
    )]
    NoUser { url: String },
    #[error(
        "{url}: name the host (postgres://user@db.example/flotilla); for a Unix socket, name its directory: \
         postgres://user@localhost/flotilla?host=/var/run/postgresql"
    )]
    NoHost { url: String },
    #[error("{url}: {what} is not valid UTF-8 once its %-escapes are decoded")]
    Encoding { url: String, what: &'static str },
    #[error(
        "{url}: sslmode={mode} is not one of disable, prefer, require, verify-ca, verify-full (as libpq spells them)"
    )]
    SslMode { url: String, mode: String },
    #[error("{url}: {key}={value} is not a number of seconds")]
    Seconds {
        url: String,
        key: String,
        value: String,
    },
    #[error(
        "{url}: the parameter {key} is not supported; flotilla-server reads sslmode, sslrootcert, connect_timeout, \
         application_name and host (a socket directory)"
    )]
    Parameter { url: String, key: String },
}

/// Where the fleet's database is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DbUrl {
    Sqlite(PathBuf),
    Postgres(PgUrl),
}

/// How a PostgreSQL connection is secured; libpq's modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// A PostgreSQL URL, read.
#[derive(Clone, PartialEq, Eq)]
pub struct PgUrl {
    /// The URL as given, with `***` for the password: for messages and logs.
    pub redacted: String,
    /// A host name or address, or a directory holding the server's Unix socket (it starts with `/`).
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub dbname: String,
    pub ssl_mode: SslMode,
    pub ssl_root_cert: Option<PathBuf>,
    pub connect_timeout: Duration,
    pub application_name: String,
}

/// libpq waits forever by default; a server that cannot reach its database should say so instead.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl fmt::Debug for PgUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl fmt::Display for PgUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl fmt::Display for DbUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DbUrl::Sqlite(path) => write!(f, "{}", path.display()),
            DbUrl::Postgres(pg) => pg.fmt(f),
        }
    }
}

/// A URL's scheme, when `s` starts with one followed by `://`; anything else is a path.
fn scheme(s: &str) -> Option<&str> {
    let (scheme, _) = s.split_once("://")?;
    let mut chars = scheme.chars();
    let first = chars.next()?;
    (first.is_ascii_alphabetic()
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
    .then_some(scheme)
}

impl FromStr for DbUrl {
    type Err = DbUrlError;

    fn from_str(s: &str) -> Result<DbUrl, DbUrlError> {
        match scheme(s).map(str::to_ascii_lowercase).as_deref() {
            None => Ok(DbUrl::Sqlite(PathBuf::from(s))),
            Some("sqlite") => {
                let rest = &s["sqlite://".len()..];
                if !rest.starts_with('/') {
                    return Err(DbUrlError::SqliteHost(s.to_string()));
                }
                let path =
                    percent_decode_str(rest)
                        .decode_utf8()
                        .map_err(|_| DbUrlError::Encoding {
                            url: s.to_string(),
                            what: "the path",
                        })?;
                Ok(DbUrl::Sqlite(PathBuf::from(path.as_ref())))
            }
            Some("postgres" | "postgresql") => PgUrl::parse(s).map(DbUrl::Postgres),
            Some(other) => Err(DbUrlError::Scheme(other.to_string())),
        }
    }
}

impl PgUrl {
    fn parse(s: &str) -> Result<PgUrl, DbUrlError> {
        let url = url::Url::parse(s).map_err(|_| DbUrlError::Malformed(redact_raw(s)))?;
        let mut shown = url.clone();
        if shown.password().is_some() {
            // Cannot fail: the URL has a host, or it would have no password.
            let _ = shown.set_password(Some("***"));
        }
        let redacted = shown.to_string();
        let decode = |raw: &str, what: &'static str| {
            percent_decode_str(raw)
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| DbUrlError::Encoding {
                    url: redacted.clone(),
                    what,
                })
        };
        let user = decode(url.username(), "the user")?;
        if user.is_empty() {
            return Err(DbUrlError::NoUser { url: redacted });
        }
        let password = url
            .password()
            .map(|p| decode(p, "the password"))
            .transpose()?;
        let dbname = match url.path().trim_start_matches('/') {
            "" => user.clone(),
            name => decode(name, "the database name")?,
        };
        let mut host = match url.host() {
            // url keeps IPv6 addresses bracketed in host_str; the socket address wants them bare.
            Some(url::Host::Ipv6(a)) => a.to_string(),
            Some(h) if !h.to_string().is_empty() => h.to_string(),
            _ => {
                return Err(DbUrlError::NoHost { url: redacted });
            }
        };
        let mut pg = PgUrl {
            redacted: redacted.clone(),
            host: String::new(),
            port: url.port().unwrap_or(5432),
            user,
            password,
            dbname,
            ssl_mode: SslMode::Prefer,
            ssl_root_cert: None,
            connect_timeout: CONNECT_TIMEOUT,
            application_name: "flotilla-server".to_string(),
        };
        for (key, value) in url.query_pairs() {
            match key.as_ref() {
                "sslmode" => {
                    pg.ssl_mode = match value.as_ref() {
                        "disable" => SslMode::Disable,
                        "prefer" => SslMode::Prefer,
                        "require" => SslMode::Require,
                        "verify-ca" => SslMode::VerifyCa,
                        "verify-full" => SslMode::VerifyFull,
                        _ => {
                            return Err(DbUrlError::SslMode {
                                url: redacted,
                                mode: value.into_owned(),
                            });
                        }
                    }
                }
                "sslrootcert" => pg.ssl_root_cert = Some(PathBuf::from(value.as_ref())),
                "connect_timeout" => {
                    let secs = value.parse::<u64>().map_err(|_| DbUrlError::Seconds {
                        url: redacted.clone(),
                        key: key.to_string(),
                        value: value.to_string(),
                    })?;
                    pg.connect_timeout = Duration::from_secs(secs);
                }
                "application_name" => pg.application_name = value.into_owned(),
                "host" => host = value.into_owned(),
                _ => {
                    return Err(DbUrlError::Parameter {
                        url: redacted,
                        key: key.into_owned(),
                    });
                }
            }
        }
        pg.host = host;
        Ok(pg)
    }

    /// The client's configuration for this URL (TLS is chosen apart, by [`PgUrl::ssl_mode`]).
    pub fn config(&self) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host(&self.host)
            .port(self.port)
            .user(&self.user)
            .dbname(&self.dbname)
            .connect_timeout(self.connect_timeout)
            .application_name(&self.application_name)
            .ssl_mode(match self.ssl_mode {
                SslMode::Disable => tokio_postgres::config::SslMode::Disable,
                SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
                SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                    tokio_postgres::config::SslMode::Require
                }
            });
        if let Some(p) = &self.password {
            c.password(p);
        }
        c
    }
}

/// For a URL `url` cannot read: whatever sits between the user's `:` and the `@` is hidden all the same.
fn redact_raw(s: &str) -> String {
    let Some((scheme, rest)) = s.split_once("://") else {
        return s.to_string();
    };
    let Some((creds, host)) = rest.rsplit_once('@') else {
        return s.to_string();
    };
    match creds.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pg(s: &str) -> PgUrl {
        match s.parse::<DbUrl>().unwrap() {
            DbUrl::Postgres(p) => p,
            other => panic!("{s} read as {other:?}"),
        }
    }

    #[test]
    fn paths_and_sqlite_urls_are_sqlite() {
        for (s, path) in [
            ("server.db", "server.db"),
            (
                "/var/lib/flotilla-server/server.db",
                "/var/lib/flotilla-server/server.db",
            ),
            ("sqlite:///var/lib/f/server.db", "/var/lib/f/server.db"),
            ("SQLite:///tmp/a%20b.db", "/tmp/a b.db"),
            ("./odd:name.db", "./odd:name.db"),
        ] {
            assert_eq!(
                s.parse::<DbUrl>().unwrap(),
                DbUrl::Sqlite(PathBuf::from(path)),
                "{s}"
            );
        }
        assert!(matches!(
            "sqlite://server.db".parse::<DbUrl>(),
            Err(DbUrlError::SqliteHost(_))
        ));
        assert!(matches!(
            "mysql://u@h/db".parse::<DbUrl>(),
            Err(DbUrlError::Scheme(s)) if s == "mysql"
        ));
    }

    #[test]
    fn postgres_urls_are_read_as_libpq_reads_them() {
        let p = pg(
            "postgresql://fleet:s%3Acret%40x@db.example:6432/flotilla?sslmode=verify-full&sslrootcert=/etc/ca.pem&connect_timeout=3",
        );
        assert_eq!(
            (p.host.as_str(), p.port, p.user.as_str()),
            ("db.example", 6432, "fleet")
        );
        assert_eq!(p.password.as_deref(), Some("s:cret@x"));
        assert_eq!(p.dbname, "flotilla");
        assert_eq!(p.ssl_mode, SslMode::VerifyFull);
        assert_eq!(p.ssl_root_cert, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(p.connect_timeout, Duration::from_secs(3));

        let p = pg("postgres://fleet@[::1]");
        assert_eq!((p.host.as_str(), p.port), ("::1", 5432));
        assert_eq!(
            p.dbname, "fleet",
            "the database defaults to the user's name"
        );
        assert_eq!(p.ssl_mode, SslMode::Prefer, "libpq's default");
        assert_eq!(p.password, None);

        let p = pg("postgres://fleet@localhost/flotilla?host=/run/pg");
        assert_eq!(p.host, "/run/pg");
        assert!("postgres://fleet@/flotilla".parse::<DbUrl>().is_err());
    }

    #[test]
    fn the_password_is_never_shown() {
        let url = "postgres://fleet:hunter2@db/flotilla?sslmode=require";
        let parsed: DbUrl = url.parse().unwrap();
        assert_eq!(
            parsed.to_string(),
            "postgres://fleet:***@db/flotilla?sslmode=require"
        );
        assert!(!format!("{parsed:?}").contains("hunter2"));
        for bad in [
            "postgres://fleet:hunter2@db/flotilla?sslmode=sometimes",
            "postgres://fleet:hunter2@db/flotilla?sslcert=x",
            "postgres://fleet:hunter2@db:99999/flotilla",
            "postgres://:hunter2@db/flotilla",
        ] {
            let err = bad.parse::<DbUrl>().unwrap_err().to_string();
            assert!(!err.contains("hunter2"), "{err}");
            assert!(err.contains("***"), "{err}");
        }
    }

    #[test]
    fn bad_parameters_say_what_is_read() {
        let err = "postgres://u@h/d?sslmode=verify"
            .parse::<DbUrl>()
            .unwrap_err();
        assert!(err.to_string().contains("verify-full"), "{err}");
        let err = "postgres://u@h/d?connect_timeout=soon"
            .parse::<DbUrl>()
            .unwrap_err();
        assert!(matches!(err, DbUrlError::Seconds { .. }), "{err}");
        assert!(matches!(
            "postgres://h/d".parse::<DbUrl>(),
            Err(DbUrlError::NoUser { .. })
        ));
    }
}
