//! UEFI boots under QEMU TCG: Debian's OVMF as the firmware and a GPT disk (what `chvkit rootfs
//! --bootable` writes) as the only boot source, no `-kernel`. The firmware runs
//! `\EFI\BOOT\BOOTX64.EFI` (systemd-boot), which boots the disk's Boot Loader Specification
//! entry: the kernel and initramfs on the ESP, `root=PARTUUID=…`.
//!
//! The initramfs for that is the harness's (`chvkit::kernel::initramfs`, as `chvkit kernel
//! --source distro` builds it): its `/init` resolves `root=PARTUUID=` by reading the GPT entries
//! of each virtio disk with one `od` and picking the partition whose unique GUID matches.
//!
//! Use beside the harness: `#[path = "qemu/mod.rs"] mod qemu;` and
//! `#[path = "qemu/ovmf.rs"] mod ovmf;`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::qemu::{Kernel, QemuRun, BOOT_BANNER};

/// Debian's `ovmf` package: a combined code+vars image `-bios` takes.
pub fn ovmf() -> Option<PathBuf> {
    ["/usr/share/ovmf/OVMF.fd", "/usr/share/qemu/OVMF.fd"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// Why a UEFI boot cannot run here, if it cannot.
pub fn unavailable() -> Option<String> {
    if let Some(why) = crate::qemu::unavailable() {
        return Some(why);
    }
    if ovmf().is_none() {
        return Some("no /usr/share/ovmf/OVMF.fd (apt-get install ovmf)".into());
    }
    if !Path::new(chvkit::rootfs::bootable::HOST_SYSTEMD_BOOT).is_file() {
        return Some(format!(
            "no {} (apt-get install systemd-boot-efi)",
            chvkit::rootfs::bootable::HOST_SYSTEMD_BOOT
        ));
    }
    None
}

/// The initramfs a `--bootable` disk's entry boots with: the one `chvkit kernel --source
/// distro` builds (the harness's), whose `/init` resolves `root=PARTUUID=`.
pub fn partuuid_initramfs(k: &Kernel) -> Result<PathBuf, String> {
    crate::qemu::initramfs(k)
}

/// Boot `disk` (raw, virtio-blk) with OVMF and wait for QEMU to exit (or kill it at `timeout`).
/// The disk is opened with a snapshot, so the guest's writes do not change it.
pub fn run_uefi(disk: &Path, timeout: Duration) -> Result<QemuRun, String> {
    let fw = ovmf().ok_or("no OVMF")?;
    let logdir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let log = logdir.path().join("serial.log");
    let mut c = Command::new("qemu-system-x86_64");
    crate::qemu::tcg_args(&mut c, 512, &log)
        .arg("-bios")
        .arg(&fw)
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=none,id=d0,cache=unsafe,snapshot=on",
            disk.display()
        ))
        .args(["-device", "virtio-blk-pci,drive=d0,bootindex=0"]);
    crate::qemu::spawn_and_wait(c, &log, timeout)
}

/// Lines of the serial log that show how far the boot got (for failure messages).
pub fn milestones(serial: &str) -> Vec<&str> {
    serial
        .lines()
        .filter(|l| {
            l.contains(BOOT_BANNER)
                || l.contains("chvkit-initramfs")
                || l.contains("CHVKIT_EXIT")
                || l.contains("Linux version")
                || l.contains("EFI stub")
                || l.contains("BdsDxe")
        })
        .collect()
}
