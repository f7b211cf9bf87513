//! `flotilla logs`: a container's output, from its rotating log files.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use super::{CliError, Context};
use crate::runtime::Runtime;
use crate::supervise::container::Container;
use crate::supervise::logs::{self, Record, Stream};

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
    let print = |r: &Record| -> std::io::Result<()> { print_record(r, args.timestamps) };
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

/// stdout records to stdout and stderr records to stderr, as the container wrote them.
fn print_record(r: &Record, timestamps: bool) -> std::io::Result<()> {
    let mut line = Vec::with_capacity(r.text.len() + 32);
    if timestamps {
        line.extend_from_slice(r.time.as_bytes());
        line.push(b' ');
    }
    line.extend_from_slice(&r.text);
    line.push(b'\n');
    match r.stream {
        Stream::Stdout => std::io::stdout().lock().write_all(&line),
        Stream::Stderr => std::io::stderr().lock().write_all(&line),
    }
}

/// For `flotilla run` in the foreground: prints the container's output until its supervisor is done with it.
/// Ctrl-C stops the container.
pub fn follow_until_done(
    container: &Container,
    runtime: &Arc<dyn Runtime>,
    tail: Option<usize>,
) -> Result<(), CliError> {
    let interrupted = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = interrupted.clone();
    // A thread with its own small runtime waits for Ctrl-C, so the follow loop stays plain blocking code.
    std::thread::spawn(move || {
        if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            rt.block_on(async {
                if tokio::signal::ctrl_c().await.is_ok() {
                    flag.store(true, std::sync::atomic::Ordering::SeqCst);
                }
            });
        }
    });
    let mut stopping = false;
    logs::follow(
        &container.log_dir(),
        tail,
        |r| print_record(r, false),
        || {
            if interrupted.load(std::sync::atomic::Ordering::SeqCst) && !stopping {
                stopping = true;
                eprintln!("stopping {}", container.name);
                let grace = container
                    .spec()
                    .map(|s| s.settings.stop_grace)
                    .unwrap_or_default();
                if let Err(e) = crate::supervise::control::stop(container, runtime, grace) {
                    eprintln!("{}", crate::error_chain(&e));
                }
            }
            container.supervisor_pid().is_some() && !container.status().state.is_final()
        },
    )
    .map_err(|e| CliError::Io {
        what: format!("the logs of {}", container.name),
        source: e,
    })
}
