//! The agent's hands: preparing a release (pull, verify, prove, unpack) and making one release of an app the one
//! that runs. Containers are named after their app, so there is never more than one per app, and `run` is
//! idempotent: it adopts what already runs as asked, and replaces anything else.

use std::path::PathBuf;
use std::sync::Arc;

use crate::agent::db::AppRelease;
use crate::config::Config;
use crate::platform::host::Host;
use crate::pull::{PullOptions, Source};
use crate::runtime::{Runtime, emulation};
use crate::store::Store;
use crate::supervise::container::{Container, ContainerError, Status};
use crate::supervise::{control, launch};

#[derive(Clone)]
pub struct Apps {
    pub state_dir: PathBuf,
    pub config: Config,
    pub insecure_registries: Vec<String>,
    /// The platform variants are chosen for.
    pub host: Host,
    /// This machine, the gate for emulation.
    pub live: Host,
    pub runtime: Arc<dyn Runtime>,
}

impl Apps {
    /// Pulls and unpacks `release` for this device; the name its image is stored under. The variant the pull
    /// proved must be the one the release pinned for that platform.
    pub async fn prepare(&self, release: &AppRelease) -> Result<String, String> {
        let reference = release
            .image
            .parse::<crate::registry::Reference>()
            .map_err(|e| e.to_string())?;
        let client = crate::registry::RegistryClient::new(&self.config, &self.insecure_registries)
            .map_err(|e| crate::error_chain(&e))?;
        let store = Store::open(&self.state_dir).map_err(|e| crate::error_chain(&e))?;
        let options = PullOptions {
            unpack: Some(crate::unpack::Limits::from_env().map_err(|e| crate::error_chain(&e))?),
            ..PullOptions::from_config(&self.config)
        };
        let reporter = crate::pull::progress::Reporter::for_stderr();
        let report = crate::pull::pull(
            &self.config,
            Some(&client),
            &store,
            &Source::Registry(reference),
            &self.host,
            &options,
            &reporter,
        )
        .await
        .map_err(|e| crate::error_chain(&e))?;
        let platform = report.platform.to_string();
        match release.manifests.get(&platform) {
            Some(d) if *d == report.manifest_digest.to_string() => Ok(report.name),
            Some(d) => Err(format!(
                "the registry served {} for {platform}, but the release pinned {d}",
                report.manifest_digest
            )),
            None => Err(format!(
                "the pull chose {platform}, which the release does not list ({})",
                release
                    .manifests
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }

    /// Makes `target` the release of `app` that runs (`None`: nothing runs). Blocking: stopping waits for the
    /// old container's grace period.
    pub fn run(&self, app: &str, target: Option<&AppRelease>) -> Result<(), String> {
        let text = |e: &dyn std::error::Error| crate::error_chain(e);
        match Container::open(&self.state_dir, app) {
            Ok(c) => {
                let spec = c.spec().map_err(|e| text(&e))?;
                let same = target.is_some_and(|t| {
                    let mut wanted = t.settings.clone();
                    wanted.allow_emulation |= self.config.run.allow_emulation;
                    t.stored.as_deref() == Some(spec.image.as_str()) && wanted == spec.settings
                });
                let supervised = c.is_locked();
                let running = control::is_running(&c, self.runtime.as_ref());
                if same && supervised && !c.status().state.is_final() {
                    return Ok(());
                }
                if same && running {
                    // Its supervisor died (the machine did not reboot: the container runs): a new one adopts it.
                    return control::spawn_supervisor(&self.state_dir, &c, None)
                        .map_err(|e| text(&e));
                }
                control::remove(&c, &self.runtime, spec.settings.stop_grace)
                    .map_err(|e| text(&e))?;
            }
            Err(ContainerError::NotFound(_)) => {}
            Err(e) => return Err(text(&e)),
        }
        let Some(target) = target else {
            return Ok(());
        };
        let stored = target
            .stored
            .as_deref()
            .ok_or_else(|| format!("the release {} was never prepared here", target.id))?;
        let store = Store::open(&self.state_dir).map_err(|e| text(&e))?;
        let image = store.image(stored).map_err(|e| text(&e))?;
        let binfmt = emulation::Binfmt::read(std::path::Path::new(emulation::Binfmt::DIR))
            .map_err(|e| text(&e))?;
        // The device's own configuration may allow emulation for every app, as it does for `flotilla run`.
        let mut settings = target.settings.clone();
        settings.allow_emulation |= self.config.run.allow_emulation;
        launch::launch(&launch::Launch {
            state_dir: &self.state_dir,
            name: app,
            image_name: stored,
            image: &image,
            settings: &settings,
            host: &self.host,
            live: &self.live,
            binfmt: &binfmt,
        })
        .map(|_| ())
        .map_err(|e| text(&e))
    }

    /// The app's container status, its manifest digest and platform, when it has a container.
    pub fn status(&self, app: &str) -> Option<(Status, String, String)> {
        let c = Container::open(&self.state_dir, app).ok()?;
        let spec = c.spec().ok()?;
        Some((c.status(), spec.manifest_digest.to_string(), spec.platform))
    }
}
