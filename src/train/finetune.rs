//! `ehm-train finetune`: the whole network trained end to end as a classifier — MAE's
//! fine-tuning recipe: layer-wise lr decay, stochastic depth, label smoothing, warm-up + cosine,
//! AdamW, RandomResizedCrop + flip, and (`--recipe mae`, or each flag) RandAugment, random
//! erasing and Mixup / CutMix (`mix.rs`). Resumable like pretraining (re-run the same command). The
//! output is a checkpoint with timm's `head.{weight,bias}`, class names and the pooling rule,
//! the same contract `ehm-train probe` writes, so `ehm-export onnx --task classify` reads it.
use super::features::{pooled_features, Labelled, Pool};
use super::optim::FlatParams;
use super::probe::Evaluation;
use super::supervised::{self, BackboneWeights, Recipe};
use crate::data::Augment;
use crate::error::{Error, IoContext, Result};
use crate::files::write_atomic;
use crate::model::Encoder;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use tch::{nn, nn::Module, Device, Kind, Tensor};

#[derive(Clone, Debug)]
pub struct FinetuneOptions {
    pub checkpoint: PathBuf,
    pub train: String,
    pub test: String,
    pub train_limit: usize,
    pub test_limit: usize,
    pub pool: Pool,
    pub image_size: Option<u32>,
    /// Smallest RandomResizedCrop area fraction (timm: 0.08).
    pub min_crop: f32,
    pub recipe: Recipe,
    /// RandomErasing and Mixup / CutMix on the batch.
    pub regularise: super::mix::Regularise,
    /// RandAugment on each cropped image (timm's rand-m9-mstd0.5-inc1 in MAE's recipe).
    pub rand_augment: Option<crate::data::randaugment::RandAugment>,
    pub out: PathBuf,
    pub workers: usize,
    pub fresh: bool,
    pub progress: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FinetuneReport {
    pub top1: f64,
    pub top5: f64,
    pub per_class: Vec<(String, f64)>,
    pub train_images: usize,
    pub test_images: usize,
    pub epochs: usize,
    pub steps: u64,
    pub resumed_from: Option<u64>,
    /// Mean training loss of the first and the last epoch run by this invocation.
    pub first_epoch_loss: Option<f64>,
    pub last_epoch_loss: Option<f64>,
    #[serde(serialize_with = "crate::files::lossy_path")]
    pub checkpoint: PathBuf,
    #[serde(serialize_with = "crate::files::lossy_path")]
    pub confusion_csv: PathBuf,
    #[serde(serialize_with = "crate::files::lossy_path")]
    pub confusion_png: PathBuf,
}

impl std::fmt::Display for FinetuneReport {
    /// The report for people (`--json` prints the struct).
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        writeln!(
            f,
            "fine-tune: top-1 {:.2} %, top-5 {:.2} % on {} test images ({} train, {} epochs, {} steps{})",
            100.0 * self.top1,
            100.0 * self.top5,
            self.test_images,
            self.train_images,
            self.epochs,
            self.steps,
            self.resumed_from
                .map(|s| format!(", resumed at step {s}"))
                .unwrap_or_default()
        )?;
        super::probe::write_classes(
            f,
            &self.per_class,
            &self.checkpoint,
            (&self.confusion_csv, &self.confusion_png),
        )
    }
}

pub fn finetune(o: &FinetuneOptions) -> Result<FinetuneReport> {
    let r = &o.recipe;
    let device = crate::model::default_device();
    let bb = BackboneWeights::open(&o.checkpoint, o.image_size)?;
    let train = Labelled::open(&o.train, o.train_limit, r.seed)?;
    let test = Labelled::open(&o.test, o.test_limit, r.seed + 1)?;
    let classes = train.classes().to_vec();
    if test.classes() != classes.as_slice() {
        return Err(Error::Config(format!(
            "{} and {} have different classes",
            o.train, o.test
        )));
    }
    if o.regularise.mixes() && r.batch_size % 2 == 1 {
        return Err(Error::Config(format!(
            "Mixup / CutMix pair each image with another of its batch: --batch-size {} must be even",
            r.batch_size
        )));
    }
    if train.ds.len() < r.batch_size {
        return Err(Error::Config(format!(
            "{} has {} images, fewer than one batch of {}",
            o.train,
            train.ds.len(),
            r.batch_size
        )));
    }
    std::fs::create_dir_all(&o.out).at(&o.out)?;
    if o.fresh {
        supervised::clear_state(&o.out);
    }

    tch::manual_seed(r.seed as i64);
    let vs = nn::VarStore::new(device);
    let encoder = Encoder::new(&vs.root(), &bb.vit);
    let d = bb.vit.embed_dim;
    let head = nn::linear(
        vs.root() / "head",
        d,
        classes.len() as i64,
        nn::LinearConfig {
            ws_init: nn::Init::Randn {
                mean: 0.0,
                stdev: 2e-5,
            },
            bs_init: Some(nn::Init::Const(0.0)),
            bias: true,
        },
    );
    super::checkpoint::load_into_varstore(&vs, &bb.tensors, &bb.path, &["head."])?;
    let compute = if device.is_cuda() {
        Kind::BFloat16
    } else {
        Kind::Float
    };
    let mut flat = FlatParams::new(&vs, compute);
    let depth = bb.vit.depth as usize;
    flat.set_lr_scale(|n| supervised::layer_scale(n, depth, r.layer_decay));

    let run = serde_json::json!({
        "task": "finetune", "backbone": o.checkpoint, "train": o.train, "train_limit": o.train_limit,
        "pool": o.pool, "image_size": bb.vit.image_size, "min_crop": o.min_crop, "recipe": r,
        "regularise": o.regularise, "rand_augment": o.rand_augment,
    });
    let start = supervised::load_state(&o.out, &mut flat, &run)?.unwrap_or(0);
    let mut log =
        supervised::TrainingLoop::new(&o.out, &run, r, (train.ds.len() / r.batch_size) as u64);
    let total = log.total;
    let pre = bb.preprocess.clone();
    let aug = Augment {
        scale: (o.min_crop.clamp(0.01, 1.0), 1.0),
        rand_augment: o.rand_augment,
        ..Augment::default()
    };
    let n_classes = classes.len() as i64;
    let mut loader = super::loader::Loader::start(
        train.ds.clone(),
        pre.clone(),
        aug,
        r.batch_size,
        r.seed,
        start..total,
        o.workers.max(1),
        super::loader::Shard::ALL,
    );
    let bar = super::progress_bar(total, start, o.progress);
    for step in start..total {
        let b = loader
            .next_batch()
            .ok_or_else(|| Error::Other("data loader stopped early".into()))?;
        let mut imgs = supervised::normalise(&b.pixels, r.batch_size, &pre, device);
        let labels = Tensor::from_slice(&b.labels).to_device(device);
        let reg = &o.regularise;
        super::mix::random_erase(&imgs, reg.reprob, r.seed, step);
        let targets = reg.mixes().then(|| {
            let (t, _) = super::mix::mix_batch(
                &mut imgs,
                &labels,
                n_classes,
                r.label_smoothing,
                reg,
                r.seed,
                step,
            );
            t
        });
        let tokens = encoder.forward_features_train(&imgs, r.drop_path);
        let logits = head
            .forward(&super::features::pool_tokens(&tokens, o.pool))
            .to_kind(Kind::Float);
        let loss = match &targets {
            // mixed images have mixed (already smoothed) targets
            Some(t) => super::mix::soft_cross_entropy(&logits, t),
            None => logits.cross_entropy_loss::<Tensor>(
                &labels,
                None,
                tch::Reduction::Mean,
                -100,
                r.label_smoothing,
            ),
        };
        let lv = log.step(&mut flat, &loss, step)?;
        bar.set_position(step + 1);
        bar.set_message(format!("loss {lv:.4}"));
    }
    bar.finish_and_clear();
    drop(loader);

    // evaluation on the held-out split with the eval preprocessing
    let feats = pooled_features(&encoder, &pre, test.ds.as_ref(), o.pool, device, o.progress)?;
    let logits = tch::no_grad(|| {
        head.forward(&feats.to_device(device).to_kind(compute))
            .to_kind(Kind::Float)
            .to_device(Device::Cpu)
    });
    let ev = Evaluation::of(&logits, &test.labels_tensor(), &classes);

    let ckpt = supervised::write_head_checkpoint(
        &o.out,
        &flat,
        &vs,
        &bb,
        &pre,
        &classes,
        serde_json::json!({"kind": "finetune", "pool": o.pool, "train": o.train,
        "recipe": r, "top1": ev.top1}),
    )?;
    let (csv, png) = ev.write_confusion(&o.out, &classes)?;
    let report = FinetuneReport {
        top1: ev.top1,
        top5: ev.top5,
        per_class: ev.per_class,
        train_images: train.ds.len(),
        test_images: test.ds.len(),
        epochs: r.epochs,
        steps: total,
        resumed_from: (start > 0).then_some(start),
        first_epoch_loss: log.first,
        last_epoch_loss: log.last,
        checkpoint: ckpt,
        confusion_csv: csv,
        confusion_png: png,
    };
    write_atomic(
        &o.out.join("finetune.json"),
        serde_json::to_string_pretty(&report).unwrap().as_bytes(),
    )?;
    Ok(report)
}
