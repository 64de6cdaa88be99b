//! `ehm-train probe`: linear probing of a frozen backbone (MAE's recipe: BatchNorm without
//! affine before a linear layer), on features extracted once. The result is a checkpoint with
//! a timm-named classifier `head.{weight,bias}` (the BatchNorm folded in), class names and
//! the pooling rule, which `ehm-export onnx --task classify` turns into a classifier.
use super::checkpoint::{load_into_varstore, save_tensors};
use super::features::{knn_top1, pooled_features, Labelled, TEST_SUBSET_SEED, TRAIN_SUBSET_SEED};
pub use super::features::{pool_tokens, Pool};
use crate::config::VitConfig;
use crate::data::{Dataset, Preprocess};
use crate::error::{Error, IoContext, Result};
use crate::files::write_atomic;
use crate::model::Encoder;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{nn, nn::OptimizerConfig, Device, Kind, Tensor};

#[derive(Clone, Debug)]
pub struct ProbeOptions {
    pub checkpoint: PathBuf,
    pub train: String,
    pub test: String,
    pub train_limit: usize,
    pub test_limit: usize,
    pub pool: Pool,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub seed: u64,
    pub out: PathBuf,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProbeReport {
    pub top1: f64,
    pub top5: f64,
    pub per_class: Vec<(String, f64)>,
    pub train_images: usize,
    pub test_images: usize,
    pub epochs: usize,
    pub final_train_loss: f64,
    #[serde(serialize_with = "crate::files::lossy_path")]
    pub checkpoint: PathBuf,
    #[serde(serialize_with = "crate::files::lossy_path")]
    pub confusion_csv: PathBuf,
    #[serde(serialize_with = "crate::files::lossy_path")]
    pub confusion_png: PathBuf,
}

impl std::fmt::Display for ProbeReport {
    /// The report for people (`--json` prints the struct).
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        writeln!(
            f,
            "linear probe: top-1 {:.2} %, top-5 {:.2} % on {} test images ({} train, {} epochs)",
            100.0 * self.top1,
            100.0 * self.top5,
            self.test_images,
            self.train_images,
            self.epochs
        )?;
        write_classes(
            f,
            &self.per_class,
            &self.checkpoint,
            (&self.confusion_csv, &self.confusion_png),
        )
    }
}

/// A classifier report's per-class accuracies and files, for people (probe and fine-tune).
pub(crate) fn write_classes(
    f: &mut std::fmt::Formatter,
    per_class: &[(String, f64)],
    checkpoint: &std::path::Path,
    (csv, png): (&std::path::Path, &std::path::Path),
) -> std::fmt::Result {
    writeln!(f, "  {:<14} {:>8}", "class", "accuracy")?;
    for (c, acc) in per_class {
        writeln!(f, "  {c:<14} {:>7.2} %", 100.0 * acc)?;
    }
    writeln!(f, "  checkpoint     {}", checkpoint.display())?;
    write!(f, "  confusion      {} / {}", csv.display(), png.display())
}

/// Top-1 / top-5 / confusion / per-class accuracy of classifier logits on a labelled split —
/// the one evaluation the probe and fine-tuning share.
pub struct Evaluation {
    pub top1: f64,
    pub top5: f64,
    pub per_class: Vec<(String, f64)>,
    pub confusion: Vec<Vec<u64>>,
}

impl Evaluation {
    pub fn of(logits: &Tensor, labels: &Tensor, classes: &[String]) -> Self {
        let c = classes.len() as i64;
        let pred = logits.argmax(-1, false);
        let top1 = pred
            .eq_tensor(labels)
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[]);
        let (_, top) = logits.topk(5.min(c), -1, true, true);
        let top5 = top
            .eq_tensor(&labels.unsqueeze(1))
            .any_dim(1, false)
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[]);
        let yv: Vec<i64> = Vec::try_from(labels).unwrap();
        let pv: Vec<i64> = Vec::try_from(&pred).unwrap();
        let confusion = crate::eval::confusion(&yv, &pv, c as usize);
        let per_class = crate::eval::per_class_accuracy(&confusion)
            .into_iter()
            .zip(classes)
            .map(|(a, n)| (n.clone(), a))
            .collect();
        Evaluation {
            top1,
            top5,
            per_class,
            confusion,
        }
    }

    /// `confusion.csv` and `confusion.png` in `out`.
    pub fn write_confusion(&self, out: &Path, classes: &[String]) -> Result<(PathBuf, PathBuf)> {
        let csv = out.join("confusion.csv");
        write_atomic(
            &csv,
            crate::eval::confusion_csv(&self.confusion, classes).as_bytes(),
        )?;
        let png = out.join("confusion.png");
        crate::files::write_png_atomic(&png, &crate::eval::confusion_png(&self.confusion))?;
        Ok((csv, png))
    }
}

/// A backbone loaded from a checkpoint folder (or its .safetensors) into an encoder on
/// `device`: the checkpoint's encoder as `supervised::BackboneWeights` reads it (no MAE decoder,
/// no old head).
pub struct Backbone {
    pub vs: nn::VarStore,
    pub encoder: Encoder,
    pub vit: VitConfig,
    pub preprocess: Preprocess,
    pub config: crate::checkpoint::RunFolderConfig,
    /// The encoder's tensors (CPU), for the probe's own checkpoint.
    pub tensors: HashMap<String, Tensor>,
    pub dir: PathBuf,
}

impl Backbone {
    pub fn open(path: &Path, device: Device) -> Result<Self> {
        let w = super::supervised::BackboneWeights::open(path, None)?;
        let vs = nn::VarStore::new(device);
        let encoder = Encoder::new(&vs.root(), &w.vit);
        load_into_varstore(&vs, &w.tensors, &w.path, &[])?;
        Ok(Backbone {
            vs,
            encoder,
            dir: w.path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            vit: w.vit,
            preprocess: w.preprocess,
            config: w.config,
            tensors: w.tensors,
        })
    }

    /// Pooled features `[n, D]` of a data set (eval preprocessing), with a progress bar.
    pub fn features(&self, ds: &dyn Dataset, pool: Pool) -> Result<Tensor> {
        pooled_features(
            &self.encoder,
            &self.preprocess,
            ds,
            pool,
            self.vs.device(),
            true,
        )
    }
}

pub fn probe(o: &ProbeOptions) -> Result<ProbeReport> {
    let device = crate::model::default_device();
    let bb = Backbone::open(&o.checkpoint, device)?;
    let train = Labelled::open(&o.train, o.train_limit, o.seed)?;
    let test = Labelled::open(&o.test, o.test_limit, o.seed + 1)?;
    let (train_ds, test_ds, ytr, yte) = (
        &train.ds,
        &test.ds,
        train.labels_tensor(),
        test.labels_tensor(),
    );
    let classes: Vec<String> = train_ds.classes().to_vec();
    if test_ds.classes() != classes.as_slice() {
        return Err(Error::Config(format!(
            "{} and {} have different classes",
            o.train, o.test
        )));
    }
    let c = classes.len() as i64;
    let ftr = bb.features(train_ds.as_ref(), o.pool)?;
    let fte = bb.features(test_ds.as_ref(), o.pool)?;
    let d = ftr.size()[1];

    // BatchNorm without affine (statistics of the training features), then a linear layer.
    let mean = ftr.mean_dim(0, true, Kind::Float);
    let var = ftr.var_dim(0, false, true);
    let inv_std = (var + 1e-6).rsqrt();
    let xtr = (&ftr - &mean) * &inv_std;
    let xte = (&fte - &mean) * &inv_std;
    tch::manual_seed(o.seed as i64);
    let hvs = nn::VarStore::new(Device::Cpu);
    let head = nn::linear(
        hvs.root() / "head",
        d,
        c,
        nn::LinearConfig {
            ws_init: nn::Init::Randn {
                mean: 0.0,
                stdev: 0.01,
            },
            bs_init: Some(nn::Init::Const(0.0)),
            bias: true,
        },
    );
    let mut opt = nn::Sgd {
        momentum: 0.9,
        ..Default::default()
    }
    .build(&hvs, o.lr)
    .map_err(|e| Error::Other(format!("libtorch: {e}")))?;
    let n = xtr.size()[0];
    let steps_per_epoch = (n as usize).div_ceil(o.batch_size) as i64;
    let total = steps_per_epoch * o.epochs as i64;
    let mut step = 0i64;
    let mut last_loss = f64::NAN;
    for epoch in 0..o.epochs {
        let perm = Tensor::randperm(n, (Kind::Int64, Device::Cpu));
        let mut sum = 0.0;
        for b in 0..steps_per_epoch {
            let idx = perm.narrow(
                0,
                b * o.batch_size as i64,
                (o.batch_size as i64).min(n - b * o.batch_size as i64),
            );
            // half-cycle cosine schedule, no warm-up
            opt.set_lr(super::schedule::warmup_cosine(
                step as u64,
                total as u64,
                0,
                o.lr,
                0.0,
            ));
            let logits = xtr.index_select(0, &idx).apply(&head);
            let loss = logits.cross_entropy_for_logits(&ytr.index_select(0, &idx));
            opt.backward_step(&loss);
            sum += loss.double_value(&[]);
            step += 1;
        }
        last_loss = sum / steps_per_epoch as f64;
        let _ = epoch;
    }

    // evaluation
    let logits = tch::no_grad(|| xte.apply(&head));
    let ev = Evaluation::of(&logits, &yte, &classes);
    // the output checkpoint: backbone + head with the BatchNorm folded in (timm `head.*`)
    std::fs::create_dir_all(&o.out).at(&o.out)?;
    let w = hvs.variables()["head.weight"].shallow_clone();
    let b = hvs.variables()["head.bias"].shallow_clone();
    let w_fold = &w * &inv_std; // [C, D] * [1, D]
    let b_fold = &b - (&w_fold * &mean).sum_dim_intlist(1, false, Kind::Float);
    let mut named: Vec<(String, Tensor)> = bb
        .tensors
        .iter()
        .map(|(k, v)| (k.clone(), v.shallow_clone()))
        .collect();
    named.push(("head.weight".into(), w_fold));
    named.push(("head.bias".into(), b_fold));
    named.sort_by(|a, b| a.0.cmp(&b.0));
    save_tensors(
        &o.out.join("checkpoint.safetensors"),
        &named,
        HashMap::new(),
    )?;
    let mut cfg = bb.config.clone();
    cfg.labels = classes.clone();
    cfg.head = Some(crate::checkpoint::HeadRecord::from_json(
        serde_json::json!({
        "kind": "linear_probe", "pool": o.pool, "train": o.train, "epochs": o.epochs,
        "top1": ev.top1}),
    ));
    cfg.write(&o.out)?;
    let (csv, png) = ev.write_confusion(&o.out, &classes)?;
    let report = ProbeReport {
        top1: ev.top1,
        top5: ev.top5,
        per_class: ev.per_class,
        train_images: train_ds.len(),
        test_images: test_ds.len(),
        epochs: o.epochs,
        final_train_loss: last_loss,
        checkpoint: o.out.join("checkpoint.safetensors"),
        confusion_csv: csv,
        confusion_png: png,
    };
    write_atomic(
        &o.out.join("probe.json"),
        serde_json::to_string_pretty(&report).unwrap().as_bytes(),
    )?;
    Ok(report)
}

/// `ehm-train knn`: weighted kNN (DINO: k neighbours vote with exp(sim / T)) on L2-normalised
/// frozen features, on the same seeded subsets as the trainer's monitor. Returns (top-1,
/// train images, test images).
pub fn knn(
    checkpoint: &Path,
    train: &str,
    test: &str,
    limits: (usize, usize),
    pool: Pool,
    k: usize,
    temperature: f32,
) -> Result<(f64, usize, usize)> {
    let bb = Backbone::open(checkpoint, crate::model::default_device())?;
    let tr = Labelled::open(train, limits.0, TRAIN_SUBSET_SEED)?;
    let te = Labelled::open(test, limits.1, TEST_SUBSET_SEED)?;
    let acc = knn_top1(
        &bb.encoder,
        &bb.preprocess,
        &tr,
        &te,
        pool,
        bb.vs.device(),
        k,
        temperature,
        true,
    )?;
    Ok((acc, tr.labels.len(), te.labels.len()))
}
