//! Operator sessions: signing in with an admin token gives a random session id in a cookie, and the session's
//! own CSRF token that every state-changing form carries. Only hashes of both are stored, as for every other
//! secret of the server, and a session is a row in the database so that any server sharing it knows it.

use crate::server::store::{ConnExt, ServerDb, ServerDbError, hash_secret, new_secret};

/// Twelve hours: a working day, after which a forgotten browser tab is no longer a way into the fleet.
pub const SESSION_SECS: u64 = 12 * 3600;

pub const COOKIE: &str = "flotilla_session";

/// A signed-in operator's session, as a request's cookie found it.
#[derive(Debug, Clone)]
pub struct Session {
    /// The hash of the cookie's value: what names the row.
    pub key: String,
    /// The token forms carry. It is a secret like the cookie, but is sent inside pages, which only the session's
    /// own origin can read.
    pub csrf: String,
    pub expires: u64,
}

impl ServerDb {
    /// Opens a session for the holder of `admin_token`; the cookie's value, or `None` when the token is not an
    /// admin token. Expired sessions are dropped on the way.
    pub fn sign_in(
        &self,
        admin_token: &str,
        now: u64,
    ) -> Result<Option<(String, Session)>, ServerDbError> {
        if !self.is_admin(admin_token)? {
            return Ok(None);
        }
        self.conn
            .execute(
                "DELETE FROM sessions WHERE expires <= ?1",
                crate::args![now],
            )
            .map_err(self.err())?;
        let cookie = new_secret();
        let session = Session {
            key: hash_secret(&cookie),
            csrf: new_secret(),
            expires: now.saturating_add(SESSION_SECS),
        };
        self.conn
            .execute(
                "INSERT INTO sessions (hash, csrf, admin_hash, created, expires) VALUES (?1, ?2, ?3, ?4, ?5)",
                crate::args![
                    &session.key,
                    &session.csrf,
                    hash_secret(admin_token),
                    now,
                    session.expires
                ],
            )
            .map_err(self.err())?;
        Ok(Some((cookie, session)))
    }

    /// The live session a cookie's value names: unexpired, and its admin token still valid.
    pub fn session(&self, cookie: &str, now: u64) -> Result<Option<Session>, ServerDbError> {
        self.conn
            .row(
                "SELECT s.hash, s.csrf, s.expires FROM sessions s
                  JOIN admin_tokens a ON a.hash = s.admin_hash
                  WHERE s.hash = ?1 AND s.expires > ?2",
                crate::args![hash_secret(cookie), now],
                |r| {
                    Ok(Session {
                        key: r.get(0)?,
                        csrf: r.get(1)?,
                        expires: r.get(2)?,
                    })
                },
            )
            .map_err(self.err())
    }

    pub fn sign_out(&self, key: &str) -> Result<(), ServerDbError> {
        self.conn
            .execute("DELETE FROM sessions WHERE hash = ?1", crate::args![key])
            .map_err(self.err())?;
        Ok(())
    }
}

/// The value of the session cookie in a `Cookie` header, if any.
pub fn cookie_value(header: &str) -> Option<&str> {
    header
        .split(';')
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim())
        .filter(|v| !v.is_empty() && v.len() <= 256)
}

/// Compares without stopping at the first difference, so a CSRF token cannot be guessed a byte at a time.
pub fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> (tempfile::TempDir, ServerDb) {
        let dir = tempfile::tempdir().unwrap();
        let db = ServerDb::open(&dir.path().join("server.db")).unwrap();
        (dir, db)
    }

    #[test]
    fn a_session_needs_an_admin_token_and_ends() {
        let (_dir, db) = db();
        let admin = db.ensure_admin_token(100).unwrap().unwrap();
        assert!(db.sign_in("not-the-token", 100).unwrap().is_none());
        let (cookie, s) = db.sign_in(&admin, 100).unwrap().unwrap();
        assert_eq!(s.expires, 100 + SESSION_SECS);
        let found = db.session(&cookie, 200).unwrap().unwrap();
        assert_eq!(found.csrf, s.csrf);
        assert!(
            db.session(&s.key, 200).unwrap().is_none(),
            "the stored hash is not a cookie"
        );
        assert!(
            db.session(&cookie, 100 + SESSION_SECS).unwrap().is_none(),
            "expired"
        );
        db.sign_out(&s.key).unwrap();
        assert!(db.session(&cookie, 200).unwrap().is_none(), "signed out");
    }

    #[test]
    fn cookies_are_read_by_name() {
        assert_eq!(cookie_value("a=b; flotilla_session=xyz; c=d"), Some("xyz"));
        assert_eq!(cookie_value("flotilla_sessionx=1"), None);
        assert_eq!(cookie_value("flotilla_session="), None);
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "ab"));
    }
}
