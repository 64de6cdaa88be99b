//! What a `segment` model's output becomes for people and machines: the per-pixel class map at
//! the input's size, each class's share of the pixels, and the colour overlay with a legend.
//! `ehm-segment` writes these; the library does the work so other callers get the same maps.
use crate::draw;
use crate::error::{Error, Result};
use image::{GrayImage, Rgb, RgbImage};

/// One image's segmentation: class indices at the image's size and the pixel count per class.
pub struct ClassMap {
    pub map: GrayImage,
    pub counts: Vec<u64>,
}

impl ClassMap {
    /// From the model's `[classes, size, size]` logits, resized bilinearly to `width × height`
    /// before the arg-max. `labels` names the classes; a model with more classes than labels
    /// is refused (`model` names it in the error).
    pub fn from_logits(
        logits: &[f32],
        classes: usize,
        size: usize,
        (width, height): (u32, u32),
        labels: &[String],
        model: &std::path::Path,
    ) -> Result<Self> {
        if classes > labels.len() {
            return Err(Error::Shape(format!(
                "{}: {classes} classes but {} labels",
                model.display(),
                labels.len()
            )));
        }
        let map =
            crate::pipeline::argmax_resized(logits, classes, size, width as usize, height as usize);
        let mut counts = vec![0u64; classes];
        for &c in &map {
            counts[c as usize] += 1;
        }
        let map = GrayImage::from_raw(width, height, map).expect("w·h class indices");
        Ok(ClassMap { map, counts })
    }

    /// (class, share of the pixels) of every class present, in class order.
    pub fn fractions(&self) -> Vec<(usize, f64)> {
        let total = self.map.width() as f64 * self.map.height() as f64;
        (0..self.counts.len())
            .filter(|&c| self.counts[c] > 0)
            .map(|c| (c, self.counts[c] as f64 / total))
            .collect()
    }

    /// `img` with the classes painted over it at opacity `alpha` (class 0, background, left
    /// clear) and a legend of the object classes present with their shares below.
    pub fn overlay_sheet(&self, img: &RgbImage, labels: &[String], alpha: f32) -> RgbImage {
        let (w, h) = self.map.dimensions();
        let present: Vec<(u8, String)> = self
            .fractions()
            .into_iter()
            .filter(|&(c, _)| c > 0)
            .map(|(c, f)| (c as u8, format!("{} {:.1}%", labels[c], 100.0 * f)))
            .collect();
        let over = draw::overlay(img, &self.map, alpha);
        let key = draw::legend(&present, w.max(200));
        let mut sheet = RgbImage::from_pixel(w.max(key.width()), h + key.height(), Rgb([255; 3]));
        draw::paste(&mut sheet, &over, 0, 0);
        draw::paste(&mut sheet, &key, 0, h);
        sheet
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_map_counts_and_shares_follow_the_logits() {
        // 2 classes on a 2×2 grid: class 1 wins the left column only
        let logits = [0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0];
        let labels = vec!["background".to_string(), "cat".to_string()];
        let p = std::path::Path::new("m.onnx");
        let m = ClassMap::from_logits(&logits, 2, 2, (2, 2), &labels, p).unwrap();
        assert_eq!(m.map.as_raw(), &vec![1, 0, 1, 0]);
        assert_eq!(m.counts, vec![2, 2]);
        assert_eq!(m.fractions(), vec![(0, 0.5), (1, 0.5)]);
        let img = RgbImage::from_pixel(2, 2, Rgb([10, 20, 30]));
        let sheet = m.overlay_sheet(&img, &labels, 0.5);
        assert!(
            sheet.width() >= 2 && sheet.height() > 2,
            "legend below the picture"
        );
        assert_eq!(
            sheet.get_pixel(1, 0),
            &Rgb([10, 20, 30]),
            "background stays clear"
        );
        assert_ne!(
            sheet.get_pixel(0, 0),
            &Rgb([10, 20, 30]),
            "the cat is painted"
        );
        // a model with more classes than labels is refused, naming the file
        let e = ClassMap::from_logits(&logits, 2, 2, (2, 2), &labels[..1], p)
            .err()
            .unwrap();
        assert!(e.to_string().contains("m.onnx"), "{e}");
    }
}
