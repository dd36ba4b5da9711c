//! The adapter for xtables extensions (rules written by iptables-nft): the kernel's JSON
//! names an extension but not its options, and the crate keeps the object untyped
//! (`Statement::XT(Option<serde_json::Value>)`: "not possible to provide any further
//! information about its content"). Its kind and name are read here, and the meaning of the
//! one kind of xt match doctor must understand (`conntrack`/`state`: related,established)
//! comes from the rule's text in a listing with handles.

use std::collections::HashMap;

use nftables::stmt::Statement;

/// An xt statement: `kind` is `match` or `target`, `name` the extension (`conntrack`,
/// `MASQUERADE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Xt<'a> {
    pub kind: &'a str,
    pub name: &'a str,
}

impl<'a> Xt<'a> {
    pub fn of(s: &'a Statement<'_>) -> Option<Xt<'a>> {
        let Statement::XT(body) = s else {
            return None;
        };
        let field = |k: &str| {
            body.as_ref()
                .and_then(|b| b.get(k))
                .and_then(|v| v.as_str())
                .unwrap_or_default()
        };
        Some(Xt {
            kind: field("type"),
            name: field("name"),
        })
    }

    pub fn is_match(&self) -> bool {
        self.kind == "match"
    }

    pub fn is_target(&self) -> bool {
        self.kind == "target"
    }

    /// A conntrack-state match, decodable from the rule's text.
    pub fn is_ct_state(&self) -> bool {
        self.is_match() && (self.name == "conntrack" || self.name == "state")
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

/// Map `(family, table, handle)` to the rule's text from a listing made with handles:
/// `table ip6 filter {` / `chain FORWARD {` / `<rule> # handle 3`.
pub fn rule_texts_by_handle(listing: &str) -> HashMap<(String, String, u32), String> {
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
        let (Some((f, n)), Ok(h)) = (&table, h.trim().parse::<u32>()) else {
            continue;
        };
        if rule.starts_with("chain ") || rule.starts_with("set ") || rule.starts_with("map ") {
            continue;
        }
        out.insert((f.clone(), n.clone(), h), rule.trim().to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn xt_kind_and_name() {
        let s: Statement<'static> =
            serde_json::from_str(r#"{"xt":{"type":"target","name":"MASQUERADE"}}"#).unwrap();
        let xt = Xt::of(&s).unwrap();
        assert!(xt.is_target() && xt.name == "MASQUERADE" && !xt.is_ct_state());
        let s: Statement<'static> =
            serde_json::from_str(r#"{"xt":{"type":"match","name":"conntrack"}}"#).unwrap();
        assert!(Xt::of(&s).unwrap().is_ct_state());
        let s: Statement<'static> = serde_json::from_str(r#"{"accept":null}"#).unwrap();
        assert_eq!(Xt::of(&s), None);
    }

    #[test]
    fn texts_by_handle() {
        let t = rule_texts_by_handle(
            "table ip6 filter { # handle 2\n\tchain FORWARD { # handle 1\n\t\toifname \"b\" ct state related,established counter packets 0 bytes 0 accept # handle 3\n\t}\n}\n",
        );
        assert_eq!(t.len(), 1);
        assert!(t[&("ip6".into(), "filter".into(), 3)].starts_with("oifname \"b\" ct state"));
    }
}
