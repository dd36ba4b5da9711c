//! External tools on `PATH` and their versions.
//!
//! Versions come from the dpkg database when the binary on `PATH` belongs to the package
//! (no process spawned); otherwise from `<tool> --version`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

pub const DPKG_STATUS: &str = "/var/lib/dpkg/status";
pub const DPKG_INFO: &str = "/var/lib/dpkg/info";

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ToolFacts {
    pub name: String,
    pub path: Option<PathBuf>,
    pub version: Option<String>,
    /// `dpkg` or `--version`.
    pub version_source: Option<String>,
}

/// The first executable `name` in `$PATH`.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|d| d.join(name))
        .find(|p| super::files::FileFacts::stat(p).executable())
}

/// Look tools up; `package` names the Debian package that ships each tool.
pub fn probe(tools: &[(&str, &str)]) -> Vec<ToolFacts> {
    let packages: Vec<&str> = tools.iter().map(|(_, p)| *p).collect();
    let versions = std::fs::File::open(DPKG_STATUS)
        .map(|f| dpkg_versions_from(f, &packages))
        .unwrap_or_else(|_| vec![None; tools.len()]);
    tools
        .iter()
        .zip(versions)
        .map(|((name, package), dpkg)| {
            let path = find_in_path(name);
            let mut t = ToolFacts {
                name: name.to_string(),
                path: path.clone(),
                version: None,
                version_source: None,
            };
            let Some(path) = path else { return t };
            if let Some(v) = dpkg {
                if dpkg_owns(Path::new(DPKG_INFO), package, &path) {
                    t.version = Some(v);
                    t.version_source = Some("dpkg".into());
                    return t;
                }
            }
            if let Ok(line) = super::files::binary_version(&path, Duration::from_secs(5)) {
                if !line.is_empty() {
                    t.version = Some(line);
                    t.version_source = Some("--version".into());
                }
            }
            t
        })
        .collect()
}

/// The installed version of `package` from dpkg's status file text.
pub fn dpkg_version(status: &str, package: &str) -> Option<String> {
    dpkg_versions(status, &[package]).pop().flatten()
}

/// Installed versions of several packages in one pass over dpkg's status file text.
pub fn dpkg_versions(status: &str, packages: &[&str]) -> Vec<Option<String>> {
    dpkg_versions_from(status.as_bytes(), packages)
}

/// [`dpkg_versions`] over a reader. The status file is most of a megabyte: streaming it through
/// a small buffer as bytes costs a fraction of reading it into one UTF-8 string.
pub fn dpkg_versions_from(r: impl std::io::Read, packages: &[&str]) -> Vec<Option<String>> {
    use std::io::BufRead;
    let mut out: Vec<Option<String>> = vec![None; packages.len()];
    let mut current: Option<usize> = None;
    let mut installed = false;
    let mut version: Option<String> = None;
    let mut r = std::io::BufReader::with_capacity(64 * 1024, r);
    let mut line: Vec<u8> = Vec::with_capacity(256);
    loop {
        line.clear();
        let n = r.read_until(b'\n', &mut line).unwrap_or(0);
        let l = line.strip_suffix(b"\n").unwrap_or(&line);
        if l.is_empty() {
            if let (Some(i), true, Some(v)) = (current, installed, version.take()) {
                out[i] = Some(v);
            }
            current = None;
            installed = false;
            version = None;
            if n == 0 {
                break;
            }
        } else if let Some(name) = l.strip_prefix(b"Package: ") {
            let name = name.trim_ascii();
            current = packages.iter().position(|p| p.as_bytes() == name);
        } else if current.is_some() {
            if let Some(v) = l.strip_prefix(b"Status: ") {
                installed = v.trim_ascii_end().ends_with(b" installed");
            } else if let Some(v) = l.strip_prefix(b"Version: ") {
                version = Some(String::from_utf8_lossy(v.trim_ascii()).into_owned());
            }
        }
    }
    out
}

/// Whether dpkg lists `path` (or its merged-/usr twin, or its resolved target) as a file of
/// `package`.
pub fn dpkg_owns(info_dir: &Path, package: &str, path: &Path) -> bool {
    let mut candidates = vec![path.to_path_buf()];
    if let Ok(c) = std::fs::canonicalize(path) {
        candidates.push(c);
    }
    let extra: Vec<PathBuf> = candidates
        .iter()
        .filter_map(|p| p.strip_prefix("/usr").ok().map(|r| Path::new("/").join(r)))
        .collect();
    candidates.extend(extra);
    let arch_list = format!("{package}:{}.list", dpkg_arch());
    for list in [format!("{package}.list"), arch_list] {
        let Ok(text) = std::fs::read_to_string(info_dir.join(list)) else {
            continue;
        };
        if text
            .lines()
            .any(|l| candidates.iter().any(|c| Path::new(l) == c))
        {
            return true;
        }
    }
    false
}

fn dpkg_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dpkg_status_parsing() {
        let s = "Package: e2fsprogs\nStatus: install ok installed\nVersion: 1.47.0-2\n\nPackage: umoci\nStatus: deinstall ok config-files\nVersion: 0.4.7\n\nPackage: xumoci\nStatus: install ok installed\nVersion: 9\n";
        assert_eq!(dpkg_version(s, "e2fsprogs").as_deref(), Some("1.47.0-2"));
        assert_eq!(dpkg_version(s, "umoci"), None);
        assert_eq!(dpkg_version(s, "buildah"), None);
        assert_eq!(dpkg_version(s, "xumoci").as_deref(), Some("9"));
        assert_eq!(
            dpkg_versions(s, &["umoci", "e2fsprogs"]),
            vec![None, Some("1.47.0-2".to_string())]
        );
    }

    #[test]
    fn dpkg_list_ownership() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("e2fsprogs.list"),
            "/.\n/sbin\n/sbin/mkfs.ext4\n",
        )
        .unwrap();
        assert!(dpkg_owns(
            d.path(),
            "e2fsprogs",
            Path::new("/usr/sbin/mkfs.ext4")
        ));
        assert!(!dpkg_owns(
            d.path(),
            "e2fsprogs",
            Path::new("/usr/local/sbin/mkfs.ext4")
        ));
        assert!(!dpkg_owns(
            d.path(),
            "buildah",
            Path::new("/usr/bin/buildah")
        ));
    }

    #[test]
    fn finds_sh() {
        assert!(find_in_path("sh").is_some());
        assert!(find_in_path("surely-not-a-tool-xyz").is_none());
    }
}
