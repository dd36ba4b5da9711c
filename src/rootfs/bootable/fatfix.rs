//! A repair pass over the FAT image `fatfs` 0.3 (the newest release) writes: its `create_dir`
//! writes a long-name entry in front of a new directory's `.` and `..` entries (it gives every
//! name one), so `.` is not in slot 0 and `..` not in slot 1, and `fsck.vfat` rewrites both
//! ("Expected a valid '.' entry in this slot"); on FAT32 it also points `..` of a top-level
//! directory at the root's cluster instead of 0. This pass drops those two long-name runs,
//! puts `.` and `..` first, and sets their clusters as the FAT specification says. It touches
//! nothing else: other entries keep their order and bytes.

use super::BootError;

const SLOT: usize = 32;

struct Geometry {
    bps: usize,
    cluster_bytes: usize,
    fat_at: usize,
    root_at: usize,
    root_len: usize,
    data_at: usize,
    fat32: bool,
    root_cluster: u32,
}

fn le16(b: &[u8], o: usize) -> usize {
    usize::from(u16::from_le_bytes([b[o], b[o + 1]]))
}
fn le32(b: &[u8], o: usize) -> usize {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]) as usize
}

fn geometry(img: &[u8]) -> Result<Geometry, BootError> {
    let bad = |why: &str| BootError::Fat(format!("repair pass: {why}"));
    if img.len() < 512 {
        return Err(bad("image shorter than a boot sector"));
    }
    let bps = le16(img, 11);
    let spc = usize::from(img[13]);
    let reserved = le16(img, 14);
    let fats = usize::from(img[16]);
    let root_entries = le16(img, 17);
    let spf = match le16(img, 22) {
        0 => le32(img, 36),
        n => n,
    };
    let sectors = match le16(img, 19) {
        0 => le32(img, 32),
        n => n,
    };
    if bps == 0 || spc == 0 {
        return Err(bad("boot sector has no geometry"));
    }
    let root_sectors = (root_entries * SLOT).div_ceil(bps);
    let first_data = reserved + fats * spf + root_sectors;
    let clusters = sectors.saturating_sub(first_data) / spc;
    if clusters < 4085 {
        return Err(bad("FAT12 volume (chvkit makes FAT16 or FAT32)"));
    }
    let fat32 = clusters >= 65525;
    Ok(Geometry {
        bps,
        cluster_bytes: bps * spc,
        fat_at: reserved * bps,
        root_at: (reserved + fats * spf) * bps,
        root_len: root_sectors * bps,
        data_at: first_data * bps,
        fat32,
        root_cluster: if fat32 { le32(img, 44) as u32 } else { 0 },
    })
}

impl Geometry {
    fn next(&self, img: &[u8], c: u32) -> Option<u32> {
        let v = if self.fat32 {
            (le32(img, self.fat_at + c as usize * 4) & 0x0fff_ffff) as u32
        } else {
            le16(img, self.fat_at + c as usize * 2) as u32
        };
        let end = if self.fat32 { 0x0fff_fff8 } else { 0xfff8 };
        (2..end).contains(&v).then_some(v)
    }

    fn cluster_range(&self, c: u32) -> std::ops::Range<usize> {
        let at = self.data_at + (c as usize - 2) * self.cluster_bytes;
        at..at + self.cluster_bytes
    }

    /// Byte ranges of a directory: the fixed root (cluster 0 on FAT16) or a cluster chain.
    fn dir_ranges(&self, img: &[u8], c: u32) -> Vec<std::ops::Range<usize>> {
        if c == 0 {
            let root = self.root_at..self.root_at + self.root_len;
            return vec![root];
        }
        let mut out = vec![];
        let mut cur = Some(c);
        while let Some(cl) = cur {
            out.push(self.cluster_range(cl));
            cur = self.next(img, cl);
            if out.len() > img.len() / self.bps.max(1) {
                break; // a loop in the chain; fsck will say so
            }
        }
        out
    }
}

fn first_cluster(e: &[u8]) -> u32 {
    ((le16(e, 20) << 16) | le16(e, 26)) as u32
}

fn set_cluster(e: &mut [u8], c: u32) {
    e[20..22].copy_from_slice(&((c >> 16) as u16).to_le_bytes());
    e[26..28].copy_from_slice(&(c as u16).to_le_bytes());
}

const DOT: &[u8; 11] = b".          ";
const DOTDOT: &[u8; 11] = b"..         ";

/// Put `.` and `..` of directory `c` (whose parent is `parent`, 0 for the root) in slots 0
/// and 1, where fatfs wrote `LFN "." LFN ".."` at the start of its first cluster; the slots the
/// long-name entries held become deleted entries, so every later entry stays where it was.
/// A directory laid out otherwise is left alone (fsck would then say why).
fn fix_dir(img: &mut [u8], g: &Geometry, c: u32, parent: u32) {
    let range = g.cluster_range(c);
    let n = range.len() / SLOT;
    let at = |i: usize| range.start + i * SLOT;
    let mut i = 0;
    let mut found = [0usize; 2];
    for (k, want) in [DOT, DOTDOT].into_iter().enumerate() {
        while i < n && img[at(i) + 11] == 0x0f && img[at(i)] != 0 && img[at(i)] != 0xe5 {
            i += 1;
        }
        if i >= n || &img[at(i)..at(i) + 11] != want {
            return;
        }
        found[k] = i;
        i += 1;
    }
    let mut dot = [0u8; SLOT];
    dot.copy_from_slice(&img[at(found[0])..at(found[0]) + SLOT]);
    let mut dotdot = [0u8; SLOT];
    dotdot.copy_from_slice(&img[at(found[1])..at(found[1]) + SLOT]);
    set_cluster(&mut dot, c);
    set_cluster(&mut dotdot, parent);
    img[at(0)..at(0) + SLOT].copy_from_slice(&dot);
    img[at(1)..at(1) + SLOT].copy_from_slice(&dotdot);
    for j in 2..i {
        let mut deleted = [0u8; SLOT];
        deleted[0] = 0xe5;
        img[at(j)..at(j) + SLOT].copy_from_slice(&deleted);
    }
}

/// Repair every directory of the FAT image `img` (see the module comment).
pub fn fix_dot_entries(img: &mut [u8]) -> Result<(), BootError> {
    let g = geometry(img)?;
    // (directory cluster, its cluster as a parent of its subdirectories: 0 for the root)
    let mut todo = vec![(g.root_cluster, 0u32, true)];
    let mut seen = 0;
    while let Some((dir, as_parent, is_root)) = todo.pop() {
        seen += 1;
        if seen > 4096 {
            break;
        }
        let start = if is_root && !g.fat32 { 0 } else { dir };
        let mut subdirs = vec![];
        for r in g.dir_ranges(img, start) {
            for e in img[r].chunks(SLOT) {
                if e[0] == 0 {
                    break;
                }
                if e[0] == 0xe5 || e[11] == 0x0f || e[11] & 0x10 == 0 {
                    continue;
                }
                if &e[..11] == DOT || &e[..11] == DOTDOT {
                    continue;
                }
                let c = first_cluster(e);
                if c >= 2 {
                    subdirs.push(c);
                }
            }
        }
        for c in subdirs {
            fix_dir(img, &g, c, as_parent);
            todo.push((c, c, false));
        }
    }
    Ok(())
}
