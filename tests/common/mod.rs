//! Synthetic data and a micro model config shared by the CLI tests.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::Command;

/// `ehm-export onnx CKPT --task TASK [EXTRA…] -o OUT`.
pub fn export_onnx(ckpt: &Path, task: &str, extra: &[&str], out: &Path) -> std::process::Output {
    Command::new(tool("ehm-export"))
        .arg("onnx")
        .arg(ckpt)
        .args(["--task", task])
        .args(extra)
        .arg("-o")
        .arg(out)
        .output()
        .unwrap()
}

/// A serving tool (ehm-export, ehm-classify, ehm-segment, ehm-retrieve). They belong to the
/// ehm-core package, so that they never link libtorch, and cargo builds a package's binaries only
/// for that package's tests: `cargo test -p ehm` alone would leave them missing, or as old as the
/// last build of ehm-core. So the first test that needs one builds them (once per test binary,
/// same profile and target folder as this package's ehm-train) when one is missing or older
/// than the ehm-core sources — the tests always run the code they were compiled with.
pub fn tool(name: &str) -> PathBuf {
    let exe = Path::new(env!("CARGO_BIN_EXE_ehm-train")).with_file_name(name);
    static BUILT: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !*built {
        if let Some(why) = stale(&exe, name) {
            build_serving_tools(&exe, &why);
        }
        *built = true;
    }
    drop(built);
    // after a build, cargo's own change tracking is the judge (a newer file it does not compile,
    // e.g. onnx.proto, leaves the binary as it is)
    assert!(
        exe.exists(),
        "{} is not built after `cargo build -p ehm-core --bins` (a --target build puts it \
         elsewhere: run `cargo test` at the top of the workspace)",
        exe.display()
    );
    exe
}

/// Why `exe` cannot be used (missing, or older than a source it is built from), if so.
fn stale(exe: &Path, name: &str) -> Option<String> {
    let Ok(built) = std::fs::metadata(exe).and_then(|m| m.modified()) else {
        return Some("is not built".into());
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let sources = [
        root.join("crates/ehm-core/src"),
        root.join("crates/ehm-core/Cargo.toml"),
        root.join(format!("tools/{name}.rs")),
    ];
    let newer = sources.iter().flat_map(|p| newer_files(p, built)).next()?;
    Some(format!("is older than {}", newer.display()))
}

/// `cargo build -p ehm-core --bins` into the folder `exe` lives in (target/<profile>/).
fn build_serving_tools(exe: &Path, why: &str) {
    let profile_dir = exe.parent().expect("a binary lives in a folder");
    let target_dir = profile_dir.parent().expect("target/<profile>/");
    let profile = profile_dir
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| env!("CARGO").into());
    eprintln!(
        "{} {why}: building the serving tools ({profile})",
        exe.display()
    );
    let mut c = Command::new(cargo);
    c.args(["build", "-p", "ehm-core", "--bins", "--profile"])
        .arg(if profile == "debug" { "dev" } else { &profile })
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    let status = c.status().expect("cargo runs");
    assert!(status.success(), "`cargo build -p ehm-core --bins` failed");
}

/// Files under `path` (a file or a folder) modified after `t`.
fn newer_files(path: &Path, t: std::time::SystemTime) -> Vec<PathBuf> {
    let Ok(meta) = std::fs::metadata(path) else {
        return vec![];
    };
    if meta.is_file() {
        return if meta.modified().is_ok_and(|m| m > t) {
            vec![path.to_path_buf()]
        } else {
            vec![]
        };
    }
    std::fs::read_dir(path)
        .map(|rd| {
            rd.flatten()
                .flat_map(|e| newer_files(&e.path(), t))
                .collect()
        })
        .unwrap_or_default()
}

/// 320 CIFAR-10 records (256 distinct): simple shapes (bars at class-dependent positions) so MAE can learn.
pub fn write_cifar(dir: &Path) {
    let mut bytes = Vec::new();
    for i in 0..256u32 {
        let label = (i % 4) as u8;
        bytes.push(label);
        for c in 0..3u32 {
            for y in 0..32u32 {
                for x in 0..32u32 {
                    let on = match label {
                        0 => x / 8 == (i / 4) % 4,
                        1 => y / 8 == (i / 4) % 4,
                        2 => (x + y) / 16 == (i / 4) % 4,
                        _ => (x / 4 + y / 4) % 2 == 0,
                    };
                    bytes.push(if on { 200 + (c * 20) as u8 } else { 20 });
                }
            }
        }
    }
    // CIFAR-10 layout: five training batches (here 64 images each) and a test batch.
    let rec = 3073;
    for (k, chunk) in bytes.chunks(64 * rec).enumerate().take(4) {
        std::fs::write(dir.join(format!("data_batch_{}.bin", k + 1)), chunk).unwrap();
    }
    std::fs::write(dir.join("data_batch_5.bin"), &bytes[..64 * rec]).unwrap();
    std::fs::write(dir.join("test_batch.bin"), &bytes[..64 * 3073]).unwrap();
}

pub fn write_model(dir: &Path) -> PathBuf {
    let p = dir.join("micro.toml");
    std::fs::write(
        &p,
        r#"
name = "micro"
[model]
arch = "vit_micro"
patch_size = 4
[preprocess]
image_size = 16
resize = "stretch"
crop_pct = 1.0
interpolation = "bilinear"
mean = [0.3, 0.3, 0.3]
std = [0.3, 0.3, 0.3]
[pretrain]
batch_size = 32
blr = 1e-3
warmup_epochs = 1
masking = "ehm"
"#,
    )
    .unwrap();
    p
}

/// `ehm-train pretrain` of `model` on the CIFAR folder `data` into `out`, on the CPU, JSON summary.
pub fn pretrain_cmd(model: &Path, data: &Path, out: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ehm-train"));
    c.args(["pretrain", "--model"]).arg(model);
    c.arg("--data")
        .arg(format!("cifar:{}:train", data.display()));
    c.arg("--out").arg(out);
    c.args(["--no-progress", "--json"]).env("EHM_DEVICE", "cpu");
    c
}

/// Pretrain the micro model for 2 epochs on the synthetic CIFAR set written into `dir`: a real
/// checkpoint with non-initial weights. Returns the run folder.
pub fn pretrained_micro(dir: &Path) -> PathBuf {
    write_cifar(dir);
    let model = write_model(dir);
    let out = dir.join("run");
    let o = pretrain_cmd(&model, dir, &out)
        .args(["--epochs", "2", "--knn-every", "-1"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out
}

/// The micro model pretrained once per test binary, as `pretrained_micro` makes it: `run` (the
/// run folder) and `data` (the synthetic CIFAR folder it trained on, `cifar:DATA:train|test`).
/// Shared by the tests of the binary, so read-only: a test writes into its own temp folder.
pub struct SharedMicro {
    pub run: PathBuf,
    pub data: PathBuf,
}

pub fn shared_micro() -> &'static SharedMicro {
    static MICRO: std::sync::OnceLock<SharedMicro> = std::sync::OnceLock::new();
    MICRO.get_or_init(|| {
        // under cargo's per-package temp folder, one per test process (two test runs at once
        // must not share it); folders of processes that have ended are removed
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("pretrained_micro");
        let prefix = format!("{}-", env!("CARGO_CRATE_NAME"));
        // (only where /proc tells which processes live)
        let procfs = Path::new("/proc/self").exists();
        let ended = |p: u32| procfs && !Path::new(&format!("/proc/{p}")).exists();
        for e in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name
                .strip_prefix(&prefix)
                .and_then(|p| p.parse::<u32>().ok());
            if pid.is_some_and(ended) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        let data = root.join(format!("{prefix}{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data);
        std::fs::create_dir_all(&data).unwrap();
        let run = pretrained_micro(&data);
        SharedMicro { run, data }
    })
}

/// A segmentation folder: 32×32 grey noise with a red (1) or blue (2) square, the border of each
/// square marked 255 (ignore).
pub fn write_segset(root: &Path, n_train: usize, n_val: usize) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    for (split, n) in [("train", n_train), ("val", n_val)] {
        std::fs::create_dir_all(root.join("images").join(split)).unwrap();
        std::fs::create_dir_all(root.join("masks").join(split)).unwrap();
        for i in 0..n {
            let mut img = image::RgbImage::from_fn(32, 32, |_, _| {
                let v = rng.random_range(90..140u8);
                image::Rgb([v, v, v])
            });
            let mut mask = image::GrayImage::new(32, 32);
            let class = 1 + (i % 2) as u8;
            let (x0, y0, s) = (
                rng.random_range(0..16u32),
                rng.random_range(0..16u32),
                rng.random_range(8..16u32),
            );
            for y in y0..y0 + s {
                for x in x0..x0 + s {
                    img.put_pixel(
                        x,
                        y,
                        if class == 1 {
                            image::Rgb([220, 30, 30])
                        } else {
                            image::Rgb([30, 30, 220])
                        },
                    );
                    let edge = x == x0 || y == y0 || x == x0 + s - 1 || y == y0 + s - 1;
                    mask.put_pixel(x, y, image::Luma([if edge { 255 } else { class }]));
                }
            }
            img.save(root.join(format!("images/{split}/{i:03}.png")))
                .unwrap();
            mask.save(root.join(format!("masks/{split}/{i:03}.png")))
                .unwrap();
        }
    }
    std::fs::write(
        root.join("classes.json"),
        r#"["background", "red", "blue"]"#,
    )
    .unwrap();
}

// ---- reading a pretraining run ----

pub fn json_out(o: &std::process::Output) -> serde_json::Value {
    assert!(
        o.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.stdout)))
}

/// Every tensor of a safetensors file, as raw bytes by name.
pub fn tensors(path: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, v.data().to_vec()))
        .collect()
}

/// All fp32 tensors of a checkpoint, concatenated in name order.
pub fn weights(path: &Path) -> Vec<f32> {
    tensors(path)
        .values()
        .flat_map(|b| {
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        })
        .collect()
}

/// ‖a − b‖ / ‖a‖ over every weight.
pub fn relative_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let d: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let n: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum();
    (d / n).sqrt()
}

pub fn losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["loss"].as_f64())
        .collect()
}

/// Largest |a − b| over two equally long slices.
#[allow(dead_code)] // not every test binary compares outputs
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
