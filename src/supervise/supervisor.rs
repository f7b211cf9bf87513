//! The supervisor of one container: starts it through the runtime, pumps its output into the logs, probes its
//! health, restarts it by its policy, stops it gracefully, and adopts it after a supervisor restart.
//!
//! The supervisor is the container's parent: it makes itself a child subreaper while `runc create` runs, so when
//! that command exits the init is re-parented to the supervisor and its exit status (the code, or the signal)
//! reaches us through `waitpid`. It stops being a subreaper as soon as the create returns: every other orphan
//! (the helpers of a health probe's `runc exec` that timed out on a slow CPU) then goes to the system's init,
//! which reaps it. A supervisor that stayed a subreaper would have to reap them itself, and a `waitpid(-1)` of its
//! own would steal the exit statuses of the runtime commands it waits for; an orphan nobody reaps keeps the
//! container's dying PID namespace alive, and `runc delete` then fails at the stop. A supervisor that finds its
//! container already running (it died, and this is its successor) is not the parent; it watches the process
//! through a pidfd, which tells that it ended but not how.
//!
//! The container's stdout and stderr are FIFOs in its directory, handed to the container opened read-write. The
//! container then holds a reader of its own pipe, so when the supervisor dies the container's writes never fail
//! with EPIPE (they block once the 64 KiB pipe buffer is full, until the next supervisor drains it) and a new
//! supervisor reopens the same FIFOs by name.

use std::future::Future;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustix::fs::{Mode, OFlags};
use tokio::io::AsyncReadExt;
use tokio::sync::watch;

use super::container::{
    ArchFailure, Container, ContainerError, ContainerSpec, Exit, State, Status,
};
use super::health;
use super::logs::{LineSplitter, LogLimits, LogWriter, Stream};
use super::policy::{self, Backoff, Decision, Failure, Health, HealthState, StopReason};
use crate::clock::Clock;
use crate::runtime::{self, Io, Runtime, RuntimeError};

/// How much of the container's last output is kept to classify a failure: the Go runtime's and the loader's
/// messages are one or two lines just before the exit.
const TAIL_BYTES: usize = 4096;
/// Time for the container to die after SIGKILL before we give up waiting (a process stuck in D state).
const KILL_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    #[error(transparent)]
    Container(#[from] ContainerError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("cannot prepare {what} for container {name}: {source}")]
    Io {
        what: String,
        name: String,
        source: io::Error,
    },
    #[error("a background task of the supervisor failed: {0}")]
    Task(String),
    #[error(transparent)]
    Unpack(#[from] crate::unpack::UnpackError),
    #[error(
        "the runtime wrote no pid file for container {name}: {source}; see the runtime's log line above"
    )]
    NoPidFile { name: String, source: io::Error },
    #[error("the runtime's pid file for container {name} holds {text:?}, not a pid")]
    BadPidFile { name: String, text: String },
}

/// A stop asked of the supervisor: the grace period between SIGTERM and SIGKILL.
pub type StopRequest = watch::Receiver<Option<Duration>>;

/// The last bytes of the container's output, shared by the two pumps.
#[derive(Debug, Default, Clone)]
struct Tail(Arc<Mutex<Vec<u8>>>);

impl Tail {
    fn push(&self, line: &[u8]) {
        if let Ok(mut t) = self.0.lock() {
            t.extend_from_slice(line);
            t.push(b'\n');
            if t.len() > TAIL_BYTES {
                let cut = t.len() - TAIL_BYTES;
                t.drain(..cut);
            }
        }
    }

    fn take(&self) -> String {
        self.0
            .lock()
            .map(|mut t| String::from_utf8_lossy(&std::mem::take(&mut *t)).into_owned())
            .unwrap_or_default()
    }
}

fn health_word(h: Health) -> &'static str {
    match h {
        Health::Starting => "starting",
        Health::Healthy => "healthy",
        Health::Unhealthy => "unhealthy",
    }
}

/// How a run of the container ended.
enum Ended {
    Exited(Exit),
    /// The runtime could not start it; its message.
    NotStarted(String),
}

pub struct Supervisor {
    container: Container,
    spec: ContainerSpec,
    runtime: Arc<dyn Runtime>,
    limits: LogLimits,
    status: Status,
    /// Timestamps, how long a run lasted (which resets the restart backoff), the waits between restarts and
    /// between health probes, and the stop's grace period.
    clock: Arc<dyn Clock>,
}

impl Supervisor {
    pub fn new(
        container: Container,
        runtime: Arc<dyn Runtime>,
        clock: Arc<dyn Clock>,
    ) -> Result<Supervisor, SuperviseError> {
        let spec = container.spec()?;
        let status = container.status();
        Ok(Supervisor {
            container,
            spec,
            runtime,
            limits: LogLimits::default(),
            status,
            clock,
        })
    }

    fn save(&self) -> Result<(), SuperviseError> {
        Ok(self.container.write_status(&self.status)?)
    }

    fn io_err(&self, what: &str) -> impl FnOnce(io::Error) -> SuperviseError {
        let what = what.to_string();
        let name = self.container.name.clone();
        move |source| SuperviseError::Io { what, name, source }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Runtime) -> Result<T, RuntimeError> + Send + 'static,
    ) -> Result<T, SuperviseError> {
        let rt = self.runtime.clone();
        tokio::task::spawn_blocking(move || f(rt.as_ref()))
            .await
            .map_err(|e| SuperviseError::Task(e.to_string()))?
            .map_err(SuperviseError::from)
    }

    /// Runs until the container is finished with: it exited and the policy says not to restart, it could not be
    /// started, or a stop was requested. Returns the final status.
    pub async fn run(mut self, mut stop: StopRequest) -> Result<Status, SuperviseError> {
        let id = self.container.name.clone();
        let mut streak: u32 = 0;
        // Adoption: a container that is still up was started by a supervisor that has since died.
        let mut adopted = match self
            .blocking({
                let id = id.clone();
                move |rt| rt.state(&id)
            })
            .await?
        {
            Some(s) if matches!(s.status, runtime::Status::Running | runtime::Status::Paused) => {
                Some(s.pid as i32)
            }
            Some(_) => {
                // Created but never started, or stopped: nothing worth keeping from a dead supervisor's attempt.
                let id2 = id.clone();
                self.blocking(move |rt| rt.delete(&id2, true)).await?;
                None
            }
            None => None,
        };
        if adopted.is_some() {
            self.status.message = Some("adopted after a supervisor restart".to_string());
            tracing::info!(container = %id, "adopting the running container");
        }
        loop {
            if stop.borrow().is_some() {
                self.status.state = State::Stopped;
                self.save()?;
                return Ok(self.status);
            }
            let tail = Tail::default();
            let pumps = self.start_pumps(&tail)?;
            let started = self.clock.now();
            let ended = match adopted.take() {
                Some(pid) => {
                    self.status.state = State::Running;
                    self.status.pid = Some(pid);
                    self.save()?;
                    self.watch(Child::Adopted(pid), &mut stop).await?
                }
                None => match self.start(&id).await {
                    Ok(pid) => {
                        self.status.state = State::Running;
                        self.status.pid = Some(pid);
                        self.status.started_at = Some(super::logs::timestamp(started));
                        self.status.exit = None;
                        self.status.health = self
                            .spec
                            .settings
                            .health
                            .as_ref()
                            .map(|_| "starting".to_string());
                        self.save()?;
                        self.watch(Child::Own(pid), &mut stop).await?
                    }
                    Err(e) => Ended::NotStarted(crate::error_chain(&e)),
                },
            };
            pumps.finish().await;
            let stopping = stop.borrow().is_some();
            let id2 = id.clone();
            if let Err(e) = self.blocking(move |rt| rt.delete(&id2, true)).await {
                tracing::warn!(container = %id, "cannot delete the runtime's container: {e}");
            }
            self.status.pid = None;
            self.status.finished_at = Some(super::logs::timestamp(self.clock.now()));
            let output = tail.take();
            let (exit, runtime_error) = match &ended {
                Ended::Exited(exit) => (Some(*exit), None),
                Ended::NotStarted(m) => (None, Some(m.as_str())),
            };
            self.status.exit = exit;
            // An exit nobody saw (adopted) counts as a failure: keeping the app up matters more than guessing.
            let policy_exit = exit.map(|e| match (e.code, e.signal) {
                (Some(c), _) => policy::Exit::Code(c),
                (None, Some(sig)) => policy::Exit::Signal(sig),
                (None, None) => policy::Exit::Code(-1),
            });
            let classification = policy::classify(&Failure {
                exit: policy_exit,
                runtime_error,
                output: &output,
            });
            if let Some(c) = &classification {
                self.status.wrong_architecture = Some(ArchFailure {
                    evidence: c.evidence.clone(),
                    host: self.spec.host.clone(),
                });
            }
            self.status.message = runtime_error
                .map(str::to_string)
                .or_else(|| exit.map(|e| e.describe()));
            if stopping {
                self.status.state = State::Stopped;
                self.status.health = None;
                self.save()?;
                return Ok(self.status);
            }
            // A container the runtime refused to create will be refused again: it is failed, not restarted.
            let Some(policy_exit) = policy_exit else {
                self.status.state = State::Failed;
                self.status.health = None;
                self.save()?;
                return Ok(self.status);
            };
            let ran_for = self.clock.now().duration_since(started).unwrap_or_default();
            match policy::restart(
                self.spec.settings.restart,
                policy_exit,
                ran_for,
                streak,
                classification.as_ref(),
                &Backoff::default(),
            ) {
                Decision::Stop(reason) => {
                    if let StopReason::GaveUp { failures } = reason {
                        self.status.message = Some(format!(
                            "{}; gave up after {failures} failures in a row",
                            self.status.message.as_deref().unwrap_or("failed")
                        ));
                    }
                    self.status.state = State::Exited;
                    self.status.health = None;
                    self.save()?;
                    return Ok(self.status);
                }
                Decision::Restart { after, streak: s } => {
                    streak = s;
                    self.status.state = State::Restarting;
                    self.save()?;
                    let clock = self.clock.clone();
                    tokio::select! {
                        _ = clock.sleep(after) => {}
                        _ = stop.changed() => {}
                    }
                    if stop.borrow().is_none() {
                        self.status.restarts += 1;
                    }
                }
            }
        }
    }

    /// Creates and starts the container, returning its pid.
    async fn start(&mut self, id: &str) -> Result<i32, SuperviseError> {
        let opened = (|| -> io::Result<(OwnedFd, OwnedFd)> {
            Ok((
                self.container_end(Stream::Stdout)?,
                self.container_end(Stream::Stderr)?,
            ))
        })();
        let (stdout, stderr) = opened.map_err(self.io_err("the output pipes"))?;
        let pid_file = self.container.dir.join("init.pid");
        let _ = std::fs::remove_file(&pid_file);
        let io = Io {
            stdout,
            stderr,
            pid_file: pid_file.clone(),
        };
        let bundle = self.container.bundle_dir();
        let id_owned = id.to_string();
        let reaper = Subreaper::set().map_err(self.io_err("the subreaper (prctl)"))?;
        let created = self
            .blocking({
                let id = id_owned.clone();
                move |rt| rt.create(&id, &bundle, io)
            })
            .await;
        drop(reaper);
        let started = match created {
            Ok(()) => self.blocking(move |rt| rt.start(&id_owned)).await,
            Err(e) => Err(e),
        };
        started?;
        let name = self.container.name.clone();
        let text =
            std::fs::read_to_string(&pid_file).map_err(|source| SuperviseError::NoPidFile {
                name: name.clone(),
                source,
            })?;
        text.trim()
            .parse()
            .map_err(|_| SuperviseError::BadPidFile { name, text })
    }

    /// The container's end of one output FIFO, opened read-write (see the module doc); `start_pumps` made it.
    fn container_end(&self, stream: Stream) -> io::Result<OwnedFd> {
        let path = self.container.fifo(stream.as_str());
        Ok(rustix::fs::open(
            &path,
            OFlags::RDWR | OFlags::CLOEXEC,
            Mode::empty(),
        )?)
    }

    fn start_pumps(&self, tail: &Tail) -> Result<Pumps, SuperviseError> {
        let writer = LogWriter::open(&self.container.log_dir(), self.limits)
            .map_err(self.io_err("the log directory"))?;
        let writer = Arc::new(Mutex::new(writer));
        let (done_tx, done_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        for stream in [Stream::Stdout, Stream::Stderr] {
            let path = self.container.fifo(stream.as_str());
            make_fifo(&path).map_err(self.io_err("the output pipe"))?;
            // Read-write, so the pipe never reads as ended while no container holds it (between runs, or before
            // create): the end of a run comes from the wait, and the pump then drains what is left.
            let receiver = tokio::net::unix::pipe::OpenOptions::new()
                .read_write(true)
                .open_receiver(&path)
                .map_err(self.io_err("the output pipe"))?;
            let writer = writer.clone();
            let tail = tail.clone();
            let name = self.container.name.clone();
            let journal = std::env::var_os("JOURNAL_STREAM").is_some();
            let clock = self.clock.clone();
            let mut done = done_rx.clone();
            tasks.push(tokio::spawn(async move {
                let mut receiver = receiver;
                let mut splitter = LineSplitter::default();
                let mut buf = vec![0u8; 16 * 1024];
                let mut emit = |line: &[u8]| {
                    if let Ok(mut w) = writer.lock() {
                        if let Err(e) = w.line(stream, line, clock.now()) {
                            tracing::warn!(container = %name, "cannot write the log: {e}");
                        }
                    }
                    if stream == Stream::Stderr {
                        tail.push(line);
                    }
                    if journal {
                        tracing::info!(target: "container", container = %name, stream = stream.as_str(), "{}", String::from_utf8_lossy(line));
                    }
                };
                loop {
                    tokio::select! {
                        read = receiver.read(&mut buf) => match read {
                            Ok(0) | Err(_) => break,
                            Ok(n) => splitter.feed(&buf[..n], &mut emit),
                        },
                        _ = done.changed() => {
                            // The container is gone: take what it left in the pipe, without waiting for more.
                            // A plain read on the non-blocking fd, not tokio's `try_read`: that one answers
                            // WouldBlock from the reactor's cached readiness when the last write arrived after the
                            // reactor's last poll, and the app's final lines were lost.
                            loop {
                                match rustix::io::read(receiver.as_fd(), &mut buf) {
                                    Ok(0) | Err(_) => break,
                                    Ok(n) => splitter.feed(&buf[..n], &mut emit),
                                }
                            }
                            break;
                        }
                    }
                }
                splitter.finish(&mut emit);
            }));
        }
        Ok(Pumps {
            done: done_tx,
            tasks,
        })
    }

    /// Waits for the container's process to end, probing its health meanwhile, and stops it gracefully when asked.
    async fn watch(
        &mut self,
        child: Child,
        stop: &mut StopRequest,
    ) -> Result<Ended, SuperviseError> {
        let mut exited = child.wait();
        let check = self.spec.settings.health.clone();
        let clock = self.clock.clone();
        let started = clock.instant();
        let mut health = HealthState::default();
        let mut next_probe = crate::clock::after(
            started,
            check.as_ref().map_or(Duration::ZERO, |c| c.interval),
        );
        loop {
            let until_probe = next_probe.saturating_duration_since(clock.instant());
            tokio::select! {
                exit = &mut exited => return Ok(Ended::Exited(exit)),
                _ = stop.changed() => {
                    let grace = stop.borrow().unwrap_or(self.spec.settings.stop_grace);
                    return Ok(Ended::Exited(self.stop_gracefully(grace, exited).await));
                }
                _ = clock.sleep(until_probe), if check.is_some() => {
                    let Some(check) = &check else { continue };
                    let result = health::probe(&self.runtime, &self.container.name, check).await;
                    next_probe = crate::clock::after(clock.instant(), check.interval);
                    let before = health.health;
                    let elapsed = clock.instant().saturating_duration_since(started);
                    health = health.observe(check, elapsed, result);
                    if health.health != before {
                        self.status.health = Some(health_word(health.health).to_string());
                        self.save()?;
                    }
                }
            }
        }
    }

    /// SIGTERM, then SIGKILL to every process of the container after `grace`.
    async fn stop_gracefully(&self, grace: Duration, mut exited: ExitFuture) -> Exit {
        let id = self.container.name.clone();
        let term = self.blocking({
            let id = id.clone();
            move |rt| rt.kill(&id, libc::SIGTERM, false)
        });
        if let Err(e) = term.await {
            tracing::warn!(container = %id, "SIGTERM failed: {e}");
        }
        tokio::select! {
            exit = &mut exited => return exit,
            _ = self.clock.sleep(grace) => {}
        }
        tracing::info!(container = %id, "still running after {grace:?}: SIGKILL");
        let kill = self.blocking({
            let id = id.clone();
            move |rt| rt.kill(&id, libc::SIGKILL, true)
        });
        if let Err(e) = kill.await {
            tracing::warn!(container = %id, "SIGKILL failed: {e}");
        }
        tokio::select! {
            exit = &mut exited => exit,
            _ = self.clock.sleep(KILL_WAIT) => Exit::default(),
        }
    }
}

type ExitFuture = Pin<Box<dyn Future<Output = Exit> + Send>>;

/// This process as a child subreaper, for as long as the value lives (see the module doc).
struct Subreaper;

impl Subreaper {
    fn set() -> io::Result<Subreaper> {
        rustix::process::set_child_subreaper(Some(rustix::process::getpid()))?;
        Ok(Subreaper)
    }
}

impl Drop for Subreaper {
    fn drop(&mut self) {
        let _ = rustix::process::set_child_subreaper(None);
    }
}

/// The container's init process: our child, or one we adopted.
enum Child {
    Own(i32),
    Adopted(i32),
}

impl Child {
    fn wait(self) -> ExitFuture {
        match self {
            Child::Own(pid) => Box::pin(async move {
                tokio::task::spawn_blocking(move || wait_child(pid))
                    .await
                    .unwrap_or_default()
            }),
            Child::Adopted(pid) => Box::pin(async move { wait_adopted(pid).await }),
        }
    }
}

fn wait_child(pid: i32) -> Exit {
    let Some(pid) = rustix::process::Pid::from_raw(pid) else {
        return Exit::default();
    };
    loop {
        match rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty()) {
            Ok(Some((_, status))) => {
                return Exit {
                    code: status.exit_status(),
                    signal: status.terminating_signal(),
                };
            }
            Ok(None) => continue,
            Err(rustix::io::Errno::INTR) => continue,
            // Not our child after all (the runtime re-parented it elsewhere): we cannot know how it ended.
            Err(_) => return Exit::default(),
        }
    }
}

async fn wait_adopted(pid: i32) -> Exit {
    tokio::task::spawn_blocking(move || wait_pidfd(pid))
        .await
        .unwrap_or_default()
}

/// Blocks until the process `pid`, which is not our child, ends: a pidfd turns readable then.
fn wait_pidfd(pid: i32) -> Exit {
    use rustix::event::{PollFd, PollFlags, poll};
    let Some(raw) = rustix::process::Pid::from_raw(pid) else {
        return Exit::default();
    };
    // Gone already (or never there): nothing to wait for.
    let Ok(fd) = rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::empty()) else {
        return Exit::default();
    };
    loop {
        let mut fds = [PollFd::new(&fd, PollFlags::IN)];
        match poll(&mut fds, None) {
            Err(rustix::io::Errno::INTR) => continue,
            _ => return Exit::default(),
        }
    }
}

/// The output pumps of one run.
struct Pumps {
    done: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Pumps {
    async fn finish(self) {
        let _ = self.done.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

fn make_fifo(path: &Path) -> io::Result<()> {
    match rustix::fs::mknodat(
        rustix::fs::CWD,
        path,
        rustix::fs::FileType::Fifo,
        Mode::from_raw_mode(0o600),
        0,
    ) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::EXIST) => Ok(()),
        Err(e) => Err(e.into()),
    }
}
