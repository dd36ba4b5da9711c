//! The whole job against the real Cloud Hypervisor and a real guest kernel: `chvkit rootfs` of
//! a small Dockerfile → `chvkit setup` of a fresh network namespace → `chvkit kernel` →
//! `chvkit launch` → the guest kernel boots → the image's generated `/init` runs the workload
//! with its ENV, WORKDIR and args → the job's exit status is chvkit's → nothing is left.
//!
//! Needs: root, the real VMM (`CHV_BIN`; `make test` installs it from `../shared/fixtures` as
//! from an offline mirror, and the snapshot-capable build as `CHV_BIN_SNAP`), and a guest kernel
//! that runs on this host: chvkit's own `build` kernel from the cache `make guest-kernel` fills
//! (`CHVKIT_KERNEL_CACHE`), or only where that cannot be built, the fixture kernel
//! (`CHVKIT_FIXTURE_KERNEL`). Each test without them says `skipped: <reason>`.
//!
//! Boots are slow on PVM hosts (tens of seconds each), so the cases share boots: one job checks
//! status, environment, network and quoting together; one detached job is paused, resumed,
//! snapshotted, restored and stopped.

mod common;
#[path = "guest/mod.rs"]
mod guest;
#[path = "qemu/mod.rs"]
mod qemu;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use chvkit::launch::identity::Identity;

/// Guest size for the tests: one vCPU each, so two guests fit this 2-core host.
const CPUS: &str = "1";
const MEMORY: &str = "256";

/// At most two guests at once (each keeps a CPU busy while it boots): held while it lives.
struct Slot;
static SLOTS: (Mutex<usize>, Condvar) = (Mutex::new(0), Condvar::new());

impl Drop for Slot {
    fn drop(&mut self) {
        let mut n = SLOTS.0.lock().unwrap_or_else(|e| e.into_inner());
        *n -= 1;
        SLOTS.1.notify_one();
    }
}

fn guest_slot() -> Slot {
    let mut n = SLOTS.0.lock().unwrap_or_else(|e| e.into_inner());
    while *n >= 2 {
        n = SLOTS.1.wait(n).unwrap_or_else(|e| e.into_inner());
    }
    *n += 1;
    Slot
}

struct Guest {
    test: &'static str,
    ns: common::NetNs,
    root: tempfile::TempDir,
    logs: tempfile::TempDir,
    vmm: PathBuf,
    _slot: Slot,
}

impl Guest {
    /// A namespace set up by `chvkit setup`, the kernel provided by `chvkit kernel`, the image.
    fn new(test: &'static str) -> Option<Guest> {
        if !common::require(
            test,
            true,
            &["ip", "bridge", "buildah", "umoci", "mkfs.ext4"],
        ) {
            return None;
        }
        let Some(vmm) = std::env::var_os("CHV_BIN").filter(|v| !v.is_empty()) else {
            common::skip(
                test,
                "needs the real Cloud Hypervisor (CHV_BIN; `make test` installs it from ../shared/fixtures)",
            );
            return None;
        };
        let (kernel, which) = match guest::kernel_section() {
            Ok(k) => k,
            Err(why) => {
                common::skip(test, &why);
                return None;
            }
        };
        let img = guest::image().clone();
        let slot = guest_slot();
        let root = tempfile::tempdir().unwrap();
        // The jailed VMM (its own uid) must reach the kernel and the job's files beneath it.
        fs::set_permissions(
            root.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let profile = chvkit::profile::DEFAULT_PROFILE_YAML
            .replace("  source: build\n  path: null", &format!("  {kernel}"));
        assert!(profile.contains(&kernel), "profile has no kernel section");
        fs::write(root.path().join("profile.yaml"), profile).unwrap();
        let g = Guest {
            test,
            ns: common::NetNs::new("ge"),
            root,
            logs: tempfile::tempdir().unwrap(),
            vmm: PathBuf::from(vmm),
            _slot: slot,
        };
        guest::notice(&format!(
            "{test}: VMM {}, kernel: {which}, image {}",
            g.vmm.display(),
            img.display()
        ));
        let o = g.chvkit(&["setup", "--network-only", "--json"]);
        assert!(o.status.success(), "setup: {}", common::text(&o));
        let o = g.chvkit(&["kernel", "--json"]);
        assert!(o.status.success(), "kernel: {}", common::text(&o));
        let k: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let cmdline = k["cmdline"].as_str().unwrap_or_default();
        assert!(cmdline.contains("init=/init"), "{k}");
        if std::path::Path::new("/sys/module/kvm_pvm").exists() {
            // The fixture kernel has PVM changes of its own, without chvkit's marker.
            if kernel.starts_with("source: build") {
                assert_eq!(
                    k["pvm_ready"], true,
                    "a kernel without chvkit's PVM changes: {k}"
                );
            }
            assert!(cmdline.contains("clearcpuid="), "{k}");
        }
        Some(g)
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = self.ns.cmd(common::chvkit());
        c.arg("--root")
            .arg(self.root.path())
            .arg("--profile")
            .arg(self.root.path().join("profile.yaml"))
            .args(args)
            .env("CHV_BIN", &self.vmm)
            .env_remove("CHV_KERNEL_PATH")
            .env("NO_COLOR", "1");
        c
    }

    fn chvkit(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    fn launch_args<'a>(&'a self, job: &'a str, img: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
        // Jailed, or the launch fails: the guest runs under the jail it would have in production.
        let mut v = vec![
            "launch", "--rootfs", img, "--job-id", job, "--cpus", CPUS, "--memory", MEMORY,
            "--jail", "on",
        ];
        v.extend_from_slice(extra);
        v
    }

    fn runtime(&self) -> PathBuf {
        self.root.path().join("run/chvkit")
    }

    fn serial(&self, job: &str) -> String {
        fs::read_to_string(self.runtime().join(job).join("serial.log")).unwrap_or_default()
    }

    /// Wait until the job's serial log has a line containing `what`.
    fn wait_serial(&self, job: &str, what: &str, budget: Duration) -> String {
        let t0 = Instant::now();
        loop {
            let s = self.serial(job);
            if s.contains(what) {
                return s;
            }
            assert!(
                t0.elapsed() < budget,
                "{}: `{what}` not on {job}'s serial console after {budget:?}:\n{}",
                self.test,
                tail(&s)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Nothing of `job` is left: run dir, lock, disks, TAP, VMM process.
    fn assert_clean(&self, job: &str) {
        let rt: Vec<_> = fs::read_dir(self.runtime())
            .map(|r| r.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(
            rt.is_empty(),
            "{}: runtime dir not empty: {rt:?}",
            self.test
        );
        let disks: Vec<_> = fs::read_dir(self.root.path().join("var/lib/chvkit/disks"))
            .map(|r| {
                r.flatten()
                    .map(|e| e.file_name())
                    .filter(|n| n.to_string_lossy().starts_with(job))
                    .collect()
            })
            .unwrap_or_default();
        assert!(disks.is_empty(), "{}: disks left: {disks:?}", self.test);
        let tap = identity(job).tap;
        let links = self.ns.sh_ok("ip -br link");
        assert!(
            !links.contains(&tap),
            "{}: TAP {tap} left:\n{links}",
            self.test
        );
        // Asked from outside: inside, the asking shell would count itself.
        let o = Command::new("ip")
            .args(["netns", "pids", &self.ns.name])
            .output()
            .unwrap();
        let pids = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(
            pids.trim().is_empty(),
            "{}: processes left in the namespace: {pids}",
            self.test
        );
    }
}

fn identity(job: &str) -> Identity {
    let p = chvkit::profile::Profile::embedded().unwrap();
    Identity::derive(job, p.network.prefix, p.network.gateway).unwrap()
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

fn ticks(serial: &str) -> u32 {
    serial
        .lines()
        .filter_map(|l| l.trim().strip_prefix("workload: tick "))
        .filter_map(|n| n.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", common::text(o)))
}

#[test]
fn guest_job_runs_its_workload_and_returns_its_exit_status() {
    let test = "guest_job_runs_its_workload_and_returns_its_exit_status";
    let Some(g) = Guest::new(test) else { return };
    let img = guest::image().to_str().unwrap().to_string();
    let logs = g.logs.path().to_str().unwrap().to_string();
    let job = "e2e-main";
    let t0 = Instant::now();
    let a = g.launch_args(
        job,
        &img,
        &[
            "--env",
            "CHECKER_MODE=main",
            "--env",
            "CHECKER_EVIL='; touch /pwned; '",
            "--timeout",
            "600s",
            "--log-dir",
            &logs,
            "--json",
        ],
    );
    let o = g.chvkit(&a);
    let wall = t0.elapsed();
    let serial = fs::read_to_string(g.logs.path().join(job).join("serial.log")).unwrap_or_default();
    assert_eq!(
        o.status.code(),
        Some(7),
        "{test}: the job's exit status is not chvkit's:\n{}\nserial:\n{}",
        common::text(&o),
        tail(&serial)
    );
    let r = json(&o);
    assert_eq!(r["exit_code"], 7, "{r}");
    assert_eq!(r["reason"], "exited", "{r}");
    // The kernel booted, the generated /init ran the image's command with its ENV, WORKDIR and
    // args, the hostile value arrived as data, the guest had its job-derived address and
    // reached the gateway over the bridge.
    assert!(
        serial.contains("Linux version"),
        "no kernel banner:\n{}",
        tail(&serial)
    );
    assert!(
        serial.contains("args=[arg-one][arg two] cwd=/srv greeting=hello"),
        "{}",
        tail(&serial)
    );
    assert!(
        serial.contains("workload: evil value inert"),
        "{}",
        tail(&serial)
    );
    let ip = identity(job).ip_cidr();
    assert!(
        serial.contains(&format!("inet6 {ip}")),
        "no {ip}:\n{}",
        tail(&serial)
    );
    assert!(
        serial.contains("workload: gateway ping ok"),
        "{}",
        tail(&serial)
    );
    // checker.env came in the job disk's env slot (one disk, no env disk), holding exactly
    // the environment: not the image's 16 KiB placeholder.
    assert!(
        serial.contains("chvkit.env=/etc/checker.env"),
        "the env slot was not used:\n{}",
        tail(&serial)
    );
    let bytes: usize = serial
        .lines()
        .find_map(|l| l.split("workload: env file bytes=").nth(1))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        bytes > 100 && bytes < chvkit::rootfs::envslot::SLOT_LEN,
        "checker.env in the guest is {bytes} bytes:\n{}",
        tail(&serial)
    );
    assert!(serial.contains("CHVKIT_EXIT=7"), "{}", tail(&serial));
    g.assert_clean(job);
    let banner = serial
        .lines()
        .find(|l| l.contains("Linux version"))
        .unwrap_or("");
    let init = serial
        .lines()
        .find(|l| l.contains("workload: start"))
        .unwrap_or("");
    guest::notice(&format!(
        "{test}: job done in {:.1} s wall; kernel printk at `Run /init`: {:?} s\n  {banner}\n  {init}\n  CHVKIT_EXIT=7",
        wall.as_secs_f64(),
        guest::printk_time(&serial, "Run /init as init process"),
    ));
}

#[test]
fn guest_timeout_stops_a_running_job() {
    let test = "guest_timeout_stops_a_running_job";
    let Some(g) = Guest::new(test) else { return };
    let img = guest::image().to_str().unwrap().to_string();
    let logs = g.logs.path().to_str().unwrap().to_string();
    let job = "e2e-timeout";
    // Long enough for the guest to boot and run (tens of seconds here), short enough for CI.
    let timeout = std::env::var("CHVKIT_E2E_TIMEOUT").unwrap_or_else(|_| "90s".into());
    let a = g.launch_args(
        job,
        &img,
        &[
            "--env",
            "CHECKER_MODE=sleep",
            "--timeout",
            &timeout,
            "--log-dir",
            &logs,
            "--json",
        ],
    );
    let o = g.chvkit(&a);
    let serial = fs::read_to_string(g.logs.path().join(job).join("serial.log")).unwrap_or_default();
    let r = json(&o);
    assert_eq!(
        r["reason"],
        "timeout",
        "{}\n{}",
        common::text(&o),
        tail(&serial)
    );
    assert_eq!(o.status.code(), Some(71), "{}", common::text(&o));
    assert!(
        ticks(&serial) >= 1,
        "{test}: the timeout fired before the job ran (raise CHVKIT_E2E_TIMEOUT):\n{}",
        tail(&serial)
    );
    assert!(!serial.contains("CHVKIT_EXIT="), "{}", tail(&serial));
    g.assert_clean(job);
}

#[test]
fn guest_pause_resume_snapshot_restore_and_stop() {
    let test = "guest_pause_resume_snapshot_restore_and_stop";
    let Some(mut g) = Guest::new(test) else {
        return;
    };
    // Snapshots on PVM hosts need the snapshot-capable build (its PROVENANCE.md says why).
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    let snap_bin = std::env::var_os("CHV_BIN_SNAP").filter(|v| !v.is_empty());
    let can_snapshot = match (&snap_bin, pvm) {
        (Some(b), _) => {
            g.vmm = PathBuf::from(b);
            true
        }
        (None, false) => true,
        (None, true) => false,
    };
    let img = guest::image().to_str().unwrap().to_string();
    let job = "e2e-life";
    let a = g.launch_args(
        job,
        &img,
        &["--env", "CHECKER_MODE=sleep", "--detach", "--json"],
    );
    // The snapshot-capable build can die by SIGSYS at exit after snapshot + info unless glibc
    // keeps one malloc arena (its PROVENANCE.md).
    let o = g.cmd(&a).env("MALLOC_ARENA_MAX", "1").output().unwrap();
    assert!(o.status.success(), "{}", common::text(&o));
    let boot = Duration::from_secs(300);
    g.wait_serial(job, "workload: tick 2", boot);
    // The guest runs inside the jail: the VMM has a uid of its own and no capabilities.
    let state: serde_json::Value =
        serde_json::from_slice(&fs::read(g.runtime().join(job).join("state.json")).unwrap())
            .unwrap();
    let pid = state["vmm_pid"].as_i64().expect("vmm_pid");
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.split_whitespace().next().unwrap_or("").to_string())
            .unwrap_or_default()
    };
    assert_ne!(
        field("Uid:"),
        "0",
        "{test}: the VMM runs as root:\n{status}"
    );
    for caps in ["CapEff:", "CapPrm:", "CapBnd:"] {
        assert_eq!(field(caps), "0000000000000000", "{test}: {caps}\n{status}");
    }
    assert_eq!(field("NoNewPrivs:"), "1", "{status}");

    let o = g.chvkit(&["vm", "pause", job]);
    assert!(o.status.success(), "{}", common::text(&o));
    std::thread::sleep(Duration::from_millis(500));
    let paused_at = ticks(&g.serial(job));
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        ticks(&g.serial(job)),
        paused_at,
        "{test}: the guest ran while paused"
    );
    let o = g.chvkit(&["vm", "resume", job]);
    assert!(o.status.success(), "{}", common::text(&o));
    g.wait_serial(
        job,
        &format!("workload: tick {}", paused_at + 2),
        Duration::from_secs(60),
    );

    if can_snapshot {
        // Any directory: chvkit moves what the jailed VMM wrote there.
        let snap = g.logs.path().join("snapshot-of-e2e-life");
        let o = g.chvkit(&["vm", "snapshot", job, snap.to_str().unwrap(), "--stop"]);
        assert!(o.status.success(), "{}", common::text(&o));
        assert!(
            !g.runtime().join(job).exists(),
            "{test}: job left after snapshot --stop"
        );
        let o = g
            .cmd(&["vm", "restore", snap.to_str().unwrap(), "--json"])
            .env("MALLOC_ARENA_MAX", "1")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", common::text(&o));
        // The serial file starts again at restore: the workload goes on counting.
        let s = g.wait_serial(job, "workload: tick", Duration::from_secs(60));
        assert!(
            !s.contains("Linux version"),
            "{test}: the restored guest booted again"
        );
    } else {
        common::skip(
            &format!("{test} (snapshot part)"),
            "this PVM host needs the snapshot-capable VMM (CHV_BIN_SNAP) to snapshot",
        );
    }
    let o = g.chvkit(&["vm", "stop", job]);
    assert!(o.status.success(), "{}", common::text(&o));
    g.assert_clean(job);
}
