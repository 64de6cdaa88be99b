//! The inference pipeline the tools share: expand INPUTS (files, folders, globs, `-` for paths
//! on stdin), decode + EXIF-orient + resize + normalise on a thread pool one batch ahead of the
//! model, run batches through ONNX Runtime, hand results back in input order. Memory stays
//! bounded: at most two prepared batches exist at a time. A file that cannot be read is
//! reported (one line) and skipped; the rest go on.
use crate::data::image_io::{has_image_extension, load_rgb};
use crate::data::Preprocess;
use crate::error::{Error, Result};
use crate::infer::{OrtModel, Tensor};
use image::RgbImage;
use rayon::prelude::*;
use std::io::BufRead;
use std::path::PathBuf;

/// Output format of the tools.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum Format {
    /// Aligned columns for people
    Table,
    /// One JSON object per line
    Jsonl,
    /// Comma-separated values with a header
    Csv,
}

/// Inputs as given on the command line, expanded: `(images in order, problems)`. A problem is a
/// one-line message (missing path, glob without matches, folder without images). Paths are
/// taken as bytes (a file name need not be UTF-8); `-` reads one path per line from stdin.
pub fn expand_inputs<S: AsRef<std::ffi::OsStr>>(
    inputs: &[S],
) -> Result<(Vec<PathBuf>, Vec<String>)> {
    use std::os::unix::ffi::OsStrExt;
    let (mut paths, mut problems) = (Vec::new(), Vec::new());
    let mut add = |p: PathBuf, explicit: bool, problems: &mut Vec<String>| {
        if p.is_dir() {
            match crate::data::folder::list_images(&p) {
                Ok(v) if v.is_empty() => {
                    problems.push(format!("{}: no images in this folder", p.display()))
                }
                Ok(v) => paths.extend(v),
                Err(e) => problems.push(e.to_string()),
            }
        } else if p.exists() {
            if explicit || has_image_extension(&p) {
                paths.push(p);
            }
        } else {
            problems.push(format!("{}: no such file or folder", p.display()));
        }
    };
    for arg in inputs {
        let arg = arg.as_ref();
        let pattern = arg
            .to_str()
            .filter(|a| a.contains(['*', '?', '[']) && !std::path::Path::new(a).exists());
        if arg == "-" {
            for line in std::io::stdin().lock().split(b'\n') {
                let line =
                    line.map_err(|e| Error::Other(format!("reading paths from stdin: {e}")))?;
                let t = line.trim_ascii();
                if !t.is_empty() {
                    add(
                        PathBuf::from(std::ffi::OsStr::from_bytes(t)),
                        true,
                        &mut problems,
                    );
                }
            }
        } else if let Some(pattern) = pattern {
            let matches: Vec<PathBuf> = glob::glob(pattern)
                .map_err(|e| Error::Config(format!("bad glob {pattern}: {e}")))?
                .filter_map(|r| r.ok())
                .collect();
            if matches.is_empty() {
                problems.push(format!("{pattern}: the pattern matches nothing"));
            }
            for m in matches {
                add(m, false, &mut problems);
            }
        } else {
            add(PathBuf::from(arg), true, &mut problems);
        }
    }
    Ok((paths, problems))
}

/// A view of an image as fractions of its width and height: (left, top, width, height).
pub type View = [f32; 4];

/// The whole image.
pub const FULL: View = [0.0, 0.0, 1.0, 1.0];

/// At what size a view other than the whole image is run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum ViewSize {
    /// At the model's input size: a 60 % crop is upsampled to the full size.
    #[default]
    Input,
    /// At the size the view has in the whole image at the model's input size, in whole
    /// patches (`fit_size`, `FitRounding`): a 60 % crop of a 224² ViT-S/14 input runs at 126²
    /// (140² in older indexes), ≈ 0.3 of the work. Only models that take any input size
    /// (`ModelContract::any_input_size`) can.
    Fit,
}

/// How a fitted view's side is rounded to whole patches. An index records the rule its views
/// ran under, so the images added to it later (and its queries' rescaled whole images) run at
/// the same sizes as the first ones.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FitRounding {
    /// To the nearest patch: a 60 % crop of a 224² ViT-S/14 input (9.6 patches) runs at 140²,
    /// slightly upsampled. Indexes made before the rule was recorded.
    #[default]
    Nearest,
    /// Down: a view never gets more pixels than it has in the whole image at the input size
    /// (the 60 % crop at 126², 81 tokens instead of 100: ≈ 13 % fewer tokens per image with
    /// `standard` regions).
    Down,
}

/// Fewest patches a side of a fitted view gets (smaller windows are upsampled to this).
const FIT_MIN_PATCHES: f32 = 4.0;

/// The side a view runs at under `ViewSize::Fit`: its geometric-mean side at the input size
/// `image_size`, rounded to a multiple of `patch` by `rounding`, at least `FIT_MIN_PATCHES`
/// patches and at most the input size.
pub fn fit_size(v: &View, image_size: u32, patch: u32, rounding: FitRounding) -> u32 {
    let side = (v[2] * v[3]).max(0.0).sqrt() * image_size as f32;
    let patches = side / patch as f32;
    let patches = match rounding {
        FitRounding::Nearest => patches.round(),
        // a hair of slack so a side of exactly n patches, computed in f32, stays n
        FitRounding::Down => (patches + 1e-4).floor(),
    };
    (patches.max(FIT_MIN_PATCHES) as u32 * patch).min(image_size)
}

/// One decoded, preprocessed image.
pub struct Prepared {
    pub path: PathBuf,
    /// CHW fp32, one `3 × S × S` tensor per view in `views` order (S: `sizes`).
    pub pixels: Vec<f32>,
    /// The side S each view was prepared at (the model's input size unless `ViewSize::Fit`).
    pub sizes: Vec<u32>,
    /// The views this image was run as: `RunOptions::views`, then its own extra windows.
    pub views: Vec<View>,
    /// `RunOptions::view_hash` of each view (empty when not asked for).
    pub hashes: Vec<u64>,
    /// The oriented image (kept only when the tool asked for it, e.g. for overlays).
    pub image: Option<RgbImage>,
    pub width: u32,
    pub height: u32,
}

/// What one batch of the run gives the tool: each input's result in order.
pub enum Item<'a> {
    Done {
        prepared: Prepared,
        /// This image's slice of the model output (`views` rows).
        output: &'a [f32],
        /// The output shape without the batch dimension.
        shape: &'a [usize],
        /// This image's slice of the `patch_tokens` output (`views × P × D`) when
        /// `RunOptions::patch_tokens` asked for it, else empty.
        tokens: &'a [f32],
    },
    Failed {
        path: PathBuf,
        error: String,
    },
}

/// Options of a pipeline run.
pub struct RunOptions {
    pub batch: usize,
    /// Threads decoding the next batch (ONNX Runtime's threads are set when the model is
    /// opened: `infer::Parallelism`).
    pub threads: usize,
    pub keep_images: bool,
    /// The views each image is run as (usually just `FULL`).
    pub views: Vec<View>,
    /// More views chosen per image from its pixels (e.g. the rectangles a collage is made
    /// of), after `views`; the model runs them in the same batch.
    pub extra_views: Option<ViewFinder>,
    /// A 64-bit fingerprint of the views' pixels (e.g. pHash), computed while the decoded
    /// image is at hand: of the whole image (`HashViews::Whole`) or of every view.
    pub view_hash: Option<(ViewHash, HashViews)>,
    /// Progress bar on stderr (shown when there are more inputs than a screenful).
    pub progress: bool,
    /// Also read the model's `patch_tokens` output (embed models that have it).
    pub patch_tokens: bool,
    /// At what size views other than the whole image run. `Fit` needs a model that takes any
    /// input size and is taken as `Input` with patch tokens (whose grid must be the model's).
    pub view_size: ViewSize,
    /// Also run the whole image at the fitted size of a crop of this side (a fraction of the
    /// image's), as one more view after the others: a query of an index built with `Fit` then
    /// meets the index's crops at their scale (a 60 % crop ran at 126², not 224²). Only for a
    /// model that takes any input size, and not with patch tokens (their grid must be the
    /// model's); otherwise ignored.
    pub rescaled_whole: Option<f32>,
    /// How fitted sides (`view_size` `Fit`, `rescaled_whole`) round to whole patches.
    pub fit_rounding: FitRounding,
}

/// Run `paths` through `model`'s main output, calling `each` in input order. Returns the
/// number of failed inputs.
pub fn run<F>(model: &mut OrtModel, paths: &[PathBuf], o: &RunOptions, mut each: F) -> Result<usize>
where
    F: FnMut(Item) -> Result<()>,
{
    let pre: Preprocess = model.contract.config.preprocess.clone();
    let output = model.contract.task.output();
    let mut outputs = vec![output];
    if o.patch_tokens {
        if !model.contract.has_patch_tokens() {
            return Err(Error::bad_file(
                &model.path,
                "no patch_tokens output (a file from before it existed: add it with `ehm-export patch-tokens`)",
            ));
        }
        outputs.push(crate::contract::PATCH_TOKENS);
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(o.threads.max(1))
        .build()
        .map_err(|e| Error::Other(e.to_string()))?;
    let bar = crate::progress::inputs_bar(paths.len(), o.progress);
    let (tx, rx) =
        crossbeam_channel::bounded::<Vec<std::result::Result<Prepared, (PathBuf, String)>>>(1);
    let batch = o.batch.max(1);
    let keep = o.keep_images;
    let views: &[View] = if o.views.is_empty() {
        &[FULL]
    } else {
        &o.views
    };
    let (extra, hash) = (o.extra_views, o.view_hash);
    let fit = match o.view_size {
        ViewSize::Fit if !model.contract.any_input_size => {
            return Err(Error::bad_file(
                &model.path,
                "the model takes only its own input size, so views cannot run at a fitted size",
            ))
        }
        ViewSize::Fit => (!o.patch_tokens).then_some(Fitting {
            patch: model.contract.config.patch_size,
            rounding: o.fit_rounding,
        }),
        ViewSize::Input => None,
    };
    let rescaled = o
        .rescaled_whole
        .filter(|_| model.contract.any_input_size && !o.patch_tokens)
        .map(|f| {
            let patch = model.contract.config.patch_size;
            fit_size(&[0.0, 0.0, f, f], pre.image_size, patch, o.fit_rounding)
        });
    let mut failed = 0;
    std::thread::scope(|scope| -> Result<()> {
        let pre = &pre;
        scope.spawn(move || {
            for chunk in paths.chunks(batch) {
                let prepared: Vec<_> = pool.install(|| {
                    chunk
                        .par_iter()
                        .map(|p| {
                            prepare(p, pre, keep, (views, extra, fit, rescaled), hash)
                                .map_err(|e| (p.clone(), e.to_string()))
                        })
                        .collect()
                });
                if tx.send(prepared).is_err() {
                    return;
                }
            }
        });
        for items in rx.iter() {
            let ok: Vec<&Prepared> = items.iter().filter_map(|r| r.as_ref().ok()).collect();
            let results = if ok.is_empty() {
                vec![(vec![0], vec![]); outputs.len()]
            } else {
                run_by_size(model, &ok, &outputs)?
            };
            let (shape, values) = &results[0];
            let (tokens, per_view_tokens) = match results.get(1) {
                Some((sh, v)) => (&v[..], sh.iter().skip(1).product::<usize>()),
                None => (&[][..], 0),
            };
            let row: usize = shape.iter().skip(1).product::<usize>();
            let (mut k, mut t) = (0, 0);
            for r in items {
                bar.inc(1);
                match r {
                    Ok(prepared) => {
                        let n = prepared.views.len() * row;
                        let out = &values[k..k + n];
                        k += n;
                        let nt = prepared.views.len() * per_view_tokens;
                        let tok = &tokens[t..t + nt];
                        t += nt;
                        each(Item::Done {
                            prepared,
                            output: out,
                            shape: &shape[1..],
                            tokens: tok,
                        })?;
                    }
                    Err((path, error)) => {
                        failed += 1;
                        bar.suspend(|| eprintln!("skipped: {error}"));
                        each(Item::Failed { path, error })?;
                    }
                }
            }
        }
        Ok(())
    })?;
    bar.finish_and_clear();
    Ok(failed)
}

/// The rows of `ok` (every view of every image) through the model, one call per size; the
/// outputs joined in row order.
fn run_by_size(model: &mut OrtModel, ok: &[&Prepared], outputs: &[&str]) -> Result<Vec<Tensor>> {
    let mut rows: Vec<(u32, &[f32])> = Vec::new();
    for p in ok {
        let mut at = 0;
        for &s in &p.sizes {
            let len = 3 * (s as usize).pow(2);
            rows.push((s, &p.pixels[at..at + len]));
            at += len;
        }
    }
    let mut sizes: Vec<u32> = rows.iter().map(|r| r.0).collect();
    sizes.sort_unstable_by(|a, b| b.cmp(a));
    sizes.dedup();
    if let [s] = sizes[..] {
        let px: Vec<f32> = rows.iter().flat_map(|r| r.1.iter().copied()).collect();
        return model.run_outputs_at(&px, rows.len(), s, outputs);
    }
    // several sizes: each output row goes back to its place; rows must agree in shape
    let mut joined: Vec<(Vec<usize>, Vec<Vec<f32>>)> =
        vec![(Vec::new(), vec![Vec::new(); rows.len()]); outputs.len()];
    for s in sizes {
        let at: Vec<usize> = (0..rows.len()).filter(|&i| rows[i].0 == s).collect();
        let px: Vec<f32> = at.iter().flat_map(|&i| rows[i].1.iter().copied()).collect();
        for ((shape, values), (joint, slots)) in model
            .run_outputs_at(&px, at.len(), s, outputs)?
            .into_iter()
            .zip(&mut joined)
        {
            if !joint.is_empty() && joint[1..] != shape[1..] {
                return Err(Error::Shape(format!(
                    "{}: output rows of shape {:?} at {s}² but {:?} at another size",
                    model.path.display(),
                    &shape[1..],
                    &joint[1..]
                )));
            }
            *joint = shape.clone();
            let row: usize = shape[1..].iter().product();
            for (&i, v) in at.iter().zip(values.chunks(row.max(1))) {
                slots[i] = v.to_vec();
            }
        }
    }
    Ok(joined
        .into_iter()
        .map(|(mut shape, slots)| {
            shape[0] = slots.len();
            (shape, slots.concat())
        })
        .collect())
}

/// A 64-bit fingerprint of an image's pixels (e.g. pHash).
pub type ViewHash = fn(&RgbImage) -> u64;

/// Which views `RunOptions::view_hash` fingerprints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HashViews {
    /// The whole image only (an index keeps one pHash per image).
    Whole,
    /// Every view (a query's windows each look for an exact copy).
    Every,
}

/// What chooses an image's extra windows from its pixels (`RunOptions::extra_views`).
pub type ViewFinder = fn(&RgbImage) -> Vec<View>;

/// How views other than the whole image are sized under `ViewSize::Fit` (`fit_size`).
#[derive(Clone, Copy)]
struct Fitting {
    patch: u32,
    rounding: FitRounding,
}

fn prepare(
    path: &std::path::Path,
    pre: &Preprocess,
    keep: bool,
    (views, extra, fit, rescaled): (&[View], Option<ViewFinder>, Option<Fitting>, Option<u32>),
    hash: Option<(ViewHash, HashViews)>,
) -> Result<Prepared> {
    let img = load_rgb(path)?;
    let mut views = views.to_vec();
    if let Some(f) = extra {
        views.extend(f(&img));
    }
    let mut sizes: Vec<u32> = views
        .iter()
        .map(|v| match fit {
            Some(f) if *v != FULL => fit_size(v, pre.image_size, f.patch, f.rounding),
            _ => pre.image_size,
        })
        .collect();
    if let Some(s) = rescaled {
        views.push(FULL);
        sizes.push(s);
    }
    let mut pixels = Vec::with_capacity(sizes.iter().map(|&s| 3 * (s as usize).pow(2)).sum());
    let mut hashes = Vec::new();
    let mut whole_hash = None;
    for (v, &s) in views.iter().zip(&sizes) {
        let crop;
        let part = if *v == FULL {
            &img
        } else {
            crop = crop_view(&img, v);
            &crop
        };
        let at = pixels.len();
        pixels.resize(at + 3 * (s as usize).pow(2), 0.0);
        if s == pre.image_size {
            pre.eval_into(part, &mut pixels[at..]);
        } else {
            let sized = Preprocess {
                image_size: s,
                ..pre.clone()
            };
            sized.eval_into(part, &mut pixels[at..]);
        }
        if let Some((f, how)) = hash {
            if *v == FULL {
                // hashed once, also when the whole image runs at a second size
                let first = whole_hash.is_none();
                let h = *whole_hash.get_or_insert_with(|| f(part));
                if how == HashViews::Every || first {
                    hashes.push(h);
                }
            } else if how == HashViews::Every {
                hashes.push(f(part));
            }
        }
    }
    Ok(Prepared {
        path: path.to_path_buf(),
        pixels,
        sizes,
        views,
        hashes,
        width: img.width(),
        height: img.height(),
        image: keep.then_some(img),
    })
}

/// The part of `img` a view covers (at least 1×1 pixel).
pub fn crop_view(img: &RgbImage, v: &View) -> RgbImage {
    let (w, h) = (img.width() as f32, img.height() as f32);
    let x = ((v[0] * w) as u32).min(img.width() - 1);
    let y = ((v[1] * h) as u32).min(img.height() - 1);
    let cw = ((v[2] * w).round() as u32).clamp(1, img.width() - x);
    let ch = ((v[3] * h).round() as u32).clamp(1, img.height() - y);
    image::imageops::crop_imm(img, x, y, cw, ch).to_image()
}

/// Make a write to a closed stdout end the process with status 0 instead of an error message
/// (Rust ignores SIGPIPE, so `tool | head` would otherwise report "Broken pipe").
pub fn exit_quietly_on_broken_pipe() {
    BROKEN_PIPE_EXITS.store(true, std::sync::atomic::Ordering::Relaxed);
}

static BROKEN_PIPE_EXITS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The error for a failed write to stdout; a closed pipe ends the process quietly (status 0)
/// when the tool asked for it.
pub fn stdout_error(e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe
        && BROKEN_PIPE_EXITS.load(std::sync::atomic::Ordering::Relaxed)
    {
        std::process::exit(0);
    }
    Error::Other(format!("writing output: {e}"))
}

/// The exit status of an image tool: 0 all inputs done, 1 some inputs failed (counted on
/// stderr), 2 a usage, model or index error (its one-line message on stderr).
pub fn exit_status(tool: &str, result: Result<usize>) -> std::process::ExitCode {
    match result {
        Ok(0) => std::process::ExitCode::SUCCESS,
        Ok(n) => {
            eprintln!("{tool}: {n} input(s) failed");
            std::process::ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

/// Softmax of one row of logits.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = logits.iter().map(|&v| (v - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

/// The `k` best (index, probability) pairs, best first (ties: lower index first).
pub fn top_k(probs: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut idx: Vec<usize> = (0..probs.len()).collect();
    idx.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
    idx.into_iter().take(k).map(|i| (i, probs[i])).collect()
}

/// Per-pixel argmax of `[C, S, S]` logits bilinearly resized to `w × h` — the same sampling
/// as torch's `upsample_bilinear2d(align_corners=False)`, so the class map a tool writes is the
/// one training's evaluation scored.
pub fn argmax_resized(logits: &[f32], classes: usize, s: usize, w: usize, h: usize) -> Vec<u8> {
    let taps = |out: usize, dst: usize| -> (usize, usize, f32) {
        let scale = s as f32 / out as f32;
        let src = ((dst as f32 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(s - 1);
        let i1 = if i0 < s - 1 { i0 + 1 } else { i0 };
        (i0, i1, src - i0 as f32)
    };
    let xs: Vec<_> = (0..w).map(|x| taps(w, x)).collect();
    let mut out = vec![0u8; w * h];
    out.par_chunks_mut(w).enumerate().for_each(|(y, row)| {
        let (y0, y1, ly) = taps(h, y);
        for (x, o) in row.iter_mut().enumerate() {
            let (x0, x1, lx) = xs[x];
            let (mut best, mut arg) = (f32::NEG_INFINITY, 0usize);
            for c in 0..classes {
                let m = &logits[c * s * s..(c + 1) * s * s];
                let top = m[y0 * s + x0] * (1.0 - lx) + m[y0 * s + x1] * lx;
                let bot = m[y1 * s + x0] * (1.0 - lx) + m[y1 * s + x1] * lx;
                let v = top * (1.0 - ly) + bot * ly;
                if v > best {
                    best = v;
                    arg = c;
                }
            }
            *o = arg as u8;
        }
    });
    out
}

/// Refuse a model made for another tool, saying which tool fits.
pub fn require_task(model: &OrtModel, want: crate::contract::Task, tool: &str) -> Result<()> {
    use crate::contract::Task;
    let got = model.contract.task;
    if got == want {
        return Ok(());
    }
    let fits = match got {
        Task::Classify => "ehm-classify",
        Task::Segment => "ehm-segment",
        Task::Embed => "ehm-retrieve",
        Task::Backbone => "none of the tools (export it with --task embed, classify or segment)",
    };
    Err(Error::bad_file(
        &model.path,
        format!(
            "is a {} model, {tool} needs a {} model; use {fits}",
            got.name(),
            want.name()
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_and_top_k() {
        let p = softmax(&[1.0, 3.0, 2.0]);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        let t = top_k(&p, 2);
        assert_eq!((t[0].0, t[1].0), (1, 2));
    }

    #[test]
    fn argmax_resize_matches_nearest_at_integer_scale_and_keeps_regions() {
        // 2 classes on a 2×2 grid: class 1 wins in the right column
        let logits = [1.0, 0.0, 1.0, 0.0, /* class 1 */ 0.0, 1.0, 0.0, 1.0];
        let m = argmax_resized(&logits, 2, 2, 4, 4);
        assert_eq!(&m[..4], &[0, 0, 1, 1]);
        assert_eq!(&m[12..], &[0, 0, 1, 1]);
        // same size: plain argmax
        assert_eq!(argmax_resized(&logits, 2, 2, 2, 2), vec![0, 1, 0, 1]);
    }

    #[test]
    fn inputs_expand_folders_globs_and_report_missing() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("sub")).unwrap();
        for f in ["a.png", "sub/b.jpg", "notes.txt"] {
            std::fs::write(d.path().join(f), b"x").unwrap();
        }
        let glob = format!("{}/*.png", d.path().display());
        let missing = d.path().join("nope.png").display().to_string();
        let (p, bad) = expand_inputs(&[d.path().display().to_string(), glob, missing]).unwrap();
        assert_eq!(p.len(), 3, "{p:?}"); // a.png, sub/b.jpg from the folder, a.png from the glob
        assert_eq!(bad.len(), 1);
        assert!(
            bad[0].contains("nope.png") && bad[0].contains("no such"),
            "{bad:?}"
        );
    }

    #[test]
    fn a_fitted_view_keeps_its_scale_in_whole_patches() {
        use FitRounding::{Down, Nearest};
        // ViT-S/14 at 224²: a 60 % crop is 134.4 px wide in the full view, 9.6 patches
        assert_eq!(fit_size(&[0.4, 0.4, 0.6, 0.6], 224, 14, Nearest), 140);
        assert_eq!(fit_size(&[0.4, 0.4, 0.6, 0.6], 224, 14, Down), 126);
        for r in [Nearest, Down] {
            assert_eq!(fit_size(&FULL, 224, 14, r), 224);
            // a non-square window by its geometric-mean side (0.3 → 67.2 px, 4.8 patches)
            // is never above its nearest whole patch count, nor below 4 patches
            assert_eq!(
                fit_size(&[0.0, 0.0, 0.9, 0.1], 224, 14, r),
                70 - 14 * (r == Down) as u32
            );
            assert_eq!(fit_size(&[0.0, 0.0, 0.05, 0.05], 224, 14, r), 56);
            assert_eq!(
                fit_size(&[0.0, 0.0, 0.97, 0.99], 224, 16, r),
                224 - 16 * (r == Down) as u32
            );
            // exactly half the side is exactly half the patches either way
            assert_eq!(fit_size(&[0.0, 0.0, 0.5, 0.5], 224, 16, r), 112);
            // a side of exactly 31 patches that f32 computes as 30.9999981 stays 31
            let f = 31.0 * 8.0 / 448.0;
            assert_eq!(fit_size(&[0.0, 0.0, f, f], 448, 8, r), 248);
        }
    }
}
