//! Writing a directory tree into a freshly made, empty ext4 image (what `mkfs.ext4 -d` does,
//! several times faster).
//!
//! mke2fs -d writes file data one 4 KiB block per `pwrite64`; for a 300 MB tree that is ~90k
//! syscalls. Here every piece of metadata (inodes, directories, extent trees, xattr blocks,
//! bitmaps, descriptors) is built in memory and written in a few large writes, and file data is
//! laid out in contiguous extents and copied with `copy_file_range` (in-kernel, whole files),
//! on worker threads while the metadata is being written.
//!
//! The image must come straight from `mkfs.ext4` without `metadata_csum` or `64bit` (see
//! [`populate`]): nothing here computes a checksum. `tune2fs -O metadata_csum` adds them all
//! afterwards; so that it can do that in place, every directory block ends with an empty
//! checksum tail and extent blocks keep room for theirs.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex};

use super::ext4::{le16, le32, put16, put32};
use crate::rootfs::ext4::Ext4Error;

/// Options for [`populate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PopulateOpts {
    /// `Some(t)`: reproducible times (atime = ctime = crtime = t, mtime clamped to t, no
    /// nanoseconds), as `ext4::scan_inodes` does after `mkfs -d`.
    pub epoch: Option<i64>,
    /// Longest extent in blocks (clamped to 1..=32768). Only tests lower it, to force deep
    /// extent trees on small files.
    pub max_extent_blocks: u32,
}

impl Default for PopulateOpts {
    fn default() -> Self {
        PopulateOpts {
            epoch: None,
            max_extent_blocks: MAX_EXTENT_LEN,
        }
    }
}

/// What [`populate`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PopulateStats {
    /// Inodes in use in the image afterwards, the reserved ones (1-11) included.
    pub inodes_used: u64,
    /// Directories written, the root included (lost+found is mkfs's, not counted).
    pub dirs: u64,
    /// Directories that span more than one block: they need `e2fsck -fyD` to be indexed.
    pub multiblock_dirs: u64,
    /// File bytes copied (holes of sparse files excluded).
    pub data_bytes: u64,
    /// Regular-file inodes (a file with several hard links counts once).
    pub files: u64,
}

const BS: usize = 4096;
const BS64: u64 = BS as u64;
const ROOT_INO: u32 = 2;
const LOST_FOUND_INO: u32 = 11;
const FIRST_INO: u32 = 12;
/// Room for the checksum and the nanosecond/crtime fields; what mke2fs asks for.
const EXTRA_ISIZE: usize = 32;
/// `ext4_dir_entry_tail`: 12 bytes tune2fs fills with the block's checksum.
const DIR_TAIL: usize = 12;
const MAX_EXTENT_LEN: u32 = 32768;
/// Above this a directory's link count becomes 1 (dir_nlink); files may not exceed it.
const LINK_MAX: u32 = 65000;
const EXTENTS_FL: u32 = 0x80000;
const EXT_MAGIC: u16 = 0xF30A;
const XATTR_MAGIC: u32 = 0xEA02_0000;
/// Entries per extent block: 12-byte header, 12-byte entries; the last 4 bytes stay free for
/// the checksum tail tune2fs writes.
const EXTENTS_PER_BLOCK: usize = (BS - 12) / 12;
const IBLOCK: usize = 0x28;

const COMPAT_EXT_ATTR: u32 = 0x8;
const INCOMPAT_FILETYPE: u32 = 0x2;
const INCOMPAT_EXTENTS: u32 = 0x40;
const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_FLEX_BG: u32 = 0x200;
const RO_COMPAT_LARGE_FILE: u32 = 0x2;
const RO_COMPAT_DIR_NLINK: u32 = 0x20;
const RO_COMPAT_METADATA_CSUM: u32 = 0x400;
/// sparse_super, large_file, huge_file, dir_nlink, extra_isize: nothing here depends on them
/// beyond what is handled. Anything else (gdt_csum, bigalloc, quota...) changes layout or
/// needs checksums, so such images are refused.
const RO_COMPAT_OK: u32 = 0x1 | 0x2 | 0x8 | 0x20 | 0x40;
const INCOMPAT_OK: u32 = INCOMPAT_FILETYPE | INCOMPAT_EXTENTS | INCOMPAT_FLEX_BG;

const FT_REG: u8 = 1;
const FT_DIR: u8 = 2;
const FT_CHR: u8 = 3;
const FT_BLK: u8 = 4;
const FT_FIFO: u8 = 5;
const FT_SOCK: u8 = 6;
const FT_LNK: u8 = 7;

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> Ext4Error + '_ {
    move |source| Ext4Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// An input the image cannot represent, named by its path.
fn unfit(path: &Path, what: String) -> Ext4Error {
    Ext4Error::Io {
        path: path.to_path_buf(),
        source: io::Error::new(io::ErrorKind::InvalidInput, what),
    }
}

fn cstr(path: &Path) -> Result<CString, Ext4Error> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| unfit(path, "path contains a NUL byte".into()))
}

// ---- the empty image ---------------------------------------------------------------------------

/// The parts of an empty image this pass reads and rewrites.
struct Fs {
    sb: Vec<u8>,
    gdt: Vec<u8>,
    groups: usize,
    blocks: u64,
    bpg: u64,
    ipg: u64,
    inode_size: usize,
    compat: u32,
    ro_compat: u32,
    /// One block per group, concatenated (bit i of group g's block = block g*bpg+i).
    block_bitmap: Vec<u8>,
    inode_bitmap: Vec<u8>,
    /// As read, to write back only the bitmaps that changed.
    old_block_bitmap: Vec<u8>,
    old_inode_bitmap: Vec<u8>,
}

const GD_SIZE: usize = 32;

/// Clear bits among the first `n` of `bm`.
fn zero_bits(bm: &[u8], n: u64) -> u64 {
    let full = (n / 8) as usize;
    let mut ones: u64 = bm[..full].iter().map(|b| u64::from(b.count_ones())).sum();
    let rest = n % 8;
    if rest != 0 {
        ones += u64::from((bm[full] & ((1u8 << rest) - 1)).count_ones());
    }
    n - ones
}

impl Fs {
    fn open(f: &File, img: &Path) -> Result<Fs, Ext4Error> {
        let fmt = |why| Ext4Error::Format(img.to_path_buf(), why);
        let mut sb = vec![0u8; 1024];
        f.read_exact_at(&mut sb, 1024).map_err(io_at(img))?;
        if le16(&sb, 0x38) != 0xEF53 {
            return Err(fmt("no ext4 superblock"));
        }
        if le32(&sb, 0x18) != 2 {
            return Err(fmt("block size is not 4096"));
        }
        if le32(&sb, 0x4C) < 1 || usize::from(le16(&sb, 0x58)) < 256 {
            return Err(fmt("inode size below 256"));
        }
        let compat = le32(&sb, 0x5C);
        let incompat = le32(&sb, 0x60);
        let ro_compat = le32(&sb, 0x64);
        if ro_compat & RO_COMPAT_METADATA_CSUM != 0 {
            return Err(fmt("metadata_csum is on (add it after populating)"));
        }
        if incompat & INCOMPAT_64BIT != 0 {
            return Err(fmt("64bit is on (32-byte group descriptors expected)"));
        }
        if incompat & !INCOMPAT_OK != 0 || ro_compat & !RO_COMPAT_OK != 0 {
            return Err(fmt("a feature outside the portable set is on"));
        }
        if incompat & (INCOMPAT_FILETYPE | INCOMPAT_EXTENTS) != INCOMPAT_FILETYPE | INCOMPAT_EXTENTS
        {
            return Err(fmt("filetype or extent feature is off"));
        }
        if le32(&sb, 0x14) != 0 || le32(&sb, 0x54) != LOST_FOUND_INO {
            return Err(fmt("unexpected first data block or first inode"));
        }
        let blocks = u64::from(le32(&sb, 0x04));
        let bpg = u64::from(le32(&sb, 0x20));
        let ipg = u64::from(le32(&sb, 0x28));
        let inode_size = usize::from(le16(&sb, 0x58));
        if bpg == 0 || bpg > 8 * BS64 || ipg == 0 || ipg > 8 * BS64 || blocks == 0 {
            return Err(fmt("group geometry"));
        }
        let groups = blocks.div_ceil(bpg) as usize;
        if u64::from(le32(&sb, 0x00)) != groups as u64 * ipg {
            return Err(fmt("inode count does not match the groups"));
        }
        let mut gdt = vec![0u8; (groups * GD_SIZE).div_ceil(BS) * BS];
        f.read_exact_at(&mut gdt, BS64).map_err(io_at(img))?;
        let mut block_bitmap = vec![0u8; groups * BS];
        let mut inode_bitmap = vec![0u8; groups * BS];
        for g in 0..groups {
            let d = &gdt[g * GD_SIZE..];
            // Without gdt_csum these flags mean nothing to the kernel, but a set one would say
            // the bitmap on disk is not to be trusted.
            if le16(d, 0x12) & 3 != 0 {
                return Err(fmt("uninitialised block groups"));
            }
            let (bb, ib) = (u64::from(le32(d, 0)), u64::from(le32(d, 4)));
            if bb >= blocks || ib >= blocks || u64::from(le32(d, 8)) >= blocks {
                return Err(fmt("group descriptor points outside the image"));
            }
            f.read_exact_at(&mut block_bitmap[g * BS..(g + 1) * BS], bb * BS64)
                .map_err(io_at(img))?;
            f.read_exact_at(&mut inode_bitmap[g * BS..(g + 1) * BS], ib * BS64)
                .map_err(io_at(img))?;
        }
        if ipg < u64::from(FIRST_INO) {
            return Err(fmt("fewer than 12 inodes per group"));
        }
        // Inodes 1-11 in use (reserved, root, lost+found) and nothing else.
        for g in 0..groups {
            let bm = &inode_bitmap[g * BS..(g + 1) * BS];
            let expect = if g == 0 { ipg - 11 } else { ipg };
            let skip = if g == 0 { 11 } else { 0 };
            let free = if g == 0 {
                (11..ipg)
                    .filter(|i| bm[(*i / 8) as usize] & (1 << (*i % 8)) == 0)
                    .count() as u64
            } else {
                zero_bits(bm, ipg)
            };
            if free != expect || (g == 0 && zero_bits(bm, skip) != 0) {
                return Err(fmt("inodes beyond 11 are in use: not an empty image"));
            }
        }
        Ok(Fs {
            sb,
            gdt,
            groups,
            blocks,
            bpg,
            ipg,
            inode_size,
            compat,
            ro_compat,
            old_block_bitmap: block_bitmap.clone(),
            old_inode_bitmap: inode_bitmap.clone(),
            block_bitmap,
            inode_bitmap,
        })
    }

    fn mark_inode(&mut self, ino: u64) {
        let (g, i) = ((ino - 1) / self.ipg, (ino - 1) % self.ipg);
        self.inode_bitmap[g as usize * BS + (i / 8) as usize] |= 1 << (i % 8);
    }

    fn inode_table(&self, g: usize) -> u64 {
        u64::from(le32(&self.gdt, g * GD_SIZE + 8))
    }

    fn free_inodes(&self) -> u64 {
        (0..self.groups)
            .map(|g| zero_bits(&self.inode_bitmap[g * BS..(g + 1) * BS], self.ipg))
            .sum()
    }
}

/// First-fit block allocation over the block bitmap. Allocation never frees, so everything
/// below the cursor is in use and the scan for a free block starts there.
struct Alloc {
    /// The block bitmap, moved out of [`Fs`] while blocks are handed out.
    bm: Vec<u8>,
    bpg: u64,
    blocks: u64,
    cursor: u64,
    /// Blocks handed out so far (for the "needed" figure of an out-of-space error).
    taken: u64,
}

impl Alloc {
    fn bit(&self, b: u64) -> (usize, u8) {
        let (g, i) = (b / self.bpg, b % self.bpg);
        (g as usize * BS + (i / 8) as usize, 1 << (i % 8))
    }

    fn used(&self, b: u64) -> bool {
        let (byte, m) = self.bit(b);
        self.bm[byte] & m != 0
    }

    fn set(&mut self, b: u64) {
        let (byte, m) = self.bit(b);
        self.bm[byte] |= m;
    }

    fn clear(&mut self, b: u64) {
        let (byte, m) = self.bit(b);
        self.bm[byte] &= !m;
    }

    fn free_count(&self) -> u64 {
        (0..self.blocks.div_ceil(self.bpg))
            .map(|g| {
                let n = (self.blocks - g * self.bpg).min(self.bpg);
                zero_bits(&self.bm[g as usize * BS..(g as usize + 1) * BS], n)
            })
            .sum()
    }

    /// The next free run, up to `want` blocks, marked used.
    fn run(&mut self, want: u64) -> Option<(u64, u64)> {
        let mut b = self.cursor;
        while b < self.blocks && self.used(b) {
            // Whole bytes of used blocks at a time: group metadata is thousands of blocks.
            let (byte, _) = self.bit(b);
            if b % 8 == 0 && self.bm[byte] == 0xFF && (b % self.bpg) + 8 <= self.bpg {
                b += 8;
            } else {
                b += 1;
            }
        }
        if b >= self.blocks {
            self.cursor = self.blocks;
            return None;
        }
        let mut e = b;
        while e < self.blocks && e - b < want && !self.used(e) {
            self.set(e);
            e += 1;
        }
        self.cursor = e;
        self.taken += e - b;
        Some((b, e - b))
    }
}

// ---- the tree ----------------------------------------------------------------------------------

struct Dirent {
    name: Vec<u8>,
    ino: u32,
    ftype: u8,
}

enum Kind {
    Dir {
        parent: u32,
        entries: Vec<Dirent>,
    },
    File {
        size: u64,
        /// Block ranges (first, count) holding data; holes of sparse files stay unallocated.
        data: Vec<(u64, u64)>,
    },
    Symlink(Vec<u8>),
    Dev(u64),
    /// FIFO or socket: nothing but the inode.
    Node,
}

struct Xattr {
    index: u8,
    name: Vec<u8>,
    value: Vec<u8>,
}

struct Node {
    path: PathBuf,
    mode: u16,
    uid: u32,
    gid: u32,
    atime: (i64, u32),
    mtime: (i64, u32),
    ctime: (i64, u32),
    links: u32,
    kind: Kind,
    xattrs: Vec<Xattr>,
}

/// `nodes[0]` is the root (inode 2); `nodes[k]` for k >= 1 is inode 11 + k.
fn node_index(ino: u32) -> usize {
    if ino == ROOT_INO {
        0
    } else {
        (ino - LOST_FOUND_INO) as usize
    }
}

fn node_ino(idx: usize) -> u32 {
    if idx == 0 {
        ROOT_INO
    } else {
        LOST_FOUND_INO + idx as u32
    }
}

fn ftype_of(mode: u32) -> u8 {
    match mode & libc::S_IFMT {
        libc::S_IFREG => FT_REG,
        libc::S_IFDIR => FT_DIR,
        libc::S_IFCHR => FT_CHR,
        libc::S_IFBLK => FT_BLK,
        libc::S_IFIFO => FT_FIFO,
        libc::S_IFSOCK => FT_SOCK,
        _ => FT_LNK,
    }
}

/// Scratch buffers reused across files.
struct Bufs {
    list: Vec<u8>,
    value: Vec<u8>,
}

fn new_node(path: PathBuf, md: &std::fs::Metadata, bufs: &mut Bufs) -> Result<Node, Ext4Error> {
    let ft = md.file_type();
    let kind = if ft.is_dir() {
        Kind::Dir {
            parent: ROOT_INO,
            entries: Vec::new(),
        }
    } else if ft.is_file() {
        let size = md.len();
        let data = if size == 0 {
            Vec::new()
        } else if md.blocks() * 512 < size {
            data_ranges(&path, size)?
        } else {
            vec![(0, size.div_ceil(BS64))]
        };
        Kind::File { size, data }
    } else if ft.is_symlink() {
        let t = std::fs::read_link(&path).map_err(io_at(&path))?;
        let t = t.as_os_str().as_bytes().to_vec();
        if t.is_empty() || t.len() >= BS {
            return Err(unfit(&path, format!("symlink target of {} bytes", t.len())));
        }
        Kind::Symlink(t)
    } else if ft.is_char_device() || ft.is_block_device() {
        Kind::Dev(md.rdev())
    } else {
        Kind::Node
    };
    let xattrs = read_xattrs(&path, bufs)?;
    Ok(Node {
        path,
        mode: (md.mode() & 0xFFFF) as u16,
        uid: md.uid(),
        gid: md.gid(),
        atime: (md.atime(), md.atime_nsec() as u32),
        mtime: (md.mtime(), md.mtime_nsec() as u32),
        ctime: (md.ctime(), md.ctime_nsec() as u32),
        links: 1,
        kind,
        xattrs,
    })
}

/// Block ranges of a sparse file that hold data (SEEK_DATA/SEEK_HOLE); the whole file when the
/// source filesystem cannot tell.
fn data_ranges(path: &Path, size: u64) -> Result<Vec<(u64, u64)>, Ext4Error> {
    let whole = vec![(0, size.div_ceil(BS64))];
    let f = File::open(path).map_err(io_at(path))?;
    let fd = f.as_raw_fd();
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut pos: i64 = 0;
    let end = size as i64;
    while pos < end {
        // SAFETY: plain syscalls on an fd owned by `f`.
        let d = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if d < 0 {
            return match io::Error::last_os_error().raw_os_error() {
                Some(libc::ENXIO) => Ok(out),
                _ => Ok(whole),
            };
        }
        let h = unsafe { libc::lseek(fd, d, libc::SEEK_HOLE) };
        if h < 0 {
            return Ok(whole);
        }
        let h = h.min(end);
        if d >= h {
            break;
        }
        let first = d as u64 / BS64;
        let last = (h as u64).div_ceil(BS64);
        match out.last_mut() {
            Some((f0, n)) if *f0 + *n >= first => *n = (*n).max(last - *f0),
            _ => out.push((first, last - first)),
        }
        pos = h;
    }
    Ok(out)
}

/// Walk `tree` depth first, name order; `on_node` sees each new node as it is made (file data
/// is placed and copied while the walk goes on).
fn walk(
    tree: &Path,
    on_node: &mut dyn FnMut(usize, &Node) -> Result<(), Ext4Error>,
) -> Result<Vec<Node>, Ext4Error> {
    let md = std::fs::symlink_metadata(tree).map_err(io_at(tree))?;
    if !md.is_dir() {
        return Err(Ext4Error::Io {
            path: tree.to_path_buf(),
            source: io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
        });
    }
    let mut bufs = Bufs {
        list: vec![0u8; 1024],
        value: vec![0u8; 4096],
    };
    let mut nodes = vec![new_node(tree.to_path_buf(), &md, &mut bufs)?];
    let mut links: HashMap<(u64, u64), u32> = HashMap::new();
    let mut stack = vec![0usize];
    while let Some(di) = stack.pop() {
        let dir_path = nodes[di].path.clone();
        let self_ino = node_ino(di);
        let mut ents: Vec<(Vec<u8>, std::fs::DirEntry)> = Vec::new();
        for e in std::fs::read_dir(&dir_path).map_err(io_at(&dir_path))? {
            let e = e.map_err(io_at(&dir_path))?;
            ents.push((e.file_name().as_bytes().to_vec(), e));
        }
        // Byte order, so the same tree gives the same image whatever readdir returns.
        ents.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut entries = Vec::with_capacity(ents.len() + 1);
        if di == 0 {
            entries.push(Dirent {
                name: b"lost+found".to_vec(),
                ino: LOST_FOUND_INO,
                ftype: FT_DIR,
            });
        }
        let mut subdirs = Vec::new();
        for (name, e) in ents {
            let path = e.path();
            if name.len() > 255 {
                return Err(unfit(&path, "file name longer than 255 bytes".into()));
            }
            let md = e.metadata().map_err(io_at(&path))?;
            if di == 0 && name == b"lost+found" {
                // The image's own lost+found (inode 11) stands for it; contents would be lost.
                let empty = md.is_dir()
                    && std::fs::read_dir(&path)
                        .map_err(io_at(&path))?
                        .next()
                        .is_none();
                if !empty {
                    return Err(unfit(
                        &path,
                        "a top-level lost+found must be an empty directory".into(),
                    ));
                }
                continue;
            }
            let ftype = ftype_of(md.mode());
            if ftype != FT_DIR && md.nlink() > 1 {
                if let Some(&ino) = links.get(&(md.dev(), md.ino())) {
                    nodes[node_index(ino)].links += 1;
                    entries.push(Dirent { name, ino, ftype });
                    continue;
                }
            }
            let ino = node_ino(nodes.len());
            if ftype != FT_DIR && md.nlink() > 1 {
                links.insert((md.dev(), md.ino()), ino);
            }
            let mut n = new_node(path, &md, &mut bufs)?;
            if let Kind::Dir { parent, .. } = &mut n.kind {
                *parent = self_ino;
                subdirs.push(nodes.len());
            }
            on_node(nodes.len(), &n)?;
            nodes.push(n);
            entries.push(Dirent { name, ino, ftype });
        }
        if let Kind::Dir { entries: e, .. } = &mut nodes[di].kind {
            *e = entries;
        }
        // Depth first, in name order.
        stack.extend(subdirs.into_iter().rev());
    }
    Ok(nodes)
}

// ---- extended attributes -----------------------------------------------------------------------

fn read_xattrs(path: &Path, bufs: &mut Bufs) -> Result<Vec<Xattr>, Ext4Error> {
    let c = cstr(path)?;
    let len = loop {
        // SAFETY: the buffer outlives the call and its length is passed.
        let r =
            unsafe { libc::llistxattr(c.as_ptr(), bufs.list.as_mut_ptr().cast(), bufs.list.len()) };
        if r >= 0 {
            break r as usize;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENOTSUP) => return Ok(Vec::new()),
            Some(libc::ERANGE) => {
                let need = unsafe { libc::llistxattr(c.as_ptr(), std::ptr::null_mut(), 0) };
                if need < 0 {
                    return Err(io_at(path)(io::Error::last_os_error()));
                }
                bufs.list.resize(need as usize + 1024, 0);
            }
            _ => return Err(io_at(path)(e)),
        }
    };
    if len == 0 {
        return Ok(Vec::new());
    }
    let names: Vec<Vec<u8>> = bufs.list[..len]
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .map(<[u8]>::to_vec)
        .collect();
    let mut out = Vec::with_capacity(names.len());
    for full in names {
        let cname = CString::new(full.clone())
            .map_err(|_| unfit(path, "xattr name with a NUL byte".into()))?;
        let vlen = loop {
            // SAFETY: as above.
            let r = unsafe {
                libc::lgetxattr(
                    c.as_ptr(),
                    cname.as_ptr(),
                    bufs.value.as_mut_ptr().cast(),
                    bufs.value.len(),
                )
            };
            if r >= 0 {
                break Some(r as usize);
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                // Removed since the listing.
                Some(libc::ENODATA) => break None,
                Some(libc::ERANGE) => {
                    let need = unsafe {
                        libc::lgetxattr(c.as_ptr(), cname.as_ptr(), std::ptr::null_mut(), 0)
                    };
                    if need < 0 {
                        return Err(io_at(path)(io::Error::last_os_error()));
                    }
                    bufs.value.resize(need as usize + 1024, 0);
                }
                _ => return Err(io_at(path)(e)),
            }
        };
        let Some(vlen) = vlen else { continue };
        let (index, name) = split_xattr_name(&full);
        if name.len() > 255 {
            return Err(unfit(
                path,
                format!("xattr name {} too long", String::from_utf8_lossy(&full)),
            ));
        }
        let raw = &bufs.value[..vlen];
        let value = if index == 2 || index == 3 {
            acl_to_disk(raw).ok_or_else(|| {
                unfit(
                    path,
                    format!("{}: not a POSIX ACL", String::from_utf8_lossy(&full)),
                )
            })?
        } else {
            raw.to_vec()
        };
        out.push(Xattr { index, name, value });
    }
    // The order ext4 keeps entries of an xattr block in (and a stable image).
    out.sort_by(|a, b| (a.index, a.name.len(), &a.name).cmp(&(b.index, b.name.len(), &b.name)));
    Ok(out)
}

/// ext4's name index and the stored remainder of a full xattr name.
fn split_xattr_name(full: &[u8]) -> (u8, Vec<u8>) {
    match full {
        b"system.posix_acl_access" => return (2, Vec::new()),
        b"system.posix_acl_default" => return (3, Vec::new()),
        _ => {}
    }
    for (prefix, idx) in [
        (&b"user."[..], 1u8),
        (b"trusted.", 4),
        (b"security.", 6),
        (b"system.", 7),
    ] {
        if let Some(rest) = full.strip_prefix(prefix) {
            return (idx, rest.to_vec());
        }
    }
    (0, full.to_vec())
}

const ACL_USER_OBJ: u16 = 1;
const ACL_USER: u16 = 2;
const ACL_GROUP_OBJ: u16 = 4;
const ACL_GROUP: u16 = 8;
const ACL_MASK: u16 = 0x10;
const ACL_OTHER: u16 = 0x20;

/// Linux's xattr ACL (version 2, 8-byte entries) to ext4's on-disk one (version 1, 4-byte
/// entries except for named users and groups, which keep their id).
fn acl_to_disk(v: &[u8]) -> Option<Vec<u8>> {
    if v.len() < 4 || (v.len() - 4) % 8 != 0 || le32(v, 0) != 2 {
        return None;
    }
    let mut out = Vec::with_capacity(v.len());
    out.extend_from_slice(&1u32.to_le_bytes());
    for e in v[4..].chunks_exact(8) {
        let tag = le16(e, 0);
        match tag {
            ACL_USER | ACL_GROUP => out.extend_from_slice(e),
            ACL_USER_OBJ | ACL_GROUP_OBJ | ACL_MASK | ACL_OTHER => out.extend_from_slice(&e[..4]),
            _ => return None,
        }
    }
    Some(out)
}

fn xattr_entry_len(x: &Xattr) -> usize {
    (16 + x.name.len() + 3) & !3
}

fn xattr_value_len(x: &Xattr) -> usize {
    (x.value.len() + 3) & !3
}

fn xattr_hash(x: &Xattr) -> u32 {
    let mut h: u32 = 0;
    for &c in &x.name {
        h = (h << 5) ^ (h >> 27) ^ u32::from(c);
    }
    for w in x.value.chunks(4) {
        let mut b = [0u8; 4];
        b[..w.len()].copy_from_slice(w);
        h = (h << 16) ^ (h >> 16) ^ u32::from_le_bytes(b);
    }
    h
}

/// Lay `xs` out in `area`: entries from `first`, values from the end down, value offsets
/// relative to `base`. Returns the entry hashes in order.
fn put_xattrs(area: &mut [u8], first: usize, base: usize, xs: &[&Xattr]) -> Vec<u32> {
    let mut e = first;
    let mut vend = area.len();
    let mut hashes = Vec::with_capacity(xs.len());
    for x in xs {
        let mut offs = 0;
        if !x.value.is_empty() {
            vend -= xattr_value_len(x);
            area[vend..vend + x.value.len()].copy_from_slice(&x.value);
            offs = vend - base;
        }
        let h = xattr_hash(x);
        area[e] = x.name.len() as u8;
        area[e + 1] = x.index;
        put16(area, e + 2, offs as u16);
        put32(area, e + 4, 0);
        put32(area, e + 8, x.value.len() as u32);
        put32(area, e + 12, h);
        area[e + 16..e + 16 + x.name.len()].copy_from_slice(&x.name);
        e += xattr_entry_len(x);
        hashes.push(h);
    }
    hashes
}

/// Which xattrs go in the inode (each that still fits, in order, as e2fsprogs does) and which
/// in one block.
fn split_xattrs(n: &Node, inode_room: usize) -> Result<(Vec<usize>, Vec<usize>), Ext4Error> {
    let (mut ib, mut blk) = (Vec::new(), Vec::new());
    // Magic and end marker.
    let mut used = 8;
    for (i, x) in n.xattrs.iter().enumerate() {
        let need = xattr_entry_len(x) + xattr_value_len(x);
        if used + need <= inode_room {
            used += need;
            ib.push(i);
        } else {
            blk.push(i);
        }
    }
    // Header and end marker.
    let in_block: usize = 36
        + blk
            .iter()
            .map(|&i| xattr_entry_len(&n.xattrs[i]) + xattr_value_len(&n.xattrs[i]))
            .sum::<usize>();
    if !blk.is_empty() && in_block > BS {
        return Err(unfit(
            &n.path,
            format!("extended attributes need {in_block} bytes, more than one 4 KiB block"),
        ));
    }
    Ok((ib, blk))
}

fn xattr_block(n: &Node, idx: &[usize]) -> Vec<u8> {
    let mut b = vec![0u8; BS];
    put32(&mut b, 0, XATTR_MAGIC);
    put32(&mut b, 4, 1);
    put32(&mut b, 8, 1);
    let xs: Vec<&Xattr> = idx.iter().map(|&i| &n.xattrs[i]).collect();
    let hashes = put_xattrs(&mut b, 32, 0, &xs);
    let mut h: u32 = 0;
    for eh in hashes {
        h = (h << 16) ^ (h >> 16) ^ eh;
    }
    put32(&mut b, 12, h);
    b
}

// ---- directories, extents, inodes --------------------------------------------------------------

/// Linear directory blocks, each ending in an empty checksum tail.
fn dir_blocks(self_ino: u32, parent: u32, entries: &[Dirent]) -> Vec<u8> {
    let limit = BS - DIR_TAIL;
    let mut out: Vec<u8> = Vec::new();
    let mut block = vec![0u8; BS];
    let mut pos = 0;
    let mut last = 0;
    let finish = |block: &mut Vec<u8>, last: usize, out: &mut Vec<u8>| {
        put16(block, last + 4, (limit - last) as u16);
        put16(block, limit + 4, DIR_TAIL as u16);
        block[limit + 7] = 0xDE;
        out.extend_from_slice(block);
        block.fill(0);
    };
    let dots = [(&b"."[..], self_ino, FT_DIR), (b"..", parent, FT_DIR)];
    let all = dots
        .into_iter()
        .chain(entries.iter().map(|d| (&d.name[..], d.ino, d.ftype)));
    for (name, ino, ft) in all {
        let rec = (8 + name.len() + 3) & !3;
        if pos + rec > limit {
            finish(&mut block, last, &mut out);
            pos = 0;
        }
        put32(&mut block, pos, ino);
        put16(&mut block, pos + 4, rec as u16);
        block[pos + 6] = name.len() as u8;
        block[pos + 7] = ft;
        block[pos + 8..pos + 8 + name.len()].copy_from_slice(name);
        last = pos;
        pos += rec;
    }
    finish(&mut block, last, &mut out);
    out
}

#[derive(Clone, Copy)]
struct Extent {
    logical: u32,
    start: u64,
    len: u32,
}

fn put_header(b: &mut [u8], entries: usize, max: usize, depth: u16) {
    put16(b, 0, EXT_MAGIC);
    put16(b, 2, entries as u16);
    put16(b, 4, max as u16);
    put16(b, 6, depth);
}

fn put_extent(b: &mut [u8], o: usize, e: &Extent) {
    put32(b, o, e.logical);
    put16(b, o + 4, e.len as u16);
    put16(b, o + 6, (e.start >> 32) as u16);
    put32(b, o + 8, e.start as u32);
}

fn put_index(b: &mut [u8], o: usize, logical: u32, block: u64) {
    put32(b, o, logical);
    put32(b, o + 4, block as u32);
    put16(b, o + 8, (block >> 32) as u16);
}

/// What goes into an inode besides the node's own attributes.
struct Layout {
    extents: Vec<Extent>,
    iblock: [u8; 60],
    tree_blocks: u64,
    xattr_block: u64,
    inode_xattrs: Vec<usize>,
}

impl Default for Layout {
    fn default() -> Self {
        Layout {
            extents: Vec::new(),
            iblock: [0; 60],
            tree_blocks: 0,
            xattr_block: 0,
            inode_xattrs: Vec::new(),
        }
    }
}

/// Extent tree for `l.extents`: in i_block when 4 or fewer, else leaf blocks of up to 340
/// extents under as many index levels as needed; tree blocks come from `alloc` and their
/// contents go to `meta`.
fn build_extent_tree(
    l: &mut Layout,
    alloc: &mut Alloc,
    meta: &mut Vec<(u64, Vec<u8>)>,
) -> Option<()> {
    let ex = &l.extents;
    if ex.len() <= 4 {
        put_header(&mut l.iblock, ex.len(), 4, 0);
        for (i, e) in ex.iter().enumerate() {
            put_extent(&mut l.iblock, 12 + 12 * i, e);
        }
        return Some(());
    }
    let mut level: Vec<(u32, u64)> = Vec::new();
    for chunk in ex.chunks(EXTENTS_PER_BLOCK) {
        let (blk, _) = alloc.run(1)?;
        let mut b = vec![0u8; BS];
        put_header(&mut b, chunk.len(), EXTENTS_PER_BLOCK, 0);
        for (i, e) in chunk.iter().enumerate() {
            put_extent(&mut b, 12 + 12 * i, e);
        }
        meta.push((blk, b));
        level.push((chunk[0].logical, blk));
        l.tree_blocks += 1;
    }
    let mut depth = 1u16;
    while level.len() > 4 {
        let mut next = Vec::new();
        for chunk in level.chunks(EXTENTS_PER_BLOCK) {
            let (blk, _) = alloc.run(1)?;
            let mut b = vec![0u8; BS];
            put_header(&mut b, chunk.len(), EXTENTS_PER_BLOCK, depth);
            for (i, (lg, child)) in chunk.iter().enumerate() {
                put_index(&mut b, 12 + 12 * i, *lg, *child);
            }
            meta.push((blk, b));
            next.push((chunk[0].0, blk));
            l.tree_blocks += 1;
        }
        level = next;
        depth += 1;
    }
    put_header(&mut l.iblock, level.len(), 4, depth);
    for (i, (lg, child)) in level.iter().enumerate() {
        put_index(&mut l.iblock, 12 + 12 * i, *lg, *child);
    }
    Some(())
}

/// Seconds and nanoseconds into the 32-bit field plus the `_extra` word (2 epoch bits, then
/// nanoseconds), as the kernel encodes them.
fn put_time(ib: &mut [u8], off: usize, extra_off: usize, (sec, nsec): (i64, u32)) {
    let (lo, epoch) = super::ext4::time_fields(sec);
    put32(ib, off, lo);
    put32(ib, extra_off, epoch | (nsec << 2));
}

/// atime, ctime, mtime, crtime.
fn times(n: &Node, epoch: Option<i64>) -> [(i64, u32); 4] {
    match epoch {
        Some(t) => [(t, 0), (t, 0), (n.mtime.0.min(t), 0), (t, 0)],
        None => [n.atime, n.ctime, n.mtime, n.ctime],
    }
}

fn encode_inode(
    ib: &mut [u8],
    n: &Node,
    l: &Layout,
    links: u16,
    epoch: Option<i64>,
) -> Result<(), Ext4Error> {
    ib.fill(0);
    let (size, data_blocks, flags) = match &n.kind {
        Kind::Dir { .. } => {
            let b: u64 = l.extents.iter().map(|e| u64::from(e.len)).sum();
            (b * BS64, b, EXTENTS_FL)
        }
        Kind::File { size, .. } => {
            let b: u64 = l.extents.iter().map(|e| u64::from(e.len)).sum();
            (*size, b, EXTENTS_FL)
        }
        Kind::Symlink(t) if t.len() < 60 => (t.len() as u64, 0, 0),
        Kind::Symlink(t) => (t.len() as u64, 1, EXTENTS_FL),
        Kind::Dev(_) | Kind::Node => (0, 0, 0),
    };
    put16(ib, 0x00, n.mode);
    put16(ib, 0x02, n.uid as u16);
    put16(ib, 0x78, (n.uid >> 16) as u16);
    put16(ib, 0x18, n.gid as u16);
    put16(ib, 0x7A, (n.gid >> 16) as u16);
    put32(ib, 0x04, size as u32);
    put32(ib, 0x6C, (size >> 32) as u32);
    put16(ib, 0x1A, links);
    let sectors = (data_blocks + l.tree_blocks + u64::from(l.xattr_block != 0)) * (BS64 / 512);
    if sectors >> 48 != 0 {
        return Err(unfit(&n.path, "file too large for ext4".into()));
    }
    put32(ib, 0x1C, sectors as u32);
    put16(ib, 0x74, (sectors >> 32) as u16);
    put32(ib, 0x20, flags);
    match &n.kind {
        Kind::Symlink(t) if t.len() < 60 => ib[IBLOCK..IBLOCK + t.len()].copy_from_slice(t),
        Kind::Dev(rdev) => {
            let (major, minor) = (libc::major(*rdev), libc::minor(*rdev));
            if major < 256 && minor < 256 {
                put32(ib, IBLOCK, (major << 8) | minor);
            } else {
                let enc = (minor & 0xFF) | (major << 8) | ((minor & !0xFF) << 12);
                put32(ib, IBLOCK + 4, enc);
            }
        }
        Kind::Node => {}
        _ => ib[IBLOCK..IBLOCK + 60].copy_from_slice(&l.iblock),
    }
    put32(ib, 0x68, l.xattr_block as u32);
    put16(ib, 0x76, (l.xattr_block >> 32) as u16);
    put16(ib, 0x80, EXTRA_ISIZE as u16);
    let [a, c, m, cr] = times(n, epoch);
    put_time(ib, 0x08, 0x8C, a);
    put_time(ib, 0x0C, 0x84, c);
    put_time(ib, 0x10, 0x88, m);
    put_time(ib, 0x90, 0x94, cr);
    if !l.inode_xattrs.is_empty() {
        let area = &mut ib[128 + EXTRA_ISIZE..];
        put32(area, 0, XATTR_MAGIC);
        let xs: Vec<&Xattr> = l.inode_xattrs.iter().map(|&i| &n.xattrs[i]).collect();
        put_xattrs(area, 4, 4, &xs);
    }
    Ok(())
}

// ---- data --------------------------------------------------------------------------------------

/// One file's data: (source offset, image offset, length) ranges.
struct CopyJob {
    path: PathBuf,
    ranges: Vec<(u64, u64, u64)>,
}

fn copy_job(path: &Path, size: u64, extents: &[Extent]) -> CopyJob {
    let mut ranges: Vec<(u64, u64, u64)> = Vec::new();
    for e in extents {
        let src = u64::from(e.logical) * BS64;
        if src >= size {
            continue;
        }
        let len = (u64::from(e.len) * BS64).min(size - src);
        let dst = e.start * BS64;
        match ranges.last_mut() {
            // Extents split only by the length limit: one copy.
            Some((s, d, l)) if *s + *l == src && *d + *l == dst => *l += len,
            _ => ranges.push((src, dst, len)),
        }
    }
    CopyJob {
        path: path.to_path_buf(),
        ranges,
    }
}

/// Copy `len` bytes in the kernel; with `fallback` (a filesystem pair copy_file_range does not
/// serve) through a buffer. A source that shrank leaves zeros.
fn copy_range(
    src: &File,
    dst: &File,
    (mut so, mut doff, mut len): (u64, u64, u64),
    fallback: &mut bool,
    buf: &mut Vec<u8>,
) -> io::Result<()> {
    while len > 0 {
        if !*fallback {
            let mut a = so as libc::loff_t;
            let mut b = doff as libc::loff_t;
            // SAFETY: both fds are open for the call; the offsets are local.
            let r = unsafe {
                libc::copy_file_range(
                    src.as_raw_fd(),
                    &mut a,
                    dst.as_raw_fd(),
                    &mut b,
                    len.min(1 << 30) as usize,
                    0,
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EXDEV | libc::ENOSYS | libc::EINVAL | libc::EOPNOTSUPP) => {
                        *fallback = true;
                        continue;
                    }
                    Some(libc::EINTR) => continue,
                    _ => return Err(e),
                }
            }
            if r == 0 {
                return Ok(());
            }
            so += r as u64;
            doff += r as u64;
            len -= r as u64;
        } else {
            if buf.is_empty() {
                buf.resize(4 << 20, 0);
            }
            let want = len.min(buf.len() as u64) as usize;
            let n = src.read_at(&mut buf[..want], so)?;
            if n == 0 {
                return Ok(());
            }
            dst.write_all_at(&buf[..n], doff)?;
            so += n as u64;
            doff += n as u64;
            len -= n as u64;
        }
    }
    Ok(())
}

fn is_out_of_space(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG)
    )
}

/// Files up to this size are read into a staging buffer laid out as in the image and written
/// with their neighbours in one write: for a small file the fixed cost of copy_file_range (a
/// splice through a pipe per call) is larger than the copy itself.
const SMALL_FILE: u64 = 256 << 10;
/// Most image bytes one staged write covers.
const BATCH_SPAN: u64 = 8 << 20;

fn is_small(j: &CopyJob) -> bool {
    j.ranges.len() == 1 && j.ranges[0].0 == 0 && j.ranges[0].2 <= SMALL_FILE
}

/// Read small files into `buf` at their image positions and write each contiguous stretch once.
fn stage(
    jobs: &[CopyJob],
    img: &File,
    img_path: &Path,
    buf: &mut Vec<u8>,
) -> Result<(), Ext4Error> {
    let Some(first) = jobs.first() else {
        return Ok(());
    };
    let mut run_start = first.ranges[0].1;
    let mut fill = 0usize;
    for j in jobs {
        let (_, dst, len) = j.ranges[0];
        if dst != run_start + fill as u64 {
            img.write_all_at(&buf[..fill], run_start)
                .map_err(io_at(img_path))?;
            run_start = dst;
            fill = 0;
        }
        let len = len as usize;
        let slot = len.div_ceil(BS) * BS;
        if buf.len() < fill + slot {
            buf.resize(fill + slot, 0);
        }
        let area = &mut buf[fill..fill + slot];
        let src = File::open(&j.path).map_err(io_at(&j.path))?;
        let mut n = 0;
        while n < len {
            match src.read_at(&mut area[n..len], n as u64) {
                Ok(0) => break,
                Ok(r) => n += r,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_at(&j.path)(e)),
            }
        }
        // The buffer is reused: what a shorter read and the block's tail leave must be zero.
        area[n..].fill(0);
        fill += slot;
    }
    img.write_all_at(&buf[..fill], run_start)
        .map_err(io_at(img_path))
}

/// One copy batch: small files that sit together in the image, or one larger file.
fn copy_batch(
    batch: &[CopyJob],
    img: &File,
    img_path: &Path,
    fallback: &mut bool,
    buf: &mut Vec<u8>,
) -> Result<(), Ext4Error> {
    let Some(job) = batch.first() else {
        return Ok(());
    };
    if is_small(job) {
        return stage(batch, img, img_path, buf);
    }
    let src = File::open(&job.path).map_err(io_at(&job.path))?;
    for r in &job.ranges {
        copy_range(&src, img, *r, fallback, buf).map_err(|e| {
            let p = if is_out_of_space(&e) {
                img_path
            } else {
                &job.path
            };
            io_at(p)(e)
        })?;
    }
    Ok(())
}

/// Shared by the copy threads: the first error, and a flag that makes the others drain the
/// queue without copying.
struct CopyState {
    queue: Mutex<mpsc::Receiver<Vec<CopyJob>>>,
    stop: AtomicBool,
    err: Mutex<Option<Ext4Error>>,
}

fn copy_worker(st: &CopyState, img: &File, img_path: &Path) {
    let mut fallback = false;
    let mut buf = Vec::new();
    loop {
        let batch = match st.queue.lock() {
            Ok(q) => q.recv(),
            Err(_) => return,
        };
        // Closed: the walk is over and everything was taken.
        let Ok(batch) = batch else { return };
        if st.stop.load(Ordering::Relaxed) {
            continue;
        }
        if let Err(e) = copy_batch(&batch, img, img_path, &mut fallback, &mut buf) {
            st.stop.store(true, Ordering::Relaxed);
            if let Ok(mut g) = st.err.lock() {
                g.get_or_insert(e);
            }
        }
    }
}

/// Places file data as the walk finds files (first fit, in inode order) and hands the copies
/// to the copy threads in batches.
struct Placer {
    alloc: Alloc,
    max_ext: u64,
    tx: mpsc::Sender<Vec<CopyJob>>,
    pending: Vec<CopyJob>,
    extents: Vec<(usize, Vec<Extent>)>,
    /// Data blocks of every file seen, placed or not (for an out-of-space message).
    needed: u64,
    short: bool,
    data_bytes: u64,
    files: u64,
    large_file: bool,
}

impl Placer {
    fn place(&mut self, idx: usize, n: &Node) -> Result<(), Ext4Error> {
        let Kind::File { size, data } = &n.kind else {
            return Ok(());
        };
        self.files += 1;
        self.large_file |= *size >= 1 << 31;
        self.needed += data.iter().map(|r| r.1).sum::<u64>();
        if self.short || data.is_empty() {
            return Ok(());
        }
        let mut extents = Vec::new();
        for &(first, count) in data {
            let mut done = 0;
            while done < count {
                let Some((start, len)) = self.alloc.run((count - done).min(self.max_ext)) else {
                    // Keep walking to say how much the whole tree needs.
                    self.short = true;
                    return Ok(());
                };
                let logical = u32::try_from(first + done)
                    .map_err(|_| unfit(&n.path, "file too large for ext4".into()))?;
                extents.push(Extent {
                    logical,
                    start,
                    len: len as u32,
                });
                done += len;
            }
        }
        let job = copy_job(&n.path, *size, &extents);
        self.data_bytes += job.ranges.iter().map(|r| r.2).sum::<u64>();
        self.extents.push((idx, extents));
        let fits = is_small(&job)
            && self.pending.first().is_some_and(|p| {
                is_small(p) && job.ranges[0].1 + job.ranges[0].2 <= p.ranges[0].1 + BATCH_SPAN
            });
        if !fits {
            self.flush();
        }
        self.pending.push(job);
        Ok(())
    }

    fn flush(&mut self) {
        if !self.pending.is_empty() {
            // A send fails only when every copy thread is gone, i.e. after an error that is
            // reported on its own.
            let _ = self.tx.send(std::mem::take(&mut self.pending));
        }
    }
}

/// Write `(block, bytes)` pieces, merging those that touch into one write each.
fn write_coalesced(f: &File, img: &Path, mut pieces: Vec<(u64, Vec<u8>)>) -> Result<(), Ext4Error> {
    pieces.sort_unstable_by_key(|p| p.0);
    let mut i = 0;
    while i < pieces.len() {
        let start = pieces[i].0;
        let mut end = start * BS64 + pieces[i].1.len() as u64;
        let mut j = i + 1;
        while j < pieces.len() && pieces[j].0 * BS64 == end {
            end += pieces[j].1.len() as u64;
            j += 1;
        }
        if j == i + 1 {
            f.write_all_at(&pieces[i].1, start * BS64)
                .map_err(io_at(img))?;
        } else {
            let mut run = Vec::with_capacity((end - start * BS64) as usize);
            for p in &pieces[i..j] {
                run.extend_from_slice(&p.1);
            }
            f.write_all_at(&run, start * BS64).map_err(io_at(img))?;
        }
        i = j;
    }
    Ok(())
}

// ---- the pass ----------------------------------------------------------------------------------

/// Write the directory tree `tree` into the empty ext4 image `img`.
///
/// `img` must be as `mkfs.ext4` leaves it with the portable feature list (no metadata_csum, no
/// 64bit, 4 KiB blocks, inodes of 256 bytes or more, nothing but inodes 1-11 in use);
/// anything else is [`Ext4Error::Format`]. The tree is walked without following symlinks, in
/// byte order of names; hard links share an inode. Nothing is fsynced.
pub fn populate(tree: &Path, img: &Path, o: &PopulateOpts) -> Result<PopulateStats, Ext4Error> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(img)
        .map_err(io_at(img))?;
    let mut fs = Fs::open(&f, img)?;
    let max_ext = u64::from(o.max_extent_blocks.clamp(1, MAX_EXTENT_LEN));
    let isz = fs.inode_size;

    // Group 0's inode table up to inode 11: the root (rewritten) and lost+found (kept).
    let it0 = fs.inode_table(0);
    let mut reserved = vec![0u8; LOST_FOUND_INO as usize * isz];
    f.read_exact_at(&mut reserved, it0 * BS64)
        .map_err(io_at(img))?;
    let root_old = &reserved[isz..2 * isz];
    let lf = &reserved[(LOST_FOUND_INO as usize - 1) * isz..LOST_FOUND_INO as usize * isz];
    if le16(root_old, 0) & 0xF000 != 0x4000 || le16(lf, 0) & 0xF000 != 0x4000 {
        return Err(Ext4Error::Format(
            img.to_path_buf(),
            "root or lost+found is not a directory",
        ));
    }
    let root_ib = &root_old[IBLOCK..IBLOCK + 60];
    if le32(root_old, 0x20) & EXTENTS_FL == 0
        || le16(root_ib, 0) != EXT_MAGIC
        || le16(root_ib, 6) != 0
        || le16(root_ib, 2) > 4
        || le32(root_old, 0x68) != 0
    {
        return Err(Ext4Error::Format(
            img.to_path_buf(),
            "root directory is not a small extent-mapped one",
        ));
    }
    let root_extents: Vec<(u64, u64)> = (0..usize::from(le16(root_ib, 2)))
        .map(|i| {
            let e = &root_ib[12 + 12 * i..24 + 12 * i];
            let start = u64::from(le16(e, 6)) << 32 | u64::from(le32(e, 8));
            (start, u64::from(le16(e, 4) & 0x7FFF))
        })
        .collect();

    let mut alloc = Alloc {
        bm: std::mem::take(&mut fs.block_bitmap),
        bpg: fs.bpg,
        blocks: fs.blocks,
        cursor: 0,
        taken: 0,
    };
    // The root's block from mkfs is rebuilt like any other directory.
    for (start, len) in root_extents {
        for b in start..start + len {
            if b < alloc.blocks {
                alloc.clear(b);
            }
        }
    }
    let free_blocks = alloc.free_count();
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 4);
    let (tx, rx) = mpsc::channel();
    let st = CopyState {
        queue: Mutex::new(rx),
        stop: AtomicBool::new(false),
        err: Mutex::new(None),
    };
    let placer = Placer {
        alloc,
        max_ext,
        tx,
        pending: Vec::new(),
        extents: Vec::new(),
        needed: 0,
        short: false,
        data_bytes: 0,
        files: 0,
        large_file: false,
    };
    let r = std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| copy_worker(&st, &f, img));
        }
        let r = build(tree, img, &f, o, &mut fs, placer, free_blocks, &reserved);
        if r.is_err() {
            st.stop.store(true, Ordering::Relaxed);
        }
        r
    });
    let stats = r?;
    match st.err.into_inner() {
        Ok(Some(e)) => Err(e),
        _ => Ok(stats),
    }
}

/// Everything but the copying: walk (placing data as it goes), lay out metadata, write it.
/// Dropping `placer` (here, whatever happens) closes the copy queue.
#[allow(clippy::too_many_arguments)]
fn build(
    tree: &Path,
    img: &Path,
    f: &File,
    o: &PopulateOpts,
    fs: &mut Fs,
    mut placer: Placer,
    free_blocks: u64,
    reserved: &[u8],
) -> Result<PopulateStats, Ext4Error> {
    let nodes = walk(tree, &mut |idx, n| placer.place(idx, n))?;
    placer.flush();
    let max_ext = placer.max_ext;

    // Inodes: sequential from 12.
    let new_inodes = nodes.len() as u64 - 1;
    let free_inodes = fs.free_inodes();
    if new_inodes > free_inodes {
        return Err(Ext4Error::NoSpace(format!(
            "inodes: the tree needs {new_inodes}, the image has {free_inodes} free"
        )));
    }
    if nodes.iter().any(|n| !n.xattrs.is_empty()) && fs.compat & COMPAT_EXT_ATTR == 0 {
        return Err(Ext4Error::Format(img.to_path_buf(), "ext_attr is off"));
    }

    // Directory blocks and xattr layout: the rest of the block demand.
    let inode_room = fs.inode_size - 128 - EXTRA_ISIZE;
    let mut layouts: Vec<Layout> = Vec::with_capacity(nodes.len());
    let mut dir_data: Vec<Vec<u8>> = Vec::new();
    let mut xblocks: Vec<Vec<usize>> = Vec::with_capacity(nodes.len());
    let mut meta_blocks: u64 = 0;
    for (i, n) in nodes.iter().enumerate() {
        let (inode_xattrs, blk) = split_xattrs(n, inode_room)?;
        meta_blocks += u64::from(!blk.is_empty());
        xblocks.push(blk);
        layouts.push(Layout {
            inode_xattrs,
            ..Layout::default()
        });
        match &n.kind {
            Kind::Dir { parent, entries } => {
                let d = dir_blocks(node_ino(i), *parent, entries);
                meta_blocks += (d.len() / BS) as u64;
                dir_data.push(d);
            }
            Kind::Symlink(t) if t.len() >= 60 => meta_blocks += 1,
            _ => {}
        }
    }
    for (idx, ex) in std::mem::take(&mut placer.extents) {
        layouts[idx].extents = ex;
    }
    let Placer {
        mut alloc,
        needed,
        short,
        data_bytes,
        files,
        large_file,
        ..
    } = placer;
    let no_blocks = || {
        let n = needed + meta_blocks;
        Ext4Error::NoSpace(format!(
            "blocks: the tree needs at least {n} ({} MiB), the image has {free_blocks} free",
            (n * BS64) >> 20
        ))
    };
    if short || alloc.free_count() < meta_blocks {
        return Err(no_blocks());
    }

    // Metadata zone after the data: directories, slow symlinks and xattr blocks, in inode
    // order, so they land together and go out in one write.
    let mut meta: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut dir_iter = dir_data.into_iter();
    let mut stats = PopulateStats {
        inodes_used: 11 + new_inodes,
        data_bytes,
        files,
        ..PopulateStats::default()
    };
    for (i, n) in nodes.iter().enumerate() {
        let l = &mut layouts[i];
        let content = match &n.kind {
            Kind::Dir { .. } => dir_iter.next(),
            Kind::Symlink(t) if t.len() >= 60 => {
                let mut b = vec![0u8; BS];
                b[..t.len()].copy_from_slice(t);
                Some(b)
            }
            _ => None,
        };
        if let Some(content) = content {
            let nblocks = (content.len() / BS) as u64;
            if matches!(n.kind, Kind::Dir { .. }) {
                stats.dirs += 1;
                stats.multiblock_dirs += u64::from(nblocks > 1);
            }
            let mut done = 0u64;
            while done < nblocks {
                let (start, len) = alloc
                    .run((nblocks - done).min(max_ext))
                    .ok_or_else(no_blocks)?;
                l.extents.push(Extent {
                    logical: done as u32,
                    start,
                    len: len as u32,
                });
                let a = (done as usize) * BS;
                meta.push((start, content[a..a + len as usize * BS].to_vec()));
                done += len;
            }
        }
        if !xblocks[i].is_empty() {
            let (b, _) = alloc.run(1).ok_or_else(no_blocks)?;
            l.xattr_block = b;
            meta.push((b, xattr_block(n, &xblocks[i])));
        }
    }

    // Extent trees that do not fit in i_block, last.
    for l in layouts.iter_mut() {
        build_extent_tree(l, &mut alloc, &mut meta).ok_or_else(|| {
            Ext4Error::NoSpace(format!(
                "blocks: the tree needs more than {} ({} MiB) with its extent trees, the image \
                 has {free_blocks} free",
                alloc.taken,
                (alloc.taken * BS64) >> 20
            ))
        })?;
    }
    fs.block_bitmap = alloc.bm;
    write_metadata(f, img, fs, &nodes, &layouts, reserved, o, large_file, meta)?;
    Ok(stats)
}

/// Inode tables, directory/extent/xattr blocks, bitmaps, group descriptors and superblock.
#[allow(clippy::too_many_arguments)]
fn write_metadata(
    f: &File,
    img: &Path,
    fs: &mut Fs,
    nodes: &[Node],
    layouts: &[Layout],
    reserved: &[u8],
    o: &PopulateOpts,
    large_file: bool,
    mut pieces: Vec<(u64, Vec<u8>)>,
) -> Result<(), Ext4Error> {
    let isz = fs.inode_size;
    let ipg = fs.ipg as usize;
    // At least through lost+found: group 0's reserved inodes are written back with the table.
    let last_ino = (node_ino(nodes.len() - 1) as usize).max(LOST_FOUND_INO as usize);
    let dir_nlink = fs.ro_compat & RO_COMPAT_DIR_NLINK != 0;
    let mut new_dirs = vec![0u32; fs.groups];
    // Inode tables, group by group, up to the last inode used in each.
    let mut g = 0;
    while g * ipg < last_ino {
        let used = (last_ino - g * ipg).min(ipg);
        let mut table = vec![0u8; (used * isz).div_ceil(BS) * BS];
        if g == 0 {
            table[..reserved.len()].copy_from_slice(reserved);
            if let Some(t) = o.epoch {
                for ino in 1..=LOST_FOUND_INO as usize {
                    let ib = &mut table[(ino - 1) * isz..ino * isz];
                    if ino != ROOT_INO as usize && (le16(ib, 0) != 0 || le16(ib, 0x1A) != 0) {
                        // The inodes mkfs wrote (lost+found and the other reserved ones).
                        super::ext4::set_inode_times(ib, t);
                    }
                }
            }
        }
        for slot in 0..used {
            let ino = (g * ipg + slot + 1) as u32;
            if ino != ROOT_INO && ino < FIRST_INO {
                continue;
            }
            let n = &nodes[node_index(ino)];
            let links = match &n.kind {
                Kind::Dir { entries, .. } => {
                    if ino != ROOT_INO {
                        new_dirs[g] += 1;
                    }
                    let subdirs = entries.iter().filter(|e| e.ftype == FT_DIR).count() as u32;
                    match 2 + subdirs {
                        l if l <= LINK_MAX => l,
                        _ if dir_nlink => 1,
                        _ => {
                            return Err(unfit(
                                &n.path,
                                "more than 64998 subdirectories without dir_nlink".into(),
                            ))
                        }
                    }
                }
                _ if n.links > LINK_MAX => {
                    return Err(unfit(
                        &n.path,
                        format!("{} hard links, more than ext4's 65000", n.links),
                    ))
                }
                _ => n.links,
            };
            encode_inode(
                &mut table[slot * isz..(slot + 1) * isz],
                n,
                &layouts[node_index(ino)],
                links as u16,
                o.epoch,
            )?;
            fs.mark_inode(u64::from(ino));
        }
        pieces.push((fs.inode_table(g), table));
        g += 1;
    }

    // Bitmaps (only groups that changed), counters, descriptors, superblock.
    let (mut free_b, mut free_i) = (0u64, 0u64);
    for (g, added) in new_dirs.iter().enumerate() {
        let d = g * GD_SIZE;
        let gb = g * BS;
        let first = g as u64 * fs.bpg;
        let nblk = (fs.blocks - first).min(fs.bpg);
        let bb = &fs.block_bitmap[gb..gb + BS];
        let ib = &fs.inode_bitmap[gb..gb + BS];
        let fb = zero_bits(bb, nblk);
        let fi = zero_bits(ib, fs.ipg);
        free_b += fb;
        free_i += fi;
        if fs.old_block_bitmap[gb..gb + BS] != *bb {
            pieces.push((u64::from(le32(&fs.gdt, d)), bb.to_vec()));
        }
        if fs.old_inode_bitmap[gb..gb + BS] != *ib {
            pieces.push((u64::from(le32(&fs.gdt, d + 4)), ib.to_vec()));
        }
        put16(&mut fs.gdt, d + 0x0C, fb as u16);
        put16(&mut fs.gdt, d + 0x0E, fi as u16);
        let dirs = u32::from(le16(&fs.gdt, d + 0x10)) + added;
        put16(&mut fs.gdt, d + 0x10, dirs as u16);
    }
    pieces.push((1, fs.gdt.clone()));
    write_coalesced(f, img, pieces)?;
    put32(&mut fs.sb, 0x0C, free_b as u32);
    put32(&mut fs.sb, 0x10, free_i as u32);
    if large_file {
        let ro = le32(&fs.sb, 0x64) | RO_COMPAT_LARGE_FILE;
        put32(&mut fs.sb, 0x64, ro);
    }
    f.write_all_at(&fs.sb, 1024).map_err(io_at(img))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::process::Command;

    const FEATURES: &str = crate::rootfs::ext4::PORTABLE_FEATURES;

    fn tools(test: &str) -> bool {
        for t in ["mkfs.ext4", "e2fsck", "debugfs", "tune2fs"] {
            if crate::rootfs::proc::which(t).is_none() {
                crate::testutil::skip(test, &format!("{t} not installed"));
                return false;
            }
        }
        true
    }

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    fn run(cmd: &mut Command) -> (i32, String) {
        let o = cmd.output().unwrap();
        let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
        s.push_str(&String::from_utf8_lossy(&o.stderr));
        (o.status.code().unwrap_or(-1), s)
    }

    /// The caller's exact command: an empty filesystem on a fresh sparse file.
    fn mkfs_empty(img: &Path, size: u64, inodes: u64, fixed: Option<(&str, &str)>) {
        let _ = std::fs::remove_file(img);
        File::create(img).unwrap().set_len(size).unwrap();
        let mut e = String::from("lazy_journal_init=1");
        let mut c = Command::new("mkfs.ext4");
        c.args([
            "-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256", "-m", "0",
        ])
        .args(["-O", FEATURES, "-N", &inodes.to_string()]);
        if let Some((uuid, seed)) = fixed {
            e.push_str(",hash_seed=");
            e.push_str(seed);
            c.args(["-U", uuid])
                .env("E2FSPROGS_FAKE_TIME", "1700000000");
        }
        c.args(["-E", &e]).arg(img);
        let (code, out) = run(&mut c);
        assert_eq!(code, 0, "mkfs: {out}");
    }

    /// Checksums on, as pack does, and the image still clean.
    fn csum_on(img: &Path, when: &str) {
        crate::rootfs::ext4::enable_csum(img, None).unwrap();
        fsck_clean(img, when);
    }

    fn fsck_clean(img: &Path, when: &str) {
        let (code, out) = run(Command::new("e2fsck").args(["-f", "-n"]).arg(img));
        assert_eq!(code, 0, "e2fsck -fn {when}:\n{out}");
    }

    fn debugfs(img: &Path, req: &str) -> String {
        run(Command::new("debugfs").arg("-R").arg(req).arg(img)).1
    }

    /// Deterministic bytes that do not compress or dedupe.
    fn noise(n: usize, mut seed: u64) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            v.extend_from_slice(&seed.to_le_bytes());
        }
        v.truncate(n);
        v
    }

    fn setxattr(p: &Path, name: &str, value: &[u8]) {
        let c = CString::new(p.as_os_str().as_bytes()).unwrap();
        let n = CString::new(name).unwrap();
        let r = unsafe {
            libc::lsetxattr(
                c.as_ptr(),
                n.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        assert_eq!(
            r,
            0,
            "setxattr {name} on {}: {}",
            p.display(),
            io::Error::last_os_error()
        );
    }

    fn getxattr(p: &Path, name: &str) -> Vec<u8> {
        let c = CString::new(p.as_os_str().as_bytes()).unwrap();
        let n = CString::new(name).unwrap();
        let mut buf = vec![0u8; 65536];
        let r =
            unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        assert!(r >= 0, "getxattr {name}: {}", io::Error::last_os_error());
        buf.truncate(r as usize);
        buf
    }

    fn mknod(p: &Path, mode: u32, major: u32, minor: u32) {
        let c = CString::new(p.as_os_str().as_bytes()).unwrap();
        let r = unsafe { libc::mknod(c.as_ptr(), mode, libc::makedev(major, minor)) };
        assert_eq!(
            r,
            0,
            "mknod {}: {}",
            p.display(),
            io::Error::last_os_error()
        );
    }

    /// A userspace (version 2) POSIX ACL: owner rwx, user 1000 r-x, group r-x, mask r-x, other r.
    fn acl_xattr(named_group: bool) -> Vec<u8> {
        let mut v = 2u32.to_le_bytes().to_vec();
        let mut e = |tag: u16, perm: u16, id: u32| {
            v.extend_from_slice(&tag.to_le_bytes());
            v.extend_from_slice(&perm.to_le_bytes());
            v.extend_from_slice(&id.to_le_bytes());
        };
        e(ACL_USER_OBJ, 7, u32::MAX);
        e(ACL_USER, 5, 1000);
        e(ACL_GROUP_OBJ, 5, u32::MAX);
        if named_group {
            e(ACL_GROUP, 4, 2000);
        }
        e(ACL_MASK, 5, u32::MAX);
        e(ACL_OTHER, 4, u32::MAX);
        v
    }

    /// What the rich tree holds beyond the basics (root-only parts).
    struct Rich {
        devices: bool,
        capability: bool,
    }

    fn rich_tree(t: &Path) -> Rich {
        use std::os::unix::fs::{symlink, PermissionsExt};
        let root = is_root();
        let set_mode = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };
        std::fs::create_dir_all(t.join("a/b/c")).unwrap();
        std::fs::write(t.join("a/b/c/deep.txt"), b"deep\n").unwrap();
        std::fs::create_dir(t.join("big")).unwrap();
        for i in 0..600 {
            let p = t.join(format!("big/entry-with-a-rather-long-name-{i:04}"));
            std::fs::write(&p, format!("{i}\n")).unwrap();
        }
        std::fs::write(t.join("empty"), b"").unwrap();
        std::fs::write(t.join("small.txt"), b"hello\n").unwrap();
        std::fs::write(t.join("random.bin"), noise(5 << 20 | 123, 0x9E37_79B9)).unwrap();
        {
            let f = File::create(t.join("sparse.bin")).unwrap();
            f.set_len(20 << 20).unwrap();
            f.write_all_at(&noise(5000, 7), 8 << 20).unwrap();
            f.write_all_at(b"tail", (20 << 20) - 4).unwrap();
        }
        std::fs::write(t.join("hard1"), b"linked\n").unwrap();
        std::fs::hard_link(t.join("hard1"), t.join("a/hard2")).unwrap();
        std::fs::hard_link(t.join("hard1"), t.join("hard3")).unwrap();
        symlink("small.txt", t.join("short")).unwrap();
        symlink("x/".repeat(50) + "target", t.join("long")).unwrap();
        std::fs::write(t.join("setuid"), b"#!/bin/sh\n").unwrap();
        set_mode(&t.join("setuid"), 0o4755);
        std::fs::create_dir(t.join("setgid")).unwrap();
        set_mode(&t.join("setgid"), 0o2775);
        std::fs::create_dir(t.join("sticky")).unwrap();
        set_mode(&t.join("sticky"), 0o1777);
        let fifo = CString::new(t.join("fifo").as_os_str().as_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o640) }, 0);
        drop(std::os::unix::net::UnixListener::bind(t.join("sock")).unwrap());
        std::fs::write(t.join("xattrs"), b"x").unwrap();
        setxattr(&t.join("xattrs"), "user.a", b"1");
        setxattr(&t.join("xattrs"), "user.empty", b"");
        setxattr(&t.join("xattrs"), "user.bb", b"two");
        setxattr(&t.join("random.bin"), "user.big", &noise(3000, 3));
        setxattr(&t.join("random.bin"), "user.small", b"s");
        std::fs::write(t.join("acl.txt"), b"acl\n").unwrap();
        setxattr(
            &t.join("acl.txt"),
            "system.posix_acl_access",
            &acl_xattr(true),
        );
        std::fs::create_dir(t.join("acldir")).unwrap();
        setxattr(
            &t.join("acldir"),
            "system.posix_acl_default",
            &acl_xattr(false),
        );
        setxattr(&t.join("a"), "user.on-a-dir", b"d");
        if root {
            std::os::unix::fs::lchown(t.join("small.txt"), Some(1000), Some(1000)).unwrap();
            std::os::unix::fs::lchown(t.join("setgid"), Some(1000), Some(1000)).unwrap();
            std::os::unix::fs::lchown(t.join("long"), Some(100_000), Some(200_000)).unwrap();
            std::os::unix::fs::lchown(t.join("random.bin"), Some(70_000), Some(1)).unwrap();
            mknod(&t.join("null"), libc::S_IFCHR | 0o666, 1, 3);
            mknod(&t.join("disk"), libc::S_IFBLK | 0o660, 8, 0);
            mknod(&t.join("bigdev"), libc::S_IFCHR | 0o600, 300, 70_000);
            // v2 file capability: cap_net_bind_service (bit 10), effective.
            let mut cap = 0x0200_0001u32.to_le_bytes().to_vec();
            for w in [1u32 << 10, 0, 0, 0] {
                cap.extend_from_slice(&w.to_le_bytes());
            }
            std::fs::write(t.join("capped"), b"cap").unwrap();
            setxattr(&t.join("capped"), "security.capability", &cap);
        } else {
            crate::testutil::skip(
                "populate rich tree",
                "owners, device nodes and capabilities need root",
            );
        }
        Rich {
            devices: root,
            capability: root,
        }
    }

    /// Every path under `t`, relative, with "/" for the top.
    fn all_paths(t: &Path) -> Vec<String> {
        let mut out = vec!["/".to_string()];
        let mut stack = vec![t.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                out.push(format!("/{}", p.strip_prefix(t).unwrap().display()));
                if std::fs::symlink_metadata(&p).unwrap().is_dir() {
                    stack.push(p);
                }
            }
        }
        out.sort();
        out
    }

    /// `debugfs stat` of each path, reduced to what two correct images of one tree share
    /// (no inode or block numbers, no ctime/atime/crtime, no directory sizes: mkfs -d packs
    /// directories without checksum tails), plus the inode number and raw mtime extra.
    fn stats(img: &Path, paths: &[String], dir: &Path) -> BTreeMap<String, (String, u32, u32)> {
        let cmds = dir.join(format!("cmds-{}", std::process::id()));
        let text: String = paths.iter().map(|p| format!("stat {p}\n")).collect();
        std::fs::write(&cmds, text).unwrap();
        let (_, out) = run(Command::new("debugfs").arg("-f").arg(&cmds).arg(img));
        let mut res = BTreeMap::new();
        for chunk in out.split("debugfs: stat ").skip(1) {
            let mut lines = chunk.lines();
            let path = lines.next().unwrap().trim().to_string();
            let (mut norm, mut ino, mut mextra, mut is_dir, mut skip_ext) =
                (String::new(), 0, 0, false, false);
            // Listed in storage order, which is free within the inode; compared as a set.
            let mut xattrs = Vec::new();
            for l in lines {
                if let Some(rest) = l.strip_prefix("Inode: ") {
                    ino = rest.split_whitespace().next().unwrap().parse().unwrap();
                    is_dir = l.contains("Type: directory");
                    norm.push_str(&l[l.find("Type:").unwrap()..]);
                } else if l.starts_with("Generation:")
                    || l.starts_with(" ctime:")
                    || l.starts_with(" atime:")
                    || l.starts_with("crtime:")
                    || l.starts_with("Inode checksum")
                {
                    continue;
                } else if let Some(m) = l.strip_prefix(" mtime: ") {
                    let (secs, rest) = m.split_once(':').unwrap();
                    mextra = u32::from_str_radix(&rest[..8], 16).unwrap();
                    norm.push_str(secs);
                } else if l.starts_with("User:") && is_dir {
                    norm.push_str(&l[..l.find("Size:").unwrap()]);
                } else if l.starts_with("Links:") && is_dir {
                    norm.push_str(&l[..l.find("Blockcount:").unwrap()]);
                } else if l.starts_with("File ACL:") {
                    norm.push_str(if l.trim() == "File ACL: 0" {
                        "no xattr block"
                    } else {
                        "xattr block"
                    });
                } else if l == "EXTENTS:" || l == "BLOCKS:" {
                    skip_ext = true;
                    continue;
                } else if skip_ext || l.is_empty() {
                    continue;
                } else if l.starts_with("  ") {
                    xattrs.push(l.to_string());
                    continue;
                } else {
                    norm.push_str(l);
                }
                norm.push('\n');
            }
            xattrs.sort();
            norm.push_str(&xattrs.join("\n"));
            res.insert(path, (norm, ino, mextra));
        }
        res
    }

    fn populate_into(tree: &Path, img: &Path, o: &PopulateOpts) -> PopulateStats {
        mkfs_empty(img, 96 << 20, 4096, None);
        populate(tree, img, o).unwrap()
    }

    #[test]
    fn rich_tree_matches_mkfs_d_and_stays_clean_through_csum_and_fsck_d() {
        if !tools("rich_tree_matches_mkfs_d") {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let t = d.path().join("tree");
        std::fs::create_dir(&t).unwrap();
        let rich = rich_tree(&t);
        let img = d.path().join("img");
        let st = populate_into(&t, &img, &PopulateOpts::default());
        assert_eq!(st.multiblock_dirs, 1, "{st:?}");
        assert_eq!(st.dirs, 8, "{st:?}");
        assert!(st.data_bytes > 5 << 20 && st.data_bytes < 6 << 20, "{st:?}");
        fsck_clean(&img, "after populate");

        // The reference: mkfs.ext4 -d from the same tree, same geometry.
        let refimg = d.path().join("ref");
        File::create(&refimg).unwrap().set_len(96 << 20).unwrap();
        let (code, out) = run(Command::new("mkfs.ext4")
            .args([
                "-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256", "-m", "0",
            ])
            .args(["-O", FEATURES, "-N", "4096", "-d"])
            .arg(&t)
            .arg(&refimg));
        assert_eq!(code, 0, "{out}");
        let paths = all_paths(&t);
        let mine = stats(&img, &paths, d.path());
        let theirs = stats(&refimg, &paths, d.path());
        assert_eq!(mine.len(), paths.len());
        for p in &paths {
            assert_eq!(
                mine[p].0, theirs[p].0,
                "debugfs stat {p}: populate vs mkfs -d"
            );
            // Nanoseconds: mkfs -d drops them, populate keeps them.
            let md = std::fs::symlink_metadata(t.join(p.trim_start_matches('/'))).unwrap();
            assert_eq!(mine[p].2 >> 2, md.mtime_nsec() as u32, "{p} mtime ns");
        }
        let s = |p: &str| &mine[p].0;
        assert!(s("/setuid").contains("Mode:  04755"), "{}", s("/setuid"));
        assert!(s("/setgid").contains("Mode:  02775"));
        assert!(s("/sticky").contains("Mode:  01777"));
        assert!(s("/fifo").contains("Type: FIFO"));
        assert!(s("/sock").contains("Type: socket"));
        assert!(s("/short").contains("Fast link dest: \"small.txt\""));
        assert!(
            s("/xattrs").contains("user.bb (3) = \"two\""),
            "{}",
            s("/xattrs")
        );
        assert!(s("/random.bin").contains("\nxattr block"));
        assert!(s("/xattrs").contains("\nno xattr block"));
        assert!(s("/big").contains("Links: 2"));
        assert!(s("/a").contains("Links: 3"));
        // a, acldir, big, setgid, sticky and lost+found.
        assert!(s("/").contains("Links: 8"), "{}", s("/"));
        // Hard links: one inode, three names.
        assert_eq!(mine["/hard1"].1, mine["/a/hard2"].1);
        assert_eq!(mine["/hard1"].1, mine["/hard3"].1);
        assert!(s("/hard1").contains("Links: 3"));
        if rich.devices {
            assert!(s("/null").contains("Type: character special"));
            assert!(
                s("/bigdev").contains("Device major/minor number: 300:70000"),
                "{}",
                s("/bigdev")
            );
            assert!(s("/disk").contains("Type: block special"));
            assert!(
                s("/long").contains("User: 100000   Group: 200000"),
                "{}",
                s("/long")
            );
            assert!(s("/random.bin").contains("User: 70000"));
        }

        // Contents, byte for byte.
        let out_dir = d.path().join("out");
        std::fs::create_dir(&out_dir).unwrap();
        debugfs(&img, &format!("rdump / {}", out_dir.display()));
        let mut files = 0;
        for p in &paths[1..] {
            let src = t.join(p.trim_start_matches('/'));
            let dst = out_dir.join(p.trim_start_matches('/'));
            let md = std::fs::symlink_metadata(&src).unwrap();
            if md.is_file() {
                assert!(
                    std::fs::read(&src).unwrap() == std::fs::read(&dst).unwrap(),
                    "{p}"
                );
                files += 1;
            } else if md.file_type().is_symlink() {
                assert_eq!(
                    std::fs::read_link(&src).unwrap(),
                    std::fs::read_link(&dst).unwrap()
                );
            }
        }
        assert!(files > 600);

        // Raw xattr values: the capability byte for byte; ACLs in ext4's format on disk,
        // identical to what mkfs -d stores.
        let ea = |img: &Path, path: &str, name: &str, raw: bool| {
            let o = d.path().join("ea.out");
            let _ = std::fs::remove_file(&o);
            let r = if raw { "-r " } else { "" };
            debugfs(img, &format!("ea_get {r}-f {} {path} {name}", o.display()));
            std::fs::read(&o).unwrap_or_default()
        };
        for (path, name, named_group) in [
            ("/acl.txt", "system.posix_acl_access", true),
            ("/acldir", "system.posix_acl_default", false),
        ] {
            let disk = ea(&img, path, name, true);
            assert_eq!(disk, acl_to_disk(&acl_xattr(named_group)).unwrap());
            assert_eq!(&disk[..4], &1u32.to_le_bytes());
            assert_eq!(disk, ea(&refimg, path, name, true), "{path} vs mkfs -d");
            // debugfs's own conversion back (ids of short entries read as 0, not -1).
            assert_eq!(ea(&img, path, name, false), ea(&refimg, path, name, false));
        }
        assert_eq!(ea(&img, "/random.bin", "user.big", false), noise(3000, 3));
        if rich.capability {
            let cap = getxattr(&t.join("capped"), "security.capability");
            assert_eq!(ea(&img, "/capped", "security.capability", false), cap);
        }

        // Checksums in place, then the index for the big directory.
        csum_on(&img, "after tune2fs");
        let (code, out) = run(Command::new("e2fsck").args(["-f", "-y", "-D"]).arg(&img));
        assert!(code <= 1, "e2fsck -fyD: {out}");
        fsck_clean(&img, "after e2fsck -fyD");
        assert!(debugfs(&img, "stat /big").contains("Flags: 0x81000"));
    }

    #[test]
    fn small_dirs_need_no_fsck_after_tune2fs() {
        if !tools("small_dirs_need_no_fsck_after_tune2fs") {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let t = d.path().join("tree");
        std::fs::create_dir_all(t.join("etc/sub")).unwrap();
        for i in 0..40 {
            std::fs::write(t.join(format!("etc/f{i}")), noise(i * 1000, i as u64 + 1)).unwrap();
        }
        let img = d.path().join("img");
        let st = populate_into(&t, &img, &PopulateOpts::default());
        assert_eq!(st.multiblock_dirs, 0);
        assert_eq!(st.files, 40);
        crate::rootfs::ext4::enable_csum(&img, None).unwrap();
        assert!(!crate::rootfs::ext4::fsck_requested(&img).unwrap());
        fsck_clean(&img, "after tune2fs");
    }

    #[test]
    fn tiny_extents_build_deep_extent_trees() {
        if !tools("tiny_extents_build_deep_extent_trees") {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let t = d.path().join("tree");
        std::fs::create_dir(&t).unwrap();
        // 6 MiB = 1536 one-block extents: 5 leaves, so an index block under i_block (depth 2);
        // 16 blocks: 16 extents in one leaf (depth 1), or 4 in i_block; a 600-entry directory
        // split too.
        let big = noise(6 << 20, 11);
        std::fs::write(t.join("deep"), &big).unwrap();
        std::fs::write(t.join("shallow"), noise(16 * 4096 - 1, 12)).unwrap();
        std::fs::create_dir(t.join("d")).unwrap();
        for i in 0..600 {
            std::fs::write(t.join(format!("d/name-of-some-length-{i:04}")), b"").unwrap();
        }
        let img = d.path().join("img");
        for max in [1u32, 4] {
            let o = PopulateOpts {
                max_extent_blocks: max,
                ..PopulateOpts::default()
            };
            populate_into(&t, &img, &o);
            fsck_clean(&img, &format!("max_extent_blocks {max}"));
            let ex = debugfs(&img, "ex /deep");
            let depth = if max == 1 { "2/ 2" } else { "1/ 1" };
            assert!(ex.contains(&format!(" 0/ {}", &depth[..1])), "{ex}");
            assert!(ex.contains(depth), "max {max}: {ex}");
            let ex = debugfs(&img, "ex /shallow");
            let leaf = if max == 1 { "1/ 1" } else { "0/ 0" };
            assert!(ex.contains(leaf), "max {max}: {ex}");
            let out = d.path().join("out");
            let _ = std::fs::remove_dir_all(&out);
            std::fs::create_dir(&out).unwrap();
            debugfs(&img, &format!("rdump / {}", out.display()));
            assert!(std::fs::read(out.join("deep")).unwrap() == big);
            csum_on(&img, "tiny extents after tune2fs");
        }
    }

    #[test]
    fn same_tree_and_epoch_give_identical_images() {
        if !tools("same_tree_and_epoch_give_identical_images") {
            return;
        }
        use sha2::{Digest, Sha256};
        let d = tempfile::tempdir().unwrap();
        let t = d.path().join("tree");
        std::fs::create_dir_all(t.join("x/y")).unwrap();
        for i in 0..50 {
            std::fs::write(t.join(format!("x/f{i}")), noise(i * 333, 5)).unwrap();
        }
        std::fs::write(t.join("x/y/z"), b"z").unwrap();
        setxattr(&t.join("x/y/z"), "user.k", b"v");
        let o = PopulateOpts {
            epoch: Some(1_600_000_000),
            ..PopulateOpts::default()
        };
        let fixed = Some((
            "8b5b0c8e-1f0e-4f57-9a51-6a8c1d2b3c4d",
            "1b2c3d4e-5f60-4718-8293-a4b5c6d7e8f9",
        ));
        let mut sums = Vec::new();
        for n in 0..2 {
            let img = d.path().join(format!("img{n}"));
            mkfs_empty(&img, 32 << 20, 1024, fixed);
            populate(&t, &img, &o).unwrap();
            fsck_clean(&img, "epoch image");
            sums.push(hex::encode(Sha256::digest(std::fs::read(&img).unwrap())));
            // The tree's times move between runs; the image must not.
            std::fs::write(t.join("x/f1"), noise(333, 5)).unwrap();
        }
        assert_eq!(sums[0], sums[1]);
        let img = d.path().join("img0");
        let st = debugfs(&img, "stat /x/f3");
        assert!(st.contains("ctime: 0x5f5e1000:00000000"), "{st}");
        assert!(st.contains("crtime: 0x5f5e1000:00000000"), "{st}");
        assert!(debugfs(&img, "stat /lost+found").contains("atime: 0x5f5e1000:00000000"));
    }

    #[test]
    fn too_small_images_are_no_space_errors() {
        if !tools("too_small_images_are_no_space_errors") {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let t = d.path().join("tree");
        std::fs::create_dir(&t).unwrap();
        std::fs::write(t.join("huge"), noise(12 << 20, 1)).unwrap();
        let img = d.path().join("img");
        mkfs_empty(&img, 8 << 20, 64, None);
        match populate(&t, &img, &PopulateOpts::default()) {
            Err(Ext4Error::NoSpace(m)) => assert!(m.starts_with("blocks:"), "{m}"),
            r => panic!("expected NoSpace, got {r:?}"),
        }
        std::fs::remove_file(t.join("huge")).unwrap();
        for i in 0..100 {
            std::fs::write(t.join(format!("f{i}")), b"").unwrap();
        }
        mkfs_empty(&img, 8 << 20, 16, None);
        match populate(&t, &img, &PopulateOpts::default()) {
            Err(Ext4Error::NoSpace(m)) => assert!(m.contains("inodes") && m.contains("100"), "{m}"),
            r => panic!("expected NoSpace, got {r:?}"),
        }
    }

    #[test]
    fn refuses_images_it_cannot_fill() {
        if !tools("refuses_images_it_cannot_fill") {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let t = d.path().join("tree");
        std::fs::create_dir(&t).unwrap();
        std::fs::write(t.join("f"), b"f").unwrap();
        let img = d.path().join("img");
        for (feat, why) in [
            (format!("{FEATURES},metadata_csum"), "metadata_csum"),
            (format!("{FEATURES},64bit"), "64bit"),
        ] {
            File::create(&img).unwrap().set_len(16 << 20).unwrap();
            let (code, out) = run(Command::new("mkfs.ext4")
                .args(["-q", "-F", "-b", "4096", "-O", &feat])
                .arg(&img));
            assert_eq!(code, 0, "{out}");
            match populate(&t, &img, &PopulateOpts::default()) {
                Err(Ext4Error::Format(_, m)) => assert!(m.contains(why), "{m}"),
                r => panic!("{why}: expected Format, got {r:?}"),
            }
        }
        // Already populated: refused rather than overwritten.
        mkfs_empty(&img, 16 << 20, 256, None);
        populate(&t, &img, &PopulateOpts::default()).unwrap();
        match populate(&t, &img, &PopulateOpts::default()) {
            Err(Ext4Error::Format(_, m)) => assert!(m.contains("in use"), "{m}"),
            r => panic!("expected Format, got {r:?}"),
        }
        fsck_clean(&img, "after a refused second populate");
    }

    #[test]
    fn acl_conversion_and_layout_details() {
        assert_eq!(
            acl_to_disk(&acl_xattr(true)).unwrap().len(),
            4 + 4 + 8 + 4 + 8 + 4 + 4
        );
        assert!(acl_to_disk(&[1, 0, 0, 0]).is_none());
        assert!(acl_to_disk(&acl_xattr(true)[..10]).is_none());
        assert_eq!(split_xattr_name(b"user.x"), (1, b"x".to_vec()));
        assert_eq!(
            split_xattr_name(b"security.capability"),
            (6, b"capability".to_vec())
        );
        assert_eq!(
            split_xattr_name(b"system.posix_acl_default"),
            (3, Vec::new())
        );
        assert_eq!(split_xattr_name(b"trusted.overlay.opaque").0, 4);
        // 12 bytes each: 400 of them overflow one block.
        let ents: Vec<Dirent> = (0..400)
            .map(|i| Dirent {
                name: format!("n{i:03}").into_bytes(),
                ino: 100 + i,
                ftype: FT_REG,
            })
            .collect();
        let b = dir_blocks(12, 2, &ents);
        assert_eq!(b.len(), 2 * BS);
        for blk in b.chunks(BS) {
            // Entries chain exactly to the tail; the tail is the empty checksum entry.
            let mut pos = 0;
            while pos < BS - DIR_TAIL {
                pos += usize::from(le16(blk, pos + 4));
            }
            assert_eq!(pos, BS - DIR_TAIL);
            assert_eq!(&blk[BS - 12..BS - 4], &[0, 0, 0, 0, 12, 0, 0, 0xDE]);
        }
        let dev = |major: u32, minor: u32| {
            let n = Node {
                path: PathBuf::from("/x"),
                mode: 0o20600,
                uid: 0,
                gid: 0,
                atime: (0, 0),
                mtime: (0, 0),
                ctime: (0, 0),
                links: 1,
                kind: Kind::Dev(libc::makedev(major, minor)),
                xattrs: Vec::new(),
            };
            let mut ib = vec![0u8; 256];
            encode_inode(&mut ib, &n, &Layout::default(), 1, None).unwrap();
            (le32(&ib, IBLOCK), le32(&ib, IBLOCK + 4))
        };
        assert_eq!(dev(1, 3), (0x0103, 0));
        assert_eq!(
            dev(300, 70_000),
            (0, (70_000 & 0xFF) | (300 << 8) | ((70_000 & !0xFF) << 12))
        );
    }

    /// A file above 4 GiB (sparse in the tree, so the image stays small): its size needs
    /// `i_size_high`, its last block a logical number above 2^20, and the data at both ends
    /// must come back from where the extents say.
    #[test]
    fn files_above_4_gib_keep_size_and_far_blocks() {
        if !tools("files_above_4_gib_keep_size_and_far_blocks") {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let t = d.path().join("tree");
        std::fs::create_dir_all(&t).unwrap();
        let size: u64 = (5 << 30) + 12345;
        let (head, tail) = (noise(10_000, 7), noise(8_000, 9));
        {
            let f = File::create(t.join("big")).unwrap();
            f.set_len(size).unwrap();
            f.write_all_at(&head, 0).unwrap();
            f.write_all_at(&tail, size - tail.len() as u64).unwrap();
        }
        let img = d.path().join("img");
        mkfs_empty(&img, 64 << 20, 1024, None);
        let st = populate(&t, &img, &PopulateOpts::default()).unwrap();
        assert_eq!(st.files, 1);
        fsck_clean(&img, "after populate");
        let stat = debugfs(&img, "stat /big");
        assert!(stat.contains(&format!("Size: {size}")), "{stat}");
        let features = debugfs(&img, "features");
        assert!(features.contains("large_file"), "{features}");
        // Read back both ends through the block map debugfs reports.
        let image = File::open(&img).unwrap();
        let read_at = |logical: u64, off: usize, len: usize| -> Vec<u8> {
            let out = debugfs(&img, &format!("bmap /big {logical}"));
            // stdout (the number) comes before debugfs's banner on stderr.
            let phys: u64 = out
                .split_whitespace()
                .next()
                .and_then(|w| w.parse().ok())
                .unwrap_or_else(|| panic!("bmap {logical}: {out}"));
            assert!(phys > 0, "block {logical} is not mapped: {out}");
            let mut b = vec![0u8; len];
            image
                .read_exact_at(&mut b, phys * BS64 + off as u64)
                .unwrap();
            b
        };
        assert_eq!(read_at(0, 0, 4096), head[..4096]);
        assert_eq!(read_at(2, 0, 10_000 - 8192), head[8192..]);
        let tail_start = size - tail.len() as u64;
        let last = (size - 1) / BS64;
        let first_tail = tail_start / BS64;
        assert!(last > 1 << 20);
        let in_first = (BS64 - tail_start % BS64) as usize;
        assert_eq!(
            read_at(first_tail, (tail_start % BS64) as usize, in_first),
            tail[..in_first]
        );
        let in_last = ((size - 1) % BS64 + 1) as usize;
        assert_eq!(read_at(last, 0, in_last), tail[tail.len() - in_last..]);
        csum_on(&img, "after tune2fs");
    }
}
