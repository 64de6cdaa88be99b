//! The index kept in Milvus (`-i milvus://HOST:PORT/NAME`): the same commands, inputs,
//! outputs and incremental semantics as the on-disk index, for collections past one machine.
//!
//! Two collections per index, through Milvus's REST API (v1, fixed schema: an auto-id Int64
//! key `id`, a float vector `vector`, other fields dynamic):
//! - `NAME`: one row per view vector, `{vector, item, view}`; its description is the index
//!   description (`IndexMeta` as JSON: descriptor, model sha256, dim, regions, views, view
//!   size and fit rounding, centre),
//!   fixed at creation and checked on every call as locally.
//! - `NAME_items`: one row per image, `{vector: [1, 0] (unused), item, doc, deleted}`, `doc`
//!   the image's `Item` as JSON (path, content sha256, size, pHash, number of views).
//!
//! An image becomes visible when its item row exists: its views are written first, its item
//! row after them, and searches only take rows of known items whose id is at most the largest
//! known one. An interrupted run leaves views without an item row (never seen by queries);
//! the next `index` run deletes them (ids above the largest item) and writes those images
//! again, since content hashes say they are not there.
pub mod http;
pub mod server;

use super::descriptor::{Describer, DescriptorKind};
use super::index::{Index, IndexMeta, Item, RemoteSearch};
use super::{canonical, AddSummary, BuildOptions};
use crate::error::{Error, Result};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const SCHEME: &str = "milvus://";
/// The format of the index description kept in the vector collection's description.
pub const FORMAT: &str = "ehm-milvus/1";
const ITEMS_SUFFIX: &str = "_items";
/// Rows per insert request (~1.6 kB of JSON per 384-d row: ~6 MB requests).
const WRITE_ROWS: usize = 4096;
/// Item ids per range query when reading a collection (Milvus answers at most 16384 rows).
const READ_ITEMS: i64 = 4096;
/// Milvus's largest top-k and query window.
const MAX_ROWS: usize = 16384;
/// Attempts of a request whose transport failed (connection refused or reset, timeout) or
/// whose server answered 5xx, with 0.5, 1, 2 … s between them.
const ATTEMPTS: usize = 4;
/// How long a request waits for a collection that the server is still loading (after a
/// restart) before giving up.
const LOAD_WAIT: Duration = Duration::from_secs(60);

/// Whether `-i` names a Milvus collection.
pub fn is_uri(root: &Path) -> bool {
    root.to_str().is_some_and(|s| s.starts_with(SCHEME))
}

/// `milvus://HOST:PORT/NAME`.
#[derive(Clone, Debug)]
pub struct Uri {
    pub addr: String,
    pub collection: String,
    pub text: String,
}

impl Uri {
    pub fn parse(root: &Path) -> Result<Uri> {
        let text = root.to_str().unwrap_or_default().to_string();
        let bad = |why: &str| {
            Error::Config(format!(
                "{text}: {why} (expected milvus://HOST:PORT/COLLECTION)"
            ))
        };
        let rest = text
            .strip_prefix(SCHEME)
            .ok_or_else(|| bad("not a milvus:// address"))?;
        let (addr, coll) = rest
            .split_once('/')
            .ok_or_else(|| bad("no collection name"))?;
        let coll = coll.trim_end_matches('/');
        if addr.is_empty() || !addr.contains(':') {
            return Err(bad("no HOST:PORT"));
        }
        let ok = !coll.is_empty()
            && coll.len() + ITEMS_SUFFIX.len() <= 255
            && coll.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && coll.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok {
            return Err(bad(
                "a collection name is letters, digits and _ (not starting with a digit)",
            ));
        }
        Ok(Uri {
            addr: addr.to_string(),
            collection: coll.to_string(),
            text,
        })
    }

    fn items(&self) -> String {
        format!("{}{ITEMS_SUFFIX}", self.collection)
    }
}

/// A REST client of one server: JSON in, the reply's `data` out, one-line errors.
#[derive(Clone)]
pub struct Client {
    uri: Uri,
    timeout: Duration,
}

impl Client {
    pub fn new(uri: Uri) -> Self {
        Client {
            uri,
            timeout: Duration::from_secs(120),
        }
    }

    fn fail(&self, what: &str, why: impl std::fmt::Display) -> Error {
        Error::Other(format!("{} ({what}): {why}", self.uri.text))
    }

    /// A request, retried while the transport fails or the server answers 5xx.
    fn call(&self, what: &str, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let bytes = body.map(|b| serde_json::to_vec(b).expect("serialisable"));
        let (mut last, mut waited, mut attempt) = (String::new(), Duration::ZERO, 0);
        while attempt < ATTEMPTS {
            attempt += 1;
            if attempt > 1 && waited == Duration::ZERO {
                std::thread::sleep(Duration::from_millis(500 << (attempt - 2)));
            }
            match http::request(&self.uri.addr, method, path, bytes.as_deref(), self.timeout) {
                Err(http::Transport(e)) => last = format!("server not reachable ({e})"),
                Ok((st, b)) if st >= 500 => {
                    last = format!("server error HTTP {st}: {}", String::from_utf8_lossy(&b))
                }
                Ok((st, b)) => {
                    let v: Value = serde_json::from_slice(&b).map_err(|_| {
                        self.fail(
                            what,
                            format!(
                                "HTTP {st}, not a Milvus REST reply: {}",
                                String::from_utf8_lossy(&b)
                                    .chars()
                                    .take(200)
                                    .collect::<String>()
                            ),
                        )
                    })?;
                    let code = v["code"].as_i64().unwrap_or(-1);
                    if code != 200 && code != 0 {
                        let msg = v["message"].as_str().unwrap_or("no message");
                        // a restarted server loads its collections again: wait for that
                        if msg.contains("not loaded") && waited < LOAD_WAIT {
                            last = format!("refused (code {code}: {msg})");
                            std::thread::sleep(Duration::from_secs(1));
                            waited += Duration::from_secs(1);
                            attempt -= 1;
                            continue;
                        }
                        return Err(self.fail(what, format!("refused (code {code}: {msg})")));
                    }
                    return Ok(v["data"].clone());
                }
            }
        }
        Err(self.fail(
            what,
            format!(
                "{last}; gave up after {ATTEMPTS} attempts — is Milvus running at {}?",
                self.uri.addr
            ),
        ))
    }

    pub fn list(&self) -> Result<Vec<String>> {
        let v = self.call("list collections", "GET", "/v1/vector/collections", None)?;
        Ok(v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default())
    }

    fn describe(&self, coll: &str) -> Result<Value> {
        self.call(
            "describe collection",
            "GET",
            &format!("/v1/vector/collections/describe?collectionName={coll}"),
            None,
        )
    }

    fn create(&self, coll: &str, dim: usize, description: &str) -> Result<()> {
        let body = json!({"collectionName": coll, "dimension": dim, "metricType": "IP",
            "primaryField": "id", "vectorField": "vector", "description": description});
        self.call(
            "create collection",
            "POST",
            "/v1/vector/collections/create",
            Some(&body),
        )?;
        Ok(())
    }

    pub fn drop_collection(&self, coll: &str) -> Result<()> {
        let body = json!({"collectionName": coll});
        self.call(
            "drop collection",
            "POST",
            "/v1/vector/collections/drop",
            Some(&body),
        )?;
        Ok(())
    }

    fn insert(&self, coll: &str, rows: Vec<Value>) -> Result<()> {
        let n = rows.len();
        let body = json!({"collectionName": coll, "data": rows});
        let v = self.call("insert", "POST", "/v1/vector/insert", Some(&body))?;
        let got = v["insertCount"].as_u64().unwrap_or(0) as usize;
        if got != n {
            return Err(self.fail("insert", format!("wrote {got} of {n} rows")));
        }
        Ok(())
    }

    fn query(&self, coll: &str, filter: &str, fields: &[&str]) -> Result<Vec<Value>> {
        let body = json!({"collectionName": coll, "filter": filter, "outputFields": fields,
            "limit": MAX_ROWS});
        let v = self.call("query", "POST", "/v1/vector/query", Some(&body))?;
        let rows = v.as_array().cloned().unwrap_or_default();
        if rows.len() >= MAX_ROWS {
            return Err(self.fail("query", format!("more than {MAX_ROWS} rows match {filter}")));
        }
        Ok(rows)
    }

    /// How many rows match `filter`.
    fn count(&self, coll: &str, filter: &str) -> Result<usize> {
        let body = json!({"collectionName": coll, "filter": filter,
            "outputFields": ["count(*)"], "limit": 0});
        let v = self.call("count", "POST", "/v1/vector/query", Some(&body))?;
        let n = &v[0]["count(*)"];
        n.as_str()
            .and_then(|s| s.parse().ok())
            .or(n.as_u64().map(|x| x as usize))
            .ok_or_else(|| self.fail("count", format!("unexpected reply {v}")))
    }

    /// Every row of `coll` with `item >= from`, read in ranges of `span` item ids until as
    /// many rows as counted first came back (ids are allocated one after another, but
    /// removed images of an exported index leave gaps; 64 empty ranges in a row end it too).
    fn query_items_from(
        &self,
        coll: &str,
        from: i64,
        span: i64,
        fields: &[&str],
    ) -> Result<Vec<Value>> {
        let total = self.count(coll, &format!("item >= {from}"))?;
        let mut out = Vec::new();
        let (mut lo, mut empty) = (from, 0);
        while out.len() < total && empty < 64 {
            let rows = self.query(
                coll,
                &format!("item >= {lo} and item < {}", lo + span),
                fields,
            )?;
            empty = if rows.is_empty() { empty + 1 } else { 0 };
            out.extend(rows);
            lo += span;
        }
        Ok(out)
    }

    /// Wait until `cond` holds (what this run wrote is visible to reads: Milvus's default
    /// bounded consistency lets a read lag behind writes), at most 60 s.
    fn wait_until(&self, what: &str, cond: impl Fn() -> Result<bool>) -> Result<()> {
        let t0 = std::time::Instant::now();
        while !cond()? {
            if t0.elapsed() > Duration::from_secs(60) {
                return Err(self.fail(what, "writes not visible to reads after 60 s"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn delete_ids(&self, coll: &str, ids: &[i64]) -> Result<()> {
        for c in ids.chunks(WRITE_ROWS) {
            let body = json!({"collectionName": coll, "id": c});
            self.call("delete", "POST", "/v1/vector/delete", Some(&body))?;
        }
        Ok(())
    }

    /// The `k` vector rows nearest to `q` among items `0 ..= max_item`: (item, view, similarity).
    fn search(&self, q: &[f32], k: usize, max_item: i64) -> Result<Vec<(u64, usize, f32)>> {
        let body = json!({"collectionName": self.uri.collection, "vector": q,
            "limit": k.clamp(1, MAX_ROWS), "outputFields": ["item", "view"],
            "filter": format!("item <= {max_item}")});
        let v = self.call("search", "POST", "/v1/vector/search", Some(&body))?;
        Ok(v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|h| {
                        Some((
                            h["item"].as_u64()?,
                            h["view"].as_u64()? as usize,
                            h["distance"].as_f64()? as f32,
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default())
    }
}

fn pk(v: &Value) -> Option<i64> {
    match &v["id"] {
        Value::String(s) => s.parse().ok(),
        x => x.as_i64(),
    }
}

/// Whether the collection of `root` exists (an error when the server does not answer).
pub fn exists(root: &Path) -> Result<bool> {
    let uri = Uri::parse(root)?;
    let c = Client::new(uri.clone());
    Ok(c.list()?.contains(&uri.collection))
}

/// The search of an opened collection: Milvus's rows mapped to the index's row numbers.
struct Search {
    client: Client,
    first: HashMap<u64, (usize, usize)>,
    max_item: i64,
}

impl RemoteSearch for Search {
    fn search(&self, q: &[f32], k: usize) -> Result<Vec<(usize, f32)>> {
        if self.max_item < 0 {
            return Ok(Vec::new());
        }
        let hits = self.client.search(q, k, self.max_item)?;
        Ok(hits
            .into_iter()
            .filter_map(|(item, view, s)| {
                let &(first, count) = self.first.get(&item)?;
                (view < count).then_some((first + view, s))
            })
            .collect())
    }
}

/// What the collections hold: the description, the items (deduplicated by id, a deleted
/// version winning; sorted by id; `first` set to consecutive row numbers) and each item's
/// item-row keys.
struct Loaded {
    meta: IndexMeta,
    items: Vec<Item>,
    keys: HashMap<u64, Vec<i64>>,
}

fn load(c: &Client) -> Result<Option<Loaded>> {
    let uri = &c.uri;
    let names = c.list()?;
    if !names.contains(&uri.collection) {
        return Ok(None);
    }
    let d = c.describe(&uri.collection)?;
    let text = d["description"].as_str().unwrap_or_default();
    let mut meta = IndexMeta::parse(text).map_err(|e| {
        c.fail(
            "describe collection",
            format!("its description: {e}; use another collection"),
        )
    })?;
    if meta.format != FORMAT {
        return Err(c.fail(
            "describe collection",
            format!("index format {}, this ehm reads {FORMAT}; index the images again into a new collection", meta.format),
        ));
    }
    let dim_field = format!("FloatVector({})", meta.dim);
    let has_dim = d["fields"]
        .as_array()
        .is_some_and(|f| f.iter().any(|x| x["type"].as_str() == Some(&dim_field)));
    if !has_dim {
        return Err(c.fail(
            "describe collection",
            format!("its vectors are not {dim_field} as its description says"),
        ));
    }
    let mut by_id: HashMap<u64, Item> = HashMap::new();
    let mut keys: HashMap<u64, Vec<i64>> = HashMap::new();
    if names.contains(&uri.items()) {
        for r in c.query_items_from(&uri.items(), 0, READ_ITEMS, &["item", "doc", "deleted"])? {
            let Some(doc) = r["doc"].as_str() else {
                continue;
            };
            let it: Item = serde_json::from_str(doc).map_err(|e| {
                c.fail(
                    "read items",
                    format!("item row {} is not an ehm item ({e})", r["item"]),
                )
            })?;
            if let Some(k) = pk(&r) {
                keys.entry(it.id).or_default().push(k);
            }
            match by_id.get(&it.id) {
                Some(old) if old.deleted => {}
                _ => {
                    by_id.insert(it.id, it);
                }
            }
        }
    }
    let mut items: Vec<Item> = by_id.into_values().collect();
    items.sort_by_key(|it| it.id);
    let mut row = 0;
    for it in &mut items {
        it.first = row;
        row += it.count;
    }
    meta.items = items.iter().filter(|i| !i.deleted).count();
    meta.deleted = items.len() - meta.items;
    meta.vectors = items.iter().filter(|i| !i.deleted).map(|i| i.count).sum();
    meta.next_id = items.last().map_or(0, |i| i.id + 1);
    Ok(Some(Loaded { meta, items, keys }))
}

/// `load`, where a missing collection is an error.
fn load_existing(c: &Client, uri: &Uri) -> Result<Loaded> {
    load(c)?.ok_or_else(|| {
        Error::MissingData(format!(
            "{}: no such collection (build one with ehm-retrieve index)",
            uri.text
        ))
    })
}

/// Open the collection of `root` as an `Index` whose search runs in Milvus (`with_vectors`:
/// also read every vector, for dedup and eval).
pub fn open(root: &Path, with_vectors: bool) -> Result<Index> {
    let uri = Uri::parse(root)?;
    let c = Client::new(uri.clone());
    let l = load_existing(&c, &uri)?;
    let rows: usize = l.items.iter().map(|i| i.count).sum();
    let first: HashMap<u64, (usize, usize)> =
        l.items.iter().map(|i| (i.id, (i.first, i.count))).collect();
    let mut store = Vec::new();
    if with_vectors {
        let dim = l.meta.dim;
        store = vec![0f32; rows * dim];
        let rows_per = (MAX_ROWS / l.meta.views.len().max(1) / 2).max(1) as i64;
        let max = l.items.last().map_or(-1, |i| i.id as i64);
        let mut lo = 0;
        while lo <= max {
            let f = format!("item >= {lo} and item < {}", lo + rows_per);
            for r in c.query(&uri.collection, &f, &["item", "view", "vector"])? {
                let (Some(item), Some(view)) = (r["item"].as_u64(), r["view"].as_u64()) else {
                    continue;
                };
                let Some(&(f0, n)) = first.get(&item) else {
                    continue;
                };
                let v: Vec<f32> = r["vector"]
                    .as_array()
                    .map(|a| a.iter().map(|x| x.as_f64().unwrap_or(0.0) as f32).collect())
                    .unwrap_or_default();
                if (view as usize) < n && v.len() == dim {
                    let at = (f0 + view as usize) * dim;
                    store[at..at + dim].copy_from_slice(&v);
                }
            }
            lo += rows_per;
        }
    }
    let max_item = l.items.last().map_or(-1, |i| i.id as i64);
    let search = Search {
        client: c,
        first,
        max_item,
    };
    Ok(Index::remote(
        l.meta,
        l.items,
        rows,
        store,
        Box::new(search),
    ))
}

/// An image ready to be written: its item (id set) and its prepared rows.
struct Pending {
    item: Item,
    rows: Vec<f32>,
}

/// Images per write batch (`EHM_MILVUS_WRITE_IMAGES`, for tests that stop the server
/// between batches; default: as many as fit `WRITE_ROWS` rows).
fn write_images_per_batch() -> Option<usize> {
    std::env::var("EHM_MILVUS_WRITE_IMAGES")
        .ok()?
        .parse()
        .ok()
        .filter(|&n| n > 0)
}

/// A pause after each write batch (`EHM_MILVUS_WRITE_PAUSE_MS`): lets a test stop the server
/// mid-run at a known point.
fn write_pause_ms() -> Option<u64> {
    std::env::var("EHM_MILVUS_WRITE_PAUSE_MS")
        .ok()?
        .parse()
        .ok()
}

/// Write `pending` in batches: each batch's view rows, then its item rows (which make its
/// images visible). Returns how many images were written.
fn write(c: &Client, dim: usize, pending: &[Pending], progress: bool) -> Result<usize> {
    let uri = &c.uri;
    let per = write_images_per_batch();
    let (mut i, mut done) = (0, 0);
    while i < pending.len() {
        let mut j = i;
        let mut rows = 0;
        while j < pending.len()
            && (j == i || rows + pending[j].item.count <= WRITE_ROWS)
            && per.is_none_or(|p| j - i < p)
        {
            rows += pending[j].item.count;
            j += 1;
        }
        let batch = &pending[i..j];
        let mut vrows = Vec::with_capacity(rows);
        for p in batch {
            for (view, v) in p.rows.chunks(dim).enumerate() {
                vrows.push(json!({"vector": v, "item": p.item.id, "view": view}));
            }
        }
        c.insert(&uri.collection, vrows)?;
        let irows = batch.iter().map(item_row).collect();
        c.insert(&uri.items(), irows)?;
        done += batch.len();
        if progress {
            eprintln!("{}: wrote {done} of {} images", uri.text, pending.len());
        }
        if let Some(ms) = write_pause_ms() {
            std::thread::sleep(Duration::from_millis(ms));
        }
        i = j;
    }
    Ok(done)
}

fn item_row(p: &Pending) -> Value {
    item_json(&p.item)
}

fn item_json(it: &Item) -> Value {
    let mut it = it.clone();
    it.first = 0;
    json!({"vector": [1.0, 0.0], "item": it.id, "deleted": it.deleted,
        "doc": serde_json::to_string(&it).expect("serialisable (paths as bytes)")})
}

/// Delete the view rows of items `ids`.
fn delete_views(c: &Client, ids: &[u64]) -> Result<()> {
    for chunk in ids.chunks(256) {
        let list: Vec<String> = chunk.iter().map(|i| i.to_string()).collect();
        let rows = c.query(
            &c.uri.collection,
            &format!("item in [{}]", list.join(",")),
            &["id"],
        )?;
        let keys: Vec<i64> = rows.iter().filter_map(pk).collect();
        c.delete_ids(&c.uri.collection, &keys)?;
    }
    Ok(())
}

/// Mark items deleted: a deleted version of each item row is written, the old rows and the
/// views deleted (a deleted version wins when both are read, so an interruption anywhere
/// leaves them deleted).
fn mark_deleted(c: &Client, items: &[Item], keys: &HashMap<u64, Vec<i64>>) -> Result<()> {
    if items.is_empty() {
        return Ok(());
    }
    let rows: Vec<Value> = items
        .iter()
        .map(|it| {
            item_json(&Item {
                deleted: true,
                ..it.clone()
            })
        })
        .collect();
    for c2 in rows.chunks(WRITE_ROWS) {
        c.insert(&c.uri.items(), c2.to_vec())?;
    }
    let old: Vec<i64> = items
        .iter()
        .flat_map(|it| keys.get(&it.id).cloned().unwrap_or_default())
        .collect();
    c.delete_ids(&c.uri.items(), &old)?;
    let ids: Vec<u64> = items.iter().map(|i| i.id).collect();
    delete_views(c, &ids)?;
    // visible before returning: the next run must not see these images alive
    let list: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    let f = format!("item in [{}] and deleted == false", list.join(","));
    c.wait_until("wait for the deletes", || {
        Ok(c.count(&c.uri.items(), &f)? == 0)
    })
}

/// `ehm-retrieve index -i milvus://…`: as `retrieval::add`.
pub fn add(
    root: &Path,
    d: &mut Describer,
    inputs: &[PathBuf],
    o: &BuildOptions,
) -> Result<AddSummary> {
    let t0 = std::time::Instant::now();
    let uri = Uri::parse(root)?;
    let c = Client::new(uri.clone());
    let loaded = load(&c)?;
    if let Some(l) = &loaded {
        let ix = Index::empty(l.meta.clone());
        super::check_same_descriptor(&ix, d, root)?;
        super::check_fixed_settings(&l.meta, o, root)?;
        // views of an interrupted run's images that never got their item row
        let next = l.meta.next_id as i64;
        let orphans = c.query_items_from(&uri.collection, next, 256, &["id"])?;
        if !orphans.is_empty() {
            eprintln!(
                "{}: deleting {} vectors of an interrupted run",
                uri.text,
                orphans.len()
            );
            let keys: Vec<i64> = orphans.iter().filter_map(pk).collect();
            c.delete_ids(&uri.collection, &keys)?;
        }
    } else {
        o.hnsw.validate()?;
    }
    let mut meta = match &loaded {
        Some(l) => l.meta.clone(),
        None => super::new_meta(FORMAT, d, o)?,
    };
    let items = loaded.as_ref().map(|l| l.items.clone()).unwrap_or_default();
    let super::InputPlan {
        todo,
        hashes,
        unchanged,
        replaced_idx,
        mut failed,
    } = super::plan_inputs(inputs, &items);
    let nv = meta.views.len();
    let dim = meta.dim;
    let how = super::indexing(&meta, o);
    let mut pending: Vec<Pending> = Vec::new();
    failed += d.describe(&todo, &how, |r| {
        if let Ok(desc) = r {
            let len = desc.vectors.len();
            if len % dim != 0 || len < nv * dim {
                return Err(Error::Shape(format!(
                    "{}: descriptor has {len} values, expected at least {nv} × {dim}",
                    desc.path.display()
                )));
            }
            pending.push(Pending {
                item: Item {
                    id: 0,
                    sha256: hashes.get(&desc.path).cloned().unwrap_or_default(),
                    bytes: std::fs::metadata(&desc.path).map(|m| m.len()).unwrap_or(0),
                    path: desc.path,
                    width: desc.width,
                    height: desc.height,
                    first: 0,
                    count: len / dim,
                    deleted: false,
                    phash: desc.hashes.first().copied(),
                },
                rows: desc.vectors,
            });
        }
        Ok(())
    })?;
    // a new embed collection learns its centre from its first images, as a local index
    if loaded.is_none() && meta.descriptor == DescriptorKind::Embed && !pending.is_empty() {
        let all: Vec<f32> = pending
            .iter()
            .flat_map(|p| p.rows.iter().copied())
            .collect();
        meta.center = Some(super::index::mean_row(&all, dim));
    }
    // a new collection is created only with its first images: its centre is learned from
    // them and the description cannot change afterwards
    let names = c.list()?;
    if !names.contains(&uri.items()) && !pending.is_empty() {
        c.create(
            &uri.items(),
            2,
            "ehm items of the collection without this suffix",
        )?;
    }
    if loaded.is_none() && !pending.is_empty() {
        let mut m = meta.clone();
        m.next_id = 0;
        c.create(
            &uri.collection,
            dim,
            &serde_json::to_string(&m).expect("serialisable"),
        )?;
    }
    for (id, p) in (meta.next_id..).zip(pending.iter_mut()) {
        if let Some(cen) = &meta.center {
            super::index::center_rows(&mut p.rows, cen);
        }
        p.item.id = id;
    }
    let written = write(&c, dim, &pending, o.progress)?;
    // the next run (or query) must see this one's images, or it would write them again
    if let Some(last) = pending.last() {
        let f = format!("item == {}", last.item.id);
        c.wait_until("wait for the writes", || Ok(c.count(&uri.items(), &f)? > 0))?;
    }
    // a changed file's old entry is retired only when its new version made it in
    let new_paths: std::collections::HashSet<&PathBuf> =
        pending.iter().map(|p| &p.item.path).collect();
    let retire: Vec<Item> = replaced_idx
        .iter()
        .map(|&i| items[i].clone())
        .filter(|it| new_paths.contains(&it.path))
        .collect();
    let replaced = retire.len();
    let keys = loaded.map(|l| l.keys).unwrap_or_default();
    mark_deleted(&c, &retire, &keys)?;
    let live_before = items.iter().filter(|i| !i.deleted).count();
    let deleted_before = items.len() - live_before;
    let vectors_before: usize = items.iter().filter(|i| !i.deleted).map(|i| i.count).sum();
    let secs = t0.elapsed().as_secs_f64();
    Ok(AddSummary {
        added: written - replaced,
        unchanged,
        replaced,
        failed,
        items: live_before + written - replaced,
        deleted: deleted_before + replaced,
        vectors: vectors_before + pending.iter().map(|p| p.item.count).sum::<usize>()
            - retire.iter().map(|i| i.count).sum::<usize>(),
        seconds: secs,
        images_per_s: todo.len() as f64 / secs.max(1e-9),
    })
}

/// `ehm-retrieve remove -i milvus://…`: as `retrieval::remove`.
pub fn remove(root: &Path, paths: &[PathBuf]) -> Result<(usize, Vec<PathBuf>)> {
    let uri = Uri::parse(root)?;
    let c = Client::new(uri.clone());
    let l = load_existing(&c, &uri)?;
    let (mut n, mut missing, mut gone) = (0, Vec::new(), Vec::new());
    for p in paths {
        let cp = canonical(p);
        let hit: Vec<&Item> = l
            .items
            .iter()
            .filter(|it| !it.deleted && (it.path == cp || it.path == *p))
            .collect();
        if hit.is_empty() {
            missing.push(p.clone());
        } else {
            n += 1;
            gone.extend(hit.into_iter().cloned());
        }
    }
    mark_deleted(&c, &gone, &l.keys)?;
    Ok((n, missing))
}

/// `ehm-retrieve export -i LOCAL --to milvus://…`: write a local index's live images (their
/// stored vectors, ids and description) into a new collection, without describing anything
/// again. Returns (images, vectors) written.
pub fn export(local: &Index, to: &Path, progress: bool) -> Result<(usize, usize)> {
    let uri = Uri::parse(to)?;
    let c = Client::new(uri.clone());
    let names = c.list()?;
    if names.contains(&uri.collection) || names.contains(&uri.items()) {
        return Err(Error::Config(format!(
            "{}: the collection exists; export writes a new one (drop it or name another)",
            uri.text
        )));
    }
    let mut meta = local.meta.clone();
    meta.format = FORMAT.into();
    meta.files = Default::default();
    meta.checksum = None;
    let dim = meta.dim;
    let pending: Vec<Pending> = local
        .items
        .iter()
        .filter(|it| !it.deleted)
        .map(|it| Pending {
            item: it.clone(),
            rows: (it.first..it.first + it.count)
                .flat_map(|r| local.vector(r).iter().copied())
                .collect(),
        })
        .collect();
    c.create(
        &uri.items(),
        2,
        "ehm items of the collection without this suffix",
    )?;
    c.create(
        &uri.collection,
        dim,
        &serde_json::to_string(&meta).expect("serialisable"),
    )?;
    let n = write(&c, dim, &pending, progress)?;
    if let Some(last) = pending.last() {
        let f = format!("item == {}", last.item.id);
        c.wait_until("wait for the writes", || Ok(c.count(&uri.items(), &f)? > 0))?;
    }
    Ok((n, pending.iter().map(|p| p.item.count).sum()))
}
