//! The rootfs cache: finished images keyed by image digest, /init generator version, the
//! injected busybox and every option that changes the bytes. A hit copies the cached image
//! (sparse, reflinked where the filesystem can) instead of unpacking and packing again.

use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Entries kept; older ones are removed after each store (images can be large).
pub const KEEP: usize = 4;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub image_digest: String,
    pub size_bytes: u64,
    pub init_shell: String,
    /// Outputs written from this entry (latest few), to recognise one unchanged next time.
    #[serde(default)]
    pub outputs: Vec<OutStamp>,
    /// `--bootable`: the disk's partitions and boot entry (the key covers the kernel,
    /// initramfs, command line and EFI loader, so a hit has the same ones).
    #[serde(default)]
    pub bootable: Option<super::bootable::Report>,
}

/// Identity of a file as written: any later write, chmod or replacement changes the ctime or
/// the inode, so a match means the file still holds the bytes chvkit put there.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OutStamp {
    pub path: PathBuf,
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl Entry {
    /// `out` is one of this entry's outputs, untouched since chvkit wrote it.
    pub fn wrote_unchanged(&self, out: &Path) -> bool {
        OutStamp::of(out).is_some_and(|now| self.outputs.contains(&now))
    }
}

impl OutStamp {
    pub fn of(path: &Path) -> Option<OutStamp> {
        use std::os::unix::fs::MetadataExt;
        let m = fs::symlink_metadata(path).ok()?;
        m.is_file().then(|| OutStamp {
            path: path.to_path_buf(),
            dev: m.dev(),
            ino: m.ino(),
            size: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        })
    }
}

pub struct Cache {
    dir: PathBuf,
}

/// The cache key: sha256 over a canonical JSON of everything that determines the output.
pub fn key(parts: &serde_json::Value) -> String {
    hex::encode(Sha256::digest(parts.to_string().as_bytes()))
}

impl Cache {
    pub fn new(dir: PathBuf) -> Cache {
        Cache { dir }
    }

    fn paths(&self, key: &str) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("{key}.raw")),
            self.dir.join(format!("{key}.json")),
        )
    }

    /// The cached image for `key`, if complete.
    pub fn lookup(&self, key: &str) -> Option<(PathBuf, Entry)> {
        let (raw, meta) = self.paths(key);
        let e: Entry = serde_json::from_slice(&fs::read(&meta).ok()?).ok()?;
        let len = fs::metadata(&raw).ok()?.len();
        (e.key == key && len == e.size_bytes).then_some((raw, e))
    }

    /// Store a copy of `img`; the metadata goes last so a torn store is never a hit.
    pub fn store(&self, img: &Path, e: &Entry) -> io::Result<()> {
        self.store_with(e, |f, _| copy_sparse(img, f))
    }

    /// Store an image `fill` writes into the (empty) file it is given, whose path it also
    /// gets; the metadata goes last so a torn store is never a hit.
    pub fn store_with(
        &self,
        e: &Entry,
        fill: impl FnOnce(&mut File, &Path) -> io::Result<()>,
    ) -> io::Result<()> {
        fs::create_dir_all(&self.dir)?;
        let (raw, meta) = self.paths(&e.key);
        let mut f = crate::fsutil::AtomicFile::create(&raw, 0o600)?;
        let tmp = f.tmp_path().to_path_buf();
        fill(f.file(), &tmp)?;
        f.commit()?;
        let json = serde_json::to_vec_pretty(e).map_err(io::Error::other)?;
        crate::fsutil::write_atomic(&meta, &json, 0o600)?;
        self.evict();
        Ok(())
    }

    fn evict(&self) {
        let Ok(rd) = fs::read_dir(&self.dir) else {
            return;
        };
        let mut metas: Vec<(std::time::SystemTime, PathBuf)> = rd
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        metas.sort();
        let n = metas.len().saturating_sub(KEEP);
        for (_, m) in metas.into_iter().take(n) {
            let _ = fs::remove_file(&m);
            let _ = fs::remove_file(m.with_extension("raw"));
        }
    }

    /// Record the output just written from `key` (also marks the entry as recently used,
    /// eviction being by metadata mtime).
    pub fn record_output(&self, key: &str, out: &Path) {
        let (_, meta) = self.paths(key);
        let Some(mut e) = fs::read(&meta)
            .ok()
            .and_then(|b| serde_json::from_slice::<Entry>(&b).ok())
        else {
            return;
        };
        e.outputs.retain(|o| o.path != out);
        if let Some(stamp) = OutStamp::of(out) {
            e.outputs.push(stamp);
        }
        let n = e.outputs.len().saturating_sub(8);
        e.outputs.drain(..n);
        if let Ok(json) = serde_json::to_vec_pretty(&e) {
            let _ = crate::fsutil::write_atomic(&meta, &json, 0o600);
        }
    }

    /// The image digest a build context fingerprint produced last time.
    pub fn context_digest(&self, fingerprint: &str) -> Option<String> {
        let p = self.dir.join(format!("ctx-{fingerprint}"));
        let d = fs::read_to_string(p).ok()?;
        let d = d.trim();
        d.starts_with("sha256:").then(|| d.to_string())
    }

    pub fn set_context_digest(&self, fingerprint: &str, digest: &str) {
        let _ = fs::create_dir_all(&self.dir);
        let p = self.dir.join(format!("ctx-{fingerprint}"));
        let _ = crate::fsutil::write_atomic(&p, format!("{digest}\n").as_bytes(), 0o600);
    }
}

/// Copy `src` into the empty file `dst` keeping holes: a reflink when the filesystem supports
/// it (O(1)), else only the data extents (SEEK_DATA/SEEK_HOLE + copy_file_range).
pub fn copy_sparse(src: &Path, dst: &mut File) -> io::Result<()> {
    let s = File::open(src)?;
    let len = s.metadata()?.len();
    // SAFETY: FICLONE takes the source fd as its argument; both fds are open for the call.
    let r = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, s.as_raw_fd()) };
    if r == 0 {
        return Ok(());
    }
    dst.set_len(len)?;
    let sfd = s.as_raw_fd();
    let dfd = dst.as_raw_fd();
    let mut pos: i64 = 0;
    let end = len as i64;
    while pos < end {
        // SAFETY: plain lseek on an fd we own.
        let data = unsafe { libc::lseek(sfd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole remains
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(sfd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut off_in = data;
        let mut off_out = data;
        while off_in < hole {
            super::proc::check()?;
            let want = (hole - off_in).min(1 << 30) as usize;
            // SAFETY: offsets are valid pointers to locals; fds are open.
            let n = unsafe { libc::copy_file_range(sfd, &mut off_in, dfd, &mut off_out, want, 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            if n == 0 {
                break;
            }
        }
        pos = hole;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        let mut f = File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.seek(SeekFrom::Start(10 << 20)).unwrap();
        f.write_all(&[7u8; 8192]).unwrap();
        f.seek(SeekFrom::Start((64 << 20) - 5)).unwrap();
        f.write_all(b"tail!").unwrap();
        drop(f);
        let dst = d.path().join("dst");
        let mut out = File::create(&dst).unwrap();
        copy_sparse(&src, &mut out).unwrap();
        drop(out);
        assert_eq!(fs::read(&src).unwrap(), fs::read(&dst).unwrap());
        assert!(fs::metadata(&dst).unwrap().blocks() * 512 < 4 << 20);
    }

    #[test]
    fn store_lookup_evict() {
        let d = tempfile::tempdir().unwrap();
        let c = Cache::new(d.path().join("c"));
        let img = d.path().join("img");
        fs::write(&img, b"abc").unwrap();
        for i in 0..KEEP + 2 {
            let e = Entry {
                key: format!("k{i}"),
                image_digest: "sha256:x".into(),
                size_bytes: 3,
                init_shell: "/bin/sh".into(),
                outputs: vec![],
                bootable: None,
            };
            c.store(&img, &e).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(c.lookup("k0").is_none());
        assert!(c.lookup(&format!("k{}", KEEP + 1)).is_some());
        assert_eq!(fs::read_dir(d.path().join("c")).unwrap().count(), KEEP * 2);
    }
}
