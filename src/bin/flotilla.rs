#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use flotilla::cli::{self, Cli};

fn main() -> ExitCode {
    match cli::run(Cli::parse()) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("flotilla: {}", flotilla::error_chain(&err));
            ExitCode::from(err.exit_code())
        }
    }
}
