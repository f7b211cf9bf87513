//! `flotilla rm`: removes a stopped container: the runtime's state (and with it the cgroup), the root's mount and
//! upper layer, the logs. Named volumes stay: they hold the app's data across containers.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use super::{CliError, Context};
use crate::runtime::Runtime;
use crate::supervise::container::{Container, ContainerError};
use crate::supervise::control;
use crate::unpack::rootfs;

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
    #[error("cannot remove {path}: {source}")]
    Remove {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

pub fn run(args: Args, ctx: &Context) -> Result<ExitCode, CliError> {
    let container = match Container::open(&ctx.state_dir, &args.name) {
        Ok(c) => c,
        Err(ContainerError::NotFound(n)) => return Err(ContainerError::NotFound(n).into()),
        Err(e) => return Err(e.into()),
    };
    let runtime: Arc<dyn Runtime> = Arc::new(super::open_runtime(ctx)?);
    let state = container.status().state;
    let alive =
        container.supervisor_pid().is_some() || control::is_running(&container, runtime.as_ref());
    if alive || !state.is_final() {
        if !args.force && alive {
            return Err(RmError::Running(container.name.clone(), state.as_str()).into());
        }
        control::stop(&container, &runtime, Duration::ZERO)?;
    }
    if runtime.state(&container.name)?.is_some() {
        runtime.delete(&container.name, true)?;
    }
    rootfs::release(&container.dir)?;
    std::fs::remove_dir_all(&container.dir).map_err(|source| RmError::Remove {
        path: container.dir.clone(),
        source,
    })?;
    println!("{}", container.name);
    Ok(ExitCode::SUCCESS)
}
