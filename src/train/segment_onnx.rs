//! `ehm-train segment MODEL.onnx`: the same linear segmentation head as `segment` (class logits
//! per patch token, bilinearly upsampled), trained on the frozen features of any ONNX model
//! that follows the export contract — a `backbone` model, or an `embed` model with
//! `patch_tokens` (`ehm-export patch-tokens`) — such as the shipped photo embedder or DINOv2
//! adopted with `ehm-export import`. Why: a backbone that has seen photos finds objects where a
//! small Fashion-MNIST one cannot, and most such backbones exist only as ONNX files.
//!
//! The features come from ONNX Runtime once per image and view (the image and its mirror
//! image) and are cached in the run folder (`features.safetensors`, keyed by the model's
//! sha256, the data and the limits), so re-runs and resumed runs skip them; the head trains in
//! tch. The run folder's `config.json` names the model file and its sha256, and
//! `ehm-export onnx RUN --task segment` appends the head to that model's graph
//! (`export::segment_on_onnx`), so `ehm-segment` computes what the evaluation here computed.
use super::checkpoint::{load_tensors, save_tensors};
use super::optim::FlatParams;
use super::segment::{mask_crop, pixel_loss, SegSplit, SegmentOptions, SegmentReport, IGNORE};
use super::supervised::{self, Recipe};
use crate::contract::{ModelContract, Task, PATCH_TOKENS};
use crate::data::preprocess::{Crop, ResizeRule};
use crate::data::segdata::read_classes;
use crate::data::Preprocess;
use crate::error::{Error, IoContext, Result};
use crate::eval::SegMeter;
use crate::infer::OrtModel;
use image::GrayImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::Path;
use tch::{nn, nn::Module, Device, Kind, Tensor};

/// Whether `segment`'s backbone argument is an ONNX file (else a run folder / checkpoint).
pub fn is_onnx(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("onnx"))
}

/// The output holding a model's patch tokens, and whether its first token is the class token.
pub fn token_output(c: &ModelContract, path: &Path) -> Result<(&'static str, bool)> {
    match c.task {
        Task::Backbone => Ok((Task::Backbone.output(), true)),
        Task::Embed if c.has_patch_tokens() => Ok((PATCH_TOKENS, false)),
        t => Err(Error::bad_file(
            path,
            format!(
                "a {} model without patch tokens: segmentation needs a backbone model, or an \
                 embed model with them (ehm-export patch-tokens)",
                t.name()
            ),
        )),
    }
}

/// Patch tokens `[n, P, D]` and targets `[n, S, S]` (class index, IGNORE where unlabelled).
struct Features {
    tokens: Tensor,
    targets: Tensor,
}

/// Tokens of every image of `split` (and of its mirror image when `mirror`), with targets at
/// `r`² (the resolution the loss is computed at).
fn extract(
    model: &mut OrtModel,
    pre: &Preprocess,
    split: &SegSplit,
    (mirror, r): (bool, u32),
    progress: &indicatif::ProgressBar,
) -> Result<Features> {
    let (out, has_cls) = token_output(&model.contract, &model.path)?;
    let full = |m: &GrayImage| Crop {
        left: 0.0,
        top: 0.0,
        width: m.width() as f64,
        height: m.height() as f64,
    };
    let flips: &[bool] = if mirror { &[false, true] } else { &[false] };
    let len = pre.tensor_len();
    let (mut tokens, mut shape, mut targets) = (Vec::new(), Vec::new(), Vec::new());
    let index: Vec<(usize, bool)> = (0..split.images.len())
        .flat_map(|i| flips.iter().map(move |&f| (i, f)))
        .collect();
    for chunk in index.chunks(32) {
        let mut px = vec![0f32; chunk.len() * len];
        px.par_chunks_mut(len)
            .zip(chunk.par_iter())
            .for_each(|(buf, &(i, flip))| {
                if flip {
                    pre.eval_into(&image::imageops::flip_horizontal(&split.images[i]), buf)
                } else {
                    pre.eval_into(&split.images[i], buf)
                }
            });
        let (sh, v) = model.run(&px, chunk.len(), out)?;
        if sh.len() != 3 || sh[0] != chunk.len() {
            return Err(Error::Shape(format!(
                "{}: output '{out}' has shape {sh:?}, expected [{}, tokens, width]",
                model.path.display(),
                chunk.len()
            )));
        }
        let (n, d) = (sh[1], sh[2]);
        let skip = usize::from(has_cls);
        for j in 0..chunk.len() {
            tokens.extend_from_slice(&v[(j * n + skip) * d..(j + 1) * n * d]);
        }
        shape = vec![n - skip, d];
        for &(i, flip) in chunk {
            let m = &split.masks[i];
            targets.extend(mask_crop(m, full(m), r, flip).into_iter().map(f32::from));
        }
        progress.inc(chunk.len() as u64);
    }
    let (p, d) = (shape[0] as i64, shape[1] as i64);
    let g = (p as f64).sqrt().round() as i64;
    if g * g != p {
        return Err(Error::Shape(format!(
            "{}: {p} patch tokens do not form a square grid",
            model.path.display()
        )));
    }
    let n = index.len() as i64;
    Ok(Features {
        tokens: Tensor::from_slice(&tokens).view([n, p, d]),
        targets: Tensor::from_slice(&targets).view([n, r as i64, r as i64]),
    })
}

/// The features of both splits: from the cache in `out` when its key matches, else extracted
/// (and cached, atomically).
fn features(
    model: &mut OrtModel,
    pre: &Preprocess,
    (train, val): (&SegSplit, &SegSplit),
    key: &str,
    (loss_size, out): (u32, &Path),
    show: bool,
) -> Result<(Features, Features)> {
    let path = out.join("features.safetensors");
    if path.exists() {
        let (t, meta) = load_tensors(&path)?;
        if meta.get("key").map(String::as_str) == Some(key) {
            let take = |k: &str| {
                t.get(k)
                    .map(Tensor::shallow_clone)
                    .ok_or_else(|| Error::bad_file(&path, format!("missing {k}")))
            };
            let f = |a: &str, b: &str| -> Result<Features> {
                Ok(Features {
                    tokens: take(a)?,
                    targets: take(b)?,
                })
            };
            return Ok((
                f("train_tokens", "train_targets")?,
                f("val_tokens", "val_targets")?,
            ));
        }
    }
    let bar = crate::progress::inputs_bar(2 * train.images.len() + val.images.len(), show);
    bar.set_message("features");
    let tr = extract(model, pre, train, (true, loss_size), &bar)?;
    let va = extract(model, pre, val, (false, loss_size), &bar)?;
    bar.finish_and_clear();
    save_tensors(
        &path,
        &[
            ("train_tokens".into(), tr.tokens.shallow_clone()),
            ("train_targets".into(), tr.targets.shallow_clone()),
            ("val_tokens".into(), va.tokens.shallow_clone()),
            ("val_targets".into(), va.targets.shallow_clone()),
        ],
        HashMap::from([("key".to_string(), key.to_string())]),
    )?;
    Ok((tr, va))
}

/// The linear head on `[b, P, D]` tokens → per-pixel logits `[b, C, S, S]` (fp32).
fn head_logits(head: &nn::Linear, tokens: &Tensor, size: i64) -> Tensor {
    let (b, p, _) = tokens.size3().unwrap();
    let g = (p as f64).sqrt().round() as i64;
    let l = head.forward(tokens);
    let c = l.size()[2];
    l.permute([0, 2, 1])
        .reshape([b, c, g, g])
        .upsample_bilinear2d([size, size], false, None, None)
}

pub fn segment_onnx(o: &SegmentOptions) -> Result<SegmentReport> {
    let r: &Recipe = &o.recipe;
    let device = crate::model::default_device();
    let sha = crate::files::sha256_file(&o.checkpoint)?;
    let mut model = OrtModel::open(&o.checkpoint, rayon::current_num_threads())?;
    token_output(&model.contract, &o.checkpoint)?;
    let cfg = model.contract.config.clone();
    if let Some(s) = o.image_size.filter(|&s| s != cfg.preprocess.image_size) {
        return Err(Error::Config(format!(
            "--image-size {s}: {} takes {}² images only",
            o.checkpoint.display(),
            cfg.preprocess.image_size
        )));
    }
    if !o.freeze_backbone {
        return Err(Error::Config(format!(
            "{}: an ONNX backbone stays frozen (pass --freeze-backbone; fine-tuning needs a \
             checkpoint from ehm-train)",
            o.checkpoint.display()
        )));
    }
    // the same input rule as `segment`: stretched to S², no crop
    let pre = Preprocess {
        resize: ResizeRule::Stretch,
        crop_pct: 1.0,
        ..cfg.preprocess.clone()
    };
    let train = SegSplit::open(&o.data, "train", o.train_limit)?;
    let val = SegSplit::open(&o.data, "val", o.val_limit)?;
    let classes = read_classes(&o.data, train.max_label().max(val.max_label()))?;
    if classes.len() < 2 || classes.len() > 255 {
        return Err(Error::bad_file(
            o.data.join("classes.json"),
            format!("need 2–255 classes, found {}", classes.len()),
        ));
    }
    std::fs::create_dir_all(&o.out).at(&o.out)?;
    if o.fresh {
        supervised::clear_state(&o.out);
    }
    // The loss is computed at the labels' own resolution when that is below the input's: a
    // 64² mask stretched to 224² adds no detail, only 12× the work per step.
    let label_side = train
        .masks
        .iter()
        .map(|m| m.width().max(m.height()))
        .max()
        .unwrap_or(1);
    let loss_size = pre.image_size.min(label_side);
    let key = serde_json::json!({"model_sha256": sha, "data": o.data, "train": train.names.len(),
        "val": val.names.len(), "preprocess": pre, "loss_size": loss_size})
    .to_string();
    let (tr, va) = features(
        &mut model,
        &pre,
        (&train, &val),
        &key,
        (loss_size, &o.out),
        o.progress,
    )?;
    drop(model);
    let (tr_tokens, tr_targets) = (
        tr.tokens.to_device(device),
        tr.targets.to_kind(Kind::Int64).to_device(device),
    );
    let d = tr.tokens.size()[2];
    let s = pre.image_size as i64;

    tch::manual_seed(r.seed as i64);
    let vs = nn::VarStore::new(device);
    let head = nn::linear(
        vs.root() / "seg_head",
        d,
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
    let mut flat = FlatParams::new(&vs, Kind::Float);
    let run = serde_json::json!({
        "task": "segment", "backbone_onnx": o.checkpoint, "backbone_sha256": sha, "data": o.data,
        "train_limit": o.train_limit, "image_size": pre.image_size, "recipe": r,
    });
    let start = supervised::load_state(&o.out, &mut flat, &run)?.unwrap_or(0);
    let n = tr.tokens.size()[0];
    let batch = (r.batch_size as i64).min(n);
    let mut log = supervised::TrainingLoop::new(&o.out, &run, r, (n / batch).max(1) as u64);
    let total = log.total;
    let bar = super::progress_bar(total, start, o.progress);
    for step in start..total {
        // a pure function of (seed, step): a resumed run sees the same batches
        let mut rng = ChaCha8Rng::seed_from_u64(r.seed ^ 0x5e9_0e1);
        rng.set_stream(step);
        let idx: Vec<i64> = (0..batch).map(|_| rng.random_range(0..n)).collect();
        let idx = Tensor::from_slice(&idx).to_device(device);
        let logits = head_logits(&head, &tr_tokens.index_select(0, &idx), loss_size as i64);
        let loss = pixel_loss(&logits, &tr_targets.index_select(0, &idx), r);
        let lv = log.step(&mut flat, &loss, step)?;
        bar.set_position(step + 1);
        bar.set_message(format!("loss {lv:.4}"));
    }
    bar.finish_and_clear();

    // evaluation as ehm-segment computes it: logits at S², resized to each image's own size
    let mut meter = SegMeter::new(classes.len(), Some(IGNORE));
    let mut preds = Vec::with_capacity(val.images.len());
    let va_tokens = va.tokens.to_device(device);
    for (i, m) in val.masks.iter().enumerate() {
        let (w, h) = (m.width() as i64, m.height() as i64);
        let p = tch::no_grad(|| {
            head_logits(&head, &va_tokens.narrow(0, i as i64, 1), s)
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
    let scores = meter.scores();

    let ckpt = o.out.join("checkpoint.safetensors");
    save_tensors(&ckpt, &flat.named_weights(&vs), HashMap::new())?;
    crate::checkpoint::OnnxHeadConfig {
        task: "segment".into(),
        backbone_onnx: std::path::absolute(&o.checkpoint).unwrap_or(o.checkpoint.clone()),
        backbone_sha256: sha.clone(),
        preprocess: pre.clone(),
        labels: classes.clone(),
        head: crate::checkpoint::HeadRecord::from_json(serde_json::json!({
            "kind": "segment", "data": o.data, "frozen_backbone": true, "recipe": r,
            "miou": scores.miou})),
    }
    .write(&o.out)?;
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
