//! A reproducible cpio "newc" writer, the format the kernel unpacks an initramfs from.
//!
//! Hand-written: the format is a 110-byte ASCII header, the name and the data, each padded to
//! 4 bytes. The `cpio` crate (0.4.2, checked with `cargo info`) has a newc builder, but every
//! field that makes an archive reproducible (inode numbers, mtime, owner, nlink) would still be
//! set by hand here, so it would save almost nothing and add a dependency.

use std::io::{self, Write};

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// One archive member. `path` is relative to the archive root (`bin/busybox`); a leading `/`
/// is dropped. Parents must come before their children.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub path: String,
    /// Permission bits (the file type comes from `kind`).
    pub mode: u32,
    pub kind: EntryKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    File(Vec<u8>),
    Symlink(String),
    CharDev { major: u32, minor: u32 },
}

impl Entry {
    pub fn dir(path: &str, mode: u32) -> Entry {
        Entry::new(path, mode, EntryKind::Dir)
    }
    pub fn file(path: &str, mode: u32, data: Vec<u8>) -> Entry {
        Entry::new(path, mode, EntryKind::File(data))
    }
    pub fn symlink(path: &str, target: &str) -> Entry {
        Entry::new(path, 0o777, EntryKind::Symlink(target.to_string()))
    }
    pub fn char_dev(path: &str, mode: u32, major: u32, minor: u32) -> Entry {
        Entry::new(path, mode, EntryKind::CharDev { major, minor })
    }
    fn new(path: &str, mode: u32, kind: EntryKind) -> Entry {
        Entry {
            path: path.trim_start_matches('/').to_string(),
            mode: mode & 0o7777,
            kind,
        }
    }
}

/// Write `entries` in order as a newc archive: inode numbers 1, 2, … in order, owner 0:0, every
/// mtime `mtime` (clamped to the format's 32 bits), then the `TRAILER!!!` record. Same input,
/// same bytes.
pub fn write_cpio_newc(entries: &[Entry], mtime: u64, out: &mut impl Write) -> io::Result<()> {
    let mtime = u32::try_from(mtime).unwrap_or(u32::MAX);
    for (i, e) in entries.iter().enumerate() {
        if e.path.is_empty() || e.path.contains('\0') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cpio member name {:?} is empty or holds a NUL", e.path),
            ));
        }
        let ino = u32::try_from(i + 1).map_err(io::Error::other)?;
        let (ty, data, rdev): (u32, &[u8], (u32, u32)) = match &e.kind {
            EntryKind::Dir => (S_IFDIR, &[], (0, 0)),
            EntryKind::File(d) => (S_IFREG, d, (0, 0)),
            EntryKind::Symlink(t) => (S_IFLNK, t.as_bytes(), (0, 0)),
            EntryKind::CharDev { major, minor } => (S_IFCHR, &[], (*major, *minor)),
        };
        // nlink 1 for files: the kernel treats a regular file with nlink ≥ 2 as a hard link
        // to an earlier member with the same inode number.
        let nlink = if ty == S_IFDIR { 2 } else { 1 };
        let h = Header {
            ino,
            mode: ty | e.mode,
            nlink,
            mtime,
            size: data.len(),
            rdev,
        };
        h.write(e.path.as_bytes(), out)?;
        out.write_all(data)?;
        pad(data.len(), out)?;
    }
    let trailer = Header {
        ino: 0,
        mode: 0,
        nlink: 1,
        mtime: 0,
        size: 0,
        rdev: (0, 0),
    };
    trailer.write(b"TRAILER!!!", out)
}

struct Header {
    ino: u32,
    mode: u32,
    nlink: u32,
    mtime: u32,
    size: usize,
    rdev: (u32, u32),
}

impl Header {
    fn write(&self, name: &[u8], out: &mut impl Write) -> io::Result<()> {
        let size = u32::try_from(self.size).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "cpio newc members are at most 4 GiB",
            )
        })?;
        // magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor,
        // rdevminor, namesize (with the NUL), check.
        let fields = [
            self.ino,
            self.mode,
            0,
            0,
            self.nlink,
            self.mtime,
            size,
            0,
            0,
            self.rdev.0,
            self.rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        let mut h = String::with_capacity(110);
        h.push_str("070701");
        for f in fields {
            h.push_str(&format!("{f:08x}"));
        }
        out.write_all(h.as_bytes())?;
        out.write_all(name)?;
        out.write_all(&[0])?;
        pad(110 + name.len() + 1, out)
    }
}

fn pad(len: usize, out: &mut impl Write) -> io::Result<()> {
    out.write_all(&[0u8; 3][..(4 - len % 4) % 4])
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// One member as read back: (name, mode, data, rdev, ino, mtime).
    pub type Member = (String, u32, Vec<u8>, (u32, u32), u32, u32);

    /// A minimal newc reader, the test's own, independent of the writer.
    pub fn read_newc(mut b: &[u8]) -> Vec<Member> {
        let mut out = Vec::new();
        let field = |h: &[u8], i: usize| {
            u32::from_str_radix(std::str::from_utf8(&h[6 + i * 8..14 + i * 8]).unwrap(), 16)
                .unwrap()
        };
        let up4 = |n: usize| (n + 3) & !3;
        loop {
            assert_eq!(&b[..6], b"070701", "bad magic");
            let h = &b[..110];
            let namesize = field(h, 11) as usize;
            let size = field(h, 6) as usize;
            let name = std::str::from_utf8(&b[110..110 + namesize - 1])
                .unwrap()
                .to_string();
            assert_eq!(b[110 + namesize - 1], 0);
            let data_at = up4(110 + namesize);
            let data = b[data_at..data_at + size].to_vec();
            assert_eq!((field(h, 2), field(h, 3)), (0, 0), "uid/gid");
            let m = (
                name,
                field(h, 1),
                data,
                (field(h, 9), field(h, 10)),
                field(h, 0),
                field(h, 5),
            );
            b = &b[up4(data_at + size)..];
            if m.0 == "TRAILER!!!" {
                assert!(b.is_empty(), "bytes after the trailer");
                return out;
            }
            out.push(m);
        }
    }

    fn sample() -> Vec<Entry> {
        vec![
            Entry::dir("/dev", 0o755),
            Entry::char_dev("dev/console", 0o600, 5, 1),
            Entry::dir("bin", 0o755),
            Entry::file("bin/busybox", 0o755, b"ELF...".to_vec()),
            Entry::symlink("bin/sh", "busybox"),
            Entry::file("init", 0o755, b"#!/bin/sh\n".to_vec()),
            Entry::file("empty", 0o644, vec![]),
        ]
    }

    #[test]
    fn parses_back() {
        let mut v = Vec::new();
        write_cpio_newc(&sample(), 1_700_000_000, &mut v).unwrap();
        assert_eq!(v.len() % 4, 0);
        let m = read_newc(&v);
        let names: Vec<&str> = m.iter().map(|x| x.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "dev",
                "dev/console",
                "bin",
                "bin/busybox",
                "bin/sh",
                "init",
                "empty"
            ]
        );
        assert_eq!(m[0].1, 0o040_755);
        assert_eq!((m[1].1, m[1].3), (0o020_600, (5, 1)));
        assert_eq!((m[3].1, m[3].2.as_slice()), (0o100_755, &b"ELF..."[..]));
        assert_eq!((m[4].1, m[4].2.as_slice()), (0o120_777, &b"busybox"[..]));
        assert!(m.iter().enumerate().all(|(i, x)| x.4 == i as u32 + 1));
        assert!(m.iter().all(|x| x.5 == 1_700_000_000));
    }

    #[test]
    fn reproducible_and_cpio_tool_agrees() {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        write_cpio_newc(&sample(), 0, &mut a).unwrap();
        write_cpio_newc(&sample(), 0, &mut b).unwrap();
        assert!(a == b);
        let mut c = Vec::new();
        write_cpio_newc(&sample(), 1, &mut c).unwrap();
        assert!(a != c, "mtime is in the bytes");
        let Ok(mut child) = std::process::Command::new("cpio")
            .args(["-it", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
        else {
            crate::testutil::skip("reproducible_and_cpio_tool_agrees", "cpio not installed");
            return;
        };
        child.stdin.take().unwrap().write_all(&a).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "dev\ndev/console\nbin\nbin/busybox\nbin/sh\ninit\nempty\n"
        );
    }

    #[test]
    fn bad_names_refused() {
        let mut v = Vec::new();
        assert!(write_cpio_newc(&[Entry::dir("/", 0o755)], 0, &mut v).is_err());
        assert!(write_cpio_newc(&[Entry::dir("a\0b", 0o755)], 0, &mut v).is_err());
    }
}
