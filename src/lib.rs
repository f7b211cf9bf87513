//! flotilla: architecture-correct container deployment for ARM edge devices.
//!
//! The logic lives here; the binaries only parse arguments and report errors. The core (platform ranking, index
//! selection) is plain functions over data; every OS or network boundary sits behind a small interface.
// `deny`, not `forbid`: src/sys.rs alone allows unsafe code, and says why there.
#![deny(unsafe_code)]

pub mod agent;
pub mod app;
pub mod cli;
pub mod clock;
pub mod config;
pub mod crash_points;
pub mod deploy;
pub mod digest;
pub mod durable;
pub mod elf;
pub mod fleet;
pub mod fs_root;
pub mod human;
pub mod layers;
pub mod oci;
pub mod platform;
pub mod policy;
pub mod pull;
pub mod registry;
pub mod rollout;
pub mod runtime;
#[cfg(feature = "server")]
pub mod server;
pub mod sqlite;
pub mod store;
pub mod supervise;
mod sys;
pub mod unpack;
pub mod update;
pub mod verify;

/// The version, commit and target of this build, as `flotilla --version` prints them.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("FLOTILLA_GIT_COMMIT"),
    ", ",
    env!("FLOTILLA_TARGET"),
    ")"
);

/// Formats an error with its causes on one line each, the way `main` reports it.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        // thiserror's transparent wrappers and "{source}" formats repeat the cause; print each text once.
        if !out.contains(&text) {
            out.push_str("\n  caused by: ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}
