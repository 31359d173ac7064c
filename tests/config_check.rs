//! `tollgate -t`: every shipped configuration validates, and every broken fixture exits 64
//! with the messages its `# expect:` lines name.

mod common;

use std::path::Path;

fn yaml_files(dir: &str) -> Vec<std::path::PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut files: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_shipped_config_is_valid() {
    let files = yaml_files("conf");
    assert!(
        files.len() >= 2,
        "conf/ should ship the demo and an example"
    );
    for f in files {
        let (code, out, err) = common::check_config(&f);
        assert_eq!(code, 0, "{} failed validation:\n{err}", f.display());
        assert!(out.contains("configuration OK"), "{out}");
    }
}

#[test]
fn every_broken_fixture_exits_64_with_its_located_message() {
    let files = yaml_files("tests/fixtures/invalid");
    assert!(files.len() >= 30);
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let expected: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# expect: "))
            .collect();
        assert!(
            !expected.is_empty(),
            "{} has no # expect: line",
            f.display()
        );
        let (code, _, err) = common::check_config(&f);
        assert_eq!(code, 64, "{} should fail with 64:\n{err}", f.display());
        for e in expected {
            assert!(
                err.contains(e),
                "{}: expected {e:?} in:\n{err}",
                f.display()
            );
        }
        // Every message names the file it is about.
        assert!(
            err.lines()
                .next()
                .unwrap()
                .starts_with(&f.display().to_string()),
            "{err}"
        );
    }
}

#[test]
fn missing_file_is_a_clear_error() {
    let (code, _, err) = common::check_config(Path::new("/nonexistent/tollgate.yaml"));
    assert_eq!(code, 64);
    assert!(
        err.contains("/nonexistent/tollgate.yaml: cannot read the file"),
        "{err}"
    );
}

#[test]
fn help_lists_every_flag_and_the_demo() {
    let out = std::process::Command::new(common::binary())
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--conf",
        "--test",
        "--upgrade",
        "--daemon",
        "demo",
        "--version",
        "SIGTERM",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
    }
}
