//! `flotilla rm`: removes a stopped container: the runtime's state (and with it the cgroup), the root's mount and
//! upper layer, the logs. Named volumes stay: they hold the app's data across containers.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use super::{CliError, Context};
use crate::runtime::Runtime;
use crate::supervise::container::{Container, ContainerError};
use crate::supervise::control;

#[derive(Debug, clap::Args)]
pub struct Args {
    pub name: String,
    /// Stop the container first (SIGKILL at once) when it still runs
    #[arg(short, long)]
    pub force: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RmError {
    #[error(
        "container {0} is {1}: stop it first (flotilla stop {0}) or use flotilla rm --force {0}"
    )]
    Running(String, &'static str),
}

pub fn run(args: Args, ctx: &Context) -> Result<ExitCode, CliError> {
    let container = match Container::open(&ctx.state_dir, &args.name) {
        Ok(c) => c,
        Err(ContainerError::NotFound(n)) => return Err(ContainerError::NotFound(n).into()),
        Err(e) => return Err(e.into()),
    };
    let runtime: Arc<dyn Runtime> = Arc::new(super::open_runtime(ctx)?);
    let state = container.status().state;
    let alive = container.is_locked() || control::is_running(&container, runtime.as_ref());
    if alive && !args.force {
        return Err(RmError::Running(container.name.clone(), state.as_str()).into());
    }
    control::remove(&container, &runtime, Duration::ZERO)?;
    println!("{}", container.name);
    Ok(ExitCode::SUCCESS)
}
