//! The installed guest kernel: `<state_dir>/kernel/` holds `vmlinux` (and `initramfs.img` for
//! the distro source) and `guest.json`, the record of what was installed from where. Launch
//! boots it when no kernel is named; doctor judges it; `chvkit kernel` and setup write it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{fsutil, paths::Root, profile::Profile};

pub const SCHEMA: u32 = 1;
pub const DIR_NAME: &str = "kernel";
pub const RECORD: &str = "guest.json";
pub const VMLINUX: &str = "vmlinux";
pub const INITRAMFS: &str = "initramfs.img";
/// A string chvkit's own PVM patch puts in the kernel image (`guest/kernel/patches/`): a
/// kernel that carries it handles PVM's user-mode `SYSCALL`; one that does not cannot reach
/// user space on a PVM host (facts §5).
pub const PVM_MARKER: &[u8] = b"chvkit-pvm-syscall-fixup-v1";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Installed {
    pub schema: u32,
    /// `build`, `distro` or `path`.
    pub source: String,
    /// Human description of the input: the source package and recipe, the distro kernel, or
    /// the user's file.
    pub origin: String,
    /// Identity of the inputs (the build's cache key, or a hash of the input files): equal
    /// keys mean the installed kernel is what the profile asks for.
    pub key: String,
    /// Host paths (without the `--root` prefix).
    pub vmlinux: PathBuf,
    pub vmlinux_sha256: String,
    #[serde(default)]
    pub initramfs: Option<PathBuf>,
    #[serde(default)]
    pub initramfs_sha256: Option<String>,
    /// What this kernel needs on its command line beyond the profile's `vm.cmdline`.
    #[serde(default)]
    pub cmdline: String,
    #[serde(default)]
    pub linux_version: Option<String>,
    /// The image carries [`PVM_MARKER`].
    pub pvm_ready: bool,
    /// Unix seconds.
    pub installed_at: u64,
}

/// Where the installed kernel lives, on the host (no `--root` prefix).
pub fn host_dir(profile: &Profile) -> PathBuf {
    profile.paths.state_dir.as_path().join(DIR_NAME)
}

/// The record's path under `--root`.
pub fn record_path(profile: &Profile, root: &Root) -> PathBuf {
    root.path(host_dir(profile).join(RECORD))
}

/// `Ok(None)` when nothing is installed yet.
pub fn load(profile: &Profile, root: &Root) -> Result<Option<Installed>, fsutil::JsonFileError> {
    fsutil::load_json(&record_path(profile, root), "guest kernel record", SCHEMA)
}

pub fn save(rec: &Installed, profile: &Profile, root: &Root) -> Result<(), fsutil::JsonFileError> {
    fsutil::save_json(
        &record_path(profile, root),
        "guest kernel record",
        rec,
        0o644,
    )
    .map(|_| ())
}

/// Whether a kernel image carries chvkit's PVM changes.
pub fn has_pvm_marker(image: &[u8]) -> bool {
    memchr::memmem::find(image, PVM_MARKER).is_some()
}

/// [`has_pvm_marker`] of a file, read in pieces (a vmlinux is 10–60 MiB).
pub fn file_has_pvm_marker(path: &Path) -> std::io::Result<bool> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let finder = memchr::memmem::Finder::new(PVM_MARKER);
    let keep = PVM_MARKER.len() - 1;
    let mut buf = vec![0u8; 1 << 20];
    let mut have = 0usize;
    loop {
        let n = f.read(&mut buf[have..])?;
        if n == 0 {
            return Ok(false);
        }
        have += n;
        if finder.find(&buf[..have]).is_some() {
            return Ok(true);
        }
        // Keep the tail: the marker may straddle two reads.
        let tail = have.saturating_sub(keep);
        buf.copy_within(tail..have, 0);
        have -= tail;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_found_across_read_boundaries() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k");
        for at in [0usize, (1 << 20) - 5, (1 << 20) + 3, 3 << 20] {
            let mut img = vec![0u8; 4 << 20];
            img[at..at + PVM_MARKER.len()].copy_from_slice(PVM_MARKER);
            std::fs::write(&p, &img).unwrap();
            assert!(file_has_pvm_marker(&p).unwrap(), "marker at {at}");
            assert!(has_pvm_marker(&img));
        }
        std::fs::write(&p, vec![7u8; 3 << 20]).unwrap();
        assert!(!file_has_pvm_marker(&p).unwrap());
    }
}
