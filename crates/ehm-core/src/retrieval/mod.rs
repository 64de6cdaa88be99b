//! Partial-duplicate image search: descriptors (embed model or pHash, with regional views), an
//! on-disk HNSW index with incremental adds, tombstones and compaction, queries aggregated per
//! image (best view), duplicate groups, and the HTML report.
pub mod benchmark;
pub mod descriptor;
pub mod graph;
pub mod hnsw;
pub mod index;
pub mod milvus;
pub mod proposals;
pub mod report;
pub mod simd;
pub mod verify;

use crate::error::{Error, Result};
use crate::infer::Parallelism;
use crate::pipeline::{FitRounding, HashViews, View, ViewSize};
use descriptor::{views, Describer, DescriptorKind, Regions};
use hnsw::HnswParams;
use index::{Index, IndexMeta, ModelRef};
use serde::Serialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// How to build an index the first time (later runs reuse what index.json says).
#[derive(Clone, Debug)]
pub struct BuildOptions {
    pub regions: Regions,
    pub hnsw: HnswParams,
    /// Which creation settings the user gave explicitly: an existing index refuses others
    /// than its own instead of ignoring them.
    pub asked: AskedSettings,
    pub batch: usize,
    pub threads: usize,
    pub progress: bool,
    /// Wait for another writer of the index to finish instead of failing.
    pub wait: bool,
}

/// Creation settings given explicitly (`None`: not given).
#[derive(Clone, Debug, Default)]
pub struct AskedSettings {
    pub descriptor: Option<DescriptorKind>,
    pub regions: Option<Regions>,
    pub view_size: Option<ViewSize>,
    pub m: Option<usize>,
    pub ef_construction: Option<usize>,
    pub ef_search: Option<usize>,
}

#[derive(Clone, Debug, Serialize)]
pub struct AddSummary {
    pub added: usize,
    pub unchanged: usize,
    pub replaced: usize,
    pub failed: usize,
    pub items: usize,
    pub deleted: usize,
    pub vectors: usize,
    pub seconds: f64,
    pub images_per_s: f64,
}

/// Absolute path for storing and matching (the input as given when it cannot be resolved).
pub fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Check that `d` describes images the way the index at `root` was built.
pub(crate) fn check_same_descriptor(ix: &Index, d: &Describer, root: &Path) -> Result<()> {
    if ix.meta.descriptor != d.kind {
        return Err(Error::Config(format!(
            "{} holds {:?} descriptors, not {:?}; use another --index",
            root.display(),
            ix.meta.descriptor,
            d.kind
        )));
    }
    if let (Some(m), Some(sha)) = (&ix.meta.model, &d.model_sha256) {
        if &m.sha256 != sha && !d.same_embedding_as.contains(&m.sha256) {
            return Err(Error::Config(format!(
                "{} was built with another model ({}, sha256 {}…); vectors of {} (sha256 {}…) cannot be mixed in — use that model or another --index",
                root.display(),
                m.path.display(),
                &m.sha256[..12],
                d.model_path.as_deref().unwrap_or(Path::new("?")).display(),
                &sha[..12]
            )));
        }
    }
    Ok(())
}

/// Refuse creation settings in `o.asked` that differ from the existing index's (each is fixed
/// when the index is created; silently ignoring them would mislead).
pub(crate) fn check_fixed_settings(meta: &IndexMeta, o: &BuildOptions, root: &Path) -> Result<()> {
    let name = |v: &dyn std::fmt::Debug| format!("{v:?}").to_lowercase();
    let asked = &o.asked;
    let differs = [
        (
            "--descriptor",
            asked.descriptor.map(|d| (name(&d), name(&meta.descriptor))),
        ),
        (
            "--regions",
            asked.regions.map(|r| (name(&r), name(&meta.regions))),
        ),
        (
            "--view-size",
            asked.view_size.map(|v| (name(&v), name(&meta.view_size))),
        ),
        (
            "--m",
            asked.m.map(|m| (m.to_string(), meta.hnsw.m.to_string())),
        ),
        (
            "--ef-construction",
            asked
                .ef_construction
                .map(|e| (e.to_string(), meta.hnsw.ef_construction.to_string())),
        ),
        (
            "--ef-search",
            asked
                .ef_search
                .map(|e| (e.to_string(), meta.hnsw.ef_search.to_string())),
        ),
    ];
    for (flag, pair) in differs {
        if let Some((asked, stored)) = pair.filter(|(a, s)| a != s) {
            return Err(Error::Config(format!(
                "{flag} {asked}: {} was created with {flag} {stored}, fixed for its life; use a new --index for other settings",
                root.display()
            )));
        }
    }
    Ok(())
}

/// The describer the index at `root` needs: its model (or `model` if given, which must be the
/// same file content).
pub fn describer_for(
    ix: &Index,
    root: &Path,
    model: Option<&Path>,
    par: Parallelism,
) -> Result<Describer> {
    let d = match ix.meta.descriptor {
        DescriptorKind::Phash => Describer::phash(),
        DescriptorKind::Embed => {
            let m = ix
                .meta
                .model
                .as_ref()
                .ok_or_else(|| Error::Config("embed index without a model".into()))?;
            let path = model.unwrap_or(&m.path);
            if !path.exists() {
                return Err(Error::MissingData(format!(
                    "{}: the index's model is not there any more; pass --model with the same file (sha256 {}…)",
                    path.display(),
                    &m.sha256[..12]
                )));
            }
            Describer::embed(path, par)?
        }
    };
    check_same_descriptor(ix, &d, root)?;
    Ok(d)
}

/// `ehm-retrieve index`: add new and changed files (by content hash) to the index at `root`,
/// creating it with `d` and `o` if there is none.
/// What an `index` run has to do with its inputs, given the items already indexed.
pub(crate) struct InputPlan {
    /// Files to describe: new paths, and known paths whose content changed.
    pub todo: Vec<PathBuf>,
    /// Content sha256 of every file in `todo`.
    pub hashes: HashMap<PathBuf, String>,
    /// Known paths with the same content (nothing to do).
    pub unchanged: usize,
    /// Items whose path is in `todo` with new content (to be marked deleted).
    pub replaced_idx: Vec<usize>,
    /// Inputs that could not be read (reported on stderr).
    pub failed: usize,
}

/// Decide per input file (canonical path, each once): unchanged (same path, same content),
/// replaced (same path, new content) or new — content hashes decide, on every backend.
pub(crate) fn plan_inputs(inputs: &[PathBuf], items: &[index::Item]) -> InputPlan {
    let live: HashMap<PathBuf, usize> = items
        .iter()
        .enumerate()
        .filter(|(_, it)| !it.deleted)
        .map(|(i, it)| (it.path.clone(), i))
        .collect();
    let mut plan = InputPlan {
        todo: Vec::new(),
        hashes: HashMap::new(),
        unchanged: 0,
        replaced_idx: Vec::new(),
        failed: 0,
    };
    let mut seen = std::collections::HashSet::new();
    for p in inputs {
        let c = canonical(p);
        if !seen.insert(c.clone()) {
            continue;
        }
        let sha = match crate::files::sha256_input(&c) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("skipped: {e}");
                plan.failed += 1;
                continue;
            }
        };
        match live.get(&c) {
            Some(&i) if items[i].sha256 == sha => {
                plan.unchanged += 1;
                continue;
            }
            Some(&i) => plan.replaced_idx.push(i),
            None => {}
        }
        plan.todo.push(c.clone());
        plan.hashes.insert(c, sha);
    }
    plan
}

/// How the images added to an index described by `meta` are described.
pub(crate) fn indexing(meta: &IndexMeta, o: &BuildOptions) -> descriptor::DescribeOptions {
    descriptor::DescribeOptions {
        views: meta.views.clone(),
        extra_views: descriptor::extra_views(meta.regions),
        // the index keeps the whole image's pHash
        hashes: (meta.descriptor == DescriptorKind::Embed).then_some(HashViews::Whole),
        patch_tokens: false,
        view_size: meta.view_size,
        rescaled_whole: None,
        fit_rounding: meta.fit_rounding,
        batch: o.batch,
        threads: o.threads,
        progress: o.progress,
    }
}

/// The description of a new, empty index (`format` names its storage) for `d`'s vectors.
pub(crate) fn new_meta(format: &str, d: &Describer, o: &BuildOptions) -> Result<IndexMeta> {
    if o.asked.view_size == Some(ViewSize::Fit) && !d.any_input_size() {
        return Err(Error::Config(format!(
            "--view-size fit: {} runs only at its own input size; use --view-size input",
            d.model_path
                .as_ref()
                .map_or("pHash".into(), |p| p.display().to_string())
        )));
    }
    let view_size = o.asked.view_size.unwrap_or(ViewSize::Input);
    Ok(IndexMeta {
        format: format.into(),
        descriptor: d.kind,
        model: d.model_sha256.as_ref().map(|sha| ModelRef {
            path: d.model_path.clone().unwrap_or_default(),
            sha256: sha.clone(),
            name: d.model_name.clone(),
        }),
        dim: d.dim,
        metric: "dot".into(),
        regions: o.regions,
        views: views(o.regions),
        // `fit` is asked for, not the default: ≈ 2× faster indexing with DINOv2-S, but the
        // crop family loses 0.05 mAP (docs/benchmarks.md)
        view_size,
        // never upsample a crop: the same mAP as rounding to the nearest patch, 1.06–1.18× faster
        // (docs/benchmarks.md); recorded, as an older index rounded to the nearest
        fit_rounding: match view_size {
            ViewSize::Fit => FitRounding::Down,
            ViewSize::Input => FitRounding::Nearest,
        },
        hnsw: o.hnsw.clone(),
        items: 0,
        deleted: 0,
        vectors: 0,
        next_id: 0,
        files: Default::default(),
        center: None,
        checksum: None,
    })
}

pub fn add(
    root: &Path,
    d: &mut Describer,
    inputs: &[PathBuf],
    o: &BuildOptions,
) -> Result<AddSummary> {
    if milvus::is_uri(root) {
        return milvus::add(root, d, inputs, o);
    }
    let t0 = std::time::Instant::now();
    std::fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
    // held until the new generation is live: no other writer reads the old one meanwhile
    let _lock = index::WriteLock::acquire(root, o.wait)?;
    let mut ix = if Index::exists(root) {
        index::sweep_stale(root)?;
        let ix = Index::open(root)?;
        check_same_descriptor(&ix, d, root)?;
        check_fixed_settings(&ix.meta, o, root)?;
        ix
    } else {
        o.hnsw.validate()?;
        Index::empty(new_meta(index::FORMAT, d, o)?)
    };
    let InputPlan {
        todo,
        hashes,
        unchanged,
        replaced_idx,
        mut failed,
    } = plan_inputs(inputs, &ix.items);
    let view_list = ix.meta.views.clone();
    let nv = view_list.len();
    let fresh_rows = ix.rows();
    let mut added = 0;
    let mut new_paths = std::collections::HashSet::new();
    let how = indexing(&ix.meta, o);
    failed += d.describe(&todo, &how, |r| {
        if let Ok(desc) = r {
            let first = ix.rows();
            let len = desc.vectors.len();
            if len % ix.meta.dim != 0 || len < nv * ix.meta.dim {
                return Err(Error::Shape(format!(
                    "{}: descriptor has {len} values, expected at least {nv} × {}",
                    desc.path.display(),
                    ix.meta.dim
                )));
            }
            let count = len / ix.meta.dim;
            let mut v = desc.vectors;
            ix.prepare(&mut v);
            ix.push_rows(&v);
            new_paths.insert(desc.path.clone());
            ix.items.push(index::Item {
                id: ix.meta.next_id,
                sha256: hashes.get(&desc.path).cloned().unwrap_or_default(),
                bytes: std::fs::metadata(&desc.path).map(|m| m.len()).unwrap_or(0),
                path: desc.path,
                width: desc.width,
                height: desc.height,
                first,
                count,
                deleted: false,
                phash: desc.hashes.first().copied(),
            });
            ix.meta.next_id += 1;
            added += 1;
        }
        Ok(())
    })?;
    // a changed file's old entry is retired only when its new version made it in
    let mut replaced = 0;
    for i in replaced_idx {
        if new_paths.contains(&ix.items[i].path) {
            ix.items[i].deleted = true;
            replaced += 1;
        }
    }
    // a new embed index learns its centre from its first images (all their views)
    if ix.meta.descriptor == DescriptorKind::Embed
        && ix.meta.center.is_none()
        && fresh_rows == 0
        && added > 0
    {
        ix.learn_center();
    }
    if added > 0 || replaced > 0 || !Index::exists(root) {
        ix.save(root)?;
    }
    let secs = t0.elapsed().as_secs_f64();
    Ok(AddSummary {
        added: added - replaced,
        unchanged,
        replaced,
        failed,
        items: ix.items.iter().filter(|i| !i.deleted).count(),
        deleted: ix.items.iter().filter(|i| i.deleted).count(),
        vectors: ix.rows(),
        seconds: secs,
        images_per_s: todo.len() as f64 / secs.max(1e-9),
    })
}

/// `ehm-retrieve remove`: mark the items of these paths deleted. Returns how many were found.
pub fn remove(root: &Path, paths: &[PathBuf], wait: bool) -> Result<(usize, Vec<PathBuf>)> {
    if milvus::is_uri(root) {
        return milvus::remove(root, paths);
    }
    let _lock = index::WriteLock::acquire(root, wait)?;
    let mut ix = Index::open(root)?;
    let (mut n, mut missing) = (0, Vec::new());
    for p in paths {
        let c = canonical(p);
        let mut hit = false;
        for it in ix
            .items
            .iter_mut()
            .filter(|it| !it.deleted && (it.path == c || it.path == *p))
        {
            it.deleted = true;
            hit = true;
        }
        if hit {
            n += 1;
        } else {
            missing.push(p.clone());
        }
    }
    if n > 0 {
        ix.save(root)?;
    }
    Ok((n, missing))
}

/// `ehm-retrieve compact`: rewrite the index without deleted items (ids are kept).
pub fn compact(root: &Path, wait: bool) -> Result<(usize, usize)> {
    if milvus::is_uri(root) {
        // deleted images' vectors are deleted at once; Milvus compacts its segments itself
        let ix = Index::open(root)?;
        return Ok((ix.meta.items, 0));
    }
    let _lock = index::WriteLock::acquire(root, wait)?;
    let ix = Index::open(root)?;
    let mut out = Index::empty(ix.meta.clone());
    let mut dropped = 0;
    for it in &ix.items {
        if it.deleted {
            dropped += 1;
            continue;
        }
        let mut it2 = it.clone();
        it2.first = out.rows();
        for r in it.first..it.first + it.count {
            out.push_rows(ix.vector(r));
        }
        out.items.push(it2);
    }
    out.save(root)?;
    Ok((out.items.len(), dropped))
}

/// The ranks (0-based) whose mean raw score is a query's background level.
pub const BACKGROUND: std::ops::Range<usize> = 10..20;

/// A raw score relative to the query's background level: 1 − (1 − raw) / (1 − level), the
/// match's distance as a share of the distance to images that are surely not copies (a ratio
/// test: scale-free, so an embedder whose scores all sit near 1 and one that spreads them get
/// comparable numbers). 1 = identical, 0 = no closer than the background, < 0 farther,
/// floored at −1 (twice the background's distance or more: nothing), so scores stay in −1 … 1
/// like cosines and exact copies (`Match::rank_key`) still rank first.
pub fn normalise(raw: f32, level: f32) -> f32 {
    (1.0 - (1.0 - raw) / (1.0 - level).max(1e-4)).max(-1.0)
}

/// A query's background level from its raw scores in rank order: their mean over the ranks
/// `BACKGROUND` (`None` when it ranked no more than 10 images: scores stay raw).
pub fn background_level(sorted_raw: &[f32]) -> Option<f32> {
    let n = sorted_raw.len();
    let bg = &sorted_raw[BACKGROUND.start.min(n)..n.min(BACKGROUND.end)];
    (!bg.is_empty()).then(|| bg.iter().sum::<f32>() / bg.len() as f32)
}

/// Scores normalised against their own background (`Searcher::normalised`), in rank order.
pub fn normalise_all(sorted_raw: &[f32]) -> Vec<f32> {
    match background_level(sorted_raw) {
        Some(level) => sorted_raw.iter().map(|&r| normalise(r, level)).collect(),
        None => sorted_raw.to_vec(),
    }
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Match {
    #[serde(serialize_with = "crate::files::lossy_path")]
    pub path: PathBuf,
    /// The score thresholds apply to: `raw` normalised against the background level of the
    /// query (or of the query window that found it) when the searcher normalises
    /// (`Searcher::normalised`), else `raw`.
    pub score: f32,
    /// Cosine similarity (pHash: 1 − 2·bits/64) of the best-matching view pair.
    pub raw: f32,
    pub id: u64,
    /// The query window that matched best (x, y, w, h as fractions of the query), when the
    /// query was searched by windows: where the copy sits in the query.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<View>,
    /// Matched as an exact copy by pHash (`--exact-copies`): listed before every other match
    /// and kept whatever the threshold.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub exact: bool,
    /// The local verification of this match (`QueryOptions::verify`): its patch pairs,
    /// inliers, score before, and where the copy sits in the query.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verification: Option<verify::Verification>,
}

impl Match {
    /// The order of matches: exact copies first, then by score.
    pub fn rank_key(&self) -> f32 {
        self.score + if self.exact { 4.0 } else { 0.0 }
    }
}

/// One scored row of a search, before the merge per image.
#[derive(Clone, Copy)]
struct Hit {
    row: usize,
    /// What the merge compares: `raw`, or `raw` normalised against the window's background.
    score: f32,
    raw: f32,
    /// Which query window found it.
    window: usize,
    exact: bool,
    normalised: bool,
}

impl Hit {
    fn raw(row: usize, raw: f32, window: usize) -> Self {
        Hit {
            row,
            score: raw,
            raw,
            window,
            exact: false,
            normalised: false,
        }
    }
}

/// Search per image: the best view's score, deleted items filtered, above `threshold`, top `k`.
pub struct Searcher<'a> {
    pub ix: &'a Index,
    /// Normalise scores against each query's (window's) background level (`normalised`).
    normalise: bool,
    owners: Vec<u32>,
    alive: Vec<bool>,
    /// (pHash, first row) of the live items that have one.
    hashes: Vec<(u64, usize)>,
    scratch: std::cell::RefCell<graph::Scratch>,
}

impl<'a> Searcher<'a> {
    pub fn new(ix: &'a Index) -> Self {
        let owners = ix.owners();
        let alive = owners
            .iter()
            .map(|&o| !ix.items[o as usize].deleted)
            .collect();
        let scratch = std::cell::RefCell::new(graph::Scratch::new(ix.rows()));
        let hashes = ix
            .items
            .iter()
            .filter(|it| !it.deleted && it.count > 0)
            .filter_map(|it| it.phash.map(|h| (h, it.first)))
            .collect();
        Searcher {
            ix,
            normalise: false,
            owners,
            alive,
            hashes,
            scratch,
        }
    }

    /// Report scores normalised against the query's background: the mean raw score of its
    /// images ranked `BACKGROUND` (11th–20th). Raw cosines drift with the query (a busy
    /// picture resembles everything a little, a collage searched by many windows even more);
    /// how far a match stands above the images that are surely not copies does not, so one
    /// threshold keeps one precision across queries and collections (the score normalisation
    /// of the image-similarity challenge's descriptor track, with the indexed collection as
    /// the background set). Collections of fewer than 11 images have no background: raw.
    pub fn normalised(mut self, on: bool) -> Self {
        self.normalise = on;
        self
    }

    /// How many images a search must rank to score `k` of them.
    fn depth(&self, k: usize) -> usize {
        if self.normalise {
            k.max(BACKGROUND.end)
        } else {
            k
        }
    }

    /// Best score per image (and which of the query's windows gave it), normalised if asked,
    /// above `threshold` (exact copies first, whatever their score, which is at least their
    /// pHash similarity), top `k`.
    fn aggregate(
        &self,
        hits: impl Iterator<Item = Hit>,
        windows: &[View],
        k: usize,
        threshold: f32,
    ) -> Vec<Match> {
        let mut best: HashMap<u32, Hit> = HashMap::new();
        let mut scored_by_windows = false;
        for h in hits {
            let o = self.owners[h.row];
            let e = best.entry(o).or_insert(Hit {
                score: f32::NEG_INFINITY,
                raw: f32::NEG_INFINITY,
                exact: false,
                ..h
            });
            e.exact |= h.exact;
            scored_by_windows |= h.normalised;
            if h.score > e.score {
                (e.score, e.raw, e.window, e.normalised) = (h.score, h.raw, h.window, h.normalised);
            }
        }
        let mut m: Vec<Match> = best
            .into_iter()
            .map(|(o, h)| {
                let it = &self.ix.items[o as usize];
                Match {
                    path: it.path.clone(),
                    score: h.score,
                    raw: h.raw,
                    id: it.id,
                    window: windows.get(h.window).copied(),
                    exact: h.exact,
                    verification: None,
                }
            })
            .collect();
        m.sort_by(|a, b| b.rank_key().total_cmp(&a.rank_key()).then(a.id.cmp(&b.id)));
        if self.normalise && !scored_by_windows {
            let raw: Vec<f32> = m.iter().map(|x| x.raw).collect();
            for (x, s) in m.iter_mut().zip(normalise_all(&raw)) {
                x.score = s;
            }
        }
        m.retain(|x| x.exact || x.score >= threshold);
        m.truncate(k);
        m
    }

    /// Approximate search through the HNSW graph.
    pub fn search(&self, q: &[f32], k: usize, ef: usize, threshold: f32) -> Vec<Match> {
        let nv = self.ix.meta.views.len().max(1);
        let want = (self.depth(k) * nv * 2 + 8).min(self.ix.rows());
        let keep = |r: usize| self.alive[r];
        let hits = self
            .ix
            .graph_search(q, want, ef.max(want), &keep, &mut self.scratch.borrow_mut())
            .unwrap_or_default();
        self.aggregate(
            hits.into_iter().map(|(r, d)| Hit::raw(r, 1.0 - d, 0)),
            &[],
            k,
            threshold,
        )
    }

    /// Search with each of a query's windows (`views × dim` values, the whole image first;
    /// `windows` says where each lies), merged per image by its best score: a copy that is only
    /// part of the query is found by the window that frames it. `hashes` (the windows' pHash
    /// bits, or none) add exact-copy evidence: an indexed image whose pHash is within
    /// `EXACT_COPY` of a window's scores at least that similarity.
    pub fn search_windows(
        &self,
        q: &[f32],
        windows: &[View],
        hashes: &[u64],
        k: usize,
        ef: usize,
        threshold: f32,
    ) -> Vec<Match> {
        let dim = self.ix.meta.dim;
        if q.len() <= dim && hashes.is_empty() {
            return self.search(q, k, ef, threshold);
        }
        let nv = self.ix.meta.views.len().max(1);
        let want = (self.depth(k) * nv * 2 + 8).min(self.ix.rows());
        let keep = |r: usize| self.alive[r];
        // With several windows and normalised scores, each window's matches are normalised
        // against that window's own background before the merge: a sub-window of a crop that
        // resembles many look-alikes a little has a high background, so its best look-alike
        // does not outrank the whole query's true match (a merge by raw maximum lets it).
        let per_window = self.normalise && q.len() > dim;
        let mut hits = Vec::new();
        for (i, w) in q.chunks(dim).enumerate() {
            let h = self
                .ix
                .graph_search(w, want, ef.max(want), &keep, &mut self.scratch.borrow_mut())
                .unwrap_or_default();
            if !per_window {
                hits.extend(h.into_iter().map(|(r, d)| Hit::raw(r, 1.0 - d, i)));
                continue;
            }
            let mut per_image: HashMap<u32, (f32, usize)> = HashMap::new();
            for (r, d) in h {
                let e = per_image
                    .entry(self.owners[r])
                    .or_insert((f32::NEG_INFINITY, r));
                if 1.0 - d > e.0 {
                    *e = (1.0 - d, r);
                }
            }
            let mut ranked: Vec<(f32, usize)> = per_image.into_values().collect();
            ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
            let raw: Vec<f32> = ranked.iter().map(|x| x.0).collect();
            for ((raw, row), score) in ranked.into_iter().zip(normalise_all(&raw)) {
                hits.push(Hit {
                    row,
                    score,
                    raw,
                    window: i,
                    exact: false,
                    normalised: true,
                });
            }
        }
        // every stored hash is compared (a popcount each: ~1 ms per million images)
        for (i, &qh) in hashes.iter().enumerate() {
            for &(h, row) in &self.hashes {
                let s = descriptor::phash_similarity(qh, h);
                if s >= descriptor::EXACT_COPY {
                    hits.push(Hit {
                        exact: true,
                        ..Hit::raw(row, s, i)
                    });
                }
            }
        }
        self.aggregate(hits.into_iter(), windows, k, threshold)
    }

    /// Exact search (every vector): the yardstick for HNSW recall.
    pub fn exact(&self, q: &[f32], k: usize, threshold: f32) -> Vec<Match> {
        let hits = (0..self.ix.rows())
            .filter(|&r| self.alive[r])
            .map(|r| Hit::raw(r, simd::dot(q, self.ix.vector(r)), 0));
        self.aggregate(hits, &[], k, threshold)
    }
}

/// How queries are described, searched and verified: `query` and `eval` share it, so the
/// benchmark measures what users run.
pub struct QueryOptions {
    /// The query's windows (`--query-regions`).
    pub regions: Regions,
    /// Compare the windows' pHashes with the indexed images' (`--exact-copies phash`; used
    /// only by embed indexes, whose items carry a pHash).
    pub exact_copies: bool,
    /// Verify this many of each query's best matches by their patch tokens (`verify`;
    /// 0: off). Needs an embed model with a `patch_tokens` output and the indexed files.
    pub verify: usize,
    pub threads: usize,
    pub progress: bool,
}

/// One query's outcome.
pub struct QueryResult {
    /// The described query (its windows' vectors ready for search, no tokens).
    pub query: descriptor::Described,
    pub matches: Vec<Match>,
    /// Time to search (all windows, merged).
    pub search_ms: f64,
    /// Time to verify: embedding the candidates not seen before (shared by the queries of a
    /// batch) and matching the tokens.
    pub verify_ms: f64,
}

/// A query's outcome, or its file and what was wrong with it.
pub type QueryOutcome = std::result::Result<QueryResult, (PathBuf, String)>;

/// Queries described, searched and verified per batch of this many (bounds the patch tokens
/// held at once: a batch of DINOv2-S queries with 8 windows is ~25 MB of tokens per query).
const QUERY_BATCH: usize = 32;
/// Candidates whose tokens are kept between batches (evicted all at once beyond).
const TOKEN_CACHE: usize = 4096;

/// How the queries of an index described by `meta` are described (`patch_tokens`: for
/// verification).
fn querying(meta: &IndexMeta, o: &QueryOptions, patch_tokens: bool) -> descriptor::DescribeOptions {
    descriptor::DescribeOptions {
        views: views(o.regions),
        extra_views: descriptor::extra_views(o.regions),
        hashes: (o.exact_copies && meta.descriptor == DescriptorKind::Embed)
            .then_some(HashViews::Every),
        patch_tokens,
        // the query's windows at full size (their patch tokens are verified on the full grid)
        view_size: ViewSize::Input,
        // an index of fitted views holds its crops at the whole image's scale: the query also
        // runs whole at a crop's fitted size, by the index's rounding, so a cropped copy meets
        // its crop at that scale (crop family 0.842 → 0.881 mAP with 140² crops,
        // docs/benchmarks.md); not with --verify (tokens)
        rescaled_whole: (meta.view_size == ViewSize::Fit).then_some(descriptor::CROP_SIDE),
        fit_rounding: meta.fit_rounding,
        batch: QUERY_BATCH,
        threads: o.threads,
        progress: false,
    }
}

/// Run `paths` as queries of `ix` through `s`: each described (`o`), searched for its `k`
/// best matches at `threshold`, verified if asked, and handed to `each` in input order.
/// Returns how many queries failed.
#[allow(clippy::too_many_arguments)]
pub fn run_queries(
    ix: &Index,
    d: &mut Describer,
    s: &Searcher,
    paths: &[PathBuf],
    o: &QueryOptions,
    (k, ef, threshold): (usize, usize, f32),
    mut each: impl FnMut(QueryOutcome) -> Result<()>,
) -> Result<usize> {
    let grid = match (o.verify, d.token_grid()) {
        (0, _) => None,
        (_, Some(g)) => Some(g),
        (_, None) => {
            return Err(Error::Config(match &d.model_path {
                Some(m) => format!(
                    "{}: no patch_tokens output, which --verify needs; add it with `ehm-export patch-tokens {} -o NEW.onnx` (or --verify 0)",
                    m.display(),
                    m.display()
                ),
                None => "--verify needs an embed index (pHash has no patch tokens); use --verify 0".into(),
            }))
        }
    };
    let how = querying(&ix.meta, o, grid.is_some());
    let bar = crate::progress::inputs_bar(paths.len(), o.progress);
    let by_id = ix.positions_by_id();
    let mut cache: HashMap<u64, Option<Vec<f32>>> = HashMap::new();
    let mut prior = grid.map(|(side, dim)| verify::PositionPrior::new(side, dim));
    let mut failed = 0;
    for chunk in paths.chunks(QUERY_BATCH) {
        let mut described = Vec::with_capacity(chunk.len());
        failed += bar.suspend(|| {
            d.describe(chunk, &how, |r| {
                described.push(r);
                Ok(())
            })
        })?;
        let mut results: Vec<(descriptor::Described, Vec<Match>, f64)> = Vec::new();
        let mut order: Vec<std::result::Result<usize, (PathBuf, String)>> = Vec::new();
        for r in described {
            match r {
                Ok(mut q) => {
                    ix.prepare(&mut q.vectors);
                    let t0 = std::time::Instant::now();
                    let (depth, cut) = match grid {
                        Some(_) => (k.max(o.verify), -1.0),
                        None => (k, threshold),
                    };
                    let m = s.search_windows(&q.vectors, &q.views, &q.hashes, depth, ef, cut);
                    order.push(Ok(results.len()));
                    results.push((q, m, t0.elapsed().as_secs_f64() * 1e3));
                }
                Err(e) => order.push(Err(e)),
            }
        }
        // a remote index whose server failed: stop with its error, not with empty results
        ix.take_remote_error()?;
        let mut verify_ms = vec![0.0; results.len()];
        if let Some((side, dim)) = grid {
            let t0 = std::time::Instant::now();
            let mut todo: Vec<u64> = results
                .iter()
                .flat_map(|(_, m, _)| m.iter().take(o.verify).map(|x| x.id))
                .filter(|id| !cache.contains_key(id))
                .collect();
            todo.sort_unstable();
            todo.dedup();
            if cache.len() + todo.len() > TOKEN_CACHE {
                cache.clear();
                todo = results
                    .iter()
                    .flat_map(|(_, m, _)| m.iter().take(o.verify).map(|x| x.id))
                    .collect();
                todo.sort_unstable();
                todo.dedup();
            }
            candidate_tokens(ix, d, &by_id, &todo, o.threads, &mut cache)?;
            let prior = prior.as_mut().expect("a prior when verifying");
            for id in &todo {
                if let Some(Some(t)) = cache.get(id) {
                    prior.add(t);
                }
            }
            let mean = prior.mean();
            let shared = t0.elapsed().as_secs_f64() * 1e3 / results.len().max(1) as f64;
            for ((q, m, _), ms) in results.iter_mut().zip(&mut verify_ms) {
                let t1 = std::time::Instant::now();
                let per_view = side * side * dim;
                for x in m.iter_mut().take(o.verify) {
                    let Some(Some(c)) = cache.get(&x.id) else {
                        continue;
                    };
                    let w = x
                        .window
                        .and_then(|w| q.views.iter().position(|v| *v == w))
                        .unwrap_or(0);
                    let Some(qt) = q.tokens.get(w * per_view..(w + 1) * per_view) else {
                        continue;
                    };
                    let grid = |values| verify::TokenGrid { side, dim, values };
                    let v =
                        verify::verify(&grid(qt), &grid(c), mean.as_deref(), &q.views[w], x.score);
                    x.score = verify::verified_score(x.score, v.inliers, side * side);
                    x.verification = Some(v);
                }
                // equal scores: the better verified first
                let inliers = |x: &Match| x.verification.map_or(0, |v| v.inliers);
                m.sort_by(|a, b| {
                    b.rank_key()
                        .total_cmp(&a.rank_key())
                        .then(inliers(b).cmp(&inliers(a)))
                        .then(a.id.cmp(&b.id))
                });
                m.retain(|x| x.exact || x.score >= threshold);
                m.truncate(k);
                q.tokens = Vec::new();
                *ms = shared + t1.elapsed().as_secs_f64() * 1e3;
            }
        }
        let mut results: Vec<Option<_>> = results.into_iter().map(Some).collect();
        for r in order {
            bar.inc(1);
            each(match r {
                Ok(i) => {
                    let (query, matches, search_ms) = results[i].take().expect("each result once");
                    Ok(QueryResult {
                        query,
                        matches,
                        search_ms,
                        verify_ms: verify_ms[i],
                    })
                }
                Err(e) => Err(e),
            })?;
        }
    }
    bar.finish_and_clear();
    Ok(failed)
}

/// Put the patch tokens of the indexed images `ids` into `cache` (`None` for a file that is
/// gone, changed since it was indexed, or unreadable: its matches stay unverified).
fn candidate_tokens(
    ix: &Index,
    d: &mut Describer,
    by_id: &HashMap<u64, usize>,
    ids: &[u64],
    threads: usize,
    cache: &mut HashMap<u64, Option<Vec<f32>>>,
) -> Result<()> {
    let mut paths = Vec::new();
    let mut owner: HashMap<PathBuf, u64> = HashMap::new();
    for &id in ids {
        let it = &ix.items[by_id[&id]];
        let same = std::fs::metadata(&it.path).is_ok_and(|m| m.len() == it.bytes);
        cache.insert(id, None);
        if same {
            owner.insert(it.path.clone(), id);
            paths.push(it.path.clone());
        }
    }
    let how = descriptor::DescribeOptions {
        views: vec![crate::pipeline::FULL],
        extra_views: None,
        hashes: None,
        patch_tokens: true,
        view_size: ViewSize::Input,
        rescaled_whole: None,
        fit_rounding: FitRounding::Nearest,
        batch: QUERY_BATCH,
        threads,
        progress: false,
    };
    d.describe(&paths, &how, |r| {
        if let Ok(c) = r {
            if let Some(&id) = owner.get(&c.path) {
                cache.insert(id, Some(c.tokens));
            }
        }
        Ok(())
    })?;
    Ok(())
}

/// `dedup`'s threshold when none is given: raw cosine 0.9 (the old default), and for
/// normalised scores the threshold at which the benchmark's (query, top-10 match) pairs reach
/// 99 % precision with the shipped embedder (0.978) and with pHash (0.556), rounded up
/// (`ehm-retrieve eval`, 2026-12-03, docs/retrieve.md). Dedup chains pairs transitively, so it
/// wants precision first. Other models have their own point (DINOv2-S/14: 0.65): measure it
/// with `eval` and pass `--threshold`.
pub fn default_dedup_threshold(d: DescriptorKind, normalised: bool) -> f32 {
    match (d, normalised) {
        (_, false) => 0.9,
        (DescriptorKind::Embed, true) => DEDUP_NORMALISED_EMBED,
        (DescriptorKind::Phash, true) => DEDUP_NORMALISED_PHASH,
    }
}

const DEDUP_NORMALISED_EMBED: f32 = 0.98;
const DEDUP_NORMALISED_PHASH: f32 = 0.56;

/// Groups of near-duplicates among the live items: items whose best-view scores against each
/// other's whole-image descriptor reach `threshold` (normalised scores if asked), joined
/// transitively (union-find).
pub fn dedup(root: &Path, threshold: f32, normalised: bool, ef: usize) -> Result<Vec<Vec<Match>>> {
    let ix = Index::open_with_vectors(root)?;
    let s = Searcher::new(&ix).normalised(normalised);
    let live: Vec<usize> = (0..ix.items.len())
        .filter(|&i| !ix.items[i].deleted)
        .collect();
    let by_id = ix.positions_by_id();
    let mut parent: Vec<usize> = (0..ix.items.len()).collect();
    fn find(p: &mut [usize], mut x: usize) -> usize {
        while p[x] != x {
            p[x] = p[p[x]];
            x = p[x];
        }
        x
    }
    // per item: its best (score, raw) with another member
    let mut best: HashMap<usize, (f32, f32)> = HashMap::new();
    {
        for &i in &live {
            let q = ix.vector(ix.items[i].first); // the whole-image view (already centred)
            for m in s.search(q, 20, ef, threshold) {
                let j = by_id[&m.id];
                if j != i {
                    let (a, b) = (find(&mut parent, i), find(&mut parent, j));
                    if a != b {
                        parent[a] = b;
                    }
                    for x in [i, j] {
                        let e = best.entry(x).or_insert((f32::NEG_INFINITY, 0.0));
                        if m.score > e.0 {
                            *e = (m.score, m.raw);
                        }
                    }
                }
            }
        }
    }
    ix.take_remote_error()?;
    let mut groups: HashMap<usize, Vec<Match>> = HashMap::new();
    for &i in &live {
        let r = find(&mut parent, i);
        groups.entry(r).or_default().push(Match {
            path: ix.items[i].path.clone(),
            score: best.get(&i).map_or(1.0, |b| b.0),
            raw: best.get(&i).map_or(1.0, |b| b.1),
            id: ix.items[i].id,
            window: None,
            exact: false,
            verification: None,
        });
    }
    let mut out: Vec<Vec<Match>> = groups.into_values().filter(|g| g.len() > 1).collect();
    for g in &mut out {
        g.sort_by_key(|m| m.id);
    }
    out.sort_by(|a, b| b.len().cmp(&a.len()).then(a[0].id.cmp(&b[0].id)));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline;
    use rand::{Rng, SeedableRng};

    /// An index's fitted views keep its rounding for the images added later and for its
    /// queries' rescaled whole image; an `input` index runs no view fitted.
    #[test]
    fn additions_and_queries_follow_the_index_rounding() {
        let build = BuildOptions {
            regions: Regions::Standard,
            hnsw: HnswParams {
                m: 16,
                ef_construction: 200,
                ef_search: 64,
            },
            asked: AskedSettings::default(),
            batch: 8,
            threads: 1,
            progress: false,
            wait: false,
        };
        let query = QueryOptions {
            regions: Regions::Auto,
            exact_copies: true,
            verify: 0,
            threads: 1,
            progress: false,
        };
        let old: IndexMeta = serde_json::from_str(index::OLD_FIT).unwrap();
        let mut new = old.clone();
        new.fit_rounding = FitRounding::Down;
        for meta in [&old, &new] {
            let added = indexing(meta, &build);
            assert_eq!(added.view_size, ViewSize::Fit);
            assert_eq!(added.fit_rounding, meta.fit_rounding);
            let asked = querying(meta, &query, false);
            assert_eq!(asked.view_size, ViewSize::Input);
            assert_eq!(asked.rescaled_whole, Some(descriptor::CROP_SIDE));
            assert_eq!(asked.fit_rounding, meta.fit_rounding);
        }
        assert_eq!(old.fit_rounding, FitRounding::Nearest);
        let mut input = old.clone();
        input.view_size = ViewSize::Input;
        assert_eq!(indexing(&input, &build).view_size, ViewSize::Input);
        assert_eq!(querying(&input, &query, false).rescaled_whole, None);
    }

    /// Item i's pHash: far apart (≥ 19 of 64 bits between any two of the first 40).
    fn test_hash(i: usize) -> u64 {
        (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }

    /// An embed index of `n` random unit vectors (one view each, pHash `test_hash`), saved to
    /// and opened from `dir`.
    fn unit(v: Vec<f32>) -> Vec<f32> {
        let norm = simd::dot(&v, &v).sqrt();
        v.into_iter().map(|x| x / norm).collect()
    }

    fn tiny_index(dir: &Path, n: usize, dim: usize) -> (Index, Vec<Vec<f32>>) {
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let rows = (0..n)
            .map(|_| unit((0..dim).map(|_| r.random::<f32>() - 0.5).collect()))
            .collect();
        index_of(dir, rows)
    }

    /// An index of one image per row (unit vectors), pHashes from `test_hash`.
    fn index_of(dir: &Path, rows: Vec<Vec<f32>>) -> (Index, Vec<Vec<f32>>) {
        let dim = rows[0].len();
        let mut ix = Index::empty(IndexMeta {
            format: index::FORMAT.into(),
            descriptor: DescriptorKind::Embed,
            model: None,
            dim,
            metric: "dot".into(),
            regions: Regions::None,
            views: views(Regions::None),
            view_size: ViewSize::Input,
            fit_rounding: FitRounding::Nearest,
            hnsw: HnswParams {
                m: 8,
                ef_construction: 64,
                ef_search: 64,
            },
            items: 0,
            deleted: 0,
            vectors: 0,
            next_id: 0,
            files: Default::default(),
            center: None,
            checksum: None,
        });
        for (i, v) in rows.iter().enumerate() {
            let first = ix.rows();
            ix.push_rows(v);
            ix.items.push(index::Item {
                id: i as u64,
                path: PathBuf::from(format!("/img/{i}.jpg")),
                sha256: String::new(),
                bytes: 0,
                width: 1,
                height: 1,
                first,
                count: 1,
                deleted: false,
                phash: Some(test_hash(i)),
            });
            ix.meta.next_id += 1;
        }
        ix.save(dir).unwrap();
        (Index::open(dir).unwrap(), rows)
    }

    #[test]
    fn normalised_scores_stand_above_the_query_background() {
        let d = tempfile::tempdir().unwrap();
        let (ix, rows) = tiny_index(d.path(), 40, 16);
        let q = &rows[3];
        let raw = Searcher::new(&ix).exact(q, 40, -1.0);
        let norm = Searcher::new(&ix).normalised(true).exact(q, 40, -1.0);
        assert_eq!(raw[0].id, 3);
        assert!((raw[0].score - 1.0).abs() < 1e-5);
        // the level is the mean raw score of ranks 11–20
        let level = raw[10..20].iter().map(|m| m.score).sum::<f32>() / 10.0;
        assert!(level.abs() > 1e-3, "a level of 0 would not test anything");
        for (a, b) in raw.iter().zip(&norm) {
            assert_eq!(
                a.id, b.id,
                "normalising must not reorder one query's matches"
            );
            let want = (1.0 - (1.0 - a.score) / (1.0 - level)).max(-1.0);
            assert!(
                (b.score - want).abs() < 1e-5 && b.raw == a.score,
                "{b:?} vs {want}"
            );
        }
        // thresholds apply to the normalised score; HNSW gives the same as exact here
        let t = norm[5].score;
        let cut = Searcher::new(&ix).normalised(true).search(q, 40, 64, t);
        assert_eq!(cut.len(), 6, "{cut:?}");
        // fewer than 11 images ranked: no background, raw scores
        let few = Searcher::new(&ix).normalised(true);
        let m = few.aggregate(
            raw.iter()
                .take(5)
                .map(|m| Hit::raw(m.id as usize, m.score, 0)),
            &[],
            5,
            -1.0,
        );
        assert!(m.iter().zip(&raw).all(|(a, b)| a.score == b.score));
    }

    #[test]
    fn a_matching_phash_brings_an_image_in_whatever_the_embedding_says() {
        let d = tempfile::tempdir().unwrap();
        let (ix, rows) = tiny_index(d.path(), 40, 16);
        let s = Searcher::new(&ix);
        // the query's embedding is item 7's negated (its worst match); its pHash is item 21's
        // with 6 bits changed (similarity 1 − 6/32), then with 9 changed (below EXACT_COPY)
        let q: Vec<f32> = rows[7].iter().map(|x| -x).collect();
        let h21 = test_hash(21);
        let near = h21 ^ 0b11_1111_0000_0000;
        let far = h21 ^ 0b1_1111_1111_0000_0000;
        let m = s.search_windows(&q, &[pipeline::FULL], &[near], 20, 64, -1.0);
        let hit = &m[0];
        assert!(
            hit.id == 21 && hit.exact,
            "an exact copy comes first: {m:?}"
        );
        assert!((hit.raw - (1.0 - 6.0 / 32.0)).abs() < 1e-6, "{hit:?}");
        // and passes any threshold
        let above = s.search_windows(&q, &[pipeline::FULL], &[near], 20, 64, 0.99);
        assert_eq!(above.iter().map(|x| x.id).collect::<Vec<_>>(), vec![21]);
        assert!(
            m.iter().all(|x| x.id != 7),
            "the embedding's worst match is not in the top 20"
        );
        let ids = |m: &[Match]| m.iter().map(|x| (x.id, x.score)).collect::<Vec<_>>();
        let far_hits = s.search_windows(&q, &[pipeline::FULL], &[far], 20, 64, -1.0);
        let embed_only = s.search(&q, 20, 64, -1.0);
        assert_eq!(
            ids(&far_hits),
            ids(&embed_only),
            "9 of 64 bits apart is no exact copy"
        );
    }

    #[test]
    fn windows_merge_by_scores_normalised_per_window() {
        // 30 look-alikes around one direction, 10 unrelated images; the query's whole window is
        // a noisy copy of unrelated image 35, its second window the look-alikes' centre
        let dim = 16;
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let mut noise =
            |s: f32| -> Vec<f32> { (0..dim).map(|_| s * (r.random::<f32>() - 0.5)).collect() };
        let centre = unit(noise(1.0));
        let mut rows: Vec<Vec<f32>> = (0..30)
            .map(|_| unit(centre.iter().zip(noise(0.5)).map(|(c, n)| c + n).collect()))
            .collect();
        rows.extend((0..10).map(|_| unit(noise(1.0))));
        let d = tempfile::tempdir().unwrap();
        let (ix, rows) = index_of(d.path(), rows);
        let whole = unit(
            rows[35]
                .iter()
                .zip(noise(0.6))
                .map(|(a, n)| a + n)
                .collect(),
        );
        let q: Vec<f32> = whole.iter().chain(&centre).copied().collect();
        let windows = [pipeline::FULL, [0.5, 0.5, 0.5, 0.5]];
        // the premise: a look-alike's raw cosine with the second window beats the copy's
        let copy_raw = simd::dot(&whole, &rows[35]);
        let best_look_alike = (0..30)
            .map(|i| simd::dot(&centre, &rows[i]))
            .fold(-1.0, f32::max);
        assert!(
            best_look_alike > copy_raw,
            "{best_look_alike} vs {copy_raw}"
        );
        // merged by raw maximum (raw scores) a look-alike wins …
        let raw = Searcher::new(&ix).search_windows(&q, &windows, &[], 10, 64, -1.0);
        assert!(raw[0].id < 30, "{raw:?}");
        // … normalised per window, the copy does, found by the whole window
        let norm =
            Searcher::new(&ix)
                .normalised(true)
                .search_windows(&q, &windows, &[], 10, 64, -1.0);
        assert_eq!(norm[0].id, 35, "{norm:?}");
        assert_eq!(norm[0].window, Some(pipeline::FULL));
        assert!((norm[0].raw - copy_raw).abs() < 1e-5);
        assert!(norm.iter().all(|m| (-1.0..=1.0).contains(&m.score)));
    }
}
