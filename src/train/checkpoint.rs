//! Checkpoints: `checkpoint.safetensors` (fp32 weights, timm/MAE names) + `config.json`, and
//! `resume.safetensors`, the one resume format of every trainer (flat master, Adam moments,
//! step, the run's description; pretraining adds the EMA teacher and the next step's masks).
//! Every file is written atomically, so a kill at any moment leaves the previous set readable.
use super::optim::FlatParams;
use crate::error::{Error, IoContext, Result};
use crate::files::write_atomic;
use safetensors::tensor::{Dtype, TensorView};
use serde::{de::DeserializeOwned, Serialize};
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// The resume file of a run folder.
pub const RESUME_FILE: &str = "resume.safetensors";

/// A resume file's state beyond the optimizer's (which goes straight into a `FlatParams`).
pub struct Resume {
    /// Optimizer steps done.
    pub step: u64,
    /// The trainer's own tensors (e.g. `ema`, `next.*`), by name.
    pub tensors: HashMap<String, Tensor>,
    pub meta: HashMap<String, String>,
}

/// Write `out/resume.safetensors`: `flat`'s master weights and AdamW moments, the step, the
/// number of processes and the run's description (resuming needs the same), plus a trainer's
/// own tensors and metadata. It is the source of truth of a run folder, so it is written before
/// the user-facing files.
pub fn save_resume(
    out: &Path,
    flat: &FlatParams,
    (step, world): (u64, usize),
    run: &impl Serialize,
    extra: Vec<(String, Tensor)>,
    extra_meta: HashMap<String, String>,
) -> Result<()> {
    let mut meta = extra_meta;
    meta.extend([
        ("step".to_string(), step.to_string()),
        ("world".to_string(), world.to_string()),
        ("adam_step".to_string(), flat.adam_step.to_string()),
        (
            "run".to_string(),
            serde_json::to_string(run).expect("serialisable"),
        ),
    ]);
    let mut state = vec![
        ("master".to_string(), flat.master.shallow_clone()),
        ("adam_m".to_string(), flat.m.shallow_clone()),
        ("adam_v".to_string(), flat.v.shallow_clone()),
    ];
    state.extend(extra);
    save_tensors(&out.join(RESUME_FILE), &state, meta)
}

/// Go on from `out/resume.safetensors` if there is one: refuses a file of another `run` or of
/// another number of processes (`world`: the global batch, hence data order, masks and lr,
/// depend on it), restores `flat`, and returns the rest.
pub fn load_resume<R: DeserializeOwned + PartialEq>(
    out: &Path,
    run: &R,
    world: usize,
    flat: &mut FlatParams,
) -> Result<Option<Resume>> {
    let path = out.join(RESUME_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let (tensors, meta) = load_tensors(&path)?;
    // ("run_config": pretraining's key before the trainers shared this format)
    let text = meta
        .get("run")
        .or(meta.get("run_config"))
        .ok_or_else(|| Error::bad_file(&path, "no run description in the resume file"))?;
    let saved: R = serde_json::from_str(text).map_err(|e| {
        Error::bad_file(
            &path,
            format!("a run of another ehm version ({e}); pass --fresh to start over or choose another --out"),
        )
    })?;
    if &saved != run {
        return Err(Error::Config(format!(
            "{} holds a different run (model, data or recipe differ); pass --fresh to start over or choose another --out",
            out.display()
        )));
    }
    let saved_world: usize = meta.get("world").and_then(|w| w.parse().ok()).unwrap_or(1);
    if saved_world != world {
        return Err(Error::Config(format!(
            "{} was trained by {saved_world} process(es), this launch has {world}: resume it with {saved_world} (or pass --fresh)",
            out.display()
        )));
    }
    read_resume(&path, tensors, meta, flat).map(Some)
}

/// The state of a resume file already read (`load_tensors`), with `flat` restored from it.
pub fn read_resume(
    path: &Path,
    tensors: HashMap<String, Tensor>,
    meta: HashMap<String, String>,
    flat: &mut FlatParams,
) -> Result<Resume> {
    flat.restore(&tensors, &meta, path)?;
    let step = meta
        .get("step")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::bad_file(path, "no step in the resume file"))?;
    Ok(Resume {
        step,
        tensors,
        meta,
    })
}

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

    fn flat(init: f64) -> (tch::nn::VarStore, FlatParams) {
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let _ = vs.root().var("w", &[3], tch::nn::Init::Const(init));
        let fp = FlatParams::new(&vs, Kind::Float);
        (vs, fp)
    }

    #[test]
    fn every_trainer_resumes_from_one_format_and_refuses_another_run() {
        let d = tempfile::tempdir().unwrap();
        let run = serde_json::json!({"model": "a", "lr": 1e-3});
        let (_vs, mut trained) = flat(2.0);
        trained.adam_step = 7;
        let ema = Tensor::from_slice(&[5.0f32, 6.0]);
        let extra_meta = HashMap::from([("total_steps".to_string(), "9".to_string())]);
        save_resume(
            d.path(),
            &trained,
            (7, 1),
            &run,
            vec![("ema".into(), ema)],
            extra_meta,
        )
        .unwrap();

        let (_vs, mut fresh) = flat(0.0);
        let r = load_resume(d.path(), &run, 1, &mut fresh).unwrap().unwrap();
        assert_eq!((r.step, fresh.adam_step), (7, 7));
        assert_eq!(Vec::<f32>::try_from(&fresh.master).unwrap(), [2.0; 3]);
        assert_eq!(Vec::<f32>::try_from(&r.tensors["ema"]).unwrap(), [5.0, 6.0]);
        assert_eq!(r.meta["total_steps"], "9");

        let other = serde_json::json!({"model": "a", "lr": 2e-3});
        let e = load_resume(d.path(), &other, 1, &mut fresh)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("different run") && e.contains("--fresh"), "{e}");
        let e = load_resume(d.path(), &run, 2, &mut fresh)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("trained by 1 process(es), this launch has 2"),
            "{e}"
        );
        assert!(load_resume(&d.path().join("none"), &run, 1, &mut fresh)
            .unwrap()
            .is_none());

        // pretraining's files from before the shared format name the run `run_config`
        let path = d.path().join(RESUME_FILE);
        let (t, mut meta) = load_tensors(&path).unwrap();
        let text = meta.remove("run").unwrap();
        meta.insert("run_config".into(), text);
        let t: Vec<(String, Tensor)> = t.into_iter().collect();
        save_tensors(&path, &t, meta).unwrap();
        let r = load_resume(d.path(), &run, 1, &mut fresh).unwrap().unwrap();
        assert_eq!(r.step, 7);
    }

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
