//! Apps and their releases, each pinned to the digests of its image's index when it was made.

use super::Row;
use std::collections::BTreeMap;

use super::ConnExt;
use super::db::{ServerDb, ServerDbError, from_json, to_json};
use crate::server::views::{AppRequest, AppView, ReleaseView, check_field, check_settings};

impl ServerDb {
    pub fn create_app(&self, req: &AppRequest, now: u64) -> Result<AppView, ServerDbError> {
        check_field("name", "app name", &req.name)?;
        check_settings(&req.settings)?;
        let n = self
            .conn
            .execute(
                "INSERT INTO apps (name, settings, created) VALUES (?1, ?2, ?3) ON CONFLICT (name) DO NOTHING",
                crate::args![&req.name, to_json(&req.settings)?, now],
            )
            .map_err(self.err())?;
        if n == 0 {
            return Err(ServerDbError::Exists(format!("the app {}", req.name)));
        }
        Ok(AppView {
            name: req.name.clone(),
            settings: req.settings.clone(),
            created: now,
        })
    }

    pub fn apps(&self) -> Result<Vec<AppView>, ServerDbError> {
        let rows = self
            .conn
            .rows(
                "SELECT name, settings, created FROM apps ORDER BY name",
                crate::args![],
                Row::read::<(String, String, u64)>,
            )
            .map_err(self.err())?;
        rows.into_iter()
            .map(|(name, settings, created)| {
                Ok(AppView {
                    settings: from_json("app settings", &settings)?,
                    name,
                    created,
                })
            })
            .collect()
    }

    fn app_exists(&self, name: &str) -> Result<bool, ServerDbError> {
        self.conn
            .one(
                "SELECT EXISTS (SELECT 1 FROM apps WHERE name = ?1)",
                crate::args![name],
            )
            .map_err(self.err())
    }

    /// A release of `app`: `pinned` and `manifests` come from the registry, read by the caller.
    pub fn create_release(
        &self,
        app: &str,
        image: &str,
        pinned: &str,
        manifests: &BTreeMap<String, String>,
        now: u64,
    ) -> Result<ReleaseView, ServerDbError> {
        if !self.app_exists(app)? {
            return Err(ServerDbError::NotFound(format!("the app {app}")));
        }
        // The release's number is counted and taken in one statement: a transaction that read, then wrote, would
        // fail at once on SQLite (not after the busy timeout) when the flush connection wrote in between, and two
        // replicas counting at once on PostgreSQL collide on the key instead of both taking the number.
        let id: String = self
            .conn
            .one(
                "INSERT INTO releases (id, app, image, pinned, manifests, created)
                 SELECT CAST(?1 AS TEXT) || '-' || CAST(count(*) + 1 AS TEXT), ?1, ?2, ?3, ?4, CAST(?5 AS BIGINT)
                 FROM releases WHERE app = ?1
                 RETURNING id",
                crate::args![app, image, pinned, to_json(manifests)?, now],
            )
            .map_err(self.err())?;
        Ok(ReleaseView {
            id,
            app: app.to_string(),
            image: image.to_string(),
            pinned: pinned.to_string(),
            manifests: manifests.clone(),
            created: now,
        })
    }

    pub fn releases(&self, only: Option<&str>) -> Result<Vec<ReleaseView>, ServerDbError> {
        let rows = self
            .conn
            .rows(
                "SELECT id, app, image, pinned, manifests, created FROM releases
                 WHERE CAST(?1 AS TEXT) IS NULL OR id = ?1 ORDER BY created, id",
                crate::args![only],
                Row::read::<(String, String, String, String, String, u64)>,
            )
            .map_err(self.err())?;
        rows.into_iter()
            .map(|(id, app, image, pinned, manifests, created)| {
                Ok(ReleaseView {
                    manifests: from_json("release manifests", &manifests)?,
                    id,
                    app,
                    image,
                    pinned,
                    created,
                })
            })
            .collect()
    }

    pub fn release(&self, id: &str) -> Result<ReleaseView, ServerDbError> {
        self.releases(Some(id))?
            .pop()
            .ok_or_else(|| ServerDbError::NotFound(format!("the release {id}")))
    }
}
