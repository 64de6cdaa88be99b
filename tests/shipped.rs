//! The shipped models (models/shipped/) work right after set-up, without training and without
//! libtorch: their files match the sha256 in their model cards, the Fashion-MNIST classifier
//! classifies real test images well above chance through ehm-classify, and the photo embedder
//! indexes and finds an exact copy through ehm-retrieve.
mod common;
use std::path::{Path, PathBuf};
use std::process::Command;

fn shipped(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models/shipped")
        .join(name)
}

/// The sha256 a model card states (a line "sha256: HEX").
fn card_sha(card: &Path) -> String {
    let text = std::fs::read_to_string(card).unwrap();
    text.lines()
        .find_map(|l| {
            l.trim()
                .trim_start_matches("- ")
                .strip_prefix("sha256:")
                .map(|s| s.trim().trim_matches('`').to_string())
        })
        .unwrap_or_else(|| panic!("{} has no sha256 line", card.display()))
}

#[test]
fn shipped_files_match_their_cards_and_fit_the_size_limit() {
    for (model, card) in [
        ("fmnist_tiny_classify.onnx", "fmnist_tiny_classify.md"),
        ("photos64_tiny_embed.onnx", "photos64_tiny_embed.md"),
    ] {
        let m = shipped(model);
        let len = std::fs::metadata(&m).unwrap().len();
        assert!(len <= 16 << 20, "{model}: {len} bytes > 16 MiB");
        assert_eq!(
            ehm::files::sha256_file(&m).unwrap(),
            card_sha(&shipped(card)),
            "{model}"
        );
    }
}

#[test]
fn shipped_classifier_classifies_fashion_mnist() {
    let fm = ehm::data::fashion_mnist(&ehm::data::fashion_mnist_dir(), "test")
        .expect("tools/setup.sh data");
    use ehm::data::Dataset;
    let d = tempfile::tempdir().unwrap();
    let mut truth = std::collections::HashMap::new();
    for i in (0..fm.len()).step_by(50).take(200) {
        let p = d.path().join(format!("{i:05}.png"));
        fm.image(i).unwrap().save(&p).unwrap();
        truth.insert(
            p.display().to_string(),
            fm.classes()[fm.label(i).unwrap()].clone(),
        );
    }
    let o = Command::new(common::tool("ehm-classify"))
        .arg("-m")
        .arg(shipped("fmnist_tiny_classify.onnx"))
        .args(["--format", "jsonl", "--top-k", "1"])
        .arg(d.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 200);
    let right = lines
        .iter()
        .filter(|l| truth[l["path"].as_str().unwrap()] == l["top"][0]["label"].as_str().unwrap())
        .count();
    // chance is 10 %; the card states the accuracy measured on 1,000 test images
    assert!(right >= 130, "{right}/200 right");
}

#[test]
fn shipped_embedder_indexes_and_finds_a_copy() {
    let d = tempfile::tempdir().unwrap();
    let photos = ehm::data::photos::collect(&ehm::files::cache_dir()).expect("tools/setup.sh data");
    let files: Vec<PathBuf> = ehm::data::folder::list_images(&photos)
        .unwrap()
        .into_iter()
        .step_by(40)
        .take(12)
        .collect();
    let ix = d.path().join("ix");
    let o = Command::new(common::tool("ehm-retrieve"))
        .arg("index")
        .arg("-i")
        .arg(&ix)
        .arg("-m")
        .arg(shipped("photos64_tiny_embed.onnx"))
        .args(&files)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // a recompressed, half-size copy of one photo finds it first
    let img = ehm::data::image_io::load_rgb(&files[5]).unwrap();
    let small = image::imageops::resize(
        &img,
        img.width() / 2,
        img.height() / 2,
        image::imageops::FilterType::Triangle,
    );
    let q = d.path().join("query.jpg");
    small.save(&q).unwrap();
    let o = Command::new(common::tool("ehm-retrieve"))
        .arg("query")
        .arg("-i")
        .arg(&ix)
        .args(["--format", "jsonl", "-k", "1"])
        .arg(&q)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        r["matches"][0]["path"].as_str().unwrap(),
        files[5].canonicalize().unwrap().display().to_string()
    );
}
