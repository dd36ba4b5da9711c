//! The `--root` prefix: every file chvkit reads or writes on the host goes through [`Root`], so
//! tests and image builders can point setup, doctor and teardown at a temporary tree.

use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Root(Option<PathBuf>);

impl Root {
    /// The real host (`/`).
    pub fn host() -> Root {
        Root(None)
    }

    /// A prefix directory; `/` is the same as [`Root::host`].
    pub fn new(dir: Option<PathBuf>) -> Root {
        match dir {
            Some(d) if d != Path::new("/") => Root(Some(d)),
            _ => Root(None),
        }
    }

    pub fn is_host(&self) -> bool {
        self.0.is_none()
    }

    pub fn prefix(&self) -> Option<&Path> {
        self.0.as_deref()
    }

    /// Map an absolute host path under the prefix. Relative paths are taken as relative to `/`.
    pub fn path(&self, p: impl AsRef<Path>) -> PathBuf {
        let p = p.as_ref();
        match &self.0 {
            None => p.to_path_buf(),
            Some(r) => r.join(p.strip_prefix("/").unwrap_or(p)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixing() {
        assert_eq!(Root::host().path("/etc/x"), PathBuf::from("/etc/x"));
        let r = Root::new(Some("/tmp/r".into()));
        assert_eq!(r.path("/etc/x"), PathBuf::from("/tmp/r/etc/x"));
        assert!(Root::new(Some("/".into())).is_host());
    }
}
