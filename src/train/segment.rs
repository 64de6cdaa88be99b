//! `ehm-train segment`: a backbone plus a linear head on its patch tokens (Segmenter's linear
//! decoder: per-token class logits, bilinearly upsampled to the input), trained with
//! cross-entropy that ignores label 255. The backbone is fine-tuned with layer-wise lr decay, or
//! frozen (`--freeze-backbone`). Resumable like pretraining. Evaluation at each val image's own
//! resolution: mIoU, per-class IoU, pixel accuracy, and a sheet of predictions vs truth.
//!
//! Input rule: images are stretched to `image_size²` (no crop), so a prediction covers the
//! whole image and maps back to it exactly; the checkpoint's preprocess says so for the tools.
use super::optim::FlatParams;
use super::supervised::{self, BackboneWeights, Recipe};
use crate::data::preprocess::{chw_u8_into, random_resized_crop, resize_crop_to, Crop, ResizeRule};
use crate::data::segdata::{list_split, read_classes, read_pair};
use crate::data::{Augment, Preprocess};
use crate::error::{Error, IoContext, Result};
use crate::eval::{SegMeter, SegScores};
use crate::files::{write_atomic, write_png_atomic};
use crate::model::Encoder;
use image::{GrayImage, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::{nn, nn::Module, Device, Kind, Tensor};

pub const IGNORE: u8 = 255;

#[derive(Clone, Debug)]
pub struct SegmentOptions {
    pub checkpoint: PathBuf,
    /// A folder with images/{train,val}/ and masks/{train,val}/ (+ classes.json).
    pub data: PathBuf,
    pub train_limit: usize,
    pub val_limit: usize,
    pub image_size: Option<u32>,
    pub freeze_backbone: bool,
    pub recipe: Recipe,
    pub out: PathBuf,
    /// Val images shown in `predictions.png`.
    pub sheet: usize,
    pub fresh: bool,
    pub progress: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SegmentReport {
    pub miou: f64,
    pub pixel_accuracy: f64,
    pub per_class_iou: Vec<(String, Option<f64>)>,
    pub train_images: usize,
    pub val_images: usize,
    pub image_size: u32,
    pub epochs: usize,
    pub steps: u64,
    pub frozen_backbone: bool,
    pub resumed_from: Option<u64>,
    pub first_epoch_loss: Option<f64>,
    pub last_epoch_loss: Option<f64>,
    #[serde(serialize_with = "crate::files::lossy_path")]
    pub checkpoint: PathBuf,
    #[serde(serialize_with = "crate::files::lossy_path")]
    pub predictions_png: PathBuf,
}

impl std::fmt::Display for SegmentReport {
    /// The report for people (`--json` prints the struct).
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        writeln!(
            f,
            "segmentation: mIoU {:.2} %, pixel accuracy {:.2} % on {} val images ({} train, {}², {} epochs, backbone {})",
            100.0 * self.miou,
            100.0 * self.pixel_accuracy,
            self.val_images,
            self.train_images,
            self.image_size,
            self.epochs,
            if self.frozen_backbone { "frozen" } else { "fine-tuned" }
        )?;
        writeln!(f, "  {:<14} {:>8}", "class", "IoU")?;
        for (c, iou) in &self.per_class_iou {
            match iou {
                Some(v) => writeln!(f, "  {c:<14} {:>7.2} %", 100.0 * v)?,
                None => writeln!(f, "  {c:<14} {:>8}", "—")?,
            }
        }
        writeln!(f, "  checkpoint     {}", self.checkpoint.display())?;
        write!(f, "  predictions    {}", self.predictions_png.display())
    }
}

/// One split of a segmentation folder, decoded.
pub struct SegSplit {
    pub names: Vec<String>,
    pub images: Vec<RgbImage>,
    pub masks: Vec<GrayImage>,
}

impl SegSplit {
    /// The first `limit` pairs (0 = all) of `split`, decoded in parallel.
    pub fn open(root: &Path, split: &str, limit: usize) -> Result<Self> {
        let mut names = list_split(root, split)?;
        if limit > 0 {
            names.truncate(limit);
        }
        if names.is_empty() {
            return Err(Error::MissingData(format!(
                "{}: no images in images/{split}",
                root.display()
            )));
        }
        let pairs: Vec<(RgbImage, GrayImage)> = names
            .par_iter()
            .map(|n| read_pair(root, split, n))
            .collect::<Result<_>>()?;
        let (images, masks) = pairs.into_iter().unzip();
        Ok(SegSplit {
            names,
            images,
            masks,
        })
    }

    pub(super) fn max_label(&self) -> u8 {
        self.masks
            .iter()
            .flat_map(|m| m.as_raw().iter().copied().filter(|&v| v != IGNORE))
            .max()
            .unwrap_or(0)
    }
}

/// The class-index map `mask` cropped to `crop` and resized to `size²` by nearest neighbour.
pub(crate) fn mask_crop(mask: &GrayImage, crop: Crop, size: u32, hflip: bool) -> Vec<u8> {
    let (w, h) = (mask.width() as f64, mask.height() as f64);
    let mut out = Vec::with_capacity((size * size) as usize);
    for y in 0..size {
        let sy = (crop.top + (y as f64 + 0.5) * crop.height / size as f64).floor();
        for x in 0..size {
            let xo = if hflip { size - 1 - x } else { x };
            let sx = (crop.left + (xo as f64 + 0.5) * crop.width / size as f64).floor();
            let (sx, sy) = (sx.clamp(0.0, w - 1.0) as u32, sy.clamp(0.0, h - 1.0) as u32);
            out.push(mask.get_pixel(sx, sy).0[0]);
        }
    }
    out
}

/// A training batch: jointly augmented images (CHW bytes) and targets, a pure function of
/// (seed, step), so a resumed run sees the same data.
fn train_batch(
    split: &SegSplit,
    pre: &Preprocess,
    batch: usize,
    seed: u64,
    step: u64,
) -> (Vec<u8>, Vec<u8>) {
    let s = pre.image_size;
    let n = split.images.len();
    let aug = Augment {
        scale: (0.35, 1.0),
        ..Augment::default()
    };
    let per: Vec<(Vec<u8>, Vec<u8>)> = (0..batch)
        .into_par_iter()
        .map(|j| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5e9_5e9);
            rng.set_stream(step << 16 | j as u64);
            let i = rng.random_range(0..n);
            let (img, mask) = (&split.images[i], &split.masks[i]);
            let crop = random_resized_crop(img.width(), img.height(), &aug, &mut rng);
            let flip = rng.random_bool(0.5);
            let rgb = resize_crop_to(img, crop, s, s, pre.interpolation);
            let mut px = vec![0u8; (3 * s * s) as usize];
            chw_u8_into(&rgb, flip, &mut px);
            (px, mask_crop(mask, crop, s, flip))
        })
        .collect();
    let mut pixels = Vec::with_capacity(batch * (3 * s * s) as usize);
    let mut targets = Vec::with_capacity(batch * (s * s) as usize);
    for (p, t) in per {
        pixels.extend(p);
        targets.extend(t);
    }
    (pixels, targets)
}

/// The segmenter: encoder + `seg_head` (linear on patch tokens).
pub struct Segmenter {
    pub encoder: Encoder,
    pub head: nn::Linear,
    pub image_size: i64,
}

impl Segmenter {
    /// Per-pixel logits `[B, C, S, S]` (fp32) of normalised images `[B, 3, S, S]`.
    pub fn logits(&self, imgs: &Tensor, drop_path: f64, frozen: bool) -> Tensor {
        let tokens = if frozen {
            tch::no_grad(|| self.encoder.forward_features(imgs)).detach()
        } else if drop_path > 0.0 {
            self.encoder.forward_features_train(imgs, drop_path)
        } else {
            self.encoder.forward_features(imgs)
        };
        let (b, n, _) = tokens.size3().unwrap();
        let g = ((n - 1) as f64).sqrt().round() as i64;
        let l = self
            .head
            .forward(&tokens.narrow(1, 1, n - 1))
            .to_kind(Kind::Float);
        let c = l.size()[2];
        l.permute([0, 2, 1])
            .reshape([b, c, g, g])
            .upsample_bilinear2d([self.image_size, self.image_size], false, None, None)
    }
}

/// Evaluate on `val` at each image's own size; returns the scores and the predicted maps.
pub fn evaluate(
    model: &Segmenter,
    pre: &Preprocess,
    val: &SegSplit,
    classes: usize,
    device: Device,
) -> Result<(SegScores, Vec<GrayImage>)> {
    let mut meter = SegMeter::new(classes, Some(IGNORE));
    let mut preds = Vec::with_capacity(val.images.len());
    let len = pre.tensor_len();
    for chunk in (0..val.images.len()).collect::<Vec<_>>().chunks(16) {
        let mut buf = vec![0f32; chunk.len() * len];
        buf.par_chunks_mut(len)
            .zip(chunk.par_iter())
            .for_each(|(out, &i)| pre.eval_into(&val.images[i], out));
        let s = pre.image_size as i64;
        let x = Tensor::from_slice(&buf)
            .view([chunk.len() as i64, 3, s, s])
            .to_device(device);
        let logits = tch::no_grad(|| model.logits(&x, 0.0, true));
        for (j, &i) in chunk.iter().enumerate() {
            let m = &val.masks[i];
            let (w, h) = (m.width() as i64, m.height() as i64);
            let p = tch::no_grad(|| {
                logits
                    .narrow(0, j as i64, 1)
                    .upsample_bilinear2d([h, w], false, None, None)
                    .argmax(1, false)
                    .to_kind(Kind::Uint8)
                    .to_device(Device::Cpu)
                    .view(-1)
            });
            let p: Vec<u8> = Vec::try_from(&p).expect("u8 tensor");
            meter.add(m.as_raw(), &p);
            preds.push(GrayImage::from_raw(w as u32, h as u32, p).expect("h·w"));
        }
    }
    Ok((meter.scores(), preds))
}

/// The training loss of a segmentation head: per-pixel cross-entropy of `logits` [B, C, H, W]
/// against `target` [B, H, W], ignoring `IGNORE` (object borders), with the recipe's label
/// smoothing.
pub(super) fn pixel_loss(logits: &Tensor, target: &Tensor, r: &Recipe) -> Tensor {
    logits.cross_entropy_loss::<Tensor>(
        target,
        None,
        tch::Reduction::Mean,
        IGNORE as i64,
        r.label_smoothing,
    )
}

/// Rows of image | truth | prediction for the first `n` val images.
pub(super) fn predictions_sheet(
    val: &SegSplit,
    preds: &[GrayImage],
    n: usize,
    classes: &[String],
) -> RgbImage {
    use crate::draw::{colourise, legend, overlay, sheet};
    let rows: Vec<Vec<RgbImage>> = (0..n.min(val.images.len()))
        .map(|i| {
            vec![
                val.images[i].clone(),
                overlay(&val.images[i], &val.masks[i], 0.6),
                overlay(&val.images[i], &preds[i], 0.6),
                colourise(&preds[i]),
            ]
        })
        .collect();
    let entries: Vec<(u8, String)> = classes
        .iter()
        .enumerate()
        .skip(1)
        .map(|(k, c)| (k as u8, c.clone()))
        .collect();
    let grid = sheet(&rows);
    let key = legend(&entries, grid.width());
    let mut out = RgbImage::from_pixel(
        grid.width(),
        grid.height() + key.height(),
        image::Rgb([255; 3]),
    );
    crate::draw::paste(&mut out, &grid, 0, 0);
    crate::draw::paste(&mut out, &key, 0, grid.height());
    out
}

pub fn segment(o: &SegmentOptions) -> Result<SegmentReport> {
    if super::segment_onnx::is_onnx(&o.checkpoint) {
        return super::segment_onnx::segment_onnx(o);
    }
    let r = &o.recipe;
    let device = crate::model::default_device();
    let bb = BackboneWeights::open(&o.checkpoint, o.image_size)?;
    let train = SegSplit::open(&o.data, "train", o.train_limit)?;
    let val = SegSplit::open(&o.data, "val", o.val_limit)?;
    let classes = read_classes(&o.data, train.max_label().max(val.max_label()))?;
    if classes.len() < 2 || classes.len() > 255 {
        return Err(Error::bad_file(
            o.data.join("classes.json"),
            format!("need 2–255 classes, found {}", classes.len()),
        ));
    }
    let top = train.max_label().max(val.max_label()) as usize;
    if top >= classes.len() {
        return Err(Error::bad_file(
            &o.data,
            format!(
                "masks hold class {top} but there are {} class names",
                classes.len()
            ),
        ));
    }
    std::fs::create_dir_all(&o.out).at(&o.out)?;
    if o.fresh {
        supervised::clear_state(&o.out);
    }
    let pre = Preprocess {
        resize: ResizeRule::Stretch,
        crop_pct: 1.0,
        ..bb.preprocess.clone()
    };

    tch::manual_seed(r.seed as i64);
    let vs = nn::VarStore::new(device);
    let encoder = Encoder::new(&vs.root(), &bb.vit);
    let head = nn::linear(
        vs.root() / "seg_head",
        bb.vit.embed_dim,
        classes.len() as i64,
        nn::LinearConfig {
            ws_init: nn::Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
            bs_init: Some(nn::Init::Const(0.0)),
            bias: true,
        },
    );
    super::checkpoint::load_into_varstore(&vs, &bb.tensors, &bb.path, &["seg_head."])?;
    if o.freeze_backbone {
        for (name, v) in vs.variables() {
            if !name.starts_with("seg_head.") {
                let _ = v.set_requires_grad(false);
            }
        }
    }
    let model = Segmenter {
        encoder,
        head,
        image_size: pre.image_size as i64,
    };
    let compute = if device.is_cuda() {
        Kind::BFloat16
    } else {
        Kind::Float
    };
    let mut flat = FlatParams::new(&vs, compute);
    let depth = bb.vit.depth as usize;
    flat.set_lr_scale(|n| supervised::layer_scale(n, depth, r.layer_decay));

    let run = serde_json::json!({
        "task": "segment", "backbone": o.checkpoint, "data": o.data, "train_limit": o.train_limit,
        "image_size": pre.image_size, "frozen": o.freeze_backbone, "recipe": r,
    });
    let start = supervised::load_state(&o.out, &mut flat, &run)?.unwrap_or(0);
    let mut log = supervised::TrainingLoop::new(
        &o.out,
        &run,
        r,
        (train.images.len() / r.batch_size).max(1) as u64,
    );
    let total = log.total;
    let s = pre.image_size as i64;
    let bar = super::progress_bar(total, start, o.progress);
    for step in start..total {
        let (px, tg) = train_batch(&train, &pre, r.batch_size, r.seed, step);
        let imgs = supervised::normalise(&px, r.batch_size, &pre, device);
        let target = Tensor::from_slice(&tg)
            .view([r.batch_size as i64, s, s])
            .to_kind(Kind::Int64)
            .to_device(device);
        let logits = model.logits(&imgs, r.drop_path, o.freeze_backbone);
        let loss = pixel_loss(&logits, &target, r);
        let lv = log.step(&mut flat, &loss, step)?;
        bar.set_position(step + 1);
        bar.set_message(format!("loss {lv:.4}"));
    }
    bar.finish_and_clear();

    let (scores, preds) = evaluate(&model, &pre, &val, classes.len(), device)?;
    let ckpt = supervised::write_head_checkpoint(
        &o.out,
        &flat,
        &vs,
        &bb,
        &pre,
        &classes,
        serde_json::json!({"kind": "segment", "data": o.data, "frozen_backbone": o.freeze_backbone,
        "recipe": r, "miou": scores.miou}),
    )?;
    SegmentReport::write(
        o,
        (train.images.len(), &val, &preds),
        &classes,
        scores,
        (&log, start),
        pre.image_size,
        ckpt,
    )
}

impl SegmentReport {
    /// Close a run whose training loop `log` started at step `start`: the first `o.sheet`
    /// validation predictions drawn into `predictions.png`, the report written as
    /// `segment.json` (both atomically) and returned.
    pub(super) fn write(
        o: &SegmentOptions,
        (train_images, val, preds): (usize, &SegSplit, &[GrayImage]),
        classes: &[String],
        scores: SegScores,
        (log, start): (&supervised::TrainingLoop, u64),
        image_size: u32,
        checkpoint: PathBuf,
    ) -> Result<Self> {
        let png = o.out.join("predictions.png");
        write_png_atomic(&png, &predictions_sheet(val, preds, o.sheet, classes))?;
        let report = SegmentReport {
            miou: scores.miou,
            pixel_accuracy: scores.pixel_accuracy,
            per_class_iou: classes.iter().cloned().zip(scores.per_class_iou).collect(),
            train_images,
            val_images: val.images.len(),
            image_size,
            epochs: log.recipe.epochs,
            steps: log.total,
            frozen_backbone: o.freeze_backbone,
            resumed_from: (start > 0).then_some(start),
            first_epoch_loss: log.first,
            last_epoch_loss: log.last,
            checkpoint,
            predictions_png: png,
        };
        write_atomic(
            &o.out.join("segment.json"),
            serde_json::to_string_pretty(&report).unwrap().as_bytes(),
        )?;
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_crop_flips_and_scales_with_the_image() {
        let m = GrayImage::from_raw(4, 2, vec![1, 1, 2, 2, 3, 3, 4, 4]).unwrap();
        let full = Crop {
            left: 0.0,
            top: 0.0,
            width: 4.0,
            height: 2.0,
        };
        assert_eq!(mask_crop(&m, full, 2, false), vec![1, 2, 3, 4]);
        assert_eq!(mask_crop(&m, full, 2, true), vec![2, 1, 4, 3]);
        let right = Crop {
            left: 2.0,
            top: 0.0,
            width: 2.0,
            height: 2.0,
        };
        assert_eq!(mask_crop(&m, right, 2, false), vec![2, 2, 4, 4]);
    }
}
