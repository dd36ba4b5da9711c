//! `cargo bench --bench guest`: the whole job, the figure that matters to a user.
//!
//! A: `chvkit launch` of a `chvkit rootfs` image (built once, cached) with the kernel
//!    `chvkit kernel` installed, to chvkit's exit with the job's status.
//! B: the seed's way by hand: copy the image, write `/etc/checker.env` into the copy (debugfs),
//!    create the TAP on the bridge, run the bare `cloud-hypervisor` CLI with the same kernel,
//!    command line, vCPUs, memory and TAP, wait for the exit marker on the serial log and for
//!    the VMM to exit, remove the TAP and the copy.
//!
//! Runs interleaved (ABAB…, order flipped every pair) in one network namespace set up by
//! `chvkit setup`; medians, spread and the ratio A/B (goal ≤ 1.0), each run broken down from
//! the host's view of the serial log: start → kernel entry (when `Run /init` appeared less the
//! kernel's own clock there) → first serial byte → `Run /init` → the workload's first line →
//! exit marker → process exit. Also the kernel's own printk time at `Run /init`
//! (boot to /init; goal ≤ 20 s at 512 MiB). `CHVKIT_BENCH_RUNS` pairs (default 3: a boot takes
//! tens of seconds on PVM hosts). Needs root, the real VMM (`CHV_BIN`) and a guest kernel that
//! runs here (see `tests/guest/mod.rs`); otherwise it says `skipped: …`.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/guest/mod.rs"]
mod guest;
#[path = "../tests/qemu/mod.rs"]
mod qemu;
mod support;

use std::fs;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use support::{loadavg, median};

const CPUS: &str = "1";
const MEMORY_MIB: &str = "512";

/// Host-side milestones of one run, in seconds from its start.
#[derive(Debug, Default, Clone, Copy)]
struct Run {
    first_byte: Option<f64>,
    run_init: Option<f64>,
    workload: Option<f64>,
    marker: Option<f64>,
    end: f64,
    /// The guest kernel's printk time at `Run /init`.
    printk_init: Option<f64>,
}

fn skip(reason: &str) {
    println!("skipped: guest bench: {reason}");
}

fn main() {
    if !common::is_root() {
        return skip("needs root (network namespaces, TAPs)");
    }
    for t in ["ip", "buildah", "umoci", "debugfs", "mkfs.ext4"] {
        if !common::have_tool(t) {
            return skip(&format!("`{t}` is not installed (make test-deps)"));
        }
    }
    let Some(vmm) = std::env::var_os("CHV_BIN").filter(|v| !v.is_empty()) else {
        return skip("needs the real Cloud Hypervisor (CHV_BIN; `make bench` installs it)");
    };
    let (kernel_yaml, which) = match guest::kernel_section() {
        Ok(k) => k,
        Err(why) => return skip(&why),
    };
    let runs: usize = std::env::var("CHVKIT_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    let root = tempfile::tempdir().expect("tempdir");
    // Searchable, as /var/lib and /run are on a host: chvkit's default jail applies.
    fs::set_permissions(
        root.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod root");
    let profile = root.path().join("profile.yaml");
    fs::write(&profile, guest::profile_yaml(&kernel_yaml)).expect("profile");
    let ns = common::NetNs::new("gb");
    let chvkit = |args: &[&str]| {
        let mut c = ns.cmd(common::chvkit());
        c.arg("--root")
            .arg(root.path())
            .arg("--profile")
            .arg(&profile)
            .args(args)
            .env("CHV_BIN", &vmm)
            .env_remove("CHV_KERNEL_PATH");
        c
    };
    let out = chvkit(&["setup", "--network-only"])
        .output()
        .expect("setup");
    assert!(out.status.success(), "setup: {}", common::text(&out));
    let out = chvkit(&["kernel", "--json"]).output().expect("kernel");
    assert!(out.status.success(), "kernel: {}", common::text(&out));
    let k: serde_json::Value = serde_json::from_slice(&out.stdout).expect("kernel json");
    let vmlinux = k["vmlinux"].as_str().expect("vmlinux").to_string();
    let cmdline = k["cmdline"].as_str().expect("cmdline").to_string();
    let t = Instant::now();
    let img = guest::image().clone();
    println!(
        "guest bench: {runs} interleaved pairs, {CPUS} vCPU, {MEMORY_MIB} MiB; kernel: {which}; \
         image built in {:.1} s; VMM {}; load {}",
        t.elapsed().as_secs_f64(),
        Path::new(&vmm).display(),
        loadavg()
    );
    println!("  cmdline: {cmdline}");
    let work = tempfile::tempdir().expect("tempdir");
    let mut a_runs = Vec::new();
    let mut b_runs = Vec::new();
    for i in 0..runs {
        let job = format!("gbench-{i}");
        let a = || {
            let t0 = Instant::now();
            let child = chvkit(&[
                "launch",
                "--rootfs",
                img.to_str().unwrap_or_default(),
                "--job-id",
                &job,
                "--cpus",
                CPUS,
                "--memory",
                MEMORY_MIB,
                "--env",
                "CHECKER_MODE=quick",
                "--timeout",
                "600s",
                "--jail",
                "on",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn chvkit");
            let serial = root.path().join("run/chvkit").join(&job).join("serial.log");
            watch(t0, child, &serial, "chvkit launch")
        };
        let b = || hand(&ns, &vmm, &vmlinux, &cmdline, &img, work.path(), &job);
        if i % 2 == 0 {
            a_runs.push(a());
            b_runs.push(b());
        } else {
            b_runs.push(b());
            a_runs.push(a());
        }
        let (ra, rb) = (a_runs[i], b_runs[i]);
        println!(
            "  pair {i}: chvkit {:.1} s, by hand {:.1} s (ratio {:.3}); load {}",
            ra.end,
            rb.end,
            ra.end / rb.end,
            loadavg()
        );
    }
    report("chvkit launch", &a_runs);
    report("by hand (seed)", &b_runs);
    let mut ratios: Vec<f64> = a_runs
        .iter()
        .zip(&b_runs)
        .map(|(a, b)| a.end / b.end)
        .collect();
    let mut ea: Vec<f64> = a_runs.iter().map(|r| r.end).collect();
    let mut eb: Vec<f64> = b_runs.iter().map(|r| r.end).collect();
    let (ma, mb) = (median(&mut ea), median(&mut eb));
    let mr = median(&mut ratios);
    println!(
        "end-to-end job: chvkit {ma:.1} s vs by hand {mb:.1} s: ratio of medians {:.3}, median of \
         pair ratios {mr:.3} (spread {:.3}–{:.3}); goal <= 1.0",
        ma / mb,
        ratios[0],
        ratios[ratios.len() - 1]
    );
    let mut boot: Vec<f64> = a_runs
        .iter()
        .chain(&b_runs)
        .filter_map(|r| r.printk_init)
        .collect();
    if boot.is_empty() {
        println!("guest kernel boot to /init: no `Run /init` line on the serial console");
    } else {
        let m = median(&mut boot);
        println!(
            "guest kernel boot to /init (printk time, {MEMORY_MIB} MiB): median {m:.1} s \
             (spread {:.1}–{:.1}, {} boots); goal <= 20 s",
            boot[0],
            boot[boot.len() - 1],
            boot.len()
        );
    }
}

/// Follow `serial` while `child` runs; milestones in seconds since `t0`.
fn watch(t0: Instant, mut child: Child, serial: &Path, what: &str) -> Run {
    let mut r = Run::default();
    let secs = || t0.elapsed().as_secs_f64();
    let deadline = Duration::from_secs(900);
    loop {
        let text = fs::read_to_string(serial).unwrap_or_default();
        if r.first_byte.is_none() && !text.is_empty() {
            r.first_byte = Some(secs());
        }
        if r.run_init.is_none() && text.contains("Run /init") {
            r.run_init = Some(secs());
            r.printk_init = guest::printk_time(&text, "Run /init");
        }
        if r.workload.is_none() && text.contains("workload: start") {
            r.workload = Some(secs());
        }
        if r.marker.is_none() && text.contains("CHVKIT_EXIT=") {
            r.marker = Some(secs());
        }
        match child.try_wait() {
            Ok(Some(st)) => {
                r.end = secs();
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                assert!(st.success(), "{what} failed ({st}): {err}");
                // The serial file may still hold lines written just before the exit.
                let text = fs::read_to_string(serial).unwrap_or_default();
                if r.printk_init.is_none() {
                    r.printk_init = guest::printk_time(&text, "Run /init");
                }
                return r;
            }
            Ok(None) => {}
            Err(e) => panic!("{what}: {e}"),
        }
        assert!(
            t0.elapsed() < deadline,
            "{what}: still running after {deadline:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The seed's way, by hand (see the module comment).
fn hand(
    ns: &common::NetNs,
    vmm: &std::ffi::OsStr,
    kernel: &str,
    cmdline: &str,
    img: &Path,
    work: &Path,
    job: &str,
) -> Run {
    let t0 = Instant::now();
    let id = {
        let p = chvkit::profile::Profile::embedded().expect("profile");
        chvkit::launch::identity::Identity::derive(job, p.network.prefix, p.network.gateway)
            .expect("identity")
    };
    let copy = work.join(format!("{job}.raw"));
    let serial = work.join(format!("{job}.serial"));
    let _ = fs::remove_file(&serial);
    let env = work.join(format!("{job}.env"));
    let pairs = chvkit::launch::config::checker_env(&id, "http://[fdcd::1]:8080");
    let mut pairs: Vec<(&str, &str)> = pairs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    pairs.push(("CHECKER_MODE", "quick"));
    fs::write(&env, chvkit::envfile::render(&pairs).expect("env")).expect("write env");
    let cmds = work.join(format!("{job}.debugfs"));
    fs::write(
        &cmds,
        format!(
            "rm /etc/checker.env\nwrite {} /etc/checker.env\nsif /etc/checker.env mode 0100600\n",
            env.display()
        ),
    )
    .expect("debugfs commands");
    let script = format!(
        "set -e; cp --sparse=always {img} {copy}; debugfs -w -f {cmds} {copy} >/dev/null 2>&1; \
         ip tuntap add dev {tap} mode tap; ip link set {tap} master chvbr0; ip link set {tap} up",
        img = img.display(),
        copy = copy.display(),
        cmds = cmds.display(),
        tap = id.tap
    );
    let o = ns.sh(&script);
    assert!(o.status.success(), "hand setup: {}", common::text(&o));
    let child = ns
        .cmd(vmm)
        .args(["--kernel", kernel, "--cmdline", cmdline])
        .arg("--disk")
        .arg(format!("path={}", copy.display()))
        .arg("--net")
        .arg(format!("tap={},mac={}", id.tap, id.mac))
        .args(["--cpus", &format!("boot={CPUS}")])
        .args(["--memory", &format!("size={MEMORY_MIB}M")])
        .arg("--serial")
        .arg(format!("file={}", serial.display()))
        .args(["--console", "off"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cloud-hypervisor");
    let mut r = watch(t0, child, &serial, "cloud-hypervisor by hand");
    let o = ns.sh(&format!("ip link del {}; rm -f {}", id.tap, copy.display()));
    assert!(o.status.success(), "hand cleanup: {}", common::text(&o));
    r.end = t0.elapsed().as_secs_f64();
    r
}

fn report(what: &str, runs: &[Run]) {
    let col = |f: &dyn Fn(&Run) -> Option<f64>| -> String {
        let mut v: Vec<f64> = runs.iter().filter_map(f).collect();
        if v.is_empty() {
            return "   -  ".into();
        }
        let m = median(&mut v);
        format!("{m:6.1} ({:.1}–{:.1})", v[0], v[v.len() - 1])
    };
    // Kernel entry, as the host sees it: when `Run /init` appeared, less the kernel's own clock
    // at that line (the guest clock starts at entry; the serial log shows nothing before the
    // console driver loads).
    println!(
        "{what:>16}: kernel entry {} | first serial byte {} | Run /init {} | workload {} | exit marker {} | done {} s",
        col(&|r| Some(r.run_init? - r.printk_init?)),
        col(&|r| r.first_byte),
        col(&|r| r.run_init),
        col(&|r| r.workload),
        col(&|r| r.marker),
        col(&|r| Some(r.end)),
    );
}
