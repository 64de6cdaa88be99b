//! HNSW search over flat arrays. `hnsw::build` makes the neighbour lists; they are copied into
//! CSR arrays (layer 0) and small per-layer maps (upper layers), renumbered in breadth-first
//! order — the index stores its vectors in that node order, once — and written in our own file
//! format (`to_bytes` / `from_bytes`). Searched here with reusable visited stamps and heaps,
//! prefetching and AVX2/AVX-512 dot products. Speed against hnswlib: docs/benchmarks.md.
use super::simd::{dot_portable, prefetch, Level};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

const GRAPH_MAGIC: u32 = u32::from_le_bytes(*b"EHMG");
const GRAPH_VERSION: u32 = 1;

/// f32 ordered by `total_cmp`, for the heaps.
#[derive(Clone, Copy, PartialEq)]
pub(super) struct D(pub(super) f32);
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

#[derive(Debug)]
pub struct FlatGraph {
    /// Layer 0: neighbours of row r are `l0[off[r]..off[r + 1]]`.
    off: Vec<u32>,
    l0: Vec<u32>,
    /// Layers 1.. (index 0 = layer 1): row → neighbours.
    upper: Vec<HashMap<u32, Vec<u32>>>,
    entry: u32,
    /// Node number → vector row (nodes are numbered in breadth-first order).
    order: Vec<u32>,
    /// Floats per vector of the node-ordered table the search reads.
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
    /// The graph of neighbour lists over rows `0..n`: `lists[r]` on layer 0, `upper[l - 1]`
    /// on layer l (row → neighbours), searches starting at row `entry`; the rows of a table of
    /// `dim`-float vectors.
    pub fn new(
        lists: Vec<Vec<u32>>,
        upper: Vec<HashMap<u32, Vec<u32>>>,
        entry: u32,
        dim: usize,
    ) -> Self {
        let n = lists.len();
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
        FlatGraph {
            off,
            l0,
            upper,
            entry: if n == 0 { 0 } else { rank[entry as usize] },
            order,
            dim,
        }
    }

    /// Node number → row.
    pub fn order(&self) -> &[u32] {
        &self.order
    }

    /// The vectors of `row(r)` for every row, in node order: the table `search` reads.
    pub fn node_ordered<'v>(&self, row: impl Fn(usize) -> &'v [f32]) -> Vec<f32> {
        let mut t = Vec::with_capacity(self.order.len() * self.dim);
        for &r in &self.order {
            t.extend_from_slice(row(r as usize));
        }
        t
    }

    /// The graph as little-endian u32 words: magic, version, n, entry, upper layer count, the
    /// CSR offsets (n + 1) and lists of layer 0, the node order (n), then per upper layer its
    /// node count and (node, length, neighbours…) records.
    pub fn to_bytes(&self) -> Vec<u8> {
        let n = self.order.len() as u32;
        let mut w: Vec<u32> = vec![GRAPH_MAGIC, GRAPH_VERSION, n, self.entry];
        w.push(self.upper.len() as u32);
        w.extend_from_slice(&self.off);
        w.extend_from_slice(&self.l0);
        w.extend_from_slice(&self.order);
        for layer in &self.upper {
            let mut nodes: Vec<_> = layer.iter().collect();
            nodes.sort_by_key(|(k, _)| **k); // deterministic files
            w.push(nodes.len() as u32);
            for (k, v) in nodes {
                w.push(*k);
                w.push(v.len() as u32);
                w.extend_from_slice(v);
            }
        }
        w.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// Read `to_bytes`'s format, checking every count and node number (a damaged file is an
    /// error, never a panic or an out-of-range read later).
    pub fn from_bytes(bytes: &[u8], dim: usize) -> Result<Self, String> {
        if !bytes.len().is_multiple_of(4) {
            return Err("length is not a whole number of u32 words".into());
        }
        let w: Vec<u32> = bytes
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let mut at = 0usize;
        let mut take = |k: usize| -> Result<&[u32], String> {
            let s = w.get(at..at + k).ok_or("file ends early")?;
            at += k;
            Ok(s)
        };
        let head = take(5)?;
        if head[0] != GRAPH_MAGIC || head[1] != GRAPH_VERSION {
            return Err("not an ehm graph file (magic/version)".into());
        }
        let (n, entry, layers) = (head[2] as usize, head[3], head[4] as usize);
        let off = take(n + 1)?.to_vec();
        if off[0] != 0 || off.windows(2).any(|p| p[0] > p[1]) {
            return Err("layer-0 offsets are not increasing".into());
        }
        let l0 = take(off[n] as usize)?.to_vec();
        let order = take(n)?.to_vec();
        let node_ok = |x: u32| (x as usize) < n;
        if !l0.iter().all(|&x| node_ok(x)) || (n > 0 && !node_ok(entry)) {
            return Err("a node number is out of range".into());
        }
        let mut seen = vec![false; n];
        for &r in &order {
            if !node_ok(r) || std::mem::replace(&mut seen[r as usize], true) {
                return Err("the node order is not a permutation of the rows".into());
            }
        }
        let mut upper = Vec::with_capacity(layers.min(64));
        for _ in 0..layers {
            let count = take(1)?[0] as usize;
            let mut m = HashMap::with_capacity(count.min(n));
            for _ in 0..count {
                let rec = take(2)?;
                let (k, len) = (rec[0], rec[1] as usize);
                let nb = take(len)?.to_vec();
                if !node_ok(k) || !nb.iter().all(|&x| node_ok(x)) {
                    return Err("a node number is out of range".into());
                }
                m.insert(k, nb);
            }
            upper.push(m);
        }
        if take(1).is_ok() {
            return Err("trailing data".into());
        }
        Ok(FlatGraph {
            off,
            l0,
            upper,
            entry,
            order,
            dim,
        })
    }

    /// The `k` nearest rows to `q` by 1 − dot, exploring `ef` candidates on layer 0; rows
    /// for which `keep` is false are walked through but not returned. (row, distance), nearest
    /// first. `vectors` is the table in node order (`node_ordered`).
    pub fn search<K: Fn(usize) -> bool + ?Sized>(
        &self,
        vectors: &[f32],
        q: &[f32],
        k: usize,
        ef: usize,
        keep: &K,
        s: &mut Scratch,
    ) -> Vec<(usize, f32)> {
        match super::simd::level() {
            // SAFETY: `level` found the features these functions are compiled for.
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => return unsafe { self.search_avx512(vectors, q, k, ef, keep, s) },
            #[cfg(target_arch = "x86_64")]
            Level::Avx2Fma => return unsafe { self.search_avx2(vectors, q, k, ef, keep, s) },
            _ => {}
        }
        self.search_body(vectors, q, k, ef, keep, s, dot_portable)
    }

    /// The search loop compiled for AVX-512 (16-wide fused multiply-adds in the distance).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn search_avx512<K: Fn(usize) -> bool + ?Sized>(
        &self,
        vectors: &[f32],
        q: &[f32],
        k: usize,
        ef: usize,
        keep: &K,
        s: &mut Scratch,
    ) -> Vec<(usize, f32)> {
        use super::simd::dot_avx512;
        // SAFETY: this function only runs where AVX-512F is present.
        self.search_body(vectors, q, k, ef, keep, s, |a, b| unsafe {
            dot_avx512(a, b)
        })
    }

    /// The search loop compiled for AVX2 + FMA, so the inlined dot products use them.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn search_avx2<K: Fn(usize) -> bool + ?Sized>(
        &self,
        vectors: &[f32],
        q: &[f32],
        k: usize,
        ef: usize,
        keep: &K,
        s: &mut Scratch,
    ) -> Vec<(usize, f32)> {
        use super::simd::dot_avx2;
        // SAFETY: this function only runs where AVX2 and FMA are present.
        self.search_body(vectors, q, k, ef, keep, s, |a, b| unsafe { dot_avx2(a, b) })
    }

    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn search_body<K: Fn(usize) -> bool + ?Sized>(
        &self,
        vectors: &[f32],
        q: &[f32],
        k: usize,
        ef: usize,
        keep: &K,
        s: &mut Scratch,
        dot: impl Fn(&[f32], &[f32]) -> f32,
    ) -> Vec<(usize, f32)> {
        let dim = self.dim;
        if self.off.len() <= 1 || vectors.len() != self.order.len() * dim {
            return vec![];
        }
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

// Tested with a built graph in `hnsw`'s tests (search, filters, the file format).
