//! Reading the checkpoint format without libtorch (docs/formats.md): a run folder holds
//! `checkpoint.safetensors` (fp32, timm / MAE names) and `config.json` (model, preprocess, …).
//! Export, the probe and the tests all open checkpoints through here.
use crate::config::VitConfig;
use crate::data::Preprocess;
use crate::error::{Error, IoContext, Result};
use serde::{Deserialize, Serialize};
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

/// A run folder's `config.json` (docs/formats.md): the encoder, the preprocessing it was trained
/// at and how its weights were made. Pretraining writes it; every head trainer copies its
/// backbone's and adds `labels` and `head`. Keys this version does not know are kept as they are.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunFolderConfig {
    pub model: VitConfig,
    pub preprocess: Preprocess,
    /// The run's name (the model zoo entry it was made from).
    #[serde(default)]
    pub name: String,
    /// timm's architecture name (`vit_tiny`) and model name (`vit_tiny_patch4_32`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timm_model: Option<String>,
    /// The pretraining settings as the pretrainer wrote them (`ehm-train`'s `PretrainConfig`).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub pretrain: serde_json::Value,
    /// Optimiser steps taken, of `total_steps` (pretraining).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_steps: Option<u64>,
    /// Class names of a checkpoint with a classifier or segmentation head.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    /// What trained the head, if there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<HeadRecord>,
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

/// `config.json`'s `head`: the trainer (`linear_probe`, `finetune`, `segment`), the token pooling
/// of a classifier, and the trainer's own settings and score.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeadRecord {
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    #[serde(flatten)]
    pub details: serde_json::Map<String, serde_json::Value>,
}

impl HeadRecord {
    /// From a JSON object with at least `kind` (what the trainers build with `json!`).
    pub fn from_json(v: serde_json::Value) -> Self {
        serde_json::from_value(v).expect("a head record: an object with 'kind'")
    }
}

impl RunFolderConfig {
    /// Write it as `dir/config.json` (atomically).
    pub fn write(&self, dir: &Path) -> Result<()> {
        write_config(dir, self)
    }
}

/// `dir/config.json`, pretty-printed, written atomically.
fn write_config(dir: &Path, config: &impl Serialize) -> Result<()> {
    crate::files::write_atomic(
        &dir.join("config.json"),
        serde_json::to_string_pretty(config)
            .expect("serialisable")
            .as_bytes(),
    )
}

/// `config.json` of a head trained on the frozen tokens of an ONNX model (`ehm-train segment
/// MODEL.onnx --freeze-backbone`): no encoder weights of its own; the model file is named and
/// pinned by its sha256.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OnnxHeadConfig {
    /// The head's task (`segment`).
    pub task: String,
    pub backbone_onnx: PathBuf,
    pub backbone_sha256: String,
    pub preprocess: Preprocess,
    pub labels: Vec<String>,
    pub head: HeadRecord,
}

impl OnnxHeadConfig {
    /// `dir/config.json`, if it is one of these (`None`: absent, or another kind of run).
    pub fn find(dir: &Path) -> Option<Self> {
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("config.json")).ok()?).ok()?;
        v.get("backbone_onnx")?;
        serde_json::from_value(v).ok()
    }

    /// `dir/config.json`, which must be one of these.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        serde_json::from_slice(&std::fs::read(&path).at(&path)?)
            .map_err(|e| Error::bad_file(&path, format!("not a head-on-ONNX config ({e})")))
    }

    /// Write it as `dir/config.json` (atomically).
    pub fn write(&self, dir: &Path) -> Result<()> {
        write_config(dir, self)
    }
}

/// A checkpoint's `config.json` beside its weights file.
#[derive(Clone, Debug)]
pub struct CheckpointConfig {
    /// The `.safetensors` file the config belongs to.
    pub weights: PathBuf,
    pub config: RunFolderConfig,
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
        // the two sections every reader needs, each named when it is wrong
        let section = |key: &str, e: serde_json::Error| {
            Error::bad_file(&cfg_path, format!("bad '{key}' section ({e})"))
        };
        serde_json::from_value::<VitConfig>(json["model"].clone())
            .map_err(|e| section("model", e))?;
        serde_json::from_value::<Preprocess>(json["preprocess"].clone())
            .map_err(|e| section("preprocess", e))?;
        let config: RunFolderConfig = serde_json::from_value(json)
            .map_err(|e| Error::bad_file(&cfg_path, format!("bad config ({e})")))?;
        Ok(CheckpointConfig { weights, config })
    }

    pub fn vit(&self) -> &VitConfig {
        &self.config.model
    }

    pub fn preprocess(&self) -> &Preprocess {
        &self.config.preprocess
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A head run's config.json as the trainers write it reads back typed, keeps keys this
    /// version does not know, and writes back what it read.
    #[test]
    fn a_run_folder_config_round_trips_with_unknown_keys() {
        let vit = VitConfig::preset("vit_micro", 16, 4).unwrap();
        let text = serde_json::json!({
            "architecture": "vit_micro",
            "model": vit,
            "preprocess": Preprocess::imagenet(16),
            "pretrain": {"masking": "ehm", "epochs": 2},
            "name": "micro",
            "step": 30,
            "total_steps": 30,
            "timm_model": "vit_micro_patch4_16",
            "labels": ["a", "b"],
            "head": {"kind": "finetune", "pool": "mean", "top1": 0.5, "recipe": {"blr": 1e-3}},
            "from_the_future": [1, 2],
        });
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("config.json"), text.to_string()).unwrap();
        std::fs::write(d.path().join("checkpoint.safetensors"), b"").unwrap();
        let c = CheckpointConfig::read(d.path()).unwrap().config;
        assert_eq!(c.model, vit);
        assert_eq!((c.name.as_str(), c.step), ("micro", Some(30)));
        assert_eq!(c.labels, ["a", "b"]);
        let head = c.head.clone().unwrap();
        assert_eq!(
            (head.kind.as_str(), head.pool.as_deref()),
            ("finetune", Some("mean"))
        );
        assert_eq!(head.details["top1"], 0.5);
        assert_eq!(c.other["from_the_future"], serde_json::json!([1, 2]));
        c.write(d.path()).unwrap();
        let again: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.path().join("config.json")).unwrap())
                .unwrap();
        let keys =
            |v: &serde_json::Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(&again), keys(&text));
        assert_eq!(again["head"], text["head"]);
        assert_eq!(CheckpointConfig::read(d.path()).unwrap().config, c);
        // a broken section is named
        std::fs::write(
            d.path().join("config.json"),
            serde_json::json!({"model": {"arch": 3}, "preprocess": Preprocess::imagenet(16)})
                .to_string(),
        )
        .unwrap();
        let e = CheckpointConfig::read(d.path()).unwrap_err().to_string();
        assert!(e.contains("bad 'model' section"), "{e}");
    }
}
