//! Model-zoo and run configuration (TOML in `models/`, JSON inside checkpoints).
use crate::data::Preprocess;
use crate::error::{Error, IoContext, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Vision Transformer + MAE decoder shape. Field names follow timm / MAE.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VitConfig {
    pub arch: String,
    pub image_size: u32,
    pub patch_size: u32,
    pub embed_dim: i64,
    pub depth: i64,
    pub num_heads: i64,
    #[serde(default = "mlp_ratio")]
    pub mlp_ratio: f64,
    pub decoder_embed_dim: i64,
    pub decoder_depth: i64,
    pub decoder_num_heads: i64,
}
fn mlp_ratio() -> f64 {
    4.0
}

impl VitConfig {
    /// The standard sizes (encoder as timm's vit_{tiny,small,base}; decoder as our reference).
    pub fn preset(arch: &str, image_size: u32, patch_size: u32) -> Result<Self> {
        let (d, depth, h, dd, ddepth, dh) = match arch {
            "vit_tiny" => (192, 12, 3, 128, 4, 4),
            "vit_small" => (384, 12, 6, 256, 4, 8),
            "vit_base" => (768, 12, 12, 512, 8, 16),
            "vit_micro" => (64, 2, 2, 32, 1, 2), // for tests
            _ => {
                return Err(Error::Config(format!(
                    "unknown arch '{arch}' (vit_tiny, vit_small, vit_base)"
                )))
            }
        };
        let c = VitConfig {
            arch: arch.into(),
            image_size,
            patch_size,
            embed_dim: d,
            depth,
            num_heads: h,
            mlp_ratio: 4.0,
            decoder_embed_dim: dd,
            decoder_depth: ddepth,
            decoder_num_heads: dh,
        };
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<()> {
        if self.patch_size == 0 || !self.image_size.is_multiple_of(self.patch_size) {
            return Err(Error::Config(format!(
                "image_size {} is not a multiple of patch_size {}",
                self.image_size, self.patch_size
            )));
        }
        for (dim, heads, what) in [
            (self.embed_dim, self.num_heads, "embed_dim/num_heads"),
            (
                self.decoder_embed_dim,
                self.decoder_num_heads,
                "decoder_embed_dim/decoder_num_heads",
            ),
        ] {
            if heads <= 0 || dim % heads != 0 || dim % 4 != 0 {
                return Err(Error::Config(format!(
                    "{what} = {dim}/{heads}: dim must be divisible by heads and by 4"
                )));
            }
        }
        Ok(())
    }

    pub fn grid(&self) -> usize {
        (self.image_size / self.patch_size) as usize
    }
    pub fn num_patches(&self) -> usize {
        self.grid() * self.grid()
    }
    pub fn patch_dim(&self) -> i64 {
        (self.patch_size * self.patch_size * 3) as i64
    }
}

pub use crate::masking::{
    AffinityNorm, AffinitySource, EhmConfig, GridNoise, MaskingKind, Merge, ScheduleShape,
    TeacherKind,
};

/// Pretraining recipe (MAE defaults).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PretrainConfig {
    pub data: String,
    /// Use only this many images of the data set (0 = all): a fixed seeded subset.
    pub limit: usize,
    pub epochs: f64,
    /// Images per forward pass (MAE's per-GPU `batch_size`).
    pub batch_size: usize,
    /// Gradient accumulation (MAE's `accum_iter`): one optimizer step per this many forward
    /// passes. The step's images, masks and gradient are those of one batch of
    /// `batch_size × accum_steps` (`effective_batch`), computed in pieces.
    pub accum_steps: usize,
    pub blr: f64,
    pub min_lr: f64,
    pub warmup_epochs: f64,
    pub weight_decay: f64,
    pub clip_grad: f64,
    pub mask_ratio: f64,
    pub masking: MaskingKind,
    pub norm_pix_loss: bool,
    pub seed: u64,
    pub ehm: EhmConfig,
    pub augment: crate::data::Augment,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        PretrainConfig {
            data: "fashion-mnist:train".into(),
            limit: 0,
            epochs: 1.0,
            batch_size: 256,
            accum_steps: 1,
            blr: 1.5e-4,
            min_lr: 0.0,
            warmup_epochs: 0.1,
            weight_decay: 0.05,
            clip_grad: 1.0,
            mask_ratio: 0.75,
            masking: MaskingKind::Ehm,
            norm_pix_loss: true,
            seed: 0,
            ehm: EhmConfig::default(),
            augment: crate::data::Augment::default(),
        }
    }
}

/// Command-line overrides of a zoo entry's pretraining recipe (`None`: keep the entry's value).
#[derive(Clone, Debug, Default)]
pub struct RecipeOverrides {
    pub data: Option<String>,
    pub limit: Option<usize>,
    pub epochs: Option<f64>,
    pub batch_size: Option<usize>,
    pub accum_steps: Option<usize>,
    pub blr: Option<f64>,
    pub warmup_epochs: Option<f64>,
    pub masking: Option<MaskingKind>,
    pub mask_ratio: Option<f64>,
    pub seed: Option<u64>,
}

impl PretrainConfig {
    /// Take the values `o` gives (the rest stay); `validate` checks the result.
    pub fn apply(&mut self, o: RecipeOverrides) {
        fn set<T>(field: &mut T, v: Option<T>) {
            if let Some(v) = v {
                *field = v;
            }
        }
        set(&mut self.data, o.data);
        set(&mut self.limit, o.limit);
        set(&mut self.epochs, o.epochs);
        set(&mut self.batch_size, o.batch_size);
        set(&mut self.accum_steps, o.accum_steps);
        set(&mut self.blr, o.blr);
        set(&mut self.warmup_epochs, o.warmup_epochs);
        set(&mut self.masking, o.masking);
        set(&mut self.mask_ratio, o.mask_ratio);
        set(&mut self.seed, o.seed);
    }

    /// Images per optimizer step: `batch_size × accum_steps` (the lr scales with it).
    pub fn effective_batch(&self) -> usize {
        self.batch_size * self.accum_steps
    }
}

impl PretrainConfig {
    /// Check every number of the recipe (zoo files and command-line overrides both end here);
    /// the message names the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if !(self.mask_ratio > 0.0 && self.mask_ratio < 1.0) {
            return bad(format!(
                "mask_ratio must be between 0 and 1 (exclusive), got {}",
                self.mask_ratio
            ));
        }
        if self.batch_size == 0 {
            return bad("batch_size must be at least 1".into());
        }
        if self.accum_steps == 0 {
            return bad("accum_steps must be at least 1".into());
        }
        for (name, v) in [
            ("epochs", self.epochs),
            ("blr", self.blr),
            ("ehm.ema_half_life", self.ehm.ema_half_life),
            (
                "ehm.ema_half_life_steps",
                self.ehm.ema_half_life_steps.unwrap_or(1.0),
            ),
            ("ehm.alpha_power", self.ehm.alpha_power),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return bad(format!("{name} must be a finite number above 0, got {v}"));
            }
        }
        for (name, v) in [
            ("min_lr", self.min_lr),
            ("warmup_epochs", self.warmup_epochs),
            ("weight_decay", self.weight_decay),
            ("clip_grad", self.clip_grad),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(format!("{name} must be a finite number ≥ 0, got {v}"));
            }
        }
        if let Some(r) = self.ehm.mask_ratio_end {
            if !(r > 0.0 && r < 1.0) {
                return bad(format!(
                    "ehm.mask_ratio_end must be between 0 and 1 (exclusive), got {r}"
                ));
            }
        }
        if self.ehm.grid_cell == 0 {
            return bad("ehm.grid_cell must be at least 1".into());
        }
        if self.ehm.start_segments == Some(0) || self.ehm.end_segments == Some(0) {
            return bad("ehm.start_segments / end_segments must be at least 1".into());
        }
        Ok(())
    }
}

/// A zoo entry: `models/<name>.toml`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZooEntry {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub model: ZooModel,
    pub preprocess: Preprocess,
    #[serde(default)]
    pub pretrain: PretrainConfig,
}

/// The architecture part of a zoo entry: a preset plus optional overrides.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZooModel {
    pub arch: String,
    pub patch_size: u32,
    #[serde(default)]
    pub depth: Option<i64>,
    #[serde(default)]
    pub decoder_depth: Option<i64>,
}

impl ZooEntry {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).at(path)?;
        let e: ZooEntry =
            toml::from_str(&text).map_err(|e| Error::bad_file(path, e.message().to_string()))?;
        e.preprocess.validate()?;
        e.pretrain.validate()?;
        e.vit()?;
        Ok(e)
    }

    /// Find a zoo entry by name (in `models/`) or load a TOML path.
    pub fn find(name_or_path: &str) -> Result<Self> {
        let p = Path::new(name_or_path);
        if p.extension().is_some_and(|e| e == "toml") || p.exists() {
            return Self::load(p);
        }
        let zoo = std::env::var("EHM_MODELS")
            .map(Into::into)
            .unwrap_or_else(|_| crate::files::project_dir("models"));
        let cand = zoo.join(format!("{name_or_path}.toml"));
        if cand.exists() {
            return Self::load(&cand);
        }
        let mut names: Vec<String> = std::fs::read_dir(&zoo)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| {
                        e.path()
                            .file_stem()
                            .map(|s| s.to_string_lossy().into_owned())
                    })
                    .filter(|n| zoo.join(format!("{n}.toml")).exists())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        Err(Error::Config(format!(
            "no zoo entry '{name_or_path}' (known: {})",
            names.join(", ")
        )))
    }

    pub fn vit(&self) -> Result<VitConfig> {
        let mut v = VitConfig::preset(
            &self.model.arch,
            self.preprocess.image_size,
            self.model.patch_size,
        )?;
        if let Some(d) = self.model.depth {
            v.depth = d;
        }
        if let Some(d) = self.model.decoder_depth {
            v.decoder_depth = d;
        }
        v.validate()?;
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_replace_only_what_they_give() {
        let mut p = PretrainConfig::default();
        let before = p.clone();
        p.apply(RecipeOverrides {
            epochs: Some(3.5),
            masking: Some(MaskingKind::Block),
            seed: Some(7),
            ..Default::default()
        });
        assert_eq!((p.epochs, p.masking, p.seed), (3.5, MaskingKind::Block, 7));
        let restored = PretrainConfig {
            epochs: before.epochs,
            masking: before.masking,
            seed: before.seed,
            ..p.clone()
        };
        assert_eq!(restored, before, "nothing else changed");
        p.apply(RecipeOverrides::default());
        assert_eq!(p.epochs, 3.5, "no override keeps the value");
    }

    #[test]
    fn zoo_entries_parse() {
        let zoo = std::env::var("EHM_MODELS")
            .map(Into::into)
            .unwrap_or_else(|_| crate::files::project_dir("models"));
        let mut n = 0;
        for e in std::fs::read_dir(&zoo).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                let z = ZooEntry::load(&p).unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(
                    Some(z.name.as_str()),
                    p.file_stem().and_then(|s| s.to_str())
                );
                n += 1;
            }
        }
        assert!(n >= 2);
    }

    #[test]
    fn the_in1k_entry_is_maes_recipe() {
        let z =
            ZooEntry::load(&crate::files::project_dir("models").join("vit_base_p16_224_in1k.toml"))
                .unwrap();
        let p = &z.pretrain;
        p.validate().unwrap();
        // 8 processes make MAE's effective batch of 4096, lr = 1.5e-4 × 4096 / 256
        assert_eq!(p.effective_batch() * 8, 4096);
        assert!((p.blr * 4096.0 / 256.0 - 2.4e-3).abs() < 1e-12);
        assert_eq!((p.epochs, p.warmup_epochs), (800.0, 40.0));
        assert_eq!(
            (p.weight_decay, p.clip_grad, p.mask_ratio),
            (0.05, 0.0, 0.75)
        );
        assert!(p.norm_pix_loss);
        assert_eq!(
            (z.vit().unwrap().image_size, z.vit().unwrap().patch_size),
            (224, 16)
        );
    }

    #[test]
    fn rejects_bad_geometry() {
        assert!(VitConfig::preset("vit_tiny", 30, 4).is_err());
        assert!(VitConfig::preset("vit_huge", 32, 4).is_err());
        assert_eq!(
            VitConfig::preset("vit_small", 224, 16)
                .unwrap()
                .num_patches(),
            196
        );
    }
}
