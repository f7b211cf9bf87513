//! `flotilla platform`: which image platforms this device runs, best first, and why.
//!
//! The first line is the platform images are pulled for, so scripts can read it with `head -1`. The global
//! `--platform` overrides detection everywhere; here, as in every command, the override is reported, never silent.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use serde::Serialize;

use super::{CliError, Context};
use crate::platform::Platform;
use crate::platform::detect::{self, DetectError, Detection};
use crate::platform::evidence::{Evidence, LinuxHost};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print one JSON object: candidates (best first), signals, rules, page_size
    #[arg(long)]
    pub json: bool,
    /// Also write this host's evidence to DIR, in the format --evidence reads; attach it to bug reports
    #[arg(long, value_name = "DIR")]
    pub dump: Option<PathBuf>,
}

/// How `--platform` replaced detection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Override {
    /// The platform the user gave.
    pub platform: String,
    /// What detection found instead (its best platform), or why it failed.
    pub overrides: String,
}

/// Detection on the live host (or the snapshot `--evidence` names), with `--platform` applied: the one call other
/// commands make to learn what to pull. With an override the candidates are the override alone and a rule says
/// what it replaced.
pub fn host_detection(ctx: &Context) -> Result<Detection, CliError> {
    let detected = read_evidence(ctx).and_then(|e| detect::detect(&e));
    match &ctx.platform_override {
        Some(platform) => Ok(apply_override(platform, detected).0),
        None => Ok(detected?),
    }
}

fn read_evidence(ctx: &Context) -> Result<Evidence, DetectError> {
    Ok(match &ctx.evidence {
        Some(dir) => Evidence::read_dir(dir)?,
        None => Evidence::from_probe(&LinuxHost)?,
    })
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

#[derive(Serialize)]
struct JsonReport<'a> {
    #[serde(flatten)]
    detection: &'a Detection,
    #[serde(rename = "override", skip_serializing_if = "Option::is_none")]
    platform_override: Option<&'a Override>,
    evidence: &'a str,
}

pub fn run(args: Args, ctx: &Context) -> Result<ExitCode, CliError> {
    let evidence = read_evidence(ctx)?;
    if let Some(dir) = &args.dump {
        evidence
            .write_dir(dir, &dump_source())
            .map_err(DetectError::from)?;
    }
    let detected = detect::detect(&evidence);
    let (detection, report) = match &ctx.platform_override {
        Some(platform) => {
            let (d, r) = apply_override(platform, detected);
            (d, Some(r))
        }
        None => (detected?, None),
    };

    if args.json {
        let json = JsonReport {
            detection: &detection,
            platform_override: report.as_ref(),
            evidence: &evidence.origin,
        };
        // Serialising plain strings and numbers cannot fail.
        let text = serde_json::to_string_pretty(&json).unwrap_or_default();
        println!("{text}");
        return Ok(ExitCode::SUCCESS);
    }

    let best = detection
        .best()
        .map(ToString::to_string)
        .unwrap_or_default();
    println!("{best}");
    if let Some(r) = &report {
        println!(
            "override: --platform {} is used; it overrides what detection found ({})",
            r.platform, r.overrides
        );
    }
    let all: Vec<String> = detection
        .candidates
        .iter()
        .map(ToString::to_string)
        .collect();
    println!("runs: {}", all.join(", "));
    if let Some(p) = detection.page_size {
        println!("page size: {p}");
    }
    println!("evidence: {}", evidence.origin);
    if let Some(dir) = &args.dump {
        println!("evidence written to {}", dir.display());
    }
    println!("why:");
    for rule in &detection.rules {
        println!("  - {rule}");
    }
    println!(
        "({} signals read; --json lists them)",
        detection.signals.len()
    );
    Ok(ExitCode::SUCCESS)
}

fn dump_source() -> String {
    let host = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    format!(
        "flotilla {} platform --dump on host {host}, {}",
        crate::VERSION,
        httpdate::fmt_http_date(SystemTime::now())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_override_names_what_it_replaced() {
        let detected = Detection {
            candidates: vec!["linux/amd64/v3".parse().unwrap()],
            signals: Vec::new(),
            rules: Vec::new(),
            page_size: Some(4096),
        };
        let platform: Platform = "linux/arm/v6".parse().unwrap();
        let (d, r) = apply_override(&platform, Ok(detected));
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
}
