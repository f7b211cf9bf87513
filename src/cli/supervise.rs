//! `flotilla supervise NAME` (hidden): the process that keeps one container, started by `run` and by `ps` for an
//! orphan. It detaches into its own session so the command that started it can end.

use std::process::ExitCode;
use std::sync::Arc;

use super::{CliError, Context};
use crate::clock::SystemClock;
use crate::runtime::Runtime;
use crate::supervise::container::{Container, ContainerError};
use crate::supervise::supervisor::Supervisor;
use crate::unpack::{Snapshots, rootfs};

#[derive(Debug, clap::Args)]
pub struct Args {
    pub name: String,
    /// The container's lock, already held: handed over by the process that made the container
    #[arg(long, hide = true)]
    pub lock_fd: Option<i32>,
}

pub fn run(args: Args, ctx: &Context) -> Result<ExitCode, CliError> {
    // Own session: a terminal's hangup or the starting shell's exit must not reach the supervisor.
    let _ = rustix::process::setsid();
    let container = Container::open(&ctx.state_dir, &args.name)?;
    let inherited = match args.lock_fd {
        Some(fd) => Some(
            crate::sys::take_inherited_fd(fd).ok_or_else(|| CliError::Io {
                what: format!("the container's lock on descriptor {fd} (it was not handed over)"),
                source: std::io::Error::from_raw_os_error(libc::EBADF),
            })?,
        ),
        None => None,
    };
    let locked = match inherited {
        Some(fd) => container.claim_lock(std::fs::File::from(fd)),
        None => container.lock_supervisor(),
    };
    let _lock = match locked {
        Ok(l) => l,
        // Another supervisor has it: nothing to do.
        Err(ContainerError::Durable(crate::durable::DurableError::Locked { .. })) => {
            return Ok(ExitCode::SUCCESS);
        }
        Err(e) => return Err(e.into()),
    };
    let spec = container.spec()?;
    // After a reboot the root's overlay mount is gone; mounting again is a no-op when it is still there.
    let snapshots = Snapshots::open(&ctx.state_dir)?;
    rootfs::prepare(&snapshots, &spec.diff_ids, &container.dir)?;
    let runtime: Arc<dyn Runtime> = Arc::new(super::open_runtime(ctx)?);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::Runtime)?;
    let status = rt.block_on(async move {
        let (tx, rx) = tokio::sync::watch::channel(None);
        let default_grace = spec.settings.stop_grace;
        let stop_file = container.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                return;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            let _ = tx.send(Some(stop_file.stop_requested().unwrap_or(default_grace)));
        });
        Supervisor::new(container, runtime, Arc::new(SystemClock))?
            .run(rx)
            .await
    })?;
    tracing::info!(container = %args.name, state = status.state.as_str(), "supervisor done");
    Ok(ExitCode::SUCCESS)
}
