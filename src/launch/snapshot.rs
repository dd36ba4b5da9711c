//! `chvkit vm snapshot JOB DIR [--stop]`: pause, have the VMM write the snapshot where its jail
//! lets it (the job's snapshots dir), resume, and deliver the result into DIR whole — a rename on
//! the same filesystem, a synced copy into a fresh directory beside DIR otherwise — with
//! chvkit's own metadata (`chvkit.json`) that `vm restore` reads.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::api::{self, Client};
use super::disk::{self, DiskKind};
use super::job::{self, HANDOVER_MARKER};
use super::rundir;
use super::target::{fail, running_target, stop_supervisor};
use crate::{exit, Context};

/// chvkit's own metadata in a snapshot directory.
pub const SNAPSHOT_META: &str = "chvkit.json";
pub(super) const SNAPSHOT_SCHEMA: u32 = 1;

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

/// Is this the host's PVM nested-state failure (facts §5)?
pub(super) fn nested_state_hint(e: &api::ApiError) -> String {
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

fn is_empty_dir(d: &Path) -> io::Result<bool> {
    Ok(fs::read_dir(d)?.next().is_none())
}

pub(super) fn snapshot(
    ctx: &Context,
    job: &str,
    dir: &Path,
    stop_after: bool,
) -> anyhow::Result<i32> {
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

pub(super) fn write_meta(dir: &Path, meta: &SnapshotMeta) -> anyhow::Result<()> {
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
