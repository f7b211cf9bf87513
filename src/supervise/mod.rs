//! Keeping containers running: their records on disk, their logs, and the supervisor that starts, watches,
//! restarts and stops them. `policy` is the pure core (restart backoff, health, failure classification); the rest
//! does the I/O.

pub mod container;
pub mod control;
pub mod health;
pub mod launch;
pub mod logs;
pub mod policy;
pub mod supervisor;
