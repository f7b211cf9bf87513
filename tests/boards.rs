//! Every board capture must give exactly the platforms its `expected` file lists.
//!
//! Boards live in the shared fixtures (`../shared/fixtures/boards`, or `FLOTILLA_BOARDS_DIR`) and in this crate's
//! `tests/fixtures/boards`. All boards are checked before the test fails, so one run names every wrong board.

use std::fs;
use std::path::{Path, PathBuf};

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
