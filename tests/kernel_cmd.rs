//! `chvkit kernel` on real kernel files, and the same step inside `setup` and `teardown`: a
//! bzImage is unpacked to a PVH ELF, an ELF without the PVH note and a truncated file are
//! refused by name with nothing written, the distro source writes an initramfs, the build
//! source installs chvkit's own (cached) kernel, a second run changes nothing.

mod common;
#[path = "setup_support/mod.rs"]
mod setup_support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use chvkit::host::files::{sniff_kernel, KernelImage};
use setup_support::{changed, env_with_mirror, json, results};

/// Debian's cloud kernel (a bzImage with an LZ4 payload).
fn cloud_bzimage() -> Option<PathBuf> {
    common::debian_cloud_kernel()
}

struct Tmp {
    dir: tempfile::TempDir,
}

impl Tmp {
    fn new() -> Tmp {
        Tmp {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }
    fn kernel_dir(&self) -> PathBuf {
        self.root().join("var/lib/chvkit/kernel")
    }
    fn chvkit(&self, args: &[&str]) -> Output {
        Command::new(common::chvkit())
            .arg("--root")
            .arg(self.root())
            .args(args)
            .env("NO_COLOR", "1")
            .env_remove("CHV_KERNEL_PATH")
            .output()
            .unwrap()
    }
    /// What is in the kernel dir (empty when absent), lock files aside.
    fn kernel_files(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.kernel_dir())
            .map(|r| {
                r.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n != "build-cache")
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

#[test]
fn kernel_unpacks_a_bzimage_and_a_second_run_changes_nothing() {
    let t = "kernel_unpacks_a_bzimage_and_a_second_run_changes_nothing";
    let Some(bz) = cloud_bzimage() else {
        common::skip(
            t,
            "no /boot/vmlinuz-*-cloud-amd64 (make test-deps installs one)",
        );
        return;
    };
    let tmp = Tmp::new();
    let bz_s = bz.to_str().unwrap();
    let o = tmp.chvkit(&["kernel", "--path", bz_s, "--json"]);
    assert!(o.status.success(), "{}", common::text(&o));
    let j = json(&o);
    assert_eq!(j["source"], "path");
    assert_eq!(j["changed"], true);
    assert!(j["initramfs"].is_null(), "{j}");
    let vmlinux = PathBuf::from(j["vmlinux"].as_str().unwrap());
    assert!(vmlinux.starts_with(tmp.root()), "{}", vmlinux.display());
    assert_eq!(sniff_kernel(&vmlinux).unwrap(), KernelImage::ElfPvh);
    assert_eq!(
        chvkit::host::files::sha256_file(&vmlinux).unwrap(),
        j["sha256"].as_str().unwrap()
    );
    assert!(j["cmdline"].as_str().unwrap().contains("init=/init"), "{j}");
    // Debian's kernel lacks chvkit's PVM changes.
    assert_eq!(j["pvm_ready"], false);
    let lock: serde_json::Value = serde_json::from_slice(
        &fs::read(tmp.root().join("var/lib/chvkit/artifacts.lock.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(lock["artifacts"]["guest_kernel"]["sha256"], j["sha256"]);

    let o = tmp.chvkit(&["kernel", "--path", bz_s, "--json"]);
    assert!(o.status.success(), "{}", common::text(&o));
    assert_eq!(json(&o)["changed"], false);
    // Human output names where it is and, on a PVM host, says this kernel will not run here.
    let o = tmp.chvkit(&["kernel", "--path", bz_s]);
    let out = common::text(&o);
    assert!(
        out.contains("unchanged") && out.contains(&vmlinux.display().to_string()),
        "{out}"
    );
    if Path::new("/sys/module/kvm_pvm").exists() {
        assert!(out.contains("PVM"), "{out}");
    }
}

#[test]
fn kernel_refuses_an_elf_without_pvh_and_a_truncated_bzimage_writing_nothing() {
    let t = "kernel_refuses_an_elf_without_pvh_and_a_truncated_bzimage_writing_nothing";
    let tmp = Tmp::new();
    // Any host ELF executable: an ELF, but no PVH entry note.
    let o = tmp.chvkit(&["kernel", "--path", "/bin/true"]);
    assert_eq!(o.status.code(), Some(1), "{}", common::text(&o));
    let e = common::text(&o);
    assert!(e.contains("/bin/true") && e.contains("PVH"), "{e}");
    assert!(tmp.kernel_files().is_empty(), "{:?}", tmp.kernel_files());

    let Some(bz) = cloud_bzimage() else {
        common::skip(t, "no /boot/vmlinuz-*-cloud-amd64 for the truncated case");
        return;
    };
    let bytes = fs::read(&bz).unwrap();
    let cut = tmp.dir.path().join("vmlinuz-cut");
    fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let o = tmp.chvkit(&["kernel", "--path", cut.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", common::text(&o));
    let e = common::text(&o);
    assert!(e.contains("vmlinuz-cut"), "{e}");
    assert!(tmp.kernel_files().is_empty(), "{:?}", tmp.kernel_files());
    // Not a kernel at all.
    let junk = tmp.dir.path().join("junk");
    fs::write(&junk, b"hello").unwrap();
    let o = tmp.chvkit(&["kernel", "--path", junk.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", common::text(&o));
    assert!(tmp.kernel_files().is_empty());
}

#[test]
fn kernel_distro_source_writes_an_initramfs() {
    let t = "kernel_distro_source_writes_an_initramfs";
    if cloud_bzimage().is_none() || !Path::new(chvkit::kernel::BUSYBOX).exists() {
        common::skip(
            t,
            "needs linux-image-cloud-amd64 and busybox-static (make test-deps)",
        );
        return;
    }
    let tmp = Tmp::new();
    let o = tmp.chvkit(&["kernel", "--source", "distro", "--json"]);
    assert!(o.status.success(), "{}", common::text(&o));
    let j = json(&o);
    assert_eq!(j["source"], "distro");
    let initramfs = PathBuf::from(j["initramfs"].as_str().expect("initramfs"));
    let head = fs::read(&initramfs).unwrap();
    assert_eq!(&head[..2], &[0x1f, 0x8b], "a gzip cpio");
    // The initramfs's /init runs the image's /init: the kernel is not told `init=`.
    assert!(
        !j["cmdline"].as_str().unwrap().contains("init=/init"),
        "{j}"
    );
    assert_eq!(
        sniff_kernel(Path::new(j["vmlinux"].as_str().unwrap())).unwrap(),
        KernelImage::ElfPvh
    );
    let o = tmp.chvkit(&["kernel", "--source", "distro", "--json"]);
    assert_eq!(json(&o)["changed"], false, "{}", common::text(&o));
    // Switching to a source without an initramfs removes the stale one.
    let bz = cloud_bzimage().unwrap();
    let o = tmp.chvkit(&["kernel", "--path", bz.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", common::text(&o));
    assert!(!initramfs.exists(), "stale initramfs left");
}

#[test]
fn kernel_build_source_installs_chvkits_own_kernel() {
    let t = "kernel_build_source_installs_chvkits_own_kernel";
    let tarball = Path::new(chvkit::kernel::build::SOURCE_TARBALL);
    let Some(cache) = std::env::var_os(chvkit::kernel::CACHE_ENV) else {
        common::skip(
            t,
            "CHVKIT_KERNEL_CACHE is not set (`make test` sets it after `make guest-kernel`)",
        );
        return;
    };
    if !tarball.exists() {
        common::skip(t, "linux-source-6.12 is not installed (make test-deps)");
        return;
    }
    let key = chvkit::kernel::build::cache_key(tarball).unwrap();
    if !Path::new(&cache).join(&key).join("vmlinux").exists() {
        common::skip(
            t,
            "chvkit's guest kernel is not built yet: run `make guest-kernel`",
        );
        return;
    }
    let tmp = Tmp::new();
    let o = Command::new(common::chvkit())
        .arg("--root")
        .arg(tmp.root())
        .args(["kernel", "--source", "build", "--json"])
        .env(chvkit::kernel::CACHE_ENV, &cache)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", common::text(&o));
    let j = json(&o);
    assert_eq!(j["built"], false, "the cache had it: {j}");
    assert_eq!(
        j["pvm_ready"], true,
        "chvkit's recipe carries the PVM changes: {j}"
    );
    assert_eq!(
        sniff_kernel(Path::new(j["vmlinux"].as_str().unwrap())).unwrap(),
        KernelImage::ElfPvh
    );
    assert!(
        j["origin"].as_str().unwrap().contains("linux-source-6.12"),
        "{j}"
    );
}

#[test]
fn setup_provides_the_kernel_and_teardown_removes_it() {
    let t = "setup_provides_the_kernel_and_teardown_removes_it";
    let Some(bz) = cloud_bzimage() else {
        common::skip(
            t,
            "no /boot/vmlinuz-*-cloud-amd64 (make test-deps installs one)",
        );
        return;
    };
    let path = format!("  source: path\n  path: {}", bz.display());
    let (env, _, mirror) = env_with_mirror("kset", 512, &[("  source: none\n  path: null", &path)]);
    let run = |args: &[&str]| {
        Command::new(common::chvkit())
            .args(env.args(args))
            .env("NO_COLOR", "1")
            .output()
            .unwrap()
    };
    let setup = [
        "setup",
        "--artifacts-only",
        "--json",
        "--artifacts-from",
        mirror.as_str(),
    ];
    let o = run(&setup);
    assert!(o.status.success(), "{}", common::text(&o));
    let r = results(&json(&o));
    assert!(
        r.contains(&("kernel.guest".into(), "changed".into())),
        "{r:?}"
    );
    let vmlinux = env.at("/var/lib/chvkit/kernel/vmlinux");
    assert_eq!(sniff_kernel(&vmlinux).unwrap(), KernelImage::ElfPvh);
    // Idempotent: nothing changes the second time.
    let o = run(&setup);
    assert_eq!(json(&o)["changed"], 0, "{}", common::text(&o));
    // The kernel was altered on disk: setup puts it back.
    fs::write(&vmlinux, b"tampered").unwrap();
    let o = run(&setup);
    assert_eq!(changed(&json(&o)), ["kernel.guest"], "{}", common::text(&o));
    assert_eq!(sniff_kernel(&vmlinux).unwrap(), KernelImage::ElfPvh);

    let o = run(&["teardown", "--json"]);
    assert!(o.status.success(), "{}", common::text(&o));
    assert!(!vmlinux.exists(), "teardown left the kernel");
    assert!(
        !env.at("/var/lib/chvkit/kernel/guest.json").exists(),
        "teardown left the record"
    );
}
