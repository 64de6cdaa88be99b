//! ehm-export: checkpoint → self-describing ONNX (`onnx`), and a look inside a model (`inspect`).
use clap::{Parser, Subcommand};
use ehm::contract::{ModelContract, Task};
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
        /// Export for another input size (position embeddings resized bicubically, as timm)
        #[arg(long)]
        image_size: Option<u32>,
        /// Print the summary as JSON
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

fn run(cli: Cli) -> ehm::Result<()> {
    match cli.cmd {
        Cmd::Onnx {
            checkpoint,
            task,
            output,
            fp16,
            image_size,
            json,
        } => {
            let t0 = std::time::Instant::now();
            let s = ehm::export::export_onnx(
                &checkpoint,
                task,
                &output,
                &ehm::export::ExportOptions {
                    fp16_weights: fp16,
                    image_size,
                },
            )?;
            if json {
                println!("{}", serde_json::to_string(&s).unwrap());
            } else {
                println!(
                    "wrote {} ({} task, {:.1} MB, {:.2} M parameters, opset {}) in {:.1} s",
                    s.output.display(),
                    s.task,
                    s.bytes as f64 / 1e6,
                    s.parameters as f64 / 1e6,
                    s.opset,
                    t0.elapsed().as_secs_f64()
                );
            }
        }
        Cmd::Inspect { model, json } => {
            let c = ModelContract::read(&model)?;
            if json {
                let v = serde_json::json!({
                    "task": c.task, "inputs": c.inputs, "outputs": c.outputs, "opset": c.opset,
                    "parameters": c.parameters, "config": c.config, "labels": c.labels, "source": c.source,
                });
                println!("{v}");
            } else {
                let p = &c.config.preprocess;
                println!("model        {}", model.display());
                println!(
                    "task         {} (output '{}')",
                    c.task.name(),
                    c.task.output()
                );
                println!("inputs       {}", c.inputs.join(", "));
                println!("outputs      {}", c.outputs.join(", "));
                println!("opset        {}", c.opset);
                println!("parameters   {:.2} M", c.parameters as f64 / 1e6);
                println!(
                    "architecture {} / patch {}, embed dim {}",
                    c.config.arch, c.config.patch_size, c.config.embed_dim
                );
                println!(
                    "input size   {0}×{0}, resize {1:?}, crop_pct {2}, {3:?}",
                    p.image_size, p.resize, p.crop_pct, p.interpolation
                );
                println!("mean / std   {:?} / {:?}", p.mean, p.std);
                println!(
                    "labels       {}",
                    if c.labels.is_empty() {
                        "-".into()
                    } else {
                        format!("{} ({})", c.labels.len(), c.labels.join(", "))
                    }
                );
                if let Some(s) = &c.source {
                    println!(
                        "source       {} (checkpoint sha256 {})",
                        s.name, s.checkpoint_sha256
                    );
                }
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
