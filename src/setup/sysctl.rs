//! Kernel parameters under /proc/sys. Networking ones are per network namespace, so they are
//! never prefixed by `--root`: they always describe the namespace chvkit runs in.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A sysctl named by its path below /proc/sys, e.g. `net/ipv6/conf/all/forwarding`. Keeping the
/// slash form makes interface names with dots (`eth0.100`) unambiguous.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Key(pub String);

impl Key {
    pub fn ipv6_conf(iface: &str, param: &str) -> Key {
        Key(format!("net/ipv6/conf/{iface}/{param}"))
    }

    pub fn proc_path(&self) -> PathBuf {
        PathBuf::from("/proc/sys").join(&self.0)
    }

    /// The interface a per-interface key belongs to (`None` for `all`/`default`).
    pub fn iface(&self) -> Option<&str> {
        let rest = self.0.strip_prefix("net/ipv6/conf/")?;
        let (iface, _) = rest.split_once('/')?;
        (iface != "all" && iface != "default").then_some(iface)
    }

    /// The spelling for sysctl.d: dots unless a component has a dot of its own, in which case
    /// sysctl.d(5) wants slashes throughout.
    pub fn sysctl_d(&self) -> String {
        if self.0.split('/').any(|c| c.contains('.')) {
            self.0.clone()
        } else {
            self.0.replace('/', ".")
        }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.sysctl_d())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SysctlError {
    #[error("cannot read sysctl {key} ({path}): {source}")]
    Read {
        key: Key,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set sysctl {key} to {value} ({path}): {source}")]
    Write {
        key: Key,
        value: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// `Ok(None)` when the key does not exist (e.g. the interface is gone).
pub fn read(key: &Key) -> Result<Option<String>, SysctlError> {
    let path = key.proc_path();
    match std::fs::read_to_string(&path) {
        Ok(v) => Ok(Some(v.trim().to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(SysctlError::Read {
            key: key.clone(),
            path,
            source,
        }),
    }
}

pub fn write(key: &Key, value: &str) -> Result<(), SysctlError> {
    let path = key.proc_path();
    std::fs::write(&path, format!("{value}\n")).map_err(|source| SysctlError::Write {
        key: key.clone(),
        value: value.to_string(),
        path,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_spellings() {
        let k = Key::ipv6_conf("chvbr0", "accept_dad");
        assert_eq!(k.sysctl_d(), "net.ipv6.conf.chvbr0.accept_dad");
        assert_eq!(k.iface(), Some("chvbr0"));
        let v = Key::ipv6_conf("eth0.100", "accept_ra");
        assert_eq!(v.sysctl_d(), "net/ipv6/conf/eth0.100/accept_ra");
        assert_eq!(Key::ipv6_conf("all", "forwarding").iface(), None);
        assert_eq!(
            Key::ipv6_conf("all", "forwarding").proc_path(),
            PathBuf::from("/proc/sys/net/ipv6/conf/all/forwarding")
        );
    }
}
