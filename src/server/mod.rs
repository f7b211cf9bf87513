//! The fleet server: its SQLite (`db`). The axum API, the rollout driver and the operator CLI come next (issue 9).

pub mod db;
