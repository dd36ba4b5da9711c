//! `chvkit setup` / `teardown` against the real kernel, each test in network namespaces of its
//! own with a temporary `--root`: bridge, sysctls, nftables and ip6tables rules, persistence
//! files, a real HTTP server for the artifacts, and a stand-in guest behind the bridge.

mod common;
mod setup_support;

use std::collections::BTreeMap;
use std::net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use common::{require, text, NetNs};
use setup_support::*;

/// The foreign bridge's global addresses and flags (not its link-local, whose DAD finishes
/// on its own while the test runs).
const FOREIGN_BRIDGE: &str =
    "ip -6 -o addr show dev fbr0 scope global | cut -d' ' -f2-4; ip -o link show fbr0 | cut -d' ' -f2-3";

/// Every regular file and symlink under `dir` with its size and mtime: a run that "writes
/// nothing" leaves this identical.
fn tree(dir: &Path) -> BTreeMap<String, (u64, i64, i64)> {
    let mut m = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let md = std::fs::symlink_metadata(e.path()).unwrap();
            if md.is_dir() {
                stack.push(e.path());
            } else {
                m.insert(
                    e.path().display().to_string(),
                    (md.size(), md.mtime(), md.mtime_nsec()),
                );
            }
        }
    }
    m
}

fn doctor_levels(ns: &NetNs, env: &Env) -> BTreeMap<String, String> {
    let o = chvkit(ns, env, &["doctor", "--json"]);
    let v = json(&o);
    v["checks"]
        .as_array()
        .unwrap_or_else(|| panic!("doctor --json has no checks:\n{}", text(&o)))
        .iter()
        .map(|c| {
            (
                c["id"].as_str().unwrap().to_string(),
                c["level"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn assert_no_fail(levels: &BTreeMap<String, String>, prefixes: &[&str]) {
    let bad: Vec<_> = levels
        .iter()
        .filter(|(id, l)| prefixes.iter().any(|p| id.starts_with(p)) && l.as_str() == "FAIL")
        .collect();
    assert!(bad.is_empty(), "doctor FAILs after setup: {bad:?}");
    for p in prefixes {
        assert!(
            levels.keys().any(|k| k.starts_with(p)),
            "doctor reported no {p} checks: {levels:?}"
        );
    }
}

/// Run `cmd` in `ns` and assert that its output contains each of `needles`.
fn sh_shows(ns: &NetNs, cmd: &str, needles: &[&str]) {
    let out = ns.sh_ok(cmd);
    for n in needles {
        assert!(out.contains(n), "`{cmd}` does not show `{n}`:\n{out}");
    }
}

fn sysctl(ns: &NetNs, key: &str) -> String {
    ns.sh_ok(&format!("cat /proc/sys/{}", key.replace('.', "/")))
        .trim()
        .to_string()
}

#[test]
fn setup_converges_is_idempotent_and_teardown_removes_only_its_own() {
    let t = "setup_converges_is_idempotent_and_teardown_removes_only_its_own";
    if !require(t, true, &["ip", "nft"]) {
        return;
    }
    let ns = NetNs::new("conv");
    // An uplink that takes router advertisements, a foreign bridge and a foreign table.
    ns.sh_ok(
        "ip link add up0 type veth peer name up1 && ip link set up0 up && \
         echo 1 > /proc/sys/net/ipv6/conf/up0/accept_ra && \
         ip link add fbr0 type bridge && ip addr add fd00:aa::1/64 dev fbr0 nodad && ip link set fbr0 up && \
         nft add table ip6 foreign && \
         nft 'add chain ip6 foreign myfwd { type filter hook forward priority 0; policy accept; }' && \
         nft add rule ip6 foreign myfwd ip6 saddr 2001:db8::/32 counter accept && \
         nft 'add chain ip6 foreign pr { type nat hook postrouting priority 100; }' && \
         nft add rule ip6 foreign pr ip6 saddr 2001:db8:5::/48 masquerade",
    );
    let foreign_table = ns.sh_ok("nft list table ip6 foreign");
    let all_dad = sysctl(&ns, "net.ipv6.conf.all.accept_dad");
    let foreign_bridge = ns.sh_ok(FOREIGN_BRIDGE);
    let (env, srv, chv, fw) = env_with_server(&ns, "conv", 256 * 1024);

    let plan = chvkit(
        &ns,
        &env,
        &["setup", "--dry-run", "--artifacts-from", &srv.url()],
    );
    assert!(plan.status.success(), "{}", text(&plan));
    assert_eq!(srv.total_hits(), 0, "a dry run downloads nothing");
    assert!(
        ns.sh("ip link show chvbr0").status.code() != Some(0),
        "a dry run creates nothing"
    );

    let o = chvkit(
        &ns,
        &env,
        &["setup", "--json", "--artifacts-from", &srv.url()],
    );
    assert!(o.status.success(), "{}", text(&o));
    let v = json(&o);
    assert_eq!(v["ok"], true);
    let changed = v["changed"].as_u64().unwrap();
    assert!(
        changed >= 12,
        "fresh namespace: most items change\n{}",
        text(&o)
    );
    assert_eq!((srv.hits(CHV), srv.hits(FW)), (1, 1));

    // Artifacts: exact bytes, mode 0755, the unpinned one recorded in the lock file.
    let bin = env.at("/usr/local/bin/cloud-hypervisor");
    assert_eq!(read(&bin), chv);
    assert_eq!(read(&env.at("/opt/cloud-hypervisor/hypervisor-fw")), fw);
    assert_eq!(
        std::fs::metadata(&bin).unwrap().permissions().mode() & 0o777,
        0o755
    );
    let lock: serde_json::Value =
        serde_json::from_slice(&read(&env.at("/var/lib/chvkit/artifacts.lock.json"))).unwrap();
    assert_eq!(
        lock["artifacts"]["cloud_hypervisor"]["sha256"],
        sha256_hex(&chv)
    );
    let detail = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == "chv.binary")
        .unwrap()["detail"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        detail.contains("No sha256 pin") && detail.contains(&sha256_hex(&chv)),
        "{detail}"
    );

    // Doctor agrees for everything setup owns.
    assert_no_fail(
        &doctor_levels(&ns, &env),
        &["chv.", "firmware.file", "net."],
    );

    // The seed's own verification commands.
    let link = ns.sh_ok("ip link show chvbr0");
    assert!(link.contains("<") && link.contains(",UP"), "{link}");
    let addr = ns.sh_ok("ip -6 addr show chvbr0");
    assert!(addr.contains("inet6 fdcd::1/16"), "{addr}");
    assert!(
        !addr.contains("tentative") && !addr.contains("dadfailed"),
        "{addr}"
    );
    assert_eq!(sysctl(&ns, "net.ipv6.conf.all.forwarding"), "1");
    assert_eq!(sysctl(&ns, "net.ipv6.conf.chvbr0.accept_dad"), "0");
    assert_eq!(sysctl(&ns, "net.ipv6.conf.up0.accept_ra"), "2");
    sh_shows(
        &ns,
        "nft list chain inet chvkit postrouting",
        &["ip6 saddr fdcd::/16 oifname != \"chvbr0\" masquerade"],
    );
    sh_shows(
        &ns,
        "nft list chain inet chvkit forward",
        &[
            "iifname \"chvbr0\" accept",
            "oifname \"chvbr0\" ct state established,related accept",
        ],
    );

    // Persistence files, as written.
    let sysctl_d = String::from_utf8(read(&env.at("/etc/sysctl.d/60-chvkit.conf"))).unwrap();
    let body: Vec<&str> = sysctl_d.lines().filter(|l| !l.starts_with('#')).collect();
    let pos = |k: &str| {
        body.iter()
            .position(|l| l.starts_with(k))
            .unwrap_or(usize::MAX)
    };
    assert!(
        pos("net.ipv6.conf.chvbr0.accept_dad = 0") < body.len(),
        "{sysctl_d}"
    );
    assert!(
        pos("net.ipv6.conf.up0.accept_ra = 2") < pos("net.ipv6.conf.all.forwarding = 1"),
        "accept_ra=2 must come before forwarding:\n{sysctl_d}"
    );
    let unit =
        String::from_utf8(read(&env.at("/etc/systemd/system/chvkit-network.service"))).unwrap();
    assert!(
        unit.contains("setup --network-only") && unit.contains(&env.profile()),
        "{unit}"
    );
    let wants = env.at("/etc/systemd/system/multi-user.target.wants/chvkit-network.service");
    assert_eq!(
        std::fs::read_link(&wants).unwrap(),
        Path::new("/etc/systemd/system/chvkit-network.service")
    );
    // The nft file is a loadable script that replaces the table: loading it changes nothing.
    let ruleset = ns.sh_ok("nft list ruleset");
    ns.sh_ok(&format!(
        "nft -f {}",
        env.at("/etc/chvkit/chvkit.nft").display()
    ));
    assert_eq!(ns.sh_ok("nft list ruleset"), ruleset);

    // Second run: nothing changes, nothing is downloaded, nothing is written.
    let files = tree(&env.root());
    let o2 = chvkit(
        &ns,
        &env,
        &["setup", "--json", "--artifacts-from", &srv.url()],
    );
    assert!(o2.status.success(), "{}", text(&o2));
    let v2 = json(&o2);
    assert_eq!(v2["changed"], 0, "{}", text(&o2));
    assert!(
        results(&v2).iter().all(|(_, r)| r == "unchanged"),
        "{}",
        text(&o2)
    );
    assert_eq!((srv.hits(CHV), srv.hits(FW)), (1, 1), "no second download");
    assert_eq!(ns.sh_ok("nft list ruleset"), ruleset);
    assert_eq!(tree(&env.root()), files, "a converged setup writes nothing");
    let dry = chvkit(&ns, &env, &["setup", "--dry-run"]);
    assert!(
        common::text(&dry).contains("nothing to change"),
        "{}",
        text(&dry)
    );

    // Teardown: only chvkit's things go; the foreign table, bridge and sysctls stay.
    let td = chvkit(&ns, &env, &["teardown", "--json"]);
    assert!(td.status.success(), "{}", text(&td));
    assert!(
        json(&td)["changed"].as_u64().unwrap() >= 10,
        "{}",
        text(&td)
    );
    assert!(
        ns.sh("ip link show chvbr0").status.code() != Some(0),
        "bridge gone"
    );
    let tables = ns.sh_ok("nft list tables");
    assert!(!tables.contains("chvkit"), "{tables}");
    assert_eq!(ns.sh_ok("nft list table ip6 foreign"), foreign_table);
    assert_eq!(ns.sh_ok(FOREIGN_BRIDGE), foreign_bridge);
    assert_eq!(sysctl(&ns, "net.ipv6.conf.all.forwarding"), "0");
    assert_eq!(sysctl(&ns, "net.ipv6.conf.up0.accept_ra"), "1");
    assert_eq!(sysctl(&ns, "net.ipv6.conf.all.accept_dad"), all_dad);
    assert!(
        tree(&env.root()).is_empty(),
        "left behind: {:?}",
        tree(&env.root())
    );
    let levels = doctor_levels(&ns, &env);
    assert_eq!(
        levels.get("net.bridge").map(String::as_str),
        Some("FAIL"),
        "{levels:?}"
    );
    // A second teardown has nothing left to do.
    let td2 = chvkit(&ns, &env, &["teardown"]);
    assert!(
        td2.status.success() && text(&td2).contains("nothing recorded"),
        "{}",
        text(&td2)
    );
}

/// Listen on `addr` inside `ns`; the socket stays in that namespace after the thread is gone.
fn listen_in(ns: &str, addr: &str) -> TcpListener {
    let a: SocketAddr = addr.parse().unwrap();
    in_netns(ns, move || TcpListener::bind(a).expect("bind listener"))
}

fn connect_from(ns: &str, addr: &str) -> std::io::Result<TcpStream> {
    let a: SocketAddr = addr.parse().unwrap();
    in_netns(ns, move || {
        TcpStream::connect_timeout(&a, Duration::from_secs(3))
    })
}

#[test]
fn stand_in_guest_reaches_gateway_and_nat_but_only_allowed_host_ports() {
    let t = "stand_in_guest_reaches_gateway_and_nat_but_only_allowed_host_ports";
    if !require(t, true, &["ip", "nft", "busybox"]) {
        return;
    }
    let host = NetNs::new("gh");
    let guest = NetNs::new("gg");
    let out = NetNs::new("go");
    // host <-> outside: a routed link outside the guest prefix; `out` has no route back to it.
    host.sh_ok(&format!(
        "ip link add ho0 type veth peer name oo0 netns {} && \
         ip addr add 2001:db8:1::1/64 dev ho0 nodad && ip link set ho0 up",
        out.name
    ));
    out.sh_ok("ip addr add 2001:db8:1::2/64 dev oo0 nodad && ip link set oo0 up");
    let env = Env::new(&profile_yaml(&"0".repeat(64), &[]));
    let o = chvkit(&host, &env, &["setup", "--network-only"]);
    assert!(o.status.success(), "{}", text(&o));
    // The stand-in guest: a veth port on the bridge, fdcd::2 in its own namespace.
    host.sh_ok(&format!(
        "ip link add hg0 type veth peer name gg0 netns {} && \
         ip link set hg0 master chvbr0 && ip link set hg0 up",
        guest.name
    ));
    guest.sh_ok(
        "ip addr add fdcd::2/16 dev gg0 nodad && ip link set gg0 up && \
         ip -6 route add default via fdcd::1",
    );

    let ping = guest.sh("busybox ping -6 -c 3 -W 2 fdcd::1");
    assert!(
        ping.status.success(),
        "guest cannot reach the gateway: {}",
        text(&ping)
    );

    // Through NAT: the outside sees the host's address, never the guest's.
    let ol = listen_in(&out.name, "[2001:db8:1::2]:7000");
    let c = connect_from(&guest.name, "[2001:db8:1::2]:7000")
        .expect("guest reaches an address outside the prefix");
    let (_s, peer) = ol.accept().unwrap();
    drop(c);
    assert_eq!(
        peer.ip(),
        "2001:db8:1::1".parse::<Ipv6Addr>().unwrap(),
        "source not masqueraded"
    );

    // Host protection: the API port is open to guests, another port is not.
    let api = listen_in(&host.name, "[::]:8080");
    let other = listen_in(&host.name, "[::]:9090");
    connect_from(&guest.name, "[fdcd::1]:8080").expect("guest reaches the API port");
    let _ = api.accept().unwrap();
    // Control: the other listener works from the host itself...
    connect_from(&host.name, "[fdcd::1]:9090").expect("listener on 9090 is up");
    let _ = other.accept().unwrap();
    // ...but not from the bridge.
    let e = connect_from(&guest.name, "[fdcd::1]:9090");
    assert!(e.is_err(), "guest reached port 9090 on the host");
}

#[test]
fn iptables_backend_checks_before_adding_and_leaves_foreign_rules() {
    let t = "iptables_backend_checks_before_adding_and_leaves_foreign_rules";
    if !require(t, true, &["ip", "ip6tables", "ip6tables-restore"]) {
        return;
    }
    let ns = NetNs::new("ipt");
    ns.sh_ok(
        "ip6tables -A FORWARD -s 2001:db8::/32 -j ACCEPT && \
         ip6tables -t nat -A POSTROUTING -s 2001:db8:5::/48 -j MASQUERADE && \
         ip6tables -A INPUT -p tcp --dport 22 -j ACCEPT",
    );
    let env = Env::new(&profile_yaml(&"0".repeat(64), &[]));
    let args = [
        "setup",
        "--network-only",
        "--firewall",
        "iptables",
        "--json",
    ];
    let o = chvkit(&ns, &env, &args);
    assert!(o.status.success(), "{}", text(&o));
    // The seed's NAT and FORWARD listings.
    let nat = "ip6tables -t nat -L POSTROUTING -n";
    sh_shows(&ns, nat, &["CHVKIT-NAT", "2001:db8:5::/48"]);
    let masq = "-A CHVKIT-NAT -s fdcd::/16 ! -o chvbr0 -j MASQUERADE";
    sh_shows(&ns, "ip6tables -t nat -S CHVKIT-NAT", &[masq]);
    sh_shows(
        &ns,
        "ip6tables -L FORWARD -n",
        &["CHVKIT-FWD", "2001:db8::/32"],
    );
    let fwd = ["-A CHVKIT-FWD -i chvbr0 -j ACCEPT", "RELATED,ESTABLISHED"];
    sh_shows(&ns, "ip6tables -S CHVKIT-FWD", &fwd);
    let input = ["--dport 8080 -j ACCEPT", "-A CHVKIT-IN -j DROP"];
    sh_shows(&ns, "ip6tables -S CHVKIT-IN", &input);
    let unit =
        String::from_utf8(read(&env.at("/etc/systemd/system/chvkit-network.service"))).unwrap();
    assert!(unit.contains("--firewall iptables"), "{unit}");
    assert_no_fail(&doctor_levels(&ns, &env), &["net."]);

    let save = "ip6tables -S; ip6tables -t nat -S";
    let before = ns.sh_ok(save);
    let o2 = chvkit(&ns, &env, &args);
    assert!(o2.status.success(), "{}", text(&o2));
    assert_eq!(json(&o2)["changed"], 0, "{}", text(&o2));
    assert_eq!(ns.sh_ok(save), before, "second run added nothing");
    assert_eq!(before.matches("-j CHVKIT-FWD").count(), 1, "{before}");

    // Switching the backend takes chvkit's ip6tables chains out before the table goes in.
    let o3 = chvkit(&ns, &env, &["setup", "--network-only"]);
    assert!(o3.status.success(), "{}", text(&o3));
    assert!(!ns.sh_ok(save).contains("CHVKIT"), "{}", ns.sh_ok(save));
    assert!(ns.sh_ok("nft list tables").contains("table inet chvkit"));
    assert!(env.at("/etc/chvkit/chvkit.nft").exists());

    let td = chvkit(&ns, &env, &["teardown"]);
    assert!(td.status.success(), "{}", text(&td));
    assert!(!ns.sh_ok("nft list tables").contains("chvkit"));
    let after = ns.sh_ok(save);
    assert!(!after.contains("CHVKIT"), "{after}");
    for foreign in [
        "-s 2001:db8::/32 -j ACCEPT",
        "-s 2001:db8:5::/48 -j MASQUERADE",
        "--dport 22 -j ACCEPT",
    ] {
        assert!(
            after.contains(foreign),
            "foreign rule `{foreign}` gone:\n{after}"
        );
    }
}

#[test]
fn failure_midway_is_recorded_and_a_rerun_converges() {
    let t = "failure_midway_is_recorded_and_a_rerun_converges";
    if !require(t, true, &["ip", "nft"]) {
        return;
    }
    let ns = NetNs::new("part");
    let (env, _, mirror) = env_with_mirror("part", 4096, &[]);
    let setup = ["setup", "--json", "--artifacts-from", mirror.as_str()];

    // nftables unusable: refused before anything changes.
    let no_nft = [
        ("CHVKIT_LIBNFTABLES", "/nonexistent/libnftables.so.1"),
        ("CHVKIT_NFT", "/nonexistent/nft"),
    ];
    let o = chvkit_env(&ns, &env, &setup, &no_nft);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("nftables is not usable"), "{}", text(&o));
    assert!(
        ns.sh("ip link show chvbr0").status.code() != Some(0),
        "nothing created"
    );
    assert!(
        tree(&env.root()).is_empty(),
        "nothing written: {:?}",
        tree(&env.root())
    );

    // Something in the way of a file setup must write: also refused up front.
    std::fs::create_dir_all(env.at("/etc/systemd")).unwrap();
    std::fs::write(env.at("/etc/systemd/system"), "in the way").unwrap();
    let o = chvkit(&ns, &env, &setup);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("is not a directory"), "{}", text(&o));
    assert!(
        ns.sh("ip link show chvbr0").status.code() != Some(0),
        "nothing created"
    );
    std::fs::remove_file(env.at("/etc/systemd/system")).unwrap();

    // nft that lists but cannot load (e.g. a kernel without the nat hooks): the run stops at
    // the firewall, after the artifacts, the bridge and the sysctls.
    let broken = env.dir.path().join("broken-nft");
    std::fs::write(
        &broken,
        "#!/bin/sh\nin=$(cat)\ncase \"$in\" in *'delete table'*) \
         echo 'Error: Could not process rule: Operation not supported' >&2; exit 1;; esac\n\
         printf '%s\\n' \"$in\" | exec nft \"$@\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&broken, std::fs::Permissions::from_mode(0o755)).unwrap();
    let broken_nft = [
        ("CHVKIT_LIBNFTABLES", "/nonexistent/libnftables.so.1"),
        ("CHVKIT_NFT", broken.to_str().unwrap()),
    ];
    let o = chvkit_env(&ns, &env, &setup, &broken_nft);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let v = json(&o);
    let r: BTreeMap<String, String> = results(&v).into_iter().collect();
    assert_eq!(r["net.forwarding"], "changed", "{v}");
    assert_eq!(r["net.firewall"], "failed", "{v}");
    assert_eq!(r["persist.unit"], "not_run", "{v}");
    let err = v["error"].as_str().unwrap();
    assert!(
        err.contains("Operation not supported") && err.contains("run setup again"),
        "{err}"
    );
    let state: serde_json::Value =
        serde_json::from_slice(&read(&env.at("/var/lib/chvkit/setup-state.json"))).unwrap();
    assert_eq!(state["bridge"]["created"], true, "{state}");
    assert!(state["firewall"].is_null(), "{state}");
    assert!(!ns.sh_ok("nft list tables").contains("chvkit"));

    // With nftables working again the rerun finishes the job and redoes nothing else.
    let o = chvkit(&ns, &env, &setup);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        changed(&json(&o)),
        ["net.firewall", "persist.unit", "persist.unit_enabled"],
        "{}",
        text(&o)
    );
    let o = chvkit(&ns, &env, &setup);
    assert_eq!(json(&o)["changed"], 0, "{}", text(&o));
    assert_no_fail(
        &doctor_levels(&ns, &env),
        &["chv.", "firmware.file", "net."],
    );

    // The bridge went down behind setup's back (and so lost its address): setup puts it back.
    ns.sh_ok("ip link set chvbr0 down");
    let o = chvkit(&ns, &env, &["setup", "--json", "--network-only"]);
    assert_eq!(
        changed(&json(&o)),
        ["net.bridge_addr", "net.bridge_up"],
        "{}",
        text(&o)
    );
    assert!(ns.sh_ok("ip -6 addr show chvbr0").contains("fdcd::1/16"));

    // Teardown after all that still removes everything.
    let o = chvkit(&ns, &env, &["teardown"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(tree(&env.root()).is_empty(), "{:?}", tree(&env.root()));
    assert!(ns.sh("ip link show chvbr0").status.code() != Some(0));
}

#[test]
fn refuses_without_privilege_or_with_a_foreign_link_before_changing_anything() {
    let t = "refuses_without_privilege_or_with_a_foreign_link_before_changing_anything";
    if !require(t, true, &["ip", "setpriv"]) {
        return;
    }
    let ns = NetNs::new("priv");
    let (env, fw, mirror) = env_with_mirror("priv", 1024, &[]);
    let as_nobody = |extra: &[&str]| {
        let mut c = ns.cmd("setpriv");
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(common::chvkit())
        .args(env.args(extra));
        c.output().unwrap()
    };
    let o = as_nobody(&["setup", "--artifacts-from", &mirror]);
    assert!(!o.status.success(), "{}", text(&o));
    let msg = text(&o);
    assert!(
        msg.contains("CAP_NET_ADMIN") && msg.contains("Nothing was changed"),
        "{msg}"
    );
    assert!(tree(&env.root()).is_empty());
    assert!(ns.sh("ip link show chvbr0").status.code() != Some(0));

    // Artifacts only, into a root nobody may not write: the path is named.
    let o = as_nobody(&["setup", "--artifacts-only", "--artifacts-from", &mirror]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("cannot write"), "{}", text(&o));
    // ...and into one it owns: works without any privilege.
    nix::unistd::chown(&env.root(), Some(65534.into()), Some(65534.into())).unwrap();
    let o = as_nobody(&["setup", "--artifacts-only", "--artifacts-from", &mirror]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(read(&env.at("/opt/cloud-hypervisor/hypervisor-fw")), fw);

    // A link with the bridge's name that is no bridge is left alone, loudly.
    ns.sh_ok("ip link add chvbr0 type veth peer name chvbr0p");
    let o = chvkit(&ns, &env, &["setup", "--network-only"]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("not a bridge"), "{}", text(&o));
    assert!(!env.at("/etc/sysctl.d/60-chvkit.conf").exists());
    assert_eq!(sysctl(&ns, "net.ipv6.conf.all.forwarding"), "0");
}
