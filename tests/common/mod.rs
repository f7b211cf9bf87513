//! Helpers shared by the integration tests.
//!
//! External pieces (Debian's tools, the busybox-static fixtures that `tests/setup` lays out) are found here. A
//! missing piece skips the test with a printed reason, or fails it when `FLOTILLA_REQUIRE_ALL=1`, as CI sets.
#![allow(dead_code)] // Each test binary uses its own part of this module.

pub mod binfmt;
// The fleet's host side needs the flotilla-server binary, built only with the feature.
#[cfg(feature = "server")]
pub mod fleet;
pub mod postgres;
pub mod registry;
pub mod seccomp;
pub mod tarcraft;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// Returns `Some(value)` when a piece is there; otherwise fails under `FLOTILLA_REQUIRE_ALL=1` or prints a skip
/// reason.
pub fn require<T>(what: &str, found: Option<T>) -> Option<T> {
    if found.is_some() {
        return found;
    }
    if std::env::var("FLOTILLA_REQUIRE_ALL").as_deref() == Ok("1") {
        panic!("missing test prerequisite: {what} (FLOTILLA_REQUIRE_ALL=1)");
    }
    eprintln!("skipping: {what} is missing");
    None
}

/// An executable by absolute path or on PATH.
pub fn tool(name: &str) -> Option<PathBuf> {
    let p = Path::new(name);
    if p.is_absolute() {
        return p.is_file().then(|| p.to_path_buf());
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|c| c.is_file())
}

/// [`tool`], through [`require`].
pub fn required_tool(name: &str) -> Option<PathBuf> {
    require(name, tool(name))
}

/// Where the busybox-static fixtures are: `$FLOTILLA_BUSYBOX_DIR`, else `target/test-fixtures/busybox`, where
/// `tests/setup` puts them.
pub fn busybox_dir() -> PathBuf {
    std::env::var_os("FLOTILLA_BUSYBOX_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-fixtures/busybox")
        })
}

/// Debian's busybox-static for `arch` (as Debian names it: amd64, arm64, armhf, armel).
pub fn busybox(arch: &str) -> Option<PathBuf> {
    let p = busybox_dir().join(arch).join("busybox");
    p.is_file().then_some(p)
}

/// [`busybox`], through [`require`].
pub fn required_busybox(arch: &str) -> Option<PathBuf> {
    require(
        &format!("busybox-static for {arch} (run tests/setup, or set FLOTILLA_BUSYBOX_DIR)"),
        busybox(arch),
    )
}

/// A finished command's exit status and both streams, for assertion messages.
pub fn output_text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// One run of the built `flotilla` binary. The environment that would make its output depend on the shell running
/// the tests (a config file, a log level, journald's stream) is cleared; a test that wants one sets it again.
pub struct Flotilla {
    cmd: Command,
}

impl Flotilla {
    pub fn new() -> Flotilla {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_flotilla"));
        cmd.env_remove("FLOTILLA_CONFIG")
            .env_remove("FLOTILLA_LOG")
            .env_remove("JOURNAL_STREAM");
        Flotilla { cmd }
    }

    /// `--state-dir dir`.
    pub fn state(mut self, dir: impl AsRef<Path>) -> Flotilla {
        self.cmd.arg("--state-dir").arg(dir.as_ref());
        self
    }

    /// `--config file`.
    pub fn config(mut self, file: impl AsRef<Path>) -> Flotilla {
        self.cmd.arg("--config").arg(file.as_ref());
        self
    }

    /// `--config file` with `file` written empty, so no configuration on the machine takes part.
    pub fn empty_config(self, file: impl AsRef<Path>) -> Flotilla {
        std::fs::write(file.as_ref(), "")
            .unwrap_or_else(|e| panic!("write {}: {e}", file.as_ref().display()));
        self.config(file)
    }

    /// `--insecure-registry host`: the test registries speak plain HTTP.
    pub fn registry(mut self, host: &str) -> Flotilla {
        self.cmd.args(["--insecure-registry", host]);
        self
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Flotilla {
        self.cmd.arg(arg);
        self
    }

    pub fn args<S: AsRef<OsStr>>(mut self, args: impl IntoIterator<Item = S>) -> Flotilla {
        self.cmd.args(args);
        self
    }

    pub fn env(mut self, key: &str, value: impl AsRef<OsStr>) -> Flotilla {
        self.cmd.env(key, value);
        self
    }

    pub fn current_dir(mut self, dir: impl AsRef<Path>) -> Flotilla {
        self.cmd.current_dir(dir);
        self
    }

    /// The command, for a test that spawns it or sets its streams.
    pub fn command(self) -> Command {
        self.cmd
    }

    /// Runs it to the end, whatever its exit status.
    pub fn output(mut self) -> Output {
        self.cmd
            .output()
            .unwrap_or_else(|e| panic!("run {:?}: {e}", self.cmd))
    }

    /// Runs it and panics, with both streams, unless it succeeds.
    pub fn ok(self) -> Output {
        let what = format!("{:?}", self.cmd);
        let out = self.output();
        assert!(out.status.success(), "{what}: {}", output_text(&out));
        out
    }

    /// Its standard output, as text, after it succeeds.
    pub fn stdout(self) -> String {
        String::from_utf8_lossy(&self.ok().stdout).into_owned()
    }

    /// Its standard output parsed as JSON, after it succeeds.
    pub fn json(self) -> serde_json::Value {
        json_of(&self.ok())
    }
}

impl Default for Flotilla {
    fn default() -> Flotilla {
        Flotilla::new()
    }
}

/// A finished run's standard output parsed as JSON (`--json`), whatever its exit status; the panic shows both
/// streams.
pub fn json_of(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", output_text(out)))
}

/// Polls `f` every 100 ms until it holds; panics, naming `what`, when `limit` passes first.
pub fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out after {limit:?} waiting for {what}");
}

/// The pids of live processes (zombies excluded: they have no command line) whose command line, its arguments
/// joined by spaces, contains every one of `words`.
pub fn processes_with(words: &[&str]) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let line = String::from_utf8_lossy(&raw).replace('\0', " ");
            !raw.is_empty() && words.iter().all(|w| line.contains(w))
        })
        .collect()
}
