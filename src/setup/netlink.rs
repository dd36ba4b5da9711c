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

/// A netlink socket opened on first use (a run with no network change opens none). Each call
/// waits for its answer on the caller's current-thread runtime, which also runs the socket's
/// connection task meanwhile.
pub struct Netlink<'rt> {
    rt: &'rt tokio::runtime::Runtime,
    handle: Option<Handle>,
}

impl<'rt> Netlink<'rt> {
    pub fn new(rt: &'rt tokio::runtime::Runtime) -> Netlink<'rt> {
        Netlink { rt, handle: None }
    }

    fn handle(&mut self) -> Result<Handle, NetlinkError> {
        if let Some(h) = &self.handle {
            return Ok(h.clone());
        }
        let (conn, handle, _) = {
            let _guard = self.rt.enter();
            rtnetlink::new_connection().map_err(NetlinkError::Socket)?
        };
        self.rt.spawn(conn);
        self.handle = Some(handle.clone());
        Ok(handle)
    }

    fn wait(
        &self,
        what: String,
        request: impl std::future::Future<Output = Result<(), rtnetlink::Error>>,
    ) -> Result<(), NetlinkError> {
        self.rt
            .block_on(request)
            .map_err(|e| NetlinkError::Request {
                what,
                message: describe(&e),
            })
    }

    /// Create a bridge, administratively down (it is brought up once its address is in place).
    pub fn create_bridge(&mut self, name: &str) -> Result<(), NetlinkError> {
        let msg = LinkMessageBuilder::<LinkBridge>::new(name).build();
        let request = self.handle()?.link().add(msg).execute();
        self.wait(format!("create bridge {name}"), request)
    }

    /// Add `addr/len` with IFA_F_NODAD so it is usable at once, even on a bridge with no carrier.
    pub fn add_addr_nodad(
        &mut self,
        index: u32,
        link_name: &str,
        addr: Ipv6Addr,
        len: u8,
    ) -> Result<(), NetlinkError> {
        let mut r = self.handle()?.address().add(index, IpAddr::V6(addr), len);
        let m = r.message_mut();
        m.header.flags |= AddressHeaderFlags::Nodad;
        m.attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
        self.wait(format!("add {addr}/{len} to {link_name}"), r.execute())
    }

    pub fn del_addr(
        &mut self,
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
        let request = self.handle()?.address().del(m).execute();
        self.wait(format!("remove {addr}/{len} from {link_name}"), request)
    }

    pub fn set_up(&mut self, index: u32, link_name: &str) -> Result<(), NetlinkError> {
        let msg = LinkUnspec::new_with_index(index).up().build();
        let request = self.handle()?.link().set(msg).execute();
        self.wait(format!("bring {link_name} up"), request)
    }

    pub fn del_link(&mut self, index: u32, link_name: &str) -> Result<(), NetlinkError> {
        let request = self.handle()?.link().del(index).execute();
        self.wait(format!("delete link {link_name}"), request)
    }
}
