//! Running the external tools (buildah, umoci, mkfs …) so that Ctrl-C / SIGTERM stops them and
//! lets the caller clean its scratch space, instead of killing chvkit mid-way.

use std::io::{self, BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::Duration;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    SIGNAL.store(sig, Ordering::SeqCst);
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Catch SIGINT, SIGTERM and SIGHUP from now on: they set a flag that [`output`] and
/// [`check`] turn into an `Interrupted` error, so stack unwinding runs the cleanup guards.
pub fn install_handlers() {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let act = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to atomics, which is async-signal-safe.
        let _ = unsafe { sigaction(s, &act) };
    }
}

/// The signal that interrupted us, if any (for the 128+N exit code).
pub fn interrupted() -> Option<i32> {
    INTERRUPTED
        .load(Ordering::SeqCst)
        .then(|| SIGNAL.load(Ordering::SeqCst))
}

fn interrupted_err() -> io::Error {
    io::Error::new(io::ErrorKind::Interrupted, "interrupted by a signal")
}

/// `Err(Interrupted)` once a signal arrived.
pub fn check() -> io::Result<()> {
    if interrupted().is_some() {
        Err(interrupted_err())
    } else {
        Ok(())
    }
}

fn wait_interruptible(child: &mut Child) -> io::Result<ExitStatus> {
    // Short tools (tune2fs, e2fsck on a small image) finish in a few ms: start polling at 1 ms
    // and back off to 20 ms so long builds don't spin.
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(st);
        }
        if interrupted().is_some() {
            let _ = child.kill();
            let _ = child.wait();
            return Err(interrupted_err());
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// Like `Command::output`, but killed (and reported as `Interrupted`) on a signal.
pub fn output(cmd: &mut Command) -> io::Result<Output> {
    output_lines(cmd, |_| {})
}

/// [`output`] that also hands each stdout/stderr line to `on_line` as it arrives (progress).
pub fn output_lines(cmd: &mut Command, on_line: impl Fn(&str) + Sync) -> io::Result<Output> {
    check()?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let out = child.stdout.take();
    let err = child.stderr.take();
    let on_line = &on_line;
    std::thread::scope(|s| {
        let collect = |r: Option<Box<dyn Read + Send>>| {
            s.spawn(move || {
                let mut buf = Vec::new();
                if let Some(r) = r {
                    let mut r = BufReader::new(r);
                    let mut line = Vec::new();
                    while let Ok(n) = r.read_until(b'\n', &mut line) {
                        if n == 0 {
                            break;
                        }
                        on_line(String::from_utf8_lossy(&line).trim_end());
                        buf.extend_from_slice(&line);
                        line.clear();
                    }
                }
                buf
            })
        };
        let ho = collect(out.map(|o| Box::new(o) as Box<dyn Read + Send>));
        let he = collect(err.map(|e| Box::new(e) as Box<dyn Read + Send>));
        let status = wait_interruptible(&mut child);
        let stdout = ho.join().unwrap_or_default();
        let stderr = he.join().unwrap_or_default();
        status.map(|status| Output {
            status,
            stdout,
            stderr,
        })
    })
}

/// Is `name` an executable on `PATH`?
pub fn which(name: &str) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|d| d.join(name))
        .find(|p| {
            std::fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}
