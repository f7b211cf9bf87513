//! Architecture proof: the image's own executables must run on this device before the image is marked ready.
//!
//! The entrypoint (or the command when there is no entrypoint) is resolved as `execvp` would inside the
//! container, its ELF header is read, then its ELF interpreter, or a script's `#!` interpreter, in turn. Each
//! must be runnable on the device; the first that is not refuses the variant, naming what it needs and what the
//! device has.

use std::path::Path;

use super::PullError;

use crate::elf::{self, BinaryRequirements, Outcome};
use crate::layers::{ImageTree, LayerError};
use crate::oci::ImageConfig;
use crate::platform::Platform;

/// Interpreters followed before giving up (`#!/usr/bin/env python3` → env → its loader is three).
const MAX_CHAIN: usize = 6;
/// Executables larger than this are not extracted for inspection; real ones are far smaller.
pub(super) const MAX_EXECUTABLE_BYTES: u64 = 1 << 30;

/// What the proof found: each executable checked, in order, and the verdict.
#[derive(Debug, Clone, Default)]
pub struct Proof {
    /// One line per executable: path, what it needs, verdict.
    pub checked: Vec<String>,
    /// The same executables as "path needs platform", for reports that judge against a label rather than a device.
    pub needs: Vec<String>,
}

/// Why a variant was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProofError {
    #[error("{path} needs more than this device has: {}", reasons.join("; "))]
    CannotRun { path: String, reasons: Vec<String> },
    #[error("{path} proves nothing about the CPU it needs ({}); the index label alone is not trusted for this device", reasons.join("; "))]
    Unproven { path: String, reasons: Vec<String> },
    #[error("{path} is not a program flotilla can read: {source}")]
    Elf { path: String, source: elf::ElfError },
    #[error(
        "the image names no program to run (no Entrypoint or Cmd) and has no /bin/sh, so its architecture cannot be proven"
    )]
    NoProgram,
    #[error("the interpreter chain from {path} is longer than {MAX_CHAIN}")]
    ChainTooLong { path: String },
    #[error(transparent)]
    Layer(#[from] LayerError),
}

/// Proves that the image's program, and every interpreter it needs, runs on a device with these candidates.
/// `trust_label` is false when the variant was taken only on condition of proof (an unlabelled `arm` entry on a
/// v6 device): then a binary that proves nothing is refused rather than given the benefit of the doubt.
pub fn prove(
    tree: &mut ImageTree,
    config: &ImageConfig,
    candidates: &[Platform],
    page_size: Option<u64>,
    trust_label: bool,
    scratch: &Path,
) -> Result<Proof, ProofError> {
    let path_env = config.env("PATH");
    let working_dir = config
        .config
        .as_ref()
        .and_then(|c| c.working_dir.as_deref());
    let mut proof = Proof::default();
    let mut next = match config.program() {
        Some(program) => tree.find_executable(program, path_env, working_dir)?,
        None => tree.resolve("/bin/sh").map_err(|_| ProofError::NoProgram)?,
    };
    for _ in 0..MAX_CHAIN {
        let shown = next.display_path();
        tree.extract(&next, scratch, MAX_EXECUTABLE_BYTES)?;
        let req = elf::inspect_file(scratch).map_err(|source| ProofError::Elf {
            path: shown.clone(),
            source,
        })?;
        let verdict = elf::can_run(&req, candidates, page_size);
        let needs = match &req {
            BinaryRequirements::Elf(e) => e
                .platform
                .as_ref()
                .map_or_else(|| e.machine.clone(), Platform::to_string),
            BinaryRequirements::Script(s) => format!("script for {}", s.interpreter),
        };
        proof
            .checked
            .push(format!("{shown}: {needs}: {}", verdict.outcome));
        proof.needs.push(format!("{shown} needs {needs}"));
        match verdict.outcome {
            Outcome::CanRun => {}
            Outcome::Unproven if trust_label => {}
            Outcome::Unproven => {
                return Err(ProofError::Unproven {
                    path: shown,
                    reasons: verdict.reasons,
                });
            }
            Outcome::CannotRun => {
                return Err(ProofError::CannotRun {
                    path: shown,
                    reasons: verdict.reasons,
                });
            }
            Outcome::DependsOnInterpreter => {}
        }
        let interpreter = match &req {
            BinaryRequirements::Script(s) => Some(s.interpreter.clone()),
            BinaryRequirements::Elf(e) => e.interpreter.as_ref().map(|i| i.path.clone()),
        };
        match interpreter {
            None => return Ok(proof),
            Some(path) => {
                next = tree.find_executable(&path, path_env, working_dir)?;
            }
        }
    }
    Err(ProofError::ChainTooLong {
        path: proof.checked.first().cloned().unwrap_or_default(),
    })
}

/// [`prove`] on a blocking thread (it reads and decompresses layers), handing the tree back so that a caller can
/// prove again over the layers it has already indexed. `scratch` is the file an executable is extracted into; it
/// is removed afterwards.
pub(super) async fn prove_blocking(
    mut tree: ImageTree,
    config: ImageConfig,
    candidates: Vec<Platform>,
    page_size: Option<u64>,
    trust_label: bool,
    scratch: std::path::PathBuf,
) -> Result<(ImageTree, Result<Proof, ProofError>), PullError> {
    tokio::task::spawn_blocking(move || {
        let result = prove(
            &mut tree,
            &config,
            &candidates,
            page_size,
            trust_label,
            &scratch,
        );
        let _ = std::fs::remove_file(&scratch);
        (tree, result)
    })
    .await
    .map_err(|e| PullError::Task(e.to_string()))
}
