//! Artifact installs from a real HTTP server (a thread of this test, listening on 127.0.0.1
//! inside a namespace of the test's own): pins, the lock file, retries, and every way a
//! download can go wrong leaving the installed file exactly as it was.

mod common;
mod setup_support;

use std::os::unix::fs::PermissionsExt;
use std::process::Output;

use common::{require, text, NetNs};
use setup_support::*;

const FW_PATH: &str = "/opt/cloud-hypervisor/hypervisor-fw";
const CHV_PATH: &str = "/usr/local/bin/cloud-hypervisor";

struct Case {
    ns: NetNs,
    env: Env,
    srv: HttpServer,
    chv: Vec<u8>,
    fw1: Vec<u8>,
}

/// `setup --artifacts-only` from `srv`.
fn setup_from(ns: &NetNs, env: &Env, srv: &HttpServer) -> Output {
    chvkit(
        ns,
        env,
        &["setup", "--artifacts-only", "--artifacts-from", &srv.url()],
    )
}

/// For test `test` (`None` when it cannot run here): install firmware v1 (pinned) and the
/// binary (unpinned) once, successfully.
fn installed(test: &str, tag: &str) -> Option<Case> {
    if !require(test, true, &["ip"]) {
        return None;
    }
    let ns = NetNs::new(tag);
    let (env, srv, chv, fw1) = env_with_server(&ns, tag, 300 * 1024);
    let o = setup_from(&ns, &env, &srv);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(read(&env.at(FW_PATH)), fw1);
    Some(Case {
        ns,
        env,
        srv,
        chv,
        fw1,
    })
}

/// Pin firmware v2 in the profile and serve it (possibly broken); the run must fail, name the
/// hashes, and leave v1 installed with no temp file beside it.
fn upgrade_fails(c: &Case, fw2: &[u8], mode: Mode, srv: &HttpServer) -> String {
    c.env.set_profile(&profile_yaml(&sha256_hex(fw2), &[]));
    srv.put(FW, fw2);
    srv.set_mode(FW, mode);
    let o = setup_from(&c.ns, &c.env, srv);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let msg = text(&o);
    assert!(
        msg.contains(&sha256_hex(fw2)),
        "expected hash not named:\n{msg}"
    );
    assert!(msg.contains("left as it was"), "{msg}");
    assert_eq!(read(&c.env.at(FW_PATH)), c.fw1, "old firmware must stay");
    let dir = c.env.at("/opt/cloud-hypervisor");
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["hypervisor-fw"], "temp files left behind");
    msg
}

#[test]
fn wrong_byte_is_rejected_naming_both_hashes() {
    let Some(c) = installed("wrong_byte_is_rejected_naming_both_hashes", "awb") else {
        return;
    };
    let fw2 = random_bytes(300 * 1024);
    let before = c.srv.hits(FW);
    let msg = upgrade_fails(&c, &fw2, Mode::CorruptByte(1000), &c.srv);
    let mut bad = fw2.clone();
    bad[1000] ^= 0xff;
    assert!(
        msg.contains(&sha256_hex(&bad)),
        "actual hash not named:\n{msg}"
    );
    assert!(msg.contains("mismatch"), "{msg}");
    assert_eq!(c.srv.hits(FW) - before, 1, "a hash mismatch is not retried");
    // Served correctly, the same upgrade goes through.
    c.srv.set_mode(FW, Mode::Normal);
    let o = setup_from(&c.ns, &c.env, &c.srv);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(read(&c.env.at(FW_PATH)), fw2);
}

#[test]
fn short_body_is_retried_then_rejected() {
    let Some(c) = installed("short_body_is_retried_then_rejected", "ash") else {
        return;
    };
    let fw2 = random_bytes(300 * 1024);
    let before = c.srv.hits(FW);
    let msg = upgrade_fails(&c, &fw2, Mode::CutShort(100 * 1024), &c.srv);
    assert!(msg.contains("cut short"), "{msg}");
    assert!(
        msg.contains(&format!("{} of {}", 100 * 1024, 300 * 1024)),
        "{msg}"
    );
    assert!(
        msg.contains(&sha256_hex(&fw2[..100 * 1024])),
        "hash of what arrived not named:\n{msg}"
    );
    assert_eq!(c.srv.hits(FW) - before, 4, "bounded retries: 4 attempts");
}

#[test]
fn server_dying_midway_leaves_the_old_file() {
    let Some(c) = installed("server_dying_midway_leaves_the_old_file", "adie") else {
        return;
    };
    let fw2 = random_bytes(300 * 1024);
    let msg = upgrade_fails(&c, &fw2, Mode::DieAfter(50 * 1024), &c.srv);
    assert!(c.srv.is_dead());
    assert!(msg.contains("after 4 attempt(s)"), "{msg}");
    assert!(msg.contains(&sha256_hex(&fw2[..50 * 1024])), "{msg}");
}

#[test]
fn lock_file_records_the_unpinned_binary_and_guards_reinstalls() {
    let t = "lock_file_records_the_unpinned_binary_and_guards_reinstalls";
    let Some(c) = installed(t, "alock") else {
        return;
    };
    let lock_path = c.env.at("/var/lib/chvkit/artifacts.lock.json");
    let lock: serde_json::Value = serde_json::from_slice(&read(&lock_path)).unwrap();
    let entry = &lock["artifacts"]["cloud_hypervisor"];
    assert_eq!(entry["sha256"], sha256_hex(&c.chv));
    assert_eq!(entry["path"], CHV_PATH);
    assert!(entry["url"]
        .as_str()
        .unwrap()
        .ends_with("/v50.0/cloud-hypervisor-static"));
    assert!(
        lock["artifacts"].get("firmware").is_none(),
        "pinned artifacts need no lock entry"
    );
    let args = [
        "setup",
        "--artifacts-only",
        "--json",
        "--artifacts-from",
        &c.srv.url(),
    ];

    // Verified against the lock: nothing fetched.
    let hits = c.srv.hits(CHV);
    let o = chvkit(&c.ns, &c.env, &args);
    assert_eq!(json(&o)["changed"], 0, "{}", text(&o));
    assert_eq!(c.srv.hits(CHV), hits);

    // The installed binary was altered: fetched again and restored.
    let bin = c.env.at(CHV_PATH);
    std::fs::write(&bin, b"tampered").unwrap();
    let o = chvkit(&c.ns, &c.env, &args);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        results(&json(&o))[0],
        ("chv.binary".into(), "changed".into())
    );
    assert_eq!(c.srv.hits(CHV), hits + 1);
    assert_eq!(read(&bin), c.chv);
    assert_eq!(
        std::fs::metadata(&bin).unwrap().permissions().mode() & 0o777,
        0o755
    );

    // The mirror now offers different bytes for the same URL: the lock refuses them.
    std::fs::remove_file(&bin).unwrap();
    let other = fake_chv("someone else's build");
    c.srv.put(CHV, &other);
    let o = chvkit(&c.ns, &c.env, &args);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let msg = text(&o);
    assert!(
        msg.contains(&sha256_hex(&c.chv)) && msg.contains(&sha256_hex(&other)),
        "{msg}"
    );
    assert!(msg.contains("the lock file"), "{msg}");
    assert!(!bin.exists(), "nothing installed");
}

#[test]
fn setcap_is_applied_and_reapplied_after_reinstall() {
    let t = "setcap_is_applied_and_reapplied_after_reinstall";
    if !require(t, true, &["ip", "getcap"]) {
        return;
    }
    let ns = NetNs::new("acap");
    let setcap = [("setcap_net_admin: false", "setcap_net_admin: true")];
    let (env, _, mirror) = env_with_mirror("acap", 1024, &setcap);
    let args = [
        "setup",
        "--artifacts-only",
        "--json",
        "--artifacts-from",
        mirror.as_str(),
    ];
    let bin = env.at(CHV_PATH).display().to_string();
    let caps = || ns.sh_ok(&format!("getcap {bin}"));

    let o = chvkit(&ns, &env, &args);
    assert!(o.status.success(), "{}", text(&o));
    assert!(caps().contains("cap_net_admin=ep"), "{}", caps());
    let o = chvkit(&ns, &env, &args);
    assert_eq!(json(&o)["changed"], 0, "{}", text(&o));

    // A reinstall drops file capabilities; setup puts them back.
    std::fs::write(&bin, b"tampered").unwrap();
    let o = chvkit(&ns, &env, &args);
    assert!(o.status.success(), "{}", text(&o));
    let r = results(&json(&o));
    assert!(
        r.contains(&("chv.setcap".into(), "changed".into())),
        "{r:?}"
    );
    assert!(caps().contains("cap_net_admin=ep"), "{}", caps());
    // Removed by hand: only the capability is restored, nothing is fetched.
    ns.sh_ok(&format!("setcap -r {bin}"));
    let o = chvkit(&ns, &env, &args);
    assert_eq!(changed(&json(&o)), ["chv.setcap"], "{}", text(&o));
    assert!(caps().contains("cap_net_admin=ep"));
}
