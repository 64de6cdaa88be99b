//! ehm-train pretrain end to end on a tiny synthetic CIFAR-format set: it trains, the loss
//! falls, kill -9 at a random moment resumes to the same final step, bad runs stop cleanly.
mod common;
use common::{
    json_out, losses, pretrain_cmd, relative_diff, tensors, weights, write_cifar, write_model,
    write_segset,
};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ehm-train"))
}

fn base_cmd(model: &Path, data: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = pretrain_cmd(model, data, out);
    c.args(["--knn-every", "-1", "--workers", "1"]).args(extra);
    c
}

#[test]
fn trains_and_the_loss_falls_for_every_strategy() {
    let d = tempfile::tempdir().unwrap();
    write_cifar(d.path());
    let model = write_model(d.path());
    for masking in ["random", "block", "grid", "ehm"] {
        let out = d.path().join(masking);
        let o = base_cmd(
            &model,
            d.path(),
            &out,
            &["--epochs", "8", "--masking", masking, "--log-every", "8"],
        )
        .output()
        .unwrap();
        let s = json_out(&o);
        assert_eq!(s["steps"], 80);
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let losses: Vec<f64> = lines.iter().filter_map(|l| l["loss"].as_f64()).collect();
        assert!(losses.len() >= 8);
        assert!(
            losses.last().unwrap() < &(losses[0] * 0.9),
            "{masking}: loss did not fall: {losses:?}"
        );
        assert!(out.join("masks.png").exists() && out.join("checkpoint.safetensors").exists());
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["pretrain"]["masking"], masking);
    }
}

#[test]
fn kill_9_then_rerun_resumes_to_the_same_end() {
    let d = tempfile::tempdir().unwrap();
    write_cifar(d.path());
    let model = write_model(d.path());
    let out = d.path().join("run");
    let args = ["--epochs", "12", "--save-every", "5", "--log-every", "1"];
    let mut child = base_cmd(&model, d.path(), &out, &args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill once the first checkpoint exists, plus a little, mid-step.
    let t0 = Instant::now();
    while !out.join("resume.safetensors").exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(150));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let s = json_out(&base_cmd(&model, d.path(), &out, &args).output().unwrap());
    let resumed = s["resumed_from"]
        .as_u64()
        .expect("the second run must resume");
    assert!(
        resumed >= 5 && resumed.is_multiple_of(5),
        "resumed from {resumed}"
    );
    assert_eq!(s["steps"], 120);
    // metrics: one line per step, no duplicates, ending at the last step
    let steps: Vec<u64> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            serde_json::from_str::<serde_json::Value>(l).ok()?["loss"]
                .as_f64()
                .map(|_| l.to_string())
        })
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(&l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, (1..=120).collect::<Vec<_>>());
    // A third run finds the work done and does not train again.
    let s = json_out(&base_cmd(&model, d.path(), &out, &args).output().unwrap());
    assert_eq!(s["resumed_from"], 120);
}

#[test]
fn a_resumed_ehm_run_is_bit_identical_to_an_uninterrupted_one() {
    // EHM builds step s+1's masks from the teacher before step s's update; the resume file
    // keeps those masks, so the resumed run masks its first step as the uninterrupted run did
    let d = tempfile::tempdir().unwrap();
    write_cifar(d.path());
    let model = write_model(d.path());
    let args = [
        "--epochs",
        "6",
        "--save-every",
        "7",
        "--ema-half-life-steps",
        "3",
    ];
    let whole = d.path().join("whole");
    json_out(&base_cmd(&model, d.path(), &whole, &args).output().unwrap());
    let cut = d.path().join("cut");
    let mut child = base_cmd(&model, d.path(), &cut, &args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !cut.join("resume.safetensors").exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let s = json_out(&base_cmd(&model, d.path(), &cut, &args).output().unwrap());
    let resumed = s["resumed_from"].as_u64().expect("resumed");
    assert!(
        resumed < 60,
        "killed before the end (resumed from {resumed})"
    );
    let (a, b) = (
        tensors(&whole.join("checkpoint.safetensors")),
        tensors(&cut.join("checkpoint.safetensors")),
    );
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    let differ: Vec<&String> = a.keys().filter(|k| a[*k] != b[*k]).collect();
    assert!(
        differ.is_empty(),
        "resumed from step {resumed}: {} tensors differ, e.g. {:?}",
        differ.len(),
        differ.first()
    );
}

#[test]
fn a_different_run_in_the_same_folder_is_refused() {
    let d = tempfile::tempdir().unwrap();
    write_cifar(d.path());
    let model = write_model(d.path());
    let out = d.path().join("run");
    json_out(
        &base_cmd(&model, d.path(), &out, &["--epochs", "1"])
            .output()
            .unwrap(),
    );
    let o = base_cmd(
        &model,
        d.path(),
        &out,
        &["--epochs", "1", "--masking", "random"],
    )
    .output()
    .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("different run") && err.contains("--fresh"),
        "{err}"
    );
    json_out(
        &base_cmd(
            &model,
            d.path(),
            &out,
            &["--epochs", "1", "--masking", "random", "--fresh"],
        )
        .output()
        .unwrap(),
    );
}

#[test]
fn exploding_loss_stops_and_keeps_the_last_good_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    write_cifar(d.path());
    let model = write_model(d.path());
    let out = d.path().join("run");
    let o = base_cmd(
        &model,
        d.path(),
        &out,
        &[
            "--epochs",
            "4",
            "--blr",
            "1e30",
            "--warmup-epochs",
            "0",
            "--save-every",
            "1",
        ],
    )
    .output()
    .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    // the loss, or the teacher's affinity (EHM builds the next masks first), says it diverged
    assert!(
        (err.contains("loss became") || err.contains("NaN/infinite")) && err.contains("at step"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(
        out.join("checkpoint.safetensors").exists(),
        "the checkpoint of the last good step is kept"
    );
}

#[test]
fn bad_inputs_are_one_line_errors() {
    let d = tempfile::tempdir().unwrap();
    let model = write_model(d.path());
    for (data, want) in [
        ("nonsense:thing", "unknown data set"),
        ("cifar:/nonexistent/dir", "no CIFAR"),
    ] {
        let o = Command::new(exe())
            .args(["pretrain", "--model"])
            .arg(&model)
            .args(["--data", data, "--out"])
            .arg(d.path().join("x"))
            .env("EHM_DEVICE", "cpu")
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.starts_with("error: ") && err.contains(want) && err.trim().lines().count() == 1,
            "{err}"
        );
    }
    let o = Command::new(exe())
        .args(["pretrain", "--model", "no_such_entry", "--out", "/tmp/x"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("no zoo entry"));
}

#[test]
fn knn_subcommand_agrees_with_the_training_monitor() {
    let d = tempfile::tempdir().unwrap();
    write_cifar(d.path());
    let model = write_model(d.path());
    let out = d.path().join("run");
    // (base_cmd disables the monitor; here it runs at the end of training)
    let o = pretrain_cmd(&model, d.path(), &out)
        .args(["--epochs", "2", "--knn-every", "0"])
        .output()
        .unwrap();
    let s = json_out(&o);
    let monitor = s["knn_top1"].as_f64().expect("monitor ran");
    let cifar = d.path().display().to_string();
    let o = Command::new(exe())
        .arg("knn")
        .arg(&out)
        .args([
            "--train",
            &format!("cifar:{cifar}:train"),
            "--test",
            &format!("cifar:{cifar}:test"),
            "--json",
        ])
        .args(["--train-limit", "10000", "--test-limit", "2000"])
        .env("EHM_DEVICE", "cpu")
        .output()
        .unwrap();
    let k = json_out(&o);
    assert_eq!(k["knn_top1"].as_f64().unwrap(), monitor);
    assert!(
        monitor > 0.25,
        "above chance on the synthetic classes: {monitor}"
    );
}

#[test]
fn hierarchy_monitor_and_the_masks_command() {
    let d = tempfile::tempdir().unwrap();
    write_cifar(d.path());
    let model = write_model(d.path());
    let seg = d.path().join("seg");
    write_segset(&seg, 2, 12);
    let out = d.path().join("run");
    let args = [
        "--epochs",
        "2",
        "--log-every",
        "5",
        "--hierarchy-every",
        "1",
        "--hierarchy-data",
    ];
    let o = base_cmd(&model, d.path(), &out, &args)
        .arg(&seg)
        .output()
        .unwrap();
    json_out(&o);
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // hierarchy reports at the start (untrained teacher), after epoch 1 and at the end
    let reports: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["hierarchy"].is_object())
        .collect();
    let steps: Vec<u64> = reports
        .iter()
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![0, 10, 20]);
    for r in &reports {
        let h = &r["hierarchy"];
        assert_eq!(
            h["counts"],
            serde_json::json!([4, 8]),
            "N = 16: counts below N"
        );
        assert_eq!(h["images"], 12);
        for who in ["teacher", "grid"] {
            for s in h[who].as_array().unwrap() {
                for k in ["asa", "boundary_recall", "best_iou"] {
                    let v = s[k].as_f64().unwrap();
                    assert!((0.0..=1.0).contains(&v), "{who} {k} {v}");
                }
            }
        }
    }
    assert!(out.join("hierarchy.png").exists());
    // training intervals say what the masks followed
    let train_line = lines.iter().find(|l| l["loss"].is_number()).unwrap();
    for k in [
        "cut_segments",
        "alpha",
        "largest_segment_share",
        "mean_segment_patches",
        "mask_ratio",
    ] {
        assert!(train_line[k].is_number(), "{k} missing: {train_line}");
    }

    // ehm-train masks: with the run's teacher, and with an untrained model
    let imgs = seg.join("images/val");
    let picture = d.path().join("masks.png");
    let o = Command::new(exe())
        .arg("masks")
        .arg(&out)
        .arg(imgs.join("000.png"))
        .arg(imgs.join("001.png"))
        .args(["--t", "0,0.5,1", "--picture"])
        .arg(&picture)
        .env("EHM_DEVICE", "cpu")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let recs: Vec<serde_json::Value> = String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(recs.len(), 6, "2 images × 3 values of t");
    for r in &recs {
        assert_eq!(r["grid"], serde_json::json!([4, 4]));
        assert_eq!(r["masking"], "ehm");
        assert_eq!(r["visible"].as_array().unwrap().len(), 4, "r = 0.75 of 16");
        assert_eq!(r["segments"].as_array().unwrap().len(), 16);
    }
    // at t = 1 the cut has the schedule's coarse end (2 segments at N = 16)
    let last = recs[2]["segments"].as_array().unwrap();
    assert_eq!(last.iter().map(|v| v.as_u64().unwrap()).max(), Some(1));
    let pic = image::open(&picture).unwrap();
    assert!(
        pic.width() > 4 * 128 && pic.height() > 2 * 128,
        "{:?}",
        (pic.width(), pic.height())
    );
    let o = Command::new(exe())
        .args(["masks", "--model"])
        .arg(&model)
        .args(["--masking", "random", "--t", "0.5"])
        .arg(imgs.join("000.png"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["masking"], "random");
    assert!(r.get("segments").is_none());
}

#[test]
fn accumulating_two_half_batches_is_one_full_batch() {
    // MAE's accum_iter: batch 16 × 2 accumulation steps takes the same images, masks and
    // gradients as batch 32, so the runs agree to float rounding (measured: 2–3e-7 relative
    // in the weights); batch 16 alone does not (6e-3). Giving every piece the first piece's
    // masks fails at step 1. (A gradient summed instead of averaged would pass: AdamW is
    // invariant to the gradient's scale.)
    let d = tempfile::tempdir().unwrap();
    write_cifar(d.path());
    let model = write_model(d.path());
    for masking in ["ehm", "random"] {
        let run = |name: &str, extra: &[&str]| {
            let out = d.path().join(format!("{masking}_{name}"));
            let mut args = vec!["--epochs", "2", "--log-every", "1", "--masking", masking];
            args.extend_from_slice(extra);
            let s = json_out(&base_cmd(&model, d.path(), &out, &args).output().unwrap());
            (s, out)
        };
        let (whole, w) = run("b32", &["--batch-size", "32"]);
        let (accum, a) = run("b16x2", &["--batch-size", "16", "--accum-steps", "2"]);
        let (half, h) = run("b16", &["--batch-size", "16", "--blr", "2e-3"]);
        // 320 images: 10 steps of 32 per epoch
        assert_eq!(whole["steps"], 20);
        assert_eq!(accum["steps"], 20, "{masking}: optimizer steps, not passes");
        assert_eq!(half["steps"], 40);
        let (lw, la) = (losses(&w), losses(&a));
        assert_eq!((lw.len(), la.len()), (20, 20));
        for (s, (x, y)) in lw.iter().zip(&la).enumerate() {
            assert!(
                (x - y).abs() <= 1e-5 * x.abs(),
                "{masking}: loss at step {} is {x} with batch 32, {y} with 16 × 2",
                s + 1
            );
        }
        let ww = weights(&w.join("checkpoint.safetensors"));
        let same = relative_diff(&ww, &weights(&a.join("checkpoint.safetensors")));
        let other = relative_diff(&ww, &weights(&h.join("checkpoint.safetensors")));
        assert!(
            same <= 1e-5,
            "{masking}: 16 × 2 differs from 32 by {same:e}"
        );
        assert!(
            other > 1e-3,
            "{masking}: batch 16 alone is {other:e} from 32: no teeth"
        );
    }
}

#[test]
fn a_rank_without_a_rendezvous_address_is_refused_before_any_work() {
    // a rank that cannot find the others must not train alone into the shared folder
    let d = tempfile::tempdir().unwrap();
    write_cifar(d.path());
    let model = write_model(d.path());
    let out = d.path().join("run");
    let o = base_cmd(&model, d.path(), &out, &["--epochs", "1"])
        .env("RANK", "1")
        .env("WORLD_SIZE", "2")
        .env_remove("MASTER_ADDR")
        .env_remove("MASTER_PORT")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("rank 1 of 2: MASTER_ADDR and MASTER_PORT are not set"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(!out.join("checkpoint.safetensors").exists());
}
