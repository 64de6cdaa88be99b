//! Checkpoints: `checkpoint.safetensors` (fp32 weights, timm/MAE names) + `config.json`, and
//! `resume.safetensors` (flat master, Adam moments, EMA, step). Every file is written
//! atomically, so a kill at any moment leaves the previous set readable.
use crate::error::{Error, IoContext, Result};
use crate::files::write_atomic;
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

fn to_bytes(t: &Tensor) -> (Vec<usize>, Vec<u8>) {
    let t = t.to_kind(Kind::Float).to_device(Device::Cpu).contiguous();
    let shape = t.size().iter().map(|&d| d as usize).collect();
    let v: Vec<f32> = Vec::<f32>::try_from(t.view(-1)).expect("float tensor");
    (shape, v.iter().flat_map(|x| x.to_le_bytes()).collect())
}

/// Serialise named tensors (any kind; stored as F32) with string metadata, atomically.
/// Refuses (and writes nothing) when a tensor holds NaN or infinity: a diverged run must not
/// replace the last good checkpoint with one that only looks like a result.
pub fn save_tensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let bad: Vec<&str> = tensors
        .iter()
        .filter(|(_, t)| !bool::try_from(t.isfinite().all()).unwrap_or(false))
        .map(|(n, _)| n.as_str())
        .collect();
    if let Some(first) = bad.first() {
        return Err(Error::Training(format!(
            "{}: not saved: {} of {} tensors ({first}{}) hold NaN or infinity — training diverged; the previous checkpoint is kept (lower the learning rate or check the data)",
            path.display(),
            bad.len(),
            tensors.len(),
            if bad.len() > 1 { ", …" } else { "" }
        )));
    }
    let owned: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, t)| {
            let (s, b) = to_bytes(t);
            (n.clone(), s, b)
        })
        .collect();
    let views: Vec<(String, TensorView)> = owned
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).expect("consistent view"),
            )
        })
        .collect();
    let mut meta = metadata;
    meta.entry("format".into()).or_insert_with(|| "pt".into());
    let bytes = safetensors::serialize(views, Some(meta))
        .map_err(|e| Error::Other(format!("{}: {e}", path.display())))?;
    write_atomic(path, &bytes)
}

/// Read every tensor of a safetensors file as fp32 CPU tensors, plus the metadata.
pub fn load_tensors(path: &Path) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let bytes = std::fs::read(path).at(path)?;
    let (raw, meta) = crate::checkpoint::parse_f32_safetensors(&bytes, path)?;
    let tensors = raw
        .into_iter()
        .map(|(n, (shape, data))| (n, Tensor::from_slice(&data).view(shape.as_slice())))
        .collect();
    Ok((tensors, meta))
}

/// Copy tensors into the variables of `vs` by name. Every variable must be present with the
/// same shape, unless `allow_missing` names a prefix that may be absent (e.g. a decoder).
pub fn load_into_varstore(
    vs: &tch::nn::VarStore,
    tensors: &HashMap<String, Tensor>,
    path: &Path,
    allow_missing: &[&str],
) -> Result<()> {
    for (name, mut var) in vs.variables() {
        match tensors.get(&name) {
            Some(t) => {
                if t.size() != var.size() {
                    return Err(Error::bad_file(
                        path,
                        format!(
                            "tensor {name} has shape {:?}, the model needs {:?}",
                            t.size(),
                            var.size()
                        ),
                    ));
                }
                tch::no_grad(|| var.copy_(t));
            }
            None if allow_missing.iter().any(|p| name.starts_with(p)) => {}
            None => return Err(Error::bad_file(path, format!("missing tensor {name}"))),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_weights_are_not_saved() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ck.safetensors");
        let good = Tensor::from_slice(&[1.0f32, 2.0]);
        save_tensors(&p, &[("w".into(), good.shallow_clone())], HashMap::new()).unwrap();
        let before = std::fs::read(&p).unwrap();
        for bad in [f32::NAN, f32::INFINITY] {
            let t = Tensor::from_slice(&[1.0f32, bad]);
            let e = save_tensors(
                &p,
                &[("w".into(), good.shallow_clone()), ("b".into(), t)],
                HashMap::new(),
            )
            .unwrap_err()
            .to_string();
            assert!(
                e.contains("not saved") && e.contains("1 of 2") && e.contains('b'),
                "{e}"
            );
            assert_eq!(std::fs::read(&p).unwrap(), before, "the good file is kept");
        }
    }
}
