//! Local verification: is a candidate really a copy of (part of) the query? The patch tokens of
//! the query window that found it and of the candidate image are paired by mutual nearest
//! neighbours, and one similarity transform (scale, rotation, shift, optionally a mirror) is
//! fitted to the pairs' grid positions by RANSAC; the pairs it explains are the inliers. A copy
//! agrees with the query on many patches in one geometry; a look-alike on a few, scattered.
//! The global score of a candidate is then raised by its geometric evidence, never lowered:
//! verification can lift a true copy above a look-alike but cannot push any match down.
use crate::pipeline::View;
use rand::{Rng, SeedableRng};
use serde::Serialize;

/// The patch tokens of one image (or window): a `side × side` grid, row-major, each token
/// `dim` values, L2-normalised (the `patch_tokens` model output).
#[derive(Clone, Copy)]
pub struct TokenGrid<'a> {
    pub side: usize,
    pub dim: usize,
    pub values: &'a [f32],
}

impl TokenGrid<'_> {
    fn len(&self) -> usize {
        self.side * self.side
    }

    fn token(&self, i: usize) -> &[f32] {
        &self.values[i * self.dim..(i + 1) * self.dim]
    }

    /// Centre of patch `i` in patch units, as a complex number (x + iy).
    fn position(&self, i: usize) -> C {
        C((i % self.side) as f32 + 0.5, (i / self.side) as f32 + 0.5)
    }
}

/// What the geometric check found between a query window and a candidate.
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct Verification {
    /// Mutual nearest-neighbour patch pairs.
    pub pairs: u32,
    /// Pairs the best transform explains.
    pub inliers: u32,
    /// The score before verification (the global descriptor's).
    pub global_score: f32,
    /// Where the inliers lie in the query (x, y, w, h as fractions of the query image): where
    /// the copy sits. `None` with fewer than `MIN_INLIERS` inliers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<View>,
}

/// Up to this many inliers is what unrelated images reach by chance: no evidence. On a tuning
/// benchmark (`make-bench --originals 30 --seed 7`, not the one reported) the unrelated
/// (query, candidate) pairs' 99th percentile was 6 inliers with DINOv2-S/14's 16 × 16 grid
/// and 8 with the shipped embedder's 8 × 8 (docs/retrieve.md).
pub const MIN_INLIERS: f32 = 6.0;
/// The share of the grid's patches that, as inliers, counts as full evidence of a copy.
pub const FULL_SHARE: f32 = 0.15;
/// How much of the way from its score to 1 full evidence lifts a match: less than all, so that
/// a verified look-alike does not tie with an identical copy (score 1).
pub const WEIGHT: f32 = 0.5;

/// How sure the inliers make us that this is a copy, 0 … 1: 0 up to `MIN_INLIERS`, 1 from
/// `FULL_SHARE` of the grid's patches.
pub fn evidence(inliers: u32, patches: usize) -> f32 {
    let full = (FULL_SHARE * patches as f32).max(MIN_INLIERS + 4.0);
    ((inliers as f32 - MIN_INLIERS) / (full - MIN_INLIERS)).clamp(0.0, 1.0)
}

/// The score after verification: `score` raised towards 1 by the evidence (never lowered,
/// never to 1 unless it was 1).
pub fn verified_score(score: f32, inliers: u32, patches: usize) -> f32 {
    score + (1.0 - score).max(0.0) * WEIGHT * evidence(inliers, patches)
}

/// A complex number: grid positions, and the similarity transforms z ↦ a·z + b between them.
#[derive(Clone, Copy, Debug, PartialEq)]
struct C(f32, f32);

impl C {
    fn sub(self, o: C) -> C {
        C(self.0 - o.0, self.1 - o.1)
    }
    fn add(self, o: C) -> C {
        C(self.0 + o.0, self.1 + o.1)
    }
    fn mul(self, o: C) -> C {
        C(self.0 * o.0 - self.1 * o.1, self.0 * o.1 + self.1 * o.0)
    }
    fn div(self, o: C) -> C {
        let n = o.0 * o.0 + o.1 * o.1;
        C(
            (self.0 * o.0 + self.1 * o.1) / n,
            (self.1 * o.0 - self.0 * o.1) / n,
        )
    }
    fn conj(self) -> C {
        C(self.0, -self.1)
    }
    fn norm(self) -> f32 {
        (self.0 * self.0 + self.1 * self.1).sqrt()
    }
}

/// Mutual nearest neighbours between the tokens of `q` and `c` that pass a ratio test:
/// (query patch, candidate patch) pairs each of which is the other's most similar token, the
/// candidate token clearly closer than any other outside its 3×3 neighbourhood (Lowe's ratio
/// on distances; neighbours are excluded because adjacent patches look alike). Tokens of flat
/// or repetitive regions pair with anything and prove nothing; the test drops them.
pub fn mutual_pairs(q: &TokenGrid, c: &TokenGrid) -> Vec<(usize, usize)> {
    let (nq, nc) = (q.len(), c.len());
    let mut sim = vec![0f32; nq * nc];
    let mut best_q = vec![(f32::NEG_INFINITY, 0usize); nc];
    for i in 0..nq {
        let a = q.token(i);
        for j in 0..nc {
            let s = super::simd::dot(a, c.token(j));
            sim[i * nc + j] = s;
            if s > best_q[j].0 {
                best_q[j] = (s, i);
            }
        }
    }
    let dist = |s: f32| (2.0 - 2.0 * s).max(0.0).sqrt();
    let side = c.side as isize;
    (0..nq)
        .filter_map(|i| {
            let row = &sim[i * nc..(i + 1) * nc];
            let (j, &s1) = row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1))?;
            if best_q[j].1 != i {
                return None;
            }
            let (jx, jy) = ((j as isize) % side, (j as isize) / side);
            let s2 = row
                .iter()
                .enumerate()
                .filter(|&(k, _)| {
                    let (kx, ky) = ((k as isize) % side, (k as isize) / side);
                    (kx - jx).abs() > 1 || (ky - jy).abs() > 1
                })
                .map(|(_, &s)| s)
                .fold(f32::NEG_INFINITY, f32::max);
            (dist(s1) < RATIO * dist(s2)).then_some((i, j))
        })
        .collect()
}

/// Lowe's ratio: a pair's distance must be below this share of the next-best distance.
pub const RATIO: f32 = 0.9;

/// Transforms tried: every pair of pairs up to this many, else this many random ones.
const HYPOTHESES: usize = 500;
/// The transform's scale (candidate patches per query patch): a query that is a crop of the
/// candidate has scale < 1 (down to a crop of 40 % of its side), a window wider than the copy
/// it frames > 1 (up to a copy 40 % of the window's side).
const SCALES: std::ops::RangeInclusive<f32> = 0.4..=2.5;

/// How far (candidate patches) a pair may lie from where the transform of scale `s` puts it:
/// a patch, or at larger scales half the side one query patch covers, plus half a patch.
fn tolerance(s: f32) -> f32 {
    1.0f32.max(0.5 * s + 0.5)
}

/// The tokens of `g` less `prior`'s token at the same grid position, L2-normalised again.
/// ViT patch tokens carry their position (the position embedding): two smooth images pair
/// patch for patch at equal positions, a perfect identity "transform" between images that
/// share nothing. The mean token per position over many images (`PositionPrior`) is that
/// part; taking it away leaves what the patch shows.
pub fn without_prior(g: &TokenGrid, prior: &[f32]) -> Vec<f32> {
    let mut v: Vec<f32> = g.values.iter().zip(prior).map(|(a, b)| a - b).collect();
    for t in v.chunks_mut(g.dim) {
        let n = super::simd::dot(t, t).sqrt().max(1e-12);
        t.iter_mut().for_each(|x| *x /= n);
    }
    v
}

/// The mean token per grid position over the images seen (`without_prior`).
pub struct PositionPrior {
    sum: Vec<f64>,
    images: usize,
}

impl PositionPrior {
    /// Fewer images than this give no prior (too noisy: tokens are left as they are).
    pub const MIN_IMAGES: usize = 8;

    pub fn new(side: usize, dim: usize) -> Self {
        PositionPrior {
            sum: vec![0.0; side * side * dim],
            images: 0,
        }
    }

    pub fn add(&mut self, tokens: &[f32]) {
        if tokens.len() == self.sum.len() {
            self.sum
                .iter_mut()
                .zip(tokens)
                .for_each(|(s, &t)| *s += t as f64);
            self.images += 1;
        }
    }

    /// The mean grid, once `MIN_IMAGES` were added.
    pub fn mean(&self) -> Option<Vec<f32>> {
        (self.images >= Self::MIN_IMAGES).then(|| {
            self.sum
                .iter()
                .map(|&s| (s / self.images as f64) as f32)
                .collect()
        })
    }
}

/// Verify a candidate against the query window `q` (lying at `window` in the query), the
/// position prior taken out of both when given.
pub fn verify(
    q: &TokenGrid,
    c: &TokenGrid,
    prior: Option<&[f32]>,
    window: &View,
    global_score: f32,
) -> Verification {
    let (qv, cv);
    let (q, c) = match prior {
        Some(p) => {
            (qv, cv) = (without_prior(q, p), without_prior(c, p));
            (
                &TokenGrid { values: &qv, ..*q },
                &TokenGrid { values: &cv, ..*c },
            )
        }
        None => (q, c),
    };
    let pairs = mutual_pairs(q, c);
    let (pq, pc): (Vec<C>, Vec<C>) = pairs
        .iter()
        .map(|&(i, j)| (q.position(i), c.position(j)))
        .unzip();
    let n = pairs.len();
    let mut best: (usize, Option<(C, C, bool)>) = (0, None);
    let mut try_pair = |i: usize, j: usize| {
        let dq = pq[j].sub(pq[i]);
        if dq.norm() < 1.5 || pc[j].sub(pc[i]).norm() < 0.5 {
            return;
        }
        for mirror in [false, true] {
            let m = |z: C| if mirror { z.conj() } else { z };
            let a = pc[j].sub(pc[i]).div(m(pq[j]).sub(m(pq[i])));
            let s = a.norm();
            if !SCALES.contains(&s) {
                continue;
            }
            let b = pc[i].sub(a.mul(m(pq[i])));
            let tol = tolerance(s);
            let inliers = (0..n)
                .filter(|&k| a.mul(m(pq[k])).add(b).sub(pc[k]).norm() <= tol)
                .count();
            if inliers > best.0 {
                best = (inliers, Some((a, b, mirror)));
            }
        }
    };
    if n * (n.saturating_sub(1)) / 2 <= HYPOTHESES {
        for i in 0..n {
            for j in i + 1..n {
                try_pair(i, j);
            }
        }
    } else {
        // the same draws for the same pairs: verification is deterministic
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(n as u64);
        for _ in 0..HYPOTHESES {
            let i = r.random_range(0..n);
            let j = r.random_range(0..n);
            if i != j {
                try_pair(i, j);
            }
        }
    }
    let inliers = best.0 as u32;
    let region = best
        .1
        .filter(|_| inliers as f32 >= MIN_INLIERS)
        .map(|(a, b, mirror)| {
            let m = |z: C| if mirror { z.conj() } else { z };
            let tol = tolerance(a.norm());
            let (mut x0, mut y0, mut x1, mut y1) = (f32::MAX, f32::MAX, f32::MIN, f32::MIN);
            for k in 0..n {
                if a.mul(m(pq[k])).add(b).sub(pc[k]).norm() <= tol {
                    let z = pq[k];
                    (x0, y0) = (x0.min(z.0 - 0.5), y0.min(z.1 - 0.5));
                    (x1, y1) = (x1.max(z.0 + 0.5), y1.max(z.1 + 0.5));
                }
            }
            let g = q.side as f32;
            [
                window[0] + window[2] * x0 / g,
                window[1] + window[3] * y0 / g,
                window[2] * (x1 - x0) / g,
                window[3] * (y1 - y0) / g,
            ]
        });
    Verification {
        pairs: n as u32,
        inliers,
        global_score,
        region,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random unit tokens on a `side²` grid.
    fn random_grid(side: usize, dim: usize, seed: u64) -> Vec<f32> {
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut v: Vec<f32> = (0..side * side * dim)
            .map(|_| r.random::<f32>() - 0.5)
            .collect();
        for t in v.chunks_mut(dim) {
            let n = super::super::simd::dot(t, t).sqrt();
            t.iter_mut().for_each(|x| *x /= n);
        }
        v
    }

    #[test]
    fn a_copy_agrees_in_one_geometry_and_unrelated_tokens_do_not() {
        let (side, dim) = (12, 24);
        let c = random_grid(side, dim, 1);
        let cand = TokenGrid {
            side,
            dim,
            values: &c,
        };
        let whole = [0.0, 0.0, 1.0, 1.0];
        // the same tokens: every patch pairs with itself, all inliers, the region is everything
        let v = verify(&cand, &cand, None, &whole, 0.3);
        assert_eq!((v.pairs, v.inliers), (144, 144));
        assert_eq!(v.region, Some(whole));
        // a query showing the candidate's left half mirrored, at twice the scale (query patch
        // (x, y) shows candidate patch (5 − x/2, y/2)), padded with unrelated tokens
        let noise = random_grid(side, dim, 2);
        let mut q = noise.clone();
        for y in 0..side {
            for x in 0..side {
                if x < 8 && y < 8 && x % 2 == 0 && y % 2 == 0 {
                    let src = (y / 2) * side + (5 - x / 2);
                    q[(y * side + x) * dim..][..dim].copy_from_slice(cand.token(src));
                }
            }
        }
        let query = TokenGrid {
            side,
            dim,
            values: &q,
        };
        let v = verify(&query, &cand, None, &whole, 0.3);
        assert!(v.inliers >= 16, "{v:?}");
        let r = v.region.expect("enough inliers locate the copy");
        // the copied patches span query columns/rows 0 … 6 (of 12)
        assert!(
            r[0] < 0.01 && r[1] < 0.01 && (r[2] - 7.0 / 12.0).abs() < 0.01,
            "{r:?}"
        );
        // unrelated tokens: few pairs fit one transform, nothing is located
        let u = TokenGrid {
            side,
            dim,
            values: &noise,
        };
        let v = verify(&u, &cand, None, &whole, 0.3);
        assert!((v.inliers as f32) < MIN_INLIERS, "{v:?}");
        assert_eq!(v.region, None);
    }

    #[test]
    fn verification_only_raises_scores() {
        for s in [-1.0f32, -0.2, 0.0, 0.5, 0.99, 1.0] {
            assert_eq!(verified_score(s, 0, 256), s);
            assert_eq!(verified_score(s, MIN_INLIERS as u32, 256), s);
            let mut last = s;
            for inliers in [8, 12, 20, 31, 40, 256] {
                let v = verified_score(s, inliers, 256);
                assert!(v >= last && v <= 1.0_f32.max(s), "{s} {inliers} {v}");
                last = v;
            }
            let full = verified_score(s, 256, 256);
            assert!((full - (s + (1.0 - s) * WEIGHT)).abs() < 1e-6, "{s} {full}");
            assert!(s >= 1.0 || full < 1.0, "only an identical copy scores 1");
        }
    }
}
