//! ehm-classify: images → top-k labels with an exported `classify` model (ONNX Runtime).
//! A thin front over `ehm_core::pipeline`; everything the tool needs comes from the model file.
use clap::Parser;
use ehm_core::args;
use ehm_core::contract::Task;
use ehm_core::infer::{OrtModel, Parallelism};
use ehm_core::output::csv_row;
use ehm_core::pipeline::{self, Format, Item, RunOptions};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "ehm-classify",
    version,
    about = "Classify images with an ehm classify model (ONNX): top-k labels per image",
    after_help = "INPUTS: image files, folders (recursive), globs (quoted), or - to read paths from stdin.\n\
Exit status: 0 all images classified, 1 some inputs failed (each reported on stderr), 2 usage or model error."
)]
struct Cli {
    /// Model exported with `ehm-export onnx --task classify`
    #[arg(long, short)]
    model: PathBuf,
    #[arg(long, default_value_t = 5, value_parser = args::at_least_one)]
    top_k: usize,
    /// Images per inference call
    #[arg(long, default_value_t = 32, value_parser = args::at_least_one)]
    batch: usize,
    /// Threads for decoding and for inference (each)
    #[arg(long, default_value_t = default_threads(), value_parser = args::at_least_one)]
    threads: usize,
    /// ONNX Runtime sessions that run parts of each batch side by side (default: one
    /// single-threaded session per thread; 1 = one session on all threads, best for one image)
    #[arg(long, value_parser = args::at_least_one)]
    sessions: Option<usize>,
    /// Largest image file read, in MB (larger files are failed inputs)
    #[arg(long, default_value_t = ehm_core::files::DEFAULT_MAX_INPUT_MB, value_parser = clap::value_parser!(u64).range(1..))]
    max_file_mb: u64,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
    #[arg(required = true)]
    inputs: Vec<std::ffi::OsString>,
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `s` shortened to `width` characters from the left (the file name is the informative end).
fn fit(s: &str, width: usize) -> String {
    let n = s.chars().count();
    if n <= width {
        return s.to_string();
    }
    format!("…{}", s.chars().skip(n + 1 - width).collect::<String>())
}

fn run(cli: Cli) -> ehm_core::Result<usize> {
    ehm_core::files::set_max_input_mb(cli.max_file_mb);
    let mut model = OrtModel::open_with(&cli.model, Parallelism::split(cli.threads, cli.sessions))?;
    pipeline::require_task(&model, Task::Classify, "ehm-classify")?;
    let labels = model.contract.labels.clone();
    let (paths, problems) = pipeline::expand_inputs(&cli.inputs)?;
    for p in &problems {
        eprintln!("skipped: {p}");
    }
    let k = cli.top_k.clamp(1, labels.len().max(1));
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let io = ehm_core::pipeline::stdout_error;
    let width = paths
        .iter()
        .map(|p| p.display().to_string().chars().count())
        .max()
        .unwrap_or(4)
        .clamp(4, 60);
    match cli.format {
        Format::Csv => out
            .write_all(csv_row(&["path", "rank", "label", "probability"]).as_bytes())
            .map_err(io)?,
        Format::Table => writeln!(out, "{:<width$}  top-{k}", "path").map_err(io)?,
        Format::Jsonl => {}
    }
    let opts = RunOptions {
        batch: cli.batch,
        threads: cli.threads,
        keep_images: false,
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
            prepared, output, ..
        } = item
        else {
            return Ok(());
        };
        if output.len() > labels.len() {
            return Err(ehm_core::Error::Shape(format!(
                "{}: {} logits but {} labels",
                cli.model.display(),
                output.len(),
                labels.len()
            )));
        }
        let top = pipeline::top_k(&pipeline::softmax(output), k);
        let path = prepared.path.to_string_lossy();
        match cli.format {
            Format::Jsonl => {
                let t: Vec<_> = top
                    .iter()
                    .map(|&(i, p)| serde_json::json!({"label": labels[i], "index": i, "probability": p}))
                    .collect();
                writeln!(out, "{}", serde_json::json!({"path": path, "top": t})).map_err(io)?
            }
            Format::Csv => {
                for (r, &(i, p)) in top.iter().enumerate() {
                    let row = csv_row::<&str>(&[
                        &path,
                        &(r + 1).to_string(),
                        &labels[i],
                        &format!("{p:.6}"),
                    ]);
                    out.write_all(row.as_bytes()).map_err(io)?
                }
            }
            Format::Table => {
                let cells: Vec<String> = top
                    .iter()
                    .map(|&(i, p)| format!("{} {:.1}%", labels[i], 100.0 * p))
                    .collect();
                writeln!(out, "{:<width$}  {}", fit(&path, width), cells.join("  ")).map_err(io)?
            }
        }
        Ok(())
    })?;
    out.flush().map_err(io)?;
    Ok(failed + problems.len())
}

fn main() -> ExitCode {
    // `tool … | head` closes stdout early: stop quietly like other Unix tools
    ehm_core::pipeline::exit_quietly_on_broken_pipe();
    ehm_core::pipeline::exit_status("ehm-classify", run(Cli::parse()))
}
