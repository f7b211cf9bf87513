//! A pull: from a reference to a verified image in the store, all or nothing.
//!
//! 1. Resolve the reference once to a digest (a tag is never read twice in one pull).
//! 2. Check the signature policy for the repository against that digest.
//! 3. An index: rank its entries against the device's candidates ([`crate::platform::select`]). A single
//!    manifest: its config must name a platform the device runs.
//! 4. For each acceptable entry, best first: fetch the manifest and config (the config must state the platform
//!    chosen), check free space, fetch the missing layers in parallel (resuming partials), then prove the
//!    architecture from the image's own executables ([`proof`]). A refused variant is recorded and the next one
//!    tried.
//!    With `--unpack` ([`PullOptions::unpack`]) each layer is unpacked into its snapshot ([`crate::unpack`]) in
//!    the same parallel task that fetched it, so it is decompressed once, and the proof then reads the snapshots.
//! 5. Only then is the reference written, in one atomic update of the store's `index.json`. An interrupted or
//!    refused pull leaves no reference, only blobs and resumable partials for the next pull or `flotilla gc`.

pub mod lint;
pub mod progress;
pub mod proof;
mod signatures;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use futures_util::stream::{self, StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::digest::Digest;
use crate::layers::{ImageTree, LayerSource};
use crate::oci::{Descriptor, ImageConfig, ImageManifest, MAX_MANIFEST_BYTES, media_type};
use crate::platform::Platform;
use crate::platform::host::Host;
use crate::platform::select::{self, IndexEntry, SelectError};
use crate::registry::{BlobSpec, Reference, RegistryClient, RegistryError};
use crate::store::layout::{OCI_SCHEME, OciLayout, OciLayoutRef};
use crate::store::space::Statvfs;
use crate::store::{RefRecord, Slot, Store, StoreError};
use crate::unpack::snapshots::Ensured;
use crate::unpack::{Limits, Snapshots, UnpackError};
use crate::verify::VerifyError;
use crate::verify::policy::{Acceptance, Policy};
use progress::Reporter;

/// Image configs larger than this are refused; real ones are a few KiB.
const MAX_CONFIG_BYTES: u64 = 8 << 20;
/// Layers per manifest; a manifest listing more is hostile or broken.
const MAX_LAYERS: usize = 1024;
/// Unpacking is estimated at twice the compressed size for the free-space check (gzip on binaries and text).
const UNPACK_FACTOR: u64 = 2;

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Select(#[from] SelectError),
    #[error("signature check for {image} failed: {source}")]
    Signature { image: String, source: VerifyError },
    #[error("manifest {digest} is not usable: {reason}")]
    BadManifest { digest: Digest, reason: String },
    #[error("image config {digest} is not usable: {reason}")]
    BadConfig { digest: Digest, reason: String },
    #[error(
        "{image} is a single-platform image for {platform}, which this device does not run (it runs {device})"
    )]
    WrongPlatform {
        image: String,
        platform: Platform,
        device: String,
    },
    #[error(
        "{image}: no variant runs on this device (it runs {device}):{}",
        list(refused)
    )]
    NoRunnableVariant {
        image: String,
        device: String,
        refused: Vec<Refusal>,
    },
    #[error("cannot create a scratch file in {path}: {source}")]
    Scratch {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("a background task failed: {0}")]
    Task(String),
    #[error(
        "{image} is in a registry, but no registry client was given to fetch it (a bug in the caller)"
    )]
    NoRegistryClient { image: String },
    #[error(transparent)]
    Unpack(#[from] UnpackError),
    #[error("no image named {name:?} is stored; pull it first")]
    NotStored { name: String },
}

fn list(refused: &[Refusal]) -> String {
    refused.iter().map(|r| format!("\n  - {r}")).collect()
}

/// Where an image comes from.
#[derive(Debug, Clone)]
pub enum Source {
    Registry(Reference),
    /// An OCI layout directory, for devices updated from removable media.
    Layout(OciLayoutRef),
}

impl FromStr for Source {
    type Err = PullError;

    fn from_str(s: &str) -> Result<Source, PullError> {
        if s.starts_with(OCI_SCHEME) {
            Ok(Source::Layout(s.parse()?))
        } else {
            Ok(Source::Registry(s.parse().map_err(RegistryError::from)?))
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Registry(r) => write!(f, "{r}"),
            Source::Layout(l) => match &l.name {
                Some(n) => write!(f, "{OCI_SCHEME}{}:{n}", l.dir.display()),
                None => write!(f, "{OCI_SCHEME}{}", l.dir.display()),
            },
        }
    }
}

/// A variant that was tried and refused, or passed over without trying.
#[derive(Debug, Clone, Serialize)]
pub struct Refusal {
    pub platform: String,
    pub digest: Option<Digest>,
    pub reason: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.digest {
            Some(d) => write!(f, "{} ({d}): {}", self.platform, self.reason),
            None => write!(f, "{}: {}", self.platform, self.reason),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PullReport {
    /// The name the image is stored under.
    pub name: String,
    pub index_digest: Option<Digest>,
    pub manifest_digest: Digest,
    pub platform: Platform,
    pub signature: String,
    /// Variants refused after fetching (failed proof, wrong config) and entries passed over by their labels.
    pub refused: Vec<Refusal>,
    /// The executables checked and what each needs.
    pub proof: Vec<String>,
    pub layers_fetched: usize,
    pub bytes_fetched: u64,
    /// Layers unpacked into snapshots by this pull (layers whose snapshot was there already are not counted).
    pub layers_unpacked: usize,
    /// The architecture proof read the unpacked snapshots rather than decompressing layers.
    pub proof_from_snapshots: bool,
}

#[derive(Debug, Clone)]
pub struct PullOptions {
    pub parallel_layers: usize,
    /// Stamps the time of the pull on the stored reference.
    pub clock: Arc<dyn Clock>,
    /// Unpack each layer into its snapshot as it arrives, with these limits; `None` pulls without unpacking.
    pub unpack: Option<Limits>,
}

impl PullOptions {
    pub fn from_config(config: &Config) -> PullOptions {
        PullOptions {
            parallel_layers: config.pull.parallel_layers.max(1),
            clock: Arc::new(SystemClock),
            unpack: None,
        }
    }
}

/// Whether a stored image is ready to run from snapshots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpackState {
    /// The image's layers, base first, by diff_id: what [`crate::unpack::prepare`] takes.
    pub diff_ids: Vec<Digest>,
    /// Those without a snapshot; empty when the image is fully unpacked.
    pub missing: Vec<Digest>,
}

impl UnpackState {
    pub fn is_complete(&self) -> bool {
        self.missing.is_empty()
    }
}

/// Is the image stored under `name` fully unpacked, and what are its layers? When it is not, pull it again with
/// [`PullOptions::unpack`] set: the blobs are there, so only the missing snapshots are made.
pub fn unpack_state(
    store: &Store,
    snapshots: &Snapshots,
    name: &str,
) -> Result<UnpackState, PullError> {
    let entry = store
        .images()?
        .into_iter()
        .find(|i| i.name.as_deref() == Some(name))
        .ok_or_else(|| PullError::NotStored {
            name: name.to_string(),
        })?;
    let bytes = crate::store::layout::read_bounded(
        &store.layout().blob_path(&entry.digest),
        MAX_MANIFEST_BYTES,
        "a manifest",
    )?;
    let manifest: ImageManifest =
        serde_json::from_slice(&bytes).map_err(|e| PullError::BadManifest {
            digest: entry.digest.clone(),
            reason: e.to_string(),
        })?;
    let diff_ids = crate::store::gc::image_diff_ids(store.layout(), &manifest)?;
    let missing = snapshots.missing(&diff_ids);
    Ok(UnpackState { diff_ids, missing })
}

/// The manifest bytes, wherever they come from.
struct Fetched {
    digest: Digest,
    media_type: String,
    bytes: Vec<u8>,
}

/// The one place that knows how to read from each kind of source.
enum Fetcher<'a> {
    Registry {
        client: &'a RegistryClient,
        reference: &'a Reference,
    },
    Layout {
        layout: OciLayout,
        name: Option<String>,
    },
}

impl<'a> Fetcher<'a> {
    pub(crate) fn for_source(
        source: &'a Source,
        client: Option<&'a RegistryClient>,
    ) -> Result<Fetcher<'a>, PullError> {
        Ok(match source {
            Source::Registry(reference) => Fetcher::Registry {
                client: client.ok_or_else(|| PullError::NoRegistryClient {
                    image: source.to_string(),
                })?,
                reference,
            },
            Source::Layout(l) => Fetcher::Layout {
                layout: OciLayout::open(&l.dir)?,
                name: l.name.clone(),
            },
        })
    }

    async fn top(&self) -> Result<Fetched, PullError> {
        match self {
            Fetcher::Registry { client, reference } => {
                let m = client.fetch_manifest(reference).await?;
                Ok(Fetched {
                    digest: m.digest,
                    media_type: m.kind.media_type().to_string(),
                    bytes: m.bytes,
                })
            }
            Fetcher::Layout { layout, name } => {
                let desc = layout.resolve(name.as_deref())?;
                let bytes = layout.read_blob(&desc.digest, desc.size, MAX_MANIFEST_BYTES)?;
                Ok(Fetched {
                    digest: desc.digest,
                    media_type: desc.media_type,
                    bytes,
                })
            }
        }
    }

    /// A manifest named by digest, verified.
    async fn manifest(&self, digest: &Digest, size: u64) -> Result<Vec<u8>, PullError> {
        match self {
            Fetcher::Registry { client, reference } => Ok(client
                .fetch_manifest(&reference.with_digest(digest.clone()))
                .await?
                .bytes),
            Fetcher::Layout { layout, .. } => {
                Ok(layout.read_blob(digest, size, MAX_MANIFEST_BYTES)?)
            }
        }
    }

    async fn small_blob(&self, desc: &Descriptor, limit: u64) -> Result<Vec<u8>, PullError> {
        match self {
            Fetcher::Registry { client, reference } => {
                let spec = BlobSpec {
                    digest: desc.digest.clone(),
                    size: desc.size,
                };
                Ok(client
                    .fetch_blob_bytes(reference.repository(), &spec, limit)
                    .await?)
            }
            Fetcher::Layout { layout, .. } => {
                Ok(layout.read_blob(&desc.digest, desc.size, limit)?)
            }
        }
    }

    /// Brings one layer into the store; returns the bytes transferred (0 when it was already there).
    async fn layer(
        &self,
        store: &Store,
        desc: &Descriptor,
        reporter: &Reporter,
    ) -> Result<u64, PullError> {
        let partial = match store.partial(&desc.digest, desc.size)? {
            Slot::Present => return Ok(0),
            Slot::Fetch(partial) => partial,
        };
        let bar = reporter.layer(&desc.digest, desc.size);
        let (verified, transferred) = match self {
            Fetcher::Registry { client, reference } => {
                let spec = BlobSpec {
                    digest: desc.digest.clone(),
                    size: desc.size,
                };
                let (verifier, fetched) = client
                    .fetch_blob(reference.repository(), &spec, partial.path(), &|done, _| {
                        bar.update(done)
                    })
                    .await?;
                bar.finish(fetched);
                (partial.finish(verifier)?, fetched)
            }
            Fetcher::Layout { layout, .. } => {
                let blob = layout.copy_blob(partial)?;
                bar.finish(desc.size);
                (blob, desc.size)
            }
        };
        store.publish(verified)?;
        Ok(transferred)
    }
}

/// Pulls `source` into `store` for a device described by `host`.
pub async fn pull(
    config: &Config,
    client: Option<&RegistryClient>,
    store: &Store,
    source: &Source,
    host: &Host,
    options: &PullOptions,
    reporter: &Reporter,
) -> Result<PullReport, PullError> {
    let image = source.to_string();
    let fetcher = Fetcher::for_source(source, client)?;

    let top = fetcher.top().await?;
    reporter.step(&format!("resolved {image} to {}", top.digest));
    let signature = check_signature(config, client, source, &top.digest, reporter).await?;

    let is_index = media_type::is_index(&top.media_type) || looks_like_index(&top.bytes);
    let mut refused = Vec::new();
    let mut tries: Vec<Attempt> = Vec::new();
    if is_index {
        let entries = IndexEntry::from_index_json(&top.bytes)?;
        let selection =
            select::select(&host.candidates, &entries).require_match(&host.candidates)?;
        for passed in &selection.passed_over {
            refused.push(Refusal {
                platform: passed
                    .entry
                    .normalized_platform()
                    .map_or_else(|| "no platform".to_string(), |p| p.to_string()),
                digest: Some(passed.entry.digest.clone()),
                reason: passed.reason.to_string(),
            });
        }
        for choice in &selection.chosen {
            tries.push(Attempt {
                digest: choice.entry.digest.clone(),
                size: choice.entry.size,
                media_type: choice.entry.media_type.clone(),
                label: Some(choice.runs_as.clone()),
                trust_label: !choice.needs_proof,
            });
        }
    } else {
        // A single manifest: its config says what it is; checked below like an index entry's.
        tries.push(Attempt {
            digest: top.digest.clone(),
            size: top.bytes.len() as u64,
            media_type: top.media_type.clone(),
            label: None,
            trust_label: true,
        });
    }

    let trial = Trial {
        fetcher: &fetcher,
        store,
        image: &image,
        host,
        options,
        reporter,
    };
    for attempt in tries {
        let Attempt {
            digest,
            size,
            media_type,
            ..
        } = attempt.clone();
        let shown = attempt
            .label
            .as_ref()
            .map_or_else(|| "the image".to_string(), Platform::to_string);
        let bytes = if digest == top.digest {
            top.bytes.clone()
        } else {
            fetcher.manifest(&digest, size).await?
        };
        match trial.try_attempt(&attempt, &bytes).await {
            Ok(done) => {
                store.put_blob(&digest, &bytes)?;
                let mut keep = Vec::new();
                if is_index {
                    store.put_blob(&top.digest, &top.bytes)?;
                    keep.push(top.digest.clone());
                }
                let name = ref_name(source, &top);
                store.commit(&[RefRecord {
                    name: name.clone(),
                    target: Descriptor::new(&media_type, digest.clone(), bytes.len() as u64),
                    source: image.clone(),
                    index_digest: is_index.then(|| top.digest.clone()),
                    platform: Some(done.platform.clone()),
                    pulled_at: options.clock.now(),
                    keep,
                }])?;
                return Ok(PullReport {
                    name,
                    index_digest: is_index.then(|| top.digest.clone()),
                    manifest_digest: digest,
                    platform: done.platform,
                    signature,
                    refused,
                    proof: done.proof,
                    layers_fetched: done.layers_fetched,
                    bytes_fetched: done.bytes_fetched,
                    layers_unpacked: done.layers_unpacked,
                    proof_from_snapshots: done.proof_from_snapshots,
                });
            }
            Err(Refused::Variant(reason)) => {
                reporter.step(&format!("refused {shown} ({digest}): {reason}"));
                refused.push(Refusal {
                    platform: shown,
                    digest: Some(digest),
                    reason,
                });
            }
            Err(Refused::Fatal(e)) => return Err(e),
        }
    }
    Err(PullError::NoRunnableVariant {
        image,
        device: host.describe(),
        refused,
    })
}

/// A manifest served without a media type header (OCI layouts, old registries) still says what it is inside.
fn looks_like_index(bytes: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Probe {
        manifests: Option<serde_json::Value>,
    }
    serde_json::from_slice::<Probe>(bytes).is_ok_and(|p| p.manifests.is_some())
}

fn ref_name(source: &Source, top: &Fetched) -> String {
    match source {
        Source::Registry(r) => r.to_string(),
        Source::Layout(l) => l.name.clone().unwrap_or_else(|| top.digest.to_string()),
    }
}

/// One variant to try: an index entry the selection accepted, or the single manifest a tag named.
#[derive(Debug, Clone)]
struct Attempt {
    digest: Digest,
    size: u64,
    media_type: String,
    /// The platform its index entry claims; `None` for a single manifest, whose config decides.
    label: Option<Platform>,
    /// False when the label alone is not enough (an unlabelled `arm` entry on a v6 or v5 device).
    trust_label: bool,
}

struct VariantDone {
    platform: Platform,
    proof: Vec<String>,
    layers_fetched: usize,
    bytes_fetched: u64,
    layers_unpacked: usize,
    proof_from_snapshots: bool,
}

enum Refused {
    /// This variant cannot be used; the next one may.
    Variant(String),
    /// Nothing else is worth trying (network down, disk full, store broken).
    Fatal(PullError),
}

impl From<PullError> for Refused {
    fn from(e: PullError) -> Refused {
        Refused::Fatal(e)
    }
}

impl From<StoreError> for Refused {
    fn from(e: StoreError) -> Refused {
        Refused::Fatal(e.into())
    }
}

/// A variant's layers and configuration, read and checked for shape: where the pull and the lint both start.
struct VariantFiles {
    layers: Vec<Descriptor>,
    config_desc: Descriptor,
    config_bytes: Vec<u8>,
    config: ImageConfig,
    /// One per layer, in order.
    diff_ids: Vec<Digest>,
}

/// Fetches and parses the config `manifest` names, refusing a manifest without one, with too many layers, or
/// whose config does not list one `diff_id` per layer.
async fn read_variant(
    fetcher: &Fetcher<'_>,
    digest: &Digest,
    manifest: ImageManifest,
) -> Result<VariantFiles, PullError> {
    let config_desc = manifest.config.ok_or_else(|| PullError::BadManifest {
        digest: digest.clone(),
        reason: "it has no config".into(),
    })?;
    if manifest.layers.len() > MAX_LAYERS {
        return Err(PullError::BadManifest {
            digest: digest.clone(),
            reason: format!("{} layers (at most {MAX_LAYERS})", manifest.layers.len()),
        });
    }
    let config_bytes = fetcher.small_blob(&config_desc, MAX_CONFIG_BYTES).await?;
    let config: ImageConfig =
        serde_json::from_slice(&config_bytes).map_err(|e| PullError::BadConfig {
            digest: config_desc.digest.clone(),
            reason: e.to_string(),
        })?;
    let diff_ids = config
        .rootfs
        .as_ref()
        .map(|r| r.diff_ids.clone())
        .unwrap_or_default();
    if diff_ids.len() != manifest.layers.len() {
        return Err(PullError::BadConfig {
            digest: config_desc.digest.clone(),
            reason: format!(
                "it lists {} diff_ids for {} layers",
                diff_ids.len(),
                manifest.layers.len()
            ),
        });
    }
    Ok(VariantFiles {
        layers: manifest.layers,
        config_desc,
        config_bytes,
        config,
        diff_ids,
    })
}

/// What every variant of one pull is tried with.
struct Trial<'a> {
    fetcher: &'a Fetcher<'a>,
    store: &'a Store,
    /// The image as the user named it.
    image: &'a str,
    host: &'a Host,
    options: &'a PullOptions,
    reporter: &'a Reporter,
}

impl Trial<'_> {
    /// Reads, fetches and proves one variant (`bytes` is its manifest). Refused::Variant lets the pull try the
    /// next one; anything else ends the pull.
    async fn try_attempt(&self, attempt: &Attempt, bytes: &[u8]) -> Result<VariantDone, Refused> {
        let Trial {
            fetcher,
            store,
            image,
            host,
            options,
            reporter,
        } = *self;
        let digest = &attempt.digest;
        let media_type = attempt.media_type.as_str();
        if !media_type::is_image_manifest(media_type) && !media_type.is_empty() {
            return Err(Refused::Variant(format!(
                "media type {media_type} is not an image manifest"
            )));
        }
        let manifest: ImageManifest =
            serde_json::from_slice(bytes).map_err(|e| PullError::BadManifest {
                digest: digest.clone(),
                reason: e.to_string(),
            })?;
        if let Some(mt) = &manifest.media_type {
            if !mt.is_empty() && mt != media_type && !media_type.is_empty() {
                return Err(Refused::Variant(format!(
                    "the manifest calls itself {mt} but was served as {media_type}"
                )));
            }
        }
        let VariantFiles {
            layers: manifest_layers,
            config_desc,
            config_bytes,
            config,
            diff_ids,
        } = read_variant(fetcher, digest, manifest).await?;

        // The config must state the platform that was chosen; a single manifest's config decides it.
        let stated = Platform::of_config(&config);
        let platform = if let Some(label) = &attempt.label {
            if !select::config_agrees_with_label(label, &stated) {
                return Err(Refused::Variant(format!(
                    "the index labels it {label} but its config says {stated}"
                )));
            }
            label.clone()
        } else {
            if !host.candidates.contains(&stated) && !unlabelled_arm_on(&stated, host) {
                return Err(PullError::WrongPlatform {
                    image: image.to_string(),
                    platform: stated,
                    device: host.describe(),
                }
                .into());
            }
            stated
        };
        store.put_blob(&config_desc.digest, &config_bytes)?;

        // Free space: what is missing, plus the unpacked estimate, with the store's margin.
        let blobs: Vec<(Digest, u64)> = manifest_layers
            .iter()
            .map(|l| (l.digest.clone(), l.size))
            .collect();
        let download = store.bytes_to_fetch(&blobs);
        let unpacked = blobs
            .iter()
            .map(|(_, s)| s.saturating_mul(UNPACK_FACTOR))
            .fold(0u64, u64::saturating_add);
        store.check_space(&Statvfs, download, unpacked)?;

        // Layers in parallel; a digest listed twice is fetched once.
        let mut unique: Vec<&Descriptor> = Vec::new();
        for l in &manifest_layers {
            if !unique.iter().any(|u| u.digest == l.digest) {
                unique.push(l);
            }
        }
        reporter.step(&format!(
            "fetching {platform} ({digest}): {} layers, {} to download",
            unique.len(),
            crate::human::bytes(download)
        ));
        let snapshots = match options.unpack {
            Some(_) => Some(Snapshots::open(store.state_dir()).map_err(PullError::from)?),
            None => None,
        };
        let source_of = |l: &Descriptor, diff_id: &Digest| LayerSource {
            digest: l.digest.clone(),
            media_type: l.media_type.clone(),
            path: store.layout().blob_path(&l.digest),
            diff_id: Some(diff_id.clone()),
        };
        let diff_id_of = |digest: &Digest| {
            manifest_layers
                .iter()
                .zip(&diff_ids)
                .find(|(l, _)| &l.digest == digest)
                .map(|(_, d)| d.clone())
        };
        // Each task fetches its layer, then unpacks it on a blocking thread while the other fetches go on.
        let tasks = unique.iter().map(|l| {
            let unpack = match (&snapshots, options.unpack, diff_id_of(&l.digest)) {
                (Some(s), Some(limits), Some(d)) => Some((s.clone(), limits, source_of(l, &d), d)),
                _ => None,
            };
            async move {
                let fetched = fetcher.layer(store, l, reporter).await?;
                let Some((snapshots, limits, source, diff_id)) = unpack else {
                    return Ok::<_, Refused>((fetched, false));
                };
                if snapshots.rootfs(&diff_id).is_some() {
                    return Ok((fetched, false));
                }
                let ensured =
                    tokio::task::spawn_blocking(move || snapshots.ensure(&source, &limits))
                        .await
                        .map_err(|e| PullError::Task(e.to_string()))?;
                match ensured {
                    Ok(Ensured::Unpacked(_)) => Ok((fetched, true)),
                    Ok(Ensured::Present) => Ok((fetched, false)),
                    // A layer that is not what the config says refuses this variant, as the proof would.
                    Err(e @ UnpackError::DiffIdMismatch { .. }) => {
                        Err(Refused::Variant(e.to_string()))
                    }
                    Err(e) => Err(Refused::Fatal(e.into())),
                }
            }
        });
        let fetched: Vec<(u64, bool)> = stream::iter(tasks)
            .buffer_unordered(options.parallel_layers.max(1))
            .try_collect()
            .await?;
        let layers_fetched = fetched.iter().filter(|(n, _)| *n > 0).count();
        let bytes_fetched = fetched.iter().map(|(n, _)| n).sum();
        let layers_unpacked = fetched.iter().filter(|(_, u)| *u).count();

        // Architecture proof over the image's own executables: from the snapshots when there are some, so no
        // layer is decompressed twice.
        let tree = match &snapshots {
            Some(snapshots) => {
                let mut layers = Vec::new();
                for diff_id in &diff_ids {
                    let meta = snapshots.meta(diff_id).map_err(PullError::from)?;
                    layers.push((
                        diff_id.clone(),
                        snapshots.path(diff_id).join("rootfs"),
                        meta.index,
                    ));
                }
                ImageTree::from_snapshots(layers)
            }
            None => ImageTree::new(
                manifest_layers
                    .iter()
                    .zip(&diff_ids)
                    .map(|(l, diff_id)| source_of(l, diff_id))
                    .collect(),
            ),
        };
        let scratch_dir = store.state_dir().join("tmp");
        tokio::fs::create_dir_all(&scratch_dir)
            .await
            .map_err(|source| PullError::Scratch {
                path: scratch_dir.clone(),
                source,
            })?;
        let (_, proved) = proof::prove_blocking(
            tree,
            config,
            host.candidates.clone(),
            host.page_size,
            attempt.trust_label,
            scratch_dir.join(format!("proof-{}", std::process::id())),
        )
        .await?;
        match proved {
            Ok(proof) => Ok(VariantDone {
                platform,
                proof: proof.checked,
                layers_fetched,
                bytes_fetched,
                layers_unpacked,
                proof_from_snapshots: snapshots.is_some(),
            }),
            Err(e) => Err(Refused::Variant(e.to_string())),
        }
    }
}

/// A config that says only `arm` may still be taken on a device with 32-bit ARM, pending proof.
fn unlabelled_arm_on(stated: &Platform, host: &Host) -> bool {
    stated.architecture == "arm"
        && stated.variant.is_none()
        && host.candidates.iter().any(|c| c.architecture == "arm")
}

/// Applies the repository's signature policy to the digest the reference resolved to (what `cosign sign
/// IMAGE:TAG` signs).
async fn check_signature(
    config: &Config,
    client: Option<&RegistryClient>,
    source: &Source,
    digest: &Digest,
    reporter: &Reporter,
) -> Result<String, PullError> {
    let sig_err = |e| PullError::Signature {
        image: source.to_string(),
        source: e,
    };
    let (client, reference) = match (client, source) {
        (Some(c), Source::Registry(r)) => (c, r),
        _ => return Ok("not checked (OCI layout source: no signatures to fetch)".into()),
    };
    let repo = reference.repository().to_string();
    let policy = Policy::for_repository(&config.signature_policies, &repo).map_err(sig_err)?;
    if !policy.needs_signatures() {
        return Ok("not checked (no signature policy for this repository)".into());
    }
    let outcomes = signatures::gather(client, reference, digest, &policy.keys).await?;
    let acceptance = policy.decide(&repo, digest, &outcomes).map_err(sig_err)?;
    let said = match acceptance {
        Acceptance::Verified(v) => format!("verified with {} ({})", v.key, v.form),
        Acceptance::Unsigned => "unsigned (policy if-present)".to_string(),
        Acceptance::NotChecked => "not checked".to_string(),
    };
    reporter.step(&format!("signature: {said}"));
    Ok(said)
}
