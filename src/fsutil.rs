//! File helpers shared by every command: nothing chvkit writes is ever seen half-written.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{de::DeserializeOwned, Serialize};

/// A temporary file next to `dest` (same filesystem, so the final rename is atomic). It is
/// removed on drop unless [`AtomicFile::commit`] renamed it into place.
pub struct AtomicFile {
    file: Option<File>,
    tmp: PathBuf,
    dest: PathBuf,
}

impl AtomicFile {
    /// Create `dest`'s parent directories and an exclusive temp file beside it.
    pub fn create(dest: &Path, mode: u32) -> io::Result<AtomicFile> {
        let dir = dest
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        fs::create_dir_all(dir)?;
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut last_err = None;
        for _ in 0..16 {
            let mut rnd = [0u8; 6];
            getrandom::fill(&mut rnd).map_err(|e| io::Error::other(e.to_string()))?;
            let tmp = dir.join(format!(".{name}.chvkit-tmp-{}", hex::encode(rnd)));
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&tmp)
            {
                Ok(file) => {
                    // The umask may have cut bits the caller asked for (e.g. 0755 binaries).
                    file.set_permissions(fs::Permissions::from_mode(mode))?;
                    return Ok(AtomicFile {
                        file: Some(file),
                        tmp,
                        dest: dest.to_path_buf(),
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last_err = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or_else(|| io::Error::other("cannot create temp file")))
    }

    pub fn file(&mut self) -> &mut File {
        // Only `commit` takes the file, and it consumes self.
        self.file.as_mut().expect("AtomicFile used after commit")
    }

    pub fn tmp_path(&self) -> &Path {
        &self.tmp
    }

    /// fsync the data, rename over `dest`, fsync the directory.
    pub fn commit(mut self) -> io::Result<()> {
        if let Some(f) = self.file.take() {
            f.sync_all()?;
        }
        fs::rename(&self.tmp, &self.dest)?;
        if let Some(dir) = self.dest.parent() {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        // Renamed: nothing left for Drop to remove.
        self.tmp = PathBuf::new();
        Ok(())
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file().write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file().flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Write `data` to `dest` atomically with `mode`.
pub fn write_atomic(dest: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let mut f = AtomicFile::create(dest, mode)?;
    f.write_all(data)?;
    f.commit()
}

/// What can go wrong with a JSON file of chvkit's records ([`load_json`], [`save_json`]).
#[derive(Debug, thiserror::Error)]
pub enum JsonFileError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{what} {path} is not valid ({source}); move it away to start over")]
    Parse {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{what} {path} has schema {found}, this chvkit understands {expected}")]
    Schema {
        what: &'static str,
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("cannot write {what} {path}: {source}")]
    Write {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Load a JSON file chvkit keeps its records in (`what`, for messages: `lock file`). Its
/// `schema` field must be `schema`; that is checked first, so a file from a newer chvkit is
/// named as such rather than as invalid. `Ok(None)` when the file does not exist yet.
pub fn load_json<T: DeserializeOwned>(
    path: &Path,
    what: &'static str,
    schema: u32,
) -> Result<Option<T>, JsonFileError> {
    #[derive(serde::Deserialize)]
    struct Header {
        schema: u32,
    }
    let path = path.to_path_buf();
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(JsonFileError::Read { what, path, source }),
    };
    let found = match serde_json::from_str::<Header>(&text) {
        Ok(h) => h.schema,
        Err(source) => return Err(JsonFileError::Parse { what, path, source }),
    };
    if found != schema {
        return Err(JsonFileError::Schema {
            what,
            path,
            found,
            expected: schema,
        });
    }
    match serde_json::from_str(&text) {
        Ok(v) => Ok(Some(v)),
        Err(source) => Err(JsonFileError::Parse { what, path, source }),
    }
}

/// Write `v` as pretty JSON, atomically with `mode`, unless the file already holds exactly
/// that (a run that changes nothing leaves it byte-for-byte as it was). Returns whether it
/// wrote.
pub fn save_json<T: Serialize>(
    path: &Path,
    what: &'static str,
    v: &T,
    mode: u32,
) -> Result<bool, JsonFileError> {
    // Serialising plain data with string keys cannot fail.
    let mut text = serde_json::to_string_pretty(v).unwrap_or_default();
    text.push('\n');
    if fs::read(path).ok().as_deref() == Some(text.as_bytes()) {
        return Ok(false);
    }
    write_atomic(path, text.as_bytes(), mode).map_err(|source| JsonFileError::Write {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_and_abort() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/f");
        write_atomic(&p, b"one", 0o640).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"one");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o640
        );
        {
            let mut f = AtomicFile::create(&p, 0o644).unwrap();
            f.write_all(b"two").unwrap();
            // dropped without commit
        }
        assert_eq!(fs::read(&p).unwrap(), b"one");
        assert_eq!(fs::read_dir(d.path().join("sub")).unwrap().count(), 1);
    }
}
