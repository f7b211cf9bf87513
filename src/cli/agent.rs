//! `flotilla agent`: the daemon systemd runs. Starts the committed apps from local state (no server needed), says
//! READY, then keeps the apps at the fleet's desired releases.

use std::process::ExitCode;
use std::sync::Arc;

use super::{CliError, Context};
use crate::agent::apps::Apps;
use crate::agent::db::Db;
use crate::agent::metrics::SystemSampler;
use crate::agent::shutdown::{self, Systemd};
use crate::agent::{Agent, AgentError, Identity};
use crate::fleet::PlatformReport;
use crate::runtime::Runtime;

#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args, ctx: &Context) -> Result<ExitCode, CliError> {
    crate::crash_points::arm();
    if !rustix::process::geteuid().is_root() {
        return Err(super::run::RunError::NotRoot.into());
    }
    std::fs::create_dir_all(&ctx.state_dir).map_err(|source| CliError::Io {
        what: format!("the state directory {}", ctx.state_dir.display()),
        source,
    })?;
    let detection = super::platform::host_detection(ctx)?;
    let host = detection.host();
    let runtime: Arc<dyn Runtime> = Arc::new(super::open_runtime(ctx)?);
    let name = ctx.config.fleet.name.clone().unwrap_or_else(|| {
        rustix::system::uname()
            .nodename()
            .to_string_lossy()
            .into_owned()
    });
    let identity = Identity {
        name,
        platform: PlatformReport {
            candidates: host.candidates.iter().map(|c| c.to_string()).collect(),
            page_size: host.page_size,
            description: detection.rules.join("; "),
        },
    };
    let db = Db::open(&ctx.state_dir).map_err(AgentError::from)?;
    let apps = Apps {
        deploy: super::deployer(ctx, host)?,
        runtime: runtime.clone(),
    };
    let sampler = Box::new(SystemSampler::new(&ctx.state_dir));
    let agent = Agent::new(
        db,
        apps,
        ctx.config.fleet.clone(),
        identity,
        sampler,
        Arc::new(crate::clock::SystemClock),
    )?;
    let rt = super::runtime()?;
    let terminated = rt.block_on(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let mut agent = agent;
        // Until the handler below is in place, SIGTERM ends the agent at once, as systemd expects of a service
        // that is still starting.
        agent.boot().await?;
        let mut term = signal(SignalKind::terminate()).map_err(CliError::Runtime)?;
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        if ctx.config.fleet.server.is_none() {
            tracing::warn!(
                "no [fleet] server in the configuration: keeping the committed apps running, reporting to nobody"
            );
        }
        // The loop's state is durable at every await (an agent killed anywhere resumes), so dropping it is safe.
        tokio::select! {
            r = agent.run() => r.map(|()| false).map_err(CliError::from),
            _ = term.recv() => Ok(true),
        }
    })?;
    // A pull or unpack may be under way on a blocking thread; like the SIGTERM that used to end the agent outright,
    // this leaves it (its partial blobs are verified or discarded on the next start) rather than waiting for it.
    rt.shutdown_background();
    if terminated {
        shutdown::on_terminate(&Systemd, &ctx.state_dir, &runtime);
    }
    Ok(ExitCode::SUCCESS)
}
