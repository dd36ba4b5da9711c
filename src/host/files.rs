//! Files on the host: existence and mode, streaming sha256, a binary's `--version`, and what
//! kind of guest kernel image a file is.

use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FileFacts {
    pub exists: bool,
    pub is_file: bool,
    /// Permission bits.
    pub mode: Option<u32>,
    pub size: Option<u64>,
    pub uid: Option<u32>,
}

impl FileFacts {
    /// `stat` following symlinks; a dangling link reads as absent.
    pub fn stat(path: &Path) -> FileFacts {
        match std::fs::metadata(path) {
            Ok(md) => FileFacts {
                exists: true,
                is_file: md.is_file(),
                mode: Some(md.permissions().mode() & 0o7777),
                size: Some(md.len()),
                uid: Some(md.uid()),
            },
            Err(_) => FileFacts::default(),
        }
    }

    pub fn executable(&self) -> bool {
        self.is_file && self.mode.is_some_and(|m| m & 0o111 != 0)
    }
}

/// sha256 of a file as lowercase hex, streamed (constant memory).
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

#[derive(Debug, thiserror::Error)]
pub enum VersionError {
    #[error("cannot run `{path} --version`: {source}")]
    Spawn {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{path} --version` did not finish within {secs} s (killed)")]
    Timeout { path: String, secs: u64 },
    #[error("`{path} --version` exited with {status}: {stderr}")]
    Failed {
        path: String,
        status: String,
        stderr: String,
    },
}

/// Run `<path> --version` and return its first non-empty output line. The child is killed if
/// it has not finished within `timeout`.
pub fn binary_version(path: &Path, timeout: Duration) -> Result<String, VersionError> {
    let shown = path.display().to_string();
    super::count_child();
    let child = std::process::Command::new(path)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|source| VersionError::Spawn {
            path: shown.clone(),
            source,
        })?;
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(timeout) {
        Ok(r) => r.map_err(|source| VersionError::Spawn {
            path: shown.clone(),
            source,
        })?,
        Err(_) => {
            if let Ok(p) = i32::try_from(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            return Err(VersionError::Timeout {
                path: shown,
                secs: timeout.as_secs(),
            });
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(VersionError::Failed {
            path: shown,
            status: out.status.to_string(),
            stderr: stderr.trim().to_string(),
        });
    }
    Ok(stdout
        .lines()
        .chain(stderr.lines())
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("")
        .to_string())
}

/// What a guest kernel file is, as Cloud Hypervisor's direct kernel boot sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum KernelImage {
    /// x86 boot protocol image (`HdrS` at 0x202), e.g. `/boot/vmlinuz-*`.
    BzImage {
        /// The version string the header points to, e.g. `6.1.0-28-cloud-amd64 (...) #1 SMP ...`.
        version: Option<String>,
    },
    /// ELF with a Xen PVH entry note: bootable by Cloud Hypervisor as a vmlinux.
    ElfPvh,
    /// ELF without the PVH note: Cloud Hypervisor cannot boot it.
    ElfNoPvh,
    /// ELF of a class or byte order this reader does not handle (32-bit, big-endian).
    ElfUnsupported,
    /// Neither.
    Unknown,
}

/// `XEN_ELFNOTE_PHYS32_ENTRY`: the PVH entry point note, name "Xen".
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
const PT_NOTE: u32 = 4;

/// Identify a kernel image by reading only its headers.
pub fn sniff_kernel(path: &Path) -> std::io::Result<KernelImage> {
    let f = std::fs::File::open(path)?;
    sniff_kernel_at(&|buf: &mut [u8], off: u64| read_full_at(&f, buf, off))
}

/// Read as much of `buf` as the file has at `off`; returns bytes read.
fn read_full_at(f: &std::fs::File, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

type ReadAt<'a> = dyn Fn(&mut [u8], u64) -> std::io::Result<usize> + 'a;

/// [`sniff_kernel`] over any positional reader (tests feed byte slices).
pub fn sniff_kernel_at(read_at: &ReadAt<'_>) -> std::io::Result<KernelImage> {
    let mut head = [0u8; 0x210];
    let n = read_at(&mut head, 0)?;
    if n >= 4 && head[..4] == *b"\x7fELF" {
        return sniff_elf(read_at, &head[..n]);
    }
    if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        let mut version = None;
        if n >= 0x210 {
            let ptr = u16::from_le_bytes([head[0x20e], head[0x20f]]);
            if ptr != 0 {
                let mut s = [0u8; 128];
                let m = read_at(&mut s, u64::from(ptr) + 0x200)?;
                let end = s[..m].iter().position(|b| *b == 0).unwrap_or(m);
                let text = String::from_utf8_lossy(&s[..end]).trim().to_string();
                if !text.is_empty() {
                    version = Some(text);
                }
            }
        }
        return Ok(KernelImage::BzImage { version });
    }
    Ok(KernelImage::Unknown)
}

fn sniff_elf(read_at: &ReadAt<'_>, head: &[u8]) -> std::io::Result<KernelImage> {
    // EI_CLASS 2 = 64-bit, EI_DATA 1 = little endian (x86_64).
    if head.len() < 64 || head[4] != 2 || head[5] != 1 {
        return Ok(KernelImage::ElfUnsupported);
    }
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let u64_at = |b: &[u8], o: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[o..o + 8]);
        u64::from_le_bytes(a)
    };
    let phoff = u64_at(head, 0x20);
    let phentsize = usize::from(u16_at(head, 0x36));
    let phnum = usize::from(u16_at(head, 0x38));
    if phentsize < 56 || phnum == 0 || phnum > 4096 {
        return Ok(KernelImage::ElfNoPvh);
    }
    let mut ph = vec![0u8; phentsize * phnum];
    if read_at(&mut ph, phoff)? < ph.len() {
        return Ok(KernelImage::ElfNoPvh);
    }
    for i in 0..phnum {
        let e = &ph[i * phentsize..(i + 1) * phentsize];
        if u32_at(e, 0) != PT_NOTE {
            continue;
        }
        let off = u64_at(e, 0x08);
        let size = u64_at(e, 0x20);
        // Notes are small; a huge PT_NOTE is malformed and not worth reading.
        let Ok(size) = usize::try_from(size.min(1 << 20)) else {
            continue;
        };
        let mut notes = vec![0u8; size];
        let got = read_at(&mut notes, off)?;
        if has_xen_pvh_note(&notes[..got]) {
            return Ok(KernelImage::ElfPvh);
        }
    }
    Ok(KernelImage::ElfNoPvh)
}

/// Walk ELF notes (`namesz`, `descsz`, `type`, name, desc; 4-byte aligned).
pub fn has_xen_pvh_note(mut b: &[u8]) -> bool {
    let align = |n: usize| (n + 3) & !3;
    while b.len() >= 12 {
        let namesz = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
        let descsz = u32::from_le_bytes([b[4], b[5], b[6], b[7]]) as usize;
        let ty = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        let name_end = 12 + namesz;
        if name_end > b.len() {
            return false;
        }
        let name = &b[12..name_end];
        let name = name.strip_suffix(&[0]).unwrap_or(name);
        if ty == XEN_ELFNOTE_PHYS32_ENTRY && name == b"Xen" {
            return true;
        }
        let next = align(name_end) + align(descsz);
        if next > b.len() || next == 0 {
            return false;
        }
        b = &b[next..];
    }
    false
}

/// The size an ELF64 little-endian file's headers say it has at least: the end of its section
/// header table and of every segment's bytes in the file. Reads the headers only.
pub fn elf_implied_size(path: &Path) -> Option<u64> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).ok()?;
    let mut h = [0u8; 64];
    f.read_exact_at(&mut h, 0).ok()?;
    if h[..4] != *b"\x7fELF" || h[4] != 2 || h[5] != 1 {
        return None;
    }
    let u16_at = |b: &[u8], o: usize| u64::from(u16::from_le_bytes([b[o], b[o + 1]]));
    let u64_at = |b: &[u8], o: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[o..o + 8]);
        u64::from_le_bytes(a)
    };
    let (phoff, shoff) = (u64_at(&h, 0x20), u64_at(&h, 0x28));
    let (phentsize, phnum) = (u16_at(&h, 0x36), u16_at(&h, 0x38));
    let (shentsize, shnum) = (u16_at(&h, 0x3a), u16_at(&h, 0x3c));
    let mut end = 64u64;
    if shnum > 0 {
        end = end.max(shoff.saturating_add(shentsize * shnum));
    }
    if phnum > 0 {
        end = end.max(phoff.saturating_add(phentsize * phnum));
    }
    if phentsize >= 56 && phnum > 0 && phnum <= 4096 {
        let mut ph = vec![0u8; usize::try_from(phentsize * phnum).ok()?];
        if f.read_exact_at(&mut ph, phoff).is_ok() {
            for e in ph.chunks_exact(usize::try_from(phentsize).ok()?) {
                let (off, filesz) = (u64_at(e, 0x08), u64_at(e, 0x20));
                if filesz > 0 {
                    end = end.max(off.saturating_add(filesz));
                }
            }
        }
    }
    Some(end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{elf_note as note, elf_with_notes};

    fn sniff(bytes: &[u8]) -> KernelImage {
        sniff_kernel_at(&|buf: &mut [u8], off: u64| {
            let off = off as usize;
            if off >= bytes.len() {
                return Ok(0);
            }
            let n = buf.len().min(bytes.len() - off);
            buf[..n].copy_from_slice(&bytes[off..off + n]);
            Ok(n)
        })
        .unwrap()
    }

    #[test]
    fn bzimage_with_version() {
        let mut b = vec![0u8; 0x400];
        b[0x202..0x206].copy_from_slice(b"HdrS");
        b[0x20e..0x210].copy_from_slice(&0x100u16.to_le_bytes());
        b[0x300..0x309].copy_from_slice(b"6.1.0-28\0");
        assert_eq!(
            sniff(&b),
            KernelImage::BzImage {
                version: Some("6.1.0-28".into())
            }
        );
    }

    #[test]
    fn elf_pvh_and_not() {
        let mut notes = note(b"GNU\0", 3, &[1, 2, 3, 4]);
        notes.extend(note(
            b"Xen\0",
            XEN_ELFNOTE_PHYS32_ENTRY,
            &0x100_0000u32.to_le_bytes(),
        ));
        assert_eq!(sniff(&elf_with_notes(&notes)), KernelImage::ElfPvh);
        let other = note(b"Xen\0", 5, b"xen-3.0\0");
        assert_eq!(sniff(&elf_with_notes(&other)), KernelImage::ElfNoPvh);
        let mut e32 = elf_with_notes(&notes);
        e32[4] = 1;
        assert_eq!(sniff(&e32), KernelImage::ElfUnsupported);
    }

    #[test]
    fn junk_is_unknown() {
        assert_eq!(sniff(b"hello"), KernelImage::Unknown);
        assert_eq!(sniff(b""), KernelImage::Unknown);
        // Truncated note headers do not panic.
        assert!(!has_xen_pvh_note(&[
            4, 0, 0, 0, 0, 0, 0, 0, 18, 0, 0, 0, b'X'
        ]));
    }

    #[test]
    fn sha_and_stat() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(
            sha256_file(&p).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let f = FileFacts::stat(&p);
        assert!(f.exists && f.is_file && !f.executable());
        assert!(!FileFacts::stat(&d.path().join("nope")).exists);
    }

    #[test]
    fn version_of_a_script() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("fake-chv");
        std::fs::write(&p, "#!/bin/sh\necho 'cloud-hypervisor v50.0'\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        let v = binary_version(&p, Duration::from_secs(5)).unwrap();
        assert_eq!(v, "cloud-hypervisor v50.0");
        let hang = d.path().join("hang");
        std::fs::write(&hang, "#!/bin/sh\nexec sleep 30\n").unwrap();
        std::fs::set_permissions(&hang, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(matches!(
            binary_version(&hang, Duration::from_millis(200)),
            Err(VersionError::Timeout { .. })
        ));
    }

    #[test]
    fn implied_size_finds_truncation() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k");
        // ELF header + one PT_LOAD of 1000 bytes at offset 4096.
        let mut f = crate::testutil::elf64_header(1);
        f[64..68].copy_from_slice(&1u32.to_le_bytes());
        f[64 + 8..64 + 16].copy_from_slice(&4096u64.to_le_bytes());
        f[64 + 32..64 + 40].copy_from_slice(&1000u64.to_le_bytes());
        std::fs::write(&p, &f).unwrap();
        assert_eq!(elf_implied_size(&p), Some(5096));
        std::fs::write(
            &p,
            b"not an elf at all, not at all, not at all, not at all, no",
        )
        .unwrap();
        assert_eq!(elf_implied_size(&p), None);
    }
}
