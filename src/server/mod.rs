//! The fleet server: its SQLite (`db`), the fleet model and rollout driver (`model`), the HTTP API (`api`), the web
//! dashboard (`dashboard`) and the Prometheus metrics (`metrics`). Its operator CLI, `flotilla-server`, sits
//! with the device's commands (`src/cli/server/`); nothing here imports the command line.

pub mod api;
mod chores;
pub mod dashboard;
pub mod db;
mod http;
pub mod metrics;
pub mod model;
pub mod ratelimit;
pub mod resolve;
mod state;
pub mod store;
pub mod strict;
pub mod tls;
