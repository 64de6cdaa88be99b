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

/// Where a model's sessions are made from.
enum Source {
    File(PathBuf),
    Bytes(std::sync::Arc<Vec<u8>>),
}

/// A session of the model at `source`, its open input dimensions set by `fixed` (name, size).
fn session(
    path: &Path,
    source: &Source,
    threads: usize,
    fixed: &[(String, i64)],
) -> Result<ort::session::Session> {
    let env = environment()?;
    let ort_err = |e: ort::Error| Error::bad_file(path, format!("ONNX Runtime: {e}"));
    let mut builder = ort::session::Session::builder(env)
        .map_err(ort_err)?
        .with_intra_threads(threads.max(1))
        .map_err(|e| Error::Other(e.to_string()))?;
    for (name, size) in fixed {
        builder = builder
            .with_dimension_override(name, *size)
            .map_err(|e| Error::Other(e.to_string()))?;
    }
    match source {
        Source::File(p) => builder.commit_from_file(p),
        Source::Bytes(b) => builder.commit_from_memory(b),
    }
    .map_err(ort_err)
}

/// One lane of parallel inference: the model's session, and — for a model whose input height
/// and width are open — sessions made for the exact input shapes it is called with. ONNX
/// Runtime folds a ViT's position-embedding interpolation (a bicubic Resize: 26 % of an int8
/// DINOv2-S call at 224²) into a constant only when every input dimension is known, so an
/// exact session runs such a call 1.3–1.5× faster, with outputs equal to float rounding.
struct Lane {
    general: ort::session::Session,
    /// By (batch, side); `None`: no exact session can be had for that shape (it runs on
    /// `general`), so it is not tried again.
    exact: std::collections::HashMap<(usize, usize), Option<ort::session::Session>>,
}

/// Most shapes a lane tries an exact session for (each kept one holds a copy of the weights: for an int8
/// DINOv2-S, 25 MB; the serving tools meet a handful of shapes — the input size, the fitted
/// crop sizes, a batch's remainder); calls of other shapes run on the general session.
const EXACT_SESSIONS: usize = 8;

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
    source: Source,
    threads_each: usize,
    exact_sessions: bool,
    lanes: Vec<Lane>,
}

impl OrtModel {
    pub fn open(path: &Path, threads: usize) -> Result<Self> {
        Self::open_with(path, Parallelism::single(threads))
    }

    pub fn open_with(path: &Path, par: Parallelism) -> Result<Self> {
        let contract = ModelContract::read(path)?;
        let source = Source::File(path.to_path_buf());
        let lanes = (0..par.sessions.max(1))
            .map(|_| Lane::open(path, &source, par.threads_each))
            .collect::<Result<_>>()?;
        Ok(OrtModel {
            path: path.to_path_buf(),
            contract,
            source,
            threads_each: par.threads_each,
            exact_sessions: true,
            lanes,
        })
    }

    /// Whether calls may run on exact-shape sessions (see `Lane`; on by default). Off, every
    /// call runs on the model's general session — the reference the exact ones are tested
    /// against.
    pub fn with_exact_sessions(mut self, on: bool) -> Self {
        self.exact_sessions = on;
        self
    }

    /// The exact-shape sessions made so far, over all lanes.
    pub fn exact_session_count(&self) -> usize {
        self.lanes.iter().map(|l| l.exact.len()).sum()
    }

    /// A model that is not (yet) a file: `label` names it in messages.
    pub fn from_bytes(label: &Path, bytes: &[u8], threads: usize) -> Result<Self> {
        let model = crate::onnx::ModelProto::decode(bytes)
            .map_err(|e| Error::bad_file(label, format!("not an ONNX model ({e})")))?;
        let contract = ModelContract::from_model(&model).map_err(|m| Error::bad_file(label, m))?;
        let source = Source::Bytes(std::sync::Arc::new(bytes.to_vec()));
        let lane = Lane::open(label, &source, threads)?;
        Ok(OrtModel {
            path: label.to_path_buf(),
            contract,
            source,
            threads_each: threads,
            exact_sessions: true,
            lanes: vec![lane],
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
        let parts = self.lanes.len().min(n).max(1);
        // A dynamically quantized model scales its activations per call: one image per call
        // keeps each image's output independent of its batch (and is as fast on a CPU).
        let per_call = match self.contract.config.quantization {
            Some(_) => 1,
            None => RUN_IMAGES,
        };
        let names = &self.contract.input_dim_names;
        let exact = self.exact_sessions
            && self.contract.any_input_size
            && names.len() == 4
            && names[2].is_some()
            && names[3].is_some();
        let call = Call {
            path: &self.path,
            source: &self.source,
            threads: self.threads_each,
            exact_names: exact.then_some(names.as_slice()),
        };
        if parts == 1 {
            return run_lane(&mut self.lanes[0], &call, pixels, (n, per_call), s, outputs);
        }
        let size = n.div_ceil(parts);
        let call = &call;
        let results: Vec<Result<Vec<Tensor>>> = std::thread::scope(|scope| {
            let handles: Vec<_> = self
                .lanes
                .iter_mut()
                .zip(pixels.chunks(size * per))
                .map(|(lane, px)| {
                    scope.spawn(move || {
                        run_lane(lane, call, px, (px.len() / per, per_call), s, outputs)
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

/// What every lane of one `run` shares: the model and how to make an exact-shape session.
struct Call<'a> {
    path: &'a Path,
    source: &'a Source,
    threads: usize,
    /// The input's dimension names when exact-shape sessions are worth making.
    exact_names: Option<&'a [Option<String>]>,
}

impl Lane {
    fn open(path: &Path, source: &Source, threads: usize) -> Result<Self> {
        Ok(Lane {
            general: session(path, source, threads, &[])?,
            exact: Default::default(),
        })
    }

    /// The session for a call of `n` images of `s`×`s`.
    fn pick(&mut self, call: &Call, n: usize, s: usize) -> Result<&mut ort::session::Session> {
        let Some(names) = call.exact_names else {
            return Ok(&mut self.general);
        };
        let key = (n, s);
        if !self.exact.contains_key(&key) {
            if self.exact.len() >= EXACT_SESSIONS {
                return Ok(&mut self.general);
            }
            let exact = Self::fixed_sizes(names, n, s).and_then(|fixed| {
                // the general session runs any shape: a speed-up that cannot be had is no error
                session(call.path, call.source, call.threads, &fixed).ok()
            });
            self.exact.insert(key, exact);
        }
        match self.exact.get_mut(&key) {
            Some(Some(exact)) => Ok(exact),
            _ => Ok(&mut self.general),
        }
    }

    /// The named input dimensions fixed to a call of `n` images of `s`×`s`; `None` when one
    /// name stands for two axes of different sizes (e.g. batch and height): no session can
    /// fix both.
    fn fixed_sizes(names: &[Option<String>], n: usize, s: usize) -> Option<Vec<(String, i64)>> {
        let mut fixed: Vec<(String, i64)> = Vec::new();
        for (name, v) in names.iter().zip([n, 3, s, s]) {
            let Some(name) = name else { continue };
            match fixed.iter().find(|(k, _)| k == name) {
                Some((_, w)) if *w != v as i64 => return None,
                Some(_) => {}
                None => fixed.push((name.clone(), v as i64)),
            }
        }
        Some(fixed)
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

/// Run `n` images on one lane, `per_call` at a time; outputs joined in order.
fn run_lane(
    lane: &mut Lane,
    call: &Call,
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
            .map(|part| {
                let m = part.len() / per;
                run_once(lane.pick(call, m, s)?, call.path, part, m, s, outputs)
            }),
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
