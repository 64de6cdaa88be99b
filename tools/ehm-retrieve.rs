//! ehm-retrieve: partial-duplicate image search on an HNSW index — index, query, remove,
//! compact, dedup, info. A thin front over `ehm_core::retrieval`.
use clap::{Args, Parser, Subcommand};
use ehm_core::args;
use ehm_core::infer::Parallelism;
use ehm_core::output::csv_row;
use ehm_core::pipeline::{expand_inputs, Format, ViewSize};
use ehm_core::retrieval::descriptor::{Describer, DescriptorKind, Regions};
use ehm_core::retrieval::hnsw::HnswParams;
use ehm_core::retrieval::index::Index;
use ehm_core::retrieval::{self, AskedSettings, BuildOptions, Searcher};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "ehm-retrieve",
    version,
    about = "Find cropped, rotated, recompressed, overlaid copies of images: an HNSW index of ehm embeddings (or pHash)",
    after_help = "Exit status: 0 success, 1 some inputs failed (each reported on stderr), 2 usage, model or index error."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args)]
struct Common {
    /// Index folder, or a Milvus collection: milvus://HOST:PORT/COLLECTION (docs/retrieve.md)
    #[arg(long, short)]
    index: PathBuf,
    /// Threads for decoding and for inference (each)
    #[arg(long, default_value_t = std::thread::available_parallelism().map_or(1, |n| n.get()), value_parser = args::at_least_one)]
    threads: usize,
    /// ONNX Runtime sessions sharing each batch (default: one single-threaded session per
    /// thread; 1 = one session on all threads, best for a single query image)
    #[arg(long, value_parser = args::at_least_one)]
    sessions: Option<usize>,
}

/// Options of the commands that change the index.
#[derive(Args)]
struct Writing {
    /// If another run is writing the index, wait for it to finish (default: fail at once)
    #[arg(long)]
    wait: bool,
}

/// Options of the commands that read images.
#[derive(Args)]
struct Reading {
    /// Largest image file read, in MB (larger files are failed inputs)
    #[arg(long, default_value_t = ehm_core::files::DEFAULT_MAX_INPUT_MB, value_parser = clap::value_parser!(u64).range(1..))]
    max_file_mb: u64,
}

/// Exact-copy evidence besides the embedding.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ExactCopies {
    /// An image whose pHash is within 8 of 64 bits of the query's (or a query window's) is
    /// matched with at least that similarity (1 − 2·bits/64), whatever the embedding says:
    /// tiny thumbnails and re-encodings are never lost (embed indexes built since 2026-12)
    Phash,
    /// The embedding alone
    Off,
}

/// What scores (and thresholds) mean.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ScoreKind {
    /// 1 − (1 − cosine)/(1 − b), b the background level (the mean cosine of the 11th–20th
    /// images of the query, or of each query window before windows are merged): how far a
    /// match stands above images that are surely not copies. One threshold keeps about one
    /// precision across queries (docs/retrieve.md has the measured curve); collections under
    /// 11 images have no background and score raw
    Normalised,
    /// Cosine similarity of the best-matching view pair (pHash: 1 − 2·bits/64)
    Raw,
}

#[derive(Args)]
struct Scoring {
    #[arg(long, value_enum, default_value_t = ScoreKind::Normalised)]
    scores: ScoreKind,
}

#[derive(Args)]
struct Exact {
    #[arg(long, value_enum, default_value_t = ExactCopies::Phash)]
    exact_copies: ExactCopies,
}

#[derive(Args)]
struct Verify {
    /// Verify each query's best N matches by matching their patch tokens (mutual nearest
    /// neighbours + one geometric transform): a copy's score rises with its inliers, nothing
    /// falls; the JSON says where the copy sits in the query. Costs one model run per
    /// candidate not seen before (the indexed files must still be there) plus ~1 ms per pair;
    /// needs an embed model with a patch_tokens output. 0: off
    #[arg(long, default_value_t = 0)]
    verify: usize,
}

#[derive(Subcommand)]
enum Cmd {
    /// Add images to the index (created on first use); re-running adds only new or changed files
    Index {
        #[command(flatten)]
        c: Common,
        #[command(flatten)]
        w: Writing,
        #[command(flatten)]
        r: Reading,
        /// Embed model (ehm-export onnx --task embed); required for a new embed index
        #[arg(long, short)]
        model: Option<PathBuf>,
        /// Descriptor of a new index [default: embed]. This and the five settings below are
        /// fixed when the index is created; an existing index refuses other values
        #[arg(long, value_enum)]
        descriptor: Option<DescriptorKind>,
        /// Regional views per indexed image; they let crops find their original [default: standard]
        #[arg(long, value_enum)]
        regions: Option<Regions>,
        /// Size the regional views run at: `input` upsamples every crop to the model's size;
        /// `fit` runs a crop at the size it has in the whole image (a 60 % crop at 126² instead
        /// of 224²), for models that take any input size (adopted DINOv2): ≈ 2× faster
        /// indexing, but small crops of the query are found less well (docs/retrieve.md)
        /// [default: input]
        #[arg(long, value_enum)]
        view_size: Option<ViewSize>,
        /// HNSW links per node, 2 … 255 [default: 16]
        #[arg(long)]
        m: Option<usize>,
        /// HNSW build breadth [default: 200]
        #[arg(long)]
        ef_construction: Option<usize>,
        /// Default search breadth of queries [default: 64]
        #[arg(long)]
        ef_search: Option<usize>,
        /// Images per inference call
        #[arg(long, default_value_t = 32, value_parser = args::at_least_one)]
        batch: usize,
        #[arg(long)]
        json: bool,
        /// Image files, folders (recursive), globs, or - for paths on stdin
        #[arg(required = true)]
        inputs: Vec<std::ffi::OsString>,
    },
    /// Find the indexed images that each query image is a (partial) copy of
    Query {
        #[command(flatten)]
        c: Common,
        #[command(flatten)]
        r: Reading,
        /// The index's model, if it moved (must be the same file content)
        #[arg(long, short)]
        model: Option<PathBuf>,
        /// Matches per query image
        #[arg(long, short, default_value_t = 10, value_parser = args::at_least_one)]
        k: usize,
        /// Only matches with at least this score (-1 … 1; see --scores)
        #[arg(long, default_value_t = -1.0, value_parser = args::cosine, allow_negative_numbers = true)]
        threshold: f32,
        #[command(flatten)]
        scoring: Scoring,
        /// Search breadth (default: the index's)
        #[arg(long, value_parser = args::at_least_one)]
        ef: Option<usize>,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// Also search with windows of each query, for a copy that is only part of it (pasted
        /// into another picture, one cell of a collage): none (the whole query: 1 model run),
        /// standard (+5 crops of 60 %: 6 runs), dense (+ 9 of 40 %: 15 runs), auto (standard +
        /// up to 10 rectangles found in the query: 6 … 16 runs). Results merged per image
        /// (best window); the summary on stderr says what it cost
        #[arg(long, value_enum, default_value_t = Regions::Auto)]
        query_regions: Regions,
        #[command(flatten)]
        x: Exact,
        #[command(flatten)]
        v: Verify,
        /// Also write an HTML match sheet: each query with the window and verified region where
        /// the copy sits, and its matches
        #[arg(long)]
        report: Option<PathBuf>,
        #[arg(required = true)]
        inputs: Vec<std::ffi::OsString>,
    },
    /// Mark images deleted (they stop appearing in results; `compact` drops them for good)
    Remove {
        #[command(flatten)]
        c: Common,
        #[command(flatten)]
        w: Writing,
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Rewrite the index without deleted images
    Compact {
        #[command(flatten)]
        c: Common,
        #[command(flatten)]
        w: Writing,
    },
    /// Groups of duplicates within the indexed collection
    Dedup {
        #[command(flatten)]
        c: Common,
        /// Score from which two images are duplicates (-1 … 1; see --scores; the default is the
        /// benchmark's 95 %-precision point, docs/retrieve.md)
        #[arg(long, value_parser = args::cosine, allow_negative_numbers = true)]
        threshold: Option<f32>,
        #[command(flatten)]
        scoring: Scoring,
        /// Also write an HTML page with thumbnails
        #[arg(long)]
        report: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Build the partial-duplicate benchmark from the registry photos (attacked copies + ground truth)
    MakeBench {
        #[arg(long, short)]
        out: PathBuf,
        /// Photos that get attacked copies (the rest are distractors)
        #[arg(long, default_value_t = 100, value_parser = args::at_least_one)]
        originals: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Score an index (built over the benchmark's database.txt) on the benchmark's queries
    Eval {
        #[command(flatten)]
        c: Common,
        #[arg(long)]
        bench: PathBuf,
        #[arg(long, short)]
        model: Option<PathBuf>,
        #[arg(long, value_parser = args::at_least_one)]
        ef: Option<usize>,
        /// Query windows, as `query --query-regions`
        #[arg(long, value_enum, default_value_t = Regions::Auto)]
        query_regions: Regions,
        /// Also draw the precision–recall curves (raw and normalised scores) to this PNG
        #[arg(long)]
        pr_curve: Option<PathBuf>,
        #[command(flatten)]
        x: Exact,
        #[command(flatten)]
        v: Verify,
        /// The ranking scored (µAP and curves are reported for both)
        #[command(flatten)]
        scoring: Scoring,
        #[arg(long)]
        json: bool,
    },
    /// Copy a local index into a new Milvus collection (stored vectors: nothing is embedded again)
    Export {
        #[command(flatten)]
        c: Common,
        /// The new collection: milvus://HOST:PORT/COLLECTION
        #[arg(long)]
        to: PathBuf,
    },
    /// Run a local Milvus server (tools/setup.sh milvus) on loopback until interrupted; prints
    /// its address (milvus://127.0.0.1:PORT) on stdout once it is healthy
    MilvusServer {
        /// Folder for its config, logs and data (default: a temporary one, removed at the end);
        /// the same folder again serves the same collections
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// What the index holds
    Info {
        #[command(flatten)]
        c: Common,
    },
}

fn out_err(e: std::io::Error) -> ehm_core::Error {
    ehm_core::pipeline::stdout_error(e)
}

fn run(cli: Cli) -> ehm_core::Result<usize> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    match cli.cmd {
        Cmd::Index { c, w, r, model, descriptor, regions, view_size, m, ef_construction, ef_search, batch, json, inputs } => {
            ehm_core::files::set_max_input_mb(r.max_file_mb);
            let asked = AskedSettings { descriptor, regions, view_size, m, ef_construction, ef_search };
            let hnsw = HnswParams { m: m.unwrap_or(16), ef_construction: ef_construction.unwrap_or(200), ef_search: ef_search.unwrap_or(64) };
            // before any work: a bad value must not cost an hour of embedding
            hnsw.validate()?;
            let (paths, problems) = expand_inputs(&inputs)?;
            for p in &problems {
                eprintln!("skipped: {p}");
            }
            let par = Parallelism::split(c.threads, c.sessions);
            let mut d = if Index::exists(&c.index) {
                let ix = Index::open(&c.index)?;
                match model.as_deref() {
                    Some(mp) if ix.meta.descriptor == DescriptorKind::Embed => Describer::embed(mp, par)?,
                    _ => retrieval::describer_for(&ix, &c.index, None, par)?,
                }
            } else {
                match descriptor.unwrap_or(DescriptorKind::Embed) {
                    DescriptorKind::Phash => Describer::phash(),
                    DescriptorKind::Embed => {
                        let mp = model.ok_or_else(|| ehm_core::Error::Config("a new embed index needs --model EMBED.onnx (or --descriptor phash)".into()))?;
                        Describer::embed(&mp, par)?
                    }
                }
            };
            let o = BuildOptions { regions: regions.unwrap_or(Regions::Standard), hnsw, asked, batch, threads: c.threads, progress: true, wait: w.wait };
            let s = retrieval::add(&c.index, &mut d, &paths, &o)?;
            if json {
                writeln!(out, "{}", serde_json::to_string(&s).unwrap()).map_err(out_err)?;
            } else {
                writeln!(
                    out,
                    "{}: added {}, replaced {}, unchanged {}, failed {} — now {} images ({} deleted), {} vectors; {:.1} s ({:.1} images/s)",
                    c.index.display(), s.added, s.replaced, s.unchanged, s.failed, s.items, s.deleted, s.vectors, s.seconds, s.images_per_s
                )
                .map_err(out_err)?;
            }
            Ok(s.failed + problems.len())
        }
        Cmd::Query { c, r, model, k, threshold, scoring, ef, format, query_regions, x: Exact { exact_copies }, v: Verify { verify }, report, inputs } => {
            ehm_core::files::set_max_input_mb(r.max_file_mb);
            let ix = Index::open(&c.index)?;
            let mut d = retrieval::describer_for(&ix, &c.index, model.as_deref(), Parallelism::split(c.threads, c.sessions))?;
            let (paths, problems) = expand_inputs(&inputs)?;
            for p in &problems {
                eprintln!("skipped: {p}");
            }
            let ef = ef.unwrap_or(ix.meta.hnsw.ef_search);
            let s = Searcher::new(&ix).normalised(scoring.scores == ScoreKind::Normalised);
            let t0 = std::time::Instant::now();
            let how = retrieval::QueryOptions { regions: query_regions, exact_copies: exact_copies == ExactCopies::Phash, verify, threads: c.threads, progress: true };
            if format == Format::Csv {
                out.write_all(csv_row(&["query", "rank", "path", "score", "id"]).as_bytes()).map_err(out_err)?;
            }
            let (mut n, mut windows, mut verify_ms) = (0usize, 0usize, 0f64);
            let mut sheet = Vec::new();
            let failed = retrieval::run_queries(&ix, &mut d, &s, &paths, &how, (k, ef, threshold), |r| {
                let Ok(r) = r else { return Ok(()) };
                (n, windows, verify_ms) = (n + 1, windows + r.query.views.len(), verify_ms + r.verify_ms);
                let (q, matches) = (&r.query, &r.matches);
                match format {
                    Format::Jsonl => writeln!(out, "{}", serde_json::json!({"query": q.path.to_string_lossy(), "matches": matches})).map_err(out_err)?,
                    Format::Csv => {
                        for (i, m) in matches.iter().enumerate() {
                            let row = [q.path.to_string_lossy().into_owned(), (i + 1).to_string(), m.path.to_string_lossy().into_owned(), format!("{:.6}", m.score), m.id.to_string()];
                            out.write_all(csv_row(&row).as_bytes()).map_err(out_err)?
                        }
                    }
                    Format::Table => {
                        writeln!(out, "{}", q.path.display()).map_err(out_err)?;
                        if matches.is_empty() {
                            writeln!(out, "    (no match)").map_err(out_err)?;
                        }
                        for (i, m) in matches.iter().enumerate() {
                            let v = m.verification.map(|v| format!("  [{} inliers of {} pairs]", v.inliers, v.pairs)).unwrap_or_default();
                            writeln!(out, "  {:>2}. {:.4}  {}{v}", i + 1, m.score, m.path.display()).map_err(out_err)?
                        }
                    }
                }
                if report.is_some() {
                    sheet.push((q.path.clone(), r.matches));
                }
                Ok(())
            })?;
            let verified = if verify > 0 { format!(", {verify} best verified ({:.0} ms per query)", verify_ms / n.max(1) as f64) } else { String::new() };
            eprintln!(
                "{n} queries, {windows} windows described and searched ({:.1} per query){verified}, {:.1} s",
                windows as f64 / n.max(1) as f64,
                t0.elapsed().as_secs_f64()
            );
            if let Some(p) = &report {
                let html = retrieval::report::match_sheet_html(&c.index.display().to_string(), &sheet);
                ehm_core::files::write_atomic(p, html.as_bytes())?;
                eprintln!("match sheet: {}", p.display());
            }
            Ok(failed + problems.len())
        }
        Cmd::Remove { c, w, paths } => {
            let (n, missing) = retrieval::remove(&c.index, &paths, w.wait)?;
            for p in &missing {
                eprintln!("not in the index: {}", p.display());
            }
            writeln!(out, "{}: marked {n} image(s) deleted", c.index.display()).map_err(out_err)?;
            Ok(missing.len())
        }
        Cmd::Compact { c, w } => {
            let (kept, dropped) = retrieval::compact(&c.index, w.wait)?;
            writeln!(out, "{}: kept {kept} images, dropped {dropped} deleted", c.index.display()).map_err(out_err)?;
            Ok(0)
        }
        Cmd::Dedup { c, threshold, scoring, report, format } => {
            let ix = Index::open(&c.index)?;
            let normalised = scoring.scores == ScoreKind::Normalised;
            let threshold = threshold.unwrap_or(retrieval::default_dedup_threshold(ix.meta.descriptor, normalised));
            let groups = retrieval::dedup(&c.index, threshold, normalised, ix.meta.hnsw.ef_search)?;
            match format {
                Format::Jsonl => {
                    for g in &groups {
                        writeln!(out, "{}", serde_json::json!({"group": g})).map_err(out_err)?
                    }
                }
                Format::Csv => {
                    out.write_all(csv_row(&["group", "path", "score", "id"]).as_bytes()).map_err(out_err)?;
                    for (n, g) in groups.iter().enumerate() {
                        for m in g {
                            let row = [(n + 1).to_string(), m.path.to_string_lossy().into_owned(), format!("{:.6}", m.score), m.id.to_string()];
                            out.write_all(csv_row(&row).as_bytes()).map_err(out_err)?
                        }
                    }
                }
                Format::Table => {
                    for (n, g) in groups.iter().enumerate() {
                        writeln!(out, "group {} ({} images)", n + 1, g.len()).map_err(out_err)?;
                        for m in g {
                            writeln!(out, "    {:.4}  {}", m.score, m.path.display()).map_err(out_err)?
                        }
                    }
                    writeln!(out, "{} groups at threshold {threshold}", groups.len()).map_err(out_err)?;
                }
            }
            if let Some(r) = report {
                let html = retrieval::report::dedup_html(&c.index.display().to_string(), threshold, &groups);
                ehm_core::files::write_atomic(&r, html.as_bytes())?;
                eprintln!("report: {}", r.display());
            }
            Ok(0)
        }
        Cmd::MakeBench { out: dir, originals, seed } => {
            let cache = ehm_core::files::cache_dir();
            let photos = ehm_core::data::photos::collect(&cache)?;
            let stamps = ehm_core::data::segdata::stamps_dir(&cache);
            let s = retrieval::benchmark::make_bench(&photos, &stamps, &dir, originals, seed)?;
            writeln!(
                out,
                "wrote {} queries ({} originals × {} attack families) to {}; database: {} of {} photos (near-duplicates and {} collage backgrounds dropped) listed in {}",
                s.queries,
                s.originals,
                retrieval::benchmark::FAMILIES.len(),
                dir.join("queries").display(),
                s.database,
                s.photos,
                retrieval::benchmark::BACKGROUNDS,
                dir.join("database.txt").display()
            )
            .map_err(out_err)?;
            Ok(0)
        }
        Cmd::Eval { c, bench, model, ef, query_regions, pr_curve, x, v: Verify { verify }, scoring, json } => {
            let ix = Index::open(&c.index)?;
            let ef = ef.unwrap_or(ix.meta.hnsw.ef_search);
            let exact = x.exact_copies == ExactCopies::Phash;
            let how = retrieval::QueryOptions { regions: query_regions, exact_copies: exact, verify, threads: c.threads, progress: true };
            let r = retrieval::benchmark::evaluate(&c.index, &bench, model.as_deref(), ef, &how, scoring.scores == ScoreKind::Normalised)?;
            if let Some(p) = &pr_curve {
                let title = format!("{} on {}", c.index.display(), bench.display());
                retrieval::report::pr_curve_png(&title, &r.curves, p)?;
                eprintln!("precision-recall curves: {}", p.display());
            }
            if json {
                writeln!(out, "{}", serde_json::to_string(&r).unwrap()).map_err(out_err)?;
            } else {
                writeln!(out, "{:<12} {:>7} {:>7} {:>7} {:>7}", "family", "queries", "mAP", "R@1", "R@10").map_err(out_err)?;
                for (f, s) in r.per_family.iter().chain(std::iter::once((&"overall".to_string(), &r.overall))) {
                    writeln!(out, "{f:<12} {:>7} {:>7.3} {:>7.3} {:>7.3}", s.queries, s.map, s.recall_at_1, s.recall_at_10).map_err(out_err)?;
                }
                let (ver_ms, ver_region) = match verify {
                    0 => (String::new(), String::new()),
                    _ => (format!("; verification p50 {:.1} ms", r.verify_ms_p50), format!(", by the verified region {:.3}", r.region_verified)),
                };
                writeln!(
                    out,
                    "µAP {:.3}; HNSW recall@10 vs exact {:.4}; search p50 {:.2} ms, p99 {:.2} ms{ver_ms}; part-of-query copies framed by a window {:.3}, located by the matching window {:.3}{ver_region}",
                    r.micro_ap, r.hnsw_recall_at_10, r.query_ms_p50, r.query_ms_p99, r.region_framed, r.region_located
                )
                .map_err(out_err)?;
            }
            Ok(0)
        }
        Cmd::Export { c, to } => {
            if retrieval::milvus::is_uri(&c.index) {
                return Err(ehm_core::Error::Config(format!("{}: export reads a local index folder", c.index.display())));
            }
            let ix = Index::open(&c.index)?;
            let (n, v) = retrieval::milvus::export(&ix, &to, true)?;
            writeln!(out, "{}: exported {n} images, {v} vectors to {}", c.index.display(), to.display()).map_err(out_err)?;
            Ok(0)
        }
        Cmd::MilvusServer { dir } => {
            use retrieval::milvus::server::MilvusServer;
            let mut srv = match &dir {
                Some(d) => {
                    std::fs::create_dir_all(d).map_err(|e| ehm_core::Error::io(d, e))?;
                    MilvusServer::start_in(d, None)?
                }
                None => MilvusServer::start()?,
            };
            writeln!(out, "milvus://127.0.0.1:{}", srv.port).map_err(out_err)?;
            out.flush().map_err(out_err)?;
            eprintln!("Milvus server running (data and logs: {}); Ctrl-C or SIGTERM stops it", srv.dir().display());
            stop_on_signal();
            while !STOP.load(std::sync::atomic::Ordering::SeqCst) {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            srv.stop();
            Ok(0)
        }
        Cmd::Info { c } => {
            let ix = Index::open(&c.index)?;
            let mut meta = serde_json::to_value(&ix.meta).unwrap();
            meta.as_object_mut().unwrap().remove("files");
            writeln!(out, "{}", serde_json::to_string_pretty(&meta).unwrap()).map_err(out_err)?;
            Ok(0)
        }
    }
    .and_then(|n| {
        out.flush().map_err(out_err)?;
        Ok(n)
    })
}

/// Set by SIGINT / SIGTERM: `milvus-server` stops its server before it exits.
static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, std::sync::atomic::Ordering::SeqCst);
}

fn stop_on_signal() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

fn main() -> ExitCode {
    // `tool … | head` closes stdout early: stop quietly like other Unix tools
    ehm_core::pipeline::exit_quietly_on_broken_pipe();
    ehm_core::pipeline::exit_status("ehm-retrieve", run(Cli::parse()))
}
