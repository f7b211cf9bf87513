//! Index selection: which entries of an image index (OCI index or Docker manifest list) this device can run, best
//! first, and why every other entry was passed over.
//!
//! Selection trusts index labels only as far as they deserve: each chosen entry is later proven by the ELF headers
//! of its own binaries, so the pull walks [`Selection::chosen`] in order and falls back to the next entry when one
//! fails that proof. Rules, in the order they are applied to each entry:
//! - attestations (`vnd.docker.reference.type = attestation-manifest`) and artifacts (`artifactType` set) are never
//!   images; a nested index or any media type other than an OCI image manifest or a Docker schema-2 manifest is
//!   passed over;
//! - an entry without a platform, or with buildx's `unknown/unknown`, cannot be placed and is passed over;
//! - the entry's OS must be one the device runs (so windows entries never match on linux); `os.features` are
//!   mandatory features (OCI image-index spec) and flotilla knows of none on linux, so an entry requiring any is
//!   passed over; `os.version` is meaningful only for windows and is ignored on linux (kept on the choice);
//! - the normalised platform must equal a candidate (`amd64/v3` thus matches only a v3-capable host), ranked by the
//!   candidate's position, index order among entries for the same candidate;
//! - `linux/arm` without a variant is usually a v7 build: it counts as `arm/v7` where the device runs v7; on a device
//!   whose best 32-bit ARM is v6 or v5 it is kept only as a last resort flagged [`Choice::needs_proof`], after every
//!   properly labelled match.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;

use crate::digest::{Digest, DigestError};
use crate::oci::{DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST};
use crate::platform::Platform;

/// The annotation buildx puts on an attestation entry, and the one naming the image it attests.
pub const REFERENCE_TYPE_ANNOTATION: &str = "vnd.docker.reference.type";
pub const REFERENCE_DIGEST_ANNOTATION: &str = "vnd.docker.reference.digest";
const ATTESTATION_MANIFEST: &str = "attestation-manifest";

#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    #[error(
        "the image index is not valid JSON of the OCI index / Docker manifest list form: {0}; \
         the registry sent something else, check the reference"
    )]
    BadIndex(#[source] serde_json::Error),
    #[error("entry {position} of the image index has digest {digest:?}: {source}")]
    BadEntryDigest {
        position: usize,
        digest: String,
        #[source]
        source: DigestError,
    },
    #[error("{}", no_match_message(.offered, .device))]
    NoMatch {
        /// Every entry of the index with the reason it was passed over.
        offered: Vec<PassedOver>,
        /// The platforms this device runs, best first.
        device: Vec<Platform>,
    },
}

/// The platform fields of an index entry as the index wrote them (not normalised).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntryPlatform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
    pub os_version: Option<String>,
    pub os_features: Vec<String>,
}

/// One entry (descriptor) of an image index, as plain data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    /// Position in the index's `manifests` array.
    pub position: usize,
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
    pub platform: Option<EntryPlatform>,
    pub annotations: BTreeMap<String, String>,
    pub artifact_type: Option<String>,
}

#[derive(Deserialize)]
struct RawIndex {
    #[serde(default)]
    manifests: Vec<RawDescriptor>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDescriptor {
    #[serde(default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    size: u64,
    platform: Option<RawPlatform>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    artifact_type: Option<String>,
}

#[derive(Deserialize)]
struct RawPlatform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    variant: Option<String>,
    #[serde(rename = "os.version")]
    os_version: Option<String>,
    #[serde(rename = "os.features", default)]
    os_features: Vec<String>,
}

impl IndexEntry {
    /// Reads the `manifests` of an OCI image index or a Docker manifest list.
    pub fn from_index_json(bytes: &[u8]) -> Result<Vec<IndexEntry>, SelectError> {
        let raw: RawIndex = serde_json::from_slice(bytes).map_err(SelectError::BadIndex)?;
        raw.manifests
            .into_iter()
            .enumerate()
            .map(|(position, d)| {
                let digest = d
                    .digest
                    .parse()
                    .map_err(|source| SelectError::BadEntryDigest {
                        position,
                        digest: d.digest.clone(),
                        source,
                    })?;
                Ok(IndexEntry {
                    position,
                    digest,
                    media_type: d.media_type,
                    size: d.size,
                    platform: d.platform.map(|p| EntryPlatform {
                        os: p.os,
                        architecture: p.architecture,
                        variant: p.variant,
                        os_version: p.os_version,
                        os_features: p.os_features,
                    }),
                    annotations: d.annotations,
                    artifact_type: d.artifact_type,
                })
            })
            .collect()
    }

    /// The entry's platform normalised through [`Platform::new`], if it has one.
    pub fn normalized_platform(&self) -> Option<Platform> {
        self.platform
            .as_ref()
            .map(|p| Platform::new(&p.os, &p.architecture, p.variant.as_deref()))
    }
}

/// An entry this device may run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub entry: IndexEntry,
    /// The entry's own label, normalised (`linux/arm` for an unlabelled ARM entry).
    pub platform: Platform,
    /// The candidate the entry was accepted as; its binaries are checked against this platform.
    pub runs_as: Platform,
    /// Position of `runs_as` in the candidate list (0 = best).
    pub rank: usize,
    /// An unlabelled `arm` entry taken on a device whose best 32-bit ARM is below v7: its binaries must prove they
    /// run here before it is used.
    pub needs_proof: bool,
    /// `os.version` of a linux entry, which has no meaning there and was ignored.
    pub ignored_os_version: Option<String>,
}

/// An entry that was not chosen, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassedOver {
    pub entry: IndexEntry,
    pub reason: PassReason,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PassReason {
    /// A buildx attestation manifest; `attests` is the image it describes, when the index names it.
    Attestation {
        attests: Option<String>,
    },
    Artifact {
        artifact_type: String,
    },
    NestedIndex {
        media_type: String,
    },
    NotAnImage {
        media_type: String,
    },
    NoPlatform,
    UnknownPlatform,
    WrongOs {
        platform: Platform,
        device_os: String,
    },
    MissingOsFeatures {
        platform: Platform,
        features: Vec<String>,
    },
    ArmTooNew {
        platform: Platform,
        best: u8,
    },
    NoArm32 {
        platform: Platform,
    },
    Amd64LevelTooHigh {
        platform: Platform,
        best: u8,
    },
    ArchitectureNotRunnable {
        platform: Platform,
    },
    VariantNotRunnable {
        platform: Platform,
        runnable: Vec<Platform>,
    },
}

impl PassReason {
    /// Whether the entry is an image for some platform at all (as opposed to an attestation, artifact, nested
    /// index or an entry that cannot be placed).
    pub fn is_platform_mismatch(&self) -> bool {
        matches!(
            self,
            PassReason::WrongOs { .. }
                | PassReason::MissingOsFeatures { .. }
                | PassReason::ArmTooNew { .. }
                | PassReason::NoArm32 { .. }
                | PassReason::Amd64LevelTooHigh { .. }
                | PassReason::ArchitectureNotRunnable { .. }
                | PassReason::VariantNotRunnable { .. }
        )
    }
}

impl fmt::Display for PassReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PassReason::Attestation { attests: Some(d) } => {
                write!(f, "attestation manifest for {d}")
            }
            PassReason::Attestation { attests: None } => {
                write!(
                    f,
                    "attestation manifest (the index does not say for which image)"
                )
            }
            PassReason::Artifact { artifact_type } => {
                write!(f, "artifact of type {artifact_type}, not a runnable image")
            }
            PassReason::NestedIndex { media_type } => write!(
                f,
                "nested index ({media_type}): flotilla does not descend into an index inside an index"
            ),
            PassReason::NotAnImage { media_type } if media_type.is_empty() => {
                write!(f, "no media type: cannot tell whether it is an image")
            }
            PassReason::NotAnImage { media_type } => {
                write!(f, "media type {media_type} is not an image manifest")
            }
            PassReason::NoPlatform => write!(f, "no platform given: cannot tell what it runs on"),
            PassReason::UnknownPlatform => write!(
                f,
                "unknown/unknown: not built for any platform (build tools use it for attestations)"
            ),
            PassReason::WrongOs {
                platform,
                device_os,
            } => write!(f, "{platform}: this device runs {device_os}"),
            PassReason::MissingOsFeatures { platform, features } => write!(
                f,
                "{platform}: requires OS features {}, which this device is not known to have",
                features.join(", ")
            ),
            PassReason::ArmTooNew { platform, best } => {
                write!(f, "{platform}: this device's best 32-bit ARM is v{best}")
            }
            PassReason::NoArm32 { platform } => {
                write!(f, "{platform}: this device runs no 32-bit ARM code")
            }
            PassReason::Amd64LevelTooHigh { platform, best: 1 } => {
                write!(
                    f,
                    "{platform}: this device runs only the x86-64 baseline (v1)"
                )
            }
            PassReason::Amd64LevelTooHigh { platform, best } => {
                write!(f, "{platform}: this device's best x86-64 level is v{best}")
            }
            PassReason::ArchitectureNotRunnable { platform } => write!(
                f,
                "{platform}: this device cannot run {} code",
                platform.architecture
            ),
            PassReason::VariantNotRunnable { platform, runnable } => {
                write!(
                    f,
                    "{platform}: this device runs {} only as ",
                    platform.architecture
                )?;
                write_list(f, runnable)
            }
        }
    }
}

fn write_list(f: &mut fmt::Formatter<'_>, platforms: &[Platform]) -> fmt::Result {
    for (i, p) in platforms.iter().enumerate() {
        if i > 0 {
            write!(f, ", ")?;
        }
        write!(f, "{p}")?;
    }
    Ok(())
}

/// The outcome of [`select`]: acceptable entries best first, and every other entry in index order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    pub chosen: Vec<Choice>,
    pub passed_over: Vec<PassedOver>,
}

impl Selection {
    /// The selection if anything was chosen, otherwise an error that lists what the index offers and what the
    /// device runs.
    pub fn require_match(self, candidates: &[Platform]) -> Result<Selection, SelectError> {
        if self.chosen.is_empty() {
            Err(SelectError::NoMatch {
                offered: self.passed_over,
                device: candidates.to_vec(),
            })
        } else {
            Ok(self)
        }
    }
}

fn no_match_message(offered: &[PassedOver], device: &[Platform]) -> String {
    use std::fmt::Write;
    let mut s =
        String::from("no entry of the image index runs on this device\n  this device runs: ");
    if device.is_empty() {
        s.push_str("(no platform detected)");
    } else {
        let names: Vec<String> = device.iter().map(ToString::to_string).collect();
        s.push_str(&names.join(", "));
    }
    s.push_str("\n  the index offers:");
    let mut others = 0;
    for p in offered {
        if p.reason.is_platform_mismatch() {
            let _ = write!(s, "\n    {}", p.reason);
        } else {
            others += 1;
        }
    }
    if others > 0 {
        let _ = write!(
            s,
            "\n    and {others} entr{} that {} not images for a platform (attestations, artifacts, unlabelled)",
            if others == 1 { "y" } else { "ies" },
            if others == 1 { "is" } else { "are" },
        );
    }
    if offered.is_empty() {
        s.push_str(" nothing (the index is empty)");
    }
    s.push_str(
        "\n  use an image built for one of this device's platforms, or pass --platform if detection is wrong",
    );
    s
}

/// Picks the entries of an index this device can run. `candidates` are the device's platforms, best first, as
/// platform detection (or `--platform`) produced them.
pub fn select(candidates: &[Platform], entries: &[IndexEntry]) -> Selection {
    let mut chosen = Vec::new();
    let mut passed_over = Vec::new();
    for entry in entries {
        match judge(candidates, entry) {
            Ok(choice) => chosen.push(choice),
            Err(reason) => passed_over.push(PassedOver {
                entry: entry.clone(),
                reason,
            }),
        }
    }
    // Entries for the same candidate keep index order, whatever order the slice came in.
    chosen.sort_by_key(|c| (c.needs_proof, c.rank, c.entry.position));
    Selection {
        chosen,
        passed_over,
    }
}

fn judge(candidates: &[Platform], entry: &IndexEntry) -> Result<Choice, PassReason> {
    if entry
        .annotations
        .get(REFERENCE_TYPE_ANNOTATION)
        .map(String::as_str)
        == Some(ATTESTATION_MANIFEST)
    {
        return Err(PassReason::Attestation {
            attests: entry.annotations.get(REFERENCE_DIGEST_ANNOTATION).cloned(),
        });
    }
    if let Some(t) = entry.artifact_type.as_ref().filter(|t| !t.is_empty()) {
        return Err(PassReason::Artifact {
            artifact_type: t.clone(),
        });
    }
    match entry.media_type.as_str() {
        OCI_MANIFEST | DOCKER_MANIFEST => {}
        OCI_INDEX | DOCKER_MANIFEST_LIST => {
            return Err(PassReason::NestedIndex {
                media_type: entry.media_type.clone(),
            });
        }
        _ => {
            return Err(PassReason::NotAnImage {
                media_type: entry.media_type.clone(),
            });
        }
    }
    let raw = entry.platform.as_ref().ok_or(PassReason::NoPlatform)?;
    let platform = Platform::new(&raw.os, &raw.architecture, raw.variant.as_deref());
    if platform.os == "unknown"
        || platform.architecture == "unknown"
        || platform.architecture.is_empty()
    {
        return Err(PassReason::UnknownPlatform);
    }
    if !candidates.iter().any(|c| c.os == platform.os) {
        return Err(PassReason::WrongOs {
            device_os: candidates
                .first()
                .map_or_else(|| "linux".to_string(), |c| c.os.clone()),
            platform,
        });
    }
    if !raw.os_features.is_empty() {
        return Err(PassReason::MissingOsFeatures {
            platform,
            features: raw.os_features.clone(),
        });
    }
    let ignored_os_version = if platform.os == "windows" {
        None
    } else {
        raw.os_version.clone()
    };
    let choice = |runs_as: Platform, rank: usize, needs_proof: bool, platform: Platform| Choice {
        entry: entry.clone(),
        platform,
        runs_as,
        rank,
        needs_proof,
        ignored_os_version: ignored_os_version.clone(),
    };

    if let Some(rank) = candidates.iter().position(|c| *c == platform) {
        return Ok(choice(platform.clone(), rank, false, platform));
    }
    let same_arch = |c: &&Platform| c.os == platform.os && c.architecture == platform.architecture;
    if platform.architecture == "arm" && platform.variant.is_none() {
        let v7 = Platform::new(&platform.os, "arm", Some("v7"));
        if let Some(rank) = candidates.iter().position(|c| *c == v7) {
            return Ok(choice(v7, rank, false, platform));
        }
        return match candidates.iter().enumerate().find(|(_, c)| same_arch(c)) {
            Some((rank, best)) => Ok(choice(best.clone(), rank, true, platform)),
            None => Err(PassReason::NoArm32 { platform }),
        };
    }
    let runnable: Vec<Platform> = candidates.iter().filter(same_arch).cloned().collect();
    let Some(best) = runnable.first() else {
        return Err(if platform.architecture == "arm" {
            PassReason::NoArm32 { platform }
        } else {
            PassReason::ArchitectureNotRunnable { platform }
        });
    };
    if let (Some(want), Some(have)) = (platform.arm_version(), best.arm_version()) {
        if want > have {
            return Err(PassReason::ArmTooNew {
                platform,
                best: have,
            });
        }
    }
    if let (Some(want), Some(have)) = (platform.amd64_level(), best.amd64_level()) {
        if want > have {
            return Err(PassReason::Amd64LevelTooHigh {
                platform,
                best: have,
            });
        }
    }
    Err(PassReason::VariantNotRunnable { platform, runnable })
}

/// Whether an image already stored, whose config states `stated`, is a variant for this device: one of its
/// candidates, or of a candidate's architecture when the config names no variant (its pull proved it then).
pub fn stored_fits(candidates: &[Platform], stated: &Platform) -> bool {
    candidates.iter().any(|c| {
        c == stated
            || (stated.variant.is_none()
                && c.os == stated.os
                && c.architecture == stated.architecture)
    })
}

/// Whether an image's config agrees with the index label it was chosen by: the config must state the label's OS
/// and architecture, and its variant when both give one. arm64's variants are levels (`v8`, `v8.2`) that configs
/// rarely state the way the index does, so they are not compared.
pub fn config_agrees_with_label(label: &Platform, stated: &Platform) -> bool {
    stated.os == label.os
        && stated.architecture == label.architecture
        && (stated.variant.is_none()
            || label.variant.is_none()
            || stated.variant == label.variant
            || label.architecture == "arm64")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(seed: &str) -> Digest {
        Digest::sha256_of(seed.as_bytes())
    }

    /// One `manifests` element as registries serve it.
    fn image(platform: &str) -> serde_json::Value {
        let mut parts = platform.split('/');
        let os = parts.next().unwrap_or_default();
        let arch = parts.next().unwrap_or_default();
        let mut p = serde_json::json!({ "os": os, "architecture": arch });
        if let Some(v) = parts.next() {
            p["variant"] = v.into();
        }
        serde_json::json!({
            "mediaType": OCI_MANIFEST,
            "digest": digest(platform).to_string(),
            "size": 1234,
            "platform": p,
        })
    }

    /// A buildx attestation entry for the image of `platform`.
    fn attestation(platform: &str) -> serde_json::Value {
        serde_json::json!({
            "mediaType": OCI_MANIFEST,
            "digest": digest(&format!("att {platform}")).to_string(),
            "size": 839,
            "annotations": {
                "vnd.docker.reference.digest": digest(platform).to_string(),
                "vnd.docker.reference.type": "attestation-manifest",
            },
            "platform": { "architecture": "unknown", "os": "unknown" },
        })
    }

    fn index(manifests: Vec<serde_json::Value>) -> Vec<IndexEntry> {
        let doc = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": manifests,
        });
        IndexEntry::from_index_json(doc.to_string().as_bytes()).unwrap()
    }

    /// Docker Hub's `library/busybox` as of 2025: every Debian architecture plus buildx attestations.
    fn busybox_index() -> Vec<IndexEntry> {
        let platforms = [
            "linux/amd64",
            "linux/arm/v5",
            "linux/arm/v6",
            "linux/arm/v7",
            "linux/arm64/v8",
            "linux/386",
            "linux/ppc64le",
            "linux/riscv64",
            "linux/s390x",
        ];
        let mut m: Vec<_> = platforms.iter().map(|p| image(p)).collect();
        m.extend(platforms.iter().map(|p| attestation(p)));
        index(m)
    }

    fn device(platforms: &[&str]) -> Vec<Platform> {
        platforms.iter().map(|p| p.parse().unwrap()).collect()
    }

    fn chosen(s: &Selection) -> Vec<String> {
        s.chosen
            .iter()
            .map(|c| {
                let mut out = c.platform.to_string();
                if c.runs_as != c.platform {
                    out.push_str(&format!(" as {}", c.runs_as));
                }
                if c.needs_proof {
                    out.push_str(" (needs proof)");
                }
                out
            })
            .collect()
    }

    fn reason_for(s: &Selection, digest_seed: &str) -> String {
        let d = digest(digest_seed);
        s.passed_over
            .iter()
            .find(|p| p.entry.digest == d)
            .map(|p| p.reason.to_string())
            .unwrap_or_else(|| panic!("{digest_seed} was not passed over"))
    }

    const PI_ZERO: &[&str] = &["linux/arm/v6", "linux/arm/v5"];
    const PI_2: &[&str] = &["linux/arm/v7", "linux/arm/v6", "linux/arm/v5"];
    const PI_3_64: &[&str] = &[
        "linux/arm64/v8",
        "linux/arm/v8",
        "linux/arm/v7",
        "linux/arm/v6",
        "linux/arm/v5",
    ];
    const PI_5: &[&str] = &["linux/arm64/v8"];
    const EPYC: &[&str] = &[
        "linux/amd64/v4",
        "linux/amd64/v3",
        "linux/amd64/v2",
        "linux/amd64",
    ];
    const X86_V2: &[&str] = &["linux/amd64/v2", "linux/amd64"];

    struct Row {
        case: &'static str,
        device: &'static [&'static str],
        index: fn() -> Vec<IndexEntry>,
        chosen: &'static [&'static str],
        /// (seed of a passed-over entry's digest, its reason)
        passed: &'static [(&'static str, &'static str)],
    }

    fn unlabelled_arm_index() -> Vec<IndexEntry> {
        // Older multi-arch images (e.g. made with manifest-tool) label their armhf build plain `arm`.
        index(vec![
            image("linux/amd64"),
            image("linux/arm"),
            image("linux/arm64"),
        ])
    }

    fn labelled_and_unlabelled_arm() -> Vec<IndexEntry> {
        index(vec![
            image("linux/arm"),
            image("linux/arm/v7"),
            image("linux/arm/v6"),
        ])
    }

    fn amd64_levels_index() -> Vec<IndexEntry> {
        index(vec![
            image("linux/amd64"),
            image("linux/amd64/v2"),
            image("linux/amd64/v3"),
            image("linux/arm64"),
        ])
    }

    fn windows_index() -> Vec<IndexEntry> {
        // golang / mcr.microsoft.com style: linux images beside windows ones that carry os.version.
        let mut win = image("windows/amd64");
        win["platform"]["os.version"] = "10.0.20348.2849".into();
        index(vec![image("linux/amd64"), win, image("linux/arm64/v8")])
    }

    fn docker_manifest_list() -> Vec<IndexEntry> {
        // Docker schema-2 manifest lists written by older tools use kernel names.
        let mut a = image("linux/aarch64");
        a["mediaType"] = DOCKER_MANIFEST.into();
        let mut b = image("linux/x86_64");
        b["mediaType"] = DOCKER_MANIFEST.into();
        index(vec![b, a])
    }

    const ROWS: &[Row] = &[
        Row {
            case: "busybox on a Pi Zero: v6 then v5, v7 and arm64 refused",
            device: PI_ZERO,
            index: busybox_index,
            chosen: &["linux/arm/v6", "linux/arm/v5"],
            passed: &[
                (
                    "linux/arm/v7",
                    "linux/arm/v7: this device's best 32-bit ARM is v6",
                ),
                (
                    "linux/arm64/v8",
                    "linux/arm64/v8: this device cannot run arm64 code",
                ),
                (
                    "linux/amd64",
                    "linux/amd64: this device cannot run amd64 code",
                ),
            ],
        },
        Row {
            case: "busybox on a Pi 2",
            device: PI_2,
            index: busybox_index,
            chosen: &["linux/arm/v7", "linux/arm/v6", "linux/arm/v5"],
            passed: &[(
                "linux/arm64/v8",
                "linux/arm64/v8: this device cannot run arm64 code",
            )],
        },
        Row {
            case: "busybox on a 64-bit Pi 3: arm64 first, 32-bit ARM as fallbacks",
            device: PI_3_64,
            index: busybox_index,
            chosen: &[
                "linux/arm64/v8",
                "linux/arm/v7",
                "linux/arm/v6",
                "linux/arm/v5",
            ],
            passed: &[],
        },
        Row {
            case: "busybox on a Pi 5 (16 KiB pages, no AArch32)",
            device: PI_5,
            index: busybox_index,
            chosen: &["linux/arm64/v8"],
            passed: &[(
                "linux/arm/v7",
                "linux/arm/v7: this device runs no 32-bit ARM code",
            )],
        },
        Row {
            case: "busybox attestations are never chosen",
            device: EPYC,
            index: busybox_index,
            chosen: &["linux/amd64"],
            passed: &[(
                "att linux/amd64",
                "attestation manifest for sha256:baf0239e48ff4c47ebac3ba02b5cf1506b69cd5a0c0d0c825a53ba65976fb942",
            )],
        },
        Row {
            case: "unlabelled arm on a Pi 2 counts as v7",
            device: PI_2,
            index: unlabelled_arm_index,
            chosen: &["linux/arm as linux/arm/v7"],
            passed: &[],
        },
        Row {
            case: "unlabelled arm on a Pi Zero needs proof",
            device: PI_ZERO,
            index: unlabelled_arm_index,
            chosen: &["linux/arm as linux/arm/v6 (needs proof)"],
            passed: &[],
        },
        Row {
            case: "unlabelled arm on a Pi Zero comes after the labelled v6",
            device: PI_ZERO,
            index: labelled_and_unlabelled_arm,
            chosen: &["linux/arm/v6", "linux/arm as linux/arm/v6 (needs proof)"],
            passed: &[(
                "linux/arm/v7",
                "linux/arm/v7: this device's best 32-bit ARM is v6",
            )],
        },
        Row {
            case: "unlabelled arm on a Pi 2 ranks with v7, in index order",
            device: PI_2,
            index: labelled_and_unlabelled_arm,
            chosen: &["linux/arm as linux/arm/v7", "linux/arm/v7", "linux/arm/v6"],
            passed: &[],
        },
        Row {
            case: "unlabelled arm on a Pi 5 is refused",
            device: PI_5,
            index: unlabelled_arm_index,
            chosen: &["linux/arm64/v8"],
            passed: &[(
                "linux/arm",
                "linux/arm: this device runs no 32-bit ARM code",
            )],
        },
        Row {
            case: "amd64/v3 index on an AVX-512 EPYC",
            device: EPYC,
            index: amd64_levels_index,
            chosen: &["linux/amd64/v3", "linux/amd64/v2", "linux/amd64"],
            passed: &[],
        },
        Row {
            case: "amd64/v3 index on a v2 host",
            device: X86_V2,
            index: amd64_levels_index,
            chosen: &["linux/amd64/v2", "linux/amd64"],
            passed: &[(
                "linux/amd64/v3",
                "linux/amd64/v3: this device's best x86-64 level is v2",
            )],
        },
        Row {
            case: "amd64/v2 on a baseline host",
            device: &["linux/amd64"],
            index: amd64_levels_index,
            chosen: &["linux/amd64"],
            passed: &[(
                "linux/amd64/v2",
                "linux/amd64/v2: this device runs only the x86-64 baseline (v1)",
            )],
        },
        Row {
            case: "windows entry with os.version on linux",
            device: EPYC,
            index: windows_index,
            chosen: &["linux/amd64"],
            passed: &[("windows/amd64", "windows/amd64: this device runs linux")],
        },
        Row {
            case: "Docker manifest list with kernel architecture names",
            device: PI_3_64,
            index: docker_manifest_list,
            chosen: &["linux/arm64/v8"],
            passed: &[(
                "linux/x86_64",
                "linux/amd64: this device cannot run amd64 code",
            )],
        },
    ];

    #[test]
    fn real_world_indexes() {
        for row in ROWS {
            let s = select(&device(row.device), &(row.index)());
            assert_eq!(chosen(&s), row.chosen, "{}", row.case);
            for (seed, reason) in row.passed {
                assert_eq!(reason_for(&s, seed), *reason, "{}", row.case);
            }
        }
    }

    #[test]
    fn os_version_on_linux_is_ignored_and_recorded() {
        let mut e = image("linux/arm64/v8");
        e["platform"]["os.version"] = "6.1".into();
        let s = select(&device(PI_5), &index(vec![e]));
        assert_eq!(s.chosen.len(), 1);
        assert_eq!(s.chosen[0].ignored_os_version.as_deref(), Some("6.1"));
    }

    #[test]
    fn os_features_are_mandatory() {
        let mut e = image("linux/arm64/v8");
        e["platform"]["os.features"] = serde_json::json!(["landlock"]);
        let s = select(&device(PI_5), &index(vec![e]));
        assert!(s.chosen.is_empty());
        assert_eq!(
            s.passed_over[0].reason.to_string(),
            "linux/arm64/v8: requires OS features landlock, which this device is not known to have"
        );
    }

    #[test]
    fn non_images_are_passed_over_with_a_reason() {
        let mut nested = image("linux/arm64/v8");
        nested["mediaType"] = OCI_INDEX.into();
        let mut artifact = image("linux/arm64/v8");
        artifact["artifactType"] = "application/vnd.dev.sigstore.bundle.v0.3+json".into();
        artifact["digest"] = digest("artifact").to_string().into();
        let mut schema1 = image("linux/arm64/v8");
        schema1["mediaType"] = "application/vnd.docker.distribution.manifest.v1+json".into();
        let mut no_platform = image("linux/arm64/v8");
        no_platform
            .as_object_mut()
            .and_then(|o| o.remove("platform"));
        let s = select(
            &device(PI_5),
            &index(vec![nested, artifact, schema1, no_platform]),
        );
        assert!(s.chosen.is_empty());
        let reasons: Vec<String> = s.passed_over.iter().map(|p| p.reason.to_string()).collect();
        assert_eq!(
            reasons,
            [
                "nested index (application/vnd.oci.image.index.v1+json): flotilla does not descend into an index inside an index",
                "artifact of type application/vnd.dev.sigstore.bundle.v0.3+json, not a runnable image",
                "media type application/vnd.docker.distribution.manifest.v1+json is not an image manifest",
                "no platform given: cannot tell what it runs on",
            ]
        );
    }

    #[test]
    fn no_match_lists_offers_and_device() {
        let candidates = device(PI_ZERO);
        let entries = index(vec![
            image("linux/arm/v7"),
            image("linux/arm64/v8"),
            attestation("linux/arm/v7"),
        ]);
        let err = select(&candidates, &entries)
            .require_match(&candidates)
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("this device runs: linux/arm/v6, linux/arm/v5"),
            "{text}"
        );
        assert!(
            text.contains("linux/arm/v7: this device's best 32-bit ARM is v6"),
            "{text}"
        );
        assert!(
            text.contains("linux/arm64/v8: this device cannot run arm64 code"),
            "{text}"
        );
        assert!(text.contains("and 1 entry that is not"), "{text}");
        assert!(
            select(&candidates, &index(vec![image("linux/arm/v6")]))
                .require_match(&candidates)
                .is_ok()
        );
    }

    #[test]
    fn hostile_index_json_is_an_error() {
        assert!(matches!(
            IndexEntry::from_index_json(b"{\"manifests\": 3}"),
            Err(SelectError::BadIndex(_))
        ));
        let bad = br#"{"manifests":[{"mediaType":"x","digest":"sha256:../../etc"}]}"#;
        let err = IndexEntry::from_index_json(bad).unwrap_err();
        assert!(
            matches!(err, SelectError::BadEntryDigest { position: 0, .. }),
            "{err}"
        );
    }

    #[test]
    fn a_config_must_agree_with_its_label() {
        let p = |s: &str| s.parse::<Platform>().unwrap();
        for (label, stated, agrees) in [
            ("linux/arm/v6", "linux/arm", true),
            ("linux/arm/v6", "linux/arm/v6", true),
            ("linux/arm/v6", "linux/arm/v7", false),
            ("linux/arm", "linux/arm/v7", true),
            ("linux/amd64", "linux/arm64", false),
            ("linux/arm64/v8", "linux/arm64/v8.2", true),
            ("windows/amd64", "linux/amd64", false),
        ] {
            assert_eq!(
                config_agrees_with_label(&p(label), &p(stated)),
                agrees,
                "label {label}, config {stated}"
            );
        }
    }

    #[test]
    fn a_stored_image_serves_a_device_that_runs_its_variant() {
        let p = |s: &str| s.parse::<Platform>().unwrap();
        let pi_zero = [p("linux/arm/v6"), p("linux/arm/v5")];
        for (stated, fits) in [
            ("linux/arm/v6", true),
            ("linux/arm/v5", true),
            // A config without a variant was proven by the pull that stored it.
            ("linux/arm", true),
            // A pull for another --platform stored it under the same name.
            ("linux/arm/v7", false),
            ("linux/arm64", false),
        ] {
            assert_eq!(stored_fits(&pi_zero, &p(stated)), fits, "{stated}");
        }
    }
}
