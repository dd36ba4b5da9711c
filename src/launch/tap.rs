//! TAP devices for guests: created persistent by chvkit, attached to the bridge as an isolated
//! port and brought up before the VMM opens them (facts §2: the VMM then needs no
//! CAP_NET_ADMIN, and reuses the TAP with an "already exists" warning).
//!
//! Single queue (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`): Cloud Hypervisor's default `num_queues`
//! is 2, one RX/TX pair, and a TAP created multi-queue would then fail to open.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::io::AsRawFd;

use futures::TryStreamExt;
use rtnetlink::packet_route::link::{
    InfoBridgePort, InfoPortData, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::{LinkBridgePort, LinkUnspec};

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("cannot open /dev/net/tun: {0}")]
    Tun(#[source] io::Error),
    #[error("TAP {name} is already in use by {holder}")]
    Busy { name: String, holder: String },
    #[error("cannot create TAP {name}: {source}")]
    Create {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "bridge {0} does not exist in this network namespace (run `chvkit setup`, or pass the right --bridge)"
    )]
    NoBridge(String),
    #[error("{0} exists but is not a bridge")]
    NotBridge(String),
    #[error("netlink: {what} {name}: {detail}")]
    Netlink {
        what: &'static str,
        name: String,
        detail: String,
    },
    #[error("netlink runtime: {0}")]
    Runtime(#[source] io::Error),
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

nix::ioctl_write_ptr_bad!(tunsetiff, 0x4004_54ca, IfReq);
nix::ioctl_write_int_bad!(tunsetpersist, 0x4004_54cb);

fn ifreq(name: &str, flags: libc::c_int) -> IfReq {
    let mut r = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: flags as libc::c_short,
        _pad: [0; 22],
    };
    let n = name.len().min(libc::IFNAMSIZ - 1);
    r.name[..n].copy_from_slice(&name.as_bytes()[..n]);
    r
}

/// Create (or take over an unheld leftover) persistent TAP `name`. A TAP held by a running
/// process fails with [`TapError::Busy`] naming the holder.
pub fn create_persistent(name: &str) -> Result<(), TapError> {
    create_persistent_held(name).map(drop)
}

/// [`create_persistent`], returning the descriptor still attached to the TAP. Closing it
/// detaches the queue, and the kernel waits for an RCU grace period then (`synchronize_net`
/// in tun's detach): from 0.05 ms to several ms on a busy host. It must be closed before the
/// VMM opens the TAP (EBUSY otherwise: the TAP has a single queue).
pub fn create_persistent_held(name: &str) -> Result<fs::File, TapError> {
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(TapError::Tun)?;
    let req = ifreq(name, libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR);
    // SAFETY: `req` is a valid ifreq for the duration of the call.
    if let Err(e) = unsafe { tunsetiff(tun.as_raw_fd(), &req) } {
        if e == nix::errno::Errno::EBUSY {
            return Err(TapError::Busy {
                name: name.to_string(),
                holder: describe_holders(name),
            });
        }
        return Err(TapError::Create {
            name: name.to_string(),
            source: e.into(),
        });
    }
    // SAFETY: plain integer ioctl on the tun fd.
    unsafe { tunsetpersist(tun.as_raw_fd(), 1) }.map_err(|e| TapError::Create {
        name: name.to_string(),
        source: e.into(),
    })?;
    Ok(tun)
}

/// Processes holding TAP `name` open: `(pid, command)` from `/proc/*/fdinfo` (`iff:` lines of
/// tun file descriptors).
pub fn holders(name: &str) -> Vec<(i32, String)> {
    let mut out = Vec::new();
    let Ok(procs) = fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(fds) = fs::read_dir(p.path().join("fdinfo")) else {
            continue;
        };
        let held = fds.flatten().any(|fd| {
            fs::read_to_string(fd.path())
                .map(|t| {
                    t.lines()
                        .any(|l| l.strip_prefix("iff:").map(str::trim) == Some(name))
                })
                .unwrap_or(false)
        });
        if held {
            out.push((pid, process_name(pid)));
        }
    }
    out
}

/// `comm` and the command line of a process, for messages.
pub fn process_name(pid: i32) -> String {
    let cmd = fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|c| *c == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    let mut cmd = cmd;
    if cmd.len() > 160 {
        cmd.truncate(160);
        cmd.push('…');
    }
    cmd
}

fn describe_holders(name: &str) -> String {
    let h = holders(name);
    if h.is_empty() {
        return "another process (not visible in /proc)".into();
    }
    h.iter()
        .map(|(pid, cmd)| format!("pid {pid} ({cmd})"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Run a netlink conversation on a private single-threaded runtime. No threads outlive it, which
/// matters: `launch --detach` forks afterwards.
fn with_netlink<F, Fut, T>(f: F) -> Result<T, TapError>
where
    F: FnOnce(rtnetlink::Handle) -> Fut,
    Fut: std::future::Future<Output = Result<T, TapError>>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(TapError::Runtime)?;
    rt.block_on(async move {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(TapError::Runtime)?;
        let task = tokio::spawn(conn);
        let r = f(handle).await;
        task.abort();
        r
    })
}

fn nl_err<'n>(what: &'static str, name: &'n str) -> impl FnOnce(rtnetlink::Error) -> TapError + 'n {
    move |e| TapError::Netlink {
        what,
        name: name.to_string(),
        detail: e.to_string(),
    }
}

async fn link_by_name(h: &rtnetlink::Handle, name: &str) -> Result<Option<LinkMessage>, TapError> {
    let mut s = h.link().get().match_name(name.to_string()).execute();
    match s.try_next().await {
        Ok(m) => Ok(m),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(nl_err("get link", name)(e)),
    }
}

fn is_bridge(m: &LinkMessage) -> bool {
    m.attributes.iter().any(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos
            .iter()
            .any(|i| matches!(i, LinkInfo::Kind(k) if k.to_string() == "bridge")),
        _ => false,
    })
}

/// Attach `tap` to `bridge` as an isolated port and bring it up.
pub fn attach_isolated(tap: &str, bridge: &str) -> Result<(), TapError> {
    with_netlink(|h| async move {
        let br = link_by_name(&h, bridge)
            .await?
            .ok_or_else(|| TapError::NoBridge(bridge.to_string()))?;
        if !is_bridge(&br) {
            return Err(TapError::NotBridge(bridge.to_string()));
        }
        let t = link_by_name(&h, tap)
            .await?
            .ok_or_else(|| TapError::Netlink {
                what: "find",
                name: tap.to_string(),
                detail: "the TAP vanished right after it was created".into(),
            })?;
        let idx = t.header.index;
        h.link()
            .set(
                LinkUnspec::new_with_index(idx)
                    .controller(br.header.index)
                    .build(),
            )
            .execute()
            .await
            .map_err(nl_err("attach to bridge", tap))?;
        // Port isolation: isolated ports forward only to non-isolated ones (the bridge itself,
        // i.e. the gateway), never to each other.
        h.link()
            .change(LinkBridgePort::new(idx).isolated(true).build())
            .execute()
            .await
            .map_err(nl_err("set bridge port isolation on", tap))?;
        h.link()
            .set(LinkUnspec::new_with_index(idx).up().build())
            .execute()
            .await
            .map_err(nl_err("set up", tap))?;
        Ok(())
    })
}

/// What the kernel says about a link: exists, its controller's name, isolated, up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkStatus {
    pub controller: Option<String>,
    pub isolated: Option<bool>,
    pub up: bool,
}

pub fn status(name: &str) -> Result<Option<LinkStatus>, TapError> {
    with_netlink(|h| async move {
        let Some(m) = link_by_name(&h, name).await? else {
            return Ok(None);
        };
        let mut controller = None;
        let mut isolated = None;
        for a in &m.attributes {
            match a {
                LinkAttribute::Controller(i) => {
                    let mut s = h.link().get().match_index(*i).execute();
                    if let Ok(Some(c)) = s.try_next().await {
                        controller = c.attributes.iter().find_map(|a| match a {
                            LinkAttribute::IfName(n) => Some(n.clone()),
                            _ => None,
                        });
                    }
                }
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        if let LinkInfo::PortData(InfoPortData::BridgePort(ps)) = i {
                            for p in ps {
                                if let InfoBridgePort::Isolated(v) = p {
                                    isolated = Some(*v);
                                }
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(Some(LinkStatus {
            controller,
            isolated,
            up: m.header.flags.contains(LinkFlags::Up),
        }))
    })
}

/// Delete link `name`; `Ok(false)` if it did not exist.
pub fn delete(name: &str) -> Result<bool, TapError> {
    with_netlink(|h| async move {
        let Some(m) = link_by_name(&h, name).await? else {
            return Ok(false);
        };
        match h.link().del(m.header.index).execute().await {
            Ok(()) => Ok(true),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(false),
            Err(e) => Err(nl_err("delete", name)(e)),
        }
    })
}

/// Names of all links starting with `prefix` in this namespace.
pub fn list_with_prefix(prefix: &str) -> Result<Vec<String>, TapError> {
    with_netlink(|h| async move {
        let mut s = h.link().get().execute();
        let mut out = Vec::new();
        while let Some(m) = s.try_next().await.map_err(nl_err("list", "links"))? {
            for a in &m.attributes {
                if let LinkAttribute::IfName(n) = a {
                    if n.starts_with(prefix) {
                        out.push(n.clone());
                    }
                }
            }
        }
        Ok(out)
    })
}
