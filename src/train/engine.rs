//! The pretraining engine: model, flat optimizer state, EMA teacher and the mask pipeline.
//! Shared by `pretrain` (real data) and `bench` (synthetic data, timing only).
//!
//! Pipeline (EHM): the teacher pass for batch s+1 is queued *before* step s; its affinity is
//! copied to the host and the merge trees are built on CPU threads while the GPU runs step s.
//! So the hierarchy never stalls the accelerator; only the teacher's FLOPs are extra.
use super::optim::FlatParams;
use crate::config::{MaskingKind, PretrainConfig, TeacherKind, VitConfig};
use crate::data::Preprocess;
use crate::masking::{Grid, MaskBatch, MaskSampler};
use crate::model::{Encoder, Mae};
use tch::{nn, Device, Kind, Tensor};

/// Run length assumed for the EMA half-life until `set_total_steps` is called (benchmarks).
const DEFAULT_RUN_STEPS: u64 = 10_000;

pub struct Teacher {
    _vs: nn::VarStore,
    pub encoder: Encoder,
    /// Flat copy of the EMA encoder in the compute dtype; the teacher's weights are views of it.
    compute: Tensor,
    /// fp32 EMA of the student's encoder (a prefix of the flat layout).
    pub ema: Tensor,
}

impl Teacher {
    /// Copy the EMA into the weights the teacher computes with.
    pub fn refresh(&mut self) {
        tch::no_grad(|| self.compute.copy_(&self.ema));
    }
}

pub struct Engine {
    pub device: Device,
    pub kind: Kind,
    pub cfg: VitConfig,
    /// The preprocessing the model trains with (mean/std for `upload`).
    pub preprocess: Preprocess,
    pub run: PretrainConfig,
    pub vs: nn::VarStore,
    pub model: Mae,
    pub flat: FlatParams,
    pub teacher: Option<Teacher>,
    pub masks: MaskSampler,
    /// EMA decay per step (from the half-life, a fraction of the run: `set_total_steps`).
    pub ema_decay: f64,
    /// The data-parallel group (`None`: this process trains alone).
    pub dist: Option<std::sync::Arc<super::dist::Dist>>,
    /// Global slot of this process's first image in every step's batch (its masks are those
    /// rows of the whole batch's).
    pub first_image: usize,
    pixels: super::supervised::Normaliser,
}

/// A mask batch being built on a helper thread (or already built).
pub enum MaskJob {
    Ready(MaskBatch),
    Pending(std::thread::JoinHandle<crate::Result<MaskBatch>>),
}

impl MaskJob {
    pub fn wait(self) -> crate::Result<MaskBatch> {
        match self {
            MaskJob::Ready(m) => Ok(m),
            MaskJob::Pending(h) => h.join().unwrap_or_else(|_| {
                Err(crate::Error::Training(
                    "the mask builder thread failed (see the message above)".into(),
                ))
            }),
        }
    }
}

/// Refuse a non-finite affinity: a diverged teacher would give image-independent masks, and
/// the run would go on as if nothing happened.
/// `when` says where in the run (e.g. "at step 12").
pub fn check_affinity(aff: &[f32], when: &str) -> crate::Result<()> {
    let bad = crate::masking::non_finite(aff);
    if bad > 0 {
        return Err(crate::Error::Training(format!(
            "the teacher's affinity holds {bad} NaN/infinite values of {} {when}; stopped (the teacher diverged: lower --blr, or use --teacher student)",
            aff.len()
        )));
    }
    Ok(())
}

/// EHM masks from a host affinity (checked).
fn ehm_masks(
    params: &MaskSampler,
    aff: &[f32],
    (first, batch): (usize, usize),
    t: f64,
    step: u64,
) -> crate::Result<MaskBatch> {
    check_affinity(aff, &format!("at step {step}"))?;
    Ok(params.sample_from(first, batch, t, step, Some(aff)))
}

impl Engine {
    pub fn new(
        cfg: &VitConfig,
        pre: &Preprocess,
        run: &PretrainConfig,
        device: Device,
        kind: Kind,
    ) -> Self {
        tch::manual_seed(run.seed as i64);
        let vs = nn::VarStore::new(device);
        let model = Mae::new(&vs.root(), cfg);
        let flat = FlatParams::new(&vs, kind);
        let teacher = (run.masking == MaskingKind::Ehm && run.ehm.teacher == TeacherKind::Ema)
            .then(|| {
                let tvs = nn::VarStore::new(device);
                let encoder = Encoder::new(&tvs.root(), cfg);
                let tflat = FlatParams::new(&tvs, kind);
                assert_eq!(
                    tflat.numel(),
                    flat.encoder_numel(),
                    "teacher layout = student encoder prefix"
                );
                let ema = flat.master.narrow(0, 0, flat.encoder_numel()).copy();
                let compute = tflat
                    .compute
                    .as_ref()
                    .unwrap_or(&tflat.master)
                    .shallow_clone();
                tch::no_grad(|| {
                    compute.shallow_clone().copy_(&ema);
                    for (_, t) in tvs.variables() {
                        let _ = t.set_requires_grad(false);
                    }
                });
                Teacher {
                    _vs: tvs,
                    encoder,
                    compute,
                    ema,
                }
            });
        let masks = MaskSampler {
            kind: run.masking,
            grid: Grid::square(cfg.grid()),
            mask_ratio: run.mask_ratio,
            ehm: run.ehm.clone(),
            seed: run.seed,
        };
        let ema_decay = 0.5f64.powf(1.0 / run.ehm.half_life_steps(DEFAULT_RUN_STEPS));
        Engine {
            device,
            kind,
            cfg: cfg.clone(),
            preprocess: pre.clone(),
            run: run.clone(),
            vs,
            model,
            flat,
            teacher,
            masks,
            ema_decay,
            dist: None,
            first_image: 0,
            pixels: super::supervised::Normaliser::new(pre, device),
        }
    }

    /// Scale the EMA half-life to a run of `total` optimizer steps (`ehm.ema_half_life` is a
    /// fraction of the run).
    pub fn set_total_steps(&mut self, total: u64) {
        self.ema_decay = 0.5f64.powf(1.0 / self.run.ehm.half_life_steps(total));
    }

    /// CHW bytes → normalised fp32 `[B, 3, H, W]` on the device (async copy from pinned memory).
    pub fn upload(&self, pixels: &[u8], batch: usize) -> Tensor {
        let s = self.cfg.image_size as i64;
        let t = Tensor::from_slice(pixels).view([batch as i64, 3, s, s]);
        self.pixels.apply(&self.to_device(t))
    }

    /// Host → device without blocking the host (pinned staging) on CUDA.
    pub fn to_device(&self, t: Tensor) -> Tensor {
        match self.device {
            Device::Cpu => t,
            // `_pin_memory` is the op behind `pin_memory`, without its per-call deprecation warning.
            d => t
                .internal_pin_memory(d)
                .to_device_(d, t.kind(), true, false),
        }
    }

    /// Teacher affinity for a batch, on the host, `[B·N·N]`.
    pub fn affinity_host(&self, imgs: &Tensor) -> Vec<f32> {
        let a = self.affinity_device(imgs);
        // half precision on the wire halves the copy; the merge tree only needs the order.
        let a = if self.device == Device::Cpu {
            a
        } else {
            a.to_kind(Kind::Half)
                .to_device(Device::Cpu)
                .to_kind(Kind::Float)
        };
        Vec::<f32>::try_from(a.contiguous().view(-1)).expect("float affinity")
    }

    /// Teacher affinity `[B, N, N]` on the device (EMA teacher, or the student without grad).
    pub fn affinity_device(&self, imgs: &Tensor) -> Tensor {
        let (blocks, source) = (&self.run.ehm.affinity_blocks, self.run.ehm.affinity);
        tch::no_grad(|| match &self.teacher {
            Some(t) => t.encoder.affinity(imgs, blocks, source),
            None => self.model.encoder.affinity(imgs, blocks, source),
        })
    }

    /// Start building the masks for one optimizer step's images at progress `t`, step `step`.
    /// `parts` are the step's gradient-accumulation pieces (one tensor without accumulation);
    /// the masks are those of the whole step's batch, so they do not depend on the split.
    pub fn mask_job(&self, parts: &[Tensor], t: f64, step: u64) -> MaskJob {
        let batch: usize = parts.iter().map(|p| p.size()[0] as usize).sum();
        // Every strategy samples on a helper thread, one step ahead, off the launch thread.
        let params = self.masks.clone();
        let rows = (self.first_image, batch);
        if self.masks.kind != MaskingKind::Ehm {
            return MaskJob::Pending(std::thread::spawn(move || {
                Ok(params.sample_from(rows.0, batch, t, step, None))
            }));
        }
        if self.device == Device::Cpu {
            let aff: Vec<f32> = parts.iter().flat_map(|p| self.affinity_host(p)).collect();
            return MaskJob::Pending(std::thread::spawn(move || {
                ehm_masks(&params, &aff, rows, t, step)
            }));
        }
        // On CUDA the affinity goes to pinned host memory asynchronously; the helper thread
        // waits for it, so the launch thread can queue the training step at once.
        let pieces: Vec<Tensor> = parts
            .iter()
            .map(|p| self.affinity_device(p).to_kind(Kind::Half))
            .collect();
        let aff = Tensor::cat(&pieces, 0);
        let host = aff.to_device_(Device::Cpu, Kind::Half, true, false);
        let dev = match self.device {
            Device::Cuda(i) => i as i64,
            _ => 0,
        };
        MaskJob::Pending(std::thread::spawn(move || {
            tch::Cuda::synchronize(dev);
            let aff =
                Vec::<f32>::try_from(host.to_kind(Kind::Float).view(-1)).expect("float affinity");
            ehm_masks(&params, &aff, rows, t, step)
        }))
    }

    /// Mask index tensors on the device.
    pub fn mask_tensors(&self, m: &MaskBatch) -> (Tensor, Tensor, Tensor) {
        let (b, n, k) = (m.batch as i64, m.n as i64, m.keep as i64);
        (
            self.to_device(Tensor::from_slice(&m.ids_keep).view([b, k])),
            self.to_device(Tensor::from_slice(&m.ids_restore).view([b, n])),
            self.to_device(Tensor::from_slice(&m.mask).view([b, n])),
        )
    }

    /// One optimizer step over `parts` (the gradient-accumulation pieces of the step's batch;
    /// one tensor without accumulation) with `masks` for the whole batch. The gradient is the
    /// mean of the pieces' gradients, which is the whole batch's: every image masks the same
    /// number of patches, so the batch loss is the mean of equal-sized pieces' losses.
    /// Data-parallel: the gradient is then averaged over the ranks (each holds an equal share
    /// of the global batch), so every rank takes the same AdamW step.
    /// Returns this process's (detached, device) loss; syncs the host only to all-reduce.
    pub fn step(&mut self, parts: &[Tensor], masks: &MaskBatch, lr: f64) -> crate::Result<Tensor> {
        let k = parts.len();
        let (mut grad, mut loss_sum): (Option<Tensor>, Option<Tensor>) = (None, None);
        let mut first = 0;
        for imgs in parts {
            let b = imgs.size()[0] as usize;
            let piece;
            let m = if k == 1 {
                masks
            } else {
                piece = masks.rows(first, b);
                &piece
            };
            first += b;
            let (keep, restore, mask) = self.mask_tensors(m);
            let loss =
                self.model
                    .forward_loss(imgs, &keep, &restore, &mask, self.run.norm_pix_loss);
            let g = if k == 1 {
                self.flat.flat_grad(&loss)
            } else {
                self.flat.flat_grad(&(&loss / k as f64))
            };
            grad = Some(match grad {
                None => g,
                Some(acc) => acc + g,
            });
            let l = loss.detach();
            loss_sum = Some(match loss_sum {
                None => l,
                Some(acc) => acc + l,
            });
        }
        assert_eq!(first, masks.batch, "masks for every image of the step");
        let mut grad = grad.expect("at least one piece");
        if let Some(d) = &self.dist {
            d.all_reduce_mean(&mut grad)?;
        }
        let _ = self.flat.adamw_step(
            grad,
            lr,
            self.run.weight_decay,
            self.run.clip_grad,
            (0.9, 0.95),
        );
        if let Some(t) = &mut self.teacher {
            let decay = self.ema_decay;
            let n = t.ema.size()[0];
            let _ = tch::no_grad(|| t.ema.lerp_(&self.flat.master.narrow(0, 0, n), 1.0 - decay));
            t.refresh();
        }
        let loss = loss_sum.expect("at least one piece");
        Ok(if k == 1 { loss } else { loss / k as f64 })
    }

    /// Processes training together (1 alone).
    pub fn world(&self) -> usize {
        self.dist.as_ref().map_or(1, |d| d.world)
    }

    /// Make every rank's weights, AdamW moments and EMA rank 0's (DDP's broadcast at start:
    /// the ranks then stay identical, as they take identical steps).
    pub fn sync_from_rank0(&mut self) -> crate::Result<()> {
        let Some(d) = self.dist.clone() else {
            return Ok(());
        };
        for t in [&mut self.flat.master, &mut self.flat.m, &mut self.flat.v] {
            d.broadcast(t, 0)?;
        }
        self.flat.sync_compute();
        if let Some(te) = &mut self.teacher {
            d.broadcast(&mut te.ema, 0)?;
            te.refresh();
        }
        Ok(())
    }

    /// Learning rate at `step` of `total`: linear warm-up, then half-cycle cosine (MAE), from
    /// the effective batch: blr × batch × accum-steps × world / 256.
    pub fn lr_at(&self, step: u64, total: u64, warmup: u64) -> f64 {
        let base = self.run.blr * (self.run.effective_batch() * self.world()) as f64 / 256.0;
        super::schedule::warmup_cosine(step, total, warmup, base, self.run.min_lr)
    }

    /// Named fp32 weights for a checkpoint: master slices + fixed buffers.
    pub fn named_weights(&self) -> Vec<(String, Tensor)> {
        self.flat.named_weights(&self.vs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TeacherKind;

    /// A micro engine whose first block attends by colour: the patch embedding is
    /// (red − blue) plus a constant, and block 0's queries and keys are that value, so a patch
    /// attends to the patches of its own colour. EHM late in training (2 segments, r = 0.5)
    /// must then mask exactly one colour region.
    fn colour_engine(source: crate::config::AffinitySource) -> Engine {
        let cfg = VitConfig::preset("vit_micro", 16, 4).unwrap();
        let pre = Preprocess {
            mean: [0.5; 3],
            std: [0.5; 3],
            ..Preprocess::imagenet(16)
        };
        let mut run = PretrainConfig {
            masking: MaskingKind::Ehm,
            mask_ratio: 0.5,
            ..Default::default()
        };
        run.ehm.teacher = TeacherKind::Student;
        run.ehm.affinity_blocks = vec![0];
        run.ehm.affinity = source;
        run.ehm.end_segments = Some(2);
        let e = Engine::new(&cfg, &pre, &run, Device::Cpu, Kind::Float);
        let vars = e.vs.variables();
        let d = cfg.embed_dim;
        let hd = d / cfg.num_heads;
        tch::no_grad(|| {
            for name in [
                "patch_embed.proj.weight",
                "patch_embed.proj.bias",
                "pos_embed",
                "cls_token",
                "blocks.0.attn.qkv.weight",
                "blocks.0.attn.qkv.bias",
            ] {
                let _ = vars[name].shallow_clone().zero_();
            }
            let w = vars["patch_embed.proj.weight"].shallow_clone();
            let _ = w.get(0).get(0).fill_(1.0 / 16.0); // + red, mean over the 4×4 patch
            let _ = w.get(0).get(2).fill_(-1.0 / 16.0); // − blue
            let _ = vars["patch_embed.proj.bias"].get(1).fill_(1.0);
            let qkv = vars["blocks.0.attn.qkv.weight"].shallow_clone();
            for head in 0..cfg.num_heads {
                let _ = qkv.get(head * hd).get(0).fill_(1.0); // query
                let _ = qkv.get(d + head * hd).get(0).fill_(1.0); // key
            }
        });
        e
    }

    /// A 16×16 image, red where `red(x, y)`, blue elsewhere, as the engine's input.
    fn two_colour(e: &Engine, red: impl Fn(u32, u32) -> bool) -> Tensor {
        let img = image::RgbImage::from_fn(16, 16, |x, y| {
            image::Rgb(if red(x, y) { [255, 0, 0] } else { [0, 0, 255] })
        });
        let mut px = vec![0u8; 3 * 256];
        crate::data::preprocess::chw_u8_into(&img, false, &mut px);
        e.upload(&px, 1)
    }

    fn visible(m: &MaskBatch) -> Vec<usize> {
        (0..m.n).filter(|&i| m.mask[i] == 0.0).collect()
    }

    #[test]
    fn late_masks_follow_the_models_own_parse_of_the_image() {
        use crate::config::AffinitySource::*;
        for source in [Attention, AttentionColumns, Cosine] {
            masks_follow_colour(&colour_engine(source));
        }
    }

    fn masks_follow_colour(e: &Engine) {
        let halves = |f: fn(usize) -> bool| -> [Vec<usize>; 2] {
            [
                (0..16).filter(|&i| f(i)).collect(),
                (0..16).filter(|&i| !f(i)).collect(),
            ]
        };
        let left_right = halves(|i| i % 4 < 2);
        let top_bottom = halves(|i| i / 4 < 2);
        let side = two_colour(e, |x, _| x < 8);
        let stacked = two_colour(e, |_, y| y < 8);
        for step in 0..6 {
            // through the trainer's own pipeline (teacher pass → helper thread → masks)
            let m = e
                .mask_job(std::slice::from_ref(&side), 1.0, step)
                .wait()
                .unwrap();
            assert!(
                left_right.contains(&visible(&m)),
                "step {step}: {:?}",
                visible(&m)
            );
            let m = e
                .mask_job(std::slice::from_ref(&stacked), 1.0, step)
                .wait()
                .unwrap();
            assert!(
                top_bottom.contains(&visible(&m)),
                "step {step}: {:?}",
                visible(&m)
            );
        }
        // at t = 0 the same images get the parity grid: one visible patch per 2×2 cell
        // (r = 0.5 keeps two parity classes)
        let m = e
            .mask_job(std::slice::from_ref(&side), 0.0, 0)
            .wait()
            .unwrap();
        assert_eq!(visible(&m).len(), 8);
        assert!(!left_right.contains(&visible(&m)));
    }

    #[test]
    fn a_non_finite_teacher_stops_the_masks_with_a_message() {
        let e = colour_engine(crate::config::AffinitySource::Attention);
        tch::no_grad(|| {
            let _ = e.vs.variables()["blocks.0.attn.qkv.weight"]
                .shallow_clone()
                .fill_(f64::NAN);
        });
        let imgs = two_colour(&e, |x, _| x < 8);
        let err = e
            .mask_job(std::slice::from_ref(&imgs), 0.5, 3)
            .wait()
            .unwrap_err()
            .to_string();
        assert!(err.contains("NaN") && err.contains("at step 3"), "{err}");
    }
}
