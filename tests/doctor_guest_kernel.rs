//! `chvkit doctor`'s `kernel.guest`: the kernel launch boots without `--kernel` (CHV_KERNEL_PATH,
//! else the one `chvkit kernel` installed, else kernel.path), judged in a temporary `--root`
//! against a fake `/sys/module` (`CHVKIT_SYS_MODULE`): an empty one is a hardware-KVM host, one
//! with `kvm_pvm/` a PVM host.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use chvkit::kernel::installed::{Installed, PVM_MARKER, SCHEMA};
use serde_json::Value;

const DEFAULT: &str = include_str!("../profiles/default.yaml");
const STATE: &str = "/var/lib/chvkit/kernel";

struct Env {
    dir: tempfile::TempDir,
}

#[derive(Clone, Copy, PartialEq)]
enum Host {
    Hardware,
    Pvm,
}

impl Env {
    fn new() -> Env {
        let e = Env {
            dir: tempfile::tempdir().unwrap(),
        };
        std::fs::create_dir_all(e.dir.path().join("sysmod-hw")).unwrap();
        std::fs::create_dir_all(e.dir.path().join("sysmod-pvm/kvm_pvm")).unwrap();
        e
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// `p` (absolute, as on the host) under the root.
    fn path(&self, p: &str) -> PathBuf {
        self.root().join(p.trim_start_matches('/'))
    }

    fn write(&self, p: &str, bytes: &[u8]) -> PathBuf {
        let path = self.path(p);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn profile(&self, source: &str, kernel_path: Option<&str>) -> PathBuf {
        let text = DEFAULT.replace("  source: build\n", &format!("  source: {source}\n"));
        let text = match kernel_path {
            Some(k) => text.replace("  path: null\n", &format!("  path: {k}\n")),
            None => text,
        };
        assert!(text.contains(&format!("source: {source}")));
        let p = self.dir.path().join("profile.yaml");
        std::fs::write(&p, text).unwrap();
        p
    }

    /// A record as `chvkit kernel` writes it, for `<state>/kernel/vmlinux`.
    fn record(&self, source: &str, pvm_ready: bool, initramfs: bool) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let rec = Installed {
            schema: SCHEMA,
            source: source.into(),
            origin: "linux-source-6.12 + chvkit recipe 0123456789ab".into(),
            key: "build:0123".into(),
            vmlinux: format!("{STATE}/vmlinux").into(),
            vmlinux_sha256: "00".repeat(32),
            initramfs: initramfs.then(|| format!("{STATE}/initramfs.img").into()),
            initramfs_sha256: initramfs.then(|| "11".repeat(32)),
            cmdline: String::new(),
            linux_version: Some("6.12.118".into()),
            pvm_ready,
            installed_at: now + 5,
        };
        self.write(
            &format!("{STATE}/guest.json"),
            &serde_json::to_vec_pretty(&rec).unwrap(),
        );
    }

    fn command(&self, host: Host, profile: Option<&Path>, envs: &[(&str, &str)]) -> Command {
        let mut c = Command::new(common::chvkit());
        c.arg("--root").arg(self.root());
        if let Some(p) = profile {
            c.arg("--profile").arg(p);
        }
        c.env_remove("CHV_KERNEL_PATH");
        c.env("NO_COLOR", "1");
        c.env(
            "CHVKIT_SYS_MODULE",
            self.dir.path().join(match host {
                Host::Hardware => "sysmod-hw",
                Host::Pvm => "sysmod-pvm",
            }),
        );
        for (k, v) in envs {
            c.env(k, v);
        }
        c
    }

    fn doctor(&self, host: Host, profile: Option<&Path>, envs: &[(&str, &str)]) -> Run {
        let out = self
            .command(host, profile, envs)
            .args([
                "doctor",
                "--json",
                "--only",
                "kernel",
                "--only",
                "firmware.boot_mode",
            ])
            .output()
            .expect("run chvkit");
        let raw = common::text(&out);
        let json: Value =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}:\n{raw}"));
        Run { json, raw }
    }

    fn human(&self, host: Host, profile: Option<&Path>) -> String {
        let out = self
            .command(host, profile, &[])
            .args(["doctor", "--only", "kernel.guest"])
            .output()
            .expect("run chvkit");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

struct Run {
    json: Value,
    raw: String,
}

impl Run {
    fn get(&self, id: &str) -> &Value {
        self.json["checks"]
            .as_array()
            .and_then(|a| a.iter().find(|c| c["id"] == id))
            .unwrap_or_else(|| panic!("no {id}:\n{}", self.raw))
    }
    fn text(&self, id: &str, field: &str) -> String {
        self.get(id)[field].as_str().unwrap_or("").to_string()
    }
    fn assert_level(&self, id: &str, level: &str) {
        assert_eq!(self.get(id)["level"], level, "{id}:\n{}", self.raw);
    }
    fn assert_says(&self, id: &str, field: &str, needle: &str) {
        let t = self.text(id, field);
        assert!(
            t.contains(needle),
            "{id} {field} lacks `{needle}`: {t}\n{}",
            self.raw
        );
    }
    fn assert_not_says(&self, id: &str, field: &str, needle: &str) {
        let t = self.text(id, field);
        assert!(
            !t.contains(needle),
            "{id} {field} has `{needle}`: {t}\n{}",
            self.raw
        );
    }
}

/// A tiny ELF64 vmlinux with a PT_NOTE holding the Xen PVH entry note (type 18), as
/// `host::files::has_xen_pvh_note` reads it; `marker` appends chvkit's PVM marker after it.
fn pvh_elf(marker: bool) -> Vec<u8> {
    let mut f = common::testutil::elf_with_notes(&common::testutil::pvh_note());
    f.extend(b"\0\0\0\0Linux version 6.12.118 (chvkit) #1\0");
    if marker {
        f.extend(PVM_MARKER);
    }
    f.extend([0u8; 64]);
    f
}

#[test]
fn nothing_installed_fails_naming_chvkit_kernel() {
    let e = Env::new();
    let r = e.doctor(Host::Hardware, None, &[]);
    r.assert_level("kernel.guest", "FAIL");
    r.assert_says("kernel.guest", "summary", "kernel.source: build");
    r.assert_says("kernel.guest", "hint", "chvkit kernel");
    r.assert_says("kernel.guest", "detail", "linux-source-6.12");
    r.assert_says("kernel.guest", "detail", "8 minutes on 2 cores");
    // Raw ext4 images cannot boot either: its fix is the same.
    r.assert_level("firmware.boot_mode", "WARN");
    r.assert_says("firmware.boot_mode", "hint", "chvkit kernel");

    let p = e.profile("distro", None);
    let r = e.doctor(Host::Pvm, Some(&p), &[]);
    r.assert_level("kernel.guest", "FAIL");
    r.assert_says("kernel.guest", "summary", "kernel.source: distro");
    r.assert_says("kernel.guest", "hint", "chvkit kernel --source build");
}

#[test]
fn source_none_skips() {
    let e = Env::new();
    let p = e.profile("none", None);
    let r = e.doctor(Host::Hardware, Some(&p), &[]);
    r.assert_level("kernel.guest", "SKIP");
    r.assert_says("kernel.guest", "summary", "each launch names its kernel");
    assert!(!r.text("kernel.guest", "hint").is_empty());
}

#[test]
fn installed_pvh_kernel_passes_on_hardware() {
    let e = Env::new();
    e.write(&format!("{STATE}/vmlinux"), &pvh_elf(false));
    e.record("build", false, false);
    let r = e.doctor(Host::Hardware, None, &[]);
    r.assert_level("kernel.guest", "PASS");
    r.assert_says(
        "kernel.guest",
        "summary",
        "Linux 6.12.118 (build, installed)",
    );
    r.assert_says("kernel.guest", "detail", "built in (chvkit's recipe)");
    r.assert_says(
        "kernel.guest",
        "detail",
        "command line (launch without --cmdline): console=ttyS0 root=/dev/vda rw init=/init chvkit.env=/etc/checker.env",
    );
    r.assert_not_says("kernel.guest", "detail", "clearcpuid");
    // No kernel named, but launch boots the installed one: direct boot works.
    r.assert_level("firmware.boot_mode", "PASS");
    // kernel.file is about a named file; none is named.
    r.assert_level("kernel.file", "SKIP");
}

#[test]
fn installed_kernel_on_pvm_needs_the_pvm_changes() {
    let e = Env::new();
    e.write(&format!("{STATE}/vmlinux"), &pvh_elf(true));
    e.record("build", true, false);
    let r = e.doctor(Host::Pvm, None, &[]);
    r.assert_level("kernel.guest", "PASS");
    r.assert_says("kernel.guest", "summary", "PVM-ready");
    r.assert_says("kernel.guest", "summary", "(estimate)");
    r.assert_says(
        "kernel.guest",
        "detail",
        "clearcpuid=xsave,popcnt,smap,erms,fsrm",
    );
    r.assert_says("kernel.guest", "detail", "docs/launch.md");

    let human = e.human(Host::Pvm, None);
    assert!(human.contains("PASS  kernel.guest  "), "{human}");

    // A kernel without the marker is not known to run here: a warning.
    e.record("path", false, false);
    let r = e.doctor(Host::Pvm, None, &[]);
    r.assert_level("kernel.guest", "WARN");
    r.assert_says(
        "kernel.guest",
        "summary",
        "not known to run on this PVM host",
    );
    // The distribution's kernel is known to be unmodified: it cannot run here.
    e.write(&format!("{STATE}/initramfs.img"), b"\x1f\x8b");
    e.record("distro", false, true);
    let r = e.doctor(Host::Pvm, None, &[]);
    r.assert_level("kernel.guest", "FAIL");
    r.assert_says("kernel.guest", "summary", "unmodified kernel");
    r.assert_says("kernel.guest", "detail", "user-mode SYSCALL");
    r.assert_says("kernel.guest", "detail", "clearcpuid=");
    assert_eq!(
        r.text("kernel.guest", "hint"),
        "sudo chvkit kernel --source build"
    );
    let human = e.human(Host::Pvm, None);
    assert!(human.contains("FAIL  kernel.guest  "), "{human}");
    assert!(
        human.contains("fix: sudo chvkit kernel --source build"),
        "{human}"
    );
}

#[test]
fn unrecorded_kernel_is_scanned_for_the_marker_on_pvm() {
    let e = Env::new();
    e.write("/k/vmlinux-marked", &pvh_elf(true));
    e.write("/k/vmlinux-plain", &pvh_elf(false));
    let r = e.doctor(Host::Pvm, None, &[("CHV_KERNEL_PATH", "/k/vmlinux-marked")]);
    r.assert_level("kernel.guest", "PASS");
    r.assert_says("kernel.guest", "summary", "PVM-ready");
    r.assert_says(
        "kernel.guest",
        "detail",
        "cannot be verified without the kernel's config",
    );
    let r = e.doctor(Host::Pvm, None, &[("CHV_KERNEL_PATH", "/k/vmlinux-plain")]);
    r.assert_level("kernel.guest", "WARN");
    r.assert_says("kernel.guest", "hint", "unset CHV_KERNEL_PATH");
    // Not duplicated: the file's format is kernel.file's and it passes.
    r.assert_level("kernel.file", "PASS");
    // On hardware KVM the same plain kernel is fine.
    let r = e.doctor(
        Host::Hardware,
        None,
        &[("CHV_KERNEL_PATH", "/k/vmlinux-plain")],
    );
    r.assert_level("kernel.guest", "PASS");
}

#[test]
fn broken_installed_files_fail_with_reinstall() {
    let e = Env::new();
    e.record("build", true, false);
    // Missing.
    let r = e.doctor(Host::Hardware, None, &[]);
    r.assert_level("kernel.guest", "FAIL");
    r.assert_says("kernel.guest", "summary", "missing");
    assert_eq!(r.text("kernel.guest", "hint"), "sudo chvkit kernel");
    // Truncated: a second program header (PT_LOAD) names a MiB at 4096 the file lacks.
    let mut two = pvh_elf(true);
    two[0x38..0x3a].copy_from_slice(&2u16.to_le_bytes());
    let mut load = vec![0u8; 56];
    load[0..4].copy_from_slice(&1u32.to_le_bytes());
    load[8..16].copy_from_slice(&4096u64.to_le_bytes());
    load[32..40].copy_from_slice(&(1u64 << 20).to_le_bytes());
    two.splice(120..120, load);
    // The note moved down by one header.
    two[64 + 8..64 + 16].copy_from_slice(&176u64.to_le_bytes());
    e.write(&format!("{STATE}/vmlinux"), &two);
    let r = e.doctor(Host::Hardware, None, &[]);
    r.assert_level("kernel.guest", "FAIL");
    r.assert_says("kernel.guest", "summary", "truncated");
    assert_eq!(r.text("kernel.guest", "hint"), "sudo chvkit kernel");
    // Not a kernel at all.
    e.write(&format!("{STATE}/vmlinux"), b"garbage");
    let r = e.doctor(Host::Hardware, None, &[]);
    r.assert_level("kernel.guest", "FAIL");
    r.assert_says("kernel.guest", "summary", "not a kernel image");
    // An unreadable record.
    e.write(&format!("{STATE}/guest.json"), b"{ not json");
    let r = e.doctor(Host::Hardware, None, &[]);
    r.assert_level("kernel.guest", "FAIL");
    r.assert_says("kernel.guest", "summary", "record unreadable");
    assert_eq!(r.text("kernel.guest", "hint"), "sudo chvkit kernel");
}

#[test]
fn distro_kernel_needs_its_initramfs() {
    let e = Env::new();
    e.write(&format!("{STATE}/vmlinux"), &pvh_elf(false));
    e.record("distro", false, true);
    let p = e.profile("distro", None);
    let r = e.doctor(Host::Hardware, Some(&p), &[]);
    r.assert_level("kernel.guest", "FAIL");
    r.assert_says("kernel.guest", "summary", "initramfs");
    e.write(&format!("{STATE}/initramfs.img"), b"cpio");
    let r = e.doctor(Host::Hardware, Some(&p), &[]);
    r.assert_level("kernel.guest", "PASS");
    r.assert_says("kernel.guest", "detail", "loaded by the initramfs");
    // An initramfs runs its own /init: no init= added.
    r.assert_not_says("kernel.guest", "detail", "init=/init");
}

#[test]
fn a_path_kernels_drivers_come_from_its_config() {
    let e = Env::new();
    e.write("/k/vmlinux-6.1.0-x", &pvh_elf(false));
    let p = e.profile("path", Some("/k/vmlinux-6.1.0-x"));
    // Nothing installed: launch boots kernel.path as it is.
    e.write(
        "/boot/config-6.1.0-x",
        b"CONFIG_VIRTIO_PCI=y\nCONFIG_VIRTIO_BLK=m\nCONFIG_VIRTIO_NET=m\nCONFIG_EXT4_FS=m\n",
    );
    let r = e.doctor(Host::Hardware, Some(&p), &[]);
    r.assert_level("kernel.guest", "WARN");
    r.assert_says("kernel.guest", "summary", "needs an initramfs");
    r.assert_says("kernel.guest", "detail", "boot/config-6.1.0-x");
    e.write(
        "/k/config-6.1.0-x",
        b"CONFIG_VIRTIO_PCI=y\n# CONFIG_VIRTIO_BLK is not set\nCONFIG_VIRTIO_NET=y\nCONFIG_EXT4_FS=y\n",
    );
    let r = e.doctor(Host::Hardware, Some(&p), &[]);
    r.assert_level("kernel.guest", "FAIL");
    r.assert_says("kernel.guest", "summary", "CONFIG_VIRTIO_BLK");
    assert_eq!(
        r.text("kernel.guest", "hint"),
        "sudo chvkit kernel --source build"
    );
}

#[test]
fn a_named_file_kernel_file_fails_is_not_judged_twice() {
    let e = Env::new();
    e.write("/k/junk", b"junk");
    let r = e.doctor(Host::Hardware, None, &[("CHV_KERNEL_PATH", "/k/junk")]);
    r.assert_level("kernel.file", "FAIL");
    r.assert_level("kernel.guest", "SKIP");
    r.assert_says("kernel.guest", "detail", "kernel.file");
    assert_eq!(
        r.text("kernel.guest", "hint"),
        r.text("kernel.file", "hint")
    );
    let r = e.doctor(Host::Hardware, None, &[("CHV_KERNEL_PATH", "/k/absent")]);
    r.assert_level("kernel.file", "FAIL");
    r.assert_level("kernel.guest", "SKIP");
}

#[test]
fn chv_kernel_path_overrides_the_installed_kernel() {
    let e = Env::new();
    e.write(&format!("{STATE}/vmlinux"), &pvh_elf(true));
    e.record("build", true, false);
    e.write("/k/vmlinux-plain", &pvh_elf(false));
    let r = e.doctor(Host::Pvm, None, &[("CHV_KERNEL_PATH", "/k/vmlinux-plain")]);
    r.assert_level("kernel.guest", "WARN");
    r.assert_says("kernel.guest", "detail", "overrides the installed kernel");
}
