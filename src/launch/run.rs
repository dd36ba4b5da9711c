//! The launch itself: prepare (lock, run dir, disk, env disk, TAP), start the VMM, create and
//! boot the VM, supervise it until it ends, clean up in reverse order. `vm restore` reuses all
//! of it with `vm.restore` in place of create + boot.

use std::cell::Cell;
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::rc::Rc;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use serde::Serialize;

use super::api::{ApiError, Client};
use super::cleanup::Cleanup;
use super::config::{self, Boot, LaunchSpec};
use super::disk::{self, JobDisk};
use super::events::{self, ByteTail, EventTail};
use super::identity::{self, Identity};
use super::rundir::{self, ExitInfo, JobLock, JobPaths, JobState, Phase};
use super::vmm::{self, Vmm};
use super::{code, tap, LandlockMode, LaunchArgs};
use crate::jail::{self, Cgroup, Jail};
use crate::Context;

/// Why a job did not get to run (or how it ended early), with its exit code.
#[derive(Debug, Clone)]
pub struct Failure {
    pub code: i32,
    pub reason: &'static str,
    pub message: String,
}

impl Failure {
    pub fn new(code: i32, reason: &'static str, message: impl Into<String>) -> Failure {
        Failure {
            code,
            reason,
            message: message.into(),
        }
    }
    pub fn setup(message: impl Into<String>) -> Failure {
        Failure::new(code::SETUP_FAILED, "setup_failed", message)
    }
    pub fn boot(message: impl Into<String>) -> Failure {
        Failure::new(code::BOOT_FAILED, "boot_failed", message)
    }

    /// How the job ended, for its state file.
    pub fn exit_info(&self) -> ExitInfo {
        ExitInfo {
            code: self.code,
            reason: self.reason.into(),
            detail: Some(self.message.clone()),
        }
    }

    /// What the detached supervisor tells the launching process.
    pub fn report(&self) -> Report {
        Report {
            ok: false,
            code: self.code,
            reason: self.reason.into(),
            message: self.message.clone(),
            extra: serde_json::Value::Null,
        }
    }
}

/// How a supervised job ended.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub code: i32,
    pub reason: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// SIGINT, SIGTERM and SIGHUP, blocked and read from a signalfd: a Ctrl-C at any point is
/// handled in order (stop the VM, then clean up) rather than killing chvkit halfway.
pub struct Signals {
    fd: SignalFd,
}

impl Signals {
    pub fn block() -> io::Result<Signals> {
        let mut mask = SigSet::empty();
        for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
            mask.add(s);
        }
        mask.thread_block()?;
        let fd = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
        Ok(Signals { fd })
    }

    pub fn pending(&self) -> Option<Signal> {
        match self.fd.read_signal() {
            Ok(Some(info)) => Signal::try_from(info.ssi_signo as i32).ok(),
            _ => None,
        }
    }
}

/// Everything one job holds, released in reverse order however the launch ends.
pub struct Job<'a> {
    pub ctx: &'a Context,
    pub paths: JobPaths,
    pub state: JobState,
    lock: Option<JobLock>,
    cleanup: Cleanup,
    pub vmm: Option<Vmm>,
    /// The VMM's jail (`--jail on`), entered by the VMM's child side before it executes.
    pub jail: Option<Jail>,
    /// A detached job that ended keeps its run dir (state with the exit, logs) for `vm ls` and
    /// `vm logs` until `vm stop` or `gc`.
    keep_run_dir: Rc<Cell<bool>>,
    finished: bool,
}

/// Fields of the initial state that differ between launch and restore.
pub struct JobPlan {
    pub identity: Identity,
    pub bridge: String,
    pub vmm_bin: PathBuf,
    pub cpus: u8,
    pub memory_mib: u32,
    pub boot: String,
    pub landlock: bool,
    pub landlock_write_dirs: Vec<PathBuf>,
    pub keep_disk: bool,
    pub detached: bool,
    pub log_dir: Option<PathBuf>,
    pub restored_from: Option<PathBuf>,
}

fn copy_logs(paths: &JobPaths, dir: &Path) -> Result<(), String> {
    let dest = dir.join(&paths.job_id);
    fs::create_dir_all(&dest).map_err(|e| format!("{}: {e}", dest.display()))?;
    for f in [&paths.serial, &paths.events, &paths.vmm_log, &paths.state] {
        if let Some(name) = f.file_name() {
            if f.exists() {
                fs::copy(f, dest.join(name)).map_err(|e| format!("{}: {e}", f.display()))?;
            }
        }
    }
    Ok(())
}

impl<'a> Job<'a> {
    /// Lock the job id, collect what a dead earlier job of the same id left, create the run dir
    /// and write the first state.
    pub fn begin(
        ctx: &'a Context,
        plan: JobPlan,
        disk_dir: Option<&Path>,
    ) -> Result<Job<'a>, Failure> {
        let job_id = plan.identity.job_id.clone();
        let paths = JobPaths::new(ctx, &job_id, disk_dir);
        paths.check_socket_len().map_err(Failure::setup)?;
        let lock = acquire_lock(&paths)?;
        // We hold the lock: anything left under this id is from a dead job.
        super::gc::collect_job(&paths, false).map_err(|e| {
            Failure::setup(format!("cleaning up after an earlier job {job_id}: {e}"))
        })?;
        rundir::create_private_dir(&paths.dir)
            .map_err(|e| Failure::setup(format!("run dir {}: {e}", paths.dir.display())))?;
        let mut cleanup = Cleanup::new();
        let keep_run_dir = Rc::new(Cell::new(false));
        {
            let (p, keep, log_dir) = (paths.clone(), keep_run_dir.clone(), plan.log_dir.clone());
            cleanup.push("remove run dir", move || {
                if let Some(d) = &log_dir {
                    copy_logs(&p, d)?;
                }
                if keep.get() {
                    return Ok(());
                }
                match fs::remove_dir_all(&p.dir) {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(format!("{}: {e}", p.dir.display())),
                }
            });
        }
        {
            let sock = paths.socket.clone();
            cleanup.push("remove API socket", move || match fs::remove_file(&sock) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    Err(format!("{}: {e}", sock.display()))
                }
                _ => Ok(()),
            });
        }
        // A stale socket makes the VMM exit with "Address already in use".
        let _ = fs::remove_file(&paths.socket);
        let id = &plan.identity;
        let state = JobState {
            schema: rundir::STATE_SCHEMA,
            job_id: job_id.clone(),
            phase: Phase::Preparing,
            supervisor_pid: std::process::id() as i32,
            vmm_pid: None,
            vmm_start_ticks: None,
            vmm_bin: plan.vmm_bin,
            tap: id.tap.clone(),
            bridge: plan.bridge,
            ip: id.ip_cidr(),
            gateway: id.gateway.to_string(),
            mac: id.mac.to_string(),
            api_socket: paths.socket.clone(),
            serial_log: paths.serial.clone(),
            event_log: paths.events.clone(),
            started_at: rundir::now_unix(),
            booted_at: None,
            disk: None,
            disk_stem: Some(paths.disk_stem.clone()),
            env_disk: paths.env_disk.clone(),
            keep_disk: plan.keep_disk,
            disk_handed_over: false,
            detached: plan.detached,
            cpus: plan.cpus,
            memory_mib: plan.memory_mib,
            boot: plan.boot,
            landlock: plan.landlock,
            landlock_write_dirs: plan.landlock_write_dirs,
            restored_from: plan.restored_from,
            log_dir: plan.log_dir,
            jail: None,
            exit: None,
        };
        let job = Job {
            ctx,
            paths,
            state,
            lock: Some(lock),
            cleanup,
            vmm: None,
            jail: None,
            keep_run_dir,
            finished: false,
        };
        job.save_state()?;
        Ok(job)
    }

    /// Register an undo step of the caller's own (run in reverse order with the others).
    pub fn on_cleanup(
        &mut self,
        what: impl Into<String>,
        f: impl FnOnce() -> Result<(), String> + 'static,
    ) {
        self.cleanup.push(what, f);
    }

    pub fn save_state(&self) -> Result<(), Failure> {
        self.state
            .save(&self.paths.state)
            .map_err(|e| Failure::setup(format!("state file {}: {e}", self.paths.state.display())))
    }

    fn register_disk_removal(&mut self, disk: &JobDisk) {
        let (path, marker, keep) = (
            disk.path.clone(),
            self.paths.dir.join(super::vm::HANDOVER_MARKER),
            self.state.keep_disk,
        );
        let jailed = self.jail.is_some();
        self.cleanup.push("remove per-job disk", move || {
            // `vm snapshot --stop` may have taken the disk over since.
            let handed_over = marker.exists();
            if keep || handed_over {
                tracing::info!(disk = %path.display(), "keeping the per-job disk");
                if jailed && keep {
                    // It outlives the job; the job's uid goes to later jobs.
                    jail::reclaim(&path).map_err(|e| e.to_string())?;
                }
                return Ok(());
            }
            match fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    Err(format!("{}: {e}", path.display()))
                }
                _ => Ok(()),
            }
        });
    }

    /// The per-job disk for `rootfs`.
    pub fn prepare_disk(&mut self, rootfs: &Path) -> Result<JobDisk, Failure> {
        let d = disk::prepare(rootfs, &self.paths.disk_stem, &self.paths.bases)
            .map_err(|e| Failure::setup(e.to_string()))?;
        self.register_disk_removal(&d);
        self.state.disk = Some(d.clone());
        self.save_state()?;
        self.jail_disk(&d)?;
        Ok(d)
    }

    /// Hand the per-job disk to the job's uid; its base readable, never writable, by it.
    fn jail_disk(&self, d: &JobDisk) -> Result<(), Failure> {
        let Some(j) = &self.jail else {
            return Ok(());
        };
        let f = |e: io::Error| Failure::setup(e.to_string());
        j.give(&d.path).map_err(f)?;
        j.check_access(&d.path, true).map_err(Failure::setup)?;
        if let Some(b) = &d.base {
            j.share_read_only(b).map_err(f)?;
            j.check_access(b, false).map_err(Failure::setup)?;
        }
        Ok(())
    }

    /// Enter `--jail on` for this job, before the VMM is spawned: pick the job's uid (under the
    /// runtime dir's uid lock, skipping every uid another job records; `prefer` first when
    /// free), create its cgroup (removed on every cleanup path), make the run dir enterable by
    /// the job's group only, and the serial log the VMM's.
    pub fn enter_jail(
        &mut self,
        limits: &crate::profile::LaunchLimits,
        prefer: Option<u32>,
    ) -> Result<(), Failure> {
        jail::host_can_jail().map_err(|e| Failure::setup(format!("--jail on: {e}")))?;
        let f = |e: io::Error| Failure::setup(e.to_string());
        // The runtime dir: searchable (not listable) by the jobs' uids.
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&self.paths.runtime, fs::Permissions::from_mode(0o711))
                .map_err(|e| Failure::setup(format!("{}: {e}", self.paths.runtime.display())))?;
        }
        let uid = {
            let _lock = jail::lock_uids(&self.paths.runtime).map_err(f)?;
            let mut used = std::collections::BTreeSet::new();
            for id in rundir::list_jobs(self.ctx) {
                if id == self.paths.job_id {
                    continue;
                }
                let p = JobPaths::new(self.ctx, &id, None);
                if let Ok(st) = JobState::load(&p.state) {
                    if let Some(j) = st.jail {
                        used.insert(j.uid);
                    }
                }
            }
            used.extend(jail::uids_running(limits.uid_range));
            let uid = match prefer {
                Some(u) if !used.contains(&u) => u,
                _ => jail::pick_uid(&self.paths.job_id, limits.uid_range, &used)
                    .map_err(Failure::setup)?,
            };
            // Recorded before the lock is released: the next launch sees it.
            self.state.jail = Some(jail::JailRecord {
                uid,
                gid: uid,
                kvm_gid: jail::kvm_gid().map_err(f)?,
                cgroup: None,
            });
            self.save_state()?;
            uid
        };
        let cg_limits = jail::Limits {
            memory_max: jail::memory_limit(self.state.memory_mib, limits),
            pids_max: limits.pids_max,
            cpu_weight: limits.cpu_weight,
        };
        let name = jail::cgroup_name(&self.paths.job_id, &self.paths.runtime);
        let cg = Cgroup::create(&name, &cg_limits)
            .map_err(|e| Failure::setup(format!("cgroup for job {}: {e}", self.paths.job_id)))?;
        {
            let c = cg.clone();
            self.cleanup.push("remove cgroup", move || {
                c.remove().map_err(|e| e.to_string())
            });
        }
        if let Some(r) = self.state.jail.as_mut() {
            r.cgroup = Some(cg.clone());
        }
        self.save_state()?;
        let j = Jail::new(uid, Some(cg)).map_err(f)?;
        j.enter_only(&self.paths.dir).map_err(f)?;
        // The VMM opens the serial log itself: it must be the job's.
        vmm::open_append(&self.paths.serial).map_err(f)?;
        j.give(&self.paths.serial).map_err(f)?;
        j.check_access(&self.paths.serial, true)
            .map_err(Failure::setup)?;
        self.jail = Some(j);
        Ok(())
    }

    /// Adopt an existing file as the per-job disk (restore).
    pub fn adopt_disk(&mut self, d: JobDisk) -> Result<(), Failure> {
        self.register_disk_removal(&d);
        self.state.disk = Some(d.clone());
        self.save_state()?;
        self.jail_disk(&d)
    }

    pub fn write_env_disk(&mut self, env: &[(String, String)]) -> Result<(), Failure> {
        disk::write_env_disk(&self.paths.env_disk, env)
            .map_err(|e| Failure::setup(e.to_string()))?;
        self.jail_env_disk()
    }

    /// The env disk is the job's (read-only to the guest, mode 0600).
    pub fn jail_env_disk(&self) -> Result<(), Failure> {
        if let Some(j) = &self.jail {
            j.give(&self.paths.env_disk)
                .map_err(|e| Failure::setup(e.to_string()))?;
        }
        Ok(())
    }

    /// A file the jailed VMM must read (kernel, initramfs, firmware, snapshot files).
    pub fn check_readable(&self, p: &Path) -> Result<(), Failure> {
        match &self.jail {
            Some(j) => j.check_access(p, false).map_err(Failure::setup),
            None => Ok(()),
        }
    }

    /// Create the TAP persistent, register its deletion, attach it isolated, bring it up.
    pub fn create_tap(&mut self) -> Result<(), Failure> {
        let name = self.state.tap.clone();
        let owner = self.jail.as_ref().map(|j| (j.record.uid, j.record.gid));
        tap::create_persistent_owned(&name, owner).map_err(|e| Failure::setup(e.to_string()))?;
        {
            let n = name.clone();
            self.cleanup.push(format!("delete TAP {name}"), move || {
                tap::delete(&n).map(|_| ()).map_err(|e| e.to_string())
            });
        }
        tap::attach_isolated(&name, &self.state.bridge).map_err(|e| Failure::setup(e.to_string()))
    }

    pub fn spawn_vmm(&mut self) -> Result<(), Failure> {
        let v = Vmm::spawn(
            &self.state.vmm_bin,
            &self.paths.socket,
            &self.paths.events,
            &self.paths.vmm_log,
            self.jail.as_ref().map(Jail::child),
        )
        .map_err(|e| Failure::boot(e.to_string()))?;
        if let Some(j) = self.jail.as_mut() {
            j.spawned();
        }
        self.state.vmm_pid = Some(v.pid);
        self.state.vmm_start_ticks = v.start_ticks;
        self.state.phase = Phase::Booting;
        self.vmm = Some(v);
        self.save_state()
    }

    /// A client for the VMM's (pre-bound) API socket, and `vmm.ping` once the VMM answers.
    pub fn connect(&mut self) -> Result<Client, Failure> {
        let mut c = Client::new(&self.paths.socket);
        match c.ping_within(vmm::STARTUP_BUDGET) {
            Ok(ping) => {
                tracing::debug!(version = %ping.version, build = %ping.build_version, "vmm.ping");
                Ok(c)
            }
            Err(e) => Err(self.api_failure(e)),
        }
    }

    /// A failed call to a VMM that may have died meanwhile: its exit status and log tail when
    /// it did, the API error otherwise.
    pub fn api_failure(&mut self, e: ApiError) -> Failure {
        match self.vmm.as_mut().and_then(|v| v.early_exit(&e)) {
            Some(early) => Failure::boot(early.to_string()),
            None => Failure::boot(e.to_string()),
        }
    }

    pub fn mark_running(&mut self) -> Result<(), Failure> {
        self.state.phase = Phase::Running;
        self.state.booted_at = Some(rundir::now_unix());
        self.save_state()
    }

    /// Stop the VMM if it still runs, record the exit, and release everything.
    pub fn finish(mut self, exit: Option<ExitInfo>, keep_run_dir: bool) {
        if let Some(v) = self.vmm.as_mut() {
            v.kill_and_reap();
        }
        self.state.phase = Phase::Exited;
        self.state.exit = exit;
        let _ = self.save_state();
        self.keep_run_dir.set(keep_run_dir);
        self.release();
    }

    fn release(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        if let Some(v) = self.vmm.as_mut() {
            v.kill_and_reap();
        }
        let errors = std::mem::take(&mut self.cleanup).run();
        for e in errors {
            eprintln!("chvkit: cleanup: {e}");
        }
        if let Some(l) = self.lock.take() {
            if self.keep_run_dir.get() {
                // Dropping unlocks; the lock file stays beside the kept run dir for gc.
                drop(l);
            } else {
                l.release_and_remove();
            }
        }
    }

    /// Parent side of the detach fork: forget everything without releasing it (the child owns
    /// the lock, the TAP, the disk and the run dir now).
    fn hand_over(mut self) {
        self.finished = true;
        if let Some(l) = self.lock.take() {
            l.forget();
        }
        std::mem::take(&mut self.cleanup).disarm();
    }
}

impl Drop for Job<'_> {
    fn drop(&mut self) {
        self.release();
    }
}

fn acquire_lock(paths: &JobPaths) -> Result<JobLock, Failure> {
    // A short wait covers `gc` or `vm ls` probing the lock at this very moment.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match JobLock::try_acquire(&paths.lock) {
            Ok(Some(l)) => return Ok(l),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let who = JobState::load(&paths.state)
                    .map(|s| {
                        format!(
                            " (supervisor pid {}, VMM pid {})",
                            s.supervisor_pid,
                            s.vmm_pid
                                .map(|p| p.to_string())
                                .unwrap_or_else(|| "-".into())
                        )
                    })
                    .unwrap_or_default();
                return Err(Failure::setup(format!(
                    "job {} is already running{who}: stop it with `chvkit vm stop {}` or pick another --job-id",
                    paths.job_id, paths.job_id
                )));
            }
            Err(e) => {
                return Err(Failure::setup(format!(
                    "lock {}: {e}",
                    paths.lock.display()
                )))
            }
        }
    }
}

/// Decide the jail: `on` and `off` as asked (`on` fails later, clearly, where it cannot be
/// done); `auto` on when [`jail::auto_check`] passes, otherwise off with a warning saying why.
pub fn jail_enabled(
    mode: super::JailMode,
    limits: &crate::profile::LaunchLimits,
    files: &[&Path],
    parents: &[&Path],
) -> bool {
    match mode {
        super::JailMode::On => true,
        super::JailMode::Off => false,
        super::JailMode::Auto => match jail::auto_check(limits, files, parents) {
            Ok(()) => true,
            Err(why) => {
                tracing::warn!(
                    "the VMM runs unjailed, as root with every capability (--jail auto): {why}; `--jail off` says this is intended"
                );
                false
            }
        },
    }
}

/// Decide Landlock: on when asked or when the kernel offers ABI v3+.
pub fn landlock_enabled(mode: LandlockMode) -> Result<bool, Failure> {
    let abi = vmm::landlock_abi();
    match mode {
        LandlockMode::Off => Ok(false),
        LandlockMode::Auto => {
            if abi < vmm::LANDLOCK_MIN_ABI {
                tracing::info!(abi, "Landlock unavailable (Cloud Hypervisor needs ABI v3): VMM runs without it");
            }
            Ok(abi >= vmm::LANDLOCK_MIN_ABI)
        }
        LandlockMode::On if abi >= vmm::LANDLOCK_MIN_ABI => Ok(true),
        LandlockMode::On => Err(Failure::new(
            crate::exit::USAGE,
            "usage",
            format!("--landlock on: this kernel offers Landlock ABI {abi}; Cloud Hypervisor needs v3 or newer (kernel 6.2+ with landlock in the `lsm=` list)"),
        )),
    }
}

/// The full `vm.create` body.
pub fn vm_config(
    spec: &LaunchSpec,
    paths: &JobPaths,
    d: &JobDisk,
    landlock: bool,
) -> serde_json::Value {
    use serde_json::json;
    let payload = match &spec.boot {
        Boot::Kernel {
            kernel,
            initramfs,
            cmdline,
            ..
        } => {
            let mut p = json!({ "kernel": kernel, "cmdline": cmdline });
            if let Some(i) = initramfs {
                p["initramfs"] = json!(i);
            }
            p
        }
        Boot::Firmware { firmware, .. } => json!({ "firmware": firmware }),
    };
    let mut root = json!({
        "path": d.path, "readonly": false, "image_type": d.image_type(), "id": "rootfs"
    });
    if d.base.is_some() {
        root["backing_files"] = json!(true);
    }
    let mut cfg = json!({
        "cpus": { "boot_vcpus": spec.cpus, "max_vcpus": spec.cpus },
        "memory": { "size": u64::from(spec.memory_mib) << 20 },
        "payload": payload,
        "disks": [
            root,
            { "path": paths.env_disk, "readonly": true, "image_type": "Raw", "id": "env" }
        ],
        "net": [ { "tap": spec.identity.tap, "mac": spec.identity.mac.to_string() } ],
        "rng": { "src": "/dev/urandom" },
        "serial": { "mode": "File", "file": paths.serial },
        "console": { "mode": "Off" },
        "pvpanic": true,
        "landlock_enable": landlock,
    });
    if landlock {
        // The VMM adds rules for disks, payload, serial, rng and /dev/net/tun itself; it does
        // not know the overlay's backing file (opened at boot) or where snapshots will go.
        let mut rules = landlock_base_rules(d, &spec.identity.tap);
        for w in &spec.landlock_write_dirs {
            rules.push(json!({ "path": w, "access": "rw" }));
        }
        cfg["landlock_rules"] = json!(rules);
    }
    cfg
}

/// Landlock rules every chvkit VM needs beyond what the VMM derives from its config: the
/// overlay's backing file (opened at boot) and the TAP's sysfs directory (v50 reads
/// `/sys/class/net/<tap>/tun_flags` when it opens the TAP at boot: "Failed to read the TAP
/// flags from sysfs: Permission denied" otherwise).
pub fn landlock_base_rules(d: &JobDisk, tap: &str) -> Vec<serde_json::Value> {
    let mut rules = Vec::new();
    if let Some(b) = &d.base {
        rules.push(serde_json::json!({ "path": b, "access": "r" }));
    }
    rules.push(serde_json::json!({ "path": format!("/sys/class/net/{tap}"), "access": "r" }));
    rules
}

/// Messages from the detached supervisor to the launching process.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Report {
    pub ok: bool,
    #[serde(default)]
    pub code: i32,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub extra: serde_json::Value,
}

impl Report {
    /// A job that is up: `extra` is what the launching process prints (as is with `--json`).
    pub fn running(extra: serde_json::Value) -> Report {
        Report {
            ok: true,
            code: 0,
            reason: "running".into(),
            message: String::new(),
            extra,
        }
    }
}

pub enum ForkSide {
    Parent(Report),
    /// The supervisor's end of the line to the launching process.
    Child(fs::File),
}

fn thread_count() -> usize {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:").map(|v| v.trim().parse().ok()))
                .flatten()
        })
        .unwrap_or(0)
}

/// Fork the detached supervisor. The child continues the launch (VMM, boot, supervision) in
/// its own session with stdio on `supervisor.log`; the parent waits for its report.
pub fn fork_supervisor<'a>(job: Job<'a>) -> Result<(ForkSide, Option<Job<'a>>), Failure> {
    if thread_count() != 1 {
        return Err(Failure::setup(
            "internal: cannot detach from a multi-threaded process",
        ));
    }
    let sup_log = job.paths.dir.join("supervisor.log");
    let (mut ours, theirs) = std::os::unix::net::UnixStream::pair()
        .map_err(|e| Failure::setup(format!("socketpair: {e}")))?;
    // SAFETY: the process is single-threaded (checked above), so the child may run any code.
    match unsafe { nix::unistd::fork() } {
        Err(e) => Err(Failure::setup(format!("fork: {e}"))),
        Ok(nix::unistd::ForkResult::Parent { .. }) => {
            drop(theirs);
            job.hand_over();
            // EOF once the supervisor's end closes (after its report, or when it dies).
            let mut text = String::new();
            let _ = ours.read_to_string(&mut text);
            let report = serde_json::from_str::<Report>(text.trim()).unwrap_or_else(|_| {
                Failure::setup(format!(
                    "the detached supervisor ended without reporting (see {})",
                    sup_log.display()
                ))
                .report()
            });
            Ok((ForkSide::Parent(report), None))
        }
        Ok(nix::unistd::ForkResult::Child) => {
            drop(ours);
            // A session of its own: the terminal's Ctrl-C and hang-up reach the launching
            // process only.
            let _ = nix::unistd::setsid();
            redirect_stdio(&sup_log);
            let mut job = job;
            // Written with the VMM's pid right after the spawn: nothing in between to record.
            job.state.supervisor_pid = std::process::id() as i32;
            let w = fs::File::from(std::os::fd::OwnedFd::from(theirs));
            Ok((ForkSide::Child(w), Some(job)))
        }
    }
}

/// Stdin from /dev/null, stdout and stderr to `log`: a detached supervisor's own output, once
/// the caller no longer reads it.
pub fn redirect_stdio(log: &Path) {
    if let Ok(null) = fs::File::open("/dev/null") {
        let _ = nix::unistd::dup2_stdin(null.as_fd());
    }
    if let Ok(f) = vmm::open_append(log) {
        let _ = nix::unistd::dup2_stdout(f.as_fd());
        let _ = nix::unistd::dup2_stderr(f.as_fd());
    }
}

pub fn send_report(w: &mut fs::File, r: &Report) {
    if let Ok(mut s) = serde_json::to_string(r) {
        s.push('\n');
        let _ = w.write_all(s.as_bytes());
    }
}

/// Options for [`supervise`].
pub struct Watch {
    pub timeout: Option<Duration>,
    pub grace: Duration,
    pub console: bool,
}

/// Watch the running VM until it ends: the VMM exits (guest power-off, or a crash), a signal
/// arrives, the timeout passes, or the guest reboots or panics (then the VM is stopped).
pub fn supervise(
    vmm: &mut Vmm,
    client: &mut Client,
    paths: &JobPaths,
    sigs: &Signals,
    w: &Watch,
) -> Outcome {
    enum Ending {
        Exited(ExitStatus),
        Timeout,
        Signal(Signal),
        Rebooted,
        Panicked,
    }
    let deadline = w.timeout.map(|t| Instant::now() + t);
    let mut events = EventTail::new(&paths.events);
    let mut serial = ByteTail::new(&paths.serial);
    let mut stdout = io::stdout();
    let mut pump_console = |serial: &mut ByteTail| {
        if w.console {
            if let Ok(b) = serial.poll() {
                if !b.is_empty() {
                    let _ = stdout.write_all(&b);
                    let _ = stdout.flush();
                }
            }
        }
    };
    let ending = loop {
        let mut fds = [
            PollFd::new(vmm.pidfd(), PollFlags::POLLIN),
            PollFd::new(sigs.fd.as_fd(), PollFlags::POLLIN),
        ];
        let _ = poll(&mut fds, PollTimeout::from(10u16));
        if let Some(s) = sigs.pending() {
            break Ending::Signal(s);
        }
        let exited = match vmm.try_wait() {
            Ok(st) => st,
            Err(e) => {
                tracing::warn!("waitpid: {e}");
                None
            }
        };
        let evs = events.poll().unwrap_or_default();
        if let Some(st) = exited {
            // A VMM that died while the guest rebooted or panicked died of that: a jailed VMM
            // cannot redo the TAP's set-up on its in-process reboot (it sets the MAC it
            // recorded, which needs CAP_NET_ADMIN) and exits.
            let cause = evs.iter().find(|e| {
                e.is("vm", "rebooting") || e.is("vm", "rebooted") || e.is("guest", "panic")
            });
            break match cause {
                Some(e) if !st.success() && e.source == "guest" => Ending::Panicked,
                Some(_) if !st.success() => Ending::Rebooted,
                _ => Ending::Exited(st),
            };
        }
        if let Some(e) = evs
            .iter()
            .find(|e| e.is("vm", "rebooting") || e.is("vm", "rebooted") || e.is("guest", "panic"))
        {
            break if e.source == "guest" {
                Ending::Panicked
            } else {
                Ending::Rebooted
            };
        }
        pump_console(&mut serial);
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break Ending::Timeout;
        }
    };
    let mut stop = |why: &str| -> String {
        match vmm.stop(Some(client), w.grace) {
            Ok((st, killed)) => format!(
                "{why}; stopped with vm.shutdown + vmm.shutdown{} (VMM {})",
                if killed {
                    " + SIGKILL after the grace period"
                } else {
                    ""
                },
                vmm::describe_status(st)
            ),
            Err(e) => format!("{why}; stopping the VMM failed: {e}"),
        }
    };
    let out = match ending {
        Ending::Exited(st) if st.success() => match events::exit_code_from_serial(&paths.serial) {
            Ok(Some(n)) => Outcome {
                code: n,
                reason: "exited",
                detail: None,
            },
            Ok(None) => Outcome {
                code: code::NO_EXIT_LINE,
                reason: "no_exit_line",
                detail: Some(format!(
                    "the guest powered off without printing CHVKIT_EXIT=<n> on its serial console ({})",
                    paths.serial.display()
                )),
            },
            Err(e) => Outcome {
                code: code::NO_EXIT_LINE,
                reason: "no_exit_line",
                detail: Some(format!("cannot read {}: {e}", paths.serial.display())),
            },
        },
        Ending::Exited(st) => {
            let tail = events::tail_lines(&paths.vmm_log, 5);
            Outcome {
                code: code::VMM_CRASHED,
                reason: "vmm_crashed",
                detail: Some(format!(
                    "the VMM (pid {}) died: {}{}",
                    vmm.pid,
                    vmm::describe_status(st),
                    if tail.is_empty() { String::new() } else { format!("; its log ends with:\n{tail}") }
                )),
            }
        }
        Ending::Timeout => Outcome {
            code: code::TIMEOUT,
            reason: "timeout",
            detail: Some(stop(&format!(
                "no power-off within {}s",
                w.timeout.map(|t| t.as_secs_f64()).unwrap_or(0.0)
            ))),
        },
        Ending::Signal(s) => Outcome {
            code: code::SIGNAL_BASE + s as i32,
            reason: "signal",
            detail: Some(stop(&format!("{} received", s.as_str()))),
        },
        Ending::Rebooted => Outcome {
            code: code::GUEST_REBOOTED,
            reason: "guest_rebooted",
            detail: Some(stop(
                "the guest rebooted (Cloud Hypervisor reboots in-process, which would loop); a workload must end with poweroff",
            )),
        },
        Ending::Panicked => Outcome {
            code: code::GUEST_PANICKED,
            reason: "guest_panicked",
            detail: Some(stop("the guest kernel panicked (pvpanic `guest panic` event)")),
        },
    };
    pump_console(&mut serial);
    out
}

#[derive(Serialize)]
struct LaunchResult<'s> {
    job_id: &'s str,
    exit_code: i32,
    reason: &'s str,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<&'s str>,
    ip: &'s str,
    mac: &'s str,
    tap: &'s str,
    #[serde(skip_serializing_if = "Option::is_none")]
    kept_disk: Option<&'s Path>,
}

fn usage(msg: impl std::fmt::Display) -> anyhow::Result<i32> {
    eprintln!("chvkit: {msg}");
    Ok(crate::exit::USAGE)
}

/// Print what the detached supervisor reported (as the launching process), or a launch's
/// failure before it ran, and return the exit code.
pub fn print_detached(r: &Report, job_id: &str, json: bool) -> i32 {
    if !r.ok {
        let reason = if r.reason.is_empty() {
            "setup_failed"
        } else {
            r.reason.as_str()
        };
        if json {
            let j = serde_json::json!({
                "job_id": job_id, "exit_code": r.code, "reason": reason, "detail": r.message,
            });
            say!("{j}");
        }
        eprintln!(
            "chvkit: job {job_id}: {}: {}",
            reason.replace('_', " "),
            r.message
        );
        return r.code;
    }
    if json {
        say!("{}", r.extra);
    } else {
        let e = &r.extra;
        say!(
            "{} running: ip {}, mac {}, tap {}, vmm pid {} (vm.boot returned {} ms after start)",
            job_id,
            e["ip"].as_str().unwrap_or(""),
            e["mac"].as_str().unwrap_or(""),
            e["tap"].as_str().unwrap_or(""),
            e["vmm_pid"],
            e["boot_ms"]
        );
    }
    crate::exit::OK
}

/// `chvkit launch`.
pub fn launch(ctx: &Context, a: LaunchArgs) -> anyhow::Result<i32> {
    let job_id = a.job_id.clone().unwrap_or_else(identity::generate_job_id);
    if let Err(e) = identity::validate_job_id(&job_id) {
        return usage(e);
    }
    let mut spec = match config::resolve(ctx, &a, &job_id) {
        Ok(s) => s,
        Err(e) => return usage(e),
    };
    let sigs = Signals::block()?;
    let json = a.json;
    let t0 = Instant::now();
    let done = prepare_and_run(ctx, &a, &mut spec, &sigs);
    stage(t0, "launch finished");
    match done {
        Ok(Done::Detached(report)) => Ok(print_detached(&report, &job_id, json)),
        Ok(Done::DetachedChildEnded(code)) => Ok(code),
        Ok(Done::Finished(out, kept)) => {
            let id = &spec.identity;
            if json {
                let r = LaunchResult {
                    job_id: &job_id,
                    exit_code: out.code,
                    reason: out.reason,
                    detail: out.detail.as_deref(),
                    ip: &id.ip_cidr(),
                    mac: &id.mac.to_string(),
                    tap: &id.tap,
                    kept_disk: kept.as_deref(),
                };
                say!("{}", serde_json::to_string(&r)?);
            }
            if out.reason != "exited" {
                eprintln!(
                    "chvkit: job {job_id}: {}: {}",
                    out.reason.replace('_', " "),
                    out.detail.as_deref().unwrap_or("")
                );
            }
            if let Some(k) = kept {
                eprintln!(
                    "chvkit: job {job_id}: kept the per-job disk {}",
                    k.display()
                );
            }
            Ok(out.code)
        }
        Err(f) => {
            print_detached(&f.report(), &job_id, json);
            Ok(f.code)
        }
    }
}

enum Done {
    Finished(Outcome, Option<PathBuf>),
    Detached(Report),
    DetachedChildEnded(i32),
}

/// Debug-level timing of the launch path (`-vv` shows where the milliseconds go).
fn stage(t0: Instant, what: &str) {
    tracing::debug!(
        ms = format!("{:.2}", t0.elapsed().as_secs_f64() * 1000.0),
        "{what}"
    );
}

fn prepare_and_run(
    ctx: &Context,
    a: &LaunchArgs,
    spec: &mut LaunchSpec,
    sigs: &Signals,
) -> Result<Done, Failure> {
    let t0 = Instant::now();
    let vmm_bin = vmm::find_binary(ctx).map_err(Failure::setup)?;
    config::absolutize(&mut spec.boot).map_err(|e| Failure::setup(e.to_string()))?;
    spec.rootfs = std::path::absolute(&spec.rootfs).map_err(|e| Failure::setup(e.to_string()))?;
    // Checked before anything is created: nothing to clean up when they fail.
    config::check_boot_files(&spec.boot).map_err(Failure::boot)?;
    if matches!(spec.boot, Boot::Firmware { .. }) {
        disk::check_firmware_bootable(&spec.rootfs).map_err(|e| Failure::boot(e.to_string()))?;
    }
    let landlock = landlock_enabled(a.landlock)?;
    let jailed = {
        let paths = JobPaths::new(ctx, &spec.identity.job_id, a.disk_dir.as_deref());
        let files: Vec<&Path> = match &spec.boot {
            Boot::Kernel {
                kernel, initramfs, ..
            } => std::iter::once(kernel.as_path())
                .chain(initramfs.as_deref())
                .collect(),
            Boot::Firmware { firmware, .. } => vec![firmware.as_path()],
        };
        let disk_dir = paths.disk_stem.parent().unwrap_or(Path::new("/"));
        let parents = [
            paths.runtime.parent().unwrap_or(Path::new("/")),
            disk_dir.parent().unwrap_or(Path::new("/")),
            paths.bases.parent().unwrap_or(Path::new("/")),
        ];
        jail_enabled(a.jail, &ctx.profile.launch, &files, &parents)
    };
    let plan = JobPlan {
        identity: spec.identity.clone(),
        bridge: spec.bridge.clone(),
        vmm_bin,
        cpus: spec.cpus,
        memory_mib: spec.memory_mib,
        boot: spec.boot.describe(),
        landlock,
        landlock_write_dirs: Vec::new(),
        keep_disk: a.keep,
        detached: a.detach,
        log_dir: a
            .log_dir
            .as_ref()
            .map(std::path::absolute)
            .transpose()
            .map_err(|e| Failure::setup(e.to_string()))?,
        restored_from: None,
    };
    let mut job = Job::begin(ctx, plan, a.disk_dir.as_deref())?;
    stage(t0, "locked, run dir and state written");
    if landlock {
        let mut dirs = vec![job.paths.snapshots.clone()];
        dirs.extend(spec.landlock_write_dirs.iter().cloned());
        for d in &dirs {
            // Landlock rules need the path to exist when the VM is created.
            fs::create_dir_all(d).map_err(|e| Failure::setup(format!("{}: {e}", d.display())))?;
        }
        spec.landlock_write_dirs = dirs.clone();
        job.state.landlock_write_dirs = dirs;
    }
    if jailed {
        job.enter_jail(&ctx.profile.launch, None)?;
        stage(t0, "jail ready");
        match &spec.boot {
            Boot::Kernel {
                kernel, initramfs, ..
            } => {
                job.check_readable(kernel)?;
                if let Some(i) = initramfs {
                    job.check_readable(i)?;
                }
            }
            Boot::Firmware { firmware, .. } => job.check_readable(firmware)?,
        }
    }
    let mut reporter = None;
    let mut job = if a.detach {
        match fork_supervisor(job)? {
            (ForkSide::Parent(report), _) => return Ok(Done::Detached(report)),
            (ForkSide::Child(w), Some(j)) => {
                reporter = Some(w);
                j
            }
            (ForkSide::Child(_), None) => {
                return Err(Failure::setup("internal: fork lost the job"))
            }
        }
    } else {
        job
    };
    stage(t0, "supervisor forked");
    let started = Instant::now();
    let mut created = false;
    let booted = (|| -> Result<Client, Failure> {
        // The VMM starts (exec, API socket: a few ms) while the disk, env disk and TAP are
        // prepared; it needs none of them before vm.create/vm.boot.
        job.spawn_vmm()?;
        stage(t0, "VMM spawned");
        let d = job.prepare_disk(&spec.rootfs)?;
        stage(t0, "per-job disk ready");
        if let Some(s) = sigs.pending() {
            return Err(Failure::new(
                code::SIGNAL_BASE + s as i32,
                "signal",
                format!("{} received while preparing", s.as_str()),
            ));
        }
        job.write_env_disk(&spec.env)?;
        stage(t0, "env disk written");
        // The TAP must exist before vm.create: the VMM applies Landlock when it takes the
        // config, and one of the rules is the TAP's own sysfs directory (see
        // `landlock_base_rules`); made any earlier, the read of its tun_flags at boot is
        // refused (EACCES: seen in the tests when vm.create was sent first).
        job.create_tap()?;
        stage(t0, "TAP created, attached, up");
        // No wait for the socket and no `vmm.ping` first: the socket listens since before the
        // VMM started, so vm.create goes out now and is answered as soon as the VMM is up (a
        // VMM that died instead shows up as a refused or reset connection, explained below).
        let mut c = Client::new(&job.paths.socket);
        let cfg = vm_config(spec, &job.paths, &d, landlock);
        created = true;
        if let Err(e) = c.create(&cfg) {
            if e.chain().is_some() {
                // A failed create may still leave a stored config.
                let _ = c.delete();
            }
            return Err(job.api_failure(e));
        }
        stage(t0, "vm.create returned");
        // Never retried: a second boot after a failed one is unsafe (facts §2).
        c.boot().map_err(|e| job.api_failure(e))?;
        stage(t0, "vm.boot returned");
        job.mark_running()?;
        Ok(c)
    })();
    let mut client = match booted {
        Ok(c) => c,
        Err(f) => {
            if let Some(v) = job.vmm.as_mut() {
                if created {
                    let _ = v.stop(Some(&mut Client::new(&job.paths.socket)), spec.grace);
                } else {
                    // No VM was ever created in it: nothing to shut down in order.
                    v.kill_and_reap();
                }
            }
            job.finish(Some(f.exit_info()), false);
            if let Some(mut w) = reporter {
                send_report(&mut w, &f.report());
                return Ok(Done::DetachedChildEnded(f.code));
            }
            return Err(f);
        }
    };
    let boot_ms = started.elapsed().as_millis() as u64;
    tracing::info!(job = %job.state.job_id, boot_ms, ip = %job.state.ip, tap = %job.state.tap, "booted");
    if let Some(w) = reporter.as_mut() {
        let st = &job.state;
        send_report(
            w,
            &Report::running(serde_json::json!({
                "job_id": st.job_id, "state": "running", "ip": st.ip, "mac": st.mac,
                "tap": st.tap, "vmm_pid": st.vmm_pid, "supervisor_pid": st.supervisor_pid,
                "run_dir": job.paths.dir, "api_socket": st.api_socket,
                "serial_log": st.serial_log, "boot_ms": boot_ms,
                "booted_at": st.booted_at,
            })),
        );
    }
    drop(reporter);
    if tracing::enabled!(tracing::Level::DEBUG) {
        // Off the launch path: the launching process has its answer already.
        if let Ok(p) = client.ping() {
            tracing::debug!(version = %p.version, build = %p.build_version, "vmm.ping");
        }
    }
    let watch = Watch {
        timeout: spec.timeout,
        grace: spec.grace,
        console: a.console && !a.detach,
    };
    let out = match job.vmm.as_mut() {
        Some(v) => supervise(v, &mut client, &job.paths, sigs, &watch),
        None => return Err(Failure::boot("no VMM")),
    };
    let kept = job
        .state
        .disk
        .as_ref()
        .filter(|_| job.state.keep_disk)
        .map(|d| d.path.clone());
    job.finish(
        Some(ExitInfo {
            code: out.code,
            reason: out.reason.into(),
            detail: out.detail.clone(),
        }),
        a.detach,
    );
    if a.detach {
        return Ok(Done::DetachedChildEnded(out.code));
    }
    Ok(Done::Finished(out, kept))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launch::disk::DiskKind;

    fn spec(boot: Boot) -> LaunchSpec {
        let p = crate::profile::Profile::embedded().unwrap();
        LaunchSpec {
            identity: Identity::derive("j1", p.network.prefix, p.network.gateway).unwrap(),
            rootfs: "/r.raw".into(),
            boot,
            cpus: 2,
            memory_mib: 512,
            bridge: "chvbr0".into(),
            api_url: "http://[fdcd::1]:8080".into(),
            env: vec![],
            timeout: None,
            grace: Duration::from_secs(3),
            landlock_write_dirs: vec!["/snap".into()],
        }
    }

    fn paths() -> JobPaths {
        let ctx = Context {
            profile: crate::profile::Profile::embedded().unwrap(),
            profile_source: "t".into(),
            root: crate::paths::Root::new(Some("/x".into())),
        };
        JobPaths::new(&ctx, "j1", None)
    }

    #[test]
    fn vm_create_body_has_the_full_config() {
        let s = spec(Boot::Kernel {
            kernel: "/k".into(),
            initramfs: Some("/i".into()),
            cmdline: "console=ttyS0 root=/dev/vda rw chvkit.env=/dev/vdb".into(),
            source: "--kernel",
        });
        let d = JobDisk {
            path: "/x/var/lib/chvkit/disks/j1.qcow2".into(),
            kind: DiskKind::Qcow2Overlay,
            base: Some("/x/var/lib/chvkit/bases/b.qcow2".into()),
        };
        let c = vm_config(&s, &paths(), &d, true);
        assert_eq!(
            c["cpus"],
            serde_json::json!({"boot_vcpus": 2, "max_vcpus": 2})
        );
        assert_eq!(c["memory"]["size"], 512u64 << 20);
        assert_eq!(c["payload"]["kernel"], "/k");
        assert_eq!(c["payload"]["initramfs"], "/i");
        assert_eq!(c["disks"][0]["image_type"], "Qcow2");
        assert_eq!(c["disks"][0]["backing_files"], true);
        assert_eq!(c["disks"][0]["readonly"], false);
        assert_eq!(c["disks"][1]["image_type"], "Raw");
        assert_eq!(c["disks"][1]["readonly"], true);
        assert_eq!(c["disks"][1]["path"], "/x/run/chvkit/j1/env.img");
        // Only tap and mac: `ip`/`mask` would configure the host side.
        let net = c["net"][0].as_object().unwrap();
        assert_eq!(net.keys().collect::<Vec<_>>(), ["mac", "tap"]);
        assert_eq!(net["tap"], s.identity.tap.as_str());
        assert_eq!(
            c["serial"],
            serde_json::json!({"mode": "File", "file": "/x/run/chvkit/j1/serial.log"})
        );
        assert_eq!(c["console"]["mode"], "Off");
        assert_eq!(c["rng"]["src"], "/dev/urandom");
        assert_eq!(c["pvpanic"], true);
        assert_eq!(c["landlock_enable"], true);
        let rules = c["landlock_rules"].as_array().unwrap();
        let has = |p: &str, a: &str| rules.iter().any(|r| r["path"] == p && r["access"] == a);
        assert!(has("/x/var/lib/chvkit/bases/b.qcow2", "r"));
        assert!(has(&format!("/sys/class/net/{}", s.identity.tap), "r"));
        assert!(has("/snap", "rw"));

        let raw = JobDisk {
            path: "/d.raw".into(),
            kind: DiskKind::Reflink,
            base: None,
        };
        let fw = spec(Boot::Firmware {
            firmware: "/fw".into(),
            source: "--firmware",
        });
        let c = vm_config(&fw, &paths(), &raw, false);
        assert_eq!(c["payload"], serde_json::json!({"firmware": "/fw"}));
        assert_eq!(c["disks"][0]["image_type"], "Raw");
        assert!(c["disks"][0].get("backing_files").is_none());
        assert!(c.get("landlock_rules").is_none());
    }
}
