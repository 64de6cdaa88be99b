//! `--int8`: dynamic int8 quantization of a model's weight matrices, for CPUs with int8 dot
//! products (AVX-512 VNNI, AVX-VNNI, ARM dotprod), where a ViT runs about twice as fast.
//!
//! Every `MatMul` whose right-hand side is a 2-D float weight becomes ONNX Runtime's
//! `com.microsoft.DynamicQuantizeMatMul`: the weight is stored as int8, symmetric, with one
//! scale per output column (max |w| / `WEIGHT_MAX`); the activations are quantized to uint8 at
//! run time, one scale per call; a bias `Add` right after it is folded in.
//!
//! The weights use 7 bits (±63, ONNX Runtime's `reduce_range`), so that one file is exact on
//! every CPU: without VNNI, ONNX Runtime's x86 u8×s8 kernels (AVX2, AVX-512BW) multiply with
//! `vpmaddubsw`, which adds each *pair* of u8×s8 products in a saturating 16-bit integer.
//! With 8-bit weights a pair reaches 2·255·127 = 64770 and is clipped at 32767 (on an AVX2-only
//! EPYC the embedding cosine to fp32 fell to 0.984 and classifier logits moved by 4.6); with
//! weights within ±63 a pair stays within 2·255·63 = 32130, so no sum is ever clipped and the
//! result equals what the VNNI and ARM kernels compute. The cost is one bit of weight precision
//! (measured in docs/benchmarks.md, "int8 on every CPU"). What stays fp32: attention's
//! activation × activation products, the patch convolution, LayerNorm, softmax, GELU, and the
//! task heads (`HEADS`): a linear probe on a weak backbone separates classes by small feature
//! differences that one activation scale per call wipes out (Fashion-MNIST demo probe: top-1
//! 75.6 % fp32, 70.6 % with the head in int8, 74.6 % with it in fp32 — benches/int8_accuracy.sh),
//! and a head is a negligible share of the time.
//!
//! Because the activation scale is per call, an image's output depends a little on the other
//! images of its call; the serving tools therefore run quantized models one image per call
//! (`ContractConfig::quantization`), which costs nothing on a CPU.
use super::graph::raw_tensor;
use crate::contract::is_default_domain;
use crate::onnx::{tensor_proto::DataType, GraphProto, ModelProto, NodeProto, OperatorSetIdProto};
use std::collections::{HashMap, HashSet};

/// Weight-name prefixes of the task heads, which stay fp32.
pub const HEADS: [&str; 2] = ["head.", "seg_head."];

/// What `ehm.config` records for a model quantized here.
pub const INT8_DYNAMIC: &str = "int8-dynamic";
const MS_DOMAIN: &str = "com.microsoft";

/// Largest weight magnitude stored: 7 bits, so two u8×s8 products never overflow a 16-bit
/// sum (see the module comment).
pub const WEIGHT_MAX: f32 = 63.0;

/// Column-wise symmetric quantization of a row-major `[k, n]` matrix to integers within
/// ±`WEIGHT_MAX`: (values, scale per column).
pub fn quantize_columns(w: &[f32], k: usize, n: usize) -> (Vec<i8>, Vec<f32>) {
    let mut amax = vec![0f32; n];
    for row in w.chunks_exact(n).take(k) {
        for (m, v) in amax.iter_mut().zip(row) {
            *m = m.max(v.abs());
        }
    }
    let scale: Vec<f32> = amax
        .iter()
        .map(|&m| if m > 0.0 { m / WEIGHT_MAX } else { 1.0 })
        .collect();
    let q = w
        .chunks_exact(n)
        .flat_map(|row| {
            row.iter()
                .zip(&scale)
                .map(|(v, s)| (v / s).round().clamp(-WEIGHT_MAX, WEIGHT_MAX) as i8)
        })
        .collect();
    (q, scale)
}

/// A float initializer's values, when stored inline (raw bytes or `float_data`).
fn float_values(t: &crate::onnx::TensorProto) -> Option<Vec<f32>> {
    if t.data_type != Some(DataType::Float as i32) || !t.external_data.is_empty() {
        return None;
    }
    let want = t.dims.iter().product::<i64>() as usize;
    let v: Vec<f32> = match &t.raw_data {
        Some(raw) => crate::files::f32s_from_le(raw),
        None => t.float_data.clone(),
    };
    (v.len() == want).then_some(v)
}

/// Quantize `model`'s weight matrices in place (see the module comment), except those whose
/// names start with one of `keep_float` and those not stored inline as float (external data).
/// Returns how many MatMuls now run in int8.
pub fn dynamic_int8(model: &mut ModelProto, keep_float: &[&str]) -> usize {
    let mut quantized = 0;
    let Some(g) = model.graph.as_mut() else {
        return 0;
    };
    let init: HashMap<String, usize> = g
        .initializer
        .iter()
        .enumerate()
        .filter_map(|(i, t)| t.name.clone().map(|n| (n, i)))
        .collect();
    // how many nodes (or graph outputs) read each tensor
    let mut readers: HashMap<String, usize> = HashMap::new();
    for name in g
        .node
        .iter()
        .flat_map(|n| n.input.iter())
        .chain(g.output.iter().filter_map(|o| o.name.as_ref()))
    {
        *readers.entry(name.clone()).or_default() += 1;
    }
    let consumer: HashMap<String, usize> = g
        .node
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.input.iter().map(move |x| (x.clone(), i)))
        .collect();
    let mut done: HashMap<String, (String, String, i64)> = HashMap::new(); // weight → (q, scale, n)
    let mut new_inits = Vec::new();
    let mut folded: HashSet<usize> = HashSet::new();
    for i in 0..g.node.len() {
        let n = &g.node[i];
        if n.op_type.as_deref() != Some("MatMul")
            || !is_default_domain(n.domain.as_deref())
            || n.input.len() != 2
        {
            continue;
        }
        let w = n.input[1].clone();
        if keep_float.iter().any(|p| w.starts_with(p)) {
            continue;
        }
        let Some(&wi) = init.get(&w) else { continue };
        let t = &g.initializer[wi];
        if t.dims.len() != 2 {
            continue;
        }
        if !done.contains_key(&w) {
            let Some(values) = float_values(t) else {
                continue;
            };
            let (k, cols) = (t.dims[0] as usize, t.dims[1] as usize);
            let (q, scale) = quantize_columns(&values, k, cols);
            let (qn, sn) = (format!("{w}.int8"), format!("{w}.int8_scale"));
            new_inits.push(raw_tensor(
                &qn,
                &t.dims,
                DataType::Int8,
                q.iter().map(|&v| v as u8).collect(),
            ));
            new_inits.push(raw_tensor(
                &sn,
                &[cols as i64],
                DataType::Float,
                scale.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ));
            done.insert(w.clone(), (qn, sn, cols as i64));
        }
        let (qn, sn, cols) = done[&w].clone();
        let mut output = n.output[0].clone();
        let mut bias = None;
        // fold `y + b` (b a float vector of the output width) when the Add is y's only reader
        if readers.get(&output) == Some(&1) {
            if let Some(&ai) = consumer.get(&output) {
                let add = &g.node[ai];
                if add.op_type.as_deref() == Some("Add") && is_default_domain(add.domain.as_deref())
                {
                    let other = add.input.iter().find(|x| **x != output);
                    let is_bias = other.and_then(|b| init.get(b)).is_some_and(|&bi| {
                        let bt = &g.initializer[bi];
                        bt.dims == [cols] && bt.data_type == Some(DataType::Float as i32)
                    });
                    if is_bias && add.input.len() == 2 {
                        bias = other.cloned();
                        output = add.output[0].clone();
                        folded.insert(ai);
                    }
                }
            }
        }
        let a = n.input[0].clone();
        let name = n.name.clone();
        let mut inputs = vec![a, qn, sn];
        if let Some(b) = bias {
            inputs.extend([String::new(), b]);
        }
        g.node[i] = NodeProto {
            input: inputs,
            output: vec![output],
            name: name.map(|s| format!("{s}/int8")),
            op_type: Some("DynamicQuantizeMatMul".into()),
            domain: Some(MS_DOMAIN.into()),
            ..Default::default()
        };
        quantized += 1;
    }
    if quantized == 0 {
        return 0;
    }
    let mut i = 0;
    g.node.retain(|_| {
        i += 1;
        !folded.contains(&(i - 1))
    });
    g.initializer.extend(new_inits);
    prune(g);
    if !model
        .opset_import
        .iter()
        .any(|o| o.domain.as_deref() == Some(MS_DOMAIN))
    {
        model.opset_import.push(OperatorSetIdProto {
            domain: Some(MS_DOMAIN.into()),
            version: Some(1),
        });
    }
    quantized
}

/// Drop initializers and value_info no node or output reads any more (the float weights that
/// were quantized, the intermediate outputs of folded bias adds).
fn prune(g: &mut GraphProto) {
    let used: HashSet<String> = g
        .node
        .iter()
        .flat_map(|n| n.input.iter().chain(&n.output))
        .chain(g.output.iter().filter_map(|o| o.name.as_ref()))
        .cloned()
        .collect();
    g.initializer
        .retain(|t| used.contains(t.name.as_deref().unwrap_or("")));
    g.value_info
        .retain(|v| used.contains(v.name.as_deref().unwrap_or("")));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_round_trip_within_half_a_step() {
        let (k, n) = (5, 3);
        let w: Vec<f32> = (0..k * n)
            .map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.1)
            .collect();
        let w = [w, vec![0.0; n]].concat(); // a zero row
        let (q, s) = quantize_columns(&w, k + 1, n);
        for (i, (&v, &qv)) in w.iter().zip(&q).enumerate() {
            let back = qv as f32 * s[i % n];
            assert!(
                (back - v).abs() <= s[i % n] / 2.0 + 1e-7,
                "{i}: {v} → {back}"
            );
        }
        // the largest magnitude of each column maps to ±WEIGHT_MAX
        for c in 0..n {
            assert_eq!(
                (0..k).map(|r| q[r * n + c].unsigned_abs()).max(),
                Some(WEIGHT_MAX as u8)
            );
        }
        // an all-zero column gets scale 1 and zeros, not NaN
        let (q, s) = quantize_columns(&[0.0, 1.0, 0.0, -2.0], 2, 2);
        assert_eq!((q[0], q[2], s[0]), (0, 0, 1.0));
    }

    /// `vpmaddubsw` as ONNX Runtime's AVX2 / AVX-512BW u8×s8 kernels use it: each pair of
    /// u8×s8 products summed in a saturating i16, the i16s then widened and added in i32.
    fn avx2_dot(a: &[u8], w: &[i8]) -> i32 {
        a.chunks(2)
            .zip(w.chunks(2))
            .map(|(a, w)| {
                let pair: i32 = a.iter().zip(w).map(|(&x, &y)| x as i32 * y as i32).sum();
                pair.clamp(i16::MIN as i32, i16::MAX as i32)
            })
            .sum()
    }

    #[test]
    fn quantized_weights_are_exact_under_avx2_pair_saturation() {
        use rand::{Rng, SeedableRng};
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let (k, n) = (64, 8);
        // heavy-tailed weights, as trained ViT matrices have
        let w: Vec<f32> = (0..k * n)
            .map(|_| r.random::<f32>().powi(3) * if r.random() { 1.0 } else { -1.0 })
            .collect();
        let (q, _) = quantize_columns(&w, k, n);
        // the worst activations for each column: 255 where the weight is positive, else 0
        // (and the mirror image), which is what a saturating pair sum gets wrong first
        for c in 0..n {
            let col: Vec<i8> = (0..k).map(|row| q[row * n + c]).collect();
            for sign in [1i8, -1] {
                let a: Vec<u8> = col
                    .iter()
                    .map(|&v| if v.signum() == sign { 255 } else { 0 })
                    .collect();
                let exact: i32 = a.iter().zip(&col).map(|(&x, &y)| x as i32 * y as i32).sum();
                assert_eq!(avx2_dot(&a, &col), exact, "column {c}");
            }
        }
        // (8-bit weights would not be: a pair of 255·127 products is clipped)
        assert_ne!(avx2_dot(&[255, 255], &[127, 127]), 2 * 255 * 127);
    }
}
