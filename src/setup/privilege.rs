//! Say which privilege is missing before anything is changed.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

pub const CAP_NET_ADMIN: u32 = 12;
pub const CAP_SETFCAP: u32 = 31;

/// Effective capability set of this process (from /proc/self/status).
pub fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

pub fn has_cap(cap: u32) -> bool {
    effective_caps() & (1u64 << cap) != 0
}

/// The nearest existing ancestor of `path` (the directory a create would have to write to).
fn nearest_existing(path: &Path) -> PathBuf {
    let mut p = path.parent().unwrap_or(Path::new("/"));
    loop {
        if p.exists() {
            return p.to_path_buf();
        }
        match p.parent() {
            Some(q) => p = q,
            None => return PathBuf::from("/"),
        }
    }
}

/// Can this process create or replace `path`? It needs write and search access to the
/// directory that would hold the temp file (judged with the effective ids), and every existing
/// ancestor must be a directory. The error says what is in the way.
pub fn can_write(path: &Path) -> Result<(), String> {
    let dir = nearest_existing(path);
    if !dir.is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    let Ok(c) = CString::new(dir.as_os_str().as_bytes()) else {
        return Err(format!("{} contains a NUL byte", dir.display()));
    };
    // SAFETY: c is a valid NUL-terminated path.
    let rc = unsafe {
        libc::faccessat(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::W_OK | libc::X_OK,
            libc::AT_EACCESS,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!(
            "no write access to {} ({})",
            dir.display(),
            std::io::Error::last_os_error()
        ))
    }
}

pub fn uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}
