//! `chvkit kernel`'s image and initramfs code against this machine's real files: Debian's
//! cloud kernel (an LZ4 bzImage whose virtio drivers are modules), its `/lib/modules`, the
//! host's static busybox, and (where QEMU is installed) a real boot through the initramfs's
//! switch_root into a tiny ext4 root.

mod common;
#[path = "qemu/mod.rs"]
mod qemu;

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use chvkit::host::files::{sha256_file, sniff_kernel, KernelImage};
use chvkit::kernel::image::{install_vmlinux, linux_version, load_vmlinux, Compression};
use chvkit::kernel::initramfs::{build_initramfs, find_distro_kernels, DistroKernel};

const BUSYBOX: &str = "/bin/busybox";
const MARKER: &str = "CHVKIT_SWITCH_ROOT_OK";

/// The newest Debian cloud kernel installed here, or the skip reason.
fn cloud_kernel(test: &str) -> Option<DistroKernel> {
    let k = find_distro_kernels(Path::new("/"))
        .into_iter()
        .find(|k| k.version.ends_with("-cloud-amd64"));
    if k.is_none() {
        common::skip(
            test,
            "no /boot/vmlinuz-*-cloud-amd64 with /lib/modules (apt-get install linux-image-cloud-amd64)",
        );
    }
    k
}

fn have_busybox(test: &str) -> bool {
    if !Path::new(BUSYBOX).is_file() {
        common::skip(test, "no /bin/busybox (apt-get install busybox-static)");
        return false;
    }
    true
}

#[test]
fn debian_cloud_kernel_unpacks_to_pvh_elf() {
    let test = "debian_cloud_kernel_unpacks_to_pvh_elf";
    let Some(k) = cloud_kernel(test) else { return };
    let t = Instant::now();
    let v = load_vmlinux(&k.vmlinuz).unwrap_or_else(|e| panic!("{e}"));
    let took = t.elapsed();
    // Seen by `cargo test -- --nocapture`; the number goes into the report.
    eprintln!(
        "{test}: {} ({:?}, {} bytes) unpacked to {} bytes in {took:?}",
        k.vmlinuz.display(),
        v.from_bzimage,
        fs::metadata(&k.vmlinuz).map(|m| m.len()).unwrap_or(0),
        v.bytes.len()
    );
    assert_eq!(
        v.from_bzimage,
        Some(Compression::Lz4),
        "facts §5: LZ4 payload"
    );
    assert!(v
        .version
        .as_deref()
        .is_some_and(|s| s.starts_with(&k.version)));
    assert_eq!(linux_version(&v.bytes).as_deref(), Some(k.version.as_str()));
    let d = tempfile::tempdir().unwrap();
    let dest = d.path().join("vmlinux");
    let sha = install_vmlinux(&v, &dest).unwrap();
    assert_eq!(sha, sha256_file(&dest).unwrap());
    assert_eq!(sniff_kernel(&dest).unwrap(), KernelImage::ElfPvh);
    // The unpacked file is accepted as it is, too.
    let again = load_vmlinux(&dest).unwrap();
    assert_eq!(again.from_bzimage, None);
    assert!(again.bytes == v.bytes);
}

/// `gunzip | cpio -it` of the archive, and its `/init`.
fn list_initramfs(gz: &[u8], dir: &Path) -> (Vec<String>, String) {
    let f = dir.join("initrd.img");
    fs::write(&f, gz).unwrap();
    let sh = |script: &str| {
        let o = Command::new("sh")
            .args(["-c", script, "sh"])
            .arg(&f)
            .output()
            .unwrap();
        assert!(o.status.success(), "{script}: {}", common::text(&o));
        String::from_utf8(o.stdout).unwrap()
    };
    let list = sh("gunzip -c \"$1\" | cpio -it --quiet");
    let init = sh("gunzip -c \"$1\" | cpio -i --quiet --to-stdout init");
    (list.lines().map(str::to_string).collect(), init)
}

#[test]
fn distro_initramfs_has_init_busybox_and_modules_in_load_order() {
    let test = "distro_initramfs_has_init_busybox_and_modules_in_load_order";
    let Some(k) = cloud_kernel(test) else { return };
    if !have_busybox(test) || !common::require(test, false, &["cpio", "gunzip"]) {
        return;
    }
    let gz = build_initramfs(&k, Path::new(BUSYBOX), 0).unwrap_or_else(|e| panic!("{e}"));
    let d = tempfile::tempdir().unwrap();
    let (list, init) = list_initramfs(&gz, d.path());
    for want in [
        "init",
        "bin/busybox",
        "bin/sh",
        "bin/switch_root",
        "dev/console",
    ] {
        assert!(list.iter().any(|l| l == want), "{want} not in {list:?}");
    }
    let kos: Vec<&str> = list
        .iter()
        .filter_map(|l| l.strip_prefix("lib/modules/")?.strip_suffix(".ko"))
        .collect();
    eprintln!("{test}: {} bytes, modules: {}", gz.len(), kos.join(" "));
    let loop_line = format!("for m in {}; do", kos.join(" "));
    assert!(
        init.contains(&loop_line),
        "/init loads another order:\n{init}"
    );
    // facts §4: this set (ext4 is built into Debian's cloud kernel).
    for m in [
        "virtio_ring",
        "virtio",
        "virtio_pci_modern_dev",
        "virtio_pci_legacy_dev",
        "virtio_pci",
        "virtio_blk",
        "failover",
        "net_failover",
        "virtio_net",
    ] {
        assert!(kos.contains(&m), "{m} missing from {kos:?}");
    }
    // Each module comes after everything `modinfo` says it depends on.
    if common::have_tool("modinfo") {
        for (i, m) in kos.iter().enumerate() {
            let o = Command::new("modinfo")
                .args(["-k", &k.version, "-F", "depends", m])
                .output()
                .unwrap();
            for dep in String::from_utf8_lossy(&o.stdout).trim().split(',') {
                if dep.is_empty() {
                    continue;
                }
                let at = kos.iter().position(|x| x == &dep);
                assert!(at.is_some_and(|a| a < i), "{m} needs {dep} first: {kos:?}");
            }
        }
    }
    assert!(
        build_initramfs(&k, Path::new(BUSYBOX), 0).unwrap() == gz,
        "reproducible"
    );
}

/// A raw ext4 image whose `/init` prints [`MARKER`] and powers off.
fn marker_rootfs(dir: &Path) -> PathBuf {
    let tree = dir.join("tree");
    for sub in ["bin", "dev", "proc", "sys"] {
        fs::create_dir_all(tree.join(sub)).unwrap();
    }
    fs::copy(BUSYBOX, tree.join("bin/busybox")).unwrap();
    let init = tree.join("init");
    let mut f = fs::File::create(&init).unwrap();
    writeln!(
        f,
        "#!/bin/busybox sh\n/bin/busybox echo \"{MARKER} pid=$$ dev=$(/bin/busybox ls /dev/vda)\"\n\
         /bin/busybox sync\n/bin/busybox poweroff -f"
    )
    .unwrap();
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755)).unwrap();
    let img = dir.join("root.ext4");
    let o = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&tree)
        .arg(&img)
        .arg("16M")
        .output()
        .unwrap();
    assert!(o.status.success(), "mkfs.ext4: {}", common::text(&o));
    img
}

/// Boot `kernel` + `initrd` (and `disk` as /dev/vda) under QEMU TCG with `append` added to
/// the command line; the serial log, and whether QEMU ended by itself (killed after 180 s).
fn qemu_boot(
    kernel: &Path,
    initrd: &Path,
    disk: Option<&Path>,
    append: &str,
    dir: &Path,
) -> (String, bool) {
    let log = dir.join("serial.log");
    let mut c = Command::new("qemu-system-x86_64");
    qemu::tcg_args(&mut c, 512, &log)
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!("console=ttyS0 root=/dev/vda rw quiet {append}"));
    if let Some(disk) = disk {
        c.arg("-drive")
            .arg(format!(
                "file={},format=raw,if=none,id=d0,cache=unsafe",
                disk.display()
            ))
            .args(["-device", "virtio-blk-pci,drive=d0"]);
    }
    let r =
        qemu::spawn_and_wait(c, &log, Duration::from_secs(180)).expect("start qemu-system-x86_64");
    let ended = r.powered_off();
    (r.serial, ended)
}

/// The cloud kernel unpacked to `dir/vmlinux` and its initramfs to `dir/initrd.img`, or the
/// skip reason.
fn qemu_inputs(test: &str, dir: &Path) -> Option<(PathBuf, PathBuf)> {
    let k = cloud_kernel(test)?;
    if !have_busybox(test) || !common::require(test, false, &["qemu-system-x86_64", "mkfs.ext4"]) {
        return None;
    }
    let initrd = dir.join("initrd.img");
    fs::write(&initrd, build_initramfs(&k, Path::new(BUSYBOX), 0).unwrap()).unwrap();
    // The unpacked vmlinux, booted through its PVH entry (QEMU supports it as Cloud
    // Hypervisor does): proves the ELF chvkit writes boots, not only the bzImage.
    let vmlinux = dir.join("vmlinux");
    install_vmlinux(&load_vmlinux(&k.vmlinuz).unwrap(), &vmlinux).unwrap();
    Some((vmlinux, initrd))
}

#[test]
fn qemu_switch_root_through_distro_initramfs() {
    let test = "qemu_switch_root_through_distro_initramfs";
    let d = tempfile::tempdir().unwrap();
    let Some((vmlinux, initrd)) = qemu_inputs(test, d.path()) else {
        return;
    };
    let disk = marker_rootfs(d.path());
    let t = Instant::now();
    let (serial, ended) = qemu_boot(&vmlinux, &initrd, Some(&disk), "", d.path());
    eprintln!("{test}: {:?}\n{serial}", t.elapsed());
    assert!(ended, "QEMU did not power off by itself:\n{serial}");
    assert_eq!(
        serial.matches("chvkit-initramfs: boot").count(),
        1,
        "booted more than once, or not at all:\n{serial}"
    );
    assert!(
        serial.contains(&format!("{MARKER} pid=1 dev=/dev/vda")),
        "the root's /init did not run as PID 1:\n{serial}"
    );
    assert!(!serial.contains("chvkit-initramfs: cannot"), "{serial}");
}

#[test]
fn qemu_missing_root_disk_powers_off_with_a_message() {
    let test = "qemu_missing_root_disk_powers_off_with_a_message";
    let d = tempfile::tempdir().unwrap();
    let Some((vmlinux, initrd)) = qemu_inputs(test, d.path()) else {
        return;
    };
    let (serial, ended) = qemu_boot(&vmlinux, &initrd, None, "chvkit.rootwait=2", d.path());
    eprintln!("{test}:\n{serial}");
    assert!(ended, "QEMU did not power off by itself:\n{serial}");
    assert_eq!(
        serial.matches("chvkit-initramfs: boot").count(),
        1,
        "{serial}"
    );
    assert!(
        serial.contains("chvkit-initramfs: root disk /dev/vda did not appear within 2 s"),
        "{serial}"
    );
}
