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

/// One line of a `line_chart`.
pub struct Series<'a> {
    pub name: &'a str,
    /// (x, y) points in x order.
    pub points: Vec<(f64, f64)>,
    pub colour: [u8; 3],
    /// Drawn dashed (baselines).
    pub dashed: bool,
}

/// A line chart on white: axes, y ticks at quarters of `y_range`, x from the data, the legend
/// in a panel on the right, `title` above. For training curves.
pub fn line_chart(
    title: &str,
    x_label: &str,
    series: &[Series],
    y_range: (f64, f64),
    w: u32,
    h: u32,
) -> RgbImage {
    let mut img = RgbImage::from_pixel(w, h, Rgb([255; 3]));
    let legend_w = series
        .iter()
        .map(|s| text_width(s.name, 1))
        .max()
        .unwrap_or(0) as i64
        + 36;
    let (left, right, top, bottom) = (44i64, 12 + legend_w, 22i64, 30i64);
    let (pw, ph) = (w as i64 - left - right, h as i64 - top - bottom);
    let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let (x0, x1) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
        (a.min(x), b.max(x))
    });
    let (x0, x1) = if x0.is_finite() && x1 > x0 {
        (x0, x1)
    } else {
        (0.0, 1.0)
    };
    let (y0, y1) = y_range;
    let to_px = |x: f64, y: f64| {
        (
            left + ((x - x0) / (x1 - x0) * pw as f64).round() as i64,
            top + ph - ((y.clamp(y0, y1) - y0) / (y1 - y0) * ph as f64).round() as i64,
        )
    };
    let put = |img: &mut RgbImage, x: i64, y: i64, c: [u8; 3]| {
        if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
            img.put_pixel(x as u32, y as u32, Rgb(c));
        }
    };
    // grid lines and y labels
    for k in 0..=4 {
        let v = y0 + (y1 - y0) * k as f64 / 4.0;
        let (_, py) = to_px(x0, v);
        for x in left..left + pw {
            put(&mut img, x, py, if k == 0 { [0; 3] } else { [225; 3] });
        }
        draw_text(&mut img, 2, py - 4, &format!("{v:.2}"), [60; 3], 1);
    }
    for y in top..top + ph {
        put(&mut img, left, y, [0; 3]);
    }
    draw_text(&mut img, left, 4, title, [0; 3], 1);
    draw_text(
        &mut img,
        left,
        top + ph + 6,
        &format!("{x0:.0}"),
        [60; 3],
        1,
    );
    let end = format!("{x1:.0}");
    draw_text(
        &mut img,
        left + pw - text_width(&end, 1) as i64,
        top + ph + 6,
        &end,
        [60; 3],
        1,
    );
    let lw = text_width(x_label, 1) as i64;
    draw_text(
        &mut img,
        left + (pw - lw) / 2,
        top + ph + 18,
        x_label,
        [60; 3],
        1,
    );
    for (i, s) in series.iter().enumerate() {
        for pair in s.points.windows(2) {
            let (a, b) = (to_px(pair[0].0, pair[0].1), to_px(pair[1].0, pair[1].1));
            let steps = (b.0 - a.0).abs().max((b.1 - a.1).abs()).max(1);
            for k in 0..=steps {
                if s.dashed && (k / 4) % 2 == 1 {
                    continue;
                }
                let x = a.0 + (b.0 - a.0) * k / steps;
                let y = a.1 + (b.1 - a.1) * k / steps;
                put(&mut img, x, y, s.colour);
                put(&mut img, x, y + 1, s.colour);
            }
        }
        for &(x, y) in &s.points {
            let (px, py) = to_px(x, y);
            for d in -1..=1 {
                put(&mut img, px + d, py, s.colour);
                put(&mut img, px, py + d, s.colour);
            }
        }
        let (lx, ly) = (left + pw + 12, top + 4 + i as i64 * 12);
        for x in lx..lx + 16 {
            if !s.dashed || (x / 3) % 2 == 0 {
                put(&mut img, x, ly + 3, s.colour);
                put(&mut img, x, ly + 4, s.colour);
            }
        }
        draw_text(&mut img, lx + 20, ly, s.name, [30; 3], 1);
    }
    img
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

    #[test]
    fn line_chart_draws_each_series_in_its_colour() {
        let red = [220, 20, 20];
        let blue = [20, 20, 220];
        let img = line_chart(
            "asa",
            "step",
            &[
                Series {
                    name: "teacher",
                    points: vec![(0.0, 0.2), (10.0, 0.8)],
                    colour: red,
                    dashed: false,
                },
                Series {
                    name: "grid",
                    points: vec![(0.0, 0.5), (10.0, 0.5)],
                    colour: blue,
                    dashed: true,
                },
            ],
            (0.0, 1.0),
            200,
            120,
        );
        let count = |c: [u8; 3]| img.pixels().filter(|p| p.0 == c).count();
        assert!(
            count(red) > 100 && count(blue) > 50,
            "{} {}",
            count(red),
            count(blue)
        );
        // the teacher line rises: its pixels on the left are lower (larger y) than on the right
        let ys = |x: u32| (0..120).filter(|&y| img.get_pixel(x, y).0 == red).max();
        assert!(ys(60) > ys(170), "{:?} {:?}", ys(60), ys(170));
    }
}
