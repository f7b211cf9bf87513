//! Every board capture must give exactly the platforms its `expected` file lists.
//!
//! Boards live in the shared fixtures (`../shared/fixtures/boards`, or `FLOTILLA_BOARDS_DIR`) and in this crate's
//! `tests/fixtures/boards`. All boards are checked before the test fails, so one run names every wrong board.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::Flotilla;
use flotilla::platform::detect::detect;
use flotilla::platform::evidence::Evidence;

fn shared_boards() -> PathBuf {
    match std::env::var_os("FLOTILLA_BOARDS_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/boards"),
    }
}

fn board_dirs(root: &Path) -> Vec<PathBuf> {
    let entries =
        fs::read_dir(root).unwrap_or_else(|e| panic!("board fixtures {}: {e}", root.display()));
    let mut dirs: Vec<PathBuf> = entries
        .map(|e| e.expect("readable directory entry").path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs
}

fn check(root: &Path, failures: &mut Vec<String>) -> usize {
    let dirs = board_dirs(root);
    for dir in &dirs {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let expected: Vec<String> = fs::read_to_string(dir.join("expected"))
            .unwrap_or_else(|e| panic!("board {name}: expected file: {e}"))
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect();
        assert!(
            dir.join("SOURCE").is_file(),
            "board {name}: every capture must name its SOURCE"
        );
        let got = Evidence::read_dir(dir)
            .map_err(|e| e.to_string())
            .and_then(|ev| detect(&ev).map_err(|e| e.to_string()))
            .map(|d| {
                d.candidates
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
            });
        match got {
            Ok(got) if got == expected => {}
            Ok(got) => failures.push(format!("board {name}: got {got:?}, expected {expected:?}")),
            Err(e) => failures.push(format!("board {name}: error {e}, expected {expected:?}")),
        }
    }
    dirs.len()
}

#[test]
fn every_board_gives_exactly_its_expected_platforms() {
    let mut failures = Vec::new();
    let shared = check(&shared_boards(), &mut failures);
    let own = check(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/boards"),
        &mut failures,
    );
    assert!(shared >= 7, "expected the 7 shared boards, found {shared}");
    assert!(
        own >= 5,
        "expected at least 5 boards of our own, found {own}"
    );
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// Runs `flotilla platform --evidence DIR` and returns (exit code, stderr).
fn platform_on(dir: &Path) -> (Option<i32>, String) {
    let out = Flotilla::new()
        .args(["platform", "--evidence"])
        .arg(dir)
        .output();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_refused(dir: &Path, needle: &str) {
    let (code, stderr) = platform_on(dir);
    assert_eq!(
        code,
        Some(1),
        "{}: exit code, stderr: {stderr}",
        dir.display()
    );
    assert!(!stderr.contains("panicked"), "{}: {stderr}", dir.display());
    assert!(
        stderr.contains(needle),
        "{}: expected {needle:?} in: {stderr}",
        dir.display()
    );
}

#[test]
fn bad_evidence_is_refused_with_a_clear_error() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = |name: &str| {
        let d = tmp.path().join(name);
        fs::create_dir(&d).expect("create board dir");
        d
    };

    let empty = dir("empty");
    assert_refused(&empty, "holds no evidence");

    let garbage = dir("garbage");
    fs::write(garbage.join("cpuinfo"), "lorem ipsum\ndolor: sit amet\n").expect("write");
    assert_refused(&garbage, "no uname -m");

    let binary = dir("binary");
    fs::write(
        binary.join("cpuinfo"),
        [0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0xff, 0xfe],
    )
    .expect("write");
    assert_refused(&binary, "binary/cpuinfo");

    // A directory where a file belongs cannot be read, even by root (who can read a mode-000 file).
    let unreadable = dir("unreadable");
    fs::create_dir(unreadable.join("cpuinfo")).expect("create");
    assert_refused(&unreadable, "cannot read evidence file");

    let bad_auxv = dir("bad-auxv");
    fs::write(bad_auxv.join("uname-m"), "aarch64\n").expect("write");
    fs::write(bad_auxv.join("auxv"), "AT_HWCAP: !!!\n").expect("write");
    assert_refused(&bad_auxv, "bad-auxv/auxv");

    assert_refused(&tmp.path().join("missing"), "cannot read evidence file");
}
