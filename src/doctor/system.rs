//! `kvm.*` and `cpu.virtualization`.

use super::facts::Facts;
use super::report::Finding;
use crate::host::cpu::CpuFacts;
use crate::host::kvm::{KvmFacts, KVM_API_VERSION};

fn kvm_module(cpu: Option<&CpuFacts>) -> &'static str {
    match cpu.and_then(|c| c.vendor.as_deref()) {
        Some("AuthenticAMD") | Some("HygonGenuine") => "kvm_amd",
        _ => "kvm_intel",
    }
}

const PVM_DETAIL: &str = "/dev/kvm is provided by kvm_pvm (PVM: virtualization in software, no vmx/svm). \
Cloud Hypervisor starts, creates and boots VMs and serves its whole API here. Guest kernels run \
through PVM's instruction emulation, slowly (tens of seconds to /init), and only with a few guest-side \
changes: chvkit's own guest kernel (`chvkit kernel`, kernel.source: build) carries them, and launch adds \
the `clearcpuid=` this host needs (see kernel.guest). The unmodified VMM's vm.snapshot fails with \
GetNestedState (EINVAL): snapshots need a VMM build that takes that EINVAL as \"no nested state\".";

pub fn device(f: &Facts) -> Finding {
    const ID: &str = "kvm.device";
    let Some(k) = &f.kvm else {
        return Finding::skip(ID, "not checked", "", "chvkit doctor --only kvm");
    };
    let cpu = f.cpu.as_ref();
    if !k.exists {
        let detail = match cpu {
            Some(c) if c.hardware_virt() => format!(
                "The CPU has {} but no KVM module provides /dev/kvm.",
                if c.vmx {
                    "vmx (Intel VT-x)"
                } else {
                    "svm (AMD-V)"
                }
            ),
            Some(c) if c.hypervisor => "This machine is a VM whose hypervisor exposes no vmx/svm: \
                enable nested virtualization for it on its host (or pick an instance type that \
                has it), then load the module."
                .to_string(),
            _ => "The CPU reports no vmx/svm: enable Intel VT-x / AMD-V (SVM) in the firmware \
                  setup, then load the module."
                .to_string(),
        };
        return Finding::fail(
            ID,
            format!("{} does not exist", k.path.display()),
            detail,
            format!("modprobe {}", kvm_module(cpu)),
        );
    }
    if !k.char_device {
        return Finding::fail(
            ID,
            format!("{} is not a character device", k.path.display()),
            "Something replaced the device node with a regular file or directory.",
            format!(
                "rm -rf {0} && mknod -m 0660 {0} c 10 232 && chgrp kvm {0}",
                k.path.display()
            ),
        );
    }
    Finding::pass(
        ID,
        format!("{} present ({})", k.path.display(), owner_mode(k)),
        "",
    )
}

fn owner_mode(k: &KvmFacts) -> String {
    let group = k
        .group_name
        .clone()
        .or_else(|| k.gid.map(|g| g.to_string()))
        .unwrap_or_else(|| "?".into());
    format!("mode {:04o}, group {group}", k.mode.unwrap_or(0))
}

pub fn access(f: &Facts) -> Finding {
    const ID: &str = "kvm.access";
    let Some(k) = f.kvm.as_ref().filter(|k| k.exists && k.char_device) else {
        return Finding::skip(
            ID,
            "no /dev/kvm to check",
            "Depends on kvm.device.",
            format!("modprobe {}", kvm_module(f.cpu.as_ref())),
        );
    };
    let user = &f.user;
    let who = user.display_name();
    let group = k.group_name.clone().unwrap_or_else(|| "kvm".into());
    let can = if user.via_sudo {
        k.mode_allows(user)
    } else {
        k.open.is_ok()
    };
    if !can {
        let why = match &k.open {
            Err(e) if !user.via_sudo => format!("open(O_RDWR) failed: {e}. "),
            _ => String::new(),
        };
        let hint = if k.gid == Some(0) || k.mode.is_some_and(|m| m & 0o060 != 0o060) {
            format!(
                "chgrp kvm {0} && chmod 0660 {0} && usermod -aG kvm {who}",
                k.path.display()
            )
        } else {
            format!("usermod -aG {group} {who}")
        };
        return Finding::fail(
            ID,
            format!("{who} cannot open {}", k.path.display()),
            format!(
                "{why}{} has {}; {who} is not its owner and not in group {group}. Group \
                 membership takes effect at the next login (or `newgrp {group}`).",
                k.path.display(),
                owner_mode(k)
            ),
            hint,
        );
    }
    if k.world_writable() {
        return Finding::warn(
            ID,
            format!("{} is world-writable", k.path.display()),
            format!(
                "{}: every local user can use the hypervisor. Grant access through the kvm group \
                 instead (the seed's `chmod 666` is the cause on many hosts). udev restores the \
                 mode at boot from its rules.",
                owner_mode(k)
            ),
            format!("chgrp kvm {0} && chmod 0660 {0}", k.path.display()),
        );
    }
    let note = if user.uid == 0 {
        format!(
            "Running as root. Other users need group {group} ({}).",
            owner_mode(k)
        )
    } else {
        format!("{who} may open it ({}).", owner_mode(k))
    };
    Finding::pass(ID, format!("{who} can open {}", k.path.display()), note)
}

pub fn usable(f: &Facts) -> Finding {
    const ID: &str = "kvm.usable";
    let Some(k) = &f.kvm else {
        return Finding::skip(ID, "not checked", "", "chvkit doctor --only kvm");
    };
    if let Err(e) = &k.open {
        return Finding::skip(
            ID,
            "cannot open /dev/kvm as this process",
            format!("open: {e}. Depends on kvm.device and kvm.access (their fixes apply)."),
            if k.exists {
                format!("usermod -aG kvm {}", f.user.display_name())
            } else {
                format!("modprobe {}", kvm_module(f.cpu.as_ref()))
            },
        );
    }
    let pvm = f.cpu.as_ref().is_some_and(|c| c.pvm);
    match (k.api_version, &k.create_vm) {
        (None, _) => Finding::fail(
            ID,
            "KVM_GET_API_VERSION failed",
            "The device opened but does not answer the KVM API: it is not a KVM device.",
            format!("modprobe -r {0}; modprobe {0}", kvm_module(f.cpu.as_ref())),
        ),
        (Some(v), _) if v != KVM_API_VERSION => Finding::fail(
            ID,
            format!("KVM API version {v}, expected {KVM_API_VERSION}"),
            "Cloud Hypervisor requires KVM API version 12.",
            "use a mainline Linux kernel (any since 2.6.22 reports 12)",
        ),
        (_, Some(Err(e))) => Finding::fail(
            ID,
            format!("KVM_CREATE_VM failed: {e}"),
            if pvm {
                PVM_DETAIL.to_string()
            } else {
                "The kernel refused to create a VM. Common causes: another hypervisor holds \
                 VT-x/AMD-V (VirtualBox, VMware), or nested virtualization is off on the outer \
                 host."
                    .to_string()
            },
            format!(
                "dmesg | grep -i kvm; modprobe -r {0}; modprobe {0}",
                kvm_module(f.cpu.as_ref())
            ),
        ),
        _ => Finding::pass(
            ID,
            "KVM API 12; KVM_CREATE_VM succeeds",
            if pvm {
                "The VM is created by kvm_pvm: see cpu.virtualization for what runs on it."
            } else {
                ""
            },
        ),
    }
}

pub fn cpu_virtualization(f: &Facts) -> Finding {
    const ID: &str = "cpu.virtualization";
    let Some(c) = &f.cpu else {
        return Finding::skip(ID, "not checked", "", "chvkit doctor --only cpu");
    };
    if c.pvm {
        return Finding::warn(
            ID,
            "PVM host: only kernels with chvkit's PVM changes reach user space; snapshots need a patched VMM",
            format!(
                "{PVM_DETAIL} CPU flags: {}{}.",
                if c.hardware_virt() { "vmx/svm present" } else { "no vmx/svm" },
                if c.hypervisor { ", running under a hypervisor" } else { "" }
            ),
            "sudo chvkit kernel --source build   # a guest kernel that runs here; for snapshots \
             with the stock VMM use a host with vmx/svm",
        );
    }
    if c.hardware_virt() {
        let kind = if c.vmx {
            "vmx (Intel VT-x)"
        } else {
            "svm (AMD-V)"
        };
        let nested = if c.hypervisor {
            " Running as a guest of another hypervisor (nested virtualization)."
        } else {
            ""
        };
        let nested_param = match c.nested {
            Some(true) => " This host lets its own guests nest further (nested=Y).",
            _ => "",
        };
        return Finding::pass(
            ID,
            format!("{kind}{}", if c.hypervisor { ", nested" } else { "" }),
            format!("{nested}{nested_param}").trim().to_string(),
        );
    }
    let (detail, hint) = if c.hypervisor {
        (
            "This machine is a VM and its hypervisor does not expose vmx/svm.",
            "enable nested virtualization for this VM on its host (KVM host: `modprobe -r kvm_intel; \
             modprobe kvm_intel nested=1`; clouds: an instance type with nested virtualization)",
        )
    } else {
        (
            "The CPU reports no vmx/svm flags: virtualization is disabled in the firmware or \
             unsupported.",
            "enable Intel VT-x / AMD-V (SVM) in the firmware setup and reboot",
        )
    };
    Finding::fail(ID, "no hardware virtualization (no vmx/svm)", detail, hint)
}
