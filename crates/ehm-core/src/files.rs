//! Files: atomic writes (write to a temporary file in the same folder, fsync, rename — a crash
//! at any moment leaves either the old file or the new one, never half a file); reading input
//! files safely (regular files only, with a size cap); paths in JSON that keep every byte.
use crate::error::{Error, IoContext, Result};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Write `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |w| w.write_all(bytes))
}

/// Atomically write whatever `fill` writes into the file.
pub fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut std::io::BufWriter<&std::fs::File>) -> std::io::Result<()>,
) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).at(dir)?;
    // temp files are created 0600; results are ordinary files (0644, like `>` would make them)
    let mut b = tempfile::Builder::new();
    b.prefix(".tmp-");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        b.permissions(std::fs::Permissions::from_mode(0o644));
    }
    let tmp = b.tempfile_in(dir).at(dir)?;
    {
        let mut w = std::io::BufWriter::new(tmp.as_file());
        fill(&mut w).at(path)?;
        w.flush().at(path)?;
    }
    tmp.as_file().sync_all().at(path)?;
    tmp.persist(path)
        .map_err(|e| crate::Error::io(path, e.error))?;
    // fsync the directory so the rename itself survives a power cut.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    sha256_of(std::fs::File::open(path).at(path)?, path)
}

fn sha256_of(mut r: impl Read, path: &Path) -> Result<String> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut r, &mut h).at(path)?;
    Ok(hex::encode(h.finalize()))
}

/// Default size cap of one input file (an image), in MiB: far above any photo, far below what
/// would exhaust memory.
pub const DEFAULT_MAX_INPUT_MB: u64 = 256;
static MAX_INPUT_BYTES: AtomicU64 = AtomicU64::new(DEFAULT_MAX_INPUT_MB << 20);

/// Set the size cap of input files for this process (the tools' `--max-file-mb`).
pub fn set_max_input_mb(mb: u64) {
    MAX_INPUT_BYTES.store(mb.saturating_mul(1 << 20), Ordering::Relaxed);
}

/// Open an input file the user named: only a regular file (a FIFO or a device would block or
/// never end), and at most the size cap (a 3 GB "photo" is refused, not read into memory).
/// Returns the open file and its length.
pub fn open_input(path: &Path) -> Result<(std::fs::File, u64)> {
    // metadata first: opening a FIFO for reading blocks until someone writes to it
    let meta = std::fs::metadata(path).at(path)?;
    if !meta.is_file() {
        let kind = {
            use std::os::unix::fs::FileTypeExt;
            let t = meta.file_type();
            if t.is_fifo() {
                "a FIFO"
            } else if t.is_char_device() || t.is_block_device() {
                "a device"
            } else if t.is_socket() {
                "a socket"
            } else if t.is_dir() {
                "a folder"
            } else {
                "a special file"
            }
        };
        return Err(Error::bad_file(
            path,
            format!("not a regular file ({kind}); only regular files are read"),
        ));
    }
    let cap = MAX_INPUT_BYTES.load(Ordering::Relaxed);
    if meta.len() > cap {
        return Err(Error::bad_file(
            path,
            format!(
                "{:.1} MB, larger than the {} MB limit for one input file (--max-file-mb raises it)",
                meta.len() as f64 / (1u64 << 20) as f64,
                cap >> 20
            ),
        ));
    }
    // O_NONBLOCK: should the path have become a FIFO since, opening it must not hang
    let f = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .at(path)?
    };
    // re-check what was actually opened
    let meta = f.metadata().at(path)?;
    if !meta.is_file() || meta.len() > cap {
        return Err(Error::bad_file(path, "changed while being opened"));
    }
    Ok((f, meta.len()))
}

/// The bytes of an input file (`open_input`'s checks; a file that grows past the cap while
/// being read is refused, not cut).
pub fn read_input(path: &Path) -> Result<Vec<u8>> {
    let (f, len) = open_input(path)?;
    let cap = MAX_INPUT_BYTES.load(Ordering::Relaxed);
    let mut bytes = Vec::with_capacity(len as usize);
    f.take(cap + 1).read_to_end(&mut bytes).at(path)?;
    if bytes.len() as u64 > cap {
        return Err(Error::bad_file(
            path,
            "grew past the size limit while being read",
        ));
    }
    Ok(bytes)
}

/// sha256 of an input file (the bytes `read_input` would return).
pub fn sha256_input(path: &Path) -> Result<String> {
    use sha2::Digest;
    Ok(hex::encode(sha2::Sha256::digest(read_input(path)?)))
}

/// Refuse to write `out` when it is one of `inputs`: the same file however it is named
/// (another path, a symlink or a hard link: same device and inode).
pub fn refuse_overwriting_inputs(out: &Path, inputs: &[&Path]) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let Ok(o) = std::fs::metadata(out) else {
        return Ok(()); // does not exist yet: cannot be an input
    };
    for i in inputs {
        if std::fs::metadata(i).is_ok_and(|m| (m.dev(), m.ino()) == (o.dev(), o.ino())) {
            return Err(Error::Config(format!(
                "{}: the output is one of the inputs ({}); choose another output file",
                out.display(),
                i.display()
            )));
        }
    }
    Ok(())
}

/// Serde for a stored path that keeps every byte: a UTF-8 path as a JSON string, any other as
/// `{"unix_bytes": BASE64}` (file names on Linux are bytes, not always UTF-8).
pub mod lossless_path {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use std::path::{Path, PathBuf};

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Text(String),
        Bytes { unix_bytes: String },
    }

    pub fn serialize<S: Serializer>(p: &Path, s: S) -> Result<S::Ok, S::Error> {
        use base64::Engine;
        use std::os::unix::ffi::OsStrExt;
        match p.to_str() {
            Some(t) => s.serialize_str(t),
            None => Repr::Bytes {
                unix_bytes: base64::engine::general_purpose::STANDARD
                    .encode(p.as_os_str().as_bytes()),
            }
            .serialize(s),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
        use base64::Engine;
        use std::os::unix::ffi::OsStrExt;
        Ok(match Repr::deserialize(d)? {
            Repr::Text(t) => PathBuf::from(t),
            Repr::Bytes { unix_bytes } => {
                let b = base64::engine::general_purpose::STANDARD
                    .decode(unix_bytes)
                    .map_err(serde::de::Error::custom)?;
                PathBuf::from(std::ffi::OsStr::from_bytes(&b))
            }
        })
    }
}

/// Serialize a path for people and scripts as a string, invalid UTF-8 replaced by U+FFFD
/// (output only; what the index stores is `lossless_path`).
pub fn lossy_path<S: serde::Serializer>(p: &Path, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&p.to_string_lossy())
}

/// `lossy_path` for an optional path.
pub fn lossy_opt_path<S: serde::Serializer>(
    p: &Option<PathBuf>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match p {
        Some(p) => lossy_path(p, s),
        None => s.serialize_none(),
    }
}

/// The repository's cache folder (`.cache/`), where set-up puts libraries and data.
/// `EHM_CACHE` overrides it; otherwise the compile-time repo root is used.
pub fn cache_dir() -> std::path::PathBuf {
    if let Ok(p) = std::env::var("EHM_CACHE") {
        return p.into();
    }
    project_dir(".cache")
}

/// A folder of the project (`models`, `.cache`): the one in the checkout the binary was built
/// from; where that checkout is not on this machine (a binary carried elsewhere), the one in
/// the current directory. A folder of the same name in the current directory never hides the
/// checkout's: it may be anyone's (`EHM_MODELS` / `EHM_CACHE` point elsewhere on purpose).
pub fn project_dir(name: &str) -> std::path::PathBuf {
    // this crate sits at crates/ehm-core in the checkout
    let built = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(name);
    let here = Path::new(name);
    if !built.is_dir() && here.is_dir() {
        return here.to_path_buf();
    }
    built
}

/// Little-endian f32 values from bytes (a trailing partial value is ignored).
pub fn f32s_from_le(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Encode an image as PNG in memory.
pub fn png_bytes<P>(img: &image::ImageBuffer<P, Vec<P::Subpixel>>) -> Result<Vec<u8>>
where
    P: image::PixelWithColorType,
    [P::Subpixel]: image::EncodableLayout,
{
    let mut v = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut v), image::ImageFormat::Png)
        .map_err(|e| crate::Error::Other(format!("PNG encoding: {e}")))?;
    Ok(v)
}

/// Write an image as PNG, atomically.
pub fn write_png_atomic<P>(path: &Path, img: &image::ImageBuffer<P, Vec<P::Subpixel>>) -> Result<()>
where
    P: image::PixelWithColorType,
    [P::Subpixel]: image::EncodableLayout,
{
    write_atomic(path, &png_bytes(img)?)
}
