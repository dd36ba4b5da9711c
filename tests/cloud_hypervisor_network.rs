//! Networking of launched guests: bridge-port isolation (two "guests" on veth ports attached
//! exactly as launch attaches TAPs reach the gateway but not each other), the TAP a launch
//! creates and hands to the VMM, and — under QEMU TCG, a second guest side beside the real-VMM
//! one in `tests/guest_e2e.rs` — a rootfs built by `chvkit rootfs` booted from the per-job disk
//! and env disk launch prepares, getting its job-derived address and returning its exit status.
//!
//! Every test works in network namespaces it creates and removes.

mod common;
#[path = "qemu/mod.rs"]
mod qemu;
mod vmm;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use chvkit::launch::{config, disk, identity::Identity, qcow2, tap};

const BRIDGE_SETUP: &str =
    "ip link add br0 type bridge && sysctl -qw net.ipv6.conf.br0.accept_dad=0 && \
     ip -6 addr add fdcd::1/16 dev br0 nodad && ip link set br0 up";

/// Run `f` on a thread that has joined namespace `ns` (netlink sockets open where it runs).
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        let fd = fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
        nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
    .join()
    .unwrap()
}

fn identity(job: &str) -> Identity {
    let p = chvkit::profile::Profile::embedded().unwrap();
    Identity::derive(job, p.network.prefix, p.network.gateway).unwrap()
}

/// One echo reply from `to` within `secs` seconds (busybox's ping: the QEMU harness needs
/// busybox anyway, and iputils may be absent).
fn ping(ns: &common::NetNs, to: &str, secs: u32) -> bool {
    ns.sh(&format!("busybox ping -6 -c 1 -w {secs} {to}"))
        .status
        .success()
}

#[test]
fn cloud_hypervisor_network_isolated_ports_reach_gateway_not_each_other() {
    let t = "cloud_hypervisor_network_isolated_ports_reach_gateway_not_each_other";
    if !common::require(t, true, &["ip", "bridge", "busybox"]) {
        return;
    }
    let host = common::NetNs::new("ih");
    host.sh_ok(BRIDGE_SETUP);
    let guests = [
        (common::NetNs::new("ga"), "va", "fdcd::a"),
        (common::NetNs::new("gb"), "vb", "fdcd::b"),
    ];
    for (g, port, addr) in &guests {
        host.sh_ok(&format!(
            "ip link add {port} type veth peer name eth0 netns {}",
            g.name
        ));
        // Attached the way launch attaches a TAP: chvkit's own code, bridge port isolated, up.
        let (ns, p) = (host.name.clone(), port.to_string());
        in_netns(&ns, move || tap::attach_isolated(&p, "br0")).unwrap();
        g.sh_ok(&format!(
            "sysctl -qw net.ipv6.conf.eth0.accept_dad=0 && ip -6 addr add {addr}/16 dev eth0 nodad && ip link set eth0 up"
        ));
        let (ns, p) = (host.name.clone(), port.to_string());
        let st = in_netns(&ns, move || tap::status(&p)).unwrap().unwrap();
        assert_eq!(st.controller.as_deref(), Some("br0"));
        assert_eq!(st.isolated, Some(true));
        assert!(st.up);
    }
    let (a, b) = (&guests[0].0, &guests[1].0);
    // Reachable ones may take a moment after the ports come up: allow up to 10 s for the
    // first reply. Unreachable ones are probed only once the network answers elsewhere.
    assert!(ping(a, "fdcd::1", 10), "guest A cannot reach the gateway");
    assert!(ping(b, "fdcd::1", 10), "guest B cannot reach the gateway");
    assert!(
        !ping(a, "fdcd::b", 3),
        "guest A reached guest B through isolated ports"
    );
    assert!(
        !ping(b, "fdcd::a", 3),
        "guest B reached guest A through isolated ports"
    );
    // Control: with B's port not isolated the same ping goes through, so the test can fail.
    host.sh_ok("bridge link set dev vb isolated off");
    assert!(
        ping(a, "fdcd::b", 10),
        "control: A cannot reach B even without isolation"
    );
}

#[test]
fn cloud_hypervisor_network_launch_hands_an_isolated_tap_to_the_vmm() {
    let t = "cloud_hypervisor_network_launch_hands_an_isolated_tap_to_the_vmm";
    if !common::require(t, true, &["ip", "bridge", "mkfs.ext4"]) {
        return;
    }
    let Some(kernel) = vmm::kernel() else {
        common::skip(
            t,
            "no guest kernel (set CHV_KERNEL_PATH or install linux-image-cloud-amd64)",
        );
        return;
    };
    let bin = vmm::binary();
    let _heavy = bin.real.then(vmm::heavy_lock);
    vmm::notice(t, &bin.describe());
    let ns = common::NetNs::new("nt");
    ns.sh_ok(BRIDGE_SETUP);
    let work = tempfile::tempdir().unwrap();
    let rootfs = work.path().join("rootfs.raw");
    assert!(Command::new("truncate")
        .args(["-s", "64M"])
        .arg(&rootfs)
        .status()
        .unwrap()
        .success());
    assert!(Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&rootfs)
        .status()
        .unwrap()
        .success());
    let root = tempfile::tempdir().unwrap();
    let chv = |args: &[&str]| {
        ns.cmd(common::chvkit())
            .arg("--root")
            .arg(root.path())
            .args(args)
            .env("CHV_BIN", &bin.path)
            .output()
            .unwrap()
    };
    let o = chv(&[
        "launch",
        "--rootfs",
        rootfs.to_str().unwrap(),
        "--kernel",
        kernel.to_str().unwrap(),
        "--bridge",
        "br0",
        "--job-id",
        "net1",
        "--memory",
        "128",
        "--cpus",
        "1",
        "--detach",
        "--json",
    ]);
    assert!(o.status.success(), "{}", common::text(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let id = identity("net1");
    let vmm_pid = j["vmm_pid"].as_i64().unwrap() as i32;
    // The VMM opened the TAP chvkit created (it holds a tun fd on that name) ...
    let holders = tap::holders(&id.tap);
    assert!(holders.iter().any(|(p, _)| *p == vmm_pid), "{holders:?}");
    // ... which is persistent, isolated on the bridge, and up.
    let tn = id.tap.clone();
    let st = in_netns(&ns.name, move || tap::status(&tn))
        .unwrap()
        .unwrap();
    assert_eq!(
        (st.controller.as_deref(), st.isolated, st.up),
        (Some("br0"), Some(true), true)
    );
    let detail = ns.sh_ok(&format!("ip -d link show dev {}", id.tap));
    assert!(
        detail.contains("tun type tap") && detail.contains("persist"),
        "{detail}"
    );
    assert!(
        !detail.contains("multi_queue"),
        "single queue expected: {detail}"
    );
    let o = chv(&["vm", "stop", "net1"]);
    assert!(o.status.success(), "{}", common::text(&o));
    assert!(!ns.sh_ok("ip -br link").contains(&id.tap));
}

// ---------------------------------------------------------------------------------------------
// Guest side, under QEMU.

const WORKLOAD: &str = r#"#!/bin/sh
echo "workload: job=$CHECKER_JOB_ID ip=$CHECKER_GUEST_IP"
ip -6 addr show dev eth0
ping -c 2 -W 5 fdcd::1 || exit 10
resp=$(printf 'GET /hello HTTP/1.0\r\n\r\n' | nc -w 10 fdcd::1 8080) || exit 11
echo "workload: got=$(echo "$resp" | tail -n 1)"
# 4 MiB of guest writes: they must land in the per-job overlay, not in the rootfs.
dd if=/dev/urandom of=/written bs=1M count=4 2>/dev/null || exit 12
sync
exit 7
"#;

const DOCKERFILE: &str = "FROM scratch
COPY busybox /bin/busybox
RUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]
COPY workload.sh /usr/local/bin/workload
CMD [\"/usr/local/bin/workload\"]
";

fn build_image(dir: &Path) -> PathBuf {
    let out = dir.join("rootfs.raw");
    qemu::build_busybox_image(dir, DOCKERFILE, WORKLOAD, &out);
    out
}

fn sha256_file(p: &Path) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    let mut f = fs::File::open(p).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex::encode(h.finalize())
}

#[test]
fn cloud_hypervisor_network_guest_gets_derived_address_under_qemu() {
    let t = "cloud_hypervisor_network_guest_gets_derived_address_under_qemu";
    if !common::require(t, true, &["buildah", "umoci", "mkfs.ext4", "ip"]) {
        return;
    }
    if let Some(why) = qemu::unavailable() {
        common::skip(t, &why);
        return;
    }
    vmm::notice(
        t,
        "guest side under QEMU TCG (the real VMM's guest side is tests/guest_e2e.rs)",
    );
    let work = tempfile::tempdir().unwrap();
    let img = build_image(work.path());
    let img_sha = sha256_file(&img);

    // Exactly what launch prepares: identity, per-job disk, env disk, TAP.
    let job = "guest-side-1";
    let id = identity(job);
    let state = work.path().join("state");
    // checker.env goes into the image's env slot, as launch does for every `chvkit rootfs`
    // image (the env disk, for images without one, is tests/qemu_guest.rs's).
    let env = config::checker_env(&id, "http://[fdcd::1]:8080");
    let env_bytes = chvkit::envfile::render(&env).unwrap();
    let d = disk::prepare(
        &img,
        &state.join("disks").join(job),
        &state.join("bases"),
        Some(env_bytes.as_bytes()),
    )
    .unwrap();
    assert!(d.env_in_slot, "a `chvkit rootfs` image has an env slot");

    let ns = common::NetNs::new("gq");
    ns.sh_ok(BRIDGE_SETUP);
    let tn = id.tap.clone();
    in_netns(&ns.name, move || {
        tap::create_persistent(&tn)?;
        tap::attach_isolated(&tn, "br0")
    })
    .unwrap();

    // The gateway side: a one-shot HTTP server on fdcd::1:8080 that records its peer.
    let nsn = ns.name.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let server = std::thread::spawn(move || {
        let fd = fs::File::open(format!("/var/run/netns/{nsn}")).unwrap();
        nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let l = std::net::TcpListener::bind("[fdcd::1]:8080").unwrap();
        tx.send(()).unwrap();
        let (mut c, peer) = l.accept().unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 512];
        let _ = c.read(&mut buf);
        let _ = write!(c, "HTTP/1.0 200 OK\r\nContent-Length: 6\r\n\r\nhello\n");
        peer.ip().to_string()
    });
    rx.recv_timeout(Duration::from_secs(10)).unwrap();

    let fmt = if d.kind == disk::DiskKind::Qcow2Overlay {
        qemu::Format::Qcow2
    } else {
        qemu::Format::Raw
    };
    let overlay_before = fs::metadata(&d.path).unwrap().blocks() * 512;
    let run = qemu::run(&qemu::QemuOpts {
        disks: vec![qemu::Disk {
            path: d.path.clone(),
            format: fmt,
            readonly: false,
        }],
        tap: Some((id.tap.clone(), id.mac.to_string())),
        netns: Some(ns.name.clone()),
        append: chvkit::rootfs::envslot::CMDLINE_ARG.to_string(),
        ..Default::default()
    })
    .unwrap();
    let serial = &run.serial;
    assert!(
        run.powered_off(),
        "guest did not power off (timed out: {}):\n{serial}",
        run.timed_out
    );
    assert_eq!(run.boots(), 1, "{serial}");
    // The exit status came back, through the marker launch reads.
    assert_eq!(run.exit_markers(), vec![7], "{serial}");
    let log = work.path().join("serial.log");
    fs::write(&log, serial).unwrap();
    assert_eq!(
        chvkit::launch::events::exit_code_from_serial(&log).unwrap(),
        Some(7)
    );
    // The guest configured the address derived from the job id, and used it.
    assert!(
        serial.contains(&format!("job={job} ip={}", id.ip_cidr())),
        "{serial}"
    );
    assert!(
        serial.contains(&format!("inet6 {}", id.ip_cidr())),
        "{serial}"
    );
    assert!(serial.contains("workload: got=hello"), "{serial}");
    assert_eq!(server.join().unwrap(), id.ip.to_string());

    // The rootfs was never written; the guest's 4 MiB landed in the per-job disk.
    assert_eq!(sha256_file(&img), img_sha);
    let overlay_after = fs::metadata(&d.path).unwrap().blocks() * 512;
    if d.kind == disk::DiskKind::Qcow2Overlay {
        assert!(
            overlay_after >= overlay_before + (4 << 20),
            "{overlay_before} -> {overlay_after}"
        );
        let img_size = fs::metadata(&img).unwrap().len();
        assert!(
            overlay_after < img_size / 4,
            "overlay {overlay_after} vs image {img_size}"
        );
        assert!(qcow2::read_header(&d.path).unwrap().backing_file.is_some());
        if common::have_tool("qemu-img") {
            let o = Command::new("qemu-img")
                .args(["check", "-f", "qcow2"])
                .arg(&d.path)
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "qemu-img check after guest writes: {}",
                common::text(&o)
            );
        }
    }
    let tn = id.tap.clone();
    assert!(in_netns(&ns.name, move || tap::delete(&tn)).unwrap());
}
