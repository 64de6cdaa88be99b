//! Image decoding for every reader and tool: format sniffed from content, EXIF orientation
//! applied, and hard limits so a file that declares 30000×30000 pixels is refused, not allocated;
//! only regular files up to a size cap are read (`files::read_input`), and a JPEG cut short
//! is an error, not an image with a grey bottom.
use crate::error::{Error, Result};
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
    let bytes = crate::files::read_input(path)?;
    decode_rgb(&bytes, path)
}

/// Whether a JPEG stream reaches its end-of-image marker. The JPEG decoder fills a file cut
/// short with grey and reports success; PIL calls such a file truncated, and so do we. Walks
/// the marker segments (lengths) and the entropy-coded data of each scan (where 0xFF is
/// followed by a stuffed 0x00 or a restart marker) until EOI.
fn jpeg_complete(b: &[u8]) -> bool {
    if b.len() < 4 || b[0] != 0xFF || b[1] != 0xD8 {
        return false;
    }
    let mut i = 2;
    while i + 1 < b.len() {
        if b[i] != 0xFF {
            i += 1; // entropy-coded data (or stray bytes between segments)
            continue;
        }
        match b[i + 1] {
            0xD9 => return true,
            // fill byte, stuffed zero, restart markers, TEM: no length follows
            0xFF => i += 1,
            0x00 | 0x01 | 0xD0..=0xD7 => i += 2,
            _ => {
                if i + 3 >= b.len() {
                    return false;
                }
                let len = u16::from_be_bytes([b[i + 2], b[i + 3]]) as usize;
                if len < 2 {
                    return false;
                }
                i += 2 + len;
            }
        }
    }
    false
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
    if reader.format() == Some(image::ImageFormat::Jpeg) && !jpeg_complete(bytes) {
        return Err(Error::bad_image(
            origin,
            "truncated JPEG (the file ends before the image does)",
        ));
    }
    let is_webp = reader.format() == Some(image::ImageFormat::WebP);
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
    let fast = if is_webp {
        decode_webp_rgb(bytes, w, h)
    } else {
        None
    };
    let mut img = match fast {
        Some(rgb) => image::DynamicImage::ImageRgb8(rgb),
        None => {
            image::DynamicImage::from_decoder(decoder).map_err(|e| Error::bad_image(origin, e))?
        }
    };
    img.apply_orientation(orientation);
    Ok(img.into_rgb8())
}

/// A still WebP decoded by libwebp (SIMD; about twice as fast as the pure-Rust decoder here),
/// alpha dropped as `into_rgb8` does. None for anything libwebp does not decode (animations,
/// damaged files): the caller's decoder then decides, with its own error message.
fn decode_webp_rgb(bytes: &[u8], w: u32, h: u32) -> Option<RgbImage> {
    let stride = 3 * w as usize;
    let mut buf = vec![0u8; stride * h as usize];
    // SAFETY: libwebp reads `bytes` and writes at most `buf.len()` bytes into `buf` (rows of
    // `stride`); it returns null, having written nothing useful, if the image does not fit.
    let out = unsafe {
        libwebp_sys::WebPDecodeRGBInto(
            bytes.as_ptr(),
            bytes.len(),
            buf.as_mut_ptr(),
            buf.len(),
            stride as i32,
        )
    };
    if out.is_null() {
        return None;
    }
    RgbImage::from_raw(w, h, buf)
}

/// Width and height from the header only (no pixel decode).
pub fn dimensions(bytes: &[u8]) -> Option<(u32, u32)> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .ok()?;
    reader.into_dimensions().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lossy WebP made by libwebp's encoder.
    fn lossy_webp(w: u32, h: u32) -> Vec<u8> {
        let rgb: Vec<u8> = (0..w * h)
            .flat_map(|i| {
                let (x, y) = (i % w, i / w);
                [(x * 7) as u8, (y * 11) as u8, ((x + y) * 5) as u8]
            })
            .collect();
        let mut out: *mut u8 = std::ptr::null_mut();
        // SAFETY: `rgb` holds h rows of 3·w bytes; libwebp allocates `out`, freed below.
        let n = unsafe {
            libwebp_sys::WebPEncodeRGB(
                rgb.as_ptr(),
                w as i32,
                h as i32,
                3 * w as i32,
                75.0,
                &mut out,
            )
        };
        assert!(n > 0 && !out.is_null());
        // SAFETY: libwebp wrote `n` bytes at `out`.
        let bytes = unsafe { std::slice::from_raw_parts(out, n) }.to_vec();
        unsafe { libwebp_sys::WebPFree(out as *mut _) };
        bytes
    }

    #[test]
    fn a_jpeg_cut_anywhere_is_truncated_a_whole_one_is_not() {
        let img = RgbImage::from_fn(64, 48, |x, y| image::Rgb([(x * 4) as u8, (y * 5) as u8, 7]));
        let mut bytes = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 90)
            .encode_image(&img)
            .unwrap();
        assert!(jpeg_complete(&bytes));
        assert!(decode_rgb(&bytes, Path::new("whole.jpg")).is_ok());
        // bytes after EOI are allowed (cameras append data)
        let mut padded = bytes.clone();
        padded.extend_from_slice(&[0, 0, 0x12]);
        assert!(jpeg_complete(&padded));
        for cut in [bytes.len() - 1, bytes.len() - 2, bytes.len() / 2, 200, 20] {
            assert!(!jpeg_complete(&bytes[..cut]), "cut at {cut}");
            let e = decode_rgb(&bytes[..cut], Path::new("cut.jpg"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("cut.jpg") && e.contains("truncated"), "{e}");
        }
    }

    #[test]
    fn webp_through_libwebp_equals_the_image_crates_decoder() {
        let bytes = lossy_webp(37, 23);
        let ours = decode_rgb(&bytes, Path::new("a.webp")).unwrap();
        let reference = image::load_from_memory(&bytes).unwrap().into_rgb8();
        assert_eq!(ours.dimensions(), (37, 23));
        let worst = ours
            .as_raw()
            .iter()
            .zip(reference.as_raw())
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        assert!(worst <= 1, "max difference {worst}");
        // a damaged file is still one clear error (from the fallback decoder)
        let cut = &bytes[..bytes.len() / 2];
        let e = decode_rgb(cut, Path::new("cut.webp"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("cut.webp: not a readable image"), "{e}");
    }
}
