//! What setup and teardown print: one line per item (human) or one JSON document (`--json`).

use serde::Serialize;

pub const SCHEMA: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Dry run: would change.
    Planned,
    Unchanged,
    Changed,
    Failed,
    /// Not attempted because an earlier item failed.
    NotRun,
}

impl Outcome {
    fn label(self, dry_run: bool) -> &'static str {
        match self {
            Outcome::Planned => "change",
            Outcome::Unchanged if dry_run => "ok",
            Outcome::Unchanged => "unchanged",
            Outcome::Changed => "changed",
            Outcome::Failed => "FAILED",
            Outcome::NotRun => "not run",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ItemReport {
    pub id: String,
    /// What was found on the host.
    pub found: String,
    /// What the plan does about it (`null` when it is already as the profile wants).
    pub action: Option<String>,
    pub result: Outcome,
    /// What applying it did, or why it failed.
    pub detail: Option<String>,
}

impl ItemReport {
    /// An item before anything is done about it.
    pub fn new(id: impl Into<String>, found: String, action: Option<String>) -> ItemReport {
        ItemReport {
            id: id.into(),
            found,
            action,
            result: Outcome::Unchanged,
            detail: None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub schema: u32,
    pub command: &'static str,
    pub dry_run: bool,
    pub ok: bool,
    pub changed: usize,
    pub unchanged: usize,
    pub planned: usize,
    pub failed: usize,
    pub items: Vec<ItemReport>,
    pub error: Option<String>,
    /// Things worth saying that are not items (e.g. "nothing recorded").
    pub notes: Vec<String>,
    pub state_file: String,
    /// Human-only closing line after a failed item (its detail already says what failed).
    #[serde(skip)]
    pub human_tail: Option<String>,
    /// Human-only header line (profile and root).
    #[serde(skip)]
    pub header: String,
}

impl Report {
    pub fn new(command: &'static str, dry_run: bool, state_file: String, header: String) -> Report {
        Report {
            schema: SCHEMA,
            command,
            dry_run,
            ok: true,
            changed: 0,
            unchanged: 0,
            planned: 0,
            failed: 0,
            items: Vec::new(),
            error: None,
            notes: Vec::new(),
            state_file,
            human_tail: None,
            header,
        }
    }

    pub fn push(&mut self, item: ItemReport) {
        match item.result {
            Outcome::Planned => self.planned += 1,
            Outcome::Unchanged => self.unchanged += 1,
            Outcome::Changed => self.changed += 1,
            Outcome::Failed => {
                self.failed += 1;
                self.ok = false;
            }
            Outcome::NotRun => {}
        }
        self.items.push(item);
    }

    /// An item nothing is done about: `outcome` (planned in a dry run, not run after a
    /// failure) when it has an action, unchanged when it needs none.
    pub fn push_skipped(&mut self, mut item: ItemReport, outcome: Outcome) {
        if item.action.is_some() {
            item.result = outcome;
        }
        self.push(item);
    }

    pub fn fail(&mut self, error: String) {
        self.ok = false;
        self.error = Some(error);
    }

    /// Print to stdout. A closed pipe (`| head`) is not an error worth reporting.
    pub fn print(&self, json: bool) -> std::io::Result<()> {
        match self.write(&mut std::io::stdout().lock(), json) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            r => r,
        }
    }

    fn write(&self, out: &mut impl std::io::Write, json: bool) -> std::io::Result<()> {
        if json {
            // Plain data: serialisation cannot fail.
            writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(self).unwrap_or_default()
            )?;
            return Ok(());
        }
        writeln!(out, "{}", self.header)?;
        let w = self.items.iter().map(|i| i.id.len()).max().unwrap_or(0);
        let pad = " ".repeat(2 + 10 + 1 + w + 2);
        for i in &self.items {
            let label = i.result.label(self.dry_run);
            if self.dry_run {
                writeln!(out, "  {label:<10} {:<w$}  found: {}", i.id, i.found)?;
                if let Some(a) = &i.action {
                    writeln!(out, "{pad}will:  {a}")?;
                }
            } else {
                let text = match (i.result, &i.detail) {
                    (Outcome::Unchanged, _) => i.found.clone(),
                    (_, Some(d)) => d.clone(),
                    (_, None) => i.action.clone().unwrap_or_else(|| i.found.clone()),
                };
                writeln!(out, "  {label:<10} {:<w$}  {text}", i.id)?;
            }
        }
        for n in &self.notes {
            writeln!(out, "{n}")?;
        }
        let verb = self.command;
        if self.dry_run {
            if self.planned == 0 {
                writeln!(
                    out,
                    "{verb} --dry-run: nothing to change ({} items already as wanted)",
                    self.unchanged
                )?;
            } else {
                writeln!(
                    out,
                    "{verb} --dry-run: {} to change, {} already as wanted; nothing was changed",
                    self.planned, self.unchanged
                )?;
            }
        } else if self.ok {
            writeln!(
                out,
                "{verb}: {} changed, {} unchanged",
                self.changed, self.unchanged
            )?;
        } else {
            writeln!(
                out,
                "{verb}: FAILED ({} changed, {} unchanged, {} failed)",
                self.changed, self.unchanged, self.failed
            )?;
            if let Some(e) = self.human_tail.as_ref().or(self.error.as_ref()) {
                writeln!(out, "{e}")?;
            }
        }
        Ok(())
    }
}
