//! `ehm-export onnx`: a checkpoint (safetensors + config.json) → a self-describing ONNX model,
//! written with prost types generated from the official onnx.proto. No libtorch needed.
pub mod graph;
pub mod import;
pub mod on_onnx;
pub mod quantize;

use crate::checkpoint::{parse_f32_safetensors, CheckpointConfig, F32Tensors};
use crate::config::VitConfig;
use crate::contract::{
    contract_metadata, default_opset, parameter_count, ContractConfig, Source, Task, INPUT,
    PATCH_TOKENS,
};
use crate::data::Preprocess;
use crate::error::{Error, IoContext, Result};
use crate::onnx;
use crate::onnx::{
    tensor_shape_proto::dimension::Value as Dim, tensor_shape_proto::Dimension, type_proto,
    ModelProto, OperatorSetIdProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use graph::{attr_float, attr_int, attr_ints, attr_string, Graph};
use prost::Message;
use std::path::{Path, PathBuf};

pub const OPSET: i64 = 17;

/// Weights of a checkpoint, by name: (shape, values).
pub struct Checkpoint {
    pub path: PathBuf,
    pub tensors: F32Tensors,
    pub vit: VitConfig,
    pub preprocess: Preprocess,
    pub name: String,
    pub labels: Vec<String>,
    pub training: serde_json::Value,
    pub sha256: String,
    /// `head.pool` of a checkpoint with a classifier (`cls` or `mean`).
    pub head_pool: Option<String>,
}

impl Checkpoint {
    /// Open a run folder or a `.safetensors` file with `config.json` beside it.
    pub fn open(path: &Path) -> Result<Self> {
        let cfg = CheckpointConfig::read(path)?;
        let file = cfg.weights.clone();
        let bytes = std::fs::read(&file).at(&file)?;
        let (tensors, _) = parse_f32_safetensors(&bytes, &file)?;
        use sha2::Digest;
        let sha256 = hex::encode(sha2::Sha256::digest(&bytes));
        let c = cfg.config;
        Ok(Checkpoint {
            path: file,
            tensors,
            name: c.name,
            training: serde_json::json!({"pretrain": c.pretrain, "step": c.step}),
            vit: c.model,
            preprocess: c.preprocess,
            labels: c.labels,
            sha256,
            head_pool: c.head.and_then(|h| h.pool),
        })
    }

    /// The tensor `name`, checked against the shape the config implies.
    fn get(&self, name: &str, shape: &[i64]) -> Result<&[f32]> {
        match self.tensors.get(name) {
            None => Err(Error::bad_file(
                &self.path,
                format!(
                    "missing tensor {name} (the config says {} with depth {})",
                    self.vit.arch, self.vit.depth
                ),
            )),
            Some((s, _)) if s.as_slice() != shape => Err(Error::bad_file(
                &self.path,
                format!("tensor {name} has shape {s:?}, the config implies {shape:?}"),
            )),
            Some((_, d)) => Ok(d),
        }
    }
}

/// PyTorch's bicubic interpolation (`F.interpolate(mode="bicubic", align_corners=False)`,
/// A = −0.75, edge-clamped taps) of a `[g, g, d]` grid to `[new, new, d]` — how timm resizes
/// position embeddings for another image size.
pub fn resize_pos_grid(grid: &[f32], g: usize, d: usize, new: usize) -> Vec<f32> {
    fn cubic(x: f64) -> f64 {
        let a = -0.75;
        let x = x.abs();
        if x <= 1.0 {
            ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
        } else if x < 2.0 {
            ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
        } else {
            0.0
        }
    }
    let scale = g as f64 / new as f64;
    // per output coordinate: 4 source indices and weights
    let taps: Vec<[(usize, f64); 4]> = (0..new)
        .map(|o| {
            let src = (o as f64 + 0.5) * scale - 0.5;
            let f = src.floor();
            let t = src - f;
            std::array::from_fn(|k| {
                let idx = (f as i64 + k as i64 - 1).clamp(0, g as i64 - 1) as usize;
                (idx, cubic(t - (k as f64 - 1.0)))
            })
        })
        .collect();
    let mut out = vec![0f32; new * new * d];
    for (oy, ty) in taps.iter().enumerate() {
        for (ox, tx) in taps.iter().enumerate() {
            let dst = &mut out[(oy * new + ox) * d..(oy * new + ox + 1) * d];
            for &(iy, wy) in ty {
                for &(ix, wx) in tx {
                    let w = (wy * wx) as f32;
                    let src = &grid[(iy * g + ix) * d..(iy * g + ix + 1) * d];
                    dst.iter_mut().zip(src).for_each(|(o, s)| *o += w * s);
                }
            }
        }
    }
    out
}

/// What an export produced.
#[derive(Debug, serde::Serialize)]
pub struct ExportSummary {
    #[serde(serialize_with = "crate::files::lossy_path")]
    pub output: PathBuf,
    pub task: String,
    pub bytes: u64,
    pub parameters: u64,
    pub opset: i64,
    /// Weight matrices stored as int8 (`--int8`); 0 for a float model.
    pub int8_matmuls: usize,
    /// The model runs at any multiple of its patch size (`ModelContract::any_input_size`).
    pub any_input_size: bool,
}

fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; w.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = w[r * cols + c];
        }
    }
    t
}

/// `x @ Wᵀ + b` for a torch Linear stored as `[out, in]`.
fn linear(
    g: &mut Graph,
    ck: &Checkpoint,
    x: &str,
    prefix: &str,
    din: i64,
    dout: i64,
) -> Result<String> {
    let w = ck.get(&format!("{prefix}.weight"), &[dout, din])?;
    let b = ck.get(&format!("{prefix}.bias"), &[dout])?;
    let wt = g.init_f32(
        &format!("{prefix}.weight_t"),
        &[din, dout],
        &transpose(w, dout as usize, din as usize),
    );
    let bn = g.init_f32(&format!("{prefix}.bias"), &[dout], b);
    let y = g.op("MatMul", &[x, &wt], vec![], prefix);
    Ok(g.op("Add", &[&y, &bn], vec![], prefix))
}

fn layer_norm(g: &mut Graph, ck: &Checkpoint, x: &str, prefix: &str, d: i64) -> Result<String> {
    let w = g.init_f32(
        &format!("{prefix}.weight"),
        &[d],
        ck.get(&format!("{prefix}.weight"), &[d])?,
    );
    let b = g.init_f32(
        &format!("{prefix}.bias"),
        &[d],
        ck.get(&format!("{prefix}.bias"), &[d])?,
    );
    Ok(g.op(
        "LayerNormalization",
        &[x, &w, &b],
        vec![attr_int("axis", -1), attr_float("epsilon", 1e-6)],
        prefix,
    ))
}

/// One pre-norm block, as `model::Block::forward`.
fn block(g: &mut Graph, ck: &Checkpoint, x: &str, i: i64, c: &Consts) -> Result<String> {
    let (d, h) = (ck.vit.embed_dim, ck.vit.num_heads);
    let p = format!("blocks.{i}");
    let n1 = layer_norm(g, ck, x, &format!("{p}.norm1"), d)?;
    let qkv = linear(g, ck, &n1, &format!("{p}.attn.qkv"), d, 3 * d)?;
    let shape = g.init_i64(&format!("{p}.attn.qkv_shape"), &[5], &[0, -1, 3, h, d / h]);
    let qkv = g.op("Reshape", &[&qkv, &shape], vec![], &p);
    let qkv = g.op(
        "Transpose",
        &[&qkv],
        vec![attr_ints("perm", &[2, 0, 3, 1, 4])],
        &p,
    );
    let q = g.op("Gather", &[&qkv, &c.idx0], vec![attr_int("axis", 0)], &p);
    let k = g.op("Gather", &[&qkv, &c.idx1], vec![attr_int("axis", 0)], &p);
    let v = g.op("Gather", &[&qkv, &c.idx2], vec![attr_int("axis", 0)], &p);
    let kt = g.op(
        "Transpose",
        &[&k],
        vec![attr_ints("perm", &[0, 1, 3, 2])],
        &p,
    );
    let s = g.op("MatMul", &[&q, &kt], vec![], &p);
    let scale = g.init_f32(
        &format!("{p}.attn.scale"),
        &[],
        &[((d / h) as f32).powf(-0.5)],
    );
    let s = g.op("Mul", &[&s, &scale], vec![], &p);
    let a = g.op("Softmax", &[&s], vec![attr_int("axis", -1)], &p);
    let o = g.op("MatMul", &[&a, &v], vec![], &p);
    let o = g.op(
        "Transpose",
        &[&o],
        vec![attr_ints("perm", &[0, 2, 1, 3])],
        &p,
    );
    let o = g.op("Reshape", &[&o, &c.shape_nd], vec![], &p);
    let o = linear(g, ck, &o, &format!("{p}.attn.proj"), d, d)?;
    let x = g.op("Add", &[x, &o], vec![], &p);
    let n2 = layer_norm(g, ck, &x, &format!("{p}.norm2"), d)?;
    let hidden = (d as f64 * ck.vit.mlp_ratio) as i64;
    let f = linear(g, ck, &n2, &format!("{p}.mlp.fc1"), d, hidden)?;
    // exact GELU: 0.5·x·(1 + erf(x/√2)) (opset 17 has no Gelu op). Written with a Div by √2,
    // the form ONNX Runtime's GeluFusion recognises: it becomes one (Bias)Gelu kernel
    // (int8 ViT-S/16 ≈ 5 % faster per image, fp32 within noise — benches/py/gelu_form_ab.py).
    let e = g.op("Div", &[&f, &c.sqrt2], vec![], &p);
    let e = g.op("Erf", &[&e], vec![], &p);
    let e = g.op("Add", &[&e, &c.one], vec![], &p);
    let f = g.op("Mul", &[&f, &e], vec![], &p);
    let f = g.op("Mul", &[&f, &c.half], vec![], &p);
    let f = linear(g, ck, &f, &format!("{p}.mlp.fc2"), hidden, d)?;
    Ok(g.op("Add", &[&x, &f], vec![], &p))
}

struct Consts {
    idx0: String,
    idx1: String,
    idx2: String,
    shape_nd: String,
    sqrt2: String,
    one: String,
    half: String,
}

fn value_info(name: &str, dims: &[Option<i64>]) -> ValueInfoProto {
    let shape = TensorShapeProto {
        dim: dims
            .iter()
            .enumerate()
            .map(|(k, d)| Dimension {
                value: Some(match d {
                    Some(v) => Dim::DimValue(*v),
                    None if k == 0 => Dim::DimParam("batch".into()),
                    // an open image side, or token count (models that take any size)
                    None if dims.len() == 4 && k >= 2 => {
                        Dim::DimParam(["height", "width"][k - 2].into())
                    }
                    None => Dim::DimParam(format!("{name}_dim{k}")),
                }),
                ..Default::default()
            })
            .collect(),
    };
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(onnx::tensor_proto::DataType::Float as i32),
                shape: Some(shape),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// `seg_logits` [N, classes, grid·p, grid·p] from per-patch class scores `l` [N, grid², classes]:
/// the scores laid out on the patch grid, resized bilinearly (half-pixel) to the input size.
/// Shared by our export and a head appended to an ONNX backbone (`on_onnx`).
pub(crate) fn class_maps(g: &mut Graph, l: &str, classes: i64, grid: i64, p: i64) {
    let l = g.op(
        "Transpose",
        &[l],
        vec![attr_ints("perm", &[0, 2, 1])],
        "seg_head",
    );
    let shape = g.init_i64("seg_head.grid_shape", &[4], &[0, classes, grid, grid]);
    let l = g.op("Reshape", &[&l, &shape], vec![], "seg_head");
    let scales = g.init_f32("seg_head.scales", &[4], &[1.0, 1.0, p as f32, p as f32]);
    g.op_named(
        "Resize",
        &[&l, "", &scales],
        vec![
            attr_string("mode", "linear"),
            attr_string("coordinate_transformation_mode", "half_pixel"),
        ],
        Task::Segment.output(),
    );
}

/// `last_hidden_state` [N, tokens, d]: the tokens as they are.
pub(crate) fn backbone_output(
    g: &mut Graph,
    x: &str,
    tokens: Option<i64>,
    d: i64,
) -> ValueInfoProto {
    g.op_named("Identity", &[x], vec![], "last_hidden_state");
    value_info("last_hidden_state", &[None, tokens, Some(d)])
}

/// A reduction over `axes` in the form `opset` wants (attribute before opset 18, input after).
pub(crate) fn reduce(
    g: &mut Graph,
    op: &str,
    x: &str,
    axes: &[i64],
    keepdims: bool,
    opset: i64,
    hint: &str,
) -> String {
    let keep = attr_int("keepdims", keepdims as i64);
    if opset >= 18 {
        let name = format!(
            "{hint}.axes_{}",
            axes.iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join("_")
        );
        let a = g.init_i64(&name, &[axes.len() as i64], axes);
        g.op(op, &[x, &a], vec![keep], hint)
    } else {
        g.op(op, &[x], vec![attr_ints("axes", axes), keep], hint)
    }
}

/// `embedding` [N, 2d]: class token ⊕ GeM(p = 4) over the patch tokens of `x` [N, 1+P, d],
/// L2-normalised — DINO's copy-detection descriptor — and `patch_tokens` [N, P, d], each token
/// L2-normalised (what `retrieval::verify` matches). Shared by our export and `import`.
pub(crate) fn embed_head(g: &mut Graph, x: &str, d: i64, opset: i64) -> Vec<ValueInfoProto> {
    let h = "ehm.embed";
    let idx0 = g.init_i64("ehm.embed.idx0", &[], &[0]);
    let cls = g.op("Gather", &[x, &idx0], vec![attr_int("axis", 1)], h);
    let starts = g.init_i64("ehm.embed.start1", &[1], &[1]);
    let ends = g.init_i64("ehm.embed.end_max", &[1], &[i64::MAX]);
    let axes = g.init_i64("ehm.embed.axis1", &[1], &[1]);
    let patches = g.op("Slice", &[x, &starts, &ends, &axes], vec![], h);
    let tokens = patch_tokens_output(g, &patches, d, opset);
    let eps = g.init_f32("ehm.embed.gem_eps", &[], &[1e-6]);
    let pt = g.op("Max", &[&patches, &eps], vec![], h);
    let four = g.init_f32("ehm.embed.gem_p", &[], &[4.0]);
    let pt = g.op("Pow", &[&pt, &four], vec![], h);
    let pt = reduce(g, "ReduceMean", &pt, &[1], false, opset, h);
    let quarter = g.init_f32("ehm.embed.gem_inv_p", &[], &[0.25]);
    let gem = g.op("Pow", &[&pt, &quarter], vec![], h);
    let cat = g.op("Concat", &[&cls, &gem], vec![attr_int("axis", 1)], h);
    let norm = reduce(g, "ReduceL2", &cat, &[1], true, opset, h);
    let tiny = g.init_f32("ehm.embed.l2_eps", &[], &[1e-12]);
    let norm = g.op("Max", &[&norm, &tiny], vec![], h);
    g.op_named("Div", &[&cat, &norm], vec![], "embedding");
    vec![value_info("embedding", &[None, Some(2 * d)]), tokens]
}

/// `patch_tokens` [N, P, d]: the patch tokens `patches` [N, P, d], each L2-normalised.
fn patch_tokens_output(g: &mut Graph, patches: &str, d: i64, opset: i64) -> ValueInfoProto {
    let h = "ehm.patch_tokens";
    let norm = reduce(g, "ReduceL2", patches, &[2], true, opset, h);
    let tiny = g.init_f32("ehm.patch_tokens.l2_eps", &[], &[1e-12]);
    let norm = g.op("Max", &[&norm, &tiny], vec![], h);
    g.op_named("Div", &[patches, &norm], vec![], PATCH_TOKENS);
    value_info(PATCH_TOKENS, &[None, None, (d > 0).then_some(d)])
}

/// Give an embed model written before the `patch_tokens` output existed that output (the
/// graph is otherwise unchanged: `embedding` stays bit for bit the same), written atomically
/// to `out`. Refuses other tasks and files that already have it.
pub fn add_patch_tokens(src: &Path, out: &Path) -> Result<ExportSummary> {
    crate::files::refuse_overwriting_inputs(out, &[src])?;
    let bytes = std::fs::read(src).at(src)?;
    let mut model = ModelProto::decode(&bytes[..])
        .map_err(|e| Error::bad_file(src, format!("not an ONNX model ({e})")))?;
    let contract =
        crate::contract::ModelContract::from_model(&model).map_err(|m| Error::bad_file(src, m))?;
    if contract.task != Task::Embed {
        return Err(Error::bad_file(
            src,
            format!(
                "a {} model; only embed models get patch tokens",
                contract.task.name()
            ),
        ));
    }
    if contract.has_patch_tokens() {
        return Err(Error::bad_file(
            src,
            "the model already has a patch_tokens output",
        ));
    }
    let opset = default_opset(&model);
    let d = contract.config.embed_dim;
    let g = model
        .graph
        .as_mut()
        .ok_or_else(|| Error::bad_file(src, "the model has no graph"))?;
    // the head's input: what the class-token Gather reads, found from `embedding` back
    // (Div ← Concat ← Gather), whatever the head's tensors were named
    let producer = |t: &str, op: &str| {
        g.node
            .iter()
            .find(|n| n.output.iter().any(|o| o == t) && n.op_type.as_deref() == Some(op))
            .and_then(|n| n.input.first().cloned())
    };
    let x = producer(Task::Embed.output(), "Div")
        .and_then(|cat| producer(&cat, "Concat"))
        .and_then(|cls| producer(&cls, "Gather"))
        .ok_or_else(|| {
            Error::bad_file(src, "no ehm embed head found (not written by ehm-export?)")
        })?;
    let mut head = Graph::new(false);
    let starts = head.init_i64("ehm.patch_tokens.start1", &[1], &[1]);
    let ends = head.init_i64("ehm.patch_tokens.end_max", &[1], &[i64::MAX]);
    let axes = head.init_i64("ehm.patch_tokens.axis1", &[1], &[1]);
    let patches = head.op(
        "Slice",
        &[&x, &starts, &ends, &axes],
        vec![],
        "ehm.patch_tokens",
    );
    let out_info = patch_tokens_output(&mut head, &patches, d, opset);
    let taken: std::collections::HashSet<&str> = g
        .node
        .iter()
        .flat_map(|n| n.output.iter().map(String::as_str))
        .chain(g.initializer.iter().filter_map(|t| t.name.as_deref()))
        .collect();
    if let Some(clash) = head
        .nodes
        .iter()
        .flat_map(|n| n.output.iter())
        .chain(head.initializers.iter().filter_map(|t| t.name.as_ref()))
        .find(|t| taken.contains(t.as_str()))
    {
        return Err(Error::bad_file(
            src,
            format!("the model already has a tensor named '{clash}'"),
        ));
    }
    g.node.extend(head.nodes);
    g.initializer.extend(head.initializers);
    g.output.push(out_info);
    // indexes built with the source file accept this one: its embedding is the source's
    use sha2::Digest;
    let mut same = contract.same_embedding_as;
    same.push(hex::encode(sha2::Sha256::digest(&bytes)));
    model
        .metadata_props
        .retain(|p| p.key.as_deref() != Some(crate::contract::KEY_SAME_EMBEDDING));
    model.metadata_props.push(onnx::StringStringEntryProto {
        key: Some(crate::contract::KEY_SAME_EMBEDDING.into()),
        value: Some(serde_json::to_string(&same).unwrap()),
    });
    write_model(&model, Task::Embed, out)
}

/// Build the model for `task` from a checkpoint.
pub fn build_model(ck: &Checkpoint, task: Task, opts: &ExportOptions) -> Result<ModelProto> {
    let v = &ck.vit;
    let (d, p, g0) = (v.embed_dim, v.patch_size as i64, v.grid() as i64);
    let size = opts.image_size.unwrap_or(v.image_size);
    let max = crate::data::preprocess::MAX_IMAGE_SIZE;
    if size == 0 || size > max || !size.is_multiple_of(v.patch_size) {
        return Err(Error::Config(format!(
            "--image-size {size}: the image size must be a multiple of the patch size {} from {} to {max}",
            v.patch_size, v.patch_size
        )));
    }
    let gsz = (size / v.patch_size) as i64;
    let np = gsz * gsz;
    let lacks = |what: &str| {
        Error::bad_file(
            &ck.path,
            format!("the checkpoint has no {what} head (train one with ehm-train probe); export it as backbone or embed"),
        )
    };
    let seg_classes = ck.tensors.get("seg_head.weight").map(|(shape, _)| shape[0]);
    match task {
        Task::Segment if seg_classes.is_none() => {
            return Err(Error::bad_file(
                &ck.path,
                "the checkpoint has no segment head (train one with ehm-train segment); export it as backbone or embed",
            ))
        }
        Task::Classify if ck.head_pool.is_none() || !ck.tensors.contains_key("head.weight") => {
            return Err(lacks("classify"))
        }
        _ => {}
    }
    if opts.int8 && opts.fp16_weights {
        return Err(Error::Config(
            "--int8 and --fp16 exclude each other (int8 weights are a quarter of fp32 already)"
                .into(),
        ));
    }
    let mut g = Graph::new(opts.fp16_weights);
    let c = Consts {
        idx0: g.init_i64("const.idx0", &[], &[0]),
        idx1: g.init_i64("const.idx1", &[], &[1]),
        idx2: g.init_i64("const.idx2", &[], &[2]),
        shape_nd: g.init_i64("const.shape_nd", &[3], &[0, -1, d]),
        sqrt2: g.init_f32("const.sqrt2", &[], &[std::f32::consts::SQRT_2]),
        one: g.init_f32("const.one", &[], &[1.0]),
        half: g.init_f32("const.half", &[], &[0.5]),
    };
    // patch embedding → [N, P, D] + position embedding
    let w = g.init_f32(
        "patch_embed.proj.weight",
        &[d, 3, p, p],
        ck.get("patch_embed.proj.weight", &[d, 3, p, p])?,
    );
    let b = g.init_f32(
        "patch_embed.proj.bias",
        &[d],
        ck.get("patch_embed.proj.bias", &[d])?,
    );
    let x = g.op(
        "Conv",
        &[INPUT, &w, &b],
        vec![
            attr_ints("kernel_shape", &[p, p]),
            attr_ints("strides", &[p, p]),
        ],
        "patch_embed",
    );
    let flat = g.init_i64("patch_embed.flat_shape", &[3], &[0, d, -1]);
    let x = g.op("Reshape", &[&x, &flat], vec![], "patch_embed");
    let x = g.op(
        "Transpose",
        &[&x],
        vec![attr_ints("perm", &[0, 2, 1])],
        "patch_embed",
    );
    let pos = ck.get("pos_embed", &[1, 1 + g0 * g0, d])?;
    let grid_pos = if gsz == g0 {
        pos[d as usize..].to_vec()
    } else {
        resize_pos_grid(&pos[d as usize..], g0 as usize, d as usize, gsz as usize)
    };
    let pos_patches = g.init_f32("pos_embed.patches", &[1, np, d], &grid_pos);
    let x = g.op("Add", &[&x, &pos_patches], vec![], "pos_embed");
    // class token (+ its position embedding), broadcast to the batch
    let cls_tok = ck.get("cls_token", &[1, 1, d])?;
    let cls: Vec<f32> = cls_tok
        .iter()
        .zip(&pos[..d as usize])
        .map(|(a, b)| a + b)
        .collect();
    let cls = g.init_f32("cls_token.with_pos", &[1, 1, d], &cls);
    let in_shape = g.op("Shape", &[INPUT], vec![], "cls");
    let (s0, s1) = (
        g.init_i64("const.s0", &[1], &[0]),
        g.init_i64("const.s1", &[1], &[1]),
    );
    let n = g.op("Slice", &[&in_shape, &s0, &s1], vec![], "cls");
    let tail = g.init_i64("const.one_d", &[2], &[1, d]);
    let cls_shape = g.op("Concat", &[&n, &tail], vec![attr_int("axis", 0)], "cls");
    let cls = g.op("Expand", &[&cls, &cls_shape], vec![], "cls");
    let mut x = g.op("Concat", &[&cls, &x], vec![attr_int("axis", 1)], "tokens");
    for i in 0..v.depth {
        x = block(&mut g, ck, &x, i, &c)?;
    }
    let x = layer_norm(&mut g, ck, &x, "norm", d)?;
    let (outputs, emb_dim) = match task {
        Task::Classify => {
            let classes = ck.labels.len() as i64;
            if classes == 0 {
                return Err(Error::bad_file(
                    &ck.path,
                    "classifier checkpoint without labels in config.json",
                ));
            }
            let pooled = if ck.head_pool.as_deref() == Some("mean") {
                let starts = g.init_i64("const.start1", &[1], &[1]);
                let ends = g.init_i64("const.end_max", &[1], &[i64::MAX]);
                let axes = g.init_i64("const.axis1", &[1], &[1]);
                let pt = g.op("Slice", &[&x, &starts, &ends, &axes], vec![], "head");
                g.op(
                    "ReduceMean",
                    &[&pt],
                    vec![attr_ints("axes", &[1]), attr_int("keepdims", 0)],
                    "head",
                )
            } else {
                g.op("Gather", &[&x, &c.idx0], vec![attr_int("axis", 1)], "head")
            };
            let logits = linear(&mut g, ck, &pooled, "head", d, classes)?;
            g.op_named("Identity", &[&logits], vec![], "logits");
            (vec![value_info("logits", &[None, Some(classes)])], None)
        }
        Task::Segment => {
            // Segmenter's linear decoder: class logits per patch token, bilinearly upsampled
            // (half-pixel centres = torch's align_corners=False) to the input size.
            let classes = seg_classes.unwrap_or(0);
            if ck.labels.len() as i64 != classes {
                return Err(Error::bad_file(
                    &ck.path,
                    format!(
                        "seg_head has {classes} classes but config.json names {}",
                        ck.labels.len()
                    ),
                ));
            }
            let starts = g.init_i64("const.start1", &[1], &[1]);
            let ends = g.init_i64("const.end_max", &[1], &[i64::MAX]);
            let axes = g.init_i64("const.axis1", &[1], &[1]);
            let pt = g.op("Slice", &[&x, &starts, &ends, &axes], vec![], "seg_head");
            let l = linear(&mut g, ck, &pt, "seg_head", d, classes)?;
            class_maps(&mut g, &l, classes, gsz, p);
            let s = size as i64;
            (
                vec![value_info(
                    "seg_logits",
                    &[None, Some(classes), Some(s), Some(s)],
                )],
                None,
            )
        }
        Task::Backbone => (vec![backbone_output(&mut g, &x, Some(1 + np), d)], None),
        Task::Embed => (embed_head(&mut g, &x, d, OPSET), Some(2 * d)),
    };
    let s = size as i64;
    let preprocess = Preprocess {
        image_size: size,
        ..ck.preprocess.clone()
    };
    let config = ContractConfig {
        preprocess,
        patch_size: v.patch_size,
        embed_dim: d,
        embedding_dim: emb_dim,
        arch: v.arch.clone(),
        quantization: opts.int8.then(|| quantize::INT8_DYNAMIC.into()),
    };
    let source = Source {
        checkpoint_sha256: ck.sha256.clone(),
        name: ck.name.clone(),
        training: ck.training.clone(),
    };
    let mut model = ModelProto {
        ir_version: Some(8),
        producer_name: Some("ehm-export".into()),
        producer_version: Some(env!("CARGO_PKG_VERSION").into()),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(OPSET),
        }],
        metadata_props: contract_metadata(task, &config, &ck.labels, &source),
        graph: Some(onnx::GraphProto {
            name: Some(format!("{}_{}", v.arch, task.name())),
            node: g.nodes,
            initializer: g.initializers,
            input: vec![value_info(INPUT, &[None, Some(3), Some(s), Some(s)])],
            output: outputs,
            ..Default::default()
        }),
        ..Default::default()
    };
    if opts.int8 {
        quantize::dynamic_int8(&mut model, &quantize::HEADS);
    }
    Ok(model)
}

/// How to export: weight storage and (optionally) another input size.
#[derive(Clone, Debug, Default)]
pub struct ExportOptions {
    /// Store the weights as fp16 (half the size; computation stays fp32).
    pub fp16_weights: bool,
    /// Export for this input size; position embeddings are resized bicubically (as timm).
    pub image_size: Option<u32>,
    /// Quantize the weight matrices to int8 (`quantize::dynamic_int8`).
    pub int8: bool,
}

/// Export a checkpoint to `out` (written atomically).
pub fn export_onnx(
    checkpoint: &Path,
    task: Task,
    out: &Path,
    opts: &ExportOptions,
) -> Result<ExportSummary> {
    if on_onnx::backbone_of(checkpoint).is_some() {
        if task != Task::Segment {
            return Err(Error::Config(format!(
                "{}: a segmentation head on an ONNX backbone exports as --task segment (for the \
                 backbone itself, use that ONNX file)",
                checkpoint.display()
            )));
        }
        if opts.fp16_weights || opts.int8 || opts.image_size.is_some() {
            return Err(Error::Config(format!(
                "{}: the head is appended to its ONNX backbone as that file is: --fp16, --int8 \
                 and --image-size apply to the backbone's own export (or ehm-export import)",
                checkpoint.display()
            )));
        }
        return on_onnx::segment_on_onnx(checkpoint, out);
    }
    let ck = Checkpoint::open(checkpoint)?;
    let config = ck.path.with_file_name("config.json");
    crate::files::refuse_overwriting_inputs(out, &[&ck.path, &config])?;
    write_model(&build_model(&ck, task, opts)?, task, out)
}

/// Write `model` to `out` atomically and summarise it.
pub(crate) fn write_model(model: &ModelProto, task: Task, out: &Path) -> Result<ExportSummary> {
    let bytes = model.encode_to_vec();
    crate::files::write_atomic(out, &bytes)?;
    Ok(ExportSummary {
        output: out.to_path_buf(),
        task: task.name().into(),
        bytes: bytes.len() as u64,
        parameters: model.graph.as_ref().map_or(0, parameter_count),
        opset: default_opset(model),
        int8_matmuls: model.graph.as_ref().map_or(0, |g| {
            g.node
                .iter()
                .filter(|n| n.op_type.as_deref() == Some("DynamicQuantizeMatMul"))
                .count()
        }),
        any_input_size: crate::contract::ModelContract::from_model(model)
            .is_ok_and(|c| c.any_input_size),
    })
}
