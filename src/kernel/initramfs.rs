//! The `distro` source's initramfs. Debian's and Ubuntu's `linux-image-*` kernels have the
//! virtio drivers as modules (facts §4), so booting one on a raw ext4 root needs an initramfs
//! that loads them, mounts the root disk and `switch_root`s to its `/init`. Its contents: the
//! host's static busybox, the modules in dependency order, and a generated `/init`. Written as
//! a reproducible cpio newc archive, gzip-compressed (Debian's kernels have RD_GZIP).

mod cpio;
mod modules;

use std::cmp::Ordering;
use std::path::{Path, PathBuf};

pub use cpio::{write_cpio_newc, Entry, EntryKind};
pub use modules::{load_order, read_module, Module};

/// Modules the guest needs: the virtio PCI transport, the root disk, the network, the root
/// filesystem. A kernel with one of them neither as a module nor built in cannot run a job.
pub const WANTED_MODULES: &[&str] = &["virtio_pci", "virtio_blk", "virtio_net", "ext4"];
/// Taken when the kernel has them (a console on virtio for later use).
pub const OPTIONAL_MODULES: &[&str] = &["virtio_console"];
/// Seconds `/init` waits for the root disk unless `chvkit.rootwait=N` says otherwise. Under
/// PVM every device probe is emulated and slow (facts §5), so this is generous.
pub const ROOT_WAIT_SECS: u32 = 30;
/// The busybox applets `/init` calls (symlinks in `/bin`).
const APPLETS: &[&str] = &[
    "sh",
    "mount",
    "umount",
    "insmod",
    "sleep",
    "mkdir",
    "switch_root",
    "poweroff",
    // root=PARTUUID= (a `rootfs --bootable` disk's boot entry): reading the GPT.
    "od",
    "tr",
];

/// An installed distribution kernel: `/boot/vmlinuz-<version>` with `/lib/modules/<version>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistroKernel {
    pub version: String,
    pub vmlinuz: PathBuf,
    pub modules_dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error("cannot read {path}: {source}")]
    ModulesDep {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "kernel {version} has no module {module}: it is neither in {dir}/modules.dep nor built in"
    )]
    ModuleMissing {
        module: String,
        version: String,
        dir: PathBuf,
    },
    #[error("kernel {version}: modules.dep has a dependency cycle through {module}")]
    ModuleCycle { module: String, version: String },
    #[error("module name {name:?} (from {path}) is not a plain module name")]
    BadModuleName { name: String, path: PathBuf },
    #[error("cannot read module {path}: {source}")]
    ModuleRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read busybox {path}: {source} (apt-get install busybox-static)")]
    BusyboxRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} is dynamically linked (it names an ELF interpreter) and the initramfs has no \
         libraries: install busybox-static, whose /bin/busybox is static"
    )]
    BusyboxDynamic { path: PathBuf },
    #[error("{path} is not an x86-64 ELF64 executable ({what}): install busybox-static")]
    BusyboxNotElf { path: PathBuf, what: String },
    #[error("cannot write the initramfs archive: {source}")]
    Archive {
        #[source]
        source: std::io::Error,
    },
}

/// Installed kernels under `root` (`/` on a real host; a test's tree otherwise): each
/// `boot/vmlinuz-<v>` whose `lib/modules/<v>` exists, newest version first.
pub fn find_distro_kernels(root: &Path) -> Vec<DistroKernel> {
    let Ok(rd) = std::fs::read_dir(root.join("boot")) else {
        return Vec::new();
    };
    let mut found: Vec<DistroKernel> = rd
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let version = name.strip_prefix("vmlinuz-")?.to_string();
            let modules_dir = root.join("lib/modules").join(&version);
            modules_dir.is_dir().then(|| DistroKernel {
                vmlinuz: e.path(),
                modules_dir,
                version,
            })
        })
        .collect();
    found.sort_by(|a, b| version_cmp(&b.version, &a.version));
    found
}

/// Compare versions the way `sort -V` roughly does: runs of digits as numbers, the rest as
/// text, so `6.1.0-10` is newer than `6.1.0-9`.
pub fn version_cmp(a: &str, b: &str) -> Ordering {
    fn chunks(s: &str) -> Vec<(bool, &str)> {
        let mut v = Vec::new();
        let mut rest = s;
        while let Some(c) = rest.chars().next() {
            let digit = c.is_ascii_digit();
            let end = rest
                .find(|x: char| x.is_ascii_digit() != digit)
                .unwrap_or(rest.len());
            v.push((digit, &rest[..end]));
            rest = &rest[end..];
        }
        v
    }
    for (x, y) in chunks(a).into_iter().zip(chunks(b)) {
        let o = match (x, y) {
            ((true, x), (true, y)) => {
                let (x, y) = (x.trim_start_matches('0'), y.trim_start_matches('0'));
                x.len().cmp(&y.len()).then_with(|| x.cmp(y))
            }
            ((_, x), (_, y)) => x.cmp(y),
        };
        if o != Ordering::Equal {
            return o;
        }
    }
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

/// The gzipped cpio initramfs for `k`: static `busybox`, the modules [`WANTED_MODULES`] need
/// (plus [`OPTIONAL_MODULES`] present), and `/init`. Every member's mtime is `epoch`, so the
/// same inputs give the same bytes.
pub fn build_initramfs(
    k: &DistroKernel,
    busybox: &Path,
    epoch: u64,
) -> Result<Vec<u8>, InitramfsError> {
    let mods = load_order(&k.modules_dir, &k.version, WANTED_MODULES, OPTIONAL_MODULES)?;
    let bb = read_static_busybox(busybox)?;
    let mut entries = vec![
        Entry::dir("bin", 0o755),
        Entry::dir("dev", 0o755),
        // The kernel opens /dev/console for init before anything is mounted.
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
    let mut names = Vec::new();
    for m in &mods {
        // The names go into a shell script: only what module names are made of.
        if m.name.is_empty()
            || !m
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(InitramfsError::BadModuleName {
                name: m.name.clone(),
                path: m.file.clone(),
            });
        }
        names.push(m.name.as_str());
    }
    entries.push(Entry::file(
        "init",
        0o755,
        init_script(&k.version, &names).into_bytes(),
    ));
    for m in &mods {
        let ko = read_module(&m.file)?;
        entries.push(Entry::file(
            &format!("lib/modules/{}.ko", m.name),
            0o644,
            ko,
        ));
    }
    // GzBuilder writes mtime 0 and no file name: the gzip header is reproducible too.
    let mut gz = flate2::GzBuilder::new().write(Vec::new(), flate2::Compression::default());
    let archive = |source| InitramfsError::Archive { source };
    write_cpio_newc(&entries, epoch, &mut gz).map_err(archive)?;
    let out = gz.finish().map_err(archive)?;
    tracing::debug!(
        version = %k.version,
        modules = %names.join(" "),
        bytes = out.len(),
        "built initramfs"
    );
    Ok(out)
}

/// busybox must be a static x86-64 ELF: the initramfs carries no shared libraries.
fn read_static_busybox(path: &Path) -> Result<Vec<u8>, InitramfsError> {
    let b = std::fs::read(path).map_err(|source| InitramfsError::BusyboxRead {
        path: path.to_path_buf(),
        source,
    })?;
    let not_elf = |what: &str| InitramfsError::BusyboxNotElf {
        path: path.to_path_buf(),
        what: what.to_string(),
    };
    if b.len() < 64 || !b.starts_with(b"\x7fELF") {
        return Err(not_elf("not an ELF file"));
    }
    if b[4] != 2 || b[5] != 1 || u16::from_le_bytes([b[0x12], b[0x13]]) != 62 {
        return Err(not_elf("not 64-bit little-endian x86-64"));
    }
    let u64_at =
        |o: usize| -> Option<u64> { Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?)) };
    let phoff = u64_at(0x20).and_then(|o| usize::try_from(o).ok());
    let phentsize = usize::from(u16::from_le_bytes([b[0x36], b[0x37]]));
    let phnum = usize::from(u16::from_le_bytes([b[0x38], b[0x39]]));
    let Some(phoff) = phoff.filter(|_| phentsize >= 56) else {
        return Err(not_elf("malformed program headers"));
    };
    for i in 0..phnum {
        let at = phoff + i * phentsize;
        let Some(ty) = b.get(at..at + 4) else {
            return Err(not_elf("program headers run past the end"));
        };
        // PT_INTERP: the file asks for a dynamic loader.
        if ty == 3u32.to_le_bytes() {
            return Err(InitramfsError::BusyboxDynamic {
                path: path.to_path_buf(),
            });
        }
    }
    Ok(b)
}

/// The initramfs `/init`. Every failure prints a `chvkit-initramfs:` line and powers off: a
/// reboot would loop forever under Cloud Hypervisor (facts §1), and PID 1 exiting panics.
fn init_script(version: &str, modules: &[&str]) -> String {
    INIT_TEMPLATE
        .replace("@VERSION@", version)
        .replace("@MODULES@", &modules.join(" "))
        .replace("@ROOT_WAIT@", &ROOT_WAIT_SECS.to_string())
}

const INIT_TEMPLATE: &str = r#"#!/bin/sh
# chvkit initramfs for kernel @VERSION@: load the virtio and ext4 modules, mount the root
# disk (root=/dev/X, or root=PARTUUID=<guid> as a `chvkit rootfs --bootable` entry says),
# switch_root to its init. Every failure powers off: a reboot loops under Cloud Hypervisor.
# Not exported: the job's init must not inherit this PATH.
PATH=/bin
fail() {
	echo "chvkit-initramfs: $*"
	poweroff -f
	# Power-off failed: try sysrq, then wait for the launcher's timeout. PID 1 never exits.
	echo o >/proc/sysrq-trigger
	while :; do sleep 3600; done
}
mount -t proc proc /proc || fail "cannot mount /proc"
mount -t sysfs sysfs /sys || fail "cannot mount /sys"
mount -t devtmpfs devtmpfs /dev || fail "cannot mount devtmpfs on /dev"
echo "chvkit-initramfs: boot (kernel @VERSION@)"
for m in @MODULES@; do
	insmod "/lib/modules/$m.ko" || fail "cannot load module $m (kernel @VERSION@)"
done
root=/dev/vda
init=
wait=@ROOT_WAIT@
read -r cmdline </proc/cmdline || cmdline=
for w in $cmdline; do
	case "$w" in
	root=/dev/* | root=PARTUUID=*) root=${w#root=} ;;
	init=/*) init=${w#init=} ;;
	chvkit.rootwait=*) wait=${w#chvkit.rootwait=} ;;
	esac
done
case "$wait" in '' | *[!0-9]*) wait=@ROOT_WAIT@ ;; esac
# The partition of a virtio disk whose GPT unique GUID is $1: one `od` of the entry array
# (LBA 2 of 512-byte sectors, 128 entries of 128 bytes; 16 bytes a line, the GUID on line 2 of
# each entry's 8, its first three fields little-endian).
partuuid() {
	want=$(echo "$1" | tr 'A-F' 'a-f')
	for d in /dev/vd[a-z]; do
		[ -b "$d" ] || continue
		od -A n -t x1 -v -j 1024 -N 16384 "$d" >/gpt.hex 2>/dev/null || continue
		line=0
		while read -r b1 b2 b3 b4 b5 b6 b7 b8 b9 b10 b11 b12 b13 b14 b15 b16; do
			if [ $((line % 8)) -eq 1 ] &&
				[ "$b4$b3$b2$b1-$b6$b5-$b8$b7-$b9$b10-$b11$b12$b13$b14$b15$b16" = "$want" ]; then
				echo "$d$((line / 8 + 1))"
				return 0
			fi
			line=$((line + 1))
		done </gpt.hex
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
	[ "$i" -ge $((wait * 10)) ] && fail "root disk $root did not appear within $wait s"
	sleep 0.1
	i=$((i + 1))
done
[ "$dev" = "$root" ] || echo "chvkit-initramfs: root $root is $dev"
mkdir -p /newroot
mount -t ext4 -o rw "$dev" /newroot || fail "cannot mount $dev (ext4) on /newroot"
if [ -z "$init" ]; then
	init=/init
	if [ ! -e /newroot/init ] && [ ! -L /newroot/init ]; then
		echo "chvkit-initramfs: $dev has no /init: starting /sbin/init"
		init=/sbin/init
	fi
fi
[ -e "/newroot$init" ] || [ -L "/newroot$init" ] || fail "$dev has no $init to start"
# The job's init finds /dev populated; /proc and /sys it mounts itself.
mount --move /dev /newroot/dev 2>/dev/null || umount /dev
umount /proc /sys
# Nothing after this runs: a failed exec ends the shell (the console shows why).
exec switch_root /newroot "$init" "$@"
"#;

#[cfg(test)]
mod tests;
