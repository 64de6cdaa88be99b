//! Qt binary resource bundles (`.rcc`), as shipped by gcompris-qt-data. Layout (qrc format
//! versions 1–3): magic `qres`, version, offsets of the tree, data and names sections
//! (big-endian u32), then tree nodes of 14 bytes (+8 for a timestamp from version 2).
use crate::error::{Error, IoContext, Result};
use std::io::Read;
use std::path::Path;

const FLAG_COMPRESSED: u16 = 0x01;
const FLAG_DIRECTORY: u16 = 0x02;
const FLAG_ZSTD: u16 = 0x04;

#[derive(Debug)]
pub struct RccEntry {
    /// Path inside the bundle, `/`-separated.
    pub path: String,
    pub data: Vec<u8>,
}

/// All file entries of an `.rcc` bundle, decompressed. zstd-compressed entries (Qt 6 only)
/// are skipped, and reported in the returned count.
pub fn read_rcc(path: &Path) -> Result<(Vec<RccEntry>, usize)> {
    let bytes = std::fs::read(path).at(path)?;
    parse(&bytes).map_err(|m| Error::bad_file(path, m))
}

fn be32(b: &[u8], at: usize) -> std::result::Result<u32, String> {
    b.get(at..at + 4)
        .map(|s| u32::from_be_bytes(s.try_into().unwrap()))
        .ok_or_else(|| format!("truncated .rcc (offset {at} past the end)"))
}
fn be16(b: &[u8], at: usize) -> std::result::Result<u16, String> {
    b.get(at..at + 2)
        .map(|s| u16::from_be_bytes(s.try_into().unwrap()))
        .ok_or_else(|| format!("truncated .rcc (offset {at} past the end)"))
}

fn parse(b: &[u8]) -> std::result::Result<(Vec<RccEntry>, usize), String> {
    if b.len() < 20 || &b[..4] != b"qres" {
        return Err("not a Qt resource bundle (missing 'qres' magic)".into());
    }
    let version = be32(b, 4)?;
    if !(1..=3).contains(&version) {
        return Err(format!("unsupported .rcc version {version}"));
    }
    let tree = be32(b, 8)? as usize;
    let data = be32(b, 12)? as usize;
    let names = be32(b, 16)? as usize;
    let node_size = if version >= 2 { 22 } else { 14 };
    let name_at = |off: usize| -> std::result::Result<String, String> {
        let at = names + off;
        let len = be16(b, at)? as usize;
        let s = b
            .get(at + 6..at + 6 + 2 * len)
            .ok_or("truncated .rcc name table")?;
        let units: Vec<u16> = s
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect();
        Ok(String::from_utf16_lossy(&units))
    };
    let mut out = Vec::new();
    let mut skipped = 0;
    // Depth-first walk from the root node (index 0); a visit budget guards against cycles.
    let mut stack = vec![(0usize, String::new())];
    let mut budget = b.len() / node_size + 1;
    while let Some((idx, prefix)) = stack.pop() {
        budget = budget.checked_sub(1).ok_or("corrupt .rcc tree (cycle)")?;
        let at = tree + idx * node_size;
        let flags = be16(b, at + 4)?;
        let name = if idx == 0 {
            String::new()
        } else {
            name_at(be32(b, at)? as usize)?
        };
        let full = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        if flags & FLAG_DIRECTORY != 0 {
            let count = be32(b, at + 6)? as usize;
            let first = be32(b, at + 10)? as usize;
            for c in (first..first + count).rev() {
                stack.push((c, full.clone()));
            }
        } else {
            let off = data + be32(b, at + 10)? as usize;
            let size = be32(b, off)? as usize;
            let blob = b
                .get(off + 4..off + 4 + size)
                .ok_or("truncated .rcc data entry")?;
            let bytes = if flags & FLAG_ZSTD != 0 {
                skipped += 1;
                continue;
            } else if flags & FLAG_COMPRESSED != 0 {
                // qCompress: 4-byte big-endian uncompressed length, then a zlib stream.
                let expect = be32(blob, 0)? as usize;
                let mut v = Vec::with_capacity(expect.min(1 << 28));
                flate2::read::ZlibDecoder::new(&blob[4..])
                    .read_to_end(&mut v)
                    .map_err(|e| format!("corrupt zlib entry {full}: {e}"))?;
                v
            } else {
                blob.to_vec()
            };
            out.push(RccEntry {
                path: full,
                data: bytes,
            });
        }
    }
    Ok((out, skipped))
}

#[cfg(test)]
pub(crate) fn build_rcc(files: &[(&str, &[u8], bool)]) -> Vec<u8> {
    // A version-1 bundle: root dir with the files as children.
    let mut names = Vec::new();
    let mut data = Vec::new();
    let mut nodes = Vec::new();
    let root = {
        let mut n = vec![0u8; 14];
        n[4..6].copy_from_slice(&FLAG_DIRECTORY.to_be_bytes());
        n[6..10].copy_from_slice(&(files.len() as u32).to_be_bytes());
        n[10..14].copy_from_slice(&1u32.to_be_bytes());
        n
    };
    nodes.push(root);
    for (name, bytes, compress) in files {
        let name_off = names.len() as u32;
        let units: Vec<u16> = name.encode_utf16().collect();
        names.extend_from_slice(&(units.len() as u16).to_be_bytes());
        names.extend_from_slice(&0u32.to_be_bytes());
        for u in units {
            names.extend_from_slice(&u.to_be_bytes());
        }
        let data_off = data.len() as u32;
        let payload = if *compress {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
            std::io::Write::write_all(&mut e, bytes).unwrap();
            let mut p = (bytes.len() as u32).to_be_bytes().to_vec();
            p.extend(e.finish().unwrap());
            p
        } else {
            bytes.to_vec()
        };
        data.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        data.extend(payload);
        let mut n = vec![0u8; 14];
        n[0..4].copy_from_slice(&name_off.to_be_bytes());
        let flags: u16 = if *compress { FLAG_COMPRESSED } else { 0 };
        n[4..6].copy_from_slice(&flags.to_be_bytes());
        n[10..14].copy_from_slice(&data_off.to_be_bytes());
        nodes.push(n);
    }
    let header = 20;
    let tree_off = header;
    let tree_len = nodes.len() * 14;
    let data_off = tree_off + tree_len;
    let names_off = data_off + data.len();
    let mut out = b"qres".to_vec();
    for v in [1u32, tree_off as u32, data_off as u32, names_off as u32] {
        out.extend_from_slice(&v.to_be_bytes());
    }
    for n in nodes {
        out.extend(n);
    }
    out.extend(data);
    out.extend(names);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_plain_and_zlib_entries() {
        let bundle = build_rcc(&[("a.txt", b"hello", false), ("b.bin", &[7u8; 1000], true)]);
        let (entries, skipped) = parse(&bundle).unwrap();
        assert_eq!(skipped, 0);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].path, "a.txt");
        assert_eq!(entries[0].data, b"hello");
        assert_eq!(entries[1].data, vec![7u8; 1000]);
    }

    #[test]
    fn rejects_bad_bundles() {
        assert!(parse(b"").unwrap_err().contains("magic"));
        assert!(parse(b"PK\x03\x04aaaaaaaaaaaaaaaaaaaaaaa")
            .unwrap_err()
            .contains("magic"));
        let mut bundle = build_rcc(&[("a.txt", b"hello world", false)]);
        bundle.truncate(bundle.len() - 30);
        assert!(parse(&bundle).unwrap_err().contains("truncated"));
    }
}
