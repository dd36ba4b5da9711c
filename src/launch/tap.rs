//! TAP devices for guests: created persistent by chvkit, attached to the bridge as an isolated
//! port and brought up before the VMM opens them (facts §2: the VMM then needs no
//! CAP_NET_ADMIN, and reuses the TAP with an "already exists" warning).
//!
//! Single queue (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`): Cloud Hypervisor's default `num_queues`
//! is 2, one RX/TX pair, and a TAP created multi-queue would then fail to open.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::io::AsRawFd;

use rtnetlink::packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NlasIterator, NLM_F_ACK, NLM_F_DUMP,
    NLM_F_REQUEST,
};
use rtnetlink::packet_route::link::{
    InfoBridgePort, InfoPortData, InfoPortKind, LinkAttribute, LinkExtentMask, LinkFlags, LinkInfo,
    LinkMessage,
};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::sys::Socket;

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
    #[error("cannot open a netlink socket: {0}")]
    Socket(#[source] io::Error),
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

nix::ioctl_write_ptr_bad!(tunsetiff, 0x4004_54ca, IfReq);
nix::ioctl_write_int_bad!(tunsetpersist, 0x4004_54cb);
nix::ioctl_write_int_bad!(tunsetowner, 0x4004_54cc);
nix::ioctl_write_int_bad!(tunsetgroup, 0x4004_54ce);

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
///
/// The descriptor that made it is closed on return: the TAP has a single queue, which the VMM
/// opens later. The close waits for an RCU grace period (`synchronize_net` in tun's detach):
/// from 0.05 ms to several ms on a busy host.
pub fn create_persistent(name: &str) -> Result<(), TapError> {
    open_persistent(name, None).map(drop)
}

/// [`create_persistent`], owned by `owner` (uid, gid: `TUNSETOWNER`/`TUNSETGROUP`), so that a
/// VMM running as that uid, without CAP_NET_ADMIN, may attach to it.
pub fn create_persistent_owned(name: &str, owner: Option<(u32, u32)>) -> Result<(), TapError> {
    open_persistent(name, owner).map(drop)
}

/// [`create_persistent`], keeping the descriptor that holds the TAP's queue.
fn open_persistent(name: &str, owner: Option<(u32, u32)>) -> Result<fs::File, TapError> {
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
    if let Some((uid, gid)) = owner {
        // SAFETY: plain integer ioctls on the tun fd.
        unsafe {
            tunsetowner(tun.as_raw_fd(), uid as libc::c_int)
                .and_then(|_| tunsetgroup(tun.as_raw_fd(), gid as libc::c_int))
        }
        .map_err(|e| TapError::Create {
            name: name.to_string(),
            source: e.into(),
        })?;
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

/// A synchronous `NETLINK_ROUTE` socket for the few requests a TAP needs. No async runtime:
/// on the launch path, building one (epoll, a signal pipe) and driving five request/response
/// round trips through it cost more than the kernel's own work.
struct Rtnl {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

/// `nlmsghdr` fields of one received message, and its payload.
struct Reply<'a> {
    kind: u16,
    seq: u32,
    payload: &'a [u8],
    /// The whole message, header included.
    raw: &'a [u8],
}

const NLMSG_ERROR: u16 = 2;
/// Ends a dump (which gets no acknowledgement), with an errno of its own.
const NLMSG_DONE: u16 = 3;
const RTM_NEWLINK: u16 = 16;
/// `IFLA_LINKINFO`, and in it `IFLA_INFO_KIND` (linux/if_link.h).
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
/// `sizeof(struct ifinfomsg)`.
const IFINFOMSG_LEN: usize = 16;
/// Receive buffer for requests about one link.
const SMALL_REPLIES: usize = 16 * 1024;

impl Rtnl {
    /// `buf`: the receive buffer's size, enough for the largest datagram expected (a single
    /// link with statistics skipped is a few KiB; a dump's datagrams stay under 32 KiB).
    fn open(buf: usize) -> Result<Rtnl, TapError> {
        Ok(Rtnl {
            socket: crate::host::net::route_socket().map_err(TapError::Socket)?,
            seq: 0,
            buf: vec![0u8; buf],
        })
    }

    /// Send `msgs` in one datagram, each asking for an acknowledgement (a dump ends with
    /// NLMSG_DONE instead); `on_reply` sees every other message that answers them. Returns each request's outcome: `Ok` or the kernel's errno. The
    /// kernel handles the requests in order and goes on after a failed one, so every request
    /// is answered.
    fn exchange(
        &mut self,
        what: &'static str,
        name: &str,
        msgs: Vec<(u16, RouteNetlinkMessage)>,
        mut on_reply: impl FnMut(&Reply<'_>),
    ) -> Result<Vec<Result<(), i32>>, TapError> {
        let io_err = |e: io::Error| TapError::Netlink {
            what,
            name: name.to_string(),
            detail: e.to_string(),
        };
        let first = self.seq.wrapping_add(1);
        let n = msgs.len();
        let mut out = Vec::new();
        for (flags, m) in msgs.into_iter() {
            self.seq = self.seq.wrapping_add(1);
            let mut header = NetlinkHeader::default();
            header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
            header.sequence_number = self.seq;
            let mut req = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(m));
            req.finalize();
            let at = out.len();
            out.resize(at + req.buffer_len(), 0);
            req.serialize(&mut out[at..]);
            out.resize((out.len() + 3) & !3, 0);
        }
        self.socket.send(&out, 0).map_err(io_err)?;
        let mut acks: Vec<Option<Result<(), i32>>> = vec![None; n];
        while acks.iter().any(Option::is_none) {
            let len = match self.socket.recv(&mut &mut self.buf[..], 0) {
                Ok(len) => len,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err(e)),
            };
            for b in crate::host::net::messages(&self.buf[..len]) {
                let b = b.map_err(|mlen| TapError::Netlink {
                    what,
                    name: name.to_string(),
                    detail: format!("malformed reply (message length {mlen})"),
                })?;
                let r = Reply {
                    kind: u16::from_ne_bytes([b[4], b[5]]),
                    seq: u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
                    payload: &b[16..],
                    raw: b,
                };
                let i = r.seq.wrapping_sub(first) as usize;
                if i >= n {
                    continue;
                }
                if (r.kind == NLMSG_ERROR || r.kind == NLMSG_DONE) && r.payload.len() >= 4 {
                    let code = i32::from_ne_bytes([
                        r.payload[0],
                        r.payload[1],
                        r.payload[2],
                        r.payload[3],
                    ]);
                    acks[i] = Some(if code == 0 { Ok(()) } else { Err(-code) });
                } else {
                    on_reply(&r);
                }
            }
        }
        Ok(acks.into_iter().flatten().collect())
    }

    /// Index and kind (`IFLA_INFO_KIND`) of link `name`; `None` if there is none.
    fn link(&mut self, name: &str) -> Result<Option<(u32, Option<String>)>, TapError> {
        let mut found = None;
        let r = self.exchange(
            "get link",
            name,
            vec![(0, RouteNetlinkMessage::GetLink(link_get(Some(name))))],
            |r| {
                if r.kind == RTM_NEWLINK && r.payload.len() >= IFINFOMSG_LEN {
                    let p = r.payload;
                    let index = u32::from_ne_bytes([p[4], p[5], p[6], p[7]]);
                    found = Some((index, link_kind(&p[IFINFOMSG_LEN..])));
                }
            },
        )?;
        match r.first() {
            Some(Err(e)) if *e == libc::ENODEV => Ok(None),
            Some(Err(e)) => Err(kernel_err("get link", name, *e)),
            _ => Ok(found),
        }
    }

    /// The full message of link `name` (for reports, not the launch path).
    fn link_message(&mut self, name: &str) -> Result<Option<LinkMessage>, TapError> {
        let req = RouteNetlinkMessage::GetLink(link_get(Some(name)));
        match self.link_messages("get link", name, req, 0)? {
            Ok(mut v) => Ok(v.pop()),
            Err(e) if e == libc::ENODEV => Ok(None),
            Err(e) => Err(kernel_err("get link", name, e)),
        }
    }

    /// The links a get request (or dump) answers with, or the kernel's errno.
    fn link_messages(
        &mut self,
        what: &'static str,
        name: &str,
        req: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Result<Vec<LinkMessage>, i32>, TapError> {
        let mut links = Vec::new();
        let r = self.exchange(what, name, vec![(flags, req)], |r| {
            if r.kind != RTM_NEWLINK {
                return;
            }
            if let Ok(NetlinkMessage {
                payload: NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(m)),
                ..
            }) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(r.raw)
            {
                links.push(m);
            }
        })?;
        Ok(match r.first() {
            Some(Err(e)) => Err(*e),
            _ => Ok(links),
        })
    }
}

/// A link request by name (`None`: all links, for a dump), statistics skipped.
fn link_get(name: Option<&str>) -> LinkMessage {
    let mut m = LinkMessage::default();
    if let Some(n) = name {
        m.attributes.push(LinkAttribute::IfName(n.to_string()));
    }
    m.attributes
        .push(LinkAttribute::ExtMask(vec![LinkExtentMask::SkipStats]));
    m
}

/// `IFLA_INFO_KIND` from a link message's attributes, read in place (the full parse of a
/// bridge's attributes is most of the cost of looking one up).
fn link_kind(attrs: &[u8]) -> Option<String> {
    let info = NlasIterator::new(attrs)
        .flatten()
        .find(|a| a.kind() == IFLA_LINKINFO)?;
    let kind = NlasIterator::new(info.value())
        .flatten()
        .find(|a| a.kind() == IFLA_INFO_KIND)?;
    let v = kind.value();
    let v = v.strip_suffix(&[0]).unwrap_or(v);
    Some(String::from_utf8_lossy(v).into_owned())
}

fn kernel_err(what: &'static str, name: &str, errno: i32) -> TapError {
    TapError::Netlink {
        what,
        name: name.to_string(),
        detail: io::Error::from_raw_os_error(errno).to_string(),
    }
}

/// Index of link `name` by `SIOCGIFINDEX` on the netlink socket (no reply to parse).
fn ifindex(rt: &Rtnl, name: &str) -> io::Result<u32> {
    #[repr(C)]
    struct IfReqIndex {
        name: [u8; libc::IFNAMSIZ],
        index: libc::c_int,
        _pad: [u8; 20],
    }
    let mut r = IfReqIndex {
        name: [0; libc::IFNAMSIZ],
        index: 0,
        _pad: [0; 20],
    };
    let n = name.len().min(libc::IFNAMSIZ - 1);
    r.name[..n].copy_from_slice(&name.as_bytes()[..n]);
    // SAFETY: SIOCGIFINDEX reads and writes a `struct ifreq`, which IfReqIndex lays out.
    let rc = unsafe { libc::ioctl(rt.socket.as_raw_fd(), libc::SIOCGIFINDEX, &mut r) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r.index as u32)
}

/// Attach `tap` to `bridge` as an isolated port and bring it up: the bridge looked up, then
/// two requests in one datagram — controller set; port isolation on and up in one message
/// (the kernel applies a link's port data before its flags, and port data only once it has a
/// controller, hence two).
pub fn attach_isolated(tap: &str, bridge: &str) -> Result<(), TapError> {
    let mut rt = Rtnl::open(SMALL_REPLIES)?;
    let (br, kind) = rt
        .link(bridge)?
        .ok_or_else(|| TapError::NoBridge(bridge.to_string()))?;
    if kind.as_deref() != Some("bridge") {
        return Err(TapError::NotBridge(bridge.to_string()));
    }
    let idx = ifindex(&rt, tap).map_err(|e| TapError::Netlink {
        what: "find",
        name: tap.to_string(),
        detail: if e.raw_os_error() == Some(libc::ENODEV) {
            "the TAP vanished right after it was created".into()
        } else {
            e.to_string()
        },
    })?;
    let mut attach = LinkMessage::default();
    attach.header.index = idx;
    attach.attributes.push(LinkAttribute::Controller(br));
    // Port isolation: isolated ports forward only to non-isolated ones (the bridge itself,
    // i.e. the gateway), never to each other. Up only once isolated.
    let mut isolate_up = LinkMessage::default();
    isolate_up.header.index = idx;
    isolate_up.header.flags = LinkFlags::Up;
    isolate_up.header.change_mask = LinkFlags::Up;
    isolate_up.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::PortKind(InfoPortKind::Bridge),
        LinkInfo::PortData(InfoPortData::BridgePort(vec![InfoBridgePort::Isolated(
            true,
        )])),
    ]));
    let r = rt.exchange(
        "attach to bridge",
        tap,
        vec![
            (0, RouteNetlinkMessage::NewLink(attach)),
            (0, RouteNetlinkMessage::NewLink(isolate_up)),
        ],
        |_| {},
    )?;
    if let Some(Err(e)) = r.first() {
        return Err(kernel_err("attach to bridge", tap, *e));
    }
    if let Some(Err(e)) = r.get(1) {
        return Err(kernel_err("set bridge port isolation on and up", tap, *e));
    }
    Ok(())
}

/// What the kernel says about a link: exists, its controller's name, isolated, up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkStatus {
    pub controller: Option<String>,
    pub isolated: Option<bool>,
    pub up: bool,
}

pub fn status(name: &str) -> Result<Option<LinkStatus>, TapError> {
    let mut rt = Rtnl::open(SMALL_REPLIES)?;
    let Some(m) = rt.link_message(name)? else {
        return Ok(None);
    };
    let mut controller = None;
    let mut isolated = None;
    for a in &m.attributes {
        match a {
            LinkAttribute::Controller(i) => {
                let mut get = link_get(None);
                get.header.index = *i;
                controller = rt
                    .link_messages("get link", name, RouteNetlinkMessage::GetLink(get), 0)?
                    .ok()
                    .and_then(|mut v| v.pop())
                    .and_then(|c| {
                        c.attributes.into_iter().find_map(|a| match a {
                            LinkAttribute::IfName(n) => Some(n),
                            _ => None,
                        })
                    });
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
}

/// Delete link `name`; `Ok(false)` if it did not exist.
pub fn delete(name: &str) -> Result<bool, TapError> {
    let mut rt = Rtnl::open(SMALL_REPLIES)?;
    let mut del = LinkMessage::default();
    del.attributes.push(LinkAttribute::IfName(name.to_string()));
    let r = rt.exchange(
        "delete",
        name,
        vec![(0, RouteNetlinkMessage::DelLink(del))],
        |_| {},
    )?;
    match r.first() {
        Some(Err(e)) if *e == libc::ENODEV => Ok(false),
        Some(Err(e)) => Err(kernel_err("delete", name, *e)),
        _ => Ok(true),
    }
}

/// Names of all links starting with `prefix` in this namespace.
pub fn list_with_prefix(prefix: &str) -> Result<Vec<String>, TapError> {
    let mut rt = Rtnl::open(64 * 1024)?;
    let links = rt
        .link_messages(
            "list",
            "links",
            RouteNetlinkMessage::GetLink(link_get(None)),
            NLM_F_DUMP,
        )?
        .map_err(|e| kernel_err("list", "links", e))?;
    Ok(links
        .into_iter()
        .flat_map(|m| m.attributes)
        .filter_map(|a| match a {
            LinkAttribute::IfName(n) if n.starts_with(prefix) => Some(n),
            _ => None,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::process::Command;

    /// Run `f` on a thread of its own in a fresh network namespace (namespaces are per
    /// thread: the rest of the test process stays where it is, and the namespace with every
    /// link in it goes away when the thread ends, whatever happened in it).
    fn in_private_netns(test: &str, f: impl FnOnce() + Send + 'static) -> bool {
        // SAFETY: geteuid has no arguments.
        if unsafe { libc::geteuid() } != 0 {
            crate::testutil::skip(test, "needs root (a network namespace, TAPs)");
            return false;
        }
        if !Path::new("/dev/net/tun").exists() {
            crate::testutil::skip(test, "no /dev/net/tun");
            return false;
        }
        let r = std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
            f();
        })
        .join();
        if let Err(e) = r {
            std::panic::resume_unwind(e);
        }
        true
    }

    fn ip(args: &str) {
        // Spawned from the namespaced thread, `ip` runs in its namespace.
        let o = Command::new("ip").args(args.split(' ')).output().unwrap();
        assert!(o.status.success(), "ip {args}: {o:?}");
    }

    fn ip_out(args: &str) -> String {
        let o = Command::new("ip").args(args.split(' ')).output().unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    #[test]
    fn link_kind_reads_the_info_kind_in_place() {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName("br0".into()));
        m.attributes
            .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
                rtnetlink::packet_route::link::InfoKind::Bridge,
            )]));
        let msg = RouteNetlinkMessage::NewLink(m);
        let mut nl =
            NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::InnerMessage(msg));
        nl.finalize();
        let mut buf = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut buf);
        assert_eq!(
            link_kind(&buf[16 + IFINFOMSG_LEN..]).as_deref(),
            Some("bridge")
        );
        assert_eq!(link_kind(&[]), None);
        // A truncated attribute is no kind, not a panic.
        assert_eq!(link_kind(&buf[16 + IFINFOMSG_LEN..buf.len() - 3]), None);
    }

    /// The TAP's whole life over the synchronous socket, checked against `ip`'s view.
    #[test]
    fn tap_attach_status_list_delete_in_a_namespace() {
        in_private_netns("tap_attach_status_list_delete_in_a_namespace", || {
            ip("link add br0 type bridge");
            let tun = open_persistent("chv-t1", None).unwrap();
            // Held by us: a second creation names the holder.
            match create_persistent("chv-t1") {
                Err(TapError::Busy { holder, .. }) => {
                    assert!(holder.contains(&std::process::id().to_string()), "{holder}")
                }
                other => panic!("expected Busy, got {other:?}"),
            }
            drop(tun);
            assert!(matches!(
                attach_isolated("chv-t1", "nobr0"),
                Err(TapError::NoBridge(b)) if b == "nobr0"
            ));
            assert!(matches!(
                attach_isolated("chv-t1", "lo"),
                Err(TapError::NotBridge(b)) if b == "lo"
            ));
            let e = attach_isolated("chv-none", "br0").unwrap_err();
            assert!(e.to_string().contains("vanished"), "{e}");
            // Refusals changed nothing.
            let st = status("chv-t1").unwrap().unwrap();
            assert_eq!((st.controller, st.up), (None, false));

            attach_isolated("chv-t1", "br0").unwrap();
            let st = status("chv-t1").unwrap().unwrap();
            assert_eq!(st.controller.as_deref(), Some("br0"));
            assert_eq!(st.isolated, Some(true));
            assert!(st.up);
            let shown = ip_out("-d link show chv-t1");
            assert!(
                shown.contains("master br0") && shown.contains("isolated on"),
                "{shown}"
            );
            // Idempotent: attaching again is no error and no change.
            attach_isolated("chv-t1", "br0").unwrap();
            assert_eq!(status("chv-t1").unwrap().unwrap().isolated, Some(true));

            create_persistent("chv-t2").unwrap();
            let mut names = list_with_prefix("chv-").unwrap();
            names.sort();
            assert_eq!(names, ["chv-t1", "chv-t2"]);

            assert!(delete("chv-t1").unwrap());
            assert!(!delete("chv-t1").unwrap());
            assert!(status("chv-t1").unwrap().is_none());
            assert_eq!(list_with_prefix("chv-").unwrap(), ["chv-t2"]);
        });
    }
}
