//! UEFI boots under QEMU TCG: Debian's OVMF as the firmware and a GPT disk (what `chvkit rootfs
//! --bootable` writes) as the only boot source, no `-kernel`. The firmware runs
//! `\EFI\BOOT\BOOTX64.EFI` (systemd-boot), which boots the disk's Boot Loader Specification
//! entry: the kernel and initramfs on the ESP, `root=PARTUUID=…`.
//!
//! The initramfs for that (`partuuid_initramfs`) is the harness's one plus `root=PARTUUID=`:
//! busybox has no PARTUUID lookup, so its `/init` reads the GPT entries of each virtio disk
//! with `od` and picks the partition whose unique GUID matches.
//!
//! Use beside the harness: `#[path = "qemu/mod.rs"] mod qemu;` and
//! `#[path = "qemu/ovmf.rs"] mod ovmf;`.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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

const APPLETS: &[&str] = &[
    "sh",
    "mount",
    "umount",
    "insmod",
    "sleep",
    "mkdir",
    "switch_root",
    "poweroff",
    "od",
    "tr",
];

const INIT: &str = r#"#!/bin/sh
# Test initramfs: load the virtio and ext4 modules, find root= (a device or PARTUUID=), mount it,
# switch_root to init=. Every failure powers off.
PATH=/bin
fail() {
	echo "chvkit-initramfs: $*"
	poweroff -f
	echo o >/proc/sysrq-trigger
	while :; do sleep 3600; done
}
mount -t proc proc /proc || fail "cannot mount /proc"
mount -t sysfs sysfs /sys || fail "cannot mount /sys"
mount -t devtmpfs devtmpfs /dev || fail "cannot mount devtmpfs on /dev"
echo "chvkit-initramfs: boot (kernel @VERSION@)"
for m in @MODULES@; do
	insmod "/lib/modules/$m.ko" || fail "cannot load module $m"
done
root=/dev/vda
init=/init
read -r cmdline </proc/cmdline || cmdline=
for w in $cmdline; do
	case "$w" in
	root=*) root=${w#root=} ;;
	init=/*) init=${w#init=} ;;
	esac
done
# The partition of a virtio disk whose GPT entry (128 entries of 128 bytes at LBA 2) has the
# unique GUID $1; GPT stores the first three fields little-endian.
partuuid() {
	want=$(echo "$1" | tr 'A-F' 'a-f')
	for d in /dev/vd[a-z]; do
		[ -b "$d" ] || continue
		n=0
		while [ "$n" -lt 128 ]; do
			set -- $(od -A n -t x1 -v -j $((1024 + n * 128 + 16)) -N 16 "$d")
			[ $# -eq 16 ] || break
			g="$4$3$2$1-$6$5-$8$7-$9${10}-${11}${12}${13}${14}${15}${16}"
			if [ "$g" = "$want" ]; then
				echo "$d$((n + 1))"
				return 0
			fi
			n=$((n + 1))
		done
	done
	return 1
}
i=0
while :; do
	case "$root" in
	PARTUUID=*) dev=$(partuuid "${root#PARTUUID=}") ;;
	*) dev=$root ;;
	esac
	[ -n "$dev" ] && [ -b "$dev" ] && break
	[ "$i" -ge 600 ] && fail "root $root did not appear within 60 s"
	sleep 0.1
	i=$((i + 1))
done
echo "chvkit-initramfs: root $root is $dev"
mkdir -p /newroot
mount -t ext4 -o rw "$dev" /newroot || fail "cannot mount $dev (ext4) on /newroot"
[ -e "/newroot$init" ] || [ -L "/newroot$init" ] || fail "$dev has no $init to start"
mount --move /dev /newroot/dev 2>/dev/null || umount /dev
umount /proc /sys
exec switch_root /newroot "$init" "$@"
"#;

/// The harness's initramfs with `root=PARTUUID=` support, written once per kernel to the
/// temp dir (by the hash of its bytes).
pub fn partuuid_initramfs(k: &Kernel) -> Result<PathBuf, String> {
    use chvkit::kernel::initramfs::{
        load_order, read_module, write_cpio_newc, Entry, OPTIONAL_MODULES, WANTED_MODULES,
    };
    use sha2::{Digest, Sha256};
    let dir = Path::new("/lib/modules").join(&k.version);
    let mods = load_order(&dir, &k.version, WANTED_MODULES, OPTIONAL_MODULES)
        .map_err(|e| e.to_string())?;
    let bb = fs::read("/bin/busybox").map_err(|e| format!("/bin/busybox: {e}"))?;
    let mut entries = vec![
        Entry::dir("bin", 0o755),
        Entry::dir("dev", 0o755),
        Entry::char_dev("dev/console", 0o600, 5, 1),
        Entry::dir("lib", 0o755),
        Entry::dir("lib/modules", 0o755),
        Entry::dir("newroot", 0o755),
        Entry::dir("proc", 0o755),
        Entry::dir("sys", 0o755),
        Entry::file("bin/busybox", 0o755, bb),
    ];
    entries.extend(
        APPLETS
            .iter()
            .map(|a| Entry::symlink(&format!("bin/{a}"), "busybox")),
    );
    let names: Vec<&str> = mods.iter().map(|m| m.name.as_str()).collect();
    let init = INIT
        .replace("@VERSION@", &k.version)
        .replace("@MODULES@", &names.join(" "));
    entries.push(Entry::file("init", 0o755, init.into_bytes()));
    for m in &mods {
        let ko = read_module(&m.file).map_err(|e| e.to_string())?;
        entries.push(Entry::file(
            &format!("lib/modules/{}.ko", m.name),
            0o644,
            ko,
        ));
    }
    let mut gz = flate2::GzBuilder::new().write(Vec::new(), flate2::Compression::default());
    write_cpio_newc(&entries, 0, &mut gz).map_err(|e| e.to_string())?;
    let bytes = gz.finish().map_err(|e| e.to_string())?;
    let tag = &hex::encode(Sha256::digest(&bytes))[..16];
    let out = std::env::temp_dir()
        .join("chvkit-test-initramfs")
        .join(format!("{}-partuuid-{tag}.cpio.gz", k.version));
    if !out.is_file() {
        chvkit::fsutil::write_atomic(&out, &bytes, 0o644)
            .map_err(|e| format!("{}: {e}", out.display()))?;
    }
    Ok(out)
}

/// Boot `disk` (raw, virtio-blk) with OVMF and wait for QEMU to exit (or kill it at `timeout`).
/// The disk is opened with a snapshot, so the guest's writes do not change it.
pub fn run_uefi(disk: &Path, timeout: Duration) -> Result<QemuRun, String> {
    let fw = ovmf().ok_or("no OVMF")?;
    let logdir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let log = logdir.path().join("serial.log");
    let mut c = Command::new("qemu-system-x86_64");
    c.args([
        "-machine",
        "q35,accel=tcg",
        "-nodefaults",
        "-no-user-config",
    ])
    .args([
        "-display", "none", "-monitor", "none", "-smp", "1", "-m", "512",
    ])
    .arg("-bios")
    .arg(&fw)
    .arg("-serial")
    .arg(format!("file:{}", log.display()))
    .arg("-drive")
    .arg(format!(
        "file={},format=raw,if=none,id=d0,cache=unsafe,snapshot=on",
        disk.display()
    ))
    .args(["-device", "virtio-blk-pci,drive=d0,bootindex=0"])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = c.spawn().map_err(|e| format!("qemu: {e}"))?;
    let mut timed_out = false;
    let status = loop {
        if let Some(s) = child.try_wait().map_err(|e| e.to_string())? {
            break Some(s);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            timed_out = true;
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let elapsed = start.elapsed();
    let mut serial = String::from_utf8_lossy(&fs::read(&log).unwrap_or_default()).into_owned();
    if let Some(s) = &status {
        if !s.success() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            serial.push_str(&format!("\n[qemu exited {s}: {err}]\n"));
        }
    }
    Ok(QemuRun {
        serial,
        status,
        elapsed,
        timed_out,
    })
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
