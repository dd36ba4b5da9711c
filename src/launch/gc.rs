//! `chvkit gc`: remove what dead jobs left — a VMM still running without its supervisor, the
//! persistent TAP, the API socket, the per-job disk (unless kept), the run dir, the lock file.
//!
//! A job is dead when nobody holds its lock (see rundir.rs); gc takes the lock itself while it
//! collects, so a launch of the same id waits instead of racing it.

use std::fs;
use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use super::disk::BaseSource;
use super::identity;
use super::rundir::{self, JobLock, JobPaths, JobState};
use super::{tap, GcArgs};
use crate::Context;

/// Collect one dead job (the caller holds or has just taken its lock). Returns what was done.
pub fn collect_job(paths: &JobPaths, dry_run: bool) -> Result<Vec<String>, String> {
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
        let handed_over =
            st.disk_handed_over || paths.dir.join(super::vm::HANDOVER_MARKER).exists();
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

fn remove_file(p: &Path) -> Result<(), String> {
    match fs::remove_file(p) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(format!("{}: {e}", p.display())),
        _ => Ok(()),
    }
}

pub fn run(ctx: &Context, a: GcArgs) -> anyhow::Result<i32> {
    let mut failures = 0;
    let mut live = 0;
    let mut collected = 0;
    for id in rundir::list_jobs(ctx) {
        let paths = JobPaths::new(ctx, &id, None);
        let lock = match JobLock::try_acquire(&paths.lock) {
            Ok(Some(l)) => l,
            Ok(None) => {
                live += 1;
                continue;
            }
            Err(e) => {
                eprintln!("chvkit gc: {id}: lock {}: {e}", paths.lock.display());
                failures += 1;
                continue;
            }
        };
        match collect_job(&paths, a.dry_run) {
            Ok(done) => {
                for d in &done {
                    say!("{id}: {d}");
                }
                collected += 1;
                if a.dry_run {
                    drop(lock);
                } else {
                    lock.release_and_remove();
                }
            }
            Err(e) => {
                eprintln!("chvkit gc: {id}: {e}");
                failures += 1;
            }
        }
    }
    failures += gc_orphan_cgroups(ctx, a.dry_run);
    if a.bases {
        failures += gc_bases(ctx, a.dry_run);
    }
    say!(
        "gc: {collected} dead job(s) {}, {live} live job(s) left alone{}",
        if a.dry_run { "to collect" } else { "collected" },
        if failures > 0 {
            format!(", {failures} problem(s)")
        } else {
            String::new()
        }
    );
    Ok(if failures > 0 {
        crate::exit::FAILURE
    } else {
        crate::exit::OK
    })
}

/// Remove job cgroups of this runtime dir whose job is not alive and has no state left to
/// name them (a launch killed between creating its cgroup and recording it; a run dir
/// removed by hand). Whatever still runs in one is killed.
fn gc_orphan_cgroups(ctx: &Context, dry_run: bool) -> i32 {
    let runtime = rundir::runtime_dir(ctx);
    let mut failures = 0;
    for (name, cg) in crate::jail::cgroup::job_cgroups() {
        let Some(job) = crate::jail::job_of_cgroup(&name, &runtime) else {
            continue;
        };
        if identity::validate_job_id(job).is_err() {
            continue;
        }
        let paths = JobPaths::new(ctx, job, None);
        if JobLock::is_held(&paths.lock) {
            continue;
        }
        say!(
            "{job}: {}remove orphan cgroup {name}",
            if dry_run { "would " } else { "" }
        );
        if !dry_run {
            if let Err(e) = cg.remove() {
                eprintln!("chvkit gc: {job}: {e}");
                failures += 1;
            }
        }
    }
    failures
}

/// Remove cached bases whose rootfs changed or vanished and that no job's state names.
fn gc_bases(ctx: &Context, dry_run: bool) -> i32 {
    let bases = JobPaths::new(ctx, "x", None).bases;
    let in_use: Vec<_> = rundir::list_jobs(ctx)
        .into_iter()
        .filter_map(|id| JobState::load(&JobPaths::new(ctx, &id, None).state).ok())
        .filter_map(|s| s.disk.and_then(|d| d.base))
        .collect();
    let Ok(rd) = fs::read_dir(&bases) else {
        return 0;
    };
    let mut failures = 0;
    for e in rd.flatten() {
        let meta = e.path();
        if meta.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let Ok(src) = fs::read(&meta)
            .map_err(|_| ())
            .and_then(|b| serde_json::from_slice::<BaseSource>(&b).map_err(|_| ()))
        else {
            continue;
        };
        let img = meta.with_extension("qcow2");
        if src.still_matches() || in_use.contains(&img) {
            continue;
        }
        say!(
            "{} base {} (its rootfs {} changed or is gone)",
            if dry_run { "would remove" } else { "remove" },
            img.display(),
            src.source.display()
        );
        if !dry_run {
            for f in [&img, &meta] {
                if let Err(e) = remove_file(f) {
                    eprintln!("chvkit gc: {e}");
                    failures += 1;
                }
            }
        }
    }
    failures
}
