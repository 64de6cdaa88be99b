//! ehm: evolved hierarchical masking — pretrain ViTs, export to ONNX, serve with ONNX Runtime.
//!
//! Layers (arrows point down): tools → {train, export, infer, retrieval} → {model, masking,
//! eval} → data. Everything that needs libtorch is behind the `train` feature.
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
#[cfg(feature = "train")]
pub mod model;
pub mod picture;
pub mod pipeline;
pub mod progress;
pub mod retrieval;
#[cfg(feature = "train")]
pub mod train;

pub use error::{Error, Result};
