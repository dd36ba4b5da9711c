//! Just enough qcow2 for per-job disks: write an empty overlay on a backing file, convert a raw
//! image into a (sparse) qcow2 base once, and read images back (headers, guest bytes).
//!
//! Why write it ourselves rather than call `qemu-img`: the overlay is one small header and a few
//! zeroed tables (creating it is a handful of `pwrite`s, well under a millisecond), the format is
//! documented (QEMU's `docs/interop/qcow2.txt`), and Cloud Hypervisor v50's reader has its own
//! limits that we must meet anyway: version 2 or 3, 16-bit refcounts, no compression or
//! encryption, a refcount table no larger than twice what it computes, and a **qcow2** backing
//! file given by absolute path (a raw backing file arrives only in v51). Images written here are
//! also valid for QEMU (`qemu-img check` clean), which is how the guest-side tests boot them.
//!
//! Layout choices: cluster size 64 KiB (the common default; CHV's own), version 3, header length
//! 104, a "backing file format" header extension saying `qcow2` so QEMU never probes, and every
//! reference to a cluster with refcount 1 carries the COPIED flag.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

pub const MAGIC: [u8; 4] = [b'Q', b'F', b'I', 0xfb];
pub const CLUSTER_BITS: u32 = 16;
pub const CLUSTER: u64 = 1 << CLUSTER_BITS;
const HEADER_LEN: u32 = 104;
const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
/// Offsets per L2 table (one cluster of u64).
const L2_ENTRIES: u64 = CLUSTER / 8;
/// 16-bit refcounts per refcount block.
const REFCOUNT_ENTRIES: u64 = CLUSTER / 2;
const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// The qcow2 spec's limit on the backing file name.
const MAX_BACKING_NAME: usize = 1023;
/// Largest image we write (CHV's limit is 16 TiB).
const MAX_SIZE: u64 = 1 << 44;

#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: not a qcow2 image: {why}")]
    Invalid { path: PathBuf, why: String },
    #[error("backing file {0}: the path must be absolute and at most 1023 bytes")]
    BackingPath(PathBuf),
    #[error("{path}: {size} bytes is too large for a qcow2 image (limit {MAX_SIZE})")]
    TooLarge { path: PathBuf, size: u64 },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Qcow2Error + '_ {
    move |source| Qcow2Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn div_up(a: u64, b: u64) -> u64 {
    a.div_ceil(b)
}

/// Table sizes for an image of `size` guest bytes.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    size: u64,
    l1_entries: u64,
    l1_clusters: u64,
    /// Refcount table clusters: big enough for every refcount block CHV may want to read, and
    /// never more than twice what CHV computes (it rejects larger tables as suspicious).
    rt_clusters: u64,
}

impl Geometry {
    fn new(size: u64, refcount_blocks_needed: u64) -> Geometry {
        let guest_clusters = div_up(size, CLUSTER);
        let l1_entries = div_up(guest_clusters, L2_ENTRIES).max(1);
        let l1_clusters = div_up(l1_entries * 8, CLUSTER);
        // Cloud Hypervisor's `max_refcount_clusters` (block/src/qcow/mod.rs), which also sets
        // how many refcount-table entries it reads.
        let n = guest_clusters + l1_clusters + l1_entries + 1;
        let for_data = div_up(n * 2, CLUSTER);
        let chv_blocks = for_data + div_up(for_data * 2, CLUSTER);
        let rt_clusters = div_up(chv_blocks.max(refcount_blocks_needed) * 8, CLUSTER).max(1);
        Geometry {
            size,
            l1_entries,
            l1_clusters,
            rt_clusters,
        }
    }
}

fn be64(v: u64) -> [u8; 8] {
    v.to_be_bytes()
}

/// The first cluster: header, backing-format extension, end marker, backing file name.
fn header_bytes(g: &Geometry, l1_offset: u64, rt_offset: u64, backing: Option<&str>) -> Vec<u8> {
    let mut h = Vec::with_capacity(256);
    h.extend_from_slice(&MAGIC);
    h.extend_from_slice(&3u32.to_be_bytes());
    // Backing file offset/size are patched below once the extensions are placed.
    h.extend_from_slice(&be64(0));
    h.extend_from_slice(&0u32.to_be_bytes());
    h.extend_from_slice(&CLUSTER_BITS.to_be_bytes());
    h.extend_from_slice(&be64(g.size));
    h.extend_from_slice(&0u32.to_be_bytes()); // crypt_method
    h.extend_from_slice(&(g.l1_entries as u32).to_be_bytes());
    h.extend_from_slice(&be64(l1_offset));
    h.extend_from_slice(&be64(rt_offset));
    h.extend_from_slice(&(g.rt_clusters as u32).to_be_bytes());
    h.extend_from_slice(&0u32.to_be_bytes()); // nb_snapshots
    h.extend_from_slice(&be64(0)); // snapshots_offset
    h.extend_from_slice(&be64(0)); // incompatible features
    h.extend_from_slice(&be64(0)); // compatible features
    h.extend_from_slice(&be64(0)); // autoclear features
    h.extend_from_slice(&4u32.to_be_bytes()); // refcount_order: 16-bit
    h.extend_from_slice(&HEADER_LEN.to_be_bytes());
    debug_assert_eq!(h.len(), HEADER_LEN as usize);
    if backing.is_some() {
        h.extend_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        h.extend_from_slice(&5u32.to_be_bytes());
        h.extend_from_slice(b"qcow2\0\0\0");
    }
    h.extend_from_slice(&[0u8; 8]); // end of header extensions
    if let Some(name) = backing {
        let off = h.len() as u64;
        h[8..16].copy_from_slice(&be64(off));
        h[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
        h.extend_from_slice(name.as_bytes());
    }
    h
}

fn refcount_block(clusters: impl Iterator<Item = u64>, first: u64) -> Vec<u8> {
    let mut b = vec![0u8; CLUSTER as usize];
    for c in clusters {
        let i = ((c - first) * 2) as usize;
        b[i..i + 2].copy_from_slice(&1u16.to_be_bytes());
    }
    b
}

/// Write `buf` at `off` without its trailing zeros: the file is sparse there already, and a
/// cluster-sized table that is mostly zeros would otherwise allocate the whole cluster.
fn write_trimmed(f: &File, buf: &[u8], off: u64) -> io::Result<()> {
    let end = buf.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
    if end == 0 {
        return Ok(());
    }
    f.write_all_at(&buf[..end], off)
}

/// Create `dest` (must not exist) as an empty qcow2 overlay of `backing` (a qcow2 image, by
/// absolute path) with the same virtual size. Costs a few small writes whatever the size: the
/// tables are sparse zeros and only the clusters the guest writes are ever allocated.
pub fn create_overlay(dest: &Path, backing: &Path, size: u64) -> Result<(), Qcow2Error> {
    create_overlay_with(dest, backing, size, &std::collections::BTreeMap::new())
}

/// [`create_overlay`], with `clusters` (guest cluster index → its full [`CLUSTER`] bytes)
/// already allocated in the overlay: how launch puts the job's environment into the per-job
/// disk before boot (see `crate::rootfs::envslot`). Each costs one L2 table per distinct L1
/// entry and one data cluster, so a patch of a few clusters stays a handful of writes.
pub fn create_overlay_with(
    dest: &Path,
    backing: &Path,
    size: u64,
    clusters: &std::collections::BTreeMap<u64, Vec<u8>>,
) -> Result<(), Qcow2Error> {
    let name = backing
        .to_str()
        .filter(|s| backing.is_absolute() && s.len() <= MAX_BACKING_NAME)
        .ok_or_else(|| Qcow2Error::BackingPath(backing.to_path_buf()))?;
    if size > MAX_SIZE {
        return Err(Qcow2Error::TooLarge {
            path: backing.to_path_buf(),
            size,
        });
    }
    let invalid = |why: String| Qcow2Error::Invalid {
        path: dest.to_path_buf(),
        why,
    };
    for (guest, bytes) in clusters {
        if bytes.len() as u64 != CLUSTER || guest * CLUSTER >= size {
            return Err(invalid(format!(
                "internal: data cluster {guest} ({} bytes) does not fit a {size}-byte image",
                bytes.len()
            )));
        }
    }
    let g = Geometry::new(size, 1);
    let l1_offset = CLUSTER;
    let rt_offset = l1_offset + g.l1_clusters * CLUSTER;
    let rb_offset = rt_offset + g.rt_clusters * CLUSTER;
    // Then one L2 table per L1 entry the data needs, then the data clusters.
    let l1_used: std::collections::BTreeSet<u64> =
        clusters.keys().map(|c| c / L2_ENTRIES).collect();
    let l2_offset = rb_offset + CLUSTER;
    let data_offset = l2_offset + l1_used.len() as u64 * CLUSTER;
    let total = data_offset / CLUSTER + clusters.len() as u64;
    if total > REFCOUNT_ENTRIES {
        return Err(invalid(format!(
            "internal: {total} clusters do not fit one refcount block"
        )));
    }
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dest)
        .map_err(io_err(dest))?;
    let write = |buf: &[u8], off: u64| f.write_all_at(buf, off).map_err(io_err(dest));
    let mut l1 = vec![0u64; g.l1_entries as usize];
    let mut l2: Vec<Vec<u64>> = vec![vec![0; L2_ENTRIES as usize]; l1_used.len()];
    for (i, (guest, bytes)) in clusters.iter().enumerate() {
        let host = data_offset + i as u64 * CLUSTER;
        let slot = l1_used.range(..guest / L2_ENTRIES).count();
        l2[slot][(guest % L2_ENTRIES) as usize] = host | COPIED;
        l1[(guest / L2_ENTRIES) as usize] = (l2_offset + slot as u64 * CLUSTER) | COPIED;
        write_trimmed(&f, bytes, host).map_err(io_err(dest))?;
    }
    for (slot, table) in l2.iter().enumerate() {
        let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        write_trimmed(&f, &bytes, l2_offset + slot as u64 * CLUSTER).map_err(io_err(dest))?;
    }
    let l1_bytes: Vec<u8> = l1.iter().flat_map(|e| e.to_be_bytes()).collect();
    write_trimmed(&f, &l1_bytes, l1_offset).map_err(io_err(dest))?;
    // Refcount block first among the metadata, header last: a crash mid-way leaves no
    // valid-looking image.
    write_trimmed(&f, &refcount_block(0..total, 0), rb_offset).map_err(io_err(dest))?;
    write(&be64(rb_offset), rt_offset)?;
    f.set_len(total * CLUSTER).map_err(io_err(dest))?;
    write(&header_bytes(&g, l1_offset, rt_offset, Some(name)), 0)?;
    Ok(())
}

/// Write a qcow2 image holding the bytes of the raw image `src` into `out` (an empty file).
/// Holes and all-zero clusters are not stored, so the result is as sparse as the data. Returns
/// the number of data clusters written.
pub fn convert_raw(src: &Path, out: &File, out_path: &Path) -> Result<u64, Qcow2Error> {
    let input = File::open(src).map_err(io_err(src))?;
    let size = input.metadata().map_err(io_err(src))?.len();
    if size > MAX_SIZE {
        return Err(Qcow2Error::TooLarge {
            path: src.to_path_buf(),
            size,
        });
    }
    let ranges = data_ranges(&input, size).map_err(io_err(src))?;
    // Which L2 tables can hold data, and at most how many data clusters there are, follow from
    // the hole map alone; metadata is laid out for that worst case and unused slots stay holes
    // (refcount 0), so one pass over the data suffices.
    // Cluster-index ranges, merged (two byte ranges can share a cluster).
    let mut cranges: Vec<(u64, u64)> = Vec::new();
    for &(start, end) in &ranges {
        let (c0, c1) = (start / CLUSTER, div_up(end, CLUSTER));
        match cranges.last_mut() {
            Some(last) if c0 <= last.1 => last.1 = last.1.max(c1),
            _ => cranges.push((c0, c1)),
        }
    }
    let mut l2_used = vec![false; div_up(div_up(size, CLUSTER), L2_ENTRIES).max(1) as usize];
    let mut max_data = 0u64;
    for &(c0, c1) in &cranges {
        max_data += c1 - c0;
        for l1 in (c0 / L2_ENTRIES)..=((c1 - 1) / L2_ENTRIES) {
            l2_used[l1 as usize] = true;
        }
    }
    let l2_count = l2_used.iter().filter(|u| **u).count() as u64;
    let mut rb_count = 1;
    let g = loop {
        let g = Geometry::new(size, rb_count);
        let total = 1 + g.l1_clusters + g.rt_clusters + rb_count + l2_count + max_data;
        let need = div_up(total, REFCOUNT_ENTRIES);
        if need <= rb_count {
            break g;
        }
        rb_count = need;
    };
    let l1_offset = CLUSTER;
    let rt_offset = l1_offset + g.l1_clusters * CLUSTER;
    let rb_offset = rt_offset + g.rt_clusters * CLUSTER;
    let l2_offset = rb_offset + rb_count * CLUSTER;
    let data_offset = l2_offset + l2_count * CLUSTER;

    // L2 slot for each L1 index that may hold data.
    let mut l2_slot = vec![None; l2_used.len()];
    let mut next = l2_offset;
    for (i, used) in l2_used.iter().enumerate() {
        if *used {
            l2_slot[i] = Some(next);
            next += CLUSTER;
        }
    }
    let mut l2_tables: Vec<Option<Vec<u64>>> = vec![None; l2_used.len()];
    let mut allocated: Vec<u64> = (0..(rb_offset / CLUSTER + rb_count)).collect();
    let mut data_next = data_offset;
    let mut buf = vec![0u8; (16 * CLUSTER) as usize];
    for &(c0, c1) in &cranges {
        let mut pos = c0 * CLUSTER;
        while pos < c1 * CLUSTER {
            let chunk = (buf.len() as u64).min(c1 * CLUSTER - pos);
            let want = chunk.min(size - pos) as usize;
            buf[..chunk as usize].fill(0);
            read_full_at(&input, &mut buf[..want], pos).map_err(io_err(src))?;
            for (k, cl) in buf[..chunk as usize].chunks(CLUSTER as usize).enumerate() {
                if cl.iter().all(|b| *b == 0) {
                    continue;
                }
                let guest = pos / CLUSTER + k as u64;
                let l1 = (guest / L2_ENTRIES) as usize;
                out.write_all_at(cl, data_next).map_err(io_err(out_path))?;
                let table = l2_tables[l1].get_or_insert_with(|| vec![0; L2_ENTRIES as usize]);
                table[(guest % L2_ENTRIES) as usize] = data_next | COPIED;
                allocated.push(data_next / CLUSTER);
                data_next += CLUSTER;
            }
            pos += chunk;
        }
    }
    let data_clusters = (data_next - data_offset) / CLUSTER;
    let mut l1 = vec![0u64; g.l1_entries as usize];
    for (i, t) in l2_tables.iter().enumerate() {
        if let (Some(t), Some(off)) = (t, l2_slot[i]) {
            let bytes: Vec<u8> = t.iter().flat_map(|e| e.to_be_bytes()).collect();
            write_trimmed(out, &bytes, off).map_err(io_err(out_path))?;
            l1[i] = off | COPIED;
            allocated.push(off / CLUSTER);
        }
    }
    let l1_bytes: Vec<u8> = l1.iter().flat_map(|e| e.to_be_bytes()).collect();
    out.write_all_at(&l1_bytes, l1_offset)
        .map_err(io_err(out_path))?;
    allocated.sort_unstable();
    let mut rt = Vec::with_capacity((rb_count * 8) as usize);
    for b in 0..rb_count {
        let first = b * REFCOUNT_ENTRIES;
        let in_block = allocated
            .iter()
            .copied()
            .filter(|c| *c >= first && *c < first + REFCOUNT_ENTRIES);
        let off = rb_offset + b * CLUSTER;
        write_trimmed(out, &refcount_block(in_block, first), off).map_err(io_err(out_path))?;
        rt.extend_from_slice(&be64(off));
    }
    out.write_all_at(&rt, rt_offset).map_err(io_err(out_path))?;
    let end = data_next.max(l2_offset + l2_count * CLUSTER);
    out.set_len(end).map_err(io_err(out_path))?;
    out.write_all_at(&header_bytes(&g, l1_offset, rt_offset, None), 0)
        .map_err(io_err(out_path))?;
    Ok(data_clusters)
}

fn read_full_at(f: &File, buf: &mut [u8], off: u64) -> io::Result<()> {
    f.read_exact_at(buf, off)
}

/// Byte ranges of `f` that may hold data (SEEK_DATA/SEEK_HOLE; the whole file where the
/// filesystem cannot tell).
fn data_ranges(f: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    use nix::unistd::{lseek, Whence};
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    let size_i = size as i64;
    while pos < size_i {
        let start = match lseek(f, pos, Whence::SeekData) {
            Ok(s) => s,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(nix::errno::Errno::EINVAL) if pos == 0 => return Ok(vec![(0, size)]),
            Err(e) => return Err(e.into()),
        };
        let end = lseek(f, start, Whence::SeekHole)?;
        out.push((start as u64, (end as u64).min(size)));
        pos = end;
    }
    Ok(out)
}

/// The parts of a header chvkit cares about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub size: u64,
    pub cluster_bits: u32,
    pub backing_file: Option<String>,
    l1_offset: u64,
    l1_entries: u64,
}

/// Does `path` start with the qcow2 magic?
pub fn is_qcow2(path: &Path) -> io::Result<bool> {
    let f = File::open(path)?;
    let mut m = [0u8; 4];
    match f.read_exact_at(&mut m, 0) {
        Ok(()) => Ok(m == MAGIC),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

pub fn read_header(path: &Path) -> Result<Header, Qcow2Error> {
    let f = File::open(path).map_err(io_err(path))?;
    read_header_from(&f, path)
}

fn read_header_from(f: &File, path: &Path) -> Result<Header, Qcow2Error> {
    let invalid = |why: &str| Qcow2Error::Invalid {
        path: path.to_path_buf(),
        why: why.to_string(),
    };
    let mut h = [0u8; 104];
    f.read_exact_at(&mut h[..72], 0)
        .map_err(|_| invalid("shorter than a qcow2 header"))?;
    if h[..4] != MAGIC {
        return Err(invalid("bad magic"));
    }
    let u32_at = |o: usize| u32::from_be_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
    let u64_at = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&h[o..o + 8]);
        u64::from_be_bytes(b)
    };
    let version = u32_at(4);
    if version != 2 && version != 3 {
        return Err(invalid(&format!("version {version}")));
    }
    let cluster_bits = u32_at(20);
    if !(9..=21).contains(&cluster_bits) {
        return Err(invalid(&format!("cluster_bits {cluster_bits}")));
    }
    if u32_at(32) != 0 {
        return Err(invalid("encrypted images are not supported"));
    }
    let (bf_off, bf_len) = (u64_at(8), u32_at(16) as usize);
    let backing_file = if bf_off != 0 && bf_len > 0 {
        if bf_len > MAX_BACKING_NAME {
            return Err(invalid("backing file name too long"));
        }
        let mut name = vec![0u8; bf_len];
        f.read_exact_at(&mut name, bf_off)
            .map_err(|_| invalid("backing file name past end of file"))?;
        Some(String::from_utf8(name).map_err(|_| invalid("backing file name is not UTF-8"))?)
    } else {
        None
    };
    Ok(Header {
        version,
        size: u64_at(24),
        cluster_bits,
        backing_file,
        l1_offset: u64_at(40),
        l1_entries: u64::from(u32_at(36)),
    })
}

/// Read-only access to a qcow2 image's guest bytes, following its backing chain (raw or qcow2
/// backing files). Used to check what an image holds (GPT on a qcow2 rootfs; tests).
pub struct Reader {
    file: File,
    path: PathBuf,
    header: Header,
    l1: Vec<u64>,
    backing: Option<Box<Backing>>,
}

enum Backing {
    Qcow2(Reader),
    Raw(File),
}

impl Reader {
    pub fn open(path: &Path) -> Result<Reader, Qcow2Error> {
        Self::open_depth(path, 8)
    }

    fn open_depth(path: &Path, depth: u32) -> Result<Reader, Qcow2Error> {
        let file = File::open(path).map_err(io_err(path))?;
        let header = read_header_from(&file, path)?;
        let mut raw = vec![0u8; (header.l1_entries * 8) as usize];
        file.read_exact_at(&mut raw, header.l1_offset)
            .map_err(io_err(path))?;
        let l1 = raw
            .chunks(8)
            .map(|c| {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                u64::from_be_bytes(b) & OFFSET_MASK
            })
            .collect();
        let backing = match &header.backing_file {
            None => None,
            Some(_) if depth == 0 => {
                return Err(Qcow2Error::Invalid {
                    path: path.to_path_buf(),
                    why: "backing chain too deep".into(),
                })
            }
            Some(b) => {
                let bp = Path::new(b);
                Some(Box::new(if is_qcow2(bp).map_err(io_err(bp))? {
                    Backing::Qcow2(Reader::open_depth(bp, depth - 1)?)
                } else {
                    Backing::Raw(File::open(bp).map_err(io_err(bp))?)
                }))
            }
        };
        Ok(Reader {
            file,
            path: path.to_path_buf(),
            header,
            l1,
            backing,
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Fill `buf` from guest offset `off` (zeros past the end and in unallocated clusters
    /// without a backing file).
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> Result<(), Qcow2Error> {
        let cs = 1u64 << self.header.cluster_bits;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let in_cluster = (pos % cs) as usize;
            let n = (buf.len() - done).min(cs as usize - in_cluster);
            let dst = &mut buf[done..done + n];
            if pos >= self.header.size {
                dst.fill(0);
            } else {
                match self.lookup(pos / cs)? {
                    Mapping::Host(host) => self
                        .file
                        .read_exact_at(dst, host + in_cluster as u64)
                        .map_err(io_err(&self.path))?,
                    Mapping::Zero => dst.fill(0),
                    Mapping::Unallocated => match self.backing.as_deref() {
                        Some(Backing::Qcow2(r)) => r.read_at(dst, pos)?,
                        Some(Backing::Raw(f)) => {
                            dst.fill(0);
                            let _ = f.read_at(dst, pos).map_err(io_err(&self.path))?;
                        }
                        None => dst.fill(0),
                    },
                }
            }
            done += n;
        }
        Ok(())
    }

    fn lookup(&self, guest_cluster: u64) -> Result<Mapping, Qcow2Error> {
        let entries = (1u64 << self.header.cluster_bits) / 8;
        let l2 = match self.l1.get((guest_cluster / entries) as usize) {
            Some(0) | None => return Ok(Mapping::Unallocated),
            Some(a) => *a,
        };
        let mut e = [0u8; 8];
        self.file
            .read_exact_at(&mut e, l2 + (guest_cluster % entries) * 8)
            .map_err(io_err(&self.path))?;
        let e = u64::from_be_bytes(e);
        if e & COMPRESSED != 0 {
            return Err(Qcow2Error::Invalid {
                path: self.path.clone(),
                why: "compressed clusters are not supported".into(),
            });
        }
        // Bit 0 is the "reads as zero" flag of version 3.
        if e & 1 != 0 {
            return Ok(Mapping::Zero);
        }
        Ok(match e & OFFSET_MASK {
            0 => Mapping::Unallocated,
            host => Mapping::Host(host),
        })
    }
}

enum Mapping {
    Unallocated,
    Zero,
    Host(u64),
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn raw_with_data(dir: &Path, size: u64, writes: &[(u64, &[u8])]) -> PathBuf {
        let p = dir.join("raw.img");
        let f = File::create(&p).unwrap();
        f.set_len(size).unwrap();
        for (off, data) in writes {
            f.write_all_at(data, *off).unwrap();
        }
        p
    }

    fn read_raw(p: &Path, off: u64, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        File::open(p).unwrap().read_exact_at(&mut b, off).unwrap();
        b
    }

    #[test]
    fn convert_then_overlay_reads_back_the_raw_bytes() {
        let d = tempfile::tempdir().unwrap();
        let size = 300 * CLUSTER + 4096; // not a whole number of clusters
        let big = vec![0xabu8; (CLUSTER + 100) as usize];
        let raw = raw_with_data(
            d.path(),
            size,
            &[
                (0, b"superblock"),
                (1024, b"ext4"),
                (5 * CLUSTER - 3, b"straddles"),
                (200 * CLUSTER, &big),
                (size - 10, b"tail-bytes"),
            ],
        );
        let base = d.path().join("base.qcow2");
        let out = File::create(&base).unwrap();
        let n = convert_raw(&raw, &out, &base).unwrap();
        assert_eq!(n, 1 + 2 + 2 + 1, "only non-zero clusters are stored");
        let hdr = read_header(&base).unwrap();
        assert_eq!(
            (hdr.version, hdr.size, hdr.backing_file.clone()),
            (3, size, None)
        );

        let ov = d.path().join("job.qcow2");
        create_overlay(&ov, &base, size).unwrap();
        assert_eq!(
            read_header(&ov).unwrap().backing_file.as_deref(),
            base.to_str()
        );
        // Tiny on disk whatever the virtual size.
        let blocks = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&ov).unwrap());
        assert!(blocks * 512 <= 64 * 1024, "{blocks} blocks");

        let r = Reader::open(&ov).unwrap();
        for (off, n) in [
            (0u64, 4096usize),
            (5 * CLUSTER - 8, 32),
            (200 * CLUSTER, 70000),
        ] {
            let mut got = vec![0u8; n];
            r.read_at(&mut got, off).unwrap();
            assert_eq!(got, read_raw(&raw, off, n), "at {off}");
        }
        let mut tail = vec![0u8; 10];
        r.read_at(&mut tail, size - 10).unwrap();
        assert_eq!(&tail, b"tail-bytes");
    }

    #[test]
    fn overlay_refuses_relative_backing_and_existing_dest() {
        let d = tempfile::tempdir().unwrap();
        assert!(matches!(
            create_overlay(&d.path().join("x"), Path::new("rel.qcow2"), 1 << 20),
            Err(Qcow2Error::BackingPath(_))
        ));
        let dest = d.path().join("exists");
        File::create(&dest).unwrap().write_all(b"keep").unwrap();
        assert!(create_overlay(&dest, &d.path().join("b"), 1 << 20).is_err());
        assert_eq!(std::fs::read(&dest).unwrap(), b"keep");
    }

    #[test]
    fn headers_are_checked() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("raw");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        assert!(!is_qcow2(&p).unwrap());
        assert!(matches!(read_header(&p), Err(Qcow2Error::Invalid { .. })));
    }

    /// Cross-check with QEMU's own checker when it is installed (qemu-utils).
    #[test]
    fn qemu_img_check_is_clean() {
        let Some(qemu_img) = which("qemu-img") else {
            crate::testutil::skip(
                "qcow2::qemu_img_check_is_clean",
                "`qemu-img` is not installed (qemu-utils)",
            );
            return;
        };
        let d = tempfile::tempdir().unwrap();
        let size = 3 * (1 << 30) + 12345 * 512; // spans several L2 tables and two refcount blocks' worth of guest space
        let raw = raw_with_data(
            d.path(),
            size,
            &[(0, b"a"), (2 << 30, b"b"), (size - 1, b"c")],
        );
        let base = d.path().join("base.qcow2");
        convert_raw(&raw, &File::create(&base).unwrap(), &base).unwrap();
        let ov = d.path().join("ov.qcow2");
        create_overlay(&ov, &base, size).unwrap();
        for img in [&base, &ov] {
            let o = std::process::Command::new(&qemu_img)
                .args(["check", "-f", "qcow2"])
                .arg(img)
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        // QEMU sees the raw bytes through the overlay.
        let cmp = std::process::Command::new(&qemu_img)
            .args(["compare", "-f", "qcow2", "-F", "raw"])
            .arg(&ov)
            .arg(&raw)
            .output()
            .unwrap();
        assert!(
            cmp.status.success(),
            "{}",
            String::from_utf8_lossy(&cmp.stdout)
        );
    }

    /// Data clusters in a new overlay: read back through it (ours and QEMU's reader), the rest
    /// still the base's, `qemu-img check` clean, and bad input refused.
    #[test]
    fn overlay_with_data_clusters() {
        let d = tempfile::tempdir().unwrap();
        let size = (512u64 << 20) + 7 * CLUSTER; // two L1 entries (512 MiB each)
        let raw = raw_with_data(d.path(), size, &[(0, b"base0"), (size - 4, b"end!")]);
        let base = d.path().join("base.qcow2");
        convert_raw(&raw, &File::create(&base).unwrap(), &base).unwrap();
        let mut data = std::collections::BTreeMap::new();
        let far = size / CLUSTER - 1; // in the second L2 table, also holding base bytes
        for c in [0u64, 3, far] {
            let mut b = vec![0u8; CLUSTER as usize];
            let r = Reader::open(&base).unwrap();
            r.read_at(&mut b, c * CLUSTER).unwrap();
            b[100..110].copy_from_slice(format!("cluster{c:03}").as_bytes()[..10].as_ref());
            data.insert(c, b);
        }
        let ov = d.path().join("ov.qcow2");
        create_overlay_with(&ov, &base, size, &data).unwrap();
        // What the guest must see at `off`: the patched cluster, else the raw bytes.
        let expect = |off: u64, n: usize| -> Vec<u8> {
            match data.get(&(off / CLUSTER)) {
                Some(b) => b[(off % CLUSTER) as usize..][..n].to_vec(),
                None => read_raw(&raw, off, n),
            }
        };
        let probes = [
            0u64,
            100,
            3 * CLUSTER + 90,
            4 * CLUSTER,
            far * CLUSTER + 96,
            size - 4,
        ];
        let r = Reader::open(&ov).unwrap();
        for off in probes {
            let mut got = vec![0u8; 4];
            r.read_at(&mut got, off).unwrap();
            assert_eq!(got, expect(off, 4), "at {off}");
        }
        if let Some(qemu_img) = which("qemu-img") {
            let o = std::process::Command::new(&qemu_img)
                .args(["check", "-f", "qcow2"])
                .arg(&ov)
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
            let out = d.path().join("flat.raw");
            let o = std::process::Command::new(&qemu_img)
                .args(["convert", "-f", "qcow2", "-O", "raw"])
                .arg(&ov)
                .arg(&out)
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            for off in probes {
                assert_eq!(read_raw(&out, off, 4), expect(off, 4), "QEMU at {off}");
            }
        } else {
            crate::testutil::skip(
                "qcow2::overlay_with_data_clusters (QEMU cross-check)",
                "`qemu-img` is not installed (qemu-utils)",
            );
        }
        // A cluster of the wrong size or past the end is refused, and nothing is created.
        for (c, len) in [(0u64, 10usize), (size / CLUSTER + 1, CLUSTER as usize)] {
            let bad = std::collections::BTreeMap::from([(c, vec![1u8; len])]);
            let p = d.path().join(format!("bad{c}"));
            assert!(create_overlay_with(&p, &base, size, &bad).is_err());
            assert!(!p.exists());
        }
    }

    fn which(name: &str) -> Option<PathBuf> {
        std::env::var_os("PATH").and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        })
    }
}
