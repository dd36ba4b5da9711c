//! The compressed payload inside a bzImage: which codec it is (by magic) and unpacking it.
//!
//! The kernel's build appends the uncompressed size as a little-endian u32 after every codec's
//! stream (`size_append`; gzip's own trailer ends with the same value), and the bzImage's
//! `payload_length` covers those bytes. So every decoder here reads one stream and stops, leaving
//! whatever follows unread, and the caller checks the size.

use std::io::{self, Read};

use serde::Serialize;

/// Payload codecs chvkit can unpack (`None`: the file was already a vmlinux).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    Gzip,
    Xz,
    Lzma,
    Zstd,
    Lz4,
    None,
}

impl Compression {
    pub fn name(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::Xz => "xz",
            Compression::Lzma => "lzma",
            Compression::Zstd => "zstd",
            Compression::Lz4 => "lz4",
            Compression::None => "none",
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What the first bytes of a payload say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Magic {
    Supported(Compression),
    /// A codec the kernel can use but chvkit does not unpack (bzip2, lzo).
    Unsupported(&'static str),
    Unknown,
}

/// The legacy lz4 frame magic (0x184C2102, LE), which `lz4 -l` writes and the kernel reads.
const LZ4_LEGACY_MAGIC: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];
/// Every legacy-frame block decompresses to at most this.
const LZ4_LEGACY_BLOCK: usize = 8 << 20;

pub fn detect(p: &[u8]) -> Magic {
    let table: [(&[u8], Magic); 7] = [
        (&[0x1f, 0x8b], Magic::Supported(Compression::Gzip)),
        (
            &[0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00],
            Magic::Supported(Compression::Xz),
        ),
        // lzma-alone: properties byte 0x5d (lc=3 lp=0 pb=2, what `lzma -9` writes), then a
        // dictionary size whose low bytes are zero.
        (&[0x5d, 0x00, 0x00], Magic::Supported(Compression::Lzma)),
        (
            &[0x28, 0xb5, 0x2f, 0xfd],
            Magic::Supported(Compression::Zstd),
        ),
        (&LZ4_LEGACY_MAGIC, Magic::Supported(Compression::Lz4)),
        (b"BZh", Magic::Unsupported("bzip2")),
        (&[0x89, 0x4c, 0x5a, 0x4f], Magic::Unsupported("lzo")),
    ];
    table
        .iter()
        .find(|(m, _)| p.starts_with(m))
        .map_or(Magic::Unknown, |(_, k)| *k)
}

/// Unpack one stream of `c` from `p`, producing at most `limit` bytes (a bound against a
/// hostile file; real kernels are tens of MiB). Trailing bytes after the stream are ignored.
pub fn decompress(c: Compression, p: &[u8], limit: u64) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let r = match c {
        Compression::None => return Ok(p.to_vec()),
        Compression::Lz4 => return lz4_legacy(p, limit),
        Compression::Gzip => {
            // The bufread decoder reads exactly one member and stops at its trailer.
            let d = flate2::bufread::GzDecoder::new(p);
            read_limited(d, limit, &mut out)
        }
        Compression::Xz => {
            // No CONCATENATED flag: stop at the end of the first stream (the size word follows).
            let s = liblzma::stream::Stream::new_stream_decoder(u64::MAX, 0)
                .map_err(io::Error::other)?;
            read_limited(
                liblzma::bufread::XzDecoder::new_stream(p, s),
                limit,
                &mut out,
            )
        }
        Compression::Lzma => {
            let s =
                liblzma::stream::Stream::new_lzma_decoder(u64::MAX).map_err(io::Error::other)?;
            read_limited(
                liblzma::bufread::XzDecoder::new_stream(p, s),
                limit,
                &mut out,
            )
        }
        Compression::Zstd => {
            // single_frame: the size word after the frame is not a second frame. The kernel
            // compresses with `--ultra -22`, whose window can exceed the default limit.
            let mut d = zstd::stream::read::Decoder::with_buffer(p)?.single_frame();
            d.window_log_max(31)?;
            read_limited(d, limit, &mut out)
        }
    };
    r.map(|()| out)
}

fn read_limited(r: impl Read, limit: u64, out: &mut Vec<u8>) -> io::Result<()> {
    let n = r.take(limit.saturating_add(1)).read_to_end(out)?;
    if n as u64 > limit {
        return Err(too_big(limit));
    }
    Ok(())
}

fn too_big(limit: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("unpacks to more than {limit} bytes"),
    )
}

/// The legacy lz4 frame: magic, then `[u32 LE compressed size][block]` repeated, each block
/// at most 8 MiB unpacked; a size word equal to the magic starts another frame. lz4_flex reads
/// the blocks; it has no legacy-frame reader, so the framing is here.
pub fn lz4_legacy(p: &[u8], limit: u64) -> io::Result<Vec<u8>> {
    let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
    let mut out = Vec::new();
    let mut pos = 0usize;
    let mut blocks = 0usize;
    // A compressed block is never larger than lz4's bound for an 8 MiB input.
    let max_block = LZ4_LEGACY_BLOCK + LZ4_LEGACY_BLOCK / 255 + 16;
    loop {
        let rest = &p[pos..];
        // Done at the end, or when only the kernel's trailing size word is left.
        if rest.is_empty() || (rest.len() == 4 && blocks > 0) {
            break;
        }
        let Some(word) = rest.get(..4) else {
            return Err(bad(format!("{} stray bytes at offset {pos}", rest.len())));
        };
        if word == LZ4_LEGACY_MAGIC {
            pos += 4;
            continue;
        }
        if blocks == 0 && pos == 0 {
            return Err(bad("no lz4 legacy frame magic".into()));
        }
        let size = u32::from_le_bytes([word[0], word[1], word[2], word[3]]) as usize;
        if size == 0 || size > max_block {
            return Err(bad(format!(
                "block at offset {pos} claims {size} bytes (at most {max_block})"
            )));
        }
        let Some(block) = rest.get(4..4 + size) else {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "block at offset {pos} needs {size} bytes, {} left",
                    rest.len() - 4
                ),
            ));
        };
        let start = out.len();
        out.resize(start + LZ4_LEGACY_BLOCK, 0);
        let n = lz4_flex::block::decompress_into(block, &mut out[start..])
            .map_err(|e| bad(format!("block at offset {pos}: {e}")))?;
        out.truncate(start + n);
        if out.len() as u64 > limit {
            return Err(too_big(limit));
        }
        pos += 4 + size;
        blocks += 1;
    }
    if blocks == 0 {
        return Err(bad("lz4 legacy frame holds no block".into()));
    }
    Ok(out)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Legacy lz4 framing of `data` in blocks of `block` bytes (the lz4 tool uses 8 MiB).
    pub fn lz4_legacy_frame(data: &[u8], block: usize) -> Vec<u8> {
        let mut v = LZ4_LEGACY_MAGIC.to_vec();
        for chunk in data.chunks(block) {
            let c = lz4_flex::block::compress(chunk);
            v.extend((c.len() as u32).to_le_bytes());
            v.extend(c);
        }
        v
    }

    fn sample(n: usize) -> Vec<u8> {
        (0..n)
            .map(|i| (i * 7 % 251) as u8 ^ (i / 1000) as u8)
            .collect()
    }

    #[test]
    fn lz4_multi_block_and_new_frame() {
        let data = sample(100_000);
        // Three blocks, then a second frame (magic again) with two more, then the size word.
        let mut p = lz4_legacy_frame(&data[..60_000], 25_000);
        p.extend(lz4_legacy_frame(&data[60_000..], 25_000));
        p.extend((data.len() as u32).to_le_bytes());
        assert_eq!(lz4_legacy(&p, 1 << 30).unwrap(), data);
    }

    #[test]
    fn lz4_truncated_and_bad() {
        let data = sample(50_000);
        let p = lz4_legacy_frame(&data, 20_000);
        let e = lz4_legacy(&p[..p.len() - 10], 1 << 30).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
        assert!(lz4_legacy(b"\x02\x21\x4c\x18", 1 << 30).is_err());
        assert!(lz4_legacy(&p, 1000).is_err(), "limit enforced");
    }

    #[test]
    fn magic_table() {
        assert_eq!(detect(b"\x1f\x8b\x08"), Magic::Supported(Compression::Gzip));
        assert_eq!(detect(b"BZh91AY"), Magic::Unsupported("bzip2"));
        assert_eq!(detect(b"\x89LZO\0"), Magic::Unsupported("lzo"));
        assert_eq!(
            detect(b"\x02\x21\x4c\x18"),
            Magic::Supported(Compression::Lz4)
        );
        assert_eq!(detect(b"\x7fELF"), Magic::Unknown);
        assert_eq!(detect(b""), Magic::Unknown);
    }

    #[test]
    fn trailing_bytes_tolerated() {
        use std::io::Write;
        let data = sample(30_000);
        let tail = (data.len() as u32).to_le_bytes();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&data).unwrap();
        let mut xz = liblzma::write::XzEncoder::new(Vec::new(), 6);
        xz.write_all(&data).unwrap();
        let zs = zstd::encode_all(&data[..], 19).unwrap();
        for (c, mut p) in [
            (Compression::Gzip, gz.finish().unwrap()),
            (Compression::Xz, xz.finish().unwrap()),
            (Compression::Zstd, zs),
        ] {
            p.extend(tail);
            assert_eq!(decompress(c, &p, 1 << 30).unwrap(), data, "{c}");
            assert!(decompress(c, &p, 100).is_err(), "{c}: limit enforced");
        }
    }
}
