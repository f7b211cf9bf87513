//! `flotilla stop`: SIGTERM, the grace period, then SIGKILL; the container stays, stopped, until `flotilla rm`.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use super::{CliError, Context};
use crate::app as settings;
use crate::runtime::Runtime;
use crate::supervise::container::Container;
use crate::supervise::control;

#[derive(Debug, clap::Args)]
pub struct Args {
    pub name: String,
    /// Seconds (or 500ms, 1m) between SIGTERM and SIGKILL [default: the container's --stop-timeout]
    #[arg(short, long, value_parser = |s: &str| settings::parse_duration("--time", s))]
    pub time: Option<Duration>,
}

pub fn run(args: Args, ctx: &Context) -> Result<ExitCode, CliError> {
    let container = Container::open(&ctx.state_dir, &args.name)?;
    let runtime: Arc<dyn Runtime> = Arc::new(super::open_runtime(ctx)?);
    let grace = match args.time {
        Some(t) => t,
        None => container.spec()?.settings.stop_grace,
    };
    control::stop(&container, &runtime, grace)?;
    println!("{}", container.name);
    Ok(ExitCode::SUCCESS)
}
