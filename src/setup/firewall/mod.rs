//! Firewall drivers behind one trait (netavark's shape): the nftables driver owns a table, the
//! ip6tables driver owns a few chains and one jump into each. Both express the same rules:
//!
//! - NAT: masquerade traffic from the guest prefix that leaves through anything but the bridge;
//! - FORWARD: accept what comes in from the bridge, and related/established traffic back to it;
//! - host protection: from the bridge to the host itself only ICMPv6 (neighbour discovery
//!   included), established/related flows and TCP/UDP to the allowed ports; the rest is dropped.

pub mod iptables;
pub mod nft;

use super::state::FirewallRecord;
use crate::profile::{FirewallBackend, Ipv6Net};

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("{0}")]
    Unavailable(String),
    #[error("{what} failed: {message}")]
    Command { what: String, message: String },
}

/// What the rules are about, independent of the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    pub bridge: String,
    pub prefix: Ipv6Net,
    pub nat: bool,
    /// Host ports guests may reach, sorted and unique.
    pub host_ports: Vec<u16>,
    /// nftables table name (also the stem of the ip6tables chain names' owner).
    pub table: String,
}

/// What a driver found, judged against the rules.
#[derive(Debug, Clone)]
pub struct Inspection {
    pub found: String,
    pub up_to_date: bool,
}

pub trait Firewall {
    /// e.g. `nftables table inet chvkit`.
    fn describe(&self, rules: &Rules) -> String;
    /// The tool or library is there and the kernel accepts it. Runs before anything changes.
    fn preflight(&mut self) -> Result<(), FirewallError>;
    fn inspect(
        &mut self,
        rules: &Rules,
        recorded: Option<&FirewallRecord>,
    ) -> Result<Inspection, FirewallError>;
    /// Replace chvkit's rules with `rules`, leaving every other table, chain and rule alone.
    fn apply(&mut self, rules: &Rules) -> Result<FirewallRecord, FirewallError>;
    /// Whether anything `recorded` names still exists.
    fn present(&mut self, recorded: &FirewallRecord) -> Result<bool, FirewallError>;
    /// Remove what `recorded` names. `Ok(false)` when nothing was there.
    fn remove(&mut self, recorded: &FirewallRecord) -> Result<bool, FirewallError>;
    /// The script to keep in `paths.nft_file` (nftables only).
    fn persist_script(&self, rules: &Rules) -> Option<String>;
}

pub fn driver(backend: FirewallBackend) -> Box<dyn Firewall> {
    match backend {
        FirewallBackend::Nftables => Box::new(nft::NftDriver::new()),
        FirewallBackend::Iptables => Box::new(iptables::Ip6tablesDriver::new()),
    }
}

pub fn record_backend(r: &FirewallRecord) -> FirewallBackend {
    match r {
        FirewallRecord::Nftables { .. } => FirewallBackend::Nftables,
        FirewallRecord::Iptables { .. } => FirewallBackend::Iptables,
    }
}

pub fn backend_name(b: FirewallBackend) -> &'static str {
    match b {
        FirewallBackend::Nftables => "nftables",
        FirewallBackend::Iptables => "iptables",
    }
}

pub(crate) fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}
