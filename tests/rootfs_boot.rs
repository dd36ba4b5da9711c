//! Boot images built by `chvkit rootfs` under QEMU TCG (Debian's cloud kernel, the test
//! initramfs from `tests/qemu`) and check what the generated /init does inside a real guest:
//! exit markers, power-off without reboot, IPv6 from checker.env on a TAP/bridge in a test
//! namespace, the env disk, and inert quoting.

mod common;
#[path = "qemu/mod.rs"]
mod qemu;

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

const WORKLOAD: &str = r#"#!/bin/sh
echo "workload: mode=$CHECKER_MODE uid=$(id -u) cwd=$(pwd) greeting=$GREETING"
case "$CHECKER_MODE" in
exit3)
	exit 3
	;;
net)
	if [ "$CHECKER_EVIL" != "'; touch /pwned; '" ]; then
		echo "workload: CHECKER_EVIL arrived changed: [$CHECKER_EVIL]"
		exit 12
	fi
	if [ -e /pwned ]; then
		echo "workload: /pwned exists"
		exit 11
	fi
	echo "workload: env file mode $(stat -c %a /etc/checker.env)"
	ip -6 addr show dev eth0
	ip -6 route show
	cat /etc/resolv.conf
	ping -c 2 -W 5 fdcd::1 || exit 10
	# busybox wget crashes on IPv6 literals (Debian's 1.35): speak HTTP through nc.
	resp=$(printf 'GET /token HTTP/1.0\r\n\r\n' | nc -w 10 fdcd::1 8080) || exit 13
	echo "workload: token=$(echo "$resp" | tail -n 1)"
	exit 0
	;;
esac
echo "workload: unknown mode"
exit 99
"#;

const DOCKERFILE: &str = "FROM scratch
COPY busybox /bin/busybox
RUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]
COPY workload.sh /usr/local/bin/workload
ENV GREETING=hello
WORKDIR /srv
CMD [\"/usr/local/bin/workload\"]
";

/// Build the shared test image once per test binary.
fn image() -> Option<&'static PathBuf> {
    static IMG: OnceLock<Option<PathBuf>> = OnceLock::new();
    IMG.get_or_init(|| {
        Some(qemu::build_busybox_image_once(
            "chvkit-boot-img-",
            "base.raw",
            DOCKERFILE,
            WORKLOAD,
        ))
    })
    .as_ref()
}

/// A per-test copy of the image (the guest writes to its root disk).
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Scratch {
        Scratch {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn copy_image(&self) -> PathBuf {
        let src = image().expect("image");
        let dst = self.dir.path().join("root.raw");
        let st = Command::new("cp")
            .args(["--sparse=always"])
            .arg(src)
            .arg(&dst)
            .status()
            .unwrap();
        assert!(st.success());
        dst
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn ready(test: &str) -> bool {
    if !common::require(test, true, &["buildah", "umoci", "mkfs.ext4", "debugfs"]) {
        return false;
    }
    if let Some(why) = qemu::unavailable() {
        common::skip(test, &why);
        return false;
    }
    true
}

/// Put `/etc/checker.env` (mode 0600) into a raw image with debugfs.
fn write_env_into_image(img: &Path, scratch: &Scratch, pairs: &[(&str, &str)]) {
    let env = scratch.path("checker.env");
    fs::write(&env, chvkit::envfile::render(pairs).unwrap()).unwrap();
    let cmds = format!(
        "rm /etc/checker.env\nwrite {} /etc/checker.env\nsif /etc/checker.env mode 0100600\n",
        env.display()
    );
    let f = scratch.path("debugfs.cmds");
    fs::write(&f, cmds).unwrap();
    let o = Command::new("debugfs")
        .arg("-w")
        .arg("-f")
        .arg(&f)
        .arg(img)
        .output()
        .unwrap();
    assert!(o.status.success(), "debugfs: {}", common::text(&o));
}

fn debugfs_exists(img: &Path, path: &str) -> bool {
    let o = Command::new("debugfs")
        .arg("-R")
        .arg(format!("stat {path}"))
        .arg(img)
        .output()
        .unwrap();
    !String::from_utf8_lossy(&o.stderr).contains("File not found")
}

fn assert_clean_poweroff(run: &qemu::QemuRun, expect: i32) {
    assert!(
        run.powered_off(),
        "QEMU did not exit by itself (timed out: {}):\n{}",
        run.timed_out,
        run.serial
    );
    assert_eq!(
        run.boots(),
        1,
        "the guest booted more than once:\n{}",
        run.serial
    );
    assert_eq!(
        run.exit_markers(),
        vec![expect],
        "exactly one CHVKIT_EXIT line expected:\n{}",
        run.serial
    );
}

#[test]
fn rootfs_boot_exit_status_from_image_env() {
    let t = "rootfs_boot_exit_status_from_image_env";
    if !ready(t) {
        return;
    }
    let s = Scratch::new();
    let img = s.copy_image();
    // No env disk: /init sources the image's own /etc/checker.env.
    write_env_into_image(&img, &s, &[("CHECKER_MODE", "exit3")]);
    let run = qemu::run(&qemu::QemuOpts {
        disks: vec![qemu::Disk::raw(&img)],
        ..Default::default()
    })
    .unwrap();
    assert_clean_poweroff(&run, 3);
    assert!(
        run.serial
            .contains("workload: mode=exit3 uid=0 cwd=/srv greeting=hello"),
        "{}",
        run.serial
    );
    eprintln!("boot to power-off took {:.1}s", run.elapsed.as_secs_f64());
}

/// A one-shot HTTP listener on `[addr]:port` inside the namespace `ns` (its own thread joins
/// the namespace). Returns the peer address it served.
fn serve_token(ns: &str, addr: &str, port: u16, token: String) -> std::thread::JoinHandle<String> {
    let ns = ns.to_string();
    let addr = addr.to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        let f = fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let l = std::net::TcpListener::bind(format!("[{addr}]:{port}")).unwrap();
        tx.send(()).unwrap();
        l.set_nonblocking(false).unwrap();
        let (mut c, peer) = l.accept().unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 1024];
        let _ = c.read(&mut buf);
        let body = format!("{token}\n");
        let _ = write!(
            c,
            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        peer.ip().to_string()
    });
    rx.recv_timeout(Duration::from_secs(10)).unwrap();
    h
}

#[test]
fn rootfs_boot_network_env_disk_and_quoting() {
    let t = "rootfs_boot_network_env_disk_and_quoting";
    if !ready(t) {
        return;
    }
    let s = Scratch::new();
    let img = s.copy_image();
    let ns = common::NetNs::new("rb");
    let tap = common::unique("rt");
    ns.sh_ok(&format!(
        "ip link add br0 type bridge && sysctl -qw net.ipv6.conf.br0.accept_dad=0 && \
         ip addr add fdcd::1/16 dev br0 nodad && ip link set br0 up && \
         ip tuntap add dev {tap} mode tap && ip link set {tap} master br0 && ip link set {tap} up"
    ));
    let guest_ip = "fdcd::42";
    let env_disk = s.path("env.disk");
    chvkit::rootfs::envdisk::write(
        &env_disk,
        &[
            ("CHECKER_MODE", "net"),
            ("CHECKER_GUEST_IP", &format!("{guest_ip}/16")),
            ("CHECKER_GATEWAY", "fdcd::1"),
            ("CHECKER_NAMESERVER", "fdcd::53"),
            ("CHECKER_EVIL", "'; touch /pwned; '"),
        ],
    )
    .unwrap();
    let mut rnd = [0u8; 8];
    getrandom::fill(&mut rnd).unwrap();
    let token = hex::encode(rnd);
    let listener = serve_token(&ns.name, "fdcd::1", 8080, token.clone());
    let run = qemu::run(&qemu::QemuOpts {
        disks: vec![qemu::Disk::raw(&img), qemu::Disk::raw_ro(&env_disk)],
        tap: Some((tap.clone(), "52:54:00:12:34:56".into())),
        netns: Some(ns.name.clone()),
        append: chvkit::rootfs::envdisk::cmdline_arg("/dev/vdb"),
        ..Default::default()
    })
    .unwrap();
    assert_clean_poweroff(&run, 0);
    let serial = &run.serial;
    assert!(serial.contains(&format!("inet6 {guest_ip}/16")), "{serial}");
    assert!(serial.contains("default via fdcd::1 dev eth0"), "{serial}");
    assert!(serial.contains("nameserver fdcd::53"), "{serial}");
    assert!(serial.contains("env file mode 600"), "{serial}");
    assert!(
        serial.contains(&format!("workload: token={token}")),
        "{serial}"
    );
    // Host side: the request came from the address checker.env gave the guest.
    let peer = listener.join().unwrap();
    assert_eq!(peer, guest_ip);
    // Nothing ran from the quoted value, also as seen on the disk afterwards.
    assert!(!debugfs_exists(&img, "/pwned"));
    assert!(debugfs_exists(&img, "/init"));
}

#[test]
fn rootfs_boot_image_without_shell_runs_on_injected_busybox() {
    let t = "rootfs_boot_image_without_shell_runs_on_injected_busybox";
    if !ready(t) {
        return;
    }
    let s = Scratch::new();
    let ctx = s.path("ctx");
    fs::create_dir_all(&ctx).unwrap();
    fs::copy("/bin/busybox", ctx.join("busybox")).unwrap();
    // No /bin/sh, no applet links: only a program at a private path.
    fs::write(
        ctx.join("Dockerfile"),
        "FROM scratch\nCOPY busybox /opt/busybox\nENTRYPOINT [\"/opt/busybox\", \"sh\", \"-c\"]\nCMD [\"echo no-shell-image; exit 4\"]\n",
    )
    .unwrap();
    let img = s.path("nosh.raw");
    let o = Command::new(common::chvkit())
        .arg("--root")
        .arg(s.path("root"))
        .args(["rootfs", "--pull", "never", "--json", "-o"])
        .arg(&img)
        .arg(&ctx)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", common::text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("\"init_shell\": \"/.chvkit/busybox sh\""));
    let run = qemu::run(&qemu::QemuOpts {
        disks: vec![qemu::Disk::raw(&img)],
        ..Default::default()
    })
    .unwrap();
    assert_clean_poweroff(&run, 4);
    assert!(run.serial.contains("no-shell-image"), "{}", run.serial);
}
