//! The fleet server: its storage (`store`: the database, SQLite or PostgreSQL, and the fleet's queries), the API's
//! wire types (`views`), the rollout driver (`driver`), the HTTP API (`api`), the web dashboard (`dashboard`) and the
//! Prometheus metrics (`metrics`). Its operator CLI, `flotilla-server`, sits with the device's commands
//! (`src/cli/server/`); nothing here imports the command line.

pub mod api;
mod chores;
pub mod dashboard;
pub mod driver;
mod http;
pub mod metrics;
pub mod ratelimit;
pub mod resolve;
mod state;
pub mod store;
pub mod strict;
pub mod tls;
pub mod views;

pub use http::listen;
