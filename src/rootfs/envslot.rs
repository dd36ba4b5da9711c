//! The env slot: how `launch` hands `/etc/checker.env` to a guest without a second disk.
//!
//! `chvkit rootfs` puts a placeholder at [`GUEST_PATH`]: [`SLOT_LEN`] bytes ([`placeholder`]),
//! mode 0600, in at most 3 extents (one, normally). At launch, [`locate`] finds that file's data
//! and inode in the image (read-only, through a callback, so a qcow2 reader works too), and
//! [`Slot::fill`] computes byte patches that `launch` writes into the per-job copy-on-write
//! disk only — never the image. The guest then sees a file holding exactly the job's
//! environment, with the right size, on a filesystem `e2fsck -fn` still calls clean: the
//! blocks past the end stay allocated but become an unwritten extent, which reads as zeros.
//! `launch` adds [`CMDLINE_ARG`] to the kernel command line so /init knows chvkit wrote the
//! file. An environment longer than [`SLOT_LEN`], or an image without a usable slot
//! (`locate` → `Ok(None)`), falls back to the env disk (`super::envdisk`), which costs the
//! guest about a second of boot.

use std::io;

use super::ext4::{le16, le32, put16, put32};
use super::ext4read::{self as rd, Fs};

/// The file inside the guest that holds the job's environment.
pub const GUEST_PATH: &str = "/etc/checker.env";
/// Size of the placeholder `chvkit rootfs` writes at [`GUEST_PATH`]: the largest environment
/// the slot carries (larger ones go on the env disk, `super::envdisk`).
pub const SLOT_LEN: usize = 16384;
/// First bytes of the placeholder: what marks a file as a slot chvkit may fill.
pub const MAGIC: &[u8] = b"# chvkit env slot v1";
/// Kernel command line word telling /init that chvkit wrote [`GUEST_PATH`] (so /init sources
/// it without a syntax check of its own).
pub const CMDLINE_ARG: &str = "chvkit.env=/etc/checker.env";

/// Bytes to write at `offset` of a copy of the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Patch {
    pub offset: u64,
    pub bytes: Vec<u8>,
}

/// Where the slot lives in one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    block_size: u64,
    /// The file's data, in logical order: initialized extents covering blocks [0, n).
    extents: Vec<rd::Extent>,
    /// Byte offset of the inode, and its bytes as found (`s_inode_size` long).
    inode_offset: u64,
    inode: Vec<u8>,
    number: u32,
    /// Inode checksums are needed (`metadata_csum`), from this filesystem-wide seed.
    csum_seed: Option<u32>,
}

/// The placeholder's bytes ([`SLOT_LEN`] long: [`MAGIC`], the rest of that comment line, then
/// newlines — a valid, empty environment file).
pub fn placeholder() -> Vec<u8> {
    let mut p = MAGIC.to_vec();
    p.extend_from_slice(b": chvkit launch writes the job's environment here\n");
    // Newlines, not zeros: mkfs and copy tools turn zero blocks into holes, and a slot needs
    // every block allocated.
    p.resize(SLOT_LEN, b'\n');
    p
}

/// Find the slot in an ext4 image read through `read_at` (fill the buffer from that byte
/// offset of the image). `Ok(None)`: no slot (not ext4, no such file, not the placeholder's
/// shape); the caller then uses the env disk.
pub fn locate(
    read_at: &mut dyn FnMut(&mut [u8], u64) -> io::Result<()>,
) -> io::Result<Option<Slot>> {
    let Some(mut fs) = Fs::open(read_at)? else {
        return Ok(None);
    };
    let bs = fs.block_size;
    // Blocks larger than the slot cannot hold it as whole blocks.
    if bs > SLOT_LEN as u64 {
        return Ok(None);
    }
    let Some(ino) = fs.lookup(GUEST_PATH)? else {
        return Ok(None);
    };
    let flags = ino.flags();
    // Verity (0x100000) would reject changed contents; a second link would show the env
    // under another name too.
    if ino.mode() & rd::S_IFMT != rd::S_IFREG
        || flags & rd::EXTENTS_FL == 0
        || flags & (rd::INLINE_DATA_FL | 0x10_0000) != 0
        || ino.size() != SLOT_LEN as u64
        || ino.links() != 1
    {
        return Ok(None);
    }
    // Depth 0: the whole tree is in the inode, and `fill` may rewrite it there. At most 3
    // extents, so splitting one at the end of the environment still fits the inode's 4.
    // (One is the norm; chvkit's own writer may put the first block in an earlier gap.)
    let Some((0, entries)) = rd::node(ino.i_block()) else {
        return Ok(None);
    };
    if le16(ino.i_block(), 4) != 4 || !(12..=36).contains(&entries.len()) {
        return Ok(None);
    }
    let extents: Vec<rd::Extent> = entries.chunks_exact(12).map(rd::leaf).collect();
    let mut next = 0u64;
    for e in &extents {
        let len = u64::from(e.len);
        if e.unwritten || u64::from(e.logical) != next || fs.span(e.start, 0, len * bs).is_none() {
            return Ok(None);
        }
        next += len;
    }
    if next != SLOT_LEN as u64 / bs {
        return Ok(None);
    }
    let mut head = [0u8; MAGIC.len()];
    fs.read(&mut head, extents[0].start * bs)?;
    if head != MAGIC {
        return Ok(None);
    }
    // A checksum that does not verify means this code computes it differently from the
    // filesystem (an unknown seed, say): a patched inode would then fail in the guest.
    let csum_ok = |seed| rd::csum_ok(seed, ino.number, &ino.raw);
    if !fs.csum_seed.is_none_or(csum_ok) {
        return Ok(None);
    }
    Ok(Some(Slot {
        block_size: bs,
        extents,
        inode_offset: ino.offset,
        number: ino.number,
        csum_seed: fs.csum_seed,
        inode: ino.raw,
    }))
}

impl Slot {
    /// The patches that make [`GUEST_PATH`] hold exactly `env` in a copy of the image (one per
    /// data extent, then the inode); `None` when `env` is longer than [`SLOT_LEN`].
    pub fn fill(&self, env: &[u8]) -> Option<Vec<Patch>> {
        if env.len() > SLOT_LEN {
            return None;
        }
        let bs = self.block_size as usize;
        let k = env.len().div_ceil(bs) as u32;
        // Zeros after `env` so no placeholder byte survives, even to a raw read of the disk.
        let mut data = env.to_vec();
        data.resize(SLOT_LEN, 0);
        let mut patches: Vec<Patch> = self
            .extents
            .iter()
            .map(|e| {
                let from = e.logical as usize * bs;
                Patch {
                    offset: e.start * self.block_size,
                    bytes: data[from..from + e.len as usize * bs].to_vec(),
                }
            })
            .collect();

        let mut raw = self.inode.clone();
        put32(&mut raw, 0x4, env.len() as u32);
        put32(&mut raw, 0x6C, 0);
        // Blocks [0, k) hold `env`; [k, n) stay allocated (i_blocks unchanged) but unwritten,
        // so e2fsck accepts them past EOF and the guest reads zeros there.
        let ib = &mut raw[rd::I_BLOCK..rd::I_BLOCK + rd::I_BLOCK_LEN];
        let generation = le32(ib, 8);
        ib.fill(0);
        put16(ib, 0, rd::EXT_MAGIC);
        put16(ib, 4, 4);
        put32(ib, 8, generation);
        let mut entries = 0;
        for e in &self.extents {
            // The extent's part before k, then its part from k on; either may be empty.
            let init = k.clamp(e.logical, e.logical + e.len) - e.logical;
            for (skip, len, unwritten) in [(0, init, false), (init, e.len - init, true)] {
                let (logical, start) = (e.logical + skip, e.start + u64::from(skip));
                if len > 0 {
                    let part = rd::Extent {
                        logical,
                        len,
                        start,
                        unwritten,
                    };
                    rd::put_leaf(ib, entries, &part);
                    entries += 1;
                }
            }
        }
        put16(ib, 2, entries as u16);
        if let Some(seed) = self.csum_seed {
            rd::set_csum(seed, self.number, &mut raw);
        }
        patches.push(Patch {
            offset: self.inode_offset,
            bytes: raw,
        });
        Some(patches)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::{self, File};
    use std::os::unix::fs::{FileExt, PermissionsExt};
    use std::path::Path;
    use std::process::Command;

    /// Tests that need e2fsprogs skip (and say so) without them.
    fn skip(tools: &[&str]) -> bool {
        let missing = (["mkfs.ext4", "debugfs", "e2fsck"].iter().chain(tools))
            .find(|t| Command::new(t).arg("-V").output().is_err());
        missing
            .inspect(|t| println!("skipped: {t} is not installed"))
            .is_some()
    }

    fn run(cmd: &str, args: &[&str], img: &Path) -> std::process::Output {
        let o = Command::new(cmd).args(args).arg(img).output().unwrap();
        let (err, ok) = (String::from_utf8_lossy(&o.stderr), o.status.code());
        // e2fsck exits 1 when it fixed something (as -fyD does).
        assert!(ok.is_some_and(|c| c <= 1), "{cmd} {args:?}: {err}");
        o
    }

    fn mkfs(tree: &Path, img: &Path, args: &[&str], size: u64) {
        File::create(img).unwrap().set_len(size << 20).unwrap();
        let tree = tree.to_str().unwrap();
        let args = [&["-q", "-F", "-d", tree], args].concat();
        run("mkfs.ext4", &args, img);
    }

    /// A tree whose /etc is a multi-block directory; `slot` then adds /etc/checker.env.
    fn tree(root: &Path, slot: impl FnOnce(&Path)) {
        let etc = root.join("etc");
        fs::create_dir_all(&etc).unwrap();
        for i in 0..300 {
            let name = format!("file-{i:04}-with-a-longer-name.conf");
            fs::write(etc.join(name), "x=1\n").unwrap();
        }
        slot(&etc);
    }

    fn real_slot(etc: &Path) {
        let p = etc.join("checker.env");
        fs::write(&p, placeholder()).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
    }

    fn locate_file(img: &Path) -> io::Result<Option<Slot>> {
        let f = File::open(img)?;
        locate(&mut |b, o| f.read_exact_at(b, o))
    }

    fn locate_mem(img: &[u8], reads: &mut usize) -> io::Result<Option<Slot>> {
        locate(&mut |b, o| {
            *reads += 1;
            let s = usize::try_from(o).ok().filter(|s| s + b.len() <= img.len());
            let s = s.ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
            b.copy_from_slice(&img[s..s + b.len()]);
            Ok(())
        })
    }

    fn env_text(len: usize) -> Vec<u8> {
        let lines = (0..).flat_map(|i| format!("export VAR_{i}='value {i}'\n").into_bytes());
        lines.take(len).collect()
    }

    /// Build an image with `build(tree, image)`, fill the slot with several environments in
    /// copies, check each copy. Returns the image (in its temp dir); `None`: skipped.
    fn roundtrip(
        build: impl FnOnce(&Path, &Path),
    ) -> Option<(tempfile::TempDir, std::path::PathBuf)> {
        if skip(&[]) {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("tree");
        tree(&root, real_slot);
        let img = dir.path().join("img");
        build(&root, &img);
        let pristine = fs::read(&img).unwrap();
        let slot = locate_file(&img).unwrap().expect("a slot");
        let bs = slot.block_size as usize;
        let copy = dir.path().join("copy");
        for len in [0, 1, bs, 4097, SLOT_LEN] {
            let env = env_text(len);
            fs::copy(&img, &copy).unwrap();
            let f = fs::OpenOptions::new().write(true).open(&copy).unwrap();
            for p in slot.fill(&env).unwrap() {
                f.write_all_at(&p.bytes, p.offset).unwrap();
            }
            drop(f);
            let o = run("e2fsck", &["-fn"], &copy);
            let out = String::from_utf8_lossy(&o.stdout);
            assert!(o.status.success(), "len {len}: e2fsck -fn: {out}");
            let cat = run("debugfs", &["-R", "cat /etc/checker.env"], &copy);
            assert!(cat.stdout == env, "len {len}: debugfs cat differs");
            let stat = run("debugfs", &["-R", "stat /etc/checker.env"], &copy);
            let stat = String::from_utf8_lossy(&stat.stdout);
            let size = stat.split_whitespace().skip_while(|w| *w != "Size:").nth(1);
            assert_eq!(size, Some(len.to_string().as_str()), "{stat}");
        }
        assert_eq!(slot.fill(&vec![b'x'; SLOT_LEN + 1]), None);
        let same = fs::read(&img).unwrap() == pristine;
        assert!(same, "the image itself changed");
        Some((dir, img))
    }

    #[test]
    fn placeholder_shape() {
        let p = placeholder();
        assert_eq!(p.len(), SLOT_LEN);
        assert!(p.starts_with(MAGIC));
        assert!(!p.contains(&0));
        assert!(p.ends_with(b"\n\n"));
    }

    #[test]
    fn fill_4k_metadata_csum_htree() {
        // -D re-indexes /etc as an htree (with a depth-1 extent tree, as it happens).
        let Some((_dir, img)) = roundtrip(|t, i| {
            mkfs(t, i, &["-b", "4096"], 64);
            run("e2fsck", &["-fyD"], i);
        }) else {
            return;
        };
        let f = File::open(&img).unwrap();
        let mut r = |b: &mut [u8], o| f.read_exact_at(b, o);
        let mut fs = Fs::open(&mut r).unwrap().unwrap();
        let etc = fs.lookup("/etc").unwrap().unwrap();
        assert_ne!(etc.flags() & 0x1000, 0, "/etc is not htree-indexed");
        assert!(matches!(rd::node(etc.i_block()), Some((d, _)) if d > 0));
    }

    #[test]
    fn fill_4k_without_metadata_csum() {
        let _ = roundtrip(|t, i| mkfs(t, i, &["-b", "4096", "-O", "^metadata_csum"], 64));
    }

    #[test]
    fn fill_1k_blocks() {
        let _ = roundtrip(|t, i| {
            mkfs(t, i, &["-b", "1024"], 64);
            run("e2fsck", &["-fyD"], i);
        });
    }

    #[test]
    fn fill_128_byte_inodes() {
        // No room for i_checksum_hi: only the low 16 bits are stored.
        let _ = roundtrip(|t, i| mkfs(t, i, &["-b", "1024", "-I", "128"], 64));
    }

    #[test]
    fn fill_after_uuid_change() {
        if skip(&["tune2fs"]) {
            return;
        }
        // metadata_csum_seed keeps the old seed in the superblock once the UUID changes.
        let _ = roundtrip(|t, i| {
            mkfs(t, i, &["-b", "4096", "-O", "metadata_csum_seed"], 64);
            run("tune2fs", &["-U", "random"], i);
        });
    }

    #[test]
    fn fill_chvkit_pack_image() {
        // The images `chvkit rootfs` writes (its own ext4 writer) must carry a usable slot.
        let _ = roundtrip(|t, i| {
            File::create(i).unwrap().set_len(64 << 20).unwrap();
            let o = super::super::ext4::PackOpts {
                size_bytes: 64 << 20,
                inodes: 4096,
                epoch: None,
                seed: String::new(),
                label: None,
            };
            super::super::ext4::pack(t, i, &o).unwrap();
        });
    }

    /// An image whose slot debugfs writes (first fit) around `gaps` single used blocks.
    fn fragmented(t: &Path, img: &Path, gaps: u64) {
        fs::remove_file(t.join("etc/checker.env")).unwrap();
        let ph = t.with_file_name("placeholder");
        fs::write(&ph, placeholder()).unwrap();
        mkfs(t, img, &["-b", "1024"], 16);
        let ffb = run("debugfs", &["-R", "ffb 1"], img).stdout;
        let ffb = String::from_utf8_lossy(&ffb);
        let first: u64 = ffb.split_whitespace().last().unwrap().parse().unwrap();
        let used: Vec<u64> = (0..gaps).map(|i| first + 1 + 2 * i).collect();
        let mut cmds: Vec<String> = used.iter().map(|b| format!("setb {b}")).collect();
        cmds.push(format!("write {} /etc/checker.env", ph.display()));
        cmds.extend(used.iter().map(|b| format!("freeb {b}")));
        cmds.push("sif /etc/checker.env mode 0100600".into());
        let f = t.with_file_name("cmds");
        fs::write(&f, cmds.join("\n")).unwrap();
        run("debugfs", &["-w", "-f", f.to_str().unwrap()], img);
    }

    #[test]
    fn fill_fragmented_slot() {
        let Some((dir, img)) = roundtrip(|t, i| fragmented(t, i, 2)) else {
            return;
        };
        assert_eq!(locate_file(&img).unwrap().unwrap().extents.len(), 3);
        // Four extents leave no room in the inode to split one: not a slot.
        let img4 = dir.path().join("img4");
        tree(&dir.path().join("tree4"), real_slot);
        fragmented(&dir.path().join("tree4"), &img4, 3);
        assert_eq!(locate_file(&img4).unwrap(), None);
    }

    #[test]
    fn not_ext4_is_none() {
        let mut reads = 0;
        assert_eq!(locate_mem(&[0u8; 1 << 20], &mut reads).unwrap(), None);
        assert_eq!(locate_mem(&[7u8; 100], &mut reads).unwrap(), None);
        let mut rng = Rng(0x1234_5678);
        let noise: Vec<u8> = (0..1 << 20).map(|_| rng.next() as u8).collect();
        assert_eq!(locate_mem(&noise, &mut reads).unwrap(), None);
    }

    #[test]
    fn wrong_shapes_are_none() {
        if skip(&[]) {
            return;
        }
        for case in [
            "empty", "text", "short", "symlink", "dir", "hardlink", "no etc",
        ] {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().join("tree");
            tree(&root, |etc| {
                let p = etc.join("checker.env");
                match case {
                    "empty" => fs::write(&p, "").unwrap(),
                    "text" => fs::write(&p, env_text(SLOT_LEN)).unwrap(),
                    "short" => fs::write(&p, &placeholder()[..SLOT_LEN - 1]).unwrap(),
                    "symlink" => std::os::unix::fs::symlink("x", &p).unwrap(),
                    "dir" => fs::create_dir(&p).unwrap(),
                    "hardlink" => {
                        real_slot(etc);
                        fs::hard_link(&p, etc.join("other")).unwrap();
                    }
                    _ => fs::remove_dir_all(etc).unwrap(),
                }
            });
            let img = dir.path().join("img");
            mkfs(&root, &img, &["-b", "4096"], 16);
            assert_eq!(locate_file(&img).unwrap(), None, "{case}");
        }
    }

    /// xorshift64*: deterministic, dependency-free.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
    }

    #[test]
    fn corrupt_metadata_never_panics() {
        if skip(&[]) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("tree");
        tree(&root, real_slot);
        let path = dir.path().join("img");
        mkfs(&root, &path, &["-b", "1024"], 16);
        run("e2fsck", &["-fyD"], &path);
        let mut img = fs::read(&path).unwrap();
        // The metadata the walk touches: superblock, descriptors, the three inodes on the path,
        // and the blocks of / and /etc (leaves and tree nodes).
        let mut regions: Vec<(u64, u64)> = vec![(1024, 1024), (2048, 1024)];
        {
            let f = File::open(&path).unwrap();
            let mut r = |b: &mut [u8], o| f.read_exact_at(b, o);
            let mut fs = Fs::open(&mut r).unwrap().unwrap();
            let slot = fs.lookup(GUEST_PATH).unwrap().unwrap();
            regions.push((slot.offset, fs.inode_size as u64));
            for p in ["/", "/etc"] {
                let ino = fs.lookup(p).unwrap().unwrap();
                regions.push((ino.offset, fs.inode_size as u64));
                if let Some((d, e)) = rd::node(ino.i_block()).filter(|(d, _)| *d > 0) {
                    assert_eq!(d, 1);
                    for c in e.chunks_exact(12) {
                        regions.push((u64::from(le32(c, 4)) * 1024, 1024));
                    }
                }
                for e in fs.extents(&ino).unwrap().unwrap() {
                    regions.push((e.start * 1024, u64::from(e.len) * 1024));
                }
            }
        }
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for _ in 0..200 {
            let mut saved = Vec::new();
            for _ in 0..1 + rng.next() % 4 {
                let (off, len) = regions[(rng.next() % regions.len() as u64) as usize];
                let at = (off + rng.next() % len) as usize;
                saved.push((at, img[at]));
                img[at] ^= (rng.next() % 255 + 1) as u8;
            }
            let mut reads = 0;
            let _ = locate_mem(&img, &mut reads);
            assert!(reads < 20_000, "{reads} reads");
            for (at, b) in saved.into_iter().rev() {
                img[at] = b;
            }
        }
        let mut reads = 0;
        assert!(locate_mem(&img, &mut reads).unwrap().is_some());
    }
}
