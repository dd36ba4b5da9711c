//! Where a job lives on the host, its state file, and the per-job lock.
//!
//! ```text
//! <runtime_dir>/<job>.lock      flock held by the job's supervisor for the job's whole life
//! <runtime_dir>/<job>/          run dir, 0700: api.sock, serial.log, events.log, vmm.log,
//!                               state.json, env.img (and restore/ for restored jobs)
//! <state_dir>/disks/<job>.*     the per-job disk (qcow2 overlay or reflinked raw)
//! <state_dir>/bases/            cached qcow2 bases, shared by jobs
//! ```
//!
//! Liveness is the lock, not a pid: a job is alive exactly while its supervisor (the foreground
//! `launch`, or the detached supervisor) holds `<job>.lock`. The lock dies with the process
//! however it dies, so `gc` can never mistake a recycled pid for a live job.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use super::disk::JobDisk;
use crate::Context;

pub const STATE_SCHEMA: u32 = 1;
/// Longest Unix socket path (sun_path is 108 bytes with the NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// Every path that belongs to one job.
#[derive(Debug, Clone)]
pub struct JobPaths {
    pub job_id: String,
    pub runtime: PathBuf,
    pub dir: PathBuf,
    pub lock: PathBuf,
    pub socket: PathBuf,
    pub serial: PathBuf,
    pub events: PathBuf,
    pub vmm_log: PathBuf,
    pub state: PathBuf,
    pub env_disk: PathBuf,
    pub restore_dir: PathBuf,
    /// The per-job disk without its extension (`.qcow2` or `.raw` is added).
    pub disk_stem: PathBuf,
    pub bases: PathBuf,
    /// Default place Landlock lets a VMM write snapshots.
    pub snapshots: PathBuf,
}

impl JobPaths {
    pub fn new(ctx: &Context, job_id: &str, disk_dir: Option<&Path>) -> JobPaths {
        let runtime = runtime_dir(ctx);
        let state_dir = ctx.root.path(ctx.profile.paths.state_dir.as_path());
        let dir = runtime.join(job_id);
        let disks = disk_dir
            .map(Path::to_path_buf)
            .unwrap_or_else(|| state_dir.join("disks"));
        JobPaths {
            job_id: job_id.to_string(),
            lock: runtime.join(format!("{job_id}.lock")),
            socket: dir.join("api.sock"),
            serial: dir.join("serial.log"),
            events: dir.join("events.log"),
            vmm_log: dir.join("vmm.log"),
            state: dir.join("state.json"),
            env_disk: dir.join("env.img"),
            restore_dir: dir.join("restore"),
            disk_stem: disks.join(job_id),
            bases: state_dir.join("bases"),
            snapshots: state_dir.join("snapshots"),
            runtime,
            dir,
        }
    }

    /// The socket path must fit in sun_path, or the VMM cannot bind it.
    pub fn check_socket_len(&self) -> Result<(), String> {
        let n = self.socket.as_os_str().len();
        if n > MAX_SOCKET_PATH {
            return Err(format!(
                "the API socket path {} is {n} bytes; Unix sockets allow {MAX_SOCKET_PATH}. Use a shorter --root, runtime dir or job id",
                self.socket.display()
            ));
        }
        Ok(())
    }
}

pub fn runtime_dir(ctx: &Context) -> PathBuf {
    ctx.root.path(ctx.profile.paths.runtime_dir.as_path())
}

/// Create a directory with mode 0700 (and its parents); an existing one is left as it is.
pub fn create_private_dir(p: &Path) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if let Some(parent) = p.parent() {
        fs::create_dir_all(parent)?;
    }
    match fs::DirBuilder::new().mode(0o700).create(p) {
        // The umask may have cut bits; make the mode exact.
        Ok(()) => fs::set_permissions(p, fs::Permissions::from_mode(0o700)),
        // An existing one keeps its mode: the runtime dir is 0711 once a jailed job made it
        // searchable, and a concurrent launch taking its lock must not undo that.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && p.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

/// The job's lock. Dropping it releases the lock; [`JobLock::release_and_remove`] also unlinks
/// the file (safely: while still holding it).
pub struct JobLock {
    flock: Option<Flock<File>>,
    path: PathBuf,
}

impl std::fmt::Debug for JobLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JobLock({})", self.path.display())
    }
}

impl JobLock {
    /// Take the lock without waiting; `Ok(None)` when someone holds it.
    pub fn try_acquire(path: &Path) -> io::Result<Option<JobLock>> {
        if let Some(parent) = path.parent() {
            create_private_dir(parent)?;
        }
        // Loop because a holder may unlink the file between our open and our flock: then we
        // would hold a lock on a file nobody else can find.
        for _ in 0..64 {
            let f = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .open(path)?;
            let flock = match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
                Ok(l) => l,
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => return Ok(None),
                Err((_, e)) => return Err(e.into()),
            };
            let same = match fs::metadata(path) {
                Ok(md) => {
                    let fmd = flock.metadata()?;
                    md.ino() == fmd.ino() && md.dev() == fmd.dev()
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => false,
                Err(e) => return Err(e),
            };
            if same {
                return Ok(Some(JobLock {
                    flock: Some(flock),
                    path: path.to_path_buf(),
                }));
            }
        }
        Err(io::Error::other(format!(
            "lock file {} keeps being replaced",
            path.display()
        )))
    }

    /// Is the job alive (someone holds its lock)? A missing lock file means no.
    pub fn is_held(path: &Path) -> bool {
        if !path.exists() {
            return false;
        }
        match Self::try_acquire(path) {
            // Acquired: nobody held it. Dropping releases it again (the file stays).
            Ok(Some(_l)) => false,
            Ok(None) => true,
            Err(_) => false,
        }
    }

    pub fn release_and_remove(mut self) {
        let _ = fs::remove_file(&self.path);
        self.flock.take();
    }

    /// After `fork`, the parent must not unlock: the lock belongs to the open file description
    /// the child shares, and an unlock from either process releases it for both.
    pub fn forget(mut self) {
        if let Some(f) = self.flock.take() {
            std::mem::forget(f);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Preparing,
    Booting,
    Running,
    Stopping,
    Exited,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Preparing => "preparing",
            Phase::Booting => "booting",
            Phase::Running => "running",
            Phase::Stopping => "stopping",
            Phase::Exited => "exited",
        })
    }
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    pub code: i32,
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// `state.json` in the run dir.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobState {
    pub schema: u32,
    pub job_id: String,
    pub phase: Phase,
    pub supervisor_pid: i32,
    #[serde(default)]
    pub vmm_pid: Option<i32>,
    /// Start time of the VMM process (clock ticks since boot, /proc/PID/stat field 22), so a
    /// recycled pid is never mistaken for it.
    #[serde(default)]
    pub vmm_start_ticks: Option<u64>,
    pub vmm_bin: PathBuf,
    pub tap: String,
    pub bridge: String,
    pub ip: String,
    pub gateway: String,
    pub mac: String,
    pub api_socket: PathBuf,
    pub serial_log: PathBuf,
    pub event_log: PathBuf,
    /// Unix time (seconds) the launch started, and when `vm.boot` (or resume after restore)
    /// returned.
    pub started_at: f64,
    #[serde(default)]
    pub booted_at: Option<f64>,
    #[serde(default)]
    pub disk: Option<JobDisk>,
    /// Where the disk goes (before its extension is known), so a crash between creating it
    /// and recording it still leaves gc a name.
    #[serde(default)]
    pub disk_stem: Option<PathBuf>,
    pub env_disk: PathBuf,
    #[serde(default)]
    pub keep_disk: bool,
    /// Set by `vm snapshot --stop`: the disk now belongs to a snapshot; cleanup must not
    /// remove it.
    #[serde(default)]
    pub disk_handed_over: bool,
    pub detached: bool,
    pub cpus: u8,
    pub memory_mib: u32,
    pub boot: String,
    pub landlock: bool,
    #[serde(default)]
    pub landlock_write_dirs: Vec<PathBuf>,
    #[serde(default)]
    pub restored_from: Option<PathBuf>,
    #[serde(default)]
    pub log_dir: Option<PathBuf>,
    /// The VMM's jail (`--jail on`): its uid/gid and cgroup. `None`: the VMM runs as root.
    #[serde(default)]
    pub jail: Option<crate::jail::JailRecord>,
    #[serde(default)]
    pub exit: Option<ExitInfo>,
}

impl JobState {
    pub fn load(path: &Path) -> io::Result<JobState> {
        let text = fs::read(path)?;
        let st: JobState = serde_json::from_slice(&text).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        })?;
        if st.schema != STATE_SCHEMA {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: schema {} (this chvkit understands {STATE_SCHEMA})",
                    path.display(),
                    st.schema
                ),
            ));
        }
        Ok(st)
    }

    /// Replace the state file atomically (temp + rename). Not fsynced: the run dir lives on
    /// the runtime dir (tmpfs on a normal host) and means nothing after a reboot, while every
    /// fsync is milliseconds on the launch path.
    pub fn save(&self, path: &Path) -> io::Result<()> {
        let mut text = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        text.push(b'\n');
        replace_file(path, &text, 0o600)
    }
}

/// Write `data` to a temp file beside `dest` and rename it over `dest` (readers see the old or
/// the new content, never a mix), without fsync.
pub fn replace_file(dest: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    use std::io::Write;
    let dir = dest.parent().unwrap_or(Path::new("."));
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let r = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(data)?;
        fs::rename(&tmp, dest)
    })();
    if r.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    r
}

pub fn now_unix() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Field 22 of /proc/PID/stat (start time in clock ticks), if the process exists.
pub fn process_start_ticks(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may contain spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Is `pid` still the process that had `ticks` as its start time (and not a zombie)?
pub fn same_process_alive(pid: i32, ticks: Option<u64>) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let Some(close) = stat.rfind(')') else {
        return false;
    };
    let rest = &stat[close + 2..];
    let mut f = rest.split_whitespace();
    if f.next() == Some("Z") {
        return false;
    }
    match ticks {
        Some(t) => process_start_ticks(pid) == Some(t),
        None => true,
    }
}

/// Job ids with a run dir or lock file under the runtime dir.
pub fn list_jobs(ctx: &Context) -> Vec<String> {
    let mut ids = std::collections::BTreeSet::new();
    if let Ok(rd) = fs::read_dir(runtime_dir(ctx)) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let id = name.strip_suffix(".lock").unwrap_or(&name).to_string();
            if super::identity::validate_job_id(&id).is_ok() {
                ids.insert(id);
            }
        }
    }
    ids.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_is_exclusive_and_liveness_follows_it() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("run/j.lock");
        assert!(!JobLock::is_held(&p));
        let l = JobLock::try_acquire(&p).unwrap().unwrap();
        assert!(JobLock::try_acquire(&p).unwrap().is_none());
        assert!(JobLock::is_held(&p));
        l.release_and_remove();
        assert!(!p.exists());
        assert!(!JobLock::is_held(&p));
        // Dropped (process death is the same to the kernel): free again.
        let l = JobLock::try_acquire(&p).unwrap().unwrap();
        drop(l);
        assert!(!JobLock::is_held(&p));
    }

    #[test]
    fn start_ticks_identify_processes() {
        let me = std::process::id() as i32;
        let t = process_start_ticks(me).unwrap();
        assert!(same_process_alive(me, Some(t)));
        assert!(!same_process_alive(me, Some(t + 1)));
        assert!(!same_process_alive(i32::MAX, None));
    }
}
