#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use flotilla::cli::server::{self as cli, Cli};

fn main() -> ExitCode {
    flotilla::cli::init_logging(0);
    match cli::run(Cli::parse()) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("flotilla-server: {}", flotilla::error_chain(&err));
            ExitCode::from(err.exit_code())
        }
    }
}
