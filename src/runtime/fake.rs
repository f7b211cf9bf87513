//! A [`Runtime`] that records what it was asked to do, for testing the supervisor without root or runc (the way
//! youki's `syscall::test` records mounts).
//!
//! It keeps a plausible state per container (create makes it `created` with the next scripted pid, start makes it
//! `running`, delete forgets it); a test scripts the rest: [`Recording::set_state`] for a process that died,
//! [`Recording::push_exec`] for probe results, [`Recording::fail`] for a runtime error.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use super::{Io, Runtime, RuntimeError, State, Status};

/// One call, with the arguments a test asserts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Create {
        id: String,
        bundle: PathBuf,
        pid_file: PathBuf,
    },
    Start(String),
    State(String),
    Kill {
        id: String,
        signal: i32,
        all: bool,
    },
    Delete {
        id: String,
        force: bool,
    },
    Exec {
        id: String,
        args: Vec<String>,
        timeout: Duration,
    },
    List,
}

/// What the next `exec` does.
#[derive(Debug, Clone)]
pub enum ExecOutcome {
    /// The command ran and exited with this code.
    Exits(i32),
    /// The runtime itself failed (a timeout, say) with this message.
    Fails(String),
}

#[derive(Debug, Default)]
struct Inner {
    calls: Vec<Call>,
    states: BTreeMap<String, State>,
    next_pid: u32,
    exec_results: VecDeque<ExecOutcome>,
    failures: HashMap<&'static str, String>,
}

#[derive(Debug, Default)]
pub struct Recording {
    inner: Mutex<Inner>,
}

impl Recording {
    pub fn new() -> Recording {
        Recording::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A test that panicked while holding the lock has already failed; its data is still worth reading.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    /// Replaces what `state(id)` reports (`None`: the runtime forgot it).
    pub fn set_state(&self, id: &str, state: Option<State>) {
        let mut inner = self.lock();
        match state {
            Some(s) => inner.states.insert(id.to_string(), s),
            None => inner.states.remove(id),
        };
    }

    /// What the next `exec` does; with none queued, it exits 0.
    pub fn push_exec(&self, result: ExecOutcome) {
        self.lock().exec_results.push_back(result);
    }

    /// Every later `command` (`"create"`, `"start"`…) fails with `message`, as runc would with its log line.
    pub fn fail(&self, command: &'static str, message: &str) {
        self.lock().failures.insert(command, message.to_string());
    }

    fn call(
        &self,
        command: &'static str,
        id: &str,
        call: Call,
    ) -> Result<MutexGuard<'_, Inner>, RuntimeError> {
        let mut inner = self.lock();
        inner.calls.push(call);
        match inner.failures.get(command) {
            Some(message) => Err(RuntimeError::Failed {
                runtime: PathBuf::from("fake"),
                command,
                id: id.to_string(),
                message: message.clone(),
            }),
            None => Ok(inner),
        }
    }

    fn unknown(command: &'static str, id: &str) -> RuntimeError {
        RuntimeError::Failed {
            runtime: PathBuf::from("fake"),
            command,
            id: id.to_string(),
            message: "container does not exist".to_string(),
        }
    }
}

impl Runtime for Recording {
    fn create(&self, id: &str, bundle: &Path, io: Io) -> Result<(), RuntimeError> {
        let call = Call::Create {
            id: id.to_string(),
            bundle: bundle.to_path_buf(),
            pid_file: io.pid_file.clone(),
        };
        let mut inner = self.call("create", id, call)?;
        inner.next_pid += 1;
        let pid = 1000 + inner.next_pid;
        inner.states.insert(
            id.to_string(),
            State {
                id: id.to_string(),
                status: Status::Created,
                pid,
                bundle: bundle.to_path_buf(),
            },
        );
        Ok(())
    }

    fn start(&self, id: &str) -> Result<(), RuntimeError> {
        let mut inner = self.call("start", id, Call::Start(id.to_string()))?;
        let state = inner
            .states
            .get_mut(id)
            .ok_or_else(|| Recording::unknown("start", id))?;
        state.status = Status::Running;
        Ok(())
    }

    fn state(&self, id: &str) -> Result<Option<State>, RuntimeError> {
        let inner = self.call("state", id, Call::State(id.to_string()))?;
        Ok(inner.states.get(id).cloned())
    }

    fn kill(&self, id: &str, signal: i32, all: bool) -> Result<(), RuntimeError> {
        let call = Call::Kill {
            id: id.to_string(),
            signal,
            all,
        };
        let inner = self.call("kill", id, call)?;
        // The process's reaction to the signal is the test's to script with set_state.
        match inner.states.contains_key(id) {
            true => Ok(()),
            false => Err(Recording::unknown("kill", id)),
        }
    }

    fn delete(&self, id: &str, force: bool) -> Result<(), RuntimeError> {
        let call = Call::Delete {
            id: id.to_string(),
            force,
        };
        let mut inner = self.call("delete", id, call)?;
        let running = inner
            .states
            .get(id)
            .is_some_and(|s| matches!(s.status, Status::Running | Status::Paused));
        if running && !force {
            return Err(RuntimeError::Failed {
                runtime: PathBuf::from("fake"),
                command: "delete",
                id: id.to_string(),
                message: "cannot delete container that is not stopped".to_string(),
            });
        }
        inner
            .states
            .remove(id)
            .map(drop)
            .ok_or_else(|| Recording::unknown("delete", id))
    }

    fn exec(&self, id: &str, args: &[String], timeout: Duration) -> Result<i32, RuntimeError> {
        let call = Call::Exec {
            id: id.to_string(),
            args: args.to_vec(),
            timeout,
        };
        let mut inner = self.call("exec", id, call)?;
        match inner.exec_results.pop_front() {
            Some(ExecOutcome::Exits(code)) => Ok(code),
            Some(ExecOutcome::Fails(message)) => Err(RuntimeError::Failed {
                runtime: PathBuf::from("fake"),
                command: "exec",
                id: id.to_string(),
                message,
            }),
            None => Ok(0),
        }
    }

    fn list(&self) -> Result<Vec<State>, RuntimeError> {
        let inner = self.call("list", "", Call::List)?;
        Ok(inner.states.values().cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;

    use super::*;

    fn io() -> Io {
        Io {
            stdout: File::open("/dev/null").unwrap().into(),
            stderr: File::open("/dev/null").unwrap().into(),
            pid_file: PathBuf::from("/run/web.pid"),
        }
    }

    #[test]
    fn records_calls_and_keeps_a_plausible_state() {
        let rt = Recording::new();
        rt.create("web", Path::new("/b/web"), io()).unwrap();
        assert_eq!(rt.state("web").unwrap().unwrap().status, Status::Created);
        rt.start("web").unwrap();
        assert_eq!(rt.state("web").unwrap().unwrap().status, Status::Running);
        rt.push_exec(ExecOutcome::Exits(1));
        assert_eq!(
            rt.exec("web", &["true".into()], Duration::from_secs(1))
                .unwrap(),
            1
        );
        assert_eq!(
            rt.exec("web", &["true".into()], Duration::from_secs(1))
                .unwrap(),
            0
        );
        assert!(rt.delete("web", false).is_err());
        rt.kill("web", 15, false).unwrap();
        let mut stopped = rt.state("web").unwrap().unwrap();
        stopped.status = Status::Stopped;
        rt.set_state("web", Some(stopped));
        rt.delete("web", false).unwrap();
        assert_eq!(rt.state("web").unwrap(), None);
        assert!(rt.list().unwrap().is_empty());
        assert_eq!(
            rt.calls()[0],
            Call::Create {
                id: "web".into(),
                bundle: "/b/web".into(),
                pid_file: "/run/web.pid".into()
            }
        );
        assert_eq!(rt.calls().len(), 12);
    }

    #[test]
    fn scripted_failures_carry_runc_s_message() {
        let rt = Recording::new();
        rt.fail("start", "exec format error");
        rt.create("web", Path::new("/b/web"), io()).unwrap();
        let e = rt.start("web").unwrap_err();
        assert!(e.to_string().contains("exec format error"), "{e}");
    }
}
