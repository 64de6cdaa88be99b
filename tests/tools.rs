//! ehm-classify and ehm-segment end to end: their numbers equal the training framework's (tch)
//! on the same images, bad inputs are reported and skipped with exit status 1, a model of the
//! wrong task or a missing model is one clear error with exit status 2.
mod common;
use ehm::data::Preprocess;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use tch::{Device, Kind, Tensor};

fn ehm(bin: &str) -> Command {
    let exe = match bin {
        "train" => PathBuf::from(env!("CARGO_BIN_EXE_ehm-train")),
        "export" => common::tool("ehm-export"),
        "classify" => common::tool("ehm-classify"),
        _ => common::tool("ehm-segment"),
    };
    let mut c = Command::new(exe);
    c.env("EHM_DEVICE", "cpu");
    c
}

fn ok(o: Output) -> Output {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    o
}

fn export(ckpt: &Path, task: &str, out: &Path) {
    ok(ehm("export")
        .arg("onnx")
        .arg(ckpt)
        .args(["--task", task, "-o"])
        .arg(out)
        .output()
        .unwrap());
}

/// Images of several sizes cut from the synthetic CIFAR records, plus three bad files.
fn write_inputs(dir: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    std::fs::create_dir_all(dir).unwrap();
    let cifar = ehm::data::cifar::load(&common::shared_micro().data, "test")
        .expect("the synthetic CIFAR of the shared micro model");
    use ehm::data::Dataset;
    let mut good = Vec::new();
    for (i, size) in [(0usize, 32u32), (5, 48), (10, 20), (15, 64), (22, 40)] {
        let img = image::imageops::resize(
            &cifar.image(i).unwrap(),
            size,
            size + 7,
            image::imageops::FilterType::Triangle,
        );
        let p = dir.join(format!("img{i:02}.png"));
        img.save(&p).unwrap();
        good.push(p);
    }
    let empty = dir.join("empty.jpg");
    std::fs::write(&empty, b"").unwrap();
    let corrupt = dir.join("corrupt.png");
    std::fs::write(&corrupt, b"\x89PNG\r\n\x1a\nthis is not a png").unwrap();
    // a valid PNG header declaring 30000×30000 pixels
    let huge = dir.join("huge.png");
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend(30000u32.to_be_bytes());
    ihdr.extend(30000u32.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(13u32.to_be_bytes());
    png.extend(&ihdr);
    png.extend(crc32fast::hash(&ihdr).to_be_bytes());
    std::fs::write(&huge, png).unwrap();
    (good, vec![empty, corrupt, huge])
}

/// Softmax probabilities from tch: shared preprocessing → encoder → class token → head.
fn tch_probs(ckpt: &Path, pre: &Preprocess, files: &[PathBuf]) -> Vec<Vec<f32>> {
    let bb = ehm::train::probe::Backbone::open(ckpt, Device::Cpu).unwrap();
    let (t, _) =
        ehm::train::checkpoint::load_tensors(&ckpt.join("checkpoint.safetensors")).unwrap();
    files
        .iter()
        .map(|f| {
            let img = ehm::data::image_io::load_rgb(f).unwrap();
            let s = pre.image_size as i64;
            let x = Tensor::from_slice(&pre.eval(&img)).view([1, 3, s, s]);
            let p = tch::no_grad(|| {
                let cls = bb.encoder.forward_features(&x).select(1, 0);
                (cls.matmul(&t["head.weight"].tr()) + &t["head.bias"]).softmax(-1, Kind::Float)
            });
            Vec::try_from(p.view(-1)).unwrap()
        })
        .collect()
}

#[test]
fn classify_matches_tch_and_skips_bad_inputs() {
    let d = tempfile::tempdir().unwrap();
    let run = common::shared_micro().run.clone();
    let cifar = common::shared_micro().data.display().to_string();
    let probe = d.path().join("probe");
    ok(ehm("train")
        .arg("probe")
        .arg(&run)
        .arg("-o")
        .arg(&probe)
        .args([
            "--train",
            &format!("cifar:{cifar}:train"),
            "--test",
            &format!("cifar:{cifar}:test"),
        ])
        .args(["--epochs", "5", "--json"])
        .output()
        .unwrap());
    let model = d.path().join("cls.onnx");
    export(&probe, "classify", &model);
    let (good, bad) = write_inputs(&d.path().join("inputs"));

    // files in a chosen order, bad ones in between, batch 2 so batches mix good and bad
    let order = [
        &good[0], &bad[0], &good[1], &good[2], &bad[1], &good[3], &bad[2], &good[4],
    ];
    let o = ehm("classify")
        .arg("-m")
        .arg(&model)
        .args([
            "--format",
            "jsonl",
            "--top-k",
            "10",
            "--batch",
            "2",
            "--threads",
            "2",
        ])
        .args(order)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "some inputs failed → exit 1");
    let err = String::from_utf8_lossy(&o.stderr);
    for b in &bad {
        let name = b.file_name().unwrap().to_string_lossy();
        assert_eq!(
            err.lines().filter(|l| l.contains(&*name)).count(),
            1,
            "one line for {name}: {err}"
        );
    }
    assert!(!err.contains("panicked"), "{err}");
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), good.len(), "stdout holds only results");
    let pre = ehm::contract::ModelContract::read(&model)
        .unwrap()
        .config
        .preprocess;
    let want = tch_probs(&probe, &pre, &good);
    let mut worst = 0f32;
    for ((line, path), w) in lines.iter().zip(&good).zip(&want) {
        assert_eq!(
            line["path"].as_str().unwrap(),
            path.display().to_string(),
            "input order kept"
        );
        let top = line["top"].as_array().unwrap();
        assert_eq!(top.len(), 10);
        for t in top {
            let i = t["index"].as_u64().unwrap() as usize;
            worst = worst.max((t["probability"].as_f64().unwrap() as f32 - w[i]).abs());
        }
    }
    eprintln!("ehm-classify vs tch: max probability difference {worst:.2e}");
    assert!(worst <= 1e-4, "{worst}");

    // a folder, the CSV form, and all good → exit 0
    let o = ok(ehm("classify")
        .arg("-m")
        .arg(&model)
        .args(["--format", "csv", "--top-k", "2"])
        .args(&good)
        .output()
        .unwrap());
    let csv = String::from_utf8_lossy(&o.stdout);
    assert_eq!(csv.lines().next(), Some("path,rank,label,probability"));
    assert_eq!(csv.lines().count(), 1 + 2 * good.len());

    // paths on stdin
    let mut c = ehm("classify");
    c.arg("-m")
        .arg(&model)
        .arg("-")
        .stdin(std::process::Stdio::piped());
    c.stdout(std::process::Stdio::piped());
    let mut child = c.spawn().unwrap();
    use std::io::Write;
    let list: String = good.iter().map(|p| format!("{}\n", p.display())).collect();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(list.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success());
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).lines().count(),
        1 + good.len()
    );

    // the wrong task and a missing model: one line, exit 2
    let embed = d.path().join("embed.onnx");
    export(&run, "embed", &embed);
    let o = ehm("classify")
        .arg("-m")
        .arg(&embed)
        .args(&good)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("embed model") && e.contains("ehm-retrieve") && e.lines().count() == 1,
        "{e}"
    );
    let o = ehm("classify")
        .args(["-m", "/nonexistent/model.onnx"])
        .args(&good)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("/nonexistent/model.onnx") && e.lines().count() == 1,
        "{e}"
    );
    let o = ehm("classify")
        .arg("-m")
        .arg(&good[0])
        .args(&good)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "an image is not a model");
}

#[test]
fn segment_writes_maps_equal_to_tch_and_overlays() {
    let d = tempfile::tempdir().unwrap();
    let run = common::shared_micro().run.clone();
    let seg = d.path().join("seg");
    common::write_segset(&seg, 32, 6);
    let segrun = d.path().join("segrun");
    ok(ehm("train")
        .arg("segment")
        .arg(&run)
        .arg("--data")
        .arg(&seg)
        .arg("-o")
        .arg(&segrun)
        .args([
            "--image-size",
            "32",
            "--epochs",
            "4",
            "--batch-size",
            "16",
            "--json",
        ])
        .output()
        .unwrap());
    let model = d.path().join("seg.onnx");
    export(&segrun, "segment", &model);
    // inputs at other sizes than the model's, to exercise the resize back
    let inputs = d.path().join("in");
    std::fs::create_dir_all(&inputs).unwrap();
    let mut files = Vec::new();
    for (i, (w, h)) in [(45u32, 37u32), (32, 32), (80, 50)].iter().enumerate() {
        let src = image::open(seg.join(format!("images/val/{i:03}.png")))
            .unwrap()
            .to_rgb8();
        let img = image::imageops::resize(&src, *w, *h, image::imageops::FilterType::Triangle);
        let p = inputs.join(format!("v{i}.png"));
        img.save(&p).unwrap();
        files.push(p);
    }
    let out = d.path().join("out");
    let o = ok(ehm("segment")
        .arg("-m")
        .arg(&model)
        .arg("-o")
        .arg(&out)
        .arg(&inputs)
        .output()
        .unwrap());
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    let pre = ehm::contract::ModelContract::read(&model)
        .unwrap()
        .config
        .preprocess;
    let bb = ehm::train::probe::Backbone::open(&segrun, Device::Cpu).unwrap();
    let (t, _) =
        ehm::train::checkpoint::load_tensors(&segrun.join("checkpoint.safetensors")).unwrap();
    for (line, f) in lines.iter().zip(&files) {
        let sum: f64 = line["fractions"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_f64().unwrap())
            .sum();
        assert!((sum - 1.0).abs() < 1e-9);
        let map = image::open(line["classes_png"].as_str().unwrap())
            .unwrap()
            .to_luma8();
        let img = ehm::data::image_io::load_rgb(f).unwrap();
        assert_eq!(
            map.dimensions(),
            img.dimensions(),
            "class map at the input's size"
        );
        assert!(Path::new(line["overlay_png"].as_str().unwrap()).exists());
        // tch: the training evaluation's path (logits at S, bilinear to the image, argmax)
        let s = pre.image_size as i64;
        let x = Tensor::from_slice(&pre.eval(&img)).view([1, 3, s, s]);
        let want = tch::no_grad(|| {
            let tok = bb.encoder.forward_features(&x);
            let n = tok.size()[1];
            let g = ((n - 1) as f64).sqrt() as i64;
            let l =
                tok.narrow(1, 1, n - 1).matmul(&t["seg_head.weight"].tr()) + &t["seg_head.bias"];
            l.permute([0, 2, 1])
                .reshape([1, 3, g, g])
                .upsample_bilinear2d([s, s], false, None, None)
                .upsample_bilinear2d([img.height() as i64, img.width() as i64], false, None, None)
                .argmax(1, false)
                .to_kind(Kind::Uint8)
                .view(-1)
        });
        let want: Vec<u8> = Vec::try_from(&want).unwrap();
        let same = want
            .iter()
            .zip(map.as_raw())
            .filter(|(a, b)| a == b)
            .count();
        // the tool resizes the ONNX output (already at S) once more; equal but for ties
        assert!(
            same as f64 >= 0.995 * want.len() as f64,
            "{same}/{}",
            want.len()
        );
    }
    // an embed model is refused by ehm-segment, naming the tool that fits
    let embed = d.path().join("embed.onnx");
    export(&run, "embed", &embed);
    let o = ehm("segment")
        .arg("-m")
        .arg(&embed)
        .arg(&inputs)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("ehm-retrieve"));

    // a file name that is not UTF-8 is segmented, its JSON line names it lossily
    use std::os::unix::ffi::OsStrExt;
    let odd = d.path().join(std::ffi::OsStr::from_bytes(b"caf\xe9.png"));
    std::fs::copy(&files[0], &odd).unwrap();
    let o = ok(ehm("segment")
        .arg("-m")
        .arg(&model)
        .arg("-o")
        .arg(d.path().join("odd_out"))
        .arg(&odd)
        .output()
        .unwrap());
    let line: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(line["path"], odd.to_string_lossy().as_ref());
    assert!(Path::new(line["overlay_png"].as_str().unwrap()).exists());

    // a model whose labels are fewer than its classes is refused, naming the field
    use prost::Message;
    let mut m = ehm::onnx::ModelProto::decode(&std::fs::read(&model).unwrap()[..]).unwrap();
    for p in &mut m.metadata_props {
        if p.key.as_deref() == Some("ehm.labels") {
            p.value = Some("[\"background\"]".into());
        }
    }
    let few = d.path().join("few_labels.onnx");
    std::fs::write(&few, m.encode_to_vec()).unwrap();
    let o = ehm("segment")
        .arg("-m")
        .arg(&few)
        .arg(&odd)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("ehm.labels") && e.trim().lines().count() == 1,
        "{e}"
    );
}

#[test]
fn a_segment_head_on_an_onnx_backbone_exports_and_segments_as_it_was_evaluated() {
    let d = tempfile::tempdir().unwrap();
    let run = common::shared_micro().run.clone();
    let seg = d.path().join("seg");
    common::write_segset(&seg, 32, 6);
    // the backbone as the only thing the head sees: an ONNX file
    let backbone = d.path().join("backbone.onnx");
    export(&run, "backbone", &backbone);
    let segrun = d.path().join("segrun");
    let train = |extra: &[&str]| {
        ehm("train")
            .arg("segment")
            .arg(&backbone)
            .arg("--data")
            .arg(&seg)
            .arg("-o")
            .arg(&segrun)
            .args([
                "--epochs",
                "30",
                "--batch-size",
                "16",
                "--blr",
                "2",
                "--json",
            ])
            .args(extra)
            .output()
            .unwrap()
    };
    // an ONNX backbone cannot be fine-tuned: one line, before any work
    let o = train(&[]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("--freeze-backbone") && e.trim().lines().count() == 1,
        "{e}"
    );
    let o = ok(train(&["--freeze-backbone"]));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        segrun.join("features.safetensors").exists(),
        "features cached"
    );
    let miou = report["miou"].as_f64().unwrap();
    // the squares are easy: a head on even a micro backbone finds them
    assert!(miou > 0.4, "mIoU {miou}");

    let model = d.path().join("seg.onnx");
    // the head is appended to the backbone as it is: int8 belongs to the backbone's own export
    let o = ehm("export")
        .arg("onnx")
        .arg(&segrun)
        .args(["--task", "segment", "--int8", "-o"])
        .arg(&model)
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("--int8") && !model.exists(),
        "{e}"
    );
    export(&segrun, "segment", &model);
    let c = ehm::contract::ModelContract::read(&model).unwrap();
    assert_eq!(c.labels, ["background", "red", "blue"]);
    let val: Vec<PathBuf> = (0..6)
        .map(|i| seg.join(format!("images/val/{i:03}.png")))
        .collect();
    let out = d.path().join("out");
    let o = ok(ehm("segment")
        .arg("-m")
        .arg(&model)
        .arg("-o")
        .arg(&out)
        .args(&val)
        .output()
        .unwrap());
    // the tool's maps score what the training evaluation scored, pixel for pixel but for ties
    let mut meter = ehm::eval::SegMeter::new(3, Some(255));
    for (line, f) in String::from_utf8_lossy(&o.stdout).lines().zip(&val) {
        let line: serde_json::Value = serde_json::from_str(line).unwrap();
        let map = image::open(line["classes_png"].as_str().unwrap())
            .unwrap()
            .to_luma8();
        let name = f.file_name().unwrap();
        let truth = image::open(seg.join("masks/val").join(name))
            .unwrap()
            .to_luma8();
        meter.add(truth.as_raw(), map.as_raw());
    }
    let tool = meter.scores().miou;
    assert!((tool - miou).abs() < 0.01, "tool {tool} vs training {miou}");

    // the run names its backbone by sha256: another file in its place is refused
    export(&run, "embed", &backbone);
    let o = ehm("export")
        .arg("onnx")
        .arg(&segrun)
        .args(["--task", "segment", "-o"])
        .arg(d.path().join("again.onnx"))
        .output()
        .unwrap();
    assert_ne!(o.status.code(), Some(0));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("not the model the head was trained on") && e.trim().lines().count() == 1,
        "{e}"
    );
    // an embed model without patch tokens (the shipped one predates them) cannot carry a head
    let shipped =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("models/shipped/photos64_tiny_embed.onnx");
    let o = ehm("train")
        .arg("segment")
        .arg(&shipped)
        .arg("--data")
        .arg(&seg)
        .arg("-o")
        .arg(d.path().join("segrun2"))
        .arg("--freeze-backbone")
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("patch-tokens") && e.trim().lines().count() == 1,
        "{e}"
    );
}
