//! Replays the fuzz seeds (`fuzz/seeds/<target>`) and every input fuzzing
//! once broke an invariant with (`fuzz/regressions/<target>`) through the
//! checks the fuzz targets run, on stable and without libFuzzer.

#[path = "../fuzz/src/checks.rs"]
mod checks;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

fn inputs(dir: &str, target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(dir)
        .join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("readable corpus dir").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Runs every input, then fails naming each one that broke an invariant
/// (each panic message is printed as it happens).
fn replay(target: &str, check: fn(&[u8])) {
    let seeds = inputs("seeds", target);
    assert!(
        seeds.len() >= 10,
        "fuzz/seeds/{target} holds only {} inputs",
        seeds.len()
    );
    let mut failed = Vec::new();
    for path in seeds.iter().chain(&inputs("regressions", target)) {
        let data = std::fs::read(path).expect("readable input");
        if catch_unwind(AssertUnwindSafe(|| check(&data))).is_err() {
            failed.push(path.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{target}: invariants broken by {failed:#?}"
    );
}

#[test]
fn manifest_inputs_keep_their_invariants() {
    replay("manifest", checks::manifest);
}

#[test]
fn merge_inputs_keep_their_invariants() {
    replay("merge", checks::merge);
}

#[test]
fn placeholder_inputs_keep_their_invariants() {
    replay("placeholders", checks::placeholders);
}
