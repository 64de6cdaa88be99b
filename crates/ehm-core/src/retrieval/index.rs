//! The on-disk index: a folder whose `CURRENT` file names the live generation folder
//! (`gen-000007/`). A generation holds `index.json` (descriptor, model hash, dim, metric, HNSW
//! parameters, counts, and the sha256 of every other file), `items.jsonl` (id ↔ path, content
//! hash, size, vector range, deleted flag), `vectors.f32` (little-endian f32 vectors in the
//! graph's node order) and `graph.bin` (the HNSW graph, `graph::FlatGraph::to_bytes`, which
//! also maps node → row). The vectors exist once, on disk and in memory. A write builds a complete new
//! generation, fsyncs it, then replaces `CURRENT` atomically: an interrupted run leaves the
//! previous generation live, and the next run sweeps the half-built one away.
use super::descriptor::{DescriptorKind, Regions};
use super::graph::{FlatGraph, Scratch};
use super::simd::dot;
use crate::error::{Error, IoContext, Result};
use crate::fsutil::{sha256_file, write_atomic};
use crate::pipeline::View;
use hnsw_rs::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const FORMAT: &str = "ehm-index/2";
const GRAPH_FILE: &str = "graph.bin";
/// hnsw_rs's layer count (its private `NB_LAYER_MAX`).
const HNSW_LAYERS: usize = 16;

/// Distance for L2-normalised vectors (and ±1/8 hashes): 1 − dot, clamped at 0 so exact
/// duplicates do not trip hnsw_rs's non-negativity assertion.
#[derive(Clone, Copy, Debug, Default)]
pub struct DotDistance;

impl Distance<f32> for DotDistance {
    fn eval(&self, a: &[f32], b: &[f32]) -> f32 {
        (1.0 - dot(a, b)).max(0.0)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HnswParams {
    /// Links per node (hnswlib's M).
    pub m: usize,
    pub ef_construction: usize,
    /// Default search breadth of queries.
    pub ef_search: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelRef {
    pub path: PathBuf,
    pub sha256: String,
    pub name: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IndexMeta {
    pub format: String,
    pub descriptor: DescriptorKind,
    pub model: Option<ModelRef>,
    pub dim: usize,
    /// Always "dot" (cosine on L2-normalised vectors).
    pub metric: String,
    pub regions: Regions,
    pub views: Vec<View>,
    pub hnsw: HnswParams,
    pub items: usize,
    pub deleted: usize,
    pub vectors: usize,
    pub next_id: u64,
    /// sha256 of every data file of the generation.
    pub files: BTreeMap<String, String>,
    /// Embed indexes: the mean descriptor of the collection the index was created with.
    /// Every stored and query vector is centred on it and re-normalised, which spreads the
    /// cosine scores of a self-supervised model (otherwise all near 1) so thresholds mean
    /// something. `None` for pHash (already centred by construction).
    #[serde(default)]
    pub center: Option<Vec<f32>>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Item {
    pub id: u64,
    pub path: PathBuf,
    pub sha256: String,
    pub bytes: u64,
    pub width: u32,
    pub height: u32,
    /// Rows `first .. first + count` of the vector table.
    pub first: usize,
    pub count: usize,
    #[serde(default)]
    pub deleted: bool,
}

/// An index in memory.
pub struct Index {
    pub meta: IndexMeta,
    pub items: Vec<Item>,
    /// The vectors as stored: in the graph's node order for a saved index (what the search
    /// reads, neighbours close together), rows added since then appended.
    store: Vec<f32>,
    /// Row → position in `store`.
    slot: Vec<u32>,
    graph: Option<FlatGraph>,
}

fn current_gen(root: &Path) -> Result<Option<PathBuf>> {
    let cur = root.join("CURRENT");
    if !cur.exists() {
        return Ok(None);
    }
    let name = std::fs::read_to_string(&cur).at(&cur)?;
    let name = name.trim();
    if !name.starts_with("gen-") || name.contains('/') {
        return Err(Error::bad_file(&cur, "not an ehm index (bad CURRENT)"));
    }
    Ok(Some(root.join(name)))
}

impl Index {
    pub fn empty(meta: IndexMeta) -> Self {
        Index {
            meta,
            items: Vec::new(),
            store: Vec::new(),
            slot: Vec::new(),
            graph: None,
        }
    }

    /// Whether `root` holds an index.
    pub fn exists(root: &Path) -> bool {
        root.join("CURRENT").exists()
    }

    /// Open the live generation, checking every file against its recorded sha256.
    pub fn open(root: &Path) -> Result<Self> {
        let gen = current_gen(root)?.ok_or_else(|| {
            Error::MissingData(format!(
                "{}: no index here (build one with ehm-retrieve index)",
                root.display()
            ))
        })?;
        let meta_path = gen.join("index.json");
        let text = std::fs::read_to_string(&meta_path).at(&meta_path)?;
        let meta: IndexMeta = serde_json::from_str(&text).map_err(|e| {
            Error::bad_file(&meta_path, format!("not an ehm index description ({e})"))
        })?;
        if meta.format != FORMAT {
            return Err(Error::bad_file(
                &meta_path,
                format!(
                    "index format {}, this ehm reads {FORMAT}; index the images again into a new folder",
                    meta.format
                ),
            ));
        }
        for (name, sha) in &meta.files {
            let p = gen.join(name);
            if !p.exists() {
                return Err(Error::bad_file(&p, "missing index file; rebuild the index"));
            }
            if &sha256_file(&p)? != sha {
                return Err(Error::bad_file(
                    &p,
                    "does not match its checksum in index.json (truncated or modified); rebuild the index",
                ));
            }
        }
        let items_path = gen.join("items.jsonl");
        let items: Vec<Item> = std::fs::read_to_string(&items_path)
            .at(&items_path)?
            .lines()
            .enumerate()
            .map(|(i, l)| {
                serde_json::from_str(l)
                    .map_err(|e| Error::bad_file(&items_path, format!("line {}: {e}", i + 1)))
            })
            .collect::<Result<_>>()?;
        let vec_path = gen.join("vectors.f32");
        let bytes = std::fs::read(&vec_path).at(&vec_path)?;
        if bytes.len() != meta.vectors * meta.dim * 4 {
            return Err(Error::bad_file(
                &vec_path,
                format!(
                    "{} bytes, expected {} vectors of {}",
                    bytes.len(),
                    meta.vectors,
                    meta.dim
                ),
            ));
        }
        let store = crate::fsutil::f32s_from_le(&bytes);
        let (graph, slot) = if meta.vectors == 0 {
            (None, Vec::new())
        } else {
            let path = gen.join(GRAPH_FILE);
            let g = FlatGraph::from_bytes(&std::fs::read(&path).at(&path)?, meta.dim)
                .map_err(|e| Error::bad_file(&path, format!("damaged HNSW graph: {e}")))?;
            if g.order().len() != meta.vectors {
                return Err(Error::bad_file(
                    &path,
                    format!(
                        "graph of {} nodes for {} vectors",
                        g.order().len(),
                        meta.vectors
                    ),
                ));
            }
            let mut slot = vec![0u32; meta.vectors];
            for (node, &row) in g.order().iter().enumerate() {
                slot[row as usize] = node as u32;
            }
            (Some(g), slot)
        };
        if let Some(it) = items.iter().find(|it| it.first + it.count > meta.vectors) {
            return Err(Error::bad_file(
                &items_path,
                format!("item {} points past the {} vectors", it.id, meta.vectors),
            ));
        }
        Ok(Index {
            meta,
            items,
            store,
            slot,
            graph,
        })
    }

    /// Number of vector rows.
    pub fn rows(&self) -> usize {
        self.slot.len()
    }

    /// Append vector rows (`dim` floats each), already prepared (`prepare`).
    pub fn push_rows(&mut self, rows: &[f32]) {
        let dim = self.meta.dim.max(1);
        let first = self.store.len() / dim;
        self.slot
            .extend((0..rows.len() / dim).map(|i| (first + i) as u32));
        self.store.extend_from_slice(rows);
    }

    /// Learn the centre from every stored vector and centre them (a new embed index).
    pub fn learn_center(&mut self) {
        let c = mean_row(&self.store, self.meta.dim);
        center_rows(&mut self.store, &c);
        self.meta.center = Some(c);
    }

    /// The `k` nearest rows to `q` through the HNSW graph (rows where `keep` is false skipped);
    /// `None` when the index has no graph (nothing saved yet).
    pub fn graph_search<K: Fn(usize) -> bool + ?Sized>(
        &self,
        q: &[f32],
        k: usize,
        ef: usize,
        keep: &K,
        scratch: &mut Scratch,
    ) -> Option<Vec<(usize, f32)>> {
        let g = self.graph.as_ref()?;
        // the graph covers the rows of the last save (node order = the start of `store`)
        let table = &self.store[..g.order().len() * self.meta.dim];
        Some(g.search(table, q, k, ef, keep, scratch))
    }

    /// The live generation folder of `root`.
    pub fn generation(root: &Path) -> Result<PathBuf> {
        current_gen(root)?
            .ok_or_else(|| Error::MissingData(format!("{}: no index", root.display())))
    }

    /// Centre and re-normalise descriptor rows in place (a no-op without a centre).
    pub fn prepare(&self, rows: &mut [f32]) {
        if let Some(c) = &self.meta.center {
            center_rows(rows, c);
        }
    }

    /// The item owning each vector row.
    pub fn owners(&self) -> Vec<u32> {
        let mut o = vec![0u32; self.rows()];
        for (i, it) in self.items.iter().enumerate() {
            o[it.first..it.first + it.count].fill(i as u32);
        }
        o
    }

    pub fn vector(&self, row: usize) -> &[f32] {
        let s = self.slot[row] as usize * self.meta.dim;
        &self.store[s..s + self.meta.dim]
    }

    /// Build the HNSW graph over all rows (deleted ones are filtered at query time) and put
    /// the vectors in its node order.
    fn build_graph(&mut self) {
        let (n, dim) = (self.rows(), self.meta.dim);
        if n == 0 {
            self.graph = None;
            return;
        }
        let data: Vec<(&[f32], usize)> = (0..n).map(|r| (self.vector(r), r)).collect();
        let h = insert_all(data, &self.meta.hnsw);
        let g = FlatGraph::from_hnsw(&h, n, dim);
        drop(h);
        let table = g.node_ordered(|r| self.vector(r));
        self.store = table;
        for (node, &row) in g.order().iter().enumerate() {
            self.slot[row as usize] = node as u32;
        }
        self.graph = Some(g);
    }

    /// Write a new generation and make it live. Old generations are removed afterwards.
    pub fn save(&mut self, root: &Path) -> Result<()> {
        std::fs::create_dir_all(root).at(root)?;
        let old = current_gen(root)?;
        let next = match &old {
            Some(p) => {
                let n: u64 = p
                    .file_name()
                    .and_then(|s| s.to_str())
                    .and_then(|s| s.strip_prefix("gen-"))
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                n + 1
            }
            None => 1,
        };
        let name = format!("gen-{next:06}");
        let gen = root.join(&name);
        if gen.exists() {
            std::fs::remove_dir_all(&gen).at(&gen)?;
        }
        std::fs::create_dir_all(&gen).at(&gen)?;
        self.meta.items = self.items.iter().filter(|i| !i.deleted).count();
        self.meta.deleted = self.items.len() - self.meta.items;
        self.meta.vectors = self.rows();
        let items: String = self
            .items
            .iter()
            .map(|i| serde_json::to_string(i).unwrap() + "\n")
            .collect();
        write_atomic(&gen.join("items.jsonl"), items.as_bytes())?;
        self.build_graph();
        let bytes: Vec<u8> = self.store.iter().flat_map(|v| v.to_le_bytes()).collect();
        write_atomic(&gen.join("vectors.f32"), &bytes)?;
        if let Some(g) = &self.graph {
            write_atomic(&gen.join(GRAPH_FILE), &g.to_bytes())?;
        }
        let mut files = BTreeMap::new();
        for f in std::fs::read_dir(&gen).at(&gen)? {
            let p = f.at(&gen)?.path();
            files.insert(
                p.file_name().unwrap().to_string_lossy().into_owned(),
                sha256_file(&p)?,
            );
        }
        self.meta.files = files;
        write_atomic(
            &gen.join("index.json"),
            serde_json::to_string_pretty(&self.meta).unwrap().as_bytes(),
        )?;
        write_atomic(&root.join("CURRENT"), name.as_bytes())?;
        sweep(root, &name);
        Ok(())
    }
}

/// `v − c`, L2-normalised, for each row of `rows`.
pub fn center_rows(rows: &mut [f32], c: &[f32]) {
    for v in rows.chunks_mut(c.len()) {
        v.iter_mut().zip(c).for_each(|(x, m)| *x -= m);
        let n = dot(v, v).sqrt().max(1e-12);
        v.iter_mut().for_each(|x| *x /= n);
    }
}

/// The mean of the rows.
pub fn mean_row(rows: &[f32], dim: usize) -> Vec<f32> {
    let mut m = vec![0f64; dim];
    let n = rows.len() / dim.max(1);
    for v in rows.chunks_exact(dim) {
        m.iter_mut().zip(v).for_each(|(a, x)| *a += *x as f64);
    }
    m.into_iter()
        .map(|x| (x / n.max(1) as f64) as f32)
        .collect()
}

/// An HNSW graph over the rows of `vectors` (`dim` each; data id = row), built in parallel.
pub fn build_hnsw<'a>(
    vectors: &'a [f32],
    dim: usize,
    p: &HnswParams,
) -> Hnsw<'a, f32, DotDistance> {
    let data: Vec<(&[f32], usize)> = vectors
        .chunks_exact(dim)
        .enumerate()
        .map(|(r, v)| (v, r))
        .collect();
    insert_all(data, p)
}

/// An HNSW graph over `(vector, id)` pairs, built in parallel by hnsw_rs.
fn insert_all<'a>(data: Vec<(&'a [f32], usize)>, p: &HnswParams) -> Hnsw<'a, f32, DotDistance> {
    let h = Hnsw::new(
        p.m,
        data.len().max(1),
        HNSW_LAYERS,
        p.ef_construction,
        DotDistance,
    );
    h.parallel_insert_slice(&data);
    h
}

/// Remove generation folders other than `keep` (left by earlier or interrupted runs).
fn sweep(root: &Path, keep: &str) {
    if let Ok(rd) = std::fs::read_dir(root) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with("gen-") && n != keep {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// Remove half-built generations of an interrupted run (anything but the live one).
pub fn sweep_stale(root: &Path) -> Result<()> {
    if let Some(g) = current_gen(root)? {
        sweep(root, &g.file_name().unwrap().to_string_lossy());
    }
    Ok(())
}
