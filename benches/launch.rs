//! `cargo bench --bench launch`: chvkit's launch figures, measured in one run inside a network
//! namespace the bench creates and removes. Uses the real Cloud Hypervisor when present
//! (`CHV_BIN`, or `cloud-hypervisor` on PATH), else the stand-in, and says which.
//!
//! 1. chvkit's own overhead: from starting `chvkit launch --detach --json` to `vm.boot`
//!    returning (the `booted_at` it reports, wall clock), against a bare
//!    `cloud-hypervisor --kernel … --disk … --net tap=…` from exec to its `booted` event in the
//!    event log (seen through inotify: no polling delay), same kernel, vCPUs, memory, command
//!    line and devices; runs interleaved; medians and their ratio (goal <= 1.15). Both start
//!    through `ip netns exec`. chvkit's time to exit (its report printed) is shown beside.
//! 2. Per-job disk preparation for a 2 GiB rootfs: median of `disk::prepare` (goal <= 50 ms)
//!    against a full sparse copy of the image; the one-time base conversion; and the extra disk
//!    space after the guest writes 64 MiB (written with qemu-io when installed).
//! 3. 32 parallel `launch --detach` then 32 parallel `vm stop`: wall times, and a count of
//!    whatever was left (TAPs, run dirs, disks, VMM processes) — must be zero.
//! 4. The jail's cost: the same launch with `--jail on` against `--jail off`, interleaved
//!    (goal <= 1.05).
//! 5. Snapshot into a directory: `chvkit vm snapshot` against the VMM's own pause + snapshot +
//!    resume on the same job, interleaved (goal <= 1.05).

#[path = "../tests/common/mod.rs"]
mod common;
mod support;
#[path = "../tests/vmm/mod.rs"]
mod vmm;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Where a bench run keeps chvkit's files: a profile whose runtime dir is on tmpfs (/dev/shm,
/// like /run on a real host) and whose state dir (disks, bases) is on disk.
struct Layout {
    profile: PathBuf,
    runtime: PathBuf,
    state: PathBuf,
    _shm: tempfile::TempDir,
}

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{loadavg, median, ms};

const OVERHEAD_RUNS: usize = 101;
const DISK_RUNS: usize = 21;
const PARALLEL: usize = 32;
const JAIL_RUNS: usize = 41;

fn main() {
    if !common::is_root() {
        println!("skipped: launch bench: needs root (network namespaces, TAPs)");
        return;
    }
    for t in ["ip", "mkfs.ext4"] {
        if !common::have_tool(t) {
            println!("skipped: launch bench: `{t}` is not installed");
            return;
        }
    }
    let Some(kernel) = vmm::kernel() else {
        println!(
            "skipped: launch bench: no guest kernel (CHV_KERNEL_PATH or linux-image-cloud-amd64)"
        );
        return;
    };
    let bin = vmm::binary();
    println!("launch bench: {}", bin.describe());
    if bin.real {
        println!("  (on a PVM host each real guest spins a vCPU: every VM is stopped right after it is measured)");
    }
    let work = tempfile::tempdir().unwrap();
    // Searchable like /var/lib and /run on a host, so the jailed VMM (its own uid) reaches
    // the job's files.
    let searchable = |p: &Path| {
        fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap()
    };
    searchable(work.path());
    let ns = common::NetNs::new("lb");
    ns.sh_ok(
        "ip link add br0 type bridge && sysctl -qw net.ipv6.conf.br0.accept_dad=0 && \
         ip -6 addr add fdcd::1/16 dev br0 nodad && ip link set br0 up",
    );
    let rootfs = work.path().join("rootfs.raw");
    sh(&format!(
        "truncate -s 256M {0} && mkfs.ext4 -q -F {0}",
        rootfs.display()
    ));
    // Like a real host: the runtime dir on tmpfs (/run there, /dev/shm here), per-job disks
    // and bases on disk (the state dir).
    let shm = tempfile::Builder::new()
        .prefix("chvbench")
        .tempdir_in(if Path::new("/dev/shm").is_dir() {
            "/dev/shm"
        } else {
            "/tmp"
        })
        .unwrap();
    searchable(shm.path());
    let runtime = shm.path().join("run");
    let state = work.path().join("state");
    let profile = work.path().join("profile.yaml");
    let yaml = chvkit::profile::DEFAULT_PROFILE_YAML
        .replace(
            "state_dir: /var/lib/chvkit",
            &format!("state_dir: {}", state.display()),
        )
        .replace(
            "runtime_dir: /run/chvkit",
            &format!("runtime_dir: {}", runtime.display()),
        );
    fs::write(&profile, yaml).unwrap();
    let layout = Layout {
        profile,
        runtime,
        state,
        _shm: shm,
    };
    if wanted("overhead") {
        overhead(&ns, &bin, &kernel, &rootfs, &layout, work.path());
    }
    if wanted("disk") {
        disk_prep(work.path());
    }
    if wanted("parallel") {
        parallel(&ns, &bin, &kernel, &rootfs, &layout);
    }
    if wanted("jail") {
        jail_overhead(&ns, &bin, &kernel, &rootfs, &layout);
    }
    if wanted("snapshot") {
        snapshot_delivery(&ns, &kernel, &rootfs, &layout);
    }
}

const SNAPSHOT_RUNS: usize = 21;

/// Snapshot delivery (section 5): `chvkit vm snapshot JOB DIR` (DIR outside the snapshots dir, on the
/// state dir's filesystem: chvkit renames what the jailed VMM wrote) against the VMM's own
/// pause + snapshot + resume (`ch-remote`, into a directory it may write), on one running job,
/// interleaved. Needs a VMM that can snapshot here (`CHV_BIN_SNAP` on PVM hosts) and ch-remote.
fn snapshot_delivery(ns: &common::NetNs, kernel: &Path, rootfs: &Path, l: &Layout) {
    println!("\n5. snapshot into a directory: `chvkit vm snapshot` vs the VMM's own pause + snapshot + resume, {SNAPSHOT_RUNS} interleaved pairs");
    let snap_bin = std::env::var_os("CHV_BIN_SNAP").or_else(|| std::env::var_os("CHV_BIN"));
    let Some(snap_bin) = snap_bin.filter(|v| !v.is_empty()) else {
        println!("   skipped: snapshot bench: no real VMM (CHV_BIN_SNAP / CHV_BIN)");
        return;
    };
    let remote = Path::new(&snap_bin).with_file_name("ch-remote");
    if !remote.is_file() {
        println!(
            "   skipped: snapshot bench: no ch-remote beside {}",
            Path::new(&snap_bin).display()
        );
        return;
    }
    let run = |args: &[&str]| {
        ns.cmd(common::chvkit())
            .arg("--profile")
            .arg(&l.profile)
            .args(args)
            .env("CHV_BIN", &snap_bin)
            .env("MALLOC_ARENA_MAX", "1")
            .output()
            .unwrap()
    };
    let (k, r) = (kernel.to_str().unwrap(), rootfs.to_str().unwrap());
    let mut args = launch_args(k, r, "snapb");
    args.extend(["--jail", "on"]);
    let o = run(&args);
    assert!(o.status.success(), "{}", common::text(&o));
    let state: serde_json::Value =
        serde_json::from_slice(&fs::read(l.runtime.join("snapb/state.json")).unwrap()).unwrap();
    let pid = state["vmm_pid"].as_i64().expect("vmm_pid");
    let uid = fs::metadata(format!("/proc/{pid}"))
        .map(|m| m.uid())
        .unwrap();
    let gid = fs::metadata(format!("/proc/{pid}"))
        .map(|m| m.gid())
        .unwrap();
    let sock = l.runtime.join("snapb/api.sock");
    let own = |dir: &Path| {
        for cmd in [
            vec!["pause".to_string()],
            vec!["snapshot".into(), format!("file://{}", dir.display())],
            vec!["resume".into()],
        ] {
            let o = Command::new(&remote)
                .arg("--api-socket")
                .arg(&sock)
                .args(&cmd)
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "ch-remote {cmd:?}: {}",
                common::text(&o)
            );
        }
    };
    let (mut ours, mut theirs, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let snaps = l.state.join("snapshots");
    for i in 0..SNAPSHOT_RUNS {
        let a_dir = l.state.join(format!("bench-snap-{i}"));
        let b_dir = snaps.join(format!("bench-own-{i}"));
        fs::create_dir_all(&b_dir).unwrap();
        std::os::unix::fs::chown(&b_dir, Some(uid), Some(gid)).unwrap();
        // Each side starts with no dirty pages: a snapshot writes the guest's memory through
        // the page cache, and one that meets the previous one's writeback is throttled (single
        // snapshots varied 40–370 ms here without this).
        let a = || {
            nix::unistd::sync();
            let t = Instant::now();
            let o = run(&["vm", "snapshot", "snapb", a_dir.to_str().unwrap()]);
            assert!(o.status.success(), "{}", common::text(&o));
            ms(t.elapsed())
        };
        let b = || {
            nix::unistd::sync();
            let t = Instant::now();
            own(&b_dir);
            ms(t.elapsed())
        };
        let (ta, tb) = if i % 2 == 0 {
            (a(), b())
        } else {
            let tb = b();
            (a(), tb)
        };
        ours.push(ta);
        theirs.push(tb);
        ratios.push(ta / tb);
        let _ = fs::remove_dir_all(&a_dir);
        let _ = fs::remove_dir_all(&b_dir);
    }
    let o = run(&["vm", "stop", "snapb"]);
    assert!(o.status.success(), "{}", common::text(&o));
    let (mo, mt, mr) = (median(&mut ours), median(&mut theirs), median(&mut ratios));
    println!(
        "   chvkit vm snapshot: median {mo:.1} ms ({:.1}–{:.1}); VMM's own: median {mt:.1} ms ({:.1}–{:.1}) ({})",
        ours[0], ours[ours.len() - 1], theirs[0], theirs[theirs.len() - 1], Path::new(&snap_bin).display()
    );
    println!(
        "   ratio of medians {:.3}, median of pair ratios {mr:.3} (spread {:.3}–{:.3}); goal <= 1.05; load {}",
        mo / mt,
        ratios[0],
        ratios[ratios.len() - 1],
        loadavg()
    );
}

/// The jail's cost (section 4): `launch --detach` to `vm.boot` returned with `--jail on`
/// against the same launch with `--jail off`, interleaved pairs (order flipped every pair).
fn jail_overhead(ns: &common::NetNs, bin: &vmm::Binary, kernel: &Path, rootfs: &Path, l: &Layout) {
    println!("\n4. the jail: `launch --detach` to vm.boot returned, --jail on vs --jail off, {JAIL_RUNS} interleaved pairs");
    let (k, r) = (kernel.to_str().unwrap(), rootfs.to_str().unwrap());
    let boot = |job: &str, jail: &str| -> f64 {
        let mut args = launch_args(k, r, job);
        args.extend(["--json", "--jail", jail]);
        let w0 = chvkit::launch::rundir::now_unix();
        let o = chvkit(ns, bin, l, &args);
        assert!(o.status.success(), "--jail {jail}: {}", common::text(&o));
        let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let booted_at = report["booted_at"].as_f64().expect("booted_at");
        let o = chvkit(ns, bin, l, &["vm", "stop", job]);
        assert!(o.status.success(), "{}", common::text(&o));
        (booted_at - w0) * 1000.0
    };
    boot("jail-warm", "on");
    let (mut on, mut off, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..JAIL_RUNS {
        let (a, b) = if i % 2 == 0 {
            let a = boot(&format!("jon-{i}"), "on");
            (a, boot(&format!("joff-{i}"), "off"))
        } else {
            let b = boot(&format!("joff-{i}"), "off");
            (boot(&format!("jon-{i}"), "on"), b)
        };
        on.push(a);
        off.push(b);
        ratios.push(a / b);
    }
    let (mon, moff, mr) = (median(&mut on), median(&mut off), median(&mut ratios));
    println!(
        "   --jail on: median {mon:.1} ms ({:.1}–{:.1}); --jail off: median {moff:.1} ms ({:.1}–{:.1})",
        on[0], on[on.len() - 1], off[0], off[off.len() - 1]
    );
    println!(
        "   ratio of medians {:.3}, median of pair ratios {mr:.3} (spread {:.3}–{:.3}); difference {:.1} ms; goal <= 1.05; load {}",
        mon / moff,
        ratios[0],
        ratios[ratios.len() - 1],
        mon - moff,
        loadavg()
    );
}

/// `cargo bench --bench launch -- overhead disk parallel` picks sections; none given: all.
fn wanted(section: &str) -> bool {
    let picked: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    picked.is_empty() || picked.iter().any(|a| a == section)
}

fn sh(script: &str) -> String {
    let o = Command::new("sh").arg("-c").arg(script).output().unwrap();
    assert!(o.status.success(), "{script}: {}", common::text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn chvkit(
    ns: &common::NetNs,
    bin: &vmm::Binary,
    l: &Layout,
    args: &[&str],
) -> std::process::Output {
    ns.cmd(common::chvkit())
        .arg("--profile")
        .arg(&l.profile)
        .args(args)
        .env("CHV_BIN", &bin.path)
        .env_remove("CHV_KERNEL_PATH")
        .output()
        .unwrap()
}

fn launch_args<'a>(kernel: &'a str, rootfs: &'a str, job: &'a str) -> Vec<&'a str> {
    vec![
        "launch", "--rootfs", rootfs, "--kernel", kernel, "--bridge", "br0", "--job-id", job,
        "--cpus", "1", "--memory", "128", "--detach",
    ]
}

/// What chvkit's VM has that the minimal bare command line lacks.
struct SameConfig {
    env_disk: PathBuf,
    base: Option<PathBuf>,
    landlock: bool,
}

/// Bare VMM: exec to the `booted` event. Returns the time, then stops it.
fn bare_boot(
    ns: &common::NetNs,
    bin: &vmm::Binary,
    kernel: &Path,
    disk: &Path,
    dir: &Path,
    i: usize,
    same: Option<&SameConfig>,
) -> Duration {
    let ev = dir.join(format!("bare-{i}.events"));
    let sock = dir.join(format!("bare-{i}.sock"));
    let serial = dir.join(format!("bare-{i}.serial"));
    let tap = format!("chvb-{i}");
    // The event log exists before the VMM starts (it truncates and appends) so that inotify
    // can watch it from the first event on.
    fs::write(&ev, b"").unwrap();
    let watch = Inotify::watch(&ev);
    let mut cmd = ns.cmd(&bin.path);
    if let Some(same) = same {
        // The devices chvkit's VM has beyond the minimal command line: the read-only env disk,
        // rng, pvpanic and Landlock with the rules chvkit adds (the TAP's sysfs flags, the
        // overlay's backing file).
        cmd.arg("--disk")
            .arg(format!("path={}", disk.display()))
            .arg(format!("path={},readonly=on", same.env_disk.display()))
            .args(["--rng", "src=/dev/urandom", "--pvpanic"]);
        if same.landlock {
            cmd.arg("--landlock")
                .arg("--landlock-rules")
                .arg("path=/sys/devices/virtual/net,access=r");
            if let Some(base) = &same.base {
                cmd.arg(format!("path={},access=r", base.display()));
            }
        }
    } else {
        cmd.arg("--disk").arg(format!("path={}", disk.display()));
    }
    let t0 = Instant::now();
    let mut child = cmd
        .arg("--api-socket")
        .arg(format!("path={}", sock.display()))
        .arg("--event-monitor")
        .arg(format!("path={}", ev.display()))
        .arg("--kernel")
        .arg(kernel)
        .args(["--cmdline", "console=ttyS0 root=/dev/vda rw"])
        .args(["--cpus", "boot=1", "--memory", "size=128M"])
        .arg("--net")
        .arg(format!("tap={tap},mac=02:00:00:00:00:{:02x}", i % 256))
        .arg("--serial")
        .arg(format!("file={}", serial.display()))
        .args(["--console", "off"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = t0 + Duration::from_secs(30);
    let took = loop {
        if fs::read_to_string(&ev).is_ok_and(|t| t.contains("\"booted\"")) {
            break t0.elapsed();
        }
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            panic!("bare VMM never reported booted");
        }
        // Woken by the VMM's next write to its event log (or after 50 ms, to notice a VMM
        // that died): no polling delay is added to the bare figure.
        watch.wait(Duration::from_millis(50));
    };
    // SAFETY: plain kill(2) of our child (`ip netns exec` exec'd into the VMM).
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    let _ = fs::remove_file(&sock);
    took
}

/// An inotify watch for writes to one file.
struct Inotify(std::os::fd::OwnedFd);

impl Inotify {
    fn watch(path: &Path) -> Inotify {
        use std::os::fd::FromRawFd;
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: plain syscalls; the fd is checked and then owned.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
        assert!(
            fd >= 0,
            "inotify_init1: {}",
            std::io::Error::last_os_error()
        );
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        use std::os::fd::AsRawFd;
        let w = unsafe { libc::inotify_add_watch(fd.as_raw_fd(), c.as_ptr(), libc::IN_MODIFY) };
        assert!(
            w >= 0,
            "inotify_add_watch: {}",
            std::io::Error::last_os_error()
        );
        Inotify(fd)
    }

    /// Until the file is written to (events drained) or `max` passes.
    fn wait(&self, max: Duration) {
        use std::os::fd::AsRawFd;
        let mut p = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let mut buf = [0u8; 4096];
        // SAFETY: poll/read on our own fd with a local buffer.
        unsafe {
            libc::poll(&mut p, 1, max.as_millis() as i32);
            while libc::read(p.fd, buf.as_mut_ptr().cast(), buf.len()) > 0 {}
        }
    }
}

fn overhead(
    ns: &common::NetNs,
    bin: &vmm::Binary,
    kernel: &Path,
    rootfs: &Path,
    root: &Layout,
    dir: &Path,
) {
    println!("\n1. chvkit overhead: `launch --detach` (to vm.boot returned) vs bare VMM (to its booted event)");
    let version = Command::new(&bin.path)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    println!(
        "   VMM: {} ({}, {}); {OVERHEAD_RUNS} interleaved runs each, both started through `ip netns exec`; chvkit: {}",
        bin.path.display(),
        if bin.real { "real" } else { "stand-in" },
        version,
        common::chvkit().display()
    );
    let load_before = loadavg();
    let bare_disk = dir.join("bare.raw");
    sh(&format!(
        "cp --sparse=always {} {}",
        rootfs.display(),
        bare_disk.display()
    ));
    // The same VM config as chvkit's: a qcow2 overlay on the converted base, the read-only env
    // disk, rng, pvpanic and Landlock (when this kernel has it, as chvkit decides).
    let same_disk =
        chvkit::launch::disk::prepare(rootfs, &dir.join("same"), &dir.join("bases"), None)
            .expect("prepare the same per-job disk");
    let env_disk = dir.join("same-env.img");
    let mut env = b"CHECKER_JOB_ID='bench'\n".to_vec();
    env.resize(4096, 0);
    fs::write(&env_disk, env).unwrap();
    let same = SameConfig {
        env_disk,
        base: same_disk.base.clone(),
        landlock: chvkit::launch::vmm::landlock_abi() >= chvkit::launch::vmm::LANDLOCK_MIN_ABI,
    };
    let (k, r) = (kernel.to_str().unwrap(), rootfs.to_str().unwrap());
    // Warm-up: converts the base once, fills caches, for both sides.
    let o = chvkit(ns, bin, root, &launch_args(k, r, "warm"));
    assert!(o.status.success(), "{}", common::text(&o));
    chvkit(ns, bin, root, &["vm", "stop", "warm"]);
    bare_boot(ns, bin, kernel, &bare_disk, dir, 999, None);
    bare_boot(ns, bin, kernel, &same_disk.path, dir, 998, Some(&same));
    let mut ours = Vec::new();
    let mut ours_exit = Vec::new();
    let mut bare = Vec::new();
    let mut bare_same = Vec::new();
    for i in 0..OVERHEAD_RUNS {
        let job = format!("ov-{i}");
        let mut args = launch_args(k, r, &job);
        args.push("--json");
        // The clock launch reports `booted_at` in (set the moment `vm.boot` returned).
        let (w0, t0) = (chvkit::launch::rundir::now_unix(), Instant::now());
        let o = chvkit(ns, bin, root, &args);
        let t = t0.elapsed();
        assert!(o.status.success(), "{}", common::text(&o));
        let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let booted_at = report["booted_at"]
            .as_f64()
            .expect("booted_at in launch --json");
        ours.push((booted_at - w0) * 1000.0);
        ours_exit.push(ms(t));
        let o = chvkit(ns, bin, root, &["vm", "stop", &job]);
        assert!(o.status.success(), "{}", common::text(&o));
        bare.push(ms(bare_boot(ns, bin, kernel, &bare_disk, dir, i, None)));
        bare_same.push(ms(bare_boot(
            ns,
            bin,
            kernel,
            &same_disk.path,
            dir,
            500 + i,
            Some(&same),
        )));
    }
    let (mo, mb) = (median(&mut ours), median(&mut bare));
    let me = median(&mut ours_exit);
    let ms_ = median(&mut bare_same);
    println!("   bare VMM, same VM config as chvkit's (qcow2 overlay + env disk, rng, pvpanic, landlock {}): median {ms_:.1} ms (min {:.1}, max {:.1})", same.landlock, bare_same[0], bare_same[bare_same.len() - 1]);
    println!(
        "   ratio of medians chvkit/bare, same config: {:.3} (goal <= 1.15); difference {:.1} ms",
        mo / ms_,
        mo - ms_
    );
    println!("   chvkit launch --detach, start to vm.boot returned: median {mo:.1} ms over {OVERHEAD_RUNS} runs (min {:.1}, max {:.1})", ours[0], ours[ours.len() - 1]);
    println!("   chvkit launch --detach, start to exit (its report printed): median {me:.1} ms (min {:.1}, max {:.1}); ratio to bare same config {:.2}", ours_exit[0], ours_exit[ours_exit.len() - 1], me / ms_);
    println!("   bare VMM to `booted`:   median {mb:.1} ms over {OVERHEAD_RUNS} runs (min {:.1}, max {:.1})", bare[0], bare[bare.len() - 1]);
    println!(
        "   ratio of medians chvkit/bare, minimal command line: {:.2}; difference {:.1} ms; load average {load_before} before, {} after",
        mo / mb,
        mo - mb,
        loadavg()
    );
}

fn allocated(p: &Path) -> u64 {
    fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0)
}

fn disk_prep(dir: &Path) {
    use chvkit::launch::disk;
    println!("\n2. per-job disk for a 2 GiB rootfs");
    // A 2 GiB ext4 image holding 256 MiB of (incompressible) files.
    let tree = dir.join("tree");
    fs::create_dir_all(&tree).unwrap();
    sh(&format!(
        "for i in 0 1 2 3 4 5 6 7; do head -c 32M /dev/urandom > {}/f$i; done",
        tree.display()
    ));
    let img = dir.join("big.raw");
    sh(&format!(
        "truncate -s 2G {0} && mkfs.ext4 -q -F -d {1} {0}",
        img.display(),
        tree.display()
    ));
    let state = dir.join("diskbench");
    let bases = state.join("bases");
    let t0 = Instant::now();
    let first = disk::prepare(&img, &state.join("disks/first"), &bases, None).unwrap();
    let once = t0.elapsed();
    println!(
        "   kind: {:?} ({}); first prepare incl. the one-time base conversion: {:.0} ms (base holds {} MiB)",
        first.kind,
        first.image_type(),
        ms(once),
        first.base.as_deref().map(allocated).unwrap_or(0) >> 20
    );
    let mut prep = Vec::new();
    let mut paths = Vec::new();
    for i in 0..DISK_RUNS {
        let t0 = Instant::now();
        let d = disk::prepare(&img, &state.join(format!("disks/j{i}")), &bases, None).unwrap();
        prep.push(ms(t0.elapsed()));
        paths.push(d.path);
    }
    let mp = median(&mut prep);
    let mut copy = Vec::new();
    for i in 0..3 {
        let dst = dir.join(format!("copy-{i}.raw"));
        let t0 = Instant::now();
        sh(&format!(
            "cp --sparse=always {} {}",
            img.display(),
            dst.display()
        ));
        copy.push(ms(t0.elapsed()));
        let _ = fs::remove_file(dst);
    }
    let mc = median(&mut copy);
    let per_job = allocated(&paths[0]);
    println!("   per-job prepare: median {mp:.2} ms over {DISK_RUNS} (goal <= 50 ms); full sparse copy: median {mc:.0} ms; ratio {:.4}", mp / mc);
    println!(
        "   per-job disk on disk before guest writes: {} KiB (rootfs: {} MiB allocated)",
        per_job >> 10,
        allocated(&img) >> 20
    );
    if common::have_tool("qemu-io") && first.kind == disk::DiskKind::Qcow2Overlay {
        let o = Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 0xab 512M 64M"])
            .arg(&paths[0])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", common::text(&o));
        println!(
            "   after the guest writes 64 MiB: per-job disk {} MiB on disk (extra space follows writes, not the rootfs)",
            allocated(&paths[0]) >> 20
        );
    } else {
        println!("   (qemu-io not installed: guest-write growth not measured)");
    }
}

fn parallel(ns: &common::NetNs, bin: &vmm::Binary, kernel: &Path, rootfs: &Path, root: &Layout) {
    println!("\n3. {PARALLEL} parallel launches, then {PARALLEL} parallel stops");
    let (k, r) = (kernel.to_str().unwrap(), rootfs.to_str().unwrap());
    let t0 = Instant::now();
    let outs: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..PARALLEL)
            .map(|i| {
                s.spawn(move || {
                    let job = format!("par-{i}");
                    let o = chvkit(ns, bin, root, &launch_args(k, r, &job));
                    (job, o)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let launched = t0.elapsed();
    let ok = outs.iter().filter(|(_, o)| o.status.success()).count();
    for (job, o) in &outs {
        if !o.status.success() {
            println!(
                "   {job} failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }
    }
    let pids: Vec<i32> = outs
        .iter()
        .filter_map(|(_, o)| {
            let t = String::from_utf8_lossy(&o.stdout);
            t.split("vmm pid ")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    let t1 = Instant::now();
    std::thread::scope(|s| {
        for (job, _) in &outs {
            s.spawn(move || chvkit(ns, bin, root, &["vm", "stop", job]));
        }
    });
    let stopped = t1.elapsed();
    let taps = ns
        .sh_ok("ip -br link")
        .lines()
        .filter(|l| l.starts_with("chv-"))
        .count();
    let run_dirs = fs::read_dir(&root.runtime).map(|r| r.count()).unwrap_or(0);
    let disks = fs::read_dir(root.state.join("disks"))
        .map(|r| r.count())
        .unwrap_or(0);
    let procs = pids
        .iter()
        .filter(|p| Path::new(&format!("/proc/{p}")).exists())
        .count();
    println!(
        "   {ok}/{PARALLEL} launched in {:.0} ms, stopped in {:.0} ms; total {:.0} ms",
        ms(launched),
        ms(stopped),
        ms(launched + stopped)
    );
    println!("   leaked: {taps} TAPs, {run_dirs} run dirs/locks, {disks} disks, {procs} VMM processes (must all be 0)");
}
