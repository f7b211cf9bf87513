//! Properties of index selection over arbitrary candidate lists and arbitrary indexes, checked against a small
//! model of the rules written independently of the implementation.

use std::collections::BTreeMap;

use flotilla::digest::Digest;
use flotilla::oci::{DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST};
use flotilla::platform::Platform;
use flotilla::platform::select::{
    EntryPlatform, IndexEntry, REFERENCE_TYPE_ANNOTATION, Selection, select,
};
use proptest::prelude::*;

const CANDIDATE_POOL: &[&str] = &[
    "linux/arm64/v8",
    "linux/arm/v8",
    "linux/arm/v7",
    "linux/arm/v6",
    "linux/arm/v5",
    "linux/amd64/v4",
    "linux/amd64/v3",
    "linux/amd64/v2",
    "linux/amd64",
    "linux/386",
    "linux/riscv64",
];

/// Labels as indexes write them: aliases, unlabelled arm, foreign OSes, attestation platforms.
const LABEL_POOL: &[(&str, &str, Option<&str>)] = &[
    ("linux", "arm64", Some("v8")),
    ("linux", "arm64", None),
    ("linux", "aarch64", None),
    ("linux", "arm", None),
    ("linux", "arm", Some("v5")),
    ("linux", "arm", Some("v6")),
    ("linux", "arm", Some("v7")),
    ("linux", "arm", Some("v8")),
    ("linux", "armhf", None),
    ("linux", "amd64", None),
    ("linux", "x86_64", None),
    ("linux", "amd64", Some("v1")),
    ("linux", "amd64", Some("v2")),
    ("linux", "amd64", Some("v3")),
    ("linux", "amd64", Some("v4")),
    ("linux", "386", None),
    ("linux", "s390x", None),
    ("linux", "riscv64", None),
    ("windows", "amd64", None),
    ("unknown", "unknown", None),
];

const MEDIA_TYPES: &[&str] = &[
    OCI_MANIFEST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    DOCKER_MANIFEST_LIST,
    "application/vnd.docker.distribution.manifest.v1+json",
    "",
];

fn candidates() -> impl Strategy<Value = Vec<Platform>> {
    proptest::sample::subsequence(CANDIDATE_POOL, 0..=CANDIDATE_POOL.len())
        .prop_shuffle()
        .prop_map(|v| v.iter().map(|s| s.parse().unwrap()).collect())
}

#[derive(Debug, Clone)]
struct EntrySpec {
    label: Option<usize>,
    media_type: usize,
    attestation: bool,
    artifact: bool,
    os_feature: bool,
    os_version: bool,
}

fn entry_spec() -> impl Strategy<Value = EntrySpec> {
    (
        prop_oneof![1 => Just(None), 12 => (0..LABEL_POOL.len()).prop_map(Some)],
        prop_oneof![8 => Just(0usize), 4 => Just(1usize), 2 => 2..MEDIA_TYPES.len()],
        proptest::bool::weighted(0.15),
        proptest::bool::weighted(0.1),
        proptest::bool::weighted(0.1),
        proptest::bool::weighted(0.2),
    )
        .prop_map(
            |(label, media_type, attestation, artifact, os_feature, os_version)| EntrySpec {
                label,
                media_type,
                attestation,
                artifact,
                os_feature,
                os_version,
            },
        )
}

fn build(specs: &[EntrySpec]) -> Vec<IndexEntry> {
    specs
        .iter()
        .enumerate()
        .map(|(position, s)| {
            let mut annotations = BTreeMap::new();
            if s.attestation {
                annotations.insert(
                    REFERENCE_TYPE_ANNOTATION.to_string(),
                    "attestation-manifest".to_string(),
                );
            }
            IndexEntry {
                position,
                digest: Digest::sha256_of(position.to_string().as_bytes()),
                media_type: MEDIA_TYPES[s.media_type].to_string(),
                size: 100,
                platform: s.label.map(|i| {
                    let (os, arch, variant) = LABEL_POOL[i];
                    EntryPlatform {
                        os: os.to_string(),
                        architecture: arch.to_string(),
                        variant: variant.map(str::to_string),
                        os_version: s.os_version.then(|| "10.0.17763".to_string()),
                        os_features: if s.os_feature {
                            vec!["win32k".to_string()]
                        } else {
                            Vec::new()
                        },
                    }
                }),
                annotations,
                artifact_type: s
                    .artifact
                    .then(|| "application/vnd.example+json".to_string()),
            }
        })
        .collect()
}

fn is_unlabelled_arm(p: &Platform) -> bool {
    p.os == "linux" && p.architecture == "arm" && p.variant.is_none()
}

/// The model: (rank, needs_proof) of an acceptable entry.
fn model(candidates: &[Platform], e: &IndexEntry) -> Option<(usize, bool)> {
    let is_image = e.media_type == OCI_MANIFEST || e.media_type == DOCKER_MANIFEST;
    let is_attestation = e.annotations.contains_key(REFERENCE_TYPE_ANNOTATION);
    if !is_image || is_attestation || e.artifact_type.is_some() {
        return None;
    }
    let raw = e.platform.as_ref()?;
    if !raw.os_features.is_empty() {
        return None;
    }
    let p = e.normalized_platform()?;
    if p.os == "unknown" {
        return None;
    }
    if let Some(rank) = candidates.iter().position(|c| *c == p) {
        return Some((rank, false));
    }
    if is_unlabelled_arm(&p) {
        let v7: Platform = "linux/arm/v7".parse().unwrap();
        if let Some(rank) = candidates.iter().position(|c| *c == v7) {
            return Some((rank, false));
        }
        return candidates
            .iter()
            .position(|c| c.os == "linux" && c.architecture == "arm")
            .map(|rank| (rank, true));
    }
    None
}

fn positions(s: &Selection) -> Vec<usize> {
    s.chosen.iter().map(|c| c.entry.position).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn selection_follows_the_rules(cands in candidates(), specs in proptest::collection::vec(entry_spec(), 0..16)) {
        let entries = build(&specs);
        let s = select(&cands, &entries);

        // Every entry is chosen or passed over, exactly once; passed-over entries stay in index order.
        let mut seen: Vec<usize> = positions(&s);
        let passed: Vec<usize> = s.passed_over.iter().map(|p| p.entry.position).collect();
        prop_assert!(passed.windows(2).all(|w| w[0] < w[1]));
        seen.extend(passed);
        seen.sort_unstable();
        prop_assert_eq!(seen, (0..entries.len()).collect::<Vec<_>>());

        for c in &s.chosen {
            // Never an attestation, artifact or anything but an image manifest.
            prop_assert!(!c.entry.annotations.contains_key(REFERENCE_TYPE_ANNOTATION));
            prop_assert!(c.entry.artifact_type.is_none());
            prop_assert!(c.entry.media_type == OCI_MANIFEST || c.entry.media_type == DOCKER_MANIFEST);
            // Never outside the candidate list: what it runs as is the candidate at its rank, and its own label is
            // that candidate, except for the unlabelled-arm hint.
            prop_assert_eq!(cands.get(c.rank), Some(&c.runs_as));
            prop_assert_eq!(Some(c.platform.clone()), c.entry.normalized_platform());
            if c.platform != c.runs_as {
                prop_assert!(is_unlabelled_arm(&c.platform), "{} chosen as {}", c.platform, c.runs_as);
                prop_assert_eq!(c.runs_as.architecture.as_str(), "arm");
            }
            if c.needs_proof {
                prop_assert!(is_unlabelled_arm(&c.platform));
                prop_assert!(!cands.iter().any(|p| p.to_string() == "linux/arm/v7"));
            }
            prop_assert_eq!(model(&cands, &c.entry), Some((c.rank, c.needs_proof)));
        }
        // Nothing acceptable is passed over.
        for p in &s.passed_over {
            prop_assert_eq!(model(&cands, &p.entry), None, "{} passed over: {}", p.entry.position, p.reason);
        }

        // Order: labelled before needs-proof, then candidate rank, then index order.
        let keys: Vec<(bool, usize, usize)> =
            s.chosen.iter().map(|c| (c.needs_proof, c.rank, c.entry.position)).collect();
        prop_assert!(keys.windows(2).all(|w| w[0] < w[1]), "{:?}", keys);

        // The first choice belongs to the best candidate any acceptable entry has.
        let best = entries.iter().filter_map(|e| model(&cands, e)).map(|(r, n)| (n, r)).min();
        prop_assert_eq!(s.chosen.first().map(|c| (c.needs_proof, c.rank)), best);
    }

    #[test]
    fn order_does_not_depend_on_the_slice_order(
        cands in candidates(),
        (specs, shuffled) in proptest::collection::vec(entry_spec(), 0..16)
            .prop_flat_map(|v| {
                let order: Vec<usize> = (0..v.len()).collect();
                (Just(v), Just(order).prop_shuffle())
            }),
    ) {
        let entries = build(&specs);
        let permuted: Vec<IndexEntry> = shuffled.iter().map(|&i| entries[i].clone()).collect();
        let a = select(&cands, &entries);
        let b = select(&cands, &permuted);
        prop_assert_eq!(a.chosen, b.chosen);
    }
}
