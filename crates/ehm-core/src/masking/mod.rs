//! Mask strategies (docs/ehm.md). This module knows no model: an affinity `[B, N, N]` (for EHM), the patch
//! grid, training progress `t ∈ [0, 1]` and a seed go in; which patches stay visible come out.
//!
//! Every strategy is expressed as per-patch *noise*; as in MAE, patches are sorted by noise
//! and the `K = ⌊N·(1−r)⌋` lowest stay visible. So every image keeps exactly K patches, and a
//! strategy only decides which patches share noise (grid cells, blocks, hierarchy segments).
pub mod evolution;
pub mod hierarchy;
pub mod quality;
pub mod settings;

pub use hierarchy::{build_tree, AffinityNorm, Grid, Merge, MergeTree};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
pub use settings::{EhmConfig, MaskingKind, TeacherKind};

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

impl MaskBatch {
    /// Batches of the same grid and keep count, one after the other.
    pub fn concat(parts: Vec<MaskBatch>) -> MaskBatch {
        let mut it = parts.into_iter();
        let mut out = it.next().expect("at least one part");
        for p in it {
            assert_eq!(
                (p.n, p.keep),
                (out.n, out.keep),
                "parts of one grid and keep count"
            );
            out.batch += p.batch;
            out.ids_keep.extend(p.ids_keep);
            out.ids_restore.extend(p.ids_restore);
            out.mask.extend(p.mask);
            out.segments = match (out.segments, p.segments) {
                (Some(mut a), Some(b)) => {
                    a.extend(b);
                    Some(a)
                }
                _ => None,
            };
        }
        out
    }

    /// Images `start .. start + len` of the batch (a gradient-accumulation piece).
    pub fn rows(&self, start: usize, len: usize) -> MaskBatch {
        assert!(start + len <= self.batch, "rows past the batch");
        let (n, k) = (self.n, self.keep);
        MaskBatch {
            batch: len,
            n,
            keep: k,
            ids_keep: self.ids_keep[start * k..(start + len) * k].to_vec(),
            ids_restore: self.ids_restore[start * n..(start + len) * n].to_vec(),
            mask: self.mask[start * n..(start + len) * n].to_vec(),
            segments: self
                .segments
                .as_ref()
                .map(|s| s[start * n..(start + len) * n].to_vec()),
        }
    }
}

/// Visible patches per image.
pub fn keep_count(n: usize, mask_ratio: f64) -> usize {
    ((n as f64) * (1.0 - mask_ratio)).floor() as usize
}

/// What the EHM affinity is made of (the teacher computes it; see `model::Encoder::affinity`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum AffinitySource {
    /// Softmax attention summed over heads and the chosen blocks: how much i attends to j.
    Attention,
    /// Cosine similarity of attention rows: whether i and j attend to the same places.
    AttentionColumns,
    /// Cosine similarity (≥ 0) of the patch tokens after the last chosen block (EPM's EM step
    /// compares token features).
    Cosine,
}

/// How the grid noise is laid out (`grid` masking, and EHM's t = 0 end).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum GridNoise {
    /// EPM: one random value per parity class (row % cell, col % cell). At mask ratio
    /// 1 − 1/cell² exactly one patch of every cell × cell block stays visible — MAE's easy
    /// grid sampling, where the easy-to-hard curriculum starts.
    Parity,
    /// One random value per cell × cell block: whole blocks are kept or masked (SimMIM-like,
    /// harder than random).
    Cells,
}

/// How the number of segments of the cut falls over training.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum ScheduleShape {
    /// c(t) = start · (end/start)^t: the same factor per unit of t.
    Geometric,
    /// c(t) = start + (end − start)·t (EPM's 40 → 10).
    Linear,
}

/// The evolution schedule (docs/ehm.md): segments of the cut, α and the mask ratio at
/// training progress t ∈ [0, 1].
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    pub n: usize,
    pub start_segments: usize,
    pub end_segments: usize,
    pub shape: ScheduleShape,
    pub jitter: usize,
    pub alpha_power: f64,
    pub mask_ratio: (f64, f64),
}

impl Schedule {
    /// The schedule of `cfg` on a grid of `n` patches with base mask ratio `mask_ratio`.
    /// Fine end: one segment per grid cell (single patches when `grid_cell` = 1); coarse end:
    /// a few segments, max(2, N/20) — 10 at N = 196 (EPM), 3 at N = 64, 13 at N = 256.
    pub fn new(n: usize, cfg: &EhmConfig, mask_ratio: f64) -> Self {
        let cell = cfg.grid_cell.max(1);
        let start = cfg
            .start_segments
            .unwrap_or(n / (cell * cell))
            .clamp(1, n.max(1));
        let auto_end = ((n as f64 / 20.0).round() as usize).max(2);
        let end = cfg.end_segments.unwrap_or(auto_end).clamp(1, start);
        Schedule {
            n,
            start_segments: start,
            end_segments: end,
            shape: cfg.schedule,
            jitter: cfg.segment_jitter,
            alpha_power: cfg.alpha_power,
            mask_ratio: (mask_ratio, cfg.mask_ratio_end.unwrap_or(mask_ratio)),
        }
    }

    /// Whether the cut changes over training at all (false: a config that cannot evolve).
    pub fn evolves(&self) -> bool {
        self.start_segments > self.end_segments
    }

    /// Segments of the cut at progress `t` (before jitter).
    pub fn segments(&self, t: f64) -> usize {
        let t = t.clamp(0.0, 1.0);
        let (a, b) = (self.start_segments as f64, self.end_segments as f64);
        let c = match self.shape {
            ScheduleShape::Geometric => (a.ln() + (b.ln() - a.ln()) * t).exp(),
            ScheduleShape::Linear => a + (b - a) * t,
        };
        (c.round() as usize).clamp(self.end_segments, self.start_segments)
    }

    /// Weight of segment noise against grid noise: α(t) = t^alpha_power (EPM: √t).
    pub fn alpha(&self, t: f64) -> f64 {
        t.clamp(0.0, 1.0).powf(self.alpha_power)
    }

    /// Mask ratio at progress `t` (linear between the two ends).
    pub fn mask_ratio(&self, t: f64) -> f64 {
        let (a, b) = self.mask_ratio;
        a + (b - a) * t.clamp(0.0, 1.0)
    }
}

/// Per-image RNG: depends on the run seed, the step and the image's slot, not on threads.
fn image_rng(seed: u64, step: u64, b: usize) -> ChaCha8Rng {
    let mut r = ChaCha8Rng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(step + 1));
    r.set_stream(b as u64);
    r
}

/// Tie-breaking jitter: below half the gap between two groups' grid values (`grid_noise`), so
/// it never reorders groups, yet splits a group at the keep boundary at random.
const JITTER: f64 = 1e-4;

/// Grid noise of one image, without jitter: the groups (parity classes or cells, `GridNoise`)
/// get the values (k + ½)/groups in random order — evenly spaced, so no two groups are closer
/// than 1/groups and a jitter cannot reorder them.
fn grid_noise(grid: Grid, cell: usize, layout: GridNoise, rng: &mut impl Rng) -> Vec<f64> {
    use rand::seq::SliceRandom;
    let cell = cell.max(1);
    let group = |i: usize| -> usize {
        let (r, c) = (i / grid.w, i % grid.w);
        match layout {
            GridNoise::Parity => (r % cell) * cell + c % cell,
            GridNoise::Cells => (r / cell) * grid.w.div_ceil(cell) + c / cell,
        }
    };
    let groups = match layout {
        GridNoise::Parity => cell * cell,
        GridNoise::Cells => grid.h.div_ceil(cell) * grid.w.div_ceil(cell),
    };
    let mut values: Vec<f64> = (0..groups)
        .map(|k| (k as f64 + 0.5) / groups as f64)
        .collect();
    values.shuffle(rng);
    (0..grid.n()).map(|i| values[group(i)]).collect()
}

/// `noise` plus the tie-breaking jitter.
fn jittered(noise: Vec<f64>, rng: &mut impl Rng) -> Vec<f64> {
    noise
        .into_iter()
        .map(|v| v + JITTER * rng.random::<f64>())
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

/// EHM noise for one image: α·u_segment + (1−α)·u_grid, segments from the hierarchy cut,
/// jitter added after the blend (so it breaks ties at every α, also α = 1).
fn ehm_noise(
    labels: &[u32],
    grid: Grid,
    cfg: &EhmConfig,
    alpha: f64,
    rng: &mut impl Rng,
) -> Vec<f64> {
    let k = labels.iter().copied().max().map_or(0, |m| m as usize + 1);
    let seg: Vec<f64> = (0..k).map(|_| rng.random()).collect();
    let g = grid_noise(grid, cfg.grid_cell, cfg.grid_noise, rng);
    let blend = labels
        .iter()
        .zip(g)
        .map(|(&l, gn)| alpha * seg[l as usize] + (1.0 - alpha) * gn)
        .collect();
    jittered(blend, rng)
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

/// The mask sampler: a strategy with everything it needs besides the affinity (grid, ratio,
/// EHM knobs, seed); it draws a batch's masks (`sample`, `sample_from`) at training progress t.
#[derive(Clone, Debug)]
pub struct MaskSampler {
    pub kind: MaskingKind,
    pub grid: Grid,
    pub mask_ratio: f64,
    pub ehm: EhmConfig,
    pub seed: u64,
}

/// Affinity values that are NaN or infinite (a diverged teacher). The trainer stops on any:
/// a tree built from them would be image-independent noise.
pub fn non_finite(affinity: &[f32]) -> usize {
    affinity.iter().filter(|v| !v.is_finite()).count()
}

impl MaskSampler {
    /// The schedule of these parameters.
    pub fn schedule(&self) -> Schedule {
        Schedule::new(self.grid.n(), &self.ehm, self.mask_ratio)
    }

    /// Visible patches per image at progress `t` (the mask ratio may follow a schedule).
    pub fn keep_at(&self, t: f64) -> usize {
        keep_count(self.grid.n(), self.schedule().mask_ratio(t))
    }

    /// Refuse mask ratios that leave no visible patch or mask none on this grid (the encoder
    /// would see only the class token, or the loss over masked patches would be 0/0).
    pub fn validate(&self) -> Result<(), String> {
        let n = self.grid.n();
        for t in [0.0, 1.0] {
            let k = self.keep_at(t);
            if k == 0 || k >= n {
                return Err(format!(
                    "mask ratio {} keeps {k} of {n} patches at t = {t}: at least one must stay visible and one be masked",
                    self.schedule().mask_ratio(t)
                ));
            }
        }
        Ok(())
    }

    /// The hierarchy cut of one image at progress `t` (EHM): the merge tree of its affinity
    /// (`[N, N]`), cut at the schedule's segment count plus this image's jitter.
    pub fn cut(&self, affinity: &[f32], t: f64, rng: &mut impl Rng) -> Vec<u32> {
        let sched = self.schedule();
        let c = sched.segments(t)
            + if sched.jitter > 0 {
                rng.random_range(0..=sched.jitter)
            } else {
                0
            };
        build_tree(affinity, self.grid, self.ehm.affinity_norm, self.ehm.merge)
            .cut(c.min(self.grid.n()))
    }

    /// Masks for a batch at training progress `t`, step `step`. `affinity` (`[B, N, N]`,
    /// row-major) is required for EHM and ignored otherwise.
    pub fn sample(&self, batch: usize, t: f64, step: u64, affinity: Option<&[f32]>) -> MaskBatch {
        self.sample_from(0, batch, t, step, affinity)
    }

    /// Masks for images `first .. first + batch` of step `step`'s global batch: image i's
    /// mask is a function of (seed, step, i) and its own affinity only, so a data-parallel rank
    /// or an accumulation piece draws exactly its rows of the whole batch's masks.
    pub fn sample_from(
        &self,
        first: usize,
        batch: usize,
        t: f64,
        step: u64,
        affinity: Option<&[f32]>,
    ) -> MaskBatch {
        let n = self.grid.n();
        let keep = self.keep_at(t);
        match self.kind {
            MaskingKind::Random => {
                let noise: Vec<Vec<f64>> = (0..batch)
                    .map(|b| {
                        let mut r = image_rng(self.seed, step, first + b);
                        (0..n).map(|_| r.random()).collect()
                    })
                    .collect();
                from_noise(&noise, keep)
            }
            MaskingKind::Grid => {
                let noise: Vec<Vec<f64>> = (0..batch)
                    .map(|b| {
                        let r = &mut image_rng(self.seed, step, first + b);
                        let g = grid_noise(self.grid, self.ehm.grid_cell, self.ehm.grid_noise, r);
                        jittered(g, r)
                    })
                    .collect();
                from_noise(&noise, keep)
            }
            MaskingKind::Block => {
                let noise: Vec<Vec<f64>> = (0..batch)
                    .map(|b| {
                        block_noise(
                            self.grid,
                            n - keep,
                            &mut image_rng(self.seed, step, first + b),
                        )
                    })
                    .collect();
                from_noise(&noise, keep)
            }
            MaskingKind::Ehm => {
                let aff = affinity.expect("EHM masking needs an affinity");
                assert_eq!(aff.len(), batch * n * n, "affinity must be [B, N, N]");
                let alpha = self.schedule().alpha(t);
                let per_image: Vec<(Vec<f64>, Vec<u32>)> = (0..batch)
                    .into_par_iter()
                    .map(|b| {
                        let mut r = image_rng(self.seed, step, first + b);
                        let labels = self.cut(&aff[b * n * n..(b + 1) * n * n], t, &mut r);
                        (
                            ehm_noise(&labels, self.grid, &self.ehm, alpha, &mut r),
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

    #[test]
    fn a_rank_draws_its_rows_of_the_whole_batch_masks() {
        for kind in [
            MaskingKind::Random,
            MaskingKind::Grid,
            MaskingKind::Block,
            MaskingKind::Ehm,
        ] {
            let p = params(kind, 4);
            let aff = rand_aff(6, 16);
            let whole = p.sample(6, 0.6, 5, Some(&aff));
            let part = p.sample_from(2, 3, 0.6, 5, Some(&aff[2 * 256..5 * 256]));
            let rows = whole.rows(2, 3);
            assert_eq!(
                (part.ids_keep, part.mask),
                (rows.ids_keep, rows.mask),
                "{kind:?}"
            );
            assert_eq!(part.segments, rows.segments);
        }
    }

    #[test]
    fn rows_cut_a_batch_into_the_pieces_concat_joins() {
        let p = params(MaskingKind::Random, 4);
        let whole = p.sample(6, 0.5, 3, None);
        let pieces = vec![whole.rows(0, 2), whole.rows(2, 3), whole.rows(5, 1)];
        assert_eq!(pieces[1].batch, 3);
        assert_eq!(
            pieces[1].ids_keep,
            whole.ids_keep[2 * whole.keep..5 * whole.keep]
        );
        let back = MaskBatch::concat(pieces);
        assert_eq!(
            (back.ids_keep, back.ids_restore, back.mask),
            (whole.ids_keep, whole.ids_restore, whole.mask)
        );
    }

    fn params(kind: MaskingKind, side: usize) -> MaskSampler {
        MaskSampler {
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
                let mut p = params(kind, side);
                p.ehm.segment_jitter = 2;
                p.ehm.mask_ratio_end = Some(0.5);
                let n = side * side;
                let aff = rand_aff(batch, n);
                for t in [0.0, 0.3, 1.0] {
                    let keep = p.keep_at(t);
                    let m = p.sample(batch, t, 11, Some(&aff));
                    assert_eq!(m.ids_keep.len(), batch * keep);
                    for b in 0..batch {
                        let visible = m.mask[b * n..(b + 1) * n]
                            .iter()
                            .filter(|&&v| v == 0.0)
                            .count();
                        assert_eq!(visible, keep, "{kind} side {side} t {t}");
                        for &i in &m.ids_keep[b * keep..(b + 1) * keep] {
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
        for kind in [
            MaskingKind::Random,
            MaskingKind::Block,
            MaskingKind::Grid,
            MaskingKind::Ehm,
        ] {
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
    fn the_schedule_evolves_at_every_grid_size() {
        let cfg = EhmConfig::default();
        // (N, fine end = one segment per 2×2 cell, coarse end = max(2, N/20))
        for (n, start, end) in [
            (196, 49, 10),
            (64, 16, 3),
            (256, 64, 13),
            (16, 4, 2),
            (36, 9, 2),
        ] {
            let s = Schedule::new(n, &cfg, 0.75);
            assert_eq!((s.start_segments, s.end_segments), (start, end), "N = {n}");
            assert!(s.evolves());
            assert_eq!((s.segments(0.0), s.segments(1.0)), (start, end));
            let mid = s.segments(0.5);
            assert!(
                mid < start && mid > end || start - end < 3,
                "N = {n}: {mid}"
            );
            // monotone
            let cs: Vec<usize> = (0..=20).map(|k| s.segments(k as f64 / 20.0)).collect();
            assert!(cs.windows(2).all(|w| w[0] >= w[1]), "{cs:?}");
        }
        // a grid too small to evolve says so
        assert!(!Schedule::new(4, &cfg, 0.75).evolves());
        // EPM's shape: linear 40 → 10 at N = 196
        let epm = EhmConfig {
            schedule: ScheduleShape::Linear,
            start_segments: Some(40),
            end_segments: Some(10),
            ..cfg.clone()
        };
        let s = Schedule::new(196, &epm, 0.75);
        assert_eq!(
            (s.segments(0.0), s.segments(0.5), s.segments(1.0)),
            (40, 25, 10)
        );
        assert_eq!((s.alpha(0.0), s.alpha(0.25), s.alpha(1.0)), (0.0, 0.5, 1.0));
        let lin_alpha = Schedule::new(
            196,
            &EhmConfig {
                alpha_power: 1.0,
                ..cfg.clone()
            },
            0.75,
        );
        assert_eq!(lin_alpha.alpha(0.25), 0.25);
        let ratio = Schedule::new(
            196,
            &EhmConfig {
                mask_ratio_end: Some(0.85),
                ..cfg
            },
            0.65,
        );
        assert!((ratio.mask_ratio(0.5) - 0.75).abs() < 1e-12);
    }

    #[test]
    fn segment_jitter_adds_up_to_its_value() {
        let mut p = params(MaskingKind::Ehm, 8);
        p.ehm.segment_jitter = 2;
        let aff = rand_aff(1, 64);
        let base = p.schedule().segments(0.5);
        let mut seen = std::collections::BTreeSet::new();
        for step in 0..60 {
            let labels = p.cut(&aff, 0.5, &mut image_rng(1, step, 0));
            seen.insert(*labels.iter().max().unwrap() as usize + 1);
        }
        assert_eq!(
            seen.into_iter().collect::<Vec<_>>(),
            vec![base, base + 1, base + 2]
        );
    }

    /// Visible patches of image `b` of `m`, as a set.
    fn visible(m: &MaskBatch, b: usize) -> Vec<usize> {
        (0..m.n).filter(|&i| m.mask[b * m.n + i] == 0.0).collect()
    }

    #[test]
    fn t0_is_easy_parity_grid_sampling() {
        // EPM's grid: at r = 0.75 exactly one patch of every 2×2 cell stays visible
        let p = params(MaskingKind::Ehm, 8);
        let aff = rand_aff(6, 64);
        let mut kept_classes = std::collections::BTreeSet::new();
        for step in 0..8 {
            let m = p.sample(6, 0.0, step, Some(&aff));
            for b in 0..6 {
                let vis = visible(&m, b);
                for cell_r in 0..4 {
                    for cell_c in 0..4 {
                        let in_cell = vis
                            .iter()
                            .filter(|&&i| i / 8 / 2 == cell_r && i % 8 / 2 == cell_c)
                            .count();
                        assert_eq!(in_cell, 1, "step {step} image {b} cell ({cell_r},{cell_c})");
                    }
                }
                let class: std::collections::BTreeSet<_> =
                    vis.iter().map(|&i| (i / 8 % 2, i % 8 % 2)).collect();
                assert_eq!(class.len(), 1, "one parity class kept");
                kept_classes.extend(class);
            }
        }
        assert_eq!(
            kept_classes.len(),
            4,
            "the kept class varies between images and steps"
        );
        // `grid` masking uses the same parity layout
        let g = params(MaskingKind::Grid, 8).sample(3, 0.0, 0, None);
        assert!((0..3).all(|b| visible(&g, b).iter().all(|&i| {
            let v = visible(&g, b)[0];
            (i / 8 % 2, i % 8 % 2) == (v / 8 % 2, v % 8 % 2)
        })));
    }

    #[test]
    fn cells_layout_keeps_or_masks_whole_blocks() {
        let mut p = params(MaskingKind::Ehm, 8);
        p.ehm.grid_noise = GridNoise::Cells;
        let m = p.sample(6, 0.0, 1, Some(&rand_aff(6, 64)));
        for b in 0..6 {
            for cell in 0..16 {
                let (cr, cc) = (cell / 4, cell % 4);
                let v: Vec<f32> = [(0, 0), (0, 1), (1, 0), (1, 1)]
                    .iter()
                    .map(|&(dr, dc)| m.mask[b * 64 + (cr * 2 + dr) * 8 + cc * 2 + dc])
                    .collect();
                assert!(v.iter().all(|&x| x == v[0]), "image {b} cell {cell}");
            }
        }
    }

    /// Two planted regions per image: left/right halves for even images, top/bottom for odd.
    fn region(b: usize, i: usize) -> usize {
        if b.is_multiple_of(2) {
            (i % 8 >= 4) as usize
        } else {
            (i / 8 >= 4) as usize
        }
    }

    fn planted(batch: usize) -> Vec<f32> {
        let mut r = ChaCha8Rng::seed_from_u64(17);
        let mut a = vec![0f32; batch * 64 * 64];
        for b in 0..batch {
            for i in 0..64 {
                for j in 0..64 {
                    let same = region(b, i) == region(b, j);
                    a[(b * 64 + i) * 64 + j] =
                        if same { 1.0 } else { 0.02 } + 0.05 * r.random::<f32>();
                }
            }
        }
        a
    }

    /// Masks at t = 1, r = 0.5, cut to 2 segments.
    fn late_two_segment_params(kind: MaskingKind) -> MaskSampler {
        let mut p = params(kind, 8);
        p.mask_ratio = 0.5;
        p.ehm.end_segments = Some(2);
        p
    }

    /// Whether each image's visible set is exactly one of its planted regions.
    fn follows_plant(m: &MaskBatch) -> bool {
        (0..m.batch).all(|b| {
            let vis = visible(m, b);
            (0..2).any(|r| vis == (0..64).filter(|&i| region(b, i) == r).collect::<Vec<_>>())
        })
    }

    #[test]
    fn late_masks_are_the_planted_regions_of_each_image() {
        let batch = 6;
        let aff = planted(batch);
        let p = late_two_segment_params(MaskingKind::Ehm);
        for step in 0..5 {
            let m = p.sample(batch, 1.0, step, Some(&aff));
            assert!(follows_plant(&m), "step {step}");
        }
        // the check has teeth: random masking fails it
        let r = late_two_segment_params(MaskingKind::Random).sample(batch, 1.0, 0, None);
        assert!(!follows_plant(&r));
        // an affinity ignored (zeroed, constant) or read one patch off (a CLS slip) fails it
        let zero = vec![0f32; aff.len()];
        assert!(!follows_plant(&p.sample(batch, 1.0, 0, Some(&zero))));
        let mut shifted = aff.clone();
        shifted.rotate_left(1);
        assert!(!follows_plant(&p.sample(batch, 1.0, 0, Some(&shifted))));
    }

    #[test]
    fn swapping_two_images_affinities_swaps_their_masks() {
        let batch = 4;
        let aff = planted(batch);
        let p = late_two_segment_params(MaskingKind::Ehm);
        let m = p.sample(batch, 1.0, 3, Some(&aff));
        // images 0 (left/right) and 1 (top/bottom) exchange affinities
        let mut swapped = aff.clone();
        let (a, b) = swapped.split_at_mut(64 * 64);
        a.swap_with_slice(&mut b[..64 * 64]);
        let s = p.sample(batch, 1.0, 3, Some(&swapped));
        let split = |m: &MaskBatch, b: usize| {
            let v = visible(m, b);
            let lr = v.iter().all(|&i| i % 8 >= 4) || v.iter().all(|&i| i % 8 < 4);
            let tb = v.iter().all(|&i| i / 8 >= 4) || v.iter().all(|&i| i / 8 < 4);
            (lr, tb)
        };
        assert_eq!(split(&m, 0), (true, false));
        assert_eq!(split(&m, 1), (false, true));
        assert_eq!(
            split(&s, 0),
            (false, true),
            "image 0 now follows image 1's affinity"
        );
        assert_eq!(split(&s, 1), (true, false));
        assert_eq!(&m.mask[128..], &s.mask[128..], "the others are untouched");
    }

    #[test]
    fn t1_masks_keep_or_drop_whole_segments() {
        let p = params(MaskingKind::Ehm, 8);
        let aff = rand_aff(6, 64);
        let m = p.sample(6, 1.0, 1, Some(&aff));
        let seg = m.segments.as_ref().unwrap();
        let c = p.schedule().segments(1.0) as u32;
        for b in 0..6 {
            let labels = &seg[b * 64..(b + 1) * 64];
            assert_eq!(*labels.iter().max().unwrap(), c - 1);
            let split = (0..c)
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
    fn mask_ratios_that_leave_nothing_to_see_or_predict_are_refused() {
        let mut p = params(MaskingKind::Random, 4);
        assert!(p.validate().is_ok());
        p.mask_ratio = 0.95; // keeps ⌊16 · 0.05⌋ = 0
        assert!(p.validate().unwrap_err().contains("keeps 0 of 16"));
        p.mask_ratio = 0.5;
        p.ehm.mask_ratio_end = Some(0.99);
        assert!(p.validate().is_err(), "checked at t = 1 too");
        p.ehm.mask_ratio_end = None;
        p.mask_ratio = 1e-20; // keeps all 16
        assert!(p.validate().is_err());
    }

    #[test]
    fn t1_ties_inside_a_segment_are_broken_at_random() {
        // one segment straddles the keep boundary at t = 1: which of its patches stay visible
        // must vary between steps, not always be the first ones in raster order
        let mut p = params(MaskingKind::Ehm, 8);
        p.mask_ratio = 0.6;
        p.ehm.end_segments = Some(2);
        let aff = planted(1);
        let raster_prefix = |vis: &[usize]| {
            // image 0's regions are the left and right halves; the kept one holds vis[0]
            let r = region(0, vis[0]);
            let first: Vec<usize> = (0..64)
                .filter(|&i| region(0, i) == r)
                .take(vis.len())
                .collect();
            first == vis
        };
        let always_prefix = (0..6)
            .map(|step| visible(&p.sample(1, 1.0, step, Some(&aff)), 0))
            .all(|v| v.len() == 25 && raster_prefix(&v));
        assert!(
            !always_prefix,
            "the split segment keeps its first patches in raster order"
        );
    }

    #[test]
    fn non_finite_affinity_is_counted() {
        assert_eq!(non_finite(&[1.0, f32::NAN, f32::INFINITY, 0.0]), 2);
        assert_eq!(non_finite(&rand_aff(1, 16)), 0);
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
