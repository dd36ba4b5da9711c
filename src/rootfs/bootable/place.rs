//! Moving the packed ext4 image up to its partition's offset, inside the same file.
//!
//! `fallocate(FALLOC_FL_INSERT_RANGE)` inserts a hole at the start and shifts the file's
//! extents: no data is read or written (ext4 and XFS have it). Elsewhere (tmpfs, btrfs, NFS)
//! the data extents are copied backwards in place — like `memmove` to a higher address, the
//! last chunk first, so nothing is overwritten before it was read — and what the shift left
//! behind below and between them is punched out or zeroed.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

/// How the image was moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    InsertRange,
    Copy,
}

impl Placement {
    pub fn as_str(self) -> &'static str {
        match self {
            Placement::InsertRange => "insert_range",
            Placement::Copy => "copy",
        }
    }
}

/// Shift the whole content of `f` up by `by` bytes (a multiple of 4096); the first `by`
/// bytes read as zeros afterwards.
pub fn shift_up(f: &File, by: u64) -> io::Result<Placement> {
    if by == 0 {
        return Ok(Placement::InsertRange);
    }
    let len = f.metadata()?.len();
    if len == 0 {
        f.set_len(by)?;
        return Ok(Placement::InsertRange);
    }
    let off = i64::try_from(by).map_err(io::Error::other)?;
    // SAFETY: fallocate on an fd we own; no memory is passed.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), libc::FALLOC_FL_INSERT_RANGE, 0, off) };
    if r == 0 {
        return Ok(Placement::InsertRange);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) | Some(libc::ENOSYS) => {
            tracing::debug!("FALLOC_FL_INSERT_RANGE unavailable ({e}): copying in place");
            shift_by_copy(f, by)?;
            Ok(Placement::Copy)
        }
        _ => Err(e),
    }
}

/// Data extents of `f` within `0..len`, as (start, end).
fn data_extents(f: &File, len: u64) -> io::Result<Vec<(u64, u64)>> {
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    let end = i64::try_from(len).map_err(io::Error::other)?;
    while pos < end {
        // SAFETY: lseek on an fd we own.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            // No SEEK_DATA: treat the whole file as data.
            return Ok(vec![(0, len)]);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let hole = hole.min(end);
        out.push((data as u64, hole as u64));
        pos = hole;
    }
    Ok(out)
}

/// The copying fallback of [`shift_up`] (also used directly by tests).
pub fn shift_by_copy(f: &File, by: u64) -> io::Result<()> {
    const CHUNK: u64 = 8 << 20;
    let len = f.metadata()?.len();
    let old = data_extents(f, len)?;
    f.set_len(len + by)?;
    let mut buf = vec![0u8; CHUNK as usize];
    for &(s, e) in old.iter().rev() {
        let mut end = e;
        while end > s {
            crate::rootfs::proc::check()?;
            let start = end.saturating_sub(CHUNK).max(s);
            let n = (end - start) as usize;
            f.read_exact_at(&mut buf[..n], start)?;
            f.write_all_at(&buf[..n], start + by)?;
            end = start;
        }
    }
    // What must read as zeros now: every old data byte no new extent covers.
    let new: Vec<(u64, u64)> = old.iter().map(|&(s, e)| (s + by, e + by)).collect();
    for &(s, e) in &old {
        let mut at = s;
        for &(ns, ne) in new.iter().filter(|&&(ns, ne)| ne > s && ns < e) {
            if ns > at {
                zero(f, at, ns.min(e))?;
            }
            at = at.max(ne);
        }
        if at < e {
            zero(f, at, e)?;
        }
    }
    Ok(())
}

/// Make `start..end` read as zeros: punch a hole, else write zeros.
fn zero(f: &File, start: u64, end: u64) -> io::Result<()> {
    if end <= start {
        return Ok(());
    }
    let (s, l) = (
        i64::try_from(start).map_err(io::Error::other)?,
        i64::try_from(end - start).map_err(io::Error::other)?,
    );
    // SAFETY: fallocate on an fd we own.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            s,
            l,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let zeros = vec![0u8; (end - start).min(1 << 20) as usize];
    let mut at = start;
    while at < end {
        let n = ((end - at) as usize).min(zeros.len());
        f.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}
