//! Progress bars on stderr (indicatif hides them when stderr is not a terminal), so stdout
//! stays clean data.

/// A bar for `total` items, starting at `start`; hidden when `show` is false.
pub fn bar_from(total: u64, start: u64, show: bool) -> indicatif::ProgressBar {
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

/// A bar for `total` items.
pub fn bar(total: u64) -> indicatif::ProgressBar {
    bar_from(total, 0, true)
}

/// A bar over `inputs` files: shown when `show` and there are more of them than a screenful of
/// per-file lines (40), so a handful of inputs does not flash a bar.
pub fn inputs_bar(inputs: usize, show: bool) -> indicatif::ProgressBar {
    bar_from(inputs as u64, 0, show && inputs > 40)
}
