//! `flotilla logs`: a container's output, from its rotating log files.

use std::process::ExitCode;

use super::{CliError, Context};
use crate::supervise::container::Container;
use crate::supervise::logs::{self, Record};

#[derive(Debug, clap::Args)]
pub struct Args {
    pub name: String,
    /// Keep printing new output until the container ends
    #[arg(short, long)]
    pub follow: bool,
    /// Only the last N lines
    #[arg(long, value_name = "N")]
    pub tail: Option<usize>,
    /// Prefix each line with the time it was written
    #[arg(short, long)]
    pub timestamps: bool,
}

pub fn run(args: Args, ctx: &Context) -> Result<ExitCode, CliError> {
    let container = Container::open(&ctx.state_dir, &args.name)?;
    let print = |r: &Record| -> std::io::Result<()> { super::print_record(r, args.timestamps) };
    let log_err = |e: std::io::Error| CliError::Io {
        what: format!("the logs of {}", container.name),
        source: e,
    };
    if args.follow {
        logs::follow(&container.log_dir(), args.tail, print, || {
            container.supervisor_pid().is_some() && !container.status().state.is_final()
        })
        .map_err(log_err)?;
    } else {
        for r in logs::read(&container.log_dir(), args.tail).map_err(log_err)? {
            print(&r).map_err(log_err)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
