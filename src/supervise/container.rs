//! A container's directory under the state directory: what it was created from, what its supervisor last saw,
//! and the lock that says whether a supervisor is alive.
//!
//! ```text
//! containers/NAME/
//!   container.json   written once, at creation: image, manifest, layers, settings
//!   status.json      rewritten (atomically) by the supervisor on every change of state
//!   supervisor.lock  flock held by the live supervisor for its whole life; holds its pid
//!   stop             written by `flotilla stop`: the grace period asked for
//!   bundle/          the OCI runtime bundle (config.json)
//!   rootfs/ upper/ work/   the container's root (an overlay mount, or a flattened copy)
//!   logs/            container.log and its rotations
//!   stdout.fifo stderr.fifo   the container's output, read by the supervisor
//! ```
//!
//! A flock rather than a pid file decides liveness: the kernel drops it when the supervisor dies, however it dies,
//! so a stale pid can never make a dead supervisor look alive (or a recycled pid make a stranger look like one).
//!
//! The lock is also what makes a container someone's: its creator takes it before the container can be listed
//! (before `container.json` exists), holds it while the root and the bundle are made, and hands the very same
//! lock to the supervisor it starts. A half-made container is therefore never unlocked, so `flotilla ps` cannot
//! take it for an orphan and start a second supervisor on it, and whoever removes a container does so holding the
//! lock. While its creator holds it the lock file names no pid: there is no supervisor to signal yet.

use std::fs;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use rustix::fs::FlockOperation;
use serde::{Deserialize, Serialize};

use crate::app::RunSettings;
use crate::digest::Digest;
use crate::durable::{self, DurableError};

pub const CONTAINERS_DIR: &str = "containers";
const SPEC_FILE: &str = "container.json";
const STATUS_FILE: &str = "status.json";
const LOCK_FILE: &str = "supervisor.lock";
const STOP_FILE: &str = "stop";
const MAX_NAME: usize = 64;
const INSTANCE_FILE: &str = "instance";

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error(
        "{0:?} is not a container name: use letters, digits, '_', '.' and '-', starting with a letter or digit, at \
         most {MAX_NAME} characters"
    )]
    BadName(String),
    #[error("there is no container named {0} (flotilla ps -a lists them)")]
    NotFound(String),
    #[error(
        "a container named {0} exists already: remove it with flotilla rm {0}, or choose another --name"
    )]
    Exists(String),
    #[error(
        "container {0} is being made, supervised or removed by another process; wait for it, or see flotilla ps"
    )]
    Busy(String),
    #[error(
        "{path} holds {text:?}, not an instance id (8 hex digits); delete the file and flotilla makes a new one"
    )]
    BadInstance { path: PathBuf, text: String },
    #[error("{path} is damaged ({reason}); remove the container with flotilla rm --force {name}")]
    Damaged {
        name: String,
        path: PathBuf,
        reason: String,
    },
    #[error(transparent)]
    Durable(#[from] DurableError),
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What a container was created from; never changes afterwards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerSpec {
    pub name: String,
    /// The image as the user named it.
    pub image: String,
    pub manifest_digest: Digest,
    pub platform: String,
    /// The layers' uncompressed digests, base first: the snapshots the root is made of.
    pub diff_ids: Vec<Digest>,
    pub settings: RunSettings,
    pub created: String,
    /// Set when the image runs through a binfmt handler rather than natively: which one.
    pub emulated_by: Option<String>,
    /// The device as detection described it when the container was created, kept with any run-time failure.
    pub host: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// Made, not started yet.
    #[default]
    Created,
    Running,
    /// Ended, and waiting out the backoff before starting again.
    Restarting,
    /// Ended, and the restart policy says not to start again.
    Exited,
    /// Stopped on request.
    Stopped,
    /// Could not be started at all (the runtime refused it).
    Failed,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Created => "created",
            State::Running => "running",
            State::Restarting => "restarting",
            State::Exited => "exited",
            State::Stopped => "stopped",
            State::Failed => "failed",
        }
    }

    /// Whether the supervisor has finished with this container.
    pub fn is_final(self) -> bool {
        matches!(self, State::Exited | State::Stopped | State::Failed)
    }
}

/// How the container's process ended. Both empty when it ended while no supervisor was its parent (adopted
/// after a supervisor restart): the kernel tells only the parent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

impl Exit {
    pub fn describe(&self) -> String {
        match (self.code, self.signal) {
            (Some(c), _) => format!("exit code {c}"),
            (None, Some(s)) => format!("killed by signal {s}"),
            (None, None) => "ended (status unknown: it ended while adopted)".to_string(),
        }
    }
}

/// A run-time failure recognised as the wrong variant for this device, with what showed it and what the device is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchFailure {
    pub evidence: String,
    pub host: String,
}

/// What the supervisor last saw, rewritten on every change.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Status {
    pub state: State,
    /// The container's init process, as the host sees it.
    pub pid: Option<i32>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub exit: Option<Exit>,
    /// Starts after the first one.
    pub restarts: u32,
    /// `starting`, `healthy` or `unhealthy` when the container has a health check.
    pub health: Option<String>,
    pub wrong_architecture: Option<ArchFailure>,
    /// The latest error or notice, in words.
    pub message: Option<String>,
    /// `overlay` or `copy`.
    pub rootfs: Option<String>,
}

/// One container's directory.
#[derive(Debug, Clone)]
pub struct Container {
    pub name: String,
    pub dir: PathBuf,
}

/// This state directory's instance id, made on first use and kept in `<state_dir>/instance`: what keeps the
/// containers of two state directories on one host apart where the host has one namespace (their cgroups).
/// Containers made before it existed keep the cgroup their bundle names.
pub fn instance_id(state_dir: &Path) -> Result<String, ContainerError> {
    let path = state_dir.join(INSTANCE_FILE);
    let valid = |text: &str| {
        let id = text.trim();
        (id.len() == 8 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_string())
    };
    let read = |path: &Path| -> Result<Option<String>, ContainerError> {
        match fs::read_to_string(path) {
            Ok(text) => valid(&text)
                .map(Some)
                .ok_or_else(|| ContainerError::BadInstance {
                    path: path.to_path_buf(),
                    text: text.trim().chars().take(40).collect(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(ContainerError::Io {
                path: path.to_path_buf(),
                source,
            }),
        }
    };
    if let Some(id) = read(&path)? {
        return Ok(id);
    }
    // Written whole under a temporary name, then linked into place: link() fails when another process got there
    // first, and a reader never sees a half-written id.
    durable::create_dir(state_dir)?;
    let id = format!("{:08x}", rand::random::<u32>());
    let temporary = format!("{INSTANCE_FILE}.{}", std::process::id());
    durable::write_atomic(state_dir, &temporary, id.as_bytes())?;
    let linked = fs::hard_link(state_dir.join(&temporary), &path);
    let _ = fs::remove_file(state_dir.join(&temporary));
    match linked {
        Ok(()) => {
            // The link is the id's only durable name: lost at a power cut, the next boot would draw another id
            // and look for the containers under cgroups that are not theirs.
            durable::fsync_dir(state_dir)?;
            Ok(id)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            read(&path)?.ok_or_else(|| ContainerError::Io {
                path: path.clone(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            })
        }
        Err(source) => Err(ContainerError::Io { path, source }),
    }
}

pub fn validate_name(name: &str) -> Result<(), ContainerError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(ContainerError::BadName(name.to_string()))
    }
}

impl Container {
    fn at(state_dir: &Path, name: &str) -> Result<Container, ContainerError> {
        validate_name(name)?;
        Ok(Container {
            name: name.to_string(),
            dir: state_dir.join(CONTAINERS_DIR).join(name),
        })
    }

    /// An existing container.
    pub fn open(state_dir: &Path, name: &str) -> Result<Container, ContainerError> {
        let c = Container::at(state_dir, name)?;
        if !c.dir.join(SPEC_FILE).is_file() {
            return Err(ContainerError::NotFound(name.to_string()));
        }
        Ok(c)
    }

    /// Makes the directory and writes the spec, holding the supervisor lock from before the container can be
    /// listed: the returned lock is the one to hand to its supervisor ([`control::spawn_supervisor`]). The name is
    /// claimed by `mkdir`, which fails for the second of two racing creators.
    ///
    /// [`control::spawn_supervisor`]: super::control::spawn_supervisor
    pub fn create(
        state_dir: &Path,
        spec: &ContainerSpec,
    ) -> Result<(Container, fs::File), ContainerError> {
        let c = Container::at(state_dir, &spec.name)?;
        durable::create_dir(&state_dir.join(CONTAINERS_DIR))?;
        match fs::create_dir(&c.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(ContainerError::Exists(spec.name.clone()));
            }
            Err(source) => {
                return Err(ContainerError::Io {
                    path: c.dir.clone(),
                    source,
                });
            }
        }
        let lock = durable::lock_file(
            &c.dir.join(LOCK_FILE),
            FlockOperation::NonBlockingLockExclusive,
        )?;
        let json = serde_json::to_vec_pretty(spec).map_err(|e| c.damaged(SPEC_FILE, e))?;
        durable::write_atomic(&c.dir, SPEC_FILE, &json)?;
        c.write_status(&Status::default())?;
        Ok((c, lock))
    }

    /// Every container under `state_dir`, by name.
    pub fn list(state_dir: &Path) -> Result<Vec<Container>, ContainerError> {
        let root = state_dir.join(CONTAINERS_DIR);
        let entries = match fs::read_dir(&root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(ContainerError::Io { path: root, source }),
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Ok(c) = Container::open(state_dir, &name) {
                out.push(c);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn damaged(&self, file: &str, e: impl std::fmt::Display) -> ContainerError {
        ContainerError::Damaged {
            name: self.name.clone(),
            path: self.dir.join(file),
            reason: e.to_string(),
        }
    }

    pub fn spec(&self) -> Result<ContainerSpec, ContainerError> {
        let path = self.dir.join(SPEC_FILE);
        let bytes = fs::read(&path).map_err(|source| ContainerError::Io { path, source })?;
        serde_json::from_slice(&bytes).map_err(|e| self.damaged(SPEC_FILE, e))
    }

    /// The last status written; a missing or torn file (impossible through write_atomic, but a user may edit it)
    /// reads as created rather than failing every command.
    pub fn status(&self) -> Status {
        fs::read(self.dir.join(STATUS_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    pub fn write_status(&self, status: &Status) -> Result<(), ContainerError> {
        let json = serde_json::to_vec_pretty(status).map_err(|e| self.damaged(STATUS_FILE, e))?;
        Ok(durable::write_atomic(&self.dir, STATUS_FILE, &json)?)
    }

    pub fn bundle_dir(&self) -> PathBuf {
        self.dir.join("bundle")
    }

    pub fn log_dir(&self) -> PathBuf {
        self.dir.join("logs")
    }

    pub fn fifo(&self, stream: &str) -> PathBuf {
        self.dir.join(format!("{stream}.fifo"))
    }

    /// Takes the supervisor lock for the life of the returned file and writes our pid into it. `Locked` when a
    /// supervisor is alive, or the container is being made or removed.
    pub fn lock_supervisor(&self) -> Result<fs::File, ContainerError> {
        let file = durable::lock_file(
            &self.dir.join(LOCK_FILE),
            FlockOperation::NonBlockingLockExclusive,
        )?;
        self.claim_lock(file)
    }

    /// Takes the lock to change the container from outside a supervisor (to remove it): `Busy` when anyone holds
    /// it. The file is emptied, so the pid of the supervisor that last held it is never taken for ours.
    pub fn hold(&self) -> Result<fs::File, ContainerError> {
        let path = self.dir.join(LOCK_FILE);
        let file = match durable::lock_file(&path, FlockOperation::NonBlockingLockExclusive) {
            Ok(f) => f,
            Err(DurableError::Locked { .. }) => {
                return Err(ContainerError::Busy(self.name.clone()));
            }
            Err(e) => return Err(e.into()),
        };
        file.set_len(0)
            .map_err(|source| ContainerError::Io { path, source })?;
        Ok(file)
    }

    /// Makes a lock this process holds already (handed over by the container's creator) name us as its supervisor.
    pub fn claim_lock(&self, mut file: fs::File) -> Result<fs::File, ContainerError> {
        let path = self.dir.join(LOCK_FILE);
        let io = |source| ContainerError::Io {
            path: path.clone(),
            source,
        };
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        write!(file, "{}", std::process::id()).map_err(io)?;
        Ok(file)
    }

    /// Whether anyone holds the lock: a live supervisor, or the container's creator or remover.
    pub fn is_locked(&self) -> bool {
        matches!(
            durable::lock_file(
                &self.dir.join(LOCK_FILE),
                FlockOperation::NonBlockingLockShared
            ),
            Err(DurableError::Locked { .. })
        )
    }

    /// The live supervisor's pid, or None when none holds the lock (or its holder is not a supervisor).
    pub fn supervisor_pid(&self) -> Option<i32> {
        let path = self.dir.join(LOCK_FILE);
        match durable::lock_file(&path, FlockOperation::NonBlockingLockShared) {
            // We got the lock: nobody holds it exclusively, so no supervisor lives. Dropping the file releases it.
            Ok(_) => None,
            Err(DurableError::Locked { .. }) => {
                let mut text = String::new();
                fs::File::open(&path).ok()?.read_to_string(&mut text).ok()?;
                text.trim().parse().ok()
            }
            Err(_) => None,
        }
    }

    /// Asks the supervisor to stop with this grace period (it reads the file when SIGTERM arrives).
    pub fn request_stop(&self, grace: std::time::Duration) -> Result<(), ContainerError> {
        let text = format!("{}", grace.as_millis());
        Ok(durable::write_atomic(
            &self.dir,
            STOP_FILE,
            text.as_bytes(),
        )?)
    }

    /// The grace period a stop request asked for, if there is a request.
    pub fn stop_requested(&self) -> Option<std::time::Duration> {
        let text = fs::read_to_string(self.dir.join(STOP_FILE)).ok()?;
        text.trim()
            .parse()
            .ok()
            .map(std::time::Duration::from_millis)
    }

    pub fn clear_stop_request(&self) {
        let _ = fs::remove_file(self.dir.join(STOP_FILE));
    }
}

#[cfg(test)]
impl ContainerSpec {
    /// A spec for tests that need a container on disk and nothing that runs.
    pub(crate) fn example(name: &str) -> ContainerSpec {
        ContainerSpec {
            name: name.to_string(),
            image: "localhost:5000/app:1".into(),
            manifest_digest:
                "sha256:0000000000000000000000000000000000000000000000000000000000000000"
                    .parse()
                    .unwrap(),
            platform: "linux/amd64".into(),
            diff_ids: vec![],
            settings: RunSettings::new(),
            created: "2026-01-01T00:00:00Z".into(),
            emulated_by: None,
            host: "x86-64".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["web", "a", "app-1.v2_x", &"a".repeat(64)] {
            validate_name(ok).unwrap();
        }
        for bad in ["", "-x", ".x", "a/b", "..", "a b", &"a".repeat(65), "ä"] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn create_open_list_and_a_second_create_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (c, _lock) = Container::create(dir.path(), &ContainerSpec::example("web")).unwrap();
        assert_eq!(c.spec().unwrap(), ContainerSpec::example("web"));
        assert_eq!(c.status().state, State::Created);
        assert!(matches!(
            Container::create(dir.path(), &ContainerSpec::example("web")),
            Err(ContainerError::Exists(_))
        ));
        drop(Container::create(dir.path(), &ContainerSpec::example("db")).unwrap());
        let names: Vec<String> = Container::list(dir.path())
            .unwrap()
            .into_iter()
            .map(|c| c.name)
            .collect();
        assert_eq!(names, ["db", "web"]);
        assert!(matches!(
            Container::open(dir.path(), "nope"),
            Err(ContainerError::NotFound(_))
        ));
    }

    #[test]
    fn the_lock_tells_whether_a_supervisor_lives() {
        let dir = tempfile::tempdir().unwrap();
        let (c, made) = Container::create(dir.path(), &ContainerSpec::example("web")).unwrap();
        drop(made);
        assert_eq!(c.supervisor_pid(), None);
        assert!(!c.is_locked());
        let held = c.lock_supervisor().unwrap();
        assert_eq!(c.supervisor_pid(), Some(std::process::id() as i32));
        assert!(c.lock_supervisor().is_err());
        drop(held);
        assert_eq!(c.supervisor_pid(), None);
    }

    #[test]
    fn a_container_is_locked_by_its_creator_from_before_it_can_be_listed_until_its_supervisor_has_it()
     {
        let dir = tempfile::tempdir().unwrap();
        let (c, made) = Container::create(dir.path(), &ContainerSpec::example("web")).unwrap();
        // Listed, unfinished (created) and locked: nobody may adopt it, and there is no supervisor to signal.
        assert_eq!(Container::list(dir.path()).unwrap().len(), 1);
        assert!(c.is_locked());
        assert_eq!(c.supervisor_pid(), None);
        assert!(c.lock_supervisor().is_err());
        // The same lock, handed over, names its new holder.
        let held = c.claim_lock(made).unwrap();
        assert_eq!(c.supervisor_pid(), Some(std::process::id() as i32));
        drop(held);
        assert!(!c.is_locked());
    }

    #[test]
    fn the_instance_id_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let id = instance_id(dir.path()).unwrap();
        assert_eq!(id.len(), 8);
        assert_eq!(instance_id(dir.path()).unwrap(), id);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(
            instance_id(other.path()).unwrap(),
            id,
            "another state directory, another id"
        );
        fs::write(dir.path().join(INSTANCE_FILE), "../../x").unwrap();
        assert!(matches!(
            instance_id(dir.path()),
            Err(ContainerError::BadInstance { .. })
        ));
    }

    #[test]
    fn stop_requests_carry_the_grace_period() {
        let dir = tempfile::tempdir().unwrap();
        let (c, _lock) = Container::create(dir.path(), &ContainerSpec::example("web")).unwrap();
        assert_eq!(c.stop_requested(), None);
        c.request_stop(std::time::Duration::from_millis(1500))
            .unwrap();
        assert_eq!(
            c.stop_requested(),
            Some(std::time::Duration::from_millis(1500))
        );
        c.clear_stop_request();
        assert_eq!(c.stop_requested(), None);
    }
}
