//! `chvkit gc`: remove what dead jobs left — a VMM still running without its supervisor, the
//! persistent TAP, the API socket, the per-job disk (unless kept), the run dir, the lock file.
//!
//! A job is dead when nobody holds its lock (see rundir.rs); gc takes the lock itself while it
//! collects, so a launch of the same id waits instead of racing it.

use std::fs;

use super::disk::BaseSource;
use super::identity;
use super::job::{collect_job, remove_file};
use super::rundir::{self, JobLock, JobPaths, JobState};
use super::GcArgs;
use crate::Context;

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
