//! Drawing shared by every picture the tools write: the class palette, colour maps and
//! overlays of segmentations, an 8×8 bitmap font for captions and legends, and contact sheets.
use image::{GrayImage, Rgb, RgbImage};

/// A distinct colour per label: golden-ratio hues, so neighbouring labels differ.
pub fn palette(i: u32) -> [u8; 3] {
    let h = (i as f32 * 0.618_034).fract() * 6.0;
    let (s, v) = (0.75f32, 0.95f32);
    let c = v * s;
    let x = c * (1.0 - ((h % 2.0) - 1.0).abs());
    let (r, g, b) = match h as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = v - c;
    [
        ((r + m) * 255.0) as u8,
        ((g + m) * 255.0) as u8,
        ((b + m) * 255.0) as u8,
    ]
}

/// The colour of segmentation class `k`: class 0 (background) black, 255 (ignore) grey.
pub fn class_colour(k: u8) -> [u8; 3] {
    match k {
        0 => [0, 0, 0],
        255 => [128, 128, 128],
        k => palette(k as u32),
    }
}

/// A class-index map as colours.
pub fn colourise(mask: &GrayImage) -> RgbImage {
    RgbImage::from_fn(mask.width(), mask.height(), |x, y| {
        Rgb(class_colour(mask.get_pixel(x, y).0[0]))
    })
}

/// `img` with non-background classes blended in at `alpha`.
pub fn overlay(img: &RgbImage, mask: &GrayImage, alpha: f32) -> RgbImage {
    RgbImage::from_fn(img.width(), img.height(), |x, y| {
        let k = mask.get_pixel(x, y).0[0];
        let p = img.get_pixel(x, y).0;
        if k == 0 {
            return Rgb(p);
        }
        let c = class_colour(k);
        Rgb(std::array::from_fn(|i| {
            (p[i] as f32 * (1.0 - alpha) + c[i] as f32 * alpha).round() as u8
        }))
    })
}

/// Draw `text` with the 8×8 font, top-left at (x, y), scaled by `scale`; clipped at the edges.
pub fn draw_text(img: &mut RgbImage, x: i64, y: i64, text: &str, colour: [u8; 3], scale: u32) {
    use font8x8::UnicodeFonts;
    let s = scale.max(1) as i64;
    for (i, ch) in text.chars().enumerate() {
        let glyph = font8x8::BASIC_FONTS
            .get(ch)
            .or_else(|| font8x8::BASIC_FONTS.get('?'))
            .unwrap_or([0; 8]);
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8 {
                if bits & (1 << col) == 0 {
                    continue;
                }
                for dy in 0..s {
                    for dx in 0..s {
                        let px = x + (i as i64 * 8 + col) * s + dx;
                        let py = y + row as i64 * s + dy;
                        if px >= 0 && py >= 0 && px < img.width() as i64 && py < img.height() as i64
                        {
                            img.put_pixel(px as u32, py as u32, Rgb(colour));
                        }
                    }
                }
            }
        }
    }
}

/// Pixel width of `text` at `scale`.
pub fn text_width(text: &str, scale: u32) -> u32 {
    text.chars().count() as u32 * 8 * scale.max(1)
}

/// A legend: one row per `(class index, caption)`, colour swatch then text, on white.
pub fn legend(entries: &[(u8, String)], width: u32) -> RgbImage {
    let row = 14u32;
    let mut img =
        RgbImage::from_pixel(width.max(40), row * entries.len() as u32 + 4, Rgb([255; 3]));
    for (i, (k, caption)) in entries.iter().enumerate() {
        let y = 2 + i as u32 * row;
        for dy in 0..10 {
            for dx in 0..10 {
                img.put_pixel(4 + dx, y + dy, Rgb(class_colour(*k)));
            }
        }
        draw_text(&mut img, 18, y as i64 + 1, caption, [0, 0, 0], 1);
    }
    img
}

/// Paste `src` into `dst` at (x, y), clipped.
pub fn paste(dst: &mut RgbImage, src: &RgbImage, x: u32, y: u32) {
    for (sx, sy, p) in src.enumerate_pixels() {
        let (dx, dy) = (x + sx, y + sy);
        if dx < dst.width() && dy < dst.height() {
            dst.put_pixel(dx, dy, *p);
        }
    }
}

/// Rows of equally sized tiles with a 2-pixel white gutter (rows may have different lengths).
pub fn sheet(rows: &[Vec<RgbImage>]) -> RgbImage {
    let gap = 2u32;
    let tw = rows.iter().flatten().map(|t| t.width()).max().unwrap_or(1);
    let th = rows.iter().flatten().map(|t| t.height()).max().unwrap_or(1);
    let cols = rows.iter().map(|r| r.len()).max().unwrap_or(1) as u32;
    let mut out = RgbImage::from_pixel(
        gap + cols * (tw + gap),
        gap + rows.len() as u32 * (th + gap),
        Rgb([255; 3]),
    );
    for (r, row) in rows.iter().enumerate() {
        for (c, t) in row.iter().enumerate() {
            paste(
                &mut out,
                t,
                gap + c as u32 * (tw + gap),
                gap + r as u32 * (th + gap),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_lands_inside_and_overlay_keeps_background() {
        let mut img = RgbImage::from_pixel(40, 10, Rgb([255; 3]));
        draw_text(&mut img, 0, 0, "Hi", [0, 0, 0], 1);
        let dark = img.pixels().filter(|p| p.0 == [0, 0, 0]).count();
        assert!(dark > 10 && dark < 2 * 64, "{dark}");
        assert_eq!(text_width("Hi", 2), 32);
        let base = RgbImage::from_pixel(2, 1, Rgb([10, 20, 30]));
        let mask = GrayImage::from_raw(2, 1, vec![0, 3]).unwrap();
        let o = overlay(&base, &mask, 0.5);
        assert_eq!(o.get_pixel(0, 0).0, [10, 20, 30]);
        assert_ne!(o.get_pixel(1, 0).0, [10, 20, 30]);
        assert_eq!(colourise(&mask).get_pixel(0, 0).0, [0, 0, 0]);
        assert_ne!(class_colour(1), class_colour(2));
    }
}
