//! A small read-only ext4 walker: path → inode (its bytes and where they sit) and extent map.
//!
//! Hand-written because no well-kept crate exposes inode locations and extent maps (`ext4-view`
//! reads file contents only), and [`super::envslot`] needs both to patch a copy of the image.
//! It reads through a callback, so the image may be a raw file or sit behind a qcow2 reader.
//!
//! Inputs are untrusted: every offset is checked against the filesystem's size, loops are
//! bounded, and anything unexpected (corrupt, or a layout this walker does not handle, such as
//! `meta_bg` descriptors or inline-data directories) is "not found" (`Ok(None)`), so the caller
//! falls back to its slower path. `Err` only carries failures of the callback itself.

use std::io;

use super::ext4::{crc32c, le16, le32, put16, put32};

/// Fill the buffer from this byte offset of the image (exact-length reads).
pub type ReadAt<'a> = &'a mut dyn FnMut(&mut [u8], u64) -> io::Result<()>;

const INCOMPAT_RECOVER: u32 = 0x4;
const INCOMPAT_META_BG: u32 = 0x10;
const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_CSUM_SEED: u32 = 0x2000;
const RO_COMPAT_METADATA_CSUM: u32 = 0x400;

/// Inode flag: the file maps its blocks with an extent tree.
pub const EXTENTS_FL: u32 = 0x8_0000;
/// Inode flag: the contents live inside the inode.
pub const INLINE_DATA_FL: u32 = 0x1000_0000;
pub const S_IFMT: u16 = 0xF000;
pub const S_IFREG: u16 = 0x8000;
pub const S_IFDIR: u16 = 0x4000;
/// Extent header magic.
pub const EXT_MAGIC: u16 = 0xF30A;
/// `ee_len` above this marks an unwritten (uninitialized) extent.
pub const EXT_INIT_MAX_LEN: u32 = 32768;
/// Offset and size of `i_block`, where the root of the extent tree lives.
pub const I_BLOCK: usize = 0x28;
pub const I_BLOCK_LEN: usize = 60;

/// Directories bigger than this are refused: a real /etc is a few hundred KiB at most, and
/// each launch reads this through the disk image.
const MAX_DIR_BYTES: u64 = 8 << 20;
/// The kernel's extent trees are at most 5 levels deep.
const MAX_DEPTH: u16 = 5;
/// Tree blocks visited and leaf extents collected per file, against hostile trees.
const MAX_NODES: usize = 4096;
const MAX_EXTENTS: usize = 1 << 16;

/// One leaf extent: `len` blocks from logical `logical` at physical `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub logical: u32,
    pub len: u32,
    pub start: u64,
    pub unwritten: bool,
}

/// One on-disk inode: its number, byte offset in the image and raw bytes (`s_inode_size`).
#[derive(Debug, Clone)]
pub struct Inode {
    pub number: u32,
    pub offset: u64,
    pub raw: Vec<u8>,
}

impl Inode {
    // `raw` is at least 128 bytes (checked in `Fs::open`), so these offsets are in range.
    pub fn mode(&self) -> u16 {
        le16(&self.raw, 0)
    }
    pub fn size(&self) -> u64 {
        u64::from(le32(&self.raw, 0x4)) | u64::from(le32(&self.raw, 0x6C)) << 32
    }
    pub fn links(&self) -> u16 {
        le16(&self.raw, 0x1A)
    }
    pub fn flags(&self) -> u32 {
        le32(&self.raw, 0x20)
    }
    pub fn i_block(&self) -> &[u8] {
        &self.raw[I_BLOCK..I_BLOCK + I_BLOCK_LEN]
    }
}

/// Parse an extent node (in `i_block` or a tree block): `(depth, entries)`, each entry 12 bytes.
pub fn node(b: &[u8]) -> Option<(u16, &[u8])> {
    if b.len() < 12 || le16(b, 0) != EXT_MAGIC {
        return None;
    }
    let (entries, max, depth) = (usize::from(le16(b, 2)), le16(b, 4), le16(b, 6));
    if entries > usize::from(max) || depth > MAX_DEPTH {
        return None;
    }
    let end = 12 + entries * 12;
    Some((depth, b.get(12..end)?))
}

/// The leaf extent in a 12-byte entry.
pub fn leaf(e: &[u8]) -> Extent {
    let raw_len = u32::from(le16(e, 4));
    let start = u64::from(le16(e, 6)) << 32 | u64::from(le32(e, 8));
    let unwritten = raw_len > EXT_INIT_MAX_LEN;
    Extent {
        logical: le32(e, 0),
        len: if unwritten {
            raw_len - EXT_INIT_MAX_LEN
        } else {
            raw_len
        },
        start,
        unwritten,
    }
}

/// Store `e` as leaf entry `i` of the extent node `b` (the inverse of [`leaf`]).
pub fn put_leaf(b: &mut [u8], i: usize, e: &Extent) {
    let o = 12 + 12 * i;
    let len = if e.unwritten {
        e.len + EXT_INIT_MAX_LEN
    } else {
        e.len
    };
    put32(b, o, e.logical);
    put16(b, o + 4, len as u16);
    put16(b, o + 6, (e.start >> 32) as u16);
    put32(b, o + 8, e.start as u32);
}

/// ext4's inode checksum (`ext4_inode_csum`, fs/ext4/inode.c): crc32c over the inode number,
/// `i_generation` and the whole inode with both checksum fields as zeros. Also whether the
/// inode has room for the high half (`i_checksum_hi` inside `i_extra_isize`); without it only
/// the low 16 bits are stored and compared.
fn inode_csum(seed: u32, number: u32, raw: &[u8]) -> (u32, bool) {
    let hi = raw.len() > 128 && 128 + usize::from(le16(raw, 0x80)) >= 0x84;
    let mut c = crc32c(seed, &number.to_le_bytes());
    c = crc32c(c, &raw[0x64..0x68]);
    c = crc32c(c, &raw[..0x7C]);
    c = crc32c(c, &[0, 0]);
    if hi {
        c = crc32c(c, &raw[0x7E..0x82]);
        c = crc32c(c, &[0, 0]);
        c = crc32c(c, &raw[0x84..]);
    } else {
        c = crc32c(c, &raw[0x7E..]);
    }
    (c, hi)
}

/// Whether the checksum stored in inode `raw` (at least 128 bytes) is right.
pub fn csum_ok(seed: u32, number: u32, raw: &[u8]) -> bool {
    let (c, hi) = inode_csum(seed, number, raw);
    let lo = u32::from(le16(raw, 0x7C));
    match hi {
        true => lo | u32::from(le16(raw, 0x82)) << 16 == c,
        false => lo == c & 0xFFFF,
    }
}

/// Store the checksum of inode `raw` (at least 128 bytes).
pub fn set_csum(seed: u32, number: u32, raw: &mut [u8]) {
    let (c, hi) = inode_csum(seed, number, raw);
    put16(raw, 0x7C, c as u16);
    if hi {
        put16(raw, 0x82, (c >> 16) as u16);
    }
}

/// An opened filesystem: the superblock fields the walk needs.
pub struct Fs<'a> {
    read_at: ReadAt<'a>,
    pub block_size: u64,
    pub inode_size: usize,
    blocks_count: u64,
    inodes_count: u32,
    inodes_per_group: u32,
    first_data_block: u64,
    desc_size: u64,
    /// `s_first_meta_bg` when `meta_bg` is on: descriptors from there on live elsewhere.
    first_meta_bg: Option<u64>,
    /// Seed of metadata checksums (`None`: `metadata_csum` is off).
    pub csum_seed: Option<u32>,
}

impl<'a> Fs<'a> {
    /// `Ok(None)` when the image is not ext4, or is one this walker does not handle.
    pub fn open(read_at: ReadAt<'a>) -> io::Result<Option<Self>> {
        let mut sb = vec![0u8; 1024];
        match read_at(&mut sb, 1024) {
            // Too short to hold a superblock: not ext4.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            r => r?,
        }
        if le16(&sb, 0x38) != 0xEF53 {
            return Ok(None);
        }
        let incompat = le32(&sb, 0x60);
        let log = le32(&sb, 0x18);
        // A journal that needs replaying could rewrite the very blocks the caller patches.
        if log > 6 || incompat & INCOMPAT_RECOVER != 0 {
            return Ok(None);
        }
        let block_size = 1024u64 << log;
        // Revision 0 has fixed 128-byte inodes and no s_inode_size.
        let inode_size = if le32(&sb, 0x4C) == 0 {
            128
        } else {
            usize::from(le16(&sb, 0x58))
        };
        let bit64 = incompat & INCOMPAT_64BIT != 0;
        let desc_size = if bit64 {
            u64::from(le16(&sb, 0xFE))
        } else {
            32
        };
        let mut blocks_count = u64::from(le32(&sb, 0x4));
        if bit64 {
            blocks_count |= u64::from(le32(&sb, 0x150)) << 32;
        }
        let inodes_per_group = le32(&sb, 0x28);
        if inode_size < 128
            || !inode_size.is_power_of_two()
            || inode_size as u64 > block_size
            || !(32..=block_size).contains(&desc_size)
            || (bit64 && desc_size < 64)
            || inodes_per_group == 0
        {
            return Ok(None);
        }
        let csum_seed = (le32(&sb, 0x64) & RO_COMPAT_METADATA_CSUM != 0).then(|| {
            if incompat & INCOMPAT_CSUM_SEED != 0 {
                // Set by `tune2fs -U` on a metadata_csum_seed fs: the UUID is no longer the seed.
                le32(&sb, 0x270)
            } else {
                crc32c(!0, &sb[0x68..0x78])
            }
        });
        Ok(Some(Fs {
            read_at,
            block_size,
            inode_size,
            blocks_count,
            inodes_count: le32(&sb, 0x0),
            inodes_per_group,
            first_data_block: u64::from(le32(&sb, 0x14)),
            desc_size,
            first_meta_bg: (incompat & INCOMPAT_META_BG != 0).then(|| u64::from(le32(&sb, 0x104))),
            csum_seed,
        }))
    }

    /// Byte offset of `len` bytes starting `skip` bytes into block `block`, if they lie inside
    /// the filesystem.
    pub fn span(&self, block: u64, skip: u64, len: u64) -> Option<u64> {
        let off = block.checked_mul(self.block_size)?.checked_add(skip)?;
        let end = off.checked_add(len)?;
        (end <= self.blocks_count.checked_mul(self.block_size)?).then_some(off)
    }

    pub fn read(&mut self, buf: &mut [u8], off: u64) -> io::Result<()> {
        (self.read_at)(buf, off)
    }

    /// Read one block; `Ok(None)` when it lies outside the filesystem.
    fn block(&mut self, block: u64) -> io::Result<Option<Vec<u8>>> {
        let Some(off) = self.span(block, 0, self.block_size) else {
            return Ok(None);
        };
        let mut b = vec![0u8; self.block_size as usize];
        self.read(&mut b, off)?;
        Ok(Some(b))
    }

    pub fn inode(&mut self, number: u32) -> io::Result<Option<Inode>> {
        if number == 0 || number > self.inodes_count {
            return Ok(None);
        }
        let group = u64::from((number - 1) / self.inodes_per_group);
        let index = u64::from((number - 1) % self.inodes_per_group);
        let desc_at = group * self.desc_size;
        if self
            .first_meta_bg
            .is_some_and(|f| desc_at / self.block_size >= f)
        {
            return Ok(None);
        }
        // The descriptor table starts in the block after the superblock's.
        let gdt = self.first_data_block + 1;
        let dlen = self.desc_size.min(64);
        let Some(off) = self.span(gdt, desc_at, dlen) else {
            return Ok(None);
        };
        let mut d = vec![0u8; dlen as usize];
        self.read(&mut d, off)?;
        let mut table = u64::from(le32(&d, 0x8));
        if dlen >= 64 {
            table |= u64::from(le32(&d, 0x28)) << 32;
        }
        let isz = self.inode_size as u64;
        let Some(off) = self.span(table, index * isz, isz) else {
            return Ok(None);
        };
        let mut raw = vec![0u8; self.inode_size];
        self.read(&mut raw, off)?;
        Ok(Some(Inode {
            number,
            offset: off,
            raw,
        }))
    }

    /// All leaf extents of an extent-mapped inode; `Ok(None)` for a corrupt or oversized tree.
    pub fn extents(&mut self, ino: &Inode) -> io::Result<Option<Vec<Extent>>> {
        if ino.flags() & EXTENTS_FL == 0 {
            return Ok(None);
        }
        let mut out = Vec::new();
        let mut budget = MAX_NODES;
        let root = ino.i_block().to_vec();
        Ok(self.walk(&root, None, &mut out, &mut budget)?.map(|()| out))
    }

    fn walk(
        &mut self,
        b: &[u8],
        want_depth: Option<u16>,
        out: &mut Vec<Extent>,
        budget: &mut usize,
    ) -> io::Result<Option<()>> {
        let Some((depth, entries)) = node(b) else {
            return Ok(None);
        };
        // Each level must sit exactly one below its parent, so the walk cannot cycle.
        if want_depth.is_some_and(|w| w != depth) {
            return Ok(None);
        }
        for e in entries.chunks_exact(12) {
            if depth == 0 {
                if out.len() >= MAX_EXTENTS {
                    return Ok(None);
                }
                out.push(leaf(e));
                continue;
            }
            *budget = match budget.checked_sub(1) {
                Some(b) => b,
                None => return Ok(None),
            };
            let child = u64::from(le16(e, 8)) << 32 | u64::from(le32(e, 4));
            let Some(blk) = self.block(child)? else {
                return Ok(None);
            };
            if self.walk(&blk, Some(depth - 1), out, budget)?.is_none() {
                return Ok(None);
            }
        }
        Ok(Some(()))
    }

    /// Resolve an absolute path from the root directory (inode 2), without following symlinks.
    pub fn lookup(&mut self, path: &str) -> io::Result<Option<Inode>> {
        let Some(mut cur) = self.inode(2)? else {
            return Ok(None);
        };
        for name in path.split('/').filter(|c| !c.is_empty()) {
            let Some(n) = self.find_entry(&cur, name.as_bytes())? else {
                return Ok(None);
            };
            let Some(next) = self.inode(n)? else {
                return Ok(None);
            };
            cur = next;
        }
        Ok(Some(cur))
    }

    /// Linear scan of a directory for `name`. htree directories scan the same way: their index
    /// blocks read as one empty (inode 0) entry spanning the block, and metadata_csum tails are
    /// inode-0 entries too.
    fn find_entry(&mut self, dir: &Inode, name: &[u8]) -> io::Result<Option<u32>> {
        if dir.mode() & S_IFMT != S_IFDIR
            || dir.flags() & INLINE_DATA_FL != 0
            || dir.size() > MAX_DIR_BYTES
        {
            return Ok(None);
        }
        let Some(extents) = self.extents(dir)? else {
            return Ok(None);
        };
        let nblocks = dir.size().div_ceil(self.block_size);
        // Overlapping extents must not multiply the work: read at most the directory's size.
        let mut reads = nblocks;
        for e in extents.iter().filter(|e| !e.unwritten) {
            for i in 0..u64::from(e.len) {
                if u64::from(e.logical) + i >= nblocks {
                    break;
                }
                reads = match reads.checked_sub(1) {
                    Some(r) => r,
                    None => return Ok(None),
                };
                let Some(b) = self.block(e.start.saturating_add(i))? else {
                    return Ok(None);
                };
                match scan(&b, name) {
                    Scan::Found(n) => return Ok(Some(n)),
                    Scan::Corrupt => return Ok(None),
                    Scan::Absent => {}
                }
            }
        }
        Ok(None)
    }
}

enum Scan {
    Found(u32),
    Absent,
    Corrupt,
}

/// Look for `name` among one directory block's entries.
fn scan(b: &[u8], name: &[u8]) -> Scan {
    let mut pos = 0usize;
    while pos + 8 <= b.len() {
        let ino = le32(b, pos);
        let mut rec = usize::from(le16(b, pos + 4));
        // 64 KiB blocks store a whole-block rec_len as 0 or 65535 (it does not fit in u16).
        if b.len() == 65536 && (rec == 0 || rec == 65535) {
            rec = 65536;
        }
        let name_len = usize::from(b[pos + 6]);
        if rec < 8 || 8 + name_len > rec || pos + rec > b.len() {
            return Scan::Corrupt;
        }
        if ino != 0 && &b[pos + 8..pos + 8 + name_len] == name {
            return Scan::Found(ino);
        }
        pos += rec;
    }
    Scan::Absent
}
