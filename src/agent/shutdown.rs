//! The machine shutting down. Each container runs in a cgroup of its own, outside `flotilla.service`, and the unit
//! stops with `KillMode=process` so that restarting or upgrading the agent leaves the apps alone. At shutdown that
//! same setting leaves them to systemd-shutdown's last round: SIGTERM to whatever still runs once journald and the
//! network are gone, then SIGKILL when its timeout ends. A container's init that ignores SIGTERM (a shell as PID 1
//! does) held a guest's reboot up for a minute that way. So when systemd stops the agent because the machine is
//! going down, the agent stops every container first, each by its supervisor with its own grace period, in
//! parallel, while the system is still whole.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::runtime::Runtime;
use crate::supervise::container::Container;
use crate::supervise::control;

/// Whether the service manager is taking the machine down: the one question the agent's SIGTERM leaves open.
pub trait SystemState {
    fn stopping(&self) -> bool;
}

/// systemd's own word, `systemctl is-system-running`: "stopping" from the moment a shutdown job runs. Reading it
/// from systemd (rather than, say, a runlevel file) keeps an operator's `systemctl stop flotilla` an agent-only
/// stop, as `KillMode=process` promises.
pub struct Systemd;

impl SystemState for Systemd {
    fn stopping(&self) -> bool {
        std::process::Command::new("systemctl")
            .arg("is-system-running")
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .output()
            .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "stopping")
    }
}

/// What the agent does once SIGTERM ended its loop: nothing more unless the machine is going down; then it stops
/// every supervised container and returns their names.
pub fn on_terminate(
    system: &dyn SystemState,
    state_dir: &Path,
    runtime: &Arc<dyn Runtime>,
) -> Vec<String> {
    if !system.stopping() {
        return Vec::new();
    }
    let (containers, longest) = supervised(state_dir);
    if containers.is_empty() {
        return Vec::new();
    }
    // Logged at the default level (warn): an operator asking why an app got SIGTERM finds the answer.
    tracing::warn!(
        "the system is shutting down: stopping {} container(s), the longest grace period {longest:?}",
        containers.len()
    );
    // The stop may outlast the unit's TimeoutStopSec= when an app's grace period is long: ask for its worst case,
    // a supervisor that does not answer included, so systemd does not kill the agent half-way through it.
    let usec = (control::stop_deadline(longest) + Duration::from_secs(5)).as_micros();
    let _ = sd_notify::notify(
        false,
        &[
            sd_notify::NotifyState::Stopping,
            sd_notify::NotifyState::ExtendTimeoutUsec(u32::try_from(usec).unwrap_or(u32::MAX)),
        ],
    );
    let stopped = stop_all(containers, runtime);
    tracing::warn!("stopped for the system shutdown: {}", stopped.join(", "));
    stopped
}

/// The containers a shutdown must stop (those with a live supervisor, or being made) and the longest grace period among them.
fn supervised(state_dir: &Path) -> (Vec<(Container, Duration)>, Duration) {
    let listed = Container::list(state_dir).unwrap_or_else(|e| {
        tracing::warn!(
            "cannot list the containers to stop: {}",
            crate::error_chain(&e)
        );
        Vec::new()
    });
    let containers: Vec<(Container, Duration)> = listed
        .into_iter()
        .filter(|c| c.is_locked())
        .map(|c| {
            let grace = c
                .spec()
                .map(|s| s.settings.stop_grace)
                .unwrap_or(crate::app::RunSettings::DEFAULT_STOP_GRACE);
            (c, grace)
        })
        .collect();
    let longest = containers.iter().map(|(_, g)| *g).max().unwrap_or_default();
    (containers, longest)
}

/// Stops every supervised container in parallel and waits for all of them; the names of those that stopped.
/// A failure is logged and the others go on: at shutdown there is no one to retry.
fn stop_all(containers: Vec<(Container, Duration)>, runtime: &Arc<dyn Runtime>) -> Vec<String> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = containers
            .into_iter()
            .map(|(c, grace)| {
                scope.spawn(move || match control::stop(&c, runtime, grace) {
                    Ok(()) => Some(c.name),
                    Err(e) => {
                        tracing::warn!(
                            "cannot stop {} for the system shutdown: {}",
                            c.name,
                            crate::error_chain(&e)
                        );
                        None
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| h.join().ok().flatten())
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::fake::Recording;
    use crate::supervise::container::ContainerSpec;

    struct Running;
    impl SystemState for Running {
        fn stopping(&self) -> bool {
            false
        }
    }

    #[test]
    fn an_agent_stopped_while_the_system_runs_leaves_its_containers_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (c, made) = Container::create(dir.path(), &ContainerSpec::example("app")).unwrap();
        // This test process plays the container's live supervisor.
        let _lock = c.claim_lock(made).unwrap();
        let recording = Arc::new(Recording::new());
        let runtime: Arc<dyn Runtime> = recording.clone();
        assert!(on_terminate(&Running, dir.path(), &runtime).is_empty());
        assert_eq!(
            c.stop_requested(),
            None,
            "no stop was asked of the supervisor"
        );
        assert!(recording.calls().is_empty(), "{:?}", recording.calls());
    }
}
