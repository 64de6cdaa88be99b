//! MAE's fine-tuning batch regularisers, on the normalised batch on the device, as timm does
//! them: RandomErasing (`reprob`, "pixel" mode: a rectangle of 2–33 % of the image, aspect
//! 0.3–3.3, filled with N(0, 1) noise) per image, then Mixup / CutMix per batch (one λ for the
//! batch, the batch mixed with itself reversed; CutMix with probability `switch_prob` when
//! both are on; λ corrected to the pasted box's area) with label-smoothed soft targets.
//! The choices are seeded by (seed, step), so a resumed run draws the same ones.
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Regularise {
    /// Mixup's Beta(α, α) (0 = off); MAE: 0.8.
    pub mixup: f64,
    /// CutMix's Beta(α, α) (0 = off); MAE: 1.0.
    pub cutmix: f64,
    /// With both on, the chance a batch uses CutMix.
    pub switch_prob: f64,
    /// RandomErasing probability per image; MAE: 0.25.
    pub reprob: f64,
}

impl Regularise {
    pub const OFF: Regularise = Regularise {
        mixup: 0.0,
        cutmix: 0.0,
        switch_prob: 0.5,
        reprob: 0.0,
    };

    pub fn mixes(&self) -> bool {
        self.mixup > 0.0 || self.cutmix > 0.0
    }
}

fn rng_at(seed: u64, step: u64) -> ChaCha8Rng {
    let mut r = ChaCha8Rng::seed_from_u64(seed ^ 0x6d69_7875_705f_6375);
    r.set_stream(step);
    r
}

/// A Beta(α, α) draw from two Gamma(α) draws (Marsaglia–Tsang; α < 1 by the boost
/// Gamma(α) = Gamma(α + 1) · U^(1/α)).
fn beta(alpha: f64, r: &mut impl Rng) -> f64 {
    let gamma = |r: &mut dyn rand::RngCore| -> f64 {
        let (a, boost) = if alpha < 1.0 {
            (alpha + 1.0, r.random::<f64>().max(1e-300).powf(1.0 / alpha))
        } else {
            (alpha, 1.0)
        };
        let d = a - 1.0 / 3.0;
        let c = 1.0 / (9.0 * d).sqrt();
        loop {
            let (u1, u2): (f64, f64) = (r.random::<f64>().max(1e-300), r.random());
            let x = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
            let v = (1.0 + c * x).powi(3);
            if v <= 0.0 {
                continue;
            }
            let u: f64 = r.random::<f64>().max(1e-300);
            if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
                return d * v * boost;
            }
        }
    };
    let (x, y) = (gamma(r), gamma(r));
    x / (x + y)
}

/// RandomErasing in place on `imgs` `[B, C, H, W]` (normalised).
pub fn random_erase(imgs: &Tensor, prob: f64, seed: u64, step: u64) {
    if prob <= 0.0 {
        return;
    }
    let size = imgs.size();
    let (b, c, h, w) = (size[0], size[1], size[2], size[3]);
    let mut r = rng_at(seed ^ 0x7265_7072_6f62, step);
    let area = (h * w) as f64;
    for i in 0..b {
        if !r.random_bool(prob.min(1.0)) {
            continue;
        }
        for _ in 0..10 {
            let target = area * r.random_range(0.02..1.0 / 3.0);
            let aspect = r.random_range((0.3f64).ln()..(1.0 / 0.3f64).ln()).exp();
            let eh = (target * aspect).sqrt().round() as i64;
            let ew = (target / aspect).sqrt().round() as i64;
            if eh < h && ew < w && eh > 0 && ew > 0 {
                let top = r.random_range(0..=h - eh);
                let left = r.random_range(0..=w - ew);
                let noise = Tensor::randn([c, eh, ew], (imgs.kind(), imgs.device()));
                tch::no_grad(|| {
                    imgs.get(i)
                        .narrow(1, top, eh)
                        .narrow(2, left, ew)
                        .copy_(&noise)
                });
                break;
            }
        }
    }
}

/// Mixup or CutMix the batch in place (when `cfg` mixes) and return the soft targets
/// `[B, classes]` (label smoothing `smoothing`), and λ (1 = not mixed).
pub fn mix_batch(
    imgs: &mut Tensor,
    labels: &Tensor,
    classes: i64,
    smoothing: f64,
    cfg: &Regularise,
    seed: u64,
    step: u64,
) -> (Tensor, f64) {
    let mut r = rng_at(seed, step);
    let mut lam = 1.0;
    if cfg.mixes() {
        let cut = if cfg.mixup > 0.0 && cfg.cutmix > 0.0 {
            r.random_bool(cfg.switch_prob)
        } else {
            cfg.cutmix > 0.0
        };
        lam = beta(if cut { cfg.cutmix } else { cfg.mixup }, &mut r);
        let flipped = imgs.flip([0]);
        if cut {
            let size = imgs.size();
            let (h, w) = (size[2], size[3]);
            let ratio = (1.0 - lam).sqrt();
            let (ch, cw) = ((h as f64 * ratio) as i64, (w as f64 * ratio) as i64);
            let (cy, cx) = (r.random_range(0..h), r.random_range(0..w));
            let (yl, yh) = ((cy - ch / 2).clamp(0, h), (cy + ch / 2).clamp(0, h));
            let (xl, xh) = ((cx - cw / 2).clamp(0, w), (cx + cw / 2).clamp(0, w));
            if yh > yl && xh > xl {
                tch::no_grad(|| {
                    imgs.narrow(2, yl, yh - yl)
                        .narrow(3, xl, xh - xl)
                        .copy_(&flipped.narrow(2, yl, yh - yl).narrow(3, xl, xh - xl))
                });
            }
            lam = 1.0 - ((yh - yl) * (xh - xl)) as f64 / (h * w) as f64;
        } else {
            *imgs = &*imgs * lam + flipped * (1.0 - lam);
        }
    }
    let off = smoothing / classes as f64;
    let on = 1.0 - smoothing + off;
    let one_hot = |l: &Tensor| l.one_hot(classes).to_kind(Kind::Float) * (on - off) + off;
    let targets = if lam < 1.0 {
        one_hot(labels) * lam + one_hot(&labels.flip([0])) * (1.0 - lam)
    } else {
        one_hot(labels)
    };
    (targets, lam)
}

/// timm's SoftTargetCrossEntropy: mean over the batch of −Σ target · log softmax(logits).
pub fn soft_cross_entropy(logits: &Tensor, targets: &Tensor) -> Tensor {
    (-(targets * logits.log_softmax(-1, Kind::Float)))
        .sum_dim_intlist(-1, false, Kind::Float)
        .mean(Kind::Float)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beta_draws_have_the_right_mean_and_spread() {
        let mut r = ChaCha8Rng::seed_from_u64(1);
        for alpha in [0.8, 1.0] {
            let v: Vec<f64> = (0..20000).map(|_| beta(alpha, &mut r)).collect();
            let mean = v.iter().sum::<f64>() / v.len() as f64;
            let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64;
            // Beta(α, α): mean ½, variance 1 / (4 (2α + 1))
            assert!((mean - 0.5).abs() < 0.01, "{alpha}: {mean}");
            let want = 1.0 / (4.0 * (2.0 * alpha + 1.0));
            assert!((var - want).abs() < 0.005, "{alpha}: {var} vs {want}");
        }
    }

    #[test]
    fn mixup_and_cutmix_targets_match_the_pixels() {
        let labels = Tensor::from_slice(&[0i64, 1, 2, 3]);
        // image i is the constant i
        let base = Tensor::arange(4, (Kind::Float, tch::Device::Cpu)).view([4, 1, 1, 1])
            * Tensor::ones([4, 3, 8, 8], (Kind::Float, tch::Device::Cpu));
        let mixup = Regularise {
            mixup: 0.8,
            ..Regularise::OFF
        };
        let mut imgs = base.copy();
        let (t, lam) = mix_batch(&mut imgs, &labels, 4, 0.0, &mixup, 0, 5);
        assert!(lam > 0.0 && lam < 1.0);
        // image 0 = λ·0 + (1 − λ)·3, its target λ on class 0, 1 − λ on class 3
        assert!((imgs.double_value(&[0, 0, 0, 0]) - 3.0 * (1.0 - lam)).abs() < 1e-5);
        assert!((t.double_value(&[0, 0]) - lam).abs() < 1e-6);
        assert!((t.double_value(&[0, 3]) - (1.0 - lam)).abs() < 1e-6);
        let sums = Vec::<f32>::try_from(t.sum_dim_intlist(-1, false, Kind::Float)).unwrap();
        assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5));

        let cutmix = Regularise {
            cutmix: 1.0,
            ..Regularise::OFF
        };
        let mut seen_cut = false;
        for step in 0..20 {
            let mut imgs = base.copy();
            let (t, lam) = mix_batch(&mut imgs, &labels, 4, 0.1, &cutmix, 0, step);
            // the share of image 0's pixels that came from image 3 is exactly 1 − λ
            let from3 = imgs
                .get(0)
                .eq(3.0)
                .to_kind(Kind::Float)
                .mean(Kind::Float)
                .double_value(&[]);
            assert!(
                (from3 - (1.0 - lam)).abs() < 1e-6,
                "step {step}: {from3} vs {}",
                1.0 - lam
            );
            // smoothing 0.1 over 4 classes: 0.025 off, 0.925 on, mixed by λ
            let want = 0.925 * lam + 0.025 * (1.0 - lam);
            assert!((t.double_value(&[0, 0]) - want).abs() < 1e-6);
            seen_cut |= lam < 1.0;
        }
        assert!(seen_cut);
        // the same (seed, step) draws the same
        let (mut a, mut b) = (base.copy(), base.copy());
        let _ = mix_batch(&mut a, &labels, 4, 0.0, &cutmix, 7, 3);
        let _ = mix_batch(&mut b, &labels, 4, 0.0, &cutmix, 7, 3);
        assert!(a.equal(&b));
    }

    #[test]
    fn erasing_fills_a_rectangle_of_about_the_right_share() {
        let imgs = Tensor::zeros([64, 3, 32, 32], (Kind::Float, tch::Device::Cpu));
        random_erase(&imgs, 0.25, 0, 1);
        let erased: Vec<f64> = (0..64)
            .map(|i| {
                imgs.get(i)
                    .ne(0.0)
                    .to_kind(Kind::Float)
                    .mean(Kind::Float)
                    .double_value(&[])
            })
            .collect();
        let hit = erased.iter().filter(|&&e| e > 0.0).count();
        assert!((6..=28).contains(&hit), "{hit} of 64 erased at p = 0.25");
        assert!(erased.iter().all(|&e| e <= 0.4), "{erased:?}");
        assert!(
            erased.iter().filter(|&&e| e > 0.0).all(|&e| e >= 0.015),
            "{erased:?}"
        );
    }

    #[test]
    fn soft_cross_entropy_is_cross_entropy_for_one_hot_targets() {
        let logits = Tensor::from_slice(&[1.0f32, 2.0, 0.5, -1.0, 0.0, 3.0]).view([2, 3]);
        let labels = Tensor::from_slice(&[1i64, 2]);
        let hard = logits.cross_entropy_for_logits(&labels).double_value(&[]);
        let soft =
            soft_cross_entropy(&logits, &labels.one_hot(3).to_kind(Kind::Float)).double_value(&[]);
        assert!((hard - soft).abs() < 1e-6);
    }
}
