//! `chvkit launch --jail on`: the VMM runs as a uid/gid of the job's own, with no
//! capabilities, no_new_privs, the /dev/kvm group, inside a cgroup with the job's limits; the
//! TAP, disk and env disk are the job's; nothing is left after stop, or after kill -9 + gc.
//!
//! Against the real Cloud Hypervisor when present (`CHV_BIN`), the stand-in for the exit status
//! and snapshot paths. Each test has its own network namespace and `--root` (made searchable
//! by others: the jailed VMM must reach its files through it).

mod common;
mod launch_env;
mod vmm;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use launch_env::{alive, identity, Env, Which};

/// Nothing of `job` is left (the launch tests' check), and none of its cgroup directories.
fn assert_clean(e: &Env, job: &str, cgroup: &[PathBuf], vmm_pid: Option<i64>) {
    e.assert_clean(job, vmm_pid);
    for d in cgroup {
        assert!(!d.exists(), "{}: cgroup {} left", e.test, d.display());
    }
}

/// `/proc/<pid>/status` as key → value.
fn status(pid: i64) -> std::collections::HashMap<String, String> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

/// The jail recorded in a job's state: (uid, cgroup dirs).
fn jail_of(st: &serde_json::Value) -> (u32, Vec<PathBuf>) {
    let j = &st["jail"];
    let uid = j["uid"].as_u64().unwrap_or_else(|| panic!("no jail: {st}")) as u32;
    let dirs = j["cgroup"]["dirs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| PathBuf::from(d.as_str().unwrap()))
        .collect();
    (uid, dirs)
}

fn kvm_gid() -> u32 {
    fs::metadata("/dev/kvm").unwrap().gid()
}

/// Everything the issue asks of a jailed VMM process.
fn assert_jailed(test: &str, pid: i64, uid: u32, cgroup: &[PathBuf]) {
    let s = status(pid);
    let ids = |k: &str| -> Vec<u32> {
        s[k].split_whitespace()
            .map(|v| v.parse().unwrap())
            .collect()
    };
    assert_eq!(ids("Uid"), vec![uid; 4], "{test}: {s:?}");
    assert_eq!(ids("Gid"), vec![uid; 4], "{test}: {s:?}");
    assert_ne!(uid, 0);
    assert_eq!(ids("Groups"), vec![kvm_gid()], "{test}: {s:?}");
    for k in ["CapEff", "CapPrm", "CapBnd", "CapAmb", "CapInh"] {
        assert_eq!(s[k], "0000000000000000", "{test}: {k}");
    }
    assert_eq!(s["NoNewPrivs"], "1", "{test}");
    let cg = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let name = cgroup[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    for c in ["memory", "pids"] {
        assert!(
            cg.lines()
                .any(|l| l.ends_with(&format!("/chvkit/{name}")) && l.contains(c)
                    || l.starts_with("0::") && l.ends_with(&format!("/chvkit/{name}"))),
            "{test}: {c} cgroup not {name}:\n{cg}"
        );
    }
}

fn memory_limit_file(cgroup: &[PathBuf]) -> u64 {
    let d = &cgroup[0];
    let f = if d.join("memory.max").exists() {
        d.join("memory.max")
    } else {
        d.join("memory.limit_in_bytes")
    };
    fs::read_to_string(f).unwrap().trim().parse().unwrap()
}

fn pids_max_file(cgroup: &[PathBuf]) -> String {
    let d = cgroup.iter().find(|d| d.join("pids.max").exists()).unwrap();
    fs::read_to_string(d.join("pids.max"))
        .unwrap()
        .trim()
        .to_string()
}

/// Run `argv` as `uid`:`uid` without supplementary groups; its exit status.
fn as_uid(uid: u32, script: &str) -> Output {
    Command::new("setpriv")
        .args([
            "--reuid",
            &uid.to_string(),
            "--regid",
            &uid.to_string(),
            "--clear-groups",
            "sh",
            "-c",
            script,
        ])
        .output()
        .unwrap()
}

fn sh_quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', "'\\''"))
}

#[test]
fn jail_confines_the_vmm_and_nothing_is_left() {
    let Some(e) = Env::jailed("jail_confines_the_vmm_and_nothing_is_left", Which::Any) else {
        return;
    };
    let profile = chvkit::profile::Profile::embedded().unwrap();
    let want_limit = (128 + u64::from(profile.launch.vmm_overhead_mib)) << 20;

    // Two concurrent jobs.
    let mut jobs = Vec::new();
    for job in ["ja", "jb"] {
        let o = e.launch(job, &["--detach", "--json"]);
        assert!(o.status.success(), "{}", common::text(&o));
        let st = e.state(job).unwrap();
        let (uid, cg) = jail_of(&st);
        let pid = st["vmm_pid"].as_i64().unwrap();
        assert_jailed(e.test, pid, uid, &cg);
        assert_eq!(memory_limit_file(&cg), want_limit, "{}", e.test);
        assert_eq!(pids_max_file(&cg), profile.launch.pids_max.to_string());
        // The TAP is the job's.
        let tap = identity(job).tap;
        let owner = e.ns.sh_ok(&format!(
            "cat /sys/class/net/{tap}/owner /sys/class/net/{tap}/group"
        ));
        assert_eq!(
            owner.split_whitespace().collect::<Vec<_>>(),
            [uid.to_string(), uid.to_string()]
        );
        // Its disk and env disk too.
        assert_eq!(fs::metadata(e.disk_of(job)).unwrap().uid(), uid);
        assert_eq!(
            fs::metadata(e.run_dir(job).join("env.img")).unwrap().uid(),
            uid
        );
        // vm info shows the memory in use and its limit.
        let o = e.chvkit(&["vm", "info", job, "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["memory"]["limit"], want_limit, "{v}");
        assert!(v["memory"]["current"].as_u64().unwrap() > 0, "{v}");
        let o = e.chvkit(&["vm", "info", job]);
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("memory:"),
            "{}",
            common::text(&o)
        );
        jobs.push((job, uid, cg, pid));
    }
    assert_ne!(jobs[0].1, jobs[1].1, "two live jobs share a uid");
    vmm::notice(
        e.test,
        &format!(
            "uids {} and {}, memory limit {want_limit}",
            jobs[0].1, jobs[1].1
        ),
    );

    // What the first job's uid may and may not open.
    let (uid_a, uid_b) = (jobs[0].1, jobs[1].1);
    let disk_a = e.disk_of("ja");
    let disk_b = e.disk_of("jb");
    let base = e.state("ja").unwrap()["disk"]["base"]
        .as_str()
        .map(PathBuf::from)
        .expect("a qcow2 base on this filesystem");
    let o = as_uid(uid_a, &format!("exec 3<>{}", sh_quote(&disk_a)));
    assert!(o.status.success(), "own disk: {}", common::text(&o));
    for (what, script) in [
        (
            "another job's disk",
            format!("exec 3<{}", sh_quote(&disk_b)),
        ),
        (
            "another job's env disk",
            format!("exec 3<{}", sh_quote(&e.run_dir("jb").join("env.img"))),
        ),
        (
            "the base for writing",
            format!("exec 3>>{}", sh_quote(&base)),
        ),
        ("/etc/shadow", "exec 3</etc/shadow".to_string()),
    ] {
        let o = as_uid(uid_a, &script);
        assert!(!o.status.success(), "uid {uid_a} could open {what}");
    }
    let _ = uid_b;

    // Pause, resume, stop.
    for verb in ["pause", "resume"] {
        let o = e.chvkit(&["vm", verb, "ja"]);
        assert!(o.status.success(), "{verb}: {}", common::text(&o));
    }
    let o = e.chvkit(&["vm", "stop", "ja"]);
    assert!(o.status.success(), "{}", common::text(&o));
    assert_clean(&e, "ja", &jobs[0].2, Some(jobs[0].3));

    // kill -9 of the VMM, then gc.
    let (_, _, cg_b, pid_b) = jobs[1].clone();
    let sup_b = e.state("jb").unwrap()["supervisor_pid"].as_i64().unwrap();
    unsafe { libc::kill(pid_b as i32, libc::SIGKILL) };
    // The supervisor records the crash, cleans up what it can and exits (releasing the lock).
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(sup_b) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!alive(sup_b), "supervisor of jb still runs");
    let o = e.chvkit(&["gc"]);
    assert!(o.status.success(), "{}", common::text(&o));
    assert_clean(&e, "jb", &cg_b, Some(pid_b));

    // kill -9 of the supervisor (the VMM dies with it), then gc removes the cgroup too.
    let mut c = e.spawn_launch("jc", &[]);
    let st = e.wait_running("jc", &mut c);
    let (uid_c, cg_c) = jail_of(&st);
    let pid_c = st["vmm_pid"].as_i64().unwrap();
    assert_jailed(e.test, pid_c, uid_c, &cg_c);
    unsafe { libc::kill(c.id() as i32, libc::SIGKILL) };
    let _ = c.wait();
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(pid_c) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(cg_c[0].exists(), "the cgroup is gc's to remove");
    let o = e.chvkit(&["gc"]);
    assert!(o.status.success(), "{}", common::text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("remove cgroup"),
        "{}",
        common::text(&o)
    );
    assert_clean(&e, "jc", &cg_c, Some(pid_c));
}

#[test]
fn jail_standin_exit_status_snapshot_and_restore() {
    let Some(e) = Env::jailed(
        "jail_standin_exit_status_snapshot_and_restore",
        Which::Standin,
    ) else {
        return;
    };
    // A foreground job to its exit status, jailed.
    let o = e.launch("fg", &["--cmdline", "standin.exit=3", "--json"]);
    assert_eq!(o.status.code(), Some(3), "{}", common::text(&o));
    assert_clean(&e, "fg", &[], None);

    // Snapshot --stop, then restore jailed: the snapshot's uid again (it is free), and a
    // second restore beside it gets another one.
    let o = e.launch("src", &["--detach", "--json"]);
    assert!(o.status.success(), "{}", common::text(&o));
    let (uid, cg) = jail_of(&e.state("src").unwrap());
    assert_jailed(
        e.test,
        e.state("src").unwrap()["vmm_pid"].as_i64().unwrap(),
        uid,
        &cg,
    );
    let snap = e.root.path().join("var/lib/chvkit/snapshots/s1");
    let o = e.chvkit(&["vm", "snapshot", "src", snap.to_str().unwrap(), "--stop"]);
    assert!(o.status.success(), "{}", common::text(&o));
    assert_clean(&e, "src", &cg, None);
    // The snapshot outlives the job: root's again, not the (reusable) job uid's.
    let owners = |d: &Path| -> Vec<(String, u32)> {
        fs::read_dir(d)
            .unwrap()
            .flatten()
            .map(|f| {
                (
                    f.file_name().to_string_lossy().into_owned(),
                    f.metadata().unwrap().uid(),
                )
            })
            .collect()
    };
    assert!(
        owners(&snap).iter().all(|(_, u)| *u == 0),
        "{:?}",
        owners(&snap)
    );
    let mut uids = Vec::new();
    for job in ["src", "copy"] {
        let o = e.chvkit(&[
            "vm",
            "restore",
            snap.to_str().unwrap(),
            "--job-id",
            job,
            "--jail",
            "on",
            "--json",
        ]);
        assert!(o.status.success(), "{}", common::text(&o));
        let st = e.state(job).unwrap();
        let (u, c) = jail_of(&st);
        assert_jailed(e.test, st["vmm_pid"].as_i64().unwrap(), u, &c);
        uids.push((job, u, c));
    }
    assert_eq!(
        uids[0].1, uid,
        "restore took a new uid although the old one was free"
    );
    assert_ne!(uids[0].1, uids[1].1);
    for (job, _, c) in &uids {
        let o = e.chvkit(&["vm", "stop", job]);
        assert!(o.status.success(), "{}", common::text(&o));
        assert_clean(&e, job, c, None);
    }
    assert!(
        owners(&snap).iter().all(|(_, u)| *u == 0),
        "{:?}",
        owners(&snap)
    );
}

#[test]
fn jail_refuses_unreachable_files_and_leaves_nothing() {
    let Some(e) = Env::jailed(
        "jail_refuses_unreachable_files_and_leaves_nothing",
        Which::Standin,
    ) else {
        return;
    };
    // The kernel in a directory the job's uid cannot enter.
    let hidden = e.work.path().join("private");
    fs::create_dir(&hidden).unwrap();
    let kernel = hidden.join("vmlinux");
    fs::copy(&e.kernel, &kernel).unwrap();
    fs::set_permissions(&hidden, fs::Permissions::from_mode(0o700)).unwrap();
    let mut a = e.launch_args("nope", &["--json"]);
    let i = a.iter().position(|x| x == "--kernel").unwrap();
    a[i + 1] = kernel.to_str().unwrap().to_string();
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let o = e.chvkit(&a);
    assert_eq!(o.status.code(), Some(1), "{}", common::text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("cannot reach") && err.contains("private"),
        "{err}"
    );
    // A cgroup no state names (a launch killed between making and recording it): gc's.
    let runtime = e.root.path().join("run/chvkit");
    let orphan = chvkit::jail::cgroup_name("orphan", &runtime);
    let (version, cg_root) = chvkit::jail::cgroup::detect().unwrap();
    let dirs: Vec<PathBuf> = match version {
        chvkit::jail::cgroup::Version::V2 => vec![cg_root.join("chvkit").join(&orphan)],
        chvkit::jail::cgroup::Version::V1 => ["memory", "pids", "cpu"]
            .iter()
            .map(|c| cg_root.join(c).join("chvkit").join(&orphan))
            .collect(),
    };
    for d in &dirs {
        fs::create_dir_all(d).unwrap();
    }
    let o = e.chvkit(&["gc"]);
    assert!(o.status.success(), "{}", common::text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(&format!("remove orphan cgroup {orphan}")),
        "{}",
        common::text(&o)
    );
    for d in &dirs {
        assert!(!d.exists(), "{} left", d.display());
    }
    let cg_name = "nope@";
    assert_clean(&e, "nope", &[], None);
    for c in ["memory", "pids", "cpu", ""] {
        let parent = Path::new("/sys/fs/cgroup").join(c).join("chvkit");
        if let Ok(rd) = fs::read_dir(&parent) {
            for d in rd.flatten() {
                let n = d.file_name().to_string_lossy().into_owned();
                assert!(
                    !n.starts_with(cg_name),
                    "cgroup {n} left in {}",
                    parent.display()
                );
            }
        }
    }
}
