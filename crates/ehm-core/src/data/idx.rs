//! MNIST / Fashion-MNIST IDX files (optionally gzip-compressed).
use crate::error::{Error, IoContext, Result};
use std::io::Read;
use std::path::Path;

/// Read an IDX file into (dims, bytes). Accepts `.gz` (sniffed by magic, not by name).
pub fn read_idx(path: &Path) -> Result<(Vec<usize>, Vec<u8>)> {
    let raw = std::fs::read(path).at(path)?;
    let data = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| Error::bad_file(path, format!("corrupt gzip stream ({e})")))?;
        out
    } else {
        raw
    };
    parse_idx(&data).map_err(|m| Error::bad_file(path, m))
}

fn parse_idx(data: &[u8]) -> std::result::Result<(Vec<usize>, Vec<u8>), String> {
    if data.len() < 4 {
        return Err(format!("too short for an IDX file ({} bytes)", data.len()));
    }
    if data[0] != 0 || data[1] != 0 {
        return Err("not an IDX file (bad magic)".into());
    }
    if data[2] != 0x08 {
        return Err(format!(
            "IDX element type 0x{:02x} is not unsigned byte",
            data[2]
        ));
    }
    let ndim = data[3] as usize;
    let header = 4 + 4 * ndim;
    if ndim == 0 || data.len() < header {
        return Err("truncated IDX header".into());
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|i| u32::from_be_bytes(data[4 + 4 * i..8 + 4 * i].try_into().unwrap()) as usize)
        .collect();
    let expect: usize = dims.iter().product();
    let body = &data[header..];
    if body.len() != expect {
        return Err(format!(
            "IDX header says {dims:?} = {expect} bytes but the file holds {} (truncated?)",
            body.len()
        ));
    }
    Ok((dims, body.to_vec()))
}

#[cfg(test)]
pub(crate) fn encode_idx(dims: &[u32], body: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        v.extend_from_slice(&d.to_be_bytes());
    }
    v.extend_from_slice(body);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_plain_and_gz() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = encode_idx(&[2, 2, 3], &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
        let p = dir.path().join("a.idx");
        std::fs::write(&p, &bytes).unwrap();
        let (d, b) = read_idx(&p).unwrap();
        assert_eq!(d, vec![2, 2, 3]);
        assert_eq!(b[11], 12);
        let gz = dir.path().join("a.idx.gz");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut enc, &bytes).unwrap();
        std::fs::write(&gz, enc.finish().unwrap()).unwrap();
        assert_eq!(read_idx(&gz).unwrap().1, b);
    }

    #[test]
    fn rejects_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("empty", vec![], "too short"),
            ("magic", vec![1, 2, 8, 1, 0, 0, 0, 1, 0], "bad magic"),
            ("trunc", encode_idx(&[4, 2], &[1, 2, 3]), "truncated"),
            ("gz", vec![0x1f, 0x8b, 1, 2, 3], "corrupt gzip"),
        ];
        for (name, bytes, want) in cases {
            let p = dir.path().join(name);
            std::fs::write(&p, bytes).unwrap();
            let e = read_idx(&p).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains(name), "{name}: {e}");
        }
    }
}
