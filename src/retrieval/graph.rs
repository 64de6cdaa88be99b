//! HNSW search over flat arrays. hnsw_rs builds and persists the graph; for queries its
//! neighbour lists are copied once into CSR arrays (layer 0) and small per-layer maps (upper
//! layers), renumbered in breadth-first order with the vectors copied in that order, and searched
//! here with reusable visited stamps and heaps, prefetching and AVX2/AVX-512 dot products —
//! hnsw_rs's own search goes through an `Arc` and a lock per node visit. Speed against hnswlib:
//! docs/benchmarks.md.
use super::index::DotDistance;
#[cfg(test)]
use super::simd::dot;
use super::simd::{dot_portable, prefetch, Level};
use hnsw_rs::prelude::*;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

/// f32 ordered by `total_cmp`, for the heaps.
#[derive(Clone, Copy, PartialEq)]
struct D(f32);
impl Eq for D {}
impl PartialOrd for D {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for D {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&o.0)
    }
}

pub struct FlatGraph {
    /// Layer 0: neighbours of row r are `l0[off[r]..off[r + 1]]`.
    off: Vec<u32>,
    l0: Vec<u32>,
    /// Layers 1.. (index 0 = layer 1): row → neighbours.
    upper: Vec<HashMap<u32, Vec<u32>>>,
    entry: u32,
    /// Node number → vector row (nodes are numbered in breadth-first order).
    order: Vec<u32>,
    /// The vectors in node order (a copy: this is what the search reads).
    vectors: Vec<f32>,
    dim: usize,
}

/// Nodes in breadth-first order from `start`, then the ones it cannot reach in row order.
fn breadth_first(lists: &[Vec<u32>], start: usize) -> Vec<u32> {
    let n = lists.len();
    let mut seen = vec![false; n];
    let mut order = Vec::with_capacity(n);
    let roots = std::iter::once(start).chain(0..n);
    for root in roots {
        if root >= n || seen[root] {
            continue;
        }
        seen[root] = true;
        let mut head = order.len();
        order.push(root as u32);
        while head < order.len() {
            let c = order[head] as usize;
            head += 1;
            for &x in &lists[c] {
                if !seen[x as usize] {
                    seen[x as usize] = true;
                    order.push(x);
                }
            }
        }
    }
    order
}

/// Per-thread search state (visited stamps), reused across queries.
pub struct Scratch {
    stamp: Vec<u32>,
    gen: u32,
    /// The unvisited neighbours of the node being expanded.
    fresh: Vec<u32>,
    /// Candidates to expand (nearest on top) and results so far (farthest on top).
    cand: BinaryHeap<Reverse<(D, u32)>>,
    best: BinaryHeap<(D, u32)>,
}

impl Scratch {
    pub fn new(n: usize) -> Self {
        Scratch {
            stamp: vec![0; n],
            gen: 0,
            fresh: Vec::new(),
            cand: BinaryHeap::new(),
            best: BinaryHeap::new(),
        }
    }
}

impl FlatGraph {
    /// Copy the graph of `h` (data ids = rows of `vectors`, `dim` floats each) and the vectors.
    pub fn from_hnsw(h: &Hnsw<f32, DotDistance>, vectors: &[f32], dim: usize) -> Self {
        let n = vectors.len() / dim.max(1);
        let mut lists: Vec<Vec<u32>> = vec![Vec::new(); n];
        let mut upper: Vec<HashMap<u32, Vec<u32>>> = Vec::new();
        let (mut entry, mut top) = (0u32, 0usize);
        for p in h.get_point_indexation() {
            let id = p.get_origin_id() as u32;
            let level = p.get_point_id().0 as usize;
            if level > top || (level == top && entry == 0) {
                top = level;
                entry = id;
            }
            for (l, nb) in p.get_neighborhood_id().into_iter().enumerate() {
                let ids: Vec<u32> = nb.iter().map(|x| x.d_id as u32).collect();
                if l == 0 {
                    if (id as usize) < n {
                        lists[id as usize] = ids;
                    }
                } else if !ids.is_empty() || l <= level {
                    if upper.len() < l {
                        upper.resize_with(l, HashMap::new);
                    }
                    upper[l - 1].insert(id, ids);
                }
            }
        }
        // Renumber the nodes in breadth-first order from the entry point: a node's neighbours
        // get nearby numbers, so their vectors share pages and cache lines and a search touches
        // less memory (graph reordering, Coleman et al. 2021). Rows outside the graph go last.
        let order = breadth_first(&lists, entry as usize);
        let mut rank = vec![0u32; n];
        for (new, &old) in order.iter().enumerate() {
            rank[old as usize] = new as u32;
        }
        let mut off = Vec::with_capacity(n + 1);
        let mut l0 = Vec::new();
        off.push(0);
        for &old in &order {
            l0.extend(lists[old as usize].iter().map(|&x| rank[x as usize]));
            off.push(l0.len() as u32);
        }
        upper.truncate(top);
        let upper = upper
            .into_iter()
            .map(|m| {
                m.into_iter()
                    .map(|(k, v)| {
                        (
                            rank[k as usize],
                            v.iter().map(|&x| rank[x as usize]).collect(),
                        )
                    })
                    .collect()
            })
            .collect();
        let mut permuted = Vec::with_capacity(n * dim);
        for &old in &order {
            permuted.extend_from_slice(&vectors[old as usize * dim..(old as usize + 1) * dim]);
        }
        FlatGraph {
            off,
            l0,
            upper,
            entry: if n == 0 { 0 } else { rank[entry as usize] },
            order,
            vectors: permuted,
            dim,
        }
    }

    /// The `k` nearest rows to `q` by 1 − dot, exploring `ef` candidates on layer 0; rows
    /// for which `keep` is false are walked through but not returned. (row, distance), nearest first.
    pub fn search<K: Fn(usize) -> bool + ?Sized>(
        &self,
        q: &[f32],
        k: usize,
        ef: usize,
        keep: &K,
        s: &mut Scratch,
    ) -> Vec<(usize, f32)> {
        match super::simd::level() {
            // SAFETY: `level` found the features these functions are compiled for.
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => return unsafe { self.search_avx512(q, k, ef, keep, s) },
            #[cfg(target_arch = "x86_64")]
            Level::Avx2Fma => return unsafe { self.search_avx2(q, k, ef, keep, s) },
            _ => {}
        }
        self.search_body(q, k, ef, keep, s, dot_portable)
    }

    /// The search loop compiled for AVX-512 (16-wide fused multiply-adds in the distance).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn search_avx512<K: Fn(usize) -> bool + ?Sized>(
        &self,
        q: &[f32],
        k: usize,
        ef: usize,
        keep: &K,
        s: &mut Scratch,
    ) -> Vec<(usize, f32)> {
        use super::simd::dot_avx512;
        // SAFETY: this function only runs where AVX-512F is present.
        self.search_body(q, k, ef, keep, s, |a, b| unsafe { dot_avx512(a, b) })
    }

    /// The search loop compiled for AVX2 + FMA, so the inlined dot products use them.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn search_avx2<K: Fn(usize) -> bool + ?Sized>(
        &self,
        q: &[f32],
        k: usize,
        ef: usize,
        keep: &K,
        s: &mut Scratch,
    ) -> Vec<(usize, f32)> {
        use super::simd::dot_avx2;
        // SAFETY: this function only runs where AVX2 and FMA are present.
        self.search_body(q, k, ef, keep, s, |a, b| unsafe { dot_avx2(a, b) })
    }

    #[inline(always)]
    fn search_body<K: Fn(usize) -> bool + ?Sized>(
        &self,
        q: &[f32],
        k: usize,
        ef: usize,
        keep: &K,
        s: &mut Scratch,
        dot: impl Fn(&[f32], &[f32]) -> f32,
    ) -> Vec<(usize, f32)> {
        if self.off.len() <= 1 {
            return vec![];
        }
        let (vectors, dim) = (&self.vectors[..], self.dim);
        let distance = |r: u32| 1.0 - dot(q, &vectors[r as usize * dim..(r as usize + 1) * dim]);
        let keep = |r: u32| keep(self.order[r as usize] as usize);
        let (mut cur, mut cur_d) = (self.entry, distance(self.entry));
        for layer in self.upper.iter().rev() {
            loop {
                let mut moved = false;
                if let Some(nb) = layer.get(&cur) {
                    for &n in nb {
                        let d = distance(n);
                        if d < cur_d {
                            (cur, cur_d, moved) = (n, d, true);
                        }
                    }
                }
                if !moved {
                    break;
                }
            }
        }
        s.gen = s.gen.wrapping_add(1);
        if s.gen == 0 {
            s.stamp.fill(0);
            s.gen = 1;
        }
        let ef = ef.max(k);
        let (mut cand, mut best) = (std::mem::take(&mut s.cand), std::mem::take(&mut s.best));
        cand.clear();
        best.clear(); // kept rows only
        let mut frontier_worst = cur_d;
        s.stamp[cur as usize] = s.gen;
        cand.push(Reverse((D(cur_d), cur)));
        if keep(cur) {
            best.push((D(cur_d), cur));
        }
        while let Some(Reverse((D(d), c))) = cand.pop() {
            if best.len() >= ef && d > frontier_worst {
                break;
            }
            let (a, b) = (
                self.off[c as usize] as usize,
                self.off[c as usize + 1] as usize,
            );
            // Collect the unvisited neighbours and ask for their vectors before computing any
            // distance: they are scattered over a table far larger than the caches, so the
            // loads overlap instead of stalling one after another (hnswlib does the same).
            s.fresh.clear();
            for &n in &self.l0[a..b] {
                if s.stamp[n as usize] != s.gen {
                    s.stamp[n as usize] = s.gen;
                    s.fresh.push(n);
                    prefetch(vectors, n as usize * dim, 16);
                }
            }
            for i in 0..s.fresh.len() {
                let n = s.fresh[i];
                if let Some(&next) = s.fresh.get(i + 1) {
                    prefetch(vectors, next as usize * dim, dim);
                }
                let dn = distance(n);
                if best.len() < ef || dn < frontier_worst {
                    cand.push(Reverse((D(dn), n)));
                    if keep(n) {
                        best.push((D(dn), n));
                        if best.len() > ef {
                            best.pop();
                        }
                    }
                    frontier_worst = best.peek().map_or(f32::INFINITY, |x| x.0 .0);
                    if best.len() < ef {
                        frontier_worst = f32::INFINITY;
                    }
                }
            }
        }
        let mut out: Vec<(usize, f32)> = best
            .iter()
            .map(|&(D(d), r)| (self.order[r as usize] as usize, d))
            .collect();
        (s.cand, s.best) = (cand, best);
        out.sort_by(|a, b| a.1.total_cmp(&b.1));
        out.truncate(k);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retrieval::index::{build_hnsw, HnswParams};
    use rand::{Rng, SeedableRng};

    #[test]
    fn flat_search_finds_the_exact_neighbours_and_filters() {
        let (n, dim) = (2000, 32);
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let mut data: Vec<f32> = (0..n * dim).map(|_| r.random::<f32>() - 0.5).collect();
        for v in data.chunks_mut(dim) {
            let s = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.iter_mut().for_each(|x| *x /= s);
        }
        let h = build_hnsw(
            &data,
            dim,
            &HnswParams {
                m: 16,
                ef_construction: 100,
                ef_search: 64,
            },
        );
        let g = FlatGraph::from_hnsw(&h, &data, dim);
        let mut s = Scratch::new(n);
        let mut hits = 0;
        for qi in (0..n).step_by(40) {
            let q = &data[qi * dim..(qi + 1) * dim];
            let mut exact: Vec<(usize, f32)> = (0..n)
                .map(|j| (j, 1.0 - dot(q, &data[j * dim..(j + 1) * dim])))
                .collect();
            exact.sort_by(|a, b| a.1.total_cmp(&b.1));
            let got = g.search(q, 10, 64, &|_| true, &mut s);
            assert_eq!(got[0].0, qi, "a stored vector finds itself");
            hits += got
                .iter()
                .filter(|(j, _)| exact[..10].iter().any(|e| e.0 == *j))
                .count();
            // filtered rows never come back
            let odd = g.search(q, 10, 64, &|j| j % 2 == 1, &mut s);
            assert!(odd.iter().all(|(j, _)| j % 2 == 1) && odd.len() == 10);
        }
        assert!(hits as f64 / (50.0 * 10.0) >= 0.95, "recall {hits}/500");
    }
}
