//! The jail around one job's VMM (Firecracker's jailer is the model): an unprivileged uid/gid
//! of the job's own, the /dev/kvm group as its only supplementary group, no capabilities in
//! any set (effective, permitted, inheritable, ambient, bounding), `PR_SET_NO_NEW_PRIVS`, and a
//! cgroup with memory, pids and CPU limits that the VMM enters before it executes.
//!
//! chvkit (root) does everything that needs privilege first and hands the job's resources over
//! to the job's uid: the TAP (`TUNSETOWNER`/`TUNSETGROUP`), the per-job disk, the env disk and
//! the serial log (chown), the run dir (root-owned, searchable by the job's group only). Shared
//! read-only files (qcow2 bases) are readable by the /dev/kvm group, never writable. Nothing
//! else in launch thinks about privilege: it asks this module for a [`Jail`] and passes it on.
//!
//! uids: allocated under a `flock` of the runtime dir from the profile's `launch.uid_range`,
//! starting at a point derived from the job id, skipping every uid a job under the runtime dir
//! records (live, or dead and not yet collected: its leftovers are owned by that uid).

pub mod cgroup;
pub mod child;

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use cgroup::{Cgroup, Limits};
pub use child::ChildJail;

use crate::profile::LaunchLimits;

/// `--jail on|off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum JailMode {
    /// On when this host can (root, /dev/kvm, a cgroup hierarchy, the job's files reachable
    /// by an unprivileged uid); otherwise off, with a warning saying why.
    Auto,
    /// The VMM runs as the job's own uid, without capabilities, in its own cgroup.
    On,
    /// The VMM runs as root with every capability (hosts without cgroup access).
    Off,
}

/// What a job's state file records about its jail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JailRecord {
    pub uid: u32,
    pub gid: u32,
    pub kvm_gid: u32,
    #[serde(default)]
    pub cgroup: Option<Cgroup>,
}

/// The device whose group the VMM gets as a supplementary group.
pub const KVM_DEVICE: &str = "/dev/kvm";

/// The group owning /dev/kvm.
pub fn kvm_gid() -> io::Result<u32> {
    fs::metadata(KVM_DEVICE)
        .map(|m| m.gid())
        .map_err(|e| io::Error::new(e.kind(), format!("{KVM_DEVICE}: {e}")))
}

/// Can this host jail? (root, /dev/kvm, a cgroup hierarchy.) The reason when not.
pub fn host_can_jail() -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err(
            "chvkit is not running as root (it must create the job's uid, cgroup and TAP owner)"
                .into(),
        );
    }
    kvm_gid().map_err(|e| e.to_string())?;
    cgroup::detect()?;
    Ok(())
}

/// `--jail auto`: can a job's VMM be jailed here, given the files it will open (`read`) and
/// the directories chvkit will create its own directories in (`parents`, which may not exist
/// yet: their nearest existing ancestor must be searchable)? The reason when not.
pub fn auto_check(l: &LaunchLimits, read: &[&Path], parents: &[&Path]) -> Result<(), String> {
    host_can_jail()?;
    let kvm = kvm_gid().map_err(|e| e.to_string())?;
    let uid = l.uid_range[0];
    for p in read {
        check_access(p, uid, &[kvm], false)?;
    }
    for d in parents {
        if let Some(existing) = d.ancestors().find(|a| a.is_dir()) {
            check_search(existing, uid, &[kvm])?;
        }
    }
    Ok(())
}

/// Search permission for `uid` on `d` and every directory above it.
pub fn check_search(d: &Path, uid: u32, gids: &[u32]) -> Result<(), String> {
    let abs = fs::canonicalize(d).map_err(|e| format!("{}: {e}", d.display()))?;
    for a in abs.ancestors() {
        let md = fs::metadata(a).map_err(|e| format!("{}: {e}", a.display()))?;
        let m = md.mode();
        let ok = if md.uid() == uid {
            m & 0o100 != 0
        } else if gids.contains(&md.gid()) {
            m & 0o010 != 0
        } else {
            m & 0o001 != 0
        };
        if !ok {
            return Err(format!(
                "the jailed VMM (uid {uid}) cannot reach files beneath {}: {} is mode {:o}, owner {}:{}",
                d.display(),
                a.display(),
                m & 0o7777,
                md.uid(),
                md.gid()
            ));
        }
    }
    Ok(())
}

/// The memory limit of a job's cgroup: guest memory plus the VMM's allowance.
pub fn memory_limit(guest_mib: u32, l: &LaunchLimits) -> u64 {
    (u64::from(guest_mib) + u64::from(l.vmm_overhead_mib)) << 20
}

/// The allocation lock, held while a job picks its uid and records it in its state.
pub struct UidLock(#[allow(dead_code)] Flock<File>);

/// Lock the runtime dir itself (`flock` on the directory: no lock file is left behind),
/// waiting up to 10 s.
pub fn lock_uids(runtime: &Path) -> io::Result<UidLock> {
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(runtime)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", runtime.display())))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
            Ok(l) => return Ok(UidLock(l)),
            Err((back, nix::errno::Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                f = back;
                std::thread::sleep(Duration::from_millis(2));
            }
            Err((_, e)) => {
                return Err(io::Error::new(
                    io::Error::from(e).kind(),
                    format!("flock {}: {e}", runtime.display()),
                ))
            }
        }
    }
}

/// Pick the job's uid: start at a point derived from the job id, skip `used`. Call with the
/// [`UidLock`] held, and record the result before releasing it.
pub fn pick_uid(job: &str, range: [u32; 2], used: &BTreeSet<u32>) -> Result<u32, String> {
    let [first, last] = range;
    let size = u64::from(last - first) + 1;
    let h = Sha256::digest(job.as_bytes());
    let start = u64::from_be_bytes(h[..8].try_into().unwrap_or([0; 8])) % size;
    for i in 0..size {
        let uid = first + ((start + i) % size) as u32;
        if !used.contains(&uid) {
            return Ok(uid);
        }
    }
    Err(format!(
        "every uid in launch.uid_range [{first}, {last}] is in use by a job (live, or dead and not yet collected: run `chvkit gc`)"
    ))
}

/// uids in `range` that a jailed VMM runs as now (real, effective, saved or filesystem uid),
/// including VMMs of another `--root`, whose jobs this runtime dir does not list. Every jailed
/// VMM is in a job cgroup from before it executes until it is killed and the cgroup removed, so
/// only the processes in job cgroups are read: scanning all of /proc instead cost about 1 ms a
/// launch at 70 processes here and grows with the host's process count. The profile's
/// `launch.uid_range` is chvkit's alone (see docs/launch.md).
pub fn uids_running(range: [u32; 2]) -> BTreeSet<u32> {
    let mut out = BTreeSet::new();
    for pid in cgroup::job_cgroups()
        .iter()
        .flat_map(|(_, cg)| cg.pids().unwrap_or_default())
    {
        let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        if let Some(l) = status.lines().find(|l| l.starts_with("Uid:")) {
            for u in l[4..]
                .split_whitespace()
                .filter_map(|v| v.parse::<u32>().ok())
            {
                if (range[0]..=range[1]).contains(&u) {
                    out.insert(u);
                }
            }
        }
    }
    out
}

/// The job's cgroup name beneath `chvkit/`: the job id for the default runtime dir; with
/// another one (`--root`, a profile's `paths.runtime_dir`) a hash of it is appended, so that
/// equal job ids of two roots never share a cgroup.
pub fn cgroup_name(job: &str, runtime: &Path) -> String {
    if runtime == Path::new("/run/chvkit") {
        return job.to_string();
    }
    let h = Sha256::digest(runtime.as_os_str().as_encoded_bytes());
    format!("{job}@{}", hex::encode(&h[..4]))
}

/// The job id a cgroup name of this runtime dir stands for (see [`cgroup_name`]); `None` for
/// another runtime dir's.
pub fn job_of_cgroup<'n>(name: &'n str, runtime: &Path) -> Option<&'n str> {
    if runtime == Path::new("/run/chvkit") {
        return (!name.contains('@')).then_some(name);
    }
    let (job, _) = name.rsplit_once('@')?;
    (cgroup_name(job, runtime) == name).then_some(job)
}

/// A job's jail, ready to be entered by its VMM.
#[derive(Debug)]
pub struct Jail {
    pub record: JailRecord,
    /// `cgroup.procs` of the job's cgroup, open until the VMM has been spawned.
    procs: Vec<File>,
    cap_last: u32,
}

impl Jail {
    /// A jail for `uid` (gid = uid) and its cgroup `cgroup` (already created).
    pub fn new(uid: u32, cgroup: Option<Cgroup>) -> io::Result<Jail> {
        let kvm_gid = kvm_gid()?;
        let procs = match &cgroup {
            Some(c) => c.open_procs()?,
            None => Vec::new(),
        };
        if procs.len() > child::MAX_CGROUP_FDS {
            return Err(io::Error::other("internal: too many cgroup directories"));
        }
        let cap_last = fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(63);
        Ok(Jail {
            record: JailRecord {
                uid,
                gid: uid,
                kvm_gid,
                cgroup,
            },
            procs,
            cap_last,
        })
    }

    /// What the VMM's child side needs (the cgroup descriptors stay open in `self`).
    pub fn child(&self) -> ChildJail {
        let mut fds = [-1; child::MAX_CGROUP_FDS];
        for (slot, f) in fds.iter_mut().zip(&self.procs) {
            *slot = f.as_raw_fd();
        }
        ChildJail {
            uid: self.record.uid,
            gid: self.record.gid,
            kvm_gid: self.record.kvm_gid,
            cgroup_procs: fds,
            cap_last: self.cap_last,
        }
    }

    /// Once the VMM runs: the cgroup descriptors are not needed any more.
    pub fn spawned(&mut self) {
        self.procs.clear();
    }

    /// Hand a file (or directory) the VMM writes over to the job: owner uid:gid.
    pub fn give(&self, p: &Path) -> io::Result<()> {
        std::os::unix::fs::chown(p, Some(self.record.uid), Some(self.record.gid))
            .map_err(|e| io::Error::new(e.kind(), format!("chown {}: {e}", p.display())))
    }

    /// A directory the job may enter but not list or change: root:<job gid>, 0710.
    pub fn enter_only(&self, d: &Path) -> io::Result<()> {
        std::os::unix::fs::chown(d, Some(0), Some(self.record.gid))
            .and_then(|_| fs::set_permissions(d, fs::Permissions::from_mode(0o710)))
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", d.display())))
    }

    /// A shared file the job reads but never writes (a qcow2 base): root:<kvm group>, 0640.
    /// Every job's VMM has the kvm group; other users usually do not.
    pub fn share_read_only(&self, p: &Path) -> io::Result<()> {
        let md = fs::metadata(p)?;
        if md.uid() != 0 || md.gid() != self.record.kvm_gid {
            std::os::unix::fs::chown(p, Some(0), Some(self.record.kvm_gid))?;
        }
        if md.permissions().mode() & 0o7777 != 0o640 {
            fs::set_permissions(p, fs::Permissions::from_mode(0o640))?;
        }
        Ok(())
    }

    /// Can the job's uid open `p` (`write`: for writing)? Checks the mode bits of `p` and
    /// search permission on every directory above it (ACLs are not consulted). The error names
    /// the first path that stops it.
    pub fn check_access(&self, p: &Path, write: bool) -> Result<(), String> {
        check_access(
            p,
            self.record.uid,
            &[self.record.gid, self.record.kvm_gid],
            write,
        )
    }
}

/// Take a file back from a job that ended (chown root:root, following a symlink): a kept
/// disk or a snapshot outlives the job, and its uid goes to later jobs.
pub fn reclaim(p: &Path) -> io::Result<()> {
    match std::os::unix::fs::chown(p, Some(0), Some(0)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io::Error::new(
            e.kind(),
            format!("chown {}: {e}", p.display()),
        )),
        _ => Ok(()),
    }
}

/// [`reclaim`] a directory and the entries directly in it.
pub fn reclaim_dir(d: &Path) -> io::Result<()> {
    reclaim(d)?;
    if let Ok(rd) = fs::read_dir(d) {
        for e in rd.flatten() {
            reclaim(&e.path())?;
        }
    }
    Ok(())
}

/// See [`Jail::check_access`].
pub fn check_access(p: &Path, uid: u32, gids: &[u32], write: bool) -> Result<(), String> {
    let abs = fs::canonicalize(p).map_err(|e| format!("{}: {e}", p.display()))?;
    let allowed = |md: &fs::Metadata, bit: u32| -> bool {
        let m = md.mode();
        if md.uid() == uid {
            m & (bit << 6) != 0
        } else if gids.contains(&md.gid()) {
            m & (bit << 3) != 0
        } else {
            m & bit != 0
        }
    };
    let mut dirs: Vec<PathBuf> = abs.ancestors().skip(1).map(Path::to_path_buf).collect();
    dirs.reverse();
    for d in &dirs {
        let md = fs::metadata(d).map_err(|e| format!("{}: {e}", d.display()))?;
        if !allowed(&md, 0o1) {
            return Err(format!(
                "the jailed VMM (uid {uid}) cannot reach {}: {} is mode {:o}, owner {}:{} (make it searchable by others, e.g. chmod o+x, or use --jail off)",
                p.display(),
                d.display(),
                md.mode() & 0o7777,
                md.uid(),
                md.gid()
            ));
        }
    }
    let md = fs::metadata(&abs).map_err(|e| format!("{}: {e}", abs.display()))?;
    let bit = if write { 0o2 } else { 0o4 };
    if !allowed(&md, bit) {
        return Err(format!(
            "the jailed VMM (uid {uid}) cannot {} {}: mode {:o}, owner {}:{} (or use --jail off)",
            if write { "write" } else { "read" },
            p.display(),
            md.mode() & 0o7777,
            md.uid(),
            md.gid()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_are_derived_and_skip_used_ones() {
        let r = [200_000, 200_009];
        let a = pick_uid("job-a", r, &BTreeSet::new()).unwrap();
        assert!((r[0]..=r[1]).contains(&a));
        assert_eq!(pick_uid("job-a", r, &BTreeSet::new()).unwrap(), a);
        let mut used: BTreeSet<u32> = [a].into();
        let b = pick_uid("job-a", r, &used).unwrap();
        assert_ne!(a, b);
        used.extend(r[0]..=r[1]);
        assert!(pick_uid("job-a", r, &used).is_err());
        assert_eq!(pick_uid("x", [7, 7], &BTreeSet::new()).unwrap(), 7);
    }

    #[test]
    fn access_follows_mode_bits_and_directories() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        fs::write(&f, b"x").unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).unwrap();
        fs::set_permissions(d.path(), fs::Permissions::from_mode(0o700)).unwrap();
        let me = nix::unistd::geteuid().as_raw();
        let other = if me == 0 { 4242 } else { 0 };
        let e = check_access(&f, other, &[4242], false).unwrap_err();
        assert!(e.contains("cannot reach"), "{e}");
        fs::set_permissions(d.path(), fs::Permissions::from_mode(0o711)).unwrap();
        check_access(&f, other, &[4242], false).unwrap();
        assert!(check_access(&f, other, &[4242], true).is_err());
        check_access(&f, me, &[], true).unwrap();
    }

    #[test]
    fn cgroup_names_map_back_to_their_runtime_dir() {
        let r = Path::new("/tmp/x/run/chvkit");
        let n = cgroup_name("job-1", r);
        assert_eq!(job_of_cgroup(&n, r), Some("job-1"));
        assert_eq!(job_of_cgroup(&n, Path::new("/tmp/y/run/chvkit")), None);
        assert_eq!(job_of_cgroup(&n, Path::new("/run/chvkit")), None);
        let d = Path::new("/run/chvkit");
        assert_eq!(cgroup_name("j", d), "j");
        assert_eq!(job_of_cgroup("j", d), Some("j"));
    }

    #[test]
    fn memory_limit_adds_the_overhead() {
        let l = LaunchLimits::default();
        assert_eq!(memory_limit(128, &l), (128 + 64) << 20);
    }
}
