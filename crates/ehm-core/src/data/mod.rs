//! Data: decoding, the one preprocessing definition, and the data sets the trainer reads.
pub mod cifar;
pub mod folder;
pub mod idx;
pub mod image_io;
pub mod photos;
pub mod preprocess;
pub mod randaugment;
pub mod rcc;
pub mod segdata;

pub use preprocess::{Augment, Interpolation, Preprocess, ResizeRule, IMAGENET_MEAN, IMAGENET_STD};

use crate::error::{Error, Result};
use image::RgbImage;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A random-access collection of images, optionally labelled.
pub trait Dataset: Send + Sync {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn image(&self, i: usize) -> Result<RgbImage>;
    fn label(&self, i: usize) -> Option<usize>;
    /// Class names; empty for an unlabelled collection.
    fn classes(&self) -> &[String];
    /// A human name for item `i` (a path, or `set[index]`), for error messages.
    fn describe(&self, i: usize) -> String;
}

/// Small images held in memory (Fashion-MNIST, CIFAR): HWC bytes, 1 or 3 channels.
#[derive(Debug)]
pub struct InMemory {
    pixels: Vec<u8>,
    h: usize,
    w: usize,
    channels: usize,
    labels: Option<Vec<usize>>,
    classes: Vec<String>,
    name: String,
}

impl InMemory {
    pub fn new(
        pixels: Vec<u8>,
        h: usize,
        w: usize,
        channels: usize,
        labels: Option<Vec<usize>>,
        classes: Vec<String>,
        name: String,
    ) -> Result<Self> {
        let per = h * w * channels;
        if per == 0 || !pixels.len().is_multiple_of(per) {
            return Err(Error::Shape(format!(
                "{name}: pixel buffer is not a whole number of {h}×{w}×{channels} images"
            )));
        }
        if let Some(l) = &labels {
            if l.len() != pixels.len() / per {
                return Err(Error::Shape(format!(
                    "{name}: {} labels for {} images",
                    l.len(),
                    pixels.len() / per
                )));
            }
        }
        Ok(InMemory {
            pixels,
            h,
            w,
            channels,
            labels,
            classes,
            name,
        })
    }
}

impl Dataset for InMemory {
    fn len(&self) -> usize {
        self.pixels.len() / (self.h * self.w * self.channels)
    }
    fn image(&self, i: usize) -> Result<RgbImage> {
        let per = self.h * self.w * self.channels;
        let px = &self.pixels[i * per..(i + 1) * per];
        let rgb = if self.channels == 1 {
            px.iter().flat_map(|&v| [v, v, v]).collect()
        } else {
            px.to_vec()
        };
        Ok(RgbImage::from_raw(self.w as u32, self.h as u32, rgb).expect("size checked in new()"))
    }
    fn label(&self, i: usize) -> Option<usize> {
        self.labels.as_ref().map(|l| l[i])
    }
    fn classes(&self) -> &[String] {
        &self.classes
    }
    fn describe(&self, i: usize) -> String {
        format!("{}[{i}]", self.name)
    }
}

/// A view of some items of another data set.
pub struct Subset {
    pub inner: Arc<dyn Dataset>,
    pub indices: Vec<usize>,
}

impl Dataset for Subset {
    fn len(&self) -> usize {
        self.indices.len()
    }
    fn image(&self, i: usize) -> Result<RgbImage> {
        self.inner.image(self.indices[i])
    }
    fn label(&self, i: usize) -> Option<usize> {
        self.inner.label(self.indices[i])
    }
    fn classes(&self) -> &[String] {
        self.inner.classes()
    }
    fn describe(&self, i: usize) -> String {
        self.inner.describe(self.indices[i])
    }
}

pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// Where set-up unpacks Fashion-MNIST.
pub fn fashion_mnist_dir() -> PathBuf {
    crate::files::cache_dir().join("data/dataset-fashion-mnist/usr/share/datasets/fashion-mnist")
}

/// Fashion-MNIST "train" (60k) or "test" (10k) from a folder of IDX files (gz or not).
pub fn fashion_mnist(dir: &Path, split: &str) -> Result<InMemory> {
    let prefix = match split {
        "train" => "train",
        "test" => "t10k",
        _ => {
            return Err(Error::Config(format!(
                "Fashion-MNIST split must be train or test, got '{split}'"
            )))
        }
    };
    let find = |stem: &str| -> Result<PathBuf> {
        for ext in [".gz", ""] {
            let p = dir.join(format!("{prefix}-{stem}{ext}"));
            if p.exists() {
                return Ok(p);
            }
        }
        Err(Error::MissingData(format!(
            "{}: Fashion-MNIST {prefix}-{stem}[.gz] not found; run tools/setup.sh data",
            dir.display()
        )))
    };
    let (ip, lp) = (find("images-idx3-ubyte")?, find("labels-idx1-ubyte")?);
    let (idims, pixels) = idx::read_idx(&ip)?;
    let (ldims, labels) = idx::read_idx(&lp)?;
    if idims.len() != 3 {
        return Err(Error::bad_file(
            &ip,
            format!("expected 3 dimensions (n, h, w), found {idims:?}"),
        ));
    }
    if ldims.len() != 1 || ldims[0] != idims[0] {
        return Err(Error::bad_file(
            &lp,
            format!("{ldims:?} labels do not match {} images", idims[0]),
        ));
    }
    if let Some(bad) = labels.iter().find(|&&l| l >= 10) {
        return Err(Error::bad_file(
            &lp,
            format!("label {bad} out of range 0..10"),
        ));
    }
    InMemory::new(
        pixels,
        idims[1],
        idims[2],
        1,
        Some(labels.into_iter().map(usize::from).collect()),
        FASHION_MNIST_CLASSES
            .iter()
            .map(|s| s.to_string())
            .collect(),
        format!("fashion-mnist:{split}"),
    )
}

/// Where a data set comes from, as written on the command line:
/// `fashion-mnist:train|test`, `cifar:DIR[:train|test]`, `folder:DIR` (or a bare path), `photos`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataSpec {
    FashionMnist { split: String },
    Cifar { dir: PathBuf, split: String },
    Folder { dir: PathBuf },
    Photos,
}

impl std::str::FromStr for DataSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let (kind, rest) = s.split_once(':').unwrap_or((s, ""));
        match kind {
            "fashion-mnist" | "fmnist" => Ok(DataSpec::FashionMnist { split: if rest.is_empty() { "train".into() } else { rest.into() } }),
            "cifar" => {
                let (dir, split) = match rest.rsplit_once(':') {
                    Some((d, sp)) if sp == "train" || sp == "test" => (d, sp),
                    _ => (rest, "train"),
                };
                if dir.is_empty() {
                    return Err(Error::Config("cifar needs a folder: cifar:DIR[:train|test]".into()));
                }
                Ok(DataSpec::Cifar { dir: dir.into(), split: split.into() })
            }
            "folder" if !rest.is_empty() => Ok(DataSpec::Folder { dir: rest.into() }),
            "photos" => Ok(DataSpec::Photos),
            _ if Path::new(s).is_dir() => Ok(DataSpec::Folder { dir: s.into() }),
            _ => Err(Error::Config(format!(
                "unknown data set '{s}': use fashion-mnist:train|test, cifar:DIR[:train|test], folder:DIR, photos, or an existing folder"
            ))),
        }
    }
}

impl std::fmt::Display for DataSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DataSpec::FashionMnist { split } => write!(f, "fashion-mnist:{split}"),
            DataSpec::Cifar { dir, split } => write!(f, "cifar:{}:{split}", dir.display()),
            DataSpec::Folder { dir } => write!(f, "folder:{}", dir.display()),
            DataSpec::Photos => write!(f, "photos"),
        }
    }
}

impl DataSpec {
    pub fn open(&self) -> Result<Arc<dyn Dataset>> {
        Ok(match self {
            DataSpec::FashionMnist { split } => {
                Arc::new(fashion_mnist(&fashion_mnist_dir(), split)?)
            }
            DataSpec::Cifar { dir, split } => Arc::new(cifar::load(dir, split)?),
            DataSpec::Folder { dir } => Arc::new(folder::ImageFolder::open(dir)?),
            DataSpec::Photos => Arc::new(folder::ImageFolder::open(&photos::collect(
                &crate::files::cache_dir(),
            )?)?),
        })
    }
}

/// The first `n` items after a seeded shuffle (a fixed, class-mixed subset).
/// `n = 0` means the whole set.
pub fn subset(ds: Arc<dyn Dataset>, n: usize, seed: u64) -> Arc<dyn Dataset> {
    if n == 0 || n >= ds.len() {
        return ds;
    }
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let mut idx: Vec<usize> = (0..ds.len()).collect();
    idx.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    idx.truncate(n);
    idx.sort();
    Arc::new(Subset {
        inner: ds,
        indices: idx,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_parsing() {
        assert_eq!(
            "fmnist:test".parse::<DataSpec>().unwrap(),
            DataSpec::FashionMnist {
                split: "test".into()
            }
        );
        assert_eq!(
            "cifar:/x/y:test".parse::<DataSpec>().unwrap(),
            DataSpec::Cifar {
                dir: "/x/y".into(),
                split: "test".into()
            }
        );
        assert!("nonsense-set".parse::<DataSpec>().is_err());
    }

    #[test]
    fn fashion_mnist_reader_checks_consistency() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("t10k-images-idx3-ubyte"),
            idx::encode_idx(&[2, 2, 2], &[0, 1, 2, 3, 4, 5, 6, 7]),
        )
        .unwrap();
        std::fs::write(
            d.path().join("t10k-labels-idx1-ubyte"),
            idx::encode_idx(&[2], &[9, 1]),
        )
        .unwrap();
        let ds = fashion_mnist(d.path(), "test").unwrap();
        assert_eq!(ds.len(), 2);
        assert_eq!(ds.label(0), Some(9));
        assert_eq!(ds.image(1).unwrap().get_pixel(1, 1).0, [7, 7, 7]);
        std::fs::write(
            d.path().join("t10k-labels-idx1-ubyte"),
            idx::encode_idx(&[3], &[9, 1, 1]),
        )
        .unwrap();
        assert!(fashion_mnist(d.path(), "test")
            .unwrap_err()
            .to_string()
            .contains("do not match"));
        assert!(fashion_mnist(d.path(), "train")
            .unwrap_err()
            .to_string()
            .contains("setup.sh"));
    }

    #[test]
    fn subset_is_deterministic() {
        let ds: Arc<dyn Dataset> = Arc::new(
            InMemory::new(
                vec![0; 100],
                1,
                1,
                1,
                Some((0..100).collect()),
                vec![],
                "t".into(),
            )
            .unwrap(),
        );
        let a = subset(ds.clone(), 10, 3);
        let b = subset(ds, 10, 3);
        let la: Vec<_> = (0..10).map(|i| a.label(i)).collect();
        let lb: Vec<_> = (0..10).map(|i| b.label(i)).collect();
        assert_eq!(la, lb);
    }
}

/// Decoded images kept in memory, downscaled so the shorter side is at most `max_short_side`.
/// Training on a folder of large photos otherwise decodes a 4K JPEG per sample, which no
/// number of loader threads can keep up with on a GPU. Filled lazily, shared by all workers.
pub struct DecodedCache {
    inner: Arc<dyn Dataset>,
    max_short_side: u32,
    slots: Vec<std::sync::OnceLock<Arc<RgbImage>>>,
}

impl DecodedCache {
    pub fn new(inner: Arc<dyn Dataset>, max_short_side: u32) -> Self {
        let slots = (0..inner.len())
            .map(|_| std::sync::OnceLock::new())
            .collect();
        DecodedCache {
            inner,
            max_short_side,
            slots,
        }
    }

    /// Wrap `ds` when its downscaled images fit in `budget_bytes` (estimated at 4:3).
    pub fn wrap_if_fits(
        ds: Arc<dyn Dataset>,
        max_short_side: u32,
        budget_bytes: u64,
    ) -> Arc<dyn Dataset> {
        let per = (max_short_side as u64).pow(2) * 4 / 3 * 3;
        if ds.len() as u64 * per <= budget_bytes {
            Arc::new(DecodedCache::new(ds, max_short_side))
        } else {
            ds
        }
    }
}

impl Dataset for DecodedCache {
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn image(&self, i: usize) -> Result<RgbImage> {
        if let Some(img) = self.slots[i].get() {
            return Ok((**img).clone());
        }
        let img = self.inner.image(i)?;
        let short = img.width().min(img.height());
        let img = if short > self.max_short_side {
            let s = self.max_short_side as f64 / short as f64;
            let (w, h) = (
                ((img.width() as f64 * s).round() as u32).max(1),
                ((img.height() as f64 * s).round() as u32).max(1),
            );
            let full = preprocess::Crop {
                left: 0.0,
                top: 0.0,
                width: img.width() as f64,
                height: img.height() as f64,
            };
            preprocess::resize_crop_to(&img, full, w, h, Interpolation::Bilinear)
        } else {
            img
        };
        let _ = self.slots[i].set(Arc::new(img.clone()));
        Ok(img)
    }
    fn label(&self, i: usize) -> Option<usize> {
        self.inner.label(i)
    }
    fn classes(&self) -> &[String] {
        self.inner.classes()
    }
    fn describe(&self, i: usize) -> String {
        self.inner.describe(i)
    }
}

#[cfg(test)]
mod cache_tests {
    use super::*;

    #[test]
    fn cache_downscales_once_and_keeps_small_images() {
        let ds: Arc<dyn Dataset> = Arc::new(
            InMemory::new(
                vec![100; 2 * 40 * 60 * 3],
                40,
                60,
                3,
                None,
                vec![],
                "t".into(),
            )
            .unwrap(),
        );
        let c = DecodedCache::new(ds.clone(), 20);
        let a = c.image(1).unwrap();
        assert_eq!(a.dimensions(), (30, 20));
        assert_eq!(c.image(1).unwrap(), a);
        assert_eq!(
            DecodedCache::new(ds.clone(), 64)
                .image(0)
                .unwrap()
                .dimensions(),
            (60, 40)
        );
        // too big for the budget: returned unwrapped
        assert_eq!(
            DecodedCache::wrap_if_fits(ds, 20, 10)
                .image(0)
                .unwrap()
                .dimensions(),
            (60, 40)
        );
    }
}
