//! The seed's IPv6 network and a TAP held open the way a running VMM holds it, shared by
//! `tests/doctor_net.rs` and `benches/doctor.rs` (each includes this file with `#[path]`; it
//! needs nothing from `tests/common`, which benches cannot use).

use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};

/// The seed's "Network Setup (IPv6)" commands, verbatim apart from `sudo` and the
/// /etc/sysctl.conf append (nothing may touch /etc).
pub const SEED_SETUP: &str = "set -e
ip link add chvbr0 type bridge
ip link set chvbr0 up
sysctl -qw net.ipv6.conf.chvbr0.accept_dad=0
sysctl -qw net.ipv6.conf.chvbr0.dad_transmits=0
ip -6 addr add fdcd::1/16 dev chvbr0
echo 1 > /proc/sys/net/ipv6/conf/all/forwarding
ip6tables -t nat -A POSTROUTING -s fdcd::/16 ! -o chvbr0 -j MASQUERADE
ip6tables -A FORWARD -i chvbr0 -j ACCEPT
ip6tables -A FORWARD -o chvbr0 -m state --state RELATED,ESTABLISHED -j ACCEPT
";

/// Attach to the existing TAP `name` in network namespace `netns` (a name under /run/netns)
/// and keep the fd: carrier on, one queue. A helper thread joins the namespace, since network
/// namespaces are per thread.
pub fn hold_tap(netns: &str, name: &str) -> std::io::Result<OwnedFd> {
    let ns_path = format!("/run/netns/{netns}");
    let name = name.to_string();
    std::thread::spawn(move || {
        let nsf = std::fs::File::open(&ns_path)?;
        nix::sched::setns(&nsf, nix::sched::CloneFlags::CLONE_NEWNET)?;
        let tun = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")?;
        // struct ifreq: 16-byte name, then ifr_flags (short), padded to 40 bytes.
        let mut ifr = [0u8; 40];
        ifr[..name.len()].copy_from_slice(name.as_bytes());
        let flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: TUNSETIFF = _IOW('T', 202, int), with a 40-byte struct ifreq.
        let rc = unsafe { libc::ioctl(tun.as_raw_fd(), 0x400454ca, ifr.as_mut_ptr()) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            return Err(std::io::Error::new(
                e.kind(),
                format!("TUNSETIFF {name}: {e}"),
            ));
        }
        // SAFETY: the fd was just released by `tun`.
        Ok(unsafe { OwnedFd::from_raw_fd(tun.into_raw_fd()) })
    })
    .join()
    .map_err(|_| std::io::Error::other("TAP thread panicked"))?
}
