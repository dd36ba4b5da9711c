//! The env disk: how `launch` hands `/etc/checker.env` to a guest whose root disk it cannot
//! write before boot.
//!
//! Contract with the generated /init: a raw file holding the bytes of checker.env (as
//! [`crate::envfile::render`] writes them) padded with NUL bytes to a multiple of 4096, attached
//! as a read-only virtio disk, named on the kernel command line with `chvkit.env=/dev/vdX`.
//! /init copies it with `tr -d '\000'` to /etc/checker.env (mode 0600) and sources that.

use std::io::Write;
use std::path::Path;

use crate::envfile::EnvError;

/// Block size the file is padded to (virtio-blk needs whole sectors; 4 KiB suits every
/// logical block size).
pub const PAD: usize = 4096;

/// The kernel command line word that points /init at the env disk.
pub fn cmdline_arg(guest_dev: &str) -> String {
    format!("chvkit.env={guest_dev}")
}

#[derive(Debug, thiserror::Error)]
pub enum EnvDiskError {
    #[error(transparent)]
    Env(#[from] EnvError),
    #[error("cannot write env disk {path}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The disk's bytes for `pairs`.
pub fn render<K: AsRef<str>, V: AsRef<str>>(pairs: &[(K, V)]) -> Result<Vec<u8>, EnvError> {
    let mut data = crate::envfile::render(pairs)?.into_bytes();
    // At least one block even for an empty environment: a zero-length disk is refused by VMMs.
    let len = data.len().div_ceil(PAD).max(1) * PAD;
    data.resize(len, 0);
    Ok(data)
}

/// Write the env disk for `pairs` to `path` atomically (mode 0600: it may hold secrets).
pub fn write<K: AsRef<str>, V: AsRef<str>>(
    path: &Path,
    pairs: &[(K, V)],
) -> Result<(), EnvDiskError> {
    let data = render(pairs)?;
    let io = |source| EnvDiskError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = crate::fsutil::AtomicFile::create(path, 0o600).map_err(io)?;
    f.write_all(&data).map_err(io)?;
    f.commit().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padded_and_strippable() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("env.disk");
        write(&p, &[("CHECKER_GUEST_IP", "fdcd::2/16"), ("X", "a'b")]).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(bytes.len() % PAD, 0);
        let text: Vec<u8> = bytes.iter().copied().filter(|b| *b != 0).collect();
        assert_eq!(
            String::from_utf8(text).unwrap(),
            crate::envfile::render(&[("CHECKER_GUEST_IP", "fdcd::2/16"), ("X", "a'b")]).unwrap()
        );
        let empty: [(&str, &str); 0] = [];
        assert_eq!(render(&empty).unwrap().len(), PAD);
        assert!(write(&p, &[("A", "x\0")]).is_err());
        // The failed write left the previous file intact.
        assert_eq!(std::fs::read(&p).unwrap(), bytes);
    }
}
