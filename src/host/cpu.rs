//! CPU virtualization facts: vmx/svm flags, whether we run under a hypervisor, nested
//! virtualization, and PVM (the `kvm_pvm` module: software virtualization without vmx/svm).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde::Serialize;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CpuFacts {
    pub vendor: Option<String>,
    pub model_name: Option<String>,
    /// Intel VT-x.
    pub vmx: bool,
    /// AMD-V.
    pub svm: bool,
    /// The `hypervisor` flag: this machine is itself a guest.
    pub hypervisor: bool,
    /// `kvm_intel`/`kvm_amd`/`kvm_pvm` as loaded (from `/sys/module`).
    pub kvm_modules: Vec<String>,
    /// `nested` parameter of kvm_intel/kvm_amd, when loaded.
    pub nested: Option<bool>,
    /// `/sys/module/kvm_pvm` exists: `/dev/kvm` is PVM.
    pub pvm: bool,
}

impl CpuFacts {
    pub fn read() -> CpuFacts {
        CpuFacts::read_from(Path::new("/proc/cpuinfo"), Path::new("/sys/module"))
    }

    pub fn read_from(cpuinfo: &Path, sys_module: &Path) -> CpuFacts {
        let mut f = std::fs::File::open(cpuinfo)
            .map(|file| parse_cpuinfo(BufReader::new(file)))
            .unwrap_or_default();
        for m in ["kvm_intel", "kvm_amd", "kvm_pvm"] {
            if sys_module.join(m).exists() {
                f.kvm_modules.push(m.to_string());
            }
        }
        f.pvm = sys_module.join("kvm_pvm").exists();
        f.nested = ["kvm_intel", "kvm_amd"].iter().find_map(|m| {
            let p: PathBuf = sys_module.join(m).join("parameters/nested");
            let v = std::fs::read_to_string(p).ok()?;
            Some(matches!(v.trim(), "Y" | "y" | "1"))
        });
        f
    }

    pub fn hardware_virt(&self) -> bool {
        self.vmx || self.svm
    }
}

/// Parse the first processor block of `/proc/cpuinfo` (all CPUs share the flags that matter).
pub fn parse_cpuinfo(r: impl BufRead) -> CpuFacts {
    let mut f = CpuFacts::default();
    for line in r.lines() {
        let Ok(line) = line else { break };
        if line.trim().is_empty() {
            if f.vendor.is_some() || f.vmx || f.svm || f.hypervisor {
                break;
            }
            continue;
        }
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim();
        match k.trim() {
            "vendor_id" => f.vendor = Some(v.to_string()),
            "model name" => f.model_name = Some(v.to_string()),
            "flags" => {
                for flag in v.split_whitespace() {
                    match flag {
                        "vmx" => f.vmx = true,
                        "svm" => f.svm = true,
                        "hypervisor" => f.hypervisor = true,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_first_block() {
        let text = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Xeon\nflags\t\t: fpu vme hypervisor lahf_lm\n\nprocessor\t: 1\nflags\t\t: vmx\n";
        let f = parse_cpuinfo(text.as_bytes());
        assert_eq!(f.vendor.as_deref(), Some("GenuineIntel"));
        assert!(f.hypervisor && !f.vmx && !f.svm);
        let f = parse_cpuinfo("flags : fpu svm\n".as_bytes());
        assert!(f.svm && f.hardware_virt());
    }

    #[test]
    fn modules_and_nested() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("cpuinfo"), "flags : vmx\n").unwrap();
        let m = d.path().join("module");
        std::fs::create_dir_all(m.join("kvm_intel/parameters")).unwrap();
        std::fs::write(m.join("kvm_intel/parameters/nested"), "Y\n").unwrap();
        let f = CpuFacts::read_from(&d.path().join("cpuinfo"), &m);
        assert!(f.vmx && f.nested == Some(true) && !f.pvm);
        assert_eq!(f.kvm_modules, vec!["kvm_intel"]);
        std::fs::create_dir_all(m.join("kvm_pvm")).unwrap();
        assert!(CpuFacts::read_from(&d.path().join("cpuinfo"), &m).pvm);
    }
}
