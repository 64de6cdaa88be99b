//! Reading the checkpoint format without libtorch (docs/formats.md): a run folder holds
//! `checkpoint.safetensors` (fp32, timm / MAE names) and `config.json` (model, preprocess, …).
//! Export, the probe and the tests all open checkpoints through here.
use crate::config::VitConfig;
use crate::data::Preprocess;
use crate::error::{Error, IoContext, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Named fp32 tensors: shape and values.
pub type F32Tensors = HashMap<String, (Vec<i64>, Vec<f32>)>;

/// Parse safetensors bytes whose tensors must all be F32; `path` names them in errors.
pub fn parse_f32_safetensors(
    bytes: &[u8],
    path: &Path,
) -> Result<(F32Tensors, HashMap<String, String>)> {
    let bad = |e: safetensors::SafeTensorError| {
        Error::bad_file(path, format!("not a safetensors file ({e})"))
    };
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(bad)?;
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(bad)?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(Error::bad_file(
                path,
                format!("tensor {name} is {:?}, expected F32", view.dtype()),
            ));
        }
        let data = crate::files::f32s_from_le(view.data());
        out.insert(
            name,
            (view.shape().iter().map(|&d| d as i64).collect(), data),
        );
    }
    Ok((out, meta.metadata().clone().unwrap_or_default()))
}

/// A checkpoint's `config.json`, with the sections every reader needs already parsed.
#[derive(Clone, Debug)]
pub struct CheckpointConfig {
    /// The `.safetensors` file the config belongs to.
    pub weights: PathBuf,
    pub json: serde_json::Value,
    pub vit: VitConfig,
    pub preprocess: Preprocess,
}

impl CheckpointConfig {
    /// `path` is a run folder or a `.safetensors` file with `config.json` beside it.
    pub fn read(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(Error::MissingData(format!(
                "{}: no such checkpoint (give a run folder or its checkpoint.safetensors)",
                path.display()
            )));
        }
        let weights = if path.is_dir() {
            path.join("checkpoint.safetensors")
        } else {
            path.to_path_buf()
        };
        let cfg_path = weights.with_file_name("config.json");
        let text = std::fs::read_to_string(&cfg_path).at(&cfg_path)?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::bad_file(&cfg_path, format!("not JSON ({e})")))?;
        let vit: VitConfig = serde_json::from_value(json["model"].clone())
            .map_err(|e| Error::bad_file(&cfg_path, format!("bad 'model' section ({e})")))?;
        let preprocess: Preprocess = serde_json::from_value(json["preprocess"].clone())
            .map_err(|e| Error::bad_file(&cfg_path, format!("bad 'preprocess' section ({e})")))?;
        Ok(CheckpointConfig {
            weights,
            json,
            vit,
            preprocess,
        })
    }

    /// Class names (`labels`), empty for a checkpoint without a classifier.
    pub fn labels(&self) -> Vec<String> {
        self.json
            .get("labels")
            .and_then(|l| serde_json::from_value(l.clone()).ok())
            .unwrap_or_default()
    }
}
