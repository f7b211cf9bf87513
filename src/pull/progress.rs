//! Telling the user what a pull is doing: progress bars per layer on a terminal, one line per step otherwise
//! (a journal or a CI log gains nothing from redrawn bars).

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::digest::Digest;

pub struct Reporter {
    bars: Option<MultiProgress>,
}

impl Reporter {
    /// Bars when stderr is a terminal, lines otherwise.
    pub fn for_stderr() -> Reporter {
        let bars = std::io::stderr()
            .is_terminal()
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(8)));
        Reporter { bars }
    }

    pub fn step(&self, message: &str) {
        match &self.bars {
            Some(bars) => {
                let _ = bars.println(message);
            }
            None => eprintln!("{message}"),
        }
    }

    pub fn layer(&self, digest: &Digest, size: u64) -> LayerProgress {
        let short = short(digest);
        let bar = self.bars.as_ref().map(|bars| {
            let bar = bars.add(ProgressBar::new(size));
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_prefix(short.clone());
            bar.enable_steady_tick(Duration::from_millis(250));
            bar
        });
        LayerProgress { bar, short, size }
    }
}

pub struct LayerProgress {
    bar: Option<ProgressBar>,
    short: String,
    size: u64,
}

impl LayerProgress {
    pub fn update(&self, done: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(done);
        }
    }

    pub fn finish(&self, fetched: u64) {
        match &self.bar {
            Some(bar) => bar.finish(),
            None => eprintln!(
                "layer {}: {} fetched ({} in the layer)",
                self.short,
                crate::human::bytes(fetched),
                crate::human::bytes(self.size)
            ),
        }
    }
}

fn short(digest: &Digest) -> String {
    let hex = digest.hex();
    format!(
        "{}:{}",
        digest.algorithm().name(),
        &hex[..12.min(hex.len())]
    )
}
