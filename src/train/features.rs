//! Frozen-backbone evaluation shared by the trainer's kNN monitor, `ehm-train knn` and
//! `ehm-train probe`: labelled subsets, pooled features, weighted kNN. One code path, so the
//! monitor and the subcommand report the same number for the same weights.
use crate::data::{self, DataSpec, Dataset, Preprocess};
use crate::error::{Error, Result};
use crate::model::Encoder;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// Seeds of the fixed train/test subsets used by the kNN monitor and `ehm-train knn`.
pub const TRAIN_SUBSET_SEED: u64 = 1;
pub const TEST_SUBSET_SEED: u64 = 2;
/// DINO's weighted-kNN setting.
pub const KNN_K: usize = 20;
pub const KNN_TEMPERATURE: f32 = 0.07;

/// Which token(s) a frozen-backbone evaluation reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Pool {
    /// The class token.
    Cls,
    /// The mean of the patch tokens.
    Mean,
}

/// `[n, 1+P, D]` tokens → `[n, D]`.
pub fn pool_tokens(tokens: &Tensor, pool: Pool) -> Tensor {
    match pool {
        Pool::Cls => tokens.select(1, 0),
        Pool::Mean => {
            let n = tokens.size()[1];
            tokens.narrow(1, 1, n - 1).mean_dim(1, false, Kind::Float)
        }
    }
}

/// A labelled (seeded) subset of a data set.
pub struct Labelled {
    pub ds: Arc<dyn Dataset>,
    pub labels: Vec<usize>,
}

impl Labelled {
    pub fn open(spec: &str, limit: usize, seed: u64) -> Result<Self> {
        let ds = data::subset(spec.parse::<DataSpec>()?.open()?, limit, seed);
        if ds.classes().is_empty() {
            return Err(Error::MissingData(format!(
                "{spec}: no labels (use a labelled set: fashion-mnist, cifar, or a class/image folder)"
            )));
        }
        let labels = (0..ds.len()).map(|i| ds.label(i).unwrap_or(0)).collect();
        Ok(Labelled { ds, labels })
    }

    pub fn classes(&self) -> &[String] {
        self.ds.classes()
    }

    pub fn labels_tensor(&self) -> Tensor {
        Tensor::from_slice(&self.labels.iter().map(|&l| l as i64).collect::<Vec<_>>())
    }
}

/// Pooled features `[n, D]` (fp32, host) of a data set with the eval preprocessing, in batches
/// of 256 decoded on the host threads. `progress` draws a bar (off inside a training run).
pub fn pooled_features(
    encoder: &Encoder,
    pre: &Preprocess,
    ds: &dyn Dataset,
    pool: Pool,
    device: Device,
    progress: bool,
) -> Result<Tensor> {
    if ds.is_empty() {
        return Err(Error::MissingData(
            "no images to extract features from".into(),
        ));
    }
    let (per, s) = (pre.tensor_len(), pre.image_size as i64);
    let bar = super::progress_bar(ds.len() as u64, 0, progress);
    bar.set_message("extracting features");
    let mut out = Vec::new();
    for start in (0..ds.len()).step_by(256) {
        let n = (ds.len() - start).min(256);
        let mut buf = vec![0f32; n * per];
        use rayon::prelude::*;
        buf.par_chunks_mut(per)
            .enumerate()
            .try_for_each(|(i, o)| -> Result<()> {
                pre.eval_into(&ds.image(start + i)?, o);
                Ok(())
            })?;
        let x = Tensor::from_slice(&buf)
            .view([n as i64, 3, s, s])
            .to_device(device);
        let f = tch::no_grad(|| encoder.forward_features(&x)).to_kind(Kind::Float);
        out.push(pool_tokens(&f, pool).to_device(Device::Cpu));
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    Ok(Tensor::cat(&out, 0))
}

fn l2_rows(f: Tensor) -> Vec<f32> {
    let f = &f / f.norm_scalaropt_dim(2.0, [-1], true).clamp_min(1e-12);
    Vec::try_from(f.contiguous().view(-1)).expect("float features")
}

/// Weighted kNN top-1 (DINO) of `encoder` on L2-normalised pooled features.
#[allow(clippy::too_many_arguments)]
pub fn knn_top1(
    encoder: &Encoder,
    pre: &Preprocess,
    train: &Labelled,
    test: &Labelled,
    pool: Pool,
    device: Device,
    k: usize,
    temperature: f32,
    progress: bool,
) -> Result<f64> {
    let ftr = pooled_features(encoder, pre, train.ds.as_ref(), pool, device, progress)?;
    let d = ftr.size()[1] as usize;
    let fte = pooled_features(encoder, pre, test.ds.as_ref(), pool, device, progress)?;
    let (ftr, fte) = (l2_rows(ftr), l2_rows(fte));
    Ok(crate::eval::knn_top1(
        (&ftr, &train.labels),
        (&fte, &test.labels),
        d,
        train.classes().len(),
        k,
        temperature,
    ))
}
