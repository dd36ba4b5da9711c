//! `chvkit rootfs --bootable`: the GPT disk it writes, checked by the tools of the trade
//! (sgdisk, fsck.vfat, mtools, e2fsck), read the way rust-hypervisor-firmware reads it (an
//! independent reader following its `part.rs`, `fat.rs` and `loader.rs`), booted by a real
//! UEFI firmware (OVMF under QEMU TCG → systemd-boot → Debian's cloud kernel → the generated
//! `/init`), and accepted by `launch --firmware` with the real VMM; plus reproducibility, the
//! cache key, and bad inputs.

mod common;
mod launch_env;
#[path = "qemu/ovmf.rs"]
mod ovmf;
#[path = "qemu/mod.rs"]
mod qemu;
mod vmm;

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

const TOOLS: &[&str] = &["buildah", "umoci", "mkfs.ext4", "e2fsck", "busybox"];

const WORKLOAD: &str = "#!/bin/sh\necho \"workload: mode=$CHECKER_MODE\"\nexit 3\n";

const DOCKERFILE: &str = "FROM scratch
COPY busybox /bin/busybox
RUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]
COPY workload.sh /usr/local/bin/workload
ENV CHECKER_MODE=firmware
CMD [\"/usr/local/bin/workload\"]
";

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        Env {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    /// A busybox context whose workload exits 3.
    fn context(&self) -> PathBuf {
        let ctx = self.p("ctx");
        if !ctx.is_dir() {
            fs::create_dir_all(&ctx).unwrap();
            fs::copy("/bin/busybox", ctx.join("busybox")).unwrap();
            qemu::write_exec(&ctx.join("workload.sh"), WORKLOAD);
            fs::write(ctx.join("Dockerfile"), DOCKERFILE).unwrap();
        }
        ctx
    }
    fn rootfs(&self, args: &[&str], envs: &[(&str, &str)]) -> Output {
        common::chvkit_rootfs(&self.p("hostroot"), args, envs)
    }
    /// `rootfs --bootable` of the context into `out`; returns the JSON summary.
    fn bootable(&self, out: &Path, extra: &[&str], envs: &[(&str, &str)]) -> serde_json::Value {
        let ctx = self.context();
        let mut args = vec![
            "--pull",
            "never",
            "--json",
            "-o",
            out.to_str().unwrap(),
            "--bootable",
        ];
        args.extend_from_slice(extra);
        args.push(ctx.to_str().unwrap());
        let o = self.rootfs(&args, envs);
        assert!(o.status.success(), "{}", common::text(&o));
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", common::text(&o)))
    }
}

fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd).args(args).output().unwrap()
}

fn sha256(p: &Path) -> String {
    let o = run("sha256sum", &[p.to_str().unwrap()]);
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Copy `len` bytes at `off` of `d` into a new sparse file `to`.
fn extract(d: &Disk, off: u64, len: u64, to: &Path) {
    let f = File::create(to).unwrap();
    f.set_len(len).unwrap();
    let mut at = 0;
    while at < len {
        let n = (len - at).min(1 << 20) as usize;
        let b = d.read(off + at, n);
        if b.iter().any(|x| *x != 0) {
            f.write_all_at(&b, at).unwrap();
        }
        at += n as u64;
    }
}

/// Debian's cloud kernel and the harness's PARTUUID-capable initramfs for it.
fn kernel_and_initramfs(test: &str) -> Option<(PathBuf, PathBuf)> {
    let Some(k) = qemu::find_kernel() else {
        common::skip(
            test,
            "no /boot/vmlinuz-*-cloud-amd64 (linux-image-cloud-amd64)",
        );
        return None;
    };
    match ovmf::partuuid_initramfs(&k) {
        Ok(i) => Some((k.vmlinuz, i)),
        Err(e) => {
            common::skip(test, &format!("cannot build the test initramfs: {e}"));
            None
        }
    }
}

// ---------------------------------------------------------------------------------------------
// An independent reader that does what rust-hypervisor-firmware 0.5.0 does, step by step.

/// The disk, read by sector like the firmware's virtio-blk driver (512-byte sectors).
struct Disk(File);

impl Disk {
    fn read(&self, off: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.0.read_exact_at(&mut b, off).unwrap();
        b
    }
}

fn le16(b: &[u8], o: usize) -> u64 {
    u64::from(u16::from_le_bytes([b[o], b[o + 1]]))
}
fn le32(b: &[u8], o: usize) -> u64 {
    u64::from(u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]))
}
fn le64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

/// `part.rs::find_efi_partition`: header at LBA 1 ("EFI PART", first usable ≥ 34), entries
/// from its partition LBA, four per sector, an entry counts when its unique GUID is non-zero,
/// at most 16 of them; the first with the ESP type GUID. Returns (first, last LBA, number).
fn firmware_find_esp(d: &Disk) -> (u64, u64, usize) {
    let h = d.read(512, 512);
    assert_eq!(le64(&h, 0), 0x5452_4150_2049_4645, "GPT signature at LBA 1");
    let first_usable = le64(&h, 40);
    assert!(first_usable >= 34, "first usable LBA {first_usable} < 34");
    let (part_lba, count) = (le64(&h, 72), le32(&h, 80));
    assert_eq!(le32(&h, 84), 128, "the firmware assumes 128-byte entries");
    let esp_type: [u8; 16] = [
        0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e, 0xc9,
        0x3b,
    ];
    let mut used = Vec::new();
    let mut checked = 0;
    for lba in part_lba..first_usable {
        let s = d.read(lba * 512, 512);
        for (i, e) in s.chunks(128).enumerate() {
            if e[16..32] == [0; 16] {
                continue;
            }
            used.push(((lba - part_lba) as usize * 4 + i, e.to_vec()));
        }
        checked += 4;
        if checked >= count {
            break;
        }
    }
    assert!(used.len() <= 16, "the firmware keeps at most 16 partitions");
    let (idx, e) = used
        .iter()
        .find(|(_, e)| e[..16] == esp_type)
        .expect("an EFI System Partition");
    (le64(e, 32), le64(e, 40), idx + 1)
}

/// `fat.rs`'s view of a FAT12/16/32 volume.
struct Fat<'a> {
    d: &'a Disk,
    start: u64,
    bps: u64,
    spc: u64,
    fat_start: u64,
    root_dir_start: u64,
    root_dir_sectors: u64,
    first_data: u64,
    bits: u32,
    root_cluster: u64,
}

#[derive(Debug, Clone)]
struct DirEntry {
    short: [u8; 11],
    long: String,
    dir: bool,
    cluster: u64,
    size: u64,
}

impl<'a> Fat<'a> {
    fn new(d: &'a Disk, first_lba: u64) -> Fat<'a> {
        let start = first_lba * 512;
        let h = d.read(start, 512);
        let bps = le16(&h, 11);
        let spc = u64::from(h[13]);
        let reserved = le16(&h, 14);
        let fats = u64::from(h[16]);
        let root_entries = le16(&h, 17);
        let spf = match le16(&h, 22) {
            0 => le32(&h, 36),
            n => n,
        };
        let sectors = match le16(&h, 19) {
            0 => le32(&h, 32),
            n => n,
        };
        let root_dir_sectors = (root_entries * 32).div_ceil(bps);
        let first_data = reserved + fats * spf + root_dir_sectors;
        let clusters = (sectors - first_data) / spc;
        // fat.rs: FAT12 below 0xff5 clusters, FAT16 below 0xfff5, else FAT32.
        let bits = if clusters < 0xff5 {
            12
        } else if clusters < 0xfff5 {
            16
        } else {
            32
        };
        Fat {
            d,
            start,
            bps,
            spc,
            fat_start: reserved,
            root_dir_start: reserved + fats * spf,
            root_dir_sectors,
            first_data,
            bits,
            root_cluster: if bits == 32 { le32(&h, 44) } else { 0 },
        }
    }

    fn sector(&self, s: u64) -> Vec<u8> {
        self.d.read(self.start + s * self.bps, self.bps as usize)
    }

    fn next_cluster(&self, c: u64) -> Option<u64> {
        let (off, mask, end) = match self.bits {
            12 => (c + c / 2, 0xfff, 0xff8),
            16 => (c * 2, 0xffff, 0xfff8),
            _ => (c * 4, 0x0fff_ffff, 0x0fff_fff8),
        };
        let b = self.d.read(self.start + self.fat_start * self.bps + off, 4);
        let mut v = le32(&b, 0);
        if self.bits == 12 {
            v = if c % 2 == 1 {
                (v & 0xffff) >> 4
            } else {
                v & 0xfff
            };
        }
        let v = v & mask;
        (2..end).contains(&v).then_some(v)
    }

    /// Sectors of a cluster chain (or of the fixed FAT12/16 root directory for cluster 0).
    fn chain_sectors(&self, cluster: u64) -> Vec<u64> {
        if cluster == 0 {
            return (self.root_dir_start..self.root_dir_start + self.root_dir_sectors).collect();
        }
        let mut out = Vec::new();
        let mut c = Some(cluster);
        while let Some(cl) = c {
            let first = self.first_data + (cl - 2) * self.spc;
            out.extend(first..first + self.spc);
            c = self.next_cluster(cl);
            assert!(out.len() < 1 << 24, "cluster chain loops");
        }
        out
    }

    /// `Directory::next_entry`: LFN pieces gathered by sequence number, ASCII of UCS-2.
    fn entries(&self, cluster: u64) -> Vec<DirEntry> {
        let mut out = Vec::new();
        let mut long = [0u16; 260];
        'outer: for s in self.chain_sectors(cluster) {
            let b = self.sector(s);
            for e in b.chunks(32) {
                if e[0] == 0 {
                    break 'outer;
                }
                if e[0] == 0xe5 {
                    continue;
                }
                if e[11] == 0x0f {
                    let seq = usize::from(e[0] & 0x1f) - 1;
                    let mut chars = Vec::new();
                    for r in [1..11, 14..26, 28..32] {
                        chars.extend(e[r].chunks(2).map(|c| u16::from_le_bytes([c[0], c[1]])));
                    }
                    long[seq * 13..seq * 13 + 13].copy_from_slice(&chars);
                    continue;
                }
                let name: String = long
                    .iter()
                    .take_while(|c| **c != 0)
                    .map(|c| (*c & 0xff) as u8 as char)
                    .collect();
                out.push(DirEntry {
                    short: e[..11].try_into().unwrap(),
                    long: name,
                    dir: e[11] & 0x10 != 0,
                    cluster: (le16(e, 20) << 16) | le16(e, 26),
                    size: le32(e, 28),
                });
                long = [0u16; 260];
            }
        }
        out
    }

    /// `compare_name`: the 8.3 name case-insensitively, or the long name exactly.
    fn matches(name: &str, e: &DirEntry) -> bool {
        let short = {
            let (b, x) = name.split_once('.').unwrap_or((name, ""));
            b.len() <= 8 && x.len() <= 3 && {
                let mut s = [b' '; 11];
                s[..b.len()].copy_from_slice(b.as_bytes());
                s[8..8 + x.len()].copy_from_slice(x.as_bytes());
                s.eq_ignore_ascii_case(&e.short)
            }
        };
        short || e.long == name
    }

    /// `Filesystem::open`: an absolute path, `/` or `\` separated, shorter than 256 bytes.
    fn open(&self, path: &str) -> Option<DirEntry> {
        assert!(path.starts_with('/') || path.starts_with('\\'), "{path}");
        assert!(
            path.len() < 256,
            "{path}: the firmware asserts paths < 256 bytes"
        );
        let mut cluster = self.root_cluster;
        let parts: Vec<&str> = path[1..].split(['/', '\\']).collect();
        for (i, p) in parts.iter().enumerate() {
            let e = self
                .entries(cluster)
                .into_iter()
                .find(|e| Fat::matches(p, e))?;
            if i + 1 == parts.len() {
                return Some(e);
            }
            assert!(e.dir, "{p} in {path} is not a directory");
            cluster = e.cluster;
        }
        None
    }

    fn read_file(&self, e: &DirEntry) -> Vec<u8> {
        let mut out = Vec::new();
        for s in self.chain_sectors(e.cluster) {
            out.extend(self.sector(s));
            if out.len() as u64 >= e.size {
                break;
            }
        }
        out.truncate(e.size as usize);
        out
    }
}

/// `loader.rs::compare_entry`.
fn glob(name: &[u8], pat: &[u8]) -> bool {
    match pat.split_first() {
        None => name.is_empty(),
        Some((b'*', r)) => (0..=name.len()).any(|i| glob(&name[i..], r)),
        Some((b'?', r)) => !name.is_empty() && glob(&name[1..], r),
        Some((b'\\', r)) => match r.split_first() {
            Some((c, r)) => name.first() == Some(c) && glob(&name[1..], r),
            None => false,
        },
        Some((c, r)) => name.first() == Some(c) && glob(&name[1..], r),
    }
}

/// `loader.rs::parse_entry`/`default_entry_pattern`: the trimmed rest of the (last) line that
/// starts with `key`.
fn conf_value(text: &str, key: &str) -> Option<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix(key))
        .map(|v| v.trim().to_string())
        .next_back()
}

#[derive(Debug)]
struct FirmwareBoot {
    esp_number: usize,
    entry_file: String,
    linux: String,
    initrd: String,
    options: String,
    bootx64: bool,
}

/// `load_default_entry`, asserting each step and each limit.
fn firmware_load_default_entry(disk: &Path) -> FirmwareBoot {
    let d = Disk(File::open(disk).unwrap());
    let (first, last, esp_number) = firmware_find_esp(&d);
    assert!(last > first);
    let fat = Fat::new(&d, first);
    let conf = fat
        .open("/loader/loader.conf")
        .expect("/loader/loader.conf");
    assert!(
        conf.size <= 4096,
        "loader.conf is {} bytes > 4096",
        conf.size
    );
    let conf = String::from_utf8(fat.read_file(&conf)).unwrap();
    let pattern = conf_value(&conf, "default").expect("a `default` line");
    assert!(pattern.len() < 260, "default pattern longer than 259 bytes");
    let entries_dir = fat.open("/loader/entries").expect("/loader/entries");
    assert!(entries_dir.dir);
    let files: Vec<DirEntry> = fat
        .entries(entries_dir.cluster)
        .into_iter()
        .filter(|e| !e.dir)
        .collect();
    let chosen = files
        .iter()
        .find(|e| glob(e.long.as_bytes(), pattern.as_bytes()))
        .unwrap_or_else(|| {
            panic!(
                "default {pattern:?} matches no entry exactly (the firmware would fall back to \
                 the first *.conf): {:?}",
                files.iter().map(|e| &e.long).collect::<Vec<_>>()
            )
        });
    let path = format!("/loader/entries/{}", chosen.long);
    assert!(path.len() < 260);
    let entry = fat.open(&path).expect("the entry file");
    assert!(entry.size <= 4096, "entry is {} bytes > 4096", entry.size);
    let text = String::from_utf8(fat.read_file(&entry)).unwrap();
    let linux = conf_value(&text, "linux").expect("a `linux` line");
    let initrd = conf_value(&text, "initrd").unwrap_or_default();
    let options = conf_value(&text, "options").unwrap_or_default();
    for p in [&linux, &initrd] {
        assert!(
            p.len() < 260,
            "{p}: longer than the firmware's 260-byte path buffer"
        );
    }
    assert!(options.len() <= 4096);
    // The bzImage the firmware loads: boot flag, HdrS, protocol ≥ 2.05, relocatable, and the
    // command line it builds (" " + options) shorter than cmdline_size.
    let k = fat.open(&linux).expect("the entry's kernel");
    let kb = fat.read_file(&k);
    assert_eq!(&kb[0x1fe..0x200], &[0x55, 0xaa]);
    assert_eq!(&kb[0x202..0x206], b"HdrS");
    assert!(le16(&kb, 0x206) >= 0x205 && kb[0x234] != 0);
    assert!((options.len() + 1) < le32(&kb, 0x238) as usize);
    if !initrd.is_empty() {
        let i = fat.open(&initrd).expect("the entry's initrd");
        assert!(i.size > 0);
    }
    FirmwareBoot {
        esp_number,
        entry_file: chosen.long.clone(),
        linux,
        initrd,
        options,
        bootx64: fat.open("\\EFI\\BOOT\\BOOTX64.EFI").is_some(),
    }
}

// ---------------------------------------------------------------------------------------------

#[test]
fn rootfs_bootable_structure_reproducible_and_firmware_readable() {
    let t = "rootfs_bootable_structure_reproducible_and_firmware_readable";
    if !common::require(t, true, TOOLS)
        || !common::require(
            t,
            false,
            &[
                "sgdisk",
                "fsck.vfat",
                "mdir",
                "mtype",
                "qemu-img",
                "debugfs",
            ],
        )
    {
        return;
    }
    let Some((kernel, initrd)) = kernel_and_initramfs(t) else {
        return;
    };
    let e = Env::new();
    let (k, i) = (kernel.to_str().unwrap(), initrd.to_str().unwrap());
    let epoch = [("SOURCE_DATE_EPOCH", "1700000000")];
    let args = [
        "--no-cache",
        "--kernel",
        k,
        "--initramfs",
        i,
        "--cmdline",
        "quiet loglevel=4",
    ];
    let a = e.p("a.raw");
    let ja = e.bootable(&a, &args, &epoch);
    let boot = &ja["bootable"];
    let root_guid = boot["root_partuuid"].as_str().unwrap().to_string();
    let root_off = boot["root_offset"].as_u64().unwrap();

    // sgdisk: valid GPT; partition 2's unique GUID is the PARTUUID in the entry.
    let o = run("sgdisk", &["-v", a.to_str().unwrap()]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && out.contains("No problems found"),
        "{}",
        common::text(&o)
    );
    let o = run("sgdisk", &["-i", "2", a.to_str().unwrap()]);
    let info = String::from_utf8_lossy(&o.stdout).to_lowercase();
    assert!(
        info.contains(&format!("partition unique guid: {root_guid}")),
        "{info}"
    );
    assert!(
        info.contains("4f68bce3-e8cd-4db1-96e7-fbcaf984b709"),
        "{info}"
    );
    let o = run("sgdisk", &["-i", "1", a.to_str().unwrap()]);
    let esp_info = String::from_utf8_lossy(&o.stdout).to_lowercase();
    assert!(
        esp_info.contains("c12a7328-f81f-11d2-ba4b-00a0c93ec93b"),
        "{esp_info}"
    );
    assert!(esp_info.contains("first sector: 2048 "), "{esp_info}");

    // The ESP: fsck.vfat clean, the files there (mtools, at the partition's offset).
    let esp_img = e.p("esp.img");
    let esp_len = boot["esp_bytes"].as_u64().unwrap();
    let d = Disk(File::open(&a).unwrap());
    fs::write(&esp_img, d.read(1 << 20, esp_len as usize)).unwrap();
    let o = run("fsck.vfat", &["-n", esp_img.to_str().unwrap()]);
    assert!(o.status.success(), "fsck.vfat -n: {}", common::text(&o));
    let img = format!("{}@@{}", a.display(), 1 << 20);
    let o = run("mdir", &["-i", &img, "-/", "::/"]);
    let listing = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "{}", common::text(&o));
    for name in [
        "linux",
        "initrd",
        "loader.conf",
        "chvkit.conf",
        "BOOTX64",
        "EFI",
    ] {
        assert!(listing.contains(name), "{name} not on the ESP:\n{listing}");
    }
    let o = run("mtype", &["-i", &img, "::/loader/entries/chvkit.conf"]);
    let entry = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        entry.contains(&format!(
            "options root=PARTUUID={root_guid} rw console=ttyS0 init=/init quiet loglevel=4"
        )),
        "{entry}"
    );
    let o = run("mtype", &["-i", &img, "::/loader/loader.conf"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("default chvkit.conf"));
    // The kernel on the ESP is the file given, byte for byte.
    let o = run("mtype", &["-i", &img, "::/chvkit/linux"]);
    assert!(
        o.stdout == fs::read(&kernel).unwrap(),
        "the ESP's kernel differs"
    );

    // The root partition (copied out from its offset): a clean ext4 holding the generated
    // /init and the env slot.
    let root_len = boot["root_bytes"].as_u64().unwrap();
    let part = e.p("root.img");
    extract(&d, root_off, root_len, &part);
    let o = run("e2fsck", &["-fn", part.to_str().unwrap()]);
    assert!(
        o.status.success(),
        "e2fsck -fn of partition 2: {}",
        common::text(&o)
    );
    let o = run(
        "debugfs",
        &["-R", "stat /etc/checker.env", part.to_str().unwrap()],
    );
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("Size: 16384"),
        "{}",
        common::text(&o)
    );
    let o = run("debugfs", &["-R", "stat /init", part.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("Type: regular"),
        "{}",
        common::text(&o)
    );
    let mut read = |b: &mut [u8], off: u64| d.0.read_exact_at(b, off);
    assert_eq!(
        chvkit::rootfs::bootable::root_partition_offset(&mut read),
        Some(root_off)
    );

    // Launch's per-job disk of it carries checker.env in partition 2's env slot (the overlay
    // only; the disk itself is not written): exactly the environment, the filesystem clean.
    {
        let env = chvkit::envfile::render(&[("CHECKER_JOB_ID", "boot-1"), ("X", "it's")]).unwrap();
        let before = sha256(&a);
        let state = e.p("state");
        let jd = chvkit::launch::disk::prepare(
            &a,
            &state.join("disks/boot-1"),
            &state.join("bases"),
            Some(env.as_bytes()),
        )
        .unwrap();
        assert!(jd.env_in_slot, "no env slot found in the root partition");
        assert_eq!(sha256(&a), before, "the bootable disk was written");
        let flat = e.p("job-flat.raw");
        let o = run(
            "qemu-img",
            &[
                "convert",
                "-O",
                "raw",
                jd.path.to_str().unwrap(),
                flat.to_str().unwrap(),
            ],
        );
        assert!(o.status.success(), "{}", common::text(&o));
        let jdisk = Disk(File::open(&flat).unwrap());
        let jpart = e.p("job-root.img");
        extract(&jdisk, root_off, root_len, &jpart);
        let o = run("e2fsck", &["-fn", jpart.to_str().unwrap()]);
        assert!(o.status.success(), "{}", common::text(&o));
        let o = run(
            "debugfs",
            &["-R", "cat /etc/checker.env", jpart.to_str().unwrap()],
        );
        assert_eq!(String::from_utf8_lossy(&o.stdout), env);
    }

    // What rust-hypervisor-firmware does with it, step by step.
    let fw = firmware_load_default_entry(&a);
    assert_eq!(fw.esp_number, 1);
    assert_eq!(fw.entry_file, "chvkit.conf");
    assert_eq!(fw.linux, "/chvkit/linux");
    assert_eq!(fw.initrd, "/chvkit/initrd");
    assert!(
        fw.options
            .starts_with(&format!("root=PARTUUID={root_guid} ")),
        "{fw:?}"
    );
    assert!(fw.bootx64, "systemd-boot as \\EFI\\BOOT\\BOOTX64.EFI");

    // Reproducible: the same inputs and epoch, rebuilt from scratch, give the same bytes.
    std::thread::sleep(Duration::from_millis(1100));
    let b = e.p("b.raw");
    e.bootable(&b, &args, &epoch);
    assert_eq!(
        sha256(&a),
        sha256(&b),
        "two --bootable builds with one epoch differ"
    );
}

#[test]
fn rootfs_bootable_cache_key_covers_kernel_initramfs_and_cmdline() {
    let t = "rootfs_bootable_cache_key_covers_kernel_initramfs_and_cmdline";
    if !common::require(t, true, TOOLS) {
        return;
    }
    let Some((kernel, initrd)) = kernel_and_initramfs(t) else {
        return;
    };
    let e = Env::new();
    let (k, i) = (kernel.to_str().unwrap(), initrd.to_str().unwrap());
    let out = e.p("o.raw");
    let state = |extra: &[&str]| -> String {
        let j = e.bootable(&out, extra, &[]);
        j["cache"].as_str().unwrap().to_string()
    };
    assert_eq!(state(&["--kernel", k, "--cmdline", "a=1"]), "miss");
    assert_eq!(state(&["--kernel", k, "--cmdline", "a=1"]), "hit");
    assert_eq!(state(&["--kernel", k, "--cmdline", "a=2"]), "miss");
    assert_eq!(
        state(&["--kernel", k, "--cmdline", "a=2", "--initramfs", i]),
        "miss"
    );
    // Another kernel file with other bytes.
    let k2 = e.p("vmlinuz-copy");
    let mut bytes = fs::read(&kernel).unwrap();
    bytes.extend_from_slice(&[0u8; 512]);
    fs::write(&k2, bytes).unwrap();
    let k2 = k2.to_str().unwrap();
    assert_eq!(
        state(&["--kernel", k2, "--cmdline", "a=2", "--initramfs", i]),
        "miss"
    );
    assert_eq!(
        state(&["--kernel", k2, "--cmdline", "a=2", "--initramfs", i]),
        "hit"
    );
    // A hit into another file copies the cached disk: the same bytes as the build wrote (the
    // cache's copy is assembled separately), which the firmware reads with the JSON's PARTUUID.
    let out2 = e.p("o2.raw");
    let j = e.bootable(
        &out2,
        &["--kernel", k2, "--cmdline", "a=2", "--initramfs", i],
        &[],
    );
    assert_eq!(j["cache"], "hit");
    assert_eq!(
        sha256(&out2),
        sha256(&out),
        "the cached disk differs from the built one"
    );
    let fw = firmware_load_default_entry(&out2);
    assert!(fw
        .options
        .contains(j["bootable"]["root_partuuid"].as_str().unwrap()));
    // The plain image of the same context is another entry.
    let o = e.rootfs(
        &[
            "--pull",
            "never",
            "--json",
            "-o",
            e.p("plain.raw").to_str().unwrap(),
            e.context().to_str().unwrap(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", common::text(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["cache"], "miss");
    assert!(j.get("bootable").is_none());
}

#[test]
fn rootfs_bootable_bad_inputs_leave_no_output() {
    let t = "rootfs_bootable_bad_inputs_leave_no_output";
    let e = Env::new();
    let ctx = e.p("ctx-only");
    fs::create_dir_all(&ctx).unwrap();
    fs::write(ctx.join("Dockerfile"), "FROM scratch\n").unwrap();
    let outdir = e.p("out");
    fs::create_dir_all(&outdir).unwrap();
    let out = outdir.join("disk.raw");
    // A fake bzImage header the firmware would load (cmdline_size 2047).
    let mut bz = vec![0u8; 8192];
    bz[0x1fe] = 0x55;
    bz[0x1ff] = 0xaa;
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    bz[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
    bz[0x234] = 1;
    bz[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes());
    let good = e.p("vmlinuz");
    fs::write(&good, &bz).unwrap();
    let elf = e.p("vmlinux");
    let mut eb = vec![0u8; 4096];
    eb[..4].copy_from_slice(b"\x7fELF");
    fs::write(&elf, eb).unwrap();
    let long = "x".repeat(3000);
    let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        (
            vec!["--kernel".into(), elf.display().to_string()],
            vec!["not a bzImage", "vmlinux"],
        ),
        (
            vec![
                "--kernel".into(),
                good.display().to_string(),
                "--initramfs".into(),
                e.p("missing.img").display().to_string(),
            ],
            vec!["--initramfs", "missing.img"],
        ),
        (
            vec![
                "--kernel".into(),
                good.display().to_string(),
                "--cmdline".into(),
                long,
            ],
            vec!["--cmdline", "xxxxxxxxxx", "cmdline_size"],
        ),
        (
            vec!["--kernel".into(), e.p("nope").display().to_string()],
            vec!["--kernel", "nope"],
        ),
    ];
    for (extra, words) in cases {
        let mut args = vec![
            "--pull".to_string(),
            "never".into(),
            "-o".into(),
            out.display().to_string(),
            "--bootable".into(),
        ];
        args.extend(extra);
        args.push(ctx.display().to_string());
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = e.rootfs(&a, &[]);
        assert!(!o.status.success(), "{t}: {args:?} succeeded");
        let err = String::from_utf8_lossy(&o.stderr);
        for w in words {
            assert!(err.contains(w), "{t}: {args:?}: no {w:?} in:\n{err}");
        }
        let left: Vec<_> = fs::read_dir(&outdir)
            .unwrap()
            .flatten()
            .map(|d| d.path())
            .collect();
        assert!(left.is_empty(), "{t}: {args:?} left {left:?}");
    }
    // --kernel etc. only with --bootable, and --bootable only with --kernel.
    let o = e.rootfs(
        &[
            "-o",
            out.to_str().unwrap(),
            "--bootable",
            ctx.to_str().unwrap(),
        ],
        &[],
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--kernel"),
        "{}",
        common::text(&o)
    );
    let o = e.rootfs(
        &[
            "-o",
            out.to_str().unwrap(),
            "--initramfs",
            "x",
            ctx.to_str().unwrap(),
        ],
        &[],
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--bootable"),
        "{}",
        common::text(&o)
    );
}

#[test]
fn rootfs_bootable_boots_under_ovmf_and_systemd_boot() {
    let t = "rootfs_bootable_boots_under_ovmf_and_systemd_boot";
    if !common::require(t, true, TOOLS) {
        return;
    }
    if let Some(why) = ovmf::unavailable() {
        common::skip(t, &why);
        return;
    }
    let Some((kernel, initrd)) = kernel_and_initramfs(t) else {
        return;
    };
    let e = Env::new();
    let disk = e.p("boot.raw");
    let j = e.bootable(
        &disk,
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--initramfs",
            initrd.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(j["bootable"]["systemd_boot"], true);
    let r = ovmf::run_uefi(&disk, Duration::from_secs(600)).unwrap();
    let how = format!(
        "after {:.0?} (timed out: {}), milestones:\n{}\n--- serial tail:\n{}",
        r.elapsed,
        r.timed_out,
        ovmf::milestones(&r.serial).join("\n"),
        r.serial
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(r.exit_markers(), vec![3], "{how}");
    assert_eq!(r.boots(), 1, "{how}");
    assert!(r.powered_off(), "QEMU must exit by itself: {how}");
    let root = j["bootable"]["root_partuuid"].as_str().unwrap();
    assert!(
        r.serial
            .contains(&format!("root PARTUUID={root} is /dev/vda2")),
        "the initramfs mounted the root by PARTUUID: {how}"
    );
    assert!(r.serial.contains("workload: mode=firmware"), "{how}");
}

/// A firmware for the real VMM when rust-hypervisor-firmware itself is not at hand: an ELF
/// with a PVH entry note whose code halts forever (Cloud Hypervisor loads a firmware ELF the
/// way it loads hypervisor-fw). Enough to show the VMM takes the configuration and the VM
/// runs; the firmware's own boot is shown under QEMU + OVMF.
fn halt_firmware(path: &Path) {
    const BASE: u64 = 0x10_0000;
    let note_name = b"Xen\0";
    let mut note = Vec::new();
    note.extend_from_slice(&4u32.to_le_bytes());
    note.extend_from_slice(&4u32.to_le_bytes());
    note.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
    note.extend_from_slice(note_name);
    let code_off = 0x1000u64;
    note.extend_from_slice(&((BASE + code_off) as u32).to_le_bytes());
    let mut f = vec![0u8; 0x2000];
    // ELF64 header.
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 2;
    f[5] = 1;
    f[6] = 1;
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&(BASE + code_off).to_le_bytes());
    f[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
    f[52..54].copy_from_slice(&64u16.to_le_bytes());
    f[54..56].copy_from_slice(&56u16.to_le_bytes());
    f[56..58].copy_from_slice(&2u16.to_le_bytes()); // two program headers
    let ph = |f: &mut Vec<u8>, at: usize, ty: u32, off: u64, addr: u64, len: u64| {
        f[at..at + 4].copy_from_slice(&ty.to_le_bytes());
        f[at + 4..at + 8].copy_from_slice(&5u32.to_le_bytes());
        f[at + 8..at + 16].copy_from_slice(&off.to_le_bytes());
        f[at + 16..at + 24].copy_from_slice(&addr.to_le_bytes());
        f[at + 24..at + 32].copy_from_slice(&addr.to_le_bytes());
        f[at + 32..at + 40].copy_from_slice(&len.to_le_bytes());
        f[at + 40..at + 48].copy_from_slice(&len.to_le_bytes());
        f[at + 48..at + 56].copy_from_slice(&4u64.to_le_bytes());
    };
    let note_off = 0x200u64;
    ph(&mut f, 64, 1, 0, BASE, 0x2000); // PT_LOAD of the whole file
    ph(&mut f, 120, 4, note_off, BASE + note_off, note.len() as u64); // PT_NOTE
    f[note_off as usize..note_off as usize + note.len()].copy_from_slice(&note);
    // hlt; jmp back to hlt.
    f[code_off as usize..code_off as usize + 3].copy_from_slice(&[0xf4, 0xeb, 0xfd]);
    fs::write(path, f).unwrap();
}

#[test]
fn rootfs_bootable_launch_firmware_reaches_running() {
    use launch_env::{Env as LaunchEnv, Which};
    let t = "rootfs_bootable_launch_firmware_reaches_running";
    if !common::require(t, true, TOOLS) {
        return;
    }
    let Some((kernel, initrd)) = kernel_and_initramfs(t) else {
        return;
    };
    let Some(le) = LaunchEnv::new(t, Which::Any) else {
        return;
    };
    let e = Env::new();
    let disk = le.work.path().join("bootable.raw");
    e.bootable(
        &disk,
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--initramfs",
            initrd.to_str().unwrap(),
        ],
        &[],
    );
    let fw = match std::env::var_os("CHVKIT_TEST_FIRMWARE") {
        Some(p) => PathBuf::from(p),
        None => {
            let p = le.work.path().join("halt-fw.elf");
            halt_firmware(&p);
            vmm::notice(
                t,
                "no CHVKIT_TEST_FIRMWARE (rust-hypervisor-firmware is in no registry): a PVH \
                 stand-in firmware that halts; the VM must reach Running",
            );
            p
        }
    };
    let fw = fw.to_str().unwrap();
    let launch = |rootfs: &Path, job: &str| -> std::process::Child {
        le.cmd(&[
            "launch",
            "--rootfs",
            rootfs.to_str().unwrap(),
            "--firmware",
            fw,
            "--bridge",
            "br0",
            "--job-id",
            job,
            "--memory",
            "128",
            "--cpus",
            "1",
            "--json",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
    };
    let mut c = launch(&disk, "fwboot");
    let st = le.wait_running("fwboot", &mut c);
    let vmm_pid = st["vmm_pid"].as_i64().unwrap();
    // SAFETY: plain kill(2) of the launch we spawned.
    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    let o = c.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(128 + 15), "{}", common::text(&o));
    le.assert_clean("fwboot", Some(vmm_pid));

    // A raw ext4 image is still refused, with the explanation and the way out.
    let o = launch(&le.rootfs, "fwraw").wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(72), "{}", common::text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("bare ext2/3/4") && err.contains("--bootable") && err.contains("--kernel"),
        "{err}"
    );
    le.assert_clean("fwraw", None);
}
