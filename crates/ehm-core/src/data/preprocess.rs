//! THE preprocessing definition. Training, the ONNX metadata and every inference tool use
//! this struct and these functions; nobody else hard-codes a mean, a size or a resize rule.
use fast_image_resize::{
    images::Image as FirImage, FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer,
};
use image::RgbImage;
use rand::Rng;
use serde::{Deserialize, Serialize};

pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// Largest input side a model may declare: a ViT/16 at 4096² already has 65,536 tokens and
/// a 17 GB attention matrix per head; larger values are typos or hostile metadata.
pub const MAX_IMAGE_SIZE: u32 = 4096;
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Interpolation {
    Bilinear,
    Bicubic,
}

/// How an image of any size becomes `image_size × image_size` at evaluation time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResizeRule {
    /// timm's eval transform: scale the shorter side to `image_size / crop_pct`, centre-crop.
    ShorterSideCenterCrop,
    /// Scale both sides to `image_size` (aspect ratio not kept). Right for retrieval, where a
    /// centre crop would throw away the parts a partial copy may show.
    Stretch,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preprocess {
    pub image_size: u32,
    #[serde(default = "default_rule")]
    pub resize: ResizeRule,
    #[serde(default = "default_crop_pct")]
    pub crop_pct: f32,
    #[serde(default = "default_interp")]
    pub interpolation: Interpolation,
    #[serde(default = "default_mean")]
    pub mean: [f32; 3],
    #[serde(default = "default_std")]
    pub std: [f32; 3],
}
fn default_rule() -> ResizeRule {
    ResizeRule::ShorterSideCenterCrop
}
fn default_crop_pct() -> f32 {
    0.875
}
fn default_interp() -> Interpolation {
    Interpolation::Bicubic
}
fn default_mean() -> [f32; 3] {
    IMAGENET_MEAN
}
fn default_std() -> [f32; 3] {
    IMAGENET_STD
}

/// MAE's pretraining augmentation: RandomResizedCrop(scale, ratio) + horizontal flip; its
/// fine-tuning adds RandAugment on the cropped image.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Augment {
    pub scale: (f32, f32),
    pub ratio: (f32, f32),
    pub hflip: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rand_augment: Option<super::randaugment::RandAugment>,
}

impl Default for Augment {
    fn default() -> Self {
        Augment {
            scale: (0.2, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
            hflip: true,
            rand_augment: None,
        }
    }
}

/// A crop rectangle in source pixels (floating point, as fast_image_resize takes it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Crop {
    pub left: f64,
    pub top: f64,
    pub width: f64,
    pub height: f64,
}

impl Preprocess {
    pub fn imagenet(image_size: u32) -> Self {
        Preprocess {
            image_size,
            resize: ResizeRule::ShorterSideCenterCrop,
            crop_pct: 0.875,
            interpolation: Interpolation::Bicubic,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        }
    }

    /// Check every field (a zoo file, a checkpoint's config and a model's metadata all pass
    /// through here); the message names the field.
    pub fn validate(&self) -> crate::Result<()> {
        let bad = |m: String| Err(crate::Error::Config(m));
        if !(1..=MAX_IMAGE_SIZE).contains(&self.image_size) {
            return bad(format!(
                "preprocess.image_size must be 1 … {MAX_IMAGE_SIZE}, got {}",
                self.image_size
            ));
        }
        if !(self.crop_pct > 0.0 && self.crop_pct <= 1.0) {
            return bad(format!(
                "preprocess.crop_pct must be in (0, 1], got {}",
                self.crop_pct
            ));
        }
        if self.mean.iter().any(|m| !m.is_finite()) {
            return bad(format!(
                "preprocess.mean must be finite, got {:?}",
                self.mean
            ));
        }
        if self.std.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return bad(format!(
                "preprocess.std must be positive and finite, got {:?}",
                self.std
            ));
        }
        Ok(())
    }

    /// Number of f32 values one preprocessed image occupies (3 × size × size).
    pub fn tensor_len(&self) -> usize {
        3 * (self.image_size as usize).pow(2)
    }

    /// The evaluation crop of a `w × h` image under this rule.
    pub fn eval_crop(&self, w: u32, h: u32) -> Crop {
        match self.resize {
            ResizeRule::Stretch => Crop {
                left: 0.0,
                top: 0.0,
                width: w as f64,
                height: h as f64,
            },
            ResizeRule::ShorterSideCenterCrop => {
                // The centre square covering crop_pct of the shorter side, as timm's
                // Resize(size / crop_pct) + CenterCrop(size) does.
                let side = w.min(h) as f64 * self.crop_pct as f64;
                Crop {
                    left: (w as f64 - side) / 2.0,
                    top: (h as f64 - side) / 2.0,
                    width: side,
                    height: side,
                }
            }
        }
    }

    /// Evaluation transform: CHW float32 into `out` (length `tensor_len()`).
    pub fn eval_into(&self, img: &RgbImage, out: &mut [f32]) {
        let crop = self.eval_crop(img.width(), img.height());
        let resized = resize_crop(img, crop, self.image_size, self.interpolation);
        self.normalize_into(&resized, false, out);
    }

    pub fn eval(&self, img: &RgbImage) -> Vec<f32> {
        let mut v = vec![0.0; self.tensor_len()];
        self.eval_into(img, &mut v);
        v
    }

    /// Training transform (random resized crop + flip) into `out`.
    pub fn train_into(&self, img: &RgbImage, aug: &Augment, rng: &mut impl Rng, out: &mut [f32]) {
        let crop = random_resized_crop(img.width(), img.height(), aug, rng);
        let flip = aug.hflip && rng.random_bool(0.5);
        let mut resized = resize_crop(img, crop, self.image_size, self.interpolation);
        if let Some(ra) = &aug.rand_augment {
            ra.apply(&mut resized, rng);
        }
        self.normalize_into(&resized, flip, out);
    }

    /// Training transform, but stopping before normalisation: CHW bytes. The trainer ships
    /// bytes to the accelerator (4× less traffic) and normalises there with `mean`/`std`.
    pub fn train_u8_into(&self, img: &RgbImage, aug: &Augment, rng: &mut impl Rng, out: &mut [u8]) {
        let crop = random_resized_crop(img.width(), img.height(), aug, rng);
        let flip = aug.hflip && rng.random_bool(0.5);
        let mut resized = resize_crop(img, crop, self.image_size, self.interpolation);
        if let Some(ra) = &aug.rand_augment {
            ra.apply(&mut resized, rng);
        }
        chw_u8_into(&resized, flip, out);
    }

    /// Evaluation transform as CHW bytes (see `train_u8_into`).
    pub fn eval_u8_into(&self, img: &RgbImage, out: &mut [u8]) {
        let crop = self.eval_crop(img.width(), img.height());
        chw_u8_into(
            &resize_crop(img, crop, self.image_size, self.interpolation),
            false,
            out,
        );
    }

    /// (x/255 − mean)/std, HWC u8 → CHW f32, optionally mirrored.
    pub fn normalize_into(&self, img: &RgbImage, hflip: bool, out: &mut [f32]) {
        let (w, h) = (img.width() as usize, img.height() as usize);
        assert_eq!(out.len(), 3 * w * h, "output buffer has the wrong size");
        let raw = img.as_raw();
        let scale: [f32; 3] = std::array::from_fn(|c| 1.0 / (255.0 * self.std[c]));
        let shift: [f32; 3] = std::array::from_fn(|c| -self.mean[c] / self.std[c]);
        let plane = w * h;
        for y in 0..h {
            for x in 0..w {
                let sx = if hflip { w - 1 - x } else { x };
                let p = &raw[3 * (y * w + sx)..3 * (y * w + sx) + 3];
                for c in 0..3 {
                    out[c * plane + y * w + x] = p[c] as f32 * scale[c] + shift[c];
                }
            }
        }
    }
}

/// HWC u8 → CHW u8, optionally mirrored.
pub fn chw_u8_into(img: &RgbImage, hflip: bool, out: &mut [u8]) {
    let (w, h) = (img.width() as usize, img.height() as usize);
    assert_eq!(out.len(), 3 * w * h, "output buffer has the wrong size");
    let raw = img.as_raw();
    let plane = w * h;
    for y in 0..h {
        for x in 0..w {
            let sx = if hflip { w - 1 - x } else { x };
            for c in 0..3 {
                out[c * plane + y * w + x] = raw[3 * (y * w + sx) + c];
            }
        }
    }
}

/// torchvision's RandomResizedCrop.get_params: 10 tries at a random area/aspect, then a
/// centre crop clamped to the allowed ratio.
pub fn random_resized_crop(w: u32, h: u32, aug: &Augment, rng: &mut impl Rng) -> Crop {
    let (wf, hf) = (w as f64, h as f64);
    let area = wf * hf;
    let (lr0, lr1) = ((aug.ratio.0 as f64).ln(), (aug.ratio.1 as f64).ln());
    for _ in 0..10 {
        let target = area * rng.random_range(aug.scale.0 as f64..=aug.scale.1 as f64);
        let ratio = rng.random_range(lr0..=lr1).exp();
        let cw = (target * ratio).sqrt().round();
        let ch = (target / ratio).sqrt().round();
        if cw > 0.0 && ch > 0.0 && cw <= wf && ch <= hf {
            let left = rng.random_range(0.0..=(wf - cw)).floor();
            let top = rng.random_range(0.0..=(hf - ch)).floor();
            return Crop {
                left,
                top,
                width: cw,
                height: ch,
            };
        }
    }
    let in_ratio = wf / hf;
    let (cw, ch) = if in_ratio < aug.ratio.0 as f64 {
        (wf, (wf / aug.ratio.0 as f64).round())
    } else if in_ratio > aug.ratio.1 as f64 {
        ((hf * aug.ratio.1 as f64).round(), hf)
    } else {
        (wf, hf)
    };
    Crop {
        left: ((wf - cw) / 2.0).floor(),
        top: ((hf - ch) / 2.0).floor(),
        width: cw,
        height: ch,
    }
}

/// Crop and resize to `size × size` with an antialiased convolution filter (PIL-equivalent).
pub fn resize_crop(img: &RgbImage, crop: Crop, size: u32, interp: Interpolation) -> RgbImage {
    resize_crop_to(img, crop, size, size, interp)
}

pub fn resize_crop_to(
    img: &RgbImage,
    crop: Crop,
    out_w: u32,
    out_h: u32,
    interp: Interpolation,
) -> RgbImage {
    let full = crop.left == 0.0
        && crop.top == 0.0
        && crop.width == img.width() as f64
        && crop.height == img.height() as f64;
    if full && img.width() == out_w && img.height() == out_h {
        return img.clone();
    }
    let filter = match interp {
        Interpolation::Bilinear => FilterType::Bilinear,
        Interpolation::Bicubic => FilterType::CatmullRom,
    };
    let mut dst = FirImage::new(out_w, out_h, PixelType::U8x3);
    let opts = ResizeOptions::new()
        .resize_alg(ResizeAlg::Convolution(filter))
        .crop(crop.left, crop.top, crop.width, crop.height);
    // Both images are U8x3 and the crop lies inside the source: this cannot fail.
    Resizer::new()
        .resize(img, &mut dst, &opts)
        .expect("resize of a valid RGB image");
    RgbImage::from_raw(out_w, out_h, dst.into_vec()).expect("buffer size matches")
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn normalize_matches_formula() {
        let p = Preprocess {
            resize: ResizeRule::Stretch,
            ..Preprocess::imagenet(2)
        };
        let img = RgbImage::from_raw(2, 2, vec![0, 128, 255, 10, 20, 30, 40, 50, 60, 70, 80, 90])
            .unwrap();
        let v = p.eval(&img);
        assert_eq!(v.len(), 12);
        let expect = (128.0 / 255.0 - 0.456) / 0.224;
        assert!((v[4] - expect).abs() < 1e-6, "{} vs {}", v[4], expect);
    }

    #[test]
    fn flip_mirrors_columns() {
        let p = Preprocess {
            image_size: 2,
            mean: [0.0; 3],
            std: [1.0; 3],
            ..Preprocess::imagenet(2)
        };
        let img = RgbImage::from_raw(2, 1, vec![255, 255, 255, 0, 0, 0]).unwrap();
        let mut out = vec![0.0; 6];
        p.normalize_into(&img, true, &mut out);
        assert_eq!(out[0], 0.0);
        assert_eq!(out[1], 1.0);
    }

    #[test]
    fn eval_crop_is_centered_square() {
        let p = Preprocess::imagenet(224);
        let c = p.eval_crop(400, 200);
        assert!((c.width - 175.0).abs() < 1e-9 && c.width == c.height);
        assert!((c.left - 112.5).abs() < 1e-9);
    }

    #[test]
    fn random_crop_stays_inside() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        for _ in 0..500 {
            let c = random_resized_crop(300, 120, &Augment::default(), &mut rng);
            assert!(c.left >= 0.0 && c.top >= 0.0);
            assert!(c.left + c.width <= 300.0 && c.top + c.height <= 120.0);
            assert!(c.width >= 1.0 && c.height >= 1.0);
        }
    }

    #[test]
    fn resize_constant_image_stays_constant() {
        let img = RgbImage::from_pixel(37, 23, image::Rgb([100, 150, 200]));
        let p = Preprocess {
            image_size: 16,
            ..Preprocess::imagenet(16)
        };
        let crop = p.eval_crop(37, 23);
        let r = resize_crop(&img, crop, 16, Interpolation::Bicubic);
        assert!(r.pixels().all(|px| px.0 == [100, 150, 200]));
    }
}
