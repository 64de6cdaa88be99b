//! ehm-segment: images → per-pixel class maps with an exported `segment` model (ONNX Runtime).
//! Per image: a class-index PNG at the input's size, a colour overlay PNG with a legend, and a
//! JSON line with the pixel fraction of each class. A thin front over `ehm_core::pipeline` and
//! `ehm_core::segmentation`.
use clap::Parser;
use ehm_core::args;
use ehm_core::contract::Task;
use ehm_core::infer::{OrtModel, Parallelism};
use ehm_core::pipeline::{self, Item, RunOptions};
use ehm_core::segmentation::ClassMap;
use std::collections::HashSet;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "ehm-segment",
    version,
    about = "Segment images with an ehm segment model (ONNX): class maps, overlays, class fractions",
    after_help = "INPUTS: image files, folders (recursive), globs (quoted), or - to read paths from stdin.\n\
Writes OUTDIR/<name>.classes.png (8-bit class indices) and OUTDIR/<name>.overlay.png; one JSON line per image on stdout.\n\
Exit status: 0 all images segmented, 1 some inputs failed (each reported on stderr), 2 usage or model error."
)]
struct Cli {
    /// Model exported with `ehm-export onnx --task segment`
    #[arg(long, short)]
    model: PathBuf,
    /// Output folder
    #[arg(long, short, default_value = "segment_out")]
    out: PathBuf,
    /// Images per inference call
    #[arg(long, default_value_t = 8, value_parser = args::at_least_one)]
    batch: usize,
    /// Threads for decoding and for inference (each)
    #[arg(long, default_value_t = std::thread::available_parallelism().map_or(1, |n| n.get()), value_parser = args::at_least_one)]
    threads: usize,
    /// ONNX Runtime sessions that run parts of each batch side by side (default: one
    /// single-threaded session per thread; 1 = one session on all threads, best for one image)
    #[arg(long, value_parser = args::at_least_one)]
    sessions: Option<usize>,
    /// Opacity of the class colours in the overlay (0 … 1)
    #[arg(long, default_value_t = 0.55, value_parser = args::unit)]
    alpha: f32,
    /// Largest image file read, in MB (larger files are failed inputs)
    #[arg(long, default_value_t = ehm_core::files::DEFAULT_MAX_INPUT_MB, value_parser = clap::value_parser!(u64).range(1..))]
    max_file_mb: u64,
    #[arg(required = true)]
    inputs: Vec<std::ffi::OsString>,
}

/// A file name for `path` not used yet in this run (`stem`, `stem-2`, …).
fn unique_name(path: &std::path::Path, used: &mut HashSet<String>) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    let mut name = stem.clone();
    let mut k = 2;
    while !used.insert(name.clone()) {
        name = format!("{stem}-{k}");
        k += 1;
    }
    name
}

fn run(cli: Cli) -> ehm_core::Result<usize> {
    ehm_core::files::set_max_input_mb(cli.max_file_mb);
    let mut model = OrtModel::open_with(&cli.model, Parallelism::split(cli.threads, cli.sessions))?;
    pipeline::require_task(&model, Task::Segment, "ehm-segment")?;
    let labels = model.contract.labels.clone();
    let s = model.contract.config.preprocess.image_size as usize;
    let (paths, problems) = pipeline::expand_inputs(&cli.inputs)?;
    for p in &problems {
        eprintln!("skipped: {p}");
    }
    std::fs::create_dir_all(&cli.out).map_err(|e| ehm_core::Error::io(&cli.out, e))?;
    let mut used = HashSet::new();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let io = ehm_core::pipeline::stdout_error;
    let opts = RunOptions {
        batch: cli.batch,
        threads: cli.threads,
        keep_images: true,
        views: vec![pipeline::FULL],
        progress: true,
        extra_views: None,
        view_hash: None,
        patch_tokens: false,
        view_size: pipeline::ViewSize::Input,
        rescaled_whole: None,
        fit_rounding: pipeline::FitRounding::Nearest,
    };
    let failed = pipeline::run(&mut model, &paths, &opts, |item| {
        let Item::Done {
            prepared,
            output,
            shape,
            ..
        } = item
        else {
            return Ok(());
        };
        let (w, h) = (prepared.width, prepared.height);
        let m = ClassMap::from_logits(output, shape[0], s, (w, h), &labels, &cli.model)?;
        let name = unique_name(&prepared.path, &mut used);
        let classes_png = cli.out.join(format!("{name}.classes.png"));
        ehm_core::files::write_png_atomic(&classes_png, &m.map)?;
        let img = prepared.image.as_ref().expect("kept for the overlay");
        let overlay_png = cli.out.join(format!("{name}.overlay.png"));
        ehm_core::files::write_png_atomic(&overlay_png, &m.overlay_sheet(img, &labels, cli.alpha))?;
        let fractions: serde_json::Map<String, serde_json::Value> = m
            .fractions()
            .into_iter()
            .map(|(c, f)| (labels[c].clone(), serde_json::json!(f)))
            .collect();
        writeln!(
            out,
            "{}",
            serde_json::json!({"path": prepared.path.to_string_lossy(), "width": w, "height": h,
                "classes_png": classes_png.to_string_lossy(), "overlay_png": overlay_png.to_string_lossy(),
                "fractions": fractions})
        )
        .map_err(io)
    })?;
    out.flush().map_err(io)?;
    Ok(failed + problems.len())
}

fn main() -> ExitCode {
    // `tool … | head` closes stdout early: stop quietly like other Unix tools
    ehm_core::pipeline::exit_quietly_on_broken_pipe();
    ehm_core::pipeline::exit_status("ehm-segment", run(Cli::parse()))
}
