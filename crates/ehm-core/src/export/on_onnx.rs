//! Heads trained on an ONNX backbone (`ehm-train segment MODEL.onnx`) exported by appending them
//! to that model's graph: the run folder's `config.json` names the model file and its sha256,
//! `checkpoint.safetensors` holds `seg_head.{weight,bias}`. The head is the same linear decoder
//! the tch segment export writes (class logits per patch token → `[N, C, g, g]` → bilinear,
//! half-pixel, to the input size), read from the model's patch tokens (`last_hidden_state`
//! without its class token, or `patch_tokens`).
use super::graph::Graph;
use super::{value_info, write_model, ExportSummary};
use crate::checkpoint::{parse_f32_safetensors, OnnxHeadConfig};
use crate::contract::{contract_metadata, ModelContract, Source, Task, INPUT, PATCH_TOKENS};
use crate::error::{Error, IoContext, Result};
use crate::onnx::ModelProto;
use prost::Message;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// The ONNX model a run folder's head was trained on, if it was (`config.json`'s
/// `backbone_onnx`); `path` is the run folder or its checkpoint.
pub fn backbone_of(path: &Path) -> Option<PathBuf> {
    let dir = if path.is_dir() { path } else { path.parent()? };
    OnnxHeadConfig::find(dir).map(|c| c.backbone_onnx)
}

/// `run` (a segment run on an ONNX backbone) → a `segment` model at `out`.
pub fn segment_on_onnx(run: &Path, out: &Path) -> Result<ExportSummary> {
    let dir = if run.is_dir() {
        run.to_path_buf()
    } else {
        run.parent().map(Path::to_path_buf).unwrap_or_default()
    };
    let (cfg_path, ckpt) = (dir.join("config.json"), dir.join("checkpoint.safetensors"));
    let cfg = OnnxHeadConfig::read(&dir)?;
    let (src, want_sha) = (cfg.backbone_onnx.clone(), cfg.backbone_sha256.as_str());
    let (labels, pre) = (cfg.labels.clone(), cfg.preprocess.clone());
    crate::files::refuse_overwriting_inputs(out, &[&ckpt, &cfg_path, &src])?;

    let bytes = std::fs::read(&src).map_err(|e| {
        Error::bad_file(
            &src,
            format!("the backbone this head was trained on cannot be read ({e})"),
        )
    })?;
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&bytes))
    };
    if sha != want_sha {
        return Err(Error::bad_file(
            &src,
            format!(
                "not the model the head was trained on (sha256 {}…, the run names {}…)",
                &sha[..12],
                &want_sha[..want_sha.len().min(12)]
            ),
        ));
    }
    let mut model = ModelProto::decode(&bytes[..])
        .map_err(|e| Error::bad_file(&src, format!("not an ONNX model ({e})")))?;
    let contract = ModelContract::from_model(&model).map_err(|m| Error::bad_file(&src, m))?;
    let (tokens, has_cls) = match contract.task {
        Task::Backbone => (Task::Backbone.output(), true),
        Task::Embed if contract.has_patch_tokens() => (PATCH_TOKENS, false),
        t => {
            return Err(Error::bad_file(
                &src,
                format!("a {} model without patch tokens", t.name()),
            ))
        }
    };
    let ck_bytes = std::fs::read(&ckpt).at(&ckpt)?;
    let (t, _) = parse_f32_safetensors(&ck_bytes, &ckpt)?;
    let get = |k: &str| {
        t.get(k)
            .ok_or_else(|| Error::bad_file(&ckpt, format!("missing {k}")))
    };
    let (wshape, w) = get("seg_head.weight")?;
    let (_, b) = get("seg_head.bias")?;
    let (classes, d) = (wshape[0], wshape[1]);
    if classes as usize != labels.len()
        || d != contract.config.embed_dim
        || b.len() != w.len() / d as usize
    {
        return Err(Error::bad_file(
            &ckpt,
            format!(
                "seg_head is {classes}×{d}, but there are {} labels and the backbone's tokens are {}-wide",
                labels.len(),
                contract.config.embed_dim
            ),
        ));
    }
    let (s, p) = (pre.image_size as i64, contract.config.patch_size as i64);
    let grid = s / p;

    // the head, on the backbone's patch tokens
    let mut h = Graph::new(false);
    let x = if has_cls {
        let one = h.init_i64("seg_head.start1", &[1], &[1]);
        let end = h.init_i64("seg_head.end_max", &[1], &[i64::MAX]);
        h.op("Slice", &[tokens, &one, &end, &one], vec![], "seg_head")
    } else {
        tokens.to_string()
    };
    let wt: Vec<f32> = (0..(d * classes) as usize)
        .map(|i| w[(i % classes as usize) * d as usize + i / classes as usize])
        .collect();
    let wt = h.init_f32("seg_head.weight_t", &[d, classes], &wt);
    let bias = h.init_f32("seg_head.bias", &[classes], b);
    let l = h.op("MatMul", &[&x, &wt], vec![], "seg_head");
    let l = h.op("Add", &[&l, &bias], vec![], "seg_head");
    super::class_maps(&mut h, &l, classes, grid, p);

    let g = model
        .graph
        .as_mut()
        .ok_or_else(|| Error::bad_file(&src, "the model has no graph"))?;
    let taken: HashSet<&str> = g
        .node
        .iter()
        .flat_map(|n| n.output.iter().map(String::as_str))
        .chain(g.initializer.iter().filter_map(|t| t.name.as_deref()))
        .collect();
    if let Some(clash) = h
        .nodes
        .iter()
        .flat_map(|n| n.output.iter())
        .chain(h.initializers.iter().filter_map(|t| t.name.as_ref()))
        .find(|t| taken.contains(t.as_str()))
    {
        return Err(Error::bad_file(
            &src,
            format!("the model already has a tensor named '{clash}'"),
        ));
    }
    g.node.extend(h.nodes);
    g.initializer.extend(h.initializers);
    g.output = vec![value_info(
        Task::Segment.output(),
        &[None, Some(classes), Some(s), Some(s)],
    )];
    // the head's token grid is the input size's: a backbone that took any size no longer does
    for v in g
        .input
        .iter_mut()
        .filter(|v| v.name.as_deref() == Some(INPUT))
    {
        *v = value_info(INPUT, &[None, Some(3), Some(s), Some(s)]);
    }
    keep_only_what_outputs_need(g);

    let mut config = contract.config.clone();
    config.preprocess = pre;
    config.embedding_dim = None;
    let source = Source {
        checkpoint_sha256: {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(&ck_bytes))
        },
        name: contract
            .source
            .as_ref()
            .map_or(String::new(), |s| s.name.clone()),
        training: serde_json::json!({"backbone_onnx": src, "backbone_sha256": sha,
            "head": cfg.head}),
    };
    model.metadata_props = contract_metadata(Task::Segment, &config, &labels, &source);
    write_model(&model, Task::Segment, out)
}

/// Drop the nodes and weights no graph output depends on (the backbone's own heads).
fn keep_only_what_outputs_need(g: &mut crate::onnx::GraphProto) {
    let producer: std::collections::HashMap<&str, usize> = g
        .node
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.output.iter().map(move |o| (o.as_str(), i)))
        .collect();
    let mut keep = vec![false; g.node.len()];
    let mut stack: Vec<&str> = g.output.iter().filter_map(|o| o.name.as_deref()).collect();
    while let Some(t) = stack.pop() {
        if let Some(&i) = producer.get(t) {
            if !keep[i] {
                keep[i] = true;
                stack.extend(g.node[i].input.iter().map(String::as_str));
            }
        }
    }
    let mut k = keep.into_iter();
    g.node.retain(|_| k.next().unwrap());
    let used: HashSet<String> = g
        .node
        .iter()
        .flat_map(|n| n.input.iter().cloned())
        .collect();
    g.initializer
        .retain(|t| used.contains(t.name.as_deref().unwrap_or("")));
    g.value_info
        .retain(|v| used.contains(v.name.as_deref().unwrap_or("")));
}
