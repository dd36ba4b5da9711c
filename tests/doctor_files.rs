//! `chvkit doctor`'s artifact checks (`chv.*`, `firmware.*`, `kernel.file`) against files in
//! a temporary `--root`: present, missing, locked, pinned, wrong hash, wrong version, and
//! guest kernel images of each kind.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use chvkit::lockfile::{self, ArtifactLock, LockedArtifact};
use serde_json::Value;
use sha2::{Digest, Sha256};

const DEFAULT: &str = include_str!("../profiles/default.yaml");
const FW_PIN: &str = "4a0a1e977368f6b15d2198a216bdedf9a350bf5e5ae07e29e695373ec16ad958";

struct Root {
    dir: tempfile::TempDir,
}

impl Root {
    fn new() -> Root {
        Root {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p.trim_start_matches('/'))
    }

    fn write(&self, p: &str, bytes: &[u8], mode: u32) -> PathBuf {
        let path = self.path(p);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, bytes).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    /// A stand-in `cloud-hypervisor` that answers `--version` like the real one.
    fn fake_chv(&self, version_line: &str) -> PathBuf {
        self.write(
            "/usr/local/bin/cloud-hypervisor",
            format!("#!/bin/sh\necho '{version_line}'\n").as_bytes(),
            0o755,
        )
    }

    fn lock(&self, entries: &[(&str, &str, &Path)]) {
        let mut l = ArtifactLock::default();
        for (key, sha, path) in entries {
            l.artifacts.insert(
                key.to_string(),
                LockedArtifact {
                    url: "https://example.invalid/x".into(),
                    path: path.to_path_buf(),
                    sha256: sha.to_string(),
                    installed_at: 1,
                },
            );
        }
        l.save(&self.path("/var/lib/chvkit/artifacts.lock.json"))
            .unwrap();
    }

    fn profile(&self, text: &str) -> PathBuf {
        self.write("/profile.yaml", text.as_bytes(), 0o644)
    }
}

fn sha(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

struct Run {
    json: Value,
    raw: String,
    code: Option<i32>,
}

impl Run {
    fn get(&self, id: &str) -> &Value {
        self.json["checks"]
            .as_array()
            .and_then(|a| a.iter().find(|c| c["id"] == id))
            .unwrap_or_else(|| panic!("no {id}:\n{}", self.raw))
    }
    fn level(&self, id: &str) -> &str {
        self.get(id)["level"].as_str().unwrap_or("")
    }
    fn text(&self, id: &str, field: &str) -> String {
        self.get(id)[field].as_str().unwrap_or("").to_string()
    }
    fn assert_level(&self, id: &str, level: &str) {
        assert_eq!(self.level(id), level, "{id}:\n{}", self.raw);
    }
    /// `id`'s `field` (summary, detail, hint) mentions `needle`.
    fn assert_says(&self, id: &str, field: &str, needle: &str) {
        let text = self.text(id, field);
        assert!(
            text.contains(needle),
            "{id} {field} lacks `{needle}`: {text}\n{}",
            self.raw
        );
    }
}

fn doctor(root: &Root, profile: Option<&Path>, envs: &[(&str, &str)], only: &[&str]) -> Run {
    let mut c = Command::new(common::chvkit());
    c.arg("--root").arg(root.dir.path());
    if let Some(p) = profile {
        c.arg("--profile").arg(p);
    }
    c.args(["doctor", "--json"]);
    for o in only {
        c.args(["--only", o]);
    }
    c.env_remove("CHV_KERNEL_PATH");
    for (k, v) in envs {
        c.env(k, v);
    }
    let out = c.output().expect("run chvkit");
    let raw = common::text(&out);
    let json: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}:\n{raw}"));
    Run {
        json,
        raw,
        code: out.status.code(),
    }
}

#[test]
fn locked_artifacts_pass_and_v50_0_warns() {
    let root = Root::new();
    let chv = root.fake_chv("cloud-hypervisor v50.0.0");
    let fw = root.write(
        "/opt/cloud-hypervisor/hypervisor-fw",
        b"firmware bytes",
        0o644,
    );
    root.lock(&[
        (
            lockfile::CLOUD_HYPERVISOR,
            &sha(&chv),
            Path::new("/usr/local/bin/cloud-hypervisor"),
        ),
        (
            lockfile::FIRMWARE,
            &sha(&fw),
            Path::new("/opt/cloud-hypervisor/hypervisor-fw"),
        ),
    ]);
    // No firmware pin: the lock file is what the hash is checked against.
    let profile = root.profile(&DEFAULT.replace(&format!("sha256: {FW_PIN}"), "sha256: null"));
    let r = doctor(&root, Some(&profile), &[], &["chv", "firmware.file"]);
    r.assert_level("chv.binary", "PASS");
    r.assert_level("chv.checksum", "PASS");
    r.assert_says("chv.checksum", "summary", "lock");
    r.assert_level("firmware.file", "PASS");
    // `v50.0.0` is accepted as v50.0, and the advisory is named with the fix.
    r.assert_level("chv.version", "WARN");
    r.assert_says("chv.version", "summary", "GHSA-jmr4-g2hv-mjj6");
    r.assert_says("chv.version", "hint", "profiles/v50.2.yaml");
    assert_eq!(r.code, Some(0), "WARN alone exits 0:\n{}", r.raw);
}

#[test]
fn short_version_form_is_accepted() {
    let root = Root::new();
    root.fake_chv("cloud-hypervisor v50.0");
    let r = doctor(&root, None, &[], &["chv.version"]);
    r.assert_level("chv.version", "WARN");
    assert!(
        r.text("chv.version", "summary").starts_with("v50.0"),
        "{}",
        r.raw
    );
}

#[test]
fn wrong_hashes_fail_naming_expected_and_actual() {
    let root = Root::new();
    let chv = root.fake_chv("cloud-hypervisor v50.0");
    let fw = root.write(
        "/opt/cloud-hypervisor/hypervisor-fw",
        b"not the real firmware",
        0o644,
    );
    let recorded = "00".repeat(32);
    root.lock(&[(
        lockfile::CLOUD_HYPERVISOR,
        &recorded,
        Path::new("/usr/local/bin/cloud-hypervisor"),
    )]);
    let r = doctor(&root, None, &[], &["chv.checksum", "firmware.file"]);
    assert_eq!(r.code, Some(1), "{}", r.raw);
    let s = r.text("chv.checksum", "summary");
    r.assert_level("chv.checksum", "FAIL");
    assert!(s.contains(&recorded) && s.contains(&sha(&chv)), "{s}");
    // The default profile pins the firmware: its pin is the expected value.
    let s = r.text("firmware.file", "summary");
    r.assert_level("firmware.file", "FAIL");
    assert!(s.contains(FW_PIN) && s.contains(&sha(&fw)), "{s}");
    // The fix re-downloads from the profile's URL to the --root path.
    let hint = r.text("firmware.file", "hint");
    assert!(
        hint.contains("rust-hypervisor-firmware/releases/download/0.5.0/hypervisor-fw"),
        "{hint}"
    );
    assert!(hint.contains(&fw.display().to_string()), "{hint}");
}

#[test]
fn no_pin_and_no_lock_warns() {
    let root = Root::new();
    root.fake_chv("cloud-hypervisor v50.0");
    let r = doctor(&root, None, &[], &["chv.checksum"]);
    r.assert_level("chv.checksum", "WARN");
    r.assert_says("chv.checksum", "summary", "no sha256 pin");
    r.assert_says("chv.checksum", "detail", "artifacts.lock.json");
}

#[test]
fn corrupt_lock_file_fails() {
    let root = Root::new();
    root.fake_chv("cloud-hypervisor v50.0");
    root.write("/var/lib/chvkit/artifacts.lock.json", b"{", 0o644);
    let r = doctor(&root, None, &[], &["chv.checksum"]);
    r.assert_level("chv.checksum", "FAIL");
    r.assert_says("chv.checksum", "summary", "lock file");
}

#[test]
fn missing_artifacts_fail_and_dependents_skip() {
    let root = Root::new();
    let r = doctor(&root, None, &[], &["chv", "firmware.file"]);
    assert_eq!(r.code, Some(1), "{}", r.raw);
    r.assert_level("chv.binary", "FAIL");
    r.assert_level("firmware.file", "FAIL");
    r.assert_level("chv.version", "SKIP");
    r.assert_level("chv.checksum", "SKIP");
    let hint = r.text("chv.binary", "hint");
    assert!(
        hint.contains("cloud-hypervisor/releases/download/v50.0/cloud-hypervisor-static"),
        "{hint}"
    );
    assert!(hint.contains(
        &root
            .path("/usr/local/bin/cloud-hypervisor")
            .display()
            .to_string()
    ));
    r.assert_says("chv.binary", "detail", "GHSA-jmr4-g2hv-mjj6");
}

#[test]
fn not_executable_binary_fails_with_chmod() {
    let root = Root::new();
    let p = root.write(
        "/usr/local/bin/cloud-hypervisor",
        b"#!/bin/sh\necho v50.0\n",
        0o644,
    );
    let r = doctor(&root, None, &[], &["chv.binary"]);
    r.assert_level("chv.binary", "FAIL");
    assert_eq!(
        r.text("chv.binary", "hint"),
        format!("chmod 0755 {}", p.display())
    );
}

#[test]
fn version_mismatch_fails_and_v50_2_profile_passes() {
    let root = Root::new();
    root.fake_chv("cloud-hypervisor v50.2.0");
    let r = doctor(&root, None, &[], &["chv.version"]);
    r.assert_level("chv.version", "FAIL");
    r.assert_says("chv.version", "summary", "profile wants v50.0");
    let p = root.profile(include_str!("../profiles/v50.2.yaml"));
    let r = doctor(&root, Some(&p), &[], &["chv.version"]);
    r.assert_level("chv.version", "PASS");
}

#[test]
fn broken_binary_version_fails() {
    let root = Root::new();
    root.write(
        "/usr/local/bin/cloud-hypervisor",
        b"#!/bin/sh\necho boom >&2\nexit 3\n",
        0o755,
    );
    let r = doctor(&root, None, &[], &["chv.version"]);
    r.assert_level("chv.version", "FAIL");
    r.assert_says("chv.version", "detail", "boom");
}

fn bzimage() -> Vec<u8> {
    let mut b = vec![0u8; 0x400];
    b[0x202..0x206].copy_from_slice(b"HdrS");
    b[0x20e..0x210].copy_from_slice(&0x100u16.to_le_bytes());
    b[0x300..0x30c].copy_from_slice(b"6.1.0-test\0\0");
    b
}

/// A minimal ELF64 with one PT_NOTE holding `note_type`/`name`.
fn elf(note_name: &[u8], note_type: u32) -> Vec<u8> {
    common::testutil::elf_with_notes(&common::testutil::elf_note(
        note_name,
        note_type,
        &0x100_0000u32.to_le_bytes(),
    ))
}

#[test]
fn kernel_images() {
    let root = Root::new();
    // Not configured: firmware boot only, which cannot boot a raw ext4 rootfs.
    let r = doctor(&root, None, &[], &["kernel.file", "firmware.boot_mode"]);
    r.assert_level("kernel.file", "SKIP");
    r.assert_level("firmware.boot_mode", "WARN");
    r.assert_says("firmware.boot_mode", "detail", "EFI System Partition");

    let cases: [(&str, Vec<u8>, &str, &str); 4] = [
        ("/k/bzImage", bzimage(), "PASS", "bzImage"),
        ("/k/vmlinux-pvh", elf(b"Xen\0", 18), "PASS", "PVH"),
        (
            "/k/vmlinux-nopvh",
            elf(b"GNU\0", 3),
            "FAIL",
            "without a PVH",
        ),
        ("/k/junk", b"junk".to_vec(), "FAIL", "not a kernel"),
    ];
    for (p, bytes, level, words) in cases {
        root.write(p, &bytes, 0o644);
        let r = doctor(
            &root,
            None,
            &[("CHV_KERNEL_PATH", p)],
            &["kernel.file", "firmware.boot_mode"],
        );
        assert_eq!(r.level("kernel.file"), level, "{p}:\n{}", r.raw);
        assert!(
            r.text("kernel.file", "summary").contains(words),
            "{p}:\n{}",
            r.raw
        );
        r.assert_level("firmware.boot_mode", "PASS");
    }
    let r = doctor(
        &root,
        None,
        &[("CHV_KERNEL_PATH", "/k/absent")],
        &["kernel.file"],
    );
    r.assert_level("kernel.file", "FAIL");
}

#[test]
fn real_boot_kernel_is_a_bzimage() {
    let Some(k) = std::fs::read_dir("/boot").ok().and_then(|d| {
        d.filter_map(Result::ok).map(|e| e.path()).find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
    }) else {
        common::skip(
            "doctor_files::real_boot_kernel_is_a_bzimage",
            "no /boot/vmlinuz-*",
        );
        return;
    };
    if std::fs::File::open(&k).is_err() {
        common::skip(
            "doctor_files::real_boot_kernel_is_a_bzimage",
            "cannot read /boot/vmlinuz-*",
        );
        return;
    }
    let out = Command::new(common::chvkit())
        .args(["doctor", "--json", "--only", "kernel.file"])
        .env("CHV_KERNEL_PATH", &k)
        .output()
        .unwrap();
    let j: Value = serde_json::from_slice(&out.stdout).unwrap();
    let c = &j["checks"][0];
    assert_eq!(c["level"], "PASS", "{}", common::text(&out));
    let version = k
        .file_name()
        .unwrap()
        .to_string_lossy()
        .trim_start_matches("vmlinuz-")
        .to_string();
    assert!(
        c["detail"].as_str().unwrap_or("").contains(&version),
        "{}",
        common::text(&out)
    );
}
