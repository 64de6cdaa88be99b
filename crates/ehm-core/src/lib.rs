//! ehm-core: everything of ehm that does not need libtorch — the ONNX contract and export,
//! preprocessing and data readers, ONNX Runtime inference, the masking hierarchy, the retrieval
//! index — and the serving tools built on it (ehm-export, ehm-classify, ehm-segment,
//! ehm-retrieve), which therefore never link libtorch. Training lives in the `ehm` crate.
//!
//! Layers (arrows point down): tools → {export, infer, retrieval} → {masking, eval} → data.
pub mod args;
pub mod checkpoint;
pub mod config;
pub mod contract;
pub mod data;
pub mod error;
pub mod eval;
pub mod export;
pub mod fsutil;
pub mod infer;
pub mod masking;
pub mod output;
pub mod picture;
pub mod pipeline;
pub mod progress;
pub mod retrieval;

pub use error::{Error, Result};
