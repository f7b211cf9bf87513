//! The agent's hands: preparing a release (the deploy service's pull, verification, proof and unpack, then the
//! release's pinned digest) and making one release of an app the one that runs. Containers are named after their app, so there is never more than one per app, and `run` is
//! idempotent: it adopts what already runs as asked, and replaces anything else.

use std::sync::Arc;

use crate::agent::db::AppRelease;
use crate::app::{SettingsError, UsernsMode};
use crate::deploy::{DeployError, Deployer};
use crate::policy::{self, PolicyError};
use crate::pull::{PullError, Source};
use crate::runtime::Runtime;
use crate::supervise::container::{Container, ContainerError, Status};
use crate::supervise::control;
use crate::update::FailureCause;
use crate::verify::VerifyError;

#[derive(Debug, thiserror::Error)]
pub enum AppsError {
    #[error("the release's image {image:?} is not a reference: {source}")]
    Reference {
        image: String,
        source: crate::registry::ReferenceError,
    },
    // Boxed: a pull's error is large, and every result of the agent's loop would carry its size.
    #[error(transparent)]
    Deploy(Box<DeployError>),
    #[error(
        "the registry served {served} for {platform}, but the release pinned {pinned}: the tag moved since the \
         release was made; publish a release that pins the new digest"
    )]
    NotPinned {
        platform: String,
        served: String,
        pinned: String,
    },
    #[error(
        "the pull chose {platform}, which the release does not list ({listed}): add a {platform} image to the \
         release"
    )]
    NotListed { platform: String, listed: String },
    #[error("the release {0} is unknown here; the server will send it again")]
    UnknownRelease(String),
    #[error("the release {0} was never prepared here")]
    NotPrepared(String),
    #[error(transparent)]
    Container(#[from] ContainerError),
    #[error(transparent)]
    Supervise(#[from] crate::supervise::supervisor::SuperviseError),
    #[error("the pull task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("the release's settings are not valid here: {0}")]
    Invalid(#[from] crate::app::SettingsError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
}

impl AppsError {
    /// Whether the device refused the release on principle, for the report.
    pub fn cause(&self) -> Option<FailureCause> {
        match self {
            AppsError::Policy(_) => Some(FailureCause::Policy),
            AppsError::Invalid(_) => Some(FailureCause::Invalid),
            AppsError::Deploy(d) => match d.as_ref() {
                DeployError::Pull(PullError::Signature {
                    source: VerifyError::Unsigned { .. } | VerifyError::AllInvalid { .. },
                    ..
                }) => Some(FailureCause::Policy),
                _ => None,
            },
            _ => None,
        }
    }
}

impl From<DeployError> for AppsError {
    fn from(e: DeployError) -> AppsError {
        AppsError::Deploy(Box::new(e))
    }
}

#[derive(Clone)]
pub struct Apps {
    pub deploy: Deployer,
    pub runtime: Arc<dyn Runtime>,
}

impl Apps {
    /// Pulls and unpacks `release` for this device; the name its image is stored under. The variant the pull
    /// proved must be the one the release pinned for that platform.
    pub async fn prepare(&self, release: &AppRelease) -> Result<String, AppsError> {
        let reference = self.admit(release)?;
        let report = self.deploy.prepare(&Source::Registry(reference)).await?;
        let platform = report.platform.to_string();
        match release.manifests.get(&platform) {
            Some(d) if *d == report.manifest_digest.to_string() => Ok(report.name),
            Some(d) => Err(AppsError::NotPinned {
                platform,
                served: report.manifest_digest.to_string(),
                pinned: d.clone(),
            }),
            None => Err(AppsError::NotListed {
                platform,
                listed: release
                    .manifests
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    /// The checks a release from the server must pass before anything is pulled or stopped: its settings are
    /// valid (the server is not trusted to have checked), and the device owner's policy allows them and the
    /// registry.
    fn admit(&self, release: &AppRelease) -> Result<crate::registry::Reference, AppsError> {
        let reference = release
            .image
            .parse::<crate::registry::Reference>()
            .map_err(|source| AppsError::Reference {
                image: release.image.clone(),
                source,
            })?;
        release.settings.validate()?;
        if release.settings.userns == UsernsMode::Auto {
            return Err(SettingsError::Field {
                field: "userns".into(),
                problem: "auto: a private user namespace per container is not available with this runtime \
                          (runc 1.1 cannot idmap the overlay root); leave userns at host"
                    .into(),
            }
            .into());
        }
        policy::admit(
            &self.deploy.config.policy,
            reference.registry(),
            &release.settings,
            &self.deploy.state_dir.join("volumes"),
            &policy::RealPaths,
        )?;
        Ok(reference)
    }

    /// Makes `target` the release of `app` that runs (`None`: nothing runs). Blocking: stopping waits for the
    /// old container's grace period.
    pub fn run(&self, app: &str, target: Option<&AppRelease>) -> Result<(), AppsError> {
        let state_dir = &self.deploy.state_dir;
        match Container::open(state_dir, app) {
            Ok(c) => {
                let spec = c.spec()?;
                let same = target.is_some_and(|t| {
                    t.stored.as_deref() == Some(spec.image.as_str())
                        && self.deploy.settings(&t.settings) == spec.settings
                });
                let supervised = c.is_locked();
                let running = control::is_running(&c, self.runtime.as_ref());
                if same && supervised && !c.status().state.is_final() {
                    return Ok(());
                }
                if same && running {
                    // Its supervisor died (the machine did not reboot: the container runs): a new one adopts it.
                    return Ok(control::spawn_supervisor(state_dir, &c, None)?);
                }
                control::remove(&c, &self.runtime, spec.settings.stop_grace)?;
            }
            Err(ContainerError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
        let Some(target) = target else {
            return Ok(());
        };
        // Again at the switch: the policy may have changed since the release was prepared (the owner edited it
        // and restarted the agent).
        self.admit(target)?;
        let stored = target
            .stored
            .as_deref()
            .ok_or_else(|| AppsError::NotPrepared(target.id.clone()))?;
        let image = self.deploy.image(stored)?;
        self.deploy.launch(app, stored, &image, &target.settings)?;
        Ok(())
    }

    /// The app's container status, its manifest digest and platform, when it has a container.
    pub fn status(&self, app: &str) -> Option<(Status, String, String)> {
        let c = Container::open(&self.deploy.state_dir, app).ok()?;
        let spec = c.spec().ok()?;
        Some((c.status(), spec.manifest_digest.to_string(), spec.platform))
    }
}
