//! Embeds the git commit and the target triple, so `flotilla --version` says exactly which build is running on a
//! device: a Pi Zero running the ARMv7 binary is the first thing to rule out in a bug report.

use std::path::Path;
use std::process::Command;

fn main() {
    let target = std::env::var("TARGET").unwrap_or_else(|_| "unknown".to_string());
    println!("cargo:rustc-env=FLOTILLA_TARGET={target}");

    // Builds from a source tarball (no .git) can still name their commit.
    println!("cargo:rerun-if-env-changed=FLOTILLA_GIT_COMMIT");
    let commit = match std::env::var("FLOTILLA_GIT_COMMIT") {
        Ok(c) if !c.trim().is_empty() => c.trim().to_string(),
        _ => git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".to_string()),
    };
    println!("cargo:rustc-env=FLOTILLA_GIT_COMMIT={commit}");

    watch_git_head();
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!text.is_empty()).then_some(text)
}

/// Reruns when HEAD moves: HEAD itself changes on checkout, the branch's ref on commit. `--git-path` finds both in
/// a linked worktree too, where `.git` is a file and refs live in the common directory.
fn watch_git_head() {
    let Some(head) = git(&["rev-parse", "--git-path", "HEAD"]) else {
        return;
    };
    let mut watched = vec![head];
    let branch_ref = git(&["symbolic-ref", "-q", "HEAD"])
        .and_then(|branch| git(&["rev-parse", "--git-path", &branch]));
    watched.extend(branch_ref);
    if let Some(packed) = git(&["rev-parse", "--git-path", "packed-refs"]) {
        watched.push(packed);
    }
    // Cargo treats a watched path that does not exist as always changed, so only existing ones are named.
    for path in watched {
        if Path::new(&path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
}
