//! The launch tests' environment, shared by `tests/cloud_hypervisor_launch.rs` and
//! `tests/jail.rs`: a network namespace with a bridge set up like `chvkit setup` makes it, a
//! `--root`, a small ext4 rootfs, the VMM under test, and what a test asks of a job (its run dir,
//! state, disks, TAP) and of what a job leaves behind.
//!
//! Use with `mod common; mod vmm; mod launch_env;`.
#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use chvkit::launch::identity::Identity;

use crate::{common, vmm};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Which {
    /// Fault paths the stand-in injects on demand (exit status, reboot, panic, crash).
    Standin,
    /// VMM-level behaviour: the real VMM when present.
    Any,
}

pub struct Env {
    pub test: &'static str,
    pub ns: common::NetNs,
    pub root: tempfile::TempDir,
    pub work: tempfile::TempDir,
    pub bin: vmm::Binary,
    pub kernel: PathBuf,
    pub rootfs: PathBuf,
    /// Launches run with `--jail on`.
    jail: bool,
    _heavy: Option<std::sync::MutexGuard<'static, ()>>,
}

impl Drop for Env {
    /// A test that failed midway leaves its jobs running: stop them and collect what is left
    /// (VMMs, TAPs, disks, job cgroups — the cgroups are the host's, not the temp root's).
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for job in self.runtime_entries() {
            let job = job.to_string_lossy().into_owned();
            if !job.starts_with('.') && self.run_dir(&job).is_dir() {
                let _ = self.cmd(&["vm", "stop", &job]).output();
            }
        }
        // No unwrap here: a panic while panicking aborts the whole test binary.
        let _ = self.cmd(&["gc"]).output();
    }
}

pub fn identity(job: &str) -> Identity {
    let p = chvkit::profile::Profile::embedded().unwrap();
    Identity::derive(job, p.network.prefix, p.network.gateway).unwrap()
}

impl Env {
    pub fn new(test: &'static str, which: Which) -> Option<Env> {
        if !common::require(test, true, &["ip", "bridge", "mkfs.ext4"]) {
            return None;
        }
        let Some(kernel) = vmm::kernel() else {
            common::skip(
                test,
                "no guest kernel (set CHV_KERNEL_PATH or install linux-image-cloud-amd64)",
            );
            return None;
        };
        let bin = match which {
            Which::Standin => vmm::Binary {
                path: vmm::standin(),
                real: false,
            },
            Which::Any => vmm::binary(),
        };
        // Real guests spin a vCPU each on this 2-core host: one real-VMM test at a time.
        let heavy = bin.real.then(vmm::heavy_lock);
        let why = if which == Which::Standin {
            " (a fault path the stand-in injects on demand)"
        } else {
            ""
        };
        vmm::notice(test, &format!("{}{why}", bin.describe()));
        let ns = common::NetNs::new("cl");
        // The bridge as `chvkit setup` makes it: DAD off before the address, then up.
        ns.sh_ok(
            "ip link add br0 type bridge && sysctl -qw net.ipv6.conf.br0.accept_dad=0 && \
             ip -6 addr add fdcd::1/16 dev br0 nodad && ip link set br0 up",
        );
        let work = tempfile::tempdir().unwrap();
        let rootfs = work.path().join("rootfs.raw");
        let o = Command::new("truncate")
            .args(["-s", "64M"])
            .arg(&rootfs)
            .output()
            .unwrap();
        assert!(o.status.success());
        let o = Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&rootfs)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", common::text(&o));
        Some(Env {
            test,
            ns,
            root: tempfile::tempdir().unwrap(),
            work,
            bin,
            kernel,
            rootfs,
            jail: false,
            _heavy: heavy,
        })
    }

    /// [`Env::new`] for `--jail on` launches: skips loudly where this host cannot jail, and
    /// makes the roots searchable (tempdirs are 0700: the jailed VMM, a uid of its own, could
    /// not reach anything beneath).
    pub fn jailed(test: &'static str, which: Which) -> Option<Env> {
        if let Err(e) = chvkit::jail::host_can_jail() {
            common::skip(test, &format!("this host cannot jail: {e}"));
            return None;
        }
        if !common::have_tool("setpriv") {
            common::skip(test, "`setpriv` is not installed");
            return None;
        }
        let mut e = Env::new(test, which)?;
        for d in [e.work.path(), e.root.path()] {
            fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
        }
        e.jail = true;
        Some(e)
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = self.ns.cmd(common::chvkit());
        c.arg("--root").arg(self.root.path()).args(args);
        c.env("CHV_BIN", &self.bin.path)
            .env_remove("CHV_KERNEL_PATH")
            .env("NO_COLOR", "1");
        c
    }

    pub fn chvkit(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    pub fn launch_args(&self, job: &str, extra: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = [
            "launch",
            "--rootfs",
            self.rootfs.to_str().unwrap(),
            "--kernel",
            self.kernel.to_str().unwrap(),
            "--bridge",
            "br0",
            "--job-id",
            job,
            "--memory",
            "128",
            "--cpus",
            "1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if self.jail {
            v.extend(["--jail".to_string(), "on".to_string()]);
        }
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    }

    pub fn launch(&self, job: &str, extra: &[&str]) -> Output {
        let a = self.launch_args(job, extra);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        self.chvkit(&a)
    }

    pub fn spawn_launch(&self, job: &str, extra: &[&str]) -> Child {
        let a = self.launch_args(job, extra);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        self.cmd(&a)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    pub fn runtime(&self) -> PathBuf {
        self.root.path().join("run/chvkit")
    }

    /// What is in the runtime dir (nothing when it does not exist).
    pub fn runtime_entries(&self) -> Vec<std::ffi::OsString> {
        fs::read_dir(self.runtime())
            .map(|r| r.flatten().map(|d| d.file_name()).collect())
            .unwrap_or_default()
    }

    pub fn run_dir(&self, job: &str) -> PathBuf {
        self.runtime().join(job)
    }

    pub fn state(&self, job: &str) -> Option<serde_json::Value> {
        let b = fs::read(self.run_dir(job).join("state.json")).ok()?;
        serde_json::from_slice(&b).ok()
    }

    /// Wait until the job's state file says `running`.
    pub fn wait_running(&self, job: &str, child: &mut Child) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = self.state(job) {
                if s["phase"] == "running" {
                    return s;
                }
            }
            if let Ok(Some(st)) = child.try_wait() {
                panic!("{}: launch ended early ({st})", self.test);
            }
            assert!(
                Instant::now() < deadline,
                "{}: {job} never got running",
                self.test
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn links(&self) -> String {
        self.ns.sh_ok("ip -br link")
    }

    /// The job's per-job disk (a qcow2 overlay on the cached base).
    pub fn disk_of(&self, job: &str) -> PathBuf {
        self.root
            .path()
            .join("var/lib/chvkit/disks")
            .join(format!("{job}.qcow2"))
    }

    pub fn disks(&self) -> Vec<PathBuf> {
        fs::read_dir(self.root.path().join("var/lib/chvkit/disks"))
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    }

    /// Nothing of `job` is left: no run dir, lock, socket, disk, TAP, or VMM process.
    pub fn assert_clean(&self, job: &str, vmm_pid: Option<i64>) {
        let tap = identity(job).tap;
        assert!(
            !self.run_dir(job).exists(),
            "{}: run dir of {job} left",
            self.test
        );
        assert!(
            !self.runtime().join(format!("{job}.lock")).exists(),
            "{}: lock file of {job} left",
            self.test
        );
        let disks: Vec<_> = self
            .disks()
            .into_iter()
            .filter(|d| d.file_stem().is_some_and(|s| s == job))
            .collect();
        assert!(disks.is_empty(), "{}: disks left: {disks:?}", self.test);
        let links = self.links();
        assert!(
            !links.contains(&tap),
            "{}: TAP {tap} left:\n{links}",
            self.test
        );
        if let Some(pid) = vmm_pid {
            let deadline = Instant::now() + Duration::from_secs(5);
            while alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            assert!(!alive(pid), "{}: VMM pid {pid} still running", self.test);
        }
    }
}

/// A live (non-zombie) process.
pub fn alive(pid: i64) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}
