//! Read-only questions doctor asks of the crate's types: which chain, which interface names,
//! ports and prefixes a match's right-hand side holds. Extension traits, so that the values
//! stay `nftables::schema`/`stmt`/`expr` types end to end.

use std::net::Ipv6Addr;

use nftables::expr::{Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, SetItem};
use nftables::schema;
use nftables::stmt::{self, Operator};
use nftables::types::{NfChainPolicy, NfFamily, NfHook};

/// An expression of a listed ruleset (owned, hence `'static`).
pub type Expr = Expression<'static>;
/// A match statement of a listed ruleset.
pub type Match = stmt::Match<'static>;

/// The family as nft spells it.
pub fn family_name(f: NfFamily) -> &'static str {
    match f {
        NfFamily::IP => "ip",
        NfFamily::IP6 => "ip6",
        NfFamily::INet => "inet",
        NfFamily::ARP => "arp",
        NfFamily::Bridge => "bridge",
        NfFamily::NetDev => "netdev",
    }
}

/// Families whose rules see IPv6 packets at the IP layer.
fn sees_ipv6(f: NfFamily) -> bool {
    matches!(f, NfFamily::IP6 | NfFamily::INet)
}

pub trait ChainExt {
    /// Base chain of this hook in a family that sees IPv6 packets (`ip6` or `inet`).
    fn is_ipv6_hook(&self, hook: NfHook) -> bool;
    fn policy_drops(&self) -> bool;
    /// `accept` or `drop`; a base chain without a policy accepts.
    fn policy_name(&self) -> &'static str;
    /// `family table chain`, as `nft` addresses it.
    fn spec(&self) -> String;
}

impl ChainExt for schema::Chain<'_> {
    fn is_ipv6_hook(&self, hook: NfHook) -> bool {
        self.hook == Some(hook) && sees_ipv6(self.family)
    }
    fn policy_drops(&self) -> bool {
        self.policy == Some(NfChainPolicy::Drop)
    }
    fn policy_name(&self) -> &'static str {
        if self.policy_drops() {
            "drop"
        } else {
            "accept"
        }
    }
    fn spec(&self) -> String {
        format!("{} {} {}", family_name(self.family), self.table, self.name)
    }
}

pub trait MatchExt {
    fn negated(&self) -> bool;
    /// The key of a `meta` match (`iifname`, `l4proto`).
    fn meta_key(&self) -> Option<MetaKey>;
    fn is_meta(&self, key: MetaKey) -> bool {
        self.meta_key() == Some(key)
    }
    /// `(protocol, field)` of a named-header payload match (`ip6 saddr`, `tcp dport`).
    fn payload_field(&self) -> Option<(&str, &str)>;
    fn is_payload(&self, protocol: &str, field: &str) -> bool;
    /// The key of a conntrack match (`state`).
    fn ct_key(&self) -> Option<&str>;
}

impl MatchExt for stmt::Match<'_> {
    fn negated(&self) -> bool {
        self.op == Operator::NEQ
    }
    fn meta_key(&self) -> Option<MetaKey> {
        match &self.left {
            Expression::Named(NamedExpression::Meta(Meta { key })) => Some(*key),
            _ => None,
        }
    }
    fn payload_field(&self) -> Option<(&str, &str)> {
        match &self.left {
            Expression::Named(NamedExpression::Payload(Payload::PayloadField(PayloadField {
                protocol,
                field,
            }))) => Some((protocol.as_ref(), field.as_ref())),
            _ => None,
        }
    }
    fn is_payload(&self, protocol: &str, field: &str) -> bool {
        self.payload_field() == Some((protocol, field))
    }
    fn ct_key(&self) -> Option<&str> {
        match &self.left {
            Expression::Named(NamedExpression::CT(ct)) => Some(ct.key.as_ref()),
            _ => None,
        }
    }
}

pub trait ExprExt {
    /// The values an expression stands for: the items of a list or anonymous set (nested ones
    /// flattened, `elem` wrappers opened), or the expression itself. A named set (`@ports`)
    /// stays a reference here; [`super::Ruleset::resolve`] opens it.
    fn members(&self) -> Members<'_>;
    /// A single IPv6 prefix (`fdcd::/16`), or an address as a /128.
    fn as_ipv6_prefix(&self) -> Option<(Ipv6Addr, u8)>;
    /// Does an interface-name value (string, wildcard `pfx*`, or set of them) name `ifname`?
    fn matches_ifname(&self, ifname: &str) -> bool {
        self.members().matches_ifname(ifname)
    }
}

impl ExprExt for Expr {
    fn members(&self) -> Members<'_> {
        let mut out = Members(Vec::new());
        out.push_flat(self);
        out
    }
    fn as_ipv6_prefix(&self) -> Option<(Ipv6Addr, u8)> {
        match self {
            Expression::Named(NamedExpression::Prefix(p)) => match p.addr.as_ref() {
                Expression::String(a) => Some((a.parse().ok()?, u8::try_from(p.len).ok()?)),
                _ => None,
            },
            Expression::String(s) => Some((s.parse().ok()?, 128)),
            _ => None,
        }
    }
}

/// The values of a match's right-hand side (see [`ExprExt::members`]).
#[derive(Debug, Clone, Default)]
pub struct Members<'a>(pub Vec<&'a Expr>);

impl<'a> Members<'a> {
    pub(super) fn push_flat(&mut self, e: &'a Expr) {
        match e {
            Expression::List(v) => v.iter().for_each(|x| self.push_flat(x)),
            Expression::Named(NamedExpression::Set(items)) => {
                for item in items {
                    match item {
                        SetItem::Element(x) => self.push_flat(x),
                        // A map's key is what a packet is looked up by.
                        SetItem::Mapping(k, _) | SetItem::MappingStatement(k, _) => {
                            self.push_flat(k)
                        }
                    }
                }
            }
            Expression::Named(NamedExpression::Elem(el)) => self.push_flat(&el.val),
            other => self.0.push(other),
        }
    }

    /// Strings among the values, named-set references (`@name`) excepted.
    pub fn strings(&self) -> Vec<&'a str> {
        self.0
            .iter()
            .copied()
            .filter_map(|m| match m {
                Expression::String(s) if !s.starts_with('@') => Some(s.as_ref()),
                _ => None,
            })
            .collect()
    }

    pub fn numbers(&self) -> Vec<u32> {
        self.0
            .iter()
            .copied()
            .filter_map(|m| match m {
                Expression::Number(n) => Some(*n),
                _ => None,
            })
            .collect()
    }

    /// Every value is a plain string or number (nothing unresolved or computed).
    pub fn all_immediate(&self) -> bool {
        self.0.iter().copied().all(|m| match m {
            Expression::String(s) => !s.starts_with('@'),
            Expression::Number(_) => true,
            _ => false,
        })
    }

    pub fn matches_ifname(&self, ifname: &str) -> bool {
        self.strings()
            .into_iter()
            .any(|s| ifname_pattern_matches(s, ifname))
    }

    /// Port numbers and ranges (`22`, `{22, 8080}`, `1000-2000`).
    pub fn ports(&self) -> Vec<(u16, u16)> {
        let port = |e: &Expr| match e {
            Expression::Number(n) => u16::try_from(*n).ok(),
            _ => None,
        };
        self.0
            .iter()
            .copied()
            .filter_map(|m| match m {
                Expression::Number(_) => port(m).map(|p| (p, p)),
                Expression::Range(r) => Some((port(&r.range[0])?, port(&r.range[1])?)),
                _ => None,
            })
            .collect()
    }

    /// IPv6 prefixes and addresses among the values.
    pub fn ipv6_prefixes(&self) -> Vec<(Ipv6Addr, u8)> {
        self.0.iter().filter_map(|m| m.as_ipv6_prefix()).collect()
    }
}

/// nft interface-name patterns: a trailing unescaped `*` is a prefix wildcard.
pub fn ifname_pattern_matches(pattern: &str, ifname: &str) -> bool {
    if let Some(pfx) = pattern.strip_suffix('*') {
        if !pfx.ends_with('\\') {
            return ifname.starts_with(pfx);
        }
    }
    pattern.replace("\\*", "*") == ifname
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expr(json: &str) -> Expr {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn ifname_patterns() {
        assert!(ifname_pattern_matches("chv*", "chv-a"));
        assert!(!ifname_pattern_matches("chv\\*", "chv-a"));
        assert!(ifname_pattern_matches("chv\\*", "chv*"));
        assert!(ifname_pattern_matches("chvbr0", "chvbr0"));
    }

    #[test]
    fn members_of_sets_ranges_and_prefixes() {
        let ports = expr(r#"{"set":[22,{"range":[8000,8100]},{"elem":{"val":9000}}]}"#);
        assert_eq!(
            ports.members().ports(),
            vec![(22, 22), (8000, 8100), (9000, 9000)]
        );
        let states = expr(r#"["established","related"]"#);
        assert_eq!(states.members().strings(), vec!["established", "related"]);
        let p = expr(r#"{"prefix":{"addr":"fdcd::","len":16}}"#);
        assert_eq!(p.as_ipv6_prefix(), Some(("fdcd::".parse().unwrap(), 16)));
        assert!(expr(r#""chv*""#).matches_ifname("chvbr0"));
        assert!(!expr(r#""@ifaces""#).matches_ifname("@ifaces"));
        assert!(!expr(r#""@ports""#).members().all_immediate());
    }
}
