//! `net.taps`: every `chv-*` TAP, judged by who holds it, where it is attached, and whether the
//! chvkit job that created it is still alive.
//!
//! A TAP's life: created persistent, attached to the bridge and brought up (both chvkit's launch
//! and the seed's manual setup do this *before* the VMM starts: the VMM then needs no
//! CAP_NET_ADMIN), held by the VMM (carrier on), released when the VMM exits. A TAP on the
//! bridge and up that nobody holds yet is therefore *ready*, not litter; it is litter only when
//! nobody will come back for it, and the one thing that says so is the job record: a run dir
//! whose `state.json` names the TAP while nobody holds the job's lock (gc's own rule).

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::Deserialize;

use super::{Finding, Net};
use crate::host::net::{Link, NetSnapshot};
use crate::launch::identity::{validate_job_id, TAP_PREFIX};
use crate::launch::rundir::{runtime_dir, STATE_SCHEMA};
use crate::Context;

const ID: &str = "net.taps";

/// A chvkit job's claim on a TAP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub job: String,
    /// Someone holds the job's lock: its supervisor runs. Unknown counts as alive, so that doctor
    /// never calls a running job's TAP litter.
    pub alive: bool,
}

/// The TAPs chvkit jobs under this runtime dir claim, by TAP name.
#[derive(Debug, Default)]
pub struct Claims {
    by_tap: HashMap<String, Claim>,
    /// Why claims could not be (fully) read: the runtime dir is root's, so without root doctor
    /// cannot tell a dead job's TAP from a ready one.
    unreadable: Option<String>,
}

/// The part of a job's `state.json` doctor needs. Deliberately lenient (unknown fields are
/// ignored): the claim is the `tap` field, whatever else a newer launch records.
#[derive(Deserialize)]
struct StateClaim {
    schema: u32,
    tap: String,
}

impl Claims {
    /// Read the run dirs and probe the job locks. Read here rather than in `Facts::gather`
    /// because only `net.taps` needs them, and only when a `chv-*` TAP exists: on a host
    /// without VMs this costs nothing.
    pub fn read(ctx: &Context) -> Claims {
        let mut claims = Claims::default();
        let dir = runtime_dir(ctx);
        let entries = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return claims,
            Err(e) => {
                claims.unreadable = Some(format!("{}: {e}", dir.display()));
                return claims;
            }
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if validate_job_id(&name).is_err() || !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let state = e.path().join("state.json");
            let claim = match fs::read(&state) {
                Ok(bytes) => serde_json::from_slice::<StateClaim>(&bytes).ok(),
                // No state yet: the job has not created its TAP either (state comes first).
                Err(err) if err.kind() == io::ErrorKind::NotFound => None,
                Err(err) => {
                    claims.unreadable = Some(format!("{}: {err}", state.display()));
                    None
                }
            };
            let Some(claim) = claim.filter(|c| c.schema == STATE_SCHEMA) else {
                continue;
            };
            let lock = dir.join(format!("{name}.lock"));
            let alive = lock_held(&lock).unwrap_or_else(|e| {
                claims.unreadable = Some(format!("{}: {e}", lock.display()));
                true
            });
            claims.by_tap.insert(claim.tap, Claim { job: name, alive });
        }
        claims
    }

    pub fn get(&self, tap: &str) -> Option<&Claim> {
        self.by_tap.get(tap)
    }
}

/// Whether someone holds the job's lock (a missing lock file: nobody), probed with a shared,
/// non-blocking `flock` on a read-only descriptor: nothing is created or written, and a launch
/// of the same job starting at this very instant waits the probe out (its `acquire_lock`
/// retries, as it does for gc and `vm ls`). Reading /proc/locks instead would not touch the
/// lock, but it takes the kernel's file-lock rwsem for writing: an RCU grace period per read
/// (3 ms more wall time per doctor run, measured) that also stalls every `flock` on the host.
fn lock_held(path: &Path) -> io::Result<bool> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    match Flock::lock(file, FlockArg::LockSharedNonblock) {
        // Dropping the probe's lock releases it at once.
        Ok(_probe) => Ok(false),
        Err((_, Errno::EWOULDBLOCK)) => Ok(true),
        Err((_, e)) => Err(e.into()),
    }
}

/// Whether a process holds the TAP. Its carrier follows its file descriptors (on at attach,
/// off when the last closes) whatever its admin state; multi-queue TAPs also report attached
/// queues.
fn held(t: &Link) -> bool {
    match (t.tun.as_ref().and_then(|x| x.num_queues), t.carrier) {
        (Some(n), _) => n > 0,
        (None, Some(c)) => c,
        (None, None) => t.lower_up,
    }
}

/// The TAPs, sorted into what each deserves.
#[derive(Default)]
struct Sorted {
    /// Held but not usable (not on the bridge, or down): a running VM without network. FAIL.
    broken: Vec<String>,
    broken_fix: Vec<String>,
    /// Claimed by a job that is gone. WARN.
    orphaned: Vec<String>,
    /// Names of the orphaned TAPs nothing holds (`ip link del` is enough for those).
    orphaned_free: Vec<String>,
    /// An orphaned TAP is still held: the dead job's VMM runs on, and only gc stops it.
    orphaned_held: bool,
    /// Not held and not ready (detached or down), claimed by no gone job. WARN.
    idle: Vec<String>,
    idle_fix: Vec<String>,
    /// On the bridge, up, held. PASS.
    in_service: Vec<String>,
    /// On the bridge, up, not held yet. PASS.
    ready: Vec<String>,
}

impl Sorted {
    fn orphaned_fix(&self) -> Vec<String> {
        if self.orphaned_held {
            // gc stops the VMM a dead job left running, then removes every dead job's TAP.
            vec!["chvkit gc".to_string()]
        } else {
            self.orphaned_free
                .iter()
                .map(|t| format!("ip link del {t}"))
                .collect()
        }
    }
}

/// Sentences joined by a space, empty ones left out.
fn sentences(parts: &[&str]) -> String {
    parts
        .iter()
        .filter(|p| !p.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(" ")
}

impl Net<'_> {
    pub fn taps(&self) -> Finding {
        let (s, b) = or_finding!(self.bridge_found(ID));
        let taps: Vec<&Link> = s
            .links
            .iter()
            .filter(|l| l.name.starts_with(TAP_PREFIX) && l.index != b.index)
            .collect();
        let claims = if taps.is_empty() {
            Claims::default()
        } else {
            Claims::read(self.ctx)
        };
        self.judge_taps(s, b, &taps, &claims)
    }

    /// The verdict on `taps` given the job claims: no I/O, so unit tests can give it any.
    fn judge_taps(&self, s: &NetSnapshot, b: &Link, taps: &[&Link], claims: &Claims) -> Finding {
        let br = self.br;
        let foreign: Vec<&str> = s
            .ports_of(b.index)
            .filter(|l| !l.name.starts_with(TAP_PREFIX))
            .map(|l| l.name.as_str())
            .collect();
        let foreign_note = if foreign.is_empty() {
            String::new()
        } else {
            format!("Other ports of {br}: {}.", foreign.join(", "))
        };
        if taps.is_empty() {
            return Finding::pass(
                ID,
                "no chv-* TAPs",
                sentences(&["No VM is attached.", &foreign_note]),
            );
        }
        let mut v = Sorted::default();
        for t in taps {
            let held = held(t);
            let mut state = Vec::new();
            if t.master != Some(b.index) {
                state.push(match t.master.and_then(|m| s.link_by_index(m)) {
                    Some(m) => format!("on {} instead of {br}", m.name),
                    None => format!("not on {br}"),
                });
            }
            if !t.admin_up {
                state.push("down".to_string());
            }
            let attach = format!("ip link set {0} master {br} && ip link set {0} up", t.name);
            if let Some(c) = claims.get(&t.name).filter(|c| !c.alive) {
                if held {
                    v.orphaned_held = true;
                    v.orphaned.push(format!(
                        "{} (job {} is gone, a process still holds the TAP)",
                        t.name, c.job
                    ));
                } else {
                    v.orphaned_free.push(t.name.clone());
                    v.orphaned.push(format!(
                        "{} (job {} is gone, nothing holds it)",
                        t.name, c.job
                    ));
                }
            } else if held && !state.is_empty() {
                v.broken.push(format!("{} ({})", t.name, state.join(", ")));
                v.broken_fix.push(attach);
            } else if !state.is_empty() {
                state.push("no process holds it".to_string());
                v.idle.push(format!("{} ({})", t.name, state.join(", ")));
                // Attaching is the fix that loses nothing: a pre-created TAP becomes ready, a
                // forgotten one a harmless port without carrier (the detail offers deletion).
                v.idle_fix.push(attach);
            } else if held {
                let isolated = match t.bridge_port.as_ref().and_then(|p| p.isolated) {
                    Some(true) => ", isolated",
                    _ => "",
                };
                v.in_service.push(format!("{}{isolated}", t.name));
            } else {
                v.ready.push(t.name.clone());
            }
        }
        let in_service = if v.in_service.is_empty() {
            String::new()
        } else {
            format!("In service: {}.", v.in_service.join(", "))
        };
        let ready = if v.ready.is_empty() {
            String::new()
        } else {
            let unsure = claims
                .unreadable
                .as_ref()
                .map(|e| {
                    format!(
                        " Job records could not be read ({e}), so a TAP that a chvkit job which is \
                         gone left on {br} looks the same (run doctor as root to tell them apart)."
                    )
                })
                .unwrap_or_default();
            format!(
                "Ready, not yet held by a VM: {}. A TAP is attached and brought up before its \
                 VM starts, and has carrier once the VMM holds it.{unsure}",
                v.ready.join(", ")
            )
        };
        let orphaned_fix = v.orphaned_fix();
        if !v.broken.is_empty() {
            return Finding::fail(
                ID,
                format!("VM TAP(s) not usable: {}", v.broken.join("; ")),
                sentences(&[
                    &format!(
                        "A running VM's TAP must be a port of {br} and up, or the guest has no \
                         network."
                    ),
                    &in_service,
                    &ready,
                    &foreign_note,
                ]),
                [v.broken_fix, orphaned_fix, v.idle_fix]
                    .concat()
                    .join(" && "),
            );
        }
        if !v.orphaned.is_empty() || !v.idle.is_empty() {
            let mut summary = Vec::new();
            let mut why = Vec::new();
            if !v.orphaned.is_empty() {
                summary.push(format!("TAP(s) left behind: {}", v.orphaned.join("; ")));
                why.push(
                    "Left behind: the chvkit job that created the TAP has ended (its run dir \
                     names the TAP and nobody holds the job's lock). `chvkit gc` removes what \
                     dead jobs left: TAPs, VMMs still running, sockets, run dirs.",
                );
            }
            if !v.idle.is_empty() {
                summary.push(format!("TAP(s) not ready for a VM: {}", v.idle.join("; ")));
                why.push(
                    "Not ready: a VM started on a TAP that is detached or down has no network \
                     (a TAP must be a port of the bridge and up before the VMM opens it). The \
                     fix attaches it; if nothing will use it, `ip link del NAME` removes it \
                     instead.",
                );
            }
            let mut parts: Vec<&str> = why;
            parts.extend([in_service.as_str(), ready.as_str(), foreign_note.as_str()]);
            return Finding::warn(
                ID,
                summary.join("; "),
                sentences(&parts),
                [orphaned_fix, v.idle_fix].concat().join(" && "),
            );
        }
        let mut summary = Vec::new();
        if !v.in_service.is_empty() {
            summary.push(format!(
                "{} TAP(s) on {br}, up and held by a process",
                v.in_service.len()
            ));
        }
        if !v.ready.is_empty() {
            summary.push(format!(
                "{} on {br} and up, ready for a VM (not yet held)",
                v.ready.join(", ")
            ));
        }
        Finding::pass(
            ID,
            summary.join("; "),
            sentences(&[&in_service, &ready, &foreign_note]),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::facts::Facts;
    use crate::doctor::report::Level;
    use crate::host::net::OperState;

    const BR: u32 = 1;

    fn link(name: &str, index: u32, master: Option<u32>, up: bool, held: bool) -> Link {
        Link {
            index,
            name: name.into(),
            kind: Some(if index == BR { "bridge" } else { "tun" }.into()),
            admin_up: up,
            lower_up: up && held,
            loopback: false,
            oper_state: OperState::Unknown,
            carrier: Some(held),
            master,
            port_kind: master.map(|_| "bridge".into()),
            mac: None,
            mtu: None,
            bridge_port: None,
            tun: None,
            ipv6: vec![],
        }
    }

    /// Judge `taps` (the bridge chvbr0 is added) against `claims`.
    fn judge(taps: Vec<Link>, claims: &[(&str, &str, bool)], unreadable: bool) -> Finding {
        let ctx = Context {
            profile: crate::profile::Profile::load(None).unwrap(),
            profile_source: "test".into(),
            root: crate::paths::Root::new(None),
        };
        let facts = Facts::gather(&ctx, 0);
        let mut links = vec![link("chvbr0", BR, None, true, true)];
        links.extend(taps);
        let s = NetSnapshot {
            links,
            routes: vec![],
        };
        let claims = Claims {
            by_tap: claims
                .iter()
                .map(|(tap, job, alive)| {
                    (
                        tap.to_string(),
                        Claim {
                            job: job.to_string(),
                            alive: *alive,
                        },
                    )
                })
                .collect(),
            unreadable: unreadable.then(|| "/run/chvkit: Permission denied".to_string()),
        };
        let taps: Vec<&Link> = s.links.iter().skip(1).collect();
        Net::new(&ctx, &facts).judge_taps(&s, &s.links[0], &taps, &claims)
    }

    #[test]
    fn verdicts() {
        let on = |n: &str, i: u32, held: bool| link(n, i, Some(BR), true, held);
        // The seed's pre-created TAP, and chvkit's between attach and VMM start: ready.
        let f = judge(vec![on("chv-a", 2, false)], &[], false);
        assert_eq!(f.level, Level::Pass, "{f:?}");
        assert!(
            f.summary.contains("chv-a") && f.summary.contains("ready"),
            "{f:?}"
        );
        // A live job's TAP, not held yet: ready as well.
        let f = judge(
            vec![on("chv-a", 2, false), on("chv-b", 3, true)],
            &[("chv-a", "j1", true)],
            false,
        );
        assert_eq!(f.level, Level::Pass, "{f:?}");
        assert!(f.summary.contains("1 TAP(s)") && f.detail.contains("In service: chv-b"));
        // Without the job records, a ready TAP is still PASS, and the detail says what is unsure.
        let f = judge(vec![on("chv-a", 2, false)], &[], true);
        assert_eq!(f.level, Level::Pass, "{f:?}");
        assert!(f.detail.contains("Permission denied"), "{f:?}");
        // Detached or down, nobody holding it: WARN, and the fix attaches it.
        for t in [
            link("chv-a", 2, None, true, false),
            link("chv-a", 2, Some(BR), false, false),
        ] {
            let f = judge(vec![t], &[], false);
            assert_eq!(f.level, Level::Warn, "{f:?}");
            assert_eq!(
                f.hint.as_deref(),
                Some("ip link set chv-a master chvbr0 && ip link set chv-a up")
            );
        }
        // A gone job's TAP: left behind, whether ready or not.
        let f = judge(
            vec![on("chv-a", 2, false)],
            &[("chv-a", "j1", false)],
            false,
        );
        assert_eq!(f.level, Level::Warn, "{f:?}");
        assert!(f.summary.contains("left behind") && f.summary.contains("j1"));
        assert_eq!(f.hint.as_deref(), Some("ip link del chv-a"));
        // ... and when its VMM still holds it, only gc (which stops that VMM) fixes it.
        let f = judge(
            vec![on("chv-a", 2, true), on("chv-b", 3, false)],
            &[("chv-a", "j1", false), ("chv-b", "j2", false)],
            false,
        );
        assert_eq!(f.level, Level::Warn, "{f:?}");
        assert_eq!(f.hint.as_deref(), Some("chvkit gc"));
        // A held TAP that is not usable stays a FAIL, and its hint fixes the rest too.
        let f = judge(
            vec![
                link("chv-a", 2, Some(BR), false, true),
                link("chv-b", 3, None, true, false),
            ],
            &[],
            false,
        );
        assert_eq!(f.level, Level::Fail, "{f:?}");
        assert_eq!(
            f.hint.as_deref(),
            Some(
                "ip link set chv-a master chvbr0 && ip link set chv-a up && \
                 ip link set chv-b master chvbr0 && ip link set chv-b up"
            )
        );
    }

    #[test]
    fn lock_liveness() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("j.lock");
        // No lock file: nobody.
        assert!(!lock_held(&p).unwrap());
        assert!(!p.exists(), "the probe creates nothing");
        // The supervisor's lock, as launch takes it.
        let l = crate::launch::rundir::JobLock::try_acquire(&p)
            .unwrap()
            .unwrap();
        assert!(lock_held(&p).unwrap());
        drop(l);
        assert!(!lock_held(&p).unwrap());
        // The probe released its own lock: launch can take it right after.
        assert!(crate::launch::rundir::JobLock::try_acquire(&p)
            .unwrap()
            .is_some());
    }
}
