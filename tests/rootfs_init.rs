//! The generated /init outside a VM: run it as PID 1 of fresh PID, mount, UTS and network
//! namespaces, chrooted into a tmpfs copy of a small tree, under busybox sh and under dash.
//! `poweroff -f` in a PID namespace ends that namespace's init, so the whole life cycle runs.

mod common;

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use chvkit::rootfs::{init::Workload, tree};

#[derive(Clone, Copy, PartialEq, Debug)]
enum Shell {
    Busybox,
    Dash,
}

struct Tree {
    dir: tempfile::TempDir,
}

impl Tree {
    fn console(&self) -> PathBuf {
        self.dir.path().join("console")
    }
    fn console_text(&self) -> String {
        fs::read_to_string(self.console()).unwrap_or_default()
    }
}

fn copy_with_libs(bin: &str, root: &Path) {
    let dest = root.join(bin.trim_start_matches('/'));
    fs::create_dir_all(dest.parent().unwrap()).unwrap();
    fs::copy(bin, &dest).unwrap();
    let out = Command::new("ldd").arg(bin).output().unwrap();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let path = line
            .split_whitespace()
            .find(|w| w.starts_with('/'))
            .map(str::to_string);
        if let Some(p) = path {
            let d = root.join(p.trim_start_matches('/'));
            fs::create_dir_all(d.parent().unwrap()).unwrap();
            // Copy the resolved file under the name the loader asks for.
            fs::copy(&p, &d).unwrap();
        }
    }
}

/// A minimal image tree: busybox applets in /bin, `/bin/sh` being busybox or dash, a workload.
fn make_tree(shell: Shell, workload: &str, w: Workload, env: &str) -> Tree {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    fs::create_dir_all(root.join("bin")).unwrap();
    fs::create_dir_all(root.join("usr/local/bin")).unwrap();
    fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet == "busybox" || (applet == "sh" && shell == Shell::Dash) {
            continue;
        }
        let _ = symlink("busybox", root.join("bin").join(applet));
    }
    if shell == Shell::Dash {
        copy_with_libs("/usr/bin/dash", &root);
        symlink("/usr/bin/dash", root.join("bin/sh")).unwrap();
    }
    let wl = root.join("usr/local/bin/workload");
    fs::write(&wl, workload).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&wl, fs::Permissions::from_mode(0o755)).unwrap();
    let p = tree::prepare(&root, w, Path::new("/bin/busybox")).unwrap();
    assert_eq!(p.shell, chvkit::rootfs::init::InitShell::Image);
    fs::write(root.join("etc/checker.env"), env).unwrap();
    fs::write(dir.path().join("console"), "").unwrap();
    Tree { dir }
}

fn workload(uid: u32) -> Workload {
    Workload {
        args: vec!["/usr/local/bin/workload".into(), "arg one".into()],
        env: vec![
            "PATH=/usr/local/bin:/bin".into(),
            "GREETING=hi there".into(),
        ],
        cwd: "/srv".into(),
        uid,
        gid: uid,
        user_name: None,
    }
}

/// Run the tree's /init as PID 1 in new namespaces (inside `ns` for networking). Returns when
/// the namespace's init is gone; `during` runs meanwhile with the host PID of that init.
fn boot(ns: &common::NetNs, t: &Tree, cmdline: &str, during: impl FnOnce(u32)) -> Output {
    boot_as(ns, t, cmdline, true, during)
}

/// `as_pid1 = false`: a shell stays PID 1 of the namespace and runs /init as its child.
fn boot_as(
    ns: &common::NetNs,
    t: &Tree,
    cmdline: &str,
    as_pid1: bool,
    during: impl FnOnce(u32),
) -> Output {
    let m = t.dir.path().join("mnt");
    fs::create_dir_all(&m).unwrap();
    fs::write(t.dir.path().join("cmdline"), format!("{cmdline}\n")).unwrap();
    let script = r#"
set -e
M=$1 T=$2
mount -t tmpfs -o size=64m tmpfs "$M"
cp -a "$T/root/." "$M/"
mount -t tmpfs -o mode=0755 tmpfs "$M/dev"
: >"$M/dev/console"
mount --bind "$T/console" "$M/dev/console"
if [ -n "$3" ]; then cp -a "$3" "$M/dev/vdb"; fi
mount -t proc proc "$M/proc"
mount --bind "$T/cmdline" "$M/proc/cmdline"
if [ "$4" = pid1 ]; then exec chroot "$M" /init; fi
chroot "$M" /init && st=0 || st=$?
echo "init returned $st"
"#;
    let loopdev = std::env::var("CHVKIT_TEST_LOOP").unwrap_or_default();
    let child = ns
        .cmd("unshare")
        .args([
            "--mount",
            "--pid",
            "--fork",
            "--uts",
            "--propagation",
            "private",
        ])
        .args(["sh", "-c", script, "sh"])
        .arg(&m)
        .arg(t.dir.path())
        .arg(loopdev)
        .arg(if as_pid1 { "pid1" } else { "child" })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let mut init_pid = None;
    while init_pid.is_none() && start.elapsed() < Duration::from_secs(10) {
        init_pid = ns_init_pid(&ns.name);
        std::thread::sleep(Duration::from_millis(50));
    }
    if let Some(p) = init_pid {
        during(p);
    } else if as_pid1 {
        panic!("no PID 1 /init appeared in {}", ns.name);
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "init took too long"
    );
    out
}

/// Host PID of the process that is PID 1 of a child PID namespace inside netns `ns`.
fn ns_init_pid(ns: &str) -> Option<u32> {
    let o = Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .ok()?;
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
        .find(|p| {
            fs::read_to_string(format!("/proc/{p}/status"))
                .ok()
                .and_then(|s| {
                    s.lines().find(|l| l.starts_with("NSpid:")).map(|l| {
                        l.split_whitespace().last() == Some("1")
                            && l.split_whitespace().count() == 3
                    })
                })
                .unwrap_or(false)
                && fs::read_to_string(format!("/proc/{p}/cmdline"))
                    .map(|c| c.contains("/init"))
                    .unwrap_or(false)
        })
}

fn markers(console: &str) -> Vec<String> {
    console
        .lines()
        .filter(|l| l.starts_with("CHVKIT_EXIT="))
        .map(str::to_string)
        .collect()
}

const MAIN_WORKLOAD: &str = r#"#!/bin/sh
echo "workload: args=[$1] uid=$(id -u) gid=$(id -g) cwd=$(pwd) greeting=[$GREETING] host=$(hostname)"
echo "workload: evil=[$CHECKER_EVIL] mode=[$CHECKER_MODE]"
[ -e /pwned ] && echo "workload: PWNED"
for m in /proc /sys /dev/pts /dev/shm /run /tmp; do
	grep -q " $m " /proc/mounts && echo "workload: mounted $m"
done
ip link show lo | grep -q UP && echo "workload: lo up"
echo "workload: resolv=[$(cat /etc/resolv.conf)]"
# An orphan that exits while we run: PID 1 must reap it.
( sleep 0.2 & )
sleep 1
z=0
for f in /proc/[0-9]*/stat; do
	read -r line <"$f" 2>/dev/null || continue
	set -- $line
	[ "$3" = Z ] && z=$((z + 1))
done
echo "workload: zombies=$z"
exit 3
"#;

fn env_text(mode: &str) -> String {
    chvkit::envfile::render(&[
        ("CHECKER_MODE", mode),
        ("CHECKER_GUEST_IP", "fdcd::42/16"),
        ("CHECKER_GATEWAY", "fdcd::1"),
        ("CHECKER_HOSTNAME", "job-7"),
        ("CHECKER_EVIL", "'; touch /pwned; '"),
    ])
    .unwrap()
}

/// `cmdline` without `chvkit.env=`: /init checks the image's own checker.env before sourcing
/// it; with `chvkit.env=/etc/checker.env` (launch filled the env slot) it sources it directly.
fn full_cycle(test: &str, shell: Shell, cmdline: &str) {
    if !common::require(test, true, &["unshare", "chroot", "busybox", "ldd"]) {
        return;
    }
    if shell == Shell::Dash && !Path::new("/usr/bin/dash").exists() {
        common::skip(test, "dash is not installed");
        return;
    }
    let ns = common::NetNs::new("ri");
    // A stand-in NIC with the name /init looks for first.
    ns.sh_ok("ip link add eth0 type veth peer name peer0 && ip link set peer0 up");
    let t = make_tree(shell, MAIN_WORKLOAD, workload(1000), &env_text("main"));
    let out = boot(&ns, &t, cmdline, |_| {});
    let c = t.console_text();
    let ctx = format!("{}\n--- console\n{c}", common::text(&out));
    assert_eq!(markers(&c), vec!["CHVKIT_EXIT=3".to_string()], "{ctx}");
    for want in [
        "workload: args=[arg one] uid=1000 gid=1000 cwd=/srv greeting=[hi there] host=job-7",
        "workload: evil=['; touch /pwned; '] mode=[main]",
        "workload: mounted /proc",
        "workload: mounted /sys",
        "workload: mounted /dev/pts",
        "workload: mounted /dev/shm",
        "workload: mounted /run",
        "workload: mounted /tmp",
        "workload: lo up",
        "workload: resolv=[nameserver 2001:4860:4860::8888]",
        "workload: zombies=0",
    ] {
        assert!(c.contains(want), "missing `{want}`:\n{ctx}");
    }
    assert!(!c.contains("PWNED"), "{ctx}");
    // Seen from outside: the address and route /init configured from checker.env.
    let addrs = ns.sh_ok("ip -6 addr show dev eth0");
    assert!(addrs.contains("inet6 fdcd::42/16"), "{addrs}");
    assert!(
        !addrs.contains("tentative"),
        "DAD was not disabled: {addrs}"
    );
    let routes = ns.sh_ok("ip -6 route show default");
    assert!(routes.contains("via fdcd::1 dev eth0"), "{routes}");
    assert_eq!(
        ns.sh_ok("cat /proc/sys/net/ipv6/conf/eth0/accept_dad")
            .trim(),
        "0"
    );
}

#[test]
fn rootfs_init_full_cycle_busybox_sh() {
    full_cycle(
        "rootfs_init_full_cycle_busybox_sh",
        Shell::Busybox,
        "console=ttyS0 root=/dev/vda rw",
    );
}

#[test]
fn rootfs_init_full_cycle_dash() {
    full_cycle(
        "rootfs_init_full_cycle_dash",
        Shell::Dash,
        "console=ttyS0 root=/dev/vda rw chvkit.env=/etc/checker.env",
    );
}

const TERM_WORKLOAD: &str = r#"#!/bin/sh
trap 'echo "workload: got TERM"; exit 7' TERM
echo "workload: ready"
while :; do sleep 0.1; done
"#;

fn sigterm_forwarded(test: &str, shell: Shell) {
    if !common::require(test, true, &["unshare", "chroot", "busybox", "ldd"]) {
        return;
    }
    if shell == Shell::Dash && !Path::new("/usr/bin/dash").exists() {
        common::skip(test, "dash is not installed");
        return;
    }
    let ns = common::NetNs::new("rt");
    let t = make_tree(shell, TERM_WORKLOAD, workload(0), "");
    let console = t.console();
    let out = boot(&ns, &t, "console=ttyS0", |pid| {
        let start = Instant::now();
        while !fs::read_to_string(&console)
            .unwrap_or_default()
            .contains("workload: ready")
        {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "workload never started"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // SIGTERM to PID 1, as a VMM's ACPI shutdown path or an operator would send it.
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
    });
    let c = t.console_text();
    let ctx = format!("{}\n--- console\n{c}", common::text(&out));
    assert!(c.contains("workload: got TERM"), "{ctx}");
    assert_eq!(markers(&c), vec!["CHVKIT_EXIT=7".to_string()], "{ctx}");
    // No network was configured without CHECKER_GUEST_IP, and /init said so.
    assert!(c.contains("CHECKER_GUEST_IP is not set"), "{ctx}");
}

#[test]
fn rootfs_init_sigterm_forwarded_busybox_sh() {
    sigterm_forwarded("rootfs_init_sigterm_forwarded_busybox_sh", Shell::Busybox);
}

#[test]
fn rootfs_init_sigterm_forwarded_dash() {
    sigterm_forwarded("rootfs_init_sigterm_forwarded_dash", Shell::Dash);
}

#[test]
fn rootfs_init_broken_env_and_missing_command_still_power_off() {
    let test = "rootfs_init_broken_env_and_missing_command_still_power_off";
    if !common::require(test, true, &["unshare", "chroot", "busybox"]) {
        return;
    }
    let ns = common::NetNs::new("rx");
    let mut w = workload(0);
    w.args = vec!["/no/such/program".into()];
    let t = make_tree(Shell::Busybox, "", w, "FOO='unterminated\n");
    let out = boot(&ns, &t, "console=ttyS0", |_| {});
    let c = t.console_text();
    let ctx = format!("{}\n--- console\n{c}", common::text(&out));
    assert!(
        c.contains("/etc/checker.env does not parse: ignored"),
        "{ctx}"
    );
    assert_eq!(markers(&c), vec!["CHVKIT_EXIT=127".to_string()], "{ctx}");
}

#[test]
fn rootfs_init_not_pid1_exits_instead_of_powering_off() {
    let test = "rootfs_init_not_pid1_exits_instead_of_powering_off";
    if !common::require(test, true, &["unshare", "chroot", "busybox"]) {
        return;
    }
    // Inside a PID namespace even a wrong `poweroff -f` would only end that namespace, so this
    // is safe to run: /init, not PID 1, must report and return the status, not power off.
    let ns = common::NetNs::new("rp");
    let mut w = workload(0);
    w.args = vec!["/bin/sh".into(), "-c".into(), "exit 5".into()];
    let t = make_tree(Shell::Busybox, "", w, "");
    let out = boot_as(&ns, &t, "console=ttyS0", false, |_| {});
    let c = t.console_text();
    let ctx = format!("{}\n--- console\n{c}", common::text(&out));
    assert!(common::text(&out).contains("init returned 5"), "{ctx}");
    assert_eq!(markers(&c), vec!["CHVKIT_EXIT=5".to_string()], "{ctx}");
}
