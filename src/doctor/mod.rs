//! `chvkit doctor`: read-only checks of the host against the profile, each with a level, a
//! one-line summary, detail, and for anything not PASS the command that fixes it.
//!
//! Facts are read once ([`facts::Facts::gather`], from [`crate::host`]) and judged by pure
//! functions; doctor never changes the host. Check ids are stable: scripts use them with
//! `--only` and in `--json` output.

pub mod artifacts;
pub mod facts;
pub mod network;
pub mod nfeval;
pub mod report;
pub mod system;

use std::io::{IsTerminal, Write};

use anyhow::Context as _;

use self::facts::{need, Facts};
use self::network::Net;
use self::report::{Finding, Report};
use crate::{exit, Context};

#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    /// Print the findings as JSON (`schema` 1) instead of text.
    #[arg(long)]
    pub json: bool,

    /// Show only findings that are not PASS.
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
    let report = diagnose(ctx, &a.only);
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if a.json {
        report.write_json(&mut out).context("writing the report")?;
    } else {
        let colour =
            stdout.is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
        report
            .write_human(&mut out, colour, a.quiet)
            .context("writing the report")?;
    }
    out.flush().context("writing the report")?;
    Ok(if report.has_fail() {
        exit::FAILURE
    } else {
        exit::OK
    })
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
