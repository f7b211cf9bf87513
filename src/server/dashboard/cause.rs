//! How the dashboard names what went wrong and what a device is doing: one definition, used by the overview's
//! counts, the devices page's filter, a device's history and a rollout's failure groups alike.

use crate::server::store::Dialect;
use crate::update::{FailureCause, Report};

/// Why an update failed, as operators act on it: a wrong variant needs a rebuilt image, a crash or a failed
/// health check a fixed release, a pull error the registry or the network, a policy refusal the device owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Cause {
    WrongVariant,
    Crash,
    Health,
    Pull,
    Policy,
    Invalid,
}

impl Cause {
    pub const ALL: [Cause; 6] = [
        Cause::WrongVariant,
        Cause::Crash,
        Cause::Health,
        Cause::Pull,
        Cause::Policy,
        Cause::Invalid,
    ];

    /// Stable, for URLs and CSS classes.
    pub fn slug(self) -> &'static str {
        match self {
            Cause::WrongVariant => "wrong-variant",
            Cause::Crash => "crash",
            Cause::Health => "health",
            Cause::Pull => "pull",
            Cause::Policy => "policy",
            Cause::Invalid => "invalid",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Cause::WrongVariant => "wrong variant (SIGILL, page size, ELF mismatch)",
            Cause::Crash => "crashed",
            Cause::Health => "health check failed",
            Cause::Pull => "pull or verification error",
            Cause::Policy => "refused by the device's policy",
            Cause::Invalid => "invalid settings",
        }
    }
}

/// The cause of a failed update report; `None` for a report of progress or success.
pub fn cause_of(report: &Report) -> Option<Cause> {
    match report {
        Report::RolledBack {
            wrong_variant: true,
            ..
        } => Some(Cause::WrongVariant),
        // The agent says "unhealthy during probation" when the check, not the process, failed.
        Report::RolledBack { reason, .. } if reason.starts_with("unhealthy") => Some(Cause::Health),
        Report::RolledBack { .. } => Some(Cause::Crash),
        Report::PrepareFailed { cause, .. } => Some(match cause {
            Some(FailureCause::Policy) => Cause::Policy,
            Some(FailureCause::Invalid) => Cause::Invalid,
            None => Cause::Pull,
        }),
        Report::Preparing { .. }
        | Report::Probation { .. }
        | Report::Committed { .. }
        | Report::Removed { .. } => None,
    }
}

/// A device's state, as the overview counts and the devices page filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceState {
    Running,
    Updating,
    Failed,
    Offline,
    Revoked,
}

impl DeviceState {
    pub const ALL: [DeviceState; 5] = [
        DeviceState::Running,
        DeviceState::Updating,
        DeviceState::Failed,
        DeviceState::Offline,
        DeviceState::Revoked,
    ];

    pub fn slug(self) -> &'static str {
        match self {
            DeviceState::Running => "running",
            DeviceState::Updating => "updating",
            DeviceState::Failed => "failed",
            DeviceState::Offline => "offline",
            DeviceState::Revoked => "revoked",
        }
    }

    pub fn from_slug(s: &str) -> Option<DeviceState> {
        DeviceState::ALL.into_iter().find(|d| d.slug() == s)
    }
}

/// Not heard from for five minutes: five heartbeats missed at the agent's default interval, so down rather than
/// slow.
pub const OFFLINE_AFTER_SECS: u64 = 5 * 60;

/// The state of the device `d` (a row of `devices`) as an SQL expression giving a [`DeviceState::slug`], with
/// `offline_before` (a placeholder, `?1`) bound to the time before which a device counts as offline. In SQL so
/// that counting and filtering 100,000 devices reads no row into Rust:
/// - failed: the release the fleet wants for one of its apps failed to prepare or was rolled back;
/// - updating: one of its apps has not committed the release the fleet wants;
/// - running: every app runs what the fleet wants.
pub fn state_sql(d: Dialect, offline_before: &str) -> String {
    let event = d.json_text("u.report", &["event"]);
    format!(
        "CASE
  WHEN d.revoked <> 0 THEN 'revoked'
  WHEN d.last_seen < {offline_before} THEN 'offline'
  WHEN EXISTS (SELECT 1 FROM desired x JOIN device_updates u
                 ON u.device = x.device AND u.app = x.app AND u.release = x.release
               WHERE x.device = d.id
                 AND {event} IN ('prepare-failed', 'rolled-back')) THEN 'failed'
  WHEN EXISTS (SELECT 1 FROM desired x
               WHERE x.device = d.id AND x.release IS NOT NULL
                 AND NOT EXISTS (SELECT 1 FROM device_updates u
                                 WHERE u.device = x.device AND u.app = x.app AND u.release = x.release
                                   AND {event} = 'committed')) THEN 'updating'
  ELSE 'running'
END"
    )
}

/// The sets of devices a statement over the whole fleet reads its states from, computed once by a statement that
/// starts with it: `failed`, the devices whose release the fleet wants for one of their apps failed to prepare or
/// was rolled back; `updating`, those with an app whose wanted release has not committed. Both read the
/// `device_updates_event` index, not the reports. [`state_sql`] asks the same of one device at a time, which is
/// what a page of 50 or one device wants, and costs a third of a second over 100,000.
pub fn state_sets(d: Dialect) -> String {
    let event = d.json_text("u.report", &["event"]);
    format!(
        "WITH failed(id) AS MATERIALIZED (
      SELECT x.device FROM desired x JOIN device_updates u
          ON u.device = x.device AND u.app = x.app AND u.release = x.release
       WHERE {event} IN ('prepare-failed', 'rolled-back')),
    updating(id) AS MATERIALIZED (
      SELECT x.device FROM desired x LEFT JOIN device_updates u
          ON u.device = x.device AND u.app = x.app AND u.release = x.release
         AND {event} = 'committed'
       WHERE x.release IS NOT NULL AND u.device IS NULL)"
    )
}

/// The devices in `state`, as a condition on `d` in a statement that starts with [`state_sets`], with
/// `offline_before` as in [`state_sql`] (unused for revoked devices: bind it only for the others): the same
/// states as [`state_sql`] (a test holds them to it), from sets the database computes once per statement.
/// `state_sql = ?` runs its subqueries again for every device: 340 ms at 100,000 devices on SQLite, where these
/// take a tenth of it.
pub fn state_clause(state: DeviceState, offline_before: &str) -> String {
    // `+`: most devices are live, and walking the last_seen index for them costs SQLite three times a scan.
    let live = format!("d.revoked = 0 AND +d.last_seen >= {offline_before}");
    match state {
        DeviceState::Revoked => "d.revoked <> 0".into(),
        DeviceState::Offline => format!("d.revoked = 0 AND d.last_seen < {offline_before}"),
        DeviceState::Failed => format!("{live} AND d.id IN (SELECT id FROM failed)"),
        DeviceState::Updating => format!(
            "{live} AND d.id NOT IN (SELECT id FROM failed) AND d.id IN (SELECT id FROM updating)"
        ),
        DeviceState::Running => format!(
            "{live} AND d.id NOT IN (SELECT id FROM failed) AND d.id NOT IN (SELECT id FROM updating)"
        ),
    }
}

/// The platform a device's detection ranked first (`linux/arm/v6`), from its stored report, in SQL. On SQLite it
/// is the expression of the `devices_platform` index, which SQLite matches only as written.
pub fn platform_sql(d: Dialect) -> String {
    format!(
        "coalesce({}, 'unknown')",
        d.json_text("d.platform", &["candidates", "0"])
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_named_by_what_fixes_them() {
        let rolled = |reason: &str, wrong_variant| Report::RolledBack {
            release: "r".into(),
            to: None,
            reason: reason.into(),
            wrong_variant,
        };
        assert_eq!(
            cause_of(&rolled("wrong architecture variant: SIGILL", true)),
            Some(Cause::WrongVariant)
        );
        assert_eq!(
            cause_of(&rolled("unhealthy during probation", false)),
            Some(Cause::Health)
        );
        assert_eq!(cause_of(&rolled("exit code 1", false)), Some(Cause::Crash));
        let failed = |cause| Report::PrepareFailed {
            release: "r".into(),
            reason: "x".into(),
            cause,
        };
        assert_eq!(cause_of(&failed(None)), Some(Cause::Pull));
        assert_eq!(
            cause_of(&failed(Some(FailureCause::Policy))),
            Some(Cause::Policy)
        );
        assert_eq!(
            cause_of(&Report::Committed {
                release: "r".into()
            }),
            None
        );
        for s in DeviceState::ALL {
            assert_eq!(DeviceState::from_slug(s.slug()), Some(s));
        }
    }

    /// SQLite uses an index on an expression only for the same expression: the migration's `devices_platform`
    /// index is on `coalesce(json_extract(platform, '$.candidates[0]'), 'unknown')` (a table's alias is no part
    /// of it), and the devices page's plan test checks that SQLite reads it.
    #[test]
    fn the_platform_is_spelled_as_its_sqlite_index() {
        assert_eq!(
            platform_sql(Dialect::Sqlite),
            "coalesce(json_extract(d.platform, '$.candidates[0]'), 'unknown')"
        );
        assert_eq!(
            platform_sql(Dialect::Postgres),
            "coalesce(((d.platform)::jsonb #>> '{candidates,0}'), 'unknown')"
        );
    }
}
