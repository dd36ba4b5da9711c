//! The disk's identifiers and the ESP's timestamps: derived from the build's inputs and
//! `SOURCE_DATE_EPOCH` when it is set (two builds give the same bytes), random and "now"
//! otherwise (two disks never share a PARTUUID by accident).

use std::fmt;

use sha2::{Digest, Sha256};

/// A GUID in its canonical text order (`Display` prints the usual lowercase form; the GPT
/// stores the first three fields little-endian, which the `gpt` crate does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    /// A version-4 (random) GUID from 16 bytes.
    pub fn v4(mut b: [u8; 16]) -> Guid {
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        Guid(b)
    }

    /// From the mixed-endian bytes of a GPT entry.
    pub fn from_gpt(b: &[u8; 16]) -> Guid {
        let mut g = *b;
        g[0..4].reverse();
        g[4..6].reverse();
        g[6..8].reverse();
        Guid(g)
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = hex::encode(self.0);
        write!(
            f,
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )
    }
}

/// A FAT (DOS) date and time: 1980..=2107, 2-second resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DosTime {
    pub year: u16,
    pub month: u16,
    pub day: u16,
    pub hour: u16,
    pub min: u16,
    pub sec: u16,
}

impl DosTime {
    /// UTC civil time of a Unix timestamp, clamped to what FAT can store.
    pub fn from_unix(t: i64) -> DosTime {
        // 1980-01-01 and 2107-12-31 23:59:58.
        let t = t.clamp(315_532_800, 4_354_819_198);
        let days = t.div_euclid(86_400);
        let secs = t.rem_euclid(86_400);
        let (y, m, d) = civil_from_days(days);
        DosTime {
            year: y as u16,
            month: m as u16,
            day: d as u16,
            hour: (secs / 3600) as u16,
            min: (secs / 60 % 60) as u16,
            sec: (secs % 60) as u16,
        }
    }
}

/// Howard Hinnant's `civil_from_days`: days since 1970-01-01 → (year, month, day).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Everything that makes one disk unlike another built from the same inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ids {
    pub disk: Guid,
    pub esp: Guid,
    pub root: Guid,
    pub fat_serial: u32,
    pub time: DosTime,
}

impl Ids {
    /// `seed` must cover every input of the disk (the rootfs cache key does). With `epoch`,
    /// everything derives from (seed, epoch); without, the GUIDs are random and the time now.
    pub fn new(seed: &str, epoch: Option<i64>) -> Ids {
        let derive = |label: &str| -> [u8; 16] {
            let d = Sha256::digest(format!("chvkit bootable disk\0{seed}\0{label}").as_bytes());
            let mut b = [0u8; 16];
            b.copy_from_slice(&d[..16]);
            b
        };
        let random = |label: &str| -> [u8; 16] {
            let mut b = [0u8; 16];
            // getrandom only fails without any entropy source; a derived id is still unique
            // per input set.
            if getrandom::fill(&mut b).is_err() {
                b = derive(label);
            }
            b
        };
        let pick = |label: &str| match epoch {
            Some(_) => derive(label),
            None => random(label),
        };
        let serial = pick("fat-serial");
        let now = || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0)
        };
        Ids {
            disk: Guid::v4(pick("disk")),
            esp: Guid::v4(pick("esp")),
            root: Guid::v4(pick("root")),
            fat_serial: u32::from_le_bytes([serial[0], serial[1], serial[2], serial[3]]),
            time: DosTime::from_unix(epoch.unwrap_or_else(now)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guid_text_and_gpt_order() {
        let g = Guid([
            0xc1, 0x2a, 0x73, 0x28, 0xf8, 0x1f, 0x11, 0xd2, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e,
            0xc9, 0x3b,
        ]);
        assert_eq!(g.to_string(), "c12a7328-f81f-11d2-ba4b-00a0c93ec93b");
        let on_disk = [
            0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e,
            0xc9, 0x3b,
        ];
        assert_eq!(Guid::from_gpt(&on_disk), g);
        let v = Guid::v4([0xff; 16]).to_string();
        assert_eq!(&v[14..15], "4");
        assert_eq!(&v[19..20], "b");
    }

    #[test]
    fn dos_time_from_unix() {
        // 2023-11-14 22:13:20 UTC.
        let t = DosTime::from_unix(1_700_000_000);
        assert_eq!(
            (t.year, t.month, t.day, t.hour, t.min, t.sec),
            (2023, 11, 14, 22, 13, 20)
        );
        assert_eq!(DosTime::from_unix(0).year, 1980);
        assert_eq!(DosTime::from_unix(i64::MAX).year, 2107);
        // 2000-02-29 (a leap day).
        let l = DosTime::from_unix(951_782_400);
        assert_eq!((l.year, l.month, l.day), (2000, 2, 29));
    }

    #[test]
    fn ids_follow_the_epoch() {
        let a = Ids::new("k", Some(1));
        assert_eq!(a, Ids::new("k", Some(1)));
        assert_ne!(a.root, Ids::new("other", Some(1)).root);
        assert_ne!(a.root, a.esp);
        let r = Ids::new("k", None);
        assert_ne!(r.root, Ids::new("k", None).root);
    }
}
