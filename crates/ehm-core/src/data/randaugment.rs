//! RandAugment as MAE's fine-tuning uses it (timm's `rand-m9-mstd0.5-inc1`): per image, `ops`
//! operations drawn with replacement from timm's "increasing" set, each applied with
//! probability ½ at a magnitude drawn from N(m, std) clipped to [0, 10]. The operations work
//! on the 8-bit image the crop produced, with PIL's formulas; geometric ones fill with
//! ImageNet's mean colour, as timm does.
use image::RgbImage;
use rand::Rng;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RandAugment {
    /// Operations per image (timm's `n`, 2).
    pub ops: usize,
    /// Magnitude out of 10 (timm's `m`, 9).
    pub magnitude: f64,
    /// Per-operation magnitude noise (timm's `mstd`, 0.5).
    pub magnitude_std: f64,
}

impl Default for RandAugment {
    fn default() -> Self {
        RandAugment {
            ops: 2,
            magnitude: 9.0,
            magnitude_std: 0.5,
        }
    }
}

/// timm's fill colour for geometric operations: ImageNet's mean in bytes.
const FILL: [u8; 3] = [124, 116, 104];

/// The operations (timm `_RAND_INCREASING_TRANSFORMS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    AutoContrast,
    Equalize,
    Invert,
    Rotate,
    Posterize,
    Solarize,
    SolarizeAdd,
    Color,
    Contrast,
    Brightness,
    Sharpness,
    ShearX,
    ShearY,
    TranslateX,
    TranslateY,
}

pub const OPS: [Op; 15] = [
    Op::AutoContrast,
    Op::Equalize,
    Op::Invert,
    Op::Rotate,
    Op::Posterize,
    Op::Solarize,
    Op::SolarizeAdd,
    Op::Color,
    Op::Contrast,
    Op::Brightness,
    Op::Sharpness,
    Op::ShearX,
    Op::ShearY,
    Op::TranslateX,
    Op::TranslateY,
];

impl RandAugment {
    /// Parse timm's spelling, e.g. `rand-m9-mstd0.5-inc1` (only the increasing set exists here).
    pub fn parse(s: &str) -> Result<RandAugment, String> {
        let mut ra = RandAugment::default();
        let mut parts = s.split('-');
        if parts.next() != Some("rand") {
            return Err(format!("{s:?}: expected timm's rand-m9-mstd0.5-inc1 form"));
        }
        for p in parts {
            let num = |v: &str| {
                v.parse::<f64>()
                    .map_err(|_| format!("{s:?}: bad number in {p:?}"))
            };
            if let Some(v) = p.strip_prefix("mstd") {
                ra.magnitude_std = num(v)?;
            } else if let Some(v) = p.strip_prefix('m') {
                ra.magnitude = num(v)?;
            } else if let Some(v) = p.strip_prefix('n') {
                ra.ops = num(v)? as usize;
            } else if p == "inc1" {
            } else {
                return Err(format!("{s:?}: unknown part {p:?} (n, m, mstd, inc1)"));
            }
        }
        let std_ok = ra.magnitude_std.is_finite() && ra.magnitude_std >= 0.0;
        if !(0.0..=10.0).contains(&ra.magnitude) || !std_ok || ra.ops > 8 {
            return Err(format!("{s:?}: magnitude 0–10, mstd ≥ 0, at most 8 ops"));
        }
        Ok(ra)
    }

    /// Apply to `img` in place.
    pub fn apply(&self, img: &mut RgbImage, rng: &mut impl Rng) {
        for _ in 0..self.ops {
            let op = OPS[rng.random_range(0..OPS.len())];
            if !rng.random_bool(0.5) {
                continue;
            }
            let m = if self.magnitude_std > 0.0 {
                // Box–Muller: one normal draw
                let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random());
                self.magnitude
                    + self.magnitude_std
                        * (-2.0 * u1.ln()).sqrt()
                        * (std::f64::consts::TAU * u2).cos()
            } else {
                self.magnitude
            };
            let sign = if rng.random_bool(0.5) { 1.0 } else { -1.0 };
            apply_op(img, op, m.clamp(0.0, 10.0) / 10.0, sign);
        }
    }
}

/// One operation at level `l` ∈ [0, 1] (magnitude / 10); `sign` flips the symmetric ones.
pub fn apply_op(img: &mut RgbImage, op: Op, l: f64, sign: f64) {
    match op {
        Op::AutoContrast => autocontrast(img),
        Op::Equalize => equalize(img),
        Op::Invert => lut(img, |v| 255 - v),
        Op::Posterize => {
            let bits = 4 - (l * 4.0) as u32;
            let mask = !(((1u32 << (8 - bits)) - 1) as u8);
            lut(img, |v| v & mask)
        }
        Op::Solarize => {
            let thresh = 256 - (l * 256.0) as i32;
            lut(img, |v| if (v as i32) >= thresh { 255 - v } else { v })
        }
        Op::SolarizeAdd => {
            let add = (l * 110.0) as u32;
            lut(img, |v| {
                if v < 128 {
                    (v as u32 + add).min(255) as u8
                } else {
                    v
                }
            })
        }
        Op::Color => {
            let grey = greyscale(img);
            blend(img, |_, i| grey[i / 3] as f64, 1.0 + l * 0.9 * sign)
        }
        Op::Contrast => {
            let grey = greyscale(img);
            let mean = (grey.iter().map(|&g| g as f64).sum::<f64>() / grey.len().max(1) as f64
                + 0.5)
                .floor();
            blend(img, |_, _| mean, 1.0 + l * 0.9 * sign)
        }
        Op::Brightness => blend(img, |_, _| 0.0, 1.0 + l * 0.9 * sign),
        Op::Sharpness => {
            let smooth = smoothed(img);
            blend(img, |_, i| smooth[i] as f64, 1.0 + l * 0.9 * sign)
        }
        Op::Rotate => {
            let a = (l * 30.0 * sign).to_radians();
            let (w, h) = (img.width() as f64, img.height() as f64);
            let (cx, cy) = (w / 2.0, h / 2.0);
            let (c, s) = (a.cos(), a.sin());
            affine(
                img,
                [c, s, cx - c * cx - s * cy, -s, c, cy + s * cx - c * cy],
            )
        }
        Op::ShearX => affine(img, [1.0, l * 0.3 * sign, 0.0, 0.0, 1.0, 0.0]),
        Op::ShearY => affine(img, [1.0, 0.0, 0.0, l * 0.3 * sign, 1.0, 0.0]),
        Op::TranslateX => {
            let px = l * 0.45 * sign * img.width() as f64;
            affine(img, [1.0, 0.0, px, 0.0, 1.0, 0.0])
        }
        Op::TranslateY => {
            let py = l * 0.45 * sign * img.height() as f64;
            affine(img, [1.0, 0.0, 0.0, 0.0, 1.0, py])
        }
    }
}

fn lut(img: &mut RgbImage, f: impl Fn(u8) -> u8) {
    let table: [u8; 256] = std::array::from_fn(|v| f(v as u8));
    for v in img.iter_mut() {
        *v = table[*v as usize];
    }
}

/// PIL's "L": (299 R + 587 G + 114 B) / 1000, one value per pixel.
fn greyscale(img: &RgbImage) -> Vec<u8> {
    img.pixels()
        .map(|p| ((299 * p[0] as u32 + 587 * p[1] as u32 + 114 * p[2] as u32 + 500) / 1000) as u8)
        .collect()
}

/// PIL's ImageEnhance: `degenerate + factor · (img − degenerate)`, rounded and clipped.
/// `degenerate(channel_index, flat_index)` gives the degenerate image's value.
fn blend(img: &mut RgbImage, degenerate: impl Fn(usize, usize) -> f64, factor: f64) {
    for (i, v) in img.iter_mut().enumerate() {
        let d = degenerate(i % 3, i);
        *v = (d + factor * (*v as f64 - d)).round().clamp(0.0, 255.0) as u8;
    }
}

/// PIL's SMOOTH filter (3×3, centre weight 5, sum 13); the border keeps its pixels.
fn smoothed(img: &RgbImage) -> Vec<u8> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let raw = img.as_raw();
    let mut out = raw.clone();
    for y in 1..h.saturating_sub(1) {
        for x in 1..w.saturating_sub(1) {
            for c in 0..3 {
                let mut s = 0u32;
                for dy in 0..3 {
                    for dx in 0..3 {
                        let wgt = if dx == 1 && dy == 1 { 5 } else { 1 };
                        s += wgt * raw[3 * ((y + dy - 1) * w + x + dx - 1) + c] as u32;
                    }
                }
                out[3 * (y * w + x) + c] = ((s + 6) / 13) as u8;
            }
        }
    }
    out
}

/// Stretch each channel's [min, max] to [0, 255] (PIL autocontrast, no cutoff).
fn autocontrast(img: &mut RgbImage) {
    for c in 0..3 {
        let vals = img.pixels().map(|p| p[c]);
        let (lo, hi) = vals.fold((255u8, 0u8), |(lo, hi), v| (lo.min(v), hi.max(v)));
        if hi <= lo {
            continue;
        }
        let scale = 255.0 / (hi - lo) as f64;
        for p in img.pixels_mut() {
            p[c] = ((p[c] - lo) as f64 * scale).round().clamp(0.0, 255.0) as u8;
        }
    }
}

/// PIL's ImageOps.equalize, per channel.
fn equalize(img: &mut RgbImage) {
    for c in 0..3 {
        let mut hist = [0usize; 256];
        img.pixels().for_each(|p| hist[p[c] as usize] += 1);
        let last = hist.iter().rposition(|&n| n > 0).map_or(0, |i| hist[i]);
        let step = (hist.iter().sum::<usize>() - last) / 255;
        if step == 0 {
            continue;
        }
        let mut table = [0u8; 256];
        let mut n = step / 2;
        for (i, t) in table.iter_mut().enumerate() {
            *t = (n / step).min(255) as u8;
            n += hist[i];
        }
        for p in img.pixels_mut() {
            p[c] = table[p[c] as usize];
        }
    }
}

/// PIL's `Image.transform(AFFINE, (a, b, c, d, e, f))`: output pixel (x, y) samples the input at
/// (a·x + b·y + c, d·x + e·y + f), bilinearly (pixel centres), outside the image the fill colour.
fn affine(img: &mut RgbImage, m: [f64; 6]) {
    let src = img.clone();
    let (w, h) = (src.width() as i64, src.height() as i64);
    let at = |x: i64, y: i64, c: usize| -> f64 {
        if x < 0 || y < 0 || x >= w || y >= h {
            FILL[c] as f64
        } else {
            src.get_pixel(x as u32, y as u32)[c] as f64
        }
    };
    for (x, y, p) in img.enumerate_pixels_mut() {
        let (xf, yf) = (x as f64 + 0.5, y as f64 + 0.5);
        let sx = m[0] * xf + m[1] * yf + m[2] - 0.5;
        let sy = m[3] * xf + m[4] * yf + m[5] - 0.5;
        if sx < -1.0 || sy < -1.0 || sx > w as f64 || sy > h as f64 {
            *p = image::Rgb(FILL);
            continue;
        }
        let (x0, y0) = (sx.floor() as i64, sy.floor() as i64);
        let (fx, fy) = (sx - x0 as f64, sy - y0 as f64);
        for c in 0..3 {
            let v = at(x0, y0, c) * (1.0 - fx) * (1.0 - fy)
                + at(x0 + 1, y0, c) * fx * (1.0 - fy)
                + at(x0, y0 + 1, c) * (1.0 - fx) * fy
                + at(x0 + 1, y0 + 1, c) * fx * fy;
            p[c] = v.round().clamp(0.0, 255.0) as u8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn ramp() -> RgbImage {
        RgbImage::from_fn(20, 12, |x, y| {
            image::Rgb([(x * 10 + 40) as u8, (y * 12 + 30) as u8, 90])
        })
    }

    #[test]
    fn parses_timms_spelling() {
        assert_eq!(
            RandAugment::parse("rand-m9-mstd0.5-inc1").unwrap(),
            RandAugment::default()
        );
        let r = RandAugment::parse("rand-n3-m5").unwrap();
        assert_eq!((r.ops, r.magnitude, r.magnitude_std), (3, 5.0, 0.5));
        for bad in ["auto-m9", "rand-m11", "rand-x2", "rand-mstd-1"] {
            assert!(RandAugment::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn operations_do_what_pil_does() {
        let img = ramp();
        let px = |i: &RgbImage, x, y| i.get_pixel(x, y).0;
        // level 0 leaves every enhancement and geometric op alone
        for op in [
            Op::Rotate,
            Op::ShearX,
            Op::TranslateY,
            Op::Color,
            Op::Contrast,
            Op::Sharpness,
        ] {
            let mut a = img.clone();
            apply_op(&mut a, op, 0.0, 1.0);
            assert_eq!(a, img, "{op:?} at level 0");
        }
        let mut a = img.clone();
        apply_op(&mut a, Op::Invert, 0.5, 1.0);
        assert_eq!(px(&a, 3, 4), [255 - 70, 255 - 78, 165]);
        // posterize at level 0.9 keeps 1 bit; solarize at level 1 inverts everything
        let mut a = img.clone();
        apply_op(&mut a, Op::Posterize, 0.9, 1.0);
        assert!(a.iter().all(|&v| v == 0 || v == 128));
        let mut a = img.clone();
        apply_op(&mut a, Op::Solarize, 1.0, 1.0);
        assert_eq!(px(&a, 0, 0), [215, 225, 165]);
        // brightness 1 − 0.9 darkens to a tenth
        let mut a = img.clone();
        apply_op(&mut a, Op::Brightness, 1.0, -1.0);
        assert_eq!(px(&a, 15, 0), [19, 3, 9]);
        // autocontrast stretches each channel to 0 … 255 (a flat channel is kept)
        let mut a = img.clone();
        apply_op(&mut a, Op::AutoContrast, 1.0, 1.0);
        assert_eq!((px(&a, 0, 0), px(&a, 19, 11)), ([0, 0, 90], [255, 255, 90]));
        // translate by 0.45 of the width: the left part comes from the right, the rest is fill
        let mut a = img.clone();
        apply_op(&mut a, Op::TranslateX, 1.0, 1.0);
        assert_eq!(px(&a, 0, 5), px(&img, 9, 5));
        assert_eq!(px(&a, 19, 5), FILL);
        // equalize spreads a ramp over the range (PIL leaves images with too few pixels per
        // level alone: the 20 × 12 ramp stays as it is)
        let mut a = img.clone();
        apply_op(&mut a, Op::Equalize, 1.0, 1.0);
        assert_eq!(a, img);
        let big = RgbImage::from_fn(64, 64, |x, _| image::Rgb([(x * 2 + 40) as u8; 3]));
        let mut a = big.clone();
        apply_op(&mut a, Op::Equalize, 1.0, 1.0);
        assert_eq!((px(&a, 0, 0)[0], px(&a, 63, 0)[0]), (0, 255));
    }

    #[test]
    fn the_same_seed_gives_the_same_image_and_it_changes_it() {
        let ra = RandAugment::default();
        let run = |seed| {
            let mut a = ramp();
            ra.apply(&mut a, &mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
            a
        };
        assert_eq!(run(3), run(3));
        let changed = (0..20).filter(|&s| run(s) != ramp()).count();
        // each of 2 ops applies with p = ½: about 3 in 4 images change
        assert!((10..=20).contains(&changed), "{changed}");
    }
}
