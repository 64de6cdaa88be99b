//! Image descriptors for retrieval: an exported `embed` model (class token ⊕ GeM, L2-normalised)
//! or the perceptual hash baseline (pHash as imagehash computes it, stored as ±1/8 so that the
//! dot product of two hashes is 1 − 2·hamming/64). Both are compared by dot product, so one
//! index and one query path serve both. Regional views (crops at several scales) let a partial
//! copy match the part of the original it shows.
use crate::contract::Task;
use crate::data::image_io::load_rgb;
use crate::error::{Error, Result};
use crate::infer::{OrtModel, Parallelism};
use crate::pipeline::{
    self, crop_view, HashViews, Item, RunOptions, View, ViewFinder, ViewSize, FULL,
};
use image::RgbImage;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Which descriptor an index holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum DescriptorKind {
    /// An exported embed model (`--model`)
    Embed,
    /// 64-bit DCT perceptual hash (imagehash's phash)
    Phash,
}

/// Which regional views each indexed image gets besides the whole image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum Regions {
    /// The whole image only
    None,
    /// Whole image + 5 crops of 60 % side (4 corners, centre): 6 vectors per image
    Standard,
    /// Standard + a 3×3 grid of 40 % crops: 15 vectors per image
    Dense,
    /// Standard + up to 10 rectangles found in the picture (a photo pasted into it, the cells of
    /// a collage: `proposals::rectangles`): 6 … 16 vectors per image
    Auto,
}

/// Windows found per image for `r` (after the fixed `views(r)`).
pub fn extra_views(r: Regions) -> Option<ViewFinder> {
    fn six(img: &RgbImage) -> Vec<View> {
        super::proposals::rectangles(img, 10)
    }
    (r == Regions::Auto).then_some(six as ViewFinder)
}

/// Side of `Regions::Standard`'s crops (a fraction of the image's).
pub const CROP_SIDE: f32 = 0.6;

/// The views an indexed image is described by.
pub fn views(r: Regions) -> Vec<View> {
    let mut v = vec![FULL];
    if r == Regions::None {
        return v;
    }
    let s = CROP_SIDE;
    for (x, y) in [(0.0, 0.0), (0.4, 0.0), (0.0, 0.4), (0.4, 0.4), (0.2, 0.2)] {
        v.push([x, y, s, s]);
    }
    if r == Regions::Dense {
        for i in 0..3 {
            for j in 0..3 {
                v.push([0.3 * j as f32, 0.3 * i as f32, 0.4, 0.4]);
            }
        }
    }
    v
}

/// The image's luma at 32×32: `image::imageops::grayscale` then `resize(…, 32, 32, Lanczos3)`,
/// bit for bit (tested) — their arithmetic in the same order, but on one channel and a row at a
/// time, several times faster on large photos (pHash was an eighth of an index run's time).
fn luma_32x32(img: &RgbImage) -> Vec<u8> {
    const N: usize = 32;
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 {
        return vec![0; N * N]; // as `resize` of an empty image
    }
    // sRGB luma in integers, as `image`'s `Rgb::to_luma`
    let gray: Vec<u8> = img
        .as_raw()
        .chunks_exact(3)
        .map(|p| ((2126 * p[0] as u32 + 7152 * p[1] as u32 + 722 * p[2] as u32) / 10000) as u8)
        .collect();
    if (w, h) == (N, N) {
        return gray; // `resize` copies an image of the target size
    }
    // vertical pass: 32 rows of w sums, each sum over its taps in order
    let mut rows = vec![0f32; N * w];
    for (oy, (top, ws)) in lanczos3_taps(h, N).into_iter().enumerate() {
        let acc = &mut rows[oy * w..(oy + 1) * w];
        for (i, wt) in ws.into_iter().enumerate() {
            let src = &gray[(top + i) * w..(top + i + 1) * w];
            for (a, &p) in acc.iter_mut().zip(src) {
                *a += p as f32 * wt;
            }
        }
    }
    // horizontal pass, clamped and rounded to bytes
    let mut out = vec![0u8; N * N];
    for (ox, (left, ws)) in lanczos3_taps(w, N).into_iter().enumerate() {
        for y in 0..N {
            let row = &rows[y * w + left..];
            let mut t = 0f32;
            for (&v, &wt) in row.iter().zip(&ws) {
                t += v * wt;
            }
            out[y * N + ox] = t.clamp(0.0, 255.0).round() as u8;
        }
    }
    out
}

/// `image::imageops::sample`'s Lanczos3 filter from `len` samples to `n`: for each output, its
/// first input and normalised weights.
fn lanczos3_taps(len: usize, n: usize) -> Vec<(usize, Vec<f32>)> {
    fn sinc(t: f32) -> f32 {
        let a = t * std::f32::consts::PI;
        if t == 0.0 {
            1.0
        } else {
            a.sin() / a
        }
    }
    let kernel = |x: f32| {
        if x.abs() < 3.0 {
            sinc(x) * sinc(x / 3.0)
        } else {
            0.0
        }
    };
    let ratio = len as f32 / n as f32;
    let sratio = if ratio < 1.0 { 1.0 } else { ratio };
    let support = 3.0 * sratio;
    (0..n)
        .map(|o| {
            let centre = (o as f32 + 0.5) * ratio;
            let left = ((centre - support).floor() as i64).clamp(0, len as i64 - 1);
            let right = ((centre + support).ceil() as i64).clamp(left + 1, len as i64);
            let centre = centre - 0.5;
            let mut ws: Vec<f32> = (left..right)
                .map(|i| kernel((i as f32 - centre) / sratio))
                .collect();
            let mut sum = 0.0f32;
            for &w in &ws {
                sum += w;
            }
            for w in &mut ws {
                *w /= sum;
            }
            (left as usize, ws)
        })
        .collect()
}

/// pHash of an image: luma → 32×32 → 2-D DCT-II → the 8×8 lowest frequencies → bit = above their
/// median; returned as 64 values of ±1/8.
pub fn phash(img: &RgbImage) -> Vec<f32> {
    let px: Vec<f64> = luma_32x32(img).into_iter().map(f64::from).collect();
    let n = 32;
    // DCT-II along rows then columns, only the 8 lowest frequencies are needed in each
    let cos: Vec<f64> = (0..8 * n)
        .map(|i| {
            let (k, x) = (i / n, i % n);
            (std::f64::consts::PI * k as f64 * (2 * x + 1) as f64 / (2 * n) as f64).cos()
        })
        .collect();
    let mut rows = vec![0f64; n * 8]; // [y][k]
    for y in 0..n {
        for k in 0..8 {
            rows[y * 8 + k] = (0..n).map(|x| px[y * n + x] * cos[k * n + x]).sum();
        }
    }
    let mut low = [0f64; 64]; // [ky][kx]
    for ky in 0..8 {
        for kx in 0..8 {
            low[ky * 8 + kx] = (0..n).map(|y| rows[y * 8 + kx] * cos[ky * n + y]).sum();
        }
    }
    let mut sorted = low;
    sorted.sort_by(|a, b| a.total_cmp(b));
    let median = (sorted[31] + sorted[32]) / 2.0;
    low.iter()
        .map(|&v| if v > median { 0.125 } else { -0.125 })
        .collect()
}

/// pHash as 64 bits (bit i set where value i is above the median).
pub fn phash_bits(img: &RgbImage) -> u64 {
    bits_of(&phash(img))
}

fn bits_of(h: &[f32]) -> u64 {
    h.iter()
        .enumerate()
        .fold(0u64, |acc, (i, &v)| acc | (((v > 0.0) as u64) << i))
}

/// Similarity of two pHashes on the descriptor's scale: 1 − 2 · (differing bits) / 64.
pub fn phash_similarity(a: u64, b: u64) -> f32 {
    1.0 - (a ^ b).count_ones() as f32 / 32.0
}

/// pHash similarity from which two pictures are taken for the same picture (≤ 8 of 64 bits
/// differ; two unrelated photos get there with a chance of about 1e-8).
pub const EXACT_COPY: f32 = 0.75;

/// How `Describer::describe` runs.
pub struct DescribeOptions {
    /// Fixed windows of every image (the whole image first).
    pub views: Vec<View>,
    /// Windows chosen per image after those (`extra_views`).
    pub extra_views: Option<ViewFinder>,
    /// Also the pHash bits of the whole image or of every window (exact-copy evidence besides
    /// the embedding); `None`: none.
    pub hashes: Option<HashViews>,
    /// Also the patch tokens of every window (embed models with `patch_tokens`; for
    /// `verify`).
    pub patch_tokens: bool,
    /// At what size windows other than the whole image run (pHash ignores it).
    pub view_size: ViewSize,
    /// Also the whole image at the fitted size of a crop of this side (`RunOptions::
    /// rescaled_whole`; embed models that take any input size, without patch tokens).
    pub rescaled_whole: Option<f32>,
    /// How fitted sides round to whole patches (the index's rule).
    pub fit_rounding: pipeline::FitRounding,
    pub batch: usize,
    pub threads: usize,
    pub progress: bool,
}

/// What turns images into vectors.
pub struct Describer {
    pub kind: DescriptorKind,
    pub dim: usize,
    model: Option<OrtModel>,
    /// sha256 of the model file (embed), for the index's same-model check.
    pub model_sha256: Option<String>,
    pub model_path: Option<PathBuf>,
    pub model_name: Option<String>,
    /// sha256s of the model files whose embedding this model computes too (`ehm-export
    /// patch-tokens`): indexes built with them accept it.
    pub same_embedding_as: Vec<String>,
}

/// One described image.
pub struct Described {
    pub path: PathBuf,
    /// `views × dim` values.
    pub vectors: Vec<f32>,
    /// The windows described (fractions of the image; the whole image first).
    pub views: Vec<View>,
    /// pHash bits of the whole image or of each window, as asked for
    /// (`DescribeOptions::hashes`).
    pub hashes: Vec<u64>,
    /// The patch tokens of each window (`views × P × D`), when asked for
    /// (`DescribeOptions::patch_tokens`).
    pub tokens: Vec<f32>,
    pub width: u32,
    pub height: u32,
}

impl Describer {
    pub fn embed(model: &Path, par: Parallelism) -> Result<Self> {
        let m = OrtModel::open_with(model, par)?;
        pipeline::require_task(&m, Task::Embed, "ehm-retrieve")?;
        let dim =
            m.contract.config.embedding_dim.ok_or_else(|| {
                Error::bad_file(model, "embed model without ehm.config embedding_dim")
            })? as usize;
        let name = m.contract.source.as_ref().map(|s| s.name.clone());
        let same_embedding_as = m.contract.same_embedding_as.clone();
        Ok(Describer {
            kind: DescriptorKind::Embed,
            dim,
            model: Some(m),
            model_sha256: Some(crate::files::sha256_file(model)?),
            model_path: Some(std::fs::canonicalize(model).unwrap_or_else(|_| model.to_path_buf())),
            model_name: name,
            same_embedding_as,
        })
    }

    /// The patch-token grid (side, width) of a model with a `patch_tokens` output, else
    /// `None` (pHash, or an embed file from before the output existed).
    pub fn token_grid(&self) -> Option<(usize, usize)> {
        let c = &self.model.as_ref()?.contract;
        c.has_patch_tokens().then(|| {
            let cfg = &c.config;
            (
                (cfg.preprocess.image_size / cfg.patch_size) as usize,
                cfg.embed_dim as usize,
            )
        })
    }

    /// Whether the model runs at any multiple of its patch size (so windows can run at a
    /// fitted size, `ViewSize::Fit`); false for pHash.
    pub fn any_input_size(&self) -> bool {
        self.model
            .as_ref()
            .is_some_and(|m| m.contract.any_input_size)
    }

    pub fn phash() -> Self {
        Describer {
            kind: DescriptorKind::Phash,
            dim: 64,
            model: None,
            model_sha256: None,
            model_path: None,
            model_name: None,
            same_embedding_as: Vec::new(),
        }
    }

    /// Describe `paths` as `o` says, calling `each` in input order with the result or the
    /// one-line reason the file was skipped. Returns the number of failed files.
    pub fn describe<F>(
        &mut self,
        paths: &[PathBuf],
        o: &DescribeOptions,
        mut each: F,
    ) -> Result<usize>
    where
        F: FnMut(std::result::Result<Described, (PathBuf, String)>) -> Result<()>,
    {
        let (views, extra_views, batch, threads, progress) =
            (&o.views[..], o.extra_views, o.batch, o.threads, o.progress);
        let view_hash = o.hashes.map(|h| (phash_bits as pipeline::ViewHash, h));
        match &mut self.model {
            Some(model) => {
                let opts = RunOptions {
                    batch,
                    threads,
                    keep_images: false,
                    views: views.to_vec(),
                    progress,
                    extra_views,
                    view_hash,
                    patch_tokens: o.patch_tokens,
                    view_size: o.view_size,
                    rescaled_whole: o.rescaled_whole,
                    fit_rounding: o.fit_rounding,
                };
                pipeline::run(model, paths, &opts, |item| match item {
                    Item::Done {
                        prepared,
                        output,
                        tokens,
                        ..
                    } => each(Ok(Described {
                        path: prepared.path,
                        vectors: output.to_vec(),
                        views: prepared.views,
                        hashes: prepared.hashes,
                        tokens: tokens.to_vec(),
                        width: prepared.width,
                        height: prepared.height,
                    })),
                    Item::Failed { path, error } => each(Err((path, error))),
                })
            }
            None => {
                let bar = crate::progress::inputs_bar(paths.len(), progress);
                let mut failed = 0;
                for chunk in paths.chunks(batch.max(1) * 4) {
                    let done: Vec<_> = chunk
                        .par_iter()
                        .map(|p| {
                            let img = load_rgb(p).map_err(|e| (p.clone(), e.to_string()))?;
                            let mut views = views.to_vec();
                            if let Some(f) = extra_views {
                                views.extend(f(&img));
                            }
                            let vectors: Vec<f32> = views
                                .iter()
                                .flat_map(|v| {
                                    if *v == FULL {
                                        phash(&img)
                                    } else {
                                        phash(&crop_view(&img, v))
                                    }
                                })
                                .collect();
                            // the hash bits are the vector's signs
                            let hashes = match o.hashes {
                                Some(HashViews::Every) => vectors.chunks(64).map(bits_of).collect(),
                                Some(HashViews::Whole) => vec![bits_of(&vectors[..64])],
                                None => Vec::new(),
                            };
                            Ok(Described {
                                path: p.clone(),
                                vectors,
                                views,
                                hashes,
                                tokens: Vec::new(),
                                width: img.width(),
                                height: img.height(),
                            })
                        })
                        .collect();
                    for d in done {
                        bar.inc(1);
                        if let Err((_, e)) = &d {
                            failed += 1;
                            bar.suspend(|| eprintln!("skipped: {e}"));
                        }
                        each(d)?;
                    }
                }
                bar.finish_and_clear();
                Ok(failed)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luma_32x32_is_images_grayscale_and_lanczos3_resize_bit_for_bit() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let sizes = [
            (1, 1),
            (5, 3),
            (32, 32),
            (31, 33),
            (40, 7),
            (64, 64),
            (333, 201),
            (1200, 800),
        ];
        for (w, h) in sizes {
            // noise over a gradient: every tap weight matters
            let img = RgbImage::from_fn(w, h, |x, y| {
                let g = ((x * 255) / w.max(1) + (y * 128) / h.max(1)) as u8;
                image::Rgb([
                    g.wrapping_add(rng.random_range(0..40)),
                    rng.random(),
                    255 - g,
                ])
            });
            let gray = image::imageops::grayscale(&img);
            let want =
                image::imageops::resize(&gray, 32, 32, image::imageops::FilterType::Lanczos3);
            assert_eq!(luma_32x32(&img), want.into_raw(), "{w}×{h}");
        }
    }

    #[test]
    fn phash_is_stable_under_mild_changes_and_differs_across_images() {
        let a = RgbImage::from_fn(120, 90, |x, y| {
            image::Rgb([(x * 2) as u8, (y * 2) as u8, ((x * y) % 255) as u8])
        });
        let b = image::imageops::resize(&a, 200, 150, image::imageops::FilterType::Triangle);
        let c = RgbImage::from_fn(120, 90, |x, y| {
            image::Rgb([(y * 3) as u8, 255 - (x * 2) as u8, 40])
        });
        let dot = |p: &[f32], q: &[f32]| p.iter().zip(q).map(|(x, y)| x * y).sum::<f32>();
        let (ha, hb, hc) = (phash(&a), phash(&b), phash(&c));
        assert_eq!(ha.len(), 64);
        assert!((dot(&ha, &ha) - 1.0).abs() < 1e-6);
        assert!(dot(&ha, &hb) > 0.8, "resized copy: {}", dot(&ha, &hb));
        // the bit form gives the same similarity
        let (ba, bb) = (phash_bits(&a), phash_bits(&b));
        assert!((phash_similarity(ba, bb) - dot(&ha, &hb)).abs() < 1e-6);
        assert_eq!(phash_similarity(ba, ba), 1.0);
        assert_eq!(phash_similarity(ba, !ba), -1.0);
        assert!(dot(&ha, &hc) < 0.5, "other image: {}", dot(&ha, &hc));
    }

    #[test]
    fn region_presets() {
        assert_eq!(views(Regions::None).len(), 1);
        assert_eq!(views(Regions::Standard).len(), 6);
        assert_eq!(views(Regions::Dense).len(), 15);
        assert_eq!(views(Regions::Auto).len(), 6);
        assert!(extra_views(Regions::Standard).is_none() && extra_views(Regions::Auto).is_some());
        for v in views(Regions::Dense) {
            assert!(v[0] + v[2] <= 1.0 + 1e-6 && v[1] + v[3] <= 1.0 + 1e-6);
        }
    }
}
