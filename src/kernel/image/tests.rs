//! Synthetic bzImages around a tiny fake vmlinux, one per codec.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;

use super::decompress::tests::lz4_legacy_frame;
use super::*;
use crate::testutil::{elf_note, elf_with_notes, pvh_note};

const RELEASE: &str = "6.9.1-test";

/// An ELF64 x86-64 header, one PT_NOTE program header, the notes, then a banner and filler.
fn fake_vmlinux(pvh: bool) -> Vec<u8> {
    let note = if pvh {
        pvh_note()
    } else {
        elf_note(b"Xen\0", 5, &0x100_0000u32.to_le_bytes())
    };
    let mut f = elf_with_notes(&note);
    f.extend(b"Linux version %s\0");
    f.extend(format!("Linux version {RELEASE} (me@here) #1 SMP\n\0").as_bytes());
    // Enough filler for more than one lz4 test block.
    f.extend((0..40_000u32).map(|i| (i % 253) as u8 ^ (i >> 9) as u8));
    f
}

fn compress(c: Compression, data: &[u8]) -> Vec<u8> {
    let mut p = match c {
        Compression::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(data).unwrap();
            // gzip's trailer already ends with the size: the kernel appends nothing.
            return e.finish().unwrap();
        }
        Compression::Xz => {
            let mut e = liblzma::write::XzEncoder::new(Vec::new(), 6);
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        Compression::Lzma => {
            let opts = liblzma::stream::LzmaOptions::new_preset(6).unwrap();
            let s = liblzma::stream::Stream::new_lzma_encoder(&opts).unwrap();
            let mut e = liblzma::write::XzEncoder::new_stream(Vec::new(), s);
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        Compression::Zstd => zstd::encode_all(data, 19).unwrap(),
        Compression::Lz4 => lz4_legacy_frame(data, 16 * 1024),
        Compression::None => return data.to_vec(),
    };
    // The kernel's `size_append`.
    p.extend((data.len() as u32).to_le_bytes());
    p
}

/// setup_sects = 2 (protected mode at 0x600), protocol 2.15, payload 0x40 into it.
fn bzimage(payload: &[u8], protocol: u16) -> Vec<u8> {
    let mut b = vec![0u8; 0x600 + 0x40];
    b[0x1f1] = 2;
    b[0x202..0x206].copy_from_slice(b"HdrS");
    b[0x206..0x208].copy_from_slice(&protocol.to_le_bytes());
    b[0x20e..0x210].copy_from_slice(&0x180u16.to_le_bytes());
    b[0x380..0x380 + 24].copy_from_slice(b"6.9.1-test (me@here) #1\0");
    b[0x248..0x24c].copy_from_slice(&0x40u32.to_le_bytes());
    b[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    b.extend(payload);
    b
}

fn file(d: &tempfile::TempDir, name: &str, bytes: &[u8]) -> PathBuf {
    let p = d.path().join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn every_codec_round_trips() {
    let d = tempfile::tempdir().unwrap();
    let elf = fake_vmlinux(true);
    for c in [
        Compression::Gzip,
        Compression::Xz,
        Compression::Lzma,
        Compression::Zstd,
        Compression::Lz4,
        Compression::None,
    ] {
        let p = file(&d, "bz", &bzimage(&compress(c, &elf), 0x020f));
        let v = load_vmlinux(&p).unwrap_or_else(|e| panic!("{c}: {e}"));
        assert_eq!(v.from_bzimage, Some(c));
        assert!(v.bytes == elf, "{c}: unpacked bytes differ");
        assert_eq!(v.version.as_deref(), Some("6.9.1-test (me@here) #1"));
        assert_eq!(linux_version(&v.bytes).as_deref(), Some(RELEASE));
    }
}

#[test]
fn vmlinux_taken_as_is_and_installed() {
    let d = tempfile::tempdir().unwrap();
    let elf = fake_vmlinux(true);
    let v = load_vmlinux(&file(&d, "vmlinux", &elf)).unwrap();
    assert_eq!(v.from_bzimage, None);
    assert!(v.bytes == elf);
    let dest = d.path().join("out/vmlinux");
    let sha = install_vmlinux(&v, &dest).unwrap();
    assert_eq!(sha, hex::encode(Sha256::digest(&elf)));
    assert!(std::fs::read(&dest).unwrap() == elf);
    let mode = std::fs::metadata(&dest).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o644);
    assert_eq!(std::fs::read_dir(d.path().join("out")).unwrap().count(), 1);
}

#[test]
fn elf_without_pvh_refused() {
    let d = tempfile::tempdir().unwrap();
    let elf = fake_vmlinux(false);
    for p in [
        file(&d, "plain", &elf),
        file(
            &d,
            "bz",
            &bzimage(&compress(Compression::Gzip, &elf), 0x020f),
        ),
    ] {
        let e = load_vmlinux(&p).unwrap_err();
        assert!(matches!(e, ImageError::NoPvh { .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.contains("has no PVH entry note: Cloud Hypervisor cannot boot it directly"));
        assert!(msg.contains(&p.display().to_string()), "{msg}");
    }
}

#[test]
fn truncated_refused_and_nothing_written() {
    let d = tempfile::tempdir().unwrap();
    let b = bzimage(&compress(Compression::Lz4, &fake_vmlinux(true)), 0x020f);
    let p = file(&d, "bz", &b[..b.len() - 100]);
    let e = load_vmlinux(&p).unwrap_err();
    assert!(matches!(e, ImageError::Truncated { .. }), "{e}");
    assert!(e.to_string().contains("truncated"), "{e}");
    // A damaged size word is caught after unpacking.
    let mut bad = bzimage(&compress(Compression::Zstd, &fake_vmlinux(true)), 0x020f);
    let n = bad.len();
    bad[n - 1] ^= 0x40;
    let e = load_vmlinux(&file(&d, "bad", &bad)).unwrap_err();
    assert!(matches!(e, ImageError::SizeMismatch { .. }), "{e}");
    assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 2);
}

#[test]
fn wrong_magic_named() {
    let d = tempfile::tempdir().unwrap();
    let e = load_vmlinux(&file(
        &d,
        "junk",
        &bzimage(b"\xde\xad\xbe\xef\x01\x02\x03", 0x020f),
    ))
    .unwrap_err();
    assert!(e.to_string().contains("de ad be ef 01 02"), "{e}");
    for (magic, name) in [(&b"BZh91AY&SY"[..], "bzip2"), (b"\x89LZO\0\r\n", "lzo")] {
        let e = load_vmlinux(&file(&d, name, &bzimage(magic, 0x020f))).unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("{name} is an unsupported compression")),
            "{e}"
        );
    }
}

#[test]
fn old_protocol_and_not_a_kernel() {
    let d = tempfile::tempdir().unwrap();
    let b = bzimage(&compress(Compression::Gzip, &fake_vmlinux(true)), 0x0206);
    let e = load_vmlinux(&file(&d, "old", &b)).unwrap_err();
    assert!(
        e.to_string().contains("boot protocol 2.06 is too old"),
        "{e}"
    );
    let e = load_vmlinux(&file(&d, "initrd", &compress(Compression::Zstd, b"070701"))).unwrap_err();
    assert!(e.to_string().contains("zstd-compressed data"), "{e}");
    let e = load_vmlinux(&file(&d, "empty", b"")).unwrap_err();
    assert!(e.to_string().contains("empty"), "{e}");
    let e = load_vmlinux(&d.path().join("missing")).unwrap_err();
    assert!(matches!(e, ImageError::Read { .. }), "{e}");
}

#[test]
fn version_banner() {
    assert_eq!(
        linux_version(b"xx Linux version 6.1.0-57-cloud-amd64 (d@l) #1").as_deref(),
        Some("6.1.0-57-cloud-amd64")
    );
    assert_eq!(linux_version(b"Linux version %s\0Linux version "), None);
    assert_eq!(linux_version(b""), None);
}
