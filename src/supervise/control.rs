//! What the commands do to a container from outside its supervisor: start a supervisor process, stop, remove,
//! and adopt containers whose supervisor died.

use std::os::fd::AsFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::container::{Container, State};
use super::supervisor::SuperviseError;
use crate::runtime::{self, Runtime};

/// Time a supervisor gets to take its lock and report after it is spawned.
const SPAWN_WAIT: Duration = Duration::from_secs(30);
/// Added to the grace period while waiting for a stop: the runtime's own commands and the final status write.
const STOP_SLACK: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(50);
/// Time for a supervisor to die after SIGKILL: long only for a process stuck in the kernel.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// The descriptor number a supervisor is handed its container's lock on.
pub const LOCK_FD: i32 = 3;

/// Starts `flotilla supervise NAME` in its own session, detached from the caller, and waits until it holds the
/// container's lock. Its own messages go to `supervisor.log` in the container's directory.
///
/// `made` is the lock the container's creator holds ([`Container::create`]): the supervisor inherits that very
/// lock, so the container is never unlocked between its making and its supervision. The caller keeps its own
/// handle until this returns, and so still holds the lock to clean up with when the supervisor failed.
pub fn spawn_supervisor(
    state_dir: &Path,
    container: &Container,
    made: Option<&std::fs::File>,
) -> Result<(), SuperviseError> {
    let io = |what: &str| {
        let what = what.to_string();
        let name = container.name.clone();
        move |source| SuperviseError::Io { what, name, source }
    };
    let exe = std::env::current_exe().map_err(io("the path of the flotilla binary"))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(container.dir.join("supervisor.log"))
        .map_err(io("supervisor.log"))?;
    let mut command = Command::new(exe);
    command
        .arg("--state-dir")
        .arg(state_dir)
        .arg("supervise")
        .arg(&container.name);
    if let Some(lock) = made {
        crate::sys::hand_over_fd(&mut command, lock.as_fd(), LOCK_FD);
        command.arg("--lock-fd").arg(LOCK_FD.to_string());
    }
    let mut child = command
        // The agent's systemd notification socket is the agent's: runc hands NOTIFY_SOCKET on to the container
        // and waits for the app to say READY, which a plain app never does.
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(io("the supervisor process"))?;
    let deadline = Instant::now() + SPAWN_WAIT;
    while Instant::now() < deadline {
        if container.supervisor_pid().is_some() {
            // The supervisor outlives us; its exit is reaped by whoever inherits it.
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            // A container that ends at once (a wrong variant dies on its first instruction) can take its
            // supervisor's whole life between two polls: exit 0 means it ran the container and recorded the end.
            if status.success() {
                return Ok(());
            }
            return Err(SuperviseError::Io {
                what: format!(
                    "the supervisor (it exited with {status}; see {})",
                    container.dir.join("supervisor.log").display()
                ),
                name: container.name.clone(),
                source: std::io::Error::other("supervisor ended at start"),
            });
        }
        std::thread::sleep(POLL);
    }
    Err(SuperviseError::Io {
        what: "the supervisor".to_string(),
        name: container.name.clone(),
        source: std::io::Error::from(std::io::ErrorKind::TimedOut),
    })
}

/// Waits until the container has left `Created` (its first start was tried) or its supervisor ended.
pub fn wait_started(container: &Container, limit: Duration) -> State {
    let deadline = crate::clock::after(Instant::now(), limit);
    loop {
        let state = container.status().state;
        if state != State::Created
            || container.supervisor_pid().is_none()
            || Instant::now() >= deadline
        {
            return state;
        }
        std::thread::sleep(POLL);
    }
}

/// The container's supervisor, once any process that is still making the container (it holds the lock without
/// naming a supervisor) has handed it over or given up.
fn supervisor_after_making(container: &Container) -> Option<i32> {
    let deadline = Instant::now() + SPAWN_WAIT;
    loop {
        let pid = container.supervisor_pid();
        if pid.is_some() || !container.is_locked() || Instant::now() >= deadline {
            return pid;
        }
        std::thread::sleep(POLL);
    }
}

/// The longest a [`stop`] can take: the grace period, the supervisor's own slack, then, should the supervisor not
/// answer, the wait for it to die and the runtime's kill and delete. What a caller tells systemd it needs.
pub fn stop_deadline(grace: Duration) -> Duration {
    grace + STOP_SLACK + KILL_WAIT + STOP_SLACK
}

/// Stops the container: through its supervisor when one lives (so that it records the stop and does not restart),
/// else directly through the runtime. Returns once the container's process is gone.
///
/// A supervisor that does not finish within the grace period and its slack (stopped, stuck on a slow machine) is
/// killed, and the container is killed through the runtime at once, its grace period being spent: a stop must
/// not hang on the process that failed to do it.
pub fn stop(
    container: &Container,
    runtime: &Arc<dyn Runtime>,
    grace: Duration,
) -> Result<(), SuperviseError> {
    if let Some(pid) = supervisor_after_making(container) {
        container.request_stop(grace)?;
        if let Some(pid) = rustix::process::Pid::from_raw(pid) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        if wait_unlocked(container, grace + STOP_SLACK) {
            container.clear_stop_request();
            return Ok(());
        }
        tracing::warn!(
            container = %container.name,
            "the supervisor did not stop the container within {:?}: killing the supervisor, then the container",
            grace + STOP_SLACK
        );
        // Read again from the lock that is still held: a live process, not a number recycled since the SIGTERM.
        if let Some(pid) = container
            .supervisor_pid()
            .and_then(rustix::process::Pid::from_raw)
        {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
        if !wait_unlocked(container, KILL_WAIT) {
            tracing::warn!(container = %container.name, "the supervisor survived SIGKILL for {KILL_WAIT:?}");
        }
        return stop_unsupervised(container, runtime, Duration::ZERO);
    }
    stop_unsupervised(container, runtime, grace)
}

/// Waits up to `limit` for the container's lock to be free; whether it is.
fn wait_unlocked(container: &Container, limit: Duration) -> bool {
    let deadline = crate::clock::after(Instant::now(), limit);
    while container.is_locked() && Instant::now() < deadline {
        std::thread::sleep(POLL);
    }
    !container.is_locked()
}

/// SIGTERM and `grace` (none when zero), then SIGKILL to every process of the container, then the runtime's
/// delete.
fn stop_unsupervised(
    container: &Container,
    runtime: &Arc<dyn Runtime>,
    grace: Duration,
) -> Result<(), SuperviseError> {
    let id = &container.name;
    let running = |rt: &Arc<dyn Runtime>| -> Result<bool, SuperviseError> {
        Ok(rt.state(id)?.is_some_and(|s| {
            matches!(
                s.status,
                runtime::Status::Running | runtime::Status::Paused | runtime::Status::Created
            )
        }))
    };
    if running(runtime)? {
        if !grace.is_zero() {
            let _ = runtime.kill(id, libc::SIGTERM, false);
            let deadline = crate::clock::after(Instant::now(), grace);
            while running(runtime)? && Instant::now() < deadline {
                std::thread::sleep(POLL);
            }
        }
        if running(runtime)? {
            let _ = runtime.kill(id, libc::SIGKILL, true);
            let deadline = Instant::now() + STOP_SLACK;
            while running(runtime)? && Instant::now() < deadline {
                std::thread::sleep(POLL);
            }
        }
    }
    if runtime.state(id)?.is_some() {
        runtime.delete(id, true)?;
    }
    let mut status = container.status();
    if !status.state.is_final() {
        status.state = State::Stopped;
        status.pid = None;
        status.health = None;
        container.write_status(&status)?;
    }
    container.clear_stop_request();
    Ok(())
}

/// Containers whose supervisor died while they still had work (running, restarting, or not yet started): each gets
/// a new supervisor, which adopts a running container rather than starting a second one. Returns their names.
pub fn adopt_orphans(state_dir: &Path) -> Result<Vec<String>, SuperviseError> {
    let mut adopted = Vec::new();
    for c in Container::list(state_dir)? {
        // Locked without a supervisor is a container being made or removed: its maker or remover owns it.
        if !c.is_locked() && !c.status().state.is_final() {
            spawn_supervisor(state_dir, &c, None)?;
            adopted.push(c.name.clone());
        }
    }
    Ok(adopted)
}

/// Whether the container's own process runs, by the runtime's word.
pub fn is_running(container: &Container, runtime: &dyn Runtime) -> bool {
    runtime
        .state(&container.name)
        .ok()
        .flatten()
        .is_some_and(|s| s.status == runtime::Status::Running)
}

/// Stops the container if it runs and removes it entirely: the runtime's record, its root's mounts and its
/// directory. Named volumes stay.
pub fn remove(
    container: &Container,
    runtime: &Arc<dyn Runtime>,
    grace: Duration,
) -> Result<(), SuperviseError> {
    let alive = container.is_locked() || is_running(container, runtime.as_ref());
    if alive || !container.status().state.is_final() {
        stop(container, runtime, grace)?;
    }
    // Removed only by whoever holds the lock: a supervisor that adopted the container meanwhile keeps it.
    let _held = container.hold()?;
    if runtime.state(&container.name)?.is_some() {
        runtime.delete(&container.name, true)?;
    }
    crate::unpack::rootfs::release(&container.dir)?;
    std::fs::remove_dir_all(&container.dir).map_err(|source| SuperviseError::Io {
        what: format!("removing {}", container.dir.display()),
        name: container.name.clone(),
        source,
    })
}
