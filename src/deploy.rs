//! One deploy path: resolve the image for this host, pull it (signature policy, architecture proof, unpack into
//! snapshots), and launch a container from it. `flotilla run`, `flotilla pull` and the agent all go through here;
//! they differ only in what they print and, for the agent, in the release's pinned digests it checks afterwards.
//!
//! Choosing the variant is `platform::select`'s alone, both for an index being pulled and for an image already
//! stored. Two hosts take part: `host` chooses the variant (it may be `--platform` or a snapshot of another
//! machine), `live` is this machine, the gate for emulation.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::app::RunSettings;
use crate::clock::Clock;
use crate::config::Config;
use crate::platform::Platform;
use crate::platform::host::Host;
use crate::platform::select;
use crate::pull::{PullError, PullOptions, PullReport, Source};
use crate::registry::{RegistryClient, RegistryError};
use crate::runtime::emulation::{self, EmulationError};
use crate::store::{Store, StoreError, StoredImage};
use crate::supervise::launch::{self, LaunchError, Launched};
use crate::unpack::{Limits, Snapshots, UnpackError};

#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Unpack(#[from] UnpackError),
    #[error(transparent)]
    Pull(#[from] PullError),
    #[error(transparent)]
    Emulation(#[from] EmulationError),
    // Boxed: the launch error is large, and every deploy result would carry its size.
    #[error(transparent)]
    Launch(Box<LaunchError>),
}

impl From<LaunchError> for DeployError {
    fn from(e: LaunchError) -> DeployError {
        DeployError::Launch(Box::new(e))
    }
}

/// Pulls `source` for `host` into `store`, with the configuration's registry client and progress on stderr.
pub async fn pull(
    config: &Config,
    insecure_registries: &[String],
    store: &Store,
    source: &Source,
    host: &Host,
    options: &PullOptions,
) -> Result<PullReport, DeployError> {
    let client = match source {
        Source::Registry(_) => Some(RegistryClient::new(config, insecure_registries)?),
        Source::Layout(_) => None,
    };
    let reporter = crate::pull::progress::Reporter::for_stderr();
    Ok(crate::pull::pull(
        config,
        client.as_ref(),
        store,
        source,
        host,
        options,
        &reporter,
    )
    .await?)
}

/// Where and for which machine images are deployed.
#[derive(Clone)]
pub struct Deployer {
    pub state_dir: PathBuf,
    pub config: Config,
    pub insecure_registries: Vec<String>,
    /// The platform variants are chosen for.
    pub host: Host,
    /// This machine, the gate for emulation.
    pub live: Host,
    pub clock: Arc<dyn Clock>,
}

/// An image ready to launch: stored, proven and unpacked.
#[derive(Debug)]
pub struct Resolved {
    pub image: StoredImage,
    /// The pull that brought it, when the stored image did not serve.
    pub pulled: Option<PullReport>,
}

impl Deployer {
    /// The stored image `name` when it is whole, unpacked, and a variant for this host (a pull for another
    /// `--platform` stores under the same name).
    pub fn ready(&self, name: &str) -> Result<Option<StoredImage>, DeployError> {
        let store = Store::open(&self.state_dir)?;
        let snapshots = Snapshots::open(&self.state_dir)?;
        let Ok(image) = store.image(name) else {
            return Ok(None);
        };
        let stated = Platform::of_config(&image.config);
        let serves = select::stored_fits(&self.host.candidates, &stated)
            && snapshots.missing(&launch::diff_ids(&image)).is_empty();
        Ok(serves.then_some(image))
    }

    /// Pulls `source` for this host, proves it and unpacks its layers.
    pub async fn prepare(&self, source: &Source) -> Result<PullReport, DeployError> {
        let store = Store::open(&self.state_dir)?;
        let options = PullOptions {
            unpack: Some(Limits::from_env()?),
            ..PullOptions::from_config(&self.config)
        };
        pull(
            &self.config,
            &self.insecure_registries,
            &store,
            source,
            &self.host,
            &options,
        )
        .await
    }

    /// The image `source` names, which is stored as `name` once pulled: the stored one when it serves and
    /// `reuse` allows, else pulled now.
    pub async fn resolve(
        &self,
        source: &Source,
        name: &str,
        reuse: bool,
    ) -> Result<Resolved, DeployError> {
        if reuse {
            if let Some(image) = self.ready(name)? {
                return Ok(Resolved {
                    image,
                    pulled: None,
                });
            }
        }
        let report = self.prepare(source).await?;
        Ok(Resolved {
            image: self.image(&report.name)?,
            pulled: Some(report),
        })
    }

    /// The image stored as `name`.
    pub fn image(&self, name: &str) -> Result<StoredImage, DeployError> {
        Ok(Store::open(&self.state_dir)?.image(name)?)
    }

    /// `settings` with this device's policy applied: its configuration may allow emulation for every app.
    pub fn settings(&self, settings: &RunSettings) -> RunSettings {
        let mut s = settings.clone();
        s.allow_emulation |= self.config.run.allow_emulation;
        s
    }

    /// Makes the container `name` from `image` (recorded as `image_name`) and starts its supervisor.
    pub fn launch(
        &self,
        name: &str,
        image_name: &str,
        image: &StoredImage,
        settings: &RunSettings,
    ) -> Result<Launched, DeployError> {
        let binfmt = emulation::Binfmt::read(Path::new(emulation::Binfmt::DIR))?;
        Ok(launch::launch(&launch::Launch {
            state_dir: &self.state_dir,
            name,
            image_name,
            image,
            settings: &self.settings(settings),
            host: &self.host,
            live: &self.live,
            binfmt: &binfmt,
            clock: self.clock.as_ref(),
        })?)
    }
}
