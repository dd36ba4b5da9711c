//! Per-job disks: a writable view of the rootfs that costs O(1) to prepare and leaves the rootfs
//! untouched, plus the read-only environment disk.
//!
//! 1. **Reflink** (`FICLONE`): where the filesystem shares extents (btrfs, XFS with reflink,
//!    bcachefs), the job disk is a raw clone of the rootfs. Sent as `image_type: Raw`.
//! 2. Otherwise (ext4, tmpfs, across filesystems) a **qcow2 overlay**: the rootfs is converted
//!    once into a qcow2 *base* (Cloud Hypervisor v50.0 can only back a qcow2 image with another
//!    qcow2 image), cached under `<state_dir>/bases` keyed by the rootfs's identity (device,
//!    inode, size, mtime), and every job gets an empty overlay that names the base by absolute
//!    path. Sent as `image_type: Qcow2` with `backing_files: true` (v50.0 ignores both; v50.1+
//!    needs them). The base is read-only and shared; the overlay grows by what the guest writes.
//!    A rootfs that is already qcow2 is used as the base directly.
//!
//! See docs/launch.md for why (and what was measured).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::qcow2;
use crate::fsutil::AtomicFile;
use crate::rootfs::envslot;

/// Guest-visible block size the env disk is padded to.
pub const ENV_DISK_ALIGN: usize = crate::rootfs::envdisk::PAD;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("rootfs {path}: {source}")]
    Rootfs {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("rootfs {0} is not a regular file")]
    NotAFile(PathBuf),
    #[error("rootfs {0} is empty")]
    Empty(PathBuf),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Qcow2(#[from] qcow2::Qcow2Error),
    #[error(
        "firmware boot needs a disk with a GPT partition table and an EFI System Partition, but {path} {found}. \
         rust-hypervisor-firmware holds no kernel: it boots a Boot Loader Specification entry or \\EFI\\BOOT\\BOOTX64.EFI \
         from the ESP, so a raw ext4 root filesystem cannot boot with it. Boot it directly with a kernel instead \
         (--kernel FILE or CHV_KERNEL_PATH, plus --initramfs for kernels with virtio as modules)"
    )]
    NotBootable { path: PathBuf, found: String },
    #[error("environment disk: {0}")]
    Env(#[from] crate::envfile::EnvError),
    #[error(
        "per-job disk {0} already exists (kept by an earlier `--keep` run of this job id?): move it away or use another --job-id"
    )]
    Exists(PathBuf),
}

/// How the job disk was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskKind {
    Reflink,
    Qcow2Overlay,
}

/// A prepared per-job disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobDisk {
    pub path: PathBuf,
    pub kind: DiskKind,
    /// The qcow2 base an overlay reads through (shared; never removed with the job).
    pub base: Option<PathBuf>,
    /// The job's environment is in the disk itself (the image's env slot,
    /// `crate::rootfs::envslot`): no env disk, and the command line says so.
    #[serde(default)]
    pub env_in_slot: bool,
}

impl JobDisk {
    /// `DiskConfig.image_type` (v50.1+ needs it; v50.0 ignores it).
    pub fn image_type(&self) -> &'static str {
        match self.kind {
            DiskKind::Reflink => "Raw",
            DiskKind::Qcow2Overlay => "Qcow2",
        }
    }
}

fn io<'p>(what: &'static str, path: &'p Path) -> impl FnOnce(io::Error) -> DiskError + 'p {
    move |source| DiskError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Open the rootfs and check it is a non-empty regular file.
fn open_rootfs(rootfs: &Path) -> Result<(File, fs::Metadata), DiskError> {
    let f = File::open(rootfs).map_err(|source| DiskError::Rootfs {
        path: rootfs.to_path_buf(),
        source,
    })?;
    let md = f.metadata().map_err(|source| DiskError::Rootfs {
        path: rootfs.to_path_buf(),
        source,
    })?;
    if !md.is_file() {
        return Err(DiskError::NotAFile(rootfs.to_path_buf()));
    }
    if md.len() == 0 {
        return Err(DiskError::Empty(rootfs.to_path_buf()));
    }
    Ok((f, md))
}

/// Make `dest` (which must not exist) the job disk for `rootfs`. `bases` is the base cache
/// directory. The rootfs is only ever opened read-only. With `env` (the bytes of
/// `/etc/checker.env`), the job disk carries them in the image's env slot when it has one that
/// is large enough (`env_in_slot` says whether it did); otherwise the caller writes the env disk.
pub fn prepare(
    rootfs: &Path,
    dest_stem: &Path,
    bases: &Path,
    env: Option<&[u8]>,
) -> Result<JobDisk, DiskError> {
    let rootfs = std::path::absolute(rootfs).map_err(|source| DiskError::Rootfs {
        path: rootfs.to_path_buf(),
        source,
    })?;
    let (src, md) = open_rootfs(&rootfs)?;
    let is_qcow = qcow2::is_qcow2(&rootfs).map_err(|source| DiskError::Rootfs {
        path: rootfs.clone(),
        source,
    })?;
    if let Some(parent) = dest_stem.parent() {
        fs::create_dir_all(parent).map_err(io("disk directory", parent))?;
    }
    for ext in ["raw", "qcow2"] {
        let p = dest_stem.with_extension(ext);
        if p.exists() {
            return Err(DiskError::Exists(p));
        }
    }
    if !is_qcow {
        let dest = dest_stem.with_extension("raw");
        if try_reflink(&src, &dest)? {
            // The clone is the job's own: the slot is written straight into it.
            let patched = match env {
                Some(env) => patch_raw_clone(&dest, env).inspect_err(|_| {
                    let _ = fs::remove_file(&dest);
                })?,
                None => false,
            };
            return Ok(JobDisk {
                path: dest,
                kind: DiskKind::Reflink,
                base: None,
                env_in_slot: patched,
            });
        }
    }
    let (base, size) = if is_qcow {
        (rootfs.clone(), qcow2::read_header(&rootfs)?.size)
    } else {
        (ensure_base(&rootfs, &md, bases)?, md.len())
    };
    // The slot's clusters, as the overlay will hold them: the base's bytes with the patches on.
    let clusters = match env {
        Some(env) => {
            let reader = qcow2::Reader::open(&base)?;
            let mut read = |b: &mut [u8], off: u64| {
                reader
                    .read_at(b, off)
                    .map_err(|e| io::Error::other(e.to_string()))
            };
            match slot_patches(&mut read, env).map_err(io("env slot of", &base))? {
                Some(patches) => Some(
                    patched_clusters(&patches, &mut read, size)
                        .map_err(io("env slot of", &base))?,
                ),
                None => None,
            }
        }
        None => None,
    };
    let dest = dest_stem.with_extension("qcow2");
    qcow2::create_overlay_with(
        &dest,
        &base,
        size,
        clusters.as_ref().unwrap_or(&Default::default()),
    )?;
    Ok(JobDisk {
        path: dest,
        kind: DiskKind::Qcow2Overlay,
        base: Some(base),
        env_in_slot: clusters.is_some(),
    })
}

/// The patches that put `env` into the image's env slot, read through `read`; `None` when the
/// image has no slot or `env` does not fit it (the env disk carries it then). The slot is looked
/// for in a bare ext4 image, else in the root partition of a GPT disk (`rootfs --bootable`),
/// whose offsets the patches then carry.
fn slot_patches(
    read: &mut dyn FnMut(&mut [u8], u64) -> io::Result<()>,
    env: &[u8],
) -> io::Result<Option<Vec<envslot::Patch>>> {
    let (slot, base) = match envslot::locate(read)? {
        Some(slot) => (slot, 0),
        None => {
            let found = match crate::rootfs::bootable::root_partition_offset(read) {
                Some(off) => envslot::locate(&mut |b: &mut [u8], o: u64| read(b, off + o))?
                    .map(|slot| (slot, off)),
                None => None,
            };
            let Some(found) = found else {
                tracing::debug!("the image has no env slot: the environment goes on an env disk");
                return Ok(None);
            };
            found
        }
    };
    let patches = slot.fill(env).map(|ps| {
        ps.into_iter()
            .map(|p| envslot::Patch {
                offset: p.offset + base,
                bytes: p.bytes,
            })
            .collect()
    });
    if patches.is_none() {
        tracing::info!(
            bytes = env.len(),
            slot = envslot::SLOT_LEN,
            "the environment is larger than the image's env slot: it goes on an env disk"
        );
    }
    Ok(patches)
}

/// Whole qcow2 clusters (guest index → bytes) holding `patches` on top of what `read` gives.
fn patched_clusters(
    patches: &[envslot::Patch],
    read: &mut dyn FnMut(&mut [u8], u64) -> io::Result<()>,
    size: u64,
) -> io::Result<std::collections::BTreeMap<u64, Vec<u8>>> {
    let mut out = std::collections::BTreeMap::new();
    for p in patches {
        let end = p.offset + p.bytes.len() as u64;
        if end > size {
            return Err(io::Error::other(format!(
                "env slot patch at {} ends past the image ({size} bytes)",
                p.offset
            )));
        }
        let mut pos = p.offset;
        while pos < end {
            let c = pos / qcow2::CLUSTER;
            let buf = match out.entry(c) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(v) => {
                    let mut b = vec![0u8; qcow2::CLUSTER as usize];
                    // The last cluster may run past the image: zeros there, as the guest sees.
                    let n = (size - c * qcow2::CLUSTER).min(qcow2::CLUSTER) as usize;
                    read(&mut b[..n], c * qcow2::CLUSTER)?;
                    v.insert(b)
                }
            };
            let from = (pos - c * qcow2::CLUSTER) as usize;
            let n = ((end - pos) as usize).min(qcow2::CLUSTER as usize - from);
            let src = (pos - p.offset) as usize;
            buf[from..from + n].copy_from_slice(&p.bytes[src..src + n]);
            pos += n as u64;
        }
    }
    Ok(out)
}

/// Put `env` into a raw clone's env slot. Returns whether it did.
fn patch_raw_clone(dest: &Path, env: &[u8]) -> Result<bool, DiskError> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(dest)
        .map_err(io("job disk", dest))?;
    let mut read = |b: &mut [u8], off: u64| f.read_exact_at(b, off);
    let Some(patches) = slot_patches(&mut read, env).map_err(io("env slot of", dest))? else {
        return Ok(false);
    };
    for p in &patches {
        f.write_all_at(&p.bytes, p.offset)
            .map_err(io("env slot of", dest))?;
    }
    Ok(true)
}

/// Filesystems that never share extents (ext2/3/4, tmpfs): there, trying FICLONE costs a file
/// creation and an unlink in the directory's journal on every launch for nothing. Anything
/// else (btrfs, XFS with or without reflink, bcachefs, NFS 4.2, ...) is tried.
fn never_reflinks(dir: &Path) -> bool {
    use nix::sys::statfs::{statfs, EXT4_SUPER_MAGIC, TMPFS_MAGIC};
    statfs(dir).is_ok_and(|s| {
        let t = s.filesystem_type();
        t == EXT4_SUPER_MAGIC || t == TMPFS_MAGIC
    })
}

/// Clone `src` into a new file `dest`. `Ok(false)` when the filesystem cannot share extents
/// (then nothing is left at `dest`).
fn try_reflink(src: &File, dest: &Path) -> Result<bool, DiskError> {
    if dest.parent().is_some_and(never_reflinks) {
        return Ok(false);
    }
    let out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dest)
        .map_err(io("job disk", dest))?;
    // FICLONE = _IOW(0x94, 9, int)
    const FICLONE: libc::c_ulong = 0x4004_9409;
    // SAFETY: FICLONE takes the source fd as its argument; both fds are open for the call.
    let rc = unsafe { libc::ioctl(out.as_raw_fd(), FICLONE, src.as_raw_fd()) };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    drop(out);
    let _ = fs::remove_file(dest);
    match err.raw_os_error() {
        Some(libc::EOPNOTSUPP)
        | Some(libc::EXDEV)
        | Some(libc::EINVAL)
        | Some(libc::ENOTTY)
        | Some(libc::ENOSYS) => {
            tracing::debug!(dest = %dest.display(), "reflink unsupported here ({err}); using a qcow2 overlay");
            Ok(false)
        }
        _ => Err(DiskError::Io {
            what: "reflink clone to",
            path: dest.to_path_buf(),
            source: err,
        }),
    }
}

/// What a cached base was made from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseSource {
    pub source: PathBuf,
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
}

impl BaseSource {
    fn of(path: &Path, md: &fs::Metadata) -> BaseSource {
        BaseSource {
            source: path.to_path_buf(),
            dev: md.dev(),
            ino: md.ino(),
            size: md.len(),
            mtime_ns: i128::from(md.mtime()) * 1_000_000_000 + i128::from(md.mtime_nsec()),
        }
    }

    fn key(&self) -> String {
        let mut h = Sha256::new();
        h.update(self.source.as_os_str().as_encoded_bytes());
        h.update([0]);
        for v in [self.dev, self.ino, self.size] {
            h.update(v.to_be_bytes());
        }
        h.update(self.mtime_ns.to_be_bytes());
        hex::encode(&h.finalize()[..12])
    }

    /// Does the source file still have this identity?
    pub fn still_matches(&self) -> bool {
        fs::metadata(&self.source)
            .map(|md| BaseSource::of(&self.source, &md) == *self)
            .unwrap_or(false)
    }
}

/// The cached qcow2 base for `rootfs`, converting it first if needed. Concurrent launches of
/// the same rootfs convert it once: the first takes an exclusive lock, the others wait for it.
pub fn ensure_base(rootfs: &Path, md: &fs::Metadata, bases: &Path) -> Result<PathBuf, DiskError> {
    let src = BaseSource::of(rootfs, md);
    let key = src.key();
    let base = bases.join(format!("{key}.qcow2"));
    if base.is_file() {
        return Ok(base);
    }
    fs::create_dir_all(bases).map_err(io("base cache", bases))?;
    let lock_path = bases.join(format!("{key}.lock"));
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(io("base lock", &lock_path))?;
    nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| DiskError::Io {
            what: "lock",
            path: lock_path.clone(),
            source: e.into(),
        })
        .and_then(|_guard| {
            if base.is_file() {
                return Ok(());
            }
            let started = std::time::Instant::now();
            let mut tmp = AtomicFile::create(&base, 0o444).map_err(io("base image", &base))?;
            let tmp_path = tmp.tmp_path().to_path_buf();
            let clusters = qcow2::convert_raw(rootfs, tmp.file(), &tmp_path)?;
            tmp.commit().map_err(io("base image", &base))?;
            let meta = serde_json::to_vec_pretty(&src).unwrap_or_default();
            crate::fsutil::write_atomic(&bases.join(format!("{key}.json")), &meta, 0o644)
                .map_err(io("base metadata", bases))?;
            tracing::info!(
                rootfs = %rootfs.display(),
                base = %base.display(),
                data_mib = clusters * qcow2::CLUSTER / (1 << 20),
                ms = started.elapsed().as_millis() as u64,
                "converted rootfs to a cached qcow2 base (once per rootfs version)"
            );
            Ok(())
        })?;
    let _ = fs::remove_file(&lock_path);
    Ok(base)
}

/// Refuse firmware boot of a disk a firmware cannot boot (facts §1): it needs a GPT, an EFI
/// System Partition, and on it a Boot Loader Specification entry whose kernel exists (what
/// rust-hypervisor-firmware boots; `chvkit rootfs --bootable` writes one) or
/// `\EFI\BOOT\BOOTX64.EFI` (its fallback, and what UEFI firmware runs; distribution cloud
/// images have it). The ESP is read the way the firmware reads it
/// (`crate::rootfs::bootable::probe`), through qcow2 as well.
pub fn check_firmware_bootable(rootfs: &Path) -> Result<(), DiskError> {
    use crate::rootfs::bootable::{probe, ProbeError};
    let mut lba1 = [0u8; 512];
    let mut lba1_4k = [0u8; 512];
    let rootfs_err = |source| DiskError::Rootfs {
        path: rootfs.to_path_buf(),
        source,
    };
    type ReadAt<'r> = Box<dyn FnMut(&mut [u8], u64) -> io::Result<()> + 'r>;
    let mut read: ReadAt = if qcow2::is_qcow2(rootfs).map_err(rootfs_err)? {
        let r = qcow2::Reader::open(rootfs)?;
        Box::new(move |b, off| r.read_at(b, off).map_err(io::Error::other))
    } else {
        let f = File::open(rootfs).map_err(rootfs_err)?;
        Box::new(move |b: &mut [u8], off| {
            b.fill(0);
            // Past the end reads as zeros, like a disk's unwritten sectors.
            let mut done = 0;
            while done < b.len() {
                match f.read_at(&mut b[done..], off + done as u64)? {
                    0 => break,
                    n => done += n,
                }
            }
            Ok(())
        })
    };
    let not_bootable = |found: String| DiskError::NotBootable {
        path: rootfs.to_path_buf(),
        found,
    };
    read(&mut lba1, 512).map_err(rootfs_err)?;
    read(&mut lba1_4k, 4096).map_err(rootfs_err)?;
    if &lba1[..8] != b"EFI PART" {
        if &lba1_4k[..8] == b"EFI PART" {
            // 4096-byte sectors: the firmware's reader assumes 512, UEFI may cope; the ESP
            // type is all that is checked.
            return if check_esp_type_4k(&lba1_4k, &mut *read).map_err(rootfs_err)? {
                Ok(())
            } else {
                Err(not_bootable(
                    "has a GPT (4096-byte sectors) but no EFI System Partition".into(),
                ))
            };
        }
        let mut sb = [0u8; 2];
        read(&mut sb, 1024 + 56).map_err(rootfs_err)?;
        return Err(not_bootable(if sb == [0x53, 0xef] {
            "is a bare ext2/3/4 filesystem (no partition table; `chvkit rootfs --bootable` \
             builds a GPT disk with the kernel on an EFI System Partition)"
                .to_string()
        } else {
            "has no GPT header (no \"EFI PART\" signature at LBA 1)".to_string()
        }));
    }
    match probe(&mut *read) {
        Ok(p) => {
            tracing::debug!(
                esp_lba = p.esp.first_lba,
                entry = ?p.entry.as_ref().map(|e| &e.file),
                bootx64 = p.bootx64,
                "firmware-bootable disk"
            );
            Ok(())
        }
        Err(ProbeError::Io(source)) => Err(rootfs_err(source)),
        Err(e) => Err(not_bootable(e.to_string())),
    }
}

/// Whether a GPT with 4096-byte sectors (header `hdr`) lists an EFI System Partition.
fn check_esp_type_4k(
    hdr: &[u8; 512],
    read: &mut dyn FnMut(&mut [u8], u64) -> io::Result<()>,
) -> io::Result<bool> {
    let u32_at = |o: usize| u32::from_le_bytes([hdr[o], hdr[o + 1], hdr[o + 2], hdr[o + 3]]);
    let mut lba = [0u8; 8];
    lba.copy_from_slice(&hdr[72..80]);
    let entries_lba = u64::from_le_bytes(lba);
    let (count, size) = (u32_at(80).min(1024) as usize, u32_at(84) as usize);
    if !(128..=4096).contains(&size) {
        return Ok(false);
    }
    let mut table = vec![0u8; count * size];
    read(&mut table, entries_lba * 4096)?;
    // C12A7328-F81F-11D2-BA4B-00A0C93EC93B in GPT's mixed-endian layout.
    const ESP: [u8; 16] = [
        0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e, 0xc9,
        0x3b,
    ];
    Ok(table.chunks(size).any(|e| e[..16] == ESP))
}

/// The environment disk (the rootfs issue's contract, `crate::rootfs::envdisk`): the bytes of
/// `checker.env` padded with NULs to a multiple of 4096. The guest's `/init` reads it from the
/// device named by `chvkit.env=` on the kernel command line.
pub fn env_disk_bytes(pairs: &[(String, String)]) -> Result<Vec<u8>, DiskError> {
    Ok(crate::rootfs::envdisk::render(pairs)?)
}

/// Write the environment disk atomically (mode 0600: it may hold secrets).
pub fn write_env_disk(path: &Path, pairs: &[(String, String)]) -> Result<(), DiskError> {
    crate::rootfs::envdisk::write(path, pairs).map_err(|e| match e {
        crate::rootfs::envdisk::EnvDiskError::Env(e) => DiskError::Env(e),
        crate::rootfs::envdisk::EnvDiskError::Io { path, source } => DiskError::Io {
            what: "environment disk",
            path,
            source,
        },
    })
}

/// Copy a (small) file; for snapshots' overlays. Tries a reflink first.
pub fn copy_file(src: &Path, dest: &Path) -> Result<(), DiskError> {
    let s = File::open(src).map_err(io("copy from", src))?;
    if try_reflink(&s, dest)? {
        return Ok(());
    }
    let mut out = AtomicFile::create(dest, 0o600).map_err(io("copy to", dest))?;
    let mut s = s;
    io::copy(&mut s, out.file()).map_err(io("copy to", dest))?;
    out.commit().map_err(io("copy to", dest))?;
    let _ = fs::set_permissions(dest, fs::Permissions::from_mode(0o600));
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn reflink_is_not_tried_where_it_never_works() {
        // /dev/shm is tmpfs on any usual host; /proc never is, and is not ext4 either.
        if Path::new("/dev/shm").is_dir() {
            assert!(never_reflinks(Path::new("/dev/shm")));
        }
        assert!(!never_reflinks(Path::new("/proc")));
        // An unreadable path is tried (and fails properly there), not skipped.
        assert!(!never_reflinks(Path::new("/nonexistent/dir")));
    }

    use super::*;

    fn sparse(dir: &Path, name: &str, size: u64, data: &[(u64, &[u8])]) -> PathBuf {
        let p = dir.join(name);
        let f = File::create(&p).unwrap();
        f.set_len(size).unwrap();
        for (o, d) in data {
            f.write_all_at(d, *o).unwrap();
        }
        p
    }

    #[test]
    fn overlay_on_ext4_like_fs_leaves_rootfs_untouched_and_reuses_base() {
        let d = tempfile::tempdir().unwrap();
        let rootfs = sparse(
            d.path(),
            "rootfs.raw",
            64 << 20,
            &[(1024 + 56, &[0x53, 0xef])],
        );
        let before = fs::read(&rootfs).unwrap();
        let bases = d.path().join("bases");
        let a = prepare(&rootfs, &d.path().join("jobs/a"), &bases, None).unwrap();
        let b = prepare(&rootfs, &d.path().join("jobs/b"), &bases, None).unwrap();
        if a.kind == DiskKind::Reflink {
            // A reflink-capable filesystem: the other branch is covered elsewhere.
            assert_eq!(a.image_type(), "Raw");
            return;
        }
        assert_eq!(a.kind, DiskKind::Qcow2Overlay);
        assert_eq!(a.image_type(), "Qcow2");
        assert_eq!(a.base, b.base, "one cached base for both jobs");
        assert_eq!(
            fs::read_dir(&bases)
                .unwrap()
                .filter(|e| e
                    .as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "qcow2"))
                .count(),
            1
        );
        let r = qcow2::Reader::open(&a.path).unwrap();
        let mut got = vec![0u8; 2];
        r.read_at(&mut got, 1024 + 56).unwrap();
        assert_eq!(got, [0x53, 0xef]);
        assert_eq!(fs::read(&rootfs).unwrap(), before);
        // A rewritten rootfs (new mtime) gets a new base.
        std::thread::sleep(std::time::Duration::from_millis(20));
        File::options()
            .write(true)
            .open(&rootfs)
            .unwrap()
            .write_all_at(b"x", 0)
            .unwrap();
        let c = prepare(&rootfs, &d.path().join("jobs/c"), &bases, None).unwrap();
        assert_ne!(c.base, a.base);
        // The destination already existing is an error naming it, not an overwrite.
        let e = prepare(&rootfs, &d.path().join("jobs/a"), &bases, None).unwrap_err();
        assert!(matches!(e, DiskError::Exists(_)), "{e}");
        assert!(e.to_string().contains("jobs/a.qcow2"), "{e}");
    }

    #[test]
    fn rootfs_errors_name_the_path() {
        let d = tempfile::tempdir().unwrap();
        let e = prepare(
            &d.path().join("missing.raw"),
            &d.path().join("j"),
            d.path(),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("missing.raw"), "{e}");
        let empty = sparse(d.path(), "empty.raw", 0, &[]);
        assert!(matches!(
            prepare(&empty, &d.path().join("j"), d.path(), None),
            Err(DiskError::Empty(_))
        ));
        assert!(matches!(
            prepare(d.path(), &d.path().join("j"), d.path(), None),
            Err(DiskError::Rootfs { .. }) | Err(DiskError::NotAFile(_))
        ));
    }

    #[test]
    fn firmware_check() {
        use crate::rootfs::bootable;
        let d = tempfile::tempdir().unwrap();
        let ext4 = sparse(d.path(), "ext4.raw", 1 << 20, &[(1024 + 56, &[0x53, 0xef])]);
        let e = check_firmware_bootable(&ext4).unwrap_err().to_string();
        assert!(
            e.contains("bare ext2/3/4") && e.contains("--kernel") && e.contains("--bootable"),
            "{e}"
        );
        let blank = sparse(d.path(), "blank.raw", 1 << 20, &[]);
        assert!(check_firmware_bootable(&blank)
            .unwrap_err()
            .to_string()
            .contains("EFI PART"));

        // What `rootfs --bootable` writes: a BLS entry and systemd-boot.
        let k = bootable::tests::fake_bzimage(1 << 20);
        let entry = format!(
            "title t\nlinux {}\noptions root=PARTUUID=x\n",
            bootable::KERNEL_PATH
        );
        let conf = bootable::loader_conf();
        let full = d.path().join("full.raw");
        bootable::write_disk_with_esp(
            &full,
            &[
                (bootable::KERNEL_PATH, &k[..]),
                (bootable::LOADER_CONF, conf.as_bytes()),
                ("/loader/entries/chvkit.conf", entry.as_bytes()),
            ],
            1 << 20,
        )
        .unwrap();
        check_firmware_bootable(&full).unwrap();
        // The same through a qcow2 overlay-style file: converted, then checked.
        let q = d.path().join("full.qcow2");
        if crate::host::tools::find_in_path("qemu-img").is_some() {
            let o = std::process::Command::new("qemu-img")
                .args(["convert", "-O", "qcow2"])
                .arg(&full)
                .arg(&q)
                .output()
                .unwrap();
            assert!(o.status.success());
            check_firmware_bootable(&q).unwrap();
        }
        // A distribution cloud image: only \EFI\BOOT\BOOTX64.EFI.
        let cloud = d.path().join("cloud.raw");
        bootable::write_disk_with_esp(&cloud, &[(bootable::BOOTX64_PATH, &b"MZ.."[..])], 1 << 20)
            .unwrap();
        check_firmware_bootable(&cloud).unwrap();
        // An entry naming a kernel that is not there, and no fallback.
        let broken = d.path().join("broken.raw");
        bootable::write_disk_with_esp(
            &broken,
            &[("/loader/entries/x.conf", &b"linux /nope\n"[..])],
            1 << 20,
        )
        .unwrap();
        let e = check_firmware_bootable(&broken).unwrap_err().to_string();
        assert!(
            e.contains("neither a boot entry") && e.contains("/nope"),
            "{e}"
        );
        // An ESP that is not FAT.
        let nofat = d.path().join("nofat.raw");
        bootable::write_disk_with_esp(&nofat, &[], 1 << 20).unwrap();
        let f = OpenOptions::new().write(true).open(&nofat).unwrap();
        f.write_all_at(&[0u8; 4096], 1 << 20).unwrap();
        let e = check_firmware_bootable(&nofat).unwrap_err().to_string();
        assert!(e.contains("not a FAT filesystem"), "{e}");

        // A hand-made GPT header the firmware would reject (first usable LBA 0).
        let mut hdr = [0u8; 92];
        hdr[..8].copy_from_slice(b"EFI PART");
        hdr[72..80].copy_from_slice(&2u64.to_le_bytes());
        hdr[80..84].copy_from_slice(&4u32.to_le_bytes());
        hdr[84..88].copy_from_slice(&128u32.to_le_bytes());
        let bad = sparse(d.path(), "bad.raw", 1 << 20, &[(512, &hdr)]);
        let e = check_firmware_bootable(&bad).unwrap_err().to_string();
        assert!(e.contains("malformed"), "{e}");
        // A valid GPT without an ESP.
        hdr[40..48].copy_from_slice(&34u64.to_le_bytes());
        let no_esp = sparse(d.path(), "noesp.raw", 1 << 20, &[(512, &hdr)]);
        assert!(check_firmware_bootable(&no_esp)
            .unwrap_err()
            .to_string()
            .contains("no EFI System Partition"));
    }

    #[test]
    fn env_disk_is_padded_and_sources_in_a_shell() {
        let d = tempfile::tempdir().unwrap();
        let pairs = vec![
            ("CHECKER_JOB_ID".to_string(), "job-1".to_string()),
            ("X".to_string(), "it's $(not run)".to_string()),
        ];
        let p = d.path().join("env.img");
        write_env_disk(&p, &pairs).unwrap();
        let bytes = fs::read(&p).unwrap();
        assert_eq!(bytes.len() % ENV_DISK_ALIGN, 0);
        let text_len = bytes.iter().position(|b| *b == 0).unwrap();
        // What /init does: strip the NULs, source the rest.
        fs::write(d.path().join("env"), &bytes[..text_len]).unwrap();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                ". {}/env; printf '%s|%s' \"$CHECKER_JOB_ID\" \"$X\"",
                d.path().display()
            ))
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "job-1|it's $(not run)"
        );
        assert!(env_disk_bytes(&[("1BAD".into(), "v".into())]).is_err());
    }
}
