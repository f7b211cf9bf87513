//! `flotilla ps`: the containers, their state as their supervisors last recorded it, and any run-time failure
//! recognised as the wrong architecture variant.

use std::process::ExitCode;

use serde::Serialize;

use super::{CliError, Context};
use crate::supervise::container::{Container, ContainerSpec, State, Status};
use crate::supervise::control;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print a JSON array instead of a table
    #[arg(long)]
    pub json: bool,
    /// Also list containers that exited or were stopped
    #[arg(short, long)]
    pub all: bool,
}

#[derive(Debug, Serialize)]
struct Row {
    name: String,
    image: String,
    platform: String,
    manifest: String,
    state: &'static str,
    supervised: bool,
    #[serde(flatten)]
    status: Status,
    emulated_by: Option<String>,
}

pub fn run(args: Args, ctx: &Context) -> Result<ExitCode, CliError> {
    // A container whose supervisor died is handed to a new one before it is listed, so what ps shows is watched.
    if rustix::process::geteuid().is_root() {
        for name in control::adopt_orphans(&ctx.state_dir)? {
            eprintln!("{name}: its supervisor had ended; a new one has adopted it");
        }
    }
    let mut rows = Vec::new();
    for c in Container::list(&ctx.state_dir)? {
        let status = c.status();
        if !args.all && status.state.is_final() {
            continue;
        }
        let ContainerSpec {
            image,
            platform,
            manifest_digest,
            emulated_by,
            ..
        } = c.spec()?;
        rows.push(Row {
            supervised: c.supervisor_pid().is_some(),
            name: c.name,
            image,
            platform,
            manifest: manifest_digest.to_string(),
            state: status.state.as_str(),
            status,
            emulated_by,
        });
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", table(&rows));
    }
    Ok(ExitCode::SUCCESS)
}

fn describe(r: &Row) -> String {
    let s = &r.status;
    let mut text = match s.state {
        State::Exited | State::Restarting => match &s.exit {
            Some(e) => format!("{} ({})", r.state, e.describe()),
            None => r.state.to_string(),
        },
        State::Failed => format!(
            "failed: {}",
            s.message.as_deref().unwrap_or("see flotilla logs")
        ),
        _ => r.state.to_string(),
    };
    if let Some(h) = &s.health {
        text.push_str(&format!(", {h}"));
    }
    if !r.supervised && !s.state.is_final() {
        text.push_str(", unsupervised");
    }
    if let Some(w) = &s.wrong_architecture {
        text.push_str(&format!("; wrong architecture variant: {}", w.evidence));
    }
    text
}

fn table(rows: &[Row]) -> String {
    let header = ["NAME", "IMAGE", "PLATFORM", "STATE", "RESTARTS", "STARTED"];
    let body: Vec<[String; 6]> = rows
        .iter()
        .map(|r| {
            let platform = match &r.emulated_by {
                Some(h) => format!("{} (emulated: {h})", r.platform),
                None => r.platform.clone(),
            };
            [
                r.name.clone(),
                r.image.clone(),
                platform,
                describe(r),
                r.status.restarts.to_string(),
                r.status
                    .started_at
                    .clone()
                    .unwrap_or_else(|| "-".to_string()),
            ]
        })
        .collect();
    super::table(header, &body)
}
