//! Starting the VMM before chvkit has parsed its own command line.
//!
//! A launch's critical path is chvkit's start, then the VMM's start (a few ms), then
//! `vm.create`/`vm.boot`. Everything chvkit does before the VMM is spawned adds to it one for
//! one; everything after overlaps the VMM's start on the other CPU. So `main` first looks at
//! the raw arguments: when they are a `launch` (a conservative match, see [`sniff`]), it loads
//! the profile, finds the VMM and starts it at once in a private staging directory of the
//! runtime dir (`.vmm-<pid>`: API socket bound and listening, event log and VMM log opened and
//! handed over as descriptors). For `--detach` the supervisor is forked first — small and
//! cheap at this point — and the launching process only waits for its report.
//!
//! Then chvkit parses its command line for real (clap), and the launch goes on as usual; when
//! the job's run dir is made, the staging directory is renamed into place instead (one
//! `rename(2)`: the socket and the open files move with it). If the real parse disagrees with
//! the quick look (another profile or root, no `launch`, `--detach` or not), the early VMM is
//! killed and the staging directory removed before anything else happens, and a forked
//! supervisor tells the waiting process to do the whole launch itself. The VMM dies with its
//! supervisor (PR_SET_PDEATHSIG); a staging directory whose process is gone is removed by
//! `chvkit gc`.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::run::{fork_with_line, Forked, Report};
use super::rundir;
use super::vmm::Vmm;
use crate::paths::Root;
use crate::profile::Profile;
use crate::Context;

/// Prefix of staging directories in the runtime dir (job ids start with a letter or digit).
pub const STAGING_PREFIX: &str = ".vmm-";
/// A staging directory older than this whose process is gone is garbage.
pub const STAGING_GRACE: Duration = Duration::from_secs(60);

/// What the raw arguments say, when they are plainly a `launch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sniffed {
    pub profile: Option<PathBuf>,
    pub root: Option<PathBuf>,
    pub detach: bool,
}

/// Recognise `chvkit [globals] launch [args]` without clap: global options (`--profile`,
/// `--root` with their values, `-v…`) anywhere, exactly one `launch` as the first word that is
/// not an option, and `--detach` as a whole word. Anything unusual (help, version, `--`,
/// another command, a `--profile` without a value) is `None`: the normal path handles it. A
/// wrong guess costs only the early VMM: the real parse is compared with this one.
pub fn sniff(args: &[OsString]) -> Option<Sniffed> {
    let mut s = Sniffed {
        profile: std::env::var_os("CHVKIT_PROFILE")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from),
        root: std::env::var_os("CHVKIT_ROOT")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from),
        detach: false,
    };
    let mut command = false;
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let t = a.to_str()?;
        match t {
            "--" | "-h" | "--help" | "-V" | "--version" | "help" => return None,
            "--profile" => s.profile = Some(PathBuf::from(it.next()?)),
            "--root" => s.root = Some(PathBuf::from(it.next()?)),
            "--detach" => s.detach = true,
            _ if t.starts_with("--profile=") => s.profile = Some(PathBuf::from(&t[10..])),
            _ if t.starts_with("--root=") => s.root = Some(PathBuf::from(&t[7..])),
            _ if !command && t == "launch" => command = true,
            // Before the command only -v/--verbose may come.
            _ if !command
                && (t == "--verbose"
                    || (t.len() > 1
                        && t[1..].bytes().all(|b| b == b'v')
                        && t.starts_with('-'))) => {}
            _ if !command => return None,
            _ => {}
        }
    }
    command.then_some(s)
}

/// A VMM started before the command line was parsed, in its staging directory.
pub struct EarlyVmm {
    vmm: Option<Vmm>,
    staging: PathBuf,
    profile: Option<Profile>,
    sniffed: Sniffed,
    /// The forked supervisor's line to the waiting process (`--detach` only).
    report: Option<File>,
}

/// What [`start`] made of this process.
pub enum Start {
    /// Not a launch, or nothing could be prepared: the normal path.
    No,
    /// The launching process of a `--detach` launch: wait for the supervisor's report.
    Waiter(Waiter),
    /// This process carries the launch on, with its VMM already starting.
    Launch(Box<EarlyVmm>),
}

/// The launching process's side of an early `--detach`.
pub struct Waiter {
    sock: UnixStream,
    child: nix::unistd::Pid,
}

/// The message that tells the waiting process to do the launch itself.
const ABANDON: &str = "{\"abandon\":true}";

/// Look at the arguments and, for a launch, start the VMM now. Any failure here means "not
/// early": the normal path then meets (and reports) the same problem properly.
pub fn start() -> Start {
    // An escape hatch (and the way the tests exercise the other path): CHVKIT_EARLY_VMM=0.
    if std::env::var_os("CHVKIT_EARLY_VMM").is_some_and(|v| v == "0") {
        return Start::No;
    }
    let args: Vec<OsString> = std::env::args_os().collect();
    let Some(sniffed) = sniff(&args) else {
        return Start::No;
    };
    let Ok(profile) = Profile::load(sniffed.profile.as_deref()) else {
        return Start::No;
    };
    let ctx = Context {
        profile,
        profile_source: String::new(),
        root: Root::new(sniffed.root.clone()),
    };
    let Ok(bin) = super::vmm::find_binary(&ctx) else {
        return Start::No;
    };
    let staging = rundir::runtime_dir(&ctx).join(format!(
        "{STAGING_PREFIX}{}-{:08x}",
        std::process::id(),
        getrandom::u32().unwrap_or(0)
    ));
    if rundir::create_private_dir(&staging).is_err() {
        return Start::No;
    }
    let mut early = EarlyVmm {
        vmm: None,
        staging,
        profile: Some(ctx.profile),
        sniffed,
        report: None,
    };
    if early.sniffed.detach {
        // SAFETY: nothing has started a thread yet (this runs first thing in main).
        match unsafe { fork_with_line() } {
            Ok(Forked::Parent { line, child }) => {
                // The supervisor owns the staging directory now.
                std::mem::forget(early);
                return Start::Waiter(Waiter { sock: line, child });
            }
            // Its stdio stays the caller's until the run dir exists (errors before that are
            // the user's to see); then it moves to supervisor.log.
            Ok(Forked::Child(report)) => early.report = Some(report),
            Err(_) => return Start::No,
        }
    }
    let sock = early.staging.join("api.sock");
    match Vmm::spawn(
        &bin,
        &sock,
        &early.staging.join("events.log"),
        &early.staging.join("vmm.log"),
    ) {
        Ok(v) => early.vmm = Some(v),
        Err(e) => {
            tracing::debug!("early VMM start failed ({e}); the normal path retries");
            early.abandon();
            return if early.report.is_some() {
                // The waiting process does the launch itself.
                std::process::exit(0)
            } else {
                Start::No
            };
        }
    }
    Start::Launch(Box::new(early))
}

impl Waiter {
    /// Wait for the supervisor: its report (printed here, exit code returned), its exit
    /// without one (it printed its error to our stderr itself; its code is returned), or the
    /// word that it gave up (`None`: do the launch in this process).
    pub fn wait(mut self) -> Option<i32> {
        let mut text = String::new();
        let _ = self.sock.read_to_string(&mut text);
        let text = text.trim();
        if text == ABANDON {
            let _ = nix::sys::wait::waitpid(self.child, None);
            return None;
        }
        if let Ok(r) = serde_json::from_str::<Report>(text) {
            return Some(super::run::print_detached(&r));
        }
        use nix::sys::wait::WaitStatus;
        Some(match nix::sys::wait::waitpid(self.child, None) {
            Ok(WaitStatus::Exited(_, code)) => code,
            Ok(WaitStatus::Signaled(_, sig, _)) => {
                eprintln!("chvkit: the launch's supervisor was killed by {sig}");
                128 + sig as i32
            }
            _ => crate::exit::FAILURE,
        })
    }
}

impl EarlyVmm {
    /// Does the real command line ask for what was started? `detach` and the profile/root
    /// as clap read them (flags or environment).
    pub fn matches(&self, profile: Option<&Path>, root: Option<&Path>, detach: bool) -> bool {
        self.sniffed.profile.as_deref() == profile
            && self.sniffed.root.as_deref() == root
            && self.sniffed.detach == detach
    }

    /// The profile loaded for the early start (it is the one the command line names).
    pub fn take_profile(&mut self) -> Option<Profile> {
        self.profile.take()
    }

    /// The staging directory, to be renamed into the job's run dir.
    pub fn staging(&self) -> &Path {
        &self.staging
    }

    /// The VMM, once its staging directory is the run dir.
    pub fn take_vmm(&mut self) -> Option<Vmm> {
        self.vmm.take()
    }

    /// The forked supervisor's report line, if this is one.
    pub fn take_report(&mut self) -> Option<File> {
        self.report.take()
    }

    pub fn is_forked(&self) -> bool {
        self.report.is_some()
    }

    /// Kill the VMM, remove the staging directory and, in a forked supervisor, tell the
    /// waiting process to launch by itself.
    pub fn abandon(&mut self) {
        self.clean_up();
        if let Some(mut w) = self.report.take() {
            let _ = w.write_all(ABANDON.as_bytes());
        }
    }

    fn clean_up(&mut self) {
        if let Some(mut v) = self.vmm.take() {
            v.kill_and_reap();
        }
        // After adoption the staging directory is the run dir: it no longer exists here.
        if self.staging.exists() {
            let _ = fs::remove_dir_all(&self.staging);
        }
    }
}

impl Drop for EarlyVmm {
    fn drop(&mut self) {
        self.clean_up();
    }
}

/// Staging directories in `runtime` left by processes that are gone (for `gc`).
pub fn stale_staging(runtime: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir(runtime) else {
        return out;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(STAGING_PREFIX) else {
            continue;
        };
        let pid = rest.split('-').next().and_then(|p| p.parse::<i32>().ok());
        let alive = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > STAGING_GRACE);
        if !alive && old {
            out.push(e.path());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<OsString> {
        a.iter().map(OsString::from).collect()
    }

    #[test]
    fn sniff_recognises_launches_only() {
        let s = sniff(&args(&[
            "chvkit",
            "--profile",
            "p.yaml",
            "launch",
            "--rootfs",
            "r",
            "--detach",
        ]))
        .unwrap();
        assert_eq!(s.profile.as_deref(), Some(Path::new("p.yaml")));
        assert!(s.detach);
        let s = sniff(&args(&[
            "chvkit",
            "-vv",
            "launch",
            "--root=/x",
            "--rootfs",
            "r",
        ]))
        .unwrap();
        assert_eq!(s.root.as_deref(), Some(Path::new("/x")));
        assert!(!s.detach);
        for not in [
            &["chvkit", "vm", "ls"][..],
            &["chvkit", "launch", "--help"],
            &["chvkit", "--version"],
            &["chvkit", "--rootfs", "launch"],
            &["chvkit", "launch", "--", "--detach"],
            &["chvkit", "launch", "--profile"],
            &["chvkit"],
        ] {
            assert_eq!(sniff(&args(not)), None, "{not:?}");
        }
    }
}
