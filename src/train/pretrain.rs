//! `ehm-train pretrain`: MAE pretraining with random / block / grid / EHM masking.
//! Checkpoints atomically every N steps; re-running the same command resumes.
use super::checkpoint::{
    load_resume, load_tensors, read_resume, save_resume, save_tensors, Resume, RESUME_FILE,
};
use super::dist::{Dist, DistBackend};
use super::engine::{Engine, MaskJob};
use super::features::{self, Labelled, Pool};
use super::loader::Loader;
use crate::config::{MaskingKind, PretrainConfig, VitConfig, ZooEntry};
use crate::data::{self, DataSpec, Dataset, Preprocess};
use crate::error::{Error, IoContext, Result};
use crate::files::write_atomic;
use crate::masking::MaskBatch;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Everything `pretrain` needs besides the zoo entry.
#[derive(Clone, Debug)]
pub struct PretrainOptions {
    pub out: PathBuf,
    pub save_every: u64,
    pub log_every: u64,
    /// kNN monitor every this many epochs (0 = only at the end; negative = never).
    pub knn_every: f64,
    pub knn_train: Option<String>,
    pub knn_test: Option<String>,
    pub knn_limit: (usize, usize),
    /// Segmentation folder whose val images score the teacher's hierarchy (`hierarchy`).
    pub hierarchy_data: Option<PathBuf>,
    /// Hierarchy quality every this many epochs (0 = at the start and the end only).
    pub hierarchy_every: f64,
    /// Val images used for it (0 = all).
    pub hierarchy_limit: usize,
    pub workers: usize,
    pub dtype: Option<Kind>,
    pub fresh: bool,
    pub progress: bool,
    /// Data-parallel: how long a collective (or the rendezvous) waits for a rank before the
    /// job stops.
    pub dist_timeout: std::time::Duration,
    /// Data-parallel engine (`None`: NCCL on GPUs when its plugin is found, else Gloo).
    pub dist_backend: Option<DistBackend>,
}

/// What a run writes into `config.json` and checks on resume.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RunConfig {
    pub name: String,
    pub model: VitConfig,
    pub preprocess: Preprocess,
    pub pretrain: PretrainConfig,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Summary {
    #[serde(serialize_with = "crate::files::lossy_path")]
    pub out: PathBuf,
    pub device: String,
    pub masking: String,
    /// Steps of the whole run (`resumed_from` says where this invocation started).
    pub steps: u64,
    pub epochs: f64,
    pub images: usize,
    pub final_loss: Option<f64>,
    /// Images per second of the whole job (all ranks).
    pub images_per_s: f64,
    /// Processes that trained together, and the images of one optimizer step over all of them.
    pub processes: usize,
    pub batch: usize,
    pub seconds: f64,
    pub knn_top1: Option<f64>,
    pub resumed_from: Option<u64>,
    #[serde(serialize_with = "crate::files::lossy_path")]
    pub checkpoint: PathBuf,
    #[serde(serialize_with = "crate::files::lossy_opt_path")]
    pub mask_picture: Option<PathBuf>,
}

impl std::fmt::Display for Summary {
    /// The summary for people (`--json` prints the struct).
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(
            f,
            "pretraining finished ({} masking on {})",
            self.masking, self.device
        )?;
        for (k, v) in self.rows() {
            write!(f, "\n  {k:<18} {v}")?;
        }
        Ok(())
    }
}

impl Summary {
    /// The summary as (what, value) rows for people (`--json` prints the struct).
    fn rows(&self) -> Vec<(&'static str, String)> {
        let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        let batch = if self.processes > 1 {
            format!("{} per step over {} processes", self.batch, self.processes)
        } else {
            format!("{} per step", self.batch)
        };
        vec![
            (
                "steps",
                format!(
                    "{} ({:.2} epochs of {} images)",
                    self.steps, self.epochs, self.images
                ),
            ),
            (
                "resumed from step",
                or_dash(self.resumed_from.map(|v| v.to_string())),
            ),
            (
                "final loss",
                or_dash(self.final_loss.map(|v| format!("{v:.4}"))),
            ),
            (
                "kNN top-1",
                or_dash(self.knn_top1.map(|v| format!("{:.2} %", 100.0 * v))),
            ),
            ("batch", batch),
            ("throughput", format!("{:.1} images/s", self.images_per_s)),
            ("time", format!("{:.1} s", self.seconds)),
            ("checkpoint", self.checkpoint.display().to_string()),
            (
                "mask picture",
                or_dash(self.mask_picture.as_ref().map(|p| p.display().to_string())),
            ),
            (
                "metrics",
                self.out.join("metrics.jsonl").display().to_string(),
            ),
        ]
    }
}

/// One line of `metrics.jsonl`: a training interval (loss, lr, speed and, for EHM, the cut
/// the masks followed), a kNN result, or a hierarchy-quality report.
#[derive(Serialize, Default)]
struct MetricLine {
    step: u64,
    epoch: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lr: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    images_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mask_ratio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", flatten)]
    cut: Option<CutStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    knn_top1: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    hierarchy: Option<super::hierarchy::HierarchyReport>,
    elapsed_s: f64,
}

/// What the EHM masks of a step followed: segments of the cut (mean over the batch), α,
/// the largest segment's share of the image and the mean segment size, in patches.
#[derive(Serialize)]
struct CutStats {
    cut_segments: f64,
    alpha: f64,
    largest_segment_share: f64,
    mean_segment_patches: f64,
}

impl CutStats {
    fn of(m: &MaskBatch, alpha: f64) -> Option<Self> {
        let seg = m.segments.as_ref()?;
        let (mut count, mut largest) = (0.0, 0.0);
        for labels in seg.chunks(m.n) {
            let mut sizes = vec![0usize; m.n];
            labels.iter().for_each(|&l| sizes[l as usize] += 1);
            count += sizes.iter().filter(|&&s| s > 0).count() as f64;
            largest += *sizes.iter().max().unwrap_or(&0) as f64 / m.n as f64;
        }
        let b = m.batch.max(1) as f64;
        Some(CutStats {
            cut_segments: count / b,
            alpha,
            largest_segment_share: largest / b,
            mean_segment_patches: m.n as f64 * b / count.max(1.0),
        })
    }
}

impl MetricLine {
    fn at(step: u64, steps_per_epoch: u64, t0: Instant) -> Self {
        MetricLine {
            step,
            epoch: step as f64 / steps_per_epoch as f64,
            elapsed_s: t0.elapsed().as_secs_f64(),
            ..Default::default()
        }
    }
}

/// The kNN monitor: the shared frozen-backbone kNN on the model being trained.
fn knn_eval(engine: &Engine, pre: &Preprocess, tr: &Labelled, te: &Labelled) -> Result<f64> {
    features::knn_top1(
        &engine.model.encoder,
        pre,
        tr,
        te,
        Pool::Cls,
        engine.device,
        features::KNN_K,
        features::KNN_TEMPERATURE,
        false,
    )
}

/// Up to `n` images spread over the data set for the mask picture. A file that cannot be read
/// is reported and replaced by the next one, as the loader does: one bad file must not stop
/// a run.
fn sample_images(ds: &dyn Dataset, n: usize) -> Vec<image::RgbImage> {
    let len = ds.len();
    let mut out = Vec::new();
    for k in 0..n.min(len) {
        let start = k * len / n;
        let end = ((k + 1) * len / n).max(start + 1);
        for i in start..end {
            match ds.image(i) {
                Ok(img) => {
                    out.push(img);
                    break;
                }
                Err(e) => eprintln!("warning: skipping {e}"),
            }
        }
    }
    out
}

/// Rows: sample images; columns: the image, then masks at t = 0, ¼, ½, ¾, 1 with the
/// current teacher's hierarchy.
fn mask_picture(
    engine: &Engine,
    samples: &[u8],
    images: &[image::RgbImage],
    step: u64,
) -> Result<Vec<u8>> {
    let ts = [0.0, 0.25, 0.5, 0.75, 1.0];
    let when = format!("at step {step} (mask picture)");
    let batches = super::inspect::sample_at(engine, samples, &ts, &when)?;
    crate::files::png_bytes(&super::inspect::sheet(engine, images, &batches, &ts, 112))
}

/// The masks of the step a resumed run starts with, as the uninterrupted run built them (from
/// the teacher *before* the last saved update: the pipeline builds step s+1's masks before
/// step s), stored in the resume file so a resumed EHM run is bit-identical.
struct PendingMasks<'a> {
    step: u64,
    masks: &'a MaskBatch,
}

fn pending_tensors(p: &PendingMasks) -> Vec<(String, Tensor)> {
    let m = p.masks;
    let f = |v: Vec<f32>| Tensor::from_slice(&v);
    let mut t = vec![
        (
            "next.ids_keep".to_string(),
            f(m.ids_keep.iter().map(|&v| v as f32).collect()),
        ),
        (
            "next.ids_restore".to_string(),
            f(m.ids_restore.iter().map(|&v| v as f32).collect()),
        ),
        ("next.mask".to_string(), f(m.mask.clone())),
    ];
    if let Some(s) = &m.segments {
        t.push((
            "next.segments".to_string(),
            f(s.iter().map(|&v| v as f32).collect()),
        ));
    }
    t
}

/// The masks `pending_tensors` stored, if they are for `step`.
fn pending_from(
    t: &HashMap<String, Tensor>,
    meta: &HashMap<String, String>,
    step: u64,
) -> Option<MaskBatch> {
    let dims: Vec<usize> = meta
        .get("next_masks")?
        .split(',')
        .filter_map(|v| v.parse().ok())
        .collect();
    let (&[at, batch, n, keep], Some(ids)) = (dims.as_slice(), t.get("next.ids_keep")) else {
        return None;
    };
    if at as u64 != step {
        return None;
    }
    let floats = |name: &str| Vec::<f32>::try_from(t.get(name)?.view(-1)).ok();
    let ints = |v: Vec<f32>| v.into_iter().map(|x| x as i64).collect::<Vec<i64>>();
    let m = MaskBatch {
        batch,
        n,
        keep,
        ids_keep: ints(Vec::<f32>::try_from(ids.view(-1)).ok()?),
        ids_restore: ints(floats("next.ids_restore")?),
        mask: floats("next.mask")?,
        segments: floats("next.segments").map(|v| v.into_iter().map(|x| x as u32).collect()),
    };
    let sane = m.ids_keep.len() == batch * keep
        && m.ids_restore.len() == batch * n
        && m.mask.len() == batch * n
        && m.segments.as_ref().is_none_or(|s| s.len() == batch * n)
        && m.ids_keep
            .iter()
            .chain(&m.ids_restore)
            .all(|&i| (0..n as i64).contains(&i));
    sane.then_some(m)
}

fn save_all(
    engine: &Engine,
    run: &RunConfig,
    out: &Path,
    (step, total): (u64, u64),
    pending: Option<PendingMasks>,
) -> Result<()> {
    let mut extra = Vec::new();
    if let Some(t) = &engine.teacher {
        extra.push(("ema".to_string(), t.ema.shallow_clone()));
    }
    let mut extra_meta = HashMap::from([("total_steps".to_string(), total.to_string())]);
    if let Some(p) = &pending {
        let m = p.masks;
        extra_meta.insert(
            "next_masks".into(),
            format!("{},{},{},{}", p.step, m.batch, m.n, m.keep),
        );
        extra.extend(pending_tensors(p));
    }
    // The resume file is the one source of truth; write it first, then the user-facing files.
    save_resume(
        out,
        &engine.flat,
        (step, engine.world()),
        run,
        extra,
        extra_meta,
    )?;
    let meta = HashMap::from([
        ("step".to_string(), step.to_string()),
        ("world".to_string(), engine.world().to_string()),
        ("adam_step".to_string(), engine.flat.adam_step.to_string()),
        ("total_steps".to_string(), total.to_string()),
        (
            "ehm.config".to_string(),
            serde_json::to_string(run).expect("serialisable"),
        ),
    ]);
    save_tensors(
        &out.join("checkpoint.safetensors"),
        &engine.named_weights(),
        meta,
    )?;
    crate::checkpoint::RunFolderConfig {
        model: run.model.clone(),
        preprocess: run.preprocess.clone(),
        name: run.name.clone(),
        architecture: Some(run.model.arch.clone()),
        timm_model: Some(format!(
            "{}_patch{}_{}",
            run.model.arch, run.model.patch_size, run.model.image_size
        )),
        pretrain: serde_json::to_value(&run.pretrain).expect("serialisable"),
        step: Some(step),
        total_steps: Some(total),
        labels: Vec::new(),
        head: None,
        other: Default::default(),
    }
    .write(out)
}

/// Load resume state; returns the step to continue from and the masks it was to use.
fn try_resume(
    engine: &mut Engine,
    run: &RunConfig,
    out: &Path,
) -> Result<Option<(u64, Option<MaskBatch>)>> {
    let world = engine.world();
    let Some(r) = load_resume(out, run, world, &mut engine.flat)? else {
        return Ok(None);
    };
    restore_teacher(engine, &r, &out.join(RESUME_FILE))?;
    Ok(Some((r.step, pending_from(&r.tensors, &r.meta, r.step))))
}

/// Put the EMA of a resume file into `engine`'s teacher (if it has one).
fn restore_teacher(engine: &mut Engine, r: &Resume, path: &Path) -> Result<()> {
    if let Some(te) = &mut engine.teacher {
        let ema = r
            .tensors
            .get("ema")
            .ok_or_else(|| Error::bad_file(path, "missing ema"))?;
        tch::no_grad(|| te.ema.copy_(&ema.to_device(engine.device)));
        te.refresh();
    }
    Ok(())
}

/// The engine of a finished or running pretraining run `dir`, for looking at its masks: the
/// run's configuration changed by `adjust` (e.g. another masking), the student's weights and
/// the teacher's EMA from `resume.safetensors` (the checkpoint's weights when there is none;
/// the teacher is then the student).
pub fn open_run(
    dir: &Path,
    adjust: impl FnOnce(&mut RunConfig) -> Result<()>,
) -> Result<(Engine, RunConfig)> {
    let ck = dir.join("checkpoint.safetensors");
    let (weights, meta) = load_tensors(&ck)?;
    let mut run: RunConfig = meta
        .get("ehm.config")
        .and_then(|s| serde_json::from_str(s).ok())
        .ok_or_else(|| {
            Error::bad_file(&ck, "no run configuration of this ehm version in the checkpoint (made by an older ehm?)")
        })?;
    adjust(&mut run)?;
    run.pretrain.validate()?;
    let mut engine = Engine::new(
        &run.model,
        &run.preprocess,
        &run.pretrain,
        Device::Cpu,
        Kind::Float,
    );
    let resume = dir.join(RESUME_FILE);
    if resume.exists() {
        let (t, meta) = load_tensors(&resume)?;
        if !t.contains_key("ema") {
            // a run without a teacher, looked at with EHM masks: the student parses the images
            engine.teacher = None;
        }
        let r = read_resume(&resume, t, meta, &mut engine.flat)?;
        restore_teacher(&mut engine, &r, &resume)?;
    } else {
        super::checkpoint::load_into_varstore(&engine.vs, &weights, &ck, &[])?;
        engine.teacher = None;
    }
    Ok((engine, run))
}

/// `hierarchy.png` from every hierarchy report in metrics.jsonl (so a resumed run draws the
/// whole curve).
fn write_hierarchy_chart(metrics: &Path, out: &Path) -> Result<()> {
    let text = std::fs::read_to_string(metrics).at(metrics)?;
    let points: Vec<(u64, super::hierarchy::HierarchyReport)> = text
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            Some((
                v["step"].as_u64()?,
                serde_json::from_value(v["hierarchy"].clone()).ok()?,
            ))
        })
        .collect();
    match super::hierarchy::chart(&points) {
        Some(png) => crate::files::write_png_atomic(&out.join("hierarchy.png"), &png),
        None => Ok(()),
    }
}

/// Keep metrics.jsonl consistent with a resumed step: drop lines from steps not yet redone.
fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    write_atomic(path, kept.as_bytes())
}

/// Rank 0's masks of every rank joined: the whole global batch's, as one process builds them.
fn gather_masks(d: &Dist, m: &MaskBatch) -> Result<MaskBatch> {
    let ints = |v: &[i64]| -> Result<Vec<i64>> {
        Ok(Vec::<i64>::try_from(d.all_gather(&Tensor::from_slice(v))?).expect("i64"))
    };
    let segments = match &m.segments {
        Some(s) => {
            let v: Vec<i64> = s.iter().map(|&x| x as i64).collect();
            Some(ints(&v)?.into_iter().map(|x| x as u32).collect())
        }
        None => None,
    };
    Ok(MaskBatch {
        batch: m.batch * d.world,
        n: m.n,
        keep: m.keep,
        ids_keep: ints(&m.ids_keep)?,
        ids_restore: ints(&m.ids_restore)?,
        mask: Vec::<f32>::try_from(d.all_gather(&Tensor::from_slice(&m.mask))?).expect("f32"),
        segments,
    })
}

/// The data-parallel engine: the one asked for, else NCCL on GPUs when its plugin is there,
/// else Gloo. NCCL needs a GPU of its own per rank (two ranks on a one-GPU H200 got "invalid
/// usage" at the first all-reduce): where this machine's ranks outnumber its GPUs the default
/// is Gloo and an explicit NCCL is refused here.
fn choose_backend(
    asked: Option<DistBackend>,
    plugin: bool,
    ranks_here: usize,
    gpus: usize,
) -> Result<DistBackend> {
    let own_gpu = gpus > 0 && ranks_here <= gpus;
    match asked {
        Some(DistBackend::Nccl) if gpus > 0 && !own_gpu => Err(Error::Config(format!(
            "--dist-backend nccl needs one GPU per rank, but {ranks_here} ranks share this \
             machine's {gpus} GPU(s): use --dist-backend gloo or at most {gpus} ranks here"
        ))),
        Some(b) => Ok(b),
        None if own_gpu && plugin => Ok(DistBackend::Nccl),
        None => Ok(DistBackend::Gloo),
    }
}

/// This process's place in the job. Under torchrun/srun (or --nproc) each process is a rank
/// of a data-parallel job: it loads its share of every batch, the gradients are averaged over
/// the ranks, and rank 0 alone writes the run folder.
struct Cluster {
    launch: super::launch::Launch,
    device: Device,
    dist: Option<Arc<Dist>>,
    /// Processes of this job on this machine.
    ranks_here: usize,
}

impl Cluster {
    fn join(opts: &PretrainOptions) -> Result<Self> {
        let launch = super::launch::Launch::from_env()?;
        // one GPU per rank on a node (torchrun / srun start one process per GPU)
        let device = match crate::model::default_device() {
            Device::Cuda(_) if launch.world > 1 => {
                Device::Cuda(launch.local_rank % tch::Cuda::device_count().max(1) as usize)
            }
            d => d,
        };
        let ranks_here = std::env::var("LOCAL_WORLD_SIZE")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(launch.world)
            .max(1);
        let dist = if launch.world > 1 {
            let gpus = if device.is_cuda() {
                tch::Cuda::device_count().max(0) as usize
            } else {
                0
            };
            let backend = choose_backend(
                opts.dist_backend,
                super::dist::nccl_plugin_path().is_some(),
                ranks_here,
                gpus,
            )?;
            Some(Arc::new(Dist::connect(
                &launch,
                opts.dist_timeout,
                backend,
                device,
            )?))
        } else {
            None
        };
        Ok(Cluster {
            launch,
            device,
            dist,
            ranks_here,
        })
    }

    fn is_main(&self) -> bool {
        self.launch.rank == 0
    }

    fn shard(&self) -> super::loader::Shard {
        super::loader::Shard {
            rank: self.launch.rank,
            world: self.launch.world,
        }
    }

    /// Every rank resumes from the same checkpoint (the step found in the shared `out`) and
    /// starts from rank 0's weights.
    fn agree_on_start(&self, engine: &mut Engine, resumed: Option<u64>, out: &Path) -> Result<()> {
        let Some(d) = &self.dist else {
            return Ok(());
        };
        let start = resumed.unwrap_or(0);
        let first = d.agree(start)?;
        if first != start {
            return Err(Error::Config(format!(
                "rank {} found {} in {} but rank 0 found step {first}: --out must be one folder every rank shares",
                self.launch.rank,
                resumed.map_or("no checkpoint".into(), |s| format!("step {s}")),
                out.display()
            )));
        }
        engine.sync_from_rank0()
    }

    /// Wait for rank 0 (it may be running monitors or writing a checkpoint), with the longer
    /// timeout its own work gets; nothing to wait for in a single-process run.
    fn wait_for_rank0(&self) -> Result<()> {
        match &self.dist {
            Some(d) => d.wait_for_rank0(),
            None => Ok(()),
        }
    }
}

/// `--fresh`: forget the run in `out` (its other files, e.g. mask pictures, are overwritten).
fn clear_run(out: &Path) {
    for f in [
        RESUME_FILE,
        "checkpoint.safetensors",
        "config.json",
        "metrics.jsonl",
        "summary.json",
    ] {
        let _ = std::fs::remove_file(out.join(f));
    }
}

/// The pretraining images: the data set, its `--limit` subset, photos decoded once.
fn open_data(
    p: &PretrainConfig,
    pre: &Preprocess,
    ranks_here: usize,
) -> Result<(DataSpec, Arc<dyn Dataset>)> {
    let spec: DataSpec = p.data.parse()?;
    let mut ds: Arc<dyn Dataset> = spec.open()?;
    if p.limit > 0 {
        ds = data::subset(ds, p.limit, p.seed);
    }
    if matches!(spec, DataSpec::Folder { .. } | DataSpec::Photos) {
        // Keep decoded photos in memory at a little above the training size (up to 4 GiB).
        // every rank keeps its own copy: share the 4 GiB between the ranks of a machine
        ds = data::DecodedCache::wrap_if_fits(
            ds,
            pre.image_size * 5 / 4,
            (4 << 30) / ranks_here as u64,
        );
    }
    Ok((spec, ds))
}

/// How the images divide into optimizer steps. One step takes `batch` images over all ranks,
/// each rank `local` of them in `accum_steps` forward passes of `piece` images.
struct StepPlan {
    piece: usize,
    local: usize,
    batch: usize,
    steps_per_epoch: u64,
    total: u64,
    warmup: u64,
}

impl StepPlan {
    fn new(p: &PretrainConfig, images: usize, world: usize, spec: &DataSpec) -> Result<Self> {
        let local = p.effective_batch();
        let batch = local * world;
        if images < batch {
            let mut parts = vec![p.batch_size.to_string()];
            if p.accum_steps > 1 {
                parts.push(format!("{} accumulation steps", p.accum_steps));
            }
            if world > 1 {
                parts.push(format!("{world} processes"));
            }
            return Err(Error::Config(format!(
                "{spec} has {images} images, fewer than one batch of {batch}{}",
                if parts.len() > 1 {
                    format!(" ({})", parts.join(" × "))
                } else {
                    String::new()
                }
            )));
        }
        let steps_per_epoch = (images / batch) as u64;
        Ok(StepPlan {
            piece: p.batch_size,
            local,
            batch,
            steps_per_epoch,
            total: ((p.epochs * steps_per_epoch as f64).round() as u64).max(1),
            warmup: (p.warmup_epochs * steps_per_epoch as f64).round() as u64,
        })
    }

    /// Training progress of a step: the schedules are functions of t, never of epochs.
    fn t(&self, step: u64) -> f64 {
        step as f64 / self.total as f64
    }

    /// Steps in `epochs` epochs (at least 1); `u64::MAX` (never) for 0 or fewer.
    fn every(&self, epochs: f64) -> u64 {
        if epochs > 0.0 {
            ((epochs * self.steps_per_epoch as f64).round() as u64).max(1)
        } else {
            u64::MAX
        }
    }
}

/// The batches of the steps in flight, with one step of look-ahead: while step s trains on
/// `current()`, step s + 1's batch is already on the device and its masks are being built on a
/// helper thread (for EHM from the teacher's attention, queued before step s; see engine.rs).
struct Prefetch {
    loader: Loader,
    /// Images per accumulation piece, and the bytes of one image.
    piece: usize,
    image_bytes: usize,
    total: u64,
    cur: Vec<Tensor>,
    /// The current step's masks (taken by `masks`).
    job: Option<MaskJob>,
    next: Option<Vec<Tensor>>,
    next_job: Option<MaskJob>,
}

impl Prefetch {
    /// The first two batches from `start` on; the first step's masks are `resumed` (the ones
    /// the uninterrupted run built) when given.
    fn start(
        engine: &Engine,
        (loader, pre): (Loader, &Preprocess),
        plan: &StepPlan,
        start: u64,
        resumed: Option<MaskBatch>,
    ) -> Result<Self> {
        let mut b = Prefetch {
            loader,
            piece: plan.piece,
            image_bytes: pre.tensor_len(),
            total: plan.total,
            cur: Vec::new(),
            job: None,
            next: None,
            next_job: None,
        };
        b.cur = b.upload(engine)?;
        b.job = Some(match resumed {
            Some(m) => MaskJob::Ready(m),
            None => engine.mask_job(&b.cur, plan.t(start), start),
        });
        if start + 1 < b.total {
            b.next = Some(b.upload(engine)?);
        }
        Ok(b)
    }

    /// A step's batch, uploaded as its accumulation pieces. A loader that stops early is an
    /// error: one rank leaving the loop would desert the others in the next all-reduce.
    fn upload(&mut self, engine: &Engine) -> Result<Vec<Tensor>> {
        let batch = self
            .loader
            .next_batch()
            .ok_or_else(|| Error::Other("data loader ended early".into()))?;
        let len = self.piece * self.image_bytes;
        Ok(batch
            .pixels
            .chunks(len)
            .map(|c| engine.upload(c, self.piece))
            .collect())
    }

    fn current(&self) -> &[Tensor] {
        &self.cur
    }

    /// Step `step`'s masks; queues the next batch's before the step runs (the teacher's
    /// forward pass then overlaps the step).
    fn masks(&mut self, engine: &Engine, step: u64) -> Result<MaskBatch> {
        let masks = self.job.take().expect("a mask job per step").wait()?;
        let t = (step + 1) as f64 / self.total as f64;
        self.next_job = self.next.as_ref().map(|n| engine.mask_job(n, t, step + 1));
        Ok(masks)
    }

    /// The next step's masks, waited for (to save them with a checkpoint).
    fn next_masks(&mut self) -> Result<Option<&MaskBatch>> {
        if let Some(job) = self.next_job.take() {
            self.next_job = Some(MaskJob::Ready(job.wait()?));
        }
        Ok(match &self.next_job {
            Some(MaskJob::Ready(m)) => Some(m),
            _ => None,
        })
    }

    /// Move on from step `step` to the next; false after the last.
    fn advance(&mut self, engine: &Engine, step: u64) -> Result<bool> {
        let Some(next) = self.next.take() else {
            return Ok(false);
        };
        self.cur = next;
        self.job = Some(
            self.next_job
                .take()
                .expect("a mask job for every next batch"),
        );
        if step + 2 < self.total {
            self.next = Some(self.upload(engine)?);
        }
        Ok(true)
    }
}

/// The loss summed on the device since the last log line (read once per line, so the host does
/// not wait for the device every step) and when that line was.
struct LossWindow {
    sum: Tensor,
    since: (Instant, u64),
}

impl LossWindow {
    fn new(step: u64, device: Device) -> Self {
        LossWindow {
            sum: Tensor::zeros([], (Kind::Double, device)),
            since: (Instant::now(), step),
        }
    }

    fn add(&mut self, loss: &Tensor) {
        self.sum += loss;
    }

    /// Mean loss (over the ranks too) and images/s since the last call; a non-finite mean
    /// stops the run.
    fn take(
        &mut self,
        done: u64,
        batch: usize,
        dist: Option<&Dist>,
        out: &Path,
    ) -> Result<(f64, f64)> {
        let n = (done - self.since.1).max(1) as f64;
        if let Some(d) = dist {
            d.all_reduce_mean(&mut self.sum)?;
        }
        let mean = self.sum.double_value(&[]) / n;
        if !mean.is_finite() {
            return Err(Error::Training(format!(
                "loss became non-finite between steps {} and {done}; stopped. The last good checkpoint in {} is kept",
                self.since.1,
                out.display()
            )));
        }
        let ips = n * batch as f64 / self.since.0.elapsed().as_secs_f64();
        *self = LossWindow::new(done, self.sum.device());
        Ok((mean, ips))
    }
}

/// What rank 0 watches besides the loss — kNN accuracy, hierarchy quality, the mask picture —
/// and `metrics.jsonl`, where every line goes (other ranks log nothing). The schedules
/// (`knn_every`, `hierarchy_every`) are every rank's: the others wait while rank 0 works.
struct Monitors {
    out: PathBuf,
    metrics: Option<std::fs::File>,
    knn_sets: Option<(Labelled, Labelled)>,
    knn_every: u64,
    knn_last: Option<f64>,
    hierarchy_set: Option<super::hierarchy::HierarchySet>,
    hierarchy_every: u64,
    /// Fixed sample images of the mask picture, and their model inputs.
    pictures: (Vec<image::RgbImage>, Vec<u8>),
    steps_per_epoch: u64,
    t0: Instant,
}

impl Monitors {
    fn open(
        opts: &PretrainOptions,
        spec: &DataSpec,
        pre: &Preprocess,
        ds: &dyn Dataset,
        plan: &StepPlan,
        main: bool,
        resumed: Option<u64>,
    ) -> Result<Self> {
        let out = opts.out.clone();
        let metrics_path = out.join("metrics.jsonl");
        let metrics = if main {
            match resumed {
                Some(s) => truncate_metrics(&metrics_path, s)?,
                None => {
                    let _ = std::fs::remove_file(&metrics_path);
                }
            }
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&metrics_path)
                .at(&metrics_path)?;
            Some(f)
        } else {
            None
        };
        // kNN monitor data: the labelled train/test splits that go with the data set
        let knn_sets = if opts.knn_every < 0.0 || !main {
            None
        } else {
            let (tr, te) = match (&opts.knn_train, &opts.knn_test, spec) {
                (Some(a), Some(b), _) => (Some(a.clone()), Some(b.clone())),
                (_, _, DataSpec::FashionMnist { .. }) => (
                    Some("fashion-mnist:train".into()),
                    Some("fashion-mnist:test".into()),
                ),
                (_, _, DataSpec::Cifar { dir, .. }) => (
                    Some(format!("cifar:{}:train", dir.display())),
                    Some(format!("cifar:{}:test", dir.display())),
                ),
                _ => (None, None),
            };
            match (tr, te) {
                (Some(a), Some(b)) => Some((
                    Labelled::open(&a, opts.knn_limit.0, features::TRAIN_SUBSET_SEED)?,
                    Labelled::open(&b, opts.knn_limit.1, features::TEST_SUBSET_SEED)?,
                )),
                _ => None,
            }
        };
        let pictures = if main {
            super::inspect::model_inputs(pre, &sample_images(ds, 6))
        } else {
            (Vec::new(), Vec::new())
        };
        // hierarchy quality: at the start (an untrained teacher, on a fresh run), every
        // `hierarchy_every` epochs and at the end
        let hierarchy_set = match &opts.hierarchy_data {
            Some(dir) if main => Some(super::hierarchy::HierarchySet::open(
                dir,
                pre,
                opts.hierarchy_limit,
            )?),
            _ => None,
        };
        Ok(Monitors {
            out,
            metrics,
            knn_sets,
            knn_every: plan.every(opts.knn_every),
            knn_last: None,
            hierarchy_set,
            hierarchy_every: plan.every(opts.hierarchy_every),
            pictures,
            steps_per_epoch: plan.steps_per_epoch,
            t0: Instant::now(),
        })
    }

    /// A metrics line of `step` (fill in what it reports).
    fn line(&self, step: u64) -> MetricLine {
        MetricLine::at(step, self.steps_per_epoch, self.t0)
    }

    fn log(&mut self, line: &MetricLine) -> Result<()> {
        match &mut self.metrics {
            Some(f) => writeln!(f, "{}", serde_json::to_string(line).unwrap())
                .at(self.out.join("metrics.jsonl")),
            None => Ok(()),
        }
    }

    /// kNN top-1 of the model now, logged (rank 0, when there are labelled sets).
    fn knn(&mut self, engine: &Engine, pre: &Preprocess, step: u64) -> Result<()> {
        let Some((tr, te)) = &self.knn_sets else {
            return Ok(());
        };
        let acc = knn_eval(engine, pre, tr, te)?;
        self.knn_last = Some(acc);
        self.log(&MetricLine {
            knn_top1: Some(acc),
            ..self.line(step)
        })
    }

    /// The teacher's hierarchy quality now, logged, and the chart of every report so far.
    fn hierarchy(&mut self, engine: &Engine, step: u64) -> Result<()> {
        let Some(set) = &self.hierarchy_set else {
            return Ok(());
        };
        let line = MetricLine {
            hierarchy: Some(super::hierarchy::measure(engine, set)),
            ..self.line(step)
        };
        self.log(&line)?;
        if step > 0 {
            write_hierarchy_chart(&self.out.join("metrics.jsonl"), &self.out)?;
        }
        Ok(())
    }

    /// `masks.png` and `masks/step_N.png`: the sample images' masks at five points of the
    /// schedule, from the teacher now.
    fn mask_picture(&self, engine: &Engine, step: u64) -> Result<()> {
        let (images, inputs) = &self.pictures;
        if images.is_empty() {
            return Ok(());
        }
        let png = mask_picture(engine, inputs, images, step)?;
        write_atomic(&self.out.join("masks.png"), &png)?;
        write_atomic(
            &self.out.join("masks").join(format!("step_{step:07}.png")),
            &png,
        )
    }

    /// Whether rank 0 runs a monitor or saves after step `done` (the others wait for it).
    fn rank0_works_at(&self, done: u64, save_every: u64) -> bool {
        done.is_multiple_of(self.knn_every)
            || done.is_multiple_of(self.hierarchy_every)
            || done.is_multiple_of(save_every)
    }
}

/// Pretrain `entry` as `opts` say (resuming a run found in `opts.out`): join the job, plan the
/// steps, build the engine, then per step — its masks (built one step ahead), the optimizer
/// step, the loss line, the monitors, the checkpoint.
pub fn pretrain(entry: &ZooEntry, opts: &PretrainOptions) -> Result<Summary> {
    let cfg = entry.vit()?;
    let pre = entry.preprocess.clone();
    let p = entry.pretrain.clone();
    p.validate()?;
    let cluster = Cluster::join(opts)?;
    let (device, dist, main) = (cluster.device, cluster.dist.clone(), cluster.is_main());
    let shard = cluster.shard();
    let run = RunConfig {
        name: entry.name.clone(),
        model: cfg.clone(),
        preprocess: pre.clone(),
        pretrain: p.clone(),
    };
    let kind = opts.dtype.unwrap_or(if device == Device::Cpu {
        Kind::Float
    } else {
        Kind::BFloat16
    });
    let (spec, ds) = open_data(&p, &pre, cluster.ranks_here)?;
    let plan = StepPlan::new(&p, ds.len(), cluster.launch.world, &spec)?;
    let (batch, total) = (plan.batch, plan.total);

    let out = &opts.out;
    if main && opts.fresh {
        clear_run(out);
    }
    std::fs::create_dir_all(out).at(out)?;
    let mut engine = Engine::new(&cfg, &pre, &p, device, kind);
    engine.masks.validate().map_err(Error::Config)?;
    engine.set_total_steps(total);
    engine.dist = dist.clone();
    engine.first_image = shard.first(batch);
    if let Some(d) = &dist {
        // rank 0 has cleared a --fresh folder before anyone looks for a checkpoint in it
        d.barrier()?;
    }
    if main && p.masking == MaskingKind::Ehm && !engine.masks.schedule().evolves() {
        eprintln!(
            "warning: the EHM cut stays at {} segments for the whole run (N = {} patches): the masks cannot evolve; set ehm.start_segments / end_segments or use a finer grid",
            engine.masks.schedule().start_segments,
            cfg.num_patches()
        );
    }
    let (resumed, resumed_masks) = match try_resume(&mut engine, &run, out)? {
        Some((s, m)) => (Some(s), m),
        None => (None, None),
    };
    let start = resumed.unwrap_or(0);
    cluster.agree_on_start(&mut engine, resumed, out)?;
    // a saved step's pending masks are the whole batch's: this rank takes its rows
    let resumed_masks = resumed_masks
        .filter(|m| m.batch == batch)
        .map(|m| m.rows(shard.first(batch), plan.local));
    let mut monitors = Monitors::open(opts, &spec, &pre, ds.as_ref(), &plan, main, resumed)?;
    if resumed.is_none() {
        // the hierarchy of the untrained teacher
        monitors.hierarchy(&engine, 0)?;
    }
    cluster.wait_for_rank0()?;

    let bar = super::progress_bar(total, start, opts.progress && main);
    let mut last_loss = None;
    if start < total {
        let loader = Loader::start(
            ds.clone(),
            pre.clone(),
            p.augment.clone(),
            batch,
            p.seed,
            start..total,
            opts.workers.max(1),
            shard,
        );
        let mut batches = Prefetch::start(&engine, (loader, &pre), &plan, start, resumed_masks)?;
        let mut losses = LossWindow::new(start, device);
        for step in start..total {
            let masks = batches.masks(&engine, step)?;
            let lr = engine.lr_at(step, total, plan.warmup);
            if let Some(d) = &dist {
                d.step.store(step + 1, std::sync::atomic::Ordering::Relaxed);
            }
            let loss = engine.step(batches.current(), &masks, lr)?;
            losses.add(&loss);
            let done = step + 1;
            // (data-parallel ranks check only the loss they agree on, at the log steps below,
            // so that all of them stop together)
            if dist.is_none()
                && (device == Device::Cpu || done.is_multiple_of(opts.log_every) || done == total)
            {
                let l = loss.double_value(&[]);
                if !l.is_finite() {
                    return Err(Error::Training(format!(
                        "loss became {l} at step {done}; stopped. The last good checkpoint in {} is kept (lower --blr or check the data)",
                        out.display()
                    )));
                }
            }
            if done.is_multiple_of(opts.log_every) || done == total {
                let (mean, ips) = losses.take(done, batch, dist.as_deref(), out)?;
                last_loss = Some(mean);
                let t = plan.t(step);
                monitors.log(&MetricLine {
                    loss: Some(mean),
                    lr: Some(lr),
                    images_per_s: Some(ips),
                    mask_ratio: Some(engine.masks.schedule().mask_ratio(t)),
                    cut: CutStats::of(&masks, engine.masks.schedule().alpha(t)),
                    ..monitors.line(done)
                })?;
                bar.set_message(format!("loss {mean:.4} lr {lr:.2e} {ips:.0} img/s"));
                if bar.is_hidden() && opts.progress && main {
                    eprintln!("step {done}/{total} loss {mean:.4} lr {lr:.2e} {ips:.0} img/s");
                }
            }
            if done != total && done.is_multiple_of(monitors.knn_every) {
                monitors.knn(&engine, &pre, done)?;
            }
            if done.is_multiple_of(monitors.hierarchy_every) || done == total {
                monitors.hierarchy(&engine, done)?;
            }
            if done.is_multiple_of(opts.save_every) || done == total {
                // the next step's masks, as this run will use them (see PendingMasks)
                let pending = match p.masking {
                    MaskingKind::Ehm => batches.next_masks()?,
                    _ => None,
                };
                // the whole batch's masks (every rank's rows), for rank 0's resume file
                let whole = match (&dist, pending) {
                    (Some(d), Some(m)) => Some(gather_masks(d, m)?),
                    _ => None,
                };
                if main {
                    let masks = whole.as_ref().or(pending);
                    let pending = masks.map(|masks| PendingMasks { step: done, masks });
                    save_all(&engine, &run, out, (done, total), pending)?;
                }
                monitors.mask_picture(&engine, done)?;
            }
            // rank 0 may have run monitors or written a checkpoint: wait for it here, with the
            // longer timeout its own work gets
            if done != total && monitors.rank0_works_at(done, opts.save_every) {
                cluster.wait_for_rank0()?;
            }
            bar.inc(1);
            if !batches.advance(&engine, step)? {
                break;
            }
        }
    }
    bar.finish_and_clear();
    // nobody leaves (closing its connections) while another rank still talks to it
    cluster.wait_for_rank0()?;
    monitors.knn(&engine, &pre, total)?;
    let secs = monitors.t0.elapsed().as_secs_f64();
    let summary = Summary {
        out: out.clone(),
        device: format!("{device:?}"),
        masking: p.masking.to_string(),
        steps: total,
        epochs: total as f64 / plan.steps_per_epoch as f64,
        images: ds.len(),
        final_loss: last_loss,
        images_per_s: (total - start) as f64 * batch as f64 / secs.max(1e-9),
        processes: cluster.launch.world,
        batch,
        seconds: secs,
        knn_top1: monitors.knn_last,
        resumed_from: resumed,
        checkpoint: out.join("checkpoint.safetensors"),
        mask_picture: Some(out.join("masks.png")),
    };
    if main {
        write_atomic(
            &out.join("summary.json"),
            serde_json::to_string_pretty(&summary).unwrap().as_bytes(),
        )?;
    }
    Ok(summary)
}

/// Write the initial (untrained) weights of a zoo entry as a checkpoint folder: for export
/// benchmarks, tests, and anyone who wants the graph before the training.
pub fn write_initial_checkpoint(entry: &ZooEntry, out: &Path) -> Result<PathBuf> {
    let cfg = entry.vit()?;
    let run = RunConfig {
        name: entry.name.clone(),
        model: cfg.clone(),
        preprocess: entry.preprocess.clone(),
        pretrain: entry.pretrain.clone(),
    };
    let engine = Engine::new(
        &cfg,
        &entry.preprocess,
        &entry.pretrain,
        Device::Cpu,
        Kind::Float,
    );
    std::fs::create_dir_all(out).at(out)?;
    save_all(&engine, &run, out, (0, 0), None)?;
    let _ = std::fs::remove_file(out.join("resume.safetensors"));
    Ok(out.join("checkpoint.safetensors"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nccl_only_where_every_rank_has_its_own_gpu() {
        use DistBackend::{Gloo, Nccl};
        // default: NCCL with the plugin and a GPU per rank, else Gloo
        assert_eq!(choose_backend(None, true, 2, 2).unwrap(), Nccl);
        assert_eq!(choose_backend(None, true, 2, 8).unwrap(), Nccl);
        assert_eq!(choose_backend(None, false, 2, 2).unwrap(), Gloo);
        assert_eq!(choose_backend(None, true, 2, 1).unwrap(), Gloo);
        assert_eq!(choose_backend(None, true, 2, 0).unwrap(), Gloo);
        // asked for: given, unless NCCL would put two ranks on one GPU
        assert_eq!(choose_backend(Some(Gloo), true, 4, 1).unwrap(), Gloo);
        assert_eq!(choose_backend(Some(Nccl), true, 2, 2).unwrap(), Nccl);
        let e = choose_backend(Some(Nccl), true, 2, 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("2 ranks share") && e.contains("1 GPU"), "{e}");
        // CPU ranks: left to Dist::connect, which refuses NCCL in its own words
        assert_eq!(choose_backend(Some(Nccl), true, 2, 0).unwrap(), Nccl);
    }
}
