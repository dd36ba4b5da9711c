//! `chvkit doctor`'s network checks against real kernel state: each test builds the seed's
//! network in a namespace of its own (bridge, sysctls, address, forwarding, ip6tables-nft NAT
//! and FORWARD rules), attaches a TAP held open like a running VMM holds it, breaks one thing,
//! and checks that exactly the matching check reports it and that its hint, run in the
//! namespace, makes it pass again.

mod common;
#[path = "setup_support/seed_net.rs"]
mod seed_net;

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::Path;

use chvkit::launch::rundir::{JobLock, STATE_SCHEMA};
use common::NetNs;
use seed_net::SEED_SETUP;
use serde_json::Value;

const TOOLS: &[&str] = &["ip", "ip6tables", "nft", "sysctl"];

struct Doctor {
    levels: BTreeMap<String, String>,
    checks: Vec<Value>,
    raw: String,
    code: Option<i32>,
}

impl Doctor {
    fn level(&self, id: &str) -> &str {
        self.levels.get(id).map(String::as_str).unwrap_or("MISSING")
    }
    fn check(&self, id: &str) -> &Value {
        self.checks
            .iter()
            .find(|c| c["id"] == id)
            .unwrap_or_else(|| panic!("no check {id} in\n{}", self.raw))
    }
    fn hint(&self, id: &str) -> String {
        self.check(id)["hint"]
            .as_str()
            .unwrap_or_else(|| panic!("{id} has no hint:\n{}", self.raw))
            .to_string()
    }
    /// Ids that are WARN or FAIL.
    fn bad(&self) -> Vec<&str> {
        self.levels
            .iter()
            .filter(|(_, l)| *l == "WARN" || *l == "FAIL")
            .map(|(id, _)| id.as_str())
            .collect()
    }
}

fn doctor(ns: &NetNs, extra: &[&str]) -> Doctor {
    let mut args = extra.to_vec();
    args.extend(["doctor", "--json", "--only", "net"]);
    let out = ns.chvkit(&args);
    let raw = String::from_utf8_lossy(&out.stdout).into_owned();
    let v: Value = serde_json::from_str(&raw)
        .unwrap_or_else(|e| panic!("doctor --json is not JSON ({e}):\n{}", common::text(&out)));
    assert_eq!(v["schema"], 1);
    let checks = v["checks"].as_array().expect("checks").clone();
    let levels = checks
        .iter()
        .map(|c| {
            (
                c["id"].as_str().unwrap_or_default().to_string(),
                c["level"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let d = Doctor {
        levels,
        checks,
        raw: format!("{raw}\n{}", String::from_utf8_lossy(&out.stderr)),
        code: out.status.code(),
    };
    let want = if d.levels.values().any(|l| l == "FAIL") {
        1
    } else {
        0
    };
    assert_eq!(d.code, Some(want), "exit code vs findings:\n{}", d.raw);
    d
}

/// The seed's network plus a held TAP `chv-t0` on the bridge. The seed's commands leave the host
/// reachable from the bridge: that WARN is asserted here, and its hint applied, so that every
/// other test starts from "all net.* PASS".
fn seeded(tag: &str) -> Option<(NetNs, OwnedFd)> {
    let test = format!("doctor_net::{tag}");
    if !common::require(&test, true, TOOLS) {
        return None;
    }
    let ns = NetNs::new(tag);
    ns.sh_ok(SEED_SETUP);
    ns.sh_ok("ip tuntap add chv-t0 mode tap && ip link set chv-t0 master chvbr0 && ip link set chv-t0 up");
    let tap = seed_net::hold_tap(&ns.name, "chv-t0").expect("hold TAP chv-t0");
    let d = doctor(&ns, &[]);
    assert_eq!(
        d.bad(),
        vec!["net.host_exposure"],
        "after the seed's setup only host exposure is reported:\n{}",
        d.raw
    );
    assert_eq!(d.level("net.host_exposure"), "WARN");
    ns.sh_ok(&d.hint("net.host_exposure"));
    let d = doctor(&ns, &[]);
    assert!(
        d.bad().is_empty(),
        "all net.* PASS after the hint:\n{}",
        d.raw
    );
    for (id, level) in &d.levels {
        assert_eq!(level, "PASS", "{id}:\n{}", d.raw);
    }
    Some((ns, tap))
}

/// Break one thing, expect exactly `id` at `level` (other checks PASS, or SKIP when listed in
/// `skipped`), run the hint, expect all PASS.
fn break_and_fix(
    ns: &NetNs,
    breaker: &str,
    id: &str,
    level: &str,
    skipped: &[&str],
    extra: &[&str],
) {
    ns.sh_ok(breaker);
    let d = doctor(ns, extra);
    assert_eq!(d.level(id), level, "after `{breaker}`:\n{}", d.raw);
    assert_eq!(
        d.bad(),
        vec![id],
        "only {id} is reported after `{breaker}`:\n{}",
        d.raw
    );
    for (other, l) in &d.levels {
        if other != id && l != "PASS" {
            assert!(
                skipped.contains(&other.as_str()) && l == "SKIP",
                "{other} is {l} after `{breaker}`:\n{}",
                d.raw
            );
        }
    }
    let hint = d.hint(id);
    ns.sh_ok(&hint);
    let d = doctor(ns, extra);
    assert!(
        d.levels.values().all(|l| l == "PASS"),
        "hint `{hint}` did not make everything PASS:\n{}",
        d.raw
    );
}

#[test]
fn seed_setup_passes() {
    let Some((ns, _tap)) = seeded("dpass") else {
        return;
    };
    // The TAP is seen as held: its queue is attached.
    let d = doctor(&ns, &[]);
    let taps = d.check("net.taps");
    assert!(
        taps["summary"].as_str().unwrap_or("").contains("1 TAP"),
        "{}",
        d.raw
    );
    // ip6tables-nft's NAT rule is recognised as such.
    assert!(d.check("net.nat")["summary"]
        .as_str()
        .unwrap_or("")
        .contains("ip6tables-nft"));
    // Human output of the same run: aligned, no colour without a TTY, -q shows nothing to fix.
    let out = ns.chvkit(&["doctor", "--only", "net", "-q"]);
    assert!(out.status.success(), "{}", common::text(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("PASS") && !text.contains('\x1b'), "{text}");
}

#[test]
fn dad_back_on() {
    seeded_break(
        "ddad",
        "sysctl -qw net.ipv6.conf.chvbr0.accept_dad=1",
        "net.dad",
        "WARN",
    );
}

#[test]
fn address_removed() {
    seeded_break(
        "daddr",
        "ip -6 addr del fdcd::1/16 dev chvbr0",
        "net.bridge_addr",
        "FAIL",
    );
}

/// [`seeded`], then [`break_and_fix`] with nothing skipped and no extra arguments.
fn seeded_break(tag: &str, breaker: &str, id: &str, level: &str) -> Option<(NetNs, OwnedFd)> {
    let seeded = seeded(tag)?;
    break_and_fix(&seeded.0, breaker, id, level, &[], &[]);
    Some(seeded)
}

/// Apply the hint of every WARN/FAIL check, up to three rounds, and expect none left.
fn converge(ns: &NetNs) {
    for _ in 0..3 {
        let d = doctor(ns, &[]);
        if d.bad().is_empty() {
            return;
        }
        for id in d.bad() {
            ns.sh_ok(&d.hint(id));
        }
    }
    let d = doctor(ns, &[]);
    assert!(d.bad().is_empty(), "hints did not converge:\n{}", d.raw);
}

#[test]
fn tentative_address() {
    let Some((ns, _tap)) = seeded("dtent") else {
        return;
    };
    // The facts §3 situation: DAD on, the bridge without carrier (its only port a TAP nobody
    // holds), and the address re-added without `nodad`: it stays tentative.
    ns.sh_ok(
        "ip link set chv-t0 nomaster && ip tuntap add chv-t1 mode tap && ip link set chv-t1 master chvbr0 up",
    );
    ns.sh_ok(
        "sysctl -qw net.ipv6.conf.chvbr0.accept_dad=1 net.ipv6.conf.chvbr0.dad_transmits=1 && ip -6 addr del fdcd::1/16 dev chvbr0 && ip -6 addr add fdcd::1/16 dev chvbr0",
    );
    let d = doctor(&ns, &[]);
    assert_eq!(d.level("net.bridge_addr"), "FAIL", "{}", d.raw);
    let summary = d.check("net.bridge_addr")["summary"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(summary.contains("tentative"), "{}", d.raw);
    // DAD is the cause and the address is unusable: a FAIL, not a WARN.
    assert_eq!(d.level("net.dad"), "FAIL", "{}", d.raw);
    converge(&ns);
    let d = doctor(&ns, &[]);
    assert!(!d.check("net.bridge_addr")["summary"]
        .as_str()
        .unwrap_or("")
        .contains("tentative"));
}

#[test]
fn ipv6_disabled_on_bridge() {
    seeded_break(
        "dv6",
        "sysctl -qw net.ipv6.conf.chvbr0.disable_ipv6=1",
        "net.bridge_addr",
        "FAIL",
    );
}

#[test]
fn bridge_down() {
    let Some((ns, _tap)) = seeded("ddown") else {
        return;
    };
    // Down drops fdcd::1 as well: the address check defers to net.bridge_up, whose hint re-adds it.
    break_and_fix(
        &ns,
        "ip link set chvbr0 down",
        "net.bridge_up",
        "FAIL",
        &["net.bridge_addr"],
        &[],
    );
}

#[test]
fn forwarding_off() {
    seeded_break(
        "dfwd",
        "echo 0 > /proc/sys/net/ipv6/conf/all/forwarding",
        "net.forwarding",
        "FAIL",
    );
}

#[test]
fn nat_rule_deleted() {
    let breaker = "ip6tables -t nat -D POSTROUTING -s fdcd::/16 ! -o chvbr0 -j MASQUERADE";
    let Some((ns, _tap)) = seeded_break("dnat", breaker, "net.nat", "FAIL") else {
        return;
    };
    // The nft hint wrote chvkit's own table.
    ns.sh_ok("nft list table inet chvkit | grep -q masquerade");
}

#[test]
fn nat_rule_deleted_iptables_backend() {
    let Some((ns, _tap)) = seeded("dnati") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("iptables.yaml");
    let text = include_str!("../profiles/default.yaml")
        .replace("firewall: nftables", "firewall: iptables");
    std::fs::write(&profile, text).unwrap();
    let p = profile.to_str().unwrap();
    break_and_fix(
        &ns,
        "ip6tables -t nat -D POSTROUTING -s fdcd::/16 ! -o chvbr0 -j MASQUERADE",
        "net.nat",
        "FAIL",
        &[],
        &["--profile", p],
    );
    ns.sh_ok("ip6tables -t nat -C POSTROUTING -s fdcd::/16 ! -o chvbr0 -j MASQUERADE");
}

#[test]
fn forward_rule_deleted() {
    // FORWARD's policy is ACCEPT here, so nothing is dropped yet: a WARN, not a FAIL.
    seeded_break(
        "dfr",
        "ip6tables -D FORWARD -i chvbr0 -j ACCEPT",
        "net.forward_rules",
        "WARN",
    );
}

#[test]
fn forward_drop_policy_is_a_fail() {
    // Docker's shape: policy DROP, our accept rules gone.
    seeded_break(
        "dfdrop",
        "ip6tables -P FORWARD DROP && ip6tables -F FORWARD",
        "net.forward_rules",
        "FAIL",
    );
}

#[test]
fn br_netfilter_trap() {
    let Some((ns, _tap)) = seeded("dbrnf") else {
        return;
    };
    let brnf = ns.sh("cat /proc/sys/net/bridge/bridge-nf-call-ip6tables");
    if !brnf.status.success() {
        common::skip(
            "doctor_net::br_netfilter_trap",
            "br_netfilter is not loaded on this host",
        );
        return;
    }
    ns.sh_ok("sysctl -qw net.bridge.bridge-nf-call-ip6tables=1");
    // An accept for replies only, so the bridged (guest-to-guest) path is what is dropped.
    ns.sh_ok("ip6tables -P FORWARD DROP && ip6tables -D FORWARD -i chvbr0 -j ACCEPT");
    let d = doctor(&ns, &[]);
    assert_eq!(d.level("net.forward_rules"), "FAIL", "{}", d.raw);
    let detail = d.check("net.forward_rules")["detail"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(
        detail.contains("br_netfilter") && detail.contains("guest→guest"),
        "{detail}"
    );
    ns.sh_ok(&d.hint("net.forward_rules"));
    let d = doctor(&ns, &[]);
    assert!(d.bad().is_empty(), "{}", d.raw);
}

#[test]
fn tap_detached() {
    seeded_break("dtapd", "ip link set chv-t0 nomaster", "net.taps", "FAIL");
}

#[test]
fn tap_down() {
    seeded_break("dtapu", "ip link set chv-t0 down", "net.taps", "FAIL");
}

#[test]
fn tap_ready_but_not_held_passes_with_its_name() {
    // The seed's own setup pre-creates its TAP, attaches it and brings it up before the VMM
    // opens it (chvkit's launch does the same): no carrier yet, but ready, not left behind.
    let Some((ns, _tap)) = seeded("dtapr") else {
        return;
    };
    ns.sh_ok(
        "ip tuntap add chv-t1 mode tap && ip link set chv-t1 master chvbr0 && ip link set chv-t1 up",
    );
    let d = doctor(&ns, &[]);
    assert!(d.bad().is_empty(), "{}", d.raw);
    let summary = d.check("net.taps")["summary"].as_str().unwrap_or("");
    assert!(
        summary.contains("chv-t1") && summary.contains("ready") && summary.contains("1 TAP"),
        "{}",
        d.raw
    );
    // Once a VMM holds it, it is in service like chv-t0.
    let _t1 = seed_net::hold_tap(&ns.name, "chv-t1").expect("hold TAP chv-t1");
    let d = doctor(&ns, &[]);
    let summary = d.check("net.taps")["summary"].as_str().unwrap_or("");
    assert!(
        d.bad().is_empty() && summary.contains("2 TAP") && !summary.contains("ready"),
        "{}",
        d.raw
    );
}

#[test]
fn tap_detached_without_process_warns() {
    // Created, never attached (and down): a VM started on it would have no network. The hint
    // attaches it, which makes it ready.
    seeded_break("dtapx", "ip tuntap add chv-t1 mode tap", "net.taps", "WARN");
}

#[test]
fn tap_down_without_process_warns() {
    seeded_break(
        "dtapw",
        "ip tuntap add chv-t1 mode tap && ip link set chv-t1 master chvbr0",
        "net.taps",
        "WARN",
    );
}

/// A run dir under `run` whose state names `tap`: what launch writes before it creates the TAP.
fn job_state(run: &Path, job: &str, tap: &str) {
    let dir = run.join(job);
    std::fs::create_dir_all(&dir).unwrap();
    let state = serde_json::json!({ "schema": STATE_SCHEMA, "job_id": job, "tap": tap });
    std::fs::write(dir.join("state.json"), state.to_string()).unwrap();
}

#[test]
fn tap_of_a_gone_job_is_left_behind() {
    let Some((ns, _tap)) = seeded("dtapg") else {
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let run = root.path().join("run/chvkit");
    let r = root.path().to_str().unwrap();
    // job-live: a launch between attaching its TAP and starting the VMM (its lock is held).
    // job-dead: a launch killed after it attached its TAP (its lock file is there, unheld).
    job_state(&run, "job-live", "chv-t1");
    let live = JobLock::try_acquire(&run.join("job-live.lock"))
        .unwrap()
        .expect("lock job-live");
    job_state(&run, "job-dead", "chv-t2");
    std::fs::write(run.join("job-dead.lock"), "").unwrap();
    for t in ["chv-t1", "chv-t2"] {
        ns.sh_ok(&format!(
            "ip tuntap add {t} mode tap && ip link set {t} master chvbr0 && ip link set {t} up"
        ));
    }
    // Only the dead job's TAP is reported; its hint removes it and leaves the live job's alone.
    break_and_fix(&ns, "true", "net.taps", "WARN", &[], &["--root", r]);
    assert!(
        !ns.sh("ip link show chv-t2").status.success(),
        "chv-t2 deleted"
    );
    let d = doctor(&ns, &["--root", r]);
    let summary = d.check("net.taps")["summary"].as_str().unwrap_or("");
    assert!(
        summary.contains("chv-t1") && summary.contains("ready"),
        "{}",
        d.raw
    );
    // The live job's supervisor dies: now its TAP is left behind too.
    drop(live);
    let d = doctor(&ns, &["--root", r]);
    assert_eq!(d.level("net.taps"), "WARN", "{}", d.raw);
    let summary = d.check("net.taps")["summary"].as_str().unwrap_or("");
    assert!(summary.contains("job-live"), "{}", d.raw);
    assert_eq!(d.hint("net.taps"), "ip link del chv-t1");
    // A dead job whose VMM still holds the TAP: only gc, which stops that VMM, fixes it.
    job_state(&run, "job-orph", "chv-t0");
    let d = doctor(&ns, &["--root", r]);
    let summary = d.check("net.taps")["summary"].as_str().unwrap_or("");
    assert!(
        summary.contains("job-orph") && summary.contains("still holds"),
        "{}",
        d.raw
    );
    assert_eq!(d.hint("net.taps"), "chvkit gc");
}

#[test]
fn slaac_uplink_accept_ra() {
    // An uplink whose default route came from a router advertisement (proto ra), accept_ra=1,
    // while forwarding is on: the kernel ignores its RAs from now on.
    seeded_break("dra", "ip link add up0 type veth peer name up1 && ip link set up1 up && ip link set up0 up && sysctl -qw net.ipv6.conf.up0.accept_ra=1 && ip -6 route add default via fe80::1 dev up0 proto ra", "net.accept_ra", "WARN");
}

#[test]
fn no_bridge_skips_dependents_with_working_hints() {
    let test = "doctor_net::no_bridge_skips_dependents_with_working_hints";
    if !common::require(test, true, TOOLS) {
        return;
    }
    let ns = NetNs::new("dnob");
    let d = doctor(&ns, &[]);
    assert_eq!(d.level("net.bridge"), "FAIL", "{}", d.raw);
    for id in ["net.bridge_up", "net.bridge_addr", "net.dad", "net.taps"] {
        assert_eq!(d.level(id), "SKIP", "{id}:\n{}", d.raw);
    }
    // The bridge hint alone brings bridge, up, address and DAD to PASS.
    ns.sh_ok(&d.hint("net.bridge"));
    let d = doctor(&ns, &[]);
    for id in [
        "net.bridge",
        "net.bridge_up",
        "net.bridge_addr",
        "net.dad",
        "net.taps",
    ] {
        assert_eq!(d.level(id), "PASS", "{id}:\n{}", d.raw);
    }
    // Then the remaining hints converge the namespace.
    converge(&ns);
}

#[test]
fn nft_command_fallback_sees_the_same() {
    let Some((ns, _tap)) = seeded("dfb") else {
        return;
    };
    // Without libnftables, the ruleset comes from `nft -j` (and `nft -a` for xt text).
    let doctor_nft_cmd = |only: &str| {
        let out = ns
            .cmd(common::chvkit())
            .args(["doctor", "--json", "--only", only])
            .env("CHVKIT_LIBNFTABLES", "/nonexistent/libnftables.so.1")
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        (v, common::text(&out))
    };
    let (v, text) = doctor_nft_cmd("net");
    for c in v["checks"].as_array().unwrap() {
        assert_eq!(c["level"], "PASS", "{c}\n{text}");
    }
    ns.sh_ok("ip6tables -D FORWARD -o chvbr0 -m state --state RELATED,ESTABLISHED -j ACCEPT");
    let (v, text) = doctor_nft_cmd("net.forward_rules");
    assert_eq!(v["checks"][0]["level"], "WARN", "{text}");
}
