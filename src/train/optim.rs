//! Flat-buffer parameters and AdamW. All trainable tensors are views of ONE fp32 master
//! buffer (and, for bf16 compute, of one bf16 copy), so the optimizer, the EMA, gradient
//! clipping and the master→compute cast are a handful of kernels instead of one per tensor.
use tch::{nn, Device, Kind, Tensor};

/// Where each parameter lives inside the flat buffers.
#[derive(Debug, Clone)]
pub struct Slot {
    pub name: String,
    pub shape: Vec<i64>,
    pub offset: i64,
    pub numel: i64,
}

pub struct FlatParams {
    pub slots: Vec<Slot>,
    /// The model's own variables (now views of `compute`).
    vars: Vec<Tensor>,
    pub master: Tensor,
    /// bf16 weights the model computes with; `None` when it computes on `master` itself.
    pub compute: Option<Tensor>,
    pub m: Tensor,
    pub v: Tensor,
    /// 1 for weights that get weight decay (≥ 2-d), 0 for biases, norms, tokens.
    wd_mask: Tensor,
    /// Per-element learning-rate multiplier (layer-wise lr decay); `None` = 1 everywhere.
    lr_scale: Option<Tensor>,
    pub adam_step: i64,
}

/// Decoder parameters go last, so the encoder is a contiguous prefix (the teacher copies it).
pub fn is_decoder_param(name: &str) -> bool {
    name.starts_with("decoder_") || name == "mask_token"
}

/// Point each variable in `vars` at its slice of `flat` (keeps autograd leaf status).
pub fn attach_views(vars: &mut [Tensor], slots: &[Slot], flat: &Tensor) {
    for (v, s) in vars.iter_mut().zip(slots) {
        v.set_data(&flat.narrow(0, s.offset, s.numel).view(s.shape.as_slice()));
    }
}

/// Trainable variables of `vs` in flat order (encoder first, then decoder; by name).
pub fn ordered_trainables(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let vars = vs.variables();
    let mut names: Vec<String> = vars
        .iter()
        .filter(|(_, t)| t.requires_grad())
        .map(|(n, _)| n.clone())
        .collect();
    names.sort_by(|a, b| (is_decoder_param(a), a).cmp(&(is_decoder_param(b), b)));
    names
        .into_iter()
        .map(|n| (n.clone(), vars[&n].shallow_clone()))
        .collect()
}

pub fn slots_of(params: &[(String, Tensor)]) -> Vec<Slot> {
    let mut off = 0;
    params
        .iter()
        .map(|(n, t)| {
            let s = Slot {
                name: n.clone(),
                shape: t.size(),
                offset: off,
                numel: t.numel() as i64,
            };
            off += s.numel;
            s
        })
        .collect()
}

impl FlatParams {
    /// Move every trainable variable of `vs` into flat buffers. `compute_kind` is the dtype
    /// the forward pass runs in (Float on CPU; BFloat16 on CUDA for speed). Non-trainable
    /// buffers (position embeddings) are cast to it too.
    pub fn new(vs: &nn::VarStore, compute_kind: Kind) -> Self {
        let params = ordered_trainables(vs);
        let slots = slots_of(&params);
        let total: i64 = slots.iter().map(|s| s.numel).sum();
        let device = vs.device();
        let master = Tensor::zeros([total], (Kind::Float, device));
        let mut wd = vec![0f32; total as usize];
        tch::no_grad(|| {
            for ((_, t), s) in params.iter().zip(&slots) {
                master
                    .narrow(0, s.offset, s.numel)
                    .copy_(&t.to_kind(Kind::Float).view(-1));
                if s.shape.len() >= 2
                    && !s.name.ends_with("_token")
                    && !s.name.contains("pos_embed")
                {
                    wd[s.offset as usize..(s.offset + s.numel) as usize].fill(1.0);
                }
            }
        });
        let mut vars: Vec<Tensor> = params.into_iter().map(|(_, t)| t).collect();
        let compute = (compute_kind != Kind::Float).then(|| master.to_kind(compute_kind));
        attach_views(&mut vars, &slots, compute.as_ref().unwrap_or(&master));
        for (name, mut t) in vs.variables() {
            if !t.requires_grad() && t.kind() != compute_kind {
                let _ = name;
                t.set_data(&t.to_kind(compute_kind));
            }
        }
        FlatParams {
            slots,
            vars,
            m: master.zeros_like(),
            v: master.zeros_like(),
            wd_mask: Tensor::from_slice(&wd).to_device(device),
            master,
            compute,
            lr_scale: None,
            adam_step: 0,
        }
    }

    /// Scale the learning rate of each parameter by `scale(name)` (e.g. layer-wise decay).
    pub fn set_lr_scale(&mut self, scale: impl Fn(&str) -> f64) {
        let mut v = vec![1f32; self.numel() as usize];
        for s in &self.slots {
            v[s.offset as usize..(s.offset + s.numel) as usize].fill(scale(&s.name) as f32);
        }
        self.lr_scale = Some(Tensor::from_slice(&v).to_device(self.device()));
    }

    /// fp32 weights by name for a checkpoint: the trainable ones from the master buffer, plus
    /// the variables of `vs` that have no slot (fixed buffers such as pos_embed), by name.
    pub fn named_weights(&self, vs: &nn::VarStore) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> = self
            .slots
            .iter()
            .map(|s| {
                let t = self.master.narrow(0, s.offset, s.numel);
                (s.name.clone(), t.view(s.shape.as_slice()))
            })
            .collect();
        for (n, t) in vs.variables() {
            if !self.slots.iter().any(|s| s.name == n) {
                out.push((n, t.to_kind(Kind::Float)));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    pub fn numel(&self) -> i64 {
        self.master.size()[0]
    }

    pub fn device(&self) -> Device {
        self.master.device()
    }

    /// Gradients of `loss` w.r.t. every parameter, as one flat fp32 tensor.
    pub fn flat_grad(&self, loss: &Tensor) -> Tensor {
        let grads = Tensor::run_backward(&[loss], &self.vars, false, false);
        let flat: Vec<Tensor> = grads.iter().map(|g| g.view(-1)).collect();
        Tensor::cat(&flat, 0).to_kind(Kind::Float)
    }

    /// AdamW (decoupled weight decay on ≥2-d weights) with global-norm clipping. Returns the
    /// gradient norm (on the device; reading it forces a sync, so callers read it rarely).
    pub fn adamw_step(
        &mut self,
        mut grad: Tensor,
        lr: f64,
        weight_decay: f64,
        clip: f64,
        betas: (f64, f64),
    ) -> Tensor {
        let (b1, b2, eps) = (betas.0, betas.1, 1e-8);
        self.adam_step += 1;
        let t = self.adam_step as i32;
        tch::no_grad(|| {
            let norm = grad.norm();
            if clip > 0.0 {
                // scale = min(1, clip / norm), computed on the device: no host sync.
                let scale = (clip / (&norm + 1e-6)).clamp_max(1.0);
                grad *= scale;
            }
            let _ = self.m.lerp_(&grad, 1.0 - b1);
            self.v *= b2;
            let _ = self.v.addcmul_(&(&grad * (1.0 - b2)), &grad);
            let (bc1, bc2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
            let denom = (self.v.sqrt() / bc2.sqrt()) + eps;
            // decoupled decay: p -= lr·wd·p (only where wd_mask is 1), then the Adam update
            let (decay, step) = match &self.lr_scale {
                None => (&self.wd_mask * (-lr * weight_decay), &self.m * (-lr / bc1)),
                Some(s) => (
                    &self.wd_mask * s * (-lr * weight_decay),
                    &self.m * s * (-lr / bc1),
                ),
            };
            let _ = self.master.addcmul_(&decay, &self.master.shallow_clone());
            let _ = self.master.addcdiv_(&step, &denom);
            if let Some(c) = &mut self.compute {
                c.copy_(&self.master);
            }
            norm
        })
    }

    /// Restore the master weights and Adam moments saved as `master`, `adam_m`, `adam_v` (and
    /// the step from `adam_step` metadata) from a resume file read from `path`.
    pub fn restore(
        &mut self,
        t: &std::collections::HashMap<String, Tensor>,
        meta: &std::collections::HashMap<String, String>,
        path: &std::path::Path,
    ) -> crate::Result<()> {
        use crate::Error;
        let dev = self.device();
        tch::no_grad(|| -> crate::Result<()> {
            for (dst, key) in [
                (&mut self.master, "master"),
                (&mut self.m, "adam_m"),
                (&mut self.v, "adam_v"),
            ] {
                let src = t
                    .get(key)
                    .ok_or_else(|| Error::bad_file(path, format!("missing {key}")))?;
                if src.size() != dst.size() {
                    return Err(Error::bad_file(
                        path,
                        format!(
                            "{key} has {:?} values, the model needs {:?}",
                            src.size(),
                            dst.size()
                        ),
                    ));
                }
                dst.copy_(&src.to_device(dev));
            }
            Ok(())
        })?;
        self.sync_compute();
        self.adam_step = meta
            .get("adam_step")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        Ok(())
    }

    /// Copy master into the compute buffer (after loading a checkpoint).
    pub fn sync_compute(&mut self) {
        if let Some(c) = &mut self.compute {
            tch::no_grad(|| c.copy_(&self.master));
        }
    }

    /// The flat offset range of the encoder (a prefix).
    pub fn encoder_numel(&self) -> i64 {
        self.slots
            .iter()
            .filter(|s| !is_decoder_param(&s.name))
            .map(|s| s.numel)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_adamw_matches_reference_formula() {
        let vs = nn::VarStore::new(Device::Cpu);
        let root = vs.root();
        let w = root.var("w", &[2, 2], nn::Init::Const(1.0));
        let b = root.var("b", &[2], nn::Init::Const(0.5));
        let mut fp = FlatParams::new(&vs, Kind::Float);
        let loss = (&w * 3.0).sum(Kind::Float) + (&b * 2.0).sum(Kind::Float);
        let g = fp.flat_grad(&loss);
        let _ = fp.adamw_step(g, 0.1, 0.5, 0.0, (0.9, 0.95));
        // First step of Adam moves each weight by -lr (sign of grad) plus decay on w only.
        let wv = w.double_value(&[0, 0]);
        let bv = b.double_value(&[0]);
        assert!((wv - (1.0 * (1.0 - 0.1 * 0.5) - 0.1)).abs() < 1e-5, "{wv}");
        assert!((bv - (0.5 - 0.1)).abs() < 1e-5, "{bv}");
        // model variables are views of master
        assert!(
            (fp.master.double_value(&[0]) - bv).abs() < 1e-9
                || (fp.master.double_value(&[2]) - wv).abs() < 1e-9
        );
    }
}
