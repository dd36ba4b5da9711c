//! `chvkit doctor` on this machine's own KVM and CPU (read-only: it opens /dev/kvm and creates
//! and destroys an empty VM), plus the output contract: exit codes, JSON schema, `-q`,
//! `NO_COLOR`.

mod common;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;

use serde_json::Value;

fn doctor_json(only: &[&str]) -> (Value, String, Option<i32>) {
    let mut c = Command::new(common::chvkit());
    c.args(["doctor", "--json"]);
    for o in only {
        c.args(["--only", o]);
    }
    let out = c.output().unwrap();
    let raw = common::text(&out);
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}:\n{raw}"));
    (v, raw, out.status.code())
}

fn check<'a>(v: &'a Value, id: &str) -> &'a Value {
    v["checks"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["id"] == id))
        .unwrap_or_else(|| panic!("no {id}"))
}

/// KVM_GET_API_VERSION then KVM_CREATE_VM, done here independently of chvkit.
fn probe_kvm() -> Option<bool> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .ok()?;
    let api = unsafe { libc::ioctl(f.as_raw_fd(), 0xAE00, 0) };
    if api != 12 {
        return Some(false);
    }
    let vm = unsafe { libc::ioctl(f.as_raw_fd(), 0xAE01, 0) };
    if vm < 0 {
        return Some(false);
    }
    drop(unsafe { OwnedFd::from_raw_fd(vm) });
    Some(true)
}

#[test]
fn kvm_and_cpu_reported_truthfully() {
    let (v, raw, _) = doctor_json(&["kvm", "cpu"]);
    let have_dev = std::path::Path::new("/dev/kvm").exists();
    assert_eq!(
        check(&v, "kvm.device")["level"] == "PASS",
        have_dev,
        "{raw}"
    );
    match probe_kvm() {
        Some(ok) => assert_eq!(check(&v, "kvm.usable")["level"] == "PASS", ok, "{raw}"),
        None => assert_ne!(check(&v, "kvm.usable")["level"], "PASS", "{raw}"),
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .unwrap_or("");
    let hw = flags.split_whitespace().any(|f| f == "vmx" || f == "svm");
    let cv = check(&v, "cpu.virtualization");
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        // This project's machines: PVM is a WARN that says what does and does not work.
        assert_eq!(cv["level"], "WARN", "{raw}");
        let text = format!("{} {}", cv["summary"], cv["detail"]);
        assert!(text.contains("PVM") && text.contains("snapshot"), "{text}");
        assert!(text.contains("GetNestedState"), "{text}");
    } else {
        common::skip(
            "doctor_host::kvm_and_cpu_reported_truthfully",
            "not a PVM host: PVM branch not exercised",
        );
        assert_eq!(cv["level"] == "PASS", hw, "{raw}");
    }
    assert!(cv["hint"].is_string() || cv["level"] == "PASS");
}

#[test]
fn json_contract_and_exit_codes() {
    let (v, raw, code) = doctor_json(&["kvm", "cpu", "tools"]);
    assert_eq!(v["schema"], 1, "{raw}");
    assert!(v["profile"].as_str().unwrap_or("").contains("default.yaml"));
    let checks = v["checks"].as_array().unwrap();
    let mut fails = 0;
    for c in checks {
        for k in ["id", "level", "summary", "detail", "hint"] {
            assert!(c.get(k).is_some(), "{k} missing in {c}");
        }
        let level = c["level"].as_str().unwrap();
        assert!(["PASS", "WARN", "FAIL", "SKIP"].contains(&level));
        if level != "PASS" {
            assert!(
                !c["hint"].as_str().unwrap_or("").is_empty(),
                "non-PASS without hint: {c}"
            );
        }
        fails += usize::from(level == "FAIL");
    }
    assert_eq!(v["summary"]["fail"], fails, "{raw}");
    assert_eq!(code, Some(if fails > 0 { 1 } else { 0 }), "{raw}");
}

#[test]
fn missing_bridge_exits_1() {
    if !common::require("doctor_host::missing_bridge_exits_1", true, &["ip"]) {
        return;
    }
    let ns = common::NetNs::new("dex");
    let out = ns.chvkit(&["doctor", "--only", "net.bridge"]);
    assert_eq!(out.status.code(), Some(1), "{}", common::text(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("FAIL") && text.contains("fix: ip link add chvbr0 type bridge"),
        "{text}"
    );
}

#[test]
fn human_output_quiet_and_no_colour() {
    let out = Command::new(common::chvkit())
        .args([
            "doctor", "--only", "kvm", "--only", "cpu", "--only", "tools",
        ])
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!text.contains('\x1b'), "{text}");
    assert!(text.starts_with("chvkit doctor: profile"), "{text}");
    assert!(
        text.contains("kvm.device") && text.contains("checks:"),
        "{text}"
    );
    // Ids are padded to one column.
    let cols: Vec<usize> = text
        .lines()
        .filter(|l| {
            ["PASS", "WARN", "FAIL", "SKIP"]
                .iter()
                .any(|p| l.starts_with(p))
        })
        .map(|l| {
            let rest = &l[6..];
            let id_end = rest.find(' ').unwrap_or(rest.len());
            let after = &rest[id_end..];
            6 + id_end + (after.len() - after.trim_start().len())
        })
        .collect();
    assert!(cols.windows(2).all(|w| w[0] == w[1]), "{text}");
    let q = Command::new(common::chvkit())
        .args(["doctor", "-q", "--only", "kvm.device"])
        .output()
        .unwrap();
    let qt = String::from_utf8_lossy(&q.stdout);
    if q.status.success() && !qt.contains("WARN") {
        assert!(!qt.contains("kvm.device"), "-q hides PASS: {qt}");
    }
}

#[test]
fn nat_not_wanted_passes() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("nonat.yaml");
    let text = include_str!("../profiles/default.yaml").replace("  nat: true\n", "  nat: false\n");
    std::fs::write(&p, text).unwrap();
    let out = Command::new(common::chvkit())
        .arg("--profile")
        .arg(&p)
        .args(["doctor", "--json", "--only", "net.nat"])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let c = &v["checks"][0];
    assert_eq!(c["level"], "PASS", "{}", common::text(&out));
    assert!(
        c["summary"].as_str().unwrap_or("").contains("not wanted"),
        "{c}"
    );
}
