//! An independent fuzzer of the API: schemathesis (from PyPI, in the virtualenv `tests/setup` makes in
//! `target/schemathesis-venv`) reads `docs/openapi.yaml` and runs the real `flotilla-server` through every
//! operation, the device routes included (with the credential of a device enrolled first): examples inside the
//! schema must be taken, examples outside it refused with a 4xx, responses must fit the document, and nothing may
//! answer 5xx. The run is bounded (`FLOTILLA_FUZZ_EXAMPLES` examples per operation, 50 by default; about half a
//! minute) and seeded (`FLOTILLA_FUZZ_SEED`, 1 by default), so a failure replays.
//!
//! It runs in a private network namespace (`unshare --net`, so as root): a release of a made-up image then fails
//! at once instead of reaching out to whatever registry its name happens to name. A missing piece skips the test
//! with a reason, or fails it when `FLOTILLA_REQUIRE_ALL=1`.

mod common;

use std::path::Path;
use std::process::Command;

use common::{output_text, require, required_tool};

#[test]
fn schemathesis_finds_no_failure_and_no_server_error() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join("target/schemathesis-venv/bin/python");
    if require(
        "schemathesis in target/schemathesis-venv (tests/setup makes it)",
        python.is_file().then_some(()),
    )
    .is_none()
    {
        return;
    }
    if require(
        "root (unshare --net)",
        rustix::process::geteuid().is_root().then_some(()),
    )
    .is_none()
    {
        return;
    }
    let Some(unshare) = required_tool("unshare") else {
        return;
    };
    let work = tempfile::tempdir().expect("tempdir");
    let examples = std::env::var("FLOTILLA_FUZZ_EXAMPLES").unwrap_or_else(|_| "50".into());
    let out = Command::new(unshare)
        .args(["--net", "--"])
        .arg(&python)
        .arg(root.join("tests/fuzz/run.py"))
        .arg(env!("CARGO_BIN_EXE_flotilla-server"))
        .arg(work.path())
        .arg(&examples)
        // schemathesis keeps a cache (`.schemathesis/`) in its working directory.
        .current_dir(work.path())
        .output()
        .expect("run tests/fuzz/run.py");
    let text = output_text(&out);
    let server_log = std::fs::read_to_string(work.path().join("server.log")).unwrap_or_default();
    assert!(
        out.status.success(),
        "schemathesis found failures:\n{text}\nthe server's log:\n{server_log}"
    );
    assert!(
        text.contains("Test cases:") && !text.contains(" 5xx:"),
        "{text}"
    );
}
