//! The child side of the jail: what the VMM's child process does between clone and execve.
//! Everything here runs in a `CLONE_VM | CLONE_VFORK` child (the parent's memory, the parent
//! suspended), so it is raw system calls only — no allocation, no locks, and no glibc
//! set*id wrappers (those signal every thread of the *parent*, whose thread list the child
//! shares through CLONE_VM).

use std::os::fd::RawFd;

/// Most cgroup files a job has: v2 has one, v1 one per controller (memory, pids, cpu).
pub const MAX_CGROUP_FDS: usize = 3;

/// What the child needs, computed by the parent before the clone. `Copy`, no pointers.
#[derive(Debug, Clone, Copy)]
pub struct ChildJail {
    pub uid: u32,
    pub gid: u32,
    /// The supplementary group: the group owning /dev/kvm.
    pub kvm_gid: u32,
    /// Open (write) `tasks` (v1) or `cgroup.procs` (v2) files of the job's cgroup(s); -1 for
    /// unused slots. Writing "0" moves the writing (single-threaded) process.
    pub cgroup_procs: [RawFd; MAX_CGROUP_FDS],
    /// Highest capability number (/proc/sys/kernel/cap_last_cap), read by the parent.
    pub cap_last: u32,
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Enter the jail: into the cgroup, every bounding and ambient capability dropped, the job's
/// gid, groups and uid, no capabilities left in any set, `PR_SET_NO_NEW_PRIVS`, and the
/// parent-death signal set again (a uid change clears it). Returns the errno of the failed step.
///
/// # Safety
/// Only async-signal-safe system calls; may be called in a vfork-style child.
pub unsafe fn enter(j: &ChildJail, death_signal: libc::c_int) -> Result<(), libc::c_int> {
    let err = || *libc::__errno_location();
    // Into the job's cgroup while still root (the cgroup files are root's).
    for fd in j.cgroup_procs {
        if fd >= 0 && libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
            return Err(err());
        }
    }
    // The bounding set needs CAP_SETPCAP: drop it first, while still root.
    let mut cap = 0;
    while cap <= j.cap_last {
        if libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) != 0
            && err() != libc::EINVAL
        {
            return Err(err());
        }
        cap += 1;
    }
    if libc::prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
        0,
        0,
        0,
    ) != 0
    {
        return Err(err());
    }
    let groups: [libc::gid_t; 1] = [j.kvm_gid];
    if libc::syscall(libc::SYS_setgroups, 1 as libc::c_long, groups.as_ptr()) != 0 {
        return Err(err());
    }
    if libc::syscall(libc::SYS_setresgid, j.gid, j.gid, j.gid) != 0 {
        return Err(err());
    }
    // All three uids non-zero: the kernel clears the permitted, effective and ambient sets.
    if libc::syscall(libc::SYS_setresuid, j.uid, j.uid, j.uid) != 0 {
        return Err(err());
    }
    // The inheritable set survives a uid change: clear it (and the rest, to be explicit).
    let mut hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    if libc::syscall(libc::SYS_capset, &mut hdr as *mut CapHeader, data.as_ptr()) != 0 {
        return Err(err());
    }
    if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
        return Err(err());
    }
    // Changing the effective uid cleared the parent-death signal.
    if libc::prctl(
        libc::PR_SET_PDEATHSIG,
        death_signal as libc::c_ulong,
        0,
        0,
        0,
    ) != 0
    {
        return Err(err());
    }
    Ok(())
}
