//! The job's cgroup: one small interface over cgroup v2 (one directory, `memory.max`,
//! `pids.max`, `cpu.weight`) and the v1 controllers (a directory in each of the memory, pids
//! and cpu hierarchies: `memory.limit_in_bytes`, `pids.max`, `cpu.shares`).
//!
//! The VMM enters it before it executes: the parent opens the file that moves a process
//! (`tasks` on v1, `cgroup.procs` on v2; see [`Cgroup::open_procs`]) of every directory, and
//! the child writes "0" to each (see `child.rs`), which moves the writing process.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// chvkit's jobs live beneath this group (in each v1 hierarchy).
pub const PARENT: &str = "chvkit";
const V1_CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Version {
    V1,
    V2,
}

/// What the job may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_max: u64,
    pub pids_max: u32,
    /// 1-10000, 100 = the default share.
    pub cpu_weight: u32,
}

/// A job's cgroup as recorded in its state file (enough for `vm info` and `gc`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cgroup {
    pub version: Version,
    /// v2: the one directory; v1: memory, pids, cpu.
    pub dirs: Vec<PathBuf>,
    pub memory_max: u64,
}

fn io_at(p: &Path) -> impl FnOnce(io::Error) -> io::Error + '_ {
    move |e| io::Error::new(e.kind(), format!("{}: {e}", p.display()))
}

fn write(p: &Path, v: &str) -> io::Result<()> {
    fs::write(p, v).map_err(io_at(p))
}

/// Which cgroup version this host runs for the controllers we need, and where its tree is.
///
/// `ip netns exec` mounts a fresh sysfs over /sys, which hides the cgroup mounts beneath it.
/// Then (and only when /sys/fs/cgroup shows nothing) chvkit moves itself into a mount
/// namespace of its own (slave to the one it was in: nothing propagates back) and mounts the
/// hierarchies the kernel already has there again, as `ip netns exec` itself does with sysfs.
///
/// A found tree is remembered for the process: a launch asks about ten times (creating,
/// entering, listing job cgroups), and the answer cannot change under it.
pub fn detect() -> Result<(Version, PathBuf), String> {
    static MOUNTED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    static FOUND: std::sync::OnceLock<Version> = std::sync::OnceLock::new();
    let root = Path::new(CGROUP_ROOT);
    if let Some(v) = FOUND.get() {
        return Ok((*v, root.to_path_buf()));
    }
    let v = match detect_at(root) {
        Ok(v) => v,
        Err(e) => {
            if !hidden_tree() {
                return Err(e);
            }
            MOUNTED.get_or_init(mount_private_tree).clone()?;
            detect_at(root)?
        }
    };
    Ok((*FOUND.get_or_init(|| v), root.to_path_buf()))
}

/// /sys/fs/cgroup is empty while the kernel has cgroup hierarchies: a sysfs mounted over the
/// host's (`ip netns exec`).
fn hidden_tree() -> bool {
    fs::read_dir(CGROUP_ROOT).is_ok_and(|mut d| d.next().is_none())
}

/// Make the cgroup tree visible (see [`detect`]) before a recorded cgroup is used.
fn ensure_tree() {
    let _ = detect();
}

/// `(controller we need, mount options)` for controllers bound to v1 hierarchies (from
/// /proc/cgroups: a non-zero hierarchy id), with the controllers co-mounted with it.
fn v1_hierarchies() -> Vec<(String, String)> {
    let text = fs::read_to_string("/proc/cgroups").unwrap_or_default();
    let rows: Vec<(String, u32)> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 4 && f[3] == "1").then(|| (f[0].to_string(), f[1].parse().unwrap_or(0)))
        })
        .collect();
    V1_CONTROLLERS
        .iter()
        .filter_map(|c| {
            let id = rows.iter().find(|(n, _)| n == c)?.1;
            (id != 0).then(|| {
                let opts: Vec<&str> = rows
                    .iter()
                    .filter(|(_, h)| *h == id)
                    .map(|(n, _)| n.as_str())
                    .collect();
                (c.to_string(), opts.join(","))
            })
        })
        .collect()
}

fn mount_private_tree() -> Result<(), String> {
    use nix::mount::{mount, MsFlags};
    let threads = fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:").map(|v| v.trim().to_string()))
        })
        .unwrap_or_default();
    if threads != "1" {
        return Err(format!(
            "{CGROUP_ROOT} is hidden (a sysfs mounted over it, as by `ip netns exec`) and chvkit cannot remount it from a multi-threaded process"
        ));
    }
    let e = |what: &str, err: nix::errno::Errno| {
        format!("{CGROUP_ROOT} is hidden (a sysfs mounted over it, as by `ip netns exec`); {what}: {err}")
    };
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(|x| e("unshare(CLONE_NEWNS)", x))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .map_err(|x| e("mount --make-rslave /", x))?;
    let v1 = v1_hierarchies();
    if v1.len() == V1_CONTROLLERS.len() {
        mount(
            Some("tmpfs"),
            CGROUP_ROOT,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some("mode=755"),
        )
        .map_err(|x| e("mount tmpfs", x))?;
        for (c, opts) in v1 {
            let d = Path::new(CGROUP_ROOT).join(&c);
            fs::create_dir_all(&d).map_err(|x| format!("{}: {x}", d.display()))?;
            mount(
                Some("cgroup"),
                &d,
                Some("cgroup"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                Some(opts.as_str()),
            )
            .map_err(|x| e(&format!("mount cgroup -o {opts}"), x))?;
        }
    } else {
        mount(
            Some("cgroup2"),
            CGROUP_ROOT,
            Some("cgroup2"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .map_err(|x| e("mount cgroup2", x))?;
    }
    Ok(())
}

fn detect_at(root: &Path) -> Result<Version, String> {
    if let Ok(c) = fs::read_to_string(root.join("cgroup.controllers")) {
        let have: Vec<&str> = c.split_whitespace().collect();
        if ["memory", "pids"].iter().all(|w| have.contains(w)) {
            return Ok(Version::V2);
        }
    }
    let missing: Vec<&str> = V1_CONTROLLERS
        .iter()
        .copied()
        .filter(|c| !root.join(c).join("cgroup.procs").exists())
        .collect();
    if missing.is_empty() {
        return Ok(Version::V1);
    }
    Err(format!(
        "no usable cgroup: {} has neither cgroup v2 with the memory and pids controllers nor the v1 {} controller(s)",
        root.display(),
        missing.join(", ")
    ))
}

impl Cgroup {
    /// Create `<parent>/<name>` with `limits` (removing an empty leftover of that name first).
    pub fn create(name: &str, limits: &Limits) -> io::Result<Cgroup> {
        let (version, root) = detect().map_err(io::Error::other)?;
        let root = root.as_path();
        let dirs: Vec<PathBuf> = match version {
            Version::V2 => vec![root.join(PARENT).join(name)],
            Version::V1 => V1_CONTROLLERS
                .iter()
                .map(|c| root.join(c).join(PARENT).join(name))
                .collect(),
        };
        let cg = Cgroup {
            version,
            dirs,
            memory_max: limits.memory_max,
        };
        for d in &cg.dirs {
            if d.exists() {
                // A leftover of a dead job of this id: only an empty one may be replaced.
                if !procs_of(d)?.is_empty() {
                    return Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!("cgroup {} exists and has processes", d.display()),
                    ));
                }
                rmdir_retry(d)?;
            }
        }
        if version == Version::V2 {
            // Delegate the controllers down to the job's group (no process lives in chvkit/).
            let parent = root.join(PARENT);
            fs::create_dir_all(&parent).map_err(io_at(&parent))?;
            let wanted = enabled_wanted(root);
            write(&root.join("cgroup.subtree_control"), &wanted)?;
            write(&parent.join("cgroup.subtree_control"), &wanted)?;
        }
        let r = (|| {
            for d in &cg.dirs {
                fs::create_dir_all(d).map_err(io_at(d))?;
            }
            cg.apply(limits)
        })();
        if let Err(e) = r {
            let _ = cg.remove();
            return Err(e);
        }
        Ok(cg)
    }

    fn apply(&self, l: &Limits) -> io::Result<()> {
        match self.version {
            Version::V2 => {
                let d = &self.dirs[0];
                write(&d.join("memory.max"), &l.memory_max.to_string())?;
                // Best effort: no swap to escape the limit into (absent without swap support).
                let _ = fs::write(d.join("memory.swap.max"), "0");
                write(&d.join("pids.max"), &l.pids_max.to_string())?;
                if d.join("cpu.weight").exists() {
                    write(&d.join("cpu.weight"), &l.cpu_weight.to_string())?;
                }
            }
            Version::V1 => {
                let mem = &self.dirs[0];
                write(
                    &mem.join("memory.limit_in_bytes"),
                    &l.memory_max.to_string(),
                )?;
                // With swap accounting, memory+swap gets the same limit (no swap escape).
                let memsw = mem.join("memory.memsw.limit_in_bytes");
                if memsw.exists() {
                    write(&memsw, &l.memory_max.to_string())?;
                }
                write(&self.dirs[1].join("pids.max"), &l.pids_max.to_string())?;
                let shares = (u64::from(l.cpu_weight) * 1024 / 100).max(2);
                write(&self.dirs[2].join("cpu.shares"), &shares.to_string())?;
            }
        }
        Ok(())
    }

    /// The file of every directory that moves the writing process, open for writing
    /// (close-on-exec): the VMM's child side writes "0" into each before it executes.
    ///
    /// On v1 that is `tasks`, not `cgroup.procs`: the child is a single thread then, so moving
    /// the thread moves the process, and a `tasks` write of the writer itself skips the
    /// kernel's global threadgroup lock, whose first taking waits for an RCU grace period —
    /// 6–17 ms per launch on these hosts against 0.3 ms (measured; `cargo bench --bench
    /// launch -- jail`). v2 has only `cgroup.procs`.
    pub fn open_procs(&self) -> io::Result<Vec<File>> {
        let file = match self.version {
            Version::V1 => "tasks",
            Version::V2 => "cgroup.procs",
        };
        self.dirs
            .iter()
            .map(|d| {
                let p = d.join(file);
                OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_CLOEXEC)
                    .open(&p)
                    .map_err(io_at(&p))
            })
            .collect()
    }

    /// Move `pid` (a whole process) into the cgroup.
    pub fn add_pid(&self, pid: i32) -> io::Result<()> {
        for d in &self.dirs {
            write(&d.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Processes in the cgroup (its first directory).
    pub fn pids(&self) -> io::Result<Vec<i32>> {
        ensure_tree();
        procs_of(&self.dirs[0])
    }

    fn memory_file(&self, v2: &str, v1: &str) -> io::Result<u64> {
        ensure_tree();
        let p = match self.version {
            Version::V2 => self.dirs[0].join(v2),
            Version::V1 => self.dirs[0].join(v1),
        };
        let t = fs::read_to_string(&p).map_err(io_at(&p))?;
        let t = t.trim();
        if t == "max" {
            return Ok(u64::MAX);
        }
        t.parse().map_err(|e| {
            io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", p.display()))
        })
    }

    /// Memory charged to the job now (bytes).
    pub fn memory_current(&self) -> io::Result<u64> {
        self.memory_file("memory.current", "memory.usage_in_bytes")
    }

    /// The memory limit in force (bytes), read back from the cgroup.
    pub fn memory_limit(&self) -> io::Result<u64> {
        self.memory_file("memory.max", "memory.limit_in_bytes")
    }

    /// Peak memory use, where the kernel keeps it.
    pub fn memory_peak(&self) -> Option<u64> {
        self.memory_file("memory.peak", "memory.max_usage_in_bytes")
            .ok()
    }

    /// Kill whatever is left in it and remove every directory (idempotent).
    pub fn remove(&self) -> io::Result<()> {
        ensure_tree();
        let mut first_err = None;
        for d in &self.dirs {
            if !d.exists() {
                continue;
            }
            for pid in procs_of(d).unwrap_or_default() {
                // SAFETY: plain kill.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            if let Err(e) = rmdir_retry(d) {
                first_err.get_or_insert(e);
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Does any of its directories still exist?
    pub fn exists(&self) -> bool {
        ensure_tree();
        self.dirs.iter().any(|d| d.exists())
    }
}

/// Every job cgroup beneath `chvkit/` (by name, in any hierarchy), with what `remove` needs.
pub fn job_cgroups() -> Vec<(String, Cgroup)> {
    let Ok((version, root)) = detect() else {
        return Vec::new();
    };
    let parents: Vec<PathBuf> = match version {
        Version::V2 => vec![root.join(PARENT)],
        Version::V1 => V1_CONTROLLERS
            .iter()
            .map(|c| root.join(c).join(PARENT))
            .collect(),
    };
    let mut names = std::collections::BTreeSet::new();
    for p in &parents {
        if let Ok(rd) = fs::read_dir(p) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    names.insert(e.file_name().to_string_lossy().into_owned());
                }
            }
        }
    }
    names
        .into_iter()
        .map(|n| {
            let cg = Cgroup {
                version,
                dirs: parents.iter().map(|p| p.join(&n)).collect(),
                memory_max: 0,
            };
            (n, cg)
        })
        .collect()
}

fn enabled_wanted(root: &Path) -> String {
    let avail = fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    ["memory", "pids", "cpu"]
        .iter()
        .filter(|c| avail.split_whitespace().any(|a| a == **c))
        .map(|c| format!("+{c}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn procs_of(d: &Path) -> io::Result<Vec<i32>> {
    let p = d.join("cgroup.procs");
    let mut s = String::new();
    match File::open(&p) {
        Ok(mut f) => {
            f.read_to_string(&mut s).map_err(io_at(&p))?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_at(&p)(e)),
    }
    Ok(s.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// rmdir, retrying while the kernel still counts a just-killed process (EBUSY) for up to 2 s.
fn rmdir_retry(d: &Path) -> io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match fs::remove_dir(d) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                for pid in procs_of(d).unwrap_or_default() {
                    // SAFETY: plain kill.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(io_at(d)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs root and a cgroup hierarchy; skipped loudly otherwise.
    #[test]
    fn create_place_read_remove() {
        if detect().is_err() || !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP create_place_read_remove: no cgroup access");
            return;
        }
        let name = format!("unit-{}", std::process::id());
        let l = Limits {
            memory_max: 96 << 20,
            pids_max: 32,
            cpu_weight: 50,
        };
        let cg = Cgroup::create(&name, &l).unwrap();
        assert_eq!(cg.memory_limit().unwrap(), 96 << 20);
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        cg.add_pid(child.id() as i32).unwrap();
        assert_eq!(cg.pids().unwrap(), vec![child.id() as i32]);
        let text = fs::read_to_string(format!("/proc/{}/cgroup", child.id())).unwrap();
        assert!(text.contains(&format!("/{PARENT}/{name}")), "{text}");
        assert!(cg.memory_current().is_ok());
        cg.remove().unwrap();
        let _ = child.wait();
        assert!(!cg.exists());
        cg.remove().unwrap();
    }
}
