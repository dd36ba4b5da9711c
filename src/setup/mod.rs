//! `chvkit setup` and `chvkit teardown`: converge the host to the profile, and undo exactly that.
//!
//! Setup reads the host model (links and addresses over netlink, sysctls from /proc/sys, file
//! hashes, chvkit's own firewall rules), diffs it against the profile into a [`Step`] list —
//! each with what it found and what it will do — and, unless `--dry-run`, applies the steps in
//! order. Steps are ordered so that stopping anywhere leaves a host the next run converges:
//! artifacts first (a bad download changes nothing), the sysctl.d drop-in before the bridge
//! (systemd-sysctl would otherwise undo the bridge's DAD settings), the bridge's sysctls before
//! its address, `accept_ra=2` before forwarding, the nft file before the table it describes.
//! Every change is recorded in `<state_dir>/setup-state.json` as soon as it is made, which is
//! what teardown undoes.

mod artifacts;
mod firewall;
mod netlink;
mod persist;
mod privilege;
mod report;
mod state;
mod sysctl;
mod teardown;

use std::collections::BTreeSet;
use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};

use crate::host::net::{self as hostnet, NetSnapshot};
use crate::host::sysctl::Sysctls;
use crate::lockfile::{self, ArtifactLock, LockedArtifact};
use crate::profile::{FirewallBackend, Profile};
use crate::{exit, fsutil, Context};
use artifacts::{Expected, Fetcher, Location, Source, Spec};
use firewall::{Firewall, Rules};
use report::{ItemReport, Outcome, Report};
use state::{BridgeRecord, FirewallRecord, SetupState};
use sysctl::Key;

pub use teardown::run_teardown;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FirewallArg {
    Nftables,
    Iptables,
}

impl From<FirewallArg> for FirewallBackend {
    fn from(f: FirewallArg) -> Self {
        match f {
            FirewallArg::Nftables => FirewallBackend::Nftables,
            FirewallArg::Iptables => FirewallBackend::Iptables,
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct SetupArgs {
    /// Print the plan (what was found, what would change) and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the result as JSON on stdout (a `changed` count and one entry per item).
    #[arg(long)]
    pub json: bool,
    /// Take the artifacts from a mirror URL or a local directory instead of their profile URLs.
    /// Each is looked up under the last path segment of its URL and still checked against its
    /// pin or lock-file hash.
    #[arg(long, value_name = "URL|DIR")]
    pub artifacts_from: Option<String>,
    /// Firewall backend, overriding the profile's `network.firewall`.
    #[arg(long, value_enum)]
    pub firewall: Option<FirewallArg>,
    /// Configure only the network (bridge, sysctls, firewall, boot-time files); no downloads.
    #[arg(long, alias = "skip-artifacts", conflicts_with = "artifacts_only")]
    pub network_only: bool,
    /// Install only the artifacts (needs no CAP_NET_ADMIN; with --root, no root at all).
    #[arg(long)]
    pub artifacts_only: bool,
}

#[derive(Debug, clap::Args)]
pub struct TeardownArgs {
    /// Print what would be removed or restored, and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Leave the installed binary and firmware (and their lock-file entries) in place.
    #[arg(long)]
    pub keep_artifacts: bool,
}

/// Everything derived from the profile and flags before looking at the host.
struct Opts<'a> {
    ctx: &'a Context,
    profile: &'a Profile,
    backend: FirewallBackend,
    backend_overridden: bool,
    rules: Rules,
    source: Source,
    state_path: PathBuf,
    lock_path: PathBuf,
    do_artifacts: bool,
    do_network: bool,
}

impl<'a> Opts<'a> {
    fn new(ctx: &'a Context, a: &SetupArgs) -> Opts<'a> {
        let p = &ctx.profile;
        let backend = a.firewall.map(Into::into).unwrap_or(p.network.firewall);
        Opts {
            ctx,
            profile: p,
            backend,
            backend_overridden: backend != p.network.firewall,
            rules: rules_of(p),
            source: a
                .artifacts_from
                .as_deref()
                .map(Source::parse)
                .unwrap_or(Source::Profile),
            state_path: SetupState::path(p, &ctx.root),
            lock_path: ArtifactLock::path(p, &ctx.root),
            do_artifacts: !a.network_only,
            do_network: !a.artifacts_only,
        }
    }

    fn host_path(&self, p: &Path) -> PathBuf {
        self.ctx.root.path(p)
    }
}

/// The profile's firewall rules. The API port is always allowed when the API listens on an
/// address inside the guest prefix: guests must reach it, whatever `host_ports` lists.
fn rules_of(p: &Profile) -> Rules {
    let mut ports: BTreeSet<u16> = p.network.host_ports.iter().copied().collect();
    if let Some(host) = url_host_v6(&p.network.api_url.0) {
        if p.network.prefix.contains(host) {
            ports.insert(p.network.api_url.port());
        }
    }
    Rules {
        bridge: p.network.bridge.0.clone(),
        prefix: p.network.prefix,
        nat: p.network.nat,
        host_ports: ports.into_iter().collect(),
        table: p.network.nft_table.0.clone(),
    }
}

fn url_host_v6(url: &str) -> Option<Ipv6Addr> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split('/').next()?;
    let inner = authority.strip_prefix('[')?.split(']').next()?;
    inner.parse().ok()
}

/// One planned item: what was found and, if the host differs from the profile, what to do.
struct Step {
    id: &'static str,
    found: String,
    action: Option<String>,
    op: Op,
}

enum Op {
    None,
    Artifact {
        spec: Spec,
        loc: Location,
        expected: Option<Expected>,
        existing: Option<String>,
    },
    Chmod {
        dest: PathBuf,
    },
    SetCap {
        dest: PathBuf,
    },
    File {
        host_path: PathBuf,
        content: String,
        mode: u32,
    },
    Symlink {
        host_path: PathBuf,
        target: PathBuf,
    },
    RemoveFile {
        host_path: PathBuf,
    },
    CreateBridge,
    Sysctls(Vec<(Key, String)>),
    BridgeAddr {
        stale: Vec<(Ipv6Addr, u8)>,
    },
    BridgeUp,
    Firewall {
        switch_from: Option<FirewallRecord>,
    },
    GuestKernel(crate::kernel::Request),
}

pub fn run_setup(ctx: &Context, a: SetupArgs) -> anyhow::Result<i32> {
    finish(ctx, "setup", a.dry_run, a.json, setup(ctx, &a))
}

/// Print the report of `command` and turn it into the exit code. With `--json` an error that
/// stopped the command before its items also comes out as a report.
fn finish(
    ctx: &Context,
    command: &'static str,
    dry_run: bool,
    json: bool,
    result: anyhow::Result<Report>,
) -> anyhow::Result<i32> {
    let report = match result {
        Ok(report) => report,
        Err(e) if json => {
            let mut r = new_report(ctx, command, dry_run);
            r.fail(format!("{e:#}"));
            r
        }
        Err(e) => return Err(e),
    };
    report.print(json).context("writing the report")?;
    Ok(if report.ok { exit::OK } else { exit::FAILURE })
}

fn new_report(ctx: &Context, command: &'static str, dry_run: bool) -> Report {
    let root = match ctx.root.prefix() {
        Some(r) => r.display().to_string(),
        None => "/".into(),
    };
    let dry = if dry_run { " --dry-run" } else { "" };
    Report::new(
        command,
        dry_run,
        SetupState::path(&ctx.profile, &ctx.root)
            .display()
            .to_string(),
        format!(
            "chvkit {command}{dry}: profile {}, root {root}",
            ctx.profile_source
        ),
    )
}

fn setup(ctx: &Context, a: &SetupArgs) -> anyhow::Result<Report> {
    let o = Opts::new(ctx, a);
    if !a.dry_run {
        check_privileges(&o)?;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let state_host = o.profile.paths.state_dir.as_path().join(state::FILE_NAME);
    let new_dirs = missing_dirs(&ctx.root, &state_host);
    let _dir_lock = if a.dry_run {
        None
    } else {
        Some(lock_state_dir(&o.state_path)?)
    };
    let mut st = SetupState::load(&o.state_path)?.unwrap_or_default();
    if !a.dry_run {
        st.record_dirs(new_dirs);
    }
    let lock = ArtifactLock::load(&o.lock_path)?;
    let mut fw = firewall::driver(o.backend);
    if o.do_network && !a.dry_run {
        fw.preflight().with_context(|| {
            format!(
                "the {} firewall backend is not usable, so nothing was changed",
                firewall::backend_name(o.backend)
            )
        })?;
    }
    let steps = plan(&o, &st, lock.as_ref(), fw.as_mut())?;
    let mut report = new_report(ctx, "setup", a.dry_run);
    if a.dry_run {
        for s in steps {
            report.push_skipped(ItemReport::new(s.id, s.found, s.action), Outcome::Planned);
        }
        return Ok(report);
    }
    let mut ap = Applier {
        o: &o,
        rt: &rt,
        nl: netlink::Netlink::new(&rt),
        lock: lock.unwrap_or_default(),
        fetcher: Fetcher::new(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        fw,
    };
    let mut failed = false;
    for s in steps {
        let mut item = ItemReport::new(s.id, s.found.clone(), s.action.clone());
        if failed {
            report.push_skipped(item, Outcome::NotRun);
            continue;
        }
        if s.action.is_some() {
            let r = ap.apply(&s, &mut st);
            // Whatever happened, what exists now is on disk before the next step.
            let saved = st.save(&o.state_path);
            match (r, saved) {
                (Ok(detail), Ok(_)) => {
                    item.result = Outcome::Changed;
                    item.detail = Some(detail);
                }
                (Err(e), _) => {
                    item.result = Outcome::Failed;
                    item.detail = Some(format!("{e:#}"));
                    let next = format!(
                        "What was done before it is recorded in {}; fix the cause and run \
                         setup again (it picks up from here), or run `chvkit teardown` to \
                         undo it.",
                        o.state_path.display()
                    );
                    report.fail(format!("setup stopped at {}: {e:#}\n{next}", s.id));
                    report.human_tail = Some(format!("setup stopped at {}. {next}", s.id));
                    failed = true;
                }
                (Ok(_), Err(e)) => {
                    item.result = Outcome::Failed;
                    item.detail = Some(e.to_string());
                    report.fail(format!("setup stopped at {}: {e}", s.id));
                    failed = true;
                }
            }
        }
        report.push(item);
    }
    if !failed {
        st.save(&o.state_path)?;
    }
    Ok(report)
}

/// Say which privilege is missing before anything changes.
fn check_privileges(o: &Opts) -> anyhow::Result<()> {
    let uid = privilege::uid();
    if o.do_network && !privilege::has_cap(privilege::CAP_NET_ADMIN) {
        bail!(
            "setup needs CAP_NET_ADMIN to configure the network (bridge {}, IPv6 sysctls, {} \
             firewall) and this process (uid {uid}) does not have it: run it as root{}. \
             Nothing was changed.",
            o.rules.bridge,
            firewall::backend_name(o.backend),
            if o.do_artifacts {
                ", or pass --artifacts-only to install just the artifacts"
            } else {
                ""
            }
        );
    }
    let p = o.profile;
    let mut files: Vec<&Path> = vec![o.state_path.as_path()];
    let host_paths: Vec<PathBuf>;
    if o.do_artifacts {
        files.push(o.lock_path.as_path());
        host_paths = vec![
            o.host_path(p.cloud_hypervisor.install_path.as_path()),
            o.host_path(p.firmware.path.as_path()),
        ];
        files.extend(host_paths.iter().map(PathBuf::as_path));
        if p.cloud_hypervisor.setcap_net_admin && !privilege::has_cap(privilege::CAP_SETFCAP) {
            bail!(
                "the profile asks for cap_net_admin on {} (cloud_hypervisor.setcap_net_admin), \
                 which needs CAP_SETFCAP, and this process (uid {uid}) does not have it: run \
                 setup as root. Nothing was changed.",
                p.cloud_hypervisor.install_path
            );
        }
    }
    let net_files: Vec<PathBuf>;
    if o.do_network {
        net_files = vec![
            o.host_path(p.paths.sysctl_file.as_path()),
            o.host_path(p.paths.nft_file.as_path()),
            o.host_path(p.paths.unit_file.as_path()),
        ];
        files.extend(net_files.iter().map(PathBuf::as_path));
    }
    for f in files {
        if let Err(why) = privilege::can_write(f) {
            bail!(
                "setup cannot write {}: {why} (uid {uid}). Run it as root, or pass --root DIR \
                 to install under a directory you own. Nothing was changed.",
                f.display()
            );
        }
    }
    Ok(())
}

/// One setup or teardown at a time: an exclusive flock on the state directory (a lock on the
/// directory itself writes nothing).
pub(crate) fn lock_state_dir(
    state_path: &Path,
) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    use nix::fcntl::{Flock, FlockArg};
    let dir = state_path.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the state directory {}", dir.display()))?;
    let f = std::fs::File::open(dir)
        .with_context(|| format!("cannot open the state directory {}", dir.display()))?;
    Flock::lock(f, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        anyhow::anyhow!(
            "another chvkit setup or teardown holds {} ({errno}); wait for it to finish",
            dir.display()
        )
    })
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(12)]
}

fn artifact_specs(o: &Opts) -> Vec<Spec> {
    let p = o.profile;
    vec![
        Spec {
            key: lockfile::CLOUD_HYPERVISOR,
            label: format!("cloud-hypervisor {}", p.cloud_hypervisor.version),
            url: p.cloud_hypervisor.url.clone(),
            pin: p.cloud_hypervisor.sha256.as_ref().map(|s| s.0.clone()),
            host_path: p.cloud_hypervisor.install_path.0.clone(),
            dest: o.host_path(p.cloud_hypervisor.install_path.as_path()),
        },
        Spec {
            key: lockfile::FIRMWARE,
            label: format!("hypervisor-fw {}", p.firmware.version),
            url: p.firmware.url.clone(),
            pin: p.firmware.sha256.as_ref().map(|s| s.0.clone()),
            host_path: p.firmware.path.0.clone(),
            dest: o.host_path(p.firmware.path.as_path()),
        },
    ]
}

fn plan(
    o: &Opts,
    st: &SetupState,
    lock: Option<&ArtifactLock>,
    fw: &mut dyn Firewall,
) -> anyhow::Result<Vec<Step>> {
    let mut steps = Vec::new();
    if o.do_artifacts {
        plan_artifacts(o, lock, &mut steps);
        // After the other artifacts: it updates the lock file itself.
        plan_kernel(o, &mut steps);
    }
    if o.do_network {
        plan_network(o, st, fw, &mut steps)?;
    }
    Ok(steps)
}

fn plan_artifacts(o: &Opts, lock: Option<&ArtifactLock>, steps: &mut Vec<Step>) {
    for spec in artifact_specs(o) {
        let id = if spec.key == lockfile::CLOUD_HYPERVISOR {
            "chv.binary"
        } else {
            "firmware.file"
        };
        // A lock entry vouches only for the same URL installed at the same path.
        let locked = lock
            .and_then(|l| l.artifacts.get(spec.key))
            .filter(|e| e.url == spec.url.0 && e.path == spec.host_path);
        let expected = spec
            .pin
            .clone()
            .map(Expected::Pin)
            .or_else(|| locked.map(|e| Expected::Lock(e.sha256.clone())));
        let (existing, read_err) = match artifacts::sha256_file(&spec.dest) {
            Ok(s) => (s, None),
            Err(e) => (None, Some(e)),
        };
        let loc = o.source.locate(&spec);
        let dest = spec.dest.display().to_string();
        let record_note = if expected.is_none() {
            format!(
                "; no sha256 pin exists, so record its hash in {}",
                o.lock_path.display()
            )
        } else {
            String::new()
        };
        let verify = match &expected {
            Some(e) => format!("check sha256 {} ({})", short(e.sha()), e.origin()),
            None => "hash it".to_string(),
        };
        let fetch = format!("fetch {loc}, {verify}, install mode 0755{record_note}");
        let (found, action, op) = match (&existing, &expected) {
            (None, _) => (
                match read_err {
                    Some(e) => format!("cannot read {dest}: {e}"),
                    None => format!("{dest} absent"),
                },
                Some(fetch),
                None,
            ),
            (Some(have), Some(want)) if have == want.sha() => {
                let mode = std::fs::metadata(&spec.dest)
                    .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o7777)
                    .unwrap_or(0);
                let found = format!("{dest}: sha256 {} matches {}", short(have), want.origin());
                if mode & 0o777 == 0o755 {
                    (found, None, Some(Op::None))
                } else {
                    (
                        format!("{found}, but mode is {mode:04o}"),
                        Some("set mode 0755".to_string()),
                        Some(Op::Chmod {
                            dest: spec.dest.clone(),
                        }),
                    )
                }
            }
            (Some(have), Some(want)) => (
                format!(
                    "{dest}: sha256 {have}, expected {} ({})",
                    want.sha(),
                    want.origin()
                ),
                Some(fetch),
                None,
            ),
            (Some(have), None) => (
                format!(
                    "{dest} present (sha256 {}) but nothing to check it against: no pin, no \
                     lock-file entry",
                    short(have)
                ),
                Some(fetch),
                None,
            ),
        };
        let will_install = op.is_none();
        let op = op.unwrap_or(Op::Artifact {
            spec: spec.clone(),
            loc,
            expected,
            existing,
        });
        steps.push(Step {
            id,
            found,
            action,
            op,
        });
        if spec.key == lockfile::CLOUD_HYPERVISOR && o.profile.cloud_hypervisor.setcap_net_admin {
            let has = !will_install && artifacts::has_cap_net_admin(&spec.dest).unwrap_or(false);
            steps.push(Step {
                id: "chv.setcap",
                found: if will_install {
                    "binary is being (re)installed, which drops file capabilities".into()
                } else if has {
                    format!("{dest} has cap_net_admin+ep")
                } else {
                    format!("{dest} lacks cap_net_admin+ep")
                },
                action: (!has).then(|| format!("set cap_net_admin+ep on {dest}")),
                op: Op::SetCap { dest: spec.dest },
            });
        }
    }
}

/// The guest kernel, as `chvkit kernel` provides it (the same code); `kernel.source: none`
/// leaves it to each launch.
fn plan_kernel(o: &Opts, steps: &mut Vec<Step>) {
    use crate::kernel;
    let req = kernel::Request::from_profile(o.ctx);
    if req.source == crate::profile::KernelSource::None {
        return;
    }
    let (found, action) = match kernel::describe_inputs(o.ctx, &req) {
        Ok((key, origin)) => match kernel::up_to_date(o.ctx, &key) {
            Some(rec) => (
                format!(
                    "{} installed from {} and intact",
                    o.host_path(&rec.vmlinux).display(),
                    rec.origin
                ),
                None,
            ),
            None => (
                format!("no guest kernel from {origin} installed"),
                Some(match req.source {
                    crate::profile::KernelSource::Build => format!(
                        "build the guest kernel from {origin} (minutes the first time; cached by \
                         recipe hash) and install it"
                    ),
                    s => format!("install the guest kernel from {origin} ({})", s.as_str()),
                }),
            ),
        },
        // Planning cannot see it (e.g. no kernel source yet): applying says exactly why.
        Err(e) => (
            format!("cannot tell: {e}"),
            Some(format!(
                "provide the guest kernel ({})",
                req.source.as_str()
            )),
        ),
    };
    steps.push(Step {
        id: "kernel.guest",
        found,
        action,
        op: Op::GuestKernel(req),
    });
}

fn file_step(o: &Opts, id: &'static str, host_path: &Path, content: String, what: &str) -> Step {
    let path = o.host_path(host_path);
    let (found, action) = match std::fs::read(&path) {
        Ok(cur) if cur == content.as_bytes() => (format!("{} up to date", path.display()), None),
        Ok(_) => (
            format!("{} differs from what the profile gives", path.display()),
            Some(format!("rewrite {} ({what})", path.display())),
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (
            format!("{} absent", path.display()),
            Some(format!("write {} ({what})", path.display())),
        ),
        Err(e) => (
            format!("cannot read {}: {e}", path.display()),
            Some(format!("write {} ({what})", path.display())),
        ),
    };
    Step {
        id,
        found,
        action,
        op: Op::File {
            host_path: host_path.to_path_buf(),
            content,
            mode: 0o644,
        },
    }
}

fn plan_network(
    o: &Opts,
    st: &SetupState,
    fw: &mut dyn Firewall,
    steps: &mut Vec<Step>,
) -> anyhow::Result<()> {
    let p = o.profile;
    let br = o.rules.bridge.as_str();
    let gw = p.network.gateway;
    let len = p.network.prefix.len;
    if let Some(b) = st.bridge.as_ref().filter(|b| b.name != br) {
        bail!(
            "an earlier setup configured bridge {} and the profile now names {br}; run \
             `chvkit teardown` first (it works from the recorded state, whatever the profile \
             says), then setup again. Nothing was changed.",
            b.name
        );
    }
    let snap = NetSnapshot::read().context("cannot read the network links")?;
    let sys = Sysctls::new();
    let bridge = snap.link(br);
    if let Some(l) = bridge {
        if !l.is_bridge() {
            bail!(
                "a link named {br} exists but is {}, not a bridge; chvkit will not touch it \
                 (remove it, or set another network.bridge in the profile). Nothing was changed.",
                l.kind
                    .as_deref()
                    .map(|k| format!("a {k} link"))
                    .unwrap_or_else(|| "a device without a link kind".into())
            );
        }
    }

    // Uplinks whose SLAAC default route would vanish with forwarding on. Ones chvkit already
    // switched to 2 stay on the list, so the drop-in stays the same on every run.
    let mut uplinks: BTreeSet<String> = snap
        .links
        .iter()
        .filter(|l| !l.loopback && l.name != br && l.master.is_none())
        .filter(|l| sys.ipv6_conf(&l.name).accept_ra == Some(1))
        .map(|l| l.name.clone())
        .collect();
    for r in &st.sysctls {
        if let Some(iface) = r.key.iface() {
            if r.key.0.ends_with("/accept_ra") && snap.link(iface).is_some() {
                uplinks.insert(iface.to_string());
            }
        }
    }
    // The kernel skips DAD only when both `all` and the interface have accept_dad < 1
    // (addrconf_dad_begin), so `all` goes to 0 as well. That changes nothing for interfaces
    // whose own accept_dad is still 1.
    let dad_keys = [
        (Key::ipv6_conf("all", "accept_dad"), "0".to_string()),
        (Key::ipv6_conf(br, "accept_dad"), "0".to_string()),
        (Key::ipv6_conf(br, "dad_transmits"), "0".to_string()),
    ];
    let ra_keys: Vec<(Key, String)> = uplinks
        .iter()
        .map(|i| (Key::ipv6_conf(i, "accept_ra"), "2".to_string()))
        .collect();
    let fwd_key = (Key::ipv6_conf("all", "forwarding"), "1".to_string());
    let mut entries: Vec<(Key, String)> = dad_keys.to_vec();
    entries.extend(ra_keys.iter().cloned());
    entries.push(fwd_key.clone());
    steps.push(file_step(
        o,
        "persist.sysctl",
        p.paths.sysctl_file.as_path(),
        persist::sysctl_file(br, &entries),
        "sysctl.d drop-in, before the bridge exists",
    ));

    // The bridge.
    steps.push(Step {
        id: "net.bridge",
        found: match bridge {
            Some(l) => format!("bridge {br} exists (index {})", l.index),
            None => format!("no link named {br}"),
        },
        action: bridge
            .is_none()
            .then(|| format!("create bridge {br}, down until its address is in place")),
        op: Op::CreateBridge,
    });

    let conf = bridge.map(|_| sys.ipv6_conf(br));
    let all_dad = sys.ipv6_conf("all").accept_dad;
    let mut dad_todo: Vec<(Key, String)> = Vec::new();
    if all_dad != Some(0) {
        dad_todo.push(dad_keys[0].clone());
    }
    match &conf {
        None => dad_todo.extend(dad_keys[1..].iter().cloned()),
        Some(c) => {
            if c.accept_dad != Some(0) {
                dad_todo.push(dad_keys[1].clone());
            }
            if c.dad_transmits != Some(0) {
                dad_todo.push(dad_keys[2].clone());
            }
        }
    }
    steps.push(Step {
        id: "net.dad",
        found: match &conf {
            None => format!("all.accept_dad={}; {br} absent", opt(all_dad)),
            Some(c) => format!(
                "all.accept_dad={}, {br}.accept_dad={}, {br}.dad_transmits={}",
                opt(all_dad),
                opt(c.accept_dad),
                opt(c.dad_transmits)
            ),
        },
        action: (!dad_todo.is_empty()).then(|| {
            format!(
                "set {} before adding the address",
                dad_todo
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }),
        op: Op::Sysctls(dad_todo),
    });

    let want = format!("{gw}/{len}");
    let (addr_found, addr_action, stale) = match bridge {
        None => (
            format!("{br} absent"),
            Some(format!("add {want} nodad")),
            vec![],
        ),
        Some(l) => match l.ipv6.iter().find(|a| a.addr == gw) {
            Some(a) if a.prefix_len == len && a.usable() => {
                (format!("{want} on {br}, usable"), None, vec![])
            }
            Some(a) => (
                format!(
                    "{}/{} on {br} [{}]",
                    a.addr,
                    a.prefix_len,
                    a.flag_names().join(",")
                ),
                Some(format!("replace it with {want} nodad")),
                vec![(a.addr, a.prefix_len)],
            ),
            None => (
                format!("{want} not on {br}"),
                Some(format!("add {want} nodad")),
                vec![],
            ),
        },
    };
    steps.push(Step {
        id: "net.bridge_addr",
        found: addr_found,
        action: addr_action,
        op: Op::BridgeAddr { stale },
    });

    let up = bridge.is_some_and(|l| l.admin_up);
    steps.push(Step {
        id: "net.bridge_up",
        found: match bridge {
            None => format!("{br} absent"),
            Some(_) if up => format!("{br} is up"),
            Some(_) => format!("{br} is down"),
        },
        action: (!up).then(|| format!("bring {br} up")),
        op: Op::BridgeUp,
    });

    let ra_todo: Vec<(Key, String)> = ra_keys
        .iter()
        .filter(|(k, _)| {
            k.iface()
                .is_some_and(|i| sys.ipv6_conf(i).accept_ra == Some(1))
        })
        .cloned()
        .collect();
    steps.push(Step {
        id: "net.accept_ra",
        found: if uplinks.is_empty() {
            "no interface relies on accept_ra=1".into()
        } else {
            uplinks
                .iter()
                .map(|i| format!("{i}: accept_ra={}", opt(sys.ipv6_conf(i).accept_ra)))
                .collect::<Vec<_>>()
                .join(", ")
        },
        action: (!ra_todo.is_empty()).then(|| {
            format!(
                "set accept_ra=2 on {} so they keep router advertisements with forwarding on",
                ra_todo
                    .iter()
                    .filter_map(|(k, _)| k.iface())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }),
        op: Op::Sysctls(ra_todo),
    });

    let fwd = sys.ipv6_conf("all").forwarding;
    steps.push(Step {
        id: "net.forwarding",
        found: format!("net.ipv6.conf.all.forwarding={}", opt(fwd)),
        action: (fwd != Some(1)).then(|| "set net.ipv6.conf.all.forwarding=1".to_string()),
        op: Op::Sysctls(if fwd != Some(1) {
            vec![fwd_key]
        } else {
            vec![]
        }),
    });

    let nft_file = p.paths.nft_file.as_path();
    if let Some(script) = fw.persist_script(&o.rules) {
        steps.push(file_step(
            o,
            "persist.nft",
            nft_file,
            script,
            "the table as an nft script; `nft -f` on it replaces the table",
        ));
    } else if st.files.iter().any(|f| f == nft_file) && o.host_path(nft_file).exists() {
        steps.push(Step {
            id: "persist.nft",
            found: format!(
                "{} left from an earlier setup with nftables",
                o.host_path(nft_file).display()
            ),
            action: Some(format!(
                "remove {} (the {} backend does not use it)",
                o.host_path(nft_file).display(),
                firewall::backend_name(o.backend)
            )),
            op: Op::RemoveFile {
                host_path: nft_file.to_path_buf(),
            },
        });
    }

    // Rules recorded under another backend or table name are removed before the new ones go
    // in: a host never keeps two sets of chvkit rules.
    let recorded = st.firewall.as_ref();
    let stale = |r: &&FirewallRecord| match r {
        FirewallRecord::Nftables { table, .. } => {
            o.backend != FirewallBackend::Nftables || *table != o.rules.table
        }
        FirewallRecord::Iptables { .. } => o.backend != FirewallBackend::Iptables,
    };
    let switch_from = recorded.filter(stale).cloned();
    let same = recorded.filter(|r| !stale(r));
    let insp = match fw.inspect(&o.rules, same) {
        Ok(i) => i,
        Err(e) => firewall::Inspection {
            found: format!("cannot inspect: {e}"),
            up_to_date: false,
        },
    };
    let mut found = insp.found;
    if let Some(old) = &switch_from {
        let what = match old {
            FirewallRecord::Nftables { family, table, .. } => {
                format!("nftables table {family} {table}")
            }
            FirewallRecord::Iptables { .. } => "ip6tables chains".to_string(),
        };
        found.push_str(&format!(
            "; an earlier setup loaded {what} (it will be removed)"
        ));
    }
    let ports = if o.rules.host_ports.is_empty() {
        "no ports".to_string()
    } else {
        o.rules
            .host_ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    let describe = fw.describe(&o.rules);
    steps.push(Step {
        id: "net.firewall",
        found,
        action: (!insp.up_to_date || switch_from.is_some()).then(|| {
            format!(
                "replace {describe} in one transaction: {}forward from {br} and \
                 related/established back to it; from {br} to the host only ICMPv6, \
                 established flows and tcp/udp {ports}",
                if o.rules.nat {
                    format!(
                        "masquerade {} leaving by any link but {br}; ",
                        o.rules.prefix
                    )
                } else {
                    "no NAT (nat: false); ".to_string()
                }
            )
        }),
        op: Op::Firewall { switch_from },
    });

    let exe = std::env::current_exe().context("cannot find chvkit's own path for the unit")?;
    let exe = std::fs::canonicalize(&exe).unwrap_or(exe);
    let profile = if o.ctx.profile_source == crate::profile::DEFAULT_PROFILE_NAME {
        None
    } else {
        let pth = PathBuf::from(&o.ctx.profile_source);
        Some(std::fs::canonicalize(&pth).unwrap_or(pth))
    };
    let cmd = persist::UnitCommand {
        chvkit: exe,
        profile,
        firewall: o
            .backend_overridden
            .then(|| firewall::backend_name(o.backend)),
    };
    let desc = format!(
        "chvkit guest network (bridge {br}, {}, {})",
        o.rules.prefix,
        fw.describe(&o.rules)
    );
    let unit = p.paths.unit_file.as_path();
    steps.push(file_step(
        o,
        "persist.unit",
        unit,
        persist::unit_file(&desc, &cmd),
        "systemd oneshot that re-applies the network at boot",
    ));
    if let Some(link) = persist::wants_link(unit) {
        let at = o.host_path(&link);
        let ok = std::fs::read_link(&at).is_ok_and(|t| t == unit);
        steps.push(Step {
            id: "persist.unit_enabled",
            found: if ok {
                format!("{} -> {}", at.display(), unit.display())
            } else {
                format!("{} absent or pointing elsewhere", at.display())
            },
            action: (!ok).then(|| {
                format!(
                    "link {} -> {} (what `systemctl enable` does)",
                    at.display(),
                    unit.display()
                )
            }),
            op: Op::Symlink {
                host_path: link,
                target: unit.to_path_buf(),
            },
        });
    }
    Ok(())
}

fn opt(v: Option<i64>) -> String {
    v.map(|x| x.to_string()).unwrap_or_else(|| "absent".into())
}

struct Applier<'a> {
    o: &'a Opts<'a>,
    rt: &'a tokio::runtime::Runtime,
    nl: netlink::Netlink<'a>,
    lock: ArtifactLock,
    fetcher: Fetcher,
    fw: Box<dyn Firewall>,
}

impl Applier<'_> {
    fn bridge_index(&self) -> anyhow::Result<u32> {
        let br = &self.o.rules.bridge;
        match hostnet::link_by_name(br).context("cannot read the network links")? {
            Some(l) => Ok(l.index),
            None => bail!("bridge {br} does not exist"),
        }
    }

    fn apply(&mut self, s: &Step, st: &mut SetupState) -> anyhow::Result<String> {
        let br = self.o.rules.bridge.clone();
        match &s.op {
            Op::None => Ok(s.found.clone()),
            Op::Artifact {
                spec,
                loc,
                expected,
                existing,
            } => self.install(st, spec, loc, expected.as_ref(), existing.as_deref()),
            Op::Chmod { dest } => {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(dest, std::fs::Permissions::from_mode(0o755))
                    .with_context(|| format!("cannot chmod {}", dest.display()))?;
                Ok(format!("{}: mode set to 0755", dest.display()))
            }
            Op::GuestKernel(req) => {
                let host_dir = crate::kernel::installed::host_dir(self.o.profile);
                st.record_dirs(missing_dirs(&self.o.ctx.root, &host_dir.join("x")));
                let p = crate::kernel::provide(self.o.ctx, req)?;
                // `provide` wrote the lock file itself: later steps must not save a stale copy.
                self.lock = ArtifactLock::load(&self.o.lock_path)?.unwrap_or_default();
                let rec = &p.installed;
                if p.changed {
                    st.artifacts.insert(
                        crate::kernel::LOCK_KERNEL.to_string(),
                        state::InstalledArtifact {
                            path: rec.vmlinux.clone(),
                            sha256: rec.vmlinux_sha256.clone(),
                        },
                    );
                    match (&rec.initramfs, &rec.initramfs_sha256) {
                        (Some(path), Some(sha)) => {
                            st.artifacts.insert(
                                crate::kernel::LOCK_INITRAMFS.to_string(),
                                state::InstalledArtifact {
                                    path: path.clone(),
                                    sha256: sha.clone(),
                                },
                            );
                        }
                        _ => {
                            st.artifacts.remove(crate::kernel::LOCK_INITRAMFS);
                        }
                    }
                }
                Ok(format!(
                    "{} from {} ({}, {:.1} s); launch boots it with `{}`",
                    self.o.host_path(&rec.vmlinux).display(),
                    rec.origin,
                    if p.built {
                        "built"
                    } else if p.changed {
                        "installed"
                    } else {
                        "already there"
                    },
                    p.seconds,
                    p.cmdline
                ))
            }
            Op::SetCap { dest } => {
                if artifacts::has_cap_net_admin(dest).unwrap_or(false) {
                    return Ok(format!("{} already has cap_net_admin+ep", dest.display()));
                }
                artifacts::set_cap_net_admin(dest).with_context(|| {
                    format!("cannot set cap_net_admin+ep on {}", dest.display())
                })?;
                Ok(format!("{}: cap_net_admin+ep set", dest.display()))
            }
            Op::File {
                host_path,
                content,
                mode,
            } => {
                let path = self.o.host_path(host_path);
                st.record_dirs(missing_dirs(&self.o.ctx.root, host_path));
                if std::fs::read(&path).ok().as_deref() != Some(content.as_bytes()) {
                    fsutil::write_atomic(&path, content.as_bytes(), *mode)
                        .with_context(|| format!("cannot write {}", path.display()))?;
                }
                st.record_file(host_path);
                Ok(format!("wrote {}", path.display()))
            }
            Op::Symlink { host_path, target } => {
                let path = self.o.host_path(host_path);
                st.record_dirs(missing_dirs(&self.o.ctx.root, host_path));
                symlink_atomic(target, &path)
                    .with_context(|| format!("cannot create the symlink {}", path.display()))?;
                st.record_file(host_path);
                Ok(format!("{} -> {}", path.display(), target.display()))
            }
            Op::RemoveFile { host_path } => {
                let path = self.o.host_path(host_path);
                remove_if_exists(&path)?;
                st.files.retain(|f| f != host_path);
                Ok(format!("removed {}", path.display()))
            }
            Op::CreateBridge => {
                self.nl.create_bridge(&br)?;
                st.bridge = Some(BridgeRecord {
                    name: br.clone(),
                    created: true,
                    address_added: None,
                });
                Ok(format!("created bridge {br}"))
            }
            Op::Sysctls(list) => {
                let mut done = Vec::new();
                for (k, v) in list {
                    let prev = sysctl::read(k)?.ok_or_else(|| {
                        anyhow::anyhow!("sysctl {k} does not exist ({})", k.proc_path().display())
                    })?;
                    if &prev != v {
                        sysctl::write(k, v)?;
                        st.record_sysctl(k, &prev, v);
                    }
                    done.push(format!("{k}={v} (was {prev})"));
                }
                Ok(format!("set {}", done.join(", ")))
            }
            Op::BridgeAddr { stale } => {
                let idx = self.bridge_index()?;
                let gw = self.o.profile.network.gateway;
                let len = self.o.profile.network.prefix.len;
                for (a, l) in stale {
                    self.nl.del_addr(idx, &br, *a, *l)?;
                }
                self.nl.add_addr_nodad(idx, &br, gw, len)?;
                if !st.bridge.as_ref().is_some_and(|b| b.created) {
                    st.bridge = Some(BridgeRecord {
                        name: br.clone(),
                        created: false,
                        address_added: Some(format!("{gw}/{len}")),
                    });
                }
                Ok(format!("added {gw}/{len} to {br} (nodad)"))
            }
            Op::BridgeUp => {
                let idx = self.bridge_index()?;
                self.nl.set_up(idx, &br)?;
                Ok(format!("{br} is up"))
            }
            Op::Firewall { switch_from } => {
                if let Some(old) = switch_from {
                    let mut d = firewall::driver(firewall::record_backend(old));
                    d.remove(old)?;
                    st.firewall = None;
                }
                let rec = self.fw.apply(&self.o.rules)?;
                st.firewall = Some(rec);
                Ok(format!(
                    "loaded {} (one transaction; other tables untouched)",
                    self.fw.describe(&self.o.rules)
                ))
            }
        }
    }

    fn install(
        &mut self,
        st: &mut SetupState,
        spec: &Spec,
        loc: &Location,
        expected: Option<&Expected>,
        existing: Option<&str>,
    ) -> anyhow::Result<String> {
        st.record_dirs(missing_dirs(&self.o.ctx.root, &spec.host_path));
        let got = self
            .fetcher
            .install(self.rt, spec, loc, expected, existing)?;
        let mut detail = if got.written {
            format!(
                "installed {} from {loc} ({} bytes, sha256 {}, {} ms)",
                spec.dest.display(),
                got.bytes,
                got.sha256,
                got.elapsed.as_millis()
            )
        } else {
            format!(
                "{} already held exactly these bytes (sha256 {}); left as it was",
                spec.dest.display(),
                got.sha256
            )
        };
        if expected.is_none() {
            let entry = LockedArtifact {
                url: spec.url.0.clone(),
                path: spec.host_path.clone(),
                sha256: got.sha256.clone(),
                installed_at: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
            };
            self.lock.artifacts.insert(spec.key.to_string(), entry);
            self.lock.save(&self.o.lock_path)?;
            detail.push_str(&format!(
                ". No sha256 pin exists for {}: recorded sha256 {} in {}; later runs verify \
                 the installed file against it",
                spec.label,
                got.sha256,
                self.o.lock_path.display()
            ));
        }
        if got.written {
            st.artifacts.insert(
                spec.key.to_string(),
                state::InstalledArtifact {
                    path: spec.host_path.clone(),
                    sha256: got.sha256,
                },
            );
        }
        Ok(detail)
    }
}

/// Host-path ancestors of `host_path`'s directory that do not exist under the root yet:
/// the directories a write is about to create, recorded so teardown can remove them.
/// `Ok(false)` when there was nothing to remove.
fn remove_if_exists(p: &Path) -> anyhow::Result<bool> {
    match std::fs::remove_file(p) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("cannot remove {}", p.display())),
    }
}

pub(crate) fn missing_dirs(root: &crate::paths::Root, host_path: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = host_path
        .ancestors()
        .skip(1)
        .filter(|a| a.parent().is_some())
        .filter(|a| !root.path(a).exists())
        .map(Path::to_path_buf)
        .collect();
    v.reverse();
    v
}

/// Create or replace a symlink atomically (new link under a temp name, then rename).
fn symlink_atomic(target: &Path, at: &Path) -> std::io::Result<()> {
    if std::fs::read_link(at).is_ok_and(|t| t == target) {
        return Ok(());
    }
    let dir = at.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut rnd = [0u8; 6];
    getrandom::fill(&mut rnd).map_err(|e| std::io::Error::other(e.to_string()))?;
    let tmp = dir.join(format!(".chvkit-link-{}", hex::encode(rnd)));
    std::os::unix::fs::symlink(target, &tmp)?;
    if let Err(e) = std::fs::rename(&tmp, at) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_port_is_always_allowed_inside_the_prefix() {
        let mut p = Profile::embedded().unwrap();
        p.network.host_ports = vec![];
        assert_eq!(rules_of(&p).host_ports, vec![8080]);
        p.network.host_ports = vec![9000, 8080, 9000];
        assert_eq!(rules_of(&p).host_ports, vec![8080, 9000]);
        p.network.api_url = "http://[2001:db8::1]:7000".parse().unwrap();
        p.network.host_ports = vec![];
        assert!(rules_of(&p).host_ports.is_empty());
    }

    #[test]
    fn url_host() {
        assert_eq!(
            url_host_v6("http://[fdcd::1]:8080/x"),
            Some("fdcd::1".parse().unwrap())
        );
        assert_eq!(url_host_v6("http://example.org:8080"), None);
    }

    #[test]
    fn symlink_replaced_atomically() {
        let d = tempfile::tempdir().unwrap();
        let at = d.path().join("w/x.service");
        symlink_atomic(Path::new("/etc/a"), &at).unwrap();
        symlink_atomic(Path::new("/etc/b"), &at).unwrap();
        assert_eq!(std::fs::read_link(&at).unwrap(), PathBuf::from("/etc/b"));
        assert_eq!(std::fs::read_dir(d.path().join("w")).unwrap().count(), 1);
    }
}
