//! `chvkit vm …`: the detached lifecycle — ls, info, pause, resume, snapshot, restore, stop,
//! logs.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::api::{self, Client};
use super::disk::{self, DiskKind, JobDisk};
use super::events::ByteTail;
use super::identity::{self, Identity, Mac};
use super::job::{self, Failure, Job, JobPlan, HANDOVER_MARKER};
use super::rundir::{self, ExitInfo, JobLock, JobPaths, JobState};
use super::supervisor::{self, ForkSide, Report, Signals, Watch};
use super::JailMode;
use super::{code, config, vmm, LandlockMode, VmCommand};
use crate::{exit, Context};
/// chvkit's own metadata in a snapshot directory.
pub const SNAPSHOT_META: &str = "chvkit.json";
const SNAPSHOT_SCHEMA: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub schema: u32,
    pub job_id: String,
    pub ip: String,
    pub gateway: String,
    pub mac: String,
    pub tap: String,
    pub bridge: String,
    pub cpus: u8,
    pub memory_mib: u32,
    pub boot: String,
    /// The job's disk, moved into the snapshot dir (`--stop`): file name inside the dir.
    #[serde(default)]
    pub disk_file: Option<String>,
    #[serde(default)]
    pub disk_kind: Option<DiskKind>,
    #[serde(default)]
    pub disk_base: Option<PathBuf>,
    /// Without `--stop`: the running job's disk at snapshot time (it keeps changing).
    #[serde(default)]
    pub live_disk: Option<PathBuf>,
    /// The env disk's copy; none when the job's environment is in its disk's env slot.
    #[serde(default)]
    pub env_disk_file: Option<String>,
    pub stopped: bool,
    pub created_at: f64,
    pub snapshot_ms: u64,
    /// The jailed job's uid (`--jail on`): its files here are that uid's, and a jailed restore
    /// takes it again when it is free.
    #[serde(default)]
    pub jail_uid: Option<u32>,
}

fn fail(msg: impl std::fmt::Display) -> anyhow::Result<i32> {
    eprintln!("chvkit: {msg}");
    Ok(exit::FAILURE)
}

fn usage(msg: impl std::fmt::Display) -> anyhow::Result<i32> {
    eprintln!("chvkit: {msg}");
    Ok(exit::USAGE)
}

struct Target {
    paths: JobPaths,
    state: Option<JobState>,
    live: bool,
}

fn target(ctx: &Context, job: &str) -> Result<Target, anyhow::Result<i32>> {
    if let Err(e) = identity::validate_job_id(job) {
        return Err(usage(e));
    }
    let paths = JobPaths::new(ctx, job, None);
    let state = JobState::load(&paths.state).ok();
    let live = JobLock::is_held(&paths.lock);
    if state.is_none() && !live && !paths.dir.exists() && !paths.lock.exists() {
        return Err(fail(format!(
            "no job {job} under {}",
            rundir::runtime_dir(ctx).display()
        )));
    }
    Ok(Target { paths, state, live })
}

fn running_target(ctx: &Context, job: &str) -> Result<(Target, Client), anyhow::Result<i32>> {
    let t = target(ctx, job)?;
    if !t.live {
        let how = t
            .state
            .as_ref()
            .and_then(|s| s.exit.as_ref())
            .map(|e| {
                format!(
                    " (it ended: {} with code {})",
                    e.reason.replace('_', " "),
                    e.code
                )
            })
            .unwrap_or_default();
        return Err(fail(format!("job {job} is not running{how}")));
    }
    let c = Client::new(&t.paths.socket);
    Ok((t, c))
}

pub fn run(ctx: &Context, c: VmCommand) -> anyhow::Result<i32> {
    match c {
        VmCommand::Ls { json } => ls(ctx, json),
        VmCommand::Info { job, json } => info(ctx, &job, json),
        VmCommand::Pause { job } => simple(ctx, &job, "paused", Client::pause),
        VmCommand::Resume { job } => simple(ctx, &job, "resumed", Client::resume),
        VmCommand::Snapshot { job, dir, stop } => snapshot(ctx, &job, &dir, stop),
        VmCommand::Restore {
            dir,
            job_id,
            json,
            landlock,
            jail,
        } => restore(ctx, &dir, job_id, json, landlock, jail),
        VmCommand::Stop { job, grace } => stop(ctx, &job, &grace),
        VmCommand::Logs {
            job,
            follow,
            events,
        } => logs(ctx, &job, follow, events),
    }
}

fn simple(
    ctx: &Context,
    job: &str,
    done: &str,
    f: fn(&mut Client) -> Result<(), api::ApiError>,
) -> anyhow::Result<i32> {
    let (_, mut c) = match running_target(ctx, job) {
        Ok(x) => x,
        Err(r) => return r,
    };
    match f(&mut c) {
        Ok(()) => {
            say!("{job} {done}");
            Ok(exit::OK)
        }
        Err(e) => fail(format!("job {job}: {e}")),
    }
}

fn human_duration(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

#[derive(Serialize)]
struct LsRow {
    job_id: String,
    state: String,
    pid: Option<i32>,
    supervisor_pid: Option<i32>,
    ip: String,
    mac: String,
    tap: String,
    uptime_s: Option<f64>,
    run_dir: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    exit: Option<ExitInfo>,
}

fn live_state(c: &mut Client, st: Option<&JobState>) -> String {
    match c.state() {
        Ok(s) => s.to_lowercase(),
        Err(api::ApiError::Timeout { .. }) => "busy".into(),
        Err(_) => st
            .map(|s| s.phase.to_string())
            .unwrap_or_else(|| "unknown".into()),
    }
}

fn ls(ctx: &Context, json: bool) -> anyhow::Result<i32> {
    let mut rows = Vec::new();
    for id in rundir::list_jobs(ctx) {
        let paths = JobPaths::new(ctx, &id, None);
        let st = JobState::load(&paths.state).ok();
        let live = JobLock::is_held(&paths.lock);
        let state = if live {
            live_state(&mut Client::new(&paths.socket), st.as_ref())
        } else {
            match st.as_ref().and_then(|s| s.exit.as_ref()) {
                Some(e) => format!("exited({})", e.code),
                None => "dead".into(),
            }
        };
        let uptime = st
            .as_ref()
            .and_then(|s| s.booted_at)
            .filter(|_| live)
            .map(|b| rundir::now_unix() - b);
        rows.push(LsRow {
            job_id: id,
            state,
            pid: st.as_ref().and_then(|s| s.vmm_pid),
            supervisor_pid: st.as_ref().map(|s| s.supervisor_pid),
            ip: st.as_ref().map(|s| s.ip.clone()).unwrap_or_default(),
            mac: st.as_ref().map(|s| s.mac.clone()).unwrap_or_default(),
            tap: st.as_ref().map(|s| s.tap.clone()).unwrap_or_default(),
            uptime_s: uptime,
            run_dir: paths.dir,
            exit: st.and_then(|s| s.exit),
        });
    }
    if json {
        say!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(exit::OK);
    }
    let mut out = io::stdout().lock();
    writeln!(
        out,
        "{:<28} {:<12} {:>8}  {:<44} {:<15} UPTIME",
        "JOB", "STATE", "PID", "IP", "TAP"
    )?;
    for r in rows {
        writeln!(
            out,
            "{:<28} {:<12} {:>8}  {:<44} {:<15} {}",
            r.job_id,
            r.state,
            r.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            r.ip,
            r.tap,
            r.uptime_s.map(human_duration).unwrap_or_else(|| "-".into())
        )?;
    }
    Ok(exit::OK)
}

fn info(ctx: &Context, job: &str, json: bool) -> anyhow::Result<i32> {
    let t = match target(ctx, job) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let (vm_info, err) = if t.live {
        match Client::new(&t.paths.socket).info() {
            Ok(v) => (Some(v), None),
            Err(e) => (None, Some(e.to_string())),
        }
    } else {
        (None, None)
    };
    if json {
        let memory = t
            .state
            .as_ref()
            .and_then(|s| s.jail.as_ref())
            .and_then(|j| j.cgroup.as_ref())
            .map(|cg| {
                let (cur, lim) = jail_memory(cg);
                serde_json::json!({ "current": cur, "limit": lim.unwrap_or(cg.memory_max) })
            });
        let v = serde_json::json!({
            "job_id": job, "live": t.live, "state": t.state, "vm_info": vm_info, "vm_info_error": err,
            "memory": memory,
        });
        say!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(exit::OK);
    }
    say!("job:       {job}");
    say!("live:      {}", t.live);
    if let Some(s) = &t.state {
        say!("phase:     {}", s.phase);
        say!(
            "vmm:       {} (pid {})",
            s.vmm_bin.display(),
            s.vmm_pid
                .map(|p| p.to_string())
                .unwrap_or_else(|| "-".into())
        );
        say!("boot:      {}", s.boot);
        say!("ip:        {} (gateway {})", s.ip, s.gateway);
        say!("mac:       {}", s.mac);
        say!("tap:       {} on {}", s.tap, s.bridge);
        if let Some(d) = &s.disk {
            say!(
                "disk:      {} ({:?}{})",
                d.path.display(),
                d.kind,
                d.base
                    .as_ref()
                    .map(|b| format!(", base {}", b.display()))
                    .unwrap_or_default()
            );
        }
        say!("landlock:  {}", s.landlock);
        match &s.jail {
            Some(j) => {
                say!(
                    "jail:      uid {} gid {} (groups {})",
                    j.uid,
                    j.gid,
                    j.kvm_gid
                );
                if let Some(cg) = &j.cgroup {
                    let (cur, lim) = jail_memory(cg);
                    say!(
                        "cgroup:    {} ({:?})",
                        cg.dirs
                            .iter()
                            .map(|d| d.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", "),
                        cg.version
                    );
                    say!(
                        "memory:    {} of {} (guest {} MiB + VMM allowance)",
                        cur.map(mib).unwrap_or_else(|| "-".into()),
                        lim.map(mib).unwrap_or_else(|| mib(cg.memory_max)),
                        s.memory_mib
                    );
                }
            }
            None => say!("jail:      off (the VMM runs as root)"),
        }
        say!("run dir:   {}", t.paths.dir.display());
        if let Some(e) = &s.exit {
            say!(
                "exit:      {} ({}){}",
                e.code,
                e.reason,
                e.detail
                    .as_ref()
                    .map(|d| format!(": {d}"))
                    .unwrap_or_default()
            );
        }
    }
    if let Some(v) = vm_info {
        say!("vm.info:\n{}", serde_json::to_string_pretty(&v)?);
    }
    if let Some(e) = err {
        say!("vm.info:   {e}");
    }
    Ok(exit::OK)
}

/// The job cgroup's current memory and its limit, when the cgroup exists.
fn jail_memory(cg: &crate::jail::Cgroup) -> (Option<u64>, Option<u64>) {
    (cg.memory_current().ok(), cg.memory_limit().ok())
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / f64::from(1u32 << 20))
}

/// Is this the host's PVM nested-state failure (facts §5)?
fn nested_state_hint(e: &api::ApiError) -> String {
    let text = e.to_string();
    if text.contains("GetNestedState") {
        let pvm = Path::new("/sys/module/kvm_pvm").exists();
        format!(
            "\nhint: the VMM could not read the vCPUs' nested-virtualization state from KVM{}: this host cannot snapshot VMs with this Cloud Hypervisor build, whatever the VM",
            if pvm { " (this host's /dev/kvm is PVM, module kvm_pvm)" } else { "" }
        )
    } else {
        String::new()
    }
}

fn wait_dead(lock: &Path, budget: Duration) -> Option<JobLock> {
    let deadline = Instant::now() + budget;
    loop {
        if let Ok(Some(l)) = JobLock::try_acquire(lock) {
            return Some(l);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Ask a job's supervisor to stop (SIGTERM) and wait for it to release the lock; SIGKILL it if
/// it does not. Returns the lock, now ours.
fn stop_supervisor(t: &Target, budget: Duration) -> Result<JobLock, String> {
    let pid = t
        .state
        .as_ref()
        .map(|s| s.supervisor_pid)
        .ok_or("no state file: cannot find the supervisor")?;
    let nixpid = nix::unistd::Pid::from_raw(pid);
    let _ = nix::sys::signal::kill(nixpid, nix::sys::signal::Signal::SIGTERM);
    if let Some(l) = wait_dead(&t.paths.lock, budget) {
        return Ok(l);
    }
    tracing::warn!(pid, "the supervisor did not stop in time: SIGKILL");
    let _ = nix::sys::signal::kill(nixpid, nix::sys::signal::Signal::SIGKILL);
    wait_dead(&t.paths.lock, Duration::from_secs(5)).ok_or_else(|| {
        format!(
            "supervisor pid {pid} still holds {}",
            t.paths.lock.display()
        )
    })
}

fn stop(ctx: &Context, job: &str, grace: &str) -> anyhow::Result<i32> {
    let grace = match config::parse_duration(grace) {
        Ok(g) => g,
        Err(e) => return usage(e),
    };
    let t = match target(ctx, job) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let was_live = t.live;
    let lock = if t.live {
        match stop_supervisor(&t, grace + Duration::from_secs(10)) {
            Ok(l) => l,
            Err(e) => return fail(format!("job {job}: {e}")),
        }
    } else {
        match JobLock::try_acquire(&t.paths.lock) {
            Ok(Some(l)) => l,
            Ok(None) => return fail(format!("job {job} started again meanwhile")),
            Err(e) => return fail(format!("job {job}: {e}")),
        }
    };
    let ended = JobState::load(&t.paths.state).ok().and_then(|s| s.exit);
    match job::collect_job(&t.paths, false) {
        Ok(_) => lock.release_and_remove(),
        Err(e) => return fail(format!("job {job}: {e}")),
    }
    let how = ended
        .map(|e| format!(" ({}, code {})", e.reason.replace('_', " "), e.code))
        .unwrap_or_default();
    if was_live {
        say!("{job} stopped{how}");
    } else {
        say!("{job} was not running{how}; removed what it left");
    }
    Ok(exit::OK)
}

fn logs(ctx: &Context, job: &str, follow: bool, events: bool) -> anyhow::Result<i32> {
    let t = match target(ctx, job) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let file = if events {
        &t.paths.events
    } else {
        &t.paths.serial
    };
    let mut tail = ByteTail::new(file);
    let mut out = io::stdout();
    loop {
        let b = tail.poll()?;
        if !b.is_empty() {
            out.write_all(&b)?;
            out.flush()?;
        }
        if !follow || !JobLock::is_held(&t.paths.lock) {
            let b = tail.poll()?;
            out.write_all(&b)?;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(exit::OK)
}

fn is_empty_dir(d: &Path) -> io::Result<bool> {
    Ok(fs::read_dir(d)?.next().is_none())
}

fn snapshot(ctx: &Context, job: &str, dir: &Path, stop_after: bool) -> anyhow::Result<i32> {
    let (t, mut c) = match running_target(ctx, job) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let Some(st) = t.state.clone() else {
        return fail(format!("job {job}: no state file"));
    };
    let dir = std::path::absolute(dir)?;
    // DIR: absent, or an empty directory. It receives the snapshot whole or not at all.
    match fs::symlink_metadata(&dir) {
        Ok(m) if m.is_dir() => {
            if !is_empty_dir(&dir)? {
                return fail(format!(
                    "snapshot dir {} is not empty (Cloud Hypervisor will not overwrite a snapshot)",
                    dir.display()
                ));
            }
        }
        Ok(_) => {
            return fail(format!(
                "snapshot dir {} exists and is not a directory",
                dir.display()
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return fail(format!("snapshot dir {}: {e}", dir.display())),
    }
    let Some(parent) = dir.parent().map(Path::to_path_buf) else {
        return fail(format!("snapshot dir {} has no parent", dir.display()));
    };
    // Guest memory lands beneath: private by default.
    use std::os::unix::fs::DirBuilderExt;
    if let Err(e) = fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&parent)
    {
        return fail(format!(
            "snapshot dir {}: {}: {e}",
            dir.display(),
            parent.display()
        ));
    }
    // A read-only filesystem says so now, before the VM is touched.
    use nix::unistd::AccessFlags;
    if let Err(e) = nix::unistd::access(&parent, AccessFlags::W_OK | AccessFlags::X_OK) {
        return fail(format!(
            "snapshot dir {}: cannot write in {}: {} ({e:?})",
            dir.display(),
            parent.display(),
            e.desc()
        ));
    }
    // The VMM writes into a fresh directory it may write: beside DIR when Landlock allows
    // that (then DIR is one rename away), else beneath the job's snapshot directory.
    let vmm_may_write =
        |p: &Path| !st.landlock || st.landlock_write_dirs.iter().any(|w| p.starts_with(w));
    let tmp_parent = if vmm_may_write(&parent) {
        parent.clone()
    } else {
        t.paths.snapshots.clone()
    };
    if !vmm_may_write(&tmp_parent) {
        return fail(format!(
            "job {job} runs under Landlock and may only write snapshots beneath {}; relaunch it with --snapshot-dir {} (or --landlock off)",
            st.landlock_write_dirs.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
            parent.display()
        ));
    }
    let tmp = match make_unique_dir(&tmp_parent, &format!(".tmp-{job}-")) {
        Ok(d) => d,
        Err(e) => return fail(format!("job {job}: {e}")),
    };
    // Removed on every failure, except once it holds a stopped job's disk.
    let mut tmp_guard = RemoveOnDrop(Some(tmp.clone()));
    if let Some(j) = &st.jail {
        // A jailed VMM writes the snapshot as the job's uid.
        if let Err(e) = std::os::unix::fs::chown(&tmp, Some(j.uid), Some(j.gid)) {
            return fail(format!("job {job}: chown {}: {e}", tmp.display()));
        }
        if let Err(e) = crate::jail::check_access(&tmp, j.uid, &[j.gid, j.kvm_gid], true) {
            return fail(format!("job {job}: {e}"));
        }
    }
    let vm_state = match c.state() {
        Ok(s) => s,
        Err(e) => return fail(format!("job {job}: {e}")),
    };
    let paused_here = match vm_state.as_str() {
        "Running" => {
            if let Err(e) = c.pause() {
                return fail(format!("job {job}: {e}"));
            }
            true
        }
        "Paused" => false,
        other => {
            return fail(format!(
                "job {job}: VM is {other}; only a running or paused VM can be snapshotted"
            ))
        }
    };
    let t0 = Instant::now();
    if let Err(e) = c.snapshot(&tmp) {
        if paused_here {
            if let Err(r) = c.resume() {
                eprintln!("chvkit: job {job}: resuming after the failed snapshot: {r}");
            }
        }
        return fail(format!("job {job}: {e}{}", nested_state_hint(&e)));
    }
    let snapshot_ms = t0.elapsed().as_millis() as u64;
    let env_name = "env.img";
    let resume = |c: &mut Client| -> Result<(), String> {
        if paused_here {
            c.resume().map_err(|e| e.to_string())
        } else {
            Ok(())
        }
    };
    // The job's environment lives in its disk (the env slot) or on the env disk.
    let env_in_slot = st.disk.as_ref().is_some_and(|d| d.env_in_slot);
    if !env_in_slot {
        if let Err(e) = disk::copy_file(&st.env_disk, &tmp.join(env_name)) {
            if let Err(r) = resume(&mut c) {
                eprintln!("chvkit: job {job}: resuming after the failed snapshot: {r}");
            }
            return fail(format!("job {job}: {e}"));
        }
    }
    let mut meta = SnapshotMeta {
        schema: SNAPSHOT_SCHEMA,
        job_id: job.to_string(),
        ip: st.ip.clone(),
        gateway: st.gateway.clone(),
        mac: st.mac.clone(),
        tap: st.tap.clone(),
        bridge: st.bridge.clone(),
        cpus: st.cpus,
        memory_mib: st.memory_mib,
        boot: st.boot.clone(),
        disk_file: None,
        disk_kind: st.disk.as_ref().map(|d| d.kind),
        disk_base: st.disk.as_ref().and_then(|d| d.base.clone()),
        live_disk: None,
        env_disk_file: (!env_in_slot).then(|| env_name.into()),
        stopped: stop_after,
        created_at: rundir::now_unix(),
        snapshot_ms,
        jail_uid: st.jail.as_ref().map(|j| j.uid),
    };
    if !stop_after {
        // The VM runs on while the snapshot is moved into place.
        let resumed = resume(&mut c);
        meta.live_disk = st.disk.as_ref().map(|d| d.path.clone());
        write_meta(&tmp, &meta)?;
        if let Err(e) = deliver(&tmp, &dir) {
            return fail(format!(
                "job {job}: snapshot not delivered to {} (left as it was): {e}",
                dir.display()
            ));
        }
        tmp_guard.0 = None;
        if st.jail.is_some() {
            // The snapshot outlives the job; its uid goes to later jobs.
            if let Err(e) = crate::jail::reclaim_dir(&dir) {
                return fail(format!("job {job}: {e}"));
            }
        }
        if let Err(e) = resumed {
            return fail(format!(
                "job {job}: snapshot written to {} but resume failed: {e}",
                dir.display()
            ));
        }
        say!(
            "{job}: snapshot written to {} in {snapshot_ms} ms; VM {}",
            dir.display(),
            if paused_here {
                "resumed"
            } else {
                "left paused"
            }
        );
        return Ok(exit::OK);
    }
    // --stop: the disk goes with the snapshot. Mark it first so no cleanup removes it, then
    // stop the job (a clean VMM exit flushes the qcow2 metadata), then move the disk.
    let Some(d) = st.disk.clone() else {
        return fail(format!("job {job}: no per-job disk recorded"));
    };
    let disk_name = format!(
        "disk.{}",
        if d.kind == DiskKind::Reflink {
            "raw"
        } else {
            "qcow2"
        }
    );
    if let Err(e) = crate::fsutil::write_atomic(
        &t.paths.dir.join(HANDOVER_MARKER),
        dir.join(&disk_name).to_string_lossy().as_bytes(),
        0o600,
    ) {
        return fail(format!("job {job}: {e}"));
    }
    let lock = match stop_supervisor(&t, Duration::from_secs(15)) {
        Ok(l) => l,
        Err(e) => return fail(format!("job {job}: {e}")),
    };
    // From here on the snapshot holds the only copy of the job's disk: never removed.
    tmp_guard.0 = None;
    if let Err(e) = move_file(&d.path, &tmp.join(&disk_name)) {
        return fail(format!("job {job}: moving its disk into the snapshot: {e}"));
    }
    meta.disk_file = Some(disk_name);
    write_meta(&tmp, &meta)?;
    match job::collect_job(&t.paths, false) {
        Ok(_) => lock.release_and_remove(),
        Err(e) => eprintln!("chvkit: job {job}: {e}"),
    }
    if let Err(e) = deliver(&tmp, &dir) {
        return fail(format!(
            "job {job}: stopped, but the snapshot was not delivered to {}: {e}; the complete snapshot (with the job's disk) is in {}",
            dir.display(),
            tmp.display()
        ));
    }
    if st.jail.is_some() {
        if let Err(e) = crate::jail::reclaim_dir(&dir) {
            return fail(format!("job {job}: {e}"));
        }
    }
    say!(
        "{job}: snapshot written to {} in {snapshot_ms} ms; job stopped, its disk moved into the snapshot",
        dir.display()
    );
    Ok(exit::OK)
}

/// A directory removed (with what it holds) when dropped, unless taken out first.
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(d) = self.0.take() {
            let _ = fs::remove_dir_all(d);
        }
    }
}

/// A fresh private directory `<parent>/<prefix><random>`.
fn make_unique_dir(parent: &Path, prefix: &str) -> Result<PathBuf, String> {
    use std::os::unix::fs::DirBuilderExt;
    fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    loop {
        let d = parent.join(format!("{prefix}{:08x}", getrandom::u32().unwrap_or(0)));
        match fs::DirBuilder::new().mode(0o700).create(&d) {
            Ok(()) => return Ok(d),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(format!("{}: {e}", d.display())),
        }
    }
}

fn sync_dir(d: &Path) -> Result<(), String> {
    fs::File::open(d)
        .and_then(|f| f.sync_all())
        .map_err(|e| format!("syncing {}: {e}", d.display()))
}

/// Move the finished snapshot `src` to `dir` (absent or empty): one `rename(2)` on the same
/// filesystem; across filesystems a copy into a fresh directory beside `dir`, every file and
/// the directory synced, then renamed into place. `dir` never holds part of a snapshot: on
/// failure it is as it was, the copy is removed, and `src` stays whole.
fn deliver(src: &Path, dir: &Path) -> Result<(), String> {
    let parent = dir.parent().unwrap_or(Path::new("/"));
    match fs::rename(src, dir) {
        Ok(()) => {
            // Delivered; a failed sync of the parent only risks the rename after a crash.
            let _ = sync_dir(parent);
            return Ok(());
        }
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {}
        Err(e) => {
            return Err(format!(
                "renaming {} to {}: {e}",
                src.display(),
                dir.display()
            ))
        }
    }
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stage = make_unique_dir(parent, &format!(".{name}.tmp-"))?;
    let copied = (|| -> Result<(), String> {
        let mut files = Vec::new();
        for e in fs::read_dir(src).map_err(|e| format!("{}: {e}", src.display()))? {
            let e = e.map_err(|e| format!("{}: {e}", src.display()))?;
            let ft = e
                .file_type()
                .map_err(|err| format!("{}: {err}", e.path().display()))?;
            if !ft.is_file() {
                return Err(format!(
                    "{}: not a regular file (a snapshot holds files only)",
                    e.path().display()
                ));
            }
            files.push(e.file_name());
        }
        files.sort();
        let bar = copy_progress(src, &files);
        for f in &files {
            if let Some(b) = &bar {
                b.set_message(f.to_string_lossy().into_owned());
            }
            // Each file written beside its name, synced, renamed (AtomicFile).
            disk::copy_file(&src.join(f), &stage.join(f)).map_err(|e| e.to_string())?;
            if let Some(b) = &bar {
                b.inc(fs::metadata(src.join(f)).map(|m| m.len()).unwrap_or(0));
            }
        }
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        sync_dir(&stage)?;
        fs::rename(&stage, dir)
            .map_err(|e| format!("renaming {} to {}: {e}", stage.display(), dir.display()))?;
        let _ = sync_dir(parent);
        Ok(())
    })();
    if let Err(e) = copied {
        let _ = fs::remove_dir_all(&stage);
        return Err(e);
    }
    let _ = fs::remove_dir_all(src);
    Ok(())
}

/// A progress bar for a copy across filesystems, on a terminal only.
fn copy_progress(src: &Path, files: &[std::ffi::OsString]) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if !io::stderr().is_terminal() {
        return None;
    }
    let total: u64 = files
        .iter()
        .filter_map(|f| fs::metadata(src.join(f)).ok())
        .map(|m| m.len())
        .sum();
    let b = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "copying the snapshot {bar:30} {bytes}/{total_bytes} {msg}",
    ) {
        b.set_style(style);
    }
    Some(b)
}

fn write_meta(dir: &Path, meta: &SnapshotMeta) -> anyhow::Result<()> {
    let mut b = serde_json::to_vec_pretty(meta)?;
    b.push(b'\n');
    crate::fsutil::write_atomic(&dir.join(SNAPSHOT_META), &b, 0o600)?;
    Ok(())
}

fn move_file(src: &Path, dest: &Path) -> Result<(), String> {
    match fs::rename(src, dest) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            disk::copy_file(src, dest).map_err(|e| e.to_string())?;
            fs::remove_file(src).map_err(|e| format!("{}: {e}", src.display()))
        }
        Err(e) => Err(format!("{} -> {}: {e}", src.display(), dest.display())),
    }
}

/// Link (or, across filesystems, symlink) `src` to `dest`: memory-ranges can be as big as the
/// guest's RAM and is only read.
fn link_or_symlink(src: &Path, dest: &Path) -> io::Result<()> {
    match fs::hard_link(src, dest) {
        Ok(()) => Ok(()),
        Err(_) => std::os::unix::fs::symlink(src, dest),
    }
}

fn restore(
    ctx: &Context,
    dir: &Path,
    job_id: Option<String>,
    json: bool,
    landlock: LandlockMode,
    jail: JailMode,
) -> anyhow::Result<i32> {
    let dir = std::path::absolute(dir)?;
    let meta: SnapshotMeta = match fs::read(dir.join(SNAPSHOT_META)) {
        Ok(b) => match serde_json::from_slice(&b) {
            Ok(m) => m,
            Err(e) => return fail(format!("{}: {e}", dir.join(SNAPSHOT_META).display())),
        },
        Err(e) => {
            return fail(format!(
                "{} is not a chvkit snapshot ({SNAPSHOT_META}: {e}); take snapshots with `chvkit vm snapshot`",
                dir.display()
            ))
        }
    };
    let job_id = job_id.unwrap_or_else(|| meta.job_id.clone());
    if let Err(e) = identity::validate_job_id(&job_id) {
        return usage(e);
    }
    let cfg_text = match fs::read(dir.join("config.json")) {
        Ok(t) => t,
        Err(e) => return fail(format!("{}: {e}", dir.join("config.json").display())),
    };
    let mut cfg: serde_json::Value = match serde_json::from_slice(&cfg_text) {
        Ok(v) => v,
        Err(e) => return fail(format!("{}: {e}", dir.join("config.json").display())),
    };
    let sigs = Signals::block()?;
    let print_failure = |f: &Failure| {
        if json {
            say!(
                "{}",
                serde_json::json!({"job_id": job_id, "exit_code": f.code, "reason": f.reason, "detail": f.message})
            );
        }
        eprintln!(
            "chvkit: job {job_id}: {}: {}",
            f.reason.replace('_', " "),
            f.message
        );
        f.code
    };
    let modes = (landlock, jail);
    let r = restore_inner(ctx, &dir, &meta, &job_id, &mut cfg, modes, &sigs);
    match r {
        Ok(RestoreDone::Parent(rep)) if rep.ok => {
            if json {
                say!("{}", rep.extra);
            } else {
                let e = &rep.extra;
                say!(
                    "{job_id} restored from {}: vm.restore took {} ms, running {} ms after start (ip {}, tap {}, vmm pid {})",
                    dir.display(),
                    e["restore_ms"],
                    e["total_ms"],
                    e["ip"].as_str().unwrap_or(""),
                    e["tap"].as_str().unwrap_or(""),
                    e["vmm_pid"]
                );
            }
            Ok(exit::OK)
        }
        Ok(RestoreDone::Parent(rep)) => Ok(print_failure(&Failure {
            code: rep.code,
            reason: "restore_failed",
            message: rep.message,
        })),
        Ok(RestoreDone::Child(code)) => Ok(code),
        Err(f) => Ok(print_failure(&f)),
    }
}

enum RestoreDone {
    Parent(Report),
    Child(i32),
}

fn restore_inner(
    ctx: &Context,
    dir: &Path,
    meta: &SnapshotMeta,
    job_id: &str,
    cfg: &mut serde_json::Value,
    (landlock_mode, jail_mode): (LandlockMode, JailMode),
    sigs: &Signals,
) -> Result<RestoreDone, Failure> {
    let derived = Identity::derive(
        job_id,
        ctx.profile.network.prefix,
        ctx.profile.network.gateway,
    )
    .map_err(|e| Failure::setup(e.to_string()))?;
    // The guest keeps the address and MAC it had: only the TAP (the host side) is new.
    let (ip, len) = meta.ip.split_once('/').unwrap_or((&meta.ip, "16"));
    let identity = Identity {
        job_id: job_id.to_string(),
        ip: ip
            .parse()
            .map_err(|_| Failure::setup(format!("snapshot ip {:?} is invalid", meta.ip)))?,
        prefix_len: len.parse().unwrap_or(16),
        gateway: meta.gateway.parse().map_err(|_| {
            Failure::setup(format!("snapshot gateway {:?} is invalid", meta.gateway))
        })?,
        mac: meta
            .mac
            .parse::<Mac>()
            .map_err(|e| Failure::setup(e.to_string()))?,
        tap: derived.tap,
    };
    let landlock = job::landlock_enabled(landlock_mode)?;
    let plan = JobPlan {
        identity,
        bridge: meta.bridge.clone(),
        vmm_bin: vmm::find_binary(ctx).map_err(Failure::setup)?,
        cpus: meta.cpus,
        memory_mib: meta.memory_mib,
        boot: format!("restore of {}", dir.display()),
        landlock,
        landlock_write_dirs: Vec::new(),
        keep_disk: false,
        detached: true,
        log_dir: None,
        restored_from: Some(dir.to_path_buf()),
    };
    let mut job = Job::begin(ctx, plan, None)?;
    let jailed = job::jail_enabled(
        jail_mode,
        &ctx.profile.launch,
        &[],
        &[
            job.paths.runtime.parent().unwrap_or(Path::new("/")),
            job.paths.bases.parent().unwrap_or(Path::new("/")),
            dir,
        ],
    );
    if jailed {
        // The same jail as the snapshot's job: its uid when free (the snapshot's files are
        // that uid's already), else a new one.
        job.enter_jail(&ctx.profile.launch, meta.jail_uid)?;
    }

    // A fresh copy of the snapshot's disk: the snapshot stays restorable any number of times.
    let (src_disk, note) = match (&meta.disk_file, &meta.live_disk) {
        (Some(f), _) => (dir.join(f), None),
        (None, Some(p)) => (
            p.clone(),
            Some("the snapshot was taken without --stop: its disk is the job's disk as it is now, not as it was at the snapshot"),
        ),
        (None, None) => return Err(Failure::setup("the snapshot records no disk")),
    };
    if !src_disk.exists() {
        return Err(Failure::setup(format!(
            "the snapshot's disk {} is gone{}",
            src_disk.display(),
            if meta.disk_file.is_none() {
                " (snapshot without --stop, and the job was stopped since; take snapshots with --stop to keep the disk)"
            } else {
                ""
            }
        )));
    }
    if let Some(n) = note {
        eprintln!("chvkit: warning: {n}");
    }
    let kind = meta.disk_kind.unwrap_or(DiskKind::Qcow2Overlay);
    if let Some(b) = &meta.disk_base {
        if !b.exists() {
            return Err(Failure::setup(format!(
                "the disk's qcow2 base {} is gone",
                b.display()
            )));
        }
    }
    let dest = job
        .paths
        .disk_stem
        .with_extension(if kind == DiskKind::Reflink {
            "raw"
        } else {
            "qcow2"
        });
    if let Some(p) = dest.parent() {
        fs::create_dir_all(p).map_err(|e| Failure::setup(format!("{}: {e}", p.display())))?;
    }
    disk::copy_file(&src_disk, &dest).map_err(|e| Failure::setup(e.to_string()))?;
    let d = JobDisk {
        path: dest,
        kind,
        base: meta.disk_base.clone(),
        env_in_slot: meta.env_disk_file.is_none(),
    };
    job.adopt_disk(d.clone())?;
    if let Some(env) = &meta.env_disk_file {
        disk::copy_file(&dir.join(env), &job.paths.env_disk)
            .map_err(|e| Failure::setup(e.to_string()))?;
        job.jail_env_disk()?;
    }

    // The restore source: the snapshot with paths rewritten for this job.
    let staging = job.paths.restore_dir.clone();
    rundir::create_private_dir(&staging)
        .map_err(|e| Failure::setup(format!("{}: {e}", staging.display())))?;
    rewrite_config(
        cfg,
        &d,
        &job.paths,
        &job.state.tap,
        landlock,
        &job.paths.snapshots,
        job.jail.is_some(),
    );
    if landlock {
        let _ = fs::create_dir_all(&job.paths.snapshots);
        job.state.landlock_write_dirs = vec![job.paths.snapshots.clone()];
    }
    let text = serde_json::to_vec(cfg).map_err(|e| Failure::setup(e.to_string()))?;
    crate::fsutil::write_atomic(&staging.join("config.json"), &text, 0o600)
        .map_err(|e| Failure::setup(e.to_string()))?;
    if job.jail.is_some() {
        let st = staging.clone();
        job.on_cleanup("give the snapshot files back to root", move || {
            crate::jail::reclaim_dir(&st).map_err(|e| e.to_string())
        });
    }
    if let Some(j) = &job.jail {
        // The restored VMM reads the staged snapshot as the job's uid.
        j.give(&staging)
            .map_err(|e| Failure::setup(e.to_string()))?;
        j.give(&staging.join("config.json"))
            .map_err(|e| Failure::setup(e.to_string()))?;
    }
    for e in fs::read_dir(dir)
        .map_err(|e| Failure::setup(format!("{}: {e}", dir.display())))?
        .flatten()
    {
        let name = e.file_name();
        let n = name.to_string_lossy();
        if n == "config.json"
            || n == SNAPSHOT_META
            || Some(n.as_ref()) == meta.env_disk_file.as_deref()
            || Some(n.as_ref()) == meta.disk_file.as_deref()
        {
            continue;
        }
        link_or_symlink(&e.path(), &staging.join(&name))
            .map_err(|err| Failure::setup(format!("{}: {err}", e.path().display())))?;
        if let Some(j) = &job.jail {
            // The restored VMM reads them: they become its uid's (a link shares the inode,
            // so the snapshot's files change owner too: they are this VM's memory and state).
            j.give(&staging.join(&name))
                .map_err(|err| Failure::setup(err.to_string()))?;
            job.check_readable(&staging.join(&name))?;
        }
    }

    job.save_state()?;
    job.create_tap()?;

    let (side, job) = supervisor::fork_supervisor(job)?;
    let (mut w, mut job) = match (side, job) {
        (ForkSide::Parent(rep), _) => return Ok(RestoreDone::Parent(rep)),
        (ForkSide::Child(w), Some(j)) => (w, j),
        (ForkSide::Child(_), None) => return Err(Failure::setup("internal: fork lost the job")),
    };
    let started = Instant::now();
    let mut restore_ms = 0;
    let restored = (|| -> Result<Client, Failure> {
        job.spawn_vmm()?;
        let mut c = job.connect()?;
        let t0 = Instant::now();
        c.restore(&staging).map_err(|e| {
            Failure::new(
                code::BOOT_FAILED,
                "restore_failed",
                format!("{e}{}", nested_state_hint(&e)),
            )
        })?;
        restore_ms = t0.elapsed().as_millis() as u64;
        c.resume()
            .map_err(|e| Failure::new(code::BOOT_FAILED, "restore_failed", e.to_string()))?;
        job.mark_running()?;
        Ok(c)
    })();
    let mut client = match restored {
        Ok(c) => c,
        Err(f) => {
            if let Some(v) = job.vmm.as_mut() {
                let _ = v.stop(
                    Some(&mut Client::new(&job.paths.socket)),
                    Duration::from_secs(3),
                );
            }
            job.finish(Some(f.exit_info()), false);
            supervisor::send_report(&mut w, &f.report());
            return Ok(RestoreDone::Child(code::BOOT_FAILED));
        }
    };
    let st = &job.state;
    supervisor::send_report(
        &mut w,
        &Report::running(serde_json::json!({
            "job_id": st.job_id, "state": "running", "restored_from": dir, "ip": st.ip,
            "mac": st.mac, "tap": st.tap, "vmm_pid": st.vmm_pid,
            "supervisor_pid": st.supervisor_pid, "restore_ms": restore_ms,
            "total_ms": started.elapsed().as_millis() as u64, "run_dir": job.paths.dir,
        })),
    );
    drop(w);
    let watch = Watch {
        timeout: None,
        grace: Duration::from_secs(3),
        console: false,
    };
    let out = match job.vmm.as_mut() {
        Some(v) => supervisor::supervise(v, &mut client, &job.paths, sigs, &watch),
        None => return Err(Failure::boot("no VMM")),
    };
    job.finish(
        Some(ExitInfo {
            code: out.code,
            reason: out.reason.into(),
            detail: out.detail.clone(),
        }),
        true,
    );
    Ok(RestoreDone::Child(out.code))
}

/// Point a snapshot's `config.json` at this job's disk, env disk, serial log and TAP.
fn rewrite_config(
    cfg: &mut serde_json::Value,
    d: &JobDisk,
    paths: &JobPaths,
    tap: &str,
    landlock: bool,
    snapshots: &Path,
    jailed: bool,
) {
    use serde_json::json;
    if let Some(disks) = cfg.get_mut("disks").and_then(|v| v.as_array_mut()) {
        for (i, disk) in disks.iter_mut().enumerate() {
            let id = disk
                .get("id")
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_string();
            if id == "rootfs" || (id.is_empty() && i == 0) {
                disk["path"] = json!(d.path);
            } else if id == "env" || (id.is_empty() && i == 1) {
                disk["path"] = json!(paths.env_disk);
            }
        }
    }
    if let Some(serial) = cfg.get_mut("serial") {
        if serial.get("mode").and_then(|m| m.as_str()) == Some("File") {
            serial["file"] = json!(paths.serial);
        }
    }
    if let Some(net) = cfg.get_mut("net").and_then(|v| v.as_array_mut()) {
        if let Some(n) = net.first_mut() {
            n["tap"] = json!(tap);
            if jailed {
                // The VMM recorded the old TAP's host-side MAC and would set it on the new
                // TAP (SIOCSIFHWADDR needs CAP_NET_ADMIN, which a jailed VMM lacks). The
                // guest never sees that MAC (the TAP is a bridge port): let the VMM read the
                // new TAP's own.
                if let Some(o) = n.as_object_mut() {
                    o.remove("host_mac");
                }
            }
        }
    }
    cfg["landlock_enable"] = json!(landlock);
    if landlock {
        let mut rules = job::landlock_base_rules(d, tap);
        rules.push(json!({ "path": snapshots, "access": "rw" }));
        cfg["landlock_rules"] = json!(rules);
    } else if let Some(o) = cfg.as_object_mut() {
        o.remove("landlock_rules");
    }
}
