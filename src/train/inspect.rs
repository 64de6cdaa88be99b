//! `ehm-train masks`: the masks a strategy makes on given images at given training progress,
//! without training. With a run folder its teacher parses the images (the EMA of a resumable
//! run, else the checkpoint's weights); without, an untrained model of a zoo entry does — so
//! the difference between the two is what training taught the hierarchy.
use super::engine::{check_affinity, Engine};
use super::pretrain::{open_run, RunConfig};
use crate::config::{MaskingKind, PretrainConfig, ZooEntry};
use crate::data::Preprocess;
use crate::error::Result;
use crate::masking::evolution::{render, Tile};
use crate::masking::MaskBatch;
use image::RgbImage;
use serde::Serialize;
use std::path::{Path, PathBuf};
use tch::{Device, Kind};

/// What to look at.
pub struct MasksOptions {
    /// A pretraining run folder; None = an untrained `model`.
    pub run: Option<PathBuf>,
    /// Zoo entry (name or TOML) of the untrained model.
    pub model: String,
    /// The strategy (default: the run's, else `ehm`).
    pub masking: Option<MaskingKind>,
    /// Training progress values to sample at.
    pub ts: Vec<f64>,
    pub seed: u64,
    pub images: Vec<PathBuf>,
}

/// One image at one t: which patches stay visible, and the cut the masks followed (EHM).
#[derive(Clone, Debug, Serialize)]
pub struct MaskRecord {
    #[serde(serialize_with = "crate::files::lossy_path")]
    pub image: PathBuf,
    pub t: f64,
    pub masking: String,
    /// Patch grid [rows, columns]; patch indices are row-major.
    pub grid: [usize; 2],
    pub visible: Vec<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub segments: Option<Vec<u32>>,
}

/// Changes to a run's recipe (the EHM flags), given the encoder depth.
pub type Adjust<'a> = &'a dyn Fn(&mut PretrainConfig, usize) -> Result<()>;

/// The engine the options ask for, with the run's EHM settings changed by `ehm`.
fn engine(o: &MasksOptions, ehm: Adjust) -> Result<Engine> {
    let e = build_engine(o, ehm)?;
    e.masks.validate().map_err(crate::Error::Config)?;
    Ok(e)
}

fn build_engine(o: &MasksOptions, ehm: Adjust) -> Result<Engine> {
    let adjust = |p: &mut PretrainConfig, depth: usize| {
        if let Some(k) = o.masking {
            p.masking = k;
        } else if o.run.is_none() {
            p.masking = MaskingKind::Ehm;
        }
        p.seed = o.seed;
        ehm(p, depth)
    };
    match &o.run {
        Some(dir) => Ok(open_run(dir, |r: &mut RunConfig| {
            let depth = r.model.depth as usize;
            adjust(&mut r.pretrain, depth)
        })?
        .0),
        None => {
            let mut e = ZooEntry::find(&o.model)?;
            let depth = e.vit()?.depth as usize;
            adjust(&mut e.pretrain, depth)?;
            e.pretrain.validate()?;
            Ok(Engine::new(
                &e.vit()?,
                &e.preprocess,
                &e.pretrain,
                Device::Cpu,
                Kind::Float,
            ))
        }
    }
}

/// `ehm-train hierarchy`: the quality of the hierarchy that the run's teacher (or an untrained
/// model) builds on the val images of the segmentation folder `data`, with the EHM settings
/// changed by `ehm` (e.g. another affinity) — so settings can be compared on one teacher.
pub fn hierarchy_quality(
    o: &MasksOptions,
    data: &Path,
    limit: usize,
    ehm: Adjust,
) -> Result<super::hierarchy::HierarchyReport> {
    let o = MasksOptions {
        masking: Some(MaskingKind::Ehm),
        run: o.run.clone(),
        model: o.model.clone(),
        ts: vec![],
        seed: o.seed,
        images: vec![],
    };
    let engine = engine(&o, ehm)?;
    let set = super::hierarchy::HierarchySet::open(data, &engine.preprocess, limit)?;
    Ok(super::hierarchy::measure(&engine, &set))
}

/// Images through the model's evaluation crop and resize: as pictures show them, and as the
/// CHW bytes the engine uploads.
pub fn model_inputs(pre: &Preprocess, images: &[RgbImage]) -> (Vec<RgbImage>, Vec<u8>) {
    let per = pre.tensor_len();
    let shown: Vec<RgbImage> = images
        .iter()
        .map(|img| {
            let crop = pre.eval_crop(img.width(), img.height());
            crate::data::preprocess::resize_crop(img, crop, pre.image_size, pre.interpolation)
        })
        .collect();
    let mut pixels = vec![0u8; shown.len() * per];
    for (img, out) in shown.iter().zip(pixels.chunks_mut(per)) {
        crate::data::preprocess::chw_u8_into(img, false, out);
    }
    (shown, pixels)
}

/// The engine's masks for the images `pixels` (CHW bytes) at each progress value in `ts`; the
/// teacher runs 32 images at a time, so any number of images fits in memory.
/// `when` names the moment for error messages ("at step 40").
pub fn sample_at(engine: &Engine, pixels: &[u8], ts: &[f64], when: &str) -> Result<Vec<MaskBatch>> {
    let per = engine.preprocess.tensor_len();
    let mut per_t: Vec<Vec<MaskBatch>> = vec![Vec::new(); ts.len()];
    for chunk in pixels.chunks(32 * per) {
        let b = chunk.len() / per;
        let aff = if engine.masks.kind == MaskingKind::Ehm {
            let a = engine.affinity_host(&engine.upload(chunk, b));
            check_affinity(&a, when)?;
            Some(a)
        } else {
            None
        };
        for (k, &t) in ts.iter().enumerate() {
            per_t[k].push(engine.masks.sample(b, t, 0, aff.as_deref()));
        }
    }
    Ok(per_t.into_iter().map(MaskBatch::concat).collect())
}

/// The mask picture: one row per image — the image, then its masks at each t (`batches[k]`
/// sampled at `ts[k]`) — with the segment count above each column.
pub fn sheet(
    engine: &Engine,
    shown: &[RgbImage],
    batches: &[MaskBatch],
    ts: &[f64],
    tile: u32,
) -> RgbImage {
    let n = engine.masks.grid.n();
    let tiles: Vec<Vec<Tile>> = (0..shown.len())
        .map(|i| {
            let mut row = vec![Tile {
                image: &shown[i],
                segments: None,
                mask: None,
            }];
            row.extend(batches.iter().map(|m| Tile {
                image: &shown[i],
                segments: m.segments.as_ref().map(|s| &s[i * n..(i + 1) * n]),
                mask: Some(&m.mask[i * n..(i + 1) * n]),
            }));
            row
        })
        .collect();
    let sched = engine.masks.schedule();
    let mut headers = vec!["image".to_string()];
    headers.extend(ts.iter().map(|&t| match engine.masks.kind {
        MaskingKind::Ehm => format!("t={t} c={}", sched.segments(t)),
        _ => format!("t={t}"),
    }));
    render(&tiles, engine.masks.grid, tile, &headers)
}

/// Sample the masks; returns one record per image and t (images outer) and the picture
/// (rows: images; columns: the image, then each t).
pub fn masks(o: &MasksOptions, ehm: Adjust) -> Result<(Vec<MaskRecord>, RgbImage)> {
    let engine = engine(o, ehm)?;
    let images: Vec<RgbImage> = o
        .images
        .iter()
        .map(|p| crate::data::image_io::load_rgb(p))
        .collect::<Result<_>>()?;
    let (shown, pixels) = model_inputs(&engine.preprocess, &images);
    let batches = sample_at(&engine, &pixels, &o.ts, "on these images")?;
    let grid = engine.masks.grid;
    let n = grid.n();
    let mut records = Vec::new();
    for (i, path) in o.images.iter().enumerate() {
        for (m, &t) in batches.iter().zip(&o.ts) {
            records.push(MaskRecord {
                image: path.clone(),
                t,
                masking: engine.masks.kind.to_string(),
                grid: [grid.h, grid.w],
                visible: (0..n).filter(|&p| m.mask[i * n + p] == 0.0).collect(),
                segments: m.segments.as_ref().map(|s| s[i * n..(i + 1) * n].to_vec()),
            });
        }
    }
    Ok((records, sheet(&engine, &shown, &batches, &o.ts, 128)))
}

/// Whether `p` is a pretraining run folder (so `ehm-train masks RUN IMAGES…` can tell it
/// from an image folder).
pub fn is_run_dir(p: &Path) -> bool {
    p.join("checkpoint.safetensors").is_file() && p.join("config.json").is_file()
}
