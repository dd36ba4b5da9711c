//! `chv.*`, `firmware.*`, `kernel.file`, `kernel.guest` and `tools.rootfs`.
//!
//! The two kernel checks split the work: `kernel.file` judges the file *named* by
//! `CHV_KERNEL_PATH` or the profile's `kernel.path` (is it there, is it a bzImage or a PVH ELF);
//! `kernel.guest` judges the kernel launch boots when no `--kernel` is given (`CHV_KERNEL_PATH`,
//! else the one `chvkit kernel` installed, else `kernel.path`): intact, bootable, its drivers,
//! whether it runs on this host kind (PVM), and the command line launch gives it. When that
//! kernel is the named file and kernel.file already FAILs it, kernel.guest SKIPs with the same
//! fix instead of repeating the finding.

use std::path::Path;

use super::facts::{
    Artifact, ConfigValue, Facts, Guest, GuestChoice, GuestKernel, GuestOrigin, ROOTFS_TOOLS,
};
use super::report::{Finding, Level};
use crate::host::files::{FileFacts, KernelImage};
use crate::kernel::cmdline;
use crate::lockfile;
use crate::profile::{KernelSource, Version};
use crate::Context;

const ADVISORY: &str = "GHSA-jmr4-g2hv-mjj6";

fn download(path: &Path, url: &str, mode: &str) -> String {
    format!(
        "curl -fL --create-dirs -o {0} {url} && chmod {mode} {0}",
        path.display()
    )
}

fn chv_get(ctx: &Context, f: &Facts) -> String {
    let ch = &ctx.profile.cloud_hypervisor;
    let path = f
        .chv
        .as_ref()
        .map(|a| a.path.clone())
        .unwrap_or_else(|| ctx.root.path(ch.install_path.as_path()));
    download(&path, &ch.url.0, "0755")
}

fn is_advisory_version(v: &Version) -> bool {
    v.major == 50 && v.minor == 0
}

fn advisory_text() -> String {
    format!(
        "Cloud Hypervisor v50.0 carries advisory {ADVISORY} (disk image handling), fixed in \
         v50.1; profiles/v50.2.yaml pins v50.2."
    )
}

pub fn chv_binary(ctx: &Context, f: &Facts) -> Finding {
    const ID: &str = "chv.binary";
    let Some(a) = &f.chv else {
        return Finding::skip(ID, "not checked", "", "chvkit doctor --only chv");
    };
    let ch = &ctx.profile.cloud_hypervisor;
    let get = download(&a.path, &ch.url.0, "0755");
    let setup = "`chvkit setup` installs it and verifies its checksum.";
    if !a.file.exists {
        let adv = if is_advisory_version(&ch.version) {
            format!(" Note: {}", advisory_text())
        } else {
            String::new()
        };
        return Finding::fail(
            ID,
            format!("{} not found", a.path.display()),
            format!(
                "Cloud Hypervisor {} is expected at {} (profile cloud_hypervisor.install_path). \
                 {setup}{adv}",
                ch.version,
                a.path.display()
            ),
            get,
        );
    }
    if !a.file.is_file {
        return Finding::fail(
            ID,
            format!("{} is not a regular file", a.path.display()),
            setup,
            format!("rm -rf {} && {get}", a.path.display()),
        );
    }
    if !a.file.executable() {
        return Finding::fail(
            ID,
            format!("{} is not executable", a.path.display()),
            format!("mode {:04o}", a.file.mode.unwrap_or(0)),
            format!("chmod 0755 {}", a.path.display()),
        );
    }
    let on_path = crate::host::tools::find_in_path("cloud-hypervisor");
    let path_note = match on_path {
        Some(p) if p == a.path => "It is the `cloud-hypervisor` found on PATH.".to_string(),
        Some(p) => format!(
            "Note: `cloud-hypervisor` on PATH is {}; chvkit uses {}.",
            p.display(),
            a.path.display()
        ),
        None => "Not on PATH (chvkit runs it by its full path).".to_string(),
    };
    Finding::pass(
        ID,
        format!(
            "{} ({:.1} MiB)",
            a.path.display(),
            a.file.size.unwrap_or(0) as f64 / 1048576.0
        ),
        path_note,
    )
}

pub fn chv_version(ctx: &Context, f: &Facts) -> Finding {
    const ID: &str = "chv.version";
    let ch = &ctx.profile.cloud_hypervisor;
    let Some(a) = f.chv.as_ref().filter(|a| a.file.executable()) else {
        return Finding::skip(
            ID,
            "no executable binary to ask",
            "Depends on chv.binary (its fix installs the binary).",
            chv_get(ctx, f),
        );
    };
    let get = download(&a.path, &ch.url.0, "0755");
    let line = match &a.version {
        Some(Ok(l)) => l,
        Some(Err(e)) => {
            return Finding::fail(
                ID,
                "`--version` failed",
                format!(
                    "{e}. A binary for another architecture or a truncated download does this."
                ),
                get,
            )
        }
        None => return Finding::skip(ID, "not checked", "", "chvkit doctor --only chv.version"),
    };
    let Some(found) = Version::find_in(line) else {
        return Finding::fail(
            ID,
            "unrecognised `--version` output",
            format!("`{}` printed `{line}`", a.path.display()),
            get,
        );
    };
    if found != ch.version {
        return Finding::fail(
            ID,
            format!("{found} installed, profile wants {}", ch.version),
            format!("`{} --version`: {line}", a.path.display()),
            get,
        );
    }
    if is_advisory_version(&found) {
        return Finding::warn(
            ID,
            format!("{found}: security advisory {ADVISORY}"),
            format!("{} `--version`: {line}", advisory_text()),
            "chvkit --profile profiles/v50.2.yaml setup",
        );
    }
    Finding::pass(ID, format!("{found} (as the profile pins)"), line.clone())
}

enum Expected {
    Pin(String),
    Lock(String, u64),
    None,
    LockError(String),
}

fn expected(pin: Option<&str>, key: &str, f: &Facts) -> Expected {
    if let Some(p) = pin {
        return Expected::Pin(p.to_string());
    }
    match &f.lock {
        Some(Ok(Some(l))) => match l.artifacts.get(key) {
            Some(a) => Expected::Lock(a.sha256.clone(), a.installed_at),
            None => Expected::None,
        },
        Some(Err(e)) => Expected::LockError(e.clone()),
        _ => Expected::None,
    }
}

/// What a checksum check verifies.
struct Subject<'a> {
    id: &'static str,
    /// For messages: `cloud-hypervisor`, `firmware`.
    what: &'a str,
    pin: Option<&'a str>,
    /// Key in the lock file.
    key: &'a str,
    url: &'a str,
    mode: &'a str,
}

/// The shared judgement of a file against its pin or lock entry.
fn checksum(s: &Subject<'_>, a: &Artifact, f: &Facts) -> Finding {
    let (id, what, pin) = (s.id, s.what, s.pin);
    let get = download(&a.path, s.url, s.mode);
    let lock = f.lock_path.display();
    let actual = match &a.sha256 {
        Some(Ok(h)) => h.clone(),
        Some(Err(e)) => {
            return Finding::fail(
                id,
                format!("cannot read {}", a.path.display()),
                e.clone(),
                format!("ls -l {}", a.path.display()),
            )
        }
        // Not hashed because there is nothing to compare the hash with.
        None if matches!(expected(pin, s.key, f), Expected::None) => {
            return Finding::warn(
                id,
                format!(
                    "{what} cannot be verified: no sha256 pin in the profile and no lock file entry"
                ),
                format!(
                    "Neither the profile pins a hash nor does {lock} record one (setup writes it \
                     when it installs the file), so the file was not hashed; `sha256sum {}` \
                     prints its hash.",
                    a.path.display()
                ),
                "chvkit setup",
            );
        }
        None => {
            return Finding::skip(id, "not hashed", "", format!("chvkit doctor --only {id}"));
        }
    };
    match expected(pin, s.key, f) {
        Expected::Pin(e) | Expected::Lock(e, _) if e == actual => {
            let source = if pin.is_some() {
                "the profile's sha256 pin".to_string()
            } else {
                format!("the hash recorded in {lock}")
            };
            Finding::pass(
                id,
                format!("sha256 matches {source}"),
                format!("sha256 {actual}"),
            )
        }
        Expected::Pin(e) => Finding::fail(
            id,
            format!("{what} sha256 mismatch: expected {e} (profile pin), actual {actual}"),
            format!(
                "{} is not the file the profile pins: corrupted, replaced or another version. \
                 `chvkit setup` re-downloads and verifies it.",
                a.path.display()
            ),
            get,
        ),
        Expected::Lock(e, at) => Finding::fail(
            id,
            format!("{what} sha256 mismatch: expected {e} (lock file), actual {actual}"),
            format!(
                "{} changed since setup recorded its hash in {lock} (installed at unix time \
                 {at}). `chvkit setup` re-downloads and verifies it.",
                a.path.display()
            ),
            get,
        ),
        Expected::LockError(e) => Finding::fail(
            id,
            format!("lock file unreadable: {e}"),
            format!("actual sha256 {actual}; the profile has no pin to fall back on."),
            format!("mv {lock} {lock}.bad && chvkit setup"),
        ),
        Expected::None => Finding::warn(
            id,
            format!(
                "{what} cannot be verified: no sha256 pin in the profile and no lock file entry"
            ),
            format!(
                "actual sha256 {actual}. Neither the profile pins a hash nor does {lock} record \
                 one (setup writes it when it installs the file)."
            ),
            "chvkit setup",
        ),
    }
}

pub fn chv_checksum(ctx: &Context, f: &Facts) -> Finding {
    const ID: &str = "chv.checksum";
    let ch = &ctx.profile.cloud_hypervisor;
    let Some(a) = f.chv.as_ref().filter(|a| a.file.is_file) else {
        return Finding::skip(
            ID,
            "no binary to verify",
            "Depends on chv.binary (its fix installs the binary).",
            chv_get(ctx, f),
        );
    };
    let subject = Subject {
        id: ID,
        what: "cloud-hypervisor",
        pin: ch.sha256.as_ref().map(|s| s.0.as_str()),
        key: lockfile::CLOUD_HYPERVISOR,
        url: &ch.url.0,
        mode: "0755",
    };
    checksum(&subject, a, f)
}

/// Mode of the installed firmware: `chvkit setup` installs it with this mode (and converges
/// it there) and doctor's fix commands name it, so the two never disagree. 0755 like every
/// artifact setup installs: setup's plan checks and repairs one mode for all of them.
pub const FIRMWARE_MODE: u32 = 0o755;

/// The firmware's mode as `chmod` takes it.
fn firmware_mode() -> String {
    format!("{FIRMWARE_MODE:04o}")
}

pub fn firmware_file(ctx: &Context, f: &Facts) -> Finding {
    const ID: &str = "firmware.file";
    let fw = &ctx.profile.firmware;
    let Some(a) = &f.firmware else {
        return Finding::skip(ID, "not checked", "", "chvkit doctor --only firmware");
    };
    if !a.file.is_file {
        return Finding::fail(
            ID,
            format!("{} not found", a.path.display()),
            format!(
                "rust-hypervisor-firmware {} is expected there (profile firmware.path). It is \
                 released by cloud-hypervisor/rust-hypervisor-firmware, not with Cloud \
                 Hypervisor. `chvkit setup` installs and verifies it.",
                fw.version
            ),
            download(&a.path, &fw.url.0, &firmware_mode()),
        );
    }
    let mode = firmware_mode();
    let subject = Subject {
        id: ID,
        what: "firmware",
        pin: fw.sha256.as_ref().map(|s| s.0.as_str()),
        key: lockfile::FIRMWARE,
        url: &fw.url.0,
        mode: &mode,
    };
    checksum(&subject, a, f)
}

/// The two ways a guest boots, said once for both findings.
const BOOT_MODES: &str = "Two boot modes: direct kernel boot (launch --kernel, or the installed \
     guest kernel) boots the raw ext4 images `chvkit rootfs` builds, with the host's kernel; \
     firmware boot (launch --firmware, the seed's firmware_path) boots a GPT disk whose EFI \
     System Partition carries the kernel (a Boot Loader Specification entry or \
     \\EFI\\BOOT\\BOOTX64.EFI): `chvkit rootfs --bootable --kernel FILE` writes one, so the \
     kernel travels inside the image. rust-hypervisor-firmware holds no kernel of its own.";

pub fn firmware_boot_mode(ctx: &Context, f: &Facts) -> Finding {
    const ID: &str = "firmware.boot_mode";
    // The kernel launch boots without --kernel: the named one, else the installed one.
    let booted: Option<(String, &str)> = match (&f.kernel, &f.guest) {
        (Some(Some(k)), _) => Some((
            k.path.display().to_string(),
            if k.from_env {
                "CHV_KERNEL_PATH"
            } else {
                "profile kernel.path"
            },
        )),
        (
            _,
            Some(Guest {
                choice: GuestChoice::Kernel(g),
                ..
            }),
        ) => Some((g.path.display().to_string(), g.origin.label())),
        _ => None,
    };
    match (booted, &f.kernel) {
        (Some((path, src)), _) => Finding::pass(
            ID,
            "direct kernel boot configured: raw ext4 root filesystems boot",
            format!(
                "Guest kernel {path} ({src}; kernel.guest judges it). Firmware boot is there for \
                 disks that carry an EFI System Partition with their own kernel \
                 (`chvkit rootfs --bootable`). {BOOT_MODES}"
            ),
        ),
        (None, Some(None)) => {
            let installable = ctx.profile.kernel.source() != KernelSource::None;
            Finding::warn(
                ID,
                "no guest kernel configured: raw ext4 root filesystems cannot boot",
                format!(
                    "Without a guest kernel only firmware boot is left, and it boots only disks \
                     with a GPT EFI System Partition; a raw ext4 image stops it with \"Unable to \
                     boot from any virtio-blk device\". Either give direct kernel boot a \
                     kernel: {}; or build firmware-bootable images with `chvkit rootfs \
                     --bootable --kernel FILE`. {BOOT_MODES}",
                    if installable {
                        "`chvkit kernel` installs the guest kernel the profile's kernel.source \
                         names (or set CHV_KERNEL_PATH)"
                    } else {
                        "the profile's kernel.source is `none`, so name one with CHV_KERNEL_PATH \
                         or `chvkit launch --kernel`"
                    }
                ),
                if installable {
                    "sudo chvkit kernel"
                } else {
                    "export CHV_KERNEL_PATH=/path/to/vmlinux   # bzImage or PVH vmlinux with virtio-blk/net built in"
                },
            )
        }
        _ => Finding::skip(ID, "not checked", "", "chvkit doctor --only firmware"),
    }
}

/// kernel.file's fix for a named kernel file that is missing, unreadable or not bootable.
fn named_kernel_fix(
    path: &Path,
    src: &str,
    file: &FileFacts,
    image: Option<&Result<KernelImage, String>>,
) -> String {
    if !file.is_file {
        return format!(
            "ls -l {}   # or point {src} at an existing kernel",
            path.display()
        );
    }
    match image {
        Some(Ok(KernelImage::ElfNoPvh)) => format!(
            "export CHV_KERNEL_PATH=/path/to/bzImage   # instead of {}",
            path.display()
        ),
        Some(Err(_)) | None => format!("ls -l {}", path.display()),
        _ => "export CHV_KERNEL_PATH=/path/to/bzImage".to_string(),
    }
}

pub fn kernel_file(_ctx: &Context, f: &Facts) -> Finding {
    const ID: &str = "kernel.file";
    let k =
        match &f.kernel {
            Some(Some(k)) => k,
            Some(None) => return Finding::skip(
                ID,
                "no kernel file named",
                "Neither kernel.path in the profile nor CHV_KERNEL_PATH names a kernel file. The \
                 kernel launch boots (the one `chvkit kernel` installed, if any) is judged by \
                 kernel.guest.",
                "chvkit doctor --only kernel.guest",
            ),
            None => return Finding::skip(ID, "not checked", "", "chvkit doctor --only kernel"),
        };
    let src = if k.from_env {
        "CHV_KERNEL_PATH"
    } else {
        "kernel.path"
    };
    let pvm = if f.cpu.as_ref().is_some_and(|c| c.pvm) {
        " On this PVM host only a kernel with chvkit's PVM changes reaches user space: \
         kernel.guest says whether the kernel launch boots has them."
    } else {
        ""
    };
    if !k.file.is_file {
        return Finding::fail(
            ID,
            format!("{} ({src}) not found", k.path.display()),
            format!("The guest kernel for direct boot must be a readable file.{pvm}"),
            named_kernel_fix(&k.path, src, &k.file, k.image.as_ref()),
        );
    }
    match &k.image {
        Some(Ok(KernelImage::BzImage { version })) => Finding::pass(
            ID,
            format!("{}: bzImage", k.path.display()),
            format!(
                "{}{pvm}",
                version
                    .as_deref()
                    .map(|v| format!("Linux {v}."))
                    .unwrap_or_default()
            ),
        ),
        Some(Ok(KernelImage::ElfPvh)) => Finding::pass(
            ID,
            format!("{}: ELF vmlinux with a PVH entry note", k.path.display()),
            pvm.trim().to_string(),
        ),
        Some(Ok(KernelImage::ElfNoPvh)) => Finding::fail(
            ID,
            format!("{}: ELF without a PVH entry note", k.path.display()),
            format!(
                "Cloud Hypervisor boots an ELF vmlinux only through its Xen PVH entry point \
                 (CONFIG_PVH=y). Use the compressed bzImage of the same build instead.{pvm}"
            ),
            format!(
                "export CHV_KERNEL_PATH=/path/to/bzImage   # instead of {}",
                k.path.display()
            ),
        ),
        Some(Ok(KernelImage::ElfUnsupported)) => Finding::fail(
            ID,
            format!("{}: 32-bit or big-endian ELF", k.path.display()),
            format!("An x86_64 guest kernel is a 64-bit little-endian ELF or a bzImage.{pvm}"),
            "export CHV_KERNEL_PATH=/path/to/bzImage",
        ),
        Some(Ok(KernelImage::Unknown)) => Finding::fail(
            ID,
            format!("{}: not a kernel image", k.path.display()),
            format!("Neither a bzImage (`HdrS` at 0x202) nor an ELF vmlinux.{pvm}"),
            "export CHV_KERNEL_PATH=/path/to/bzImage",
        ),
        Some(Err(e)) => Finding::fail(
            ID,
            format!("cannot read {}", k.path.display()),
            e.clone(),
            format!("ls -l {}", k.path.display()),
        ),
        None => Finding::skip(ID, "not checked", "", "chvkit doctor --only kernel"),
    }
}

/// What the judgement of the guest kernel needs from the profile and the host.
#[derive(Debug, Clone, Copy)]
pub struct GuestHost<'a> {
    /// `/dev/kvm` is PVM (`kvm_pvm` loaded).
    pub pvm: bool,
    /// The profile's `vm.cmdline`.
    pub base_cmdline: &'a str,
    /// The profile's `vm.memory_mib`.
    pub memory_mib: u32,
}

/// Measured on the project's 2-core PVM hosts with the stock recipe (facts §5, docs/launch.md).
/// The record carries no boot time, so doctor states this figure as an estimate.
const PVM_BOOT_ESTIMATE: &str = "~21 s to /init";

pub fn kernel_guest(ctx: &Context, f: &Facts) -> Finding {
    let Some(g) = &f.guest else {
        return Finding::skip(
            "kernel.guest",
            "not checked",
            "",
            "chvkit doctor --only kernel",
        );
    };
    guest_verdict(
        g,
        &GuestHost {
            pvm: f.cpu.as_ref().is_some_and(|c| c.pvm),
            base_cmdline: &ctx.profile.vm.cmdline,
            memory_mib: ctx.profile.vm.memory_mib,
        },
    )
}

/// The command line launch gives `k` on this host when the user adds none: composed by
/// [`cmdline::compose`] exactly as launch does, then where /init finds checker.env for a
/// `chvkit rootfs` image (its env slot; launch names the env disk instead for an image without
/// one).
pub fn guest_cmdline(k: &GuestKernel, h: &GuestHost<'_>) -> String {
    let rec = k.record.as_ref();
    let mut line = cmdline::compose(&cmdline::Parts {
        base: h.base_cmdline,
        kernel: rec.map_or("", |r| r.cmdline.as_str()),
        user: None,
        initramfs: rec.is_some_and(|r| r.initramfs.is_some()),
        host: if h.pvm {
            cmdline::HostKind::Pvm
        } else {
            cmdline::HostKind::Hardware
        },
    });
    line.push(' ');
    line.push_str(crate::rootfs::envslot::CMDLINE_ARG);
    line
}

/// One problem found with the guest kernel: the worst decides the finding's level, summary and
/// fix; the others are listed in its detail.
struct Issue {
    level: Level,
    summary: String,
    hint: String,
}

fn build_needs(tarball: bool) -> String {
    format!(
        "kernel.source `build` compiles chvkit's recipe (guest/kernel/: Linux from Debian's \
         `{pkg}`, PVH, virtio and ext4 built in, chvkit's PVM changes) into a vmlinux that runs \
         on hardware KVM and on PVM hosts; it needs `{pkg}` installed ({tarball} is {}) and \
         takes about 8 minutes on 2 cores.",
        if tarball { "present" } else { "missing" },
        pkg = crate::kernel::build::SOURCE_PACKAGE,
        tarball = crate::kernel::build::SOURCE_TARBALL,
    )
}

/// The verdict of `kernel.guest` from gathered facts (pure: tests construct the facts).
pub fn guest_verdict(g: &Guest, h: &GuestHost<'_>) -> Finding {
    const ID: &str = "kernel.guest";
    const REINSTALL: &str = "sudo chvkit kernel";
    const BUILD: &str = "sudo chvkit kernel --source build";
    let src = g.source.as_str();
    let k = match &g.choice {
        GuestChoice::Unprovided => {
            return Finding::skip(
                ID,
                "kernel.source is `none`: each launch names its kernel",
                "chvkit provides no guest kernel: every `chvkit launch` names one (--kernel, \
                 CHV_KERNEL_PATH or a config's kernel_path), so there is none to judge here. \
                 kernel.source `build` has one installed that runs on hardware KVM and PVM hosts.",
                "export CHV_KERNEL_PATH=/path/to/vmlinux   # or set kernel.source: build, then sudo chvkit kernel",
            )
        }
        GuestChoice::NotInstalled { source_tarball } => {
            let (how, hint) = match g.source {
                KernelSource::Build => (
                    build_needs(*source_tarball),
                    if *source_tarball {
                        REINSTALL.to_string()
                    } else {
                        format!(
                            "sudo apt-get install -y {} && {REINSTALL}",
                            crate::kernel::build::SOURCE_PACKAGE
                        )
                    },
                ),
                KernelSource::Distro if h.pvm => (
                    "kernel.source `distro` installs the host's newest /boot/vmlinuz-* with a \
                     generated initramfs, but this host's /dev/kvm is PVM: a distribution kernel \
                     cannot reach user space here (facts: user-mode SYSCALL). kernel.source \
                     `build` can."
                        .to_string(),
                    BUILD.to_string(),
                ),
                KernelSource::Distro => (
                    "kernel.source `distro` installs the host's newest /boot/vmlinuz-* (unpacked \
                     to a vmlinux) with a generated initramfs that loads its virtio and ext4 \
                     modules; it takes seconds."
                        .to_string(),
                    REINSTALL.to_string(),
                ),
                _ => (String::new(), REINSTALL.to_string()),
            };
            return Finding::fail(
                ID,
                format!("no guest kernel installed (kernel.source: {src})"),
                format!(
                    "Launch without --kernel boots the kernel `chvkit kernel` (or setup) installs \
                     under <state_dir>/kernel/; none is installed and the profile sets no \
                     kernel.path, so launch would stop with \"no guest kernel installed\".\n{how}"
                ),
                hint,
            );
        }
        GuestChoice::RecordError { path, error } => {
            return Finding::fail(
                ID,
                format!("guest kernel record unreadable: {}", path.display()),
                format!(
                    "{error}. Launch stops on it too; `chvkit kernel` installs the kernel again \
                     and rewrites the record."
                ),
                REINSTALL,
            )
        }
        GuestChoice::Kernel(k) => k,
    };

    let shown = k.path.display().to_string();
    let installed = k.origin == GuestOrigin::Installed;
    let rec = k.record.as_ref();
    // A named file that kernel.file already FAILs: depend on it rather than repeat it.
    let format_ok = matches!(
        k.image,
        Some(Ok(KernelImage::ElfPvh | KernelImage::BzImage { .. }))
    );
    if !installed && (!k.file.is_file || !format_ok) {
        let src_name = if k.origin == GuestOrigin::Env {
            "CHV_KERNEL_PATH"
        } else {
            "kernel.path"
        };
        return Finding::skip(
            ID,
            format!("{shown} ({}) is not a bootable kernel", k.origin.label()),
            "Depends on kernel.file, which says what is wrong with this file (its fix applies).",
            named_kernel_fix(&k.path, src_name, &k.file, k.image.as_ref()),
        );
    }
    // An installed kernel that is not intact: reinstall. (A stat and the ELF headers only: the
    // sha256 is `chvkit kernel`'s job; doctor must stay fast.)
    if installed {
        let broken = if !k.file.exists {
            Some(format!("{shown} (installed by `chvkit kernel`) is missing"))
        } else if !k.file.is_file {
            Some(format!(
                "{shown} (installed by `chvkit kernel`) is not a regular file"
            ))
        } else {
            match &k.image {
                Some(Err(e)) => Some(format!("cannot read {shown}: {e}")),
                Some(Ok(KernelImage::ElfPvh)) => None,
                Some(Ok(KernelImage::BzImage { .. })) => None,
                Some(Ok(KernelImage::ElfNoPvh)) => Some(format!(
                    "{shown}: ELF without a PVH entry note (not bootable)"
                )),
                Some(Ok(KernelImage::ElfUnsupported)) => {
                    Some(format!("{shown}: 32-bit or big-endian ELF (not bootable)"))
                }
                Some(Ok(KernelImage::Unknown)) | None => {
                    Some(format!("{shown}: not a kernel image"))
                }
            }
        };
        if let Some(summary) = broken {
            return Finding::fail(
                ID,
                summary,
                format!(
                    "Launch without --kernel boots this file (the record says: {}, installed \
                     from {}); it is not the vmlinux `chvkit kernel` installed. `chvkit kernel` \
                     verifies the installed files' sha256 and installs them again.",
                    rec.map_or("?", |r| r.source.as_str()),
                    rec.map_or("?", |r| r.origin.as_str()),
                ),
                REINSTALL,
            );
        }
    }
    if let (Some(want), Some(have)) = (k.implied_size, k.file.size) {
        if have < want {
            return Finding::fail(
                ID,
                format!("{shown} is truncated: {have} bytes, its ELF headers need {want}"),
                format!(
                    "A cut-off copy boots partway or not at all ({}).",
                    k.origin.label()
                ),
                if installed {
                    REINSTALL.to_string()
                } else {
                    format!("ls -l {shown}   # copy it again from where it was built")
                },
            );
        }
    }

    let mut issues: Vec<Issue> = Vec::new();
    let mut detail: Vec<String> = Vec::new();

    // What it is and where it comes from.
    let format = match &k.image {
        Some(Ok(KernelImage::BzImage { .. })) => "bzImage",
        _ => "PVH vmlinux",
    };
    let version = rec
        .and_then(|r| r.linux_version.clone())
        .or_else(|| match &k.image {
            Some(Ok(KernelImage::BzImage { version: Some(v) })) => {
                v.split_whitespace().next().map(str::to_string)
            }
            _ => None,
        });
    let from = match rec {
        Some(r) => format!(
            "installed by `chvkit kernel`, source {}: {}",
            r.source, r.origin
        ),
        None => k.origin.label().to_string(),
    };
    detail.push(format!(
        "kernel: {shown} ({from}); {format}{}.",
        version
            .as_deref()
            .map(|v| format!(", Linux {v}"))
            .unwrap_or_default()
    ));
    if let Some(o) = &k.overrides {
        detail.push(format!(
            "CHV_KERNEL_PATH overrides the installed kernel {}.",
            o.display()
        ));
    }
    if let Some(r) = rec {
        if r.source != src {
            detail.push(format!(
                "Installed with source `{}`; the profile's kernel.source is `{src}` \
                 (`chvkit kernel` without --source would replace it).",
                r.source
            ));
        }
        if let Some(m) = k.mtime {
            if m > r.installed_at.saturating_add(1) {
                issues.push(Issue {
                    level: Level::Warn,
                    summary: format!("{shown} changed after `chvkit kernel` installed it"),
                    hint: REINSTALL.to_string(),
                });
                detail.push(format!(
                    "The file was modified at unix time {m}, after the record's installed_at \
                     {}: the record (PVM changes, sha256) may not describe it.",
                    r.installed_at
                ));
            }
        }
    }
    if k.origin == GuestOrigin::ProfilePath && g.source != KernelSource::None {
        detail.push(format!(
            "Nothing is installed (kernel.source `{src}`), so launch boots kernel.path as it is; \
             `sudo chvkit kernel` would install and record it."
        ));
    }
    if matches!(k.image, Some(Ok(KernelImage::BzImage { .. }))) {
        detail.push(format!(
            "Cloud Hypervisor boots a bzImage as it is; `sudo chvkit kernel --path {shown}` \
             unpacks it into a recorded vmlinux (doctor can then tell whether it carries chvkit's \
             PVM changes)."
        ));
    }

    // Drivers: the root disk on virtio-blk (PCI), ext4, the network on virtio-net.
    match rec.map(|r| r.source.as_str()) {
        Some("build") => detail.push(
            "drivers: virtio-pci, virtio-blk, virtio-net, virtio-console and ext4 are built in \
             (chvkit's recipe)."
                .to_string(),
        ),
        Some("distro") => match &k.initramfs {
            Some((p, f)) if f.is_file => detail.push(format!(
                "drivers: the distribution kernel's virtio and ext4 modules are loaded by the \
                 initramfs {}.",
                p.display()
            )),
            Some((p, _)) => {
                return Finding::fail(
                    ID,
                    format!("the initramfs {} is missing", p.display()),
                    format!(
                        "The distribution kernel {shown} has its virtio and ext4 drivers as \
                         modules; without the initramfs `chvkit kernel` generated it cannot \
                         mount the root disk."
                    ),
                    REINSTALL,
                )
            }
            None => {
                return Finding::fail(
                    ID,
                    "the distro kernel's record names no initramfs",
                    format!(
                        "The distribution kernel {shown} has its virtio and ext4 drivers as \
                         modules and needs the initramfs `chvkit kernel` generates."
                    ),
                    REINSTALL,
                )
            }
        },
        _ => match &k.config {
            Some(c) => {
                let of = |v: ConfigValue| -> Vec<&str> {
                    c.options
                        .iter()
                        .filter(|(_, x)| *x == v)
                        .map(|(o, _)| *o)
                        .collect()
                };
                let (unset, module) = (of(ConfigValue::Unset), of(ConfigValue::Module));
                let built = of(ConfigValue::BuiltIn);
                detail.push(format!(
                    "drivers (from {}): built in: {}; modules: {}; not set: {}.",
                    c.path.display(),
                    list_or_none(&built),
                    list_or_none(&module),
                    list_or_none(&unset)
                ));
                if !unset.is_empty() {
                    issues.push(Issue {
                        level: Level::Fail,
                        summary: format!("{shown} lacks {}", unset.join(", ")),
                        hint: BUILD.to_string(),
                    });
                    detail.push(
                        "Without them the guest cannot find or mount its root disk (virtio-blk \
                         over virtio-pci, ext4) or has no network (virtio-net)."
                            .to_string(),
                    );
                } else if !module.is_empty() {
                    issues.push(Issue {
                        level: Level::Warn,
                        summary: format!(
                            "{shown} has {} as modules: it needs an initramfs",
                            module.join(", ")
                        ),
                        hint: BUILD.to_string(),
                    });
                    detail.push(
                        "Launch gives this kernel no initramfs unless `--initramfs FILE` names \
                         one; without one that loads the modules the root disk does not mount. \
                         kernel.source `distro` generates one; `build` builds them in."
                            .to_string(),
                    );
                }
            }
            None => detail.push(format!(
                "drivers: cannot be verified without the kernel's config (looked for {}); it \
                 needs virtio-pci, virtio-blk, virtio-net and ext4 built in (=y), or an \
                 initramfs that loads them.",
                if k.config_searched.is_empty() {
                    "nothing".to_string()
                } else {
                    k.config_searched
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            )),
        },
    }

    // The host kind.
    const PVM_WHY: &str = "this host's /dev/kvm is PVM: an unmodified kernel cannot reach user \
         space here (facts: user-mode SYSCALL). PVM enters the guest's system call entry without \
         switching to kernel mode, so init's first system call faults and init dies with \
         SIGSEGV. chvkit's recipe (kernel.source `build`) carries the fix.";
    let line = guest_cmdline(k, h);
    let mut pvm_ready = false;
    if h.pvm {
        let ready = rec
            .map(|r| Ok(r.pvm_ready))
            .or_else(|| k.pvm_marker.clone());
        let fix = if k.origin == GuestOrigin::Env {
            format!("unset CHV_KERNEL_PATH; {BUILD}")
        } else {
            BUILD.to_string()
        };
        match ready {
            Some(Ok(true)) => {
                pvm_ready = true;
                detail.push(
                    "host: /dev/kvm is PVM, and this kernel carries chvkit's PVM changes (it \
                     handles PVM's user-mode SYSCALL and avoids what the emulator lacks)."
                        .to_string(),
                );
            }
            // A distribution kernel is known to be unmodified: it cannot run here. Any other
            // kernel without the marker may carry PVM changes of its own (a hand-built one,
            // say): not known to run here, which is a warning, not a verdict.
            Some(Ok(false)) if rec.is_some_and(|r| r.source == "distro") => {
                issues.push(Issue {
                    level: Level::Fail,
                    summary: format!(
                        "{shown} is the distribution's unmodified kernel: it cannot reach user \
                         space on this PVM host"
                    ),
                    hint: fix,
                });
                detail.push(PVM_WHY.to_string());
            }
            Some(Ok(false)) => {
                issues.push(Issue {
                    level: Level::Warn,
                    summary: format!(
                        "{shown} is not known to run on this PVM host (no chvkit PVM marker)"
                    ),
                    hint: fix,
                });
                detail.push(format!(
                    "{PVM_WHY} A kernel with equivalent changes of its own may run; this one \
                     does not carry chvkit's marker (`chvkit-pvm-syscall-fixup-v1`), so doctor \
                     cannot tell."
                ));
            }
            Some(Err(e)) => {
                issues.push(Issue {
                    level: Level::Warn,
                    summary: format!("cannot tell whether {shown} runs on this PVM host"),
                    hint: fix,
                });
                detail.push(format!(
                    "host: /dev/kvm is PVM; reading the kernel for chvkit's PVM marker failed: \
                     {e}."
                ));
            }
            None => {
                issues.push(Issue {
                    level: Level::Warn,
                    summary: format!(
                        "cannot tell whether {shown} carries chvkit's PVM changes (compressed)"
                    ),
                    hint: format!("sudo chvkit kernel --path {shown}"),
                });
                detail.push(
                    "host: /dev/kvm is PVM, where only a kernel with chvkit's PVM changes reaches \
                     user space; a bzImage's payload is compressed, so doctor cannot see whether \
                     it has them. `chvkit kernel --path FILE` unpacks and records it; \
                     `chvkit kernel --source build` builds one that has them."
                        .to_string(),
                );
            }
        }
    } else {
        detail.push("host: hardware KVM runs the kernel unmodified.".to_string());
    }
    detail.push(format!("command line (launch without --cmdline): {line}"));
    let estimate = pvm_ready.then(|| format!("{PVM_BOOT_ESTIMATE} (estimate)"));
    if pvm_ready {
        detail.push(format!(
            "boot time: an estimate, not measured on this host: {PVM_BOOT_ESTIMATE} from the \
             VMM's start at 512 MiB with 1 vCPU (17.4 s on the guest's own clock) with chvkit's \
             build recipe on a 2-core PVM host, memory init growing with RAM; this profile's \
             vm.memory_mib is {}. See docs/launch.md.",
            h.memory_mib
        ));
    }
    let detail = detail.join("\n");

    let worst = issues.iter().map(|i| i.level).max();
    match worst {
        None => {
            let what = match (&version, rec) {
                (Some(v), Some(r)) => format!("Linux {v} ({}, installed)", r.source),
                (Some(v), None) => format!("Linux {v} ({})", k.origin.label()),
                (None, Some(r)) => format!("{format} ({}, installed)", r.source),
                (None, None) => format!("{format} ({})", k.origin.label()),
            };
            let tail = match estimate {
                Some(e) => format!(", PVM-ready; {e}"),
                None => String::new(),
            };
            Finding::pass(ID, format!("{shown}: {what}{tail}"), detail)
        }
        Some(level) => {
            let first = issues
                .iter()
                .find(|i| i.level == level)
                .expect("the worst level is some issue's");
            let others: Vec<&str> = issues
                .iter()
                .filter(|i| !std::ptr::eq(*i, first))
                .map(|i| i.summary.as_str())
                .collect();
            let detail = if others.is_empty() {
                detail
            } else {
                format!("{detail}\nAlso: {}.", others.join("; "))
            };
            Finding::new(ID, level, first.summary.clone(), detail, first.hint.clone())
        }
    }
}

fn list_or_none(v: &[&str]) -> String {
    if v.is_empty() {
        "none".to_string()
    } else {
        v.join(", ")
    }
}

pub fn tools_rootfs(_ctx: &Context, f: &Facts) -> Finding {
    const ID: &str = "tools.rootfs";
    let Some(tools) = &f.tools else {
        return Finding::skip(ID, "not checked", "", "chvkit doctor --only tools");
    };
    let found: Vec<String> = tools
        .iter()
        .filter(|t| t.path.is_some())
        .map(|t| {
            format!(
                "{} {}",
                t.name,
                t.version.as_deref().unwrap_or("(version unknown)")
            )
        })
        .collect();
    let missing: Vec<&str> = tools
        .iter()
        .filter(|t| t.path.is_none())
        .map(|t| t.name.as_str())
        .collect();
    if missing.is_empty() {
        return Finding::pass(ID, found.join(", "), "");
    }
    let packages: Vec<&str> = ROOTFS_TOOLS
        .iter()
        .filter(|(n, _)| missing.contains(n))
        .map(|(_, p)| *p)
        .collect();
    let installer = if crate::host::tools::find_in_path("apt-get").is_some() {
        "apt-get install -y"
    } else if crate::host::tools::find_in_path("dnf").is_some() {
        "dnf install -y"
    } else {
        "apt-get install -y"
    };
    Finding::warn(
        ID,
        format!("missing: {}", missing.join(", ")),
        format!(
            "`chvkit rootfs` needs buildah, skopeo, umoci and mkfs.ext4 (e2fsprogs); VMs run \
             without them. Found: {}.",
            if found.is_empty() {
                "none".to_string()
            } else {
                found.join(", ")
            }
        ),
        format!("{installer} {}", packages.join(" ")),
    )
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::doctor::facts::KernelConfig;
    use crate::kernel::installed::Installed;

    const HW: GuestHost<'static> = GuestHost {
        pvm: false,
        base_cmdline: "console=ttyS0 root=/dev/vda rw",
        memory_mib: 512,
    };
    const PVM: GuestHost<'static> = GuestHost {
        pvm: true,
        base_cmdline: "console=ttyS0 root=/dev/vda rw",
        memory_mib: 512,
    };

    fn file(size: u64) -> FileFacts {
        FileFacts {
            exists: true,
            is_file: true,
            mode: Some(0o644),
            size: Some(size),
            uid: Some(0),
        }
    }

    fn record(source: &str, pvm_ready: bool) -> Installed {
        Installed {
            schema: 1,
            source: source.into(),
            origin: "o".into(),
            key: "k".into(),
            vmlinux: "/var/lib/chvkit/kernel/vmlinux".into(),
            vmlinux_sha256: String::new(),
            initramfs: None,
            initramfs_sha256: None,
            cmdline: String::new(),
            linux_version: Some("6.12.118".into()),
            pvm_ready,
            installed_at: 100,
        }
    }

    fn kernel(origin: GuestOrigin, rec: Option<Installed>) -> GuestKernel {
        GuestKernel {
            origin,
            record: rec,
            path: "/var/lib/chvkit/kernel/vmlinux".into(),
            file: file(18 << 20),
            mtime: Some(90),
            image: Some(Ok(KernelImage::ElfPvh)),
            implied_size: Some(18 << 20),
            initramfs: None,
            pvm_marker: None,
            config: None,
            config_searched: Vec::new(),
            overrides: None,
        }
    }

    fn guest(source: KernelSource, k: GuestKernel) -> Guest {
        Guest {
            source,
            choice: GuestChoice::Kernel(Box::new(k)),
        }
    }

    #[test]
    fn unprovided_and_not_installed() {
        let g = Guest {
            source: KernelSource::None,
            choice: GuestChoice::Unprovided,
        };
        let f = guest_verdict(&g, &HW);
        assert_eq!(f.level, Level::Skip);
        assert!(f.summary.contains("each launch names its kernel"));
        let g = Guest {
            source: KernelSource::Build,
            choice: GuestChoice::NotInstalled {
                source_tarball: false,
            },
        };
        let f = guest_verdict(&g, &HW);
        assert_eq!(f.level, Level::Fail);
        assert_eq!(
            f.hint.as_deref(),
            Some("sudo apt-get install -y linux-source-6.12 && sudo chvkit kernel")
        );
        assert!(f.detail.contains("8 minutes on 2 cores"), "{}", f.detail);
    }

    #[test]
    fn recorded_build_kernel_per_host_kind() {
        let g = guest(
            KernelSource::Build,
            kernel(GuestOrigin::Installed, Some(record("build", true))),
        );
        let f = guest_verdict(&g, &HW);
        assert_eq!(f.level, Level::Pass, "{f:?}");
        assert!(f
            .detail
            .contains("console=ttyS0 root=/dev/vda rw init=/init chvkit.env=/etc/checker.env"));
        let f = guest_verdict(&g, &PVM);
        assert_eq!(f.level, Level::Pass, "{f:?}");
        assert!(f.summary.contains("PVM-ready; ~21 s to /init (estimate)"));
        assert!(f.detail.contains(cmdline::PVM_CLEARCPUID));
        assert!(f.detail.contains("an estimate"));

        let g = guest(
            KernelSource::Build,
            kernel(GuestOrigin::Installed, Some(record("distro", false))),
        );
        let f = guest_verdict(&g, &PVM);
        // The distro record names no initramfs: that comes first.
        assert_eq!(f.level, Level::Fail);
        let mut r = record("distro", false);
        r.initramfs = Some("/var/lib/chvkit/kernel/initramfs.img".into());
        let mut k = kernel(GuestOrigin::Installed, Some(r));
        k.initramfs = Some(("/var/lib/chvkit/kernel/initramfs.img".into(), file(10)));
        let f = guest_verdict(&guest(KernelSource::Distro, k.clone()), &PVM);
        assert_eq!(f.level, Level::Fail);
        assert!(f.detail.contains("facts: user-mode SYSCALL"));
        assert_eq!(f.hint.as_deref(), Some("sudo chvkit kernel --source build"));
        assert_eq!(
            guest_verdict(&guest(KernelSource::Distro, k), &HW).level,
            Level::Pass
        );
    }

    #[test]
    fn unrecorded_files() {
        // A bzImage on PVM: compressed, so unknown.
        let mut k = kernel(GuestOrigin::Env, None);
        k.image = Some(Ok(KernelImage::BzImage {
            version: Some("6.1.0-57-cloud-amd64 (x) #1".into()),
        }));
        k.implied_size = None;
        let f = guest_verdict(&guest(KernelSource::Build, k.clone()), &PVM);
        assert_eq!(f.level, Level::Warn, "{f:?}");
        assert!(f.hint.unwrap().starts_with("sudo chvkit kernel --path "));
        let f = guest_verdict(&guest(KernelSource::Build, k), &HW);
        assert_eq!(f.level, Level::Pass);
        assert!(f
            .summary
            .contains("Linux 6.1.0-57-cloud-amd64 (CHV_KERNEL_PATH)"));
        assert!(f.detail.contains("unpacks it"));

        // The marker scan decides on PVM: without it a kernel is not known to run there.
        let mut k = kernel(GuestOrigin::ProfilePath, None);
        k.pvm_marker = Some(Ok(false));
        let f = guest_verdict(&guest(KernelSource::Path, k.clone()), &PVM);
        assert_eq!(f.level, Level::Warn);
        assert!(f.summary.contains("not known to run"), "{f:?}");
        assert_eq!(f.hint.as_deref(), Some("sudo chvkit kernel --source build"));
        k.pvm_marker = Some(Ok(true));
        assert_eq!(
            guest_verdict(&guest(KernelSource::Path, k.clone()), &PVM).level,
            Level::Pass
        );

        // Drivers from a config: unset fails, modules warn, and the worst wins.
        k.config = Some(KernelConfig::parse(
            &PathBuf::from("/boot/config-x"),
            "CONFIG_VIRTIO_PCI=y\nCONFIG_VIRTIO_BLK=m\nCONFIG_VIRTIO_NET=y\nCONFIG_EXT4_FS=y\n",
        ));
        let f = guest_verdict(&guest(KernelSource::Path, k.clone()), &PVM);
        assert_eq!(f.level, Level::Warn, "{f:?}");
        // A driver missing fails, and the PVM warning is kept beside it.
        k.config = Some(KernelConfig::parse(
            &PathBuf::from("/boot/config-x"),
            "CONFIG_VIRTIO_PCI=y\nCONFIG_VIRTIO_NET=y\nCONFIG_EXT4_FS=y\n",
        ));
        k.pvm_marker = Some(Ok(false));
        let f = guest_verdict(&guest(KernelSource::Path, k.clone()), &PVM);
        assert_eq!(f.level, Level::Fail, "{f:?}");
        assert!(f.detail.contains("Also: "), "{f:?}");
        assert!(f.detail.contains("PVM"), "{f:?}");
    }

    #[test]
    fn integrity() {
        let mut k = kernel(GuestOrigin::Installed, Some(record("build", true)));
        k.file.size = Some(1000);
        k.implied_size = Some(5000);
        let f = guest_verdict(&guest(KernelSource::Build, k.clone()), &HW);
        assert_eq!(f.level, Level::Fail);
        assert!(f.summary.contains("truncated"));
        assert_eq!(f.hint.as_deref(), Some("sudo chvkit kernel"));
        k.file = FileFacts::default();
        k.image = None;
        let f = guest_verdict(&guest(KernelSource::Build, k.clone()), &HW);
        assert_eq!(f.level, Level::Fail);
        assert!(f.summary.contains("missing"));
        // Modified after the install: the record may be stale.
        let mut k = kernel(GuestOrigin::Installed, Some(record("build", true)));
        k.mtime = Some(500);
        let f = guest_verdict(&guest(KernelSource::Build, k), &PVM);
        assert_eq!(f.level, Level::Warn);
        assert_eq!(f.hint.as_deref(), Some("sudo chvkit kernel"));
        // A named file that is not a kernel: kernel.file's finding, not repeated here.
        let mut k = kernel(GuestOrigin::Env, None);
        k.image = Some(Ok(KernelImage::Unknown));
        let f = guest_verdict(&guest(KernelSource::Build, k), &HW);
        assert_eq!(f.level, Level::Skip);
        assert!(f.detail.contains("kernel.file"));
    }

    #[test]
    fn firmware_mode_and_boot_modes_text() {
        assert_eq!(firmware_mode(), "0755");
        assert!(BOOT_MODES.contains("chvkit rootfs --bootable"));
        assert!(BOOT_MODES.contains("\\EFI\\BOOT\\BOOTX64.EFI"));
    }
}
