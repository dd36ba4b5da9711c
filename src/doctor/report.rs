//! Findings and how they are printed: aligned human text or the versioned JSON document.

use std::io::Write;

use serde::Serialize;

/// Version of the `--json` document layout.
pub const SCHEMA: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Level {
    #[serde(rename = "PASS")]
    Pass,
    #[serde(rename = "SKIP")]
    Skip,
    #[serde(rename = "WARN")]
    Warn,
    #[serde(rename = "FAIL")]
    Fail,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Pass => "PASS",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
            Level::Skip => "SKIP",
        }
    }

    fn colour(self) -> &'static str {
        match self {
            Level::Pass => "\x1b[32m",
            Level::Warn => "\x1b[33m",
            Level::Fail => "\x1b[31;1m",
            Level::Skip => "\x1b[2m",
        }
    }
}

/// The result of one check. Every non-PASS finding carries a hint.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub id: &'static str,
    pub level: Level,
    pub summary: String,
    pub detail: String,
    pub hint: Option<String>,
}

impl Finding {
    pub fn pass(id: &'static str, summary: impl Into<String>, detail: impl Into<String>) -> Self {
        Finding {
            id,
            level: Level::Pass,
            summary: summary.into(),
            detail: detail.into(),
            hint: None,
        }
    }

    pub fn new(
        id: &'static str,
        level: Level,
        summary: impl Into<String>,
        detail: impl Into<String>,
        hint: impl Into<String>,
    ) -> Self {
        Finding {
            id,
            level,
            summary: summary.into(),
            detail: detail.into(),
            hint: Some(hint.into()),
        }
    }

    pub fn warn(
        id: &'static str,
        summary: impl Into<String>,
        detail: impl Into<String>,
        hint: impl Into<String>,
    ) -> Self {
        Finding::new(id, Level::Warn, summary, detail, hint)
    }

    pub fn fail(
        id: &'static str,
        summary: impl Into<String>,
        detail: impl Into<String>,
        hint: impl Into<String>,
    ) -> Self {
        Finding::new(id, Level::Fail, summary, detail, hint)
    }

    pub fn skip(
        id: &'static str,
        summary: impl Into<String>,
        detail: impl Into<String>,
        hint: impl Into<String>,
    ) -> Self {
        Finding::new(id, Level::Skip, summary, detail, hint)
    }
}

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Counts {
    pub pass: usize,
    pub warn: usize,
    pub fail: usize,
    pub skip: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub schema: u32,
    pub profile: String,
    pub root: Option<String>,
    pub checks: Vec<Finding>,
    pub summary: Counts,
}

impl Report {
    pub fn new(profile: String, root: Option<String>, checks: Vec<Finding>) -> Report {
        let mut summary = Counts::default();
        for c in &checks {
            match c.level {
                Level::Pass => summary.pass += 1,
                Level::Warn => summary.warn += 1,
                Level::Fail => summary.fail += 1,
                Level::Skip => summary.skip += 1,
            }
        }
        Report {
            schema: SCHEMA,
            profile,
            root,
            checks,
            summary,
        }
    }

    pub fn has_fail(&self) -> bool {
        self.summary.fail > 0
    }

    pub fn write_json(&self, out: &mut impl Write) -> std::io::Result<()> {
        serde_json::to_writer_pretty(&mut *out, self)?;
        writeln!(out)
    }

    /// Aligned text: one line per finding; for non-PASS findings the detail and the fix below.
    pub fn write_human(
        &self,
        out: &mut impl Write,
        colour: bool,
        quiet: bool,
    ) -> std::io::Result<()> {
        let width = self.checks.iter().map(|c| c.id.len()).max().unwrap_or(0);
        let (reset, dim) = if colour {
            ("\x1b[0m", "\x1b[2m")
        } else {
            ("", "")
        };
        if !quiet {
            let root = self
                .root
                .as_deref()
                .map(|r| format!(", root {r}"))
                .unwrap_or_default();
            writeln!(out, "chvkit doctor: profile {}{root}", self.profile)?;
        }
        for c in &self.checks {
            if quiet && c.level == Level::Pass {
                continue;
            }
            let (on, off) = if colour {
                (c.level.colour(), reset)
            } else {
                ("", "")
            };
            writeln!(
                out,
                "{on}{:<4}{off}  {:<width$}  {}",
                c.level.as_str(),
                c.id,
                c.summary
            )?;
            if c.level != Level::Pass {
                let pad = " ".repeat(width + 8);
                let room = LINE_WIDTH.saturating_sub(pad.len()).max(40);
                for para in c.detail.lines().filter(|l| !l.trim().is_empty()) {
                    for line in wrap(para, room) {
                        writeln!(out, "{pad}{dim}{line}{reset}")?;
                    }
                }
                if let Some(h) = &c.hint {
                    let mut lines = h.lines();
                    if let Some(first) = lines.next() {
                        writeln!(out, "{pad}fix: {first}")?;
                    }
                    for l in lines {
                        writeln!(out, "{pad}     {l}")?;
                    }
                }
            }
        }
        let s = &self.summary;
        if !quiet || s.fail + s.warn > 0 {
            let n = self.checks.len();
            writeln!(
                out,
                "{n} check{}: {} pass, {} warn, {} fail, {} skip",
                if n == 1 { "" } else { "s" },
                s.pass,
                s.warn,
                s.fail,
                s.skip
            )?;
        }
        Ok(())
    }
}

/// Width the human output's detail text is wrapped to (hints are never wrapped: they are
/// meant to be copied whole).
const LINE_WIDTH: usize = 110;

/// Greedy word wrap; a word longer than `width` gets a line of its own.
pub fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut cur = String::new();
    for w in text.split_whitespace() {
        if !cur.is_empty() && cur.len() + 1 + w.len() > width {
            lines.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push(' ');
        }
        cur.push_str(w);
    }
    if !cur.is_empty() {
        lines.push(cur);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        Report::new(
            "p.yaml".into(),
            None,
            vec![
                Finding::pass("kvm.device", "present", "char 10:232"),
                Finding::fail(
                    "net.bridge",
                    "chvbr0 missing",
                    "no link",
                    "ip link add chvbr0 type bridge",
                ),
                Finding::warn("cpu.virtualization", "PVM", "line1\nline2", "export X=1"),
            ],
        )
    }

    #[test]
    fn wrapping() {
        assert_eq!(wrap("aa bb cc", 5), vec!["aa bb", "cc"]);
        assert_eq!(wrap("averylongword x", 4), vec!["averylongword", "x"]);
        assert!(wrap("  ", 10).is_empty());
    }

    #[test]
    fn counts_and_json() {
        let r = report();
        assert!(r.has_fail());
        assert_eq!(
            r.summary,
            Counts {
                pass: 1,
                warn: 1,
                fail: 1,
                skip: 0
            }
        );
        let mut v = Vec::new();
        r.write_json(&mut v).unwrap();
        let j: serde_json::Value = serde_json::from_slice(&v).unwrap();
        assert_eq!(j["schema"], 1);
        assert_eq!(j["checks"][1]["level"], "FAIL");
        assert_eq!(j["checks"][0]["hint"], serde_json::Value::Null);
        assert_eq!(j["summary"]["warn"], 1);
    }

    #[test]
    fn human_alignment_quiet_and_no_colour() {
        let r = report();
        let mut v = Vec::new();
        r.write_human(&mut v, false, false).unwrap();
        let t = String::from_utf8(v).unwrap();
        assert!(!t.contains('\x1b'));
        assert!(t.contains("PASS  kvm.device          present"), "{t}");
        assert!(t.contains("fix: ip link add chvbr0 type bridge"), "{t}");
        let mut v = Vec::new();
        r.write_human(&mut v, true, true).unwrap();
        let t = String::from_utf8(v).unwrap();
        assert!(!t.contains("kvm.device") && t.contains("net.bridge") && t.contains('\x1b'));
    }
}
