//! Lint: does every runnable entry of an image index hold code for its own label?
//!
//! Made for a CI step after `docker buildx build --platform … --push`: nothing in that toolchain checks that the
//! `linux/arm/v6` entry really holds v6 code, and a mislabelled entry otherwise shows up on the devices as SIGILL
//! or "exec format error". Each runnable entry goes through the pull's own proof ([`proof::prove`]) with the
//! entry's label standing in for the device, so lint and pull cannot disagree about a binary.
//!
//! Nothing is written to the store. A registry's layers are fetched into a scratch directory that is removed
//! afterwards, and only the layers the proof reads: the proof asks for layers top-down, and a layer it asks for
//! that is not there yet is fetched and the proof resumed with what it had already indexed. An OCI layout's blobs
//! are read where they are. `--all-binaries` needs every layer.

use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::proof::{self, MAX_EXECUTABLE_BYTES, ProofError};
use super::{Fetcher, PullError, Source, VariantFiles, looks_like_index, read_variant};
use crate::digest::Digest;
use crate::elf::{self, BinaryRequirements, FileType, Outcome};
use crate::layers::{self, ImageTree, LayerError, LayerSource};
use crate::oci::{Descriptor, ImageManifest, media_type};
use crate::platform::Platform;
use crate::platform::select::{self, IndexEntry, PassReason};
use crate::registry::{BlobSpec, RegistryClient};

/// What was concluded about one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Its code runs on its label.
    Pass,
    /// Its code needs more than its label, or its config contradicts the label.
    Fail,
    /// It could not be checked (fetch failed, manifest or config unreadable, no program to prove).
    Error,
    /// Not a runnable Linux image: attestations, artifacts, other OSes.
    Skipped,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Fail => "fail",
            Verdict::Error => "error",
            Verdict::Skipped => "skipped",
        }
    }
}

/// One entry of the index (or the single manifest a reference named) and what lint found.
#[derive(Debug, Clone, Serialize)]
pub struct EntryLint {
    /// The label as the index states it, normalised; for a single manifest, its config's platform.
    pub platform: String,
    pub digest: Digest,
    pub verdict: Verdict,
    pub reason: String,
    /// The entrypoint and each interpreter it needs, with what each needs.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub checked: Vec<String>,
    /// With `--all-binaries`: how many ELF executables and shared objects were checked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub binaries_checked: Option<usize>,
    /// With `--all-binaries`: every ELF file that needs more than the label, and what it needs.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub wrong_binaries: Vec<String>,
    /// The label as a platform, for `--require`; `None` for skipped entries.
    #[serde(skip)]
    pub label: Option<Platform>,
}

impl EntryLint {
    fn new(platform: String, digest: Digest, verdict: Verdict, reason: String) -> EntryLint {
        EntryLint {
            platform,
            digest,
            verdict,
            reason,
            checked: Vec::new(),
            binaries_checked: None,
            wrong_binaries: Vec::new(),
            label: None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LintReport {
    pub image: String,
    pub digest: Digest,
    pub media_type: String,
    pub entries: Vec<EntryLint>,
}

impl LintReport {
    /// The required platforms no checked entry is labelled with.
    pub fn missing(&self, required: &[Platform]) -> Vec<Platform> {
        required
            .iter()
            .filter(|r| {
                !self
                    .entries
                    .iter()
                    .filter_map(|e| e.label.as_ref())
                    .any(|label| covers(label, r))
            })
            .cloned()
            .collect()
    }

    pub fn count(&self, verdict: Verdict) -> usize {
        self.entries.iter().filter(|e| e.verdict == verdict).count()
    }
}

/// Whether an entry labelled `label` provides the `required` platform. A required platform without a variant takes
/// the variant the label would default to (`arm64` is v8, `amd64` is v1), or any variant where there is no default.
fn covers(label: &Platform, required: &Platform) -> bool {
    if label.os != required.os || label.architecture != required.architecture {
        return false;
    }
    let default = match label.architecture.as_str() {
        "arm64" => Some("v8"),
        "amd64" => Some("v1"),
        _ => None,
    };
    let have = label.variant.as_deref().or(default);
    match required.variant.as_deref().or(default) {
        Some(want) => have == Some(want),
        None => true,
    }
}

#[derive(Debug, Clone, Default)]
pub struct LintOptions {
    /// Check every ELF executable and shared object in the image, not only the entrypoint's chain.
    pub all_binaries: bool,
}

/// A directory for fetched layers and extracted executables, removed when dropped.
struct Scratch {
    dir: PathBuf,
    /// Layers completely fetched and verified; a file without an entry here may be a partial download.
    fetched: HashSet<Digest>,
}

impl Scratch {
    fn create() -> Result<Scratch, PullError> {
        let salt = rand::random::<u32>();
        let dir =
            std::env::temp_dir().join(format!("flotilla-lint-{}-{salt:08x}", std::process::id()));
        // Private: a registry's layers may be private too.
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|source| PullError::Scratch {
                path: dir.clone(),
                source,
            })?;
        Ok(Scratch {
            dir,
            fetched: HashSet::new(),
        })
    }

    /// Removes the fetched layers: entries for different architectures share none, and a CI runner's temporary
    /// space should hold one entry's layers at a time, not the whole index's.
    fn clear_layers(&mut self) {
        for digest in std::mem::take(&mut self.fetched) {
            let _ = std::fs::remove_file(self.layer_path(&digest));
        }
    }

    fn layer_path(&self, digest: &Digest) -> PathBuf {
        self.dir
            .join(format!("{}-{}", digest.algorithm().name(), digest.hex()))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Checks every runnable entry of the image `source` names against its own label.
pub async fn lint(
    client: Option<&RegistryClient>,
    source: &Source,
    options: &LintOptions,
) -> Result<LintReport, PullError> {
    let fetcher = Fetcher::for_source(source, client)?;
    let top = fetcher.top().await?;
    let mut scratch = Scratch::create()?;
    let mut entries = Vec::new();
    if media_type::is_index(&top.media_type) || looks_like_index(&top.bytes) {
        for entry in IndexEntry::from_index_json(&top.bytes)? {
            let shown = entry
                .normalized_platform()
                .map_or_else(|| "(no platform)".to_string(), |p| p.to_string());
            let label = match runnable(&entry) {
                Placement::Label(label) => label,
                Placement::Skipped(why) => {
                    entries.push(EntryLint::new(
                        shown,
                        entry.digest.clone(),
                        Verdict::Skipped,
                        why,
                    ));
                    continue;
                }
            };
            let checked = match fetcher.manifest(&entry.digest, entry.size).await {
                Ok(bytes) => {
                    lint_manifest(
                        &fetcher,
                        &mut scratch,
                        &entry.digest,
                        &entry.media_type,
                        &bytes,
                        Some(&label),
                        options,
                    )
                    .await
                }
                Err(e) => Err(e),
            };
            scratch.clear_layers();
            entries.push(conclude(shown, entry.digest.clone(), Some(label), checked));
        }
    } else {
        let checked = lint_manifest(
            &fetcher,
            &mut scratch,
            &top.digest,
            &top.media_type,
            &top.bytes,
            None,
            options,
        )
        .await;
        entries.push(conclude(
            "(single manifest)".to_string(),
            top.digest.clone(),
            None,
            checked,
        ));
    }
    Ok(LintReport {
        image: source.to_string(),
        digest: top.digest,
        media_type: top.media_type,
        entries,
    })
}

/// An entry's result, or the error that kept it from being checked, as a row.
fn conclude(
    shown: String,
    digest: Digest,
    label: Option<Platform>,
    checked: Result<EntryLint, PullError>,
) -> EntryLint {
    match checked {
        Ok(mut lint) => {
            if label.is_some() {
                lint.platform = shown;
            }
            lint
        }
        Err(e) => {
            let mut lint = EntryLint::new(shown, digest, Verdict::Error, one_line(&e));
            lint.label = label;
            lint
        }
    }
}

fn one_line(e: &dyn std::error::Error) -> String {
    crate::error_chain(e).replace("\n  caused by: ", ": ")
}

/// Whether lint proves an entry: against its label, or not at all, for the reason shown in the report.
enum Placement {
    Label(Platform),
    Skipped(String),
}

/// The index selection decides what counts as an image, so lint skips exactly what a pull would never take.
fn runnable(entry: &IndexEntry) -> Placement {
    let candidates: Vec<Platform> = entry
        .normalized_platform()
        .into_iter()
        .filter(|p| p.os == "linux")
        .collect();
    let selection = select::select(&candidates, std::slice::from_ref(entry));
    if let Some(choice) = selection.chosen.into_iter().next() {
        return Placement::Label(choice.platform);
    }
    Placement::Skipped(match selection.passed_over.into_iter().next() {
        Some(passed) => match passed.reason {
            PassReason::WrongOs { platform, .. } => {
                format!("{platform}: flotilla checks Linux images only")
            }
            other => other.to_string(),
        },
        None => "not an image the index selection can place".to_string(),
    })
}

/// What a label promises to run. An `arm` label without a variant is taken as v7, as containerd and Docker do.
fn promised(label: &Platform) -> Platform {
    if label.architecture == "arm" && label.variant.is_none() {
        Platform::new(&label.os, "arm", Some("v7"))
    } else {
        label.clone()
    }
}

async fn lint_manifest(
    fetcher: &Fetcher<'_>,
    scratch: &mut Scratch,
    digest: &Digest,
    media_type: &str,
    bytes: &[u8],
    label: Option<&Platform>,
    options: &LintOptions,
) -> Result<EntryLint, PullError> {
    let digest = digest.clone();
    if !media_type.is_empty() && !media_type::is_image_manifest(media_type) {
        return Err(PullError::BadManifest {
            digest,
            reason: format!("media type {media_type} is not an image manifest"),
        });
    }
    let manifest: ImageManifest =
        serde_json::from_slice(bytes).map_err(|e| PullError::BadManifest {
            digest: digest.clone(),
            reason: e.to_string(),
        })?;
    let VariantFiles {
        layers,
        config,
        diff_ids,
        ..
    } = read_variant(fetcher, &digest, manifest).await?;
    let stated = Platform::of_config(&config);
    let label = label.cloned().unwrap_or_else(|| stated.clone());
    let mut lint = EntryLint::new(label.to_string(), digest, Verdict::Pass, String::new());
    lint.label = Some(label.clone());
    if !select::config_agrees_with_label(&label, &stated) {
        lint.verdict = Verdict::Fail;
        lint.reason = format!("the index labels it {label} but its config says {stated}");
        return Ok(lint);
    }
    let sources: Vec<LayerSource> = layers
        .iter()
        .zip(diff_ids)
        .map(|(l, diff_id)| LayerSource {
            digest: l.digest.clone(),
            media_type: l.media_type.clone(),
            path: match fetcher {
                Fetcher::Layout { layout, .. } => layout.blob_path(&l.digest),
                Fetcher::Registry { .. } => scratch.layer_path(&l.digest),
            },
            diff_id: Some(diff_id),
        })
        .collect();
    if options.all_binaries {
        for layer in &layers {
            fetch_layer(fetcher, scratch, layer).await?;
        }
    }

    let against = promised(&label);
    // No page size: a label does not state one.
    let proof_file = scratch.dir.join("proof");
    let prove = |tree| {
        proof::prove_blocking(
            tree,
            config.clone(),
            vec![against.clone()],
            None,
            true,
            proof_file.clone(),
        )
    };
    // A pass that asks for a layer not fetched yet is resumed once it is there: at most one more pass per layer.
    let (mut tree, mut proved) = prove(ImageTree::new(sources.clone())).await?;
    for _ in 0..layers.len() {
        let wanted = match &proved {
            Err(ProofError::Layer(LayerError::Read { layer, source, .. }))
                if source.kind() == io::ErrorKind::NotFound
                    && matches!(fetcher, Fetcher::Registry { .. })
                    && !scratch.fetched.contains(layer) =>
            {
                layers.iter().find(|d| &d.digest == layer)
            }
            _ => None,
        };
        let Some(desc) = wanted else { break };
        fetch_layer(fetcher, scratch, desc).await?;
        (tree, proved) = prove(tree).await?;
    }
    match proved {
        Ok(proof) => {
            lint.reason = format!("{}: runs on {label}", proof.needs.join(", then "));
            lint.checked = proof.needs;
        }
        Err(ProofError::CannotRun { path, reasons }) => {
            lint.verdict = Verdict::Fail;
            lint.reason = format!("{path}: {}", against_label(&reasons));
        }
        Err(e) => {
            lint.verdict = Verdict::Error;
            lint.reason = one_line(&e);
        }
    }
    if options.all_binaries {
        let candidates = vec![against.clone()];
        let file = scratch.dir.join("binary");
        let scanned =
            tokio::task::spawn_blocking(move || scan_all(&mut tree, &sources, &candidates, &file))
                .await
                .map_err(|e| PullError::Task(e.to_string()))?;
        match scanned {
            Ok(scan) => {
                lint.binaries_checked = Some(scan.checked);
                if scan.wrong.is_empty() && lint.verdict == Verdict::Pass {
                    lint.reason.push_str(&format!(
                        "; so does every ELF executable and shared object ({} checked)",
                        scan.checked
                    ));
                }
                if !scan.wrong.is_empty() && lint.verdict != Verdict::Error {
                    if lint.verdict == Verdict::Pass {
                        lint.reason = format!(
                            "{} of {} ELF files need more than {label}: {}",
                            scan.wrong.len(),
                            scan.checked,
                            scan.wrong[0]
                        );
                    }
                    lint.verdict = Verdict::Fail;
                }
                lint.wrong_binaries = scan.wrong;
            }
            Err(e) if lint.verdict == Verdict::Pass => {
                lint.verdict = Verdict::Error;
                lint.reason = format!("reading every binary: {}", one_line(&e));
            }
            Err(_) => {}
        }
    }
    Ok(lint)
}

/// The proof's reason for a refusal, said about the label: the proof speaks of "this host", which here is the
/// label the entry claims.
fn against_label(reasons: &[String]) -> String {
    reasons
        .first()
        .map_or_else(String::new, |r| r.replace("this host runs", "its label is"))
}

/// Brings a registry layer into the scratch directory, verified; an OCI layout's layers are read in place.
async fn fetch_layer(
    fetcher: &Fetcher<'_>,
    scratch: &mut Scratch,
    desc: &Descriptor,
) -> Result<(), PullError> {
    let Fetcher::Registry { client, reference } = fetcher else {
        return Ok(());
    };
    if scratch.fetched.contains(&desc.digest) {
        return Ok(());
    }
    let spec = BlobSpec {
        digest: desc.digest.clone(),
        size: desc.size,
    };
    client
        .fetch_blob(
            reference.repository(),
            &spec,
            &scratch.layer_path(&desc.digest),
            &|_, _| {},
        )
        .await?;
    scratch.fetched.insert(desc.digest.clone());
    Ok(())
}

struct Scan {
    checked: usize,
    wrong: Vec<String>,
}

/// Checks every ELF executable and shared object visible in the merged image against `candidates`. Each layer is
/// read twice: once to list its files and ask the tree which of them the layers above leave visible, once to read
/// those that start like ELF.
fn scan_all(
    tree: &mut ImageTree,
    layers: &[LayerSource],
    candidates: &[Platform],
    file: &Path,
) -> Result<Scan, LayerError> {
    let mut scan = Scan {
        checked: 0,
        wrong: Vec::new(),
    };
    for (n, layer) in layers.iter().enumerate() {
        let read_err = |source| LayerError::Read {
            layer: layer.digest.clone(),
            path: layer.path.clone(),
            source,
        };
        let mut files = Vec::new();
        let mut archive = tar::Archive::new(layers::open_layer(layer)?);
        for entry in archive.entries().map_err(read_err)? {
            let entry = entry.map_err(read_err)?;
            let kind = entry.header().entry_type();
            if kind.is_file() || kind.is_contiguous() {
                files.push(layers::normalize(&String::from_utf8_lossy(
                    &entry.path_bytes(),
                )));
            }
        }
        let mut visible = HashSet::new();
        for path in files {
            match tree.resolve(&format!("/{path}")) {
                Ok(found) if found.layer == n && found.path == path => {
                    visible.insert(path);
                }
                Ok(_)
                | Err(
                    LayerError::NotFound { .. }
                    | LayerError::NotADirectory { .. }
                    | LayerError::IsADirectory { .. },
                ) => {}
                Err(e) => return Err(e),
            }
        }
        let mut archive = tar::Archive::new(layers::open_layer(layer)?);
        for entry in archive.entries().map_err(read_err)? {
            let mut entry = entry.map_err(read_err)?;
            let path = layers::normalize(&String::from_utf8_lossy(&entry.path_bytes()));
            if !visible.contains(&path) {
                continue;
            }
            let mut magic = [0u8; 4];
            if entry.read_exact(&mut magic).is_err() || &magic != b"\x7fELF" {
                continue;
            }
            let write_err = |source| LayerError::Write {
                path: file.to_path_buf(),
                source,
            };
            let mut out = std::fs::File::create(file).map_err(write_err)?;
            out.write_all(&magic).map_err(write_err)?;
            io::copy(&mut (&mut entry).take(MAX_EXECUTABLE_BYTES), &mut out).map_err(read_err)?;
            out.flush().map_err(write_err)?;
            drop(out);
            // A file that only starts like ELF (a truncated object, test data) says nothing about the label.
            let Ok(BinaryRequirements::Elf(req)) = elf::inspect_file(file) else {
                continue;
            };
            // Relocatable objects and core files never run; judging them would fail images for their build inputs.
            if !matches!(req.file_type, FileType::Executable | FileType::SharedObject) {
                continue;
            }
            scan.checked += 1;
            let req = BinaryRequirements::Elf(req);
            let verdict = elf::can_run(&req, candidates, None);
            if verdict.outcome == Outcome::CannotRun {
                scan.wrong
                    .push(format!("/{path}: {}", against_label(&verdict.reasons)));
            }
        }
    }
    let _ = std::fs::remove_file(file);
    Ok(scan)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Platform {
        s.parse().unwrap()
    }

    #[test]
    fn a_required_platform_without_variant_takes_the_labels_default() {
        assert!(covers(&p("linux/arm64/v8"), &p("linux/arm64")));
        assert!(covers(&p("linux/amd64"), &p("linux/amd64")));
        assert!(!covers(&p("linux/amd64/v3"), &p("linux/amd64")));
        assert!(covers(&p("linux/arm/v6"), &p("linux/arm")));
        assert!(!covers(&p("linux/arm/v7"), &p("linux/arm/v6")));
        assert!(!covers(&p("linux/arm64"), &p("linux/amd64")));
        assert!(!covers(&p("windows/amd64"), &p("linux/amd64")));
    }

    #[test]
    fn an_unlabelled_arm_entry_is_held_to_v7() {
        assert_eq!(promised(&p("linux/arm")), p("linux/arm/v7"));
        assert_eq!(promised(&p("linux/arm/v6")), p("linux/arm/v6"));
    }

    #[test]
    fn the_proofs_host_wording_becomes_the_label() {
        let said = against_label(&["needs linux/arm/v7: x; this host runs linux/arm/v6".into()]);
        assert_eq!(said, "needs linux/arm/v7: x; its label is linux/arm/v6");
    }
}
