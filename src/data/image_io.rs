//! Image decoding for every reader and tool: format sniffed from content, EXIF orientation
//! applied, and hard limits so a file that declares 30000×30000 pixels is refused, not allocated.
use crate::error::{Error, IoContext, Result};
use image::{ImageDecoder, ImageReader, RgbImage};
use std::io::Cursor;
use std::path::Path;

/// Largest side we decode. Photos from phones are ≤ 8k; anything bigger is refused.
pub const MAX_SIDE: u32 = 16384;
/// Most bytes a decoder may allocate.
pub const MAX_ALLOC: u64 = 1 << 30;

/// Image file extensions the folder readers pick up.
pub const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "webp", "bmp", "gif"];

pub fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        .unwrap_or(false)
}

fn limits() -> image::Limits {
    let mut l = image::Limits::default();
    l.max_image_width = Some(MAX_SIDE);
    l.max_image_height = Some(MAX_SIDE);
    l.max_alloc = Some(MAX_ALLOC);
    l
}

/// Decode an image file to 8-bit RGB with EXIF orientation applied.
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).at(path)?;
    decode_rgb(&bytes, path)
}

/// Decode image bytes; `origin` names the source in error messages.
pub fn decode_rgb(bytes: &[u8], origin: &Path) -> Result<RgbImage> {
    if bytes.is_empty() {
        return Err(Error::bad_image(origin, "empty file"));
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::bad_image(origin, e))?;
    if reader.format().is_none() {
        return Err(Error::bad_image(origin, "unknown image format"));
    }
    reader.limits(limits());
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| Error::bad_image(origin, e))?;
    let (w, h) = decoder.dimensions();
    if w == 0 || h == 0 {
        return Err(Error::bad_image(origin, "zero-sized image"));
    }
    if w > MAX_SIDE || h > MAX_SIDE {
        return Err(Error::bad_image(
            origin,
            format!("{w}×{h} pixels is larger than the {MAX_SIDE}-pixel limit"),
        ));
    }
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img =
        image::DynamicImage::from_decoder(decoder).map_err(|e| Error::bad_image(origin, e))?;
    img.apply_orientation(orientation);
    Ok(img.into_rgb8())
}

/// Width and height from the header only (no pixel decode).
pub fn dimensions(bytes: &[u8]) -> Option<(u32, u32)> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .ok()?;
    reader.into_dimensions().ok()
}
