//! Making a container from an image that is stored and unpacked, and handing it to a supervisor: the last step
//! of the deploy service (`crate::deploy`), through which `flotilla run` and the agent launch.

use std::path::Path;

use crate::app::RunSettings;
use crate::platform::Platform;
use crate::platform::host::Host;
use crate::runtime::{bundle, emulation};
use crate::store::StoredImage;
use crate::supervise::container::{Container, ContainerError, ContainerSpec};
use crate::supervise::control;
use crate::supervise::supervisor::SuperviseError;
use crate::unpack::{Snapshots, rootfs};

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error(transparent)]
    Container(#[from] ContainerError),
    #[error(transparent)]
    Supervise(#[from] SuperviseError),
    #[error(transparent)]
    Emulation(#[from] emulation::EmulationError),
    #[error(transparent)]
    Bundle(#[from] bundle::BundleError),
    #[error(transparent)]
    Unpack(#[from] crate::unpack::UnpackError),
    #[error(
        "the image {image} is stored, but layer {diff_id} is not unpacked; run flotilla pull --unpack {image}"
    )]
    NotUnpacked { image: String, diff_id: String },
}

/// What to launch, and where.
pub struct Launch<'a> {
    pub state_dir: &'a Path,
    pub name: &'a str,
    /// The name the image is stored under.
    pub image_name: &'a str,
    pub image: &'a StoredImage,
    pub settings: &'a RunSettings,
    /// The platform that chose the variant (recorded with the container).
    pub host: &'a Host,
    /// This machine: the gate for emulation, whatever chose the variant.
    pub live: &'a Host,
    pub binfmt: &'a emulation::Binfmt,
    /// The container's creation time.
    pub clock: &'a dyn crate::clock::Clock,
}

/// How the container was made.
#[derive(Debug)]
pub struct Launched {
    pub container: Container,
    pub platform: Platform,
    /// The binfmt handler that runs it, when it is not native.
    pub emulated_by: Option<String>,
    pub root: rootfs::RootKind,
}

/// The image's layers, bottom first.
pub fn diff_ids(image: &StoredImage) -> Vec<crate::digest::Digest> {
    image
        .config
        .rootfs
        .as_ref()
        .map(|r| r.diff_ids.clone())
        .unwrap_or_default()
}

/// Creates the container record, its root and bundle, and starts its supervisor. Whatever fails leaves no
/// container behind. The container's lock is held throughout and handed to the supervisor, so nothing else takes
/// the half-made container for an orphan, and the clean-up after a failure removes only what is still ours.
pub fn launch(l: &Launch<'_>) -> Result<Launched, LaunchError> {
    crate::supervise::container::validate_name(l.name)?;
    let snapshots = Snapshots::open(l.state_dir)?;
    let diff_ids = diff_ids(l.image);
    if let Some(missing) = snapshots.missing(&diff_ids).first() {
        return Err(LaunchError::NotUnpacked {
            image: l.image_name.to_string(),
            diff_id: missing.to_string(),
        });
    }
    let platform = Platform::of_config(&l.image.config);
    let emulated_by =
        match emulation::decide(&platform, l.live, l.settings.allow_emulation, l.binfmt)? {
            emulation::Decision::Native => None,
            emulation::Decision::Emulated { handler, .. } => Some(handler),
        };
    let spec = ContainerSpec {
        name: l.name.to_string(),
        image: l.image_name.to_string(),
        manifest_digest: l.image.descriptor.digest.clone(),
        platform: platform.to_string(),
        diff_ids,
        settings: l.settings.clone(),
        created: crate::store::rfc3339(l.clock.now()),
        emulated_by: emulated_by.clone(),
        host: l.host.describe(),
    };
    let (container, lock) = Container::create(l.state_dir, &spec)?;
    let made = make(l, &container, &snapshots).and_then(|root| {
        control::spawn_supervisor(l.state_dir, &container, Some(&lock))?;
        Ok(root)
    });
    match made {
        Ok(root) => Ok(Launched {
            container,
            platform,
            emulated_by,
            root,
        }),
        Err(e) => {
            // Still ours: a supervisor that started and failed has let go of the lock we hold too.
            let _ = rootfs::release(&container.dir);
            let _ = std::fs::remove_dir_all(&container.dir);
            drop(lock);
            Err(e)
        }
    }
}

fn make(
    l: &Launch<'_>,
    container: &Container,
    snapshots: &Snapshots,
) -> Result<rootfs::RootKind, LaunchError> {
    let spec = container.spec()?;
    let root = rootfs::prepare(snapshots, &spec.diff_ids, &container.dir)?;
    let volumes_dir = l.state_dir.join("volumes");
    let instance = crate::supervise::container::instance_id(l.state_dir)?;
    let c = bundle::Container {
        name: &container.name,
        instance: &instance,
        image: &l.image.config,
        settings: l.settings,
        rootfs: &root.path,
        volumes_dir: &volumes_dir,
    };
    let resolved = bundle::prepare(&c)?;
    let oci = bundle::spec(&c, &resolved)?;
    crate::durable::create_dir(&container.bundle_dir()).map_err(ContainerError::from)?;
    bundle::write(&container.bundle_dir(), &oci)?;
    let mut status = container.status();
    status.rootfs = Some(
        match root.kind {
            rootfs::RootKind::Overlay => "overlay",
            rootfs::RootKind::Copy => "copy",
        }
        .to_string(),
    );
    container.write_status(&status)?;
    Ok(root.kind)
}
