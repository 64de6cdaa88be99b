//! The natural-photo collection: WebP/JPEG photos inside GCompris `.rcc` bundles plus the
//! wallpaper packages, extracted once into `.cache/photos/` (flat, content-named).
use super::image_io::{dimensions, has_image_extension};
use super::rcc::read_rcc;
use crate::error::{Error, IoContext, Result};
use std::path::{Path, PathBuf};

/// Photos smaller than this on their shorter side are icons or drawings, not photos.
pub const MIN_SIDE: u32 = 256;

const WALLPAPER_PACKAGES: &[&str] = &[
    "plasma-workspace-wallpapers",
    "mate-backgrounds",
    "lomiri-wallpapers-16.04",
];

/// Extract (once) and return the photo folder. A `.complete` marker is written last, so an
/// interrupted extraction is redone, never trusted.
pub fn collect(cache: &Path) -> Result<PathBuf> {
    let out = cache.join("photos");
    if out.join(".complete").exists() {
        return Ok(out);
    }
    let data = cache.join("data");
    let rcc_dir = data.join("gcompris-qt-data/usr/share/gcompris-qt/rcc");
    if !rcc_dir.exists() {
        return Err(Error::MissingData(format!(
            "{}: GCompris data not found; run tools/setup.sh data",
            rcc_dir.display()
        )));
    }
    std::fs::create_dir_all(&out).at(&out)?;
    let mut count = 0usize;
    let mut bundles: Vec<PathBuf> = std::fs::read_dir(&rcc_dir)
        .at(&rcc_dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "rcc"))
        .collect();
    bundles.sort();
    for b in &bundles {
        let (entries, _) = read_rcc(b)?;
        let stem = b.file_stem().unwrap().to_string_lossy().into_owned();
        for e in entries {
            // The GCompris photos are WebP (a few JPEG/PNG); drawings are SVG and skipped here.
            if !has_image_extension(Path::new(&e.path)) {
                continue;
            }
            if dimensions(&e.data).is_none_or(|(w, h)| w.min(h) < MIN_SIDE) {
                continue;
            }
            let name = format!("gcompris_{stem}_{}", e.path.replace('/', "_"));
            crate::files::write_atomic(&out.join(name), &e.data)?;
            count += 1;
        }
    }
    for pkg in WALLPAPER_PACKAGES {
        let root = data.join(pkg);
        if !root.exists() {
            continue;
        }
        for p in super::folder::list_images(&root)? {
            if !has_image_extension(&p) {
                continue;
            }
            let bytes = std::fs::read(&p).at(&p)?;
            if dimensions(&bytes).is_none_or(|(w, h)| w.min(h) < MIN_SIDE) {
                continue;
            }
            let rel = p
                .strip_prefix(&root)
                .unwrap()
                .to_string_lossy()
                .replace('/', "_");
            crate::files::write_atomic(&out.join(format!("{pkg}_{rel}")), &bytes)?;
            count += 1;
        }
    }
    if count == 0 {
        return Err(Error::MissingData(format!(
            "{}: no photos found in the set-up data",
            data.display()
        )));
    }
    crate::files::write_atomic(&out.join(".complete"), count.to_string().as_bytes())?;
    Ok(out)
}
