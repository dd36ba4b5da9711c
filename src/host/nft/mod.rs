//! The nftables ruleset, read in-process through `libnftables.so.1` as JSON and typed with the
//! `nftables` crate's schema (`nftables::schema`, `::stmt`, `::expr`).
//!
//! Rules written by `iptables-nft`/`ip6tables-nft` live here too (tables `ip6 nat`,
//! `ip6 filter`), so one listing covers both tools. Where the crate's schema falls short, a
//! small adapter fills in, and nothing else is modelled by hand:
//!
//! - xtables extensions: the kernel's JSON names them but does not describe them
//!   (`{"xt":{"type":"match","name":"conntrack"}}`), and the crate keeps that object as untyped
//!   JSON (`Statement::XT`). For rules with xt matches a second, text listing with handles
//!   supplies the rule's text (`ct state related,established`), see [`xt`];
//! - statements and objects the schema has no type for make the crate reject the whole
//!   document (its enums have no catch-all). Each ruleset object and each statement of a rule
//!   is therefore typed on its own, and what does not type is kept as JSON and logged: e.g. a
//!   masquerade with one flag (`{"flags":"random"}`: the crate expects a list), `meta sdif`
//!   (no such `MetaKey`), a verdict map (`"map":"verdict"` is no `SetType`). See [`Rule`].
//!
//! Commands run through [`Nft`], which `chvkit setup` also loads its table with. Only when the
//! library is absent does it spawn `nft` (`nft -j list ruleset` here).

mod ruleset;
mod run;
mod view;
pub mod xt;

use serde::Serialize;

// The crate's enums that doctor's questions are asked in, so that users need not depend on
// the crate's module layout.
pub use nftables::expr::MetaKey;
pub use nftables::types::{NfChainType, NfFamily, NfHook};
pub use ruleset::{Action, Chain, Reached, Rule, Ruleset, Table};
pub use run::{Nft, OUTPUT_HANDLE, OUTPUT_JSON, OUTPUT_STATELESS};
pub use view::{
    family_name, ifname_pattern_matches, ChainExt, Expr, ExprExt, Match, MatchExt, Members,
};

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("nftables: `{command}` failed: {message}")]
    Command { command: String, message: String },
    #[error(
        "nftables: cannot load libnftables ({lib_error}) and no `nft` command was found \
         (install nftables)"
    )]
    Unavailable { lib_error: String },
    #[error("nftables: unexpected JSON: {0}")]
    Json(String),
}

impl NftError {
    /// The ruleset could not be read for lack of privilege (listing needs CAP_NET_ADMIN).
    pub fn is_permission(&self) -> bool {
        match self {
            NftError::Command { message, .. } => {
                message.contains("Operation not permitted") || message.contains("Permission denied")
            }
            _ => false,
        }
    }
}

/// How the ruleset was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Library,
    NftCommand,
}

/// Whether this process has CAP_NET_ADMIN in its effective set (`None` if unknown).
pub fn has_cap_net_admin() -> Option<bool> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    cap_eff_has(&status, 12)
}

/// Test bit `cap` of the `CapEff:` line of a `/proc/PID/status` text.
pub fn cap_eff_has(status: &str, cap: u32) -> Option<bool> {
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    let bits = u64::from_str_radix(hex, 16).ok()?;
    Some(bits & (1u64 << cap) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities() {
        assert_eq!(cap_eff_has("CapEff:\t000001ffffffffff\n", 12), Some(true));
        assert_eq!(cap_eff_has("CapEff:\t0000000000000000\n", 12), Some(false));
        assert_eq!(cap_eff_has("Name: x\n", 12), None);
    }
}
