//! `chvkit launch`, `vm …` and `gc` end to end, against a VMM: the real Cloud Hypervisor when
//! one is present (`CHV_BIN` or `cloud-hypervisor` on PATH) for everything that does not need a
//! guest to run code, the stand-in (`examples/chv_standin.rs`) for the exit-status paths it
//! injects on demand (reboot, panic, crash); real guests run in `tests/guest_e2e.rs`. Each test
//! says which one it used.
//!
//! Every test has its own network namespace (with its own bridge, set up like `chvkit setup`
//! does) and its own `--root`, so they run in parallel and leave nothing on the host.

mod common;
mod launch_env;
mod vmm;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use launch_env::{alive, identity, Env, Which};

fn json_of(o: &Output) -> serde_json::Value {
    let text = String::from_utf8_lossy(&o.stdout);
    if let Ok(v) = serde_json::from_str(text.trim()) {
        return v;
    }
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{') || l.starts_with('['))
        .unwrap_or("");
    serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("no JSON in output ({e}):\n{}", common::text(o)))
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn kill(pid: i64, sig: i32) {
    // SAFETY: plain kill(2).
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

fn wait_child(c: &mut Child, budget: Duration) -> Output {
    let deadline = Instant::now() + budget;
    loop {
        if c.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = c.kill();
            panic!("child did not exit within {budget:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut out = Vec::new();
    let mut err = Vec::new();
    use std::io::Read;
    if let Some(mut s) = c.stdout.take() {
        let _ = s.read_to_end(&mut out);
    }
    if let Some(mut s) = c.stderr.take() {
        let _ = s.read_to_end(&mut err);
    }
    Output {
        status: c.wait().unwrap(),
        stdout: out,
        stderr: err,
    }
}

#[test]
fn cloud_hypervisor_launch_exit_status_env_and_cleanup() {
    let Some(e) = Env::new(
        "cloud_hypervisor_launch_exit_status_env_and_cleanup",
        Which::Standin,
    ) else {
        return;
    };
    let logs = e.work.path().join("logs");
    let rootfs_before = fs::read(&e.rootfs).unwrap();
    let o = e.launch(
        "exit-3",
        &[
            "--cmdline",
            "standin.exit=3",
            "--json",
            "--env",
            "GREETING=it's $(here)",
            "--log-dir",
            logs.to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(3), "{}", common::text(&o));
    let j = json_of(&o);
    let id = identity("exit-3");
    assert_eq!(j["exit_code"], 3);
    assert_eq!(j["reason"], "exited");
    assert_eq!(j["ip"], id.ip_cidr());
    assert_eq!(j["mac"], id.mac.to_string());
    assert_eq!(j["tap"], id.tap);
    e.assert_clean("exit-3", None);
    // The rootfs is never written; the base cache is all that remains.
    assert_eq!(fs::read(&e.rootfs).unwrap(), rootfs_before);
    // Logs were kept where --log-dir said.
    let serial = fs::read_to_string(logs.join("exit-3/serial.log")).unwrap();
    assert!(serial.contains("CHVKIT_EXIT=3"), "{serial}");
    let events = fs::read_to_string(logs.join("exit-3/events.log")).unwrap();
    assert!(events.contains("\"booted\""), "{events}");
    let state: serde_json::Value =
        serde_json::from_slice(&fs::read(logs.join("exit-3/state.json")).unwrap()).unwrap();
    assert_eq!(state["exit"]["code"], 3);

    // Exit 0 too, and the same id can be launched again right away.
    let o = e.launch("exit-3", &["--cmdline", "standin.exit=0"]);
    assert_eq!(o.status.code(), Some(0), "{}", common::text(&o));
    e.assert_clean("exit-3", None);
}

#[test]
fn cloud_hypervisor_launch_guest_reboot_and_panic_are_failures() {
    let Some(e) = Env::new(
        "cloud_hypervisor_launch_guest_reboot_and_panic_are_failures",
        Which::Standin,
    ) else {
        return;
    };
    let o = e.launch("rb", &["--cmdline", "standin.reboot", "--json"]);
    assert_eq!(o.status.code(), Some(74), "{}", common::text(&o));
    assert_eq!(json_of(&o)["reason"], "guest_rebooted");
    assert!(stderr(&o).contains("rebooted"), "{}", common::text(&o));
    e.assert_clean("rb", None);

    let o = e.launch("pn", &["--cmdline", "standin.panic", "--json"]);
    assert_eq!(o.status.code(), Some(75), "{}", common::text(&o));
    assert_eq!(json_of(&o)["reason"], "guest_panicked");
    e.assert_clean("pn", None);
}

#[test]
fn cloud_hypervisor_launch_timeout_and_sigterm_stop_in_order() {
    let Some(e) = Env::new(
        "cloud_hypervisor_launch_timeout_and_sigterm_stop_in_order",
        Which::Standin,
    ) else {
        return;
    };
    // The stand-in guest without a hook never powers off.
    let t0 = Instant::now();
    let o = e.launch("to", &["--timeout", "1s", "--json"]);
    assert_eq!(o.status.code(), Some(71), "{}", common::text(&o));
    assert!(t0.elapsed() < Duration::from_secs(10));
    let j = json_of(&o);
    assert_eq!(j["reason"], "timeout");
    assert!(
        j["detail"]
            .as_str()
            .unwrap()
            .contains("vm.shutdown + vmm.shutdown"),
        "{j}"
    );
    e.assert_clean("to", None);

    let mut c = e.spawn_launch("sig", &[]);
    let st = e.wait_running("sig", &mut c);
    let vmm_pid = st["vmm_pid"].as_i64().unwrap();
    kill(c.id() as i64, libc::SIGTERM);
    let o = wait_child(&mut c, Duration::from_secs(20));
    assert_eq!(o.status.code(), Some(128 + 15), "{}", common::text(&o));
    assert!(stderr(&o).contains("SIGTERM"), "{}", common::text(&o));
    e.assert_clean("sig", Some(vmm_pid));
}

#[test]
fn cloud_hypervisor_launch_vmm_killed_reports_crash_and_cleans() {
    let Some(e) = Env::new(
        "cloud_hypervisor_launch_vmm_killed_reports_crash_and_cleans",
        Which::Any,
    ) else {
        return;
    };
    let mut c = e.spawn_launch("crash", &["--json"]);
    let st = e.wait_running("crash", &mut c);
    let vmm_pid = st["vmm_pid"].as_i64().unwrap();
    assert!(e.links().contains(&identity("crash").tap));
    kill(vmm_pid, libc::SIGKILL);
    let o = wait_child(&mut c, Duration::from_secs(20));
    assert_eq!(o.status.code(), Some(70), "{}", common::text(&o));
    let j = json_of(&o);
    assert_eq!(j["reason"], "vmm_crashed");
    assert!(
        j["detail"].as_str().unwrap().contains("killed by SIGKILL"),
        "{j}"
    );
    e.assert_clean("crash", Some(vmm_pid));
}

#[test]
fn cloud_hypervisor_launch_chvkit_killed_then_gc_cleans() {
    let Some(e) = Env::new(
        "cloud_hypervisor_launch_chvkit_killed_then_gc_cleans",
        Which::Any,
    ) else {
        return;
    };
    let mut c = e.spawn_launch("orphan", &[]);
    let st = e.wait_running("orphan", &mut c);
    let vmm_pid = st["vmm_pid"].as_i64().unwrap();
    kill(c.id() as i64, libc::SIGKILL);
    let _ = c.wait();
    // The VMM dies with its supervisor (PR_SET_PDEATHSIG); the persistent TAP, the run dir
    // and the disk stay behind for gc.
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(vmm_pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!alive(vmm_pid), "VMM survived its supervisor");
    let tap = identity("orphan").tap;
    assert!(e.links().contains(&tap));
    assert!(
        e.run_dir("orphan").join("api.sock").exists(),
        "SIGKILL leaves the socket"
    );
    assert!(!e.disks().is_empty());
    let ls = e.chvkit(&["vm", "ls", "--json"]);
    assert_eq!(json_of(&ls)[0]["state"], "dead", "{}", common::text(&ls));

    let o = e.chvkit(&["gc", "--dry-run"]);
    assert!(o.status.success(), "{}", common::text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains(&format!("would delete TAP {tap}")));
    assert!(e.run_dir("orphan").exists(), "dry run removed something");
    let o = e.chvkit(&["gc"]);
    assert!(o.status.success(), "{}", common::text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains(&format!("delete TAP {tap}")) && out.contains("remove run dir"),
        "{out}"
    );
    e.assert_clean("orphan", Some(vmm_pid));
    // A second gc finds nothing.
    let o = e.chvkit(&["gc"]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("gc: 0 dead job(s) collected"),
        "{}",
        common::text(&o)
    );
}

#[test]
fn cloud_hypervisor_launch_tap_held_names_the_holder() {
    let Some(e) = Env::new(
        "cloud_hypervisor_launch_tap_held_names_the_holder",
        Which::Any,
    ) else {
        return;
    };
    let tap = identity("held").tap;
    // Hold the TAP from a thread of this test process inside the namespace.
    let ns = e.ns.name.clone();
    let t = tap.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        let f = fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let fd = open_tap(&t);
        tx.send(()).unwrap();
        let _ = done_rx.recv();
        drop(fd);
    });
    rx.recv().unwrap();
    let o = e.launch("held", &[]);
    assert_eq!(o.status.code(), Some(1), "{}", common::text(&o));
    let err = stderr(&o);
    let me = std::process::id();
    assert!(
        err.contains(&format!("TAP {tap} is already in use by pid {me}")),
        "{}",
        common::text(&o)
    );
    // chvkit created nothing, and did not touch the holder's TAP.
    assert!(!e.run_dir("held").exists());
    assert!(e.disks().is_empty());
    assert!(e.links().contains(&tap));
    // Detached, the supervisor meets the held TAP after it started the VMM: the same error
    // reaches the user through its report, the VMM is gone, and the holder's TAP is left alone.
    let o = e.launch("held", &["--detach"]);
    assert_eq!(o.status.code(), Some(1), "{}", common::text(&o));
    assert!(
        stderr(&o).contains(&format!("TAP {tap} is already in use by pid {me}")),
        "{}",
        common::text(&o)
    );
    assert!(!e.run_dir("held").exists());
    assert!(!e.runtime().join("held.lock").exists());
    assert!(e.disks().is_empty(), "{:?}", e.disks());
    assert!(e.links().contains(&tap), "{}", e.links());
    done_tx.send(()).unwrap();
    holder.join().unwrap();
}

/// Open (creating) a non-persistent TAP and keep the fd.
fn open_tap(name: &str) -> fs::File {
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .unwrap();
    let mut r = IfReq {
        name: [0; 16],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
        _pad: [0; 22],
    };
    r.name[..name.len()].copy_from_slice(name.as_bytes());
    use std::os::fd::AsRawFd;
    // SAFETY: TUNSETIFF with a valid ifreq.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), 0x4004_54ca, &mut r) };
    assert_eq!(rc, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
    f
}

#[test]
fn cloud_hypervisor_launch_boot_failures_leave_nothing() {
    let Some(e) = Env::new(
        "cloud_hypervisor_launch_boot_failures_leave_nothing",
        Which::Any,
    ) else {
        return;
    };
    // A missing kernel: refused before anything is created.
    let o = e.chvkit(&[
        "launch",
        "--rootfs",
        e.rootfs.to_str().unwrap(),
        "--kernel",
        "/nonexistent/vmlinuz",
        "--bridge",
        "br0",
        "--job-id",
        "nok",
    ]);
    assert_eq!(o.status.code(), Some(72), "{}", common::text(&o));
    assert!(
        stderr(&o).contains("kernel /nonexistent/vmlinuz (from --kernel)"),
        "{}",
        common::text(&o)
    );
    e.assert_clean("nok", None);
    assert!(e.runtime_entries().is_empty(), "{:?}", e.runtime_entries());

    // A kernel file the VMM cannot load: vm.boot fails once (never retried), with its message chain.
    let junk = e.work.path().join("junk-kernel");
    fs::write(&junk, vec![0x5au8; 64 * 1024]).unwrap();
    let o = e.chvkit(&[
        "launch",
        "--rootfs",
        e.rootfs.to_str().unwrap(),
        "--kernel",
        junk.to_str().unwrap(),
        "--bridge",
        "br0",
        "--job-id",
        "junk",
        "--memory",
        "128",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(72), "{}", common::text(&o));
    let err = stderr(&o);
    assert!(
        err.contains("vm.boot failed (HTTP 500): Error from API: The VM could not boot"),
        "{}",
        common::text(&o)
    );
    assert_eq!(json_of(&o)["reason"], "boot_failed");
    e.assert_clean("junk", None);

    // Firmware boot of a raw ext4 rootfs is refused with the reason (facts §1).
    let fw = e.work.path().join("hypervisor-fw");
    fs::write(&fw, b"firmware").unwrap();
    let o = e.chvkit(&[
        "launch",
        "--rootfs",
        e.rootfs.to_str().unwrap(),
        "--firmware",
        fw.to_str().unwrap(),
        "--bridge",
        "br0",
        "--job-id",
        "fw",
    ]);
    assert_eq!(o.status.code(), Some(72), "{}", common::text(&o));
    let err = stderr(&o);
    assert!(
        err.contains("bare ext2/3/4 filesystem")
            && err.contains("EFI System Partition")
            && err.contains("--kernel"),
        "{err}"
    );
    e.assert_clean("fw", None);

    // A missing bridge is a setup failure that names it, and cleans what it created.
    let o = e.chvkit(&[
        "launch",
        "--rootfs",
        e.rootfs.to_str().unwrap(),
        "--kernel",
        e.kernel.to_str().unwrap(),
        "--bridge",
        "nobr0",
        "--job-id",
        "nobr",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", common::text(&o));
    assert!(
        stderr(&o).contains("bridge nobr0 does not exist"),
        "{}",
        common::text(&o)
    );
    e.assert_clean("nobr", None);

    // A VMM that dies before answering on the socket chvkit bound for it: boot failure with its
    // exit status and log (not a reset connection, not a 10 s wait), foreground and detached.
    let dying = e.work.path().join("dying-vmm");
    fs::write(
        &dying,
        "#!/bin/sh\necho 'Error: cannot start: simulated startup failure' >&2\nexit 3\n",
    )
    .unwrap();
    fs::set_permissions(&dying, fs::Permissions::from_mode(0o755)).unwrap();
    for (job, detach) in [("dies", false), ("diesd", true)] {
        let mut args = e.launch_args(job, &["--json"]);
        if detach {
            args.push("--detach".into());
        }
        let t0 = Instant::now();
        let o = e
            .cmd(&args.iter().map(String::as_str).collect::<Vec<_>>())
            .env("CHV_BIN", &dying)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(72), "{}", common::text(&o));
        let err = stderr(&o);
        assert!(
            err.contains("exited (exit status 3) before answering on its API socket")
                && err.contains("simulated startup failure"),
            "{}",
            common::text(&o)
        );
        assert_eq!(json_of(&o)["reason"], "boot_failed");
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        e.assert_clean(job, None);
    }

    // Bad job ids are usage errors naming the value.
    for bad in ["../x", "a b", "-x"] {
        let arg = format!("--job-id={bad}");
        let o = e.chvkit(&["launch", "--rootfs", e.rootfs.to_str().unwrap(), &arg]);
        assert_eq!(o.status.code(), Some(2), "{bad}: {}", common::text(&o));
        assert!(
            stderr(&o).contains(&format!("{bad:?}")),
            "{}",
            common::text(&o)
        );
    }
}

#[test]
fn cloud_hypervisor_launch_detached_lifecycle() {
    let Some(e) = Env::new("cloud_hypervisor_launch_detached_lifecycle", Which::Any) else {
        return;
    };
    let o = e.launch("life", &["--detach", "--json"]);
    assert!(o.status.success(), "{}", common::text(&o));
    let j = json_of(&o);
    let vmm_pid = j["vmm_pid"].as_i64().unwrap();
    let id = identity("life");
    assert_eq!(j["tap"], id.tap);
    assert_eq!(j["ip"], id.ip_cidr());

    let ls = json_of(&e.chvkit(&["vm", "ls", "--json"]));
    assert_eq!(ls[0]["job_id"], "life");
    assert_eq!(ls[0]["state"], "running", "{ls}");
    assert_eq!(ls[0]["pid"], vmm_pid);
    // The TAP is a port of the bridge, isolated, up.
    let br = e.ns.sh_ok(&format!("bridge -d link show dev {}", id.tap));
    assert!(
        br.contains("master br0") && br.contains("isolated on"),
        "{br}"
    );
    assert!(e
        .ns
        .sh_ok(&format!("ip -br link show dev {}", id.tap))
        .contains("UP"));
    // Serial and event logs in the run dir.
    let rd = e.run_dir("life");
    assert!(rd.join("serial.log").exists());
    let mode = fs::metadata(&rd).unwrap().permissions().mode() & 0o777;
    // Jailed (`--jail auto` on a host that can): root:<job gid> 0710, the job may only enter.
    let jailed = e.state("life").is_some_and(|s| !s["jail"].is_null());
    assert_eq!(mode, if jailed { 0o710 } else { 0o700 });
    let deadline = Instant::now() + Duration::from_secs(5);
    while !fs::read_to_string(rd.join("events.log"))
        .unwrap_or_default()
        .contains("\"booted\"")
    {
        assert!(Instant::now() < deadline, "no booted event");
        std::thread::sleep(Duration::from_millis(20));
    }
    let info = json_of(&e.chvkit(&["vm", "info", "life", "--json"]));
    let cfg = &info["vm_info"]["config"];
    assert_eq!(cfg["net"][0]["tap"], id.tap);
    assert_eq!(cfg["net"][0]["mac"], id.mac.to_string());
    assert_eq!(cfg["serial"]["mode"], "File");
    assert_eq!(cfg["console"]["mode"], "Off");
    assert_eq!(cfg["cpus"]["boot_vcpus"], 1);
    assert_eq!(cfg["memory"]["size"], 128u64 << 20);
    assert!(cfg["payload"]["cmdline"]
        .as_str()
        .unwrap()
        .starts_with("console=ttyS0 root=/dev/vda rw"));
    assert!(cfg["payload"]["cmdline"]
        .as_str()
        .unwrap()
        .ends_with("chvkit.env=/dev/vdb"));
    assert_eq!(cfg["disks"][1]["readonly"], true);
    assert_eq!(info["state"]["landlock"], cfg["landlock_enable"]);

    // Pause / resume round trip.
    assert!(e.chvkit(&["vm", "pause", "life"]).status.success());
    assert_eq!(
        json_of(&e.chvkit(&["vm", "ls", "--json"]))[0]["state"],
        "paused"
    );
    assert!(e.chvkit(&["vm", "resume", "life"]).status.success());
    assert_eq!(
        json_of(&e.chvkit(&["vm", "ls", "--json"]))[0]["state"],
        "running"
    );

    // Snapshot: succeeds, or (PVM host) fails with the host's error named — and the VM runs on.
    let snap = e.root.path().join("var/lib/chvkit/snapshots/life-1");
    let o = e.chvkit(&["vm", "snapshot", "life", snap.to_str().unwrap()]);
    if o.status.success() {
        for f in ["config.json", "state.json", "memory-ranges", "chvkit.json"] {
            assert!(snap.join(f).exists(), "{f} missing");
        }
        vmm::notice(e.test, "vm snapshot succeeded");
    } else {
        let err = stderr(&o);
        assert!(
            err.contains("GetNestedState") && err.contains("hint:"),
            "{}",
            common::text(&o)
        );
        // DIR as it was (it did not exist), and no temporary left beside it.
        assert!(!snap.exists(), "half-written snapshot left");
        assert_eq!(snapshot_temporaries(&e), Vec::<String>::new());
        vmm::notice(
            e.test,
            "vm snapshot failed with the host's GetNestedState error (reported clearly)",
        );
    }
    assert_eq!(
        json_of(&e.chvkit(&["vm", "ls", "--json"]))[0]["state"],
        "running"
    );
    assert!(e.chvkit(&["vm", "logs", "life"]).status.success());

    // Stop: no process, TAP, socket, run dir, disk or lock left.
    let o = e.chvkit(&["vm", "stop", "life"]);
    assert!(o.status.success(), "{}", common::text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("life stopped"));
    e.assert_clean("life", Some(vmm_pid));
    let o = e.chvkit(&["vm", "stop", "life"]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "stopping a gone job: {}",
        common::text(&o)
    );
}

#[test]
fn cloud_hypervisor_launch_snapshot_stop_and_restore() {
    let Some(e) = Env::new(
        "cloud_hypervisor_launch_snapshot_stop_and_restore",
        Which::Standin,
    ) else {
        return;
    };
    let o = e.launch("src", &["--detach", "--json"]);
    assert!(o.status.success(), "{}", common::text(&o));
    let snap = e.root.path().join("var/lib/chvkit/snapshots/s1");
    let o = e.chvkit(&["vm", "snapshot", "src", snap.to_str().unwrap(), "--stop"]);
    assert!(o.status.success(), "{}", common::text(&o));
    // The job is gone, its disk moved into the snapshot.
    e.assert_clean("src", None);
    assert!(snap.join("disk.qcow2").exists() && snap.join("env.img").exists());

    // Restore twice: under its own id, and as a second job (new TAP, same guest identity).
    for (job, args) in [("src", vec![]), ("copy", vec!["--job-id", "copy"])] {
        let mut a = vec!["vm", "restore", snap.to_str().unwrap(), "--json"];
        a.extend(args);
        let o = e.chvkit(&a);
        assert!(o.status.success(), "{}", common::text(&o));
        let j = json_of(&o);
        assert!(j["restore_ms"].as_u64().is_some(), "{j}");
        assert_eq!(j["tap"], identity(job).tap);
        assert_eq!(j["ip"], identity("src").ip_cidr());
        assert_eq!(j["mac"], identity("src").mac.to_string());
        let br =
            e.ns.sh_ok(&format!("bridge -d link show dev {}", identity(job).tap));
        assert!(br.contains("isolated on"), "{br}");
    }
    let ls = json_of(&e.chvkit(&["vm", "ls", "--json"]));
    assert_eq!(ls.as_array().unwrap().len(), 2);
    assert!(
        ls.as_array()
            .unwrap()
            .iter()
            .all(|r| r["state"] == "running"),
        "{ls}"
    );
    for job in ["src", "copy"] {
        let o = e.chvkit(&["vm", "stop", job]);
        assert!(o.status.success(), "{}", common::text(&o));
        e.assert_clean(job, None);
    }
    // The snapshot itself is untouched by the restores.
    assert!(snap.join("disk.qcow2").exists());

    // A restore of a directory that is not a snapshot explains itself.
    let o = e.chvkit(&["vm", "restore", e.work.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("is not a chvkit snapshot"),
        "{}",
        common::text(&o)
    );
}

#[test]
fn cloud_hypervisor_launch_snapshot_error_on_pvm_host_is_clear() {
    let Some(e) = Env::new(
        "cloud_hypervisor_launch_snapshot_error_on_pvm_host_is_clear",
        Which::Standin,
    ) else {
        return;
    };
    // The stand-in reproduces this host's KVM failure when asked to.
    let mut c = e.cmd(
        &e.launch_args("pvm", &["--detach"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let o = c.env("CHV_STANDIN_PVM", "1").output().unwrap();
    assert!(o.status.success(), "{}", common::text(&o));
    let snap = e.root.path().join("var/lib/chvkit/snapshots/p");
    let o = e.chvkit(&["vm", "snapshot", "pvm", snap.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", common::text(&o));
    let err = stderr(&o);
    assert!(
        err.contains("GetNestedState(Invalid argument (os error 22))"),
        "{err}"
    );
    assert!(!err.contains("Stack backtrace"), "{err}");
    assert_eq!(
        json_of(&e.chvkit(&["vm", "ls", "--json"]))[0]["state"],
        "running"
    );
    // Outside the Landlock-allowed directories the same (the VMM writes beneath the state
    // dir, chvkit moves the result): the host's error, and no DIR, no temporary left.
    let elsewhere = e.work.path().join("elsewhere");
    let o = e.chvkit(&["vm", "snapshot", "pvm", elsewhere.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", common::text(&o));
    assert!(
        stderr(&o).contains("GetNestedState"),
        "{}",
        common::text(&o)
    );
    assert!(!elsewhere.exists());
    assert_eq!(snapshot_temporaries(&e), Vec::<String>::new());
    assert!(e.chvkit(&["vm", "stop", "pvm"]).status.success());
    e.assert_clean("pvm", None);
}

/// Leftover `.tmp-*` directories beneath the state dir's snapshots directory.
fn snapshot_temporaries(e: &Env) -> Vec<String> {
    fs::read_dir(e.root.path().join("var/lib/chvkit/snapshots"))
        .map(|rd| {
            rd.flatten()
                .map(|d| d.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(".tmp-"))
                .collect()
        })
        .unwrap_or_default()
}

fn names_in(d: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(d)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// `vm snapshot JOB DIR` delivers into any DIR: the (Landlocked) VMM writes beneath the state
/// dir, chvkit renames the result into place on the same filesystem and copies it (synced,
/// then renamed) across filesystems. A failure leaves DIR as it was and names the cause.
#[test]
fn cloud_hypervisor_launch_snapshot_into_any_dir() {
    let Some(e) = Env::new(
        "cloud_hypervisor_launch_snapshot_into_any_dir",
        Which::Standin,
    ) else {
        return;
    };
    let o = e.launch("any", &["--detach", "--json"]);
    assert!(o.status.success(), "{}", common::text(&o));
    let expect = [
        "chvkit.json",
        "config.json",
        "env.img",
        "memory-ranges",
        "state.json",
    ];

    // Outside the state dir, same filesystem, parent created.
    let snap = e.work.path().join("out/s1");
    let o = e.chvkit(&["vm", "snapshot", "any", snap.to_str().unwrap()]);
    assert!(o.status.success(), "{}", common::text(&o));
    assert_eq!(names_in(&snap), expect);
    assert_eq!(names_in(&e.work.path().join("out")), ["s1"]);
    assert_eq!(snapshot_temporaries(&e), Vec::<String>::new());
    let o = e.chvkit(&[
        "vm",
        "restore",
        snap.to_str().unwrap(),
        "--job-id",
        "r1",
        "--json",
    ]);
    assert!(o.status.success(), "{}", common::text(&o));
    assert_eq!(json_of(&o)["tap"], identity("r1").tap);
    assert!(e.chvkit(&["vm", "stop", "r1"]).status.success());
    e.assert_clean("r1", None);

    // Another filesystem (tmpfs): copied, and an empty DIR that exists is fine.
    let shm_dev = fs::metadata("/dev/shm").map(|m| std::os::unix::fs::MetadataExt::dev(&m));
    let root_dev = std::os::unix::fs::MetadataExt::dev(&fs::metadata(e.root.path()).unwrap());
    if shm_dev.as_ref().is_ok_and(|d| *d != root_dev) {
        let base = PathBuf::from(format!("/dev/shm/chvkit-test-{}", std::process::id()));
        let snap2 = base.join("s2");
        fs::create_dir_all(&snap2).unwrap();
        let o = e.chvkit(&["vm", "snapshot", "any", snap2.to_str().unwrap()]);
        let listed = names_in(&snap2);
        let beside = names_in(&base);
        let restored = e.chvkit(&["vm", "restore", snap2.to_str().unwrap(), "--job-id", "r2"]);
        let _ = e.chvkit(&["vm", "stop", "r2"]);
        let _ = fs::remove_dir_all(&base);
        assert!(o.status.success(), "{}", common::text(&o));
        assert_eq!(listed, expect);
        assert_eq!(
            beside,
            ["s2"],
            "a copy's staging directory was left beside DIR"
        );
        assert_eq!(snapshot_temporaries(&e), Vec::<String>::new());
        assert!(restored.status.success(), "{}", common::text(&restored));
        e.assert_clean("r2", None);
    } else {
        common::skip(
            "cloud_hypervisor_launch_snapshot_into_any_dir",
            "/dev/shm is not another filesystem here: cross-filesystem copy not checked",
        );
    }

    // A file in the way: refused, the file untouched.
    let file = e.work.path().join("a-file");
    fs::write(&file, b"mine").unwrap();
    let o = e.chvkit(&["vm", "snapshot", "any", file.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", common::text(&o));
    assert!(
        stderr(&o).contains("is not a directory"),
        "{}",
        common::text(&o)
    );
    assert_eq!(fs::read(&file).unwrap(), b"mine");

    // Failures on another filesystem, in a private mount namespace: a tmpfs too small for the
    // memory file (the copy fails midway: ENOSPC), and a read-only one.
    let biggest = fs::read_dir(&snap)
        .unwrap()
        .flatten()
        .map(|d| d.metadata().unwrap().len())
        .max()
        .unwrap();
    assert!(
        biggest > 256 << 10,
        "the stand-in's memory file is {biggest} bytes"
    );
    let m = e.work.path().join("mnt");
    fs::create_dir_all(&m).unwrap();
    let script = r#"set -u
m=$1; chvkit=$2; root=$3
mount -t tmpfs -o size=128k,mode=0700 tmpfs "$m/" || exit 90
"$chvkit" --root "$root" vm snapshot any "$m/s3"; echo "rc=$?"
echo "left:$(ls -A "$m")"
mount -o remount,ro "$m" || exit 91
"$chvkit" --root "$root" vm snapshot any "$m/s4"; echo "rc=$?"
echo "left:$(ls -A "$m")"
"#;
    let o = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", script, "sh"])
        .arg(&m)
        .arg(common::chvkit())
        .arg(e.root.path())
        .env("CHV_BIN", &e.bin.path)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let text = common::text(&o);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let err = stderr(&o);
    assert!(o.status.success(), "{text}");
    assert_eq!(
        out.lines()
            .filter(|l| l.starts_with("rc="))
            .collect::<Vec<_>>(),
        ["rc=1", "rc=1"],
        "{text}"
    );
    assert_eq!(
        out.lines()
            .filter(|l| l.starts_with("left:"))
            .collect::<Vec<_>>(),
        ["left:", "left:"],
        "DIR or a partial copy left behind: {text}"
    );
    assert!(
        err.contains("No space left on device") && err.contains(&format!("{}/s3", m.display())),
        "{text}"
    );
    assert!(err.contains("Read-only file system"), "{text}");
    assert!(!m.join("s3").exists() && !m.join("s4").exists());
    assert_eq!(snapshot_temporaries(&e), Vec::<String>::new());

    // The job ran on through all of it.
    assert_eq!(
        json_of(&e.chvkit(&["vm", "ls", "--json"]))[0]["state"],
        "running"
    );
    assert!(e.chvkit(&["vm", "stop", "any"]).status.success());
    e.assert_clean("any", None);
}

#[test]
fn cloud_hypervisor_launch_32_concurrent() {
    let Some(e) = Env::new("cloud_hypervisor_launch_32_concurrent", Which::Standin) else {
        return;
    };
    let t0 = Instant::now();
    let outs: Vec<Output> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..32)
            .map(|i| {
                let e = &e;
                sc.spawn(move || e.launch(&format!("par-{i}"), &["--detach", "--json"]))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let launched = t0.elapsed();
    let mut taps = std::collections::HashSet::new();
    let mut ips = std::collections::HashSet::new();
    let mut macs = std::collections::HashSet::new();
    for o in &outs {
        assert!(o.status.success(), "{}", common::text(o));
        let j = json_of(o);
        assert!(taps.insert(j["tap"].as_str().unwrap().to_string()));
        assert!(ips.insert(j["ip"].as_str().unwrap().to_string()));
        assert!(macs.insert(j["mac"].as_str().unwrap().to_string()));
    }
    assert_eq!((taps.len(), ips.len(), macs.len()), (32, 32, 32));
    let links = e.links();
    assert_eq!(
        links.lines().filter(|l| l.starts_with("chv-")).count(),
        32,
        "{links}"
    );
    let ls = json_of(&e.chvkit(&["vm", "ls", "--json"]));
    assert_eq!(
        ls.as_array()
            .unwrap()
            .iter()
            .filter(|r| r["state"] == "running")
            .count(),
        32
    );
    // Jailed (`--jail auto` on a host that can): each job has its own cgroup, and no job's
    // cgroup may outlive it.
    let cg_names: Vec<String> = (0..32)
        .map(|i| chvkit::jail::cgroup_name(&format!("par-{i}"), &e.runtime()))
        .collect();
    let live_cgroups = || -> usize {
        chvkit::jail::cgroup::job_cgroups()
            .iter()
            .filter(|(n, _)| cg_names.contains(n))
            .count()
    };
    let jailed = e.state("par-0").is_some_and(|s| !s["jail"].is_null());
    if jailed {
        assert_eq!(live_cgroups(), 32);
    }
    let t1 = Instant::now();
    let stops: Vec<Output> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..32)
            .map(|i| {
                let e = &e;
                sc.spawn(move || e.chvkit(&["vm", "stop", &format!("par-{i}")]))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for o in &stops {
        assert!(o.status.success(), "{}", common::text(o));
    }
    vmm::notice(
        e.test,
        &format!(
            "32 launches in {:?}, 32 stops in {:?}; jailed: {jailed}",
            launched,
            t1.elapsed()
        ),
    );
    for i in 0..32 {
        e.assert_clean(&format!("par-{i}"), None);
    }
    assert!(!e.links().contains("chv-"));
    assert_eq!(fs::read_dir(e.runtime()).unwrap().count(), 0);
    assert_eq!(live_cgroups(), 0, "job cgroups left");
}

#[test]
fn cloud_hypervisor_launch_seed_config_and_kernel_precedence() {
    let Some(e) = Env::new(
        "cloud_hypervisor_launch_seed_config_and_kernel_precedence",
        Which::Standin,
    ) else {
        return;
    };
    // The seed's JSON, as is: firmware_path and a raw rootfs.
    let fw = e.work.path().join("hypervisor-fw");
    fs::write(&fw, b"fw").unwrap();
    let cfg = e.work.path().join("seed.json");
    fs::write(
        &cfg,
        serde_json::json!({
            "firmware_path": fw, "rootfs_path": e.rootfs, "vcpu_count": 1, "mem_size_mib": 128,
            "network": { "bridge_name": "br0", "guest_mac": "" }
        })
        .to_string(),
    )
    .unwrap();
    // With CHV_KERNEL_PATH (the seed's own recipe) it boots the kernel directly.
    let o = e
        .cmd(&[
            "launch",
            "--config",
            cfg.to_str().unwrap(),
            "--job-id",
            "seed",
            "--cmdline",
            "standin.exit=5",
            "--json",
        ])
        .env("CHV_KERNEL_PATH", &e.kernel)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(5), "{}", common::text(&o));
    e.assert_clean("seed", None);
    // Without a kernel it would be firmware boot of a raw ext4 disk: refused, explained.
    let o = e.chvkit(&[
        "launch",
        "--config",
        cfg.to_str().unwrap(),
        "--job-id",
        "seed",
    ]);
    assert_eq!(o.status.code(), Some(72), "{}", common::text(&o));
    assert!(
        stderr(&o).contains("EFI System Partition"),
        "{}",
        common::text(&o)
    );

    // YAML with kernel_path, cmdline and a MAC; flags override the file.
    let y = e.work.path().join("job.yaml");
    fs::write(
        &y,
        format!(
            "kernel_path: {}\nrootfs_path: {}\nvcpu_count: 1\nmem_size_mib: 128\ncmdline: standin.exit=6\nnetwork:\n  bridge_name: br0\n  guest_mac: 02:11:22:33:44:55\n",
            e.kernel.display(),
            e.rootfs.display()
        ),
    )
    .unwrap();
    let o = e.chvkit(&[
        "launch",
        "--config",
        y.to_str().unwrap(),
        "--job-id",
        "yml",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(6), "{}", common::text(&o));
    assert_eq!(json_of(&o)["mac"], "02:11:22:33:44:55");
    let o = e.chvkit(&[
        "launch",
        "--config",
        y.to_str().unwrap(),
        "--job-id",
        "yml",
        "--cmdline",
        "standin.exit=7",
    ]);
    assert_eq!(o.status.code(), Some(7), "{}", common::text(&o));
    e.assert_clean("yml", None);

    // An unknown key is a usage error naming file and key.
    fs::write(&y, "vcpus: 2\n").unwrap();
    let o = e.chvkit(&["launch", "--config", y.to_str().unwrap(), "--job-id", "bad"]);
    assert_eq!(o.status.code(), Some(2), "{}", common::text(&o));
    assert!(
        stderr(&o).contains("job.yaml") && stderr(&o).contains("vcpus"),
        "{}",
        common::text(&o)
    );
}

#[test]
fn cloud_hypervisor_launch_env_disk_carries_checker_env() {
    let Some(e) = Env::new(
        "cloud_hypervisor_launch_env_disk_carries_checker_env",
        Which::Standin,
    ) else {
        return;
    };
    let o = e.launch(
        "envj",
        &[
            "--detach",
            "--env",
            "GREETING=it's $(not run)",
            "--api-url",
            "http://[fdcd::1]:9999",
        ],
    );
    assert!(o.status.success(), "{}", common::text(&o));
    let img = fs::read(e.run_dir("envj").join("env.img")).unwrap();
    assert_eq!(img.len() % 4096, 0);
    let text: Vec<u8> = img.into_iter().filter(|b| *b != 0).collect();
    let envf = e.work.path().join("checker.env");
    fs::write(&envf, &text).unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            ". {}; printf '%s|%s|%s|%s|%s' \"$CHECKER_JOB_ID\" \"$CHECKER_GUEST_IP\" \"$CHECKER_GATEWAY\" \"$CHECKER_API_URL\" \"$GREETING\"",
            envf.display()
        ))
        .output()
        .unwrap();
    let id = identity("envj");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!(
            "envj|{}|fdcd::1|http://[fdcd::1]:9999|it's $(not run)",
            id.ip_cidr()
        )
    );
    // A second launch of a running id is refused, naming it.
    let o = e.launch("envj", &["--detach"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("job envj is already running"),
        "{}",
        common::text(&o)
    );
    assert!(e.chvkit(&["vm", "stop", "envj"]).status.success());
    e.assert_clean("envj", None);
}

/// A `chvkit rootfs` image has an env slot: launch writes checker.env into the job's disk
/// (never the image), sends one disk, and tells /init on the command line. The VMM's side is
/// the stand-in's (the real guest reading it is tests/guest_e2e.rs); the disk's contents are
/// checked with e2fsprogs and QEMU's qcow2 reader.
#[test]
fn cloud_hypervisor_launch_env_slot_carries_checker_env() {
    let t = "cloud_hypervisor_launch_env_slot_carries_checker_env";
    if !common::require(t, true, &["debugfs", "e2fsck", "qemu-img"]) {
        return;
    }
    let Some(mut e) = Env::new(t, Which::Standin) else {
        return;
    };
    let tree = e.work.path().join("tree");
    fs::create_dir_all(tree.join("etc")).unwrap();
    let slot = tree.join("etc/checker.env");
    fs::write(&slot, chvkit::rootfs::envslot::placeholder()).unwrap();
    fs::set_permissions(&slot, fs::Permissions::from_mode(0o600)).unwrap();
    let img = e.work.path().join("slot.raw");
    let o = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&tree)
        .arg(&img)
        .arg("64M")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", common::text(&o));
    let img_before = fs::read(&img).unwrap();
    e.rootfs = img.clone();
    let o = e.launch(
        "slotj",
        &[
            "--detach",
            "--env",
            "GREETING=it's $(not run)",
            "--api-url",
            "http://[fdcd::1]:9999",
        ],
    );
    assert!(o.status.success(), "{}", common::text(&o));
    assert!(
        !e.run_dir("slotj").join("env.img").exists(),
        "an env disk was written"
    );
    let info = json_of(&e.chvkit(&["vm", "info", "slotj", "--json"]));
    let cfg = &info["vm_info"]["config"];
    assert_eq!(cfg["disks"].as_array().map(Vec::len), Some(1), "{cfg}");
    assert!(
        cfg["payload"]["cmdline"]
            .as_str()
            .unwrap()
            .ends_with(" chvkit.env=/etc/checker.env"),
        "{cfg}"
    );
    // The job's disk, as a guest sees it: a clean filesystem whose checker.env is exactly the
    // job's environment.
    let flat = e.work.path().join("flat.raw");
    let o = Command::new("qemu-img")
        // No locking: the (stand-in) VMM holds the image open.
        .args(["convert", "--image-opts"])
        .arg(format!(
            "driver=qcow2,file.driver=file,file.locking=off,file.filename={}",
            e.disk_of("slotj").display()
        ))
        .args(["-O", "raw"])
        .arg(&flat)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", common::text(&o));
    let o = Command::new("e2fsck")
        .arg("-fn")
        .arg(&flat)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", common::text(&o));
    let o = Command::new("debugfs")
        .args(["-R", "cat /etc/checker.env"])
        .arg(&flat)
        .output()
        .unwrap();
    let envf = e.work.path().join("checker.env");
    fs::write(&envf, &o.stdout).unwrap();
    let id = identity("slotj");
    let expect = chvkit::envfile::render(
        &chvkit::launch::config::checker_env(&id, "http://[fdcd::1]:9999")
            .into_iter()
            .chain([("GREETING".to_string(), "it's $(not run)".to_string())])
            .collect::<Vec<_>>(),
    )
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout), expect);
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            ". {}; printf '%s|%s' \"$CHECKER_JOB_ID\" \"$GREETING\"",
            envf.display()
        ))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "slotj|it's $(not run)"
    );
    assert!(
        fs::read(&img).unwrap() == img_before,
        "the image was written"
    );
    assert!(e.chvkit(&["vm", "stop", "slotj"]).status.success());
    e.assert_clean("slotj", None);
}

#[test]
fn cloud_hypervisor_launch_reflink_disk_on_xfs() {
    let t = "cloud_hypervisor_launch_reflink_disk_on_xfs";
    if !common::require(t, true, &["mkfs.xfs", "unshare", "mount"]) {
        return;
    }
    let Some(e) = Env::new(t, Which::Standin) else {
        return;
    };
    // An XFS filesystem with reflink, mounted in a private mount namespace that only the
    // commands below live in (the host's mount table never sees it).
    let img = e.work.path().join("xfs.img");
    let mnt = e.work.path().join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "truncate -s 400M {0} && mkfs.xfs -q -m reflink=1 {0}",
            img.display()
        ))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", common::text(&o));
    let chv = format!(
        "ip netns exec {} env CHV_BIN={} {} --root {}",
        e.ns.name,
        e.bin.path.display(),
        common::chvkit().display(),
        e.root.path().display()
    );
    let script = format!(
        "set -e; mount -o loop {img} {mnt}; cp --sparse=always {rootfs} {mnt}/rootfs.raw; \
         {chv} launch --rootfs {mnt}/rootfs.raw --kernel {kernel} --bridge br0 --job-id rl \
           --memory 128 --disk-dir {mnt}/disks --detach >/dev/null; \
         {chv} vm info rl --json; \
         ls {mnt}/disks; \
         {chv} vm stop rl >/dev/null; \
         echo left: $(ls {mnt}/disks | wc -l); umount {mnt}",
        img = img.display(),
        mnt = mnt.display(),
        rootfs = e.rootfs.display(),
        kernel = e.kernel.display(),
    );
    let o = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", common::text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let json_end = out.rfind('}').unwrap();
    let info: serde_json::Value = serde_json::from_str(&out[..=json_end]).unwrap();
    assert_eq!(info["state"]["disk"]["kind"], "reflink", "{info}");
    // (v50.0 does not keep `image_type` in its config, so vm.info cannot echo it.)
    let disk0 = info["vm_info"]["config"]["disks"][0]["path"]
        .as_str()
        .unwrap();
    assert!(disk0.ends_with("/disks/rl.raw"), "{info}");
    assert!(out.contains("rl.raw"), "{out}");
    assert!(out.contains("left: 0"), "{out}");
    e.assert_clean("rl", None);
}
