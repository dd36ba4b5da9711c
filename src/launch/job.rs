//! One job and everything it holds: the run dir, state file and lock, the per-job disk and env
//! disk, the TAP, the jail and the VMM, released in reverse order however the job ends; and the
//! collection of what a dead job left. `launch` (run.rs), `vm restore` (vm.rs) and `gc` (gc.rs)
//! share it; it imports none of them.

use std::cell::Cell;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::api::{ApiError, Client};
use super::cleanup::Cleanup;
use super::disk::{self, JobDisk};
use super::identity::{self, Identity};
use super::rundir::{self, ExitInfo, JobLock, JobPaths, JobState, Phase};
use super::vmm::{self, Vmm};
use super::{code, tap, JailMode, LandlockMode};
use crate::jail::{self, Cgroup, Jail};
use crate::Context;

/// Name of the marker that `vm snapshot --stop` leaves in the run dir: the per-job disk then
/// belongs to the snapshot, and no cleanup may remove it.
pub(super) const HANDOVER_MARKER: &str = "disk.handed-over";

/// Why a job did not get to run (or how it ended early), with its exit code.
#[derive(Debug, Clone)]
pub(super) struct Failure {
    pub(super) code: i32,
    pub(super) reason: &'static str,
    pub(super) message: String,
}

impl Failure {
    pub(super) fn new(code: i32, reason: &'static str, message: impl Into<String>) -> Failure {
        Failure {
            code,
            reason,
            message: message.into(),
        }
    }
    pub(super) fn setup(message: impl Into<String>) -> Failure {
        Failure::new(code::SETUP_FAILED, "setup_failed", message)
    }
    pub(super) fn boot(message: impl Into<String>) -> Failure {
        Failure::new(code::BOOT_FAILED, "boot_failed", message)
    }

    /// How the job ended, for its state file.
    pub(super) fn exit_info(&self) -> ExitInfo {
        ExitInfo {
            code: self.code,
            reason: self.reason.into(),
            detail: Some(self.message.clone()),
        }
    }
}

/// Everything one job holds, released in reverse order however the launch ends.
pub(super) struct Job<'a> {
    ctx: &'a Context,
    pub(super) paths: JobPaths,
    pub(super) state: JobState,
    lock: Option<JobLock>,
    cleanup: Cleanup,
    pub(super) vmm: Option<Vmm>,
    /// The VMM's jail (`--jail on`), entered by the VMM's child side before it executes.
    pub(super) jail: Option<Jail>,
    /// A detached job that ended keeps its run dir (state with the exit, logs) for `vm ls` and
    /// `vm logs` until `vm stop` or `gc`.
    keep_run_dir: Rc<Cell<bool>>,
    finished: bool,
}

/// Fields of the initial state that differ between launch and restore.
pub(super) struct JobPlan {
    pub(super) identity: Identity,
    pub(super) bridge: String,
    pub(super) vmm_bin: PathBuf,
    pub(super) cpus: u8,
    pub(super) memory_mib: u32,
    pub(super) boot: String,
    pub(super) landlock: bool,
    pub(super) landlock_write_dirs: Vec<PathBuf>,
    pub(super) keep_disk: bool,
    pub(super) detached: bool,
    pub(super) log_dir: Option<PathBuf>,
    pub(super) restored_from: Option<PathBuf>,
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
    pub(super) fn begin(
        ctx: &'a Context,
        plan: JobPlan,
        disk_dir: Option<&Path>,
    ) -> Result<Job<'a>, Failure> {
        let job_id = plan.identity.job_id.clone();
        let paths = JobPaths::new(ctx, &job_id, disk_dir);
        paths.check_socket_len().map_err(Failure::setup)?;
        let lock = acquire_lock(&paths)?;
        // We hold the lock: anything left under this id is from a dead job.
        collect_job(&paths, false).map_err(|e| {
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
    pub(super) fn on_cleanup(
        &mut self,
        what: impl Into<String>,
        f: impl FnOnce() -> Result<(), String> + 'static,
    ) {
        self.cleanup.push(what, f);
    }

    pub(super) fn save_state(&self) -> Result<(), Failure> {
        self.state
            .save(&self.paths.state)
            .map_err(|e| Failure::setup(format!("state file {}: {e}", self.paths.state.display())))
    }

    fn register_disk_removal(&mut self, disk: &JobDisk) {
        let (path, marker, keep) = (
            disk.path.clone(),
            self.paths.dir.join(HANDOVER_MARKER),
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
    /// The per-job disk, carrying `env` (checker.env) in the image's env slot where it has
    /// one; [`Job::write_env_disk`] is for when it did not (`env_in_slot` false).
    pub(super) fn prepare_disk(
        &mut self,
        rootfs: &Path,
        env: &[(String, String)],
    ) -> Result<JobDisk, Failure> {
        let env = crate::envfile::render(env).map_err(|e| Failure::setup(e.to_string()))?;
        let d = disk::prepare(
            rootfs,
            &self.paths.disk_stem,
            &self.paths.bases,
            Some(env.as_bytes()),
        )
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
    pub(super) fn enter_jail(
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
    pub(super) fn adopt_disk(&mut self, d: JobDisk) -> Result<(), Failure> {
        self.register_disk_removal(&d);
        self.state.disk = Some(d.clone());
        self.save_state()?;
        self.jail_disk(&d)
    }

    pub(super) fn write_env_disk(&mut self, env: &[(String, String)]) -> Result<(), Failure> {
        disk::write_env_disk(&self.paths.env_disk, env)
            .map_err(|e| Failure::setup(e.to_string()))?;
        self.jail_env_disk()
    }

    /// The env disk is the job's (read-only to the guest, mode 0600).
    pub(super) fn jail_env_disk(&self) -> Result<(), Failure> {
        if let Some(j) = &self.jail {
            j.give(&self.paths.env_disk)
                .map_err(|e| Failure::setup(e.to_string()))?;
        }
        Ok(())
    }

    /// A file the jailed VMM must read (kernel, initramfs, firmware, snapshot files).
    pub(super) fn check_readable(&self, p: &Path) -> Result<(), Failure> {
        match &self.jail {
            Some(j) => j.check_access(p, false).map_err(Failure::setup),
            None => Ok(()),
        }
    }

    /// Create the TAP persistent, register its deletion, attach it isolated, bring it up.
    pub(super) fn create_tap(&mut self) -> Result<(), Failure> {
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

    pub(super) fn spawn_vmm(&mut self) -> Result<(), Failure> {
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
    pub(super) fn connect(&mut self) -> Result<Client, Failure> {
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
    pub(super) fn api_failure(&mut self, e: ApiError) -> Failure {
        match self.vmm.as_mut().and_then(|v| v.early_exit(&e)) {
            Some(early) => Failure::boot(early.to_string()),
            None => Failure::boot(e.to_string()),
        }
    }

    pub(super) fn mark_running(&mut self) -> Result<(), Failure> {
        self.state.phase = Phase::Running;
        self.state.booted_at = Some(rundir::now_unix());
        self.save_state()
    }

    /// Stop the VMM if it still runs, record the exit, and release everything.
    pub(super) fn finish(mut self, exit: Option<ExitInfo>, keep_run_dir: bool) {
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
    pub(super) fn hand_over(mut self) {
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
pub(super) fn jail_enabled(
    mode: JailMode,
    limits: &crate::profile::LaunchLimits,
    files: &[&Path],
    parents: &[&Path],
) -> bool {
    match mode {
        JailMode::On => true,
        JailMode::Off => false,
        JailMode::Auto => match jail::auto_check(limits, files, parents) {
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
pub(super) fn landlock_enabled(mode: LandlockMode) -> Result<bool, Failure> {
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

/// Landlock rules every chvkit VM needs beyond what the VMM derives from its config: the
/// overlay's backing file (opened at boot) and the TAP's sysfs directory (v50 reads
/// `/sys/class/net/<tap>/tun_flags` when it opens the TAP at boot: "Failed to read the TAP
/// flags from sysfs: Permission denied" otherwise).
pub(super) fn landlock_base_rules(d: &JobDisk, tap: &str) -> Vec<serde_json::Value> {
    let mut rules = Vec::new();
    if let Some(b) = &d.base {
        rules.push(serde_json::json!({ "path": b, "access": "r" }));
    }
    rules.push(serde_json::json!({ "path": format!("/sys/class/net/{tap}"), "access": "r" }));
    rules
}

/// Collect one dead job (the caller holds or has just taken its lock). Returns what was done.
pub(super) fn collect_job(paths: &JobPaths, dry_run: bool) -> Result<Vec<String>, String> {
    let mut done = Vec::new();
    let verb = |what: String| {
        if dry_run {
            format!("would {what}")
        } else {
            what
        }
    };
    let state = JobState::load(&paths.state).ok();
    if let Some(st) = &state {
        if let Some(pid) = st.vmm_pid {
            if rundir::same_process_alive(pid, st.vmm_start_ticks) {
                done.push(verb(format!("kill VMM pid {pid} (its supervisor is gone)")));
                if !dry_run {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    let deadline = Instant::now() + Duration::from_secs(3);
                    while rundir::same_process_alive(pid, st.vmm_start_ticks)
                        && Instant::now() < deadline
                    {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            }
        }
    }
    // The VMM's cgroup (`--jail on`): whatever still runs in it is killed, then it goes.
    if let Some(cg) = state
        .as_ref()
        .and_then(|st| st.jail.as_ref())
        .and_then(|j| j.cgroup.as_ref())
        .filter(|cg| cg.exists())
    {
        done.push(verb(format!(
            "remove cgroup {}",
            cg.dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
        if !dry_run {
            cg.remove().map_err(|e| e.to_string())?;
        }
    }
    // Only a TAP a state file records is ours: without one, this job never got as far as
    // creating it (the state is written first), and a TAP of that name belongs to someone else.
    let tap_name = state.as_ref().map(|st| st.tap.clone());
    if let Some(t) = tap_name.filter(|t| t.starts_with(identity::TAP_PREFIX)) {
        if tap::status(&t).map_err(|e| e.to_string())?.is_some() {
            let holders = tap::holders(&t);
            if holders.is_empty() {
                done.push(verb(format!("delete TAP {t}")));
                if !dry_run {
                    tap::delete(&t).map_err(|e| e.to_string())?;
                }
            } else {
                let who: Vec<String> = holders
                    .iter()
                    .map(|(p, c)| format!("pid {p} ({c})"))
                    .collect();
                return Err(format!(
                    "TAP {t} of dead job {} is held by {}: left alone",
                    paths.job_id,
                    who.join(", ")
                ));
            }
        }
    }
    if let Some(st) = &state {
        let handed_over = st.disk_handed_over || paths.dir.join(HANDOVER_MARKER).exists();
        if !st.keep_disk && !handed_over {
            let mut files = Vec::new();
            if let Some(d) = &st.disk {
                files.push(d.path.clone());
            }
            if let Some(stem) = &st.disk_stem {
                files.push(stem.with_extension("qcow2"));
                files.push(stem.with_extension("raw"));
            }
            files.dedup();
            for f in files.iter().filter(|f| f.exists()) {
                done.push(verb(format!("remove disk {}", f.display())));
                if !dry_run {
                    remove_file(f)?;
                }
            }
        }
    }
    if paths.socket.exists() {
        done.push(verb(format!("remove socket {}", paths.socket.display())));
        if !dry_run {
            remove_file(&paths.socket)?;
        }
    }
    // A jailed restore handed the snapshot's files (linked into restore/) to the job's uid:
    // they outlive it, its uid goes to later jobs.
    if state.as_ref().is_some_and(|st| st.jail.is_some()) && paths.restore_dir.exists() {
        done.push(verb(format!(
            "give the snapshot files in {} back to root",
            paths.restore_dir.display()
        )));
        if !dry_run {
            crate::jail::reclaim_dir(&paths.restore_dir).map_err(|e| e.to_string())?;
        }
    }
    if paths.dir.exists() {
        done.push(verb(format!("remove run dir {}", paths.dir.display())));
        if !dry_run {
            fs::remove_dir_all(&paths.dir).map_err(|e| format!("{}: {e}", paths.dir.display()))?;
        }
    }
    Ok(done)
}

pub(super) fn remove_file(p: &Path) -> Result<(), String> {
    match fs::remove_file(p) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(format!("{}: {e}", p.display())),
        _ => Ok(()),
    }
}
