//! CIFAR-10 / CIFAR-100 binary batches (the `*-binary.tar.gz` layout, already unpacked).
use super::InMemory;
use crate::error::{Error, IoContext, Result};
use std::path::Path;

const PIXELS: usize = 32 * 32 * 3;

/// Load a split ("train" | "test") from a CIFAR binary folder. CIFAR-10 is recognised by
/// `data_batch_1.bin`, CIFAR-100 by `train.bin` (fine labels are used).
pub fn load(dir: &Path, split: &str) -> Result<InMemory> {
    let is10 = dir.join("data_batch_1.bin").exists() || dir.join("test_batch.bin").exists();
    let is100 = dir.join("train.bin").exists() || dir.join("test.bin").exists();
    let (files, label_bytes, label_at, names_file): (Vec<String>, usize, usize, &str) = if is10 {
        let f = match split {
            "train" => (1..=5).map(|i| format!("data_batch_{i}.bin")).collect(),
            "test" => vec!["test_batch.bin".to_string()],
            _ => {
                return Err(Error::Config(format!(
                    "CIFAR split must be train or test, got {split}"
                )))
            }
        };
        (f, 1, 0, "batches.meta.txt")
    } else if is100 {
        let f = match split {
            "train" => vec!["train.bin".to_string()],
            "test" => vec!["test.bin".to_string()],
            _ => {
                return Err(Error::Config(format!(
                    "CIFAR split must be train or test, got {split}"
                )))
            }
        };
        (f, 2, 1, "fine_label_names.txt")
    } else {
        return Err(Error::MissingData(format!(
            "{}: no CIFAR binary batches here (expected data_batch_1.bin or train.bin)",
            dir.display()
        )));
    };
    let rec = label_bytes + PIXELS;
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for f in &files {
        let p = dir.join(f);
        let bytes = std::fs::read(&p).at(&p)?;
        if bytes.is_empty() || bytes.len() % rec != 0 {
            return Err(Error::bad_file(
                &p,
                format!(
                    "{} bytes is not a whole number of {rec}-byte CIFAR records (truncated?)",
                    bytes.len()
                ),
            ));
        }
        for r in bytes.chunks_exact(rec) {
            labels.push(r[label_at] as usize);
            // CHW planes → HWC
            let img = &r[label_bytes..];
            for i in 0..1024 {
                pixels.extend_from_slice(&[img[i], img[1024 + i], img[2048 + i]]);
            }
        }
    }
    let n_classes = if is10 { 10 } else { 100 };
    if let Some(bad) = labels.iter().find(|&&l| l >= n_classes) {
        return Err(Error::bad_file(
            dir.join(&files[0]),
            format!("label {bad} out of range for {n_classes} classes"),
        ));
    }
    let classes = match std::fs::read_to_string(dir.join(names_file)) {
        Ok(s) => s
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect(),
        Err(_) => (0..n_classes).map(|i| format!("class_{i}")).collect(),
    };
    InMemory::new(
        pixels,
        32,
        32,
        3,
        Some(labels),
        classes,
        dir.display().to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Dataset;

    fn record(label: u8, r: u8) -> Vec<u8> {
        let mut v = vec![label];
        v.extend(std::iter::repeat_n(r, 1024));
        v.extend(std::iter::repeat_n(1, 1024));
        v.extend(std::iter::repeat_n(2, 1024));
        v
    }

    #[test]
    fn reads_cifar10_layout() {
        let d = tempfile::tempdir().unwrap();
        let mut b = record(3, 200);
        b.extend(record(7, 5));
        std::fs::write(d.path().join("test_batch.bin"), &b).unwrap();
        std::fs::write(
            d.path().join("batches.meta.txt"),
            "a\nb\nc\nd\ne\nf\ng\nh\ni\nj\n",
        )
        .unwrap();
        let ds = load(d.path(), "test").unwrap();
        assert_eq!(ds.len(), 2);
        assert_eq!(ds.label(1), Some(7));
        assert_eq!(ds.classes()[3], "d");
        assert_eq!(ds.image(0).unwrap().get_pixel(5, 5).0, [200, 1, 2]);
    }

    #[test]
    fn reads_cifar100_fine_labels() {
        let d = tempfile::tempdir().unwrap();
        let mut r = vec![4u8];
        r.extend(record(42, 9));
        std::fs::write(d.path().join("train.bin"), &r).unwrap();
        let ds = load(d.path(), "train").unwrap();
        assert_eq!(ds.label(0), Some(42));
        assert_eq!(ds.classes().len(), 100);
    }

    #[test]
    fn rejects_truncated_and_missing() {
        let d = tempfile::tempdir().unwrap();
        assert!(load(d.path(), "test")
            .unwrap_err()
            .to_string()
            .contains("no CIFAR"));
        let mut b = record(1, 1);
        b.truncate(2000);
        std::fs::write(d.path().join("test_batch.bin"), &b).unwrap();
        let e = load(d.path(), "test").unwrap_err().to_string();
        assert!(
            e.contains("truncated") && e.contains("test_batch.bin"),
            "{e}"
        );
    }
}
