//! `ehm-train masks`: the masks a strategy makes on given images at given training progress,
//! without training. With a run folder its teacher parses the images (the EMA of a resumable
//! run, else the checkpoint's weights); without, an untrained model of a zoo entry does — so
//! the difference between the two is what training taught the hierarchy.
use super::engine::Engine;
use super::pretrain::{open_run, RunConfig};
use crate::config::{MaskingKind, PretrainConfig, ZooEntry};
use crate::error::Result;
use crate::masking::picture::{render, Tile};
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
    #[serde(serialize_with = "crate::fsutil::lossy_path")]
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

/// Sample the masks; returns one record per image and t (images outer) and the picture
/// (rows: images; columns: the image, then each t).
pub fn masks(o: &MasksOptions, ehm: Adjust) -> Result<(Vec<MaskRecord>, RgbImage)> {
    let engine = engine(o, ehm)?;
    let pre = engine.preprocess.clone();
    let per = pre.tensor_len();
    let mut pixels = vec![0u8; o.images.len() * per];
    let mut shown = Vec::new();
    for (p, out) in o.images.iter().zip(pixels.chunks_mut(per)) {
        let img = crate::data::image_io::load_rgb(p)?;
        let crop = pre.eval_crop(img.width(), img.height());
        let small =
            crate::data::preprocess::resize_crop(&img, crop, pre.image_size, pre.interpolation);
        crate::data::preprocess::chw_u8_into(&small, false, out);
        shown.push(small);
    }
    let b = o.images.len();
    let imgs = engine.upload(&pixels, b);
    let aff = (engine.masks.kind == MaskingKind::Ehm).then(|| engine.affinity_host(&imgs));
    if let Some(a) = &aff {
        let bad = crate::masking::non_finite(a);
        if bad > 0 {
            return Err(crate::Error::Training(format!(
                "the teacher's attention holds {bad} NaN/infinite values: its weights are damaged"
            )));
        }
    }
    let batches: Vec<_> =
        o.ts.iter()
            .map(|&t| engine.masks.sample(b, t, 0, aff.as_deref()))
            .collect();
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
    let tiles: Vec<Vec<Tile>> = (0..b)
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
    headers.extend(o.ts.iter().map(|&t| match engine.masks.kind {
        MaskingKind::Ehm => format!("t={t} c={}", sched.segments(t)),
        _ => format!("t={t}"),
    }));
    Ok((records, render(&tiles, grid, 128, &headers)))
}

/// Whether `p` is a pretraining run folder (so `ehm-train masks RUN IMAGES…` can tell it
/// from an image folder).
pub fn is_run_dir(p: &Path) -> bool {
    p.join("checkpoint.safetensors").is_file() && p.join("config.json").is_file()
}
