//! ip6tables driver, for hosts that must keep using iptables: chvkit's rules live in chains of
//! its own (CHVKIT-FWD, CHVKIT-IN, CHVKIT-NAT), each rebuilt atomically with
//! `ip6tables-restore --noflush` (declaring a chain there flushes only that chain), and jumped
//! to once from the built-in chain: every jump is checked with `-C` before `-A`.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use super::{Firewall, FirewallError, Inspection, Rules};
use crate::host::tools::find_in_path;
use crate::setup::state::FirewallRecord;

pub const CHAIN_FWD: &str = "CHVKIT-FWD";
pub const CHAIN_IN: &str = "CHVKIT-IN";
pub const CHAIN_NAT: &str = "CHVKIT-NAT";

pub struct Ip6tablesDriver {
    bins: Option<(PathBuf, PathBuf)>,
}

impl Default for Ip6tablesDriver {
    fn default() -> Self {
        Self::new()
    }
}

type Rule = (&'static str, &'static str, Vec<String>);

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// A rule from `args` split at spaces (bridge names and prefixes contain none).
fn rule(table: &'static str, chain: &'static str, args: &str) -> Rule {
    (table, chain, args.split(' ').map(str::to_string).collect())
}

const ESTABLISHED: &str = "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT";

/// `(table, chain, args)` for every rule in chvkit's chains.
fn chain_rules(r: &Rules) -> Vec<Rule> {
    let br = r.bridge.as_str();
    let mut v: Vec<Rule> = vec![
        rule("filter", CHAIN_FWD, &format!("-i {br} -j ACCEPT")),
        rule("filter", CHAIN_FWD, &format!("-o {br} {ESTABLISHED}")),
        rule("filter", CHAIN_IN, ESTABLISHED),
        rule("filter", CHAIN_IN, "-p ipv6-icmp -j ACCEPT"),
    ];
    for p in &r.host_ports {
        for proto in ["tcp", "udp"] {
            let args = format!("-p {proto} -m {proto} --dport {p} -j ACCEPT");
            v.push(rule("filter", CHAIN_IN, &args));
        }
    }
    v.push(rule("filter", CHAIN_IN, "-j DROP"));
    if r.nat {
        let args = format!("-s {} ! -o {br} -j MASQUERADE", r.prefix);
        v.push(rule("nat", CHAIN_NAT, &args));
    }
    v
}

fn chains(r: &Rules) -> Vec<(&'static str, &'static str)> {
    let mut c = vec![("filter", CHAIN_FWD), ("filter", CHAIN_IN)];
    if r.nat {
        c.push(("nat", CHAIN_NAT));
    }
    c
}

/// `(table, built-in chain, args)` of the jumps into chvkit's chains.
fn jumps(r: &Rules) -> Vec<Rule> {
    let mut j: Vec<Rule> = vec![
        rule("filter", "FORWARD", &format!("-j {CHAIN_FWD}")),
        rule("filter", "INPUT", &format!("-i {} -j {CHAIN_IN}", r.bridge)),
    ];
    if r.nat {
        j.push(rule("nat", "POSTROUTING", &format!("-j {CHAIN_NAT}")));
    }
    j
}

fn quote(args: &[String]) -> String {
    args.join(" ")
}

impl Ip6tablesDriver {
    pub fn new() -> Ip6tablesDriver {
        Ip6tablesDriver { bins: None }
    }

    fn bins(&mut self) -> Result<(PathBuf, PathBuf), FirewallError> {
        if let Some(b) = &self.bins {
            return Ok(b.clone());
        }
        let main = find_in_path("ip6tables");
        let restore = find_in_path("ip6tables-restore");
        match (main, restore) {
            (Some(m), Some(r)) => {
                self.bins = Some((m.clone(), r.clone()));
                Ok((m, r))
            }
            _ => Err(FirewallError::Unavailable(
                "--firewall iptables needs `ip6tables` and `ip6tables-restore` on PATH \
                 (install the iptables package, or use the nftables backend)"
                    .into(),
            )),
        }
    }

    /// Run ip6tables; `Ok(true)` on exit 0, `Ok(false)` on exit 1 (rule/chain absent).
    fn run(&mut self, table: &str, args: &[String]) -> Result<(bool, String), FirewallError> {
        let (bin, _) = self.bins()?;
        let out = Command::new(&bin)
            .arg("-w")
            .args(["-t", table])
            .args(args)
            .output()
            .map_err(|e| {
                FirewallError::Unavailable(format!("cannot run {}: {e}", bin.display()))
            })?;
        match out.status.code() {
            Some(0) => Ok((true, String::from_utf8_lossy(&out.stdout).into_owned())),
            Some(1) => Ok((false, String::from_utf8_lossy(&out.stderr).into_owned())),
            _ => Err(FirewallError::Command {
                what: format!("ip6tables -t {table} {}", quote(args)),
                message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            }),
        }
    }

    fn must(&mut self, table: &str, args: &[String]) -> Result<(), FirewallError> {
        match self.run(table, args)? {
            (true, _) => Ok(()),
            (false, err) => Err(FirewallError::Command {
                what: format!("ip6tables -t {table} {}", quote(args)),
                message: err.trim().to_string(),
            }),
        }
    }

    fn chain_rule_count(
        &mut self,
        table: &str,
        chain: &str,
    ) -> Result<Option<usize>, FirewallError> {
        match self.run(table, &s(&["-S", chain]))? {
            (true, out) => Ok(Some(out.lines().filter(|l| l.starts_with("-A ")).count())),
            (false, _) => Ok(None),
        }
    }

    fn check(&mut self, table: &str, chain: &str, args: &[String]) -> Result<bool, FirewallError> {
        let mut a = s(&["-C", chain]);
        a.extend_from_slice(args);
        Ok(self.run(table, &a)?.0)
    }

    fn restore(&mut self, input: &str) -> Result<(), FirewallError> {
        let (_, bin) = self.bins()?;
        let what = format!("{} --noflush", bin.display());
        let mut child = Command::new(&bin)
            .args(["-w", "--noflush"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| FirewallError::Unavailable(format!("cannot run {what}: {e}")))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(input.as_bytes())
                .map_err(|e| FirewallError::Command {
                    what: what.clone(),
                    message: e.to_string(),
                })?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| FirewallError::Command {
                what: what.clone(),
                message: e.to_string(),
            })?;
        if out.status.success() {
            Ok(())
        } else {
            Err(FirewallError::Command {
                what,
                message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            })
        }
    }

    /// Delete the jumps into `chain` (every copy), then flush and delete the chain.
    fn remove_chain(
        &mut self,
        table: &str,
        chain: &str,
        jumps: &[(String, String, Vec<String>)],
    ) -> Result<bool, FirewallError> {
        let mut removed = false;
        let targeting = jumps
            .iter()
            .filter(|(t, _, a)| t == table && a.last().map(String::as_str) == Some(chain));
        for (t, base, args) in targeting {
            while self.check(t, base, args)? {
                let mut a = s(&["-D", base]);
                a.extend_from_slice(args);
                self.must(t, &a)?;
                removed = true;
            }
        }
        if self.chain_rule_count(table, chain)?.is_some() {
            self.must(table, &s(&["-F", chain]))?;
            self.must(table, &s(&["-X", chain]))?;
            removed = true;
        }
        Ok(removed)
    }
}

impl Firewall for Ip6tablesDriver {
    fn describe(&self, _rules: &Rules) -> String {
        format!("ip6tables chains {CHAIN_FWD}, {CHAIN_IN}, {CHAIN_NAT}")
    }

    fn preflight(&mut self) -> Result<(), FirewallError> {
        self.bins()?;
        // Listing a built-in chain proves the kernel side works too.
        self.must("filter", &s(&["-S", "INPUT"]))
    }

    fn inspect(
        &mut self,
        rules: &Rules,
        _recorded: Option<&FirewallRecord>,
    ) -> Result<Inspection, FirewallError> {
        let want_rules = chain_rules(rules);
        let mut missing = Vec::new();
        for (table, chain) in chains(rules) {
            let want = want_rules
                .iter()
                .filter(|(t, c, _)| *t == table && *c == chain)
                .count();
            match self.chain_rule_count(table, chain)? {
                None => missing.push(format!("chain {chain} absent")),
                Some(n) if n != want => missing.push(format!("{chain} has {n} rules, want {want}")),
                Some(_) => {}
            }
        }
        if !rules.nat && self.chain_rule_count("nat", CHAIN_NAT)?.is_some() {
            missing.push(format!(
                "{CHAIN_NAT} present but the profile has nat: false"
            ));
        }
        if missing.is_empty() {
            for (table, chain, args) in &want_rules {
                if !self.check(table, chain, args)? {
                    missing.push(format!("-A {chain} {} missing", quote(args)));
                }
            }
        }
        for (table, base, args) in jumps(rules) {
            if !self.check(table, base, &args)? {
                missing.push(format!("jump `-A {base} {}` missing", quote(&args)));
            }
        }
        let up_to_date = missing.is_empty();
        let found = if up_to_date {
            format!(
                "ip6tables chains {CHAIN_FWD}, {CHAIN_IN}{} and their jumps in place",
                if rules.nat {
                    format!(", {CHAIN_NAT}")
                } else {
                    String::new()
                }
            )
        } else {
            missing.join("; ")
        };
        Ok(Inspection { found, up_to_date })
    }

    fn apply(&mut self, rules: &Rules) -> Result<FirewallRecord, FirewallError> {
        let all_rules = chain_rules(rules);
        let mut input = String::new();
        for table in ["filter", "nat"] {
            let cs: Vec<_> = chains(rules)
                .into_iter()
                .filter(|(t, _)| *t == table)
                .collect();
            if cs.is_empty() {
                continue;
            }
            input.push_str(&format!("*{table}\n"));
            for (_, c) in &cs {
                input.push_str(&format!(":{c} - [0:0]\n"));
            }
            for (_, c, args) in all_rules.iter().filter(|(t, _, _)| *t == table) {
                input.push_str(&format!("-A {c} {}\n", quote(args)));
            }
            input.push_str("COMMIT\n");
        }
        self.restore(&input)?;
        for (table, base, args) in jumps(rules) {
            if !self.check(table, base, &args)? {
                let mut a = s(&["-A", base]);
                a.extend_from_slice(&args);
                self.must(table, &a)?;
            }
        }
        if !rules.nat {
            let stale = [(
                "nat".to_string(),
                "POSTROUTING".to_string(),
                s(&["-j", CHAIN_NAT]),
            )];
            self.remove_chain("nat", CHAIN_NAT, &stale)?;
        }
        Ok(FirewallRecord::Iptables {
            chains: chains(rules)
                .into_iter()
                .map(|(t, c)| (t.to_string(), c.to_string()))
                .collect(),
            jumps: jumps(rules)
                .into_iter()
                .map(|(t, b, a)| (t.to_string(), b.to_string(), a))
                .collect(),
        })
    }

    fn present(&mut self, recorded: &FirewallRecord) -> Result<bool, FirewallError> {
        let FirewallRecord::Iptables { chains, jumps } = recorded else {
            return Ok(false);
        };
        for (table, chain) in chains {
            if self.chain_rule_count(table, chain)?.is_some() {
                return Ok(true);
            }
        }
        for (table, base, args) in jumps {
            if self.check(table, base, args)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn remove(&mut self, recorded: &FirewallRecord) -> Result<bool, FirewallError> {
        let FirewallRecord::Iptables { chains, jumps } = recorded else {
            return Ok(false);
        };
        let mut removed = false;
        for (table, chain) in chains {
            removed |= self.remove_chain(table, chain, jumps)?;
        }
        Ok(removed)
    }

    fn persist_script(&self, _rules: &Rules) -> Option<String> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_and_jumps() {
        let r = Rules {
            bridge: "chvbr0".into(),
            prefix: "fdcd::/16".parse().unwrap(),
            nat: true,
            host_ports: vec![8080],
            table: "chvkit".into(),
        };
        let rs = chain_rules(&r);
        let est = [
            "-m",
            "conntrack",
            "--ctstate",
            "RELATED,ESTABLISHED",
            "-j",
            "ACCEPT",
        ];
        let fwd_back = [&["-o", "chvbr0"][..], &est].concat();
        let tcp = ["-p", "tcp", "-m", "tcp", "--dport", "8080", "-j", "ACCEPT"];
        let udp = ["-p", "udp", "-m", "udp", "--dport", "8080", "-j", "ACCEPT"];
        let nat = ["-s", "fdcd::/16", "!", "-o", "chvbr0", "-j", "MASQUERADE"];
        let want: Vec<Rule> = vec![
            ("filter", CHAIN_FWD, s(&["-i", "chvbr0", "-j", "ACCEPT"])),
            ("filter", CHAIN_FWD, s(&fwd_back)),
            ("filter", CHAIN_IN, s(&est)),
            ("filter", CHAIN_IN, s(&["-p", "ipv6-icmp", "-j", "ACCEPT"])),
            ("filter", CHAIN_IN, s(&tcp)),
            ("filter", CHAIN_IN, s(&udp)),
            ("filter", CHAIN_IN, s(&["-j", "DROP"])),
            ("nat", CHAIN_NAT, s(&nat)),
        ];
        assert_eq!(rs, want);
        let want_jumps: Vec<Rule> = vec![
            ("filter", "FORWARD", s(&["-j", CHAIN_FWD])),
            ("filter", "INPUT", s(&["-i", "chvbr0", "-j", CHAIN_IN])),
            ("nat", "POSTROUTING", s(&["-j", CHAIN_NAT])),
        ];
        assert_eq!(jumps(&r), want_jumps);
        assert_eq!(rs.last().unwrap().1, CHAIN_NAT);
        assert!(rs
            .iter()
            .any(|(_, c, a)| *c == CHAIN_IN && a.join(" ") == "-j DROP"));
        assert_eq!(jumps(&r).len(), 3);
        let r2 = Rules { nat: false, ..r };
        assert!(!chain_rules(&r2).iter().any(|(t, _, _)| *t == "nat"));
        assert_eq!(jumps(&r2).len(), 2);
    }
}
