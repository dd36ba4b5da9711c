//! The nftables ruleset, read in-process through `libnftables.so.1` (loaded at run time with
//! `libloading`) as JSON, with typed accessors for tables, chains, rules and their statements.
//!
//! Rules written by `iptables-nft`/`ip6tables-nft` live here too (tables `ip6 nat`,
//! `ip6 filter`), so one listing covers both tools. Some of their matches are xtables
//! extensions that the JSON output names but does not describe (`{"xt":{"name":"conntrack"}}`);
//! for those rules a second, text listing with handles supplies the statement text
//! (`ct state related,established`) and [`Stmt::Xt`] carries it.
//!
//! Commands run through [`Nft`], which `chvkit setup` also loads its table with. Only when the
//! library is absent does it spawn `nft` (`nft -j list ruleset` here).

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::io::Write;
use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Serialize;
use serde_json::Value as Json;

/// `NFT_CTX_OUTPUT_*` flags (nftables/libnftables.h), for [`Nft::run`].
pub const OUTPUT_STATELESS: c_uint = 1 << 2;
pub const OUTPUT_HANDLE: c_uint = 1 << 3;
pub const OUTPUT_JSON: c_uint = 1 << 4;

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

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Table {
    pub family: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Chain {
    pub family: String,
    pub table: String,
    pub name: String,
    /// `filter`, `nat`, `route` for base chains.
    pub chain_type: Option<String>,
    /// `prerouting`, `input`, `forward`, `output`, `postrouting`, ... for base chains.
    pub hook: Option<String>,
    pub prio: Option<i64>,
    /// `accept` or `drop` for base chains.
    pub policy: Option<String>,
}

impl Chain {
    pub fn is_base(&self) -> bool {
        self.hook.is_some()
    }
    /// Base chain of this hook in a family that sees IPv6 packets (`ip6` or `inet`).
    pub fn is_ipv6_hook(&self, hook: &str) -> bool {
        self.hook.as_deref() == Some(hook) && sees_ipv6(&self.family)
    }
    pub fn policy_drops(&self) -> bool {
        self.policy.as_deref() == Some("drop")
    }
    /// `family table chain`, as `nft` addresses it.
    pub fn spec(&self) -> String {
        format!("{} {} {}", self.family, self.table, self.name)
    }
}

/// Families whose rules see IPv6 packets at the IP layer.
pub fn sees_ipv6(family: &str) -> bool {
    family == "ip6" || family == "inet"
}

/// A right-hand value of a match.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Value {
    Str(String),
    Num(i64),
    Bool(bool),
    Prefix {
        addr: String,
        len: u8,
    },
    Range(Box<Value>, Box<Value>),
    /// An anonymous set `{ a, b }` or a flag list (`ct state established,related`).
    Set(Vec<Value>),
    /// A named set `@name` (resolved through [`Ruleset::set_elements`]).
    SetRef(String),
    Other(Json),
}

impl Value {
    fn from_json(j: &Json) -> Value {
        match j {
            Json::String(s) => match s.strip_prefix('@') {
                Some(name) => Value::SetRef(name.to_string()),
                None => Value::Str(s.clone()),
            },
            Json::Number(n) => n
                .as_i64()
                .map(Value::Num)
                .unwrap_or(Value::Other(j.clone())),
            Json::Bool(b) => Value::Bool(*b),
            Json::Array(a) => Value::Set(a.iter().map(Value::from_json).collect()),
            Json::Object(o) => {
                if let Some(p) = o.get("prefix") {
                    let addr = p.get("addr").and_then(Json::as_str);
                    let len = p.get("len").and_then(Json::as_u64);
                    if let (Some(addr), Some(len)) = (addr, len) {
                        return Value::Prefix {
                            addr: addr.to_string(),
                            len: u8::try_from(len).unwrap_or(u8::MAX),
                        };
                    }
                }
                if let Some(Json::Array(r)) = o.get("range") {
                    if let [a, b] = r.as_slice() {
                        return Value::Range(
                            Box::new(Value::from_json(a)),
                            Box::new(Value::from_json(b)),
                        );
                    }
                }
                if let Some(Json::Array(s)) = o.get("set") {
                    return Value::Set(s.iter().map(Value::from_json).collect());
                }
                Value::Other(j.clone())
            }
            _ => Value::Other(j.clone()),
        }
    }

    /// The members of a set value, or the value itself.
    pub fn members(&self) -> Vec<&Value> {
        match self {
            Value::Set(v) => v.iter().flat_map(|x| x.members()).collect(),
            other => vec![other],
        }
    }

    /// Does an interface-name value (string, wildcard `pfx*`, or set of them) name `ifname`?
    pub fn matches_ifname(&self, ifname: &str) -> bool {
        self.members().into_iter().any(|m| match m {
            Value::Str(s) => ifname_pattern_matches(s, ifname),
            _ => false,
        })
    }

    /// The value as an IPv6 prefix (`fdcd::/16`), or a single address as a /128.
    pub fn as_ipv6_prefix(&self) -> Option<(Ipv6Addr, u8)> {
        match self {
            Value::Prefix { addr, len } => Some((addr.parse().ok()?, *len)),
            Value::Str(s) => Some((s.parse().ok()?, 128)),
            _ => None,
        }
    }

    /// Port numbers and ranges in the value (`22`, `{22, 8080}`, `1000-2000`).
    pub fn ports(&self) -> Vec<(u16, u16)> {
        self.members()
            .into_iter()
            .filter_map(|m| match m {
                Value::Num(n) => u16::try_from(*n).ok().map(|p| (p, p)),
                Value::Range(a, b) => match (a.as_ref(), b.as_ref()) {
                    (Value::Num(a), Value::Num(b)) => {
                        Some((u16::try_from(*a).ok()?, u16::try_from(*b).ok()?))
                    }
                    _ => None,
                },
                _ => None,
            })
            .collect()
    }

    /// Strings in the value (`established`, `{ "a", "b" }`).
    pub fn strings(&self) -> Vec<&str> {
        self.members()
            .into_iter()
            .filter_map(|m| match m {
                Value::Str(s) => Some(s.as_str()),
                _ => None,
            })
            .collect()
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

/// What a match looks at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Operand {
    /// `meta iifname`, `meta oifname`, `meta l4proto`, ...
    Meta(String),
    /// `ip6 saddr`, `tcp dport`, `th dport`, ...
    Payload {
        protocol: String,
        field: String,
    },
    /// `ct state`, ...
    Ct(String),
    Other(String),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Match {
    pub left: Operand,
    /// `==`, `!=`, `in`, `<`, ... (`in` and `==` both mean "is one of" for sets and flags).
    pub op: String,
    pub right: Value,
}

impl Match {
    pub fn negated(&self) -> bool {
        self.op == "!="
    }
    pub fn is_meta(&self, key: &str) -> bool {
        matches!(&self.left, Operand::Meta(k) if k == key)
    }
    pub fn is_payload(&self, protocol: &str, field: &str) -> bool {
        matches!(&self.left, Operand::Payload { protocol: p, field: f } if p == protocol && f == field)
    }
    pub fn is_ct(&self, key: &str) -> bool {
        matches!(&self.left, Operand::Ct(k) if k == key)
    }
}

/// One statement of a rule.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stmt {
    Match(Match),
    Accept,
    Drop,
    Reject,
    Jump(String),
    Goto(String),
    Return,
    Continue,
    Masquerade,
    Snat,
    Dnat,
    Redirect,
    Counter,
    /// An xtables extension (iptables-nft): `kind` is `match` or `target`, `text` the statement
    /// as `nft` prints it when it could be recovered (e.g. `ct state related,established`).
    Xt {
        kind: String,
        name: String,
        text: Option<String>,
    },
    Other(String),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rule {
    pub family: String,
    pub table: String,
    pub chain: String,
    pub handle: u64,
    pub stmts: Vec<Stmt>,
}

impl Rule {
    pub fn matches(&self) -> impl Iterator<Item = &Match> {
        self.stmts.iter().filter_map(|s| match s {
            Stmt::Match(m) => Some(m),
            _ => None,
        })
    }

    /// Matches, with xtables `conntrack`/`state` matches decoded from their text into
    /// `ct state` matches (the only xt matches doctor needs to understand).
    pub fn effective_matches(&self) -> Vec<Match> {
        let mut v: Vec<Match> = self.matches().cloned().collect();
        for s in &self.stmts {
            if let Stmt::Xt { kind, name, text } = s {
                if kind == "match" && (name == "conntrack" || name == "state") {
                    if let Some(states) = text.as_deref().and_then(ct_states_from_text) {
                        v.push(Match {
                            left: Operand::Ct("state".into()),
                            op: "in".into(),
                            right: Value::Set(states.into_iter().map(Value::Str).collect()),
                        });
                    }
                }
            }
        }
        v
    }

    /// Xt matches whose meaning could not be recovered (the rule then matches more narrowly
    /// than [`Rule::effective_matches`] shows).
    pub fn opaque_xt(&self) -> impl Iterator<Item = &str> {
        self.stmts.iter().filter_map(|s| match s {
            Stmt::Xt { kind, name, text } if kind == "match" => {
                let known = (name == "conntrack" || name == "state")
                    && text.as_deref().and_then(ct_states_from_text).is_some();
                (!known).then_some(name.as_str())
            }
            _ => None,
        })
    }

    /// The terminal verdict or NAT action of the rule, if any.
    pub fn verdict(&self) -> Option<&Stmt> {
        self.stmts.iter().rev().find(|s| {
            matches!(
                s,
                Stmt::Accept
                    | Stmt::Drop
                    | Stmt::Reject
                    | Stmt::Jump(_)
                    | Stmt::Goto(_)
                    | Stmt::Return
                    | Stmt::Masquerade
                    | Stmt::Snat
                    | Stmt::Dnat
                    | Stmt::Redirect
            ) || matches!(s, Stmt::Xt { kind, .. } if kind == "target")
        })
    }

    pub fn is_masquerade(&self) -> bool {
        self.stmts.iter().any(|s| match s {
            Stmt::Masquerade => true,
            Stmt::Xt { kind, name, .. } => kind == "target" && name == "MASQUERADE",
            _ => false,
        })
    }

    pub fn is_snat(&self) -> bool {
        self.stmts.iter().any(|s| match s {
            Stmt::Snat => true,
            Stmt::Xt { kind, name, .. } => kind == "target" && name == "SNAT",
            _ => false,
        })
    }

    pub fn accepts(&self) -> bool {
        matches!(self.verdict(), Some(Stmt::Accept))
    }

    pub fn drops(&self) -> bool {
        matches!(self.verdict(), Some(Stmt::Drop | Stmt::Reject))
            || self.stmts.iter().any(|s| {
                matches!(s, Stmt::Xt { kind, name, .. } if kind == "target" && name == "REJECT")
            })
    }

    /// Human form for messages: `ip6 filter FORWARD handle 3`.
    pub fn location(&self) -> String {
        format!(
            "{} {} {} (handle {})",
            self.family, self.table, self.chain, self.handle
        )
    }
}

/// Parse the state list out of statement text such as `ct state related,established`
/// (nft) or `state RELATED,ESTABLISHED` / `ctstate ...` (iptables-style renderings).
pub fn ct_states_from_text(text: &str) -> Option<Vec<String>> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let starts = words.iter().enumerate().filter_map(|(i, w)| {
        let keyword = matches!(*w, "ctstate" | "--ctstate" | "--state")
            || (*w == "state" && (i == 0 || words[i - 1] == "ct"));
        keyword.then_some(i + 1)
    });
    for pos in starts {
        let mut states = Vec::new();
        for w in &words[pos..] {
            let w = w.trim_matches(|c| c == '{' || c == '}');
            if w.is_empty() {
                continue;
            }
            let mut any = false;
            for s in w.split(',').filter(|s| !s.is_empty()) {
                let s = s.to_ascii_lowercase();
                if matches!(
                    s.as_str(),
                    "new" | "established" | "related" | "invalid" | "untracked"
                ) {
                    states.push(s);
                    any = true;
                }
            }
            if !any || !w.ends_with(',') {
                break;
            }
        }
        if !states.is_empty() {
            return Some(states);
        }
    }
    None
}

/// The whole ruleset.
#[derive(Debug, Clone, Serialize)]
pub struct Ruleset {
    pub source: Source,
    pub tables: Vec<Table>,
    pub chains: Vec<Chain>,
    pub rules: Vec<Rule>,
    /// Named sets: `(family, table, name)` -> elements.
    #[serde(skip)]
    pub sets: HashMap<(String, String, String), Value>,
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
        for (family, table) in rs.tables_with_xt_matches() {
            let cmd = format!("list table {family} {table}");
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
        };
        // An empty ruleset lists as nothing at all in some versions.
        if text.trim().is_empty() {
            return Ok(rs);
        }
        let doc: Json = serde_json::from_str(text).map_err(|e| NftError::Json(e.to_string()))?;
        let items = doc
            .get("nftables")
            .and_then(Json::as_array)
            .ok_or_else(|| NftError::Json("no top-level `nftables` array".into()))?;
        let s = |o: &Json, k: &str| o.get(k).and_then(Json::as_str).map(str::to_string);
        for item in items {
            if let Some(t) = item.get("table") {
                rs.tables.push(Table {
                    family: s(t, "family").unwrap_or_default(),
                    name: s(t, "name").unwrap_or_default(),
                });
            } else if let Some(c) = item.get("chain") {
                rs.chains.push(Chain {
                    family: s(c, "family").unwrap_or_default(),
                    table: s(c, "table").unwrap_or_default(),
                    name: s(c, "name").unwrap_or_default(),
                    chain_type: s(c, "type"),
                    hook: s(c, "hook"),
                    prio: c.get("prio").and_then(Json::as_i64),
                    policy: s(c, "policy"),
                });
            } else if let Some(r) = item.get("rule") {
                let stmts = r
                    .get("expr")
                    .and_then(Json::as_array)
                    .map(|v| v.iter().map(stmt_from_json).collect())
                    .unwrap_or_default();
                rs.rules.push(Rule {
                    family: s(r, "family").unwrap_or_default(),
                    table: s(r, "table").unwrap_or_default(),
                    chain: s(r, "chain").unwrap_or_default(),
                    handle: r.get("handle").and_then(Json::as_u64).unwrap_or(0),
                    stmts,
                });
            } else if let Some(set) = item.get("set").or_else(|| item.get("map")) {
                let key = (
                    s(set, "family").unwrap_or_default(),
                    s(set, "table").unwrap_or_default(),
                    s(set, "name").unwrap_or_default(),
                );
                let elems = set
                    .get("elem")
                    .map(Value::from_json)
                    .unwrap_or(Value::Set(Vec::new()));
                rs.sets.insert(key, elems);
            }
        }
        Ok(rs)
    }

    /// Whether any rule uses an xtables extension (written by iptables-nft).
    pub fn has_xt(&self) -> bool {
        self.rules
            .iter()
            .any(|r| r.stmts.iter().any(|s| matches!(s, Stmt::Xt { .. })))
    }

    /// Tables holding xtables *matches*, whose text must be listed to understand them (an xt
    /// target is fully described by its name).
    fn tables_with_xt_matches(&self) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = Vec::new();
        for r in &self.rules {
            let has = r
                .stmts
                .iter()
                .any(|s| matches!(s, Stmt::Xt { kind, .. } if kind == "match"));
            let key = (r.family.clone(), r.table.clone());
            if has && !v.contains(&key) {
                v.push(key);
            }
        }
        v
    }

    /// Fill in the text of xt statements from a `list ruleset` text listing with handles.
    pub fn attach_xt_text(&mut self, listing: &str) {
        let texts = rule_texts_by_handle(listing);
        for r in &mut self.rules {
            let key = (r.family.clone(), r.table.clone(), r.handle);
            let Some(line) = texts.get(&key) else {
                continue;
            };
            for s in &mut r.stmts {
                if let Stmt::Xt { text, .. } = s {
                    *text = Some(line.clone());
                }
            }
        }
    }

    pub fn table_exists(&self, family: &str, name: &str) -> bool {
        self.tables
            .iter()
            .any(|t| t.family == family && t.name == name)
    }

    pub fn chain(&self, family: &str, table: &str, name: &str) -> Option<&Chain> {
        self.chains
            .iter()
            .find(|c| c.family == family && c.table == table && c.name == name)
    }

    /// Rules of one chain, in order.
    pub fn rules_of<'a>(&'a self, chain: &'a Chain) -> impl Iterator<Item = &'a Rule> + 'a {
        self.rules.iter().filter(move |r| {
            r.family == chain.family && r.table == chain.table && r.chain == chain.name
        })
    }

    /// Base chains at `hook` in the families that see IPv6 packets.
    pub fn ipv6_base_chains<'a>(&'a self, hook: &'a str) -> impl Iterator<Item = &'a Chain> + 'a {
        self.chains.iter().filter(move |c| c.is_ipv6_hook(hook))
    }

    /// `chain` and every chain it reaches by `jump`/`goto` (same table), each once.
    pub fn reachable_from<'a>(&'a self, chain: &'a Chain) -> Vec<&'a Chain> {
        let mut out: Vec<&Chain> = vec![chain];
        let mut i = 0;
        while i < out.len() {
            let c = out[i];
            for r in self.rules_of(c) {
                for s in &r.stmts {
                    if let Stmt::Jump(t) | Stmt::Goto(t) = s {
                        if let Some(next) = self.chain(&c.family, &c.table, t) {
                            if !out.iter().any(|x| std::ptr::eq(*x, next)) {
                                out.push(next);
                            }
                        }
                    }
                }
            }
            i += 1;
        }
        out
    }

    /// Rules of `chain` and of the chains it jumps to.
    pub fn rules_reachable_from<'a>(&'a self, chain: &'a Chain) -> Vec<&'a Rule> {
        self.reachable_from(chain)
            .into_iter()
            .flat_map(|c| self.rules_of(c))
            .collect()
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
            for s in &r.stmts {
                if let Stmt::Jump(t) | Stmt::Goto(t) = s {
                    if let Some(next) = self.chain(&chain.family, &chain.table, t) {
                        via.push(r);
                        self.walk_into(next, via, stack, out);
                        via.pop();
                    }
                }
            }
        }
        stack.pop();
    }

    /// Resolve a named-set reference against the rule's table.
    pub fn set_elements(&self, rule: &Rule, name: &str) -> Option<&Value> {
        self.sets
            .get(&(rule.family.clone(), rule.table.clone(), name.to_string()))
    }

    /// A match's right side with a named set resolved.
    pub fn resolve<'a>(&'a self, rule: &Rule, v: &'a Value) -> &'a Value {
        match v {
            Value::SetRef(name) => self.set_elements(rule, name).unwrap_or(v),
            other => other,
        }
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

fn stmt_from_json(j: &Json) -> Stmt {
    let Some((key, body)) = j.as_object().and_then(|o| o.iter().next()) else {
        return Stmt::Other(j.to_string());
    };
    match key.as_str() {
        "match" => {
            let left = match body.get("left") {
                Some(l) => operand_from_json(l),
                None => Operand::Other(String::new()),
            };
            Stmt::Match(Match {
                left,
                op: body
                    .get("op")
                    .and_then(Json::as_str)
                    .unwrap_or("==")
                    .to_string(),
                right: body
                    .get("right")
                    .map(Value::from_json)
                    .unwrap_or(Value::Other(Json::Null)),
            })
        }
        "accept" => Stmt::Accept,
        "drop" => Stmt::Drop,
        "reject" => Stmt::Reject,
        "return" => Stmt::Return,
        "continue" => Stmt::Continue,
        "jump" | "goto" => {
            let target = body
                .get("target")
                .and_then(Json::as_str)
                .unwrap_or_default()
                .to_string();
            if key == "jump" {
                Stmt::Jump(target)
            } else {
                Stmt::Goto(target)
            }
        }
        "masquerade" => Stmt::Masquerade,
        "snat" => Stmt::Snat,
        "dnat" => Stmt::Dnat,
        "redirect" => Stmt::Redirect,
        "counter" => Stmt::Counter,
        "xt" => Stmt::Xt {
            kind: body
                .get("type")
                .and_then(Json::as_str)
                .unwrap_or_default()
                .to_string(),
            name: body
                .get("name")
                .and_then(Json::as_str)
                .unwrap_or_default()
                .to_string(),
            text: None,
        },
        other => Stmt::Other(other.to_string()),
    }
}

fn operand_from_json(j: &Json) -> Operand {
    if let Some(m) = j.get("meta") {
        return Operand::Meta(
            m.get("key")
                .and_then(Json::as_str)
                .unwrap_or_default()
                .to_string(),
        );
    }
    if let Some(p) = j.get("payload") {
        return Operand::Payload {
            protocol: p
                .get("protocol")
                .and_then(Json::as_str)
                .unwrap_or_default()
                .to_string(),
            field: p
                .get("field")
                .and_then(Json::as_str)
                .unwrap_or_default()
                .to_string(),
        };
    }
    if let Some(c) = j.get("ct") {
        return Operand::Ct(
            c.get("key")
                .and_then(Json::as_str)
                .unwrap_or_default()
                .to_string(),
        );
    }
    Operand::Other(j.to_string())
}

/// Map `(family, table, handle)` to the rule's text from a listing made with handles:
/// `table ip6 filter {` / `chain FORWARD {` / `<rule> # handle 3`.
pub fn rule_texts_by_handle(listing: &str) -> HashMap<(String, String, u64), String> {
    let mut out = HashMap::new();
    let mut table: Option<(String, String)> = None;
    for line in listing.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("table ") {
            let mut w = rest.split_whitespace();
            if let (Some(f), Some(n)) = (w.next(), w.next()) {
                table = Some((f.to_string(), n.to_string()));
            }
            continue;
        }
        let Some((rule, h)) = t.rsplit_once(" # handle ") else {
            continue;
        };
        let (Some((f, n)), Ok(h)) = (&table, h.trim().parse::<u64>()) else {
            continue;
        };
        if rule.starts_with("chain ") || rule.starts_with("set ") || rule.starts_with("map ") {
            continue;
        }
        out.insert((f.clone(), n.clone(), h), rule.trim().to_string());
    }
    out
}

type NewFn = unsafe extern "C" fn(c_uint) -> *mut c_void;
type FreeFn = unsafe extern "C" fn(*mut c_void);
type SetFlagsFn = unsafe extern "C" fn(*mut c_void, c_uint);
type BufferFn = unsafe extern "C" fn(*mut c_void) -> c_int;
type GetBufferFn = unsafe extern "C" fn(*mut c_void) -> *const c_char;
type RunFn = unsafe extern "C" fn(*mut c_void, *const c_char) -> c_int;

/// Runs nftables commands: in-process through a libnftables context when the library loads
/// (`CHVKIT_LIBNFTABLES` names another file), else through the `nft` command (`CHVKIT_NFT`, or
/// `nft` on `PATH`). The host model lists with it; `setup` also loads transactions with it.
pub struct Nft {
    backend: Backend,
}

enum Backend {
    Lib(LibContext),
    Cli(PathBuf),
}

impl Nft {
    pub fn open() -> Result<Nft, NftError> {
        let lib_path = std::env::var("CHVKIT_LIBNFTABLES")
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "libnftables.so.1".to_string());
        let lib_error = match LibContext::load(&lib_path) {
            Ok(ctx) => {
                return Ok(Nft {
                    backend: Backend::Lib(ctx),
                })
            }
            Err(e) => e,
        };
        let cli = match std::env::var_os("CHVKIT_NFT").filter(|s| !s.is_empty()) {
            Some(p) => Some(PathBuf::from(p)).filter(|p| p.is_file()),
            None => super::tools::find_in_path("nft"),
        };
        match cli {
            Some(p) => {
                tracing::info!(
                    "libnftables unavailable ({lib_error}); using {}",
                    p.display()
                );
                Ok(Nft {
                    backend: Backend::Cli(p),
                })
            }
            None => Err(NftError::Unavailable { lib_error }),
        }
    }

    pub fn source(&self) -> Source {
        match self.backend {
            Backend::Lib(_) => Source::Library,
            Backend::Cli(_) => Source::NftCommand,
        }
    }

    /// Run `cmd` (one command or a whole script, as `nft -f` takes it) with `NFT_CTX_OUTPUT_*`
    /// `flags`; returns what it printed.
    pub fn run(&self, cmd: &str, flags: c_uint) -> Result<String, NftError> {
        let failed = |message: String| NftError::Command {
            command: format!("nft {}", cmd.lines().next().unwrap_or_default()),
            message,
        };
        match &self.backend {
            Backend::Lib(ctx) => ctx.run(cmd, flags).map_err(failed),
            Backend::Cli(path) => run_cli(path, cmd, flags).map_err(failed),
        }
    }
}

/// `nft` with the options matching `flags`. The command goes in on stdin (`-f -`), which takes
/// multi-line scripts as they are, except with `-j`: `nft -j -f` parses its input as JSON.
fn run_cli(path: &Path, cmd: &str, flags: c_uint) -> Result<String, String> {
    super::count_child();
    let mut c = Command::new(path);
    for (flag, opt) in [
        (OUTPUT_JSON, "-j"),
        (OUTPUT_HANDLE, "-a"),
        (OUTPUT_STATELESS, "-s"),
    ] {
        if flags & flag != 0 {
            c.arg(opt);
        }
    }
    let json = flags & OUTPUT_JSON != 0;
    if json {
        c.arg(cmd).stdin(Stdio::null());
    } else {
        c.args(["-f", "-"]).stdin(Stdio::piped());
    }
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", path.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(cmd.as_bytes())
            .map_err(|e| format!("writing to {}: {e}", path.display()))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for {}: {e}", path.display()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// A libnftables context with buffered output. The function pointers are copied out of the
/// library, which is dropped after `Drop::drop` has freed the context.
struct LibContext {
    ctx: *mut c_void,
    ctx_free: FreeFn,
    set_output_flags: SetFlagsFn,
    get_output: GetBufferFn,
    get_error: GetBufferFn,
    run_cmd: RunFn,
    _lib: libloading::Library,
}

impl LibContext {
    fn load(path: &str) -> Result<LibContext, String> {
        let fail = |e: libloading::Error| format!("{path}: {e}");
        // SAFETY: loading libnftables runs its (side-effect free) ELF constructors only; the
        // signatures match nftables/libnftables.h (stable since nftables 0.9).
        unsafe {
            let lib = libloading::Library::new(path).map_err(fail)?;
            let ctx_new: NewFn = sym(&lib, path, b"nft_ctx_new\0")?;
            let ctx_free: FreeFn = sym(&lib, path, b"nft_ctx_free\0")?;
            let set_output_flags: SetFlagsFn = sym(&lib, path, b"nft_ctx_output_set_flags\0")?;
            let buffer_output: BufferFn = sym(&lib, path, b"nft_ctx_buffer_output\0")?;
            let buffer_error: BufferFn = sym(&lib, path, b"nft_ctx_buffer_error\0")?;
            let get_output: GetBufferFn = sym(&lib, path, b"nft_ctx_get_output_buffer\0")?;
            let get_error: GetBufferFn = sym(&lib, path, b"nft_ctx_get_error_buffer\0")?;
            let run_cmd: RunFn = sym(&lib, path, b"nft_run_cmd_from_buffer\0")?;
            // NFT_CTX_DEFAULT (0); a null return means out of memory.
            let ctx = ctx_new(0);
            if ctx.is_null() {
                return Err(format!("{path}: nft_ctx_new failed"));
            }
            // Buffering makes output land in memory, not on stdout/stderr.
            if buffer_output(ctx) != 0 || buffer_error(ctx) != 0 {
                ctx_free(ctx);
                return Err(format!("{path}: cannot buffer output"));
            }
            Ok(LibContext {
                ctx,
                ctx_free,
                set_output_flags,
                get_output,
                get_error,
                run_cmd,
                _lib: lib,
            })
        }
    }

    fn run(&self, cmd: &str, flags: c_uint) -> Result<String, String> {
        let c = CString::new(cmd).map_err(|_| "command contains a NUL byte".to_string())?;
        // SAFETY: ctx is live until Drop; the output/error buffers are owned by the context
        // and valid until the next command, and are copied out before returning.
        unsafe {
            (self.set_output_flags)(self.ctx, flags);
            let rc = (self.run_cmd)(self.ctx, c.as_ptr());
            let out = cstr_to_string((self.get_output)(self.ctx));
            let err = cstr_to_string((self.get_error)(self.ctx));
            if rc == 0 {
                Ok(out)
            } else {
                Err(err.trim().to_string())
            }
        }
    }
}

impl Drop for LibContext {
    fn drop(&mut self) {
        // SAFETY: created by nft_ctx_new and freed exactly once.
        unsafe { (self.ctx_free)(self.ctx) }
    }
}

/// # Safety
/// `T` must be the type of the symbol `name` (NUL-terminated).
unsafe fn sym<T: Copy>(lib: &libloading::Library, path: &str, name: &[u8]) -> Result<T, String> {
    lib.get::<T>(name)
        .map(|s| *s)
        .map_err(|e| format!("{path}: {e}"))
}

/// # Safety
/// `p` must be null or a valid NUL-terminated string.
unsafe fn cstr_to_string(p: *const c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        CStr::from_ptr(p).to_string_lossy().into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real output of `ip6tables-nft` rules from the seed, `nft -j list ruleset` (nftables 1.0.6).
    const IPTABLES_NFT: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"table": {"family": "ip6", "name": "nat", "handle": 1}}, {"chain": {"family": "ip6", "table": "nat", "name": "POSTROUTING", "handle": 1, "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"}}, {"rule": {"family": "ip6", "table": "nat", "chain": "POSTROUTING", "handle": 2, "expr": [{"match": {"op": "!=", "left": {"meta": {"key": "oifname"}}, "right": "chvbr0"}}, {"match": {"op": "==", "left": {"payload": {"protocol": "ip6", "field": "saddr"}}, "right": {"prefix": {"addr": "fdcd::", "len": 16}}}}, {"counter": {"packets": 0, "bytes": 0}}, {"xt": {"type": "target", "name": "MASQUERADE"}}]}}, {"table": {"family": "ip6", "name": "filter", "handle": 2}}, {"chain": {"family": "ip6", "table": "filter", "name": "FORWARD", "handle": 1, "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}}, {"rule": {"family": "ip6", "table": "filter", "chain": "FORWARD", "handle": 2, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "chvbr0"}}, {"counter": {"packets": 0, "bytes": 0}}, {"accept": null}]}}, {"rule": {"family": "ip6", "table": "filter", "chain": "FORWARD", "handle": 3, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "chvbr0"}}, {"xt": {"type": "match", "name": "conntrack"}}, {"counter": {"packets": 0, "bytes": 0}}, {"accept": null}]}}]}"#;

    const IPTABLES_NFT_TEXT: &str = "table ip6 nat {\n\tchain POSTROUTING { # handle 1\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\t\toifname != \"chvbr0\" ip6 saddr fdcd::/16 counter packets 0 bytes 0 masquerade # handle 2\n\t}\n}\ntable ip6 filter { # handle 2\n\tchain FORWARD { # handle 1\n\t\ttype filter hook forward priority filter; policy accept;\n\t\tiifname \"chvbr0\" counter packets 0 bytes 0 accept # handle 2\n\t\toifname \"chvbr0\" ct state related,established counter packets 0 bytes 0 accept # handle 3\n\t}\n}\n";

    #[test]
    fn parses_iptables_nft_rules() {
        let mut rs = Ruleset::from_json(IPTABLES_NFT, Source::Library).unwrap();
        assert!(rs.has_xt());
        assert_eq!(
            rs.tables_with_xt_matches(),
            vec![("ip6".to_string(), "filter".to_string())]
        );
        rs.attach_xt_text(IPTABLES_NFT_TEXT);
        assert!(rs.table_exists("ip6", "nat"));
        let post = rs.ipv6_base_chains("postrouting").next().unwrap();
        assert_eq!(post.chain_type.as_deref(), Some("nat"));
        let r: Vec<_> = rs.rules_of(post).collect();
        assert_eq!(r.len(), 1);
        assert!(r[0].is_masquerade());
        let m: Vec<_> = r[0].matches().collect();
        assert!(m[0].is_meta("oifname") && m[0].negated() && m[0].right.matches_ifname("chvbr0"));
        assert_eq!(
            m[1].right.as_ipv6_prefix(),
            Some(("fdcd::".parse().unwrap(), 16))
        );
        let fwd = rs.ipv6_base_chains("forward").next().unwrap();
        let rules: Vec<_> = rs.rules_of(fwd).collect();
        assert!(rules[0].accepts());
        let em = rules[1].effective_matches();
        let ct = em
            .iter()
            .find(|m| m.is_ct("state"))
            .expect("ct state decoded");
        assert_eq!(ct.right.strings(), vec!["related", "established"]);
        assert_eq!(rules[1].opaque_xt().count(), 0);
    }

    #[test]
    fn undecoded_xt_stays_opaque() {
        let rs = Ruleset::from_json(IPTABLES_NFT, Source::Library).unwrap();
        let fwd = rs.ipv6_base_chains("forward").next().unwrap();
        let r = rs.rules_of(fwd).nth(1).unwrap();
        assert!(r.effective_matches().iter().all(|m| !m.is_ct("state")));
        assert_eq!(r.opaque_xt().collect::<Vec<_>>(), vec!["conntrack"]);
    }

    #[test]
    fn native_sets_ranges_and_jumps() {
        let j = r#"{"nftables":[
 {"table":{"family":"inet","name":"g","handle":2}},
 {"set":{"family":"inet","table":"g","name":"ports","type":"inet_service","handle":9,"elem":[22,{"range":[8000,8100]}]}},
 {"chain":{"family":"inet","table":"g","name":"input","handle":1,"type":"filter","hook":"input","prio":0,"policy":"drop"}},
 {"chain":{"family":"inet","table":"g","name":"guests","handle":4}},
 {"rule":{"family":"inet","table":"g","chain":"input","handle":3,"expr":[{"match":{"op":"==","left":{"meta":{"key":"iifname"}},"right":"chv*"}},{"jump":{"target":"guests"}}]}},
 {"rule":{"family":"inet","table":"g","chain":"guests","handle":5,"expr":[{"match":{"op":"==","left":{"payload":{"protocol":"tcp","field":"dport"}},"right":{"set":[22,8080]}}},{"accept":null}]}},
 {"rule":{"family":"inet","table":"g","chain":"guests","handle":6,"expr":[{"match":{"op":"==","left":{"payload":{"protocol":"tcp","field":"dport"}},"right":"@ports"}},{"accept":null}]}},
 {"rule":{"family":"inet","table":"g","chain":"guests","handle":7,"expr":[{"match":{"op":"in","left":{"ct":{"key":"state"}},"right":["established","related"]}},{"accept":null}]}},
 {"rule":{"family":"inet","table":"g","chain":"guests","handle":8,"expr":[{"reject":{"type":"icmpx","expr":"admin-prohibited"}}]}}
]}"#;
        let rs = Ruleset::from_json(j, Source::Library).unwrap();
        let input = rs.ipv6_base_chains("input").next().unwrap();
        assert!(input.policy_drops());
        let reach = rs.reachable_from(input);
        assert_eq!(reach.len(), 2);
        let rules = rs.rules_reachable_from(input);
        assert_eq!(rules.len(), 5);
        let first = rules[0].matches().next().unwrap();
        assert!(first.right.matches_ifname("chvbr0") && !first.right.matches_ifname("eth0"));
        assert_eq!(
            rules[1].matches().next().unwrap().right.ports(),
            vec![(22, 22), (8080, 8080)]
        );
        let named = rules[2].matches().next().unwrap();
        assert_eq!(
            rs.resolve(rules[2], &named.right).ports(),
            vec![(22, 22), (8000, 8100)]
        );
        assert!(rules[4].drops());
        let walked = rs.walk(input);
        assert_eq!(walked.len(), 5);
        assert_eq!(walked[1].via.len(), 1);
        let m = walked[4].all_matches();
        assert!(m[0].is_meta("iifname"));
        assert_eq!(rules[3].matches().next().unwrap().right.strings().len(), 2);
    }

    #[test]
    fn ct_state_text_forms() {
        assert_eq!(
            ct_states_from_text("oifname \"x\" ct state related,established counter accept"),
            Some(vec!["related".into(), "established".into()])
        );
        assert_eq!(
            ct_states_from_text("-m state --state RELATED,ESTABLISHED"),
            Some(vec!["related".into(), "established".into()])
        );
        assert_eq!(ct_states_from_text("iifname x accept"), None);
    }

    #[test]
    fn capabilities() {
        assert_eq!(cap_eff_has("CapEff:\t000001ffffffffff\n", 12), Some(true));
        assert_eq!(cap_eff_has("CapEff:\t0000000000000000\n", 12), Some(false));
        assert_eq!(cap_eff_has("Name: x\n", 12), None);
    }

    #[test]
    fn ifname_patterns() {
        assert!(ifname_pattern_matches("chv*", "chv-a"));
        assert!(!ifname_pattern_matches("chv\\*", "chv-a"));
        assert!(ifname_pattern_matches("chv\\*", "chv*"));
        assert!(ifname_pattern_matches("chvbr0", "chvbr0"));
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
