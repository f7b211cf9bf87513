//! `flotilla gc`: remove blobs no reference reaches, partial downloads, stale temporary files, layer snapshots no
//! stored image uses and snapshots left by an interrupted unpack.

use std::process::ExitCode;

use super::{CliError, Context};
use crate::store::StoreError;
use crate::store::gc::{self, GcOptions, RemovedKind};
use crate::supervise::container::Container;
use crate::unpack::Snapshots;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Report what would be removed without removing anything
    #[arg(long)]
    pub dry_run: bool,
}

pub fn run(args: Args, ctx: &Context) -> Result<ExitCode, CliError> {
    let mut keep_snapshots = std::collections::BTreeSet::new();
    for c in Container::list(&ctx.state_dir)? {
        keep_snapshots.extend(c.spec()?.diff_ids);
    }
    let mut options = GcOptions {
        dry_run: args.dry_run,
        wait: false,
        keep_snapshots,
    };
    let snapshots = Snapshots::open(&ctx.state_dir)?;
    let report = match gc::collect_garbage(&ctx.state_dir, options.clone(), &snapshots) {
        Err(StoreError::Busy { path }) => {
            eprintln!(
                "flotilla: waiting for the running pull to finish ({} is locked)",
                path.display()
            );
            options.wait = true;
            gc::collect_garbage(&ctx.state_dir, options, &snapshots)?
        }
        other => other?,
    };
    let verb = if report.dry_run {
        "would remove"
    } else {
        "removed"
    };
    for r in &report.removed {
        let kind = match r.kind {
            RemovedKind::Blob => "blob",
            RemovedKind::Partial => "partial download",
            RemovedKind::TempFile => "temporary file",
            RemovedKind::Snapshot => "unused layer snapshot",
            RemovedKind::SnapshotTemp => "interrupted layer snapshot",
        };
        println!(
            "{verb} {kind} {} ({})",
            r.path.display(),
            crate::human::bytes(r.bytes)
        );
    }
    println!(
        "{verb} {} blobs, {} partial downloads, {} temporary files, {} snapshots: {} {}; kept {} blobs",
        report.count(RemovedKind::Blob),
        report.count(RemovedKind::Partial),
        report.count(RemovedKind::TempFile),
        report.count(RemovedKind::Snapshot) + report.count(RemovedKind::SnapshotTemp),
        crate::human::bytes(report.bytes_freed()),
        if report.dry_run { "to free" } else { "freed" },
        report.kept,
    );
    Ok(ExitCode::SUCCESS)
}
