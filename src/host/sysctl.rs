//! IPv6 and bridge-netfilter sysctls, read straight from `/proc/sys` (no `sysctl` process).
//!
//! Network sysctls belong to the network namespace of the reader, so they follow
//! `ip netns exec` and are never affected by `--root`.

use std::path::{Path, PathBuf};

use serde::Serialize;

/// Where the kernel exposes sysctls.
pub const PROC_SYS: &str = "/proc/sys";

/// The per-interface IPv6 settings doctor and setup care about. `None` = file absent
/// (interface gone, IPv6 disabled, or a kernel without the knob).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Ipv6Conf {
    pub accept_dad: Option<i64>,
    pub dad_transmits: Option<i64>,
    pub forwarding: Option<i64>,
    pub accept_ra: Option<i64>,
    pub disable_ipv6: Option<i64>,
}

/// A reader rooted at `/proc/sys` (tests point it at a temporary tree).
#[derive(Debug, Clone)]
pub struct Sysctls {
    base: PathBuf,
}

impl Default for Sysctls {
    fn default() -> Self {
        Sysctls::new()
    }
}

impl Sysctls {
    pub fn new() -> Sysctls {
        Sysctls {
            base: PathBuf::from(PROC_SYS),
        }
    }

    pub fn with_base(base: impl Into<PathBuf>) -> Sysctls {
        Sysctls { base: base.into() }
    }

    /// `net.ipv6.conf.<iface>.*`; `iface` may be `all` or `default`. A name that could escape
    /// the directory (`/`, `..`) reads as absent.
    pub fn ipv6_conf(&self, iface: &str) -> Ipv6Conf {
        if iface.is_empty() || iface.contains('/') || iface == "." || iface == ".." {
            return Ipv6Conf::default();
        }
        let dir = self.base.join("net/ipv6/conf").join(iface);
        Ipv6Conf {
            accept_dad: read_int(&dir.join("accept_dad")),
            dad_transmits: read_int(&dir.join("dad_transmits")),
            forwarding: read_int(&dir.join("forwarding")),
            accept_ra: read_int(&dir.join("accept_ra")),
            disable_ipv6: read_int(&dir.join("disable_ipv6")),
        }
    }

    /// `net.bridge.bridge-nf-call-ip6tables`: `None` when `br_netfilter` is not loaded.
    pub fn bridge_nf_call_ip6tables(&self) -> Option<i64> {
        read_int(&self.base.join("net/bridge/bridge-nf-call-ip6tables"))
    }

    /// Any sysctl by dotted name, e.g. `net.ipv6.conf.all.forwarding`. Interface names with
    /// dots cannot be expressed this way: use [`Sysctls::ipv6_conf`].
    pub fn get(&self, dotted: &str) -> Option<i64> {
        if dotted.split('.').any(|s| s.is_empty() || s == "..") {
            return None;
        }
        read_int(&self.base.join(dotted.replace('.', "/")))
    }
}

/// Read a file holding one integer; `None` if it is absent, unreadable or not a number.
pub fn read_int(path: &Path) -> Option<i64> {
    parse_int(&std::fs::read_to_string(path).ok()?)
}

pub fn parse_int(text: &str) -> Option<i64> {
    text.trim().parse().ok()
}

/// The `sysctl -w` key for an IPv6 per-interface setting. `sysctl` splits on dots, so an
/// interface name containing one needs the slash form.
pub fn ipv6_key(iface: &str, knob: &str) -> String {
    if iface.contains('.') {
        format!("net/ipv6/conf/{iface}/{knob}")
    } else {
        format!("net.ipv6.conf.{iface}.{knob}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_present_and_absent() {
        let d = tempfile::tempdir().unwrap();
        let conf = d.path().join("net/ipv6/conf/chvbr0");
        std::fs::create_dir_all(&conf).unwrap();
        std::fs::write(conf.join("accept_dad"), "0\n").unwrap();
        std::fs::write(conf.join("accept_ra"), "-1\n").unwrap();
        std::fs::write(conf.join("forwarding"), "garbage\n").unwrap();
        let s = Sysctls::with_base(d.path());
        let c = s.ipv6_conf("chvbr0");
        assert_eq!(c.accept_dad, Some(0));
        assert_eq!(c.accept_ra, Some(-1));
        assert_eq!(c.forwarding, None);
        assert_eq!(c.dad_transmits, None);
        assert_eq!(s.ipv6_conf("../../etc"), Ipv6Conf::default());
        assert_eq!(s.bridge_nf_call_ip6tables(), None);
        std::fs::create_dir_all(d.path().join("net/bridge")).unwrap();
        std::fs::write(d.path().join("net/bridge/bridge-nf-call-ip6tables"), "1").unwrap();
        assert_eq!(s.bridge_nf_call_ip6tables(), Some(1));
        assert_eq!(s.get("net.ipv6.conf.chvbr0.accept_dad"), Some(0));
        assert_eq!(s.get("net..x"), None);
    }

    #[test]
    fn keys() {
        assert_eq!(
            ipv6_key("chvbr0", "accept_dad"),
            "net.ipv6.conf.chvbr0.accept_dad"
        );
        assert_eq!(
            ipv6_key("eth0.10", "accept_ra"),
            "net/ipv6/conf/eth0.10/accept_ra"
        );
    }

    #[test]
    fn real_proc_has_all() {
        // Every Linux network namespace with IPv6 has `all`.
        let c = Sysctls::new().ipv6_conf("all");
        assert!(c.forwarding.is_some());
    }
}
