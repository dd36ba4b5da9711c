//! The launch itself: prepare (lock, run dir, disk, env disk, TAP), start the VMM, create and
//! boot the VM, supervise it until it ends, clean up in reverse order. The job and its
//! supervisor live in job.rs and supervisor.rs, which `vm restore` reuses with `vm.restore` in
//! place of create + boot.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use super::api::Client;
use super::config::{self, Boot, LaunchSpec};
use super::disk::{self, JobDisk};
use super::identity;
use super::job::{jail_enabled, landlock_base_rules, landlock_enabled, Failure, Job, JobPlan};
use super::rundir::{ExitInfo, JobPaths};
use super::supervisor::{
    fork_supervisor, send_report, supervise, ForkSide, Outcome, Report, Signals, Watch,
};
use super::vmm;
use super::{code, LaunchArgs};
use crate::rootfs::envslot;
use crate::Context;

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
            // Where /init finds checker.env: the file chvkit wrote into the job disk, or the
            // env disk.
            let env_word = if d.env_in_slot {
                envslot::CMDLINE_ARG.to_string()
            } else {
                crate::rootfs::envdisk::cmdline_arg(super::config::ENV_DEVICE)
            };
            let mut p = json!({ "kernel": kernel, "cmdline": format!("{cmdline} {env_word}") });
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
    let mut disks = vec![root];
    if !d.env_in_slot {
        disks.push(
            json!({ "path": paths.env_disk, "readonly": true, "image_type": "Raw", "id": "env" }),
        );
    }
    let mut cfg = json!({
        "cpus": { "boot_vcpus": spec.cpus, "max_vcpus": spec.cpus },
        "memory": { "size": u64::from(spec.memory_mib) << 20 },
        "payload": payload,
        "disks": disks,
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
fn print_detached(r: &Report, job_id: &str, json: bool) -> i32 {
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
        let d = job.prepare_disk(&spec.rootfs, &spec.env)?;
        stage(t0, "per-job disk ready");
        if let Some(s) = sigs.pending() {
            return Err(Failure::new(
                code::SIGNAL_BASE + s as i32,
                "signal",
                format!("{} received while preparing", s.as_str()),
            ));
        }
        if !d.env_in_slot {
            job.write_env_disk(&spec.env)?;
            stage(t0, "env disk written");
        }
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
    use crate::launch::identity::Identity;
    use std::time::Duration;

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
            cmdline: "console=ttyS0 root=/dev/vda rw".into(),
            source: "--kernel",
        });
        let mut d = JobDisk {
            path: "/x/var/lib/chvkit/disks/j1.qcow2".into(),
            kind: DiskKind::Qcow2Overlay,
            base: Some("/x/var/lib/chvkit/bases/b.qcow2".into()),
            env_in_slot: false,
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
        assert_eq!(
            c["payload"]["cmdline"],
            "console=ttyS0 root=/dev/vda rw chvkit.env=/dev/vdb"
        );
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
        // The environment in the job disk's slot: one disk, and /init is told so.
        d.env_in_slot = true;
        let c = vm_config(&s, &paths(), &d, true);
        assert_eq!(c["disks"].as_array().unwrap().len(), 1);
        assert_eq!(
            c["payload"]["cmdline"],
            "console=ttyS0 root=/dev/vda rw chvkit.env=/etc/checker.env"
        );

        let raw = JobDisk {
            path: "/d.raw".into(),
            kind: DiskKind::Reflink,
            base: None,
            env_in_slot: false,
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
