//! `cargo bench --bench doctor`: chvkit doctor's full check set against the seed's manual
//! troubleshooting commands, both run inside a network namespace that holds the seed's network
//! setup, with the cost of entering the namespace (`ip netns exec NS true`) subtracted.
//!
//! Prints both medians, their ratio, and how many child processes one doctor run starts
//! (counted with strace when it is installed). Needs root; prints `skipped: ...` otherwise.

#[path = "../tests/setup_support/seed_net.rs"]
mod seed_net;
mod support;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use seed_net::SEED_SETUP;
use support::{median, ms};

const RUNS: usize = 30;

/// The seed's network plus a TAP on the bridge (held open below) and `lo` up.
fn seed_setup() -> String {
    format!(
        "{SEED_SETUP}ip link set lo up
ip tuntap add chv-b0 mode tap
ip link set chv-b0 master chvbr0
ip link set chv-b0 up
"
    )
}

/// The seed's Troubleshooting section, as a person would type it.
const SEED_TROUBLESHOOTING: &str = "ls -la /dev/kvm
ip link show chvbr0
ip -6 addr show chvbr0
cat /proc/sys/net/ipv6/conf/all/forwarding
ip6tables -t nat -L -n -v
ip6tables -L FORWARD -n -v
bridge link show
";

struct Ns(String);

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn have(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

fn in_ns(ns: &str, argv: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).args(argv);
    c.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

/// CPU time (user + system) of all reaped children so far.
fn children_cpu() -> Duration {
    // SAFETY: getrusage fills the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, (t.tv_usec as u32) * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Wall time and CPU time (of the command and everything it waited for) of one run.
fn time(mut c: Command) -> (Duration, Duration) {
    let cpu0 = children_cpu();
    let t = Instant::now();
    let st = c.status().expect("spawn");
    let d = t.elapsed();
    let cpu = children_cpu().saturating_sub(cpu0);
    // doctor exits 1 when something FAILs; anything else means the run did not happen.
    assert!(
        matches!(st.code(), Some(0) | Some(1)),
        "benchmark command failed: {st}"
    );
    (d, cpu)
}

/// Child processes one doctor run starts, from `strace -f -e trace=execve`.
fn children(ns: &str, chvkit: &str) -> Option<usize> {
    if !have("strace") {
        return None;
    }
    let log = tempfile::NamedTempFile::new().ok()?;
    let log_path = log.path().to_str()?.to_string();
    let st = in_ns(
        ns,
        &[
            "strace",
            "-f",
            "-qq",
            "-e",
            "trace=execve",
            "-o",
            &log_path,
            chvkit,
            "doctor",
        ],
    )
    .status()
    .ok()?;
    if !matches!(st.code(), Some(0) | Some(1)) {
        return None;
    }
    let text = std::fs::read_to_string(&log_path).ok()?;
    let execs = text
        .lines()
        .filter(|l| l.contains("execve(") && !l.contains("= -1"))
        .count();
    // The first successful execve is chvkit itself.
    Some(execs.saturating_sub(1))
}

fn main() {
    // `cargo bench` passes `--bench`; nothing here takes arguments.
    if !nix::unistd::geteuid().is_root() {
        println!("skipped: doctor bench: needs root (network namespaces)");
        return;
    }
    for t in ["ip", "ip6tables", "bridge", "sysctl"] {
        if !have(t) {
            println!("skipped: doctor bench: `{t}` is not installed");
            return;
        }
    }
    let chvkit = env!("CARGO_BIN_EXE_chvkit");
    // Both sides inherit this priority: it only damps interference from other work on the
    // machine (parallel builds), it favours neither.
    // SAFETY: plain syscall on this process.
    let reniced = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, -10) } == 0;
    let ns = Ns(format!("chvbench{}", std::process::id()));
    let ok = Command::new("ip")
        .args(["netns", "add", &ns.0])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        println!("skipped: doctor bench: cannot create a network namespace");
        return;
    }
    let setup = Command::new("ip")
        .args(["netns", "exec", &ns.0, "sh", "-c", &seed_setup()])
        .status()
        .expect("seed setup");
    assert!(setup.success(), "seed setup failed in {}", ns.0);
    let _tap = seed_net::hold_tap(&ns.0, "chv-b0").ok();

    // Warm caches (page cache for the binaries, libnftables, dpkg status) before measuring.
    for _ in 0..3 {
        let _ = time(in_ns(&ns.0, &[chvkit, "doctor", "--json"]));
        let _ = time(in_ns(&ns.0, &["sh", "-c", SEED_TROUBLESHOOTING]));
    }
    let checks = Command::new("ip")
        .args(["netns", "exec", &ns.0, chvkit, "doctor", "--json"])
        .output()
        .ok()
        .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
        .and_then(|v| v["checks"].as_array().map(Vec::len))
        .unwrap_or(0);

    // Interleaved, so that load from other processes hits all three alike.
    let (mut base, mut doc, mut script) = (Vec::new(), Vec::new(), Vec::new());
    let (mut base_cpu, mut doc_cpu, mut script_cpu) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..RUNS {
        let (w, c) = time(in_ns(&ns.0, &["true"]));
        base.push(w);
        base_cpu.push(c);
        let (w, c) = time(in_ns(&ns.0, &[chvkit, "doctor", "--json"]));
        doc.push(w);
        doc_cpu.push(c);
        let (w, c) = time(in_ns(&ns.0, &["sh", "-c", SEED_TROUBLESHOOTING]));
        script.push(w);
        script_cpu.push(c);
    }
    let b = median(&mut base);
    let d = median(&mut doc).saturating_sub(b);
    let s = median(&mut script).saturating_sub(b);
    let bc = median(&mut base_cpu);
    let dc = median(&mut doc_cpu).saturating_sub(bc);
    let sc = median(&mut script_cpu).saturating_sub(bc);
    let kids = children(&ns.0, chvkit);

    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "doctor bench ({RUNS} runs each, inside namespace {}, medians)",
        ns.0
    );
    let _ = writeln!(
        out,
        "  namespace entry (ip netns exec NS true): {:8.2} ms (subtracted below)",
        ms(b)
    );
    let _ = writeln!(
        out,
        "  chvkit doctor --json ({checks} checks):      {:8.2} ms",
        ms(d)
    );
    let _ = writeln!(
        out,
        "  seed troubleshooting script (7 commands): {:8.2} ms",
        ms(s)
    );
    let _ = writeln!(
        out,
        "  ratio doctor / script:                    {:8.2}",
        ms(d) / ms(s).max(f64::EPSILON)
    );
    let _ = writeln!(
        out,
        "  CPU time (user+sys, entry subtracted):    doctor {:.2} ms, script {:.2} ms (ratio {:.2})",
        ms(dc),
        ms(sc),
        ms(dc) / ms(sc).max(f64::EPSILON)
    );
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let _ = writeln!(
        out,
        "  load average during the run:              {}{}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        if reniced {
            " (bench and its children at nice -10)"
        } else {
            ""
        }
    );
    match kids {
        Some(k) => {
            let _ = writeln!(out, "  child processes per doctor run (strace):  {k:8}");
        }
        None => {
            let _ = writeln!(
                out,
                "  child processes per doctor run:           unknown (strace not installed)"
            );
        }
    }
    let _ = writeln!(
        out,
        "  goal: doctor <= 15 ms and below the script, <= 1 child: {}",
        if ms(d) <= 15.0 && d < s && kids.is_none_or(|k| k <= 1) {
            "met"
        } else {
            "NOT met"
        }
    );
}
