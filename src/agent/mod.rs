//! The device agent: its SQLite state and outbox (`db`). The reconcile loop, the fleet client and sd_notify come
//! next (issue 9).

pub mod db;
