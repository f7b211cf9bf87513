//! `flotilla inspect REF`: what an image offers, which variant this device would take, and why not the others.
//!
//! Only labels are read here; `flotilla pull` proves the chosen variant's binaries.

use std::process::ExitCode;

use serde::Serialize;

use crate::platform::select::{self, IndexEntry};
use crate::registry::{Reference, RegistryClient, RegistryError};

use super::{CliError, Context};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Image reference, e.g. `alpine:3.20` or `registry.local:5000/app:v2`
    pub reference: String,
    /// Print the result as JSON
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Row {
    platform: String,
    digest: String,
    size: u64,
    /// "take" (best first: 1, 2, …), or why it is passed over.
    verdict: String,
    rank: Option<usize>,
}

#[derive(Serialize)]
struct Report {
    reference: String,
    digest: String,
    media_type: String,
    device: Vec<String>,
    entries: Vec<Row>,
}

pub fn run(args: Args, ctx: &Context) -> Result<ExitCode, CliError> {
    let reference: Reference = args.reference.parse().map_err(RegistryError::from)?;
    let detection = super::platform::host_detection(ctx)?;
    let client = RegistryClient::new(&ctx.config, &ctx.insecure_registries)?;
    let manifest = super::runtime()?.block_on(client.fetch_manifest(&reference))?;
    let mut report = Report {
        reference: reference.to_string(),
        digest: manifest.digest.to_string(),
        media_type: manifest.kind.media_type().to_string(),
        device: detection.candidates.iter().map(|p| p.to_string()).collect(),
        entries: Vec::new(),
    };
    if manifest.kind.is_index() {
        let entries = IndexEntry::from_index_json(&manifest.bytes)?;
        let selection = select::select(&detection.candidates, &entries);
        let label = |e: &IndexEntry| {
            e.normalized_platform()
                .map_or_else(|| "(no platform)".to_string(), |p| p.to_string())
        };
        for (n, choice) in selection.chosen.iter().enumerate() {
            let proof = if choice.needs_proof {
                " (only if its binaries prove they run here)"
            } else {
                ""
            };
            report.entries.push(Row {
                platform: label(&choice.entry),
                digest: choice.entry.digest.to_string(),
                size: choice.entry.size,
                verdict: format!("take #{}{proof}", n + 1),
                rank: Some(n + 1),
            });
        }
        for passed in &selection.passed_over {
            report.entries.push(Row {
                platform: label(&passed.entry),
                digest: passed.entry.digest.to_string(),
                size: passed.entry.size,
                verdict: passed.reason.to_string(),
                rank: None,
            });
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{} -> {} ({})",
        report.reference, report.digest, report.media_type
    );
    println!("this device runs: {}", report.device.join(", "));
    if report.entries.is_empty() {
        println!("a single-platform image: `flotilla pull` checks its config and binaries");
    }
    for row in &report.entries {
        println!("  {:<16} {}  {}", row.platform, row.digest, row.verdict);
    }
    Ok(ExitCode::SUCCESS)
}
