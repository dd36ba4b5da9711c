//! `net.*`: the bridge, its gateway address, DAD, forwarding, router advertisements, NAT,
//! forward rules, host exposure and TAPs (`net.taps`, in network/taps.rs).
//!
//! Every hint is a command that, run as root in the same network namespace, makes its check
//! pass. `chvkit setup` converges all of it (and persists it); hints that write nftables rules
//! use the table setup owns (`inet <network.nft_table>`), so a later setup replaces them.

use std::net::Ipv6Addr;

use super::facts::Facts;
use super::nfeval::{judge_hook, ChainVerdict, Outcome, Packet};
use super::report::Finding;
use crate::host::net::{Link, NetSnapshot};
use crate::host::nft::{
    Chain, ChainExt, ExprExt, MatchExt, MetaKey, NfChainType, NfFamily, NfHook, NftError, Ruleset,
};
use crate::host::sysctl::ipv6_key;
use crate::profile::{FirewallBackend, Ipv6Net};
use crate::Context;

/// A documentation address (RFC 3849) standing for "somewhere on the internet".
const INTERNET: &str = "2001:db8::1";
/// Ports probed to decide whether the host is reachable from the bridge (when the profile
/// does not allow them): SSH, DNS and an arbitrary high port.
const PROBE_PORTS: &[(&str, u16)] = &[("tcp", 22), ("udp", 53), ("tcp", 49_152)];

const SETUP_NOTE: &str = "`chvkit setup` converges this (and persists it across reboots).";

pub struct Net<'a> {
    ctx: &'a Context,
    f: &'a Facts,
    br: &'a str,
    gw: Ipv6Addr,
    prefix: Ipv6Net,
}

/// What a check needs from the facts (`Ok`), or else return the finding that says why it cannot
/// be judged (`Err`).
macro_rules! or_finding {
    ($needed:expr) => {
        match $needed {
            Ok(v) => v,
            Err(finding) => return finding,
        }
    };
}

// After the macros: the TAP check's module uses `or_finding!`.
mod taps;

/// For a check whose facts were not gathered.
fn not_checked(id: &'static str) -> Finding {
    Finding::skip(id, "not checked", "", "chvkit doctor --only net")
}

fn sysctl_w(pairs: &[(String, i64)]) -> String {
    let args: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("sysctl -w {}", args.join(" "))
}

fn iptables_managed(c: &Chain) -> bool {
    c.family == NfFamily::IP6
        && matches!(
            c.table.as_ref(),
            "filter" | "nat" | "mangle" | "raw" | "security"
        )
        && c.name.chars().all(|ch| ch.is_ascii_uppercase())
}

impl<'a> Net<'a> {
    pub fn new(ctx: &'a Context, f: &'a Facts) -> Net<'a> {
        let n = &ctx.profile.network;
        Net {
            ctx,
            f,
            br: n.bridge.as_str(),
            gw: n.gateway,
            prefix: n.prefix,
        }
    }

    fn gw_cidr(&self) -> String {
        format!("{}/{}", self.gw, self.prefix.len)
    }

    fn table(&self) -> String {
        format!("inet {}", self.ctx.profile.network.nft_table)
    }

    fn iptables(&self) -> bool {
        self.ctx.profile.network.firewall == FirewallBackend::Iptables
    }

    fn snapshot(&self, id: &'static str) -> Result<&'a NetSnapshot, Finding> {
        match &self.f.net {
            Some(Ok(s)) => Ok(s),
            Some(Err(e)) => Err(Finding::skip(
                id,
                "cannot read links over netlink",
                e.clone(),
                "chvkit -vv doctor --only net",
            )),
            None => Err(not_checked(id)),
        }
    }

    fn bridge_link(&self, s: &'a NetSnapshot) -> Option<&'a Link> {
        s.link(self.br).filter(|l| l.is_bridge())
    }

    /// The links and the bridge, for the checks that depend on net.bridge.
    fn bridge_found(&self, id: &'static str) -> Result<(&'a NetSnapshot, &'a Link), Finding> {
        let s = self.snapshot(id)?;
        match self.bridge_link(s) {
            Some(b) => Ok((s, b)),
            None => Err(Finding::skip(
                id,
                format!("no bridge {}", self.br),
                "Depends on net.bridge (its fix creates the bridge).",
                self.create_bridge_cmd(),
            )),
        }
    }

    /// Bring the bridge up and (again: going down dropped it) give it the gateway address.
    fn up_and_address_cmd(&self) -> String {
        format!(
            "ip link set {br} up && ip -6 addr replace {} dev {br} nodad",
            self.gw_cidr(),
            br = self.br
        )
    }

    fn ruleset(&self, id: &'static str) -> Result<&'a Ruleset, Finding> {
        match &self.f.ruleset {
            Some(Ok(r)) => Ok(r),
            Some(Err(e)) if e.is_permission() => Err(Finding::skip(
                id,
                "cannot read the nftables ruleset without root",
                format!("{e}. Listing rules needs CAP_NET_ADMIN."),
                format!("sudo chvkit doctor --only {id}"),
            )),
            Some(Err(e @ NftError::Unavailable { .. })) => Err(Finding::skip(
                id,
                "nftables is not installed: rules cannot be read",
                format!(
                    "{e}. Rules made by ip6tables-legacy are invisible to nftables in any case."
                ),
                "apt-get install -y nftables",
            )),
            Some(Err(e)) => Err(Finding::skip(
                id,
                "cannot read the nftables ruleset",
                e.to_string(),
                "nft list ruleset",
            )),
            None => Err(not_checked(id)),
        }
    }

    /// Create-and-configure, in the order facts §3 asks for (sysctls before the address).
    fn create_bridge_cmd(&self) -> String {
        let br = self.br;
        format!(
            "ip link add {br} type bridge && {} && {}",
            sysctl_w(&[
                (ipv6_key(br, "accept_dad"), 0),
                (ipv6_key(br, "dad_transmits"), 0)
            ]),
            self.up_and_address_cmd()
        )
    }

    pub fn bridge(&self) -> Finding {
        const ID: &str = "net.bridge";
        let s = or_finding!(self.snapshot(ID));
        match s.link(self.br) {
            None => Finding::fail(
                ID,
                format!("bridge {} does not exist", self.br),
                format!(
                    "Guests' TAPs attach to {} (profile network.bridge). {SETUP_NOTE}",
                    self.br
                ),
                self.create_bridge_cmd(),
            ),
            Some(l) if !l.is_bridge() => Finding::fail(
                ID,
                format!(
                    "{} exists but is a {} link, not a bridge",
                    self.br,
                    l.kind.as_deref().unwrap_or("physical")
                ),
                "Another link has the profile's bridge name.",
                format!("ip link del {} && {}", self.br, self.create_bridge_cmd()),
            ),
            Some(l) => {
                let ports: Vec<&str> = s.ports_of(l.index).map(|p| p.name.as_str()).collect();
                Finding::pass(
                    ID,
                    format!("{} is a bridge ({} ports)", self.br, ports.len()),
                    if ports.is_empty() {
                        "No ports yet.".to_string()
                    } else {
                        format!("Ports: {}.", ports.join(", "))
                    },
                )
            }
        }
    }

    pub fn bridge_up(&self) -> Finding {
        const ID: &str = "net.bridge_up";
        let (_, b) = or_finding!(self.bridge_found(ID));
        if !b.admin_up {
            return Finding::fail(
                ID,
                format!("{} is down", self.br),
                format!(
                    "Taking a link down deletes its IPv6 addresses (keep_addr_on_down=0), so \
                     {} must be added again after `up`. {SETUP_NOTE}",
                    self.gw_cidr()
                ),
                self.up_and_address_cmd(),
            );
        }
        let carrier = if b.lower_up {
            "has carrier".to_string()
        } else {
            "no carrier yet (normal until a running VM's TAP is attached)".to_string()
        };
        Finding::pass(
            ID,
            format!("{} is up (operstate {})", self.br, b.oper_state),
            format!("The bridge {carrier}."),
        )
    }

    pub fn bridge_addr(&self) -> Finding {
        const ID: &str = "net.bridge_addr";
        let (s, b) = or_finding!(self.bridge_found(ID));
        if !b.admin_up {
            return Finding::skip(
                ID,
                format!("{} is down", self.br),
                "A down link has no IPv6 addresses; net.bridge_up's fix adds the gateway back.",
                self.up_and_address_cmd(),
            );
        }
        let want = self.gw_cidr();
        let br = self.br;
        if self.f.sysctl.ipv6_conf(br).disable_ipv6 == Some(1) {
            return Finding::fail(
                ID,
                format!("IPv6 is disabled on {br}"),
                format!(
                    "net.ipv6.conf.{br}.disable_ipv6=1 (often inherited from \
                     net.ipv6.conf.default.disable_ipv6=1 when the bridge was created): it can \
                     hold no IPv6 address. {SETUP_NOTE}"
                ),
                format!(
                    "sysctl -w {}=0 && ip -6 addr replace {want} dev {br} nodad",
                    ipv6_key(br, "disable_ipv6")
                ),
            );
        }
        let readd = |found: &str| {
            format!("ip -6 addr del {found} dev {br} && ip -6 addr add {want} dev {br} nodad")
        };
        let Some(a) = b.ipv6_addr(self.gw) else {
            let elsewhere = s
                .links
                .iter()
                .find(|l| l.index != b.index && l.ipv6_addr(self.gw).is_some())
                .map(|l| format!(" {} is on {} instead.", self.gw, l.name))
                .unwrap_or_default();
            return Finding::fail(
                ID,
                format!("{want} is not on {br}"),
                format!(
                    "Guests use {} as their gateway.{elsewhere} {SETUP_NOTE}",
                    self.gw
                ),
                format!("ip -6 addr replace {want} dev {br} nodad"),
            );
        };
        let flags = a.flag_names().join(" ");
        if a.dadfailed() {
            return Finding::fail(
                ID,
                format!("{a} on {br} failed duplicate address detection"),
                format!(
                    "Another node on the bridge answered for {}; flags: {flags}.",
                    self.gw
                ),
                readd(&a.to_string()),
            );
        }
        if a.tentative() {
            return Finding::fail(
                ID,
                format!("{a} on {br} is tentative (unusable)"),
                format!(
                    "DAD never completes on a bridge without carrier, so the address stays \
                     tentative. Adding it with `nodad` (and accept_dad=0, see net.dad) avoids \
                     this; flags: {flags}."
                ),
                readd(&a.to_string()),
            );
        }
        if a.prefix_len != self.prefix.len {
            return Finding::fail(
                ID,
                format!(
                    "{a} on {br} has prefix /{}, profile says {want}",
                    a.prefix_len
                ),
                "The prefix length decides which addresses are on-link for the host.",
                readd(&a.to_string()),
            );
        }
        Finding::pass(
            ID,
            format!("{a} on {br}"),
            format!("flags: {}", if flags.is_empty() { "none" } else { &flags }),
        )
    }

    pub fn dad(&self) -> Finding {
        const ID: &str = "net.dad";
        let (_, b) = or_finding!(self.bridge_found(ID));
        let br = self.br;
        let bc = self.f.sysctl.ipv6_conf(br);
        let all = self.f.sysctl.ipv6_conf("all");
        let (Some(br_dad), Some(all_dad)) = (bc.accept_dad, all.accept_dad) else {
            return Finding::skip(
                ID,
                "IPv6 sysctls not readable",
                format!("/proc/sys/net/ipv6/conf/{br}/accept_dad or conf/all/accept_dad is missing (IPv6 disabled?)."),
                format!("sysctl -w {}=0", ipv6_key(br, "disable_ipv6")),
            );
        };
        let tx = bc
            .dad_transmits
            .map(|v| v.to_string())
            .unwrap_or_else(|| "?".into());
        let values =
            format!("{br}.accept_dad={br_dad}, all.accept_dad={all_dad}, {br}.dad_transmits={tx}");
        // The kernel skips DAD when both are below 1 (addrconf_dad_begin).
        if br_dad < 1 && all_dad < 1 {
            return Finding::pass(ID, format!("DAD off on {br}"), values);
        }
        let mut fix = vec![
            (ipv6_key(br, "accept_dad"), 0),
            (ipv6_key(br, "dad_transmits"), 0),
        ];
        if all_dad >= 1 {
            fix.push((ipv6_key("all", "accept_dad"), 0));
        }
        let addr = b.ipv6_addr(self.gw);
        let detail = format!(
            "{values}. With DAD on, an address added to a bridge without carrier stays \
             tentative, so {} is lost whenever it is re-added (bridge down/up, reboot) unless \
             added with `nodad`.{} {SETUP_NOTE}",
            self.gw,
            if addr.is_some_and(|a| a.nodad()) {
                " The current address has the nodad flag."
            } else {
                ""
            }
        );
        let summary = format!("DAD is on for {br} (accept_dad {br_dad}, all {all_dad})");
        if addr.is_some_and(|a| a.usable()) {
            Finding::warn(ID, summary, detail, sysctl_w(&fix))
        } else {
            Finding::fail(ID, summary, detail, sysctl_w(&fix))
        }
    }

    /// Interfaces that would lose (or are losing) SLAAC routes once forwarding is on.
    fn ra_dependent(&self, s: &'a NetSnapshot) -> Vec<(&'a Link, String)> {
        let br_index = self.bridge_link(s).map(|b| b.index);
        s.links
            .iter()
            .filter(|l| !l.loopback && !l.is_bridge() && !l.is_tun() && l.admin_up)
            .filter(|l| br_index.is_none() || l.master != br_index)
            .filter_map(|l| {
                let ra = self.f.sysctl.ipv6_conf(&l.name).accept_ra?;
                if ra != 1 {
                    return None;
                }
                let routes = s.routes_via(l.index).filter(|r| r.from_ra()).count();
                let slaac = l
                    .ipv6
                    .iter()
                    .filter(|a| a.scope == 0 && !a.permanent())
                    .count();
                (routes > 0 || slaac > 0).then(|| {
                    (
                        l,
                        format!(
                            "{} ({routes} route(s) from router advertisements, {slaac} autoconfigured address(es))",
                            l.name
                        ),
                    )
                })
            })
            .collect()
    }

    pub fn forwarding(&self) -> Finding {
        const ID: &str = "net.forwarding";
        let all = self.f.sysctl.ipv6_conf("all");
        match all.forwarding {
            Some(1) => Finding::pass(
                ID,
                "IPv6 forwarding is on",
                "net.ipv6.conf.all.forwarding=1",
            ),
            other => {
                let mut fix: Vec<(String, i64)> = Vec::new();
                let mut note = String::new();
                if let Some(Ok(s)) = &self.f.net {
                    for (l, _) in self.ra_dependent(s) {
                        fix.push((ipv6_key(&l.name, "accept_ra"), 2));
                    }
                    if !fix.is_empty() {
                        note = " The fix first sets accept_ra=2 on uplinks that use router \
                                 advertisements, so they keep their default route (see \
                                 net.accept_ra)."
                            .into();
                    }
                }
                fix.push(("net.ipv6.conf.all.forwarding".into(), 1));
                Finding::fail(
                    ID,
                    "IPv6 forwarding is off",
                    format!(
                        "net.ipv6.conf.all.forwarding={}: guests reach the gateway but nothing \
                         beyond it.{note} {SETUP_NOTE}",
                        other.map(|v| v.to_string()).unwrap_or_else(|| "?".into())
                    ),
                    sysctl_w(&fix),
                )
            }
        }
    }

    pub fn accept_ra(&self) -> Finding {
        const ID: &str = "net.accept_ra";
        let s = or_finding!(self.snapshot(ID));
        let deps = self.ra_dependent(s);
        let fwd_on = self.f.sysctl.ipv6_conf("all").forwarding == Some(1);
        if deps.is_empty() {
            let keep: Vec<&str> = s
                .links
                .iter()
                .filter(|l| !l.loopback)
                .filter(|l| self.f.sysctl.ipv6_conf(&l.name).accept_ra == Some(2))
                .map(|l| l.name.as_str())
                .collect();
            return Finding::pass(
                ID,
                "no uplink depends on router advertisements with accept_ra=1",
                if keep.is_empty() {
                    String::new()
                } else {
                    format!(
                        "accept_ra=2 (RAs kept with forwarding on): {}.",
                        keep.join(", ")
                    )
                },
            );
        }
        let names: Vec<&str> = deps.iter().map(|(l, _)| l.name.as_str()).collect();
        let what: Vec<&str> = deps.iter().map(|(_, w)| w.as_str()).collect();
        let fix: Vec<(String, i64)> = deps
            .iter()
            .map(|(l, _)| (ipv6_key(&l.name, "accept_ra"), 2))
            .collect();
        let state = if fwd_on {
            "Forwarding is on, so the kernel now ignores their router advertisements: the \
             routes and addresses they gave expire and the host loses its IPv6 uplink."
        } else {
            "Turning forwarding on (net.forwarding) makes the kernel ignore their router \
             advertisements: the host would lose its IPv6 default route."
        };
        Finding::warn(
            ID,
            format!("accept_ra=1 on SLAAC uplink(s): {}", names.join(", ")),
            format!(
                "{}. {state} accept_ra=2 keeps accepting them with forwarding on (what libvirt \
                 and Incus do).",
                what.join("; ")
            ),
            sysctl_w(&fix),
        )
    }

    fn uplink_name(&self) -> &'a str {
        if let Some(Ok(s)) = &self.f.net {
            if let Some(l) = s
                .routes
                .iter()
                .filter(|r| r.is_default())
                .filter_map(|r| r.oif.and_then(|i| s.link_by_index(i)))
                .find(|l| l.name != self.br)
            {
                return l.name.as_str();
            }
        }
        // No default route: any name that is not the bridge stands for "an uplink".
        "uplink"
    }

    fn guests(&self) -> (Ipv6Addr, u8) {
        (self.prefix.addr, self.prefix.len)
    }

    pub fn nat(&self) -> Finding {
        const ID: &str = "net.nat";
        if !self.ctx.profile.network.nat {
            return Finding::pass(
                ID,
                "NAT not wanted (profile network.nat: false)",
                format!(
                    "Guests need a routed prefix: {} must be routed to this host upstream.",
                    self.prefix
                ),
            );
        }
        let rs = or_finding!(self.ruleset(ID));
        let internet: Ipv6Addr = INTERNET.parse().unwrap_or(Ipv6Addr::UNSPECIFIED);
        let uplink = self.uplink_name();
        let pkt = Packet {
            iif: Some(self.br),
            oif: Some(uplink),
            saddr: Some(self.guests()),
            daddr: Some((internet, 128)),
            l4proto: Some("tcp"),
            dport: Some(443),
            ct_state: "new",
        };
        let verdicts = judge_hook(rs, NfHook::Postrouting, Some(NfChainType::NAT), &pkt);
        if let Some(v) = verdicts
            .iter()
            .find(|v| matches!(v.outcome, Outcome::Nat(_)))
        {
            let r = v.explicit().map(|r| r.location()).unwrap_or_default();
            let who = if iptables_managed(v.chain) {
                "written by ip6tables-nft"
            } else {
                "nftables"
            };
            let narrow = v
                .explicit()
                .and_then(|r| {
                    r.matches()
                        .filter(|m| m.is_payload("ip6", "saddr"))
                        .find_map(|m| m.right.as_ipv6_prefix())
                })
                .filter(|p| p.1 > self.prefix.len)
                .map(|p| format!(" It covers only {}/{} of {}.", p.0, p.1, self.prefix))
                .unwrap_or_default();
            return Finding::pass(
                ID,
                format!("masquerade for {} ({who}: {r})", self.prefix),
                format!(
                    "Probe guest→{INTERNET} out {uplink}: {}.{narrow}",
                    v.describe()
                ),
            );
        }
        let seen: Vec<String> = verdicts.iter().map(|v| v.describe()).collect();
        let unsure = uncertain_note(&verdicts);
        let hint = if self.iptables() {
            let args = format!(
                "POSTROUTING -s {} ! -o {} -j MASQUERADE",
                self.prefix, self.br
            );
            format!("ip6tables -t nat -C {args} 2>/dev/null || ip6tables -t nat -A {args}")
        } else {
            let t = self.table();
            format!(
                "nft 'add table {t}; add chain {t} postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}; add rule {t} postrouting ip6 saddr {} oifname != \"{}\" masquerade'",
                self.prefix, self.br
            )
        };
        Finding::fail(
            ID,
            format!("no masquerade for {} leaving through {uplink}", self.prefix),
            format!(
                "Guests have ULA addresses ({}); without masquerade their traffic cannot come \
                 back from the internet. IPv6 NAT chains: {}.{unsure} Rules of ip6tables-legacy \
                 are not visible to nftables. {SETUP_NOTE}",
                self.prefix,
                if seen.is_empty() {
                    "none".to_string()
                } else {
                    seen.join("; ")
                }
            ),
            hint,
        )
    }

    fn forward_fix_for(&self, chain: &Chain, out: bool, back: bool) -> Vec<String> {
        let br = self.br;
        let mut v = Vec::new();
        if iptables_managed(chain) {
            if back {
                v.push(format!(
                    "ip6tables -t {} -I {} -o {br} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
                    chain.table, chain.name
                ));
            }
            if out {
                v.push(format!(
                    "ip6tables -t {} -I {} -i {br} -j ACCEPT",
                    chain.table, chain.name
                ));
            }
        } else {
            let spec = chain.spec();
            if back {
                v.push(format!(
                    "nft 'insert rule {spec} oifname \"{br}\" ct state related,established accept'"
                ));
            }
            if out {
                v.push(format!("nft 'insert rule {spec} iifname \"{br}\" accept'"));
            }
        }
        v
    }

    pub fn forward_rules(&self) -> Finding {
        const ID: &str = "net.forward_rules";
        let rs = or_finding!(self.ruleset(ID));
        let br = self.br;
        let internet: Ipv6Addr = INTERNET.parse().unwrap_or(Ipv6Addr::UNSPECIFIED);
        let uplink = self.uplink_name();
        let out_pkt = Packet {
            iif: Some(br),
            oif: Some(uplink),
            saddr: Some(self.guests()),
            daddr: Some((internet, 128)),
            l4proto: Some("tcp"),
            dport: Some(443),
            ct_state: "new",
        };
        let back_pkt = Packet {
            iif: Some(uplink),
            oif: Some(br),
            saddr: Some((internet, 128)),
            daddr: Some(self.guests()),
            l4proto: Some("tcp"),
            dport: Some(40_000),
            ct_state: "established",
        };
        let out = judge_hook(rs, NfHook::Forward, Some(NfChainType::Filter), &out_pkt);
        let back = judge_hook(rs, NfHook::Forward, Some(NfChainType::Filter), &back_pkt);
        let brnf = self.f.sysctl.bridge_nf_call_ip6tables();
        let bridged = (brnf == Some(1)).then(|| {
            let p = Packet {
                iif: Some(br),
                oif: Some(br),
                saddr: Some(self.guests()),
                daddr: Some(self.guests()),
                l4proto: Some("tcp"),
                dport: Some(443),
                ct_state: "new",
            };
            judge_hook(rs, NfHook::Forward, Some(NfChainType::Filter), &p)
        });
        let unsure = uncertain_note(&out) + &uncertain_note(&back);

        // Blocked somewhere: a FAIL with an insert for each chain that drops.
        let mut fixes: Vec<String> = Vec::new();
        let mut reasons: Vec<String> = Vec::new();
        for (i, v) in out.iter().enumerate() {
            let out_blocked = !v.passes();
            let back_blocked = back.get(i).is_some_and(|b| !b.passes());
            let bridged_blocked = bridged
                .as_ref()
                .and_then(|b| b.get(i))
                .is_some_and(|b| !b.passes());
            if out_blocked || back_blocked || bridged_blocked {
                fixes.extend(self.forward_fix_for(
                    v.chain,
                    out_blocked || bridged_blocked,
                    back_blocked,
                ));
            }
            if out_blocked {
                reasons.push(format!("guest→internet: {}", v.describe()));
            }
            if back_blocked {
                if let Some(b) = back.get(i) {
                    reasons.push(format!("replies→guest: {}", b.describe()));
                }
            }
            if bridged_blocked {
                reasons.push(format!(
                    "guest→guest across the bridge (br_netfilter, bridge-nf-call-ip6tables=1): {}",
                    v.chain.spec()
                ));
            }
        }
        if !fixes.is_empty() {
            let trap = if bridged.is_some() {
                " br_netfilter is loaded with bridge-nf-call-ip6tables=1, so even traffic \
                 between guests on the bridge crosses these chains (the Docker DROP-policy trap); \
                 `sysctl -w net.bridge.bridge-nf-call-ip6tables=0` also frees bridged traffic."
            } else {
                ""
            };
            return Finding::fail(
                ID,
                format!("forwarded traffic of {br} is dropped"),
                format!(
                    "{}.{trap}{unsure} An accept in another base chain does not help: every \
                     forward-hook chain must let the packet through. {SETUP_NOTE}",
                    reasons.join("; ")
                ),
                fixes.join(" && "),
            );
        }
        let out_rule = out.iter().find_map(|v| match v.outcome {
            Outcome::Accept(r) => Some(r),
            _ => None,
        });
        let back_rule = back.iter().find_map(|v| match v.outcome {
            Outcome::Accept(r) => Some(r),
            _ => None,
        });
        let brnf_note = match brnf {
            Some(1) => " br_netfilter: bridge-nf-call-ip6tables=1 (bridged traffic crosses FORWARD too, and is accepted).",
            Some(_) => " br_netfilter loaded, bridge-nf-call-ip6tables=0.",
            None => "",
        };
        if let (Some(o), Some(b)) = (out_rule, back_rule) {
            return Finding::pass(
                ID,
                format!("forwarding accepts from {br} and related/established to it"),
                format!("in: {}; back: {}.{brnf_note}", o.location(), b.location()),
            );
        }
        let mut missing = Vec::new();
        if out_rule.is_none() {
            missing.push(format!("accept from {br}"));
        }
        if back_rule.is_none() {
            missing.push(format!("accept of related/established to {br}"));
        }
        let hint = if self.iptables() {
            let mut v = Vec::new();
            if out_rule.is_none() {
                let a = format!("FORWARD -i {br} -j ACCEPT");
                v.push(format!("ip6tables -C {a} 2>/dev/null || ip6tables -A {a}"));
            }
            if back_rule.is_none() {
                let a =
                    format!("FORWARD -o {br} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT");
                v.push(format!("ip6tables -C {a} 2>/dev/null || ip6tables -A {a}"));
            }
            v.join("; ")
        } else {
            let t = self.table();
            let mut s = format!(
                "nft 'add table {t}; add chain {t} forward {{ type filter hook forward priority filter; policy accept; }}"
            );
            if out_rule.is_none() {
                s.push_str(&format!("; add rule {t} forward iifname \"{br}\" accept"));
            }
            if back_rule.is_none() {
                s.push_str(&format!(
                    "; add rule {t} forward oifname \"{br}\" ct state related,established accept"
                ));
            }
            s.push('\'');
            s
        };
        let chains: Vec<String> = out.iter().map(|v| v.describe()).collect();
        Finding::warn(
            ID,
            format!("no explicit {}", missing.join(" or ")),
            format!(
                "Nothing drops forwarded traffic today ({}), but a DROP policy added later (Docker \
                 sets one on FORWARD) would cut guests off silently.{brnf_note}{unsure} {SETUP_NOTE}",
                if chains.is_empty() { "no forward chains".to_string() } else { chains.join("; ") }
            ),
            hint,
        )
    }

    pub fn host_exposure(&self) -> Finding {
        const ID: &str = "net.host_exposure";
        let rs = or_finding!(self.ruleset(ID));
        let br = self.br;
        let allowed_ports = &self.ctx.profile.network.host_ports;
        let gw = (self.gw, 128);
        let probe = |proto: &'static str, port: Option<u16>, state: &'static str| Packet {
            iif: Some(br),
            oif: None,
            saddr: Some(self.guests()),
            daddr: Some(gw),
            l4proto: Some(proto),
            dport: port,
            ct_state: state,
        };
        let passes = |p: &Packet<'_>| -> (bool, Vec<ChainVerdict<'a>>) {
            let v = judge_hook(rs, NfHook::Input, Some(NfChainType::Filter), p);
            (v.iter().all(|c| c.passes()), v)
        };

        // Neighbour discovery must get through, or guests cannot even reach the gateway.
        let (icmp_ok, icmp_v) = passes(&probe("ipv6-icmp", None, "new"));
        if !icmp_ok {
            let fixes: Vec<String> = icmp_v
                .iter()
                .filter(|v| !v.passes())
                .map(|v| {
                    if iptables_managed(v.chain) {
                        format!(
                            "ip6tables -I {} -i {br} -p ipv6-icmp -j ACCEPT",
                            v.chain.name
                        )
                    } else {
                        format!(
                            "nft 'insert rule {} iifname \"{br}\" meta l4proto ipv6-icmp accept'",
                            v.chain.spec()
                        )
                    }
                })
                .collect();
            let why: Vec<String> = icmp_v
                .iter()
                .filter(|v| !v.passes())
                .map(|v| v.describe())
                .collect();
            return Finding::fail(
                ID,
                format!("ICMPv6 from {br} to the host is dropped"),
                format!(
                    "{}. Neighbour discovery is ICMPv6: guests cannot resolve the gateway {}.",
                    why.join("; "),
                    self.gw
                ),
                fixes.join(" && "),
            );
        }

        let mut open = Vec::new();
        let mut closed = Vec::new();
        for (proto, port) in PROBE_PORTS {
            if allowed_ports.contains(port) {
                continue;
            }
            let (ok, v) = passes(&probe(proto, Some(*port), "new"));
            let label = format!("{proto}/{port}");
            if ok {
                open.push(label);
            } else {
                let by = v
                    .iter()
                    .find(|c| !c.passes())
                    .map(|c| c.describe())
                    .unwrap_or_default();
                closed.push((label, by));
            }
        }
        let profile_ports: Vec<String> = allowed_ports
            .iter()
            .map(|p| {
                let (ok, _) = passes(&probe("tcp", Some(*p), "new"));
                format!("tcp/{p} {}", if ok { "reachable" } else { "blocked" })
            })
            .collect();
        let listed = self.accepted_ports(rs);
        let allowed_note = format!(
            "Profile host_ports: {}. Ports accepted for {br} by rules: {}.",
            if profile_ports.is_empty() {
                "none".to_string()
            } else {
                profile_ports.join(", ")
            },
            if listed.is_empty() {
                "none".to_string()
            } else {
                listed.join(", ")
            }
        );
        if open.is_empty() {
            let by = closed.first().map(|(_, b)| b.clone()).unwrap_or_default();
            return Finding::pass(
                ID,
                format!("traffic from {br} to the host is filtered"),
                format!("Probes dropped ({by}). {allowed_note}"),
            );
        }
        let hint = self.host_protection_cmd();
        let summary = if closed.is_empty() {
            format!("nothing restricts traffic from {br} to the host")
        } else {
            format!("traffic from {br} reaches host ports {}", open.join(", "))
        };
        Finding::warn(
            ID,
            summary,
            format!(
                "Guests can reach every service on the host that listens on {} or any other \
                 host address ({} open). The seed's security notes warn that the bridge \
                 exposes the host's API to guests. {allowed_note} {SETUP_NOTE}",
                self.gw,
                open.join(", ")
            ),
            hint,
        )
    }

    /// Ports that rules on the bridge's input path accept (for the detail line).
    fn accepted_ports(&self, rs: &Ruleset) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for chain in rs.ipv6_base_chains(NfHook::Input) {
            for reached in rs.walk(chain) {
                if !reached.rule.accepts() {
                    continue;
                }
                let ms = reached.all_matches();
                let excludes_bridge = ms.iter().any(|m| {
                    m.is_meta(MetaKey::Iifname) && (m.right.matches_ifname(self.br) == m.negated())
                });
                if excludes_bridge {
                    continue;
                }
                for m in &ms {
                    if let Some((protocol, field)) = m.payload_field() {
                        if field == "dport" && !m.negated() {
                            for (a, b) in rs.resolve(reached.rule, &m.right).ports() {
                                let p = if a == b {
                                    a.to_string()
                                } else {
                                    format!("{a}-{b}")
                                };
                                let s = format!("{protocol}/{p}");
                                if !out.contains(&s) {
                                    out.push(s);
                                }
                            }
                        }
                    }
                }
            }
        }
        out
    }

    fn host_protection_cmd(&self) -> String {
        let br = self.br;
        let ports: Vec<String> = self
            .ctx
            .profile
            .network
            .host_ports
            .iter()
            .map(u16::to_string)
            .collect();
        if self.iptables() {
            let c = "CHVKIT-IN";
            let mut v = vec![
                format!("ip6tables -N {c} 2>/dev/null; ip6tables -F {c}"),
                format!("ip6tables -A {c} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"),
                format!("ip6tables -A {c} -p ipv6-icmp -j ACCEPT"),
            ];
            for p in &ports {
                v.push(format!(
                    "ip6tables -A {c} -p tcp -m tcp --dport {p} -j ACCEPT"
                ));
                v.push(format!(
                    "ip6tables -A {c} -p udp -m udp --dport {p} -j ACCEPT"
                ));
            }
            v.push(format!("ip6tables -A {c} -j DROP"));
            v.push(format!(
                "(ip6tables -C INPUT -i {br} -j {c} 2>/dev/null || ip6tables -I INPUT -i {br} -j {c})"
            ));
            v.join(" && ")
        } else {
            let t = self.table();
            let mut s = format!(
                "nft 'add table {t}; add chain {t} input {{ type filter hook input priority filter; policy accept; }}; \
                 add chain {t} guest_to_host; flush chain {t} guest_to_host; \
                 add rule {t} guest_to_host ct state established,related accept; \
                 add rule {t} guest_to_host meta l4proto ipv6-icmp accept; "
            );
            if !ports.is_empty() {
                let list = ports.join(", ");
                s.push_str(&format!(
                    "add rule {t} guest_to_host tcp dport {{ {list} }} accept; \
                     add rule {t} guest_to_host udp dport {{ {list} }} accept; "
                ));
            }
            s.push_str(&format!(
                "add rule {t} guest_to_host drop; add rule {t} input iifname \"{br}\" jump guest_to_host'"
            ));
            s
        }
    }
}

fn uncertain_note(v: &[ChainVerdict<'_>]) -> String {
    let rules: Vec<String> = v
        .iter()
        .flat_map(|c| c.uncertain.iter().map(|r| r.location()))
        .collect();
    if rules.is_empty() {
        String::new()
    } else {
        format!(
            " Rules that could not be judged (treated as not matching): {}.",
            rules.join(", ")
        )
    }
}
