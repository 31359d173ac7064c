//! The fuzz targets' committed inputs, replayed in the normal test suite: every seed in
//! `fuzz/seeds/<target>/` (and `conf/`, `tests/fixtures/invalid/` for `config`) and every
//! minimised crash in `fuzz/regressions/<target>/` goes through
//! the same `tollgate::fuzzing` function the cargo-fuzz target calls (docs/security.md,
//! "Fuzzing"), so a fixed crash stays fixed and the targets' assertions hold on the seeds
//! without nightly flags or libFuzzer.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8]), extra: &[&str]) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fuzz = |d: &str| root.join("fuzz").join(d).join(target);
    let dirs = [fuzz("seeds"), fuzz("regressions")]
        .into_iter()
        .chain(extra.iter().map(|d| root.join(d)));
    let mut n = 0;
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut files: Vec<_> = entries.map(|e| e.expect("dir entry").path()).collect();
        files.sort();
        for f in files {
            let data = std::fs::read(&f).expect("readable input");
            let outcome = std::panic::catch_unwind(|| run(&data));
            assert!(outcome.is_ok(), "{target}: {} fails", f.display());
            n += 1;
        }
    }
    assert!(n > 0, "no inputs for {target}");
}

#[test]
fn config_inputs() {
    replay(
        "config",
        tollgate::fuzzing::config,
        &["conf", "tests/fixtures/invalid"],
    );
}

#[test]
fn normalize_path_inputs() {
    replay("normalize_path", tollgate::fuzzing::normalize_path, &[]);
}

#[test]
fn request_inputs() {
    replay("request", tollgate::fuzzing::request, &[]);
}

#[test]
fn framing_inputs() {
    // The request seeds are raw request streams too.
    replay("request", tollgate::fuzzing::framing, &[]);
}
