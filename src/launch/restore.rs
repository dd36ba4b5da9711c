//! `chvkit vm restore DIR`: a snapshot `vm snapshot` delivered becomes a running job again —
//! a new job (id, lock, run dir), a copy of the snapshot's disk, the same jail as a launch (a
//! new uid if the old one is taken, cgroup, Landlock), and the snapshot's `config.json` rewritten
//! for this job's disk, env disk, serial log and TAP before `vm.restore`.

use std::fs;
use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use super::api::Client;
use super::disk::{self, DiskKind, JobDisk};
use super::identity::{self, Identity, Mac};
use super::job::{self, Failure, Job, JobPlan};
use super::rundir::{self, ExitInfo, JobPaths};
use super::snapshot::{nested_state_hint, SnapshotMeta, SNAPSHOT_META};
use super::supervisor::{self, ForkSide, Report, Signals, Watch};
use super::target::{fail, usage};
use super::{code, vmm, JailMode, LandlockMode};
use crate::{exit, Context};

/// Link (or, across filesystems, symlink) `src` to `dest`: memory-ranges can be as big as the
/// guest's RAM and is only read.
fn link_or_symlink(src: &Path, dest: &Path) -> io::Result<()> {
    match fs::hard_link(src, dest) {
        Ok(()) => Ok(()),
        Err(_) => std::os::unix::fs::symlink(src, dest),
    }
}

pub(super) fn restore(
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
