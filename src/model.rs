//! The ViT encoder and MAE decoder in tch, read as the algorithm (after MAE's models_mae.py):
//! patchify → encoder on visible tokens → decoder with mask tokens → normalised-pixel loss on
//! masked patches; plus the teacher's affinity pass that EHM masks follow.
//!
//! Parameter names are timm's `VisionTransformer` / MAE's (`blocks.0.attn.qkv.weight`,
//! `decoder_blocks.0.mlp.fc1.bias`, ...), so our checkpoints load in Python unchanged.
use crate::config::VitConfig;
use crate::masking::AffinitySource;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

/// Load libtorch_cuda so CUDA is visible (rustc links `--as-needed` and drops it), then pick
/// CUDA when present, CPU otherwise. `EHM_DEVICE=cpu` forces the CPU.
pub fn default_device() -> Device {
    load_cuda_backend();
    if std::env::var("EHM_DEVICE").is_ok_and(|v| v == "cpu") {
        return Device::Cpu;
    }
    if tch::Cuda::is_available() {
        Device::Cuda(0)
    } else {
        Device::Cpu
    }
}

fn load_cuda_backend() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for lib in [c"libtorch_cuda.so"] {
            // SAFETY: dlopen with a valid C string; a null result just means no CUDA build.
            unsafe {
                libc::dlopen(lib.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL);
            }
        }
    });
}

/// 2-D sine-cosine position embedding `[1, 1 + g², dim]`, zero row for the class token (MAE).
pub fn sincos_pos_embed(dim: i64, grid: i64) -> Tensor {
    let quarter = dim / 4;
    let omega: Vec<f64> = (0..quarter)
        .map(|i| 1.0 / 10000f64.powf(i as f64 / quarter as f64))
        .collect();
    let mut out = vec![0f32; ((1 + grid * grid) * dim) as usize];
    for y in 0..grid {
        for x in 0..grid {
            let row =
                &mut out[((1 + y * grid + x) * dim) as usize..((2 + y * grid + x) * dim) as usize];
            for (part, pos) in [(0, x as f64), (1, y as f64)] {
                for (i, w) in omega.iter().enumerate() {
                    let base = part * 2 * quarter as usize;
                    row[base + i] = (pos * w).sin() as f32;
                    row[base + quarter as usize + i] = (pos * w).cos() as f32;
                }
            }
        }
    }
    Tensor::from_slice(&out).view([1, 1 + grid * grid, dim])
}

fn ln(p: nn::Path, dim: i64) -> nn::LayerNorm {
    nn::layer_norm(
        p,
        vec![dim],
        nn::LayerNormConfig {
            eps: 1e-6,
            ..Default::default()
        },
    )
}

/// Linear with MAE's init (xavier-uniform weight, zero bias).
fn linear(p: nn::Path, i: i64, o: i64) -> nn::Linear {
    let a = (6.0 / (i + o) as f64).sqrt();
    nn::linear(
        p,
        i,
        o,
        nn::LinearConfig {
            ws_init: nn::Init::Uniform { lo: -a, up: a },
            bs_init: Some(nn::Init::Const(0.)),
            bias: true,
        },
    )
}

/// One pre-norm transformer block: `x + attn(norm1(x))`, then `x + mlp(norm2(x))`.
#[derive(Debug)]
pub struct Block {
    norm1: nn::LayerNorm,
    qkv: nn::Linear,
    proj: nn::Linear,
    norm2: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
    heads: i64,
}

impl Block {
    fn new(p: nn::Path, dim: i64, heads: i64, mlp_ratio: f64) -> Self {
        let hidden = (dim as f64 * mlp_ratio) as i64;
        Block {
            norm1: ln(&p / "norm1", dim),
            qkv: linear(&p / "attn" / "qkv", dim, 3 * dim),
            proj: linear(&p / "attn" / "proj", dim, dim),
            norm2: ln(&p / "norm2", dim),
            fc1: linear(&p / "mlp" / "fc1", dim, hidden),
            fc2: linear(&p / "mlp" / "fc2", hidden, dim),
            heads,
        }
    }

    /// q, k, v as `[B, heads, N, head_dim]`.
    fn qkv(&self, x: &Tensor) -> (Tensor, Tensor, Tensor) {
        let (b, n, d) = x.size3().unwrap();
        let qkv = self
            .qkv
            .forward(&self.norm1.forward(x))
            .reshape([b, n, 3, self.heads, d / self.heads])
            .permute([2, 0, 3, 1, 4]);
        (qkv.get(0), qkv.get(1), qkv.get(2))
    }

    fn finish(&self, x: &Tensor, attn_out: Tensor, drop_path: f64) -> Tensor {
        let (b, n, d) = x.size3().unwrap();
        let a = self
            .proj
            .forward(&attn_out.transpose(1, 2).reshape([b, n, d]));
        let x = x + drop_residual(a, drop_path);
        let h = self.fc1.forward(&self.norm2.forward(&x)).gelu("none");
        &x + drop_residual(self.fc2.forward(&h), drop_path)
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.forward_drop(x, 0.0)
    }

    /// Forward with stochastic depth: each residual branch is dropped for a whole sample with
    /// probability `drop_path` (and the kept ones scaled by 1/(1−p)), as timm's `DropPath`.
    pub fn forward_drop(&self, x: &Tensor, drop_path: f64) -> Tensor {
        let (q, k, v) = self.qkv(x);
        let a = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<Tensor>,
            0.0,
            false,
            None,
            false,
        );
        self.finish(x, a, drop_path)
    }

    /// Forward that also returns the softmax attention summed over heads, `[B, N, N]` fp32.
    pub fn forward_with_attention(&self, x: &Tensor) -> (Tensor, Tensor) {
        let (q, k, v) = self.qkv(x);
        let hd = q.size()[3] as f64;
        let w = (q.matmul(&k.transpose(-2, -1)) * hd.powf(-0.5)).softmax(-1, q.kind());
        let a = w.matmul(&v);
        (
            self.finish(x, a, 0.0),
            w.sum_dim_intlist(1, false, Kind::Float),
        )
    }
}

/// `branch` with whole samples zeroed at rate `p` (the rest scaled by 1/(1−p)); `p = 0` is a no-op.
fn drop_residual(branch: Tensor, p: f64) -> Tensor {
    if p <= 0.0 {
        return branch;
    }
    let b = branch.size()[0];
    let keep = Tensor::empty([b, 1, 1], (branch.kind(), branch.device())).bernoulli_float_(1.0 - p);
    branch * keep / (1.0 - p)
}

/// The ViT encoder (timm `VisionTransformer` without head).
#[derive(Debug)]
pub struct Encoder {
    patch_embed: nn::Conv2D,
    pub cls_token: Tensor,
    pub pos_embed: Tensor,
    blocks: Vec<Block>,
    norm: nn::LayerNorm,
}

/// The MAE decoder.
#[derive(Debug)]
pub struct Decoder {
    embed: nn::Linear,
    mask_token: Tensor,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    norm: nn::LayerNorm,
    pred: nn::Linear,
}

/// Encoder + decoder: the pretraining model.
#[derive(Debug)]
pub struct Mae {
    pub cfg: VitConfig,
    pub encoder: Encoder,
    pub decoder: Decoder,
}

impl Encoder {
    pub fn new(root: &nn::Path, cfg: &VitConfig) -> Self {
        let (d, p, g) = (cfg.embed_dim, cfg.patch_size as i64, cfg.grid() as i64);
        let fan = (3 * p * p + d) as f64;
        let a = (6.0 / fan).sqrt();
        let conv = nn::ConvConfig {
            stride: p,
            ws_init: nn::Init::Uniform { lo: -a, up: a },
            bs_init: nn::Init::Const(0.),
            ..Default::default()
        };
        let patch_embed = nn::conv2d(root / "patch_embed" / "proj", 3, d, p, conv);
        let cls_token = root.var(
            "cls_token",
            &[1, 1, d],
            nn::Init::Randn {
                mean: 0.,
                stdev: 0.02,
            },
        );
        let mut pos_embed = root.zeros_no_train("pos_embed", &[1, 1 + g * g, d]);
        tch::no_grad(|| pos_embed.copy_(&sincos_pos_embed(d, g)));
        let blocks = (0..cfg.depth)
            .map(|i| Block::new(root / "blocks" / i, d, cfg.num_heads, cfg.mlp_ratio))
            .collect();
        Encoder {
            patch_embed,
            cls_token,
            pos_embed,
            blocks,
            norm: ln(root / "norm", d),
        }
    }

    pub fn depth(&self) -> usize {
        self.blocks.len()
    }

    /// Patch tokens with position embedding, `[B, N, D]`, in the kind of the weights.
    pub fn embed_patches(&self, imgs: &Tensor) -> Tensor {
        let x = self
            .patch_embed
            .forward(&imgs.to_kind(self.cls_token.kind()));
        x.flatten(2, 3).transpose(1, 2) + self.pos_embed.narrow(1, 1, self.pos_embed.size()[1] - 1)
    }

    fn with_cls(&self, x: Tensor) -> Tensor {
        let b = x.size()[0];
        let cls = (&self.cls_token + self.pos_embed.narrow(1, 0, 1)).expand([b, -1, -1], false);
        Tensor::cat(&[cls, x], 1)
    }

    /// Encoder on the visible tokens `ids_keep` `[B, K]` → `[B, 1 + K, D]` (normed).
    pub fn forward_masked(&self, imgs: &Tensor, ids_keep: &Tensor) -> Tensor {
        let x = self.embed_patches(imgs);
        let d = x.size()[2];
        let x = x.gather(1, &ids_keep.unsqueeze(-1).expand([-1, -1, d], false), false);
        let mut x = self.with_cls(x);
        for blk in &self.blocks {
            x = blk.forward(&x);
        }
        self.norm.forward(&x)
    }

    /// All tokens → `[B, 1 + N, D]` (normed): features for kNN / probes.
    pub fn forward_features(&self, imgs: &Tensor) -> Tensor {
        let mut x = self.with_cls(self.embed_patches(imgs));
        for blk in &self.blocks {
            x = blk.forward(&x);
        }
        self.norm.forward(&x)
    }

    /// All tokens with stochastic depth for training: block `i` drops its residual branches at
    /// rate `drop_path · i / (depth − 1)` (timm's linear rule) → `[B, 1 + N, D]` (normed).
    pub fn forward_features_train(&self, imgs: &Tensor, drop_path: f64) -> Tensor {
        let mut x = self.with_cls(self.embed_patches(imgs));
        let last = (self.blocks.len().max(2) - 1) as f64;
        for (i, blk) in self.blocks.iter().enumerate() {
            x = blk.forward_drop(&x, drop_path * i as f64 / last);
        }
        self.norm.forward(&x)
    }

    /// The retrieval descriptor the ONNX `embed` task exports: class token ⊕ GeM(p = 4) over
    /// patch tokens (clamped at 1e-6), L2-normalised, `[B, 2D]` fp32.
    pub fn embedding(&self, imgs: &Tensor) -> Tensor {
        let x = self.forward_features(imgs).to_kind(Kind::Float);
        let n = x.size()[1];
        let cls = x.select(1, 0);
        let gem = x
            .narrow(1, 1, n - 1)
            .clamp_min(1e-6)
            .pow_tensor_scalar(4.0)
            .mean_dim(1, false, Kind::Float)
            .pow_tensor_scalar(0.25);
        let e = Tensor::cat(&[cls, gem], 1);
        &e / e.norm_scalaropt_dim(2.0, [-1], true).clamp_min(1e-12)
    }

    /// The EHM affinity `[B, N, N]` of `imgs` (class token dropped), from the blocks in
    /// `blocks` (empty = all; the pass stops after the last one needed):
    /// - `Attention`: softmax attention summed over heads and those blocks;
    /// - `AttentionColumns`: cosine similarity of those attention rows (i and j attend alike);
    /// - `Cosine`: cosine similarity, clamped at 0, of the patch tokens after the last block.
    pub fn affinity(&self, imgs: &Tensor, blocks: &[usize], source: AffinitySource) -> Tensor {
        let want = |i: usize| blocks.is_empty() || blocks.contains(&i);
        let last = if blocks.is_empty() {
            self.blocks.len() - 1
        } else {
            *blocks.iter().max().unwrap()
        };
        let mut x = self.with_cls(self.embed_patches(imgs));
        let mut acc: Option<Tensor> = None;
        for (i, blk) in self.blocks.iter().enumerate().take(last + 1) {
            if want(i) && source != AffinitySource::Cosine {
                let (nx, w) = blk.forward_with_attention(&x);
                acc = Some(match acc {
                    None => w,
                    Some(a) => a + w,
                });
                x = nx;
            } else {
                x = blk.forward(&x);
            }
        }
        let unit_rows = |t: Tensor| {
            let norm = t
                .norm_scalaropt_dim(2.0, [-1i64].as_slice(), true)
                .clamp_min(1e-12);
            t / norm
        };
        match source {
            AffinitySource::Cosine => {
                let n = x.size()[1];
                let t = unit_rows(x.narrow(1, 1, n - 1).to_kind(Kind::Float));
                t.matmul(&t.transpose(1, 2)).clamp_min(0.0)
            }
            _ => {
                let a = acc.expect("at least one affinity block");
                let n = a.size()[1];
                let a = a.narrow(1, 1, n - 1).narrow(2, 1, n - 1);
                if source == AffinitySource::AttentionColumns {
                    let r = unit_rows(a);
                    r.matmul(&r.transpose(1, 2))
                } else {
                    a
                }
            }
        }
    }
}

impl Decoder {
    pub fn new(root: &nn::Path, cfg: &VitConfig) -> Self {
        let (d, dd, g) = (cfg.embed_dim, cfg.decoder_embed_dim, cfg.grid() as i64);
        let mut pos_embed = root.zeros_no_train("decoder_pos_embed", &[1, 1 + g * g, dd]);
        tch::no_grad(|| pos_embed.copy_(&sincos_pos_embed(dd, g)));
        Decoder {
            embed: linear(root / "decoder_embed", d, dd),
            mask_token: root.var(
                "mask_token",
                &[1, 1, dd],
                nn::Init::Randn {
                    mean: 0.,
                    stdev: 0.02,
                },
            ),
            pos_embed,
            blocks: (0..cfg.decoder_depth)
                .map(|i| {
                    Block::new(
                        root / "decoder_blocks" / i,
                        dd,
                        cfg.decoder_num_heads,
                        cfg.mlp_ratio,
                    )
                })
                .collect(),
            norm: ln(root / "decoder_norm", dd),
            pred: linear(root / "decoder_pred", dd, cfg.patch_dim()),
        }
    }

    /// `[B, 1 + K, D]` latent + `ids_restore` `[B, N]` → per-patch pixel predictions `[B, N, p²·3]`.
    pub fn forward(&self, latent: &Tensor, ids_restore: &Tensor) -> Tensor {
        let x = self.embed.forward(latent);
        let (b, k1, dd) = x.size3().unwrap();
        let n = ids_restore.size()[1];
        let tokens = self.mask_token.expand([b, n - (k1 - 1), dd], false);
        let y = Tensor::cat(&[x.narrow(1, 1, k1 - 1), tokens], 1);
        let y = y.gather(
            1,
            &ids_restore.unsqueeze(-1).expand([-1, -1, dd], false),
            false,
        );
        let mut y = Tensor::cat(&[x.narrow(1, 0, 1), y], 1) + &self.pos_embed;
        for blk in &self.blocks {
            y = blk.forward(&y);
        }
        let pred = self.pred.forward(&self.norm.forward(&y));
        pred.narrow(1, 1, n)
    }
}

impl Mae {
    pub fn new(root: &nn::Path, cfg: &VitConfig) -> Self {
        Mae {
            cfg: cfg.clone(),
            encoder: Encoder::new(root, cfg),
            decoder: Decoder::new(root, cfg),
        }
    }

    /// `[B, 3, H, W]` → `[B, N, p²·3]` in (row, col, channel) order, as MAE's patchify.
    pub fn patchify(&self, imgs: &Tensor) -> Tensor {
        let (p, g) = (self.cfg.patch_size as i64, self.cfg.grid() as i64);
        let b = imgs.size()[0];
        imgs.reshape([b, 3, g, p, g, p])
            .permute([0, 2, 4, 3, 5, 1])
            .reshape([b, g * g, p * p * 3])
    }

    /// Mean squared error on masked patches, against per-patch normalised pixels (fp32).
    pub fn loss(&self, imgs: &Tensor, pred: &Tensor, mask: &Tensor, norm_pix: bool) -> Tensor {
        let mut target = self.patchify(&imgs.to_kind(Kind::Float));
        if norm_pix {
            let mean = target.mean_dim(-1, true, Kind::Float);
            let var = target.var_dim(-1, true, true);
            target = (target - mean) / (var + 1e-6).sqrt();
        }
        let per_patch =
            (pred.to_kind(Kind::Float) - target)
                .square()
                .mean_dim(-1, false, Kind::Float);
        (per_patch * mask).sum(Kind::Float) / mask.sum(Kind::Float)
    }

    /// One MAE forward: the loss for the given visible/masked layout.
    pub fn forward_loss(
        &self,
        imgs: &Tensor,
        ids_keep: &Tensor,
        ids_restore: &Tensor,
        mask: &Tensor,
        norm_pix: bool,
    ) -> Tensor {
        let latent = self.encoder.forward_masked(imgs, ids_keep);
        let pred = self.decoder.forward(&latent, ids_restore);
        self.loss(imgs, &pred, mask, norm_pix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_timm() {
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = VitConfig::preset("vit_micro", 16, 4).unwrap();
        let _m = Mae::new(&vs.root(), &cfg);
        let names: std::collections::BTreeSet<String> = vs.variables().into_keys().collect();
        for k in [
            "cls_token",
            "pos_embed",
            "patch_embed.proj.weight",
            "blocks.0.norm1.weight",
            "blocks.1.attn.qkv.bias",
            "blocks.0.attn.proj.weight",
            "blocks.0.mlp.fc2.weight",
            "norm.bias",
            "decoder_embed.weight",
            "mask_token",
            "decoder_pos_embed",
            "decoder_blocks.0.mlp.fc1.weight",
            "decoder_norm.weight",
            "decoder_pred.bias",
        ] {
            assert!(names.contains(k), "missing {k}: {names:?}");
        }
    }

    #[test]
    fn patchify_order_matches_mae() {
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = VitConfig::preset("vit_micro", 8, 4).unwrap();
        let m = Mae::new(&vs.root(), &cfg);
        let img = Tensor::arange(3 * 8 * 8, (Kind::Float, Device::Cpu)).view([1, 3, 8, 8]);
        let p = m.patchify(&img);
        assert_eq!(p.size(), vec![1, 4, 48]);
        // patch 1 = row 0, col 1; element (py=0, px=1, c=2) = channel 2, y 0, x 5
        let v = p.double_value(&[0, 1, 5]);
        assert_eq!(v, (2 * 64 + 5) as f64);
    }

    #[test]
    fn attention_path_matches_fused_path() {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = VitConfig::preset("vit_micro", 16, 4).unwrap();
        let m = Mae::new(&vs.root(), &cfg);
        let x = Tensor::randn([2, 17, 64], (Kind::Float, Device::Cpu));
        let a = m.encoder.blocks[0].forward(&x);
        let (b, w) = m.encoder.blocks[0].forward_with_attention(&x);
        assert!(a.allclose(&b, 1e-4, 1e-5, false));
        // rows of each head's softmax sum to 1, so the head-sum rows sum to `heads`
        let rows = w.sum_dim_intlist(-1, false, Kind::Float);
        assert!(rows.allclose(
            &Tensor::full([2, 17], 2.0, (Kind::Float, Device::Cpu)),
            1e-4,
            1e-4,
            false
        ));
        let imgs = Tensor::randn([2, 3, 16, 16], (Kind::Float, Device::Cpu));
        for source in [
            AffinitySource::Attention,
            AffinitySource::AttentionColumns,
            AffinitySource::Cosine,
        ] {
            let aff = m.encoder.affinity(&imgs, &[], source);
            assert_eq!(aff.size(), vec![2, 16, 16], "{source:?}");
            if source != AffinitySource::Attention {
                // similarities: symmetric, 1 on the diagonal, within [-1, 1] (cosine: [0, 1])
                assert!(aff.allclose(&aff.transpose(1, 2), 1e-5, 1e-5, false));
                let diag = aff.diagonal(0, 1, 2);
                assert!(diag.allclose(&Tensor::ones_like(&diag), 1e-4, 1e-4, false));
                assert!(aff.max().double_value(&[]) <= 1.0 + 1e-5);
            }
            if source == AffinitySource::Cosine {
                assert!(aff.min().double_value(&[]) >= 0.0);
            }
        }
    }
}

#[cfg(test)]
mod timm_tests {
    use super::*;

    #[test]
    fn encoder_keys_and_shapes_equal_timm() {
        for (arch, golden) in [
            ("vit_tiny", "timm_vit_tiny_patch16_224"),
            ("vit_small", "timm_vit_small_patch16_224"),
        ] {
            let path = format!("{}/tests/golden/{golden}.keys", env!("CARGO_MANIFEST_DIR"));
            let text = std::fs::read_to_string(path).unwrap();
            let want: Vec<&str> = text
                .lines()
                .filter(|l| !l.starts_with('#') && !l.is_empty())
                .collect();
            let vs = nn::VarStore::new(Device::Cpu);
            let _m = Mae::new(&vs.root(), &VitConfig::preset(arch, 224, 16).unwrap());
            let mut got: Vec<String> = vs
                .variables()
                .into_iter()
                .filter(|(n, _)| !crate::train::optim::is_decoder_param(n))
                .map(|(n, t)| {
                    format!(
                        "{n} {}",
                        t.size()
                            .iter()
                            .map(|d| d.to_string())
                            .collect::<Vec<_>>()
                            .join(",")
                    )
                })
                .collect();
            got.sort();
            assert_eq!(got, want, "{arch}");
        }
    }
}
