//! A small builder over the generated ONNX types: named initializers, nodes with fresh output
//! names, attributes. Initializers are stored as little-endian `raw_data`.
use crate::onnx::{
    attribute_proto::AttributeType, tensor_proto::DataType, AttributeProto, NodeProto, TensorProto,
};

#[derive(Default)]
pub struct Graph {
    pub nodes: Vec<NodeProto>,
    pub initializers: Vec<TensorProto>,
    counter: usize,
    /// Store float weights as fp16 (half the file) and cast them to fp32 in the graph.
    pub fp16_weights: bool,
}

/// An initializer from little-endian bytes.
pub fn raw_tensor(name: &str, dims: &[i64], dtype: DataType, raw: Vec<u8>) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(dtype as i32),
        raw_data: Some(raw),
        ..Default::default()
    }
}

pub fn attr_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(v),
        ..Default::default()
    }
}
pub fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Ints as i32),
        ints: v.to_vec(),
        ..Default::default()
    }
}
pub fn attr_float(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Float as i32),
        f: Some(v),
        ..Default::default()
    }
}

pub fn attr_string(name: &str, v: &str) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::String as i32),
        s: Some(v.as_bytes().to_vec()),
        ..Default::default()
    }
}

impl Graph {
    pub fn new(fp16_weights: bool) -> Self {
        Graph {
            fp16_weights,
            ..Default::default()
        }
    }

    /// Store an initializer from little-endian bytes.
    fn init_raw(&mut self, name: &str, dims: &[i64], dtype: DataType, raw: Vec<u8>) {
        self.initializers.push(raw_tensor(name, dims, dtype, raw));
    }

    /// A float initializer (stored as fp16 + a Cast node when `fp16_weights`).
    pub fn init_f32(&mut self, name: &str, dims: &[i64], data: &[f32]) -> String {
        assert_eq!(
            dims.iter().product::<i64>() as usize,
            data.len(),
            "initializer {name}: dims vs data"
        );
        if self.fp16_weights && data.len() > 1 {
            let stored = format!("{name}.fp16");
            let raw = data
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect();
            self.init_raw(&stored, dims, DataType::Float16, raw);
            self.op_named(
                "Cast",
                &[&stored],
                vec![attr_int("to", DataType::Float as i64)],
                name,
            );
        } else {
            self.init_raw(
                name,
                dims,
                DataType::Float,
                data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            );
        }
        name.into()
    }

    /// An int64 initializer (shapes, axes, indices).
    pub fn init_i64(&mut self, name: &str, dims: &[i64], data: &[i64]) -> String {
        self.init_raw(
            name,
            dims,
            DataType::Int64,
            data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        );
        name.into()
    }

    /// Add a node; returns its (single) output name, derived from `hint`.
    pub fn op(
        &mut self,
        op: &str,
        inputs: &[&str],
        attrs: Vec<AttributeProto>,
        hint: &str,
    ) -> String {
        self.counter += 1;
        let out = format!("{hint}/{op}_{}", self.counter);
        self.op_named(op, inputs, attrs, &out);
        out
    }

    /// Add a node whose output has a fixed name (graph outputs).
    pub fn op_named(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>, out: &str) {
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.to_string()],
            name: Some(out.to_string()),
            op_type: Some(op.into()),
            attribute: attrs,
            ..Default::default()
        });
    }
}
