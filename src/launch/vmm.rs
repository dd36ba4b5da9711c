//! The Cloud Hypervisor process: spawning it (with its API socket already listening), watching
//! it, ending it.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;

use super::api::{ApiError, Client};
use crate::jail::ChildJail;

/// How long a just-started VMM may take to answer its first request (Kata waits 10 s for the
/// socket; it answers within a few ms here).
pub const STARTUP_BUDGET: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("cannot start {bin}: {source}")]
    Spawn {
        bin: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the VMM exited ({status}) before answering on its API socket{log}")]
    EarlyExit { status: String, log: String },
    #[error("cannot create the API socket {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: io::Error,
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
    pub pid: i32,
    pidfd: OwnedFd,
    pub start_ticks: Option<u64>,
    log: PathBuf,
    status: Option<ExitStatus>,
}

/// The command line we run, without the binary: the API socket (a listening socket chvkit
/// bound, passed as descriptor `socket_fd`) and the event monitor are command-line only.
/// Seccomp stays at its default (on).
pub fn vmm_args(socket_fd: RawFd, events_fd: RawFd) -> Vec<String> {
    vec![
        "--api-socket".into(),
        format!("fd={socket_fd}"),
        "--event-monitor".into(),
        format!("fd={events_fd}"),
    ]
}

impl Vmm {
    /// Spawn the VMM. It gets its own process group (a terminal's Ctrl-C goes to chvkit, which
    /// then stops the VM in order) and dies with its parent (PR_SET_PDEATHSIG), so killing the
    /// supervisor can leave files behind for `gc`, never a running VM nobody watches.
    ///
    /// The API socket is bound and listening before the VMM starts (libvirt does the same) and
    /// handed over as `--api-socket fd=N`: a client can connect and send its first request at
    /// once — the kernel queues it until the VMM accepts — so nobody polls for the socket, and a
    /// stale socket file cannot make the VMM fail. Only the VMM keeps the listening descriptor:
    /// if it dies, queued and later connections fail instead of hanging.
    pub fn spawn(
        bin: &Path,
        socket: &Path,
        events: &Path,
        log: &Path,
        jail: Option<ChildJail>,
    ) -> Result<Vmm, VmmError> {
        let sock_err = |source| VmmError::Socket {
            path: socket.to_path_buf(),
            source,
        };
        let listener = UnixListener::bind(socket).map_err(sock_err)?;
        fs::set_permissions(socket, fs::Permissions::from_mode(0o600)).map_err(sock_err)?;
        let lfd = listener.as_raw_fd();
        let out = open_append(log)?;
        // Opened (truncated) here and handed over as a descriptor, like the API socket.
        let ev = open_truncate(events)?;
        let null = File::open("/dev/null")?;
        let args = vmm_args(lfd, ev.as_raw_fd());
        let pid = spawn_child(
            bin,
            &args,
            [null.as_raw_fd(), out.as_raw_fd(), out.as_raw_fd()],
            [lfd, ev.as_raw_fd()],
            jail,
        )
        .map_err(|source| VmmError::Spawn {
            bin: bin.to_path_buf(),
            source,
        })?;
        // From here on only the VMM holds the listening socket.
        drop(listener);
        // SAFETY: pidfd_open has no memory arguments; the result is checked before use.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            let e = io::Error::last_os_error();
            // SAFETY: plain kill/waitpid of our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
            return Err(VmmError::Io(e));
        }
        // SAFETY: a fresh fd we own.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Ok(Vmm {
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

    /// After a failed first call: if the VMM died, its exit status and log tail say why (the
    /// failed call itself only saw a refused or reset connection). `None` while it runs, or
    /// when the VMM answered (its own error chain is the message then).
    pub fn early_exit(&mut self, e: &ApiError) -> Option<VmmError> {
        if e.chain().is_some() {
            return None;
        }
        // The socket closes as the VMM exits, a moment before its status can be collected.
        match self.wait_timeout(Duration::from_millis(200)) {
            Ok(Some(st)) => Some(VmmError::EarlyExit {
                status: describe_status(st),
                log: self.log_tail(),
            }),
            _ => None,
        }
    }

    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = waitpid(self.pid, libc::WNOHANG)?;
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
        let st = self.wait()?;
        Ok((st, true))
    }

    /// Kill and reap (cleanup path; idempotent).
    pub fn kill_and_reap(&mut self) {
        if matches!(self.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = self.signal(Signal::SIGKILL);
        let _ = self.wait();
    }

    /// Block until the VMM exits.
    fn wait(&mut self) -> io::Result<ExitStatus> {
        loop {
            if let Some(st) = self.status {
                return Ok(st);
            }
            self.status = waitpid(self.pid, 0)?;
        }
    }
}

/// `waitpid(pid, flags)`: the status once the child exited, `None` while it runs (`WNOHANG`).
fn waitpid(pid: i32, flags: libc::c_int) -> io::Result<Option<ExitStatus>> {
    loop {
        let mut st: libc::c_int = 0;
        // SAFETY: `st` is a valid out-pointer for the call.
        let r = unsafe { libc::waitpid(pid, &mut st, flags) };
        if r == pid {
            return Ok(Some(ExitStatus::from_raw(st)));
        }
        if r == 0 {
            return Ok(None);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// What the VMM's child side needs, prepared before the clone: it may not allocate.
struct ChildSpec {
    path: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    /// stdin, stdout, stderr to install.
    stdio: [RawFd; 3],
    /// The listening API socket and the event log, to keep across exec.
    keep: [RawFd; 2],
    parent: libc::pid_t,
    /// Credentials, capabilities and cgroup to enter before the exec (`--jail on`).
    jail: Option<ChildJail>,
    /// errno of the failed step (written by the child, read by the parent after the clone).
    errno: libc::c_int,
}

/// The child side of [`spawn_child`]: runs on its own small stack in the parent's memory
/// (CLONE_VM) while the parent is suspended (CLONE_VFORK), so it only makes system calls —
/// no allocation, no locks — and ends in execve or _exit.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` points at the ChildSpec on the suspended parent's stack; only raw,
    // async-signal-safe system calls follow.
    unsafe {
        let c = &mut *(arg as *mut ChildSpec);
        let fail = |c: &mut ChildSpec| -> ! {
            c.errno = *libc::__errno_location();
            libc::_exit(127)
        };
        if libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        ) != 0
        {
            fail(c);
        }
        // The parent may have died before prctl took effect.
        if libc::getppid() != c.parent {
            libc::_exit(1);
        }
        if libc::setpgid(0, 0) != 0 {
            fail(c);
        }
        // Rust ignores SIGPIPE, and ignored signals stay ignored across exec. This child has
        // its own copy of the handler table (no CLONE_SIGHAND).
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        // chvkit blocks SIGINT/SIGTERM/SIGHUP to read them from a signalfd; the mask is
        // inherited across exec, and the VMM needs them unblocked ("Error blocking signals:
        // signal 15 already blocked").
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        if libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) != 0 {
            fail(c);
        }
        for (target, fd) in c.stdio.into_iter().enumerate() {
            let target = target as RawFd;
            let r = if fd == target {
                libc::fcntl(fd, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, target)
            };
            if r < 0 {
                fail(c);
            }
        }
        // The listening socket and the event log are close-on-exec everywhere but in the VMM.
        for fd in c.keep {
            if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                fail(c);
            }
        }
        // Last, once everything that needs root is done: the jail (cgroup, capabilities, uid),
        // which sets the parent-death signal again (a uid change clears it).
        if let Some(j) = c.jail {
            if let Err(e) = crate::jail::child::enter(&j, libc::SIGKILL) {
                *libc::__errno_location() = e;
                fail(c);
            }
            if libc::getppid() != c.parent {
                libc::_exit(1);
            }
        }
        libc::execve(c.path, c.argv, c.envp);
        fail(c)
    }
}

/// Start `bin args` as a child the way posix_spawn does — clone(CLONE_VM | CLONE_VFORK), no
/// copy of chvkit's page tables and no copy-on-write faults afterwards (each costs
/// microseconds on a nested-virtualization host) — but with what posix_spawn cannot do:
/// PR_SET_PDEATHSIG. Returns once the child has exec'd; an exec failure is returned as its
/// errno.
fn spawn_child(
    bin: &Path,
    args: &[String],
    stdio: [RawFd; 3],
    keep: [RawFd; 2],
    jail: Option<ChildJail>,
) -> io::Result<i32> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let cstr =
        |b: &[u8]| CString::new(b).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e));
    let path = cstr(bin.as_os_str().as_bytes())?;
    let mut argv_c = vec![path.clone()];
    for a in args {
        argv_c.push(cstr(a.as_bytes())?);
    }
    let envp_c = std::env::vars_os()
        .map(|(k, v)| {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            cstr(&kv)
        })
        .collect::<io::Result<Vec<_>>>()?;
    let ptrs = |v: &[CString]| {
        let mut p: Vec<*const libc::c_char> = v.iter().map(|c| c.as_ptr()).collect();
        p.push(std::ptr::null());
        p
    };
    let (argv, envp) = (ptrs(&argv_c), ptrs(&envp_c));
    let mut spec = ChildSpec {
        path: path.as_ptr(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        stdio,
        keep,
        parent: std::process::id() as libc::pid_t,
        jail,
        errno: 0,
    };
    // The child's stack until execve; 16-byte aligned top.
    let mut stack = vec![0u8; 64 * 1024];
    let top = (stack.as_mut_ptr() as usize + stack.len()) & !15;
    // SAFETY: the stack outlives the child's use of it (the parent is suspended until execve
    // or _exit), `spec` and everything it points at live until after the call returns, and
    // child_main makes only raw system calls.
    let pid = unsafe {
        libc::clone(
            child_main,
            top as *mut libc::c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            &mut spec as *mut ChildSpec as *mut libc::c_void,
        )
    };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the child has exec'd or exited; nothing writes `spec` any more.
    let errno = unsafe { std::ptr::read_volatile(&spec.errno) };
    if errno != 0 {
        // SAFETY: reap our own failed child.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        return Err(io::Error::from_raw_os_error(errno));
    }
    Ok(pid)
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
fn open_truncate(p: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(p)
}

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

#[cfg(test)]
mod tests {
    use super::*;

    /// The hand-rolled spawn gives the child what posix_spawn would (stdio, an empty signal
    /// mask, SIGPIPE not ignored, its own process group) plus the parent-death signal and the
    /// one inherited descriptor; exec failures come back as errors.
    #[test]
    fn spawn_child_sets_up_the_child_and_reports_exec_errors() {
        let d = tempfile::tempdir().unwrap();
        let out = File::create(d.path().join("out")).unwrap();
        let null = File::open("/dev/null").unwrap();
        let keep = UnixListener::bind(d.path().join("s")).unwrap();
        let ev = open_truncate(&d.path().join("ev")).unwrap();
        // Blocked here, as in chvkit: the child must start with an empty mask.
        let mut set = nix::sys::signal::SigSet::empty();
        set.add(Signal::SIGTERM);
        set.thread_block().unwrap();
        let script = format!(
            "grep -E '^(SigBlk|SigIgn):' /proc/self/status; \
             test -e /proc/self/fd/{} && test -e /proc/self/fd/{} && echo kept; \
             cut -d' ' -f5 /proc/self/stat; echo $$; exit 7",
            keep.as_raw_fd(),
            ev.as_raw_fd()
        );
        let pid = spawn_child(
            Path::new("/bin/sh"),
            &["-c".into(), script],
            [null.as_raw_fd(), out.as_raw_fd(), out.as_raw_fd()],
            [keep.as_raw_fd(), ev.as_raw_fd()],
            None,
        )
        .unwrap();
        set.thread_unblock().unwrap();
        let st = waitpid(pid, 0).unwrap().unwrap();
        assert_eq!(st.code(), Some(7));
        let text = fs::read_to_string(d.path().join("out")).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "SigBlk:\t0000000000000000", "{text}");
        // SIGPIPE is signal 13: bit 12 of the ignored set.
        let ign = u64::from_str_radix(lines[1].trim_start_matches("SigIgn:\t"), 16).unwrap();
        assert_eq!(ign & (1 << 12), 0, "{text}");
        assert_eq!(lines[2], "kept", "{text}");
        // Its own process group: pgid == pid.
        assert_eq!(lines[3], lines[4], "{text}");
        // The listening socket stays close-on-exec in this process.
        let fl = unsafe { libc::fcntl(keep.as_raw_fd(), libc::F_GETFD) };
        assert_eq!(fl & libc::FD_CLOEXEC, libc::FD_CLOEXEC);

        let e = spawn_child(
            Path::new("/nonexistent/cloud-hypervisor"),
            &[],
            [null.as_raw_fd(), out.as_raw_fd(), out.as_raw_fd()],
            [keep.as_raw_fd(), ev.as_raw_fd()],
            None,
        )
        .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
    }
}
