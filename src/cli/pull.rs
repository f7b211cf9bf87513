//! `flotilla pull REF`: fetch, verify and prove the variant of an image this device runs.

use std::process::ExitCode;

use crate::pull::{self, PullOptions, Source};
use crate::store::Store;
use crate::unpack::Limits;

use super::{CliError, Context};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Image reference (`alpine:3.20`, `registry:5000/app@sha256:…`) or OCI layout (`oci:/media/usb/images:app`)
    pub reference: String,
    /// Print the result as JSON
    #[arg(long)]
    pub json: bool,
    /// Also unpack each layer into its snapshot as it arrives, ready to run (bounds: FLOTILLA_UNPACK_MAX_BYTES,
    /// FLOTILLA_UNPACK_MAX_ENTRIES, FLOTILLA_UNPACK_MAX_PATH, FLOTILLA_UNPACK_MAX_XATTR_BYTES)
    #[arg(long)]
    pub unpack: bool,
}

pub fn run(args: Args, ctx: &Context) -> Result<ExitCode, CliError> {
    let source: Source = args.reference.parse()?;
    let detection = super::platform::host_detection(ctx)?;
    if let Some(p) = &ctx.platform_override {
        eprintln!("using --platform {p} instead of detection");
    }
    let host = detection.host();
    let store = Store::open(&ctx.state_dir)?;
    let mut options = PullOptions::from_config(&ctx.config);
    if args.unpack {
        options.unpack = Some(Limits::from_env().map_err(pull::PullError::from)?);
    }
    let report = super::runtime()?.block_on(crate::deploy::pull(
        &ctx.config,
        &ctx.insecure_registries,
        &store,
        &source,
        &host,
        &options,
    ))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("pulled {}", report.name);
    if let Some(index) = &report.index_digest {
        println!("  index     {index}");
    }
    println!(
        "  manifest  {} ({})",
        report.manifest_digest, report.platform
    );
    println!("  signature {}", report.signature);
    if args.unpack {
        println!(
            "  unpacked  {} layers now; proof read {}",
            report.layers_unpacked,
            if report.proof_from_snapshots {
                "the snapshots"
            } else {
                "the layers"
            }
        );
    }
    for line in &report.proof {
        println!("  proof     {line}");
    }
    for r in &report.refused {
        println!("  passed over {r}");
    }
    Ok(ExitCode::SUCCESS)
}
