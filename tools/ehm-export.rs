//! ehm-export: checkpoint → self-describing ONNX (`onnx`), and a look inside a model (`inspect`).
use clap::{Parser, Subcommand};
use ehm_core::contract::{ModelContract, Task};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "ehm-export",
    version,
    about = "Export ehm checkpoints to ONNX models that carry their own preprocessing and labels"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write CHECKPOINT (a run folder or .safetensors with config.json beside it) as ONNX
    Onnx {
        checkpoint: PathBuf,
        #[arg(long, value_enum, default_value_t = Task::Embed)]
        task: Task,
        #[arg(short, long)]
        output: PathBuf,
        /// Store the weights as fp16 (half the file size; ONNX Runtime still computes in fp32)
        #[arg(long)]
        fp16: bool,
        /// Store the weight matrices as int8 (dynamic quantization: about 2× faster on CPUs
        /// with int8 dot products, a quarter of the file; outputs change slightly)
        #[arg(long, conflicts_with = "fp16")]
        int8: bool,
        /// Export for another input size (position embeddings resized bicubically, as timm)
        #[arg(long)]
        image_size: Option<u32>,
        /// Print the summary as JSON
        #[arg(long)]
        json: bool,
    },
    /// Adopt a ViT from another framework's ONNX file: cut the graph at its final token tensor
    /// [N, 1+P, D], append the ehm head, write the contract (preprocessing, source)
    Import {
        /// The outside ONNX model
        model: PathBuf,
        /// Tensor to cut at: the final (normed) tokens, class token first
        #[arg(long)]
        tokens: String,
        #[arg(short, long)]
        output: PathBuf,
        /// backbone or embed (class token ⊕ GeM, L2-normalised)
        #[arg(long, value_enum, default_value_t = Task::Embed)]
        task: Task,
        /// The image input (default: the model's only input)
        #[arg(long)]
        input: Option<String>,
        /// Tokens before the patch tokens, class token first (5 for DINOv2 with registers);
        /// all but the class token are dropped. 0 for a ViT without class token: the mean
        /// patch token takes its place
        #[arg(long, default_value_t = 1)]
        prefix_tokens: usize,
        #[arg(long)]
        patch_size: u32,
        #[arg(long, default_value_t = 224)]
        image_size: u32,
        /// How an image becomes image-size² (stretch keeps all of it: right for retrieval)
        #[arg(long, value_enum, default_value = "stretch")]
        resize: ResizeArg,
        #[arg(long, value_enum, default_value = "bicubic")]
        interpolation: InterpArg,
        /// Per-channel mean of the model's normalisation (default ImageNet's)
        #[arg(long, num_args = 3, value_delimiter = ',')]
        mean: Option<Vec<f32>>,
        /// Per-channel std of the model's normalisation (default ImageNet's)
        #[arg(long, num_args = 3, value_delimiter = ',')]
        std: Option<Vec<f32>>,
        /// Name recorded as the model's source
        #[arg(long)]
        name: Option<String>,
        /// Architecture label recorded in the metadata
        #[arg(long, default_value = "vit")]
        arch: String,
        /// Store the weight matrices as int8 (as `onnx --int8`)
        #[arg(long)]
        int8: bool,
        #[arg(long)]
        json: bool,
    },
    /// Give an embed model written before the patch_tokens output existed that output (what
    /// `ehm-retrieve --verify` matches); everything else in the file stays as it was
    PatchTokens {
        model: PathBuf,
        #[arg(long, short)]
        output: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Print task, inputs/outputs, opset, metadata and parameter count of an ONNX model
    Inspect {
        model: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ResizeArg {
    Stretch,
    ShorterSideCenterCrop,
}
#[derive(Clone, Copy, clap::ValueEnum)]
enum InterpArg {
    Bilinear,
    Bicubic,
}

/// `writeln!` to the tool's stdout; a closed pipe ends the tool quietly (`stdout_error`).
macro_rules! say {
    ($out:expr, $($t:tt)*) => {
        writeln!($out, $($t)*).map_err(ehm_core::pipeline::stdout_error)?
    };
}

fn print_summary(
    out: &mut impl Write,
    s: &ehm_core::export::ExportSummary,
    json: bool,
    t0: std::time::Instant,
) -> ehm_core::Result<()> {
    if json {
        say!(out, "{}", serde_json::to_string(s).unwrap());
    } else {
        let int8 = match s.int8_matmuls {
            0 => String::new(),
            k => format!(", {k} weight matrices int8"),
        };
        let int8 = if s.any_input_size {
            format!("{int8}, runs at any multiple of its patch size")
        } else {
            int8
        };
        say!(
            out,
            "wrote {} ({} task, {:.1} MB, {:.2} M parameters, opset {}{int8}) in {:.1} s",
            s.output.display(),
            s.task,
            s.bytes as f64 / 1e6,
            s.parameters as f64 / 1e6,
            s.opset,
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

fn run(cli: Cli) -> ehm_core::Result<()> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    match cli.cmd {
        Cmd::Onnx {
            checkpoint,
            task,
            output,
            fp16,
            int8,
            image_size,
            json,
        } => {
            let t0 = std::time::Instant::now();
            let s = ehm_core::export::export_onnx(
                &checkpoint,
                task,
                &output,
                &ehm_core::export::ExportOptions {
                    fp16_weights: fp16,
                    image_size,
                    int8,
                },
            )?;
            print_summary(&mut out, &s, json, t0)?;
        }
        Cmd::Import {
            model,
            tokens,
            output,
            task,
            input,
            prefix_tokens,
            patch_size,
            image_size,
            resize,
            interpolation,
            mean,
            std,
            name,
            arch,
            int8,
            json,
        } => {
            use ehm_core::data::{
                Interpolation, Preprocess, ResizeRule, IMAGENET_MEAN, IMAGENET_STD,
            };
            let t0 = std::time::Instant::now();
            let three = |v: Option<Vec<f32>>, d: [f32; 3]| v.map_or(d, |v| [v[0], v[1], v[2]]);
            let preprocess = Preprocess {
                image_size,
                resize: match resize {
                    ResizeArg::Stretch => ResizeRule::Stretch,
                    ResizeArg::ShorterSideCenterCrop => ResizeRule::ShorterSideCenterCrop,
                },
                crop_pct: 0.875,
                interpolation: match interpolation {
                    InterpArg::Bilinear => Interpolation::Bilinear,
                    InterpArg::Bicubic => Interpolation::Bicubic,
                },
                mean: three(mean, IMAGENET_MEAN),
                std: three(std, IMAGENET_STD),
            };
            let name = name.unwrap_or_else(|| {
                model
                    .file_stem()
                    .map_or("imported".into(), |s| s.to_string_lossy().to_string())
            });
            let opts = ehm_core::export::import::ImportOptions {
                task,
                tokens,
                input,
                prefix_tokens,
                patch_size,
                preprocess,
                name,
                arch,
                int8,
            };
            let s = ehm_core::export::import::import_onnx(&model, &output, &opts)?;
            print_summary(&mut out, &s, json, t0)?;
        }
        Cmd::PatchTokens {
            model,
            output,
            json,
        } => {
            let t0 = std::time::Instant::now();
            let s = ehm_core::export::add_patch_tokens(&model, &output)?;
            print_summary(&mut out, &s, json, t0)?;
        }
        Cmd::Inspect { model, json } => {
            let c = ModelContract::read(&model)?;
            if json {
                let v = serde_json::json!({
                    "task": c.task, "inputs": c.inputs, "outputs": c.outputs, "opset": c.opset,
                    "parameters": c.parameters, "config": c.config, "labels": c.labels, "source": c.source,
                });
                say!(out, "{v}");
            } else {
                let p = &c.config.preprocess;
                say!(out, "model        {}", model.display());
                say!(
                    out,
                    "task         {} (output '{}')",
                    c.task.name(),
                    c.task.output()
                );
                say!(out, "inputs       {}", c.inputs.join(", "));
                say!(out, "outputs      {}", c.outputs.join(", "));
                say!(out, "opset        {}", c.opset);
                say!(out, "parameters   {:.2} M", c.parameters as f64 / 1e6);
                say!(
                    out,
                    "architecture {} / patch {}, embed dim {}",
                    c.config.arch,
                    c.config.patch_size,
                    c.config.embed_dim
                );
                say!(
                    out,
                    "input size   {0}×{0}, resize {1:?}, crop_pct {2}, {3:?}",
                    p.image_size,
                    p.resize,
                    p.crop_pct,
                    p.interpolation
                );
                say!(out, "mean / std   {:?} / {:?}", p.mean, p.std);
                say!(
                    out,
                    "weights      {}",
                    c.config.quantization.as_deref().unwrap_or("float")
                );
                say!(
                    out,
                    "labels       {}",
                    if c.labels.is_empty() {
                        "-".into()
                    } else {
                        format!("{} ({})", c.labels.len(), c.labels.join(", "))
                    }
                );
                if let Some(s) = &c.source {
                    say!(
                        out,
                        "source       {} (checkpoint sha256 {})",
                        s.name,
                        s.checkpoint_sha256
                    );
                }
            }
        }
    }
    out.flush().map_err(ehm_core::pipeline::stdout_error)?;
    Ok(())
}

fn main() -> ExitCode {
    // `ehm-export inspect … | head` closes stdout early: stop quietly like other Unix tools
    ehm_core::pipeline::exit_quietly_on_broken_pipe();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
