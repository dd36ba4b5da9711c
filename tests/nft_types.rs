//! The `nftables` crate's types against real kernels, each in a network namespace of its own:
//! a ruleset holding every kind of statement doctor judges, read in-process through
//! libnftables into the crate's schema and judged; and setup's typed JSON transaction against
//! the nft script it replaced (the same ruleset must land, handles included).

mod common;
#[allow(dead_code)] // only SEED_SETUP is used here
#[path = "setup_support/seed_net.rs"]
mod seed_net;
mod setup_support;

use chvkit::doctor::nfeval::{judge_hook, ChainVerdict, Outcome, Packet};
use chvkit::host::nft::{
    Action, ChainExt, ExprExt, MatchExt, MetaKey, NfChainType, NfFamily, NfHook, Rule, Ruleset,
    Source,
};
use chvkit::host::sysctl::Sysctls;
use common::{require, skip, text, NetNs};
use nftables::expr::Expression;
use seed_net::SEED_SETUP;
use setup_support::{chvkit_env, in_netns, profile_yaml, sha256_hex, Env};

/// Docker's shape on top of the seed's rules: FORWARD policy DROP with its own chains jumped
/// to first, a conntrack match and an addrtype match (xtables extensions), and a physdev match
/// for bridged traffic (br_netfilter). Then a native table: a jump into a chain that guards
/// the host, ct state, ICMPv6, ports from a named interval set and an anonymous set, and a
/// masquerade with one flag.
const RULES: &str = "set -e
ip6tables -P FORWARD DROP
ip6tables -N DOCKER-USER
ip6tables -A DOCKER-USER -j RETURN
ip6tables -I FORWARD -j DOCKER-USER
ip6tables -A FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
ip6tables -A FORWARD -m physdev --physdev-is-bridged -j ACCEPT
ip6tables -t nat -N DOCKER
ip6tables -t nat -A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
nft -f - <<'EOF'
table inet guard {
	set ports {
		type inet_service; flags interval;
		elements = { 22, 8000-8100 }
	}
	chain input {
		type filter hook input priority filter; policy accept;
		iifname \"chvbr0\" jump guests
	}
	chain guests {
		ct state established,related accept
		meta l4proto ipv6-icmp accept
		tcp dport @ports accept
		udp dport { 53, 67 } accept
		counter drop
	}
	chain post {
		type nat hook postrouting priority srcnat; policy accept;
		ip6 saddr fdcd::/16 oifname != \"chvbr0\" masquerade random
	}
}
EOF
";

fn packet<'a>(
    iif: &'a str,
    oif: Option<&'a str>,
    l4: &'a str,
    dport: Option<u16>,
    state: &'a str,
) -> Packet<'a> {
    Packet {
        iif: Some(iif),
        oif,
        saddr: Some(("fdcd::".parse().unwrap(), 16)),
        daddr: Some(("2001:db8::1".parse().unwrap(), 128)),
        l4proto: Some(l4),
        dport,
        ct_state: state,
    }
}

fn accepted_by<'a>(v: &ChainVerdict<'a>) -> &'a Rule {
    match v.outcome {
        Outcome::Accept(r) => r,
        ref other => panic!("{}: not accepted: {other:?}", v.describe()),
    }
}

#[test]
fn reads_every_statement_kind_doctor_judges() {
    let t = "reads_every_statement_kind_doctor_judges";
    if !require(t, true, &["ip", "ip6tables", "nft", "sysctl"]) {
        return;
    }
    let ns = NetNs::new("nfty");
    ns.sh_ok(SEED_SETUP);
    ns.sh_ok(RULES);
    let brnf = std::path::Path::new("/proc/sys/net/bridge/bridge-nf-call-ip6tables").exists();
    if brnf {
        ns.sh_ok("sysctl -qw net.bridge.bridge-nf-call-ip6tables=1");
    }
    // In-process, as doctor reads: libnftables and /proc/sys from a thread in the namespace.
    let (rs, brnf_seen) = in_netns(&ns.name, || {
        let rs = Ruleset::read();
        (rs, Sysctls::new().bridge_nf_call_ip6tables())
    });
    let rs = rs.expect("read the ruleset");
    assert_eq!(rs.source, Source::Library);
    assert!(rs.untyped.is_empty(), "untyped objects: {:?}", rs.untyped);
    // Everything is typed by the crate but `masquerade random` (`"flags":"random"`).
    let partly: Vec<String> = rs
        .rules
        .iter()
        .filter(|r| !r.untyped.is_empty())
        .map(|r| r.location())
        .collect();
    assert_eq!(partly.len(), 1, "{partly:?}");
    assert!(partly[0].starts_with("inet guard post "), "{partly:?}");

    // NAT: ip6tables-nft's xt MASQUERADE target and the native masquerade both translate.
    let out = packet("chvbr0", Some("eth0"), "tcp", Some(443), "new");
    let nat = judge_hook(&rs, NfHook::Postrouting, Some(NfChainType::NAT), &out);
    assert_eq!(nat.len(), 2);
    assert!(
        nat.iter().all(|v| matches!(v.outcome, Outcome::Nat(_))),
        "{:?}",
        nat.iter().map(|v| v.describe()).collect::<Vec<_>>()
    );
    let seed_nat = nat
        .iter()
        .find(|v| v.chain.family == NfFamily::IP6)
        .and_then(|v| v.explicit())
        .expect("ip6 nat POSTROUTING masquerades");
    let m: Vec<_> = seed_nat.matches().collect();
    assert!(m.iter().any(|m| m.is_meta(MetaKey::Oifname) && m.negated()));
    let saddr = m.iter().find(|m| m.is_payload("ip6", "saddr")).unwrap();
    assert_eq!(
        saddr.right.as_ipv6_prefix(),
        Some(("fdcd::".parse().unwrap(), 16))
    );

    // FORWARD with Docker's DROP policy: out through DOCKER-USER's RETURN to `-i chvbr0`.
    let fwd = judge_hook(&rs, NfHook::Forward, Some(NfChainType::Filter), &out);
    assert_eq!(fwd.len(), 1);
    assert!(fwd[0].chain.policy_drops());
    let r = accepted_by(&fwd[0]);
    assert!(r
        .matches()
        .any(|m| m.is_meta(MetaKey::Iifname) && m.right.matches_ifname("chvbr0")));
    // Replies: the xt `state` match, decoded into the crate's `ct state` match.
    let back = Packet {
        iif: Some("eth0"),
        oif: Some("chvbr0"),
        ..packet("eth0", None, "tcp", Some(40_000), "established")
    };
    let r = accepted_by(&judge_hook(&rs, NfHook::Forward, None, &back)[0]);
    let ct = r.effective_matches();
    let ct = ct.iter().find(|m| m.ct_key() == Some("state")).unwrap();
    assert_eq!(ct.right.members().strings(), ["related", "established"]);
    assert_eq!(r.opaque_xt().count(), 0);
    // Docker's conntrack match decodes the same way.
    let docker_back = Packet {
        oif: Some("docker0"),
        ..back.clone()
    };
    let r = accepted_by(&judge_hook(&rs, NfHook::Forward, None, &docker_back)[0]);
    assert!(r.matches().any(|m| m.right.matches_ifname("docker0")));
    // Bridged traffic between two ports of docker0 (br_netfilter): only the physdev match
    // could accept it, which stays opaque, so the DROP policy decides and says so.
    let bridged = packet("docker0", Some("docker0"), "tcp", Some(80), "new");
    let v = &judge_hook(&rs, NfHook::Forward, None, &bridged)[0];
    assert!(!v.passes() && v.explicit().is_none(), "{}", v.describe());
    let opaque: Vec<&str> = v.uncertain.iter().flat_map(|r| r.opaque_xt()).collect();
    assert_eq!(opaque, ["physdev"]);
    // Docker's nat PREROUTING: an addrtype match the crate cannot describe, then a jump.
    let pre = rs
        .ipv6_base_chains(NfHook::Prerouting)
        .find(|c| c.name == "PREROUTING")
        .unwrap();
    let r = rs.rules_of(pre).next().unwrap();
    assert_eq!(r.opaque_xt().collect::<Vec<_>>(), ["addrtype"]);
    assert_eq!(r.verdict(), Some(Action::Jump("DOCKER")));

    // The native table: guests reach ICMPv6, ports of the named and anonymous sets, nothing
    // else (iptables-nft's own INPUT chain, empty, lets everything through).
    let host = |l4, port, state| {
        let p = Packet {
            daddr: Some(("fdcd::1".parse().unwrap(), 128)),
            ..packet("chvbr0", None, l4, port, state)
        };
        let v = judge_hook(&rs, NfHook::Input, Some(NfChainType::Filter), &p);
        let guard = v.iter().find(|v| v.chain.family == NfFamily::INet).unwrap();
        (guard.passes(), guard.explicit().map(Rule::handle))
    };
    for (l4, port) in [("tcp", Some(22)), ("tcp", Some(8050)), ("udp", Some(67))] {
        assert!(host(l4, port, "new").0, "{l4}/{port:?}");
    }
    assert!(host("ipv6-icmp", None, "new").0);
    assert!(host("tcp", Some(30_000), "established").0);
    let refused = host("tcp", Some(9999), "new");
    assert!(!refused.0 && refused.1.is_some(), "{refused:?}");
    let input = rs
        .ipv6_base_chains(NfHook::Input)
        .find(|c| c.family == NfFamily::INet)
        .unwrap();
    let walked = rs.walk(input);
    let set_rule = walked
        .iter()
        .find(|w| {
            w.rule
                .matches()
                .any(|m| matches!(&m.right, Expression::String(s) if s == "@ports"))
        })
        .expect("the @ports rule");
    let m = set_rule.rule.matches().next().unwrap();
    assert_eq!(
        rs.resolve(set_rule.rule, &m.right).ports(),
        [(22, 22), (8000, 8100)]
    );
    assert_eq!(set_rule.via.len(), 1, "reached through the jump");

    // br_netfilter's switch, read in the namespace like doctor reads it.
    if brnf {
        assert_eq!(brnf_seen, Some(1));
    } else {
        skip(
            t,
            "br_netfilter is not loaded: bridge-nf-call-ip6tables not checked (the rest was)",
        );
    }
}

/// `chvkit setup --network-only` in one namespace (the typed JSON transaction through
/// libnftables), and in others the script setup persisted loaded by `nft -f` (what setup loaded
/// before) and setup through the `nft` fallback: `nft -j list ruleset` is the same everywhere.
#[test]
fn setup_transaction_lands_like_the_script() {
    let t = "setup_transaction_lands_like_the_script";
    if !require(t, true, &["ip", "nft"]) {
        return;
    }
    let fw = sha256_hex(b"firmware not fetched by --network-only");
    let variants: [&[(&str, &str)]; 2] = [
        &[],
        &[
            ("nat: true", "nat: false"),
            ("host_ports: [8080]", "host_ports: [8080, 9000, 9443]"),
        ],
    ];
    for (i, extra) in variants.into_iter().enumerate() {
        let setup = ["setup", "--json", "--network-only"];
        let typed_env = Env::new(&profile_yaml(&fw, extra));
        let typed = NetNs::new(&format!("tx{i}"));
        let o = chvkit_env(&typed, &typed_env, &setup, &[]);
        assert!(o.status.success(), "{}", text(&o));

        let cli_env = Env::new(&profile_yaml(&fw, extra));
        let cli = NetNs::new(&format!("txc{i}"));
        let no_lib = [("CHVKIT_LIBNFTABLES", "/nonexistent/libnftables.so.1")];
        let o = chvkit_env(&cli, &cli_env, &setup, &no_lib);
        assert!(o.status.success(), "{}", text(&o));

        let scripted = NetNs::new(&format!("txs{i}"));
        let script = typed_env.at("/etc/chvkit/chvkit.nft");
        scripted.sh_ok(&format!("nft -f {}", script.display()));

        let listing = |ns: &NetNs| ns.sh_ok("nft -j list ruleset");
        let want = listing(&scripted);
        assert!(want.contains("\"guest_to_host\""), "{want}");
        assert_eq!(listing(&typed), want, "variant {i}: typed transaction");
        assert_eq!(listing(&cli), want, "variant {i}: nft fallback");
    }
}
