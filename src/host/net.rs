//! Links, IPv6 addresses and IPv6 routes of the current network namespace, read with rtnetlink
//! dumps over one synchronous `NETLINK_ROUTE` socket.
//!
//! Dumps need no privilege, so this works for any user. Nothing here spawns `ip`. A blocking
//! socket is used rather than rtnetlink's tokio connection: three request/response dumps do not
//! need an executor, and skipping it keeps a doctor run in the low milliseconds.

use std::net::Ipv6Addr;

use rtnetlink::packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST,
};
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{
    InfoBridgePort, InfoData, InfoKind, InfoPortData, InfoPortKind, InfoTun, LinkAttribute,
    LinkExtentMask, LinkFlags, LinkInfo, LinkMessage, State,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use serde::Serialize;

/// `IFA_F_*` address flags (linux/if_addr.h).
pub mod addr_flags {
    pub const NODAD: u32 = 0x02;
    pub const OPTIMISTIC: u32 = 0x04;
    pub const DADFAILED: u32 = 0x08;
    pub const DEPRECATED: u32 = 0x20;
    pub const TENTATIVE: u32 = 0x40;
    pub const PERMANENT: u32 = 0x80;
}

/// `IFLA_TUN_*` attribute numbers (linux/if_link.h); netlink-packet-route keeps them opaque.
mod ifla_tun {
    pub const OWNER: u16 = 1;
    pub const GROUP: u16 = 2;
    pub const TYPE: u16 = 3;
    pub const PERSIST: u16 = 6;
    pub const MULTI_QUEUE: u16 = 7;
    pub const NUM_QUEUES: u16 = 8;
    pub const NUM_DISABLED_QUEUES: u16 = 9;
    /// `IFF_TAP` in `IFLA_TUN_TYPE`.
    pub const IFF_TAP: u8 = 0x0002;
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot open a netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("netlink {what} dump failed: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("netlink {what} dump: kernel returned error {code}")]
    Kernel { what: &'static str, code: i32 },
    #[error("netlink {what} dump: cannot decode a message: {message}")]
    Decode { what: &'static str, message: String },
}

/// `IF_OPER_*` as the kernel reports it (RFC 2863 operational state).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OperState {
    Unknown,
    NotPresent,
    Down,
    LowerLayerDown,
    Testing,
    Dormant,
    Up,
}

impl std::fmt::Display for OperState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OperState::Unknown => "UNKNOWN",
            OperState::NotPresent => "NOTPRESENT",
            OperState::Down => "DOWN",
            OperState::LowerLayerDown => "LOWERLAYERDOWN",
            OperState::Testing => "TESTING",
            OperState::Dormant => "DORMANT",
            OperState::Up => "UP",
        })
    }
}

/// Facts about a bridge port (from `IFLA_INFO_SLAVE_DATA` of kind `bridge`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BridgePortInfo {
    /// `IFLA_BRPORT_ISOLATED`: isolated ports cannot talk to each other, only to non-isolated
    /// ports (the gateway). `None` on kernels older than 4.18.
    pub isolated: Option<bool>,
}

/// Facts about a TUN/TAP device (from `IFLA_INFO_DATA` of kind `tun`, kernel >= 4.15).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TunInfo {
    /// TAP (ethernet frames) rather than TUN (IP packets).
    pub tap: Option<bool>,
    pub persist: Option<bool>,
    pub multi_queue: Option<bool>,
    /// Queues attached to a file descriptor right now: 0 means no process holds the device.
    /// The kernel reports it for multi-queue devices only; otherwise use [`Link::carrier`],
    /// which a TAP has exactly while a file descriptor is attached.
    pub num_queues: Option<u32>,
    pub num_disabled_queues: Option<u32>,
    pub owner: Option<u32>,
    pub group: Option<u32>,
}

/// One IPv6 address on a link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ipv6Address {
    pub addr: Ipv6Addr,
    pub prefix_len: u8,
    /// `RT_SCOPE_*`: 0 global, 253 link, 254 host.
    pub scope: u8,
    /// `IFA_F_*` bits (see [`addr_flags`]).
    pub flags: u32,
    /// Seconds; `u32::MAX` means forever.
    pub valid_lft: Option<u32>,
    pub preferred_lft: Option<u32>,
}

impl Ipv6Address {
    pub fn tentative(&self) -> bool {
        self.flags & addr_flags::TENTATIVE != 0
    }
    pub fn dadfailed(&self) -> bool {
        self.flags & addr_flags::DADFAILED != 0
    }
    pub fn nodad(&self) -> bool {
        self.flags & addr_flags::NODAD != 0
    }
    pub fn permanent(&self) -> bool {
        self.flags & addr_flags::PERMANENT != 0
    }
    /// Usable as a source/destination right now (not waiting for or failed at DAD).
    pub fn usable(&self) -> bool {
        !self.tentative() && !self.dadfailed()
    }
    /// The flags as `ip addr` prints them, e.g. `["tentative", "nodad"]`.
    pub fn flag_names(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        for (bit, name) in [
            (addr_flags::TENTATIVE, "tentative"),
            (addr_flags::DADFAILED, "dadfailed"),
            (addr_flags::NODAD, "nodad"),
            (addr_flags::OPTIMISTIC, "optimistic"),
            (addr_flags::DEPRECATED, "deprecated"),
            (addr_flags::PERMANENT, "permanent"),
        ] {
            if self.flags & bit != 0 {
                v.push(name);
            }
        }
        v
    }
}

impl std::fmt::Display for Ipv6Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// One network interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// `IFLA_INFO_KIND`: `bridge`, `tun`, `veth`, ... (`None` for physical devices and `lo`).
    pub kind: Option<String>,
    /// `IFF_UP`: administratively up.
    pub admin_up: bool,
    /// `IFF_LOWER_UP`: the driver signals carrier.
    pub lower_up: bool,
    pub loopback: bool,
    pub oper_state: OperState,
    /// `IFLA_CARRIER`: the carrier flag itself, also for a link that is administratively down
    /// (unlike `lower_up`).
    pub carrier: Option<bool>,
    /// `IFLA_MASTER`: the bridge (or bond...) this link is a port of.
    pub master: Option<u32>,
    /// `IFLA_INFO_SLAVE_KIND` when enslaved, e.g. `bridge`.
    pub port_kind: Option<String>,
    pub mac: Option<String>,
    pub mtu: Option<u32>,
    pub bridge_port: Option<BridgePortInfo>,
    pub tun: Option<TunInfo>,
    pub ipv6: Vec<Ipv6Address>,
}

impl Link {
    pub fn is_bridge(&self) -> bool {
        self.kind.as_deref() == Some("bridge")
    }
    pub fn is_tun(&self) -> bool {
        self.kind.as_deref() == Some("tun")
    }
    /// The address `addr` on this link, if present (any prefix length).
    pub fn ipv6_addr(&self, addr: Ipv6Addr) -> Option<&Ipv6Address> {
        self.ipv6.iter().find(|a| a.addr == addr)
    }
}

/// One IPv6 route of the main table (unicast only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Route6 {
    pub dst: Ipv6Addr,
    pub dst_len: u8,
    pub gateway: Option<Ipv6Addr>,
    pub oif: Option<u32>,
    /// `RTPROT_*`: 2 kernel, 3 boot, 4 static, 9 ra (router advertisement), 16 dhcp.
    pub protocol: u8,
    pub table: u32,
}

/// `RTPROT_RA`: a route learned from a router advertisement.
pub const RTPROT_RA: u8 = 9;

impl Route6 {
    pub fn is_default(&self) -> bool {
        self.dst_len == 0
    }
    pub fn from_ra(&self) -> bool {
        self.protocol == RTPROT_RA
    }
}

/// Everything the route netlink family tells about the namespace, read once.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NetSnapshot {
    pub links: Vec<Link>,
    pub routes: Vec<Route6>,
}

impl NetSnapshot {
    /// Read links, their IPv6 addresses and the IPv6 main-table routes of the current namespace.
    pub fn read() -> Result<NetSnapshot, NetError> {
        let mut nl = Netlink::open()?;
        // A dump that raced with a change is flagged NLM_F_DUMP_INTR: read it again.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (snap, interrupted) = NetSnapshot::read_once(&mut nl)?;
            if !interrupted || attempt >= 3 {
                return Ok(snap);
            }
            tracing::debug!("netlink dump interrupted by a concurrent change; reading again");
        }
    }

    fn read_once(nl: &mut Netlink) -> Result<(NetSnapshot, bool), NetError> {
        let mut links = Vec::new();
        let mut intr = nl.dump("link", link_request(), |m| {
            if let RouteNetlinkMessage::NewLink(l) = m {
                links.push(link_from(l));
            }
        })?;
        let mut addrs: Vec<(u32, Ipv6Address)> = Vec::new();
        intr |= nl.dump("address", addr_request(), |m| {
            if let RouteNetlinkMessage::NewAddress(a) = m {
                if let Some(x) = addr_from(a) {
                    addrs.push(x);
                }
            }
        })?;
        let mut routes = Vec::new();
        intr |= nl.dump("route", route_request(), |m| {
            if let RouteNetlinkMessage::NewRoute(r) = m {
                if let Some(r) = route_from(r) {
                    routes.push(r);
                }
            }
        })?;
        for (index, a) in addrs {
            if let Some(l) = links.iter_mut().find(|l| l.index == index) {
                l.ipv6.push(a);
            }
        }
        Ok((NetSnapshot { links, routes }, intr))
    }

    /// The link called `name`.
    pub fn link(&self, name: &str) -> Option<&Link> {
        self.links.iter().find(|l| l.name == name)
    }

    pub fn link_by_index(&self, index: u32) -> Option<&Link> {
        self.links.iter().find(|l| l.index == index)
    }

    /// Links whose master is `index` (the ports of a bridge).
    pub fn ports_of(&self, index: u32) -> impl Iterator<Item = &Link> {
        self.links.iter().filter(move |l| l.master == Some(index))
    }

    /// Routes leaving through link `index`.
    pub fn routes_via(&self, index: u32) -> impl Iterator<Item = &Route6> {
        self.routes.iter().filter(move |r| r.oif == Some(index))
    }
}

/// Look one link up by name with a full dump (for callers that need nothing else).
pub fn link_by_name(name: &str) -> Result<Option<Link>, NetError> {
    Ok(NetSnapshot::read()?
        .links
        .into_iter()
        .find(|l| l.name == name))
}

struct Netlink {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

/// A blocking `NETLINK_ROUTE` socket bound to a kernel-chosen port and connected to the kernel
/// (doctor's dumps here, launch's TAP requests in `launch::tap`).
pub(crate) fn route_socket() -> std::io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    Ok(socket)
}

/// The netlink messages in one received datagram, each whole (header included). A header whose
/// length does not fit is `Err(length)`, and the last item: nothing after it can be framed.
pub(crate) fn messages(buf: &[u8]) -> impl Iterator<Item = Result<&[u8], usize>> + '_ {
    let mut off = 0;
    std::iter::from_fn(move || {
        let b = buf.get(off..).filter(|b| b.len() >= 16)?;
        let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
        if len < 16 || len > b.len() {
            off = buf.len();
            return Some(Err(len));
        }
        off += (len + 3) & !3;
        Some(Ok(&b[..len]))
    })
}

impl Netlink {
    fn open() -> Result<Netlink, NetError> {
        let socket = route_socket().map_err(NetError::Socket)?;
        Ok(Netlink {
            socket,
            seq: 0,
            // Dumps arrive in datagrams of up to ~32 KiB; a larger buffer avoids truncation.
            buf: vec![0u8; 64 * 1024],
        })
    }

    /// Run one dump; `Ok(true)` when the kernel flagged it as interrupted.
    fn dump(
        &mut self,
        what: &'static str,
        msg: RouteNetlinkMessage,
        mut on_msg: impl FnMut(RouteNetlinkMessage),
    ) -> Result<bool, NetError> {
        self.seq += 1;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        header.sequence_number = self.seq;
        let mut req = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        req.finalize();
        let mut out = vec![0u8; req.buffer_len()];
        req.serialize(&mut out);
        self.socket
            .send(&out, 0)
            .map_err(|source| NetError::Io { what, source })?;
        let mut interrupted = false;
        loop {
            let n = self
                .socket
                .recv(&mut &mut self.buf[..], 0)
                .map_err(|source| NetError::Io { what, source })?;
            for m in messages(&self.buf[..n]) {
                let m = m.map_err(|len| NetError::Decode {
                    what,
                    message: format!("bad message length {len}"),
                })?;
                let msg = match NetlinkMessage::<RouteNetlinkMessage>::deserialize(m) {
                    Ok(m) => m,
                    Err(e) => {
                        // One object the parser does not understand must not hide the rest.
                        tracing::warn!("netlink {what} dump: skipping a message: {e}");
                        continue;
                    }
                };
                if msg.header.sequence_number != self.seq {
                    continue;
                }
                interrupted |= msg.header.flags & NLM_F_DUMP_INTR != 0;
                match msg.payload {
                    NetlinkPayload::Done(_) => return Ok(interrupted),
                    NetlinkPayload::Error(e) => {
                        if let Some(code) = e.code {
                            return Err(NetError::Kernel {
                                what,
                                code: code.get(),
                            });
                        }
                        return Ok(interrupted);
                    }
                    NetlinkPayload::InnerMessage(m) => on_msg(m),
                    _ => {}
                }
            }
        }
    }
}

fn link_request() -> RouteNetlinkMessage {
    let mut m = LinkMessage::default();
    // Statistics are most of a link message and doctor needs none of them.
    m.attributes
        .push(LinkAttribute::ExtMask(vec![LinkExtentMask::SkipStats]));
    RouteNetlinkMessage::GetLink(m)
}

fn addr_request() -> RouteNetlinkMessage {
    let mut m = AddressMessage::default();
    m.header.family = AddressFamily::Inet6;
    RouteNetlinkMessage::GetAddress(m)
}

fn route_request() -> RouteNetlinkMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = AddressFamily::Inet6;
    RouteNetlinkMessage::GetRoute(m)
}

fn oper_state(s: &State) -> OperState {
    match s {
        State::NotPresent => OperState::NotPresent,
        State::Down => OperState::Down,
        State::LowerLayerDown => OperState::LowerLayerDown,
        State::Testing => OperState::Testing,
        State::Dormant => OperState::Dormant,
        State::Up => OperState::Up,
        _ => OperState::Unknown,
    }
}

fn format_mac(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn kind_name(k: &InfoKind) -> String {
    match k {
        InfoKind::Bridge => "bridge".into(),
        InfoKind::Tun => "tun".into(),
        InfoKind::Veth => "veth".into(),
        other => other.to_string(),
    }
}

fn link_from(m: LinkMessage) -> Link {
    let flags = m.header.flags;
    let mut link = Link {
        index: m.header.index,
        name: String::new(),
        kind: None,
        admin_up: flags.contains(LinkFlags::Up),
        lower_up: flags.contains(LinkFlags::LowerUp),
        loopback: flags.contains(LinkFlags::Loopback),
        oper_state: OperState::Unknown,
        carrier: None,
        master: None,
        port_kind: None,
        mac: None,
        mtu: None,
        bridge_port: None,
        tun: None,
        ipv6: Vec::new(),
    };
    for a in m.attributes {
        match a {
            LinkAttribute::IfName(n) => link.name = n,
            LinkAttribute::OperState(s) => link.oper_state = oper_state(&s),
            LinkAttribute::Carrier(c) => link.carrier = Some(c != 0),
            LinkAttribute::Controller(i) => link.master = Some(i),
            LinkAttribute::Address(b) if !b.is_empty() => link.mac = Some(format_mac(&b)),
            LinkAttribute::Mtu(v) => link.mtu = Some(v),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    match i {
                        LinkInfo::Kind(k) => link.kind = Some(kind_name(&k)),
                        LinkInfo::Data(InfoData::Tun(t)) => link.tun = Some(tun_from(&t)),
                        LinkInfo::PortKind(k) => {
                            link.port_kind = Some(match k {
                                InfoPortKind::Bridge => "bridge".into(),
                                other => format!("{other:?}").to_lowercase(),
                            })
                        }
                        LinkInfo::PortData(InfoPortData::BridgePort(p)) => {
                            let mut bp = BridgePortInfo::default();
                            for x in p {
                                if let InfoBridgePort::Isolated(v) = x {
                                    bp.isolated = Some(v);
                                }
                            }
                            link.bridge_port = Some(bp);
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    if link.port_kind.as_deref() == Some("bridge") && link.bridge_port.is_none() {
        link.bridge_port = Some(BridgePortInfo::default());
    }
    if link.is_tun() && link.tun.is_none() {
        link.tun = Some(TunInfo::default());
    }
    link
}

/// Decode `IFLA_TUN_*` attributes, given as `(type, payload)` pairs.
pub fn tun_from_raw<'a>(attrs: impl IntoIterator<Item = (u16, &'a [u8])>) -> TunInfo {
    let u8_of = |v: &[u8]| v.first().copied();
    let u32_of = |v: &[u8]| {
        v.get(..4)
            .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    };
    let mut t = TunInfo::default();
    for (kind, v) in attrs {
        match kind {
            ifla_tun::OWNER => t.owner = u32_of(v),
            ifla_tun::GROUP => t.group = u32_of(v),
            ifla_tun::TYPE => t.tap = u8_of(v).map(|x| x & ifla_tun::IFF_TAP != 0),
            ifla_tun::PERSIST => t.persist = u8_of(v).map(|x| x != 0),
            ifla_tun::MULTI_QUEUE => t.multi_queue = u8_of(v).map(|x| x != 0),
            ifla_tun::NUM_QUEUES => t.num_queues = u32_of(v),
            ifla_tun::NUM_DISABLED_QUEUES => t.num_disabled_queues = u32_of(v),
            _ => {}
        }
    }
    t
}

fn tun_from(attrs: &[InfoTun]) -> TunInfo {
    use rtnetlink::packet_core::Nla;
    let raw: Vec<(u16, Vec<u8>)> = attrs
        .iter()
        .map(|a| {
            let mut v = vec![0u8; a.value_len()];
            a.emit_value(&mut v);
            (a.kind(), v)
        })
        .collect();
    tun_from_raw(raw.iter().map(|(k, v)| (*k, v.as_slice())))
}

fn addr_from(m: AddressMessage) -> Option<(u32, Ipv6Address)> {
    if m.header.family != AddressFamily::Inet6 {
        return None;
    }
    let mut addr = None;
    let mut local = None;
    // The header carries the low 8 flag bits; IFA_FLAGS (when present) carries all 32.
    let mut flags = u32::from(m.header.flags.bits());
    let mut valid = None;
    let mut preferred = None;
    for a in m.attributes {
        match a {
            AddressAttribute::Address(std::net::IpAddr::V6(v)) => addr = Some(v),
            AddressAttribute::Local(std::net::IpAddr::V6(v)) => local = Some(v),
            AddressAttribute::Flags(f) => flags = f.bits(),
            AddressAttribute::CacheInfo(c) => {
                valid = Some(c.ifa_valid);
                preferred = Some(c.ifa_preferred);
            }
            _ => {}
        }
    }
    let addr = local.or(addr)?;
    Some((
        m.header.index,
        Ipv6Address {
            addr,
            prefix_len: m.header.prefix_len,
            scope: u8::from(m.header.scope),
            flags,
            valid_lft: valid,
            preferred_lft: preferred,
        },
    ))
}

fn route_from(m: RouteMessage) -> Option<Route6> {
    if m.header.address_family != AddressFamily::Inet6 || m.header.kind != RouteType::Unicast {
        return None;
    }
    let mut r = Route6 {
        dst: Ipv6Addr::UNSPECIFIED,
        dst_len: m.header.destination_prefix_length,
        gateway: None,
        oif: None,
        protocol: protocol_number(m.header.protocol),
        table: u32::from(m.header.table),
    };
    for a in m.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet6(d)) => r.dst = d,
            RouteAttribute::Gateway(RouteAddress::Inet6(g)) => r.gateway = Some(g),
            RouteAttribute::Oif(i) => r.oif = Some(i),
            RouteAttribute::Table(t) => r.table = t,
            _ => {}
        }
    }
    // RT_TABLE_MAIN; local and other policy tables say nothing about uplinks.
    (r.table == 254).then_some(r)
}

fn protocol_number(p: RouteProtocol) -> u8 {
    u8::from(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_frames_a_datagram_and_stops_at_a_bad_length() {
        // A 20-byte message (padded to 20), a 17-byte one (padded to 20), then a header that
        // claims more than is there.
        let mut buf = Vec::new();
        for (len, tag) in [(20u32, 1u8), (17, 2)] {
            let mut m = vec![tag; ((len as usize) + 3) & !3];
            m[..4].copy_from_slice(&len.to_ne_bytes());
            buf.extend(m);
        }
        let mut bad = vec![0u8; 16];
        bad[..4].copy_from_slice(&400u32.to_ne_bytes());
        buf.extend(&bad);
        let got: Vec<_> = messages(&buf).collect();
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(got[0].map(|m| (m.len(), m[4])), Ok((20, 1)));
        assert_eq!(got[1].map(|m| (m.len(), m[4])), Ok((17, 2)));
        assert_eq!(got[2], Err(400));
        // Fewer than a header's bytes left: nothing more.
        assert_eq!(messages(&buf[..10]).count(), 0);
    }

    #[test]
    fn tun_attributes_decode() {
        let owner = 1000u32.to_ne_bytes();
        let queues = 0u32.to_ne_bytes();
        let t = tun_from_raw([
            (ifla_tun::TYPE, &[2u8][..]),
            (ifla_tun::PERSIST, &[1u8][..]),
            (ifla_tun::OWNER, &owner[..]),
            (ifla_tun::NUM_QUEUES, &queues[..]),
            (99, &[1u8, 2, 3][..]),
        ]);
        assert_eq!(t.tap, Some(true));
        assert_eq!(t.persist, Some(true));
        assert_eq!(t.owner, Some(1000));
        assert_eq!(t.num_queues, Some(0));
        assert_eq!(t.multi_queue, None);
        // A short payload is ignored, not a panic.
        assert_eq!(tun_from_raw([(ifla_tun::OWNER, &[1u8][..])]).owner, None);
    }

    #[test]
    fn address_flags() {
        let a = Ipv6Address {
            addr: "fdcd::1".parse().unwrap(),
            prefix_len: 16,
            scope: 0,
            flags: addr_flags::TENTATIVE | addr_flags::PERMANENT,
            valid_lft: None,
            preferred_lft: None,
        };
        assert!(a.tentative() && a.permanent() && !a.usable() && !a.nodad());
        assert_eq!(a.flag_names(), vec!["tentative", "permanent"]);
        assert_eq!(a.to_string(), "fdcd::1/16");
    }

    #[test]
    fn mac_format() {
        assert_eq!(format_mac(&[0xaa, 0, 1, 2, 3, 0xff]), "aa:00:01:02:03:ff");
    }

    /// The dump itself works unprivileged in any namespace: `lo` is always there.
    #[test]
    fn dump_sees_loopback() {
        let s = NetSnapshot::read().expect("netlink dump");
        let lo = s.link("lo").expect("lo exists");
        assert!(lo.loopback);
        assert_eq!(
            s.link_by_index(lo.index).map(|l| l.name.as_str()),
            Some("lo")
        );
    }
}
