//! Atomic file writes: write to a temporary file in the same folder, fsync, rename.
//! A crash at any moment leaves either the old file or the new one, never half a file.
use crate::error::{IoContext, Result};
use std::io::Write;
use std::path::Path;

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
    use sha2::Digest;
    let mut f = std::fs::File::open(path).at(path)?;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h).at(path)?;
    Ok(hex::encode(h.finalize()))
}

/// The repository's cache folder (`.cache/`), where set-up puts libraries and data.
/// `EHM_CACHE` overrides it; otherwise the compile-time repo root is used.
pub fn cache_dir() -> std::path::PathBuf {
    if let Ok(p) = std::env::var("EHM_CACHE") {
        return p.into();
    }
    project_dir(".cache")
}

/// A folder of the project (`models`, `.cache`): in the current directory when it has one
/// (a copied checkout), else in the checkout the binary was built from.
pub fn project_dir(name: &str) -> std::path::PathBuf {
    let here = Path::new(name);
    if here.is_dir() {
        return here.to_path_buf();
    }
    // this crate sits at crates/ehm-core in the checkout
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(name)
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
