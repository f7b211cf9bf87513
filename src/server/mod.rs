//! The fleet server: its storage (`store`: the database, SQLite or PostgreSQL, and the fleet's queries), the API's
//! wire types (`views`), the rollout driver (`driver`), the HTTP API (`api`), the web dashboard (`dashboard`), the
//! Prometheus metrics (`metrics`) and the operator CLI that talks to it (`cli`).

pub mod api;
pub mod cli;
pub mod dashboard;
pub mod driver;
mod http;
pub mod metrics;
pub mod ratelimit;
pub mod store;
pub mod strict;
pub mod tls;
pub mod views;
