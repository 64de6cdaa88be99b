//! `ehm-train pretrain`: MAE pretraining with random / block / grid / EHM masking.
//! Checkpoints atomically every N steps; re-running the same command resumes.
use super::checkpoint::{load_tensors, save_tensors};
use super::engine::Engine;
use super::features::{self, Labelled, Pool};
use super::loader::Loader;
use crate::config::{MaskingKind, PretrainConfig, VitConfig, ZooEntry};
use crate::data::{self, DataSpec, Dataset, Preprocess};
use crate::error::{Error, IoContext, Result};
use crate::fsutil::write_atomic;
use crate::masking::picture::{render, Tile};
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
    pub workers: usize,
    pub dtype: Option<Kind>,
    pub fresh: bool,
    pub progress: bool,
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
    #[serde(serialize_with = "crate::fsutil::lossy_path")]
    pub out: PathBuf,
    pub device: String,
    pub masking: String,
    /// Steps of the whole run (`resumed_from` says where this invocation started).
    pub steps: u64,
    pub epochs: f64,
    pub images: usize,
    pub final_loss: Option<f64>,
    pub images_per_s: f64,
    pub seconds: f64,
    pub knn_top1: Option<f64>,
    pub resumed_from: Option<u64>,
    #[serde(serialize_with = "crate::fsutil::lossy_path")]
    pub checkpoint: PathBuf,
    #[serde(serialize_with = "crate::fsutil::lossy_opt_path")]
    pub mask_picture: Option<PathBuf>,
}

#[derive(Serialize)]
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
    knn_top1: Option<f64>,
    elapsed_s: f64,
}

impl MetricLine {
    fn knn(step: u64, steps_per_epoch: u64, acc: f64, t0: Instant) -> Self {
        MetricLine {
            step,
            epoch: step as f64 / steps_per_epoch as f64,
            loss: None,
            lr: None,
            images_per_s: None,
            knn_top1: Some(acc),
            elapsed_s: t0.elapsed().as_secs_f64(),
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
fn mask_picture(engine: &Engine, samples: &[u8], images: &[image::RgbImage]) -> Result<Vec<u8>> {
    let b = images.len();
    let imgs = engine.upload(samples, b);
    let ts = [0.0, 0.25, 0.5, 0.75, 1.0];
    let aff = (engine.masks.kind == MaskingKind::Ehm).then(|| engine.affinity_host(&imgs));
    let batches: Vec<_> = ts
        .iter()
        .map(|&t| engine.masks.sample(b, t, 0, aff.as_deref()))
        .collect();
    let n = engine.masks.grid.n();
    let tiles: Vec<Vec<Tile>> = (0..b)
        .map(|i| {
            let mut row = vec![Tile {
                image: &images[i],
                segments: None,
                mask: None,
            }];
            for m in &batches {
                row.push(Tile {
                    image: &images[i],
                    segments: m.segments.as_ref().map(|s| &s[i * n..(i + 1) * n]),
                    mask: Some(&m.mask[i * n..(i + 1) * n]),
                });
            }
            row
        })
        .collect();
    let pic = render(&tiles, engine.masks.grid, 96);
    crate::fsutil::png_bytes(&pic)
}

fn save_all(engine: &Engine, run: &RunConfig, out: &Path, step: u64, total: u64) -> Result<()> {
    let cfg_json = serde_json::to_string(run).expect("serialisable");
    let mut meta = HashMap::from([
        ("step".to_string(), step.to_string()),
        ("adam_step".to_string(), engine.flat.adam_step.to_string()),
        ("total_steps".to_string(), total.to_string()),
        ("run_config".to_string(), cfg_json.clone()),
    ]);
    let mut state = vec![
        ("master".to_string(), engine.flat.master.shallow_clone()),
        ("adam_m".to_string(), engine.flat.m.shallow_clone()),
        ("adam_v".to_string(), engine.flat.v.shallow_clone()),
    ];
    if let Some(t) = &engine.teacher {
        state.push(("ema".to_string(), t.ema.shallow_clone()));
    }
    // The resume file is the one source of truth; write it first, then the user-facing files.
    save_tensors(&out.join("resume.safetensors"), &state, meta.clone())?;
    meta.remove("run_config");
    meta.insert("ehm.config".into(), cfg_json);
    save_tensors(
        &out.join("checkpoint.safetensors"),
        &engine.named_weights(),
        meta,
    )?;
    let cfg = serde_json::json!({
        "architecture": run.model.arch,
        "model": run.model,
        "preprocess": run.preprocess,
        "pretrain": run.pretrain,
        "name": run.name,
        "step": step,
        "total_steps": total,
        "timm_model": format!("{}_patch{}_{}", run.model.arch, run.model.patch_size, run.model.image_size),
    });
    write_atomic(
        &out.join("config.json"),
        serde_json::to_string_pretty(&cfg).unwrap().as_bytes(),
    )
}

/// Load resume state; returns the step to continue from.
fn try_resume(engine: &mut Engine, run: &RunConfig, out: &Path) -> Result<Option<u64>> {
    let path = out.join("resume.safetensors");
    if !path.exists() {
        return Ok(None);
    }
    let (t, meta) = load_tensors(&path)?;
    let saved: RunConfig = meta
        .get("run_config")
        .and_then(|s| serde_json::from_str(s).ok())
        .ok_or_else(|| Error::bad_file(&path, "no run configuration in the resume file"))?;
    if &saved != run {
        return Err(Error::Config(format!(
            "{} holds a different run (model, data or recipe differ); pass --fresh to start over or choose another --out",
            out.display()
        )));
    }
    engine.flat.restore(&t, &meta, &path)?;
    if let Some(te) = &mut engine.teacher {
        let ema = t
            .get("ema")
            .ok_or_else(|| Error::bad_file(&path, "missing ema"))?;
        tch::no_grad(|| te.ema.copy_(&ema.to_device(engine.device)));
        te.refresh();
    }
    let step = meta
        .get("step")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::bad_file(&path, "no step in resume file"))?;
    Ok(Some(step))
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

pub fn pretrain(entry: &ZooEntry, opts: &PretrainOptions) -> Result<Summary> {
    let cfg = entry.vit()?;
    let pre = entry.preprocess.clone();
    let p = entry.pretrain.clone();
    p.validate()?;
    let run = RunConfig {
        name: entry.name.clone(),
        model: cfg.clone(),
        preprocess: pre.clone(),
        pretrain: p.clone(),
    };
    let device = crate::model::default_device();
    let kind = opts.dtype.unwrap_or(if device == Device::Cpu {
        Kind::Float
    } else {
        Kind::BFloat16
    });

    let spec: DataSpec = p.data.parse()?;
    let mut ds: Arc<dyn Dataset> = spec.open()?;
    if p.limit > 0 {
        ds = data::subset(ds, p.limit, p.seed);
    }
    if matches!(spec, DataSpec::Folder { .. } | DataSpec::Photos) {
        // Keep decoded photos in memory at a little above the training size (up to 4 GiB).
        ds = data::DecodedCache::wrap_if_fits(ds, pre.image_size * 5 / 4, 4 << 30);
    }
    if ds.len() < p.batch_size {
        return Err(Error::Config(format!(
            "{} has {} images, fewer than one batch of {}",
            spec,
            ds.len(),
            p.batch_size
        )));
    }
    let spe = (ds.len() / p.batch_size) as u64;
    let total = ((p.epochs * spe as f64).round() as u64).max(1);
    let warmup = (p.warmup_epochs * spe as f64).round() as u64;

    let out = &opts.out;
    if opts.fresh && out.exists() {
        for f in [
            "resume.safetensors",
            "checkpoint.safetensors",
            "config.json",
            "metrics.jsonl",
            "summary.json",
        ] {
            let _ = std::fs::remove_file(out.join(f));
        }
    }
    std::fs::create_dir_all(out).at(out)?;
    let mut engine = Engine::new(&cfg, &pre, &p, device, kind);
    let resumed = try_resume(&mut engine, &run, out)?;
    let start = resumed.unwrap_or(0);
    let metrics_path = out.join("metrics.jsonl");
    if let Some(s) = resumed {
        truncate_metrics(&metrics_path, s)?;
    } else {
        let _ = std::fs::remove_file(&metrics_path);
    }

    // kNN monitor data: the labelled train/test splits that go with the data set.
    let knn_sets = if opts.knn_every < 0.0 {
        None
    } else {
        let (tr, te) = match (&opts.knn_train, &opts.knn_test, &spec) {
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
    let knn_every_steps = if opts.knn_every > 0.0 {
        ((opts.knn_every * spe as f64).round() as u64).max(1)
    } else {
        u64::MAX
    };

    // Fixed sample images for the mask picture.
    let per = pre.tensor_len();
    let pics: Vec<image::RgbImage> = sample_images(ds.as_ref(), 6)
        .iter()
        .map(|img| {
            let c = pre.eval_crop(img.width(), img.height());
            crate::data::preprocess::resize_crop(img, c, pre.image_size, pre.interpolation)
        })
        .collect();
    let mut pic_bytes = vec![0u8; pics.len() * per];
    for (i, img) in pics.iter().enumerate() {
        crate::data::preprocess::chw_u8_into(img, false, &mut pic_bytes[i * per..(i + 1) * per]);
    }

    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .at(&metrics_path)?;
    let t0 = Instant::now();
    let bar = super::progress_bar(total, start, opts.progress);
    let mut last_loss = None;
    let mut knn_last = None;
    let mut window = (Instant::now(), 0u64);
    let mut loss_acc = Tensor::zeros([], (Kind::Double, device));

    if start < total {
        let mut loader = Loader::start(
            ds.clone(),
            pre.clone(),
            p.augment.clone(),
            p.batch_size,
            p.seed,
            start..total,
            opts.workers.max(1),
        );
        let upload =
            |e: &Engine, l: &mut Loader| l.next_batch().map(|b| e.upload(&b.pixels, p.batch_size));
        let mut cur = upload(&engine, &mut loader)
            .ok_or_else(|| Error::Other("data loader ended early".into()))?;
        let mut job = engine.mask_job(&cur, start as f64 / total as f64, start);
        let mut next = if start + 1 < total {
            upload(&engine, &mut loader)
        } else {
            None
        };
        for step in start..total {
            let masks = job.wait()?;
            // Queue the teacher for the next batch before this step (see engine.rs).
            let next_job = next
                .as_ref()
                .map(|n| engine.mask_job(n, (step + 1) as f64 / total as f64, step + 1));
            let lr = engine.lr_at(step, total, warmup);
            let loss = engine.step(&cur, &masks, lr);
            loss_acc += &loss;
            let done = step + 1;
            if device == Device::Cpu || done % opts.log_every == 0 || done == total {
                let l = loss.double_value(&[]);
                if !l.is_finite() {
                    return Err(Error::Training(format!(
                        "loss became {l} at step {done}; stopped. The last good checkpoint in {} is kept (lower --blr or check the data)",
                        out.display()
                    )));
                }
            }
            if done % opts.log_every == 0 || done == total {
                let n = (done - window.1.max(start)).max(1) as f64;
                let mean = loss_acc.double_value(&[]) / n;
                if !mean.is_finite() {
                    return Err(Error::Training(format!(
                        "loss became non-finite between steps {} and {done}; stopped. The last good checkpoint in {} is kept",
                        window.1.max(start),
                        out.display()
                    )));
                }
                let ips = n * p.batch_size as f64 / window.0.elapsed().as_secs_f64();
                window = (Instant::now(), done);
                loss_acc = Tensor::zeros([], (Kind::Double, device));
                last_loss = Some(mean);
                let line = MetricLine {
                    step: done,
                    epoch: done as f64 / spe as f64,
                    loss: Some(mean),
                    lr: Some(lr),
                    images_per_s: Some(ips),
                    knn_top1: None,
                    elapsed_s: t0.elapsed().as_secs_f64(),
                };
                writeln!(metrics, "{}", serde_json::to_string(&line).unwrap()).at(&metrics_path)?;
                bar.set_message(format!("loss {mean:.4} lr {lr:.2e} {ips:.0} img/s"));
                if bar.is_hidden() && opts.progress {
                    eprintln!("step {done}/{total} loss {mean:.4} lr {lr:.2e} {ips:.0} img/s");
                }
            }
            if let Some((tr, te)) = &knn_sets {
                if done % knn_every_steps == 0 && done != total {
                    let acc = knn_eval(&engine, &pre, tr, te)?;
                    knn_last = Some(acc);
                    let line = MetricLine::knn(done, spe, acc, t0);
                    writeln!(metrics, "{}", serde_json::to_string(&line).unwrap())
                        .at(&metrics_path)?;
                }
            }
            if done % opts.save_every == 0 || done == total {
                save_all(&engine, &run, out, done, total)?;
                if !pics.is_empty() {
                    let png = mask_picture(&engine, &pic_bytes, &pics)?;
                    write_atomic(&out.join("masks.png"), &png)?;
                    write_atomic(&out.join("masks").join(format!("step_{done:07}.png")), &png)?;
                }
            }
            bar.inc(1);
            cur = match next.take() {
                Some(n) => n,
                None => break,
            };
            job = next_job.expect("a job for every next batch");
            next = if step + 2 < total {
                upload(&engine, &mut loader)
            } else {
                None
            };
        }
    }
    bar.finish_and_clear();
    if let Some((tr, te)) = &knn_sets {
        let acc = knn_eval(&engine, &pre, tr, te)?;
        knn_last = Some(acc);
        let line = MetricLine::knn(total, spe, acc, t0);
        writeln!(metrics, "{}", serde_json::to_string(&line).unwrap()).at(&metrics_path)?;
    }
    let secs = t0.elapsed().as_secs_f64();
    let summary = Summary {
        out: out.clone(),
        device: format!("{device:?}"),
        masking: p.masking.to_string(),
        steps: total,
        epochs: total as f64 / spe as f64,
        images: ds.len(),
        final_loss: last_loss,
        images_per_s: (total - start) as f64 * p.batch_size as f64 / secs.max(1e-9),
        seconds: secs,
        knn_top1: knn_last,
        resumed_from: resumed,
        checkpoint: out.join("checkpoint.safetensors"),
        mask_picture: Some(out.join("masks.png")),
    };
    write_atomic(
        &out.join("summary.json"),
        serde_json::to_string_pretty(&summary).unwrap().as_bytes(),
    )?;
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
    save_all(&engine, &run, out, 0, 0)?;
    let _ = std::fs::remove_file(out.join("resume.safetensors"));
    Ok(out.join("checkpoint.safetensors"))
}
