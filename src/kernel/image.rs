//! Kernel images: bzImage → ELF vmlinux, PVH note check.
//!
//! Cloud Hypervisor boots a bzImage, but chvkit keeps the unpacked ELF `vmlinux`: it is what
//! the VMM loads fastest (no in-guest decompression, which is slow under PVM's emulation), and
//! its PVH note can be checked before any VM exists. The x86 boot protocol (boot protocol
//! ≥ 2.08) says where the compressed payload lies; the codec is told by its magic.

mod decompress;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use sha2::{Digest, Sha256};

use crate::fsutil::AtomicFile;
use crate::host::files::{sniff_kernel_at, KernelImage};
pub use decompress::Compression;
use decompress::Magic;

/// Largest vmlinux chvkit will unpack: real ones are tens of MiB; this stops a file that
/// unpacks without end.
const MAX_VMLINUX: u64 = 1 << 30;
/// `e_machine` of x86-64.
const EM_X86_64: u16 = 62;

/// An ELF vmlinux Cloud Hypervisor can boot directly (PVH note checked).
#[derive(Debug, Clone)]
pub struct Vmlinux {
    pub bytes: Vec<u8>,
    /// The payload codec when the input was a bzImage; `None` when it was a vmlinux already.
    pub from_bzimage: Option<Compression>,
    /// The bzImage header's version string, e.g. `6.1.0-57-cloud-amd64 (debian-kernel@…) #1 …`.
    pub version: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read kernel image {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is {what}, not a kernel image (an ELF vmlinux with a PVH note, or a bzImage)")]
    NotKernel { path: PathBuf, what: String },
    #[error("{path}: malformed bzImage header: {why}")]
    BadHeader { path: PathBuf, why: String },
    #[error(
        "{path}: x86 boot protocol {major}.{minor:02} is too old: 2.08 or newer says where the \
         payload is"
    )]
    OldProtocol { path: PathBuf, major: u8, minor: u8 },
    #[error(
        "{path} is truncated: its payload runs to byte {end} but the file has only {len} bytes"
    )]
    Truncated { path: PathBuf, end: u64, len: u64 },
    #[error(
        "{path}: payload compression {name} is an unsupported compression (chvkit unpacks gzip, \
         xz, lzma, zstd and lz4); rebuild the kernel with one of those or give its vmlinux"
    )]
    UnsupportedCompression { path: PathBuf, name: &'static str },
    #[error(
        "{path}: the payload starts with magic {magic}, which is no known compression \
         (gzip, xz, lzma, zstd, lz4, bzip2, lzo)"
    )]
    UnknownMagic { path: PathBuf, magic: String },
    #[error("{path}: cannot unpack its {compression} payload: {source}")]
    Decompress {
        path: PathBuf,
        compression: Compression,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path}: the payload unpacked to {got} bytes but records {expected} (mod 2^32): corrupt"
    )]
    SizeMismatch {
        path: PathBuf,
        expected: u32,
        got: u64,
    },
    #[error("{path}: {what}, not an ELF64 x86-64 vmlinux")]
    NotElf64 { path: PathBuf, what: String },
    #[error("{path} has no PVH entry note: Cloud Hypervisor cannot boot it directly")]
    NoPvh { path: PathBuf },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Read a guest kernel: an ELF PVH vmlinux is taken as is, a bzImage is unpacked (and its
/// vmlinux must carry the PVH note); anything else is refused, saying what it is.
pub fn load_vmlinux(path: &Path) -> Result<Vmlinux, ImageError> {
    let bytes = std::fs::read(path).map_err(|source| ImageError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    match sniff_bytes(&bytes) {
        KernelImage::BzImage { version } => {
            let (c, vmlinux) = unpack_bzimage(path, &bytes)?;
            Ok(Vmlinux {
                bytes: vmlinux,
                from_bzimage: Some(c),
                version,
            })
        }
        KernelImage::ElfPvh | KernelImage::ElfNoPvh | KernelImage::ElfUnsupported => {
            check_vmlinux(path, &bytes)?;
            Ok(Vmlinux {
                bytes,
                from_bzimage: None,
                version: None,
            })
        }
        KernelImage::Unknown => Err(ImageError::NotKernel {
            path: path.to_path_buf(),
            what: describe(&bytes),
        }),
    }
}

/// Write `v` to `dest` (mode 0644) so that `dest` is either the old file or the whole new one;
/// returns the sha256 of what was written.
pub fn install_vmlinux(v: &Vmlinux, dest: &Path) -> Result<String, ImageError> {
    let werr = |source| ImageError::Write {
        path: dest.to_path_buf(),
        source,
    };
    let mut f = AtomicFile::create(dest, 0o644).map_err(werr)?;
    f.write_all(&v.bytes).map_err(werr)?;
    f.commit().map_err(werr)?;
    Ok(hex::encode(Sha256::digest(&v.bytes)))
}

/// The kernel release from the `Linux version X.Y.Z… (builder) …` banner inside a vmlinux: the
/// word after "Linux version", as `uname -r` prints it (e.g. `6.1.0-57-cloud-amd64`).
pub fn linux_version(bytes: &[u8]) -> Option<String> {
    const BANNER: &[u8] = b"Linux version ";
    memchr::memmem::find_iter(bytes, BANNER).find_map(|at| {
        let rest = &bytes[at + BANNER.len()..];
        let end = rest
            .iter()
            .position(|b| !b.is_ascii_graphic())
            .unwrap_or(rest.len());
        let word = &rest[..end];
        // Format strings ("Linux version %s") and prose mentions are skipped: a release
        // starts with a digit and has a dot.
        (word.first().is_some_and(u8::is_ascii_digit) && word.contains(&b'.'))
            .then(|| String::from_utf8_lossy(word).into_owned())
    })
}

fn sniff_bytes(bytes: &[u8]) -> KernelImage {
    let read_at = |buf: &mut [u8], off: u64| -> std::io::Result<usize> {
        let off = usize::try_from(off).unwrap_or(usize::MAX).min(bytes.len());
        let n = buf.len().min(bytes.len() - off);
        buf[..n].copy_from_slice(&bytes[off..off + n]);
        Ok(n)
    };
    // Reading from memory cannot fail.
    sniff_kernel_at(&read_at).unwrap_or(KernelImage::Unknown)
}

/// The fields of the x86 boot protocol header chvkit needs.
struct BootHeader {
    /// File offset of the protected-mode code (`(setup_sects + 1) * 512`).
    pm_start: u64,
    payload_offset: u32,
    payload_length: u32,
}

impl BootHeader {
    fn parse(path: &Path, b: &[u8]) -> Result<BootHeader, ImageError> {
        let bad = |why: &str| ImageError::BadHeader {
            path: path.to_path_buf(),
            why: why.to_string(),
        };
        if b.len() < 0x250 {
            return Err(bad("shorter than the 0x250 bytes of the setup header"));
        }
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let [minor, major] = [b[0x206], b[0x207]];
        if (major, minor) < (2, 8) {
            return Err(ImageError::OldProtocol {
                path: path.to_path_buf(),
                major,
                minor,
            });
        }
        // setup_sects 0 means 4, for images older than the field.
        let setup_sects = match b[0x1f1] {
            0 => 4,
            n => u64::from(n),
        };
        let h = BootHeader {
            pm_start: (setup_sects + 1) * 512,
            payload_offset: u32_at(0x248),
            payload_length: u32_at(0x24c),
        };
        if h.payload_length == 0 {
            return Err(bad("payload_length is 0"));
        }
        Ok(h)
    }

    /// The payload bytes, or `Truncated` when the file ends before them.
    fn payload<'a>(&self, path: &Path, b: &'a [u8]) -> Result<&'a [u8], ImageError> {
        let start = self.pm_start + u64::from(self.payload_offset);
        let end = start + u64::from(self.payload_length);
        let len = b.len() as u64;
        if end > len {
            return Err(ImageError::Truncated {
                path: path.to_path_buf(),
                end,
                len,
            });
        }
        // end ≤ len, which is a usize: both fit.
        Ok(&b[start as usize..end as usize])
    }
}

fn unpack_bzimage(path: &Path, b: &[u8]) -> Result<(Compression, Vec<u8>), ImageError> {
    let hdr = BootHeader::parse(path, b)?;
    let payload = hdr.payload(path, b)?;
    let c = match decompress::detect(payload) {
        Magic::Supported(c) => c,
        Magic::Unsupported(name) => {
            return Err(ImageError::UnsupportedCompression {
                path: path.to_path_buf(),
                name,
            })
        }
        // CONFIG_KERNEL_UNCOMPRESSED: the payload is the vmlinux itself.
        Magic::Unknown if payload.starts_with(b"\x7fELF") => Compression::None,
        Magic::Unknown => {
            return Err(ImageError::UnknownMagic {
                path: path.to_path_buf(),
                magic: hex_bytes(&payload[..payload.len().min(6)]),
            })
        }
    };
    let t = Instant::now();
    let out = decompress::decompress(c, payload, MAX_VMLINUX).map_err(|source| {
        ImageError::Decompress {
            path: path.to_path_buf(),
            compression: c,
            source,
        }
    })?;
    tracing::debug!(
        path = %path.display(),
        compression = %c,
        compressed = payload.len(),
        unpacked = out.len(),
        ms = t.elapsed().as_millis() as u64,
        "unpacked bzImage payload"
    );
    // Every codec's stream is followed by (gzip: ends with) the unpacked size; a mismatch is a
    // payload that decoded to something else than what was packed.
    if c != Compression::None && payload.len() >= 4 {
        let tail = &payload[payload.len() - 4..];
        let expected = u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]);
        if out.len() as u32 != expected {
            return Err(ImageError::SizeMismatch {
                path: path.to_path_buf(),
                expected,
                got: out.len() as u64,
            });
        }
    }
    check_vmlinux(path, &out)?;
    Ok((c, out))
}

/// `bytes` must be an ELF64 little-endian x86-64 file with the Xen PVH entry note.
fn check_vmlinux(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    let not_elf = |what: String| ImageError::NotElf64 {
        path: path.to_path_buf(),
        what,
    };
    match sniff_bytes(bytes) {
        KernelImage::ElfPvh => {}
        KernelImage::ElfNoPvh => {
            return Err(ImageError::NoPvh {
                path: path.to_path_buf(),
            })
        }
        KernelImage::ElfUnsupported => return Err(not_elf("a 32-bit or big-endian ELF".into())),
        _ => return Err(not_elf(format!("the kernel inside is {}", describe(bytes)))),
    }
    let machine = u16::from_le_bytes([bytes[0x12], bytes[0x13]]);
    if machine != EM_X86_64 {
        return Err(not_elf(format!("an ELF for machine {machine}")));
    }
    Ok(())
}

/// A short description of what a file that is no kernel is, for messages.
fn describe(b: &[u8]) -> String {
    if b.is_empty() {
        return "an empty file".into();
    }
    if b.starts_with(b"070701") || b.starts_with(b"070702") {
        return "a cpio archive (an initramfs?)".into();
    }
    if b.starts_with(b"#!") {
        return "a script".into();
    }
    match decompress::detect(b) {
        Magic::Supported(c) => format!("{c}-compressed data (an initramfs?)"),
        Magic::Unsupported(name) => format!("{name}-compressed data"),
        Magic::Unknown => format!("unknown data starting {}", hex_bytes(&b[..b.len().min(8)])),
    }
}

fn hex_bytes(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests;
