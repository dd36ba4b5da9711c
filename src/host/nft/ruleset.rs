//! The listed ruleset as the crate's types: `schema::Table`, `schema::Chain`, `schema::Rule`
//! (with `stmt::Statement`s of `expr::Expression`s) and the elements of named `schema::Set`s.

use std::collections::HashMap;

use nftables::expr::{Expression, NamedExpression, CT};
use nftables::schema::{self, NfListObject};
use nftables::stmt::{Operator, Statement};
use nftables::types::{NfFamily, NfHook};
use serde::Deserialize;
use serde_json::Value as Json;

use super::run::{Nft, OUTPUT_HANDLE, OUTPUT_JSON, OUTPUT_STATELESS};
use super::view::{family_name, ChainExt, Expr, ExprExt, Match, Members};
use super::xt::{ct_states_from_text, rule_texts_by_handle, Xt};
use super::{has_cap_net_admin, NftError, Source};

pub type Table = schema::Table<'static>;
pub type Chain = schema::Chain<'static>;

/// One rule: the crate's `schema::Rule`, whose `expr` holds, in order, every statement the
/// crate's schema types, plus the statements it cannot type, kept as the kernel's JSON.
///
/// Untyped statements are judged by their kind only (their key): an untyped `match` could
/// match anything, so the rule cannot be judged; an untyped `masquerade`/`snat` (one flag, as a
/// string) still translates, an untyped `reject` still drops.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub rule: schema::Rule<'static>,
    pub untyped: Vec<Json>,
    /// The rule as `nft` prints it, for rules with xt matches (see [`super::xt`]).
    pub text: Option<String>,
}

/// What a matching rule does, in statement order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action<'a> {
    /// `accept` (or an xt `ACCEPT`).
    Accept,
    /// `drop`, `reject` (or xt `DROP`/`REJECT`).
    Drop,
    /// `masquerade`, `snat` (or xt `MASQUERADE`/`SNAT`).
    Nat,
    Jump(&'a str),
    Goto(&'a str),
    Return,
    /// Ends the rule's evaluation in a way doctor does not follow: `dnat`, `redirect`, other
    /// xt targets.
    Other,
}

/// A ruleset statement's kind: the key of its JSON object (`match`, `masquerade`).
fn kind(j: &Json) -> &str {
    j.as_object()
        .and_then(|o| o.keys().next())
        .map(String::as_str)
        .unwrap_or_default()
}

impl Rule {
    pub fn family(&self) -> NfFamily {
        self.rule.family
    }
    pub fn table(&self) -> &str {
        &self.rule.table
    }
    pub fn chain(&self) -> &str {
        &self.rule.chain
    }
    /// Listed rules always carry their handle.
    pub fn handle(&self) -> u32 {
        self.rule.handle.unwrap_or(0)
    }
    pub fn stmts(&self) -> &[Statement<'static>] {
        &self.rule.expr
    }

    pub fn matches(&self) -> impl Iterator<Item = &Match> {
        self.stmts().iter().filter_map(|s| match s {
            Statement::Match(m) => Some(m),
            _ => None,
        })
    }

    /// Matches, with xtables `conntrack`/`state` matches decoded from the rule's text into the
    /// crate's `ct state` match (the only xt matches doctor needs to understand).
    pub fn effective_matches(&self) -> Vec<Match> {
        let mut v: Vec<Match> = self.matches().cloned().collect();
        let decoded = self.text.as_deref().and_then(ct_states_from_text);
        if let Some(states) = decoded {
            for _ in self.xts().filter(Xt::is_ct_state) {
                v.push(ct_state_match(&states));
            }
        }
        v
    }

    fn xts(&self) -> impl Iterator<Item = Xt<'_>> {
        self.stmts().iter().filter_map(Xt::of)
    }

    /// Xt matches whose meaning could not be recovered (the rule then matches more narrowly
    /// than [`Rule::effective_matches`] shows).
    pub fn opaque_xt(&self) -> impl Iterator<Item = &str> {
        let decoded = self.text.as_deref().and_then(ct_states_from_text).is_some();
        self.xts()
            .filter(move |x| x.is_match() && !(x.is_ct_state() && decoded))
            .map(|x| x.name)
    }

    pub fn has_xt_match(&self) -> bool {
        self.xts().any(|x| x.is_match())
    }

    /// Matches the crate's schema could not type: what they test is unknown.
    pub fn untyped_matches(&self) -> usize {
        self.untyped.iter().filter(|j| kind(j) == "match").count()
    }

    /// The rule's actions in statement order (typed ones, then untyped ones by kind).
    pub fn actions(&self) -> Vec<Action<'_>> {
        let typed = self.stmts().iter().filter_map(|s| {
            Some(match s {
                Statement::Accept(_) => Action::Accept,
                Statement::Drop(_) | Statement::Reject(_) => Action::Drop,
                Statement::Masquerade(_) | Statement::SNAT(_) => Action::Nat,
                Statement::DNAT(_) | Statement::Redirect(_) => Action::Other,
                Statement::Return(_) => Action::Return,
                Statement::Jump(t) => Action::Jump(&t.target),
                Statement::Goto(t) => Action::Goto(&t.target),
                Statement::XT(_) => match Xt::of(s) {
                    Some(x) if x.is_target() => match x.name {
                        "MASQUERADE" | "SNAT" => Action::Nat,
                        "REJECT" | "DROP" => Action::Drop,
                        "ACCEPT" => Action::Accept,
                        _ => Action::Other,
                    },
                    _ => return None,
                },
                _ => return None,
            })
        });
        let untyped = self.untyped.iter().filter_map(|j| match kind(j) {
            "masquerade" | "snat" => Some(Action::Nat),
            "reject" => Some(Action::Drop),
            "dnat" | "redirect" => Some(Action::Other),
            _ => None,
        });
        typed.chain(untyped).collect()
    }

    /// The rule's last action (its verdict or NAT), if any.
    pub fn verdict(&self) -> Option<Action<'_>> {
        self.actions().pop()
    }

    pub fn accepts(&self) -> bool {
        self.verdict() == Some(Action::Accept)
    }

    /// Human form for messages: `ip6 filter FORWARD (handle 3)`.
    pub fn location(&self) -> String {
        format!(
            "{} {} {} (handle {})",
            family_name(self.family()),
            self.table(),
            self.chain(),
            self.handle()
        )
    }
}

/// `ct state { states }`, as the crate types it.
fn ct_state_match(states: &[String]) -> Match {
    Match {
        left: Expression::Named(NamedExpression::CT(CT {
            key: "state".into(),
            family: None,
            dir: None,
        })),
        right: Expression::List(
            states
                .iter()
                .map(|s| Expression::String(s.clone().into()))
                .collect(),
        ),
        op: Operator::IN,
    }
}

/// A rule the schema rejects as a whole, typed statement by statement.
#[derive(Deserialize)]
struct PartlyTypedRule {
    family: NfFamily,
    table: String,
    chain: String,
    handle: Option<u32>,
    expr: Vec<MaybeTyped>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum MaybeTyped {
    Typed(Statement<'static>),
    Untyped(Json),
}

/// The whole ruleset.
#[derive(Debug, Clone)]
pub struct Ruleset {
    pub source: Source,
    pub tables: Vec<Table>,
    pub chains: Vec<Chain>,
    pub rules: Vec<Rule>,
    /// Elements of named sets: `(family, table, name)` -> elements.
    pub sets: HashMap<(NfFamily, String, String), Vec<Expr>>,
    /// Ruleset objects the crate's schema cannot type (e.g. a verdict map), as JSON.
    pub untyped: Vec<Json>,
}

impl Ruleset {
    /// Read the ruleset of the current network namespace (needs CAP_NET_ADMIN).
    pub fn read() -> Result<Ruleset, NftError> {
        // Without the capability libnftables fails anyway, and prints to stderr on its own.
        if has_cap_net_admin() == Some(false) {
            return Err(NftError::Command {
                command: "nft list ruleset".into(),
                message: "Operation not permitted (this process lacks CAP_NET_ADMIN)".into(),
            });
        }
        let nft = Nft::open()?;
        let json = nft.run("list ruleset", OUTPUT_JSON | OUTPUT_STATELESS)?;
        let mut rs = Ruleset::from_json(&json, nft.source())?;
        let listings: Vec<String> = rs
            .tables_with_xt_matches()
            .into_iter()
            .map(|(family, table)| format!("list table {family} {table}"))
            .collect();
        for cmd in listings {
            let text = nft.run(&cmd, OUTPUT_HANDLE | OUTPUT_STATELESS)?;
            rs.attach_xt_text(&text);
        }
        Ok(rs)
    }

    /// Parse `nft -j list ruleset` output.
    pub fn from_json(text: &str, source: Source) -> Result<Ruleset, NftError> {
        let mut rs = Ruleset {
            source,
            tables: Vec::new(),
            chains: Vec::new(),
            rules: Vec::new(),
            sets: HashMap::new(),
            untyped: Vec::new(),
        };
        // An empty ruleset lists as nothing at all in some versions.
        if text.trim().is_empty() {
            return Ok(rs);
        }
        // Not `schema::Nftables`: one object it cannot type would fail the whole listing.
        #[derive(Deserialize)]
        struct Listing {
            nftables: Vec<Json>,
        }
        let doc: Listing = serde_json::from_str(text).map_err(|e| NftError::Json(e.to_string()))?;
        for item in doc.nftables {
            match NfListObject::deserialize(&item) {
                Ok(NfListObject::Table(t)) => rs.tables.push(t),
                Ok(NfListObject::Chain(c)) => rs.chains.push(c),
                Ok(NfListObject::Rule(r)) => rs.rules.push(Rule {
                    rule: r,
                    untyped: Vec::new(),
                    text: None,
                }),
                Ok(NfListObject::Set(s)) => {
                    let s = *s;
                    let key = (s.family, s.table.into_owned(), s.name.into_owned());
                    let elems = s.elem.map(|e| e.into_owned()).unwrap_or_default();
                    rs.sets.insert(key, elems);
                }
                // Metainfo, maps, counters, ...: nothing doctor judges.
                Ok(_) => {}
                Err(e) => rs.add_untyped(item, e),
            }
        }
        Ok(rs)
    }

    /// Keep what the schema rejected: a rule statement by statement, anything else as JSON.
    fn add_untyped(&mut self, item: Json, why: serde_json::Error) {
        if let Some(r) = item.get("rule") {
            if let Ok(p) = PartlyTypedRule::deserialize(r) {
                let (typed, untyped): (Vec<_>, Vec<_>) = p
                    .expr
                    .into_iter()
                    .partition(|s| matches!(s, MaybeTyped::Typed(_)));
                let rule = Rule {
                    rule: schema::Rule {
                        family: p.family,
                        table: p.table.into(),
                        chain: p.chain.into(),
                        expr: typed
                            .into_iter()
                            .filter_map(|s| match s {
                                MaybeTyped::Typed(s) => Some(s),
                                MaybeTyped::Untyped(_) => None,
                            })
                            .collect(),
                        handle: p.handle,
                        index: None,
                        comment: None,
                    },
                    untyped: untyped
                        .into_iter()
                        .filter_map(|s| match s {
                            MaybeTyped::Untyped(j) => Some(j),
                            MaybeTyped::Typed(_) => None,
                        })
                        .collect(),
                    text: None,
                };
                tracing::debug!(
                    "nftables: rule {} has statements the nftables crate cannot type ({why}): {}",
                    rule.location(),
                    serde_json::Value::from(rule.untyped.clone())
                );
                self.rules.push(rule);
                return;
            }
        }
        tracing::debug!("nftables: the nftables crate cannot type {item} ({why}); ignored");
        self.untyped.push(item);
    }

    /// Whether any rule uses an xtables extension (written by iptables-nft).
    pub fn has_xt(&self) -> bool {
        self.rules.iter().any(|r| r.xts().next().is_some())
    }

    /// Tables holding xtables *matches*, whose text must be listed to understand them (an xt
    /// target is fully described by its name).
    pub fn tables_with_xt_matches(&self) -> Vec<(&'static str, &str)> {
        let mut v: Vec<(&'static str, &str)> = Vec::new();
        for r in self.rules.iter().filter(|r| r.has_xt_match()) {
            let key = (family_name(r.family()), r.table());
            if !v.contains(&key) {
                v.push(key);
            }
        }
        v
    }

    /// Fill in the text of rules with xt matches from a text listing with handles.
    pub fn attach_xt_text(&mut self, listing: &str) {
        let mut texts = rule_texts_by_handle(listing);
        for r in self.rules.iter_mut().filter(|r| r.has_xt_match()) {
            let key = (
                family_name(r.family()).to_string(),
                r.table().to_string(),
                r.handle(),
            );
            if let Some(line) = texts.remove(&key) {
                r.text = Some(line);
            }
        }
    }

    pub fn table_exists(&self, family: NfFamily, name: &str) -> bool {
        self.tables
            .iter()
            .any(|t| t.family == family && t.name == name)
    }

    pub fn chain(&self, family: NfFamily, table: &str, name: &str) -> Option<&Chain> {
        self.chains
            .iter()
            .find(|c| c.family == family && c.table == table && c.name == name)
    }

    /// Rules of one chain, in order.
    pub fn rules_of<'a>(&'a self, chain: &'a Chain) -> impl Iterator<Item = &'a Rule> + 'a {
        self.rules.iter().filter(move |r| {
            r.family() == chain.family && r.table() == chain.table && r.chain() == chain.name
        })
    }

    /// Base chains at `hook` in the families that see IPv6 packets.
    pub fn ipv6_base_chains(&self, hook: NfHook) -> impl Iterator<Item = &Chain> + '_ {
        self.chains.iter().filter(move |c| c.is_ipv6_hook(hook))
    }

    /// The chain a rule of `from` jumps to (same table).
    pub fn target(&self, from: &Chain, name: &str) -> Option<&Chain> {
        self.chain(from.family, &from.table, name)
    }

    /// Every rule reachable from `chain` in evaluation order, each with the `jump`/`goto` rules
    /// that lead to it (outermost first): a rule in `guest_to_host` reached by
    /// `iifname "chvbr0" jump guest_to_host` only sees packets from the bridge.
    pub fn walk<'a>(&'a self, chain: &'a Chain) -> Vec<Reached<'a>> {
        let mut out = Vec::new();
        let mut stack: Vec<&Chain> = Vec::new();
        self.walk_into(chain, &mut Vec::new(), &mut stack, &mut out);
        out
    }

    fn walk_into<'a>(
        &'a self,
        chain: &'a Chain,
        via: &mut Vec<&'a Rule>,
        stack: &mut Vec<&'a Chain>,
        out: &mut Vec<Reached<'a>>,
    ) {
        // A loop in the jump graph is rejected by the kernel; the depth cap is a guard anyway.
        if stack.iter().any(|c| std::ptr::eq(*c, chain)) || stack.len() > 16 {
            return;
        }
        stack.push(chain);
        for r in self.rules_of(chain) {
            out.push(Reached {
                rule: r,
                via: via.clone(),
            });
            for a in r.actions() {
                if let Action::Jump(t) | Action::Goto(t) = a {
                    if let Some(next) = self.target(chain, t) {
                        via.push(r);
                        self.walk_into(next, via, stack, out);
                        via.pop();
                    }
                }
            }
        }
        stack.pop();
    }

    /// A match's right side with named sets (`@ports`) opened in the rule's table; a set that
    /// is not there (or that the crate could not type) stays a reference.
    pub fn resolve<'a>(&'a self, rule: &Rule, e: &'a Expr) -> Members<'a> {
        let mut out = Members::default();
        for m in e.members().0 {
            let set = match m {
                Expression::String(s) => s.strip_prefix('@').and_then(|name| {
                    self.sets
                        .get(&(rule.family(), rule.table().to_string(), name.to_string()))
                }),
                _ => None,
            };
            match set {
                Some(elems) => elems.iter().for_each(|x| out.push_flat(x)),
                None => out.0.push(m),
            }
        }
        out
    }
}

/// A rule found by [`Ruleset::walk`].
#[derive(Debug, Clone)]
pub struct Reached<'a> {
    pub rule: &'a Rule,
    /// The jump/goto rules on the way, outermost first.
    pub via: Vec<&'a Rule>,
}

impl Reached<'_> {
    /// The rule's own matches plus those of the rules that jumped to it.
    pub fn all_matches(&self) -> Vec<Match> {
        self.via
            .iter()
            .flat_map(|r| r.effective_matches())
            .chain(self.rule.effective_matches())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use nftables::expr::MetaKey;

    use super::*;
    use crate::host::nft::MatchExt;

    /// Real output of `ip6tables-nft` rules from the seed, `nft -j list ruleset` (nftables 1.0.6).
    const IPTABLES_NFT: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"table": {"family": "ip6", "name": "nat", "handle": 1}}, {"chain": {"family": "ip6", "table": "nat", "name": "POSTROUTING", "handle": 1, "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"}}, {"rule": {"family": "ip6", "table": "nat", "chain": "POSTROUTING", "handle": 2, "expr": [{"match": {"op": "!=", "left": {"meta": {"key": "oifname"}}, "right": "chvbr0"}}, {"match": {"op": "==", "left": {"payload": {"protocol": "ip6", "field": "saddr"}}, "right": {"prefix": {"addr": "fdcd::", "len": 16}}}}, {"counter": {"packets": 0, "bytes": 0}}, {"xt": {"type": "target", "name": "MASQUERADE"}}]}}, {"table": {"family": "ip6", "name": "filter", "handle": 2}}, {"chain": {"family": "ip6", "table": "filter", "name": "FORWARD", "handle": 1, "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}}, {"rule": {"family": "ip6", "table": "filter", "chain": "FORWARD", "handle": 2, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "chvbr0"}}, {"counter": {"packets": 0, "bytes": 0}}, {"accept": null}]}}, {"rule": {"family": "ip6", "table": "filter", "chain": "FORWARD", "handle": 3, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "chvbr0"}}, {"xt": {"type": "match", "name": "conntrack"}}, {"counter": {"packets": 0, "bytes": 0}}, {"accept": null}]}}]}"#;

    const IPTABLES_NFT_TEXT: &str = "table ip6 nat {\n\tchain POSTROUTING { # handle 1\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\t\toifname != \"chvbr0\" ip6 saddr fdcd::/16 counter packets 0 bytes 0 masquerade # handle 2\n\t}\n}\ntable ip6 filter { # handle 2\n\tchain FORWARD { # handle 1\n\t\ttype filter hook forward priority filter; policy accept;\n\t\tiifname \"chvbr0\" counter packets 0 bytes 0 accept # handle 2\n\t\toifname \"chvbr0\" ct state related,established counter packets 0 bytes 0 accept # handle 3\n\t}\n}\n";

    #[test]
    fn parses_iptables_nft_rules() {
        let mut rs = Ruleset::from_json(IPTABLES_NFT, Source::Library).unwrap();
        assert!(rs.has_xt() && rs.untyped.is_empty());
        assert_eq!(rs.tables_with_xt_matches(), vec![("ip6", "filter")]);
        rs.attach_xt_text(IPTABLES_NFT_TEXT);
        assert!(rs.table_exists(NfFamily::IP6, "nat"));
        let post = rs.ipv6_base_chains(NfHook::Postrouting).next().unwrap();
        assert_eq!(post._type, Some(nftables::types::NfChainType::NAT));
        let r: Vec<_> = rs.rules_of(post).collect();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].verdict(), Some(Action::Nat));
        let m: Vec<_> = r[0].matches().collect();
        assert!(
            m[0].is_meta(MetaKey::Oifname) && m[0].negated() && m[0].right.matches_ifname("chvbr0")
        );
        assert_eq!(
            m[1].right.as_ipv6_prefix(),
            Some(("fdcd::".parse().unwrap(), 16))
        );
        let fwd = rs.ipv6_base_chains(NfHook::Forward).next().unwrap();
        let rules: Vec<_> = rs.rules_of(fwd).collect();
        assert!(rules[0].accepts());
        let em = rules[1].effective_matches();
        let ct = em
            .iter()
            .find(|m| m.ct_key() == Some("state"))
            .expect("ct state decoded");
        assert_eq!(ct.right.members().strings(), vec!["related", "established"]);
        assert_eq!(rules[1].opaque_xt().count(), 0);
    }

    #[test]
    fn undecoded_xt_stays_opaque() {
        let rs = Ruleset::from_json(IPTABLES_NFT, Source::Library).unwrap();
        let fwd = rs.ipv6_base_chains(NfHook::Forward).next().unwrap();
        let r = rs.rules_of(fwd).nth(1).unwrap();
        assert!(r.effective_matches().iter().all(|m| m.ct_key().is_none()));
        assert_eq!(r.opaque_xt().collect::<Vec<_>>(), vec!["conntrack"]);
    }

    #[test]
    fn native_sets_ranges_and_jumps() {
        let j = r#"{"nftables":[
 {"table":{"family":"inet","name":"g","handle":2}},
 {"set":{"family":"inet","table":"g","name":"ports","type":"inet_service","handle":9,"flags":["interval"],"elem":[22,{"range":[8000,8100]}]}},
 {"chain":{"family":"inet","table":"g","name":"input","handle":1,"type":"filter","hook":"input","prio":0,"policy":"drop"}},
 {"chain":{"family":"inet","table":"g","name":"guests","handle":4}},
 {"rule":{"family":"inet","table":"g","chain":"input","handle":3,"expr":[{"match":{"op":"==","left":{"meta":{"key":"iifname"}},"right":"chv*"}},{"jump":{"target":"guests"}}]}},
 {"rule":{"family":"inet","table":"g","chain":"guests","handle":5,"expr":[{"match":{"op":"==","left":{"payload":{"protocol":"tcp","field":"dport"}},"right":{"set":[22,8080]}}},{"accept":null}]}},
 {"rule":{"family":"inet","table":"g","chain":"guests","handle":6,"expr":[{"match":{"op":"==","left":{"payload":{"protocol":"tcp","field":"dport"}},"right":"@ports"}},{"accept":null}]}},
 {"rule":{"family":"inet","table":"g","chain":"guests","handle":7,"expr":[{"match":{"op":"in","left":{"ct":{"key":"state"}},"right":["established","related"]}},{"accept":null}]}},
 {"rule":{"family":"inet","table":"g","chain":"guests","handle":8,"expr":[{"reject":{"type":"icmpx","expr":"admin-prohibited"}}]}}
]}"#;
        let rs = Ruleset::from_json(j, Source::Library).unwrap();
        assert!(rs.untyped.is_empty());
        let input = rs.ipv6_base_chains(NfHook::Input).next().unwrap();
        assert!(input.policy_drops());
        let walked = rs.walk(input);
        assert_eq!(walked.len(), 5);
        let rules: Vec<&Rule> = walked.iter().map(|r| r.rule).collect();
        let first = rules[0].matches().next().unwrap();
        assert!(first.right.matches_ifname("chvbr0") && !first.right.matches_ifname("eth0"));
        assert_eq!(
            rules[1].matches().next().unwrap().right.members().ports(),
            vec![(22, 22), (8080, 8080)]
        );
        let named = rules[2].matches().next().unwrap();
        assert_eq!(
            rs.resolve(rules[2], &named.right).ports(),
            vec![(22, 22), (8000, 8100)]
        );
        assert_eq!(rules[4].verdict(), Some(Action::Drop));
        assert_eq!(walked[1].via.len(), 1);
        let m = walked[4].all_matches();
        assert!(m[0].is_meta(MetaKey::Iifname));
        assert_eq!(
            rules[3]
                .matches()
                .next()
                .unwrap()
                .right
                .members()
                .strings()
                .len(),
            2
        );
    }

    /// Real `nft -j` output (1.0.6) the crate's schema cannot type in full.
    #[test]
    fn untyped_statements_and_objects_are_kept_by_kind() {
        let j = r#"{"nftables":[
 {"map": {"family": "inet", "name": "vm", "table": "t", "type": "ifname", "handle": 17, "map": "verdict", "elem": [["a", {"accept": null}]]}},
 {"chain": {"family": "inet", "table": "t", "name": "pr", "handle": 1, "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"}},
 {"rule": {"family": "inet", "table": "t", "chain": "pr", "handle": 3, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "x"}}, {"masquerade": {"flags": "random"}}]}},
 {"rule": {"family": "inet", "table": "t", "chain": "pr", "handle": 9, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "sdif"}}, "right": "lo"}}, {"accept": null}]}}
]}"#;
        let rs = Ruleset::from_json(j, Source::Library).unwrap();
        assert_eq!(rs.untyped.len(), 1, "the verdict map");
        assert_eq!(rs.rules.len(), 2);
        let masq = &rs.rules[0];
        assert_eq!(masq.untyped.len(), 1);
        assert_eq!(masq.matches().count(), 1);
        assert_eq!(masq.verdict(), Some(Action::Nat));
        let sdif = &rs.rules[1];
        assert_eq!((sdif.untyped_matches(), sdif.matches().count()), (1, 0));
        assert!(sdif.accepts());
        assert_eq!(sdif.location(), "inet t pr (handle 9)");
    }

    #[test]
    fn empty_and_bad_json() {
        assert!(Ruleset::from_json("", Source::Library)
            .unwrap()
            .rules
            .is_empty());
        assert!(Ruleset::from_json("{}", Source::Library).is_err());
        assert!(Ruleset::from_json("{", Source::Library).is_err());
    }
}
