//! The merge tree of EHM (docs/ehm.md): average-linkage agglomeration of 4-connected
//! patch groups on the patch grid, driven by a patch–patch affinity.
//!
//! Start from single patches and merge *spatially adjacent* segments by average linkage
//! (sum of affinity over all cross pairs / product of sizes) until one segment is left. We use
//! a parallel (Borůvka) form: in each round every segment merges with
//! its best neighbour, so segments roughly double in size per round (≈ log2 N rounds) and no
//! outlier patch survives as a singleton up to the coarse levels — the plain greedy order
//! leaves "one big segment + isolated patches" at the top of the tree. Within a round the
//! merges are applied strongest first, one pair at a time: every prefix of the merge list is a
//! partition into contiguous groups, and the partitions nest.

/// A patch grid of `h × w` patches, indexed row-major.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grid {
    pub h: usize,
    pub w: usize,
}

impl Grid {
    pub fn square(side: usize) -> Self {
        Grid { h: side, w: side }
    }
    pub fn n(&self) -> usize {
        self.h * self.w
    }
    /// 4-neighbours of patch `i`.
    pub fn neighbours(&self, i: usize) -> impl Iterator<Item = usize> + '_ {
        let (r, c) = (i / self.w, i % self.w);
        let up = (r > 0).then(|| i - self.w);
        let down = (r + 1 < self.h).then(|| i + self.w);
        let left = (c > 0).then(|| i - 1);
        let right = (c + 1 < self.w).then(|| i + 1);
        [up, down, left, right].into_iter().flatten()
    }
}

/// N−1 merges; merge k joins the segments represented by patches `a` and `b`.
#[derive(Clone, Debug, PartialEq)]
pub struct MergeTree {
    pub n: usize,
    pub merges: Vec<(u32, u32)>,
}

/// How the symmetrised attention is turned into the affinity the tree merges on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum AffinityNorm {
    /// Use `S = (A + Aᵀ)/2` as is.
    None,
    /// `S[i,j] / sqrt(d_i · d_j)` with `d` the row sums of `S` (as in normalised cuts). Softmax
    /// attention has "sink" patches that every patch attends to; without this they pull the
    /// whole image into one segment, leaving the object as single patches.
    Degree,
}

/// Which segments may merge.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum Merge {
    /// Only 4-adjacent segments: every level is a partition into contiguous groups.
    Adjacent,
    /// Any two segments (groups may be scattered, e.g. both eyes of a face).
    Free,
}

/// Build the tree from a row-major `N × N` affinity (symmetrised here, so callers may pass
/// raw attention). O(N²) memory and about O(N²·deg) time — N ≤ 1024 is fine.
pub fn build_tree(affinity: &[f32], grid: Grid, norm: AffinityNorm, merge: Merge) -> MergeTree {
    let n = grid.n();
    assert_eq!(affinity.len(), n * n, "affinity must be N×N for the grid");
    // sum[a][b]: total affinity between segments a and b (indexed by representative patch).
    let mut sum = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..n {
            let v = 0.5 * (affinity[i * n + j] as f64 + affinity[j * n + i] as f64);
            // A diverged teacher can produce NaN/inf; the tree must still be a valid tree.
            sum[i * n + j] = if v.is_finite() { v } else { 0.0 };
        }
    }
    if norm == AffinityNorm::Degree {
        let inv: Vec<f64> = (0..n)
            .map(|i| {
                1.0 / sum[i * n..(i + 1) * n]
                    .iter()
                    .sum::<f64>()
                    .max(1e-12)
                    .sqrt()
            })
            .collect();
        for i in 0..n {
            for j in 0..n {
                sum[i * n + j] *= inv[i] * inv[j];
            }
        }
    }
    let mut size = vec![1f64; n];
    let free = merge == Merge::Free;
    // free merging keeps no neighbour lists: every live segment is a candidate
    let mut nbrs: Vec<Vec<u32>> = (0..n)
        .map(|i| {
            if free {
                vec![]
            } else {
                grid.neighbours(i).map(|j| j as u32).collect()
            }
        })
        .collect();
    let mut alive = vec![true; n];
    // parent: union-find over representatives, to map a proposal made at the start of a round
    // to the segment that holds it now.
    let mut parent: Vec<u32> = (0..n as u32).collect();
    let mut merges = Vec::with_capacity(n.saturating_sub(1));
    while merges.len() + 1 < n {
        // Borůvka round: every live segment proposes its best neighbour (highest average
        // linkage; ties to the lowest index, for determinism).
        let mut proposals: Vec<(f64, u32, u32)> = Vec::new();
        let live: Vec<u32> = (0..n as u32).filter(|&a| alive[a as usize]).collect();
        for &a in &live {
            let a = a as usize;
            let mut best: Option<(f64, u32)> = None;
            let cands = if free { &live[..] } else { &nbrs[a][..] };
            for &b in cands.iter().filter(|&&b| b as usize != a) {
                let link = sum[a * n + b as usize] / (size[a] * size[b as usize]);
                if best.is_none_or(|(bl, bb)| link > bl || (link == bl && b < bb)) {
                    best = Some((link, b));
                }
            }
            if let Some((link, b)) = best {
                let (x, y) = ((a as u32).min(b), (a as u32).max(b));
                proposals.push((link, x, y));
            }
        }
        // Apply the round's merges strongest first, one pair at a time, so the merge list stays
        // a sequence of N−1 pairwise merges and every prefix is a valid cut.
        proposals.sort_by(|p, q| q.0.total_cmp(&p.0).then((p.1, p.2).cmp(&(q.1, q.2))));
        for (_, x, y) in proposals {
            let (a, b) = (find(&mut parent, x) as usize, find(&mut parent, y) as usize);
            if a == b {
                continue;
            }
            // Fold b into a (a and b are adjacent: b was a's or a-member's neighbour).
            for k in 0..n {
                let v = sum[a * n + k] + sum[b * n + k];
                sum[a * n + k] = v;
                sum[k * n + a] = v;
            }
            size[a] += size[b];
            alive[b] = false;
            parent[b] = a as u32;
            merges.push((a as u32, b as u32));
            if free {
                continue;
            }
            let nb_b = std::mem::take(&mut nbrs[b]);
            for &c in &nb_b {
                let c = c as usize;
                if c == a {
                    continue;
                }
                for x in nbrs[c].iter_mut() {
                    if *x as usize == b {
                        *x = a as u32;
                    }
                }
                dedup(&mut nbrs[c]);
                nbrs[a].push(c as u32);
            }
            nbrs[a].retain(|&x| x as usize != b && x as usize != a);
            dedup(&mut nbrs[a]);
        }
    }
    MergeTree { n, merges }
}

/// Union-find root with path halving.
fn find(p: &mut [u32], mut x: u32) -> u32 {
    while p[x as usize] != x {
        p[x as usize] = p[p[x as usize] as usize];
        x = p[x as usize];
    }
    x
}

fn dedup(v: &mut Vec<u32>) {
    v.sort_unstable();
    v.dedup();
}

impl MergeTree {
    /// The partition with `segments` groups (1 ≤ segments ≤ N): labels 0..segments per
    /// patch, numbered in order of first appearance in raster order.
    pub fn cut(&self, segments: usize) -> Vec<u32> {
        let segments = segments.clamp(1, self.n.max(1));
        let mut parent: Vec<u32> = (0..self.n as u32).collect();
        for &(a, b) in &self.merges[..self.n - segments] {
            let (ra, rb) = (find(&mut parent, a), find(&mut parent, b));
            parent[rb as usize] = ra;
        }
        let mut relabel = vec![u32::MAX; self.n];
        let mut next = 0;
        (0..self.n as u32)
            .map(|i| {
                let r = find(&mut parent, i) as usize;
                if relabel[r] == u32::MAX {
                    relabel[r] = next;
                    next += 1;
                }
                relabel[r]
            })
            .collect()
    }
}

/// True when every label's patches form one 4-connected region.
pub fn is_contiguous_partition(labels: &[u32], grid: Grid) -> bool {
    let n = grid.n();
    let k = labels.iter().copied().max().map_or(0, |m| m as usize + 1);
    let mut seen = vec![false; n];
    let mut regions = 0;
    for s in 0..n {
        if seen[s] {
            continue;
        }
        regions += 1;
        let mut stack = vec![s];
        seen[s] = true;
        while let Some(i) = stack.pop() {
            for j in grid.neighbours(i) {
                if !seen[j] && labels[j] == labels[i] {
                    seen[j] = true;
                    stack.push(j);
                }
            }
        }
    }
    regions == k
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random_affinity(n: usize, seed: u64) -> Vec<f32> {
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n * n).map(|_| r.random::<f32>()).collect()
    }

    #[test]
    fn every_level_is_a_contiguous_partition_and_levels_nest() {
        for (side, seed) in [(4, 1), (8, 2), (7, 3)] {
            let g = Grid::square(side);
            let t = build_tree(
                &random_affinity(g.n(), seed),
                g,
                AffinityNorm::Degree,
                Merge::Adjacent,
            );
            assert_eq!(t.merges.len(), g.n() - 1);
            let mut prev: Option<Vec<u32>> = None;
            for c in (1..=g.n()).rev() {
                let lab = t.cut(c);
                let k = *lab.iter().max().unwrap() as usize + 1;
                assert_eq!(k, c, "cut({c}) has {k} segments");
                assert!(is_contiguous_partition(&lab, g), "cut({c}) not contiguous");
                if let Some(p) = &prev {
                    // nesting: patches together at the finer level stay together
                    for i in 0..g.n() {
                        for j in 0..g.n() {
                            if p[i] == p[j] {
                                assert_eq!(lab[i], lab[j]);
                            }
                        }
                    }
                }
                prev = Some(lab);
            }
        }
    }

    #[test]
    fn quadrant_affinity_is_recovered() {
        let g = Grid::square(8);
        let quad = |i: usize| (i / 8 >= 4) as usize * 2 + (i % 8 >= 4) as usize;
        let mut a = vec![0f32; 64 * 64];
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        for i in 0..64 {
            for j in 0..64 {
                a[i * 64 + j] =
                    if quad(i) == quad(j) { 1.0 } else { 0.1 } + 0.05 * r.random::<f32>();
            }
        }
        for norm in [AffinityNorm::None, AffinityNorm::Degree] {
            let lab = build_tree(&a, g, norm, Merge::Adjacent).cut(4);
            for i in 0..64 {
                for j in 0..64 {
                    assert_eq!(
                        lab[i] == lab[j],
                        quad(i) == quad(j),
                        "{norm:?}: patches {i},{j}"
                    );
                }
            }
        }
    }

    #[test]
    fn outlier_patches_do_not_survive_to_coarse_levels() {
        // Patch 27 has almost no affinity to anything. Greedy average linkage would keep it as
        // a singleton until the last merges; the Borůvka rounds absorb it in the first round.
        let g = Grid::square(8);
        let mut a = random_affinity(64, 11);
        for j in 0..64 {
            a[27 * 64 + j] = 0.0;
            a[j * 64 + 27] = 0.0;
        }
        for norm in [AffinityNorm::None, AffinityNorm::Degree] {
            let lab = build_tree(&a, g, norm, Merge::Adjacent).cut(8);
            let mut sizes = [0usize; 8];
            lab.iter().for_each(|&l| sizes[l as usize] += 1);
            assert!(sizes.iter().all(|&s| s >= 2), "{norm:?}: {sizes:?}");
        }
    }

    #[test]
    fn non_finite_affinity_still_gives_a_tree() {
        let g = Grid::square(4);
        let mut a = random_affinity(16, 4);
        a[3] = f32::NAN;
        a[40] = f32::INFINITY;
        for norm in [AffinityNorm::None, AffinityNorm::Degree] {
            let t = build_tree(&a, g, norm, Merge::Adjacent);
            assert_eq!(t.merges.len(), 15);
            assert!(is_contiguous_partition(&t.cut(5), g));
        }
        assert_eq!(
            build_tree(&[f32::NAN; 256], g, AffinityNorm::Degree, Merge::Adjacent)
                .merges
                .len(),
            15
        );
    }

    #[test]
    fn free_merging_joins_scattered_patches_adjacent_merging_cannot() {
        // a checkerboard affinity: patches of one colour belong together, though no two of
        // them are 4-adjacent
        let g = Grid::square(6);
        let colour = |i: usize| (i / 6 + i % 6) % 2;
        let a: Vec<f32> = (0..36 * 36)
            .map(|k| {
                if colour(k / 36) == colour(k % 36) {
                    1.0
                } else {
                    0.05
                }
            })
            .collect();
        let free = build_tree(&a, g, AffinityNorm::None, Merge::Free).cut(2);
        assert!((0..36).all(|i| (0..36).all(|j| (free[i] == free[j]) == (colour(i) == colour(j)))));
        assert!(!is_contiguous_partition(&free, g));
        let adj = build_tree(&a, g, AffinityNorm::None, Merge::Adjacent).cut(2);
        assert!(is_contiguous_partition(&adj, g));
        // free trees are still trees: N − 1 merges, nested levels of the right size
        let t = build_tree(
            &random_affinity(36, 8),
            g,
            AffinityNorm::Degree,
            Merge::Free,
        );
        assert_eq!(t.merges.len(), 35);
        for c in 1..=36 {
            assert_eq!(*t.cut(c).iter().max().unwrap() as usize + 1, c);
        }
    }

    #[test]
    fn degree_normalisation_resists_attention_sinks() {
        // Quadrant structure, plus a background quadrant that every patch attends to strongly
        // (a sink). Raw average linkage lets the sink absorb the other quadrants patch by patch;
        // the degree-normalised affinity still finds the four quadrants.
        let g = Grid::square(8);
        let quad = |i: usize| (i / 8 >= 4) as usize * 2 + (i % 8 >= 4) as usize;
        let mut a = vec![0f32; 64 * 64];
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for i in 0..64 {
            for j in 0..64 {
                let base = if quad(i) == quad(j) { 1.0 } else { 0.1 };
                let sink = if quad(j) == 0 { 3.0 } else { 0.0 };
                a[i * 64 + j] = base + sink + 0.05 * r.random::<f32>();
            }
        }
        let recovers = |norm| {
            let lab = build_tree(&a, g, norm, Merge::Adjacent).cut(4);
            (0..64).all(|i| (0..64).all(|j| (lab[i] == lab[j]) == (quad(i) == quad(j))))
        };
        assert!(
            !recovers(AffinityNorm::None),
            "the raw affinity should fail on a sink (else this test shows nothing)"
        );
        assert!(recovers(AffinityNorm::Degree));
    }
}
