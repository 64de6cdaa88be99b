//! A Copydays-style partial-duplicate benchmark built from the registry photos: some photos are
//! originals, a few are held out as collage backgrounds, every other photo is a distractor, and
//! each original gets one attacked copy per attack family (crops, rotations, flips, JPEG, blur,
//! colour jitter, grayscale, text and object overlays, borders, 'strong' combinations, the
//! original pasted small into an unrelated photo or a collage, tiny thumbnails). The database is
//! the photo collection less the backgrounds (so a collage has one right answer); the queries are
//! the copies. Evaluation: AP per query (one relevant image: 1/rank), mAP per
//! family and overall, recall@1/@10, and µAP over all (query, match) pairs as DISC21 scores it.
use super::{Match, Searcher};
use crate::data::image_io::load_rgb;
use crate::error::{Error, IoContext, Result};
use crate::files::write_atomic;
use crate::pipeline::View;
use image::{Rgb, RgbImage, RgbaImage};
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const FAMILIES: &[&str] = &[
    "crop",
    "rotate90",
    "rotate_free",
    "flip",
    "jpeg",
    "blur",
    "jitter",
    "gray",
    "text",
    "object",
    "border",
    "strong",
    "inset",
    "inset_edit",
    "collage",
    "thumbnail",
];

/// Photos held out of the database as collage/inset backgrounds.
pub const BACKGROUNDS: usize = 40;

/// What the attacks paste onto or around the original.
pub struct Material {
    /// Tux Paint stamps (object overlays).
    pub objects: Vec<RgbaImage>,
    /// Unrelated photos that are not in the database (inset and collage backgrounds).
    pub backgrounds: Vec<RgbImage>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GroundTruth {
    #[serde(with = "crate::files::lossless_path")]
    pub query: PathBuf,
    pub family: String,
    /// What was done, e.g. "crop 23% area".
    pub attack: String,
    /// Where the original sits in the query when it fills only part of it (x, y, w, h as
    /// fractions of the query).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<crate::pipeline::View>,
    #[serde(with = "crate::files::lossless_path")]
    pub original: PathBuf,
}

/// Bilinear sample with a fill colour outside.
fn sample(img: &RgbImage, x: f32, y: f32, fill: [u8; 3]) -> [u8; 3] {
    let (w, h) = (img.width() as i64, img.height() as i64);
    let (x0, y0) = (x.floor() as i64, y.floor() as i64);
    let (fx, fy) = (x - x0 as f32, y - y0 as f32);
    let px = |xx: i64, yy: i64| {
        if xx < 0 || yy < 0 || xx >= w || yy >= h {
            fill
        } else {
            img.get_pixel(xx as u32, yy as u32).0
        }
    };
    let (a, b, c, d) = (
        px(x0, y0),
        px(x0 + 1, y0),
        px(x0, y0 + 1),
        px(x0 + 1, y0 + 1),
    );
    std::array::from_fn(|i| {
        let top = a[i] as f32 * (1.0 - fx) + b[i] as f32 * fx;
        let bot = c[i] as f32 * (1.0 - fx) + d[i] as f32 * fx;
        (top * (1.0 - fy) + bot * fy).round() as u8
    })
}

/// Rotate by `deg` about the centre, same canvas size, corners filled black.
fn rotate_free(img: &RgbImage, deg: f32) -> RgbImage {
    let (s, c) = deg.to_radians().sin_cos();
    let (cx, cy) = (img.width() as f32 / 2.0, img.height() as f32 / 2.0);
    RgbImage::from_fn(img.width(), img.height(), |x, y| {
        let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
        Rgb(sample(
            img,
            c * dx + s * dy + cx - 0.5,
            -s * dx + c * dy + cy - 0.5,
            [0, 0, 0],
        ))
    })
}

fn jpeg(img: &RgbImage, q: u8) -> RgbImage {
    let mut b = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut b, q)
        .encode_image(img)
        .unwrap();
    image::load_from_memory(&b).unwrap().to_rgb8()
}

fn crop_area(img: &RgbImage, area: f32, r: &mut ChaCha8Rng) -> RgbImage {
    let aspect: f32 = r.random_range(0.75..1.33);
    let (w, h) = (img.width() as f32, img.height() as f32);
    let cw = (w * (area * aspect).sqrt()).clamp(8.0, w) as u32;
    let ch = (h * (area / aspect).sqrt()).clamp(8.0, h) as u32;
    let x = r.random_range(0..=img.width() - cw);
    let y = r.random_range(0..=img.height() - ch);
    image::imageops::crop_imm(img, x, y, cw, ch).to_image()
}

fn jitter(img: &RgbImage, r: &mut ChaCha8Rng) -> RgbImage {
    let b = image::imageops::colorops::brighten(img, r.random_range(-50..50));
    let c = image::imageops::colorops::contrast(&b, r.random_range(-30.0..40.0));
    image::imageops::colorops::huerotate(&c, r.random_range(-60..60))
}

fn overlay_text(img: &mut RgbImage, r: &mut ChaCha8Rng) {
    const WORDS: &[&str] = &[
        "SALE",
        "copy",
        "meme",
        "LOL",
        "news",
        "2026",
        "look!",
        "share",
        "watermark",
        "ehm",
    ];
    let scale = (img.width().min(img.height()) / 120).max(1) * r.random_range(1..3);
    for _ in 0..r.random_range(1..4) {
        let text: Vec<&str> = (0..r.random_range(1..4))
            .map(|_| *WORDS.choose(r).unwrap())
            .collect();
        let text = text.join(" ");
        let x = r.random_range(0..img.width().max(2) / 2) as i64;
        let y = r.random_range(0..img.height().max(2)) as i64;
        let col = [r.random(), r.random(), r.random()];
        crate::draw::draw_text(img, x, y, &text, col, scale);
    }
}

fn overlay_object(img: &mut RgbImage, obj: &RgbaImage, r: &mut ChaCha8Rng) {
    let side = img.width().min(img.height()) as f32 * r.random_range(0.25..0.5);
    let s = side / obj.width().max(obj.height()) as f32;
    let o = image::imageops::resize(
        obj,
        (obj.width() as f32 * s).max(1.0) as u32,
        (obj.height() as f32 * s).max(1.0) as u32,
        image::imageops::FilterType::Triangle,
    );
    let x = r.random_range(0..=img.width().saturating_sub(o.width())) as i64;
    let y = r.random_range(0..=img.height().saturating_sub(o.height())) as i64;
    // alpha-composite the object
    for (ox, oy, p) in o.enumerate_pixels() {
        let (tx, ty) = (x as u32 + ox, y as u32 + oy);
        if tx < img.width() && ty < img.height() {
            let a = p.0[3] as f32 / 255.0;
            let b = img.get_pixel(tx, ty).0;
            img.put_pixel(
                tx,
                ty,
                Rgb(std::array::from_fn(|i| {
                    (p.0[i] as f32 * a + b[i] as f32 * (1.0 - a)).round() as u8
                })),
            );
        }
    }
}

fn border(img: &RgbImage, r: &mut ChaCha8Rng) -> RgbImage {
    let f = r.random_range(0.1..0.3);
    let (bw, bh) = (
        (img.width() as f32 * f) as u32,
        (img.height() as f32 * f) as u32,
    );
    let bar = if r.random_bool(0.5) {
        img.height() / 10
    } else {
        0
    }; // a title bar, screenshot-like
    let col: [u8; 3] = if r.random_bool(0.5) {
        [255, 255, 255]
    } else {
        [r.random(), r.random(), r.random()]
    };
    let mut out = RgbImage::from_pixel(img.width() + 2 * bw, img.height() + 2 * bh + bar, Rgb(col));
    for x in 0..out.width() {
        for y in 0..bar {
            out.put_pixel(x, y, Rgb([60, 60, 70]));
        }
    }
    image::imageops::overlay(&mut out, img, bw as i64, (bh + bar) as i64);
    out
}

/// `img` scaled to cover `w × h` and centre-cropped to it (a collage cell).
fn cover(img: &RgbImage, w: u32, h: u32) -> RgbImage {
    let s = (w as f32 / img.width() as f32).max(h as f32 / img.height() as f32);
    let (sw, sh) = (
        ((img.width() as f32 * s).ceil() as u32).max(w),
        ((img.height() as f32 * s).ceil() as u32).max(h),
    );
    let big = image::imageops::resize(img, sw, sh, image::imageops::FilterType::Triangle);
    image::imageops::crop_imm(&big, (sw - w) / 2, (sh - h) / 2, w, h).to_image()
}

/// The original pasted at 10–30 % of the area of an unrelated photo (a picture in a picture,
/// a screenshot of a page, a meme template), sometimes with a thin white frame.
fn inset(img: &RgbImage, bg: &RgbImage, r: &mut ChaCha8Rng) -> Attacked {
    let mut out = fit(bg.clone(), 512);
    let (bw, bh) = (out.width() as f32, out.height() as f32);
    let share = r.random_range(0.10..0.30);
    let aspect = img.width() as f32 / img.height() as f32;
    let w = ((share * bw * bh * aspect).sqrt()).min(bw * 0.9);
    let h = (w / aspect).min(bh * 0.9);
    let w = (h * aspect).min(w);
    let small = image::imageops::resize(
        img,
        (w as u32).max(8),
        (h as u32).max(8),
        image::imageops::FilterType::Triangle,
    );
    let frame = if r.random_bool(0.5) {
        r.random_range(2..6)
    } else {
        0
    };
    let x = r.random_range(frame..=(out.width() - small.width() - frame).max(frame)) as i64;
    let y = r.random_range(frame..=(out.height() - small.height() - frame).max(frame)) as i64;
    if frame > 0 {
        let f = frame as i64;
        for yy in (y - f).max(0)..(y + small.height() as i64 + f).min(out.height() as i64) {
            for xx in (x - f).max(0)..(x + small.width() as i64 + f).min(out.width() as i64) {
                out.put_pixel(xx as u32, yy as u32, Rgb([255, 255, 255]));
            }
        }
    }
    image::imageops::overlay(&mut out, &small, x, y);
    let area = small.width() * small.height();
    let pct = 100.0 * area as f32 / (out.width() * out.height()) as f32;
    let (ow, oh) = (out.width() as f32, out.height() as f32);
    let region = [
        x as f32 / ow,
        y as f32 / oh,
        small.width() as f32 / ow,
        small.height() as f32 / oh,
    ];
    Attacked {
        image: out,
        what: format!("inset at {pct:.0}% of the frame"),
        region: Some(region),
    }
}

/// A grid collage (2×2, 2×3 or 3×3) of unrelated photos with the original in one cell.
fn collage(img: &RgbImage, bgs: &[RgbImage], r: &mut ChaCha8Rng) -> Attacked {
    let (cols, rows) = *[(2u32, 2u32), (3, 2), (2, 3), (3, 3)].choose(r).unwrap();
    let gap = r.random_range(0..8u32);
    let (cw, ch) = (r.random_range(150..260u32), r.random_range(150..260u32));
    let (w, h) = (cols * cw + (cols + 1) * gap, rows * ch + (rows + 1) * gap);
    let mut out = RgbImage::from_pixel(w, h, Rgb([255, 255, 255]));
    let at = r.random_range(0..cols * rows);
    for cell in 0..cols * rows {
        let pic = if cell == at {
            img
        } else {
            bgs.choose(r).unwrap()
        };
        let (cx, cy) = (cell % cols, cell / cols);
        let x = gap + cx * (cw + gap);
        let y = gap + cy * (ch + gap);
        image::imageops::overlay(&mut out, &cover(pic, cw, ch), x as i64, y as i64);
    }
    let pct = 100.0 * (cw * ch) as f32 / (w * h) as f32;
    let (x, y) = (
        gap + (at % cols) * (cw + gap),
        gap + (at / cols) * (ch + gap),
    );
    let (fw, fh) = (w as f32, h as f32);
    Attacked {
        image: out,
        what: format!(
            "collage {cols}×{rows}, cell {} at {pct:.0}% of the frame",
            at + 1
        ),
        region: Some([x as f32 / fw, y as f32 / fh, cw as f32 / fw, ch as f32 / fh]),
    }
}

/// An attacked copy: the picture, what was done, and where the original sits in it when it
/// fills only part of it (inset, collage).
pub struct Attacked {
    pub image: RgbImage,
    pub what: String,
    pub region: Option<crate::pipeline::View>,
}

/// One attacked copy of `img` for `family`, with a description.
pub fn attack(img: &RgbImage, family: &str, material: &Material, r: &mut ChaCha8Rng) -> Attacked {
    let objects = &material.objects;
    let (image, what) = match family {
        "crop" => {
            let a = r.random_range(0.1..0.8);
            (crop_area(img, a, r), format!("crop {:.0}% area", a * 100.0))
        }
        "rotate90" => match r.random_range(0..3) {
            0 => (image::imageops::rotate90(img), "rotate 90°".into()),
            1 => (image::imageops::rotate180(img), "rotate 180°".into()),
            _ => (image::imageops::rotate270(img), "rotate 270°".into()),
        },
        "rotate_free" => {
            let d = r.random_range(10.0..35.0) * if r.random_bool(0.5) { 1.0 } else { -1.0 };
            (rotate_free(img, d), format!("rotate {d:.0}°"))
        }
        "flip" => (
            image::imageops::flip_horizontal(img),
            "horizontal flip".into(),
        ),
        "jpeg" => {
            let q = r.random_range(3..=75);
            (jpeg(img, q), format!("JPEG quality {q}"))
        }
        "blur" => {
            let s = r.random_range(1.5..5.0) * img.width().max(img.height()) as f32 / 512.0;
            (
                image::imageops::blur(img, s),
                format!("gaussian blur σ={s:.1}"),
            )
        }
        "jitter" => (jitter(img, r), "brightness/contrast/hue".into()),
        "gray" => (
            image::DynamicImage::ImageLuma8(image::imageops::grayscale(img)).to_rgb8(),
            "grayscale".into(),
        ),
        "text" => {
            let mut c = img.clone();
            overlay_text(&mut c, r);
            (c, "text overlay".into())
        }
        "object" => {
            let mut c = img.clone();
            for _ in 0..r.random_range(1..3) {
                overlay_object(&mut c, objects.choose(r).expect("stamps"), r);
            }
            (c, "object overlay".into())
        }
        "border" => (border(img, r), "border / screenshot frame".into()),
        "inset" => {
            let bg = material.backgrounds.choose(r).expect("backgrounds");
            return inset(img, bg, r);
        }
        "inset_edit" => {
            let bg = material.backgrounds.choose(r).expect("backgrounds");
            let mut a = inset(img, bg, r);
            overlay_text(&mut a.image, r);
            let q = r.random_range(30..70);
            a.image = jpeg(&jitter(&a.image, r), q);
            a.what = format!("{} + text + jitter + JPEG {q}", a.what);
            return a;
        }
        "collage" => return collage(img, &material.backgrounds, r),
        "thumbnail" => {
            let side = r.random_range(48..=96);
            let q = r.random_range(40..=75);
            (
                jpeg(&fit(img.clone(), side), q),
                format!("thumbnail {side} px, JPEG {q}"),
            )
        }
        _ => {
            // strong: crop + one geometric + overlay + photometric + heavy JPEG
            let a = r.random_range(0.3..0.7);
            let mut c = crop_area(img, a, r);
            if r.random_bool(0.5) {
                c = image::imageops::flip_horizontal(&c);
            }
            overlay_text(&mut c, r);
            let c = jitter(&c, r);
            let q = r.random_range(10..40);
            (
                jpeg(&c, q),
                format!("crop {:.0}% + flip? + text + jitter + JPEG {q}", a * 100.0),
            )
        }
    };
    Attacked {
        image,
        what,
        region: None,
    }
}

/// Shrink so the longer side is at most `max` pixels (queries are web-sized copies).
fn fit(img: RgbImage, max: u32) -> RgbImage {
    let m = img.width().max(img.height());
    if m <= max {
        return img;
    }
    let s = max as f32 / m as f32;
    image::imageops::resize(
        &img,
        ((img.width() as f32 * s) as u32).max(1),
        ((img.height() as f32 * s) as u32).max(1),
        image::imageops::FilterType::Triangle,
    )
}

/// The photos without near-duplicates of earlier ones (pHash similarity ≥ 0.8, i.e. ≤ 6 of 64
/// bits differ): the wallpaper packages ship each picture at up to 12 resolutions, and a
/// database with several copies of an original would make its ground truth ambiguous.
pub fn unique_photos(paths: &[PathBuf]) -> Vec<PathBuf> {
    let hashes: Vec<Option<Vec<f32>>> = paths
        .par_iter()
        .map(|p| load_rgb(p).ok().map(|i| super::descriptor::phash(&i)))
        .collect();
    let mut kept: Vec<usize> = Vec::new();
    for (i, h) in hashes.iter().enumerate() {
        let Some(h) = h else { continue };
        if kept
            .iter()
            .all(|&k| super::simd::dot(h, hashes[k].as_ref().unwrap()) < 0.8)
        {
            kept.push(i);
        }
    }
    kept.into_iter().map(|i| paths[i].clone()).collect()
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchSummary {
    #[serde(serialize_with = "crate::files::lossy_path")]
    pub out: PathBuf,
    /// Photos found, and those kept as the database (near-duplicates dropped).
    pub photos: usize,
    pub database: usize,
    pub originals: usize,
    pub queries: usize,
}

/// Build the benchmark in `out`: `database.txt` (every photo), `queries/<family>/NNN.jpg`,
/// `ground_truth.jsonl`. `.complete` is written last.
pub fn make_bench(
    photos: &Path,
    stamps: &Path,
    out: &Path,
    originals: usize,
    seed: u64,
) -> Result<BenchSummary> {
    let all = crate::data::folder::list_images(photos)?;
    let db = unique_photos(&all);
    if db.len() < originals + BACKGROUNDS + 10 {
        return Err(Error::MissingData(format!(
            "{}: {} distinct photos, need more than {} ({originals} originals, {BACKGROUNDS} collage backgrounds, 10 distractors)",
            photos.display(),
            db.len(),
            originals + BACKGROUNDS + 10
        )));
    }
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    let mut order = db.clone();
    order.shuffle(&mut r);
    let orig: Vec<PathBuf> = order[..originals].to_vec();
    // held out of the database: a collage must have exactly one right answer
    let bg_paths: Vec<PathBuf> = order[originals..originals + BACKGROUNDS].to_vec();
    let backgrounds: Vec<RgbImage> = bg_paths
        .par_iter()
        .map(|p| load_rgb(p).map(|i| fit(i, 640)))
        .collect::<Result<_>>()?;
    let database: Vec<&PathBuf> = db.iter().filter(|p| !bg_paths.contains(p)).collect();
    let mut stamp_paths: Vec<PathBuf> = crate::data::folder::list_images(stamps)?
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    stamp_paths.shuffle(&mut r);
    let objects: Vec<RgbaImage> = stamp_paths
        .iter()
        .take(60)
        .filter_map(|p| image::open(p).ok().map(|i| i.to_rgba8()))
        .collect();
    if objects.is_empty() {
        return Err(Error::MissingData(format!(
            "{}: no Tux Paint stamps (run tools/setup.sh data)",
            stamps.display()
        )));
    }
    let material = Material {
        objects,
        backgrounds,
    };
    std::fs::create_dir_all(out).at(out)?;
    let truth: Vec<GroundTruth> = orig
        .par_iter()
        .enumerate()
        .map(|(i, p)| -> Result<Vec<GroundTruth>> {
            let img = load_rgb(p)?;
            let mut v = Vec::new();
            for (f, fam) in FAMILIES.iter().enumerate() {
                let mut rr = ChaCha8Rng::seed_from_u64(seed ^ 0x9e37_79b9);
                rr.set_stream((i * 64 + f) as u64);
                let Attacked {
                    image: a,
                    what,
                    region,
                } = attack(&img, fam, &material, &mut rr);
                let a = fit(a, 512);
                let q = out.join("queries").join(fam).join(format!("{i:04}.jpg"));
                let mut b = Vec::new();
                image::codecs::jpeg::JpegEncoder::new_with_quality(
                    &mut b,
                    if ["jpeg", "strong", "inset_edit", "thumbnail"].contains(fam) {
                        100
                    } else {
                        90
                    },
                )
                .encode_image(&a)
                .map_err(|e| Error::Other(e.to_string()))?;
                write_atomic(&q, &b)?;
                v.push(GroundTruth {
                    query: q,
                    family: fam.to_string(),
                    attack: what,
                    region,
                    original: p.clone(),
                });
            }
            Ok(v)
        })
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .flatten()
        .collect();
    let gt: String = truth
        .iter()
        .map(|t| serde_json::to_string(t).unwrap() + "\n")
        .collect();
    write_atomic(&out.join("ground_truth.jsonl"), gt.as_bytes())?;
    let dbl: String = database
        .iter()
        .map(|p| format!("{}\n", p.display()))
        .collect();
    write_atomic(&out.join("database.txt"), dbl.as_bytes())?;
    write_atomic(&out.join(".complete"), b"ok")?;
    Ok(BenchSummary {
        out: out.to_path_buf(),
        photos: all.len(),
        database: database.len(),
        originals,
        queries: truth.len(),
    })
}

pub fn read_truth(bench: &Path) -> Result<Vec<GroundTruth>> {
    let p = bench.join("ground_truth.jsonl");
    std::fs::read_to_string(&p)
        .at(&p)?
        .lines()
        .map(|l| serde_json::from_str(l).map_err(|e| Error::bad_file(&p, e.to_string())))
        .collect()
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Scores {
    pub queries: usize,
    pub map: f64,
    pub recall_at_1: f64,
    pub recall_at_10: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct EvalReport {
    pub overall: Scores,
    pub micro_ap: f64,
    pub per_family: BTreeMap<String, Scores>,
    /// HNSW vs exact search: mean overlap of the top-10 image lists.
    pub hnsw_recall_at_10: f64,
    /// Of the queries whose copy fills only part of them (inset, collage): the share where
    /// one of the searched windows frames it (IoU ≥ 0.7), and where the window that matched
    /// the right image (when found) does.
    pub region_framed: f64,
    pub region_located: f64,
    /// … and where the verified region of the right image (`verify`) does (IoU ≥ 0.5).
    pub region_verified: f64,
    /// µAP with normalised scores (`Searcher::normalised`; the ranking per query is the same,
    /// the order of pairs across queries is not).
    pub micro_ap_normalised: f64,
    /// The lowest threshold at which the (query, top-10 match) pairs scoring at least it
    /// reach each precision, and the recall there, for raw and normalised scores.
    pub operating_points: Vec<OperatingPoint>,
    /// Precision–recall curves (threshold, precision, recall) for raw and normalised scores.
    #[serde(skip)]
    pub curves: Vec<(String, PrCurve)>,
    /// Search time per query (all windows, merged).
    pub query_ms_p50: f64,
    pub query_ms_p99: f64,
    /// Verification time per query (candidate embedding shared out, token matching).
    pub verify_ms_p50: f64,
    pub verify_ms_p99: f64,
}

/// Points (threshold, precision, recall) of a precision–recall curve, threshold falling.
pub type PrCurve = Vec<(f32, f64, f64)>;

type QueryDescription = (Vec<f32>, Vec<View>);

#[derive(Clone, Debug, Serialize)]
pub struct OperatingPoint {
    pub scores: String,
    pub precision: f64,
    /// `None` when no threshold reaches the precision.
    pub threshold: Option<f32>,
    pub recall: f64,
}

/// The precision–recall curve of the (query, top-10 match) pairs as the threshold falls:
/// (threshold, precision, recall), recall over all queries (one right image each).
pub fn pr_curve(truth: &[GroundTruth], results: &[Vec<Match>]) -> PrCurve {
    let mut pairs: Vec<(f32, bool)> = Vec::new();
    for (t, res) in truth.iter().zip(results) {
        let orig = super::canonical(&t.original);
        pairs.extend(res.iter().take(10).map(|m| (m.rank_key(), m.path == orig)));
    }
    pairs.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut tp = 0usize;
    let n = truth.len().max(1) as f64;
    pairs
        .iter()
        .enumerate()
        .map(|(i, &(s, hit))| {
            tp += hit as usize;
            (s, tp as f64 / (i + 1) as f64, tp as f64 / n)
        })
        .collect()
}

/// The lowest threshold on `curve` from which precision stays at least `p`, and its recall.
pub fn operating_point(curve: &[(f32, f64, f64)], p: f64) -> (Option<f32>, f64) {
    // precision from each point on up must hold: walk down while it does
    let mut best = (None, 0.0);
    let mut min_prec = f64::INFINITY;
    for &(t, prec, rec) in curve {
        min_prec = min_prec.min(prec);
        if min_prec < p {
            break;
        }
        best = (Some(t), rec);
    }
    best
}

/// Score ranked results against the ground truth. `results[i]` are the matches for `truth[i]`.
pub fn score(
    truth: &[GroundTruth],
    results: &[Vec<Match>],
) -> (Scores, f64, BTreeMap<String, Scores>) {
    let mut fam: BTreeMap<String, Vec<(f64, bool, bool)>> = BTreeMap::new();
    let mut pairs: Vec<(f32, bool)> = Vec::new();
    for (t, res) in truth.iter().zip(results) {
        let orig = super::canonical(&t.original);
        let rank = res.iter().position(|m| m.path == orig);
        let ap = rank.map_or(0.0, |r| 1.0 / (r + 1) as f64);
        fam.entry(t.family.clone()).or_default().push((
            ap,
            rank == Some(0),
            rank.is_some_and(|r| r < 10),
        ));
        for m in res.iter().take(10) {
            pairs.push((m.rank_key(), m.path == orig));
        }
    }
    let agg = |v: &[(f64, bool, bool)]| Scores {
        queries: v.len(),
        map: v.iter().map(|x| x.0).sum::<f64>() / v.len().max(1) as f64,
        recall_at_1: v.iter().filter(|x| x.1).count() as f64 / v.len().max(1) as f64,
        recall_at_10: v.iter().filter(|x| x.2).count() as f64 / v.len().max(1) as f64,
    };
    let all: Vec<_> = fam.values().flatten().copied().collect();
    // µAP: all (query, match) pairs ranked by score; positives = one per query
    pairs.sort_by(|a, b| b.0.total_cmp(&a.0));
    let (mut tp, mut ap) = (0usize, 0f64);
    for (i, (_, hit)) in pairs.iter().enumerate() {
        if *hit {
            tp += 1;
            ap += tp as f64 / (i + 1) as f64;
        }
    }
    let micro = ap / truth.len().max(1) as f64;
    (
        agg(&all),
        micro,
        fam.iter().map(|(k, v)| (k.clone(), agg(v))).collect(),
    )
}

/// Intersection over union of two windows.
pub fn view_iou(a: &View, b: &View) -> f32 {
    let ix = ((a[0] + a[2]).min(b[0] + b[2]) - a[0].max(b[0])).max(0.0);
    let iy = ((a[1] + a[3]).min(b[1] + b[3]) - a[1].max(b[1])).max(0.0);
    let inter = ix * iy;
    inter / (a[2] * a[3] + b[2] * b[3] - inter).max(1e-9)
}

/// Run every query of the benchmark against the index at `root` (described as `how` says,
/// ranked by normalised or raw scores) and score it.
pub fn evaluate(
    root: &Path,
    bench: &Path,
    model: Option<&Path>,
    ef: usize,
    how: &super::QueryOptions,
    normalised: bool,
) -> Result<EvalReport> {
    let truth = read_truth(bench)?;
    let ix = super::index::Index::open_with_vectors(root)?;
    let mut d = super::describer_for(
        &ix,
        root,
        model,
        crate::infer::Parallelism::split(how.threads, None),
    )?;
    let paths: Vec<PathBuf> = truth.iter().map(|t| t.query.clone()).collect();
    let s = Searcher::new(&ix).normalised(normalised);
    // per query: its windows' vectors and the windows (None: unreadable), its matches
    let mut vecs: Vec<Option<QueryDescription>> = Vec::with_capacity(paths.len());
    let mut results = Vec::with_capacity(paths.len());
    let (mut times, mut verify_times) = (Vec::new(), Vec::new());
    super::run_queries(&ix, &mut d, &s, &paths, how, (100, ef, -1.0), |r| {
        match r {
            Ok(q) => {
                times.push(q.search_ms);
                verify_times.push(q.verify_ms);
                vecs.push(Some((q.query.vectors, q.query.views)));
                results.push(q.matches);
            }
            Err(_) => {
                vecs.push(None);
                results.push(vec![]);
            }
        }
        Ok(())
    })?;
    // HNSW recall of the whole-image search (the first window)
    let recall = {
        let mut overlap = 0f64;
        for (v, _) in vecs.iter().flatten() {
            let whole = &v[..ix.meta.dim];
            let exact = s.exact(whole, 10, -1.0);
            let top: std::collections::HashSet<u64> =
                s.search(whole, 10, ef, -1.0).iter().map(|x| x.id).collect();
            overlap += exact.iter().filter(|x| top.contains(&x.id)).count() as f64
                / exact.len().max(1) as f64;
        }
        overlap / vecs.iter().flatten().count().max(1) as f64
    };
    // a remote index whose server failed mid-way: its error, not a low recall
    ix.take_remote_error()?;
    // the ranking asked for gives the per-family figures; µAP and the curves are given for
    // both kinds of score (raw: the same matches re-ranked by cosine)
    let (overall, _, per_family) = score(&truth, &results);
    let rescored = |f: &dyn Fn(&[Match]) -> Vec<f32>| -> Vec<Vec<Match>> {
        results
            .iter()
            .map(|res| {
                let mut r: Vec<Match> = res
                    .iter()
                    .zip(f(res))
                    .map(|(m, score)| Match { score, ..m.clone() })
                    .collect();
                r.sort_by(|a, b| b.rank_key().total_cmp(&a.rank_key()).then(a.id.cmp(&b.id)));
                r
            })
            .collect()
    };
    let raw = rescored(&|res| res.iter().map(|m| m.raw).collect());
    let normalised = if normalised {
        results.clone()
    } else {
        rescored(&|res| super::normalise_all(&res.iter().map(|m| m.raw).collect::<Vec<_>>()))
    };
    let micro_ap = score(&truth, &raw).1;
    let micro_ap_normalised = score(&truth, &normalised).1;
    let curves = vec![
        ("raw".to_string(), pr_curve(&truth, &raw)),
        ("normalised".to_string(), pr_curve(&truth, &normalised)),
    ];
    let operating_points = curves
        .iter()
        .flat_map(|(name, c)| {
            [0.9, 0.95, 0.99].map(|p| {
                let (threshold, recall) = operating_point(c, p);
                OperatingPoint {
                    scores: name.clone(),
                    precision: p,
                    threshold,
                    recall,
                }
            })
        })
        .collect();
    let (mut with_region, mut framed, mut located, mut verified) = (0usize, 0, 0, 0);
    for ((t, v), res) in truth.iter().zip(&vecs).zip(&results) {
        let (Some(region), Some((_, views))) = (t.region, v) else {
            continue;
        };
        with_region += 1;
        framed += views.iter().any(|w| view_iou(w, &region) >= 0.7) as usize;
        let orig = super::canonical(&t.original);
        let hit = res.iter().find(|m| m.path == orig);
        located += hit
            .and_then(|m| m.window)
            .is_some_and(|w| view_iou(&w, &region) >= 0.7) as usize;
        verified += hit
            .and_then(|m| m.verification.and_then(|v| v.region))
            .is_some_and(|w| view_iou(&w, &region) >= 0.5) as usize;
    }
    let share = |n: usize| n as f64 / with_region.max(1) as f64;
    times.sort_by(|a, b| a.total_cmp(b));
    verify_times.sort_by(|a, b| a.total_cmp(b));
    let pct = |t: &[f64], p: f64| {
        t.get(((t.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    Ok(EvalReport {
        overall,
        micro_ap,
        per_family,
        hnsw_recall_at_10: recall,
        region_framed: share(framed),
        region_located: share(located),
        region_verified: share(verified),
        micro_ap_normalised,
        operating_points,
        curves,
        query_ms_p50: pct(&times, 0.5),
        query_ms_p99: pct(&times, 0.99),
        verify_ms_p50: pct(&verify_times, 0.5),
        verify_ms_p99: pct(&verify_times, 0.99),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, s: f32) -> Match {
        Match {
            path: PathBuf::from(p),
            score: s,
            raw: s,
            id: 0,
            window: None,
            exact: false,
            verification: None,
        }
    }

    #[test]
    fn scores_on_hand_made_rankings() {
        let t = |q: &str, f: &str, o: &str| GroundTruth {
            query: q.into(),
            family: f.into(),
            attack: String::new(),
            region: None,
            original: o.into(),
        };
        let truth = vec![
            t("q1", "crop", "/nope/a"),
            t("q2", "crop", "/nope/b"),
            t("q3", "jpeg", "/nope/c"),
        ];
        let res = vec![
            vec![m("/nope/a", 0.9), m("/nope/x", 0.5)], // rank 1
            vec![m("/nope/y", 0.8), m("/nope/b", 0.7)], // rank 2
            vec![m("/nope/z", 0.95)],                   // missed
        ];
        let (all, micro, fam) = score(&truth, &res);
        assert!((all.map - (1.0 + 0.5 + 0.0) / 3.0).abs() < 1e-9);
        assert!((all.recall_at_1 - 1.0 / 3.0).abs() < 1e-9);
        assert!((all.recall_at_10 - 2.0 / 3.0).abs() < 1e-9);
        assert!((fam["crop"].map - 0.75).abs() < 1e-9 && fam["jpeg"].map == 0.0);
        // pairs by score: z(0.95,-) a(0.9,+) y(0.8,-) b(0.7,+) x(0.5,-): AP = (1/2 + 2/4) / 3
        assert!((micro - (0.5 + 0.5) / 3.0).abs() < 1e-9, "{micro}");
    }

    #[test]
    fn attacks_produce_images_of_every_family() {
        // texture (a checkerboard over a gradient), so blur and the colour changes show
        let img = RgbImage::from_fn(200, 150, |x, y| {
            let c = if (x / 7 + y / 5) % 2 == 0 { 60 } else { 0 };
            Rgb([x as u8 / 2 + c, y as u8 + c, 100 + c])
        });
        let obj = RgbaImage::from_pixel(30, 30, image::Rgba([255, 0, 0, 200]));
        let bg = RgbImage::from_fn(300, 220, |x, y| Rgb([(x % 256) as u8, 30, (y % 256) as u8]));
        let material = Material {
            objects: vec![obj],
            backgrounds: vec![bg],
        };
        let mut r = ChaCha8Rng::seed_from_u64(1);
        for f in FAMILIES {
            let Attacked { image: a, what, .. } = attack(&img, f, &material, &mut r);
            assert!(a.width() >= 8 && a.height() >= 8 && !what.is_empty(), "{f}");
            let resized = [
                "crop",
                "rotate90",
                "border",
                "strong",
                "inset",
                "inset_edit",
                "collage",
                "thumbnail",
            ];
            if !resized.contains(f) {
                assert_eq!(a.dimensions(), img.dimensions(), "{f}");
                assert!(a != img, "{f} changed nothing");
            }
        }
    }

    #[test]
    fn insets_and_collages_hold_the_original_small() {
        // a flat original on a flat background: its pixels show where it was pasted
        let img = RgbImage::from_pixel(400, 300, Rgb([250, 10, 10]));
        let bg = RgbImage::from_pixel(600, 400, Rgb([10, 10, 250]));
        let material = Material {
            objects: vec![],
            backgrounds: vec![bg],
        };
        for seed in 0..20 {
            let mut r = ChaCha8Rng::seed_from_u64(seed);
            for f in ["inset", "collage"] {
                let a = attack(&img, f, &material, &mut r);
                let (im, what) = (&a.image, &a.what);
                let is_red = |p: &Rgb<u8>| p.0[0] > 200 && p.0[2] < 60;
                let red = im.pixels().filter(|p| is_red(p)).count();
                let share = red as f32 / (im.width() * im.height()) as f32;
                let (lo, hi) = if f == "inset" {
                    (0.08, 0.31)
                } else {
                    (0.09, 0.34)
                };
                assert!(
                    (lo..hi).contains(&share),
                    "{f} {what}: original covers {share}"
                );
                // the recorded region is where the red pixels are
                let v = a.region.expect("region");
                let (w, h) = (im.width() as f32, im.height() as f32);
                let inside = |x: u32, y: u32| {
                    let (x, y) = (x as f32 + 0.5, y as f32 + 0.5);
                    x >= v[0] * w && x < (v[0] + v[2]) * w && y >= v[1] * h && y < (v[1] + v[3]) * h
                };
                let red_inside = im
                    .enumerate_pixels()
                    .filter(|(x, y, p)| is_red(p) && inside(*x, *y))
                    .count();
                assert_eq!(red_inside, red, "{f} {what}: region {v:?}");
                assert!(
                    (v[2] * v[3] - share).abs() < 0.01,
                    "{f}: region {v:?} vs {share}"
                );
            }
            let t = attack(&img, "thumbnail", &material, &mut r);
            let d = t.image.dimensions();
            assert!(d.0.max(d.1) <= 96 && d.0 >= 36, "{}: {d:?}", t.what);
        }
    }
}
