//! `flotilla lint REF`: does each entry of an image index hold code for its own label? Made for a CI step after
//! the push, so that a mislabelled entry fails the build instead of a device.
//!
//! Unlike the other commands nothing here is about this host: each entry is proven against its own label.

use std::process::ExitCode;

use serde::Serialize;

use crate::platform::Platform;
use crate::pull::Source;
use crate::pull::lint::{self, EntryLint, LintOptions, LintReport, Verdict};
use crate::registry::RegistryClient;

use super::{CliError, Context};

/// An entry needs more than its label, or a required platform is missing; as check-binary's "cannot run".
const EXIT_LINT_FAILED: u8 = 3;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Image reference (`registry:5000/app:v2`) or OCI layout (`oci:DIR:NAME`)
    pub reference: String,
    /// Platforms the image must offer, comma-separated, e.g. linux/amd64,linux/arm64,linux/arm/v6
    #[arg(long, value_name = "PLATFORMS", value_delimiter = ',')]
    pub require: Vec<String>,
    /// Check every ELF executable and shared object in each image, not only the entrypoint and its interpreter
    #[arg(long)]
    pub all_binaries: bool,
    /// Print the result as JSON
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Report<'a> {
    reference: &'a str,
    digest: String,
    media_type: &'a str,
    entries: &'a [EntryLint],
    required: Vec<String>,
    /// Required platforms no entry is labelled with.
    missing: Vec<String>,
    /// "pass", "fail" or "error", as the exit code says it.
    result: &'static str,
}

pub fn run(args: Args, ctx: &Context) -> Result<ExitCode, CliError> {
    let source: Source = args.reference.parse()?;
    let required = args
        .require
        .iter()
        .map(|p| p.parse::<Platform>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(CliError::Require)?;
    if let Some(p) = &ctx.platform_override {
        eprintln!(
            "--platform {p} is not used by lint: each entry is checked against its own label"
        );
    }
    let client = match &source {
        Source::Registry(_) => Some(RegistryClient::new(&ctx.config, &ctx.insecure_registries)?),
        Source::Layout(_) => None,
    };
    let options = LintOptions {
        all_binaries: args.all_binaries,
    };
    let report = super::runtime()?.block_on(lint::lint(client.as_ref(), &source, &options))?;
    let missing = report.missing(&required);
    let (result, code) = if report.count(Verdict::Fail) > 0 || !missing.is_empty() {
        ("fail", ExitCode::from(EXIT_LINT_FAILED))
    } else if report.count(Verdict::Error) > 0 {
        ("error", ExitCode::FAILURE)
    } else {
        ("pass", ExitCode::SUCCESS)
    };
    if args.json {
        let json = Report {
            reference: &report.image,
            digest: report.digest.to_string(),
            media_type: &report.media_type,
            entries: &report.entries,
            required: required.iter().map(Platform::to_string).collect(),
            missing: missing.iter().map(Platform::to_string).collect(),
            result,
        };
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        print_table(&report, &missing, result);
    }
    Ok(code)
}

fn print_table(report: &LintReport, missing: &[Platform], result: &str) {
    println!(
        "{} -> {} ({})",
        report.image, report.digest, report.media_type
    );
    println!(
        "  {:<16} {:<71}  {:<7}  reason",
        "platform", "digest", "verdict"
    );
    for e in &report.entries {
        println!(
            "  {:<16} {:<71}  {:<7}  {}",
            e.platform,
            e.digest.to_string(),
            e.verdict.as_str(),
            e.reason
        );
        for wrong in &e.wrong_binaries {
            println!("      {wrong}");
        }
    }
    if !missing.is_empty() {
        let names: Vec<String> = missing.iter().map(Platform::to_string).collect();
        println!("required platforms missing: {}", names.join(", "));
    }
    println!(
        "lint {result}: {} pass, {} fail, {} error, {} skipped",
        report.count(Verdict::Pass),
        report.count(Verdict::Fail),
        report.count(Verdict::Error),
        report.count(Verdict::Skipped)
    );
}
