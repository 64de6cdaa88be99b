//! ONNX Runtime sessions over models that follow the contract (`contract.rs`). The runtime
//! library is loaded at run time: `ORT_DYLIB_PATH`, else the one `tools/setup.sh` unpacked.
use crate::contract::{ModelContract, INPUT};
use crate::error::{Error, Result};
use prost::Message;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

static ENV: OnceLock<std::result::Result<ort::environment::Environment, String>> = OnceLock::new();

/// Where the ONNX Runtime shared library is.
pub fn runtime_path() -> PathBuf {
    std::env::var_os("ORT_DYLIB_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::files::cache_dir().join("onnxruntime/libonnxruntime.so.1.31.1"))
}

fn environment() -> Result<&'static ort::environment::Environment> {
    ENV.get_or_init(|| {
        let lib = runtime_path();
        if !lib.exists() {
            return Err(format!(
                "{}: ONNX Runtime library not found; run tools/setup.sh ort or set ORT_DYLIB_PATH",
                lib.display()
            ));
        }
        ort::init_from(&lib)
            .map_err(|e| format!("{}: cannot load ONNX Runtime ({e})", lib.display()))?
            .with_name("ehm")
            .build()
            .map_err(|e| format!("ONNX Runtime environment: {e}"))
    })
    .as_ref()
    .map_err(|e| Error::Other(e.clone()))
}

fn session(
    path: &Path,
    threads: usize,
    commit: impl FnOnce(
        &mut ort::session::builder::SessionBuilder,
    ) -> ort::Result<ort::session::Session>,
) -> Result<ort::session::Session> {
    let env = environment()?;
    let ort_err = |e: ort::Error| Error::bad_file(path, format!("ONNX Runtime: {e}"));
    let mut builder = ort::session::Session::builder(env)
        .map_err(ort_err)?
        .with_intra_threads(threads.max(1))
        .map_err(|e| Error::Other(e.to_string()))?;
    commit(&mut builder).map_err(ort_err)
}

/// How many ONNX Runtime sessions run batches side by side, and with how many threads each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parallelism {
    pub sessions: usize,
    pub threads_each: usize,
}

impl Parallelism {
    /// One session using `threads` threads.
    pub fn single(threads: usize) -> Self {
        Parallelism {
            sessions: 1,
            threads_each: threads.max(1),
        }
    }
    /// `threads` in total over `sessions` (default: one single-threaded session per thread —
    /// a ViT's matrices are small, and one thread per batch part wastes no time on the
    /// synchronisation a multi-threaded operator pays at every node).
    pub fn split(threads: usize, sessions: Option<usize>) -> Self {
        let threads = threads.max(1);
        let sessions = sessions.unwrap_or(threads).clamp(1, threads);
        Parallelism {
            sessions,
            threads_each: (threads / sessions).max(1),
        }
    }
}

/// An ONNX model and its contract, ready to run: one or more sessions of the same model; a
/// batch is split between them and run in parallel.
pub struct OrtModel {
    pub path: PathBuf,
    pub contract: ModelContract,
    sessions: Vec<ort::session::Session>,
}

impl OrtModel {
    pub fn open(path: &Path, threads: usize) -> Result<Self> {
        Self::open_with(path, Parallelism::single(threads))
    }

    pub fn open_with(path: &Path, par: Parallelism) -> Result<Self> {
        let contract = ModelContract::read(path)?;
        let sessions = (0..par.sessions.max(1))
            .map(|_| session(path, par.threads_each, |b| b.commit_from_file(path)))
            .collect::<Result<_>>()?;
        Ok(OrtModel {
            path: path.to_path_buf(),
            contract,
            sessions,
        })
    }

    /// A model that is not (yet) a file: `label` names it in messages.
    pub fn from_bytes(label: &Path, bytes: &[u8], threads: usize) -> Result<Self> {
        let model = crate::onnx::ModelProto::decode(bytes)
            .map_err(|e| Error::bad_file(label, format!("not an ONNX model ({e})")))?;
        let contract = ModelContract::from_model(&model).map_err(|m| Error::bad_file(label, m))?;
        let session = session(label, threads, |b| b.commit_from_memory(bytes))?;
        Ok(OrtModel {
            path: label.to_path_buf(),
            contract,
            sessions: vec![session],
        })
    }

    /// Run `n` preprocessed images (CHW f32, concatenated); returns (shape, values) of `output`.
    /// With several sessions the images are split into contiguous parts, one per session, run
    /// at the same time; the outputs are joined in input order.
    pub fn run(
        &mut self,
        pixels: &[f32],
        n: usize,
        output: &str,
    ) -> Result<(Vec<usize>, Vec<f32>)> {
        Ok(self.run_outputs(pixels, n, &[output])?.remove(0))
    }

    /// `run` for several outputs of the same images: (shape, values) of each, in `outputs`
    /// order.
    pub fn run_outputs(
        &mut self,
        pixels: &[f32],
        n: usize,
        outputs: &[&str],
    ) -> Result<Vec<Tensor>> {
        let s = self.contract.config.preprocess.image_size;
        self.run_outputs_at(pixels, n, s, outputs)
    }

    /// `run_outputs` for images of `size`×`size`: the model's input size, or any multiple of
    /// its patch size when the model takes any (`ModelContract::any_input_size`).
    pub fn run_outputs_at(
        &mut self,
        pixels: &[f32],
        n: usize,
        size: u32,
        outputs: &[&str],
    ) -> Result<Vec<Tensor>> {
        let cfg = &self.contract.config;
        if size != cfg.preprocess.image_size
            && !(self.contract.any_input_size && size > 0 && size.is_multiple_of(cfg.patch_size))
        {
            return Err(Error::Shape(format!(
                "{}: cannot run at {size}×{size}: the model takes {s}×{s}{}",
                self.path.display(),
                if self.contract.any_input_size {
                    format!(" or a multiple of its patch size {}", cfg.patch_size)
                } else {
                    String::new()
                },
                s = cfg.preprocess.image_size
            )));
        }
        let s = size as usize;
        let per = 3 * s * s;
        if pixels.len() != n * per {
            return Err(Error::Shape(format!(
                "{}: {} values for {n} images of 3×{s}×{s}",
                self.path.display(),
                pixels.len()
            )));
        }
        let parts = self.sessions.len().min(n).max(1);
        let path = &self.path;
        // A dynamically quantized model scales its activations per call: one image per call
        // keeps each image's output independent of its batch (and is as fast on a CPU).
        let per_call = match self.contract.config.quantization {
            Some(_) => 1,
            None => RUN_IMAGES,
        };
        if parts == 1 {
            return run_session(
                &mut self.sessions[0],
                path,
                pixels,
                (n, per_call),
                s,
                outputs,
            );
        }
        let size = n.div_ceil(parts);
        let results: Vec<Result<Vec<Tensor>>> = std::thread::scope(|scope| {
            let handles: Vec<_> = self
                .sessions
                .iter_mut()
                .zip(pixels.chunks(size * per))
                .map(|(sess, px)| {
                    scope.spawn(move || {
                        run_session(sess, path, px, (px.len() / per, per_call), s, outputs)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(Error::Other("inference thread panicked".into())))
                })
                .collect()
        });
        concat(results)
    }
}

/// An output: its shape and values.
pub type Tensor = (Vec<usize>, Vec<f32>);

/// The outputs of consecutive parts of a batch, each joined along the batch axis.
fn concat(parts: impl IntoIterator<Item = Result<Vec<Tensor>>>) -> Result<Vec<Tensor>> {
    let mut joined: Vec<Tensor> = Vec::new();
    for part in parts {
        for (i, (sh, v)) in part?.into_iter().enumerate() {
            if joined.len() <= i {
                joined.push((vec![0usize], Vec::new()));
            }
            let (shape, values) = &mut joined[i];
            shape.truncate(1);
            shape[0] += sh.first().copied().unwrap_or(0);
            shape.extend_from_slice(sh.get(1..).unwrap_or(&[]));
            values.extend_from_slice(&v);
        }
    }
    Ok(joined)
}

/// Most images in one ONNX Runtime call: a ViT's per-call activations (attention matrices
/// above all) then stay in cache; single-threaded calls of 8 images are faster per image than
/// calls of 32 (measured with benches/classify_speed.sh, docs/benchmarks.md).
const RUN_IMAGES: usize = 8;

/// Run `n` images on one session, `per_call` at a time; outputs joined in order.
fn run_session(
    session: &mut ort::session::Session,
    path: &Path,
    pixels: &[f32],
    (n, per_call): (usize, usize),
    s: usize,
    outputs: &[&str],
) -> Result<Vec<Tensor>> {
    let per = 3 * s * s;
    concat(
        pixels
            .chunks(per_call * per)
            .take(n.div_ceil(per_call))
            .map(|part| run_once(session, path, part, part.len() / per, s, outputs)),
    )
}

fn run_once(
    session: &mut ort::session::Session,
    path: &Path,
    pixels: &[f32],
    n: usize,
    s: usize,
    names: &[&str],
) -> Result<Vec<Tensor>> {
    let input = ort::value::Tensor::from_array(([n, 3, s, s], pixels.to_vec()))
        .map_err(|e| Error::Other(e.to_string()))?;
    let outputs = session
        .run(ort::inputs![INPUT => input])
        .map_err(|e| Error::bad_file(path, format!("inference failed: {e}")))?;
    names
        .iter()
        .map(|output| {
            let value = outputs
                .get(output)
                .ok_or_else(|| Error::bad_file(path, format!("no output '{output}'")))?;
            let (shape, data) = value
                .try_extract_tensor::<f32>()
                .map_err(|e| Error::bad_file(path, format!("output '{output}': {e}")))?;
            Ok((shape.iter().map(|&d| d as usize).collect(), data.to_vec()))
        })
        .collect()
}
