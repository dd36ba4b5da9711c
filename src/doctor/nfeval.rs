//! A small evaluator that answers "what happens to this packet?" over the nftables ruleset:
//! enough of nftables' semantics for the packets doctor cares about (guest to internet,
//! internet back to guest, guest to host, guest to guest through br_netfilter).
//!
//! Matches are judged three-valued: a match on something the probe packet does not model
//! (source port, marks, an xtables match whose text could not be read, a match the
//! `nftables` crate's schema cannot type) is `Maybe`, which is treated as "does not match" and
//! reported, so a verdict never rests on a guess silently.

use std::net::Ipv6Addr;

use nftables::expr::MetaKey;
use nftables::stmt::Operator;
use nftables::types::{NfChainType, NfHook};

use crate::host::nft::{Action, Chain, ChainExt, Match, MatchExt, Members, Rule, Ruleset};
use crate::profile::prefix_mask;

/// The packet being judged.
#[derive(Debug, Clone, Default)]
pub struct Packet<'a> {
    pub iif: Option<&'a str>,
    pub oif: Option<&'a str>,
    /// Source addresses as a prefix: "any guest" is the whole guest prefix.
    pub saddr: Option<(Ipv6Addr, u8)>,
    pub daddr: Option<(Ipv6Addr, u8)>,
    /// `tcp`, `udp` or `ipv6-icmp`.
    pub l4proto: Option<&'a str>,
    pub dport: Option<u16>,
    /// `new`, `established` or `related`.
    pub ct_state: &'a str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tri {
    Yes,
    No,
    Maybe,
}

impl Tri {
    fn and(self, o: Tri) -> Tri {
        match (self, o) {
            (Tri::No, _) | (_, Tri::No) => Tri::No,
            (Tri::Maybe, _) | (_, Tri::Maybe) => Tri::Maybe,
            _ => Tri::Yes,
        }
    }
    fn not(self) -> Tri {
        match self {
            Tri::Yes => Tri::No,
            Tri::No => Tri::Yes,
            Tri::Maybe => Tri::Maybe,
        }
    }
}

/// How a base chain treated the packet.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome<'a> {
    Accept(&'a Rule),
    Drop(&'a Rule),
    /// `masquerade` or `snat`.
    Nat(&'a Rule),
    /// No rule decided: the chain policy applies.
    Policy,
}

/// The judgement of one base chain.
#[derive(Debug, Clone)]
pub struct ChainVerdict<'a> {
    pub chain: &'a Chain,
    pub outcome: Outcome<'a>,
    /// Rules that might have matched but could not be judged.
    pub uncertain: Vec<&'a Rule>,
}

impl ChainVerdict<'_> {
    /// Whether the packet leaves this chain alive.
    pub fn passes(&self) -> bool {
        match &self.outcome {
            Outcome::Drop(_) => false,
            Outcome::Policy => !self.chain.policy_drops(),
            _ => true,
        }
    }
    /// Decided by a rule rather than by the policy.
    pub fn explicit(&self) -> Option<&Rule> {
        match &self.outcome {
            Outcome::Accept(r) | Outcome::Drop(r) | Outcome::Nat(r) => Some(r),
            Outcome::Policy => None,
        }
    }
    /// `ip6 filter FORWARD: accepted by handle 2` style description.
    pub fn describe(&self) -> String {
        let c = self.chain.spec();
        match &self.outcome {
            Outcome::Accept(r) => format!("{c}: accepted by rule handle {}", r.handle()),
            Outcome::Drop(r) => format!("{c}: dropped by rule handle {}", r.handle()),
            Outcome::Nat(r) => format!("{c}: translated by rule handle {}", r.handle()),
            Outcome::Policy => format!("{c}: no rule matched, policy {}", self.chain.policy_name()),
        }
    }
}

/// Judge `pkt` in every IPv6 base chain at `hook` (of `chain_type` if given), by priority.
pub fn judge_hook<'a>(
    rs: &'a Ruleset,
    hook: NfHook,
    chain_type: Option<NfChainType>,
    pkt: &Packet<'_>,
) -> Vec<ChainVerdict<'a>> {
    let mut chains: Vec<&Chain> = rs
        .ipv6_base_chains(hook)
        .filter(|c| chain_type.is_none_or(|t| c._type == Some(t)))
        .collect();
    chains.sort_by_key(|c| c.prio.unwrap_or(0));
    chains
        .into_iter()
        .map(|chain| {
            let mut uncertain = Vec::new();
            let outcome = eval_chain(rs, chain, pkt, 0, &mut uncertain).unwrap_or(Outcome::Policy);
            ChainVerdict {
                chain,
                outcome,
                uncertain,
            }
        })
        .collect()
}

/// `None` = fell off the end (or `return`).
fn eval_chain<'a>(
    rs: &'a Ruleset,
    chain: &'a Chain,
    pkt: &Packet<'_>,
    depth: usize,
    uncertain: &mut Vec<&'a Rule>,
) -> Option<Outcome<'a>> {
    if depth > 16 {
        return None;
    }
    for rule in rs.rules_of(chain) {
        match rule_matches(rs, rule, pkt) {
            Tri::No => continue,
            Tri::Maybe => {
                if rule.verdict().is_some() {
                    uncertain.push(rule);
                }
                continue;
            }
            Tri::Yes => {}
        }
        for a in rule.actions() {
            match a {
                Action::Accept => return Some(Outcome::Accept(rule)),
                Action::Drop => return Some(Outcome::Drop(rule)),
                Action::Nat => return Some(Outcome::Nat(rule)),
                Action::Return => return None,
                Action::Jump(t) | Action::Goto(t) => {
                    let goto = matches!(a, Action::Goto(_));
                    if let Some(next) = rs.target(chain, t) {
                        let r = eval_chain(rs, next, pkt, depth + 1, uncertain);
                        if r.is_some() || goto {
                            return r;
                        }
                    }
                    break;
                }
                Action::Other => {}
            }
        }
    }
    None
}

/// AND of the rule's matches (xtables conntrack/state decoded; other xt matches, and matches
/// the crate's schema could not type, are `Maybe`).
pub fn rule_matches(rs: &Ruleset, rule: &Rule, pkt: &Packet<'_>) -> Tri {
    let mut t = Tri::Yes;
    for m in rule.effective_matches() {
        t = t.and(match_tri(rs, rule, &m, pkt));
        if t == Tri::No {
            return t;
        }
    }
    if rule.opaque_xt().next().is_some() || rule.untyped_matches() > 0 {
        t = t.and(Tri::Maybe);
    }
    t
}

fn positive(op: Operator) -> Option<bool> {
    match op {
        Operator::EQ | Operator::IN => Some(true),
        Operator::NEQ => Some(false),
        _ => None,
    }
}

fn match_tri(rs: &Ruleset, rule: &Rule, m: &Match, pkt: &Packet<'_>) -> Tri {
    let Some(pos) = positive(m.op) else {
        return Tri::Maybe;
    };
    let right = &rs.resolve(rule, &m.right);
    let base = if let Some(key) = m.meta_key() {
        match key {
            MetaKey::Iifname | MetaKey::Iif => ifname_tri(right, pkt.iif),
            MetaKey::Oifname | MetaKey::Oif => ifname_tri(right, pkt.oif),
            MetaKey::L4proto => l4_tri(right, pkt.l4proto),
            MetaKey::Nfproto => str_tri(right, "ipv6"),
            MetaKey::Protocol => str_tri(right, "ip6"),
            _ => Tri::Maybe,
        }
    } else if let Some((protocol, field)) = m.payload_field() {
        match (protocol, field) {
            ("ip6", "saddr") => prefix_tri(right, pkt.saddr),
            ("ip6", "daddr") => prefix_tri(right, pkt.daddr),
            ("ip6", "nexthdr") => l4_tri(right, pkt.l4proto),
            // IPv4 header fields never match an IPv6 packet (an inet-family rule).
            ("ip", _) => return Tri::No,
            ("tcp" | "udp", "dport") => {
                if pkt.l4proto != Some(protocol) {
                    return Tri::No;
                }
                port_tri(right, pkt.dport)
            }
            ("th", "dport") => port_tri(right, pkt.dport),
            ("tcp" | "udp", _) if pkt.l4proto.is_some_and(|p| p != protocol) => return Tri::No,
            ("icmpv6", _) if pkt.l4proto.is_some_and(|p| p != "ipv6-icmp") => return Tri::No,
            _ => Tri::Maybe,
        }
    } else if m.ct_key() == Some("state") {
        let states = right.strings();
        if states.is_empty() {
            Tri::Maybe
        } else if states.contains(&pkt.ct_state) {
            Tri::Yes
        } else {
            Tri::No
        }
    } else {
        Tri::Maybe
    };
    if pos {
        base
    } else {
        base.not()
    }
}

fn ifname_tri(v: &Members<'_>, name: Option<&str>) -> Tri {
    match name {
        None => Tri::Maybe,
        Some(n) => {
            if v.strings().is_empty() {
                Tri::Maybe
            } else if v.matches_ifname(n) {
                Tri::Yes
            } else {
                Tri::No
            }
        }
    }
}

fn str_tri(v: &Members<'_>, want: &str) -> Tri {
    let s = v.strings();
    if s.is_empty() {
        Tri::Maybe
    } else if s.contains(&want) {
        Tri::Yes
    } else {
        Tri::No
    }
}

fn l4_tri(v: &Members<'_>, proto: Option<&str>) -> Tri {
    let Some(p) = proto else { return Tri::Maybe };
    let number = match p {
        "tcp" => Some(6),
        "udp" => Some(17),
        "ipv6-icmp" => Some(58),
        _ => None,
    };
    let hit = v
        .strings()
        .into_iter()
        .any(|s| s == p || (p == "ipv6-icmp" && s == "icmpv6"))
        || v.numbers().into_iter().any(|n| Some(n) == number);
    if hit {
        Tri::Yes
    } else if v.all_immediate() {
        Tri::No
    } else {
        Tri::Maybe
    }
}

fn port_tri(v: &Members<'_>, port: Option<u16>) -> Tri {
    let Some(p) = port else { return Tri::Maybe };
    let ranges = v.ports();
    if ranges.is_empty() {
        return Tri::Maybe;
    }
    if ranges.iter().any(|(a, b)| *a <= p && p <= *b) {
        Tri::Yes
    } else {
        Tri::No
    }
}

/// Does `(a, alen)` lie inside `(b, blen)`?
pub fn prefix_within(a: (Ipv6Addr, u8), b: (Ipv6Addr, u8)) -> bool {
    a.1 >= b.1 && u128::from(a.0) & prefix_mask(b.1) == u128::from(b.0) & prefix_mask(b.1)
}

/// The packet's address range against the rule's prefixes. A rule prefix narrower than the
/// packet's range (a sub-prefix of the guest prefix) counts as matching: some guests match.
fn prefix_tri(v: &Members<'_>, addr: Option<(Ipv6Addr, u8)>) -> Tri {
    let Some(a) = addr else { return Tri::Maybe };
    let known = v.ipv6_prefixes();
    if known.is_empty() {
        Tri::Maybe
    } else if known
        .into_iter()
        .any(|p| prefix_within(a, p) || prefix_within(p, a))
    {
        Tri::Yes
    } else {
        Tri::No
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::nft::Source;

    fn rs(rules: &str) -> Ruleset {
        Ruleset::from_json(rules, Source::Library).unwrap()
    }

    const SETUP_LIKE: &str = r#"{"nftables":[
 {"table":{"family":"inet","name":"chvkit"}},
 {"chain":{"family":"inet","table":"chvkit","name":"input","type":"filter","hook":"input","prio":0,"policy":"accept"}},
 {"chain":{"family":"inet","table":"chvkit","name":"guest_to_host"}},
 {"rule":{"family":"inet","table":"chvkit","chain":"input","handle":5,"expr":[{"match":{"op":"==","left":{"meta":{"key":"iifname"}},"right":"chvbr0"}},{"jump":{"target":"guest_to_host"}}]}},
 {"rule":{"family":"inet","table":"chvkit","chain":"guest_to_host","handle":6,"expr":[{"match":{"op":"in","left":{"ct":{"key":"state"}},"right":["established","related"]}},{"accept":null}]}},
 {"rule":{"family":"inet","table":"chvkit","chain":"guest_to_host","handle":7,"expr":[{"match":{"op":"==","left":{"meta":{"key":"l4proto"}},"right":"ipv6-icmp"}},{"accept":null}]}},
 {"rule":{"family":"inet","table":"chvkit","chain":"guest_to_host","handle":8,"expr":[{"match":{"op":"==","left":{"payload":{"protocol":"tcp","field":"dport"}},"right":{"set":[8080]}}},{"accept":null}]}},
 {"rule":{"family":"inet","table":"chvkit","chain":"guest_to_host","handle":9,"expr":[{"counter":null},{"drop":null}]}}
]}"#;

    #[test]
    fn host_protection_through_a_jump() {
        let r = rs(SETUP_LIKE);
        let mut p = Packet {
            iif: Some("chvbr0"),
            l4proto: Some("tcp"),
            dport: Some(22),
            ct_state: "new",
            ..Default::default()
        };
        let v = judge_hook(&r, NfHook::Input, Some(NfChainType::Filter), &p);
        assert_eq!(v.len(), 1);
        assert!(!v[0].passes());
        assert_eq!(v[0].explicit().map(Rule::handle), Some(9));
        p.dport = Some(8080);
        assert!(judge_hook(&r, NfHook::Input, None, &p)[0].passes());
        p.iif = Some("eth0");
        p.dport = Some(22);
        let v = judge_hook(&r, NfHook::Input, None, &p);
        assert!(v[0].passes() && v[0].explicit().is_none());
        p.iif = Some("chvbr0");
        p.l4proto = Some("ipv6-icmp");
        p.dport = None;
        assert!(judge_hook(&r, NfHook::Input, None, &p)[0].passes());
    }

    #[test]
    fn nat_with_sub_prefix_and_negated_oif() {
        let j = r#"{"nftables":[
 {"chain":{"family":"ip6","table":"nat","name":"POSTROUTING","type":"nat","hook":"postrouting","prio":100,"policy":"accept"}},
 {"rule":{"family":"ip6","table":"nat","chain":"POSTROUTING","handle":2,"expr":[{"match":{"op":"!=","left":{"meta":{"key":"oifname"}},"right":"chvbr0"}},{"match":{"op":"==","left":{"payload":{"protocol":"ip6","field":"saddr"}},"right":{"prefix":{"addr":"fdcd:1::","len":32}}}},{"xt":{"type":"target","name":"MASQUERADE"}}]}}
]}"#;
        let r = rs(j);
        let mut p = Packet {
            oif: Some("eth0"),
            saddr: Some(("fdcd::".parse().unwrap(), 16)),
            ct_state: "new",
            ..Default::default()
        };
        assert!(matches!(
            judge_hook(&r, NfHook::Postrouting, Some(NfChainType::NAT), &p)[0].outcome,
            Outcome::Nat(_)
        ));
        p.oif = Some("chvbr0");
        assert_eq!(
            judge_hook(&r, NfHook::Postrouting, Some(NfChainType::NAT), &p)[0].outcome,
            Outcome::Policy
        );
        p.oif = Some("eth0");
        p.saddr = Some(("fd00::".parse().unwrap(), 16));
        assert_eq!(
            judge_hook(&r, NfHook::Postrouting, Some(NfChainType::NAT), &p)[0].outcome,
            Outcome::Policy
        );
    }

    #[test]
    fn unknown_matches_are_uncertain_not_matching() {
        let j = r#"{"nftables":[
 {"chain":{"family":"ip6","table":"filter","name":"FORWARD","type":"filter","hook":"forward","prio":0,"policy":"drop"}},
 {"rule":{"family":"ip6","table":"filter","chain":"FORWARD","handle":3,"expr":[{"match":{"op":"==","left":{"meta":{"key":"oifname"}},"right":"chvbr0"}},{"xt":{"type":"match","name":"conntrack"}},{"accept":null}]}}
]}"#;
        let r = rs(j);
        let p = Packet {
            iif: Some("eth0"),
            oif: Some("chvbr0"),
            ct_state: "established",
            l4proto: Some("tcp"),
            ..Default::default()
        };
        let v = judge_hook(&r, NfHook::Forward, Some(NfChainType::Filter), &p);
        assert!(!v[0].passes());
        assert_eq!(v[0].uncertain.len(), 1);
    }

    /// What the crate's schema cannot type keeps its meaning: a masquerade with one flag
    /// (`"flags":"random"`) still translates; a `meta sdif` match makes its rule uncertain.
    #[test]
    fn untyped_statements_keep_their_meaning() {
        let j = r#"{"nftables":[
 {"chain":{"family":"inet","table":"t","name":"pr","type":"nat","hook":"postrouting","prio":100,"policy":"accept"}},
 {"rule":{"family":"inet","table":"t","chain":"pr","handle":3,"expr":[{"match":{"op":"!=","left":{"meta":{"key":"oifname"}},"right":"chvbr0"}},{"masquerade":{"flags":"random"}}]}},
 {"chain":{"family":"inet","table":"t","name":"fw","type":"filter","hook":"forward","prio":0,"policy":"drop"}},
 {"rule":{"family":"inet","table":"t","chain":"fw","handle":9,"expr":[{"match":{"op":"==","left":{"meta":{"key":"sdif"}},"right":"vrf0"}},{"accept":null}]}}
]}"#;
        let r = rs(j);
        let p = Packet {
            iif: Some("chvbr0"),
            oif: Some("eth0"),
            ct_state: "new",
            ..Default::default()
        };
        let nat = judge_hook(&r, NfHook::Postrouting, Some(NfChainType::NAT), &p);
        assert_eq!(nat[0].explicit().map(Rule::handle), Some(3));
        assert!(matches!(nat[0].outcome, Outcome::Nat(_)));
        let fwd = judge_hook(&r, NfHook::Forward, None, &p);
        assert!(!fwd[0].passes());
        assert_eq!(fwd[0].uncertain.len(), 1);
    }

    #[test]
    fn prefixes() {
        let g = ("fdcd::".parse().unwrap(), 16);
        assert!(prefix_within(("fdcd:1::".parse().unwrap(), 32), g));
        assert!(!prefix_within(g, ("fdcd:1::".parse().unwrap(), 32)));
        assert!(prefix_within(g, ("::".parse().unwrap(), 0)));
    }
}
