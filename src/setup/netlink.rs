//! The rtnetlink changes setup and teardown make (reading is the host model's job): create
//! a bridge, add an address without DAD, bring a link up, delete an address or a link.
//!
//! Everything goes through the kernel's netlink socket (no `ip` processes), on the caller's
//! current-thread tokio runtime.

use std::net::{IpAddr, Ipv6Addr};

use rtnetlink::packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkBridge, LinkMessageBuilder, LinkUnspec};

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open a netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("netlink: {what}: {message}")]
    Request { what: String, message: String },
}

fn req(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let what = what.into();
    move |e| NetlinkError::Request {
        what,
        message: describe(&e),
    }
}

/// rtnetlink's Display wraps the errno in its debug form; say it the way `ip` would.
fn describe(e: &rtnetlink::Error) -> String {
    match e {
        rtnetlink::Error::NetlinkError(m) => match m.code {
            Some(code) => std::io::Error::from_raw_os_error(-code.get()).to_string(),
            None => m.to_string(),
        },
        other => other.to_string(),
    }
}

pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Open the socket; its connection task runs on `rt` whenever the caller blocks on it.
    pub fn connect(rt: &tokio::runtime::Runtime) -> Result<Netlink, NetlinkError> {
        let _guard = rt.enter();
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
        rt.spawn(conn);
        Ok(Netlink { handle })
    }

    /// Create a bridge, administratively down (it is brought up once its address is in place).
    pub async fn create_bridge(&self, name: &str) -> Result<(), NetlinkError> {
        let msg = LinkMessageBuilder::<LinkBridge>::new(name).build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(req(format!("create bridge {name}")))
    }

    /// Add `addr/len` with IFA_F_NODAD so it is usable at once, even on a bridge with no carrier.
    pub async fn add_addr_nodad(
        &self,
        index: u32,
        link_name: &str,
        addr: Ipv6Addr,
        len: u8,
    ) -> Result<(), NetlinkError> {
        let mut r = self.handle.address().add(index, IpAddr::V6(addr), len);
        let m = r.message_mut();
        m.header.flags |= AddressHeaderFlags::Nodad;
        m.attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
        r.execute()
            .await
            .map_err(req(format!("add {addr}/{len} to {link_name}")))
    }

    pub async fn del_addr(
        &self,
        index: u32,
        link_name: &str,
        addr: Ipv6Addr,
        len: u8,
    ) -> Result<(), NetlinkError> {
        let mut m = AddressMessage::default();
        m.header.family = AddressFamily::Inet6;
        m.header.prefix_len = len;
        m.header.index = index;
        m.attributes
            .push(AddressAttribute::Address(IpAddr::V6(addr)));
        self.handle
            .address()
            .del(m)
            .execute()
            .await
            .map_err(req(format!("remove {addr}/{len} from {link_name}")))
    }

    pub async fn set_up(&self, index: u32, link_name: &str) -> Result<(), NetlinkError> {
        let msg = LinkUnspec::new_with_index(index).up().build();
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(req(format!("bring {link_name} up")))
    }

    pub async fn del_link(&self, index: u32, link_name: &str) -> Result<(), NetlinkError> {
        self.handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(req(format!("delete link {link_name}")))
    }
}
