//! ehm-train finetune / segment on tiny synthetic sets: the loss falls, the metrics beat chance,
//! re-running resumes, and the segmenter exports to ONNX with the same logits as tch.
mod common;
use ehm::contract::ModelContract;
use ehm::infer::OrtModel;
use std::process::Command;
use tch::{Device, Kind, Tensor};

fn train_cmd() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ehm-train"));
    c.env("EHM_DEVICE", "cpu");
    c
}

#[test]
fn finetune_learns_resumes_and_exports_a_classifier() {
    let d = tempfile::tempdir().unwrap();
    let run = common::shared_micro().run.clone();
    let cifar = common::shared_micro().data.display().to_string();
    let out = d.path().join("ft");
    let cmd = || {
        let mut c = train_cmd();
        c.arg("finetune").arg(&run).arg("-o").arg(&out).args([
            "--train",
            &format!("cifar:{cifar}:train"),
            "--test",
            &format!("cifar:{cifar}:test"),
            "--epochs",
            "20",
            "--batch-size",
            "32",
            "--blr",
            "1e-2",
            "--min-crop",
            "0.5",
            "--json",
        ]);
        c
    };
    let o = cmd().output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let (first, last) = (
        r["first_epoch_loss"].as_f64().unwrap(),
        r["last_epoch_loss"].as_f64().unwrap(),
    );
    assert!(last < first * 0.8, "loss {first} → {last}");
    // 4 separable classes, chance 25 %
    assert!(r["top1"].as_f64().unwrap() > 0.6, "top-1 {}", r["top1"]);
    assert_eq!(r["resumed_from"], serde_json::Value::Null);
    let lines = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 20, "one line per epoch");

    // the same command again finds the finished state and does not train again
    let o = cmd().output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r2: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r2["resumed_from"], r["steps"]);
    assert_eq!(r2["top1"], r["top1"], "same weights, same score");

    // another recipe into the same folder is refused, not mixed
    let o = cmd().args(["--label-smoothing", "0.3"]).output().unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("different run") && e.lines().count() == 1, "{e}");

    // the fine-tuned checkpoint exports as a classifier
    let file = d.path().join("ft.onnx");
    let o = common::export_onnx(&out, "classify", &[], &file);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(ModelContract::read(&file).unwrap().labels.len(), 10);
}

/// The run description a fine-tuning folder's resume state holds.
fn finetune_run(out: &std::path::Path) -> serde_json::Value {
    let bytes = std::fs::read(out.join("resume.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    serde_json::from_str(&meta.metadata().as_ref().unwrap()["run"]).unwrap()
}

#[test]
fn the_mae_recipe_fills_the_flags_not_given_and_learns() {
    // --recipe mae: RandAugment, random erasing, Mixup / CutMix with soft targets, layer
    // decay 0.65, global pool … for every flag not given; a given flag wins
    let d = tempfile::tempdir().unwrap();
    let run = common::shared_micro().run.clone();
    let cifar = common::shared_micro().data.display().to_string();
    let ft = |out: &std::path::Path, extra: &[&str]| {
        let o = train_cmd()
            .arg("finetune")
            .arg(&run)
            .arg("-o")
            .arg(out)
            .args(["--train", &format!("cifar:{cifar}:train")])
            .args(["--test", &format!("cifar:{cifar}:test")])
            .args(["--recipe", "mae", "--batch-size", "32", "--blr", "1e-2"])
            .args(["--min-crop", "0.5", "--warmup-epochs", "1", "--json"])
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
    };
    let out = d.path().join("mae");
    let r = ft(&out, &["--epochs", "40"]);
    let cfg = finetune_run(&out);
    assert_eq!(cfg["regularise"]["mixup"], 0.8);
    assert_eq!(cfg["regularise"]["cutmix"], 1.0);
    assert_eq!(cfg["regularise"]["reprob"], 0.25);
    assert_eq!(cfg["rand_augment"]["magnitude"], 9.0);
    assert_eq!(cfg["rand_augment"]["ops"], 2);
    assert_eq!(cfg["recipe"]["layer_decay"], 0.65);
    assert_eq!(cfg["recipe"]["label_smoothing"], 0.1);
    assert_eq!(cfg["pool"], "mean");
    // given on the command line: kept
    assert_eq!(cfg["recipe"]["epochs"], 40);
    assert_eq!(cfg["recipe"]["blr"], 1e-2);
    // 4 separable classes (chance 25 %) even through mixed, erased, RandAugmented batches
    assert!(r["top1"].as_f64().unwrap() > 0.6, "top-1 {}", r["top1"]);

    let out = d.path().join("mae_nomix");
    ft(
        &out,
        &[
            "--epochs", "1", "--mixup", "0", "--cutmix", "0", "--aa", "none",
        ],
    );
    let cfg = finetune_run(&out);
    assert_eq!(cfg["regularise"]["mixup"], 0.0);
    assert_eq!(cfg["regularise"]["cutmix"], 0.0);
    assert_eq!(cfg["rand_augment"], serde_json::Value::Null);
    assert_eq!(cfg["regularise"]["reprob"], 0.25);
}

#[test]
fn segment_head_learns_and_exports_with_tch_parity() {
    let d = tempfile::tempdir().unwrap();
    let run = common::shared_micro().run.clone();
    let seg = d.path().join("seg");
    common::write_segset(&seg, 64, 16);
    let out = d.path().join("segrun");
    let o = train_cmd()
        .arg("segment")
        .arg(&run)
        .arg("--data")
        .arg(&seg)
        .arg("-o")
        .arg(&out)
        .args([
            "--image-size",
            "32",
            "--epochs",
            "12",
            "--batch-size",
            "16",
            "--blr",
            "0.02",
            "--drop-path",
            "0",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let (first, last) = (
        r["first_epoch_loss"].as_f64().unwrap(),
        r["last_epoch_loss"].as_f64().unwrap(),
    );
    assert!(last < first * 0.7, "loss {first} → {last}");
    // background alone would give IoU (bg) ≈ 0.8 and mIoU ≈ 0.27
    assert!(r["miou"].as_f64().unwrap() > 0.5, "mIoU {}", r["miou"]);
    assert!(out.join("predictions.png").exists());

    // export: seg_logits at the input size equal tch's upsampled head output
    let file = d.path().join("seg.onnx");
    let o = common::export_onnx(&out, "segment", &[], &file);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let c = ModelContract::read(&file).unwrap();
    assert_eq!(c.labels, vec!["background", "red", "blue"]);
    assert_eq!(c.config.preprocess.image_size, 32);
    let bb = ehm::train::probe::Backbone::open(&out, Device::Cpu).unwrap();
    let (tensors, _) =
        ehm::train::checkpoint::load_tensors(&out.join("checkpoint.safetensors")).unwrap();
    tch::manual_seed(4);
    let x = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
    let want = tch::no_grad(|| {
        let t = bb.encoder.forward_features(&x);
        let l =
            t.narrow(1, 1, 64).matmul(&tensors["seg_head.weight"].tr()) + &tensors["seg_head.bias"];
        l.permute([0, 2, 1])
            .reshape([2, 3, 8, 8])
            .upsample_bilinear2d([32, 32], false, None, None)
    });
    let want: Vec<f32> = Vec::try_from(want.contiguous().view(-1)).unwrap();
    let xs: Vec<f32> = Vec::try_from(x.view(-1)).unwrap();
    let (shape, got) = OrtModel::open(&file, 1)
        .unwrap()
        .run(&xs, 2, "seg_logits")
        .unwrap();
    assert_eq!(shape, vec![2, 3, 32, 32]);
    let err = common::max_abs_diff(&got, &want);
    eprintln!("parity segment: max abs diff {err:.2e}");
    assert!(err <= 1e-4, "{err}");

    // --int8 (blocks int8, the head fp32): the class maps of the validation images stay the same
    let file8 = d.path().join("seg8.onnx");
    let o = common::export_onnx(&out, "segment", &["--int8"], &file8);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut px = Vec::new();
    let mut n = 0;
    for e in std::fs::read_dir(seg.join("images/val")).unwrap() {
        let img = image::open(e.unwrap().path()).unwrap().to_rgb8();
        let mut x = vec![0f32; 3 * 32 * 32];
        c.config.preprocess.eval_into(&img, &mut x);
        px.extend(x);
        n += 1;
    }
    let argmax = |file: &std::path::Path| {
        let (_, l) = OrtModel::open(file, 1)
            .unwrap()
            .run(&px, n, "seg_logits")
            .unwrap();
        let hw = 32 * 32;
        (0..n * hw)
            .map(|i| {
                let (b, p) = (i / hw, i % hw);
                (0..3)
                    .max_by(|&a, &k| l[(b * 3 + a) * hw + p].total_cmp(&l[(b * 3 + k) * hw + p]))
                    .unwrap()
            })
            .collect::<Vec<_>>()
    };
    let (m32, m8) = (argmax(&file), argmax(&file8));
    let same = m32.iter().zip(&m8).filter(|(a, b)| a == b).count() as f64 / m32.len() as f64;
    eprintln!(
        "segment int8 vs fp32: {:.2} % of pixels in the same class",
        100.0 * same
    );
    assert!(n == 16 && same > 0.98, "{n} images, agreement {same}");

    // a backbone without a segment head is refused for --task segment
    let o = common::export_onnx(&run, "segment", &[], &d.path().join("x.onnx"));
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no segment head"));
}
