//! Whether a host can give a binary what it needs.

use serde::Serialize;

use super::reading::BinaryRequirements;
use super::requirements::arm64_level;
use crate::platform::Platform;

/// Whether a host that runs `host` also runs code built for `need`: same OS and architecture, and a variant at
/// least as high.
fn satisfies(host: &Platform, need: &Platform) -> bool {
    if host.os != need.os || host.architecture != need.architecture {
        return false;
    }
    match need.architecture.as_str() {
        "arm" => matches!((host.arm_version(), need.arm_version()), (Some(h), Some(n)) if h >= n),
        "amd64" => matches!((host.amd64_level(), need.amd64_level()), (Some(h), Some(n)) if h >= n),
        "arm64" => {
            let level = |p: &Platform| arm64_level(p.variant.as_deref().unwrap_or("v8"));
            matches!((level(host), level(need)), (Some(h), Some(n)) if h >= n)
        }
        _ => need.variant.is_none() || host.variant == need.variant,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    CanRun,
    CannotRun,
    /// Nothing rules it out, but nothing proves it either (a 32-bit ARM binary that records no version).
    Unproven,
    /// A script: whether it runs is up to its interpreter, which the caller must check in turn.
    DependsOnInterpreter,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Outcome::CanRun => "runs",
            Outcome::CannotRun => "does not run",
            Outcome::Unproven => "unproven",
            Outcome::DependsOnInterpreter => "depends on its interpreter",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub outcome: Outcome,
    /// What the binary needs against what the host has, one line each.
    pub reasons: Vec<String>,
}

/// Whether a host that runs `host_candidates` (its platforms, best first) with pages of `host_page_size` bytes
/// can run a binary with these requirements.
pub fn can_run(
    req: &BinaryRequirements,
    host_candidates: &[Platform],
    host_page_size: Option<u64>,
) -> Verdict {
    let req = match req {
        BinaryRequirements::Script(script) => {
            return Verdict {
                outcome: Outcome::DependsOnInterpreter,
                reasons: vec![format!(
                    "a script: it runs if its interpreter {} runs",
                    script.interpreter
                )],
            };
        }
        BinaryRequirements::Elf(req) => req,
    };
    let host_list = if host_candidates.is_empty() {
        "no platform".to_string()
    } else {
        host_candidates
            .iter()
            .map(Platform::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let evidence = match req.reasons.as_slice() {
        [] => "no evidence recorded".to_string(),
        [only] => only.clone(),
        [first, rest @ ..] => format!("{first}, and {} more", rest.len()),
    };
    let mut fine = Vec::new();
    let mut blocking = Vec::new();
    let mut unproven = Vec::new();

    if !req.file_type.can_execute() {
        blocking.push(format!("it is a {}, not an executable", req.file_type));
    }
    match &req.platform {
        None => blocking.push(format!(
            "needs a machine flotilla has no platform for: {evidence}; this host runs {host_list}"
        )),
        Some(need) if need.architecture == "arm" && need.variant.is_none() => {
            if host_candidates
                .iter()
                .any(|h| h.os == need.os && h.architecture == need.architecture)
            {
                unproven.push(format!(
                    "needs {need} of an unknown version: {evidence}; this host runs {host_list}"
                ));
            } else {
                blocking.push(format!(
                    "needs {need}: {evidence}; this host runs {host_list}"
                ));
            }
        }
        Some(need) => match host_candidates.iter().find(|h| satisfies(h, need)) {
            Some(host) => fine.push(format!("needs {need}: {evidence}; this host runs {host}")),
            None => blocking.push(format!(
                "needs {need}: {evidence}; this host runs {host_list}"
            )),
        },
    }
    match (req.load_alignment, host_page_size) {
        (None, _) => blocking.push("it has no loadable segments".into()),
        (Some(align), Some(page)) if align < page => blocking.push(format!(
            "its segments are aligned to {align} bytes, less than this host's {page}-byte pages: the kernel \
             cannot map it"
        )),
        (Some(align), Some(page)) => fine.push(format!(
            "its segments are aligned to {align} bytes, enough for this host's {page}-byte pages"
        )),
        (Some(align), None) => fine.push(format!(
            "its segments are aligned to {align} bytes; the host page size is unknown, so not checked"
        )),
    }
    let outcome = if !blocking.is_empty() {
        Outcome::CannotRun
    } else if !unproven.is_empty() {
        Outcome::Unproven
    } else {
        Outcome::CanRun
    };
    let mut reasons = blocking;
    reasons.extend(unproven);
    reasons.extend(fine);
    Verdict { outcome, reasons }
}
