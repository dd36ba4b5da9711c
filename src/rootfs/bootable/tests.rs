use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;

use super::*;

/// A bzImage header the firmware accepts: boot flag, `HdrS`, protocol 2.15, relocatable,
/// cmdline_size 2047; with an `MZ` stub.
pub(crate) fn fake_bzimage(len: usize) -> Vec<u8> {
    let mut b = vec![0x5au8; len.max(0x1000)];
    b[0] = b'M';
    b[1] = b'Z';
    b[0x1fe] = 0x55;
    b[0x1ff] = 0xaa;
    b[0x202..0x206].copy_from_slice(b"HdrS");
    b[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
    b[0x20e..0x210].copy_from_slice(&0u16.to_le_bytes());
    b[0x234] = 1;
    b[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes());
    b
}

fn inputs(dir: &Path, cmdline: Option<&str>, initrd: bool) -> Result<Inputs, BootError> {
    let k = dir.join("vmlinuz");
    fs::write(&k, fake_bzimage(3 << 20)).unwrap();
    let initramfs = initrd.then(|| {
        let p = dir.join("initrd.img");
        fs::write(&p, vec![0x1f; 1 << 20]).unwrap();
        p
    });
    let efi = dir.join("sd-boot.efi");
    let mut loader = b"MZ".to_vec();
    loader.extend(vec![0x33; 70_000]);
    fs::write(&efi, loader).unwrap();
    Inputs::load(&BootOpts {
        kernel: k,
        initramfs,
        cmdline: cmdline.map(str::to_string),
        systemd_boot: Some(Some(efi)),
    })
}

/// A file holding `len` bytes of a recognisable pattern (stands for the packed ext4).
fn fake_root(path: &Path, len: u64) -> File {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap();
    f.set_len(len).unwrap();
    for (i, at) in [0u64, 4096, len / 2, len - 4096].iter().enumerate() {
        f.write_all_at(&[i as u8 + 1; 4096], *at).unwrap();
    }
    f
}

fn reader(f: &File) -> impl FnMut(&mut [u8], u64) -> std::io::Result<()> + '_ {
    move |b: &mut [u8], off: u64| {
        b.fill(0);
        f.read_at(b, off).map(|_| ())
    }
}

#[test]
fn disk_reads_back_like_the_firmware_reads_it() {
    let d = tempfile::tempdir().unwrap();
    let i = inputs(d.path(), Some("quiet loglevel=3"), true).unwrap();
    let root_len = 8 << 20;
    let p = d.path().join("disk.raw");
    let f = fake_root(&p, root_len);
    let ids = Ids::new("seed", Some(1_700_000_000));
    let r = assemble(&p, root_len, &i, &ids).unwrap();
    assert_eq!(r.root_partuuid, ids.root.to_string());
    assert!(r.options.starts_with(&format!(
        "root=PARTUUID={} rw console=ttyS0 init=/init",
        ids.root
    )));
    assert!(r.options.ends_with(" quiet loglevel=3"), "{}", r.options);
    // The root filesystem's bytes moved intact to the partition.
    let mut rd = reader(&f);
    assert_eq!(root_partition_offset(&mut rd), Some(r.root_offset));
    let mut b = [0u8; 4096];
    for (n, at) in [0u64, 4096, root_len / 2, root_len - 4096]
        .iter()
        .enumerate()
    {
        f.read_exact_at(&mut b, r.root_offset + at).unwrap();
        assert!(b.iter().all(|x| *x == n as u8 + 1), "block at {at}");
    }
    let parts = read_partitions(&mut rd).unwrap().unwrap();
    assert_eq!(parts.len(), 2);
    assert!(parts[0].is_esp() && parts[0].number == 1);
    assert_eq!(parts[1].guid, ids.root);
    assert_eq!(parts[1].len(), root_len);
    let pr = probe(&mut rd).unwrap();
    let e = pr.entry.unwrap();
    assert_eq!(pr.default_pattern.as_deref(), Some(ENTRY_NAME));
    assert_eq!(e.file, ENTRY_NAME);
    assert_eq!(e.linux, KERNEL_PATH);
    assert_eq!(e.initrd.as_deref(), Some(INITRD_PATH));
    assert_eq!(e.options, r.options);
    assert!(pr.bootx64);
    assert_eq!(f.metadata().unwrap().len() % ALIGN, 0);
}

#[test]
fn same_epoch_same_bytes() {
    let d = tempfile::tempdir().unwrap();
    let i = inputs(d.path(), None, false).unwrap();
    let mut out = vec![];
    for n in 0..2 {
        let p = d.path().join(format!("d{n}.raw"));
        let f = fake_root(&p, 4 << 20);
        assemble(&p, 4 << 20, &i, &Ids::new("k", Some(42))).unwrap();
        drop(f);
        out.push(fs::read(&p).unwrap());
    }
    assert!(out[0] == out[1], "two builds with one epoch differ");
    let p = d.path().join("d2.raw");
    let f = fake_root(&p, 4 << 20);
    assemble(&p, 4 << 20, &i, &Ids::new("k", None)).unwrap();
    drop(f);
    assert!(fs::read(&p).unwrap() != out[0]);
}

#[test]
fn copy_fallback_equals_insert_range() {
    let d = tempfile::tempdir().unwrap();
    let len = 20 << 20;
    let a = fake_root(&d.path().join("a"), len);
    let b = fake_root(&d.path().join("b"), len);
    // A dense run longer than the copy chunk, crossing where its shifted copy lands.
    let dense: Vec<u8> = (0..(9 << 20)).map(|i| (i % 251) as u8).collect();
    for f in [&a, &b] {
        f.write_all_at(&dense, 1 << 20).unwrap();
    }
    let by = 3 << 20;
    shift_up(&a, by).unwrap();
    place::shift_by_copy(&b, by).unwrap();
    drop((a, b));
    let (x, y) = (
        fs::read(d.path().join("a")).unwrap(),
        fs::read(d.path().join("b")).unwrap(),
    );
    assert_eq!(x.len() as u64, len + by);
    assert!(
        x == y,
        "the copy fallback differs from FALLOC_FL_INSERT_RANGE"
    );
    assert!(x[..by as usize].iter().all(|v| *v == 0));
    assert_eq!(&x[(by + (1 << 20)) as usize..][..dense.len()], &dense[..]);
}

#[test]
fn bad_inputs_name_the_value() {
    let d = tempfile::tempdir().unwrap();
    let long = "x".repeat(2100);
    let e = inputs(d.path(), Some(&long), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--cmdline") && e.contains("cmdline_size"), "{e}");
    let e = inputs(d.path(), Some("a\nlinux /evil"), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("control character"), "{e}");
    let elf = d.path().join("vmlinux");
    let mut b = vec![0u8; 8192];
    b[..4].copy_from_slice(b"\x7fELF");
    fs::write(&elf, b).unwrap();
    let e = Inputs::load(&BootOpts {
        kernel: elf.clone(),
        ..Default::default()
    })
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("vmlinux") && e.contains("not a bzImage") && e.contains(&*elf.to_string_lossy()),
        "{e}"
    );
    let k = d.path().join("vmlinuz");
    let e = Inputs::load(&BootOpts {
        kernel: k,
        initramfs: Some(d.path().join("missing.img")),
        systemd_boot: Some(None),
        ..Default::default()
    })
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("--initramfs") && e.contains("missing.img"),
        "{e}"
    );
}

#[test]
fn firmware_glob() {
    use super::probe::glob_match;
    assert!(glob_match(b"chvkit.conf", b"chvkit.conf"));
    assert!(!glob_match(b"chvkit.conf", b"chvkit"));
    assert!(glob_match(b"chvkit.conf", b"*.conf"));
    assert!(glob_match(b"foobar.conf", b"fo?bar.conf"));
    assert!(!glob_match(b"foobar.conf", b"foo\\?ar.conf"));
    assert!(glob_match(b"foobar.conf", b"*obar.conf"));
}

#[test]
fn esp_passes_fsck_vfat() {
    let t = "rootfs::bootable::esp_passes_fsck_vfat";
    if crate::host::tools::find_in_path("fsck.vfat").is_none() {
        crate::testutil::skip(t, "`fsck.vfat` is not installed (dosfstools)");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let i = inputs(d.path(), Some("quiet"), true).unwrap();
    let ids = Ids::new("fsck", Some(1_700_000_000));
    let entry = entry_text(&i, &i.options(&ids.root)).unwrap();
    let img = esp::build(&i, &entry, &ids).unwrap();
    let p = d.path().join("esp.img");
    fs::write(&p, &img).unwrap();
    let o = std::process::Command::new("fsck.vfat")
        .arg("-n")
        .arg(&p)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && !out.contains("Moving") && !out.contains("Bad"),
        "fsck.vfat -n: {out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
