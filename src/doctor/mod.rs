//! `chvkit doctor`: read-only checks of the host against the profile, each with a level, a
//! one-line summary, detail, and for anything not PASS the command that fixes it.
//!
//! Facts are read once ([`facts::Facts::gather`], from [`crate::host`]) and judged by pure
//! functions; doctor never changes the host. Check ids are stable: scripts use them with
//! `--only` and in `--json` output, and dashboards in the Prometheus output (`--format
//! prometheus`, `--textfile DIR`; docs/metrics.md).

pub mod artifacts;
pub mod facts;
pub mod network;
pub mod nfeval;
pub mod report;
pub mod system;

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use anyhow::Context as _;

use self::facts::{need, Facts};
use self::network::Net;
use self::report::{Finding, Report, RunInfo};
use crate::{exit, Context};

/// The file `--textfile DIR` writes (node_exporter's textfile collector reads `DIR/*.prom`).
pub const TEXTFILE_NAME: &str = "chvkit.prom";

/// How the report is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned text for people (colour on a terminal unless NO_COLOR is set).
    Text,
    /// The JSON document (`schema` 1).
    Json,
    /// Prometheus text exposition format (docs/metrics.md).
    Prometheus,
}

#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    /// Output format [default: text; none with --textfile alone].
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub format: Option<Format>,

    /// Same as `--format json`.
    #[arg(long, conflicts_with = "format")]
    pub json: bool,

    /// Also write the Prometheus metrics to DIR/chvkit.prom, replaced atomically, for
    /// node_exporter's textfile collector. Stdout then gets a report only if --format or --json
    /// asks for one.
    #[arg(long, value_name = "DIR", value_hint = clap::ValueHint::DirPath)]
    pub textfile: Option<PathBuf>,

    /// Show only findings that are not PASS (text output; JSON and metrics always carry all).
    #[arg(short, long)]
    pub quiet: bool,

    /// Run only the checks whose id is PREFIX or starts with `PREFIX.` (e.g. `net`,
    /// `kvm.usable`). Repeatable.
    #[arg(long, value_name = "PREFIX")]
    pub only: Vec<String>,
}

type CheckFn = fn(&Context, &Facts) -> Finding;

/// Every check in output order, with the facts it needs.
pub const CHECKS: &[(&str, u32, CheckFn)] = &[
    ("kvm.device", need::KVM | need::CPU, |_, f| {
        system::device(f)
    }),
    ("kvm.access", need::KVM, |_, f| system::access(f)),
    ("kvm.usable", need::KVM | need::CPU, |_, f| {
        system::usable(f)
    }),
    ("cpu.virtualization", need::CPU, |_, f| {
        system::cpu_virtualization(f)
    }),
    ("chv.binary", need::CHV, artifacts::chv_binary),
    (
        "chv.version",
        need::CHV | need::CHV_VERSION,
        artifacts::chv_version,
    ),
    (
        "chv.checksum",
        need::CHV | need::CHV_HASH | need::LOCK,
        artifacts::chv_checksum,
    ),
    (
        "firmware.file",
        need::FIRMWARE | need::LOCK,
        artifacts::firmware_file,
    ),
    (
        "firmware.boot_mode",
        need::KERNEL | need::GUEST,
        artifacts::firmware_boot_mode,
    ),
    (
        "kernel.file",
        need::KERNEL | need::CPU,
        artifacts::kernel_file,
    ),
    (
        "kernel.guest",
        need::GUEST | need::CPU,
        artifacts::kernel_guest,
    ),
    ("net.bridge", need::NET, |c, f| Net::new(c, f).bridge()),
    ("net.bridge_up", need::NET, |c, f| {
        Net::new(c, f).bridge_up()
    }),
    ("net.bridge_addr", need::NET, |c, f| {
        Net::new(c, f).bridge_addr()
    }),
    ("net.dad", need::NET, |c, f| Net::new(c, f).dad()),
    ("net.forwarding", need::NET, |c, f| {
        Net::new(c, f).forwarding()
    }),
    ("net.accept_ra", need::NET, |c, f| {
        Net::new(c, f).accept_ra()
    }),
    ("net.nat", need::NET | need::NFT, |c, f| {
        Net::new(c, f).nat()
    }),
    ("net.forward_rules", need::NET | need::NFT, |c, f| {
        Net::new(c, f).forward_rules()
    }),
    ("net.host_exposure", need::NET | need::NFT, |c, f| {
        Net::new(c, f).host_exposure()
    }),
    ("net.taps", need::NET, |c, f| Net::new(c, f).taps()),
    ("tools.rootfs", need::TOOLS, artifacts::tools_rootfs),
];

/// Whether check `id` is selected by `--only` prefixes (none = all).
pub fn selected(id: &str, only: &[String]) -> bool {
    only.is_empty()
        || only.iter().any(|p| {
            let p = p.trim_end_matches('.');
            id == p || (id.starts_with(p) && id.as_bytes().get(p.len()) == Some(&b'.'))
        })
}

/// Run the selected checks and return the report.
pub fn diagnose(ctx: &Context, only: &[String]) -> Report {
    let chosen: Vec<&(&str, u32, CheckFn)> = CHECKS
        .iter()
        .filter(|(id, _, _)| selected(id, only))
        .collect();
    let needs = chosen.iter().fold(0, |acc, (_, n, _)| acc | n);
    let facts = Facts::gather(ctx, needs);
    tracing::debug!(
        elapsed_us = facts.elapsed.as_micros() as u64,
        children = crate::host::children_spawned(),
        "host facts read"
    );
    let checks = chosen.iter().map(|(_, _, f)| f(ctx, &facts)).collect();
    Report::new(
        ctx.profile_source.clone(),
        ctx.root.prefix().map(|p| p.display().to_string()),
        checks,
    )
}

pub fn run(ctx: &Context, a: DoctorArgs) -> anyhow::Result<i32> {
    if let Some(bad) = a.only.iter().find(|p| {
        !CHECKS
            .iter()
            .any(|(id, _, _)| selected(id, std::slice::from_ref(*p)))
    }) {
        let ids: Vec<&str> = CHECKS.iter().map(|(id, _, _)| *id).collect();
        eprintln!(
            "chvkit: doctor: --only `{bad}` matches no check; check ids: {}",
            ids.join(", ")
        );
        return Ok(exit::USAGE);
    }
    // Checked before the checks run, so that a typo costs nothing and writes nothing.
    if let Some(dir) = &a.textfile {
        if !dir.is_dir() {
            eprintln!(
                "chvkit: doctor: --textfile {}: not a directory (node_exporter's \
                 --collector.textfile.directory, which must exist)",
                dir.display()
            );
            return Ok(exit::USAGE);
        }
    }
    let started = Instant::now();
    let report = diagnose(ctx, &a.only);
    let run = RunInfo {
        version: env!("CARGO_PKG_VERSION"),
        duration: started.elapsed(),
        finished: SystemTime::now(),
    };
    if let Some(dir) = &a.textfile {
        write_textfile(dir, &report, &run)?;
    }
    let format = match (a.json, a.format, &a.textfile) {
        (true, _, _) => Some(Format::Json),
        (false, Some(f), _) => Some(f),
        (false, None, Some(_)) => None,
        (false, None, None) => Some(Format::Text),
    };
    if let Some(format) = format {
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        match format {
            Format::Json => report.write_json(&mut out),
            Format::Prometheus => report.write_prometheus(&mut out, &run),
            Format::Text => {
                let colour = stdout.is_terminal()
                    && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
                report.write_human(&mut out, colour, a.quiet)
            }
        }
        .and_then(|()| out.flush())
        .context("writing the report")?;
    }
    // The exit status does not depend on the format: a textfile timer that must not count a
    // FAIL as its own failure says so in its unit (`SuccessExitStatus=1`, docs/metrics.md).
    Ok(if report.has_fail() {
        exit::FAILURE
    } else {
        exit::OK
    })
}

/// Replace `DIR/chvkit.prom` in one rename: the collector may read it at any moment, and a
/// half-written file would be a scrape error (or, worse, a partial set of series).
fn write_textfile(dir: &Path, report: &Report, run: &RunInfo) -> anyhow::Result<()> {
    let mut text = Vec::with_capacity(4096);
    report
        .write_prometheus(&mut text, run)
        .context("rendering the metrics")?;
    let dest = dir.join(TEXTFILE_NAME);
    // 0644: node_exporter runs as its own user and must be able to read the file.
    crate::fsutil::write_atomic(&dest, &text, 0o644)
        .with_context(|| format!("writing {}", dest.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_prefixes() {
        let only = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(selected("net.nat", &only(&["net"])));
        assert!(selected("net.nat", &only(&["net."])));
        assert!(!selected("network.x", &only(&["net"])));
        assert!(selected("kvm.usable", &only(&["kvm.usable"])));
        assert!(!selected("kvm.usable", &only(&["kvm.use"])));
        assert!(selected("anything", &[]));
    }

    #[test]
    fn ids_are_unique_and_cover_the_issue() {
        let ids: Vec<&str> = CHECKS.iter().map(|(id, _, _)| *id).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), ids.len());
        for want in [
            "kvm.device",
            "kvm.access",
            "kvm.usable",
            "cpu.virtualization",
            "chv.binary",
            "chv.version",
            "chv.checksum",
            "firmware.file",
            "kernel.file",
            "kernel.guest",
            "net.bridge",
            "net.bridge_up",
            "net.bridge_addr",
            "net.dad",
            "net.forwarding",
            "net.accept_ra",
            "net.nat",
            "net.forward_rules",
            "net.taps",
            "tools.rootfs",
            "net.host_exposure",
        ] {
            assert!(ids.contains(&want), "{want}");
        }
    }
}
