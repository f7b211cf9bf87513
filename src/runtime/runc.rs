//! [`Runtime`] through runc's command line (crun and youki accept the same one).
//!
//! flotilla's containers live under their own `--root` (`<state_dir>/runc`), apart from Docker's or containerd's.
//! runc writes its errors as JSON lines to one `--log` file; after a failed command the lines it added are read
//! back, so the error says what runc said rather than only its exit status. Commands whose stdio is the container's
//! (`create`) cannot be captured any other way.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::{Io, Runtime, State};

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(
        "the container runtime {path} is not there: install it (apt install runc), or set the runtime path to \
         another OCI runtime (crun, youki)"
    )]
    Missing { path: PathBuf },
    #[error(
        "running containers needs root: run flotilla as root (sudo, or through its systemd unit)"
    )]
    NotRoot,
    #[error("could not run {path}")]
    Spawn { path: PathBuf, source: io::Error },
    #[error("{runtime} {command} {id}: {message}")]
    Failed {
        runtime: PathBuf,
        command: &'static str,
        id: String,
        message: String,
    },
    #[error("{runtime} {command}: unexpected output ({output:?})")]
    Output {
        runtime: PathBuf,
        command: &'static str,
        output: String,
        source: serde_json::Error,
    },
    #[error("{args:?} in container {id} ran longer than {timeout:?} and was killed")]
    ExecTimeout {
        id: String,
        args: Vec<String>,
        timeout: Duration,
    },
    #[error("{path}")]
    Io { path: PathBuf, source: io::Error },
}

/// runc (or a runtime with its command line) with flotilla's own state root.
#[derive(Debug)]
pub struct Runc {
    binary: PathBuf,
    root: PathBuf,
    log: PathBuf,
    /// Makes each exec's pid file name unique within this process.
    execs: AtomicU64,
}

impl Runc {
    /// Where Debian's `runc` package installs it.
    pub const DEFAULT_BINARY: &'static str = "/usr/sbin/runc";

    /// Checks that `binary` exists and that we are root, and makes `<state_dir>/runc`.
    pub fn new(binary: &Path, state_dir: &Path) -> Result<Runc, RuntimeError> {
        if !binary.is_file() {
            return Err(RuntimeError::Missing {
                path: binary.to_path_buf(),
            });
        }
        if !rustix::process::geteuid().is_root() {
            return Err(RuntimeError::NotRoot);
        }
        let root = state_dir.join("runc");
        fs::create_dir_all(&root).map_err(|source| RuntimeError::Io {
            path: root.clone(),
            source,
        })?;
        Ok(Runc {
            binary: binary.to_path_buf(),
            log: state_dir.join("runc-log.json"),
            root,
            execs: AtomicU64::new(0),
        })
    }

    fn command(&self, subcommand: &str) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--root")
            .arg(&self.root)
            .arg("--log")
            .arg(&self.log)
            .arg("--log-format")
            .arg("json")
            .arg(subcommand)
            .stdin(Stdio::null());
        cmd
    }

    fn log_len(&self) -> u64 {
        fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0)
    }

    /// The errors runc logged after `offset`, or `None` when it logged none.
    fn logged_errors(&self, offset: u64) -> Option<String> {
        let mut text = String::new();
        let mut f = File::open(&self.log).ok()?;
        f.seek(SeekFrom::Start(offset)).ok()?;
        // Bounded: a runaway log must not make an error message megabytes long.
        f.take(64 << 10).read_to_string(&mut text).ok()?;
        let messages = errors_in_log(&text);
        (!messages.is_empty()).then(|| messages.join("; "))
    }

    fn spawn_error(&self, source: io::Error) -> RuntimeError {
        if source.kind() == io::ErrorKind::NotFound {
            RuntimeError::Missing {
                path: self.binary.clone(),
            }
        } else {
            RuntimeError::Spawn {
                path: self.binary.clone(),
                source,
            }
        }
    }

    fn failed(
        &self,
        command: &'static str,
        id: &str,
        offset: u64,
        stderr: &[u8],
        status: ExitStatus,
    ) -> RuntimeError {
        let stderr = String::from_utf8_lossy(stderr).trim().to_string();
        let message = self
            .logged_errors(offset)
            .or_else(|| (!stderr.is_empty()).then_some(stderr))
            .unwrap_or_else(|| format!("failed with {status}"));
        RuntimeError::Failed {
            runtime: self.binary.clone(),
            command,
            id: id.to_string(),
            message,
        }
    }

    /// Runs a command whose output is runc's own, returning its stdout.
    fn run(
        &self,
        command: &'static str,
        id: &str,
        mut cmd: Command,
    ) -> Result<Vec<u8>, RuntimeError> {
        let offset = self.log_len();
        let out = cmd.output().map_err(|e| self.spawn_error(e))?;
        if out.status.success() {
            Ok(out.stdout)
        } else {
            Err(self.failed(command, id, offset, &out.stderr, out.status))
        }
    }

    fn parse<T: for<'de> Deserialize<'de>>(
        &self,
        command: &'static str,
        output: &[u8],
    ) -> Result<T, RuntimeError> {
        serde_json::from_slice(output).map_err(|source| RuntimeError::Output {
            runtime: self.binary.clone(),
            command,
            output: String::from_utf8_lossy(output).chars().take(200).collect(),
            source,
        })
    }
}

/// The `msg` of each error line in runc's JSON log.
fn errors_in_log(text: &str) -> Vec<String> {
    #[derive(Deserialize)]
    struct Line {
        level: String,
        msg: String,
    }
    text.lines()
        .filter_map(|l| serde_json::from_str::<Line>(l).ok())
        .filter(|l| matches!(l.level.as_str(), "error" | "fatal" | "panic"))
        .map(|l| l.msg)
        .collect()
}

/// The shell's convention, which health checks report: 128 + n for a process killed by signal n.
fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

/// How long a timed-out `runc exec` may take to start its process, so that the process can be killed by its pid.
const EXEC_SETTLE: Duration = Duration::from_secs(5);

impl Runtime for Runc {
    fn create(&self, id: &str, bundle: &Path, io: Io) -> Result<(), RuntimeError> {
        let mut cmd = self.command("create");
        cmd.arg("--bundle")
            .arg(bundle)
            .arg("--pid-file")
            .arg(&io.pid_file)
            .arg(id)
            .stdout(Stdio::from(io.stdout))
            .stderr(Stdio::from(io.stderr));
        let offset = self.log_len();
        let status = cmd.status().map_err(|e| self.spawn_error(e))?;
        if status.success() {
            Ok(())
        } else {
            Err(self.failed("create", id, offset, &[], status))
        }
    }

    fn start(&self, id: &str) -> Result<(), RuntimeError> {
        let mut cmd = self.command("start");
        cmd.arg(id);
        self.run("start", id, cmd).map(drop)
    }

    fn state(&self, id: &str) -> Result<Option<State>, RuntimeError> {
        let mut cmd = self.command("state");
        cmd.arg(id);
        match self.run("state", id, cmd) {
            Ok(out) => self.parse("state", &out).map(Some),
            Err(RuntimeError::Failed { message, .. }) if message.contains("does not exist") => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    fn kill(&self, id: &str, signal: i32, all: bool) -> Result<(), RuntimeError> {
        let mut cmd = self.command("kill");
        if all {
            cmd.arg("--all");
        }
        cmd.arg(id).arg(signal.to_string());
        self.run("kill", id, cmd).map(drop)
    }

    fn delete(&self, id: &str, force: bool) -> Result<(), RuntimeError> {
        let mut cmd = self.command("delete");
        if force {
            cmd.arg("--force");
        }
        cmd.arg(id);
        self.run("delete", id, cmd).map(drop)
    }

    fn exec(&self, id: &str, args: &[String], timeout: Duration) -> Result<i32, RuntimeError> {
        let n = self.execs.fetch_add(1, Ordering::Relaxed);
        let pid_file = self
            .root
            .join(format!("exec-{}-{n}.pid", std::process::id()));
        let mut cmd = self.command("exec");
        // Without --user runc takes the user, groups and capabilities from the container's config.json.
        cmd.arg("--pid-file")
            .arg(&pid_file)
            .arg(id)
            .args(args)
            // The probe's own output is not kept: only its exit code is the verdict, and an unread pipe would
            // block a chatty probe until its timeout.
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // A group of its own: runc's helper processes and the probe it starts are in it, so a timeout kills
            // them all at once. Killing runc alone left its helpers orphaned, and a helper that is never reaped
            // keeps the container's dying PID namespace from ending.
            .process_group(0);
        let offset = self.log_len();
        let mut child = cmd.spawn().map_err(|e| self.spawn_error(e))?;
        let deadline = crate::clock::after(Instant::now(), timeout);
        let status = loop {
            let waited = child.try_wait().map_err(|e| self.spawn_error(e));
            match waited {
                Ok(Some(status)) => break Ok(status),
                Ok(None) if Instant::now() >= deadline => break Err(()),
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => {
                    let _ = fs::remove_file(&pid_file);
                    return Err(e);
                }
            }
        };
        let result = match status {
            Ok(status) => {
                // runc's own failure (no such binary in the image, container not running) is an error, not the
                // probe's verdict; the probe's exit code is reported as it is.
                match self.logged_errors(offset) {
                    Some(message) => Err(RuntimeError::Failed {
                        runtime: self.binary.clone(),
                        command: "exec",
                        id: id.to_string(),
                        message,
                    }),
                    None => Ok(exit_code(status)),
                }
            }
            Err(()) => {
                // Killing runc alone would leave the probe running inside the container (runc's init makes it a
                // session of its own, out of runc's group): kill the process runc started, by the pid it writes
                // once the process exists. A timeout during runc's own setup (a slow CPU) waits for that, bounded.
                let settle = Instant::now() + EXEC_SETTLE;
                loop {
                    let pid = fs::read_to_string(&pid_file)
                        .ok()
                        .and_then(|p| p.trim().parse::<i32>().ok())
                        .and_then(rustix::process::Pid::from_raw);
                    if let Some(pid) = pid {
                        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                        break;
                    }
                    if !matches!(child.try_wait(), Ok(None)) || Instant::now() >= settle {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                if let Some(group) = i32::try_from(child.id())
                    .ok()
                    .and_then(rustix::process::Pid::from_raw)
                {
                    let _ =
                        rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
                }
                let _ = child.kill();
                let _ = child.wait();
                Err(RuntimeError::ExecTimeout {
                    id: id.to_string(),
                    args: args.to_vec(),
                    timeout,
                })
            }
        };
        let _ = fs::remove_file(&pid_file);
        result
    }

    fn list(&self) -> Result<Vec<State>, RuntimeError> {
        let mut cmd = self.command("list");
        cmd.arg("--format").arg("json");
        let out = self.run("list", "", cmd)?;
        // runc prints `null` when there are no containers.
        let states: Option<Vec<State>> = self.parse("list", &out)?;
        Ok(states.unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_error_lines_of_the_log_become_the_message() {
        let log = r#"{"level":"warning","msg":"deprecated","time":"2026-01-01T00:00:00Z"}
not json
{"level":"error","msg":"runc run failed: unable to start container process: exec: \"/app\": exec format error","time":"2026-01-01T00:00:00Z"}
{"level":"fatal","msg":"second","time":"2026-01-01T00:00:00Z"}"#;
        assert_eq!(
            errors_in_log(log),
            vec![
                "runc run failed: unable to start container process: exec: \"/app\": exec format error",
                "second"
            ]
        );
    }

    #[test]
    fn a_missing_binary_names_the_path_and_the_package() {
        let e = Runc::new(Path::new("/nonexistent/runc"), Path::new("/tmp")).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("/nonexistent/runc"), "{text}");
        assert!(text.contains("apt install runc"), "{text}");
    }

    #[test]
    fn states_read_as_runc_prints_them() {
        let json = r#"{"ociVersion":"1.0.2-dev","id":"web","pid":4242,"status":"running","bundle":"/b","rootfs":"/b/rootfs","created":"2026-01-01T00:00:00Z","owner":""}"#;
        let s: State = serde_json::from_str(json).unwrap();
        assert_eq!(s.status, super::super::Status::Running);
        assert_eq!(s.pid, 4242);
    }
}
