//! `chvkit vm …`: the detached lifecycle — ls, info, pause, resume, stop, logs; snapshot and
//! restore have files of their own (snapshot.rs, restore.rs).

use std::io::{self, Write};
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use super::api::{self, Client};
use super::events::ByteTail;
use super::job;
use super::rundir::{self, ExitInfo, JobLock, JobPaths, JobState};
use super::target::{fail, running_target, stop_supervisor, target, usage};
use super::{config, restore, snapshot, VmCommand};
use crate::{exit, Context};

pub fn run(ctx: &Context, c: VmCommand) -> anyhow::Result<i32> {
    match c {
        VmCommand::Ls { json } => ls(ctx, json),
        VmCommand::Info { job, json } => info(ctx, &job, json),
        VmCommand::Pause { job } => simple(ctx, &job, "paused", Client::pause),
        VmCommand::Resume { job } => simple(ctx, &job, "resumed", Client::resume),
        VmCommand::Snapshot { job, dir, stop } => snapshot::snapshot(ctx, &job, &dir, stop),
        VmCommand::Restore {
            dir,
            job_id,
            json,
            landlock,
            jail,
        } => restore::restore(ctx, &dir, job_id, json, landlock, jail),
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
