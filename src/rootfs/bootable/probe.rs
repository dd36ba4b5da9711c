//! What a firmware would boot from a disk: GPT → the first EFI System Partition → its FAT →
//! the Boot Loader Specification entry `/loader/loader.conf` picks (rust-hypervisor-firmware's
//! `loader.rs`), and whether `\EFI\BOOT\BOOTX64.EFI` exists (its fallback, and what UEFI runs).
//! Read-only, through a read callback, so it works on raw and qcow2 disks alike.

use std::io::{self, Read, Seek, SeekFrom, Write};

use super::gpt::{read_partitions, GptPartition};
use super::{BOOTX64_PATH, ENTRIES_DIR, LOADER_CONF, MAX_CONF_BYTES};

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("has no GPT header (no \"EFI PART\" signature at LBA 1, 512-byte sectors)")]
    NoGpt,
    #[error("has a GPT but no EFI System Partition")]
    NoEsp,
    #[error("has an EFI System Partition at LBA {0} that is not a FAT filesystem: {1}")]
    NotFat(u64, String),
    #[error(
        "has an EFI System Partition whose FAT holds neither a boot entry \
         (/loader/entries/*.conf with a `linux` line naming an existing file) nor \
         /EFI/BOOT/BOOTX64.EFI{0}"
    )]
    NothingToBoot(String),
    #[error("{0}")]
    BadGpt(String),
    #[error("cannot read it: {0}")]
    Io(#[from] io::Error),
}

/// A Boot Loader Specification entry as rust-hypervisor-firmware reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootEntry {
    /// File name in `/loader/entries`.
    pub file: String,
    pub linux: String,
    pub initrd: Option<String>,
    pub options: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EspProbe {
    pub esp: GptPartition,
    /// `default` of loader.conf, if any.
    pub default_pattern: Option<String>,
    pub entry: Option<BootEntry>,
    pub bootx64: bool,
}

/// The partition as a read-only byte device for `fatfs`.
struct PartDev<'a> {
    read_at: &'a mut dyn FnMut(&mut [u8], u64) -> io::Result<()>,
    base: u64,
    len: u64,
    pos: u64,
}

impl Read for PartDev<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (buf.len() as u64).min(self.len.saturating_sub(self.pos)) as usize;
        (self.read_at)(&mut buf[..n], self.base + self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Write for PartDev<'_> {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the ESP is read-only here",
        ))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Seek for PartDev<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.pos = super::seek_to(self.pos, self.len, to);
        Ok(self.pos)
    }
}

/// The firmware's glob (`loader.rs::compare_entry`): `*`, `?`, `\` escapes; no `[...]`.
pub fn glob_match(name: &[u8], pat: &[u8]) -> bool {
    match pat.split_first() {
        None => name.is_empty(),
        Some((b'*', rest)) => (0..=name.len()).any(|i| glob_match(&name[i..], rest)),
        Some((b'?', rest)) => !name.is_empty() && glob_match(&name[1..], rest),
        Some((b'\\', rest)) => match rest.split_first() {
            Some((c, rest)) => name.first() == Some(c) && glob_match(&name[1..], rest),
            None => false,
        },
        Some((c, rest)) => name.first() == Some(c) && glob_match(&name[1..], rest),
    }
}

/// Values of the lines starting with `key` (the firmware strips the prefix and trims; the
/// last such line wins).
fn value_of(text: &str, key: &str) -> Option<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix(key))
        .map(|v| v.trim().to_string())
        .next_back()
}

/// Look at a disk the way a firmware would. Errors say what is missing.
pub fn probe(
    read_at: &mut dyn FnMut(&mut [u8], u64) -> io::Result<()>,
) -> Result<EspProbe, ProbeError> {
    let parts = match read_partitions(read_at) {
        Ok(Some(p)) => p,
        Ok(None) => return Err(ProbeError::NoGpt),
        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
            return Err(ProbeError::BadGpt(e.to_string()))
        }
        Err(e) => return Err(e.into()),
    };
    let esp = parts
        .iter()
        .find(|p| p.is_esp())
        .cloned()
        .ok_or(ProbeError::NoEsp)?;
    let dev = PartDev {
        read_at,
        base: esp.offset(),
        len: esp.len(),
        pos: 0,
    };
    let fs = fatfs::FileSystem::new(dev, fatfs::FsOptions::new())
        .map_err(|e| ProbeError::NotFat(esp.first_lba, e.to_string()))?;
    let root = fs.root_dir();
    let read_small = |path: &str| -> Option<String> {
        let mut f = root.open_file(path.trim_start_matches('/')).ok()?;
        let mut b = Vec::new();
        f.read_to_end(&mut b).ok()?;
        (b.len() <= MAX_CONF_BYTES).then(|| String::from_utf8_lossy(&b).into_owned())
    };
    let exists = |path: &str| {
        let p = path.trim_start_matches(['/', '\\']).replace('\\', "/");
        root.open_file(&p).is_ok()
    };
    let default_pattern = read_small(LOADER_CONF).and_then(|c| value_of(&c, "default"));
    // The entry: the first whose name matches the pattern, else the first `*.conf`.
    let mut names: Vec<String> = Vec::new();
    if let Ok(d) = root.open_dir(ENTRIES_DIR.trim_start_matches('/')) {
        for e in d.iter().flatten() {
            if e.is_file() {
                names.push(e.file_name());
            }
        }
    }
    let chosen = default_pattern
        .as_ref()
        .and_then(|p| {
            names
                .iter()
                .find(|n| glob_match(n.as_bytes(), p.as_bytes()))
        })
        .or_else(|| names.iter().find(|n| glob_match(n.as_bytes(), b"*.conf")));
    let mut why = String::new();
    let entry = match chosen {
        None => None,
        Some(file) => match read_small(&format!("{ENTRIES_DIR}/{file}")) {
            None => {
                why = format!(" ({ENTRIES_DIR}/{file} is larger than {MAX_CONF_BYTES} bytes)");
                None
            }
            Some(text) => {
                let linux = value_of(&text, "linux").unwrap_or_default();
                if !linux.is_empty() && exists(&linux) {
                    Some(BootEntry {
                        file: file.clone(),
                        linux,
                        initrd: value_of(&text, "initrd").filter(|s| !s.is_empty()),
                        options: value_of(&text, "options").unwrap_or_default(),
                    })
                } else {
                    why = format!(" ({ENTRIES_DIR}/{file} names `linux {linux}`, not on the ESP)");
                    None
                }
            }
        },
    };
    let bootx64 = exists(BOOTX64_PATH);
    if entry.is_none() && !bootx64 {
        return Err(ProbeError::NothingToBoot(why));
    }
    Ok(EspProbe {
        esp,
        default_pattern,
        entry,
        bootx64,
    })
}
