//! The job's supervisor: SIGINT/SIGTERM/SIGHUP read in order, the detach fork with its report
//! line to the launching process, and the watch over a running VM until it ends. `launch`
//! (run.rs) and `vm restore` (vm.rs) share it; it imports none of them.

use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::path::Path;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use serde::Serialize;

use super::api::Client;
use super::code;
use super::events::{self, ByteTail, EventTail};
use super::job::{Failure, Job};
use super::rundir::JobPaths;
use super::vmm::{self, Vmm};

/// How a supervised job ended.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Outcome {
    pub(super) code: i32,
    pub(super) reason: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) detail: Option<String>,
}

/// SIGINT, SIGTERM and SIGHUP, blocked and read from a signalfd: a Ctrl-C at any point is
/// handled in order (stop the VM, then clean up) rather than killing chvkit halfway.
pub(super) struct Signals {
    fd: SignalFd,
}

impl Signals {
    pub(super) fn block() -> io::Result<Signals> {
        let mut mask = SigSet::empty();
        for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
            mask.add(s);
        }
        mask.thread_block()?;
        let fd = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
        Ok(Signals { fd })
    }

    pub(super) fn pending(&self) -> Option<Signal> {
        match self.fd.read_signal() {
            Ok(Some(info)) => Signal::try_from(info.ssi_signo as i32).ok(),
            _ => None,
        }
    }
}

// Beside the supervisor's `Report` it builds, so that job.rs needs nothing from this file.
impl Failure {
    /// What the detached supervisor tells the launching process.
    pub(super) fn report(&self) -> Report {
        Report {
            ok: false,
            code: self.code,
            reason: self.reason.into(),
            message: self.message.clone(),
            extra: serde_json::Value::Null,
        }
    }
}

/// Messages from the detached supervisor to the launching process.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(super) struct Report {
    pub(super) ok: bool,
    #[serde(default)]
    pub(super) code: i32,
    #[serde(default)]
    pub(super) reason: String,
    #[serde(default)]
    pub(super) message: String,
    #[serde(default)]
    pub(super) extra: serde_json::Value,
}

impl Report {
    /// A job that is up: `extra` is what the launching process prints (as is with `--json`).
    pub(super) fn running(extra: serde_json::Value) -> Report {
        Report {
            ok: true,
            code: 0,
            reason: "running".into(),
            message: String::new(),
            extra,
        }
    }
}

pub(super) enum ForkSide {
    Parent(Report),
    /// The supervisor's end of the line to the launching process.
    Child(fs::File),
}

fn thread_count() -> usize {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:").map(|v| v.trim().parse().ok()))
                .flatten()
        })
        .unwrap_or(0)
}

/// Fork the detached supervisor. The child continues the launch (VMM, boot, supervision) in
/// its own session with stdio on `supervisor.log`; the parent waits for its report.
pub(super) fn fork_supervisor<'a>(job: Job<'a>) -> Result<(ForkSide, Option<Job<'a>>), Failure> {
    if thread_count() != 1 {
        return Err(Failure::setup(
            "internal: cannot detach from a multi-threaded process",
        ));
    }
    let sup_log = job.paths.dir.join("supervisor.log");
    let (mut ours, theirs) = std::os::unix::net::UnixStream::pair()
        .map_err(|e| Failure::setup(format!("socketpair: {e}")))?;
    // SAFETY: the process is single-threaded (checked above), so the child may run any code.
    match unsafe { nix::unistd::fork() } {
        Err(e) => Err(Failure::setup(format!("fork: {e}"))),
        Ok(nix::unistd::ForkResult::Parent { .. }) => {
            drop(theirs);
            job.hand_over();
            // EOF once the supervisor's end closes (after its report, or when it dies).
            let mut text = String::new();
            let _ = ours.read_to_string(&mut text);
            let report = serde_json::from_str::<Report>(text.trim()).unwrap_or_else(|_| {
                Failure::setup(format!(
                    "the detached supervisor ended without reporting (see {})",
                    sup_log.display()
                ))
                .report()
            });
            Ok((ForkSide::Parent(report), None))
        }
        Ok(nix::unistd::ForkResult::Child) => {
            drop(ours);
            // A session of its own: the terminal's Ctrl-C and hang-up reach the launching
            // process only.
            let _ = nix::unistd::setsid();
            redirect_stdio(&sup_log);
            let mut job = job;
            // Written with the VMM's pid right after the spawn: nothing in between to record.
            job.state.supervisor_pid = std::process::id() as i32;
            let w = fs::File::from(std::os::fd::OwnedFd::from(theirs));
            Ok((ForkSide::Child(w), Some(job)))
        }
    }
}

/// Stdin from /dev/null, stdout and stderr to `log`: a detached supervisor's own output, once
/// the caller no longer reads it.
fn redirect_stdio(log: &Path) {
    if let Ok(null) = fs::File::open("/dev/null") {
        let _ = nix::unistd::dup2_stdin(null.as_fd());
    }
    if let Ok(f) = vmm::open_append(log) {
        let _ = nix::unistd::dup2_stdout(f.as_fd());
        let _ = nix::unistd::dup2_stderr(f.as_fd());
    }
}

pub(super) fn send_report(w: &mut fs::File, r: &Report) {
    if let Ok(mut s) = serde_json::to_string(r) {
        s.push('\n');
        let _ = w.write_all(s.as_bytes());
    }
}

/// Options for [`supervise`].
pub(super) struct Watch {
    pub(super) timeout: Option<Duration>,
    pub(super) grace: Duration,
    pub(super) console: bool,
}

/// Watch the running VM until it ends: the VMM exits (guest power-off, or a crash), a signal
/// arrives, the timeout passes, or the guest reboots or panics (then the VM is stopped).
pub(super) fn supervise(
    vmm: &mut Vmm,
    client: &mut Client,
    paths: &JobPaths,
    sigs: &Signals,
    w: &Watch,
) -> Outcome {
    enum Ending {
        Exited(ExitStatus),
        Timeout,
        Signal(Signal),
        Rebooted,
        Panicked,
    }
    let deadline = w.timeout.map(|t| Instant::now() + t);
    let mut events = EventTail::new(&paths.events);
    let mut serial = ByteTail::new(&paths.serial);
    let mut stdout = io::stdout();
    let mut pump_console = |serial: &mut ByteTail| {
        if w.console {
            if let Ok(b) = serial.poll() {
                if !b.is_empty() {
                    let _ = stdout.write_all(&b);
                    let _ = stdout.flush();
                }
            }
        }
    };
    let ending = loop {
        let mut fds = [
            PollFd::new(vmm.pidfd(), PollFlags::POLLIN),
            PollFd::new(sigs.fd.as_fd(), PollFlags::POLLIN),
        ];
        let _ = poll(&mut fds, PollTimeout::from(10u16));
        if let Some(s) = sigs.pending() {
            break Ending::Signal(s);
        }
        let exited = match vmm.try_wait() {
            Ok(st) => st,
            Err(e) => {
                tracing::warn!("waitpid: {e}");
                None
            }
        };
        let evs = events.poll().unwrap_or_default();
        if let Some(st) = exited {
            // A VMM that died while the guest rebooted or panicked died of that: a jailed VMM
            // cannot redo the TAP's set-up on its in-process reboot (it sets the MAC it
            // recorded, which needs CAP_NET_ADMIN) and exits.
            let cause = evs.iter().find(|e| {
                e.is("vm", "rebooting") || e.is("vm", "rebooted") || e.is("guest", "panic")
            });
            break match cause {
                Some(e) if !st.success() && e.source == "guest" => Ending::Panicked,
                Some(_) if !st.success() => Ending::Rebooted,
                _ => Ending::Exited(st),
            };
        }
        if let Some(e) = evs
            .iter()
            .find(|e| e.is("vm", "rebooting") || e.is("vm", "rebooted") || e.is("guest", "panic"))
        {
            break if e.source == "guest" {
                Ending::Panicked
            } else {
                Ending::Rebooted
            };
        }
        pump_console(&mut serial);
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break Ending::Timeout;
        }
    };
    let mut stop = |why: &str| -> String {
        match vmm.stop(Some(client), w.grace) {
            Ok((st, killed)) => format!(
                "{why}; stopped with vm.shutdown + vmm.shutdown{} (VMM {})",
                if killed {
                    " + SIGKILL after the grace period"
                } else {
                    ""
                },
                vmm::describe_status(st)
            ),
            Err(e) => format!("{why}; stopping the VMM failed: {e}"),
        }
    };
    let out = match ending {
        Ending::Exited(st) if st.success() => match events::exit_code_from_serial(&paths.serial) {
            Ok(Some(n)) => Outcome {
                code: n,
                reason: "exited",
                detail: None,
            },
            Ok(None) => Outcome {
                code: code::NO_EXIT_LINE,
                reason: "no_exit_line",
                detail: Some(format!(
                    "the guest powered off without printing CHVKIT_EXIT=<n> on its serial console ({})",
                    paths.serial.display()
                )),
            },
            Err(e) => Outcome {
                code: code::NO_EXIT_LINE,
                reason: "no_exit_line",
                detail: Some(format!("cannot read {}: {e}", paths.serial.display())),
            },
        },
        Ending::Exited(st) => {
            let tail = events::tail_lines(&paths.vmm_log, 5);
            Outcome {
                code: code::VMM_CRASHED,
                reason: "vmm_crashed",
                detail: Some(format!(
                    "the VMM (pid {}) died: {}{}",
                    vmm.pid,
                    vmm::describe_status(st),
                    if tail.is_empty() { String::new() } else { format!("; its log ends with:\n{tail}") }
                )),
            }
        }
        Ending::Timeout => Outcome {
            code: code::TIMEOUT,
            reason: "timeout",
            detail: Some(stop(&format!(
                "no power-off within {}s",
                w.timeout.map(|t| t.as_secs_f64()).unwrap_or(0.0)
            ))),
        },
        Ending::Signal(s) => Outcome {
            code: code::SIGNAL_BASE + s as i32,
            reason: "signal",
            detail: Some(stop(&format!("{} received", s.as_str()))),
        },
        Ending::Rebooted => Outcome {
            code: code::GUEST_REBOOTED,
            reason: "guest_rebooted",
            detail: Some(stop(
                "the guest rebooted (Cloud Hypervisor reboots in-process, which would loop); a workload must end with poweroff",
            )),
        },
        Ending::Panicked => Outcome {
            code: code::GUEST_PANICKED,
            reason: "guest_panicked",
            detail: Some(stop("the guest kernel panicked (pvpanic `guest panic` event)")),
        },
    };
    pump_console(&mut serial);
    out
}
