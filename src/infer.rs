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
        .unwrap_or_else(|| crate::fsutil::cache_dir().join("onnxruntime/libonnxruntime.so.1.31.1"))
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

/// An ONNX model and its contract, ready to run.
pub struct OrtModel {
    pub path: PathBuf,
    pub contract: ModelContract,
    session: ort::session::Session,
}

impl OrtModel {
    pub fn open(path: &Path, threads: usize) -> Result<Self> {
        let contract = ModelContract::read(path)?;
        let session = session(path, threads, |b| b.commit_from_file(path))?;
        Ok(OrtModel {
            path: path.to_path_buf(),
            contract,
            session,
        })
    }

    /// A model that is not (yet) a file: `label` names it in messages.
    pub fn from_bytes(label: &Path, bytes: &[u8], threads: usize) -> Result<Self> {
        let model = crate::export::onnx::ModelProto::decode(bytes)
            .map_err(|e| Error::bad_file(label, format!("not an ONNX model ({e})")))?;
        let contract = ModelContract::from_model(&model).map_err(|m| Error::bad_file(label, m))?;
        let session = session(label, threads, |b| b.commit_from_memory(bytes))?;
        Ok(OrtModel {
            path: label.to_path_buf(),
            contract,
            session,
        })
    }

    /// Run `n` preprocessed images (CHW f32, concatenated); returns (shape, values) of `output`.
    pub fn run(
        &mut self,
        pixels: &[f32],
        n: usize,
        output: &str,
    ) -> Result<(Vec<usize>, Vec<f32>)> {
        let s = self.contract.config.preprocess.image_size as usize;
        if pixels.len() != n * 3 * s * s {
            return Err(Error::Shape(format!(
                "{}: {} values for {n} images of 3×{s}×{s}",
                self.path.display(),
                pixels.len()
            )));
        }
        let input = ort::value::Tensor::from_array(([n, 3, s, s], pixels.to_vec()))
            .map_err(|e| Error::Other(e.to_string()))?;
        let path = self.path.clone();
        let outputs = self
            .session
            .run(ort::inputs![INPUT => input])
            .map_err(|e| Error::bad_file(&path, format!("inference failed: {e}")))?;
        let value = outputs
            .get(output)
            .ok_or_else(|| Error::bad_file(&path, format!("no output '{output}'")))?;
        let (shape, data) = value
            .try_extract_tensor::<f32>()
            .map_err(|e| Error::bad_file(&path, format!("output '{output}': {e}")))?;
        Ok((shape.iter().map(|&d| d as usize).collect(), data.to_vec()))
    }
}
