//! A segmentation data set built from registry data: Tux Paint stamps (objects with exact alpha
//! masks; classes from their top-level folders, small folders merged into `other`) pasted —
//! scaled, flipped, several per image, overlapping — onto the registry photos. The train/val
//! split is by object identity AND by background photo: nothing appears in both.
//! Layout written: `images/{train,val}/NNNNN.png`, `masks/{train,val}/NNNNN.png` (8-bit class
//! index, 0 = background), `classes.json`, `split.json`.
use super::folder::list_images;
use super::preprocess::{random_resized_crop, resize_crop, Augment, Interpolation};
use crate::error::{Error, IoContext, Result};
use crate::files::{write_atomic, write_png_atomic};
use image::{GrayImage, RgbImage, RgbaImage};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug)]
pub struct SegDataConfig {
    pub out: PathBuf,
    pub stamps: PathBuf,
    pub photos: PathBuf,
    pub train_images: usize,
    pub val_images: usize,
    pub size: u32,
    pub max_objects: usize,
    /// Label every object `object` (class 1) instead of its category: the same images
    /// (the random draws do not depend on it), a foreground/background task that a small
    /// frozen backbone can learn where 13 stamp categories are out of its reach.
    pub objects_only: bool,
    /// Folders with fewer objects than this become `other`.
    pub min_objects_per_class: usize,
    pub val_fraction: f64,
    pub seed: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SplitRecord {
    /// Object identities (stamp paths relative to the stamp folder) per split.
    pub train_objects: Vec<String>,
    pub val_objects: Vec<String>,
    /// Background photo file names per split.
    pub train_backgrounds: Vec<String>,
    pub val_backgrounds: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SegDataSummary {
    #[serde(serialize_with = "crate::files::lossy_path")]
    pub out: PathBuf,
    pub classes: Vec<String>,
    pub train_images: usize,
    pub val_images: usize,
    pub objects: usize,
    pub backgrounds: usize,
}

struct Stamp {
    id: String,
    class: u8,
    rgba: RgbaImage,
}

/// The class of a stamp: its top-level folder under the stamp root.
fn stamp_folder(root: &Path, p: &Path) -> String {
    p.strip_prefix(root)
        .ok()
        .and_then(|r| r.components().next())
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn load_stamps(root: &Path, min_per_class: usize) -> Result<(Vec<Stamp>, Vec<String>)> {
    let paths: Vec<PathBuf> = list_images(root)?
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for p in &paths {
        *counts.entry(stamp_folder(root, p)).or_default() += 1;
    }
    let mut classes: Vec<String> = vec!["background".into()];
    classes.extend(
        counts
            .iter()
            .filter(|(_, &n)| n >= min_per_class)
            .map(|(c, _)| c.clone()),
    );
    let has_other = counts.values().any(|&n| n < min_per_class);
    if has_other {
        classes.push("other".into());
    }
    if classes.len() > 255 {
        return Err(Error::Config(
            "more than 255 classes do not fit an 8-bit mask".into(),
        ));
    }
    use rayon::prelude::*;
    let stamps: Vec<Stamp> = paths
        .par_iter()
        .filter_map(|p| {
            let img = image::open(p).ok()?.into_rgba8();
            // an object needs some opaque pixels and some size
            let opaque = img.pixels().filter(|px| px.0[3] >= 128).count();
            if img.width().min(img.height()) < 16 || opaque < 64 {
                return None;
            }
            let folder = stamp_folder(root, p);
            let class = classes
                .iter()
                .position(|c| *c == folder)
                .unwrap_or(classes.len() - 1) as u8;
            Some(Stamp {
                id: p.strip_prefix(root).unwrap().to_string_lossy().into_owned(),
                class,
                rgba: img,
            })
        })
        .collect();
    if stamps.is_empty() {
        return Err(Error::MissingData(format!(
            "{}: no usable stamps; run tools/setup.sh data",
            root.display()
        )));
    }
    Ok((stamps, classes))
}

/// Split indices `0..n` by a seeded shuffle; at least one to each side when n ≥ 2.
fn split_indices(n: usize, frac: f64, rng: &mut ChaCha8Rng) -> (Vec<usize>, Vec<usize>) {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(rng);
    let nv = if n >= 2 {
        ((n as f64 * frac).round() as usize).clamp(1, n - 1)
    } else {
        0
    };
    let val = idx[..nv].to_vec();
    (idx[nv..].to_vec(), val)
}

/// Paste `obj` (alpha-blended) with its top-left at (x, y); label opaque pixels with `class`.
fn paste(img: &mut RgbImage, mask: &mut GrayImage, obj: &RgbaImage, x: i64, y: i64, class: u8) {
    for (ox, oy, px) in obj.enumerate_pixels() {
        let (tx, ty) = (x + ox as i64, y + oy as i64);
        if tx < 0 || ty < 0 || tx >= img.width() as i64 || ty >= img.height() as i64 {
            continue;
        }
        let a = px.0[3] as f32 / 255.0;
        if a == 0.0 {
            continue;
        }
        let dst = img.get_pixel_mut(tx as u32, ty as u32);
        for c in 0..3 {
            dst.0[c] = (a * px.0[c] as f32 + (1.0 - a) * dst.0[c] as f32).round() as u8;
        }
        if px.0[3] >= 128 {
            mask.put_pixel(tx as u32, ty as u32, image::Luma([class]));
        }
    }
}

fn scale_rgba(obj: &RgbaImage, w: u32, h: u32) -> RgbaImage {
    image::imageops::resize(obj, w, h, image::imageops::FilterType::Triangle)
}

fn compose(
    stamps: &[Stamp],
    objs: &[usize],
    bgs: &[PathBuf],
    cfg: &SegDataConfig,
    rng: &mut ChaCha8Rng,
) -> Result<(RgbImage, GrayImage)> {
    let bg_path = &bgs[rng.random_range(0..bgs.len())];
    let bg = super::image_io::load_rgb(bg_path)?;
    let aug = Augment {
        scale: (0.3, 1.0),
        ratio: (0.75, 1.333),
        hflip: false,
        rand_augment: None,
    };
    let crop = random_resized_crop(bg.width(), bg.height(), &aug, rng);
    let mut img = resize_crop(&bg, crop, cfg.size, Interpolation::Bilinear);
    let mut mask = GrayImage::new(cfg.size, cfg.size);
    let k = rng.random_range(1..=cfg.max_objects.max(1));
    for _ in 0..k {
        let s = &stamps[objs[rng.random_range(0..objs.len())]];
        let longer = (rng.random_range(0.25..0.6) * cfg.size as f64)
            .round()
            .max(8.0);
        let f = longer / s.rgba.width().max(s.rgba.height()) as f64;
        let (w, h) = (
            ((s.rgba.width() as f64 * f).round() as u32).max(1),
            ((s.rgba.height() as f64 * f).round() as u32).max(1),
        );
        let mut o = scale_rgba(&s.rgba, w, h);
        if rng.random_bool(0.5) {
            o = image::imageops::flip_horizontal(&o);
        }
        let x = rng.random_range(-(w as i64) / 4..=(cfg.size as i64 - 3 * w as i64 / 4).max(0));
        let y = rng.random_range(-(h as i64) / 4..=(cfg.size as i64 - 3 * h as i64 / 4).max(0));
        let class = if cfg.objects_only { 1 } else { s.class };
        paste(&mut img, &mut mask, &o, x, y, class);
    }
    Ok((img, mask))
}

/// Build the data set (all files written atomically; `.complete` last).
pub fn make_segdata(cfg: &SegDataConfig) -> Result<SegDataSummary> {
    let (stamps, classes) = load_stamps(&cfg.stamps, cfg.min_objects_per_class)?;
    let photos = list_images(&cfg.photos)?;
    if photos.len() < 2 {
        return Err(Error::MissingData(format!(
            "{}: need at least 2 background photos",
            cfg.photos.display()
        )));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    // split objects within each class, so every class is in both splits where it can be
    let (mut tr_o, mut va_o) = (Vec::new(), Vec::new());
    for c in 1..classes.len() as u8 {
        let members: Vec<usize> = (0..stamps.len())
            .filter(|&i| stamps[i].class == c)
            .collect();
        let (t, v) = split_indices(members.len(), cfg.val_fraction, &mut rng);
        tr_o.extend(t.iter().map(|&i| members[i]));
        va_o.extend(v.iter().map(|&i| members[i]));
    }
    let (tb, vb) = split_indices(photos.len(), cfg.val_fraction, &mut rng);
    let tr_b: Vec<PathBuf> = tb.iter().map(|&i| photos[i].clone()).collect();
    let va_b: Vec<PathBuf> = vb.iter().map(|&i| photos[i].clone()).collect();
    let name = |p: &PathBuf| p.file_name().unwrap().to_string_lossy().into_owned();
    let record = SplitRecord {
        train_objects: tr_o.iter().map(|&i| stamps[i].id.clone()).collect(),
        val_objects: va_o.iter().map(|&i| stamps[i].id.clone()).collect(),
        train_backgrounds: tr_b.iter().map(name).collect(),
        val_backgrounds: va_b.iter().map(name).collect(),
    };
    use rayon::prelude::*;
    for (split, n, objs, bgs) in [
        ("train", cfg.train_images, &tr_o, &tr_b),
        ("val", cfg.val_images, &va_o, &va_b),
    ] {
        if n > 0 && objs.is_empty() {
            return Err(Error::MissingData(format!(
                "no objects left for the {split} split"
            )));
        }
        (0..n).into_par_iter().try_for_each(|i| -> Result<()> {
            let mut r = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0xa076_1d64_78bd_642f);
            r.set_stream(((split == "val") as u64) << 40 | i as u64);
            let (img, mask) = compose(&stamps, objs, bgs, cfg, &mut r)?;
            let f = format!("{i:05}.png");
            write_png_atomic(&cfg.out.join("images").join(split).join(&f), &img)?;
            write_png_atomic(&cfg.out.join("masks").join(split).join(&f), &mask)
        })?;
    }
    let classes = if cfg.objects_only {
        vec!["background".to_string(), "object".to_string()]
    } else {
        classes
    };
    write_atomic(
        &cfg.out.join("classes.json"),
        serde_json::to_string_pretty(&classes).unwrap().as_bytes(),
    )?;
    write_atomic(
        &cfg.out.join("split.json"),
        serde_json::to_string_pretty(&record).unwrap().as_bytes(),
    )?;
    write_atomic(&cfg.out.join(".complete"), b"ok")?;
    Ok(SegDataSummary {
        out: cfg.out.clone(),
        classes,
        train_images: cfg.train_images,
        val_images: cfg.val_images,
        objects: stamps.len(),
        backgrounds: photos.len(),
    })
}

/// Read one pair of a segmentation folder in the common layout: `images/<split>/X.{png,jpg,webp}`
/// with `masks/<split>/X.png`, a PNG of class indices — 8-bit grayscale, or a palette PNG
/// (VOC style) whose palette indices are the classes. 255 means "ignore".
pub fn read_pair(root: &Path, split: &str, stem: &str) -> Result<(RgbImage, GrayImage)> {
    let img_dir = root.join("images").join(split);
    let img_path = ["png", "jpg", "jpeg", "webp"]
        .iter()
        .map(|e| img_dir.join(format!("{stem}.{e}")))
        .find(|p| p.exists());
    let img_path = img_path
        .ok_or_else(|| Error::MissingData(format!("{}: no image {stem}", img_dir.display())))?;
    let mask_path = root.join("masks").join(split).join(format!("{stem}.png"));
    let img = super::image_io::load_rgb(&img_path)?;
    let mask = read_index_png(&mask_path)?;
    if mask.dimensions() != img.dimensions() {
        return Err(Error::bad_file(
            &mask_path,
            format!(
                "mask is {:?}, image is {:?}",
                mask.dimensions(),
                img.dimensions()
            ),
        ));
    }
    Ok((img, mask))
}

/// A class-index PNG: 8-bit grayscale values or palette indices (1/2/4/8-bit), read without
/// expanding the palette to colours.
pub fn read_index_png(path: &Path) -> Result<GrayImage> {
    let file = std::fs::File::open(path).at(path)?;
    let mut dec = png::Decoder::new(std::io::BufReader::new(file));
    dec.set_transformations(png::Transformations::IDENTITY);
    let mut reader = dec
        .read_info()
        .map_err(|e| Error::bad_file(path, format!("not a readable PNG ({e})")))?;
    let (ct, depth) = reader.output_color_type();
    let ok = matches!(ct, png::ColorType::Grayscale | png::ColorType::Indexed)
        && (depth == png::BitDepth::Eight || ct == png::ColorType::Indexed);
    if !ok {
        return Err(Error::bad_file(
            path,
            format!("mask must be an 8-bit grayscale or a palette PNG of class indices, found {ct:?} {depth:?}"),
        ));
    }
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| Error::bad_file(path, "PNG too large"))?;
    let mut buf = vec![0u8; size];
    let info = reader
        .next_frame(&mut buf)
        .map_err(|e| Error::bad_file(path, format!("corrupt PNG ({e})")))?;
    let (w, h) = (info.width, info.height);
    let bits = depth as u32;
    let mut out = Vec::with_capacity((w * h) as usize);
    for row in buf.chunks(info.line_size).take(h as usize) {
        for x in 0..w {
            let bit = x * bits;
            let byte = row[(bit / 8) as usize];
            let shift = 8 - bits - bit % 8;
            out.push((byte >> shift) & ((1u16 << bits) - 1) as u8);
        }
    }
    Ok(GrayImage::from_raw(w, h, out).expect("w·h values"))
}

/// Class names of a segmentation folder: `classes.json`, or `class_0 … class_K` from the
/// largest index in the masks of `split` when there is none.
pub fn read_classes(root: &Path, max_index: u8) -> Result<Vec<String>> {
    let p = root.join("classes.json");
    if p.exists() {
        let text = std::fs::read_to_string(&p).at(&p)?;
        return serde_json::from_str(&text).map_err(|e| {
            Error::bad_file(&p, format!("expected a JSON list of class names ({e})"))
        });
    }
    Ok((0..=max_index).map(|k| format!("class_{k}")).collect())
}

/// The stems of `images/<split>` (sorted).
pub fn list_split(root: &Path, split: &str) -> Result<Vec<String>> {
    let dir = root.join("images").join(split);
    if !dir.is_dir() {
        return Err(Error::MissingData(format!(
            "{}: no such folder (a segmentation set has images/<split>/ and masks/<split>/; build one with ehm-train make-segdata)",
            dir.display()
        )));
    }
    let mut stems: Vec<String> = list_images(&dir)?
        .iter()
        .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .collect();
    stems.sort();
    Ok(stems)
}

/// Where `tools/setup.sh data` unpacks the Tux Paint stamps (the Debian package's tree) in
/// the cache folder `cache`.
pub fn stamps_dir(cache: &Path) -> PathBuf {
    cache.join("data/tuxpaint-stamps-default/usr/share/tuxpaint/stamps")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(out: &Path, seed: u64) -> SegDataConfig {
        let cache = crate::files::cache_dir();
        SegDataConfig {
            out: out.to_path_buf(),
            stamps: stamps_dir(&cache),
            photos: super::super::photos::collect(&cache).expect("run tools/setup.sh data"),
            train_images: 6,
            val_images: 3,
            size: 64,
            max_objects: 3,
            objects_only: false,
            min_objects_per_class: 10,
            val_fraction: 0.2,
            seed,
        }
    }

    #[test]
    fn builds_a_leak_free_deterministic_set_from_registry_data() {
        let d = tempfile::tempdir().unwrap();
        let s = make_segdata(&cfg(d.path(), 7)).unwrap();
        assert_eq!(s.classes[0], "background");
        assert!(
            s.classes.contains(&"other".to_string()),
            "small folders merge into other: {:?}",
            s.classes
        );
        assert!(s.objects > 500 && s.backgrounds > 200);
        // no object and no background photo in both splits
        let rec: SplitRecord =
            serde_json::from_slice(&std::fs::read(d.path().join("split.json")).unwrap()).unwrap();
        let tr: std::collections::HashSet<_> = rec.train_objects.iter().collect();
        assert!(rec.val_objects.iter().all(|o| !tr.contains(o)) && !rec.val_objects.is_empty());
        let tb: std::collections::HashSet<_> = rec.train_backgrounds.iter().collect();
        assert!(
            rec.val_backgrounds.iter().all(|b| !tb.contains(b)) && !rec.val_backgrounds.is_empty()
        );
        // pairs read back; masks hold valid classes and some foreground
        let mut fg = 0;
        for (split, n) in [("train", 6), ("val", 3)] {
            for i in 0..n {
                let (img, mask) = read_pair(d.path(), split, &format!("{i:05}")).unwrap();
                assert_eq!(img.dimensions(), (64, 64));
                assert!(mask.pixels().all(|p| (p.0[0] as usize) < s.classes.len()));
                fg += mask.pixels().filter(|p| p.0[0] > 0).count();
            }
        }
        assert!(fg > 9 * 64 * 64 / 50, "too little foreground: {fg}");
        // same seed → same bytes; another seed → other images
        let d2 = tempfile::tempdir().unwrap();
        make_segdata(&cfg(d2.path(), 7)).unwrap();
        let a = std::fs::read(d.path().join("masks/train/00003.png")).unwrap();
        assert_eq!(
            a,
            std::fs::read(d2.path().join("masks/train/00003.png")).unwrap()
        );
        let d3 = tempfile::tempdir().unwrap();
        make_segdata(&cfg(d3.path(), 8)).unwrap();
        assert_ne!(
            a,
            std::fs::read(d3.path().join("masks/train/00003.png")).unwrap()
        );
    }

    #[test]
    fn objects_only_labels_the_same_images_object_vs_background() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        make_segdata(&cfg(a.path(), 5)).unwrap();
        let s = make_segdata(&SegDataConfig {
            objects_only: true,
            ..cfg(b.path(), 5)
        })
        .unwrap();
        assert_eq!(s.classes, ["background", "object"]);
        let mut fg = 0;
        for i in 0..6 {
            let stem = format!("{i:05}");
            let (img_a, mask_a) = read_pair(a.path(), "train", &stem).unwrap();
            let (img_b, mask_b) = read_pair(b.path(), "train", &stem).unwrap();
            assert_eq!(img_a, img_b, "image {stem} differs");
            for (pa, pb) in mask_a.pixels().zip(mask_b.pixels()) {
                assert_eq!(pb.0[0], (pa.0[0] > 0) as u8);
                fg += pb.0[0] as usize;
            }
        }
        assert!(fg > 0);
    }

    #[test]
    fn palette_masks_read_as_indices() {
        let d = tempfile::tempdir().unwrap();
        for sub in ["images/val", "masks/val"] {
            std::fs::create_dir_all(d.path().join(sub)).unwrap();
        }
        RgbImage::new(3, 2)
            .save(d.path().join("images/val/a.png"))
            .unwrap();
        // a 4-bit palette PNG holding indices 0..5, written with the png crate
        let f = std::fs::File::create(d.path().join("masks/val/a.png")).unwrap();
        let mut enc = png::Encoder::new(f, 3, 2);
        enc.set_color(png::ColorType::Indexed);
        enc.set_depth(png::BitDepth::Four);
        enc.set_palette(vec![0u8; 16 * 3]);
        let mut w = enc.write_header().unwrap();
        // rows: [0,1,2] [3,4,5] packed two per byte, rows padded to whole bytes
        w.write_image_data(&[0x01, 0x20, 0x34, 0x50]).unwrap();
        drop(w);
        let (_, m) = read_pair(d.path(), "val", "a").unwrap();
        assert_eq!(m.as_raw(), &vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(read_classes(d.path(), 5).unwrap().len(), 6);
        assert_eq!(list_split(d.path(), "val").unwrap(), vec!["a".to_string()]);
    }

    #[test]
    fn colour_masks_are_refused_with_a_clear_message() {
        let d = tempfile::tempdir().unwrap();
        for sub in ["images/val", "masks/val"] {
            std::fs::create_dir_all(d.path().join(sub)).unwrap();
        }
        RgbImage::new(4, 4)
            .save(d.path().join("images/val/a.png"))
            .unwrap();
        RgbImage::new(4, 4)
            .save(d.path().join("masks/val/a.png"))
            .unwrap();
        let e = read_pair(d.path(), "val", "a").unwrap_err().to_string();
        assert!(e.contains("palette PNG") && e.contains("a.png"), "{e}");
    }
}
