//! The hierarchy-quality monitor: how well the teacher's cut follows real objects. The val
//! images of a segmentation folder (`ehm-train make-segdata`: Tux Paint objects with exact
//! masks pasted on photos) go through the teacher; each image's merge tree is cut at a few
//! segment counts and scored against its object map (`masking::quality`: ASA, boundary
//! recall, best IoU), next to a fixed grid partition of the same count. Logged in
//! `metrics.jsonl` during pretraining and drawn as `hierarchy.png`.
use super::engine::Engine;
use super::segment::{mask_crop, SegSplit, IGNORE};
use crate::data::Preprocess;
use crate::error::Result;
use crate::masking::quality::{grid_partition, score, Scores};
use crate::masking::{build_tree, Grid};
use image::GrayImage;
use rayon::prelude::*;
use serde::Serialize;
use std::path::Path;

/// Segment counts the cut is scored at (those above N are dropped).
pub const COUNTS: [usize; 3] = [4, 8, 16];

/// Val images at the model's input size (CHW bytes) and their object maps at the same size.
pub struct HierarchySet {
    pixels: Vec<u8>,
    truth: Vec<GrayImage>,
}

impl HierarchySet {
    /// The first `limit` val pairs of the segmentation folder `root` (0 = all), through the
    /// model's evaluation preprocessing; the masks follow the same crop, nearest-neighbour.
    pub fn open(root: &Path, pre: &Preprocess, limit: usize) -> Result<Self> {
        let val = SegSplit::open(root, "val", limit)?;
        let s = pre.image_size;
        let per = pre.tensor_len();
        let mut pixels = vec![0u8; val.images.len() * per];
        pixels
            .par_chunks_mut(per)
            .zip(val.images.par_iter())
            .for_each(|(out, img)| pre.eval_u8_into(img, out));
        let truth = val
            .images
            .iter()
            .zip(&val.masks)
            .map(|(img, m)| {
                let crop = pre.eval_crop(img.width(), img.height());
                GrayImage::from_raw(s, s, mask_crop(m, crop, s, false)).expect("s·s labels")
            })
            .collect();
        Ok(HierarchySet { pixels, truth })
    }

    pub fn len(&self) -> usize {
        self.truth.len()
    }

    pub fn is_empty(&self) -> bool {
        self.truth.is_empty()
    }
}

/// Mean scores of the teacher's cuts and of the grid partitions, per segment count.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct HierarchyReport {
    pub images: usize,
    pub counts: Vec<usize>,
    pub teacher: Vec<Scores>,
    pub grid: Vec<Scores>,
}

impl std::fmt::Display for HierarchyReport {
    /// The table for people: per segment count, the teacher's scores beside the grid's.
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(
            f,
            "{:>9}  {:>8} {:>8} {:>8}   {:>8} {:>8} {:>8}",
            "segments", "ASA", "BR", "bestIoU", "grid ASA", "grid BR", "grid IoU"
        )?;
        for (k, c) in self.counts.iter().enumerate() {
            let (t, g) = (&self.teacher[k], &self.grid[k]);
            write!(
                f,
                "\n{c:>9}  {:>8.3} {:>8.3} {:>8.3}   {:>8.3} {:>8.3} {:>8.3}",
                t.asa, t.boundary_recall, t.best_iou, g.asa, g.boundary_recall, g.best_iou
            )?;
        }
        Ok(())
    }
}

/// Score the current teacher's hierarchy on `set`.
pub fn measure(engine: &Engine, set: &HierarchySet) -> HierarchyReport {
    let grid: Grid = engine.masks.grid;
    let n = grid.n();
    let counts: Vec<usize> = COUNTS.iter().copied().filter(|&c| c < n).collect();
    let per = engine.cfg.image_size as usize * engine.cfg.image_size as usize * 3;
    let ehm = &engine.run.ehm;
    let mut teacher: Vec<Vec<Scores>> = vec![Vec::new(); counts.len()];
    for (chunk, truth) in set.pixels.chunks(32 * per).zip(set.truth.chunks(32)) {
        let imgs = engine.upload(chunk, truth.len());
        let aff = engine.affinity_host(&imgs);
        let rows: Vec<Vec<Scores>> = truth
            .par_iter()
            .enumerate()
            .map(|(b, t)| {
                let tree = build_tree(
                    &aff[b * n * n..(b + 1) * n * n],
                    grid,
                    ehm.affinity_norm,
                    ehm.merge,
                );
                counts
                    .iter()
                    .map(|&c| score(&tree.cut(c), grid, t, IGNORE))
                    .collect()
            })
            .collect();
        for r in rows {
            for (k, s) in r.into_iter().enumerate() {
                teacher[k].push(s);
            }
        }
    }
    let grid_scores = counts
        .iter()
        .map(|&c| {
            let p = grid_partition(grid, c);
            Scores::mean(
                &set.truth
                    .iter()
                    .map(|t| score(&p, grid, t, IGNORE))
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    HierarchyReport {
        images: set.len(),
        counts,
        teacher: teacher.iter().map(|v| Scores::mean(v)).collect(),
        grid: grid_scores,
    }
}

/// `hierarchy.png`: the teacher's ASA, boundary recall and best IoU over training at the
/// middle segment count, with the grid partition's as dashed lines.
pub fn chart(points: &[(u64, HierarchyReport)]) -> Option<image::RgbImage> {
    let (_, first) = points.first()?;
    let k = first.counts.len().checked_sub(1)? / 2;
    let c = first.counts[k];
    let line = |name, f: fn(&Scores) -> f64, teacher: bool, colour| crate::draw::Series {
        name,
        points: points
            .iter()
            .map(|(s, r)| {
                (
                    *s as f64,
                    f(if teacher { &r.teacher[k] } else { &r.grid[k] }),
                )
            })
            .collect(),
        colour,
        dashed: !teacher,
    };
    let series = [
        line("ASA", |s| s.asa, true, [200, 40, 40]),
        line(
            "boundary recall",
            |s| s.boundary_recall,
            true,
            [40, 120, 40],
        ),
        line("best IoU", |s| s.best_iou, true, [40, 60, 200]),
        line("grid: ASA", |s| s.asa, false, [200, 40, 40]),
        line(
            "grid: boundary recall",
            |s| s.boundary_recall,
            false,
            [40, 120, 40],
        ),
        line("grid: best IoU", |s| s.best_iou, false, [40, 60, 200]),
    ];
    Some(crate::draw::line_chart(
        &format!(
            "teacher's hierarchy vs a fixed grid, cut at {c} segments ({} val images)",
            first.images
        ),
        "step",
        &series,
        (0.0, 1.0),
        720,
        300,
    ))
}
