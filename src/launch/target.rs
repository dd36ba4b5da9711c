//! A job named on the command line (`vm …`, `vm snapshot`, `vm restore`): its paths, its
//! state, whether it is live, a client for its VMM, and how to stop its supervisor; with the
//! exit-code convention of the `vm` commands (`fail`: 1, `usage`: 2).

use std::path::Path;
use std::time::{Duration, Instant};

use super::api::Client;
use super::identity;
use super::rundir::{self, JobLock, JobPaths, JobState};
use crate::{exit, Context};

pub(super) fn fail(msg: impl std::fmt::Display) -> anyhow::Result<i32> {
    eprintln!("chvkit: {msg}");
    Ok(exit::FAILURE)
}

pub(super) fn usage(msg: impl std::fmt::Display) -> anyhow::Result<i32> {
    eprintln!("chvkit: {msg}");
    Ok(exit::USAGE)
}

pub(super) struct Target {
    pub paths: JobPaths,
    pub state: Option<JobState>,
    pub live: bool,
}

pub(super) fn target(ctx: &Context, job: &str) -> Result<Target, anyhow::Result<i32>> {
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

pub(super) fn running_target(
    ctx: &Context,
    job: &str,
) -> Result<(Target, Client), anyhow::Result<i32>> {
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

pub(super) fn wait_dead(lock: &Path, budget: Duration) -> Option<JobLock> {
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
pub(super) fn stop_supervisor(t: &Target, budget: Duration) -> Result<JobLock, String> {
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
