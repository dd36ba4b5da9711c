//! `chvkit teardown`: remove exactly what setup recorded in its state file — its boot-time
//! files, its firewall table or chains, the bridge it created (or the address it added to a
//! bridge it found), the artifacts it installed — and put back the sysctls it changed, unless
//! someone has changed them since. Nothing else is looked at, so foreign links, tables and rules
//! cannot be touched.
//!
//! Each record is dropped from the state file as soon as it is undone, so an interrupted
//! teardown resumes where it stopped.

use std::path::PathBuf;

use anyhow::{bail, Context as _};

use super::firewall;
use super::report::{ItemReport, Outcome, Report};
use super::state::{FirewallRecord, SetupState, SysctlRecord};
use super::{
    finish, lock_state_dir, netlink, new_report, privilege, remove_if_exists, sysctl, TeardownArgs,
};
use crate::host::net as hostnet;
use crate::lockfile::ArtifactLock;
use crate::Context;

enum TOp {
    /// Nothing to do; just forget the record.
    Forget,
    RemoveFile(PathBuf),
    Firewall(FirewallRecord),
    DeleteBridge(String),
    RemoveAddr {
        bridge: String,
        addr: std::net::Ipv6Addr,
        len: u8,
    },
    Sysctl(SysctlRecord),
    Artifact(PathBuf),
}

/// The state record an item stands for; dropped once the item is handled.
enum Rec {
    File(PathBuf),
    Firewall,
    Bridge,
    Sysctl(super::sysctl::Key),
    Artifact(String),
}

struct TStep {
    id: String,
    found: String,
    action: Option<String>,
    op: TOp,
    rec: Rec,
}

pub fn run_teardown(ctx: &Context, a: TeardownArgs) -> anyhow::Result<i32> {
    finish(ctx, "teardown", a.dry_run, a.json, teardown(ctx, &a))
}

fn teardown(ctx: &Context, a: &TeardownArgs) -> anyhow::Result<Report> {
    let state_path = SetupState::path(&ctx.profile, &ctx.root);
    let lock_path = ArtifactLock::path(&ctx.profile, &ctx.root);
    let mut report = new_report(ctx, "teardown", a.dry_run);
    let Some(mut st) = SetupState::load(&state_path)? else {
        report.notes.push(format!(
            "nothing recorded at {}: setup has not run here (or teardown already finished), \
             so there is nothing to remove",
            state_path.display()
        ));
        return Ok(report);
    };
    let net_records = st.bridge.is_some() || st.firewall.is_some() || !st.sysctls.is_empty();
    if !a.dry_run {
        if net_records && !privilege::has_cap(privilege::CAP_NET_ADMIN) {
            bail!(
                "teardown needs CAP_NET_ADMIN to remove the bridge, firewall rules and sysctls \
                 setup recorded, and this process (uid {}) does not have it: run it as root. \
                 Nothing was changed.",
                privilege::uid()
            );
        }
        if let Err(why) = privilege::can_write(&state_path) {
            bail!(
                "teardown cannot write {}: {why}. Run it as root. Nothing was changed.",
                state_path.display()
            );
        }
    }
    let _guard = if a.dry_run {
        None
    } else {
        Some(lock_state_dir(&state_path)?)
    };
    let steps = plan(ctx, &st, a.keep_artifacts)?;
    if a.dry_run {
        for s in steps {
            report.push_skipped(ItemReport::new(s.id, s.found, s.action), Outcome::Planned);
        }
        return Ok(report);
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let mut nl = netlink::Netlink::new(&rt);
    let mut lock = ArtifactLock::load(&lock_path)?;
    let mut failed = false;
    for s in steps {
        let mut item = ItemReport::new(s.id.clone(), s.found.clone(), s.action.clone());
        if failed {
            report.push_skipped(item, Outcome::NotRun);
            continue;
        }
        match undo(&mut nl, &s.op) {
            Ok(detail) => {
                forget(&mut st, &mut lock, &s.rec);
                // Saved as it goes, so an interrupted teardown resumes where it stopped.
                st.save(&state_path)?;
                if s.action.is_some() {
                    item.result = Outcome::Changed;
                    item.detail = detail;
                }
            }
            Err(e) => {
                item.result = Outcome::Failed;
                item.detail = Some(format!("{e:#}"));
                let next = format!(
                    "What is left is still recorded in {}; fix the cause and run teardown \
                     again.",
                    state_path.display()
                );
                report.fail(format!("teardown stopped at {}: {e:#}\n{next}", s.id));
                report.human_tail = Some(format!("teardown stopped at {}. {next}", s.id));
                failed = true;
            }
        }
        report.push(item);
    }
    if let Some(l) = &lock {
        if l.artifacts.is_empty() {
            remove_if_exists(&lock_path)?;
        } else {
            l.save(&lock_path)?;
        }
    }
    if st.is_empty() {
        remove_if_exists(&state_path)?;
        // Deepest first; a directory someone else has put files in stays.
        let mut dirs = st.dirs.clone();
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for d in dirs {
            let _ = std::fs::remove_dir(ctx.root.path(&d));
        }
    } else {
        st.save(&state_path)?;
    }
    Ok(report)
}

fn file_id(ctx: &Context, host: &std::path::Path) -> String {
    let p = &ctx.profile.paths;
    if host == p.sysctl_file.as_path() {
        "persist.sysctl".into()
    } else if host == p.nft_file.as_path() {
        "persist.nft".into()
    } else if host == p.unit_file.as_path() {
        "persist.unit".into()
    } else if host.extension().is_some_and(|e| e == "service") {
        "persist.unit_enabled".into()
    } else {
        "persist.file".into()
    }
}

fn plan(ctx: &Context, st: &SetupState, keep_artifacts: bool) -> anyhow::Result<Vec<TStep>> {
    let mut steps = Vec::new();
    // Boot-time files first: a crash halfway must not leave a unit that re-creates the rest.
    for host in st.files.iter().rev() {
        let at = ctx.root.path(host);
        let exists = std::fs::symlink_metadata(&at).is_ok();
        steps.push(TStep {
            id: file_id(ctx, host),
            found: if exists {
                format!("{} present", at.display())
            } else {
                format!("{} already gone", at.display())
            },
            action: exists.then(|| format!("remove {}", at.display())),
            op: if exists {
                TOp::RemoveFile(at)
            } else {
                TOp::Forget
            },
            rec: Rec::File(host.clone()),
        });
    }
    if let Some(rec) = &st.firewall {
        let mut d = firewall::driver(firewall::record_backend(rec));
        let what = match rec {
            FirewallRecord::Nftables { family, table, .. } => {
                format!("nftables table {family} {table}")
            }
            FirewallRecord::Iptables { chains, .. } => format!(
                "ip6tables chains {} and the jumps to them",
                chains
                    .iter()
                    .map(|(_, c)| c.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let present = d
            .present(rec)
            .with_context(|| format!("cannot inspect {what}"))?;
        steps.push(TStep {
            id: "net.firewall".into(),
            found: if present {
                format!("{what} present")
            } else {
                format!("{what} already gone")
            },
            action: present.then(|| format!("delete {what} (no other table or rule)")),
            op: if present {
                TOp::Firewall(rec.clone())
            } else {
                TOp::Forget
            },
            rec: Rec::Firewall,
        });
    }
    let mut bridge_deleted: Option<String> = None;
    if let Some(b) = &st.bridge {
        let link = hostnet::link_by_name(&b.name).context("cannot read the network links")?;
        if b.created {
            let ok = link.as_ref().is_some_and(|l| l.is_bridge());
            if ok {
                bridge_deleted = Some(b.name.clone());
            }
            steps.push(TStep {
                id: "net.bridge".into(),
                found: match &link {
                    Some(l) if l.is_bridge() => format!("bridge {} (created by setup)", b.name),
                    Some(_) => format!("{} is no longer a bridge: left alone", b.name),
                    None => format!("{} already gone", b.name),
                },
                action: ok.then(|| format!("delete bridge {} and its addresses", b.name)),
                op: if ok {
                    TOp::DeleteBridge(b.name.clone())
                } else {
                    TOp::Forget
                },
                rec: Rec::Bridge,
            });
        } else if let Some(addr) = &b.address_added {
            let parsed = addr
                .split_once('/')
                .and_then(|(a, l)| Some((a.parse().ok()?, l.parse().ok()?)));
            let present = match (&link, parsed) {
                (Some(l), Some((a, n))) => l.ipv6.iter().any(|x| x.addr == a && x.prefix_len == n),
                _ => false,
            };
            steps.push(TStep {
                id: "net.bridge_addr".into(),
                found: if present {
                    format!(
                        "{addr} on {} (added by setup; the bridge was already there)",
                        b.name
                    )
                } else {
                    format!("{addr} no longer on {}", b.name)
                },
                action: present.then(|| format!("remove {addr} from {}", b.name)),
                op: match (present, parsed) {
                    (true, Some((a, n))) => TOp::RemoveAddr {
                        bridge: b.name.clone(),
                        addr: a,
                        len: n,
                    },
                    _ => TOp::Forget,
                },
                rec: Rec::Bridge,
            });
        }
    }
    // Restore in reverse: forwarding goes off before the uplinks' accept_ra goes back.
    for r in st.sysctls.iter().rev() {
        let id = if r.key.0.ends_with("/forwarding") {
            "net.forwarding"
        } else if r.key.0.ends_with("/accept_ra") {
            "net.accept_ra"
        } else {
            "net.dad"
        };
        if let (Some(b), Some(i)) = (&bridge_deleted, r.key.iface()) {
            if b == i {
                steps.push(TStep {
                    id: id.into(),
                    found: format!("{} goes away with bridge {b}", r.key),
                    action: None,
                    op: TOp::Forget,
                    rec: Rec::Sysctl(r.key.clone()),
                });
                continue;
            }
        }
        let cur = sysctl::read(&r.key)?;
        let (found, action) = match &cur {
            None => (format!("{} gone with its interface", r.key), None),
            Some(c) if *c == r.value => (
                format!("{}={c} (set by setup; was {})", r.key, r.previous),
                (r.previous != *c).then(|| format!("restore {}={}", r.key, r.previous)),
            ),
            Some(c) => (
                format!(
                    "{}={c}, changed since setup set {}: left alone",
                    r.key, r.value
                ),
                None,
            ),
        };
        steps.push(TStep {
            id: id.into(),
            op: if action.is_some() {
                TOp::Sysctl(r.clone())
            } else {
                TOp::Forget
            },
            rec: Rec::Sysctl(r.key.clone()),
            found,
            action,
        });
    }
    if !keep_artifacts {
        for (key, a) in &st.artifacts {
            let at = ctx.root.path(&a.path);
            let id = match key.as_str() {
                crate::lockfile::CLOUD_HYPERVISOR => "chv.binary",
                crate::kernel::LOCK_KERNEL | crate::kernel::LOCK_INITRAMFS => "kernel.guest",
                _ => "firmware.file",
            };
            let have = super::artifacts::sha256_file(&at)
                .with_context(|| format!("cannot read {}", at.display()))?;
            let (found, action) = match have {
                None => (format!("{} already gone", at.display()), None),
                Some(h) if h == a.sha256 => (
                    format!("{} as setup installed it", at.display()),
                    Some(format!("remove {}", at.display())),
                ),
                Some(h) => (
                    format!(
                        "{} was replaced since setup (sha256 {h}): left alone",
                        at.display()
                    ),
                    None,
                ),
            };
            let removes = action.is_some();
            steps.push(TStep {
                id: id.into(),
                op: if removes {
                    TOp::Artifact(at)
                } else {
                    TOp::Forget
                },
                rec: Rec::Artifact(key.clone()),
                found,
                action,
            });
            // The record that says which kernel is installed goes with the kernel.
            let record = crate::kernel::installed::record_path(&ctx.profile, &ctx.root);
            if key == crate::kernel::LOCK_KERNEL && removes && record.exists() {
                steps.push(TStep {
                    id: "kernel.guest".into(),
                    found: format!("{} present", record.display()),
                    action: Some(format!("remove {}", record.display())),
                    op: TOp::RemoveFile(record),
                    rec: Rec::File(PathBuf::new()),
                });
            }
        }
    }
    Ok(steps)
}

fn undo(nl: &mut netlink::Netlink, op: &TOp) -> anyhow::Result<Option<String>> {
    match op {
        TOp::Forget => Ok(None),
        TOp::RemoveFile(p) => {
            remove_if_exists(p)?;
            Ok(Some(format!("removed {}", p.display())))
        }
        TOp::Firewall(rec) => {
            let mut d = firewall::driver(firewall::record_backend(rec));
            d.remove(rec)?;
            Ok(Some("removed; other tables and rules untouched".into()))
        }
        TOp::DeleteBridge(name) => {
            let Some(l) = hostnet::link_by_name(name).context("cannot read the network links")?
            else {
                return Ok(Some(format!("{name} already gone")));
            };
            nl.del_link(l.index, name)?;
            Ok(Some(format!("deleted bridge {name}")))
        }
        TOp::RemoveAddr { bridge, addr, len } => {
            let Some(l) = hostnet::link_by_name(bridge).context("cannot read the network links")?
            else {
                return Ok(Some(format!("{bridge} already gone")));
            };
            nl.del_addr(l.index, bridge, *addr, *len)?;
            Ok(Some(format!("removed {addr}/{len} from {bridge}")))
        }
        TOp::Sysctl(r) => {
            sysctl::write(&r.key, &r.previous)?;
            Ok(Some(format!("{}={} restored", r.key, r.previous)))
        }
        TOp::Artifact(path) => {
            remove_if_exists(path)?;
            Ok(Some(format!("removed {}", path.display())))
        }
    }
}

/// Drop the record an item stood for (undone, already gone, or left to its new owner).
fn forget(st: &mut SetupState, lock: &mut Option<ArtifactLock>, rec: &Rec) {
    match rec {
        Rec::File(p) => st.files.retain(|f| f != p),
        Rec::Firewall => st.firewall = None,
        Rec::Bridge => st.bridge = None,
        Rec::Sysctl(k) => st.sysctls.retain(|r| &r.key != k),
        Rec::Artifact(key) => {
            st.artifacts.remove(key);
            if let Some(l) = lock.as_mut() {
                l.artifacts.remove(key);
            }
        }
    }
}
