//! Training (libtorch): the pretraining engine, its data loader, checkpoints and benchmarks.
pub mod bench;
pub mod checkpoint;
pub mod engine;
pub mod features;
pub mod finetune;
pub mod loader;
pub mod optim;
pub mod pretrain;
pub mod probe;
pub mod segment;
pub mod supervised;

pub use pretrain::{pretrain, PretrainOptions, Summary};

/// A progress bar on stderr (hidden when stderr is not a terminal or `show` is false).
pub fn progress_bar(total: u64, start: u64, show: bool) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(total),
        indicatif::ProgressDrawTarget::stderr(),
    );
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg} ETA {eta}",
        )
        .unwrap(),
    );
    bar.set_position(start);
    bar
}
