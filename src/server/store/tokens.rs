//! Enrollment tokens, devices' credentials and the admin tokens.
//!
//! Secrets are 256 random bits, shown once; only their SHA-256 is stored. A slow password hash would add nothing for
//! secrets that were never chosen by a person, and a lookup by hash keeps authentication one indexed query.

use super::Row;
use std::collections::BTreeMap;

use base64::Engine;
use rand::RngCore;
use sha2::{Digest as _, Sha256};

use super::ConnExt;
use super::db::{ServerDb, ServerDbError, from_json, to_json};
use crate::fleet::{EnrollRequest, Enrolled};
use crate::server::views::{TokenCreated, TokenView};

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

/// The public id of a token: the start of its hash, so rows made before ids existed have one too. 48 bits of a
/// hash of 256 random bits tell nothing about the secret.
fn token_id(hash: &str) -> String {
    hash[..12].to_string()
}

impl ServerDb {
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
                crate::args![&hash, expires, uses, &id, now, to_json(tags)?, device_tags],
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
        let rows = self
            .conn
            .rows(
                "SELECT t.id, t.created, t.expires, t.uses_left, t.tags, t.device_tags, t.revoked,
                        (SELECT count(*) FROM devices d WHERE d.token_hash = t.hash)
                 FROM tokens t ORDER BY t.created, t.id",
                crate::args![],
                |r| {
                    Ok((
                        TokenView {
                            id: r.get(0)?,
                            created: r.get(1)?,
                            expires: r.get(2)?,
                            uses_left: r.get(3)?,
                            tags: BTreeMap::new(),
                            device_tags: r.get(5)?,
                            revoked: r.get(6)?,
                            enrolled: r.get(7)?,
                        },
                        r.get::<String>(4)?,
                    ))
                },
            )
            .map_err(self.err())?;
        rows.into_iter()
            .map(|(view, tags)| {
                Ok(TokenView {
                    tags: from_json(&format!("tags of the token {}", view.id), &tags)?,
                    ..view
                })
            })
            .collect()
    }

    /// Refuses the token for any enrollment from now on. Devices enrolled with it keep their credentials.
    pub fn revoke_token(&self, id: &str) -> Result<TokenView, ServerDbError> {
        let n = self
            .conn
            .execute(
                "UPDATE tokens SET revoked = 1 WHERE id = ?1",
                crate::args![id],
            )
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
        let tx = self.conn.begin().map_err(self.err())?;
        let hash = hash_secret(token);
        if let Some(eid) = &req.enrollment_id {
            let prior = tx
                .row(
                    "SELECT id, name, token_hash, revoked, confirmed FROM devices WHERE enrollment_hash = ?1",
                    crate::args![hash_secret(eid)],
                    Row::read::<(String, String, Option<String>, bool, bool)>,
                )
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
                let confirmed = confirmed || self.news.seen().get(&id).is_some_and(|n| n.confirmed);
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
        let row = tx
            .row(
                "SELECT id, expires, uses_left, revoked, tags, device_tags FROM tokens WHERE hash = ?1",
                crate::args![&hash],
                Row::read::<(String, Option<u64>, Option<i64>, bool, String, bool)>,
            )
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
        if uses.is_some_and(|u| u <= 0) {
            return Err(ServerDbError::TokenUsedUp(token_id));
        }
        // Tags decide which rollouts reach a device: they are the operator's, given by the token. What the device
        // asks for counts only where the token says so, and never over the token's own.
        let mut tags: BTreeMap<String, String> =
            from_json(&format!("tags of the token {token_id}"), &token_tags)?;
        if device_tags {
            for (k, v) in &req.tags {
                tags.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        let taken: bool = tx
            .one(
                "SELECT EXISTS (SELECT 1 FROM devices WHERE name = ?1 AND revoked = 0)",
                crate::args![&req.name],
            )
            .map_err(self.err())?;
        if taken {
            return Err(ServerDbError::NameTaken(req.name.clone()));
        }
        // A revoked device's name may be taken by a new enrollment; the old row keeps its history under a new name.
        tx.execute(
            "UPDATE devices SET name = name || '~revoked~' || id WHERE name = ?1 AND revoked = 1",
            crate::args![&req.name],
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
            crate::args![
                &device_id,
                &req.name,
                hash_secret(&credential),
                to_json(&tags)?,
                to_json(&req.platform)?,
                &req.agent_version,
                now,
                req.enrollment_id.as_deref().map(hash_secret),
                &hash,
                req.enrollment_id.is_none()
            ],
        )
        .map_err(self.err())?;
        // The token's use is taken last: every enrollment with one token updates its row, and on PostgreSQL the
        // row stays locked until the commit, so the enrollments of a batch wait on each other for this update and
        // the commit only, not for the whole transaction. Conditional, because another enrollment may have taken
        // the last use since the row was read above.
        if uses.is_some() {
            let taken = tx
                .execute(
                    "UPDATE tokens SET uses_left = uses_left - 1 WHERE hash = ?1 AND uses_left > 0",
                    crate::args![&hash],
                )
                .map_err(self.err())?;
            if taken == 0 {
                return Err(ServerDbError::TokenUsedUp(token_id));
            }
        }
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
        let row = self
            .conn
            .row(
                "SELECT id, confirmed FROM devices WHERE credential_hash = ?1 AND revoked = 0",
                crate::args![hash_secret(credential)],
                Row::read::<(String, bool)>,
            )
            .map_err(self.err())?;
        let Some((id, confirmed)) = row else {
            return Ok(None);
        };
        let mut seen = self.news.seen();
        let entry = seen.entry(id.clone()).or_default();
        entry.last_seen = entry.last_seen.max(now);
        entry.confirmed |= !confirmed;
        Ok(Some(id))
    }

    /// Whether `token` is an enrollment token this server made, usable or not: a request with anything else is
    /// refused before its body is read.
    pub fn token_known(&self, token: &str) -> Result<bool, ServerDbError> {
        self.conn
            .one(
                "SELECT EXISTS (SELECT 1 FROM tokens WHERE hash = ?1)",
                crate::args![hash_secret(token)],
            )
            .map_err(self.err())
    }

    /// Makes the first admin token when there is none; `None` when one exists.
    pub fn ensure_admin_token(&self, now: u64) -> Result<Option<String>, ServerDbError> {
        // Replicas starting together on an empty database would each see no token and each make one.
        let tx = self.conn.begin().map_err(self.err())?;
        if let Some(lock) = tx.dialect().lock_for_writing("admin_tokens") {
            tx.batch(&lock).map_err(self.err())?;
        }
        let any: bool = tx
            .one("SELECT EXISTS (SELECT 1 FROM admin_tokens)", crate::args![])
            .map_err(self.err())?;
        if any {
            return Ok(None);
        }
        let token = new_secret();
        tx.execute(
            "INSERT INTO admin_tokens (hash, created) VALUES (?1, ?2)",
            crate::args![hash_secret(&token), now],
        )
        .map_err(self.err())?;
        tx.commit().map_err(self.err())?;
        Ok(Some(token))
    }

    pub fn is_admin(&self, token: &str) -> Result<bool, ServerDbError> {
        self.conn
            .one(
                "SELECT EXISTS (SELECT 1 FROM admin_tokens WHERE hash = ?1)",
                crate::args![hash_secret(token)],
            )
            .map_err(self.err())
    }
}

#[cfg(test)]
mod tests {
    use super::super::db::fixtures::{open, request, token};
    use super::*;
    use crate::fleet::{AppStatus, Event, EventBody};

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
    fn a_retried_enrollment_gets_the_same_device_and_credential_until_the_credential_is_used() {
        let (_dir, db) = open();
        let once = token(&db, Some(100), Some(1));
        let mut req = request("a");
        req.enrollment_id = Some(new_secret());
        let first = db.enroll(&once, &req, 10).unwrap();
        // The reply was lost: the retry finds the token used up, and is answered with the same enrollment.
        let again = db.enroll(&once, &req, 20).unwrap();
        assert_eq!(again, first);
        let devices: u32 = db
            .conn
            .one("SELECT count(*) FROM devices", crate::args![])
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
    fn tokens_expire_and_run_out() {
        let (_dir, db) = open();
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
        let (_dir, db) = open();
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
                .one("SELECT tags FROM devices WHERE id = ?1", crate::args![id])
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
