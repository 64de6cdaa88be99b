//! `ehm-train bench`: the MAE step on synthetic images already on the device, the same
//! model/batch/dtype as `benches/py/mae_reference.py` (the PyTorch yardstick), so images/s compare directly.
//! EHM mode runs the full pipeline (teacher pass + merge trees overlapped with the step).
use super::engine::Engine;
use crate::config::{MaskingKind, PretrainConfig, VitConfig};
use crate::data::Preprocess;
use serde::Serialize;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub arch: String,
    pub image_size: u32,
    pub patch_size: u32,
    pub batch: usize,
    pub steps: usize,
    pub warmup: usize,
    pub masking: MaskingKind,
    pub kind: Kind,
    /// EHM settings (affinity source and blocks, …); the masking is `masking`.
    pub ehm: crate::config::EhmConfig,
}

#[derive(Serialize, Debug)]
pub struct BenchResult {
    pub r#impl: String,
    pub device: String,
    pub model: String,
    pub img: u32,
    pub patch: u32,
    pub batch: usize,
    pub masking: String,
    /// Encoder blocks whose attention forms the EHM affinity (empty = all).
    pub affinity_blocks: Vec<usize>,
    /// What the affinity is made of.
    pub affinity: crate::config::AffinitySource,
    pub dtype: String,
    pub params_m: f64,
    pub step_s_mean: f64,
    pub images_per_s: f64,
    /// The teacher's affinity pass, brought to the host (what the merge trees wait for).
    pub teacher_s_mean: Option<f64>,
    /// The same pass left on the device: the difference to `teacher_s_mean` is the copy of
    /// the `[B, N, N]` affinity to the host and its conversion.
    pub teacher_device_s_mean: Option<f64>,
    pub hierarchy_s_mean: Option<f64>,
    pub final_loss: f64,
}

pub fn bench(o: &BenchOptions) -> crate::Result<BenchResult> {
    let device = crate::model::default_device();
    let cfg = VitConfig::preset(&o.arch, o.image_size, o.patch_size)?;
    let pre = Preprocess::imagenet(o.image_size);
    let mut run = PretrainConfig {
        masking: o.masking,
        batch_size: o.batch,
        ..Default::default()
    };
    run.ehm = o.ehm.clone();
    let mut engine = Engine::new(&cfg, &pre, &run, device, o.kind);
    let s = o.image_size as i64;
    let pool: Vec<Tensor> = (0..4)
        .map(|_| Tensor::randn([o.batch as i64, 3, s, s], (Kind::Float, device)))
        .collect();
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    let total = o.warmup + o.steps;
    let mut job = engine.mask_job(std::slice::from_ref(&pool[0]), 0.5, 0);
    let mut loss = Tensor::zeros([], (Kind::Float, device));
    let mut t_start = Instant::now();
    for i in 0..total {
        if i == o.warmup {
            sync();
            t_start = Instant::now();
        }
        let masks = job.wait()?;
        let next = engine.mask_job(std::slice::from_ref(&pool[(i + 1) % 4]), 0.5, i as u64 + 1);
        loss = engine.step(std::slice::from_ref(&pool[i % 4]), &masks, 1.5e-4)?;
        job = next;
    }
    sync();
    let step_s = t_start.elapsed().as_secs_f64() / o.steps as f64;
    let _ = job.wait()?;

    // Separate timings of the EHM parts (not overlapped), for the overhead breakdown.
    let (mut teacher_s, mut teacher_dev_s, mut hier_s) = (None, None, None);
    if o.masking == MaskingKind::Ehm {
        let reps = 5;
        let mut aff = Vec::new();
        sync();
        let t = Instant::now();
        for i in 0..reps {
            let _ = engine.affinity_device(&pool[i % 4]);
        }
        sync();
        teacher_dev_s = Some(t.elapsed().as_secs_f64() / reps as f64);
        let t = Instant::now();
        for i in 0..reps {
            aff = engine.affinity_host(&pool[i % 4]);
        }
        teacher_s = Some(t.elapsed().as_secs_f64() / reps as f64);
        let t = Instant::now();
        for i in 0..reps {
            let _ = engine.masks.sample(o.batch, 0.5, i as u64, Some(&aff));
        }
        hier_s = Some(t.elapsed().as_secs_f64() / reps as f64);
    }
    let params: i64 = engine.flat.numel();
    Ok(BenchResult {
        r#impl: "ehm-tch".into(),
        device: format!("{device:?}"),
        model: o.arch.trim_start_matches("vit_").into(),
        img: o.image_size,
        patch: o.patch_size,
        batch: o.batch,
        masking: o.masking.to_string(),
        affinity_blocks: o.ehm.affinity_blocks.clone(),
        affinity: o.ehm.affinity,
        dtype: match o.kind {
            Kind::BFloat16 => "bf16".into(),
            Kind::Half => "fp16".into(),
            _ => "fp32".into(),
        },
        params_m: (params as f64 / 1e6 * 100.0).round() / 100.0,
        step_s_mean: step_s,
        images_per_s: o.batch as f64 / step_s,
        teacher_s_mean: teacher_s,
        teacher_device_s_mean: teacher_dev_s,
        hierarchy_s_mean: hier_s,
        final_loss: loss.double_value(&[]),
    })
}

/// `ehm-train bench-loader`: the training data path alone — decode + RandomResizedCrop + flip
/// into CHW bytes, `workers` threads making whole batches, as the trainer's loader does (no
/// decoded-image cache) — the same work as torchvision's ImageFolder + DataLoader
/// (`benches/py/loader_torchvision.py`).
#[derive(Clone, Debug, clap::Args)]
pub struct LoaderBenchOptions {
    /// Data set (folder:DIR, photos, …)
    #[arg(long, default_value = "photos")]
    pub data: String,
    #[arg(long, default_value_t = 224, value_parser = clap::value_parser!(u32).range(16..))]
    pub image_size: u32,
    #[arg(long, default_value_t = 1, value_parser = crate::args::at_least_one)]
    pub workers: usize,
    #[arg(long, default_value_t = 32, value_parser = crate::args::at_least_one)]
    pub batch: usize,
    /// Batches timed (after one untimed batch: the workers' start)
    #[arg(long, default_value_t = 8, value_parser = crate::args::at_least_one)]
    pub batches: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Serialize, Debug)]
pub struct LoaderBenchResult {
    pub r#impl: String,
    pub data: String,
    pub files: usize,
    pub image_size: u32,
    pub workers: usize,
    pub batch: usize,
    pub images: usize,
    pub seconds: f64,
    pub images_per_s: f64,
}

pub fn loader_speed(o: &LoaderBenchOptions) -> crate::Result<LoaderBenchResult> {
    let spec: crate::data::DataSpec = o.data.parse()?;
    let ds = spec.open()?;
    let pre = Preprocess::imagenet(o.image_size); // bicubic, as MAE's RandomResizedCrop
    let mut loader = super::loader::Loader::start(
        ds.clone(),
        pre,
        crate::data::Augment::default(), // scale (0.2, 1), ratio (3/4, 4/3), flip
        o.batch,
        o.seed,
        0..(o.batches + 1) as u64,
        o.workers.max(1),
        super::loader::Shard::ALL,
    );
    let first = loader.next_batch();
    let t0 = Instant::now();
    let mut images = 0;
    while let Some(b) = loader.next_batch() {
        images += b.labels.len();
    }
    let seconds = t0.elapsed().as_secs_f64();
    if first.is_none() || images == 0 {
        return Err(crate::Error::Other("the loader produced no batches".into()));
    }
    Ok(LoaderBenchResult {
        r#impl: "ehm".into(),
        data: o.data.clone(),
        files: ds.len(),
        image_size: o.image_size,
        workers: o.workers,
        batch: o.batch,
        images,
        seconds,
        images_per_s: images as f64 / seconds,
    })
}
