//! Findings and how they are printed: aligned human text, the versioned JSON document, or the
//! Prometheus text exposition format (`docs/metrics.md` describes the metrics).

use std::io::Write;
use std::time::{Duration, SystemTime};

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
    /// Every level, in severity order.
    pub const ALL: [Level; 4] = [Level::Pass, Level::Skip, Level::Warn, Level::Fail];

    pub fn as_str(self) -> &'static str {
        match self {
            Level::Pass => "PASS",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
            Level::Skip => "SKIP",
        }
    }

    /// The value of `chvkit_check`: the levels in order of severity, so that `max()` over
    /// checks is the worst one and `>= 2` means "WARN or worse". Documented in docs/metrics.md;
    /// never renumber.
    pub fn severity(self) -> u8 {
        match self {
            Level::Pass => 0,
            Level::Skip => 1,
            Level::Warn => 2,
            Level::Fail => 3,
        }
    }

    /// The `level` label value: lower case, as Prometheus label values usually are.
    pub fn metric_label(self) -> &'static str {
        match self {
            Level::Pass => "pass",
            Level::Skip => "skip",
            Level::Warn => "warn",
            Level::Fail => "fail",
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

impl Counts {
    pub fn of(&self, level: Level) -> usize {
        match level {
            Level::Pass => self.pass,
            Level::Warn => self.warn,
            Level::Fail => self.fail,
            Level::Skip => self.skip,
        }
    }
}

/// What the Prometheus exposition says about the run itself, beyond the findings (kept out of
/// [`Report`] so that the JSON document stays as it is).
#[derive(Debug, Clone)]
pub struct RunInfo {
    /// chvkit's version.
    pub version: &'static str,
    /// How long reading the facts and judging them took (not process start-up).
    pub duration: Duration,
    /// When the run finished.
    pub finished: SystemTime,
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

    /// The Prometheus text exposition format (version 0.0.4), as node_exporter's textfile
    /// collector reads it: no sample timestamps (the collector refuses them), the run's time as
    /// a metric of its own. Metric names, labels and the level encoding are an interface:
    /// docs/metrics.md documents them, and dashboards and alerts depend on them.
    pub fn write_prometheus(&self, out: &mut impl Write, run: &RunInfo) -> std::io::Result<()> {
        let mut info = vec![("version", run.version), ("profile", self.profile.as_str())];
        if let Some(root) = &self.root {
            info.push(("root", root.as_str()));
        }
        family(
            out,
            "chvkit_info",
            "chvkit's version and the profile (and --root) doctor checked against; always 1.",
            &[(info, "1".to_string())],
        )?;
        let checks: Vec<(Vec<(&str, &str)>, String)> = self
            .checks
            .iter()
            .map(|c| {
                (
                    vec![("id", c.id), ("level", c.level.metric_label())],
                    c.level.severity().to_string(),
                )
            })
            .collect();
        family(
            out,
            "chvkit_check",
            "One series per doctor check, labelled with its level; the value encodes the level: \
             0 pass, 1 skip, 2 warn, 3 fail.",
            &checks,
        )?;
        let counts: Vec<(Vec<(&str, &str)>, String)> = Level::ALL
            .iter()
            .map(|l| {
                (
                    vec![("level", l.metric_label())],
                    self.summary.of(*l).to_string(),
                )
            })
            .collect();
        family(
            out,
            "chvkit_doctor_checks",
            "Number of doctor checks at each level (every level present, 0 included).",
            &counts,
        )?;
        family(
            out,
            "chvkit_doctor_duration_seconds",
            "Time doctor took to read the host facts and judge them.",
            &[(vec![], format!("{:.6}", run.duration.as_secs_f64()))],
        )?;
        let finished = run
            .finished
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        family(
            out,
            "chvkit_doctor_last_run_timestamp_seconds",
            "Unix time at which this doctor run finished.",
            &[(vec![], format!("{:.3}", finished.as_secs_f64()))],
        )
    }
}

/// One metric family of the exposition: its `# HELP` and `# TYPE` lines, then its samples.
/// Every family chvkit writes is a gauge: each value describes this run, none accumulates.
fn family(
    out: &mut impl Write,
    name: &str,
    help: &str,
    samples: &[(Vec<(&str, &str)>, String)],
) -> std::io::Result<()> {
    writeln!(out, "# HELP {name} {}", escape_help(help))?;
    writeln!(out, "# TYPE {name} gauge")?;
    for (labels, value) in samples {
        if labels.is_empty() {
            writeln!(out, "{name} {value}")?;
        } else {
            let pairs: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape_label_value(v)))
                .collect();
            writeln!(out, "{name}{{{}}} {value}", pairs.join(","))?;
        }
    }
    Ok(())
}

/// A label value as the text exposition format wants it: backslash, double quote and line
/// feed escaped (`\\`, `\"`, `\n`); everything else, any UTF-8, as it is.
pub fn escape_label_value(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// `# HELP` text: backslash and line feed escaped (a double quote is literal there).
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
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
    fn prometheus_exposition() {
        let mut r = report();
        // A profile path may hold any byte a file name can: quotes, backslashes, line feeds.
        r.profile = "/p/a\"b\\c\nd.yaml".into();
        r.root = Some("/r".into());
        let run = RunInfo {
            version: "1.2.3",
            duration: Duration::from_millis(250),
            finished: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_500),
        };
        let mut v = Vec::new();
        r.write_prometheus(&mut v, &run).unwrap();
        let t = String::from_utf8(v).unwrap();
        let lines: Vec<&str> = t.lines().collect();
        for want in [
            r#"chvkit_info{version="1.2.3",profile="/p/a\"b\\c\nd.yaml",root="/r"} 1"#,
            r#"chvkit_check{id="kvm.device",level="pass"} 0"#,
            r#"chvkit_check{id="net.bridge",level="fail"} 3"#,
            r#"chvkit_check{id="cpu.virtualization",level="warn"} 2"#,
            r#"chvkit_doctor_checks{level="pass"} 1"#,
            r#"chvkit_doctor_checks{level="skip"} 0"#,
            r#"chvkit_doctor_checks{level="warn"} 1"#,
            r#"chvkit_doctor_checks{level="fail"} 1"#,
            "chvkit_doctor_duration_seconds 0.250000",
            "chvkit_doctor_last_run_timestamp_seconds 1700000000.500",
        ] {
            assert!(lines.contains(&want), "missing `{want}` in\n{t}");
        }
        // One HELP and one TYPE per family, right before its samples; every family a gauge.
        let families = [
            "chvkit_info",
            "chvkit_check",
            "chvkit_doctor_checks",
            "chvkit_doctor_duration_seconds",
            "chvkit_doctor_last_run_timestamp_seconds",
        ];
        for f in families {
            let help = format!("# HELP {f} ");
            let at = lines
                .iter()
                .position(|l| l.starts_with(&help))
                .unwrap_or_else(|| panic!("no HELP for {f}:\n{t}"));
            assert_eq!(lines.iter().filter(|l| l.starts_with(&help)).count(), 1);
            assert_eq!(lines[at + 1], format!("# TYPE {f} gauge"));
        }
        // Three checks: one series each, no more.
        assert_eq!(
            lines
                .iter()
                .filter(|l| l.starts_with("chvkit_check{"))
                .count(),
            3
        );
        assert!(t.ends_with('\n') && !t.contains("\n\n"));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label_value("plain/ü"), "plain/ü");
        assert_eq!(escape_label_value("a\\b"), "a\\\\b");
        assert_eq!(escape_label_value("say \"hi\""), "say \\\"hi\\\"");
        assert_eq!(escape_label_value("1\n2"), "1\\n2");
        assert_eq!(escape_help("x\\y\nz \"q\""), "x\\\\y\\nz \"q\"");
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
