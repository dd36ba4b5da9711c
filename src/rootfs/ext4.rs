//! Packing a directory tree into a raw ext4 image.
//!
//! Fast path (measurements in docs/rootfs.md): `mkfs.ext4` makes the empty filesystem without
//! `metadata_csum` (the portable feature list, no 1.47-only options), chvkit's own writer
//! ([`super::populate`]) writes the tree into it — mke2fs -d would write file data one block
//! per syscall — while chvkit keeps starting writeback of the image, `tune2fs -O
//! metadata_csum` computes every checksum in one pass, and `e2fsck -fyD` follows only when a
//! directory spans more than one block (to index it) or tune2fs asks for it. The feature list
//! is explicit so guests with e2fsprogs older than 1.47 can still fsck and resize the image (no
//! `orphan_file`, no `metadata_csum_seed`). An image layout the writer does not recognise sends
//! the tree through `mkfs.ext4 -d` instead ([`mkfs_fast`], [`scan_inodes`]).
//!
//! Reproducibility: with an epoch, the UUID and hash seed are derived from a caller-given seed,
//! the writer makes every inode time a function of the input, and a last pass sets the
//! superblock times that tune2fs/e2fsck stamp, with the superblock checksum recomputed. Those
//! writes go through the page cache; [`pack`] fsyncs once at the end.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Features every ext4-capable guest e2fsprogs understands (facts §4).
pub const PORTABLE_FEATURES: &str = "none,has_journal,ext_attr,resize_inode,dir_index,filetype,extent,flex_bg,sparse_super,large_file,huge_file,dir_nlink,extra_isize";

#[derive(Debug, thiserror::Error)]
pub enum Ext4Error {
    #[error("`{tool}` is not installed: apt-get install e2fsprogs")]
    Missing { tool: &'static str },
    #[error("{tool} failed ({status}): {stderr}")]
    Tool {
        tool: &'static str,
        status: String,
        stderr: String,
    },
    #[error("not enough space for the image: {0}")]
    NoSpace(String),
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0}: not an ext4 image this pass understands ({1})")]
    Format(PathBuf, &'static str),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Ext4Error + '_ {
    move |source| Ext4Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What the tree needs, from one walk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TreeUsage {
    /// Sum of apparent sizes rounded up to 4 KiB blocks, plus one block per directory/symlink.
    pub bytes: u64,
    pub inodes: u64,
}

/// Walk `dir` without following symlinks; hard links count once.
pub fn tree_usage(dir: &Path) -> Result<TreeUsage, Ext4Error> {
    use std::collections::HashSet;
    use std::os::unix::fs::MetadataExt;
    let mut seen = HashSet::new();
    let mut u = TreeUsage::default();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let rd = std::fs::read_dir(&d).map_err(io_err(&d))?;
        for ent in rd {
            let ent = ent.map_err(io_err(&d))?;
            let p = ent.path();
            let md = std::fs::symlink_metadata(&p).map_err(io_err(&p))?;
            if md.nlink() > 1 && !md.is_dir() && !seen.insert((md.dev(), md.ino())) {
                continue;
            }
            u.inodes += 1;
            let ft = md.file_type();
            if ft.is_dir() {
                u.bytes += 4096;
                stack.push(p);
            } else if ft.is_file() {
                u.bytes += md.len().div_ceil(4096) * 4096;
            } else if ft.is_symlink() {
                u.bytes += 4096;
            }
        }
    }
    u.bytes += 4096;
    u.inodes += 1;
    Ok(u)
}

/// Headroom: a percentage of the tree size or an absolute byte count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Headroom {
    Percent(u32),
    Bytes(u64),
}

/// Image size for a tree: apparent size + headroom + ext4 metadata (inode tables, journal,
/// bitmaps), rounded up to 1 MiB. `inodes` is what to pass to `mkfs -N`.
pub fn plan_size(u: TreeUsage, headroom: Headroom) -> (u64, u64) {
    const MIB: u64 = 1 << 20;
    let extra = match headroom {
        Headroom::Percent(p) => u.bytes * u64::from(p) / 100,
        Headroom::Bytes(b) => b,
    };
    // Room for the files the image gains later plus some slack for tiny trees.
    let inodes = (u.inodes + u.inodes / 4 + 1024).max(4096);
    let data = u.bytes + extra;
    // 256-byte inodes; journal: mke2fs picks 4 MiB below 128 MiB, up to 64 MiB around 1 GiB;
    // bitmaps/descriptors/resize reserve ~1%.
    let journal = match data {
        d if d < 128 * MIB => 4 * MIB,
        d if d < 1024 * MIB => 16 * MIB,
        d if d < 4096 * MIB => 64 * MIB,
        _ => 128 * MIB,
    };
    let meta = inodes * 256 + journal + data / 64 + 2 * MIB;
    let size = (data + meta).div_ceil(MIB) * MIB;
    (size.max(16 * MIB), inodes)
}

/// Options for [`pack`].
#[derive(Debug, Clone)]
pub struct PackOpts {
    pub size_bytes: u64,
    pub inodes: u64,
    /// `Some(epoch)` = reproducible image (SOURCE_DATE_EPOCH).
    pub epoch: Option<i64>,
    /// Seed for the fixed UUID and hash seed (e.g. the cache key); only used with `epoch`.
    pub seed: String,
    pub label: Option<String>,
}

fn run_tool(tool: &'static str, cmd: &mut Command, ok: &[i32]) -> Result<(), Ext4Error> {
    let out = crate::rootfs::proc::output(cmd).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => Ext4Error::Missing { tool },
        _ => Ext4Error::Tool {
            tool,
            status: "not started".into(),
            stderr: e.to_string(),
        },
    })?;
    let code = out.status.code().unwrap_or(-1);
    if ok.contains(&code) {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let msg = if stderr.is_empty() { stdout } else { stderr };
    let lower = msg.to_lowercase();
    if lower.contains("no space left") || lower.contains("could not allocate block") {
        return Err(Ext4Error::NoSpace(msg));
    }
    Err(Ext4Error::Tool {
        tool,
        status: out.status.to_string(),
        stderr: msg,
    })
}

/// A v4-looking UUID derived from `seed` (stable across runs).
pub fn derived_uuid(seed: &str, salt: &str) -> String {
    use sha2::{Digest, Sha256};
    let h = Sha256::digest(format!("{salt}\0{seed}").as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&h[..16]);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let x = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &x[0..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..32]
    )
}

fn env_for(cmd: &mut Command, epoch: Option<i64>) {
    // Both names are read by different e2fsprogs versions; with neither set the tools use the
    // clock. The passes below fix whatever a given version still stamps.
    cmd.env_remove("MKE2FS_CONFIG");
    if let Some(t) = epoch {
        cmd.env("E2FSPROGS_FAKE_TIME", t.to_string())
            .env("SOURCE_DATE_EPOCH", t.to_string())
            .env("E2FSCK_TIME", t.to_string());
    }
}

/// The fallback for steps 1-2: `mkfs.ext4 -d` without metadata_csum.
pub fn mkfs_fast(tree: &Path, img: &Path, o: &PackOpts) -> Result<(), Ext4Error> {
    run_mkfs(Some(tree), img, o)
}

/// `mkfs.ext4` into a fresh all-zero sparse file of the full size (emptied first even if the
/// caller created it). On a regular file mke2fs "discards" by punching holes, knows that reads
/// back zeros, and so skips zeroing the inode tables; the journal is left lazy for the same
/// reason. With `tree` (`-d`), writeback of the image runs alongside.
fn run_mkfs(tree: Option<&Path>, img: &Path, o: &PackOpts) -> Result<(), Ext4Error> {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(img)
        .map_err(io_err(img))?;
    f.set_len(o.size_bytes).map_err(io_err(img))?;
    let mut cmd = mkfs_command(o);
    if let Some(t) = tree {
        cmd.arg("-d").arg(t);
    }
    cmd.arg(img);
    env_for(&mut cmd, o.epoch);
    match tree {
        Some(_) => with_writeback(&f, || run_tool("mkfs.ext4", &mut cmd, &[0])),
        None => run_tool("mkfs.ext4", &mut cmd, &[0]),
    }
}

/// `mkfs.ext4` with the image's geometry and features; the caller adds `-d` and the image.
fn mkfs_command(o: &PackOpts) -> Command {
    let mut cmd = Command::new("mkfs.ext4");
    cmd.args([
        "-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256", "-m", "0",
    ])
    .args(["-O", PORTABLE_FEATURES])
    .args(["-N", &o.inodes.to_string()])
    .args(["-E", &extended_opts(o)]);
    if let Some(l) = &o.label {
        cmd.args(["-L", l]);
    }
    if o.epoch.is_some() {
        cmd.args(["-U", &derived_uuid(&o.seed, "uuid")]);
    }
    cmd
}

fn extended_opts(o: &PackOpts) -> String {
    // Not `assume_storage_prezeroed` (e2fsprogs >= 1.47 only): the default discard gives the
    // same on a regular file with every version.
    let mut e = String::from("lazy_journal_init=1");
    if o.epoch.is_some() {
        e.push_str(",hash_seed=");
        e.push_str(&derived_uuid(&o.seed, "hash"));
    }
    e
}

/// How often [`with_writeback`] starts writeback of the image's dirty pages.
const WRITEBACK_EVERY: Duration = Duration::from_millis(100);

/// Run `f` (mkfs writing `file`) while asking the kernel every [`WRITEBACK_EVERY`] to start
/// writing the file's dirty pages. mke2fs leaves everything in the page cache and fsyncs once at
/// the end, so the disk would sit idle while it computes and then everything waits for the
/// whole image to be written; this overlaps the two (the closing fsync finds little left).
/// `SYNC_FILE_RANGE_WRITE` only starts I/O and never waits for it; failures cost speed only.
fn with_writeback<T>(file: &File, f: impl FnOnce() -> T) -> T {
    use std::os::fd::AsRawFd;
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let flusher = s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                std::thread::park_timeout(WRITEBACK_EVERY);
                // SAFETY: plain syscall on an fd that outlives this scope.
                unsafe {
                    libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE)
                };
            }
        });
        let r = f();
        stop.store(true, Ordering::Relaxed);
        flusher.thread().unpark();
        r
    })
}

/// Step 3: enable metadata_csum (tune2fs rewrites every checksum itself).
pub fn enable_csum(img: &Path, epoch: Option<i64>) -> Result<(), Ext4Error> {
    let mut t = Command::new("tune2fs");
    t.args(["-O", "metadata_csum"]).arg(img);
    env_for(&mut t, epoch);
    run_tool("tune2fs", &mut t, &[0])
}

/// Did tune2fs ask for an fsck? It clears `EXT2_VALID_FS` in `s_state` when it could not
/// finish on its own (e.g. a directory block with no room for its checksum tail: "please run
/// e2fsck -fD").
pub fn fsck_requested(img: &Path) -> Result<bool, Ext4Error> {
    let f = File::open(img).map_err(io_err(img))?;
    let (sb, _) = read_sb(&f, img)?;
    let state = le16(&sb, 0x3A);
    Ok(state & 1 == 0 || state & 2 != 0)
}

/// Step 4 (when needed): check, and rebuild directories (`-D` also indexes the multi-block
/// ones, which `mkfs -d` leaves linear).
pub fn fsck_dirs(img: &Path, epoch: Option<i64>) -> Result<(), Ext4Error> {
    let mut c = Command::new("e2fsck");
    c.args(["-f", "-y", "-D"]).arg(img);
    env_for(&mut c, epoch);
    // 1: "errors corrected" — -D always rewrites directories; 2 would ask for a reboot.
    run_tool("e2fsck", &mut c, &[0, 1, 2])
}

/// `e2fsck -fn`: read-only verification.
pub fn verify(img: &Path) -> Result<(), Ext4Error> {
    let mut c = Command::new("e2fsck");
    c.args(["-f", "-n"]).arg(img);
    run_tool("e2fsck", &mut c, &[0])
}

/// The feature names `dumpe2fs -h` reports, sorted.
pub fn features(img: &Path) -> Result<Vec<String>, Ext4Error> {
    let out = crate::rootfs::proc::output(Command::new("dumpe2fs").arg("-h").arg(img))
        .map_err(|_| Ext4Error::Missing { tool: "dumpe2fs" })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut f: Vec<String> = text
        .lines()
        .find_map(|l| l.strip_prefix("Filesystem features:"))
        .unwrap_or("")
        .split_whitespace()
        .map(str::to_string)
        .collect();
    f.sort();
    Ok(f)
}

// ---- in-place timestamp normalisation --------------------------------------------------------

struct Sb {
    block_size: u64,
    inodes_per_group: u64,
    inode_size: u64,
    groups: u64,
    first_data_block: u64,
    blocks_per_group: u64,
    desc_size: u64,
}

/// Little-endian fields of on-disk structures (here and in [`super::populate`]).
pub(super) fn le16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

pub(super) fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

pub(super) fn put16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}

pub(super) fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

fn read_sb(f: &File, img: &Path) -> Result<(Vec<u8>, Sb), Ext4Error> {
    let mut sb = vec![0u8; 1024];
    f.read_exact_at(&mut sb, 1024).map_err(io_err(img))?;
    if le16(&sb, 0x38) != 0xEF53 {
        return Err(Ext4Error::Format(img.to_path_buf(), "bad magic"));
    }
    let log = le32(&sb, 0x18);
    if log > 6 {
        return Err(Ext4Error::Format(img.to_path_buf(), "block size"));
    }
    let block_size = 1024u64 << log;
    let blocks = u64::from(le32(&sb, 0x4));
    let bpg = u64::from(le32(&sb, 0x20));
    let ipg = u64::from(le32(&sb, 0x28));
    let first = u64::from(le32(&sb, 0x14));
    let inode_size = u64::from(le16(&sb, 0x58));
    let incompat = le32(&sb, 0x60);
    let desc_size = if incompat & 0x80 != 0 {
        u64::from(le16(&sb, 0xFE)).max(32)
    } else {
        32
    };
    if bpg == 0 || ipg == 0 || inode_size < 128 {
        return Err(Ext4Error::Format(img.to_path_buf(), "geometry"));
    }
    let groups = (blocks - first).div_ceil(bpg);
    Ok((
        sb,
        Sb {
            block_size,
            inodes_per_group: ipg,
            inode_size,
            groups,
            first_data_block: first,
            blocks_per_group: bpg,
            desc_size,
        },
    ))
}

/// Encode a time for the 32-bit field plus the "extra" epoch bits (nanoseconds zero).
pub(super) fn time_fields(t: i64) -> (u32, u32) {
    let lo = t as i32 as u32;
    let epoch_bits = ((t - i64::from(lo as i32)) >> 32) as u32 & 3;
    (lo, epoch_bits)
}

/// What [`scan_inodes`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InodeScan {
    pub in_use: u64,
    /// Directories larger than one block, lost+found aside (mke2fs makes it 4 blocks, empty):
    /// `mkfs -d` leaves them linear (no htree index).
    pub multiblock_dirs: u64,
}

/// One pass over the inode tables (before metadata_csum: no inode checksums to fix up). Counts
/// multi-block directories and, with `epoch`, sets atime/ctime/crtime of every in-use inode to
/// it and clamps mtime to it. Writes through the page cache only: [`pack`] fsyncs once at the end.
pub fn scan_inodes(img: &Path, epoch: Option<i64>) -> Result<InodeScan, Ext4Error> {
    let f = OpenOptions::new()
        .read(true)
        .write(epoch.is_some())
        .open(img)
        .map_err(io_err(img))?;
    let (sb, g) = read_sb(&f, img)?;
    if epoch.is_some() && le32(&sb, 0x64) & 0x400 != 0 {
        return Err(Ext4Error::Format(
            img.to_path_buf(),
            "metadata_csum already on",
        ));
    }
    let mut scan = InodeScan::default();
    // mke2fs creates lost+found first, as the first non-reserved inode.
    let lost_found = u64::from(le32(&sb, 0x54));
    let gdt_block = g.first_data_block + 1;
    let mut gdt = vec![0u8; (g.groups * g.desc_size) as usize];
    f.read_exact_at(&mut gdt, gdt_block * g.block_size)
        .map_err(io_err(img))?;
    let isz = g.inode_size as usize;
    let mut buf = vec![0u8; (g.inodes_per_group * g.inode_size) as usize];
    for grp in 0..g.groups as usize {
        let d = &gdt[grp * g.desc_size as usize..];
        let mut itable = u64::from(le32(d, 8));
        if g.desc_size >= 64 {
            itable |= u64::from(le32(d, 0x28)) << 32;
        }
        let off = itable * g.block_size;
        f.read_exact_at(&mut buf, off).map_err(io_err(img))?;
        let mut dirty = false;
        for (i, ino) in buf.chunks_exact_mut(isz).enumerate() {
            let mode = le16(ino, 0);
            let links = le16(ino, 0x1A);
            if mode == 0 && links == 0 {
                continue;
            }
            scan.in_use += 1;
            let number = grp as u64 * g.inodes_per_group + i as u64 + 1;
            let size = u64::from(le32(ino, 0x04)) | u64::from(le32(ino, 0x6C)) << 32;
            if mode & 0xF000 == 0x4000 && size > g.block_size && number != lost_found {
                scan.multiblock_dirs += 1;
            }
            if let Some(t) = epoch {
                set_inode_times(ino, t);
                dirty = true;
            }
        }
        if dirty {
            f.write_all_at(&buf, off).map_err(io_err(img))?;
        }
    }
    Ok(scan)
}

/// The epoch rule on one on-disk inode: atime, ctime and crtime become `epoch`, mtime is
/// clamped to it, nanoseconds go. Fields beyond the inode's `i_extra_isize` are left alone.
pub(super) fn set_inode_times(ino: &mut [u8], epoch: i64) {
    let (lo, hi) = time_fields(epoch);
    put32(ino, 0x08, lo); // atime
    put32(ino, 0x0C, lo); // ctime
    let mtime = i64::from(le32(ino, 0x10) as i32);
    let extra = if ino.len() > 128 {
        le16(ino, 0x80) as usize
    } else {
        0
    };
    let mtime_hi = if extra >= 0x0C {
        i64::from(le32(ino, 0x88) & 3)
    } else {
        0
    };
    if mtime + (mtime_hi << 32) > epoch {
        put32(ino, 0x10, lo);
        if extra >= 0x0C {
            put32(ino, 0x88, hi);
        }
    } else if extra >= 0x0C {
        // Keep the epoch bits, drop nanoseconds (tar headers rarely carry them anyway).
        put32(ino, 0x88, mtime_hi as u32);
    }
    if extra >= 0x08 {
        put32(ino, 0x84, hi); // ctime_extra
    }
    if extra >= 0x10 {
        put32(ino, 0x8C, hi); // atime_extra
    }
    if extra >= 0x18 {
        put32(ino, 0x90, lo); // crtime
        put32(ino, 0x94, hi); // crtime_extra
    }
}

fn is_backup_group(g: u64) -> bool {
    if g <= 1 {
        return true;
    }
    for base in [3u64, 5, 7] {
        let mut n = base;
        while n < g {
            n *= base;
        }
        if n == g {
            return true;
        }
    }
    false
}

/// Set the superblock time fields (primary and backups) to `epoch` and recompute each copy's
/// checksum. The last step of a reproducible pack: tune2fs and e2fsck stamp the clock there.
pub fn normalize_superblock_times(img: &Path, epoch: i64) -> Result<(), Ext4Error> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(img)
        .map_err(io_err(img))?;
    let (_, g) = read_sb(&f, img)?;
    let (lo, _) = time_fields(epoch);
    for grp in 0..g.groups {
        if !is_backup_group(grp) {
            continue;
        }
        let off = if grp == 0 {
            1024
        } else {
            (g.first_data_block + grp * g.blocks_per_group) * g.block_size
        };
        let mut sb = vec![0u8; 1024];
        f.read_exact_at(&mut sb, off).map_err(io_err(img))?;
        if le16(&sb, 0x38) != 0xEF53 {
            continue;
        }
        // s_mtime, s_wtime, s_lastcheck, s_mkfs_time: only those a tool stamped (a never-mounted
        // image keeps "n/a").
        for field in [0x2C, 0x30, 0x40, 0x108] {
            if le32(&sb, field) != 0 {
                put32(&mut sb, field, lo);
            }
        }
        // The *_hi bytes (s_wtime_hi, s_mtime_hi, s_mkfs_time_hi, s_lastcheck_hi): unsigned.
        for field in [0x274, 0x275, 0x276, 0x277] {
            sb[field] = (epoch >> 32) as u8;
        }
        if le32(&sb, 0x64) & 0x400 != 0 {
            let c = crc32c(!0, &sb[..0x3FC]);
            put32(&mut sb, 0x3FC, c);
        }
        f.write_all_at(&sb, off).map_err(io_err(img))?;
    }
    Ok(())
}

/// CRC32C (Castagnoli) without the final inversion, as ext4 uses it.
pub(super) fn crc32c(mut crc: u32, data: &[u8]) -> u32 {
    const POLY: u32 = 0x82F6_3B78;
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let t = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { (c >> 1) ^ POLY } else { c >> 1 };
            }
            *e = c;
        }
        t
    });
    for b in data {
        crc = t[((crc ^ u32::from(*b)) & 0xff) as usize] ^ (crc >> 8);
    }
    crc
}

/// Where one [`pack`] spent its time, and what it ran.
#[derive(Debug, Clone, Default)]
pub struct PackReport {
    /// `mkfs.ext4` of the empty filesystem (or of the whole tree on the fallback path).
    pub mkfs: Duration,
    /// chvkit's own writer ([`populate`](super::populate)); zero on the fallback path.
    pub populate: Duration,
    /// The inode pass of the fallback path; zero otherwise.
    pub scan: Duration,
    pub tune2fs: Duration,
    /// `None` when e2fsck was not needed (see [`pack`]).
    pub e2fsck: Option<Duration>,
    /// The final superblock pass (epoch only) and the one fsync.
    pub sync: Duration,
    pub inodes: InodeScan,
    /// Why the tree went through `mkfs.ext4 -d` instead of chvkit's writer, if it did.
    pub fallback: Option<String>,
}

/// The whole packing stage; the image is durable (fsynced) when it returns.
pub fn pack(tree: &Path, img: &Path, o: &PackOpts) -> Result<(), Ext4Error> {
    pack_report(tree, img, o).map(|_| ())
}

/// Step 1 of the fast path: the empty filesystem, with the same options as [`mkfs_fast`].
pub fn mkfs_empty(img: &Path, o: &PackOpts) -> Result<(), Ext4Error> {
    run_mkfs(None, img, o)
}

/// Step 2: the tree, written by chvkit into the empty filesystem while writeback of the image
/// runs alongside (see [`with_writeback`]).
fn populate_tree(
    tree: &Path,
    img: &Path,
    o: &PackOpts,
) -> Result<super::populate::PopulateStats, Ext4Error> {
    let f = File::open(img).map_err(io_err(img))?;
    let opts = super::populate::PopulateOpts {
        epoch: o.epoch,
        ..Default::default()
    };
    with_writeback(&f, || super::populate::populate(tree, img, &opts))
}

/// [`pack`], timing each step. `e2fsck -fyD` runs only when tune2fs asks for it or a directory
/// spans more than one block (to index it); otherwise the image is already clean (the verify
/// stage's `e2fsck -fn` checks every image anyway), and a fsck would only cost time.
pub fn pack_report(tree: &Path, img: &Path, o: &PackOpts) -> Result<PackReport, Ext4Error> {
    pack_steps(tree, img, o).map_err(|e| match e {
        // The filesystem holding the image is full (chvkit's own writes; the tools' messages
        // are recognised in `run_tool`, and a full image is NoSpace already, with counts).
        Ext4Error::Io { path, source } if source.raw_os_error() == Some(libc::ENOSPC) => {
            Ext4Error::NoSpace(format!("{}: {source}", path.display()))
        }
        e => e,
    })
}

fn pack_steps(tree: &Path, img: &Path, o: &PackOpts) -> Result<PackReport, Ext4Error> {
    let mut r = PackReport::default();
    let t = Instant::now();
    mkfs_empty(img, o)?;
    r.mkfs = t.elapsed();
    let t = Instant::now();
    match populate_tree(tree, img, o) {
        Ok(st) => {
            r.populate = t.elapsed();
            r.inodes = InodeScan {
                in_use: st.inodes_used,
                multiblock_dirs: st.multiblock_dirs,
            };
        }
        // The writer checks the layout mkfs made before writing anything; an mke2fs that lays
        // out differently than it understands gets the slower, general path instead.
        Err(Ext4Error::Format(_, why)) => {
            tracing::warn!("chvkit's ext4 writer refused the image ({why}); using mkfs.ext4 -d");
            r.fallback = Some(why.to_string());
            let t = Instant::now();
            mkfs_fast(tree, img, o)?;
            r.mkfs = t.elapsed();
            let t = Instant::now();
            r.inodes = scan_inodes(img, o.epoch)?;
            r.scan = t.elapsed();
        }
        Err(e) => return Err(e),
    }
    let t = Instant::now();
    enable_csum(img, o.epoch)?;
    r.tune2fs = t.elapsed();
    if r.inodes.multiblock_dirs > 0 || fsck_requested(img)? {
        let t = Instant::now();
        fsck_dirs(img, o.epoch)?;
        r.e2fsck = Some(t.elapsed());
    }
    let t = Instant::now();
    if let Some(e) = o.epoch {
        normalize_superblock_times(img, e)?;
    }
    // The tools fsync what they write; this covers chvkit's own writes (one fsync in all).
    File::open(img)
        .and_then(|f| f.sync_all())
        .map_err(io_err(img))?;
    r.sync = t.elapsed();
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_known_value() {
        // RFC 3720 test vector: 32 bytes of zeros -> 0x8A9136AA (with inversions).
        assert_eq!(!crc32c(!0, &[0u8; 32]), 0x8A91_36AA);
    }

    #[test]
    fn backup_groups() {
        let b: Vec<u64> = (0..50).filter(|g| is_backup_group(*g)).collect();
        assert_eq!(b, vec![0, 1, 3, 5, 7, 9, 25, 27, 49]);
    }

    #[test]
    fn sizing_has_room() {
        let u = TreeUsage {
            bytes: 300 << 20,
            inodes: 20_000,
        };
        let (size, inodes) = plan_size(u, Headroom::Percent(20));
        assert!(size > (360 << 20));
        assert!(inodes >= 25_000);
        assert_eq!(size % (1 << 20), 0);
        let (s2, _) = plan_size(u, Headroom::Bytes(0));
        assert!(s2 < size);
    }

    /// A tree (with one directory too big for a block if `big`), packed by the fast path.
    fn packed(epoch: Option<i64>, big: bool) -> Option<(tempfile::TempDir, PathBuf, PackReport)> {
        if crate::rootfs::proc::which("mkfs.ext4").is_none() {
            crate::testutil::skip("ext4 pack test", "mkfs.ext4 not installed");
            return None;
        }
        let d = tempfile::tempdir().unwrap();
        let tree = d.path().join("tree");
        std::fs::create_dir_all(tree.join("big")).unwrap();
        std::fs::create_dir_all(tree.join("small")).unwrap();
        for i in 0..if big { 400 } else { 20 } {
            std::fs::write(tree.join("big").join(format!("entry-{i:04}")), b"x").unwrap();
        }
        std::fs::write(tree.join("small/f"), vec![7u8; 10_000]).unwrap();
        let u = tree_usage(&tree).unwrap();
        let (size, inodes) = plan_size(u, Headroom::Percent(20));
        let img = d.path().join("img.raw");
        let o = PackOpts {
            size_bytes: size,
            inodes,
            epoch,
            seed: "test".into(),
            label: None,
        };
        let r = pack_report(&tree, &img, &o).unwrap();
        Some((d, img, r))
    }

    #[test]
    fn pack_indexes_big_dirs_and_ends_clean() {
        let Some((_d, img, r)) = packed(None, true) else {
            return;
        };
        assert_eq!(r.inodes.multiblock_dirs, 1, "{r:?}");
        assert!(r.e2fsck.is_some(), "a multi-block dir must get e2fsck -D");
        verify(&img).unwrap();
        assert!(!fsck_requested(&img).unwrap());
        let f = features(&img).unwrap();
        let mut want: Vec<String> = PORTABLE_FEATURES
            .split(',')
            .filter(|x| *x != "none")
            .chain(["metadata_csum"])
            .map(str::to_string)
            .collect();
        want.sort();
        assert_eq!(f, want);
        // The clean state tune2fs leaves is what lets pack skip e2fsck; a cleared
        // EXT2_VALID_FS (what tune2fs does when it wants a fsck) must be seen.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&img)
            .unwrap();
        let mut st = [0u8; 2];
        file.read_exact_at(&mut st, 1024 + 0x3A).unwrap();
        file.write_all_at(&[st[0] & !1, st[1]], 1024 + 0x3A)
            .unwrap();
        assert!(fsck_requested(&img).unwrap());
    }

    #[test]
    fn pack_skips_e2fsck_when_nothing_needs_it() {
        let Some((_d, img, r)) = packed(None, false) else {
            return;
        };
        assert_eq!(r.inodes.multiblock_dirs, 0, "{r:?}");
        assert!(r.e2fsck.is_none(), "{r:?}");
        verify(&img).unwrap();
        assert!(features(&img)
            .unwrap()
            .contains(&"metadata_csum".to_string()));
    }

    #[test]
    fn pack_is_reproducible_with_an_epoch() {
        let Some((_a, img_a, _)) = packed(Some(1_700_000_000), true) else {
            return;
        };
        let Some((_b, img_b, _)) = packed(Some(1_700_000_000), true) else {
            return;
        };
        verify(&img_a).unwrap();
        assert!(std::fs::read(&img_a).unwrap() == std::fs::read(&img_b).unwrap());
    }

    #[test]
    fn uuid_is_stable_and_v4_shaped() {
        let a = derived_uuid("k", "uuid");
        assert_eq!(a, derived_uuid("k", "uuid"));
        assert_ne!(a, derived_uuid("k", "hash"));
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
    }
}
