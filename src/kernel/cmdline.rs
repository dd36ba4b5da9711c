//! The guest kernel command line: the profile's base, what the kernel itself needs, what this
//! host kind needs, and the user's additions — composed in one place so that launch, doctor and
//! `chvkit kernel` all say the same thing.

use std::path::Path;

/// What PVM hosts need (facts §5): the first three stop the guest on instructions PVM's
/// native-kernel emulation lacks (`xrstor64`, `popcnt`, `clac`/`stac`); `erms` and `fsrm` only
/// make the guest's page faults cheaper there. A kernel without chvkit's PVM changes still
/// cannot reach user space on such a host: [`crate::kernel::installed::PVM_MARKER`].
pub const PVM_CLEARCPUID: &str = "clearcpuid=xsave,popcnt,smap,erms,fsrm";

/// The host kinds that change the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKind {
    /// Hardware virtualization (VT-x / AMD-V) or anything else that runs kernels unmodified.
    Hardware,
    /// `/dev/kvm` is PVM (`kvm_pvm` loaded).
    Pvm,
}

impl HostKind {
    /// Read from the running host (`/sys/module/kvm_pvm`), which is what the VMM will use.
    pub fn detect() -> HostKind {
        HostKind::detect_in(Path::new("/sys/module"))
    }

    pub fn detect_in(sys_module: &Path) -> HostKind {
        if sys_module.join("kvm_pvm").exists() {
            HostKind::Pvm
        } else {
            HostKind::Hardware
        }
    }
}

/// Everything the command line is made of.
#[derive(Debug, Clone, Copy)]
pub struct Parts<'a> {
    /// The profile's `vm.cmdline` (console and root disk).
    pub base: &'a str,
    /// What the installed kernel needs (from its record; empty for most).
    pub kernel: &'a str,
    /// `--cmdline` / the config file's `cmdline`.
    pub user: Option<&'a str>,
    /// An initramfs runs its own `/init`, which mounts the root and runs the image's.
    pub initramfs: bool,
    pub host: HostKind,
}

/// Whether `cmdline` already has parameter `key` (`key=…` or bare `key`), outside the part
/// after `--` (which the kernel hands to init).
fn has_param(cmdline: &str, key: &str) -> bool {
    cmdline
        .split_whitespace()
        .take_while(|w| *w != "--")
        .any(|w| w == key || w.split_once('=').is_some_and(|(k, _)| k == key))
}

/// Compose the command line. Parameters the user or profile already set win: chvkit adds
/// `init=/init` and the PVM `clearcpuid=` only where no such parameter is present.
pub fn compose(p: &Parts<'_>) -> String {
    let words: Vec<&str> = [p.base, p.kernel, p.user.unwrap_or("")]
        .iter()
        .flat_map(|part| part.split_whitespace())
        .collect();
    // What follows `--` goes to init, not to the kernel: additions go before it.
    let split = words.iter().position(|w| *w == "--").unwrap_or(words.len());
    let (kernel, init) = words.split_at(split);
    let line = kernel.join(" ");
    let mut kernel = kernel.to_vec();
    // Direct kernel boot of a root disk without an initramfs runs /sbin/init, not the
    // generated /init (facts §5): name it.
    if !p.initramfs && !has_param(&line, "init") {
        kernel.push("init=/init");
    }
    if p.host == HostKind::Pvm && !has_param(&line, "clearcpuid") {
        kernel.push(PVM_CLEARCPUID);
    }
    kernel.extend_from_slice(init);
    kernel.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(initramfs: bool, host: HostKind, user: Option<&str>) -> Parts<'_> {
        Parts {
            base: "console=ttyS0 root=/dev/vda rw",
            kernel: "",
            user,
            initramfs,
            host,
        }
    }

    /// The `/sbin/init` defect (facts §5): without an initramfs the kernel must be told to run
    /// the generated `/init`.
    #[test]
    fn root_disk_without_initramfs_runs_the_generated_init() {
        let c = compose(&parts(false, HostKind::Hardware, None));
        assert_eq!(c, "console=ttyS0 root=/dev/vda rw init=/init");
        assert!(c.split_whitespace().any(|w| w == "init=/init"));
    }

    #[test]
    fn an_initramfs_keeps_its_own_init() {
        let c = compose(&parts(true, HostKind::Hardware, None));
        assert!(!c.contains("init="), "{c}");
    }

    #[test]
    fn pvm_hosts_get_clearcpuid_once() {
        let c = compose(&parts(false, HostKind::Pvm, None));
        assert!(c.ends_with(PVM_CLEARCPUID), "{c}");
        let c = compose(&parts(false, HostKind::Pvm, Some("clearcpuid=xsave")));
        assert_eq!(c.matches("clearcpuid").count(), 1, "{c}");
        assert!(!compose(&parts(false, HostKind::Hardware, None)).contains("clearcpuid"));
    }

    #[test]
    fn the_users_init_wins_and_init_arguments_stay_last() {
        let c = compose(&parts(false, HostKind::Hardware, Some("init=/bin/sh")));
        assert_eq!(c.matches("init=").count(), 1, "{c}");
        let c = compose(&parts(false, HostKind::Pvm, Some("quiet -- job-arg")));
        assert!(c.ends_with(" -- job-arg"), "{c}");
        assert!(
            c.contains("init=/init") && c.contains(PVM_CLEARCPUID),
            "{c}"
        );
        // `init=` after `--` is an argument to init, not the kernel's parameter.
        let c = compose(&parts(false, HostKind::Hardware, Some("-- init=x")));
        assert!(
            c.starts_with("console=ttyS0 root=/dev/vda rw init=/init -- "),
            "{c}"
        );
    }

    #[test]
    fn host_kind_from_sys_module() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(HostKind::detect_in(d.path()), HostKind::Hardware);
        std::fs::create_dir(d.path().join("kvm_pvm")).unwrap();
        assert_eq!(HostKind::detect_in(d.path()), HostKind::Pvm);
    }
}
