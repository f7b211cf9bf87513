//! `flotilla platform`: which image platforms this device runs, best first, and why.
//!
//! The first line is the platform images are pulled for, so scripts can read it with `head -1`. The global
//! `--platform` overrides detection everywhere; here, as in every command, the override is reported, never silent.

use std::path::PathBuf;
use std::process::ExitCode;

use serde::Serialize;

use super::{CliError, Context};
use crate::clock::{Clock, SystemClock};
use crate::fs_root::{Probe, Resolver};
use crate::platform::detect::{DetectError, Detection};
use crate::platform::host::{self, Override};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print one JSON object: candidates (best first), signals, rules, page_size, path_resolver
    #[arg(long)]
    pub json: bool,
    /// Also write this host's evidence to DIR, in the format --evidence reads; attach it to bug reports
    #[arg(long, value_name = "DIR")]
    pub dump: Option<PathBuf>,
}

/// Detection on the live host (or the snapshot `--evidence` names), with `--platform` applied: the one call other
/// commands make to learn what to pull.
pub fn host_detection(ctx: &Context) -> Result<Detection, CliError> {
    let evidence = host::read_evidence(ctx.evidence.as_deref());
    Ok(host::decide(evidence, ctx.platform_override.as_ref())?.0)
}

#[derive(Serialize)]
struct JsonReport<'a> {
    #[serde(flatten)]
    detection: &'a Detection,
    #[serde(rename = "override", skip_serializing_if = "Option::is_none")]
    platform_override: Option<&'a Override>,
    evidence: &'a str,
    /// How paths inside an image's root are resolved when unpacking: `openat2`, or `userspace` on older kernels.
    path_resolver: Resolver,
    #[serde(skip_serializing_if = "Option::is_none")]
    openat2_error: Option<String>,
}

/// The one line saying how paths inside an image's root are resolved, and why the userspace walk when it is used.
fn resolver_line(probe: &Probe) -> String {
    match probe.openat2_error {
        None => format!(
            "path resolver: {} (the kernel keeps unpacking inside the root: RESOLVE_IN_ROOT)",
            probe.resolver.name()
        ),
        Some(e) => format!(
            "path resolver: {} (openat2 is not usable here: {}; unpacking resolves paths component by component \
             instead)",
            probe.resolver.name(),
            std::io::Error::from(e)
        ),
    }
}

pub fn run(args: Args, ctx: &Context) -> Result<ExitCode, CliError> {
    let evidence = host::read_evidence(ctx.evidence.as_deref())?;
    if let Some(dir) = &args.dump {
        evidence
            .write_dir(dir, &dump_source())
            .map_err(DetectError::from)?;
    }
    let origin = evidence.origin.clone();
    let (detection, report) = host::decide(Ok(evidence), ctx.platform_override.as_ref())?;

    let resolver = crate::fs_root::probe();
    if args.json {
        let json = JsonReport {
            detection: &detection,
            platform_override: report.as_ref(),
            evidence: &origin,
            path_resolver: resolver.resolver,
            openat2_error: resolver
                .openat2_error
                .map(|e| std::io::Error::from(e).to_string()),
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
    println!("evidence: {origin}");
    println!("{}", resolver_line(&resolver));
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
        httpdate::fmt_http_date(SystemClock.now())
    )
}
