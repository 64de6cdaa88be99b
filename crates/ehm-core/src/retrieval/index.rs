//! The on-disk index: a folder whose `CURRENT` file names the live generation folder
//! (`gen-000007/`). A generation holds `index.json` (descriptor, model hash, dim, metric, HNSW
//! parameters, counts, the sha256 of every other file, and a checksum of itself, so a
//! hand-edited description is refused), `items.jsonl` (id ↔ path, content
//! hash, size, vector range, deleted flag), `vectors.f32` (little-endian f32 vectors in the
//! graph's node order) and `graph.bin` (the HNSW graph, `graph::FlatGraph::to_bytes`, which
//! also maps node → row). The vectors exist once, on disk and in memory. A write builds a complete new
//! generation, fsyncs it, then replaces `CURRENT` atomically: an interrupted run leaves the
//! previous generation live, and the next run sweeps the half-built one away.
//!
//! Writers (index, remove, compact) hold `WriteLock`, an advisory lock on the folder's `LOCK`
//! file, from reading the index to making the new generation live: a second writer fails at
//! once (or waits), so no run's changes are lost to another's. Readers take no lock; a
//! generation is never changed once written, and a reader that loses the race with a writer's
//! clean-up reads the new generation instead.
use super::descriptor::{DescriptorKind, Regions};
use super::graph::{FlatGraph, Scratch};
use super::hnsw::{build_rows, HnswParams};
use super::simd::dot;
use crate::error::{Error, IoContext, Result};
use crate::files::{sha256_file, write_atomic};
use crate::pipeline::{FitRounding, View, ViewSize};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const FORMAT: &str = "ehm-index/3";
const GRAPH_FILE: &str = "graph.bin";
const LOCK_FILE: &str = "LOCK";
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelRef {
    #[serde(with = "crate::files::lossless_path")]
    pub path: PathBuf,
    pub sha256: String,
    pub name: Option<String>,
}

/// The index description (`index.json`; a Milvus collection's description). Unknown fields
/// are refused: a setting of a newer ehm must not be dropped silently (the vectors would be
/// described differently from the stored ones).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexMeta {
    pub format: String,
    pub descriptor: DescriptorKind,
    pub model: Option<ModelRef>,
    pub dim: usize,
    /// Always "dot" (cosine on L2-normalised vectors).
    pub metric: String,
    pub regions: Regions,
    pub views: Vec<View>,
    /// At what size the regional views were run (absent: `input`, as before it existed).
    #[serde(default, skip_serializing_if = "is_input_size")]
    pub view_size: ViewSize,
    /// How `fit` views' sides round to whole patches (absent: `nearest`, the rule of the
    /// indexes made before it was recorded; new `fit` indexes round down).
    #[serde(default, skip_serializing_if = "is_nearest")]
    pub fit_rounding: FitRounding,
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
    /// sha256 of this description written without the checksum (`describe`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
}

fn is_input_size(v: &ViewSize) -> bool {
    *v == ViewSize::Input
}

fn is_nearest(r: &FitRounding) -> bool {
    *r == FitRounding::Nearest
}

impl IndexMeta {
    /// Read a description; what is wrong with it in a few words (a setting of a newer ehm in
    /// an ehm description is named as such, not listed against every field this one knows).
    pub(crate) fn parse(text: &str) -> std::result::Result<Self, String> {
        serde_json::from_str(text).map_err(|e| {
            let e = e.to_string();
            let ehm = serde_json::from_str::<serde_json::Value>(text)
                .is_ok_and(|v| v["format"].as_str().is_some_and(|f| f.starts_with("ehm-")));
            match e
                .strip_prefix("unknown field `")
                .and_then(|r| r.split('`').next())
            {
                Some(field) if ehm => format!(
                    "it has a setting this ehm does not know, `{field}` (written by a newer ehm?)"
                ),
                _ => format!("not an ehm index description ({e})"),
            }
        })
    }

    /// index.json's text: the description with the sha256 of its own checksum-less text.
    fn describe(&mut self) -> String {
        self.checksum = None;
        let plain = serde_json::to_string_pretty(self).expect("serialisable");
        self.checksum = Some(hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&plain)));
        serde_json::to_string_pretty(self).expect("serialisable")
    }

    /// Whether the checksum matches (the description was not edited by hand).
    fn intact(&self) -> bool {
        let mut m = self.clone();
        let Some(sum) = m.checksum.take() else {
            return false;
        };
        m.describe();
        m.checksum == Some(sum)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Item {
    pub id: u64,
    /// The file's path as bytes (`lossless_path`): names that are not UTF-8 are kept exactly.
    #[serde(with = "crate::files::lossless_path")]
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
    /// pHash bits of the whole image (embed indexes): exact-copy evidence that survives what
    /// a learned descriptor forgets (a tiny thumbnail). Absent in indexes from before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phash: Option<u64>,
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
    /// An index kept by a vector database (`milvus://…`): the nearest-row search goes there,
    /// and `store` holds vectors only when they were asked for (`open_with_vectors`).
    remote: Option<Box<dyn RemoteSearch>>,
    /// The first error of a remote search (searches return no rows then): `take_remote_error`.
    remote_error: std::sync::Mutex<Option<Error>>,
}

/// A vector search kept elsewhere (`retrieval::milvus`): the `k` rows (this index's row
/// numbers) nearest to `q` by inner product, with their similarity.
pub trait RemoteSearch: Send + Sync {
    fn search(&self, q: &[f32], k: usize) -> Result<Vec<(usize, f32)>>;
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
            remote: None,
            remote_error: Default::default(),
        }
    }

    /// An index whose search is `search` (rows numbered by `items`' `first`/`count`);
    /// `store`: every row's vector in row order, or empty when not loaded.
    pub fn remote(
        meta: IndexMeta,
        items: Vec<Item>,
        rows: usize,
        store: Vec<f32>,
        search: Box<dyn RemoteSearch>,
    ) -> Self {
        Index {
            meta,
            items,
            store,
            slot: (0..rows as u32).collect(),
            graph: None,
            remote: Some(search),
            remote_error: Default::default(),
        }
    }

    /// Whether its vectors are here (a remote index's may not be).
    pub fn has_vectors(&self) -> bool {
        self.store.len() == self.rows() * self.meta.dim
    }

    /// The first error of a remote search since the last call.
    pub fn take_remote_error(&self) -> Result<()> {
        match self.remote_error.lock().map(|mut e| e.take()) {
            Ok(Some(e)) => Err(e),
            _ => Ok(()),
        }
    }

    /// Whether `root` holds an index (a `milvus://` address: whether the collection exists;
    /// when the server cannot tell, `open` says why).
    pub fn exists(root: &Path) -> bool {
        if super::milvus::is_uri(root) {
            return super::milvus::exists(root).unwrap_or(true);
        }
        root.join("CURRENT").exists()
    }

    /// `open`, with every vector in memory also for a remote index (dedup, eval).
    pub fn open_with_vectors(root: &Path) -> Result<Self> {
        if super::milvus::is_uri(root) {
            return super::milvus::open(root, true);
        }
        Self::open(root)
    }

    /// Open the live generation, checking every file against its recorded sha256. A writer
    /// may make another generation live (and remove this one) while we read: then read that.
    pub fn open(root: &Path) -> Result<Self> {
        if super::milvus::is_uri(root) {
            return super::milvus::open(root, false);
        }
        let mut tries = 0;
        loop {
            let gen = current_gen(root)?.ok_or_else(|| {
                Error::MissingData(format!(
                    "{}: no index here (build one with ehm-retrieve index)",
                    root.display()
                ))
            })?;
            match Self::open_generation(&gen) {
                Err(_) if tries < 5 && current_gen(root)?.as_ref() != Some(&gen) => tries += 1,
                r => return r,
            }
        }
    }

    fn open_generation(gen: &Path) -> Result<Self> {
        let meta_path = gen.join("index.json");
        let text = std::fs::read_to_string(&meta_path).at(&meta_path)?;
        let meta = IndexMeta::parse(&text).map_err(|e| Error::bad_file(&meta_path, e))?;
        if meta.format != FORMAT {
            return Err(Error::bad_file(
                &meta_path,
                format!(
                    "index format {}, this ehm reads {FORMAT}; index the images again into a new folder",
                    meta.format
                ),
            ));
        }
        if !meta.intact() {
            return Err(Error::bad_file(
                &meta_path,
                "does not match its checksum (edited by hand?); rebuild the index",
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
        let store = crate::files::f32s_from_le(&bytes);
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
            remote: None,
            remote_error: Default::default(),
        })
    }

    /// Number of vector rows.
    /// Item id → position in `items`.
    pub fn positions_by_id(&self) -> std::collections::HashMap<u64, usize> {
        self.items
            .iter()
            .enumerate()
            .map(|(i, it)| (it.id, i))
            .collect()
    }

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
        if let Some(r) = &self.remote {
            return Some(match r.search(q, k) {
                Ok(hits) => hits
                    .into_iter()
                    .filter(|&(row, _)| keep(row))
                    .map(|(row, sim)| (row, 1.0 - sim))
                    .collect(),
                Err(e) => {
                    if let Ok(mut slot) = self.remote_error.lock() {
                        slot.get_or_insert(e);
                    }
                    Vec::new()
                }
            });
        }
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
        assert!(
            self.has_vectors(),
            "vectors of a remote index not loaded (open_with_vectors)"
        );
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
        let g = build_rows(n, dim, |r| self.vector(r), &self.meta.hnsw);
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
            .map(|i| serde_json::to_string(i).expect("serialisable (paths as bytes)") + "\n")
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
        write_atomic(&gen.join("index.json"), self.meta.describe().as_bytes())?;
        write_atomic(&root.join("CURRENT"), name.as_bytes())?;
        sweep(root, &name);
        Ok(())
    }
}

/// The writer lock of an index folder (see the module comment); released when dropped.
pub struct WriteLock {
    _file: std::fs::File,
}

impl WriteLock {
    /// Take the lock of the index folder `root`; when another run holds it, fail at once or,
    /// with `wait`, wait for it.
    pub fn acquire(root: &Path, wait: bool) -> Result<Self> {
        if !root.is_dir() {
            return Err(Error::MissingData(format!(
                "{}: no index here (build one with ehm-retrieve index)",
                root.display()
            )));
        }
        let p = root.join(LOCK_FILE);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&p)
            .at(&p)?;
        if wait {
            f.lock().at(&p)?;
        } else {
            match f.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(Error::Other(format!(
                        "{}: another ehm-retrieve run is writing this index (index, remove or compact); try again when it has finished, or pass --wait",
                        root.display()
                    )))
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&p, e)),
            }
        }
        Ok(WriteLock { _file: f })
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

/// A `fit` index's description written before its rounding was recorded (DINOv2-S,
/// 2026-12-06), for the tests of how such an index is read and extended.
#[cfg(test)]
pub(crate) const OLD_FIT: &str = include_str!("testdata/index_fit_before_rounding.json");

#[cfg(test)]
mod tests {
    use super::*;

    fn fit_meta(rounding: FitRounding) -> IndexMeta {
        let mut m: IndexMeta = serde_json::from_str(OLD_FIT).unwrap();
        m.fit_rounding = rounding;
        m
    }

    #[test]
    fn a_fit_index_keeps_the_rounding_its_views_ran_under() {
        // the old index has no field: read as `nearest` (its crops ran at 140², and the
        // images added to it later must too), checksum intact
        assert!(!OLD_FIT.contains("fit_rounding"));
        let read: IndexMeta = serde_json::from_str(OLD_FIT).unwrap();
        assert_eq!(read.view_size, ViewSize::Fit);
        assert_eq!(read.fit_rounding, FitRounding::Nearest);
        assert!(read.intact());
        assert!(!fit_meta(FitRounding::Nearest)
            .describe()
            .contains("fit_rounding"));
        // a new one says `down`, and the checksum covers it
        let new = fit_meta(FitRounding::Down).describe();
        assert!(new.contains("\"fit_rounding\": \"down\""), "{new}");
        let read: IndexMeta = serde_json::from_str(&new).unwrap();
        assert_eq!(read.fit_rounding, FitRounding::Down);
        assert!(read.intact());
        let edited: IndexMeta =
            serde_json::from_str(&new.replace("\"down\"", "\"nearest\"")).unwrap();
        assert!(!edited.intact());
        // a field this ehm does not know (a newer ehm's setting) is refused, not dropped
        let newer = new.replacen("\"dim\"", "\"tile\": 2,\n  \"dim\"", 1);
        let e = IndexMeta::parse(&newer).unwrap_err();
        assert!(
            e.contains("does not know, `tile` (written by a newer ehm?)"),
            "{e}"
        );
        let e = IndexMeta::parse("{\"format\": 3}").unwrap_err();
        assert!(
            e.starts_with("not an ehm index description (invalid type"),
            "{e}"
        );
        // … but only in an ehm description: other JSON is not an index at all
        let e = IndexMeta::parse("{\"hello\": 1}").unwrap_err();
        assert!(
            e.starts_with("not an ehm index description (unknown field"),
            "{e}"
        );
    }
}
