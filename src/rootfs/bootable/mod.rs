//! `chvkit rootfs --bootable`: the root filesystem inside a GPT disk whose EFI System Partition
//! carries the kernel, so a firmware boots the image without a kernel on the host.
//!
//! The disk (512-byte sectors):
//!
//! | LBA | what |
//! |---|---|
//! | 0 | protective MBR |
//! | 1, 2–33 | primary GPT header and its 128 entries |
//! | 2048 (1 MiB) | partition 1: EFI System Partition, FAT (kernel, initramfs, BLS entry, systemd-boot) |
//! | after the ESP, 1 MiB aligned | partition 2: the ext4 root filesystem `rootfs` builds (type "Linux root (x86-64)") |
//! | last 33 | backup entries and header |
//!
//! rust-hypervisor-firmware (`src/part.rs`, `src/fat.rs`, `src/loader.rs` of 0.5.0) finds the
//! first partition of type C12A7328-F81F-11D2-BA4B-00A0C93EC93B, reads `/loader/loader.conf`
//! (≤ 4096 bytes), takes the `default` value as a glob over the file names in
//! `/loader/entries`, reads that entry (≤ 4096 bytes) and boots its `linux` bzImage with its
//! `initrd` and `options` (paths ≤ 260 bytes; names matched against the FAT long name exactly,
//! or case-insensitively against the 8.3 name). Failing that it runs `\EFI\BOOT\BOOTX64.EFI`,
//! which is also what UEFI firmware (OVMF, CLOUDHV.fd) runs: systemd-boot, reading the same
//! entry. `default` names the entry file in full (`chvkit.conf`) because the firmware matches
//! the pattern against the whole file name, `.conf` included.
//!
//! Everything is written with plain file I/O (the `gpt` and `fatfs` crates on in-memory
//! buffers, then `pwrite`): no root, loop device or mount. The ext4 image is packed at offset
//! 0 of the output's temp file as usual and then moved up by the partition offset with
//! `FALLOC_FL_INSERT_RANGE` (metadata only, no data copied) where the filesystem supports it,
//! else by an in-place backwards copy (`place.rs`).

mod esp;
mod fatfix;
mod gpt;
mod ids;
mod place;
mod probe;

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use gpt::{read_partitions, root_partition_offset, GptPartition};
pub use ids::{Guid, Ids};
pub use place::{shift_up, Placement};
pub use probe::{probe, BootEntry, EspProbe, ProbeError};

/// Where a seek lands in a byte region of `len` bytes at `pos`: the `Seek` of both in-memory
/// devices the crates work on (the GPT tables written, the ESP read back). Out of range
/// clamps to 0, as a failed seek would leave nothing sensible to read.
fn seek_to(pos: u64, len: u64, to: io::SeekFrom) -> u64 {
    match to {
        io::SeekFrom::Start(p) => p,
        io::SeekFrom::End(d) => len.checked_add_signed(d).unwrap_or(0),
        io::SeekFrom::Current(d) => pos.checked_add_signed(d).unwrap_or(0),
    }
}

/// Sector size of the disks chvkit writes (and the only one rust-hypervisor-firmware reads).
pub const SECTOR: u64 = 512;
/// Partition alignment: 1 MiB, what every partitioning tool uses.
pub const ALIGN: u64 = 1 << 20;
/// Where the kernel goes on the ESP (BLS: paths relative to the ESP root, `/` separated).
pub const KERNEL_PATH: &str = "/chvkit/linux";
pub const INITRD_PATH: &str = "/chvkit/initrd";
pub const LOADER_CONF: &str = "/loader/loader.conf";
pub const ENTRY_NAME: &str = "chvkit.conf";
pub const ENTRIES_DIR: &str = "/loader/entries";
pub const BOOTX64_PATH: &str = "/EFI/BOOT/BOOTX64.EFI";
/// Debian's `systemd-boot-efi` package puts systemd-boot here.
pub const HOST_SYSTEMD_BOOT: &str = "/usr/lib/systemd/boot/efi/systemd-bootx64.efi";
/// rust-hypervisor-firmware reads loader.conf and entries into 4096-byte buffers (and asserts
/// the file fits), and paths into 260-byte ones.
pub const MAX_CONF_BYTES: usize = 4096;
pub const MAX_PATH_BYTES: usize = 260;
/// Bump when the layout or the ESP's contents change (part of the rootfs cache key).
pub const LAYOUT_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("--kernel {path}: {source}")]
    ReadKernel {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "--kernel {path} is {what}, not a bzImage: --bootable puts the kernel on the EFI System \
         Partition, where rust-hypervisor-firmware loads it by the x86 boot protocol and \
         systemd-boot as an EFI program; give a bzImage such as /boot/vmlinuz-*"
    )]
    NotBzImage { path: PathBuf, what: String },
    #[error("--kernel {path}: bzImage {why}, which rust-hypervisor-firmware refuses to load")]
    KernelUnloadable { path: PathBuf, why: String },
    #[error("--initramfs {path}: {source}")]
    ReadInitramfs {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("--initramfs {path} is empty")]
    EmptyInitramfs { path: PathBuf },
    #[error("--systemd-boot {path}: {source}")]
    ReadLoader {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("--systemd-boot {path} is not an EFI program (no MZ/PE header)")]
    NotEfi { path: PathBuf },
    #[error("--cmdline {value:?}: {why}")]
    Cmdline { value: String, why: String },
    #[error("boot entry: {0}")]
    Entry(String),
    #[error("EFI System Partition: {0}")]
    Fat(String),
    #[error("GPT: {0}")]
    Gpt(String),
    #[error("cannot write the disk {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What `--bootable` was given.
#[derive(Debug, Clone, Default)]
pub struct BootOpts {
    pub kernel: PathBuf,
    pub initramfs: Option<PathBuf>,
    /// Appended to the entry's options.
    pub cmdline: Option<String>,
    /// `None`: [`HOST_SYSTEMD_BOOT`] if present. `Some(None)`: no systemd-boot.
    pub systemd_boot: Option<Option<PathBuf>>,
}

/// The files that go on the ESP, read and checked before any work.
#[derive(Debug, Clone)]
pub struct Inputs {
    pub kernel: Vec<u8>,
    pub kernel_path: PathBuf,
    pub initramfs: Option<Vec<u8>>,
    pub cmdline: String,
    pub systemd_boot: Option<(PathBuf, Vec<u8>)>,
    /// The kernel's `cmdline_size` (longest command line it takes, without the NUL).
    pub kernel_cmdline_max: usize,
    /// The kernel has the EFI stub (systemd-boot and UEFI can start it).
    pub kernel_efi_stub: bool,
}

/// Summary of the disk, for `--json` and the cache entry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Report {
    pub disk_guid: String,
    pub esp_partuuid: String,
    pub root_partuuid: String,
    pub esp_bytes: u64,
    pub root_offset: u64,
    pub root_bytes: u64,
    pub options: String,
    pub systemd_boot: bool,
    /// How the root filesystem was moved into place: `insert_range` or `copy`.
    pub placement: String,
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(b))
}

impl Inputs {
    /// Read and check the kernel, initramfs and systemd-boot; check the command line.
    pub fn load(o: &BootOpts) -> Result<Inputs, BootError> {
        let kernel = std::fs::read(&o.kernel).map_err(|source| BootError::ReadKernel {
            path: o.kernel.clone(),
            source,
        })?;
        let (kernel_cmdline_max, kernel_efi_stub) = check_bzimage(&o.kernel, &kernel)?;
        let initramfs = match &o.initramfs {
            None => None,
            Some(p) => {
                let b = std::fs::read(p).map_err(|source| BootError::ReadInitramfs {
                    path: p.clone(),
                    source,
                })?;
                if b.is_empty() {
                    return Err(BootError::EmptyInitramfs { path: p.clone() });
                }
                Some(b)
            }
        };
        let loader_path = match &o.systemd_boot {
            Some(explicit) => explicit.clone(),
            None => Some(PathBuf::from(HOST_SYSTEMD_BOOT)).filter(|p| p.is_file()),
        };
        let systemd_boot = match loader_path {
            None => None,
            Some(p) => {
                let b = std::fs::read(&p).map_err(|source| BootError::ReadLoader {
                    path: p.clone(),
                    source,
                })?;
                if !b.starts_with(b"MZ") {
                    return Err(BootError::NotEfi { path: p });
                }
                Some((p, b))
            }
        };
        let cmdline = o.cmdline.clone().unwrap_or_default();
        let i = Inputs {
            kernel,
            kernel_path: o.kernel.clone(),
            initramfs,
            cmdline,
            systemd_boot,
            kernel_cmdline_max,
            kernel_efi_stub,
        };
        // The real GUID is not known yet; every GUID has the same length.
        let sample = i.options(&Guid([0; 16]));
        check_cmdline(&i.cmdline, &sample, kernel_cmdline_max)?;
        entry_text(&i, &sample)?;
        if !kernel_efi_stub && i.systemd_boot.is_some() {
            tracing::warn!(
                "--kernel {} has no EFI stub: rust-hypervisor-firmware boots it, but systemd-boot \
                 (UEFI firmware) cannot",
                o.kernel.display()
            );
        }
        Ok(i)
    }

    /// The entry's `options`: the root by PARTUUID, then `--cmdline`.
    ///
    /// `init=/init` because without it a kernel that mounts the root itself, or a
    /// distribution initramfs, starts `/sbin/init`, not the generated `/init`.
    pub fn options(&self, root: &Guid) -> String {
        let mut s = format!("root=PARTUUID={root} rw console=ttyS0 init=/init");
        let extra = self.cmdline.trim();
        if !extra.is_empty() {
            s.push(' ');
            s.push_str(extra);
        }
        s
    }

    /// What the cache key needs: the bytes (by hash) and the command line.
    pub fn key_json(&self) -> serde_json::Value {
        serde_json::json!({
            "layout": LAYOUT_VERSION,
            "kernel": sha256_hex(&self.kernel),
            "initramfs": self.initramfs.as_deref().map(sha256_hex),
            "cmdline": self.cmdline,
            "systemd_boot": self.systemd_boot.as_ref().map(|(_, b)| sha256_hex(b)),
        })
    }
}

/// A bzImage rust-hypervisor-firmware loads: boot flag 0xAA55 and `HdrS`, boot protocol
/// ≥ 2.05, relocatable (its `bzimage.rs`). Returns (`cmdline_size`, has the EFI stub).
fn check_bzimage(path: &Path, b: &[u8]) -> Result<(usize, bool), BootError> {
    let read_at = |buf: &mut [u8], off: u64| -> io::Result<usize> {
        let off = usize::try_from(off).unwrap_or(usize::MAX).min(b.len());
        let n = buf.len().min(b.len() - off);
        buf[..n].copy_from_slice(&b[off..off + n]);
        Ok(n)
    };
    use crate::host::files::{sniff_kernel_at, KernelImage};
    match sniff_kernel_at(&read_at) {
        Ok(KernelImage::BzImage { .. }) => {}
        Ok(other) => {
            let what = match other {
                KernelImage::ElfPvh | KernelImage::ElfNoPvh | KernelImage::ElfUnsupported => {
                    "an ELF vmlinux (what direct kernel boot takes)".to_string()
                }
                _ if b.is_empty() => "an empty file".to_string(),
                _ if b.starts_with(b"070701") || b.starts_with(&[0x1f, 0x8b]) => {
                    "an archive (an initramfs? that goes in --initramfs)".to_string()
                }
                _ => format!("{} bytes of something else", b.len()),
            };
            return Err(BootError::NotBzImage {
                path: path.to_path_buf(),
                what,
            });
        }
        Err(e) => {
            return Err(BootError::ReadKernel {
                path: path.to_path_buf(),
                source: e,
            })
        }
    }
    let bad = |why: String| BootError::KernelUnloadable {
        path: path.to_path_buf(),
        why,
    };
    if b.len() < 0x240 {
        return Err(bad("header is truncated".into()));
    }
    if b[0x1fe..0x200] != [0x55, 0xaa] {
        return Err(bad("has no boot flag 0xAA55".into()));
    }
    let version = u16::from_le_bytes([b[0x206], b[0x207]]);
    if version < 0x205 {
        return Err(bad(format!(
            "speaks boot protocol {}.{:02} (older than 2.05)",
            version >> 8,
            version & 0xff
        )));
    }
    if b[0x234] == 0 {
        return Err(bad("is not relocatable".into()));
    }
    // cmdline_size exists from 2.06; before, the limit was 255.
    let max = if version >= 0x206 {
        u32::from_le_bytes([b[0x238], b[0x239], b[0x23a], b[0x23b]]) as usize
    } else {
        255
    };
    Ok((max, b.starts_with(b"MZ")))
}

/// `--cmdline` must fit one line of the entry, the firmware's 4096-byte buffer and the
/// kernel's `cmdline_size` (the firmware prepends a space, and asserts it fits).
fn check_cmdline(extra: &str, options: &str, kernel_max: usize) -> Result<(), BootError> {
    let bad = |why: String| BootError::Cmdline {
        value: if extra.len() > 80 {
            let cut = (0..=77)
                .rev()
                .find(|i| extra.is_char_boundary(*i))
                .unwrap_or(0);
            format!("{}…", &extra[..cut])
        } else {
            extra.to_string()
        },
        why,
    };
    if extra.chars().any(|c| c.is_control()) {
        return Err(bad(
            "contains a control character (a newline would end the entry's options line)".into(),
        ));
    }
    // The firmware's kernel command line is " " + options (plus the VMM's, if any, before it).
    let need = options.len() + 1;
    if need >= kernel_max {
        return Err(bad(format!(
            "the entry's options would be {} bytes, but the kernel takes at most {} \
             (its boot header's cmdline_size), and the firmware adds a space",
            options.len(),
            kernel_max.saturating_sub(2)
        )));
    }
    if options.len() > MAX_CONF_BYTES {
        return Err(bad(format!(
            "the entry's options would be {} bytes: more than the {MAX_CONF_BYTES} \
             rust-hypervisor-firmware reads",
            options.len()
        )));
    }
    Ok(())
}

/// `/loader/loader.conf`: the default entry by its full file name.
pub fn loader_conf() -> String {
    format!("timeout 0\ndefault {ENTRY_NAME}\n")
}

/// `/loader/entries/chvkit.conf`.
pub fn entry_text(i: &Inputs, options: &str) -> Result<String, BootError> {
    let mut s = format!("title chvkit\nlinux {KERNEL_PATH}\n");
    if i.initramfs.is_some() {
        s.push_str(&format!("initrd {INITRD_PATH}\n"));
    }
    s.push_str(&format!("options {options}\n"));
    if s.len() > MAX_CONF_BYTES {
        return Err(BootError::Entry(format!(
            "{ENTRIES_DIR}/{ENTRY_NAME} would be {} bytes: rust-hypervisor-firmware reads at \
             most {MAX_CONF_BYTES}; shorten --cmdline",
            s.len()
        )));
    }
    Ok(s)
}

/// Where everything goes, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub esp_offset: u64,
    pub esp_bytes: u64,
    pub root_offset: u64,
    pub root_bytes: u64,
    pub total: u64,
}

impl Layout {
    pub fn new(esp_bytes: u64, root_bytes: u64) -> Layout {
        let esp_offset = ALIGN;
        let root_offset = esp_offset + esp_bytes.next_multiple_of(ALIGN);
        let root_end = root_offset + root_bytes.next_multiple_of(SECTOR);
        // One more MiB after the aligned end holds the backup table (33 sectors).
        let total = root_end.next_multiple_of(ALIGN) + ALIGN;
        Layout {
            esp_offset,
            esp_bytes: esp_bytes.next_multiple_of(ALIGN),
            root_offset,
            root_bytes,
            total,
        }
    }
}

/// Everything of the disk but the root filesystem, computed once: the ESP image and the
/// tables, to be applied to any file holding the packed ext4 at offset 0 (the output, and the
/// rootfs cache's copy).
#[derive(Debug, Clone)]
pub struct Prepared {
    pub layout: Layout,
    esp: Vec<u8>,
    tables: Vec<(u64, Vec<u8>)>,
    report: Report,
}

/// Build the ESP and the GPTs for a root filesystem of `root_bytes`.
pub fn prepare(root_bytes: u64, inputs: &Inputs, ids: &Ids) -> Result<Prepared, BootError> {
    let options = inputs.options(&ids.root);
    let entry = entry_text(inputs, &options)?;
    let esp = esp::build(inputs, &entry, ids)?;
    let layout = Layout::new(esp.len() as u64, root_bytes);
    let tables = gpt::build(&layout, ids)?;
    let report = Report {
        disk_guid: ids.disk.to_string(),
        esp_partuuid: ids.esp.to_string(),
        root_partuuid: ids.root.to_string(),
        esp_bytes: layout.esp_bytes,
        root_offset: layout.root_offset,
        root_bytes,
        options,
        systemd_boot: inputs.systemd_boot.is_some(),
        placement: String::new(),
    };
    Ok(Prepared {
        layout,
        esp,
        tables,
        report,
    })
}

impl Prepared {
    /// Turn the file `path`, holding the packed ext4 at offset 0, into the disk: move the
    /// ext4 to its partition, write the ESP and both GPTs. The caller fsyncs.
    pub fn apply(&self, path: &Path) -> Result<Report, BootError> {
        let werr = |source| BootError::Write {
            path: path.to_path_buf(),
            source,
        };
        // Its own descriptor, readable too (the copy fallback reads what it moves).
        let f = &std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(werr)?;
        let placement = shift_up(f, self.layout.root_offset).map_err(werr)?;
        f.set_len(self.layout.total).map_err(werr)?;
        write_sparse(f, self.layout.esp_offset, &self.esp).map_err(werr)?;
        for (off, bytes) in &self.tables {
            f.write_all_at(bytes, *off).map_err(werr)?;
        }
        let mut r = self.report.clone();
        r.placement = placement.as_str().to_string();
        Ok(r)
    }

    /// The report before any placement (`placement` empty), e.g. for the cache entry.
    pub fn report(&self) -> Report {
        self.report.clone()
    }
}

/// [`prepare`] and [`Prepared::apply`] in one go.
pub fn assemble(
    path: &Path,
    root_bytes: u64,
    inputs: &Inputs,
    ids: &Ids,
) -> Result<Report, BootError> {
    prepare(root_bytes, inputs, ids)?.apply(path)
}

/// A disk with an ESP holding exactly `files` and a root partition of `root_bytes` zeros
/// (for tests of readers: cloud-image-like ESPs, broken entries).
#[cfg(test)]
pub(crate) fn write_disk_with_esp(
    path: &Path,
    files: &[(&str, &[u8])],
    root_bytes: u64,
) -> Result<(), BootError> {
    let werr = |source| BootError::Write {
        path: path.to_path_buf(),
        source,
    };
    let ids = Ids::new(&path.display().to_string(), Some(0));
    let owned: Vec<(String, &[u8])> = files.iter().map(|(p, b)| (p.to_string(), *b)).collect();
    let image = esp::format_with(&owned, &ids)?;
    let layout = Layout::new(image.len() as u64, root_bytes);
    let f = File::create(path).map_err(werr)?;
    f.set_len(layout.total).map_err(werr)?;
    write_sparse(&f, layout.esp_offset, &image).map_err(werr)?;
    for (off, bytes) in gpt::build(&layout, &ids)? {
        f.write_all_at(&bytes, off).map_err(werr)?;
    }
    Ok(())
}

/// Write `data` at `off`, skipping 4 KiB blocks of zeros (the ESP's free space stays a hole;
/// the region was a hole or zeroed before).
fn write_sparse(f: &File, off: u64, data: &[u8]) -> io::Result<()> {
    const BLK: usize = 4096;
    let mut i = 0;
    while i < data.len() {
        // Coalesce runs of non-zero blocks into one write.
        let start = i;
        while i < data.len() && data[i..(i + BLK).min(data.len())].iter().any(|b| *b != 0) {
            i += BLK;
        }
        let end = i.min(data.len());
        if end > start {
            f.write_all_at(&data[start..end], off + start as u64)?;
        }
        while i < data.len() && data[i..(i + BLK).min(data.len())].iter().all(|b| *b == 0) {
            i += BLK;
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests;
