//! The web dashboard over real HTTP against the real server (`api::serve` on 127.0.0.1:0, a fresh database per
//! test, a fake clock so sessions can expire, a resolver that answers fixed manifests): every page and action,
//! checked by what the page says, not only its status.

mod browser;
mod devices;
mod harness;
mod metrics;
mod pages;
mod rollouts;
mod tokens;

pub use harness::*;
