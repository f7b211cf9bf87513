//! What this host runs, decided one way for every command and for the agent: detection from the live host or a
//! saved snapshot, then the user's `--platform` override (or the configuration's `platform`), which replaces the
//! candidates but never silently: it is reported with what it replaced.
//!
//! Everything here takes plain values; reading the evidence is the caller's one I/O step ([`read_evidence`]).

use std::path::Path;

use serde::Serialize;

use super::Platform;
use super::detect::{self, DetectError, Detection};
use super::evidence::{Evidence, LinuxHost};

/// What the device can run, as pulls, proofs and checks need it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Host {
    /// Best first.
    pub candidates: Vec<Platform>,
    pub page_size: Option<u64>,
}

impl Host {
    /// The candidates as one line: `linux/arm/v6, linux/arm/v5`.
    pub fn describe(&self) -> String {
        self.candidates
            .iter()
            .map(Platform::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl Detection {
    pub fn host(&self) -> Host {
        Host {
            candidates: self.candidates.clone(),
            page_size: self.page_size,
        }
    }
}

/// How `--platform` replaced detection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Override {
    /// The platform the user gave.
    pub platform: String,
    /// What detection found instead (its best platform), or why it failed.
    pub overrides: String,
}

/// The evidence snapshot in `dir`, or the live host's when there is none.
pub fn read_evidence(dir: Option<&Path>) -> Result<Evidence, DetectError> {
    Ok(match dir {
        Some(dir) => Evidence::read_dir(dir)?,
        None => Evidence::from_probe(&LinuxHost)?,
    })
}

/// Detection over `evidence`, with `platform_override` applied: with an override the candidates are the override
/// alone, a rule says what it replaced, and a failed detection is not an error.
pub fn decide(
    evidence: Result<Evidence, DetectError>,
    platform_override: Option<&Platform>,
) -> Result<(Detection, Option<Override>), DetectError> {
    let detected = evidence.and_then(|e| detect::detect(&e));
    match platform_override {
        Some(platform) => {
            let (detection, report) = apply_override(platform, detected);
            Ok((detection, Some(report)))
        }
        None => Ok((detected?, None)),
    }
}

/// Replaces the candidates with `platform`, keeping the signals and adding a rule that names what was replaced.
pub fn apply_override(
    platform: &Platform,
    detected: Result<Detection, DetectError>,
) -> (Detection, Override) {
    let (mut detection, overrides) = match detected {
        Ok(d) => {
            let found = d
                .best()
                .map(|p| format!("detected {p}"))
                .unwrap_or_else(|| "detected nothing".to_string());
            (d, found)
        }
        Err(e) => (
            Detection {
                candidates: Vec::new(),
                signals: Vec::new(),
                rules: Vec::new(),
                page_size: None,
            },
            format!("detection failed: {}", crate::error_chain(&e)),
        ),
    };
    detection.rules.push(format!(
        "--platform {platform} overrides detection ({overrides})"
    ));
    detection.candidates = vec![platform.clone()];
    let report = Override {
        platform: platform.to_string(),
        overrides,
    };
    (detection, report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detected() -> Detection {
        Detection {
            candidates: vec!["linux/amd64/v3".parse().unwrap()],
            signals: Vec::new(),
            rules: Vec::new(),
            page_size: Some(4096),
        }
    }

    #[test]
    fn an_override_names_what_it_replaced() {
        let platform: Platform = "linux/arm/v6".parse().unwrap();
        let (d, r) = apply_override(&platform, Ok(detected()));
        assert_eq!(d.candidates, vec![platform]);
        assert_eq!(r.overrides, "detected linux/amd64/v3");
        assert!(
            d.rules
                .iter()
                .any(|rule| rule.contains("overrides detection"))
        );
    }

    #[test]
    fn an_override_survives_a_failed_detection_and_says_so() {
        let failed = Err(DetectError::NoUsableSignal {
            origin: "test".to_string(),
            missing: "no uname -m".to_string(),
        });
        let platform: Platform = "linux/arm64".parse().unwrap();
        let (d, r) = apply_override(&platform, failed);
        assert_eq!(d.candidates, vec![platform]);
        assert!(
            r.overrides.starts_with("detection failed"),
            "{}",
            r.overrides
        );
    }

    #[test]
    fn without_an_override_a_failed_detection_is_the_error() {
        let failed = Err(DetectError::NoUsableSignal {
            origin: "test".to_string(),
            missing: "no uname -m".to_string(),
        });
        assert!(decide(failed, None).is_err());
    }

    #[test]
    fn the_host_keeps_candidates_in_order_and_the_page_size() {
        let host = detected().host();
        assert_eq!(host.describe(), "linux/amd64/v3");
        assert_eq!(host.page_size, Some(4096));
    }
}
