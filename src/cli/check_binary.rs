//! `flotilla check-binary FILE`: what an executable needs from the machine, and whether this host has it.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use serde::Serialize;

use super::{CliError, Context};
use crate::elf::{self, BinaryRequirements, ElfError, ElfRequirements, Outcome, Verdict};
use crate::platform::Platform;

/// The exit status for "this host cannot run it", apart from 1 and 2 so scripts can tell it from a failure.
const EXIT_CANNOT_RUN: u8 = 3;

#[derive(Debug, clap::Args)]
#[command(after_help = "Exit status:\n  \
    0  this host can run the file (for a #! script: its interpreter decides, check that file next)\n  \
    3  this host cannot run it, or nothing proves it can (a 32-bit ARM binary that records no ARM version)\n  \
    1  the file could not be read or is not an executable\n  \
    2  usage error")]
pub struct Args {
    /// The executable or #! script to check
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Print the report as JSON
    #[arg(long)]
    pub json: bool,
    /// The host kernel's page size in bytes, e.g. 16384 for a Raspberry Pi 5 kernel [default: detected]
    #[arg(long, value_name = "BYTES", value_parser = parse_page_size)]
    pub page_size: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckBinaryError {
    #[error(transparent)]
    Elf(#[from] ElfError),
    #[error("cannot write the report: {0}")]
    Output(#[source] std::io::Error),
    #[error("--page-size {0:?} is not a number of bytes, e.g. 4096 or 16384")]
    PageSizeNumber(String),
    #[error("--page-size {0} is not a page size: give a power of two such as 4096, 16384 or 65536")]
    PageSize(u64),
}

impl CheckBinaryError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CheckBinaryError::Elf(_) | CheckBinaryError::Output(_) => 1,
            // clap reports these before the command runs, with its own usage exit code.
            CheckBinaryError::PageSizeNumber(_) | CheckBinaryError::PageSize(_) => 2,
        }
    }
}

fn parse_page_size(s: &str) -> Result<u64, CheckBinaryError> {
    let size: u64 = s
        .parse()
        .map_err(|_| CheckBinaryError::PageSizeNumber(s.to_string()))?;
    if size < 1024 || !size.is_power_of_two() {
        return Err(CheckBinaryError::PageSize(size));
    }
    Ok(size)
}

#[derive(Serialize)]
struct Report<'a> {
    file: &'a std::path::Path,
    requirements: &'a BinaryRequirements,
    host: Host<'a>,
    verdict: &'a Verdict,
}

#[derive(Serialize)]
struct Host<'a> {
    platforms: &'a [Platform],
    #[serde(skip_serializing_if = "Option::is_none")]
    page_size: Option<u64>,
    /// `override` when --platform replaced detection.
    source: &'static str,
}

pub fn run(args: Args, ctx: &Context) -> Result<ExitCode, CliError> {
    let requirements = elf::inspect_file(&args.file).map_err(CheckBinaryError::from)?;
    let mut host = super::platform::host_detection(ctx)?.host();
    // A page size given on the command line answers "would it run on a device with these pages".
    host.page_size = args.page_size.or(host.page_size);
    let verdict = elf::can_run(&requirements, &host.candidates, host.page_size);
    let report = Report {
        file: &args.file,
        requirements: &requirements,
        host: Host {
            platforms: &host.candidates,
            page_size: host.page_size,
            source: if ctx.platform_override.is_some() {
                "override"
            } else {
                "detected"
            },
        },
        verdict: &verdict,
    };
    let mut out = std::io::stdout().lock();
    let written = if args.json {
        serde_json::to_writer_pretty(&mut out, &report)
            .map_err(std::io::Error::from)
            .and_then(|()| writeln!(out))
    } else {
        write_text(&mut out, &report)
    };
    written.map_err(CheckBinaryError::Output)?;
    Ok(match verdict.outcome {
        Outcome::CanRun | Outcome::DependsOnInterpreter => ExitCode::SUCCESS,
        Outcome::CannotRun | Outcome::Unproven => ExitCode::from(EXIT_CANNOT_RUN),
    })
}

fn write_text(out: &mut impl Write, report: &Report<'_>) -> std::io::Result<()> {
    writeln!(out, "file: {}", report.file.display())?;
    match report.requirements {
        BinaryRequirements::Script(script) => {
            write!(out, "script: interpreter {}", script.interpreter)?;
            if let Some(arg) = &script.argument {
                write!(out, " (argument {arg})")?;
            }
            writeln!(out)?;
        }
        BinaryRequirements::Elf(req) => write_elf(out, req)?,
    }
    let host = report
        .host
        .platforms
        .iter()
        .map(Platform::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let source = match report.host.source {
        "override" => "from --platform; detection not used",
        _ => "detected",
    };
    writeln!(out, "host: {host} ({source})")?;
    match report.host.page_size {
        Some(size) => writeln!(out, "host page size: {size} bytes")?,
        None => writeln!(
            out,
            "host page size: unknown (pass --page-size to check it)"
        )?,
    }
    let verdict = match report.verdict.outcome {
        Outcome::CanRun => "can run",
        Outcome::CannotRun => "CANNOT run",
        Outcome::Unproven => "cannot prove it runs",
        Outcome::DependsOnInterpreter => "depends on its interpreter",
    };
    writeln!(out, "verdict: {verdict}")?;
    for reason in &report.verdict.reasons {
        writeln!(out, "  {reason}")?;
    }
    Ok(())
}

fn write_elf(out: &mut impl Write, req: &ElfRequirements) -> std::io::Result<()> {
    writeln!(
        out,
        "format: ELF {}-bit {}-endian, {} (e_machine {}), OS ABI {}, {}",
        req.class,
        serde_label(&req.endianness),
        req.machine,
        req.e_machine,
        req.os_abi,
        req.file_type
    )?;
    match &req.interpreter {
        Some(interp) => {
            write!(out, "linking: dynamic, loader {}", interp.path)?;
            let meaning: Vec<String> = interp
                .libc
                .map(|l| serde_label(&l))
                .into_iter()
                .chain(interp.abi.clone())
                .collect();
            if !meaning.is_empty() {
                write!(out, " ({})", meaning.join(", "))?;
            }
            writeln!(out)?;
        }
        None => writeln!(out, "linking: {}", serde_label(&req.linking))?,
    }
    if let Some(align) = req.load_alignment {
        writeln!(
            out,
            "load alignment: {align} bytes (kernels with pages up to {align} bytes can map it)"
        )?;
    }
    if let Some(arm) = &req.arm {
        write!(
            out,
            "arm: EABI {}, {} float ABI",
            arm.eabi_version,
            serde_label(&arm.float_abi)
        )?;
        if let Some(source) = arm.float_abi_source {
            write!(out, " (from {source})")?;
        }
        writeln!(out)?;
        if let Some(a) = &arm.attributes {
            let mut tags = Vec::new();
            if let Some(name) = &a.cpu_name {
                tags.push(format!("Tag_CPU_name \"{name}\""));
            }
            let fields = [
                ("Tag_CPU_arch", a.cpu_arch.map(|v| v.to_string())),
                (
                    "Tag_CPU_arch_profile",
                    a.cpu_arch_profile.map(|v| v.to_string()),
                ),
                ("Tag_FP_arch", a.fp_arch.map(|v| v.to_string())),
                (
                    "Tag_Advanced_SIMD_arch",
                    a.advanced_simd_arch.map(|v| v.to_string()),
                ),
                ("Tag_THUMB_ISA_use", a.thumb_isa_use.map(|v| v.to_string())),
                ("Tag_ABI_VFP_args", a.abi_vfp_args.map(|v| v.to_string())),
            ];
            tags.extend(
                fields
                    .into_iter()
                    .filter_map(|(tag, value)| value.map(|v| format!("{tag} {v}"))),
            );
            writeln!(out, "arm attributes: {}", tags.join(", "))?;
        }
    }
    if let Some(go) = &req.go {
        let settings: Vec<String> = [
            ("GOARM", &go.goarm),
            ("GOAMD64", &go.goamd64),
            ("GOARM64", &go.goarm64),
        ]
        .into_iter()
        .filter_map(|(key, value)| value.as_ref().map(|v| format!("{key}={v}")))
        .collect();
        writeln!(out, "go: {} {}", go.version, settings.join(" "))?;
    }
    match &req.platform {
        Some(platform) => writeln!(out, "requires: {platform}")?,
        None => writeln!(out, "requires: no known platform")?,
    }
    if let Some(evidence) = req.decided_by {
        writeln!(out, "decided by: {}", serde_label(&evidence))?;
    }
    for reason in &req.reasons {
        writeln!(out, "  because: {reason}")?;
    }
    Ok(())
}

/// The name serde gives a unit enum variant, so text and JSON spell values alike.
fn serde_label<T: Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}
