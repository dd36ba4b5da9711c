//! nftables driver: one table of chvkit's own, replaced in a single transaction.
//!
//! Commands go through [`crate::host::nft::Nft`]: libnftables in-process (loaded with
//! `libloading`, so chvkit builds and runs where it is missing), else `nft -f -`.
//! `CHVKIT_LIBNFTABLES` and `CHVKIT_NFT` name other locations of either.

use super::{sha256_hex, Firewall, FirewallError, Inspection, Rules};
use crate::host::nft::{Nft, NftError, OUTPUT_STATELESS};
use crate::setup::state::FirewallRecord;

/// `inet`, not `ip6`: the host-protection chain then also drops IPv4 a guest might send to the
/// host's other addresses. NAT and forwarding match IPv6 only.
pub const FAMILY: &str = "inet";

/// Opens the nftables runner on first use, so that building a driver changes nothing.
#[derive(Default)]
pub struct NftDriver {
    nft: Option<Nft>,
}

impl NftDriver {
    pub fn new() -> NftDriver {
        NftDriver::default()
    }

    fn cmd(&mut self, what: &str, cmd: &str, flags: u32) -> Result<String, FirewallError> {
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
        self.nft
            .insert(nft)
            .run(cmd, flags)
            .map_err(|e| FirewallError::Command {
                what: what.to_string(),
                message: match e {
                    NftError::Command { message, .. } => message,
                    other => other.to_string(),
                },
            })
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
        self.cmd(
            &format!("loading nftables table {FAMILY} {}", rules.table),
            &text,
            0,
        )?;
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
}
