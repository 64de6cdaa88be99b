//! ehm: evolved hierarchical masking — pretrain ViTs (libtorch via tch), export to ONNX,
//! serve with ONNX Runtime.
//!
//! Two crates, ripgrep-style: `ehm-core` (crates/ehm-core) holds everything that runs without
//! libtorch and the serving tools; this crate adds the model and the trainers (`model`,
//! `train`, the ehm-train tool) and re-exports ehm-core's modules, so `ehm::data`,
//! `ehm::export`, … name the same things from either side.
pub use ehm_core::{
    args, checkpoint, config, contract, data, draw, error, eval, export, files, infer, masking,
    onnx, output, pipeline, progress, retrieval, segmentation, Error, Result,
};
pub mod model;
pub mod train;
