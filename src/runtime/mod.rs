//! Running containers with an existing OCI runtime: the runtime bundle, and the runtime itself.
//!
//! flotilla does not set up namespaces or cgroups itself. It writes a bundle ([`bundle`]) and drives runc (or crun,
//! or youki: the same command line) through the small [`Runtime`] interface, whose one real implementation is
//! [`runc::Runc`] and whose test double is [`fake::Recording`]. Whether an image of another architecture may run at
//! all is [`emulation`]'s decision.

pub mod bundle;
pub mod emulation;
pub mod fake;
pub mod runc;
pub mod seccomp;
pub mod user;

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

pub use runc::RuntimeError;

/// A container's lifecycle through an OCI runtime, synchronous: each call is one short runtime command. Callers on
/// async threads use `spawn_blocking`.
pub trait Runtime: Send + Sync {
    /// Creates the container from the bundle directory (holding `config.json`); its process waits for [`start`].
    ///
    /// [`start`]: Runtime::start
    fn create(&self, id: &str, bundle: &std::path::Path, io: Io) -> Result<(), RuntimeError>;
    fn start(&self, id: &str) -> Result<(), RuntimeError>;
    /// `None` when the runtime has no container `id`.
    fn state(&self, id: &str) -> Result<Option<State>, RuntimeError>;
    /// Sends `signal` (a number: `libc::SIGTERM`) to the container's init, or to all its processes with `all`.
    fn kill(&self, id: &str, signal: i32, all: bool) -> Result<(), RuntimeError>;
    /// Removes a stopped container; `force` kills a running one first.
    fn delete(&self, id: &str, force: bool) -> Result<(), RuntimeError>;
    /// Runs `args` in the running container as its user and returns the exit code (128 + n for signal n); the
    /// process is killed after `timeout`, and that is an error.
    fn exec(&self, id: &str, args: &[String], timeout: Duration) -> Result<i32, RuntimeError>;
    fn list(&self) -> Result<Vec<State>, RuntimeError>;
}

/// What the container's process inherits: no terminal, stdin from `/dev/null`, and these two descriptors (a log
/// file or a pipe the supervisor reads).
#[derive(Debug)]
pub struct Io {
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    /// Where the runtime writes the container process's host pid.
    pub pid_file: PathBuf,
}

/// A container as the runtime reports it (`runc state`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct State {
    pub id: String,
    pub status: Status,
    /// The init process's host pid; 0 once stopped.
    #[serde(default)]
    pub pid: u32,
    pub bundle: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Creating,
    Created,
    Running,
    Paused,
    Stopped,
}
