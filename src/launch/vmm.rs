//! The Cloud Hypervisor process: spawning it, waiting for its socket, watching it, ending it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;

use super::api::Client;

/// How long to wait for the API socket after exec (Kata: 10 s; it appears in ~10 ms).
pub const SOCKET_BUDGET: Duration = Duration::from_secs(10);
/// Polling step while waiting for the socket.
pub const SOCKET_STEP: Duration = Duration::from_millis(1);

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("cannot start {bin}: {source}")]
    Spawn {
        bin: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the VMM exited ({status}) before its API socket appeared{log}")]
    EarlyExit { status: String, log: String },
    #[error("the VMM's API socket {path} did not appear within {}s{log}", budget.as_secs())]
    NoSocket {
        path: PathBuf,
        budget: Duration,
        log: String,
    },
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Locate the VMM binary: `CHV_BIN`, then the profile's install path (under `--root`), then
/// `cloud-hypervisor` on PATH.
pub fn find_binary(ctx: &crate::Context) -> Result<PathBuf, String> {
    if let Some(v) = std::env::var_os("CHV_BIN").filter(|v| !v.is_empty()) {
        let p = PathBuf::from(v);
        if p.is_file() {
            return Ok(p);
        }
        return Err(format!(
            "CHV_BIN={} does not exist or is not a file",
            p.display()
        ));
    }
    let installed = ctx
        .root
        .path(ctx.profile.cloud_hypervisor.install_path.as_path());
    if installed.is_file() {
        return Ok(installed);
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&paths) {
            let p = d.join("cloud-hypervisor");
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    Err(format!(
        "cloud-hypervisor not found: not at {} (the profile's install path; `chvkit setup` installs it), not on PATH, and CHV_BIN is not set",
        installed.display()
    ))
}

/// A running VMM, our child.
pub struct Vmm {
    child: Child,
    pub pid: i32,
    pidfd: OwnedFd,
    pub start_ticks: Option<u64>,
    log: PathBuf,
    status: Option<ExitStatus>,
}

/// The command line we run, without the binary: the API socket and the event monitor are
/// command-line only. Seccomp stays at its default (on).
pub fn vmm_args(socket: &Path, events: &Path) -> Vec<String> {
    vec![
        "--api-socket".into(),
        format!("path={}", socket.display()),
        "--event-monitor".into(),
        format!("path={}", events.display()),
    ]
}

impl Vmm {
    /// Spawn the VMM. It gets its own process group (a terminal's Ctrl-C goes to chvkit, which
    /// then stops the VM in order) and dies with its parent (PR_SET_PDEATHSIG), so killing the
    /// supervisor can leave files behind for `gc`, never a running VM nobody watches.
    pub fn spawn(bin: &Path, socket: &Path, events: &Path, log: &Path) -> Result<Vmm, VmmError> {
        let out = open_append(log)?;
        let err = out.try_clone()?;
        let parent = std::process::id() as libc::pid_t;
        let mut cmd = Command::new(bin);
        cmd.args(vmm_args(socket, events))
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        // SAFETY: only async-signal-safe calls (prctl, getppid, setpgid, sigprocmask, _exit) run between
        // fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                // The parent may have died before prctl took effect.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                if libc::setpgid(0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // chvkit blocks SIGINT/SIGTERM/SIGHUP to read them from a signalfd; the mask is
                // inherited across exec, and the VMM needs them unblocked ("Error blocking
                // signals: signal 15 already blocked").
                let mut empty: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut empty);
                if libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let t = std::time::Instant::now();
        let child = cmd.spawn().map_err(|source| VmmError::Spawn {
            bin: bin.to_path_buf(),
            source,
        })?;
        let pid = child.id() as i32;
        tracing::trace!(us = t.elapsed().as_micros() as u64, "spawned the VMM");
        // SAFETY: pidfd_open has no memory arguments; the result is checked before use.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            let e = io::Error::last_os_error();
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
            return Err(VmmError::Io(e));
        }
        // SAFETY: a fresh fd we own.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Ok(Vmm {
            child,
            pid,
            pidfd,
            start_ticks: super::rundir::process_start_ticks(pid),
            log: log.to_path_buf(),
            status: None,
        })
    }

    pub fn pidfd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    fn log_tail(&self) -> String {
        let t = super::events::tail_lines(&self.log, 8);
        if t.is_empty() {
            String::new()
        } else {
            format!("; its log ({}) ends with:\n{t}", self.log.display())
        }
    }

    /// Poll (≤ [`SOCKET_STEP`] steps) until the socket accepts connections.
    pub fn wait_for_socket(&mut self, path: &Path, budget: Duration) -> Result<Client, VmmError> {
        let deadline = Instant::now() + budget;
        loop {
            if path.exists() && std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Ok(Client::new(path));
            }
            if let Some(st) = self.try_wait()? {
                return Err(VmmError::EarlyExit {
                    status: describe_status(st),
                    log: self.log_tail(),
                });
            }
            if Instant::now() >= deadline {
                return Err(VmmError::NoSocket {
                    path: path.to_path_buf(),
                    budget,
                    log: self.log_tail(),
                });
            }
            std::thread::sleep(SOCKET_STEP);
        }
    }

    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.child.try_wait()?;
        }
        Ok(self.status)
    }

    /// Wait up to `d` for the VMM to exit.
    pub fn wait_timeout(&mut self, d: Duration) -> io::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + d;
        loop {
            if let Some(st) = self.try_wait()? {
                return Ok(Some(st));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let ms = left.as_millis().clamp(1, 100) as u16;
            let mut fds = [PollFd::new(self.pidfd.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(ms)) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    pub fn signal(&self, sig: Signal) -> io::Result<()> {
        if self.status.is_some() {
            return Ok(());
        }
        // pidfd_send_signal: cannot hit a recycled pid.
        // SAFETY: no memory arguments besides a null siginfo.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                sig as libc::c_int,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ESRCH) {
                return Ok(());
            }
            return Err(e);
        }
        Ok(())
    }

    /// End the VMM: `vm.shutdown`, `vmm.shutdown`, then SIGKILL once `grace` has passed.
    /// Returns its exit status and whether SIGKILL was needed.
    pub fn stop(
        &mut self,
        client: Option<&mut Client>,
        grace: Duration,
    ) -> io::Result<(ExitStatus, bool)> {
        if let Some(st) = self.try_wait()? {
            return Ok((st, false));
        }
        let deadline = Instant::now() + grace;
        if let Some(c) = client {
            if let Err(e) = c.shutdown() {
                tracing::debug!("vm.shutdown: {e}");
            }
            if let Err(e) = c.vmm_shutdown() {
                tracing::debug!("vmm.shutdown: {e}");
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if let Some(st) = self.wait_timeout(left)? {
            return Ok((st, false));
        }
        tracing::warn!(
            pid = self.pid,
            "the VMM did not exit within {}ms: SIGKILL",
            grace.as_millis()
        );
        self.signal(Signal::SIGKILL)?;
        let st = self.child.wait()?;
        self.status = Some(st);
        Ok((st, true))
    }

    /// Kill and reap (cleanup path; idempotent).
    pub fn kill_and_reap(&mut self) {
        if matches!(self.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = self.signal(Signal::SIGKILL);
        if let Ok(st) = self.child.wait() {
            self.status = Some(st);
        }
    }
}

/// "exit status 1", "killed by SIGKILL".
pub fn describe_status(st: ExitStatus) -> String {
    if let Some(code) = st.code() {
        format!("exit status {code}")
    } else if let Some(sig) = st.signal() {
        let name = Signal::try_from(sig)
            .map(|s| s.as_str().to_string())
            .unwrap_or_else(|_| format!("signal {sig}"));
        format!(
            "killed by {name}{}",
            if st.core_dumped() {
                " (core dumped)"
            } else {
                ""
            }
        )
    } else {
        format!("{st}")
    }
}

/// Open a file for appending, creating it (0600).
pub fn open_append(p: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(p)
}

/// Landlock ABI version of the running kernel (0 when unavailable or disabled).
pub fn landlock_abi() -> i64 {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: documented probe form: null attr, size 0, VERSION flag.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    v.max(0)
}

/// Cloud Hypervisor requires Landlock ABI v3 (HardRequirement in its landlock module).
pub const LANDLOCK_MIN_ABI: i64 = 3;
