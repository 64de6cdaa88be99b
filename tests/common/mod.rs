//! Synthetic data and a micro model config shared by the CLI tests.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::Command;

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
