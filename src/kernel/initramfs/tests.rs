//! build_initramfs over a fake `/boot` + `/lib/modules` tree and a fake busybox.

use std::io::{Read, Write};

use super::cpio::tests::read_newc;
use super::*;

/// The smallest ELF64 x86-64 header with one program header of type `ptype`.
fn fake_elf(ptype: u32) -> Vec<u8> {
    let mut f = vec![0u8; 64 + 56];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 2;
    f[5] = 1;
    f[0x12] = 62;
    f[0x20] = 64;
    f[0x36] = 56;
    f[0x38] = 1;
    f[64..68].copy_from_slice(&ptype.to_le_bytes());
    f
}

/// A root with two kernels that have modules and one that has none.
fn fake_root(root: &Path) {
    std::fs::create_dir_all(root.join("boot")).unwrap();
    for v in [
        "6.1.0-9-cloud-amd64",
        "6.1.0-10-cloud-amd64",
        "5.10.0-1-amd64",
    ] {
        std::fs::write(root.join(format!("boot/vmlinuz-{v}")), b"bz").unwrap();
    }
    std::fs::write(root.join("boot/config-6.1.0-10-cloud-amd64"), b"").unwrap();
    for v in ["6.1.0-9-cloud-amd64", "6.1.0-10-cloud-amd64"] {
        let m = root.join("lib/modules").join(v);
        std::fs::create_dir_all(m.join("kernel/drivers/virtio")).unwrap();
        std::fs::write(
            m.join("modules.dep"),
            "kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko\n\
             kernel/drivers/virtio/virtio_ring.ko:\n\
             kernel/drivers/virtio/virtio_pci_modern_dev.ko:\n\
             kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko \
             kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n\
             kernel/drivers/virtio/virtio_blk.ko.zst: kernel/drivers/virtio/virtio.ko \
             kernel/drivers/virtio/virtio_ring.ko\n\
             kernel/drivers/virtio/virtio_net.ko: kernel/drivers/virtio/failover.ko \
             kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n\
             kernel/drivers/virtio/failover.ko:\n",
        )
        .unwrap();
        std::fs::write(m.join("modules.builtin"), "kernel/fs/ext4/ext4.ko\n").unwrap();
        for k in [
            "virtio",
            "virtio_ring",
            "virtio_pci_modern_dev",
            "virtio_pci",
            "virtio_net",
            "failover",
        ] {
            std::fs::write(m.join(format!("kernel/drivers/virtio/{k}.ko")), k).unwrap();
        }
        let zst = zstd::encode_all(&b"virtio_blk"[..], 3).unwrap();
        std::fs::write(m.join("kernel/drivers/virtio/virtio_blk.ko.zst"), zst).unwrap();
    }
}

fn gunzip(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(b)
        .read_to_end(&mut out)
        .unwrap();
    out
}

#[test]
fn finds_kernels_newest_first() {
    let d = tempfile::tempdir().unwrap();
    fake_root(d.path());
    let k = find_distro_kernels(d.path());
    let v: Vec<&str> = k.iter().map(|k| k.version.as_str()).collect();
    assert_eq!(v, ["6.1.0-10-cloud-amd64", "6.1.0-9-cloud-amd64"]);
    assert_eq!(
        k[0].vmlinuz,
        d.path().join("boot/vmlinuz-6.1.0-10-cloud-amd64")
    );
    assert_eq!(
        k[0].modules_dir,
        d.path().join("lib/modules/6.1.0-10-cloud-amd64")
    );
    assert!(find_distro_kernels(&d.path().join("nowhere")).is_empty());
    assert_eq!(version_cmp("6.12.1", "6.2.9"), Ordering::Greater);
    assert_eq!(
        version_cmp("6.1.0-57-cloud-amd64", "6.1.0-9-cloud-amd64"),
        Ordering::Greater
    );
    assert_eq!(version_cmp("6.1", "6.1.0"), Ordering::Less);
}

#[test]
fn archive_contents_and_order() {
    let d = tempfile::tempdir().unwrap();
    fake_root(d.path());
    let bb = d.path().join("busybox");
    std::fs::write(&bb, fake_elf(1)).unwrap();
    let k = &find_distro_kernels(d.path())[0];
    let gz = build_initramfs(k, &bb, 1_700_000_000).unwrap();
    let members = read_newc(&gunzip(&gz));
    let names: Vec<&str> = members.iter().map(|m| m.0.as_str()).collect();
    for want in [
        "init",
        "bin/busybox",
        "bin/sh",
        "bin/switch_root",
        "dev/console",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    let kos: Vec<&str> = names
        .iter()
        .filter_map(|n| n.strip_prefix("lib/modules/")?.strip_suffix(".ko"))
        .collect();
    // Dependencies first; ext4 is built in; virtio_console is optional and absent.
    assert_eq!(
        kos,
        [
            "virtio_ring",
            "virtio",
            "virtio_pci_modern_dev",
            "virtio_pci",
            "virtio_blk",
            "failover",
            "virtio_net"
        ]
    );
    let get = |n: &str| &members.iter().find(|m| m.0 == n).unwrap().2;
    assert_eq!(get("lib/modules/virtio_blk.ko").as_slice(), b"virtio_blk");
    let init = String::from_utf8(get("init").clone()).unwrap();
    assert!(
        init.contains(&format!("for m in {}; do", kos.join(" "))),
        "{init}"
    );
    assert!(init.contains("poweroff -f"));
    assert!(!init.lines().any(|l| l.trim_start().starts_with("reboot")));
    assert!(init.contains("6.1.0-10-cloud-amd64"));
    // Same inputs, same bytes; the epoch is in them.
    assert!(build_initramfs(k, &bb, 1_700_000_000).unwrap() == gz);
    assert!(build_initramfs(k, &bb, 0).unwrap() != gz);
}

#[test]
fn init_script_parses() {
    let script = init_script("9.9", &["virtio", "virtio_blk"]);
    for sh in [&["sh", "-n"][..], &["busybox", "sh", "-n"]] {
        let Ok(mut c) = std::process::Command::new(sh[0])
            .args(&sh[1..])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
        else {
            crate::testutil::skip("init_script_parses", &format!("{} not installed", sh[0]));
            continue;
        };
        c.stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{sh:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn busybox_and_modules_refused_by_name() {
    let d = tempfile::tempdir().unwrap();
    fake_root(d.path());
    let k = &find_distro_kernels(d.path())[0];
    let dynamic = d.path().join("busybox-dyn");
    std::fs::write(&dynamic, fake_elf(3)).unwrap();
    let e = build_initramfs(k, &dynamic, 0).unwrap_err();
    assert!(matches!(e, InitramfsError::BusyboxDynamic { .. }), "{e}");
    assert!(e.to_string().contains("busybox-static"), "{e}");
    let script = d.path().join("busybox-sh");
    std::fs::write(&script, "#!/bin/sh\n").unwrap();
    let e = build_initramfs(k, &script, 0).unwrap_err();
    assert!(e.to_string().contains("not an ELF"), "{e}");
    let e = build_initramfs(k, &d.path().join("none"), 0).unwrap_err();
    assert!(e.to_string().contains("busybox-static"), "{e}");
    // A kernel without virtio_net at all.
    let dep = k.modules_dir.join("modules.dep");
    let text = std::fs::read_to_string(&dep).unwrap();
    let text: String = text
        .lines()
        .filter(|l| !l.contains("virtio_net.ko:"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&dep, text).unwrap();
    let bb = d.path().join("busybox");
    std::fs::write(&bb, fake_elf(1)).unwrap();
    let e = build_initramfs(k, &bb, 0).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("virtio_net") && msg.contains("6.1.0-10-cloud-amd64"),
        "{msg}"
    );
}
