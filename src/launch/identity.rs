//! A job's network identity, derived deterministically from its id: the guest's IPv6 address
//! inside the profile prefix, a locally administered unicast MAC and a TAP name.
//!
//! Everything comes from sha256(job id), so a job relaunched under the same id gets the same
//! address (the guest's `/init` and any firewall rule can rely on it), and distinct ids collide
//! only with cryptographic-hash odds: 112 bits for the address in a /16, 46 for the MAC, 55 for
//! the TAP name.

use std::fmt;
use std::net::Ipv6Addr;

use sha2::{Digest, Sha256};

use crate::profile::{prefix_mask, Ipv6Net};

/// Longest accepted job id. Run dirs, lock files and the API socket path are built from it, and a
/// Unix socket path must stay under 108 bytes.
pub const JOB_ID_MAX: usize = 64;
/// TAP names start with this; `gc` only ever touches interfaces named like this.
pub const TAP_PREFIX: &str = "chv-";
/// IFNAMSIZ - 1.
const IFNAME_MAX: usize = 15;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    #[error("job id is empty")]
    Empty,
    #[error("job id {id:?} is {len} bytes; at most {JOB_ID_MAX} are allowed")]
    TooLong { id: String, len: usize },
    #[error(
        "job id {id:?} contains {ch:?}: use letters, digits, `.`, `_` and `-` (no path separators, spaces or control characters)"
    )]
    BadChar { id: String, ch: char },
    #[error("job id {id:?} must start with a letter or digit")]
    BadStart { id: String },
    #[error(
        "network prefix {0} leaves no room for guest addresses (use a prefix of /120 or shorter)"
    )]
    PrefixTooLong(Ipv6Net),
    #[error("MAC address {mac:?} is invalid: {why}")]
    BadMac { mac: String, why: &'static str },
}

/// Check a job id: 1..=64 bytes of `[A-Za-z0-9._-]`, starting with a letter or digit (so it is
/// never `.`/`..`, never looks like a flag, and is safe as a file name).
pub fn validate_job_id(id: &str) -> Result<(), IdError> {
    if id.is_empty() {
        return Err(IdError::Empty);
    }
    if let Some(ch) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(IdError::BadChar {
            id: id.to_string(),
            ch,
        });
    }
    if id.len() > JOB_ID_MAX {
        return Err(IdError::TooLong {
            id: id.to_string(),
            len: id.len(),
        });
    }
    if !id.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(IdError::BadStart { id: id.to_string() });
    }
    Ok(())
}

/// A fresh job id: `job-<unix seconds>-<8 random hex>`.
pub fn generate_job_id() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut rnd = [0u8; 4];
    if getrandom::fill(&mut rnd).is_err() {
        // No entropy source: the pid and the clock still separate concurrent launches.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        rnd = (nanos ^ std::process::id()).to_be_bytes();
    }
    format!("job-{secs}-{}", hex::encode(rnd))
}

/// A MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl std::str::FromStr for Mac {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Mac, IdError> {
        let bad = |why| IdError::BadMac {
            mac: s.to_string(),
            why,
        };
        let parts: Vec<&str> = s.split([':', '-']).collect();
        if parts.len() != 6 {
            return Err(bad("expected six hex octets like 02:aa:bb:cc:dd:ee"));
        }
        let mut b = [0u8; 6];
        for (i, p) in parts.iter().enumerate() {
            if p.len() != 2 {
                return Err(bad("each octet is two hex digits"));
            }
            b[i] = u8::from_str_radix(p, 16).map_err(|_| bad("not hexadecimal"))?;
        }
        if b[0] & 1 != 0 {
            return Err(bad("multicast bit set (first octet must be even)"));
        }
        if b == [0; 6] {
            return Err(bad("all zeros"));
        }
        Ok(Mac(b))
    }
}

/// The derived identity of one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub job_id: String,
    pub ip: Ipv6Addr,
    pub prefix_len: u8,
    pub gateway: Ipv6Addr,
    pub mac: Mac,
    pub tap: String,
}

impl Identity {
    /// Derive from a (validated) job id. The address is the prefix plus the first
    /// `128 - prefix_len` bits of the hash; the subnet-router anycast address (host part 0),
    /// host part 1 (`fdcd::1` is the conventional gateway) and the configured gateway are
    /// skipped by rehashing with a counter, so the result is still deterministic.
    pub fn derive(job_id: &str, prefix: Ipv6Net, gateway: Ipv6Addr) -> Result<Identity, IdError> {
        validate_job_id(job_id)?;
        if prefix.len > 120 {
            return Err(IdError::PrefixTooLong(prefix));
        }
        let digest = Sha256::digest(job_id.as_bytes());
        let host_mask = !prefix_mask(prefix.len);
        let net = u128::from(prefix.addr) & prefix_mask(prefix.len);
        let mut counter: u32 = 0;
        let ip = loop {
            let bits = if counter == 0 {
                u128::from_be_bytes(first16(&digest))
            } else {
                let mut h = Sha256::new();
                h.update(job_id.as_bytes());
                h.update([0u8]);
                h.update(counter.to_be_bytes());
                u128::from_be_bytes(first16(&h.finalize()))
            };
            // The top bits of the hash become the host part (for /16: 112 bits).
            let host = (bits >> prefix.len) & host_mask;
            let candidate = Ipv6Addr::from(net | host);
            if host > 1 && candidate != gateway {
                break candidate;
            }
            counter += 1;
        };
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&digest[16..22]);
        // Locally administered (bit 1 set), unicast (bit 0 clear).
        mac[0] = (mac[0] & 0xfc) | 0x02;
        let tap = tap_name(&digest);
        Ok(Identity {
            job_id: job_id.to_string(),
            ip,
            prefix_len: prefix.len,
            gateway,
            mac: Mac(mac),
            tap,
        })
    }

    /// `addr/len`, as `CHECKER_GUEST_IP` carries it.
    pub fn ip_cidr(&self) -> String {
        format!("{}/{}", self.ip, self.prefix_len)
    }
}

fn first16(d: &[u8]) -> [u8; 16] {
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    b
}

/// `chv-` + 11 base32 characters (55 bits of the hash, bytes 22..), 15 bytes in all.
fn tap_name(digest: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut v: u64 = 0;
    for b in &digest[22..30] {
        v = (v << 8) | u64::from(*b);
    }
    let n = IFNAME_MAX - TAP_PREFIX.len();
    let mut s = String::with_capacity(IFNAME_MAX);
    s.push_str(TAP_PREFIX);
    for i in 0..n {
        let idx = ((v >> (59 - 5 * i)) & 31) as usize;
        s.push(char::from(ALPHABET[idx]));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn net() -> Ipv6Net {
        "fdcd::/16".parse().unwrap()
    }
    fn gw() -> Ipv6Addr {
        "fdcd::1".parse().unwrap()
    }

    #[test]
    fn job_id_rules() {
        for ok in ["a", "job-1234567890-1", "A.b_c-d", &"x".repeat(64)] {
            validate_job_id(ok).unwrap();
        }
        assert_eq!(validate_job_id(""), Err(IdError::Empty));
        assert!(matches!(
            validate_job_id(&"x".repeat(65)),
            Err(IdError::TooLong { len: 65, .. })
        ));
        for (bad, ch) in [
            ("a/b", '/'),
            ("a b", ' '),
            ("a\nb", '\n'),
            ("é", 'é'),
            ("a\0", '\0'),
        ] {
            assert_eq!(
                validate_job_id(bad),
                Err(IdError::BadChar { id: bad.into(), ch })
            );
        }
        for bad in [".", "..", "-x", "_x", ".hidden"] {
            assert!(validate_job_id(bad).is_err(), "{bad}");
        }
        let e = validate_job_id("../etc").unwrap_err().to_string();
        assert!(e.contains("../etc") && e.contains('/'), "{e}");
        validate_job_id(&generate_job_id()).unwrap();
    }

    #[test]
    fn derivation_is_deterministic_and_well_formed() {
        let a = Identity::derive("job-1", net(), gw()).unwrap();
        let b = Identity::derive("job-1", net(), gw()).unwrap();
        assert_eq!(a, b);
        assert!(net().contains(a.ip));
        assert_ne!(a.ip, gw());
        assert_eq!(a.mac.0[0] & 3, 2, "locally administered unicast");
        assert!(a.tap.starts_with("chv-") && a.tap.len() == 15, "{}", a.tap);
        assert!(a
            .tap
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-'));
        assert!(a.ip_cidr().ends_with("/16"));
        // The host part carries the hash: the documented 112 bits for a /16.
        let digest = Sha256::digest(b"job-1");
        let want = (u128::from_be_bytes(first16(&digest)) >> 16) | (0xfdcd_u128 << 112);
        assert_eq!(u128::from(a.ip), want);
    }

    #[test]
    fn ten_thousand_ids_never_collide() {
        let mut ips = HashSet::new();
        let mut macs = HashSet::new();
        let mut taps = HashSet::new();
        for i in 0..10_000 {
            let id = Identity::derive(&format!("job-{i}"), net(), gw()).unwrap();
            assert!(ips.insert(id.ip), "ip collision at {i}");
            assert!(macs.insert(id.mac), "mac collision at {i}");
            assert!(taps.insert(id.tap.clone()), "tap collision at {i}");
        }
    }

    #[test]
    fn reserved_addresses_are_skipped() {
        // A /120 leaves 256 host values: over many ids, 0, 1 and the gateway must never appear.
        let small: Ipv6Net = "fdcd::/120".parse().unwrap();
        let gw: Ipv6Addr = "fdcd::2".parse().unwrap();
        for i in 0..3000 {
            let id = Identity::derive(&format!("j{i}"), small, gw).unwrap();
            let host = u128::from(id.ip) & 0xff;
            assert!(host > 1 && id.ip != gw, "{}", id.ip);
        }
        let tiny: Ipv6Net = "fdcd::/127".parse().unwrap();
        assert!(Identity::derive("j", tiny, gw).is_err());
    }

    #[test]
    fn mac_parsing() {
        let m: Mac = "AA:BB:CC:DD:EE:F0".parse().unwrap();
        assert_eq!(m.to_string(), "aa:bb:cc:dd:ee:f0");
        assert!("01:00:5e:00:00:01".parse::<Mac>().is_err());
        assert!("00:00:00:00:00:00".parse::<Mac>().is_err());
        assert!("zz:bb:cc:dd:ee:ff".parse::<Mac>().is_err());
        assert!("aa:bb:cc".parse::<Mac>().is_err());
    }
}
