//! ehm-core: everything of ehm that does not need libtorch — the ONNX contract and export,
//! preprocessing and data readers, ONNX Runtime inference, the masking hierarchy, the retrieval
//! index — and the serving tools built on it (ehm-export, ehm-classify, ehm-segment,
//! ehm-retrieve), which therefore never link libtorch. Training lives in the `ehm` crate.
//!
//! Layers (every arrow points down; no module imports one above it, none imports in a circle):
//! - tools → {export, retrieval, segmentation}
//! - segmentation → {pipeline, draw}
//! - retrieval → pipeline → infer → contract → onnx (the generated protobuf schema)
//! - export → {checkpoint, infer, contract, onnx}; checkpoint → config → {masking, data}
//! - masking → draw; data → files → error
//! - leaves used from anywhere: args, eval, output, progress
//!
//! The library knows nothing of clap: the tools' `ValueEnum`s on its enums are behind the
//! default `cli` feature (`tests/layers.rs` checks it).
pub mod args;
pub mod checkpoint;
pub mod config;
pub mod contract;
pub mod data;
pub mod draw;
pub mod error;
pub mod eval;
pub mod export;
pub mod files;
pub mod infer;
pub mod masking;
/// The ONNX protobuf schema (prost types generated from the official onnx.proto by
/// tools/onnx-codegen): read by the contract and inference, written by export.
#[rustfmt::skip]
pub mod onnx;
pub mod output;
pub mod pipeline;
pub mod progress;
pub mod retrieval;
pub mod segmentation;

pub use error::{Error, Result};
