//! The masking settings a run's config carries (`[masking]`/`[ehm]` in a zoo TOML, the same in
//! a checkpoint's config.json): which strategy, and every EHM knob. They live beside the
//! strategies they configure; `config` re-exports them for the run configuration.
use super::{AffinityNorm, AffinitySource, GridNoise, Merge, ScheduleShape};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum MaskingKind {
    Random,
    Block,
    Grid,
    Ehm,
}

impl std::fmt::Display for MaskingKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MaskingKind::Random => "random",
            MaskingKind::Block => "block",
            MaskingKind::Grid => "grid",
            MaskingKind::Ehm => "ehm",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum TeacherKind {
    /// EMA of the student (half-life `ema_half_life`).
    Ema,
    /// The student itself, without gradients.
    Student,
}

/// EHM knobs (docs/ehm.md). Every choice a researcher ablates is here, so a run's config.json
/// says exactly which EHM it ran.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EhmConfig {
    pub teacher: TeacherKind,
    /// EMA half-life as a fraction of the run's optimizer steps: decay = 0.5^(1/(frac·steps)).
    /// EPM's 0.99996 at ImageNet scale is a 17k-step half-life, ≈ 2 % of an 800-epoch run.
    pub ema_half_life: f64,
    /// Absolute half-life in steps; overrides `ema_half_life` when set.
    pub ema_half_life_steps: Option<f64>,
    /// Encoder blocks the affinity is taken from; empty = all. The teacher stops after the
    /// last one it needs. Default: the first three (`first:3`) — on the photo benchmark the
    /// cut from blocks 0–2 scores as well as from all twelve and costs a quarter of the pass
    /// (docs/ehm.md, "Cost").
    pub affinity_blocks: Vec<usize>,
    /// What the affinity is made of (attention, attention profiles, token cosine).
    pub affinity: AffinitySource,
    /// Normalisation of the symmetrised affinity before the merge tree.
    pub affinity_norm: AffinityNorm,
    /// Merge only 4-adjacent segments (contiguous groups), or any two.
    pub merge: Merge,
    /// How the segment count falls from `start_segments` to `end_segments` over t.
    pub schedule: ScheduleShape,
    /// Segments of the cut at t = 0 (default: N / grid_cell², one per grid cell).
    pub start_segments: Option<usize>,
    /// Segments of the cut at t = 1 (default: max(2, round(N / 20)), EPM's 10 at N = 196).
    pub end_segments: Option<usize>,
    /// EPM's jitter: each image's cut has c + randint(0, jitter) segments (0 = none).
    pub segment_jitter: usize,
    /// α(t) = t^alpha_power weighs segment noise against grid noise (EPM: √t).
    pub alpha_power: f64,
    /// Mask ratio at t = 1 (linear from `mask_ratio` at t = 0); None = constant.
    pub mask_ratio_end: Option<f64>,
    /// Layout of the grid noise: EPM's parity classes (default) or whole cells.
    pub grid_noise: GridNoise,
    /// Period of the grid noise (2: parity classes of 2×2 cells).
    pub grid_cell: usize,
}

impl Default for EhmConfig {
    fn default() -> Self {
        EhmConfig {
            teacher: TeacherKind::Ema,
            ema_half_life: 0.02,
            ema_half_life_steps: None,
            affinity_blocks: vec![0, 1, 2],
            affinity: AffinitySource::Cosine,
            affinity_norm: AffinityNorm::Degree,
            merge: Merge::Adjacent,
            schedule: ScheduleShape::Geometric,
            start_segments: None,
            end_segments: None,
            segment_jitter: 0,
            alpha_power: 0.5,
            mask_ratio_end: None,
            grid_noise: GridNoise::Parity,
            grid_cell: 2,
        }
    }
}

impl EhmConfig {
    /// Set `affinity_blocks` from a spec — `all`, `first:K`, `last:K` or a comma list of block
    /// indices — for an encoder of `depth` blocks.
    pub fn set_affinity_blocks(&mut self, spec: &str, depth: usize) -> crate::Result<()> {
        let bad = || {
            crate::Error::Config(format!(
                "--affinity-blocks '{spec}': use all, first:K, last:K or a list like 0,1,2 (of {depth} blocks)"
            ))
        };
        let k = |v: &str| {
            v.parse::<usize>()
                .ok()
                .filter(|&k| (1..=depth).contains(&k))
                .ok_or_else(bad)
        };
        self.affinity_blocks = match spec.split_once(':') {
            None if spec == "all" => vec![],
            Some(("first", v)) => (0..k(v)?).collect(),
            Some(("last", v)) => (depth - k(v)?..depth).collect(),
            None => spec
                .split(',')
                .map(|b| b.trim().parse().ok().filter(|&b| b < depth).ok_or_else(bad))
                .collect::<crate::Result<_>>()?,
            _ => return Err(bad()),
        };
        Ok(())
    }

    /// The EMA half-life in steps for a run of `total_steps` (at least one step).
    pub fn half_life_steps(&self, total_steps: u64) -> f64 {
        self.ema_half_life_steps
            .unwrap_or(self.ema_half_life * total_steps as f64)
            .max(1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::EhmConfig;

    #[test]
    fn affinity_blocks_from_a_spec() {
        let mut c = EhmConfig::default();
        let mut set = |spec: &str| {
            c.set_affinity_blocks(spec, 12)
                .map(|_| c.affinity_blocks.clone())
        };
        assert_eq!(set("all").unwrap(), Vec::<usize>::new());
        assert_eq!(set("first:3").unwrap(), [0, 1, 2]);
        assert_eq!(set("last:2").unwrap(), [10, 11]);
        assert_eq!(set("0, 4,11").unwrap(), [0, 4, 11]);
        for bad in ["first:0", "last:13", "middle:2", "0,12", "x", ""] {
            let e = set(bad).unwrap_err().to_string();
            assert!(
                e.contains("--affinity-blocks") && e.contains("12 blocks"),
                "{bad}: {e}"
            );
        }
    }
}
