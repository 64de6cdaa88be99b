//! What fine-tuning and segmentation training share: the recipe (MAE's fine-tuning defaults),
//! layer-wise lr decay, a backbone opened (and resized) from a checkpoint, the normalisation of
//! uploaded pixels, and the resumable state (`resume.safetensors`: flat master, Adam moments,
//! step, and the run description it must match).
use super::checkpoint::{load_tensors, save_tensors};
use super::optim::FlatParams;
use crate::checkpoint::CheckpointConfig;
use crate::config::VitConfig;
use crate::data::Preprocess;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// A supervised recipe. Defaults are MAE's fine-tuning recipe scaled to small data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Recipe {
    pub epochs: usize,
    pub batch_size: usize,
    /// Base learning rate; the actual peak is `blr · batch_size / 256`.
    pub blr: f64,
    pub min_lr: f64,
    pub warmup_epochs: f64,
    pub weight_decay: f64,
    /// Layer-wise lr decay: block i of a depth-L encoder gets `layer_decay^(L + 1 − (i + 1))`.
    pub layer_decay: f64,
    /// Stochastic depth rate of the last block (linear from 0 at the first).
    pub drop_path: f64,
    pub label_smoothing: f64,
    /// Gradient-norm clip (0 = off).
    pub clip: f64,
    pub seed: u64,
}

impl Recipe {
    /// Linear warm-up, then half-cycle cosine down to `min_lr`.
    pub fn lr_at(&self, step: u64, total: u64, warmup: u64) -> f64 {
        let base = self.blr * self.batch_size as f64 / 256.0;
        super::schedule::warmup_cosine(step, total, warmup, base, self.min_lr)
    }
}

/// BEiT/MAE layer id: embeddings 0, block i → i + 1, everything after the blocks depth + 1.
pub fn layer_id(name: &str, depth: usize) -> usize {
    if ["cls_token", "pos_embed", "patch_embed"]
        .iter()
        .any(|p| name.starts_with(p))
    {
        return 0;
    }
    if let Some(rest) = name.strip_prefix("blocks.") {
        if let Some(i) = rest.split('.').next().and_then(|i| i.parse::<usize>().ok()) {
            return i + 1;
        }
    }
    depth + 1
}

/// The lr multiplier of parameter `name` under layer-wise decay `decay`.
pub fn layer_scale(name: &str, depth: usize, decay: f64) -> f64 {
    decay.powi((depth + 1 - layer_id(name, depth).min(depth + 1)) as i32)
}

/// Encoder weights of a checkpoint, ready for a VarStore at `image_size`.
pub struct BackboneWeights {
    pub vit: VitConfig,
    pub preprocess: Preprocess,
    pub config: crate::checkpoint::RunFolderConfig,
    /// Encoder tensors only (no decoder, no heads), pos-embeds resized to `vit.image_size`.
    pub tensors: HashMap<String, Tensor>,
    pub path: PathBuf,
}

impl BackboneWeights {
    /// Open a checkpoint; `image_size` (a multiple of the patch size) resizes the position
    /// embeddings bicubically, as timm and MAE's fine-tuning do.
    pub fn open(path: &Path, image_size: Option<u32>) -> Result<Self> {
        let cfg = CheckpointConfig::read(path)?;
        let (mut tensors, _) = load_tensors(&cfg.weights)?;
        tensors.retain(|k, _| {
            !(super::optim::is_decoder_param(k)
                || k.starts_with("head.")
                || k.starts_with("seg_head."))
        });
        let (mut vit, mut preprocess) = (cfg.vit().clone(), cfg.preprocess().clone());
        if let Some(size) = image_size.filter(|&s| s != vit.image_size) {
            if size % vit.patch_size != 0 {
                return Err(Error::Config(format!(
                    "--image-size {size} is not a multiple of the patch size {}",
                    vit.patch_size
                )));
            }
            let (g, d) = (vit.grid(), vit.embed_dim as usize);
            let pos = tensors
                .get("pos_embed")
                .ok_or_else(|| Error::bad_file(&cfg.weights, "missing tensor pos_embed"))?;
            if pos.size() != [1, 1 + (g * g) as i64, d as i64] {
                return Err(Error::bad_file(
                    &cfg.weights,
                    format!(
                        "pos_embed has shape {:?}, the config implies grid {g}",
                        pos.size()
                    ),
                ));
            }
            let v: Vec<f32> = Vec::try_from(pos.view(-1)).expect("float tensor");
            let new = (size / vit.patch_size) as usize;
            let mut grid = crate::export::resize_pos_grid(&v[d..], g, d, new);
            let mut all = v[..d].to_vec();
            all.append(&mut grid);
            tensors.insert(
                "pos_embed".into(),
                Tensor::from_slice(&all).view([1, (1 + new * new) as i64, d as i64]),
            );
            vit.image_size = size;
            preprocess.image_size = size;
        }
        Ok(BackboneWeights {
            vit,
            preprocess,
            config: cfg.config,
            tensors,
            path: cfg.weights,
        })
    }
}

/// The preprocessing's pixel normalisation on a device: uint8 `[B, 3, S, S]` → fp32
/// (x / 255 − mean) / std, the formula of `Preprocess::normalize_into` (one copy of it for
/// tensors; its statistics are uploaded once).
pub struct Normaliser {
    mean: Tensor,
    std: Tensor,
}

impl Normaliser {
    pub fn new(pre: &Preprocess, device: Device) -> Self {
        let stat = |v: [f32; 3]| Tensor::from_slice(&v).view([1, 3, 1, 1]).to_device(device);
        Normaliser {
            mean: stat(pre.mean),
            std: stat(pre.std),
        }
    }

    /// `pixels` (uint8, already on the statistics' device) → normalised fp32.
    pub fn apply(&self, pixels: &Tensor) -> Tensor {
        (pixels.to_kind(Kind::Float) / 255.0 - &self.mean) / &self.std
    }
}

/// CHW bytes `[B, 3, S, S]` → normalised fp32 on `device`.
pub fn normalise(pixels: &[u8], batch: usize, pre: &Preprocess, device: Device) -> Tensor {
    let s = pre.image_size as i64;
    let t = Tensor::from_slice(pixels)
        .view([batch as i64, 3, s, s])
        .to_device(device);
    Normaliser::new(pre, device).apply(&t)
}

/// The output checkpoint of a head run: `checkpoint.safetensors` (encoder + head, fp32) and a
/// `config.json` with the model and preprocessing the head was trained at, the class names and
/// `head` (what trained it). Returns the weights file.
pub fn write_head_checkpoint(
    out: &Path,
    flat: &FlatParams,
    vs: &tch::nn::VarStore,
    bb: &BackboneWeights,
    pre: &Preprocess,
    classes: &[String],
    head: serde_json::Value,
) -> Result<PathBuf> {
    let ckpt = out.join("checkpoint.safetensors");
    save_tensors(&ckpt, &flat.named_weights(vs), HashMap::new())?;
    let mut cfg = bb.config.clone();
    cfg.model = bb.vit.clone();
    cfg.preprocess = pre.clone();
    cfg.labels = classes.to_vec();
    cfg.head = Some(crate::checkpoint::HeadRecord::from_json(head));
    cfg.write(out)?;
    Ok(ckpt)
}

/// Load the resume state of `out` if there is one for the same `run`; the step to go on from.
pub fn load_state(
    out: &Path,
    flat: &mut FlatParams,
    run: &serde_json::Value,
) -> Result<Option<u64>> {
    Ok(super::checkpoint::load_resume(out, run, 1, flat)?.map(|r| r.step))
}

/// The training loop's bookkeeping shared by fine-tuning and segmentation: the loss check, the
/// AdamW step at the scheduled lr, epoch means, and resume state + a metrics line per epoch.
pub struct TrainingLoop<'a> {
    pub out: &'a Path,
    pub run: &'a serde_json::Value,
    pub recipe: &'a Recipe,
    pub steps_per_epoch: u64,
    pub total: u64,
    pub warmup: u64,
    sum: f64,
    /// Mean training loss of the first and the last epoch run by this invocation.
    pub first: Option<f64>,
    pub last: Option<f64>,
}

impl<'a> TrainingLoop<'a> {
    pub fn new(
        out: &'a Path,
        run: &'a serde_json::Value,
        recipe: &'a Recipe,
        steps_per_epoch: u64,
    ) -> Self {
        let total = steps_per_epoch * recipe.epochs as u64;
        let warmup = (recipe.warmup_epochs * steps_per_epoch as f64).round() as u64;
        TrainingLoop {
            out,
            run,
            recipe,
            steps_per_epoch,
            total,
            warmup,
            sum: 0.0,
            first: None,
            last: None,
        }
    }

    /// One optimizer step on `loss` at `step`; returns the loss value. A non-finite loss stops
    /// the run (the last epoch's state is kept).
    pub fn step(&mut self, flat: &mut FlatParams, loss: &Tensor, step: u64) -> Result<f64> {
        let r = self.recipe;
        let lv = loss.double_value(&[]);
        if !lv.is_finite() {
            return Err(Error::Other(format!(
                "loss became {lv} at step {step}; the last good checkpoint in {} is kept",
                self.out.display()
            )));
        }
        let grad = flat.flat_grad(loss);
        let lr = r.lr_at(step, self.total, self.warmup);
        let _ = flat.adamw_step(grad, lr, r.weight_decay, r.clip, (0.9, 0.999));
        self.sum += lv;
        if (step + 1).is_multiple_of(self.steps_per_epoch) {
            let mean = self.sum / self.steps_per_epoch as f64;
            self.sum = 0.0;
            self.first.get_or_insert(mean);
            self.last = Some(mean);
            super::checkpoint::save_resume(
                self.out,
                flat,
                (step + 1, 1),
                self.run,
                vec![],
                HashMap::new(),
            )?;
            log_metrics(
                self.out,
                &serde_json::json!({"step": step + 1, "epoch": (step + 1) / self.steps_per_epoch, "train_loss": mean}),
            )?;
        }
        Ok(lv)
    }
}

/// Remove the resume state and metrics of a previous run (`--fresh`).
pub fn clear_state(out: &Path) {
    for f in [super::checkpoint::RESUME_FILE, "metrics.jsonl"] {
        let _ = std::fs::remove_file(out.join(f));
    }
}

/// Append one JSON line to `out/metrics.jsonl`.
pub fn log_metrics(out: &Path, line: &serde_json::Value) -> Result<()> {
    use crate::error::IoContext;
    use std::io::Write;
    let p = out.join("metrics.jsonl");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&p)
        .at(&p)?;
    writeln!(f, "{line}").at(&p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_ids_follow_beit() {
        assert_eq!(layer_id("cls_token", 12), 0);
        assert_eq!(layer_id("patch_embed.proj.weight", 12), 0);
        assert_eq!(layer_id("blocks.0.attn.qkv.weight", 12), 1);
        assert_eq!(layer_id("blocks.11.mlp.fc2.bias", 12), 12);
        assert_eq!(layer_id("norm.weight", 12), 13);
        assert_eq!(layer_id("head.weight", 12), 13);
        assert!((layer_scale("head.weight", 12, 0.75) - 1.0).abs() < 1e-12);
        assert!((layer_scale("blocks.11.norm1.weight", 12, 0.5) - 0.5).abs() < 1e-12);
        assert!((layer_scale("pos_embed", 2, 0.5) - 0.125).abs() < 1e-12);
    }

    #[test]
    fn schedule_warms_up_then_decays_to_min() {
        let r = Recipe {
            epochs: 1,
            batch_size: 256,
            blr: 1e-3,
            min_lr: 1e-6,
            warmup_epochs: 1.0,
            weight_decay: 0.05,
            layer_decay: 0.75,
            drop_path: 0.1,
            label_smoothing: 0.1,
            clip: 0.0,
            seed: 0,
        };
        assert!((r.lr_at(0, 100, 10) - 1e-4).abs() < 1e-12);
        assert!((r.lr_at(9, 100, 10) - 1e-3).abs() < 1e-12);
        assert!(r.lr_at(50, 100, 10) < 1e-3 && r.lr_at(50, 100, 10) > 1e-6);
        assert!((r.lr_at(100, 100, 10) - 1e-6).abs() < 1e-12);
    }
}
