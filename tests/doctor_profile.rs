//! Bad profiles stop `chvkit doctor` before it checks anything: exit 2, and a message that
//! names the file, the line and the offending value.

mod common;

use std::process::Command;

const DEFAULT: &str = include_str!("../profiles/default.yaml");

/// Run doctor with `text` as the profile; return (exit code, stderr, file path, line of `needle`).
fn run(text: &str, needle: &str) -> (Option<i32>, String, String, usize) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(common::chvkit())
        .arg("--profile")
        .arg(&path)
        .args(["doctor", "--json"])
        .output()
        .unwrap();
    let line = text
        .lines()
        .position(|l| l.contains(needle))
        .map(|n| n + 1)
        .unwrap_or(0);
    assert!(
        out.stdout.is_empty(),
        "nothing checked: {}",
        common::text(&out)
    );
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        path.display().to_string(),
        line,
    )
}

fn assert_names(text: &str, needle: &str, value: &str) {
    let (code, err, file, line) = run(text, needle);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains(&file), "file missing: {err}");
    assert!(
        err.contains(&format!(":{line}:")),
        "line {line} missing: {err}"
    );
    assert!(err.contains(value), "value `{value}` missing: {err}");
}

#[test]
fn syntax_error() {
    let text = DEFAULT.replace("  nat: true\n", "  nat: [true\n");
    let (code, err, file, _) = run(&text, "nat: [true");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains(&file), "{err}");
    // The parser reports where it noticed the problem: a line number is present.
    assert!(
        err.split(&file).nth(1).is_some_and(|r| r.starts_with(':')),
        "{err}"
    );
}

#[test]
fn unknown_key() {
    let text = DEFAULT.replace("  nat: true\n", "  nat: true\n  masquerade: yes\n");
    assert_names(&text, "masquerade: yes", "masquerade");
}

#[test]
fn invalid_prefix() {
    let text = DEFAULT.replace("prefix: fdcd::/16", "prefix: fdcd::/200");
    assert_names(&text, "fdcd::/200", "fdcd::/200");
}

#[test]
fn bridge_name_over_15_bytes() {
    let text = DEFAULT.replace("bridge: chvbr0", "bridge: chvbr0-much-too-long");
    assert_names(&text, "chvbr0-much-too-long", "chvbr0-much-too-long");
}

#[test]
fn unknown_only_prefix_is_a_usage_error() {
    let out = Command::new(common::chvkit())
        .args(["doctor", "--only", "nosuchcheck"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", common::text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("net.bridge"));
}
