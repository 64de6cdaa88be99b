//! Training (libtorch): the pretraining engine, its data loader, checkpoints and benchmarks.
pub mod checkpoint;
pub mod dist;
pub mod engine;
pub mod features;
pub mod finetune;
pub mod hierarchy;
pub mod inspect;
pub mod launch;
pub mod loader;
pub mod mix;
pub mod optim;
pub mod pretrain;
pub mod probe;
pub mod schedule;
pub mod segment;
pub mod segment_onnx;
pub mod speed;
pub mod supervised;

pub use pretrain::{pretrain, PretrainOptions, Summary};

/// A progress bar on stderr (hidden when stderr is not a terminal or `show` is false).
pub fn progress_bar(total: u64, start: u64, show: bool) -> indicatif::ProgressBar {
    crate::progress::bar_from(total, start, show)
}
