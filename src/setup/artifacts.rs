//! Artifacts: the cloud-hypervisor-static binary and the hypervisor-fw firmware.
//!
//! A download streams into a temp file beside its destination while the sha256 is computed
//! over the same bytes (no second read); the file is checked against the pin (or the lock-file
//! hash), fsynced, given its mode ([`PROGRAM_MODE`], or [`FIRMWARE_MODE`] for the firmware) and
//! renamed into place. Anything short of a verified, complete file leaves the installed one as
//! it was.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::fsutil::AtomicFile;
use crate::profile::HttpUrl;

/// Mode of the installed firmware: the one constant doctor's fix commands name too (it lives
/// in `doctor::artifacts`, the module both can reach).
pub use crate::doctor::artifacts::FIRMWARE_MODE;
/// Mode of installed programs (cloud-hypervisor).
pub const PROGRAM_MODE: u32 = 0o755;

/// The mode an artifact is installed with, by its lock-file key.
pub fn mode_for(key: &str) -> u32 {
    if key == crate::lockfile::FIRMWARE {
        FIRMWARE_MODE
    } else {
        PROGRAM_MODE
    }
}

/// Attempts per artifact, and the first back-off (doubled each time).
const ATTEMPTS: u32 = 4;
const BACKOFF: Duration = Duration::from_millis(200);
/// Start writeback every this many bytes so the final fsync has little left to do.
const WRITEBACK_EVERY: u64 = 8 << 20;

#[derive(Debug, Clone)]
pub struct Spec {
    /// Lock-file key (`cloud_hypervisor`, `firmware`).
    pub key: &'static str,
    /// e.g. `cloud-hypervisor v50.0`.
    pub label: String,
    pub url: HttpUrl,
    pub pin: Option<String>,
    /// Host path, without the `--root` prefix (what the lock file and messages name).
    pub host_path: PathBuf,
    /// Where it is written (with the prefix).
    pub dest: PathBuf,
}

/// Where the bytes come from: the profile URL, a mirror, or a local directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Profile,
    Mirror(String),
    Dir(PathBuf),
}

impl Source {
    /// `--artifacts-from`: an http(s) URL is a mirror, anything else a directory.
    pub fn parse(s: &str) -> Source {
        if s.starts_with("http://") || s.starts_with("https://") {
            Source::Mirror(s.to_string())
        } else {
            Source::Dir(PathBuf::from(s.strip_prefix("file://").unwrap_or(s)))
        }
    }

    pub fn locate(&self, spec: &Spec) -> Location {
        match self {
            Source::Profile => Location::Http(spec.url.0.clone()),
            Source::Mirror(base) => Location::Http(format!(
                "{}/{}",
                base.trim_end_matches('/'),
                spec.url.file_name()
            )),
            Source::Dir(d) => Location::File(d.join(spec.url.file_name())),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Http(String),
    File(PathBuf),
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Http(u) => f.write_str(u),
            Location::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// The hash an artifact must have, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expected {
    Pin(String),
    Lock(String),
}

impl Expected {
    pub fn sha(&self) -> &str {
        match self {
            Expected::Pin(s) | Expected::Lock(s) => s,
        }
    }
    pub fn origin(&self) -> &'static str {
        match self {
            Expected::Pin(_) => "the profile's pin",
            Expected::Lock(_) => "the lock file",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error(
        "{label}: sha256 mismatch for {location}: expected {expected} ({origin}), got {actual}; \
         nothing installed, {dest} left as it was"
    )]
    Mismatch {
        label: String,
        location: String,
        expected: String,
        origin: &'static str,
        actual: String,
        dest: String,
    },
    #[error(
        "{label}: could not fetch {location} after {attempts} attempt(s): {reason}; \
         expected sha256 {expected}{partial}; nothing installed, {dest} left as it was"
    )]
    Fetch {
        label: String,
        location: String,
        attempts: u32,
        reason: String,
        expected: String,
        /// `, got sha256 … over N bytes` when some body arrived.
        partial: String,
        dest: String,
    },
    #[error("{label}: {what} {path}: {source}")]
    Io {
        label: String,
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// sha256 of a file (the host model's streaming reader), or `None` when it does not exist.
pub fn sha256_file(path: &Path) -> std::io::Result<Option<String>> {
    match crate::host::files::sha256_file(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// What a successful install did.
#[derive(Debug, Clone)]
pub struct Installed {
    pub sha256: String,
    pub bytes: u64,
    /// `false` when the fetched file was identical to the one already there (nothing written).
    pub written: bool,
    pub elapsed: Duration,
}

/// How one attempt failed.
enum AttemptError {
    /// Worth another try: connection refused/reset, 5xx, body cut short.
    Transient {
        reason: String,
        partial: Option<(String, u64)>,
    },
    Permanent(Box<ArtifactError>),
    Status(String),
}

pub struct Fetcher {
    client: Option<reqwest::Client>,
    progress: bool,
}

impl Fetcher {
    /// `progress`: draw a progress bar (stderr is a terminal) instead of plain lines.
    pub fn new(progress: bool) -> Fetcher {
        Fetcher {
            client: None,
            progress,
        }
    }

    fn client(&mut self) -> Result<reqwest::Client, String> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let c = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(15))
            .read_timeout(Duration::from_secs(60))
            .user_agent(concat!("chvkit/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        self.client = Some(c.clone());
        Ok(c)
    }

    /// Fetch `loc` into a temp file beside `spec.dest`, verify, and rename it into place.
    /// `existing` is the sha256 of the file already installed, if any.
    pub fn install(
        &mut self,
        rt: &tokio::runtime::Runtime,
        spec: &Spec,
        loc: &Location,
        expected: Option<&Expected>,
        existing: Option<&str>,
    ) -> Result<Installed, Box<ArtifactError>> {
        let start = Instant::now();
        let mut attempts = 0;
        let mut last_reason = String::new();
        let mut last_partial: Option<(String, u64)> = None;
        let io = |what, path: &Path, source| {
            Box::new(ArtifactError::Io {
                label: spec.label.clone(),
                what,
                path: path.to_path_buf(),
                source,
            })
        };
        while attempts < ATTEMPTS {
            if attempts > 0 {
                let wait = BACKOFF * 2u32.pow(attempts - 1);
                eprintln!(
                    "  {}: retrying in {} ms ({last_reason})",
                    spec.label,
                    wait.as_millis()
                );
                std::thread::sleep(wait);
            }
            attempts += 1;
            let mut tmp = AtomicFile::create(&spec.dest, mode_for(spec.key))
                .map_err(|e| io("cannot create a temp file beside", &spec.dest, e))?;
            let result = match loc {
                Location::Http(url) => rt.block_on(self.fetch_http(spec, url, &mut tmp)),
                Location::File(p) => copy_file(spec, p, &mut tmp),
            };
            let (sha, bytes) = match result {
                Ok(v) => v,
                Err(AttemptError::Permanent(e)) => return Err(e),
                Err(AttemptError::Status(reason)) => {
                    last_reason = reason;
                    last_partial = None;
                    break;
                }
                Err(AttemptError::Transient { reason, partial }) => {
                    last_reason = reason;
                    if partial.is_some() {
                        last_partial = partial;
                    }
                    continue;
                }
            };
            if let Some(exp) = expected {
                if exp.sha() != sha {
                    return Err(Box::new(ArtifactError::Mismatch {
                        label: spec.label.clone(),
                        location: loc.to_string(),
                        expected: exp.sha().to_string(),
                        origin: exp.origin(),
                        actual: sha,
                        dest: spec.dest.display().to_string(),
                    }));
                }
            }
            let written = existing != Some(sha.as_str());
            if written {
                tmp.commit()
                    .map_err(|e| io("cannot install", &spec.dest, e))?;
            }
            // Not written: dropping `tmp` removes it, the identical file stays untouched.
            return Ok(Installed {
                sha256: sha,
                bytes,
                written,
                elapsed: start.elapsed(),
            });
        }
        Err(Box::new(ArtifactError::Fetch {
            label: spec.label.clone(),
            location: loc.to_string(),
            attempts,
            reason: last_reason,
            expected: expected
                .map(|e| format!("{} ({})", e.sha(), e.origin()))
                .unwrap_or_else(|| "unknown (no pin, nothing recorded yet)".into()),
            partial: last_partial
                .map(|(sha, n)| format!(", got sha256 {sha} over the {n} bytes that arrived"))
                .unwrap_or_default(),
            dest: spec.dest.display().to_string(),
        }))
    }

    async fn fetch_http(
        &mut self,
        spec: &Spec,
        url: &str,
        tmp: &mut AtomicFile,
    ) -> Result<(String, u64), AttemptError> {
        let client = self.client().map_err(|e| {
            AttemptError::Permanent(Box::new(ArtifactError::Fetch {
                label: spec.label.clone(),
                location: url.to_string(),
                attempts: 0,
                reason: e,
                expected: String::new(),
                partial: String::new(),
                dest: spec.dest.display().to_string(),
            }))
        })?;
        let mut resp = client
            .get(url)
            .send()
            .await
            .map_err(|e| AttemptError::Transient {
                reason: error_chain(&e),
                partial: None,
            })?;
        let status = resp.status();
        if !status.is_success() {
            let reason = format!("HTTP {status}");
            return Err(
                if status.is_server_error() || status.as_u16() == 408 || status.as_u16() == 429 {
                    AttemptError::Transient {
                        reason,
                        partial: None,
                    }
                } else {
                    AttemptError::Status(reason)
                },
            );
        }
        let total = resp.content_length();
        let mut progress = Progress::start(self.progress, &spec.label, url, total);
        let mut hasher = Sha256::new();
        let mut got: u64 = 0;
        let mut synced: u64 = 0;
        loop {
            let chunk = match resp.chunk().await {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    progress.abandon();
                    return Err(AttemptError::Transient {
                        reason: match total {
                            Some(t) => {
                                format!("body cut short: {got} of {t} bytes ({})", error_chain(&e))
                            }
                            None => {
                                format!("body cut short after {got} bytes ({})", error_chain(&e))
                            }
                        },
                        partial: Some((hex::encode(hasher.finalize()), got)),
                    });
                }
            };
            hasher.update(&chunk);
            tmp.write_all(&chunk).map_err(|e| {
                AttemptError::Permanent(Box::new(ArtifactError::Io {
                    label: spec.label.clone(),
                    what: "cannot write",
                    path: tmp.tmp_path().to_path_buf(),
                    source: e,
                }))
            })?;
            got += chunk.len() as u64;
            progress.set(got);
            if got - synced >= WRITEBACK_EVERY {
                start_writeback(tmp, synced, got - synced);
                synced = got;
            }
        }
        if let Some(t) = total {
            if got < t {
                progress.abandon();
                return Err(AttemptError::Transient {
                    reason: format!("body cut short: {got} of {t} bytes"),
                    partial: Some((hex::encode(hasher.finalize()), got)),
                });
            }
        }
        progress.finish(got);
        Ok((hex::encode(hasher.finalize()), got))
    }
}

/// Ask the kernel to begin writing this range now (no wait), so the data is mostly on disk by
/// the time the file is fsynced. Purely a hint: errors are ignored.
fn start_writeback(tmp: &mut AtomicFile, offset: u64, len: u64) {
    let fd = tmp.file().as_raw_fd();
    // SAFETY: fd is an open file owned by `tmp`; sync_file_range only reads its arguments.
    unsafe {
        libc::sync_file_range(
            fd,
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

fn copy_file(spec: &Spec, src: &Path, tmp: &mut AtomicFile) -> Result<(String, u64), AttemptError> {
    let mut f = File::open(src).map_err(|e| {
        AttemptError::Permanent(Box::new(ArtifactError::Io {
            label: spec.label.clone(),
            what: if e.kind() == std::io::ErrorKind::NotFound {
                "not found in the --artifacts-from directory:"
            } else {
                "cannot open"
            },
            path: src.to_path_buf(),
            source: e,
        }))
    })?;
    let perm = |what, path: &Path, e| {
        AttemptError::Permanent(Box::new(ArtifactError::Io {
            label: spec.label.clone(),
            what,
            path: path.to_path_buf(),
            source: e,
        }))
    };
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| perm("cannot read", src, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        tmp.write_all(&buf[..n])
            .map_err(|e| perm("cannot write", tmp.tmp_path(), e))?;
        got += n as u64;
    }
    Ok((hex::encode(h.finalize()), got))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// A progress bar on a terminal (bytes, rate, ETA); plain start/end lines otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    label: String,
    started: Instant,
}

impl Progress {
    fn start(tty: bool, label: &str, url: &str, total: Option<u64>) -> Progress {
        let bar = if tty {
            let b = match total {
                Some(t) => indicatif::ProgressBar::new(t),
                None => indicatif::ProgressBar::new_spinner(),
            };
            b.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            let tpl = if total.is_some() {
                "  {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}"
            } else {
                "  {msg} {spinner} {bytes} {bytes_per_sec}"
            };
            if let Ok(style) = indicatif::ProgressStyle::with_template(tpl) {
                b.set_style(style.progress_chars("=> "));
            }
            b.set_message(label.to_string());
            Some(b)
        } else {
            match total {
                Some(t) => eprintln!("  fetching {label} from {url} ({t} bytes)"),
                None => eprintln!("  fetching {label} from {url}"),
            }
            None
        };
        Progress {
            bar,
            label: label.to_string(),
            started: Instant::now(),
        }
    }

    fn set(&mut self, n: u64) {
        if let Some(b) = &self.bar {
            b.set_position(n);
        }
    }

    fn abandon(&mut self) {
        if let Some(b) = self.bar.take() {
            b.abandon();
        }
    }

    fn finish(&mut self, n: u64) {
        let secs = self.started.elapsed().as_secs_f64();
        match self.bar.take() {
            Some(b) => b.finish_and_clear(),
            None => {
                let rate = if secs > 0.0 {
                    n as f64 / secs / (1024.0 * 1024.0)
                } else {
                    0.0
                };
                eprintln!(
                    "  fetched {}: {n} bytes in {:.0} ms ({rate:.1} MiB/s)",
                    self.label,
                    secs * 1000.0
                );
            }
        }
    }
}

/// `security.capability` with cap_net_admin in the permitted and effective sets, as
/// `setcap cap_net_admin+ep` writes it (VFS_CAP_REVISION_2).
const CAP_NET_ADMIN: u32 = 12;
const VFS_CAP_REVISION_2: u32 = 0x0200_0000;
const VFS_CAP_REVISION_3: u32 = 0x0300_0000;
const VFS_CAP_REVISION_MASK: u32 = 0xFF00_0000;
const VFS_CAP_FLAGS_EFFECTIVE: u32 = 0x0000_0001;
const XATTR_CAPS: &[u8] = b"security.capability\0";

fn path_cstr(p: &Path) -> std::io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(p.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("path contains a NUL byte"))
}

/// Whether `path` carries cap_net_admin in its permitted and effective file capabilities.
pub fn has_cap_net_admin(path: &Path) -> std::io::Result<bool> {
    let c = path_cstr(path)?;
    let mut buf = [0u8; 24];
    // SAFETY: c and buf are valid for the given lengths.
    let n = unsafe {
        libc::getxattr(
            c.as_ptr(),
            XATTR_CAPS.as_ptr().cast(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENODATA) | Some(libc::ENOTSUP) => Ok(false),
            _ => Err(e),
        };
    }
    if n < 12 {
        return Ok(false);
    }
    let word = |i: usize| u32::from_le_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
    let magic = word(0);
    let rev = magic & VFS_CAP_REVISION_MASK;
    let rev_ok = rev == VFS_CAP_REVISION_2 || rev == VFS_CAP_REVISION_3;
    Ok(rev_ok && magic & VFS_CAP_FLAGS_EFFECTIVE != 0 && word(4) & (1 << CAP_NET_ADMIN) != 0)
}

pub fn set_cap_net_admin(path: &Path) -> std::io::Result<()> {
    let c = path_cstr(path)?;
    let mut v = Vec::with_capacity(20);
    v.extend_from_slice(&(VFS_CAP_REVISION_2 | VFS_CAP_FLAGS_EFFECTIVE).to_le_bytes());
    v.extend_from_slice(&(1u32 << CAP_NET_ADMIN).to_le_bytes()); // permitted[0]
    v.extend_from_slice(&0u32.to_le_bytes()); // inheritable[0]
    v.extend_from_slice(&0u32.to_le_bytes()); // permitted[1]
    v.extend_from_slice(&0u32.to_le_bytes()); // inheritable[1]
                                              // SAFETY: c and v are valid for the given lengths.
    let rc = unsafe {
        libc::setxattr(
            c.as_ptr(),
            XATTR_CAPS.as_ptr().cast(),
            v.as_ptr().cast(),
            v.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &Path) -> Spec {
        Spec {
            key: "firmware",
            label: "hypervisor-fw 0.5.0".into(),
            url: "https://example.org/rel/hypervisor-fw".parse().unwrap(),
            pin: None,
            host_path: "/opt/x/hypervisor-fw".into(),
            dest: dir.join("opt/x/hypervisor-fw"),
        }
    }

    #[test]
    fn source_lookup_uses_last_url_segment() {
        let d = tempfile::tempdir().unwrap();
        let s = spec(d.path());
        assert_eq!(
            Source::parse("http://127.0.0.1:1/m/").locate(&s),
            Location::Http("http://127.0.0.1:1/m/hypervisor-fw".into())
        );
        assert_eq!(
            Source::parse("/srv/mirror").locate(&s),
            Location::File("/srv/mirror/hypervisor-fw".into())
        );
    }

    #[test]
    fn dir_install_verifies_and_keeps_old_file_on_mismatch() {
        let d = tempfile::tempdir().unwrap();
        let s = spec(d.path());
        let src = d.path().join("mirror");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("hypervisor-fw"), b"firmware-one").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut f = Fetcher::new(false);
        let loc = Source::Dir(src.clone()).locate(&s);
        let one = f.install(&rt, &s, &loc, None, None).unwrap();
        assert!(one.written);
        assert_eq!(one.sha256, sha256_file(&s.dest).unwrap().unwrap());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&s.dest).unwrap().permissions().mode();
        // The firmware is data: installed with the mode doctor's fix names.
        assert_eq!(mode & 0o777, FIRMWARE_MODE);
        assert_eq!(FIRMWARE_MODE, 0o755);
        assert_eq!(mode_for(crate::lockfile::CLOUD_HYPERVISOR), 0o755);

        std::fs::write(src.join("hypervisor-fw"), b"firmware-two").unwrap();
        let e = f
            .install(&rt, &s, &loc, Some(&Expected::Pin("ab".repeat(32))), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&"ab".repeat(32)), "{e}");
        assert!(
            e.contains(&hex::encode(Sha256::digest(b"firmware-two"))),
            "{e}"
        );
        assert_eq!(std::fs::read(&s.dest).unwrap(), b"firmware-one");
        let leftovers = std::fs::read_dir(s.dest.parent().unwrap()).unwrap().count();
        assert_eq!(leftovers, 1, "no temp file left behind");

        let same = f
            .install(
                &rt,
                &s,
                &Source::Dir(src).locate(&s),
                None,
                Some(&hex::encode(Sha256::digest(b"firmware-two"))),
            )
            .unwrap();
        assert!(!same.written, "identical content is not rewritten");
    }
}
