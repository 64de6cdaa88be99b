//! The ONNX contract (docs/formats.md): what a model file must carry so that the serving tools
//! need nothing else — task, preprocessing, labels, source. Written by `export`, read here by
//! everyone else; this module is the only place that knows the metadata keys.
use crate::data::Preprocess;
use crate::error::{Error, IoContext, Result};
use crate::onnx::{ModelProto, StringStringEntryProto, ValueInfoProto};
use prost::Message;
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const KEY_TASK: &str = "ehm.task";
pub const KEY_CONFIG: &str = "ehm.config";
pub const KEY_LABELS: &str = "ehm.labels";
pub const KEY_SOURCE: &str = "ehm.source";
/// sha256s of model files whose `embedding` this file computes bit for bit (a file that
/// `ehm-export patch-tokens` gave the extra output): indexes built with those accept it.
pub const KEY_SAME_EMBEDDING: &str = "ehm.same_embedding_as";
pub const INPUT: &str = "pixel_values";
/// Optional output of embed models: `patch_tokens` [N, P, D], each token L2-normalised, in
/// row-major patch order (files written before it existed lack it; `ehm-export patch-tokens`
/// adds it).
pub const PATCH_TOKENS: &str = "patch_tokens";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// `last_hidden_state` [N, 1+P, D]
    Backbone,
    /// `embedding` [N, E], L2-normalised (class token ⊕ GeM over patch tokens)
    Embed,
    /// `logits` [N, C]
    Classify,
    /// `seg_logits` [N, C, H, W]
    Segment,
}

impl Task {
    pub fn name(self) -> &'static str {
        match self {
            Task::Backbone => "backbone",
            Task::Embed => "embed",
            Task::Classify => "classify",
            Task::Segment => "segment",
        }
    }
    /// The main output a tool reads.
    pub fn output(self) -> &'static str {
        match self {
            Task::Backbone => "last_hidden_state",
            Task::Embed => "embedding",
            Task::Classify => "logits",
            Task::Segment => "seg_logits",
        }
    }
}

/// `ehm.config`: how to turn an image into `pixel_values`, and the model geometry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ContractConfig {
    pub preprocess: Preprocess,
    pub patch_size: u32,
    pub embed_dim: i64,
    /// Length of the `embedding` output (embed task), else null.
    #[serde(default)]
    pub embedding_dim: Option<i64>,
    pub arch: String,
    /// How the weights were quantized (`int8-dynamic`, `export::quantize`); absent for float.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization: Option<String>,
}

impl ContractConfig {
    /// Every field checked (metadata is input like any other: a model file may be damaged or
    /// hostile); the message names the field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        self.preprocess.validate().map_err(|e| match e {
            Error::Config(m) => m,
            e => e.to_string(),
        })?;
        if self.patch_size == 0 || !self.preprocess.image_size.is_multiple_of(self.patch_size) {
            return Err(format!(
                "patch_size {} does not divide preprocess.image_size {}",
                self.patch_size, self.preprocess.image_size
            ));
        }
        if self.embed_dim <= 0 || self.embedding_dim.is_some_and(|e| e <= 0) {
            return Err(format!(
                "embed_dim {} / embedding_dim {:?} must be positive",
                self.embed_dim, self.embedding_dim
            ));
        }
        Ok(())
    }
}

/// `ehm.source`: where the weights came from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Source {
    pub checkpoint_sha256: String,
    pub name: String,
    pub training: serde_json::Value,
}

/// Whether an operator-set domain is the default one (ai.onnx, also written as no domain).
pub fn is_default_domain(domain: Option<&str>) -> bool {
    matches!(domain, None | Some("") | Some("ai.onnx"))
}

/// The model's version of the default (ai.onnx) operator set; 0 if it declares none.
pub fn default_opset(m: &ModelProto) -> i64 {
    m.opset_import
        .iter()
        .filter(|o| is_default_domain(o.domain.as_deref()))
        .filter_map(|o| o.version)
        .max()
        .unwrap_or(0)
}

/// The `dim_param` names of a value's dimensions (`None`: fixed or unnamed).
pub fn dim_names(v: &ValueInfoProto) -> Vec<Option<String>> {
    use crate::onnx::tensor_shape_proto::dimension::Value as Dim;
    let Some(crate::onnx::type_proto::Value::TensorType(t)) =
        v.r#type.as_ref().and_then(|t| t.value.as_ref())
    else {
        return vec![];
    };
    t.shape.as_ref().map_or(vec![], |s| {
        s.dim
            .iter()
            .map(|d| match &d.value {
                Some(Dim::DimParam(p)) if !p.is_empty() => Some(p.clone()),
                _ => None,
            })
            .collect()
    })
}

/// The static dimensions of a graph input or output (`None` for a dynamic one).
pub fn dims(v: &ValueInfoProto) -> Vec<Option<i64>> {
    use crate::onnx::tensor_shape_proto::dimension::Value as Dim;
    let Some(crate::onnx::type_proto::Value::TensorType(t)) =
        v.r#type.as_ref().and_then(|t| t.value.as_ref())
    else {
        return vec![];
    };
    t.shape.as_ref().map_or(vec![], |s| {
        s.dim
            .iter()
            .map(|d| match d.value {
                Some(Dim::DimValue(v)) => Some(v),
                _ => None,
            })
            .collect()
    })
}

/// Number of stored weight values (initializer elements).
pub fn parameter_count(g: &crate::onnx::GraphProto) -> u64 {
    g.initializer
        .iter()
        .map(|t| t.dims.iter().product::<i64>().max(1) as u64)
        .sum()
}

/// The `metadata_props` that make a graph an ehm model (what `ModelContract::read` reads back).
pub fn contract_metadata(
    task: Task,
    config: &ContractConfig,
    labels: &[String],
    source: &Source,
) -> Vec<StringStringEntryProto> {
    let entry = |k: &str, v: String| StringStringEntryProto {
        key: Some(k.into()),
        value: Some(v),
    };
    vec![
        entry(KEY_TASK, task.name().into()),
        entry(KEY_CONFIG, serde_json::to_string(config).unwrap()),
        entry(KEY_LABELS, serde_json::to_string(labels).unwrap()),
        entry(KEY_SOURCE, serde_json::to_string(source).unwrap()),
    ]
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelContract {
    pub task: Task,
    pub config: ContractConfig,
    pub labels: Vec<String>,
    pub source: Option<Source>,
    pub opset: i64,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub parameters: u64,
    /// `ehm.same_embedding_as`: the files whose embedding this one is (empty if none).
    pub same_embedding_as: Vec<String>,
    /// The input's height and width are open: the model runs on any multiple of the patch
    /// size (ViTs that interpolate their position embedding, e.g. adopted DINOv2), so a small
    /// crop can run at its own size instead of being upsampled (`pipeline::ViewSize::Fit`).
    pub any_input_size: bool,
    /// The names of the input's open dimensions (`dim_param`), by axis; `None` where the
    /// dimension is fixed or unnamed.
    pub input_dim_names: Vec<Option<String>>,
}

impl ModelContract {
    /// Whether the model gives `patch_tokens` (local verification needs them).
    pub fn has_patch_tokens(&self) -> bool {
        self.outputs.iter().any(|o| o == PATCH_TOKENS)
    }

    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).at(path)?;
        let model = ModelProto::decode(&bytes[..])
            .map_err(|e| Error::bad_file(path, format!("not an ONNX model ({e})")))?;
        Self::from_model(&model).map_err(|m| Error::bad_file(path, m))
    }

    pub fn from_model(m: &ModelProto) -> std::result::Result<Self, String> {
        let meta = |k: &str| {
            m.metadata_props
                .iter()
                .find(|p| p.key.as_deref() == Some(k))
                .and_then(|p| p.value.clone())
        };
        let task_s = meta(KEY_TASK)
            .ok_or("no ehm.task metadata: not an ehm model (export it with ehm-export onnx)")?;
        let task: Task = serde_json::from_value(serde_json::Value::String(task_s.clone()))
            .map_err(|_| format!("unknown ehm.task '{task_s}'"))?;
        let config: ContractConfig =
            serde_json::from_str(&meta(KEY_CONFIG).ok_or("no ehm.config metadata")?)
                .map_err(|e| format!("bad ehm.config: {e}"))?;
        config
            .validate()
            .map_err(|e| format!("bad ehm.config: {e}"))?;
        let labels: Vec<String> = match meta(KEY_LABELS) {
            Some(s) => serde_json::from_str(&s).map_err(|e| format!("bad ehm.labels: {e}"))?,
            None => vec![],
        };
        let source = meta(KEY_SOURCE).and_then(|s| serde_json::from_str(&s).ok());
        let same_embedding_as: Vec<String> = match meta(KEY_SAME_EMBEDDING) {
            Some(s) => {
                serde_json::from_str(&s).map_err(|e| format!("bad {KEY_SAME_EMBEDDING}: {e}"))?
            }
            None => vec![],
        };
        let g = m.graph.as_ref().ok_or("model has no graph")?;
        let inputs: Vec<String> = g.input.iter().filter_map(|v| v.name.clone()).collect();
        let outputs: Vec<String> = g.output.iter().filter_map(|v| v.name.clone()).collect();
        let Some(input) = g.input.iter().find(|v| v.name.as_deref() == Some(INPUT)) else {
            return Err(format!("no '{INPUT}' input (inputs: {inputs:?})"));
        };
        let any_input_size = matches!(dims(input)[..], [_, _, None, None]);
        let input_dim_names = dim_names(input);
        let Some(out) = g
            .output
            .iter()
            .find(|o| o.name.as_deref() == Some(task.output()))
        else {
            return Err(format!(
                "task {} needs output '{}' (outputs: {outputs:?})",
                task.name(),
                task.output()
            ));
        };
        if matches!(task, Task::Classify | Task::Segment) {
            // one label per class: the tools index labels by the output's class axis
            match dims(out).get(1).copied().flatten() {
                Some(c) if c as usize != labels.len() => {
                    return Err(format!(
                        "bad ehm.labels: {} labels for the {c} classes of '{}'",
                        labels.len(),
                        task.output()
                    ))
                }
                _ if labels.is_empty() => {
                    return Err(format!(
                        "bad ehm.labels: a {} model needs its class names",
                        task.name()
                    ))
                }
                _ => {}
            }
        }
        let opset = default_opset(m);
        let parameters = parameter_count(g);
        Ok(ModelContract {
            task,
            config,
            labels,
            source,
            opset,
            inputs,
            outputs,
            parameters,
            same_embedding_as,
            any_input_size,
            input_dim_names,
        })
    }
}
