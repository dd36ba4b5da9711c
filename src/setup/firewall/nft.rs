//! nftables driver: one table of chvkit's own, replaced in a single transaction.
//!
//! The transaction is built from the `nftables` crate's typed schema ([`transaction`]) and
//! loaded through [`crate::host::nft::Nft`]: libnftables in-process (loaded with
//! `libloading`, so chvkit builds and runs where it is missing), else `nft -f -`.
//! `CHVKIT_LIBNFTABLES` and `CHVKIT_NFT` name other locations of either. The same table is
//! also kept as nft syntax ([`script`]): the file setup persists, which `nft -f` loads.

use std::borrow::Cow;

use nftables::expr::{
    Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix, SetItem, CT,
};
use nftables::schema::{self, NfCmd, NfListObject, NfObject, Nftables};
use nftables::stmt::{Counter, JumpTarget, Match, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};

use super::{sha256_hex, Firewall, FirewallError, Inspection, Rules};
use crate::host::nft::{Nft, NftError, Source, OUTPUT_STATELESS};
use crate::setup::state::FirewallRecord;

/// `inet`, not `ip6`: the host-protection chain then also drops IPv4 a guest might send to the
/// host's other addresses. NAT and forwarding match IPv6 only.
pub const FAMILY: &str = "inet";
const NF_FAMILY: NfFamily = NfFamily::INet;

/// nft's named base-chain priorities for the inet family: `srcnat` and `filter`.
const PRIO_SRCNAT: i32 = 100;
const PRIO_FILTER: i32 = 0;

/// The chain that guards the host itself.
const GUEST_TO_HOST: &str = "guest_to_host";

/// Opens the nftables runner on first use, so that building a driver changes nothing.
#[derive(Default)]
pub struct NftDriver {
    nft: Option<Nft>,
}

fn command_error(what: &str, e: NftError) -> FirewallError {
    FirewallError::Command {
        what: what.to_string(),
        message: match e {
            NftError::Command { message, .. } => message,
            other => other.to_string(),
        },
    }
}

impl NftDriver {
    pub fn new() -> NftDriver {
        NftDriver::default()
    }

    fn nft(&mut self) -> Result<&Nft, FirewallError> {
        let nft = match self.nft.take() {
            Some(nft) => nft,
            None => Nft::open().map_err(|e| match e {
                NftError::Unavailable { lib_error } => FirewallError::Unavailable(format!(
                    "nftables is not usable: cannot load libnftables ({lib_error}) and no `nft` \
                     command was found (install the nftables package, or use --firewall iptables)"
                )),
                other => FirewallError::Unavailable(other.to_string()),
            })?,
        };
        Ok(self.nft.insert(nft))
    }

    fn cmd(&mut self, what: &str, cmd: &str, flags: u32) -> Result<String, FirewallError> {
        self.nft()?
            .run(cmd, flags)
            .map_err(|e| command_error(what, e))
    }

    /// Load the table in one transaction: through libnftables as the crate-typed JSON
    /// [`transaction`]; through the `nft` fallback as `text`, the persisted [`script`] of the
    /// same ruleset (tests/nft_types.rs loads both and compares the kernel's listings), so
    /// that the fallback runs exactly what `nft -f` on the persisted file runs.
    fn load(&mut self, rules: &Rules, text: &str) -> Result<(), FirewallError> {
        let what = format!("loading nftables table {FAMILY} {}", rules.table);
        let nft = self.nft()?;
        let loaded = match nft.source() {
            Source::Library => nft.run_json(&transaction(rules)),
            Source::NftCommand => nft.run(text, 0),
        };
        loaded.map(|_| ()).map_err(|e| command_error(&what, e))
    }

    fn table_exists(&mut self, family: &str, table: &str) -> Result<bool, FirewallError> {
        let out = self.cmd("nft list tables", "list tables", OUTPUT_STATELESS)?;
        let want = format!("table {family} {table}");
        Ok(out.lines().any(|l| l.trim() == want))
    }

    fn listing(&mut self, family: &str, table: &str) -> Result<String, FirewallError> {
        self.cmd(
            &format!("nft list table {family} {table}"),
            &format!("list table {family} {table}"),
            OUTPUT_STATELESS,
        )
    }
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: protocol.into(),
            field: field.into(),
        },
    )))
}

fn string(s: &str) -> Expression<'static> {
    Expression::String(Cow::Owned(s.to_string()))
}

fn is(left: Expression<'static>, op: Operator, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}

/// `ct state { states }`: a flag list, which nft lists with `in`.
fn ct_state_in(states: &[&'static str]) -> Statement<'static> {
    let ct = Expression::Named(NamedExpression::CT(CT {
        key: "state".into(),
        family: None,
        dir: None,
    }));
    let list = states.iter().map(|s| Expression::String((*s).into()));
    is(ct, Operator::IN, Expression::List(list.collect()))
}

const ACCEPT: Statement<'static> = Statement::Accept(None);

/// The table as one libnftables JSON transaction of the crate's types, the same ruleset as
/// [`script`]: create the table if missing (so that the delete cannot fail), delete it, add
/// it back complete. Chains come before rules, as nft expands a table block, so that the
/// kernel assigns the same handles either way.
pub fn transaction(r: &Rules) -> Nftables<'static> {
    let table = || {
        NfListObject::Table(schema::Table {
            family: NF_FAMILY,
            name: r.table.clone().into(),
            handle: None,
        })
    };
    let chain = |name: &'static str, base: Option<(NfChainType, NfHook, i32)>| {
        let mut c = schema::Chain {
            family: NF_FAMILY,
            table: r.table.clone().into(),
            name: name.into(),
            ..Default::default()
        };
        if let Some((t, hook, prio)) = base {
            c._type = Some(t);
            c.hook = Some(hook);
            c.prio = Some(prio);
            c.policy = Some(NfChainPolicy::Accept);
        }
        NfListObject::Chain(c)
    };
    let rule = |in_chain: &'static str, expr: Vec<Statement<'static>>| {
        NfListObject::Rule(schema::Rule {
            family: NF_FAMILY,
            table: r.table.clone().into(),
            chain: in_chain.into(),
            expr: expr.into(),
            ..Default::default()
        })
    };
    let br = || string(&r.bridge);

    let mut chains = Vec::new();
    let mut rules = Vec::new();
    if r.nat {
        chains.push(chain(
            "postrouting",
            Some((NfChainType::NAT, NfHook::Postrouting, PRIO_SRCNAT)),
        ));
        let guests = Expression::Named(NamedExpression::Prefix(Prefix {
            addr: Box::new(string(&r.prefix.addr.to_string())),
            len: u32::from(r.prefix.len),
        }));
        rules.push(rule(
            "postrouting",
            vec![
                is(payload("ip6", "saddr"), Operator::EQ, guests),
                is(meta(MetaKey::Oifname), Operator::NEQ, br()),
                Statement::Masquerade(None),
            ],
        ));
    }
    chains.push(chain(
        "forward",
        Some((NfChainType::Filter, NfHook::Forward, PRIO_FILTER)),
    ));
    rules.push(rule(
        "forward",
        vec![is(meta(MetaKey::Iifname), Operator::EQ, br()), ACCEPT],
    ));
    rules.push(rule(
        "forward",
        vec![
            is(meta(MetaKey::Oifname), Operator::EQ, br()),
            ct_state_in(&["related", "established"]),
            ACCEPT,
        ],
    ));
    chains.push(chain(
        "input",
        Some((NfChainType::Filter, NfHook::Input, PRIO_FILTER)),
    ));
    rules.push(rule(
        "input",
        vec![
            is(meta(MetaKey::Iifname), Operator::EQ, br()),
            Statement::Jump(JumpTarget {
                target: GUEST_TO_HOST.into(),
            }),
        ],
    ));
    chains.push(chain(GUEST_TO_HOST, None));
    rules.push(rule(
        GUEST_TO_HOST,
        vec![ct_state_in(&["established", "related"]), ACCEPT],
    ));
    rules.push(rule(
        GUEST_TO_HOST,
        vec![
            is(meta(MetaKey::L4proto), Operator::EQ, string("ipv6-icmp")),
            ACCEPT,
        ],
    ));
    if !r.host_ports.is_empty() {
        let ports = || {
            let items = r
                .host_ports
                .iter()
                .map(|p| SetItem::Element(Expression::Number(u32::from(*p))));
            Expression::Named(NamedExpression::Set(items.collect()))
        };
        for proto in ["tcp", "udp"] {
            rules.push(rule(
                GUEST_TO_HOST,
                vec![is(payload(proto, "dport"), Operator::EQ, ports()), ACCEPT],
            ));
        }
    }
    rules.push(rule(
        GUEST_TO_HOST,
        vec![
            Statement::Counter(Counter::Anonymous(None)),
            Statement::Drop(None),
        ],
    ));

    let add = |o| NfObject::CmdObject(NfCmd::Add(o));
    let mut objects = vec![
        add(table()),
        NfObject::CmdObject(NfCmd::Delete(table())),
        add(table()),
    ];
    objects.extend(chains.into_iter().chain(rules).map(add));
    Nftables {
        objects: objects.into(),
    }
}

/// The table as an nft script that replaces it in one transaction: the first line creates the
/// table if missing so that the `delete` cannot fail, the last one adds it back complete.
pub fn script(r: &Rules) -> String {
    let t = &r.table;
    let br = &r.bridge;
    let mut s = String::new();
    s.push_str(&format!(
        "#!/usr/sbin/nft -f\n\
         # chvkit: network for Cloud Hypervisor guests on bridge {br} ({prefix}).\n\
         # Written by `chvkit setup`, removed by `chvkit teardown`. Loading it replaces table\n\
         # {FAMILY} {t} in one transaction and touches no other table.\n\
         table {FAMILY} {t}\n\
         delete table {FAMILY} {t}\n\
         table {FAMILY} {t} {{\n",
        prefix = r.prefix
    ));
    if r.nat {
        s.push_str(&format!(
            "\tchain postrouting {{\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tip6 saddr {prefix} oifname != \"{br}\" masquerade\n\
             \t}}\n\n",
            prefix = r.prefix
        ));
    }
    s.push_str(&format!(
        "\tchain forward {{\n\
         \t\ttype filter hook forward priority filter; policy accept;\n\
         \t\tiifname \"{br}\" accept\n\
         \t\toifname \"{br}\" ct state related,established accept\n\
         \t}}\n\n\
         \tchain input {{\n\
         \t\ttype filter hook input priority filter; policy accept;\n\
         \t\tiifname \"{br}\" jump guest_to_host\n\
         \t}}\n\n\
         \t# What guests may reach on the host itself; everything else from the bridge is dropped.\n\
         \tchain guest_to_host {{\n\
         \t\tct state established,related accept\n\
         \t\tmeta l4proto ipv6-icmp accept\n"
    ));
    if !r.host_ports.is_empty() {
        let ports = r
            .host_ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        s.push_str(&format!(
            "\t\ttcp dport {{ {ports} }} accept\n\t\tudp dport {{ {ports} }} accept\n"
        ));
    }
    s.push_str("\t\tcounter drop\n\t}\n}\n");
    s
}

impl Firewall for NftDriver {
    fn describe(&self, rules: &Rules) -> String {
        format!("nftables table {FAMILY} {}", rules.table)
    }

    fn preflight(&mut self) -> Result<(), FirewallError> {
        self.cmd("nft list tables", "list tables", OUTPUT_STATELESS)
            .map(|_| ())
    }

    fn inspect(
        &mut self,
        rules: &Rules,
        recorded: Option<&FirewallRecord>,
    ) -> Result<Inspection, FirewallError> {
        let name = format!("table {FAMILY} {}", rules.table);
        if !self.table_exists(FAMILY, &rules.table)? {
            return Ok(Inspection {
                found: format!("{name} absent"),
                up_to_date: false,
            });
        }
        let listing = self.listing(FAMILY, &rules.table)?;
        let chains = listing
            .lines()
            .filter(|l| l.trim_start().starts_with("chain "))
            .count();
        let rule_count = listing
            .lines()
            .filter(|l| {
                let t = l.trim();
                !t.is_empty()
                    && !t.starts_with("chain ")
                    && !t.starts_with("table ")
                    && !t.starts_with("type ")
                    && t != "}"
            })
            .count();
        let up_to_date = match recorded {
            Some(FirewallRecord::Nftables {
                family,
                table,
                script_sha256,
                listing_sha256,
            }) => {
                family == FAMILY
                    && table == &rules.table
                    && *script_sha256 == sha256_hex(script(rules).as_bytes())
                    && *listing_sha256 == sha256_hex(listing.as_bytes())
            }
            _ => false,
        };
        let found = if up_to_date {
            format!("{name} as setup loaded it ({chains} chains, {rule_count} rules)")
        } else if recorded.is_some() {
            format!("{name} differs from the profile's rules ({chains} chains, {rule_count} rules)")
        } else {
            format!(
                "{name} present but not recorded by setup ({chains} chains, {rule_count} rules)"
            )
        };
        Ok(Inspection { found, up_to_date })
    }

    fn apply(&mut self, rules: &Rules) -> Result<FirewallRecord, FirewallError> {
        let text = script(rules);
        self.load(rules, &text)?;
        let listing = self.listing(FAMILY, &rules.table)?;
        Ok(FirewallRecord::Nftables {
            family: FAMILY.to_string(),
            table: rules.table.clone(),
            script_sha256: sha256_hex(text.as_bytes()),
            listing_sha256: sha256_hex(listing.as_bytes()),
        })
    }

    fn present(&mut self, recorded: &FirewallRecord) -> Result<bool, FirewallError> {
        match recorded {
            FirewallRecord::Nftables { family, table, .. } => self.table_exists(family, table),
            _ => Ok(false),
        }
    }

    fn remove(&mut self, recorded: &FirewallRecord) -> Result<bool, FirewallError> {
        let FirewallRecord::Nftables { family, table, .. } = recorded else {
            return Ok(false);
        };
        if !self.table_exists(family, table)? {
            return Ok(false);
        }
        self.cmd(
            &format!("deleting nftables table {family} {table}"),
            &format!("delete table {family} {table}"),
            0,
        )?;
        Ok(true)
    }

    fn persist_script(&self, rules: &Rules) -> Option<String> {
        Some(script(rules))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(nat: bool, ports: Vec<u16>) -> Rules {
        Rules {
            bridge: "chvbr0".into(),
            prefix: "fdcd::/16".parse().unwrap(),
            nat,
            host_ports: ports,
            table: "chvkit".into(),
        }
    }

    #[test]
    fn script_replaces_only_its_table() {
        let s = script(&rules(true, vec![8080, 9000]));
        let stmts: Vec<&str> = s
            .lines()
            .filter(|l| l.starts_with("table") || l.starts_with("delete"))
            .collect();
        assert_eq!(
            stmts,
            [
                "table inet chvkit",
                "delete table inet chvkit",
                "table inet chvkit {"
            ]
        );
        assert!(s.contains("ip6 saddr fdcd::/16 oifname != \"chvbr0\" masquerade"));
        assert!(s.contains("tcp dport { 8080, 9000 } accept"));
        assert!(!s.contains("flush ruleset"));
    }

    #[test]
    fn no_nat_no_ports() {
        let s = script(&rules(false, vec![]));
        assert!(!s.contains("masquerade"));
        assert!(!s.contains("dport"));
        assert!(s.contains("counter drop"));
    }

    /// The transaction as JSON: the document that was checked to land in the
    /// kernel exactly as the script does (same `nft -j list ruleset`, same netlink bytecode;
    /// tests/nft_types.rs repeats the check through `chvkit setup`).
    const TRANSACTION: &str = r#"{"nftables":[
 {"add":{"table":{"family":"inet","name":"chvkit"}}},
 {"delete":{"table":{"family":"inet","name":"chvkit"}}},
 {"add":{"table":{"family":"inet","name":"chvkit"}}},
 {"add":{"chain":{"family":"inet","table":"chvkit","name":"postrouting","type":"nat","hook":"postrouting","prio":100,"policy":"accept"}}},
 {"add":{"chain":{"family":"inet","table":"chvkit","name":"forward","type":"filter","hook":"forward","prio":0,"policy":"accept"}}},
 {"add":{"chain":{"family":"inet","table":"chvkit","name":"input","type":"filter","hook":"input","prio":0,"policy":"accept"}}},
 {"add":{"chain":{"family":"inet","table":"chvkit","name":"guest_to_host"}}},
 {"add":{"rule":{"family":"inet","table":"chvkit","chain":"postrouting","expr":[{"match":{"op":"==","left":{"payload":{"protocol":"ip6","field":"saddr"}},"right":{"prefix":{"addr":"fdcd::","len":16}}}},{"match":{"op":"!=","left":{"meta":{"key":"oifname"}},"right":"chvbr0"}},{"masquerade":null}]}}},
 {"add":{"rule":{"family":"inet","table":"chvkit","chain":"forward","expr":[{"match":{"op":"==","left":{"meta":{"key":"iifname"}},"right":"chvbr0"}},{"accept":null}]}}},
 {"add":{"rule":{"family":"inet","table":"chvkit","chain":"forward","expr":[{"match":{"op":"==","left":{"meta":{"key":"oifname"}},"right":"chvbr0"}},{"match":{"op":"in","left":{"ct":{"key":"state"}},"right":["related","established"]}},{"accept":null}]}}},
 {"add":{"rule":{"family":"inet","table":"chvkit","chain":"input","expr":[{"match":{"op":"==","left":{"meta":{"key":"iifname"}},"right":"chvbr0"}},{"jump":{"target":"guest_to_host"}}]}}},
 {"add":{"rule":{"family":"inet","table":"chvkit","chain":"guest_to_host","expr":[{"match":{"op":"in","left":{"ct":{"key":"state"}},"right":["established","related"]}},{"accept":null}]}}},
 {"add":{"rule":{"family":"inet","table":"chvkit","chain":"guest_to_host","expr":[{"match":{"op":"==","left":{"meta":{"key":"l4proto"}},"right":"ipv6-icmp"}},{"accept":null}]}}},
 {"add":{"rule":{"family":"inet","table":"chvkit","chain":"guest_to_host","expr":[{"match":{"op":"==","left":{"payload":{"protocol":"tcp","field":"dport"}},"right":{"set":[8080,9000]}}},{"accept":null}]}}},
 {"add":{"rule":{"family":"inet","table":"chvkit","chain":"guest_to_host","expr":[{"match":{"op":"==","left":{"payload":{"protocol":"udp","field":"dport"}},"right":{"set":[8080,9000]}}},{"accept":null}]}}},
 {"add":{"rule":{"family":"inet","table":"chvkit","chain":"guest_to_host","expr":[{"counter":null},{"drop":null}]}}}
]}"#;

    #[test]
    fn transaction_is_the_scripts_ruleset_as_typed_json() {
        let got = serde_json::to_value(transaction(&rules(true, vec![8080, 9000]))).unwrap();
        let want: serde_json::Value = serde_json::from_str(TRANSACTION).unwrap();
        assert_eq!(got, want);
        let bare = serde_json::to_string(&transaction(&rules(false, vec![]))).unwrap();
        assert!(!bare.contains("masquerade") && !bare.contains("dport"));
        assert!(bare.contains(r#"{"counter":null},{"drop":null}"#));
    }
}
