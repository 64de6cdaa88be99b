//! The learning-rate schedule every trainer uses (pretraining, fine-tuning, segmentation heads,
//! the linear probe): MAE's linear warm-up, then a half-cycle cosine down to a floor.

/// Learning rate at `step` (0-based) of `total`: `base · (step+1)/warmup` during the first
/// `warmup` steps, then `min_lr + (base − min_lr) · ½(1 + cos(π·p))` with p the share of the
/// remaining steps done (held at `min_lr` past `total`).
pub fn warmup_cosine(step: u64, total: u64, warmup: u64, base: f64, min_lr: f64) -> f64 {
    let s = step as f64;
    if s < warmup as f64 {
        return base * (s + 1.0) / warmup as f64;
    }
    let p = (s - warmup as f64) / (total.saturating_sub(warmup).max(1) as f64);
    min_lr + (base - min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * p.min(1.0)).cos())
}

#[cfg(test)]
mod tests {
    use super::warmup_cosine;

    #[test]
    fn warms_up_linearly_then_falls_as_a_cosine_to_the_floor() {
        let (total, warmup, base, min) = (100, 10, 1e-3, 1e-5);
        let lr = |s| warmup_cosine(s, total, warmup, base, min);
        assert!((lr(0) - base / 10.0).abs() < 1e-12);
        assert!((lr(4) - base * 0.5).abs() < 1e-12);
        assert!((lr(10) - base).abs() < 1e-12, "peak right after warm-up");
        assert!(
            (lr(55) - (min + (base - min) * 0.5)).abs() < 1e-12,
            "half-way"
        );
        assert!((lr(100) - min).abs() < 1e-12 && (lr(500) - min).abs() < 1e-12);
        assert!((10..100).all(|s| lr(s + 1) <= lr(s)), "falls monotonically");
        // no warm-up (the probe): starts at base; a warm-up longer than the run does not panic
        assert!((warmup_cosine(0, 50, 0, 0.1, 0.0) - 0.1).abs() < 1e-12);
        assert!(warmup_cosine(5, 3, 10, 0.1, 0.0) > 0.0);
    }
}
