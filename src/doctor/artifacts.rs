//! `chv.*`, `firmware.*`, `kernel.file` and `tools.rootfs`.

use std::path::Path;

use super::facts::{Artifact, Facts, ROOTFS_TOOLS};
use super::report::Finding;
use crate::host::files::KernelImage;
use crate::lockfile;
use crate::profile::Version;
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
            download(&a.path, &fw.url.0, "0644"),
        );
    }
    let subject = Subject {
        id: ID,
        what: "firmware",
        pin: fw.sha256.as_ref().map(|s| s.0.as_str()),
        key: lockfile::FIRMWARE,
        url: &fw.url.0,
        mode: "0644",
    };
    checksum(&subject, a, f)
}

pub fn firmware_boot_mode(_ctx: &Context, f: &Facts) -> Finding {
    const ID: &str = "firmware.boot_mode";
    match &f.kernel {
        Some(Some(k)) => Finding::pass(
            ID,
            "direct kernel boot configured: raw ext4 root filesystems boot",
            format!(
                "Guest kernel {} ({}). Firmware boot stays available for disks that carry an \
                 EFI System Partition.",
                k.path.display(),
                if k.from_env { "CHV_KERNEL_PATH" } else { "profile kernel.path" }
            ),
        ),
        Some(None) => Finding::warn(
            ID,
            "no guest kernel configured: raw ext4 root filesystems cannot boot",
            "rust-hypervisor-firmware holds no kernel: it boots only disks with a GPT EFI System \
             Partition (a BLS entry or \\EFI\\BOOT\\BOOTX64.EFI) and stops with \"Unable to boot \
             from any virtio-blk device\" otherwise. The raw ext4 images `chvkit rootfs` builds \
             need direct kernel boot: set kernel.path in the profile or CHV_KERNEL_PATH.",
            "export CHV_KERNEL_PATH=/path/to/vmlinux   # bzImage or PVH vmlinux with virtio-blk/net built in",
        ),
        None => Finding::skip(ID, "not checked", "", "chvkit doctor --only firmware"),
    }
}

pub fn kernel_file(_ctx: &Context, f: &Facts) -> Finding {
    const ID: &str = "kernel.file";
    let k = match &f.kernel {
        Some(Some(k)) => k,
        Some(None) => {
            return Finding::skip(
                ID,
                "no guest kernel configured",
                "Neither kernel.path in the profile nor CHV_KERNEL_PATH is set (see \
                 firmware.boot_mode).",
                "export CHV_KERNEL_PATH=/path/to/vmlinux",
            )
        }
        None => return Finding::skip(ID, "not checked", "", "chvkit doctor --only kernel"),
    };
    let src = if k.from_env {
        "CHV_KERNEL_PATH"
    } else {
        "kernel.path"
    };
    let pvm = if f.cpu.as_ref().is_some_and(|c| c.pvm) {
        " On this PVM host only a kernel built for PVM guests runs (see cpu.virtualization)."
    } else {
        ""
    };
    if !k.file.is_file {
        return Finding::fail(
            ID,
            format!("{} ({src}) not found", k.path.display()),
            format!("The guest kernel for direct boot must be a readable file.{pvm}"),
            format!(
                "ls -l {}   # or point {src} at an existing kernel",
                k.path.display()
            ),
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
