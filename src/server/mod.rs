//! The fleet server: its SQLite (`db`), the fleet model and rollout driver (`model`), the HTTP API (`api`), the web
//! dashboard (`dashboard`), the Prometheus metrics (`metrics`) and the operator CLI that talks to it (`cli`).

pub mod api;
pub mod cli;
pub mod dashboard;
pub mod db;
mod http;
pub mod metrics;
pub mod model;
pub mod ratelimit;
pub mod store;
pub mod strict;
pub mod tls;
