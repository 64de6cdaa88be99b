//! Mask strategies. This module knows no model: an affinity `[B, N, N]` (for EHM), the patch
//! grid, training progress `t ∈ [0, 1]` and a seed go in; which patches stay visible come out.
//!
//! Every strategy is expressed as per-patch *noise*; as in MAE, patches are sorted by noise
//! and the `K = ⌊N·(1−r)⌋` lowest stay visible. So every image keeps exactly K patches, and a
//! strategy only decides which patches share noise (grid cells, blocks, hierarchy segments).
pub mod hierarchy;
pub mod picture;

pub use hierarchy::{build_tree, AffinityNorm, Grid, MergeTree};

use crate::config::{EhmConfig, MaskingKind};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

/// Visible/masked indices for a batch, laid out as MAE's forward uses them.
#[derive(Clone, Debug, PartialEq)]
pub struct MaskBatch {
    pub batch: usize,
    pub n: usize,
    pub keep: usize,
    /// `[B, K]` visible patch indices.
    pub ids_keep: Vec<i64>,
    /// `[B, N]` inverse permutation (to unshuffle decoder tokens).
    pub ids_restore: Vec<i64>,
    /// `[B, N]` 1.0 = masked, 0.0 = visible.
    pub mask: Vec<f32>,
    /// `[B, N]` hierarchy segment labels at the current cut (EHM only), for pictures.
    pub segments: Option<Vec<u32>>,
}

/// Visible patches per image.
pub fn keep_count(n: usize, mask_ratio: f64) -> usize {
    ((n as f64) * (1.0 - mask_ratio)).floor() as usize
}

/// The evolution schedule (design.md §4.3).
#[derive(Clone, Debug)]
pub struct Schedule {
    pub n: usize,
    pub start_segments: usize,
    pub end_segments: usize,
}

impl Schedule {
    pub fn new(n: usize, cfg: &EhmConfig) -> Self {
        let start = ((n as f64 * cfg.start_segments_frac).round() as usize).clamp(1, n);
        let end = cfg.end_segments.clamp(1, start);
        Schedule {
            n,
            start_segments: start,
            end_segments: end,
        }
    }
    /// Number of segments of the hierarchy cut at progress `t`: geometric from fine to coarse.
    pub fn segments(&self, t: f64) -> usize {
        let t = t.clamp(0.0, 1.0);
        let (a, b) = (
            (self.start_segments as f64).ln(),
            (self.end_segments as f64).ln(),
        );
        ((a + (b - a) * t).exp().round() as usize).clamp(self.end_segments, self.start_segments)
    }
    /// Weight of segment noise against grid noise: α(t) = √t (EPM).
    pub fn alpha(&self, t: f64) -> f64 {
        t.clamp(0.0, 1.0).sqrt()
    }
}

/// Per-image RNG: depends on the run seed, the step and the image's slot, not on threads.
fn image_rng(seed: u64, step: u64, b: usize) -> ChaCha8Rng {
    let mut r = ChaCha8Rng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(step + 1));
    r.set_stream(b as u64);
    r
}

/// Tie-breaking jitter: small enough never to reorder groups, large enough to split a group
/// at the keep boundary at random.
const JITTER: f64 = 1e-4;

fn grid_noise(grid: Grid, cell: usize, rng: &mut impl Rng) -> Vec<f64> {
    let cell = cell.max(1);
    let cw = grid.w.div_ceil(cell);
    let cells: Vec<f64> = (0..grid.h.div_ceil(cell) * cw)
        .map(|_| rng.random())
        .collect();
    (0..grid.n())
        .map(|i| {
            cells[(i / grid.w / cell) * cw + (i % grid.w) / cell] + JITTER * rng.random::<f64>()
        })
        .collect()
}

/// BEiT-style block-wise masking expressed as noise: patches covered by earlier blocks get
/// higher noise (masked first); uncovered patches low noise (kept).
fn block_noise(grid: Grid, to_mask: usize, rng: &mut impl Rng) -> Vec<f64> {
    let n = grid.n();
    let mut order = vec![usize::MAX; n];
    let mut covered = 0;
    let mut block = 0;
    let min_area = 4.min(to_mask.max(1));
    let (lo, hi) = ((0.3f64).ln(), (1.0f64 / 0.3).ln());
    let mut tries = 0;
    while covered < to_mask && tries < 1000 {
        tries += 1;
        let max_area = (to_mask - covered).max(min_area);
        let area = rng.random_range(min_area as f64..=max_area as f64);
        let aspect = rng.random_range(lo..=hi).exp();
        let bh = ((area * aspect).sqrt().round() as usize).max(1);
        let bw = ((area / aspect).sqrt().round() as usize).max(1);
        if bh > grid.h || bw > grid.w {
            continue;
        }
        let top = rng.random_range(0..=grid.h - bh);
        let left = rng.random_range(0..=grid.w - bw);
        for r in top..top + bh {
            for c in left..left + bw {
                let i = r * grid.w + c;
                if order[i] == usize::MAX {
                    order[i] = block;
                    covered += 1;
                }
            }
        }
        block += 1;
    }
    let blocks = block.max(1) as f64;
    (0..n)
        .map(|i| {
            let u = rng.random::<f64>();
            if order[i] == usize::MAX {
                u * 0.5
            } else {
                2.0 - order[i] as f64 / blocks + JITTER * u
            }
        })
        .collect()
}

/// EHM noise for one image: α·u_segment + (1−α)·u_grid, segments from the hierarchy cut.
fn ehm_noise(labels: &[u32], grid: Grid, cell: usize, alpha: f64, rng: &mut impl Rng) -> Vec<f64> {
    let k = labels.iter().copied().max().map_or(0, |m| m as usize + 1);
    let seg: Vec<f64> = (0..k).map(|_| rng.random()).collect();
    let g = grid_noise(grid, cell, rng);
    labels
        .iter()
        .zip(g)
        .map(|(&l, gn)| alpha * seg[l as usize] + (1.0 - alpha) * gn)
        .collect()
}

/// Sort each image's noise and keep the K lowest.
pub fn from_noise(noise: &[Vec<f64>], keep: usize) -> MaskBatch {
    let batch = noise.len();
    let n = noise.first().map_or(0, |v| v.len());
    let mut ids_keep = Vec::with_capacity(batch * keep);
    let mut ids_restore = vec![0i64; batch * n];
    let mut mask = vec![1f32; batch * n];
    for (b, nz) in noise.iter().enumerate() {
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&i, &j| nz[i].total_cmp(&nz[j]).then(i.cmp(&j)));
        for (rank, &i) in order.iter().enumerate() {
            ids_restore[b * n + i] = rank as i64;
            if rank < keep {
                mask[b * n + i] = 0.0;
            }
        }
        ids_keep.extend(order[..keep].iter().map(|&i| i as i64));
    }
    MaskBatch {
        batch,
        n,
        keep,
        ids_keep,
        ids_restore,
        mask,
        segments: None,
    }
}

/// Everything a strategy needs besides the affinity.
#[derive(Clone, Debug)]
pub struct MaskParams {
    pub kind: MaskingKind,
    pub grid: Grid,
    pub mask_ratio: f64,
    pub ehm: EhmConfig,
    pub seed: u64,
}

impl MaskParams {
    pub fn keep(&self) -> usize {
        keep_count(self.grid.n(), self.mask_ratio)
    }

    /// Masks for a batch at training progress `t`, step `step`. `affinity` (`[B, N, N]`,
    /// row-major) is required for EHM and ignored otherwise.
    pub fn sample(&self, batch: usize, t: f64, step: u64, affinity: Option<&[f32]>) -> MaskBatch {
        let n = self.grid.n();
        let keep = self.keep();
        match self.kind {
            MaskingKind::Random => {
                let noise: Vec<Vec<f64>> = (0..batch)
                    .map(|b| {
                        let mut r = image_rng(self.seed, step, b);
                        (0..n).map(|_| r.random()).collect()
                    })
                    .collect();
                from_noise(&noise, keep)
            }
            MaskingKind::Grid => {
                let noise: Vec<Vec<f64>> = (0..batch)
                    .map(|b| {
                        grid_noise(
                            self.grid,
                            self.ehm.grid_cell,
                            &mut image_rng(self.seed, step, b),
                        )
                    })
                    .collect();
                from_noise(&noise, keep)
            }
            MaskingKind::Block => {
                let noise: Vec<Vec<f64>> = (0..batch)
                    .map(|b| block_noise(self.grid, n - keep, &mut image_rng(self.seed, step, b)))
                    .collect();
                from_noise(&noise, keep)
            }
            MaskingKind::Ehm => {
                let aff = affinity.expect("EHM masking needs an affinity");
                assert_eq!(aff.len(), batch * n * n, "affinity must be [B, N, N]");
                let sched = Schedule::new(n, &self.ehm);
                let (c, alpha) = (sched.segments(t), sched.alpha(t));
                let per_image: Vec<(Vec<f64>, Vec<u32>)> = (0..batch)
                    .into_par_iter()
                    .map(|b| {
                        let tree = build_tree(
                            &aff[b * n * n..(b + 1) * n * n],
                            self.grid,
                            self.ehm.affinity_norm,
                        );
                        let labels = tree.cut(c);
                        let mut r = image_rng(self.seed, step, b);
                        (
                            ehm_noise(&labels, self.grid, self.ehm.grid_cell, alpha, &mut r),
                            labels,
                        )
                    })
                    .collect();
                let (noise, labels): (Vec<_>, Vec<_>) = per_image.into_iter().unzip();
                let mut m = from_noise(&noise, keep);
                m.segments = Some(labels.concat());
                m
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(kind: MaskingKind, side: usize) -> MaskParams {
        MaskParams {
            kind,
            grid: Grid::square(side),
            mask_ratio: 0.75,
            ehm: EhmConfig::default(),
            seed: 7,
        }
    }

    fn rand_aff(b: usize, n: usize) -> Vec<f32> {
        let mut r = ChaCha8Rng::seed_from_u64(3);
        (0..b * n * n).map(|_| r.random()).collect()
    }

    #[test]
    fn exact_visible_count_for_every_strategy() {
        for kind in [
            MaskingKind::Random,
            MaskingKind::Grid,
            MaskingKind::Block,
            MaskingKind::Ehm,
        ] {
            for (side, batch) in [(8, 5), (14, 3), (7, 4)] {
                let p = params(kind, side);
                let n = side * side;
                let aff = rand_aff(batch, n);
                for t in [0.0, 0.3, 1.0] {
                    let m = p.sample(batch, t, 11, Some(&aff));
                    assert_eq!(m.ids_keep.len(), batch * p.keep());
                    for b in 0..batch {
                        let visible = m.mask[b * n..(b + 1) * n]
                            .iter()
                            .filter(|&&v| v == 0.0)
                            .count();
                        assert_eq!(visible, p.keep(), "{kind} side {side} t {t}");
                        for &i in &m.ids_keep[b * p.keep()..(b + 1) * p.keep()] {
                            assert_eq!(m.mask[b * n + i as usize], 0.0);
                        }
                        // ids_restore is a permutation
                        let mut r: Vec<i64> = m.ids_restore[b * n..(b + 1) * n].to_vec();
                        r.sort();
                        assert_eq!(r, (0..n as i64).collect::<Vec<_>>());
                    }
                }
            }
        }
    }

    #[test]
    fn same_seed_same_masks_other_seed_other_masks() {
        for kind in [MaskingKind::Random, MaskingKind::Block, MaskingKind::Ehm] {
            let p = params(kind, 8);
            let aff = rand_aff(4, 64);
            let a = p.sample(4, 0.5, 3, Some(&aff));
            let b = p.sample(4, 0.5, 3, Some(&aff));
            assert_eq!(a, b);
            let c = p.sample(4, 0.5, 4, Some(&aff));
            assert_ne!(a.mask, c.mask, "{kind}: next step must differ");
        }
    }

    #[test]
    fn schedule_endpoints() {
        let s = Schedule::new(196, &EhmConfig::default());
        assert_eq!(s.segments(0.0), 49);
        assert_eq!(s.segments(1.0), 8);
        assert!(s.segments(0.5) < 49 && s.segments(0.5) > 8);
        assert_eq!(s.alpha(0.0), 0.0);
        assert_eq!(s.alpha(1.0), 1.0);
        let s64 = Schedule::new(64, &EhmConfig::default());
        assert_eq!((s64.segments(0.0), s64.segments(1.0)), (16, 8));
    }

    #[test]
    fn t0_is_grid_masking_and_t1_follows_segments() {
        let p = params(MaskingKind::Ehm, 8);
        let aff = rand_aff(6, 64);
        // t = 0: noise is pure 2×2 grid noise, so kept patches form whole 2×2 cells.
        let m = p.sample(6, 0.0, 1, Some(&aff));
        for b in 0..6 {
            for cell_r in 0..4 {
                for cell_c in 0..4 {
                    let idx =
                        |dr: usize, dc: usize| b * 64 + (cell_r * 2 + dr) * 8 + cell_c * 2 + dc;
                    let v = m.mask[idx(0, 0)];
                    assert!([(0usize, 1usize), (1, 0), (1, 1)]
                        .iter()
                        .all(|&(r, c)| m.mask[idx(r, c)] == v));
                }
            }
        }
        // t = 1: 8 segments; all segments but at most one are wholly masked or wholly kept.
        let m = p.sample(6, 1.0, 1, Some(&aff));
        let seg = m.segments.as_ref().unwrap();
        for b in 0..6 {
            let labels = &seg[b * 64..(b + 1) * 64];
            assert_eq!(*labels.iter().max().unwrap(), 7);
            let split = (0..8u32)
                .filter(|&s| {
                    let vals: Vec<f32> = (0..64)
                        .filter(|&i| labels[i] == s)
                        .map(|i| m.mask[b * 64 + i])
                        .collect();
                    vals.contains(&0.0) && vals.contains(&1.0)
                })
                .count();
            assert!(split <= 1, "image {b}: {split} segments split");
        }
    }

    #[test]
    fn block_masks_are_blocky() {
        // Masked patches of block masking have more masked neighbours than random masking's.
        let n = 196;
        let g = Grid::square(14);
        let score = |m: &MaskBatch| {
            let mut same = 0;
            let mut tot = 0;
            for b in 0..m.batch {
                for i in 0..n {
                    if m.mask[b * n + i] == 1.0 {
                        for j in g.neighbours(i) {
                            tot += 1;
                            same += (m.mask[b * n + j] == 1.0) as usize;
                        }
                    }
                }
            }
            same as f64 / tot as f64
        };
        let blk = params(MaskingKind::Block, 14).sample(16, 0.0, 0, None);
        let rnd = params(MaskingKind::Random, 14).sample(16, 0.0, 0, None);
        assert!(
            score(&blk) > score(&rnd) + 0.05,
            "{} vs {}",
            score(&blk),
            score(&rnd)
        );
    }
}
