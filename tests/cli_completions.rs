//! `chvkit completions SHELL` and the man pages (`make man`: `examples/man.rs`, which calls
//! `chvkit::cli::write_man_pages`): the scripts parse in their shells and complete real
//! commands and flags (bash is driven through its completion function), and the man pages
//! render with `man -l`.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::text;

fn chvkit(args: &[&str]) -> Output {
    Command::new(common::chvkit())
        .args(args)
        .output()
        .expect("run chvkit")
}

/// The completion script for `shell`, written to `dir`.
fn script(dir: &Path, shell: &str) -> std::path::PathBuf {
    let out = chvkit(&["completions", shell]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!out.stdout.is_empty(), "empty {shell} script");
    let path = dir.join(format!("chvkit.{shell}"));
    std::fs::write(&path, &out.stdout).unwrap();
    path
}

/// What bash's completion function offers for `line` (the cursor at its end).
fn bash_complete(script: &Path, line: &str) -> Vec<String> {
    let words: Vec<&str> = line.split(' ').collect();
    let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    let prog = format!(
        "source '{}'; COMP_WORDS=({}); COMP_CWORD={}; COMP_LINE='{line}'; COMP_POINT={}; \
         _chvkit chvkit '{}' '{}'; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        script.display(),
        quoted.join(" "),
        words.len() - 1,
        line.len(),
        words[words.len() - 1],
        words.get(words.len().wrapping_sub(2)).unwrap_or(&""),
    );
    let out = Command::new("bash")
        .args(["--norc", "-c", &prog])
        .output()
        .unwrap();
    assert!(out.status.success(), "{prog}\n{}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn bash_script_parses_and_completes() {
    if !common::require(
        "cli_completions::bash_script_parses_and_completes",
        false,
        &["bash"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = script(dir.path(), "bash");
    let out = Command::new("bash").arg("-n").arg(&s).output().unwrap();
    assert!(out.status.success(), "bash -n: {}", text(&out));

    let commands = bash_complete(&s, "chvkit ");
    for c in ["doctor", "setup", "launch", "vm", "gc", "completions"] {
        assert!(commands.iter().any(|w| w == c), "{c} in {commands:?}");
    }
    // Arguments are built for completion even though they are deferred at run time.
    let flags = bash_complete(&s, "chvkit doctor --");
    for f in ["--format", "--json", "--textfile", "--only", "--profile"] {
        assert!(flags.iter().any(|w| w == f), "{f} in {flags:?}");
    }
    let formats = bash_complete(&s, "chvkit doctor --format ");
    assert_eq!(formats, ["text", "json", "prometheus"]);
    let vm = bash_complete(&s, "chvkit vm ");
    assert!(vm.iter().any(|w| w == "snapshot"), "{vm:?}");
}

#[test]
fn zsh_script_parses() {
    let test = "cli_completions::zsh_script_parses";
    if !common::require(test, false, &["zsh"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = script(dir.path(), "zsh");
    let out = Command::new("zsh").arg("-n").arg(&s).output().unwrap();
    assert!(out.status.success(), "zsh -n: {}", text(&out));
    let body = std::fs::read_to_string(&s).unwrap();
    assert!(body.starts_with("#compdef chvkit"), "{body}");
}

#[test]
fn fish_script_parses() {
    let test = "cli_completions::fish_script_parses";
    if !common::require(test, false, &["fish"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = script(dir.path(), "fish");
    let out = Command::new("fish")
        .arg("--no-execute")
        .arg(&s)
        .output()
        .unwrap();
    assert!(out.status.success(), "fish --no-execute: {}", text(&out));
    let body = std::fs::read_to_string(&s).unwrap();
    assert!(
        body.contains("prometheus") && body.contains("textfile"),
        "{body}"
    );
}

#[test]
fn generators_need_no_profile_and_reject_unknown_shells() {
    // A broken CHVKIT_PROFILE must not break shell start-up (completion scripts are often
    // generated from a shell's rc file).
    let out = Command::new(common::chvkit())
        .args(["completions", "bash"])
        .env("CHVKIT_PROFILE", "/nonexistent/profile.yaml")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let out = chvkit(&["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("tcsh"),
        "{}",
        text(&out)
    );
    let help = chvkit(&["--help"]);
    assert!(
        String::from_utf8_lossy(&help.stdout).contains("completions"),
        "{}",
        text(&help)
    );
}

#[test]
fn man_pages_render() {
    let test = "cli_completions::man_pages_render";
    if !common::require(test, false, &["man"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("target/man");
    let written = chvkit::cli::write_man_pages(&out_dir).expect("write the man pages");
    let mut names: Vec<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for want in [
        "chvkit.1",
        "chvkit-doctor.1",
        "chvkit-completions.1",
        "chvkit-vm-stop.1",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
    }
    // One page per command, nothing else (no temp files), and it says what it wrote.
    assert!(names.iter().all(|n| n.ends_with(".1")), "{names:?}");
    assert_eq!(written.len(), names.len());

    for (page, needles) in [
        ("chvkit.1", &["chvkit", "doctor", "--profile"][..]),
        (
            "chvkit-doctor.1",
            &["--textfile", "prometheus", "--only"][..],
        ),
    ] {
        let out = Command::new("man")
            .args(["-P", "cat", "-l"])
            .arg(out_dir.join(page))
            .env("MANWIDTH", "100")
            // ASCII output: no typographic hyphens or minus signs in the way of the needles.
            .env("LC_ALL", "C")
            .output()
            .unwrap();
        assert!(out.status.success(), "man -l {page}: {}", text(&out));
        let shown = String::from_utf8_lossy(&out.stdout);
        for n in needles {
            assert!(shown.contains(n), "{page} lacks {n}:\n{shown}");
        }
    }
}
