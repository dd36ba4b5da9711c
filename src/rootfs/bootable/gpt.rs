//! The GPT: written with the `gpt` crate onto a small in-memory view of the disk (its first
//! and last sectors, where the tables live), and read back by a plain parser that follows
//! what rust-hypervisor-firmware's `part.rs` does.

use std::collections::BTreeMap;
use std::io::{self, Read, Seek, SeekFrom, Write};

use super::ids::{Guid, Ids};
use super::{BootError, Layout, SECTOR};

/// Sectors at the start the tables use: protective MBR, header, 32 sectors of entries.
const HEAD_SECTORS: u64 = 34;
/// At the end: 32 sectors of entries and the backup header.
const TAIL_SECTORS: u64 = 33;

/// EFI System Partition type, C12A7328-F81F-11D2-BA4B-00A0C93EC93B, as stored on disk.
pub const ESP_TYPE: [u8; 16] = [
    0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e, 0xc9, 0x3b,
];
/// "Linux root (x86-64)", 4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709 (Discoverable Partitions).
pub const ROOT_X64_TYPE: [u8; 16] = [
    0xe3, 0xbc, 0x68, 0x4f, 0xcd, 0xe8, 0xb1, 0x4d, 0x96, 0xe7, 0xfb, 0xca, 0xf9, 0x84, 0xb7, 0x09,
];
/// "Linux filesystem data", 0FC63DAF-8483-4772-8E79-3D69D8477DE4.
pub const LINUX_FS_TYPE: [u8; 16] = [
    0xaf, 0x3d, 0xc6, 0x0f, 0x83, 0x84, 0x72, 0x47, 0x8e, 0x79, 0x3d, 0x69, 0xd8, 0x47, 0x7d, 0xe4,
];

/// The disk as the `gpt` crate sees it: only the head and tail exist; anything else it tried
/// to touch would be a bug, so it is an error rather than silently ignored.
#[derive(Debug)]
struct Tables {
    len: u64,
    pos: u64,
    head: Vec<u8>,
    tail: Vec<u8>,
}

impl Tables {
    fn region(&mut self, n: usize) -> io::Result<&mut [u8]> {
        let (pos, end) = (self.pos, self.pos + n as u64);
        let tail_start = self.len - self.tail.len() as u64;
        if end <= self.head.len() as u64 {
            Ok(&mut self.head[pos as usize..end as usize])
        } else if pos >= tail_start && end <= self.len {
            Ok(&mut self.tail[(pos - tail_start) as usize..(end - tail_start) as usize])
        } else {
            Err(io::Error::other(format!(
                "GPT writer touched bytes {pos}..{end}, outside the table areas"
            )))
        }
    }
}

impl Read for Tables {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len();
        buf.copy_from_slice(self.region(n)?);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Write for Tables {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.region(buf.len())?.copy_from_slice(buf);
        self.pos += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Seek for Tables {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.pos = super::seek_to(self.pos, self.len, to);
        Ok(self.pos)
    }
}

/// The `gpt` crate's GUID type (the `uuid` crate's, which chvkit does not name) from ours, by
/// its text form.
fn uuid<U: std::str::FromStr>(g: &Guid) -> Result<U, BootError> {
    g.to_string()
        .parse()
        .map_err(|_| BootError::Gpt(format!("GUID {g} does not parse")))
}

/// The protective MBR and both GPTs for `layout`: (byte offset, bytes) to write.
pub fn build(layout: &Layout, ids: &Ids) -> Result<Vec<(u64, Vec<u8>)>, BootError> {
    let g = |e: &dyn std::fmt::Display| BootError::Gpt(e.to_string());
    let mut dev = Tables {
        len: layout.total,
        pos: 0,
        head: vec![0; (HEAD_SECTORS * SECTOR) as usize],
        tail: vec![0; (TAIL_SECTORS * SECTOR) as usize],
    };
    let total_lba = layout.total / SECTOR;
    let mbr =
        ::gpt::mbr::ProtectiveMBR::with_lb_size(u32::try_from(total_lba - 1).unwrap_or(u32::MAX));
    mbr.overwrite_lba0(&mut dev).map_err(|e| g(&e))?;
    let mut disk = ::gpt::GptConfig::new()
        .writable(true)
        .logical_block_size(::gpt::disk::LogicalBlockSize::Lb512)
        .create_from_device(&mut dev, Some(uuid(&ids.disk)?))
        .map_err(|e| g(&e))?;
    let part = |name: &str,
                ty: ::gpt::partition_types::Type,
                guid: &Guid,
                off: u64,
                len: u64|
     -> Result<::gpt::partition::Partition, BootError> {
        Ok(::gpt::partition::Partition {
            part_type_guid: ty,
            part_guid: uuid(guid)?,
            first_lba: off / SECTOR,
            last_lba: (off + len).div_ceil(SECTOR) - 1,
            flags: 0,
            name: name.to_string(),
        })
    };
    let mut parts = BTreeMap::new();
    parts.insert(
        1,
        part(
            "EFI System Partition",
            ::gpt::partition_types::EFI,
            &ids.esp,
            layout.esp_offset,
            layout.esp_bytes,
        )?,
    );
    parts.insert(
        2,
        part(
            "chvkit root",
            ::gpt::partition_types::LINUX_ROOT_X64,
            &ids.root,
            layout.root_offset,
            layout.root_bytes,
        )?,
    );
    disk.update_partitions(parts).map_err(|e| g(&e))?;
    disk.write().map_err(|e| g(&e))?;
    let tail_at = layout.total - TAIL_SECTORS * SECTOR;
    Ok(vec![(0, dev.head), (tail_at, dev.tail)])
}

/// One used entry of a GPT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GptPartition {
    /// 1-based, as Linux numbers it (the entry's index + 1).
    pub number: u32,
    /// On-disk (mixed-endian) type GUID.
    pub type_guid: [u8; 16],
    pub guid: Guid,
    pub first_lba: u64,
    pub last_lba: u64,
}

impl GptPartition {
    pub fn is_esp(&self) -> bool {
        self.type_guid == ESP_TYPE
    }
    pub fn offset(&self) -> u64 {
        self.first_lba * SECTOR
    }
    pub fn len(&self) -> u64 {
        (self.last_lba + 1).saturating_sub(self.first_lba) * SECTOR
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The used partitions of a GPT disk with 512-byte sectors, read through `read_at` (fill the
/// buffer from that byte offset). `Ok(None)`: no GPT header at LBA 1. Like the firmware, an
/// entry counts when its unique GUID is not zero, and the header must put the first usable LBA
/// at 34 or later.
pub fn read_partitions(
    read_at: &mut dyn FnMut(&mut [u8], u64) -> io::Result<()>,
) -> io::Result<Option<Vec<GptPartition>>> {
    let mut h = [0u8; 512];
    read_at(&mut h, SECTOR)?;
    if &h[..8] != b"EFI PART" {
        return Ok(None);
    }
    let u64_at = |o: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&h[o..o + 8]);
        u64::from_le_bytes(a)
    };
    let u32_at = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
    let first_usable = u64_at(40);
    let entries_lba = u64_at(72);
    let count = u32_at(80).min(1024) as usize;
    let size = u32_at(84) as usize;
    if first_usable < 34 || !(128..=4096).contains(&size) {
        // What rust-hypervisor-firmware calls ViolatesSpecification.
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "its GPT header is malformed (first usable LBA {first_usable}, entries of \
                 {size} bytes; the firmware needs LBA 34 or later and 128-byte entries)"
            ),
        ));
    }
    let mut table = vec![0u8; count * size];
    read_at(&mut table, entries_lba * SECTOR)?;
    let mut out = Vec::new();
    for (i, e) in table.chunks(size).enumerate() {
        let mut guid = [0u8; 16];
        guid.copy_from_slice(&e[16..32]);
        if guid == [0; 16] {
            continue;
        }
        let mut ty = [0u8; 16];
        ty.copy_from_slice(&e[..16]);
        let mut a = [0u8; 8];
        a.copy_from_slice(&e[32..40]);
        let first_lba = u64::from_le_bytes(a);
        a.copy_from_slice(&e[40..48]);
        let last_lba = u64::from_le_bytes(a);
        out.push(GptPartition {
            number: i as u32 + 1,
            type_guid: ty,
            guid: Guid::from_gpt(&guid),
            first_lba,
            last_lba,
        });
    }
    Ok(Some(out))
}

/// Byte offset of the root partition of a GPT disk with 512-byte sectors (what `rootfs
/// --bootable` writes): the first partition of type "Linux root (x86-64)", else the first of
/// type "Linux filesystem data". `None` for anything else (a bare ext4 image, no such
/// partition, a read error). Launch reads the env slot from there.
pub fn root_partition_offset(
    read_at: &mut dyn FnMut(&mut [u8], u64) -> io::Result<()>,
) -> Option<u64> {
    let parts = read_partitions(read_at).ok()??;
    parts
        .iter()
        .find(|p| p.type_guid == ROOT_X64_TYPE)
        .or_else(|| parts.iter().find(|p| p.type_guid == LINUX_FS_TYPE))
        .map(GptPartition::offset)
}
