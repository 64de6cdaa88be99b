//! ehm-export onnx: the ONNX model run by ONNX Runtime gives the same outputs as the tch model
//! built from the same checkpoint (random inputs and real Fashion-MNIST images), and bad
//! requests fail cleanly.
mod common;
use ehm::checkpoint::CheckpointConfig;
use ehm::contract::ModelContract;
use ehm::data::{self, Dataset};
use ehm::infer::OrtModel;
use std::path::Path;
use std::process::Command;
use tch::{nn, Device, Kind, Tensor};

fn export(ckpt: &Path, task: &str, out: &Path) -> std::process::Output {
    common::export_onnx(ckpt, task, &[], out)
}

use common::max_abs_diff;

#[test]
fn onnx_matches_tch_for_backbone_and_embed() {
    let d = tempfile::tempdir().unwrap();
    let run = common::shared_micro().run.clone();
    // tch model from the same checkpoint
    let c = CheckpointConfig::read(&run).unwrap().config;
    let (vit, pre) = (c.model, c.preprocess);
    let vs = nn::VarStore::new(Device::Cpu);
    let enc = ehm::model::Encoder::new(&vs.root(), &vit);
    let (tensors, _) =
        ehm::train::checkpoint::load_tensors(&run.join("checkpoint.safetensors")).unwrap();
    ehm::train::checkpoint::load_into_varstore(&vs, &tensors, &run, &[]).unwrap();

    // inputs: random, and real Fashion-MNIST test images through the shared preprocessing
    let s = pre.image_size as i64;
    tch::manual_seed(3);
    let random: Vec<f32> =
        Vec::try_from(Tensor::randn([3, 3, s, s], (Kind::Float, Device::Cpu)).view(-1)).unwrap();
    let fm = data::fashion_mnist(&data::fashion_mnist_dir(), "test").unwrap();
    let mut real = Vec::new();
    for i in 0..5 {
        real.extend(pre.eval(&fm.image(i * 997).unwrap()));
    }

    for (task, output) in [("backbone", "last_hidden_state"), ("embed", "embedding")] {
        let file = d.path().join(format!("{task}.onnx"));
        let o = export(&run, task, &file);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let c = ModelContract::read(&file).unwrap();
        assert_eq!(c.task.name(), task);
        assert_eq!(
            c.config.preprocess, pre,
            "the model file carries the training preprocessing"
        );
        let mut m = OrtModel::open(&file, 1).unwrap();
        for (what, x, n) in [
            ("random", &random, 3usize),
            ("fashion-mnist", &real, 5usize),
        ] {
            let (shape, got) = m.run(x, n, output).unwrap();
            let imgs = Tensor::from_slice(x).view([n as i64, 3, s, s]);
            let want = tch::no_grad(|| {
                if task == "embed" {
                    enc.embedding(&imgs)
                } else {
                    enc.forward_features(&imgs)
                }
            });
            assert_eq!(
                shape,
                want.size().iter().map(|&v| v as usize).collect::<Vec<_>>()
            );
            let want: Vec<f32> = Vec::try_from(want.contiguous().view(-1)).unwrap();
            let err = max_abs_diff(&got, &want);
            eprintln!("parity {task}/{what}: max abs diff {err:.2e}");
            assert!(err <= 1e-4, "{task}/{what}: max |onnx − tch| = {err}");
        }
    }
    // --fp16: half the file, relative error ≤ 1e-2
    let f16 = d.path().join("embed16.onnx");
    let o = Command::new(common::tool("ehm-export"))
        .arg("onnx")
        .arg(&run)
        .args(["--task", "embed", "--fp16", "-o"])
        .arg(&f16)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (full, half) = (
        std::fs::metadata(d.path().join("embed.onnx"))
            .unwrap()
            .len(),
        std::fs::metadata(&f16).unwrap().len(),
    );
    assert!(half < full * 6 / 10, "fp16 file {half} vs fp32 {full}");
    let (_, a) = OrtModel::open(&f16, 1)
        .unwrap()
        .run(&real, 5, "embedding")
        .unwrap();
    let (_, b) = OrtModel::open(&d.path().join("embed.onnx"), 1)
        .unwrap()
        .run(&real, 5, "embedding")
        .unwrap();
    let rel = (a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum::<f32>()
        / b.iter().map(|y| y * y).sum::<f32>())
    .sqrt();
    eprintln!("parity embed fp16 vs fp32: relative error {rel:.2e}");
    assert!(rel <= 1e-2, "fp16 relative error {rel}");

    // the embedding is L2-normalised
    let mut m = OrtModel::open(&d.path().join("embed.onnx"), 1).unwrap();
    let (shape, e) = m.run(&real, 5, "embedding").unwrap();
    assert_eq!(shape[1] as i64, 2 * vit.embed_dim);
    for row in e.chunks(shape[1]) {
        assert!((row.iter().map(|v| v * v).sum::<f32>() - 1.0).abs() < 1e-4);
    }
}

#[test]
fn bad_exports_fail_cleanly_and_leave_no_file() {
    let d = tempfile::tempdir().unwrap();
    let run = common::shared_micro().run.clone();
    let out = d.path().join("x.onnx");
    // a head the checkpoint lacks
    let o = export(&run, "classify", &out);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no classify head"));
    assert!(!out.exists());
    // unknown task: a usage error from clap
    assert_eq!(export(&run, "detect", &out).status.code(), Some(2));
    // a checkpoint whose tensor shapes do not match its config
    let bad = d.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::copy(
        run.join("checkpoint.safetensors"),
        bad.join("checkpoint.safetensors"),
    )
    .unwrap();
    let cfg = std::fs::read_to_string(run.join("config.json"))
        .unwrap()
        .replace("\"embed_dim\": 64", "\"embed_dim\": 128");
    std::fs::write(bad.join("config.json"), cfg).unwrap();
    let o = export(&bad, "embed", &out);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("shape") && err.trim().lines().count() == 1,
        "{err}"
    );
    assert!(!out.exists(), "no half-written model");
    // an output path that cannot be written
    let o = export(&run, "embed", Path::new("/proc/nope/x.onnx"));
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).starts_with("error: "));
    // not a model
    let o = Command::new(common::tool("ehm-export"))
        .arg("inspect")
        .arg(run.join("config.json"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("not an ONNX model"));
}

#[test]
fn python_onnx_checker_and_onnxruntime_agree_with_ours() {
    let py = ehm::files::cache_dir().join("venv/bin/python");
    assert!(
        py.exists(),
        "{} missing: run tools/setup.sh pydeps (the test command does)",
        py.display()
    );
    let d = tempfile::tempdir().unwrap();
    let run = common::shared_micro().run.clone();
    let fm = data::fashion_mnist(&data::fashion_mnist_dir(), "test").unwrap();
    let pre = CheckpointConfig::read(&run).unwrap().config.preprocess;
    let mut x = Vec::new();
    for i in 0..4 {
        x.extend(pre.eval(&fm.image(i * 31).unwrap()));
    }
    let input = d.path().join("x.bin");
    std::fs::write(
        &input,
        x.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>(),
    )
    .unwrap();
    for (task, output, fp16) in [
        ("backbone", "last_hidden_state", false),
        ("embed", "embedding", false),
        ("embed", "embedding", true),
    ] {
        let file = d
            .path()
            .join(format!("{task}{}.onnx", if fp16 { "16" } else { "" }));
        let mut cmd = Command::new(common::tool("ehm-export"));
        cmd.arg("onnx")
            .arg(&run)
            .args(["--task", task, "-o"])
            .arg(&file);
        if fp16 {
            cmd.arg("--fp16");
        }
        assert!(cmd.status().unwrap().success());
        let out = d.path().join("y.bin");
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/crosscheck.py");
        let o = Command::new(&py)
            .arg(script)
            .arg(&file)
            .arg(&input)
            .arg("4")
            .arg(output)
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "python check of {task}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let theirs: Vec<f32> = std::fs::read(&out)
            .unwrap()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let (_, ours) = OrtModel::open(&file, 1)
            .unwrap()
            .run(&x, 4, output)
            .unwrap();
        let err = max_abs_diff(&ours, &theirs);
        eprintln!("python onnxruntime vs ours, {task} fp16={fp16}: max abs diff {err:.2e}");
        assert!(err <= 1e-6, "{task}: {err}");
    }
}

#[test]
fn export_at_another_image_size_matches_timm_style_bicubic_pos_embed() {
    let d = tempfile::tempdir().unwrap();
    let run = common::shared_micro().run.clone();
    let file = d.path().join("embed24.onnx");
    let o = Command::new(common::tool("ehm-export"))
        .arg("onnx")
        .arg(&run)
        .args(["--task", "backbone", "--image-size", "24", "-o"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let c = ModelContract::read(&file).unwrap();
    assert_eq!(c.config.preprocess.image_size, 24);
    // tch reference: the same weights, pos_embed resized by PyTorch's own bicubic upsampling
    let mut vit = CheckpointConfig::read(&run).unwrap().config.model;
    let (g0, dim) = (vit.grid() as i64, vit.embed_dim);
    vit.image_size = 24;
    let g1 = vit.grid() as i64;
    let (mut tensors, _) =
        ehm::train::checkpoint::load_tensors(&run.join("checkpoint.safetensors")).unwrap();
    let pos = tensors["pos_embed"].shallow_clone();
    let grid = pos
        .narrow(1, 1, g0 * g0)
        .view([1, g0, g0, dim])
        .permute([0, 3, 1, 2]);
    let up = grid
        .upsample_bicubic2d([g1, g1], false, None, None)
        .permute([0, 2, 3, 1])
        .reshape([1, g1 * g1, dim]);
    tensors.insert(
        "pos_embed".into(),
        Tensor::cat(&[pos.narrow(1, 0, 1), up], 1),
    );
    let vs = nn::VarStore::new(Device::Cpu);
    let enc = ehm::model::Encoder::new(&vs.root(), &vit);
    ehm::train::checkpoint::load_into_varstore(&vs, &tensors, &run, &[]).unwrap();
    tch::manual_seed(5);
    let x = Tensor::randn([2, 3, 24, 24], (Kind::Float, Device::Cpu));
    let want: Vec<f32> = Vec::try_from(
        tch::no_grad(|| enc.forward_features(&x))
            .contiguous()
            .view(-1),
    )
    .unwrap();
    let xs: Vec<f32> = Vec::try_from(x.view(-1)).unwrap();
    let (_, got) = OrtModel::open(&file, 1)
        .unwrap()
        .run(&xs, 2, "last_hidden_state")
        .unwrap();
    let err = max_abs_diff(&got, &want);
    eprintln!("parity backbone at 24 px (pos_embed resized): max abs diff {err:.2e}");
    assert!(err <= 1e-4, "{err}");
}

#[test]
fn probe_head_learns_and_exports_as_a_classifier() {
    let d = tempfile::tempdir().unwrap();
    let run = common::shared_micro().run.clone();
    let probe_dir = d.path().join("probe");
    let cifar = common::shared_micro().data.display().to_string();
    let o = Command::new(env!("CARGO_BIN_EXE_ehm-train"))
        .arg("probe")
        .arg(&run)
        .arg("--out")
        .arg(&probe_dir)
        .args([
            "--train",
            &format!("cifar:{cifar}:train"),
            "--test",
            &format!("cifar:{cifar}:test"),
            "--epochs",
            "30",
            "--json",
        ])
        .env("EHM_DEVICE", "cpu")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    // 4 classes (chance 25 %); the synthetic classes are separable from frozen features
    assert!(
        r["top1"].as_f64().unwrap() > 0.6,
        "probe top-1 {}",
        r["top1"]
    );
    assert!(probe_dir.join("confusion.csv").exists() && probe_dir.join("confusion.png").exists());
    // export and compare logits with tch: encoder → class token → head
    let file = d.path().join("cls.onnx");
    let o = export(&probe_dir, "classify", &file);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let c = ModelContract::read(&file).unwrap();
    assert_eq!(
        c.labels.len(),
        10,
        "CIFAR-10 class names travel into the model"
    );
    let (tensors, _) =
        ehm::train::checkpoint::load_tensors(&probe_dir.join("checkpoint.safetensors")).unwrap();
    // the encoder and the head only: no MAE decoder, one head.weight
    assert!(
        tensors.contains_key("head.weight") && tensors.contains_key("blocks.0.attn.qkv.weight")
    );
    assert!(
        !tensors
            .keys()
            .any(|k| k.starts_with("decoder") || k == "mask_token"),
        "{:?}",
        tensors.keys().collect::<Vec<_>>()
    );
    let bb = ehm::train::probe::Backbone::open(&probe_dir, Device::Cpu).unwrap();
    tch::manual_seed(9);
    let x = Tensor::randn([3, 3, 16, 16], (Kind::Float, Device::Cpu));
    let want = tch::no_grad(|| {
        let f = ehm::train::probe::pool_tokens(
            &bb.encoder.forward_features(&x),
            ehm::train::probe::Pool::Cls,
        );
        f.matmul(&tensors["head.weight"].tr()) + &tensors["head.bias"]
    });
    let want: Vec<f32> = Vec::try_from(want.contiguous().view(-1)).unwrap();
    let xs: Vec<f32> = Vec::try_from(x.view(-1)).unwrap();
    let (shape, got) = OrtModel::open(&file, 1)
        .unwrap()
        .run(&xs, 3, "logits")
        .unwrap();
    assert_eq!(shape, vec![3, 10]);
    let err = max_abs_diff(&got, &want);
    eprintln!("parity classify: max abs diff {err:.2e}");
    assert!(err <= 1e-4, "{err}");
    // --int8 quantizes the blocks' matrices but keeps the head in fp32
    let file8 = d.path().join("cls8.onnx");
    let o = common::export_onnx(&probe_dir, "classify", &["--int8"], &file8);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let depth = CheckpointConfig::read(&probe_dir)
        .unwrap()
        .config
        .model
        .depth as usize;
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(&format!("{} weight matrices int8", 4 * depth)),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    use prost::Message;
    let m = ehm::onnx::ModelProto::decode(&std::fs::read(&file8).unwrap()[..]).unwrap();
    let mut weights = m.graph.as_ref().unwrap().initializer.iter();
    assert!(weights.any(|t| t.name.as_deref() == Some("head.weight_t") && t.data_type == Some(1)));
    let (_, got8) = OrtModel::open(&file8, 1)
        .unwrap()
        .run(&xs, 3, "logits")
        .unwrap();
    let err8 = max_abs_diff(&got8, &want);
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    eprintln!("classify int8 vs tch: max abs diff {err8:.2e} (logits up to {scale:.2})");
    assert!(err8 <= 0.1 * scale.max(1.0), "{err8}");
}

/// `ehm-export import` on an "outside" model — our backbone export dressed up as another
/// framework's file (other input name, the tokens feeding a saliency tail, no ehm metadata) —
/// gives the same embedding as our own embed export, and refuses wrong cut points cleanly.
#[test]
fn import_adopts_a_foreign_vit_and_matches_our_embed_export() {
    use ehm::onnx::{ModelProto, NodeProto};
    use prost::Message;
    let d = tempfile::tempdir().unwrap();
    let run = common::shared_micro().run.clone();
    let (ours, backbone) = (d.path().join("ours.onnx"), d.path().join("bb.onnx"));
    assert!(export(&run, "embed", &ours).status.success());
    assert!(export(&run, "backbone", &backbone).status.success());
    let mut m = ModelProto::decode(&std::fs::read(&backbone).unwrap()[..]).unwrap();
    m.metadata_props.clear();
    let g = m.graph.as_mut().unwrap();
    for n in &mut g.node {
        for name in n.input.iter_mut().chain(n.output.iter_mut()) {
            match name.as_str() {
                "pixel_values" => *name = "input_image".into(),
                "last_hidden_state" => *name = "/encoder/norm/out".into(),
                _ => {}
            }
        }
    }
    // a saliency "decoder" with a weight of its own, which the adopted model must not carry
    g.initializer.push(ehm::onnx::TensorProto {
        name: Some("decoder.gain".into()),
        dims: vec![1000],
        data_type: Some(1),
        raw_data: Some(vec![0; 4000]),
        ..Default::default()
    });
    g.node.push(NodeProto {
        input: vec!["/encoder/norm/out".into()],
        output: vec!["/decoder/sigmoid".into()],
        op_type: Some("Sigmoid".into()),
        ..Default::default()
    });
    g.node.push(NodeProto {
        input: vec!["/decoder/sigmoid".into(), "decoder.gain".into()],
        output: vec!["saliency".into()],
        op_type: Some("Mul".into()),
        ..Default::default()
    });
    // a side branch with two "register" tokens after the class token (as DINOv2-reg has)
    let i64s = |name: &str, v: i64| ehm::onnx::TensorProto {
        name: Some(name.into()),
        dims: vec![1],
        data_type: Some(7),
        raw_data: Some(v.to_le_bytes().to_vec()),
        ..Default::default()
    };
    g.initializer.extend([
        i64s("reg.s0", 0),
        i64s("reg.s1", 1),
        i64s("reg.end", i64::MAX),
    ]);
    g.initializer.push(ehm::onnx::TensorProto {
        name: Some("reg.k".into()),
        dims: vec![],
        data_type: Some(1),
        raw_data: Some(3f32.to_le_bytes().to_vec()),
        ..Default::default()
    });
    let node = |op: &str, inputs: &[&str], out: &str| NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![out.into()],
        op_type: Some(op.into()),
        ..Default::default()
    };
    let t = "/encoder/norm/out";
    g.node.extend([
        node("Slice", &[t, "reg.s0", "reg.s1", "reg.s1"], "/reg/cls"),
        node("Slice", &[t, "reg.s1", "reg.end", "reg.s1"], "/reg/patches"),
        node("Mul", &["/reg/cls", "reg.k"], "/reg/r1"),
        node("Neg", &["/reg/cls"], "/reg/r2"),
    ]);
    let mut cat = node(
        "Concat",
        &["/reg/cls", "/reg/r1", "/reg/r2", "/reg/patches"],
        "/encoder/with_registers",
    );
    cat.attribute.push(ehm::export::graph::attr_int("axis", 1));
    g.node.push(cat);
    g.input[0].name = Some("input_image".into());
    g.output[0].name = Some("saliency".into());
    let foreign = d.path().join("foreign.onnx");
    std::fs::write(&foreign, m.encode_to_vec()).unwrap();

    let import = |tokens: &str, patch: &str, out: &Path| {
        Command::new(common::tool("ehm-export"))
            .arg("import")
            .arg(&foreign)
            .args([
                "--tokens",
                tokens,
                "--patch-size",
                patch,
                "--image-size",
                "16",
            ])
            .args(["--name", "foreign_micro", "-o"])
            .arg(out)
            .output()
            .unwrap()
    };
    let adopted = d.path().join("adopted.onnx");
    let o = import("/encoder/norm/out", "4", &adopted);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let c = ModelContract::read(&adopted).unwrap();
    assert_eq!(c.task, ehm::contract::Task::Embed);
    assert_eq!(c.config.embedding_dim, Some(128));
    assert_eq!(c.source.unwrap().name, "foreign_micro");
    // its position embedding is fixed: the adopted input keeps its size
    assert!(!c.any_input_size);
    assert_eq!(
        c.parameters,
        ModelContract::read(&ours).unwrap().parameters,
        "decoder weights dropped"
    );
    let mut a = OrtModel::open(&adopted, 1).unwrap();
    let mut b = OrtModel::open(&ours, 1).unwrap();
    let x: Vec<f32> = (0..3 * 3 * 16 * 16)
        .map(|i| ((i * 7919) % 255) as f32 / 64.0 - 2.0)
        .collect();
    let (sa, ea) = a.run(&x, 3, "embedding").unwrap();
    let (sb, eb) = b.run(&x, 3, "embedding").unwrap();
    assert_eq!(sa, vec![3, 128]);
    assert_eq!(sa, sb);
    assert!(max_abs_diff(&ea, &eb) < 1e-5, "{}", max_abs_diff(&ea, &eb));
    // --int8 adopts and quantizes the same matrices as our own --int8 export
    let (ours8, adopted8) = (d.path().join("ours8.onnx"), d.path().join("adopted8.onnx"));
    let o = common::export_onnx(&run, "embed", &["--int8"], &ours8);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = Command::new(common::tool("ehm-export"))
        .arg("import")
        .arg(&foreign)
        .args(["--tokens", "/encoder/norm/out", "--patch-size", "4"])
        .args(["--image-size", "16", "--int8", "-o"])
        .arg(&adopted8)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let c8 = ModelContract::read(&adopted8).unwrap();
    assert_eq!(c8.config.quantization.as_deref(), Some("int8-dynamic"));
    let (_, e8a) = OrtModel::open(&adopted8, 1)
        .unwrap()
        .run(&x, 3, "embedding")
        .unwrap();
    let (_, e8b) = OrtModel::open(&ours8, 1)
        .unwrap()
        .run(&x, 3, "embedding")
        .unwrap();
    assert!(
        max_abs_diff(&e8a, &e8b) < 1e-5,
        "{}",
        max_abs_diff(&e8a, &e8b)
    );

    let bad = d.path().join("bad.onnx");
    // the register branch: drop the two registers with --prefix-tokens 3
    let with_regs = d.path().join("with_regs.onnx");
    let o = Command::new(common::tool("ehm-export"))
        .arg("import")
        .arg(&foreign)
        .args([
            "--tokens",
            "/encoder/with_registers",
            "--prefix-tokens",
            "3",
        ])
        .args(["--patch-size", "4", "--image-size", "16", "-o"])
        .arg(&with_regs)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (sr, er) = OrtModel::open(&with_regs, 1)
        .unwrap()
        .run(&x, 3, "embedding")
        .unwrap();
    assert_eq!(sr, sb);
    assert!(max_abs_diff(&er, &eb) < 1e-5, "{}", max_abs_diff(&er, &eb));
    // a ViT without class token (the patch tokens only), --prefix-tokens 0: the mean patch
    // token takes the class token's place, so embedding = mean ⊕ GeM of the patches
    let no_cls = d.path().join("no_cls.onnx");
    let o = Command::new(common::tool("ehm-export"))
        .arg("import")
        .arg(&foreign)
        .args(["--tokens", "/reg/patches", "--prefix-tokens", "0"])
        .args(["--patch-size", "4", "--image-size", "16", "-o"])
        .arg(&no_cls)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (sn, en) = OrtModel::open(&no_cls, 1)
        .unwrap()
        .run(&x, 3, "embedding")
        .unwrap();
    assert_eq!(sn, sb);
    let (st, tokens) = OrtModel::open(&backbone, 1)
        .unwrap()
        .run(&x, 3, "last_hidden_state")
        .unwrap();
    let (t, dim) = (st[1], st[2]);
    let mut want = Vec::new();
    for img in tokens.chunks(t * dim) {
        let patches = &img[dim..];
        let p = (t - 1) as f32;
        let mean = (0..dim).map(|c| patches.chunks(dim).map(|r| r[c]).sum::<f32>() / p);
        let gem = (0..dim).map(|c| {
            (patches
                .chunks(dim)
                .map(|r| r[c].max(1e-6).powi(4))
                .sum::<f32>()
                / p)
                .powf(0.25)
        });
        let v: Vec<f32> = mean.chain(gem).collect();
        let norm = v.iter().map(|a| a * a).sum::<f32>().sqrt().max(1e-12);
        want.extend(v.iter().map(|a| a / norm));
    }
    assert!(
        max_abs_diff(&en, &want) < 1e-5,
        "{}",
        max_abs_diff(&en, &want)
    );
    // … and forgetting the registers is a clear error
    let o = import("/encoder/with_registers", "4", &bad);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("--prefix-tokens"),
        "{err}"
    );
    assert!(!bad.exists());

    // wrong cut points: one line naming the file, exit 1, nothing written
    for (tokens, patch, says) in [
        ("nope", "4", "no node produces a tensor named 'nope'"),
        ("/encoder/norm/out", "8", "import needs [1, 1 + 2², D]"),
        ("saliency", "3", "not a multiple"),
    ] {
        let o = import(tokens, patch, &bad);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(
            err.contains(says) && err.trim().lines().count() == 1,
            "{err}"
        );
        assert!(!bad.exists());
    }
}

/// `--int8`: every weight matrix becomes int8 (DynamicQuantizeMatMul), the file shrinks, the
/// embedding stays close to fp32's, an image's output does not depend on its batch, Python
/// onnxruntime agrees, and `--int8 --fp16` is a usage error.
#[test]
fn int8_export_is_small_close_to_fp32_and_batch_independent() {
    use ehm::onnx::ModelProto;
    use prost::Message;
    let d = tempfile::tempdir().unwrap();
    let run = common::shared_micro().run.clone();
    let c = CheckpointConfig::read(&run).unwrap().config;
    let (vit, pre) = (c.model, c.preprocess);
    let (fp32, int8) = (d.path().join("fp32.onnx"), d.path().join("int8.onnx"));
    assert!(export(&run, "embed", &fp32).status.success());
    let o = common::export_onnx(&run, "embed", &["--int8"], &int8);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let matrices = 4 * vit.depth as usize; // qkv, proj, fc1, fc2 per block
    assert!(
        stdout.contains(&format!("{matrices} weight matrices int8")),
        "{stdout}"
    );
    let m = ModelProto::decode(&std::fs::read(&int8).unwrap()[..]).unwrap();
    let g = m.graph.as_ref().unwrap();
    let ops = |op: &str| {
        g.node
            .iter()
            .filter(|n| n.op_type.as_deref() == Some(op))
            .count()
    };
    assert_eq!(ops("DynamicQuantizeMatMul"), matrices);
    // the bias adds were folded in; the MatMuls left are attention's two products per block
    assert_eq!(ops("MatMul"), 2 * vit.depth as usize);
    assert!(g
        .initializer
        .iter()
        .all(|t| !(t.dims.len() == 2 && t.data_type == Some(1))));
    assert!(m
        .opset_import
        .iter()
        .any(|o| o.domain.as_deref() == Some("com.microsoft")));
    let c = ModelContract::read(&int8).unwrap();
    assert_eq!(c.config.quantization.as_deref(), Some("int8-dynamic"));
    assert_eq!(
        ModelContract::read(&fp32).unwrap().config.quantization,
        None
    );
    let (a, b) = (
        std::fs::metadata(&fp32).unwrap().len(),
        std::fs::metadata(&int8).unwrap().len(),
    );
    assert!(b < a / 2, "int8 file {b} vs fp32 {a}");

    let fm = data::fashion_mnist(&data::fashion_mnist_dir(), "test").unwrap();
    let n = 8;
    let mut x = Vec::new();
    for i in 0..n {
        x.extend(pre.eval(&fm.image(i * 613).unwrap()));
    }
    let (shape, q) = OrtModel::open(&int8, 1)
        .unwrap()
        .run(&x, n, "embedding")
        .unwrap();
    let (_, f) = OrtModel::open(&fp32, 1)
        .unwrap()
        .run(&x, n, "embedding")
        .unwrap();
    let dim = shape[1];
    let worst = q
        .chunks(dim)
        .zip(f.chunks(dim))
        .map(|(u, v)| u.iter().zip(v).map(|(a, b)| a * b).sum::<f32>())
        .fold(1.0, f32::min);
    eprintln!("int8 vs fp32 embedding: lowest cosine {worst:.4}");
    assert!(worst > 0.99, "int8 embedding cosine to fp32 {worst}");
    // the same image alone gives exactly its output within the batch (one image per call)
    let per = x.len() / n;
    let mut alone = OrtModel::open(&int8, 1).unwrap();
    for i in [0, 5] {
        let (_, one) = alone
            .run(&x[i * per..(i + 1) * per], 1, "embedding")
            .unwrap();
        assert_eq!(one, q[i * dim..(i + 1) * dim], "image {i}");
    }
    // Python onnxruntime (and the official checker) on one image agree with ours
    let py = ehm::files::cache_dir().join("venv/bin/python");
    let input = d.path().join("x.bin");
    std::fs::write(
        &input,
        x[..per]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    let out = d.path().join("y.bin");
    let o = Command::new(&py)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/py/crosscheck.py"
        ))
        .arg(&int8)
        .arg(&input)
        .args(["1", "embedding"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let theirs: Vec<f32> = std::fs::read(&out)
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert!(max_abs_diff(&theirs, &q[..dim]) <= 1e-6);
    // int8 and fp16 weights exclude each other
    let both = d.path().join("both.onnx");
    let o = common::export_onnx(&run, "embed", &["--int8", "--fp16"], &both);
    assert_eq!(o.status.code(), Some(2));
    assert!(!both.exists());
}

/// A pool of sessions (each batch split into parts, each part run in calls of ≤ 8 images) gives
/// exactly the output of one session, for batches smaller and larger than the pool and the calls.
#[test]
fn session_pool_output_equals_one_session() {
    use ehm::infer::Parallelism;
    let d = tempfile::tempdir().unwrap();
    let run = common::shared_micro().run.clone();
    let file = d.path().join("embed.onnx");
    assert!(export(&run, "embed", &file).status.success());
    let mut one = OrtModel::open(&file, 1).unwrap();
    let mut pool = OrtModel::open_with(
        &file,
        Parallelism {
            sessions: 3,
            threads_each: 1,
        },
    )
    .unwrap();
    assert_eq!(
        Parallelism::split(4, None),
        Parallelism {
            sessions: 4,
            threads_each: 1
        }
    );
    assert_eq!(
        Parallelism::split(4, Some(2)),
        Parallelism {
            sessions: 2,
            threads_each: 2
        }
    );
    assert_eq!(
        Parallelism::split(2, Some(9)),
        Parallelism {
            sessions: 2,
            threads_each: 1
        }
    );
    for n in [1usize, 2, 3, 11, 19, 40] {
        let x: Vec<f32> = (0..n * 3 * 16 * 16)
            .map(|i| ((i * 7919) % 251) as f32 / 60.0 - 2.0)
            .collect();
        let (sa, a) = one.run(&x, n, "embedding").unwrap();
        let (sb, b) = pool.run(&x, n, "embedding").unwrap();
        assert_eq!(sa, vec![n, 128]);
        assert_eq!(sa, sb, "n = {n}");
        assert!(
            max_abs_diff(&a, &b) < 1e-6,
            "n = {n}: {}",
            max_abs_diff(&a, &b)
        );
    }
}
