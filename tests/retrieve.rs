//! ehm-retrieve end to end: index → query finds an exact copy at rank 1; re-indexing adds only
//! new or changed files; remove hides an image, compact keeps the rest; a truncated or foreign
//! index file and a model other than the index's are clear errors; a half-built generation
//! leaves the live index usable; dedup groups copies and writes its HTML report; pHash goes
//! through the same interface.
mod common;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn retrieve() -> Command {
    Command::new(common::tool("ehm-retrieve"))
}

fn ok(o: Output) -> Output {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    o
}

/// Distinct synthetic "photos": smooth colour fields with a few random discs each.
fn write_images(dir: &Path, n: usize) -> Vec<PathBuf> {
    use rand::{Rng, SeedableRng};
    std::fs::create_dir_all(dir).unwrap();
    (0..n)
        .map(|i| {
            let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(i as u64 + 11);
            let (a, b, c) = (
                r.random_range(0..255u32),
                r.random_range(0..255u32),
                r.random_range(1..5u32),
            );
            let discs: Vec<(i32, i32, i32, [u8; 3])> = (0..5)
                .map(|_| {
                    (
                        r.random_range(0..96),
                        r.random_range(0..80),
                        r.random_range(6..20),
                        [r.random(), r.random(), r.random()],
                    )
                })
                .collect();
            let img = image::RgbImage::from_fn(96, 80, |x, y| {
                for &(cx, cy, rad, col) in &discs {
                    let (dx, dy) = (x as i32 - cx, y as i32 - cy);
                    if dx * dx + dy * dy < rad * rad {
                        return image::Rgb(col);
                    }
                }
                image::Rgb([
                    ((a + x * c) % 256) as u8,
                    ((b + y * c) % 256) as u8,
                    ((x + y) * 2 % 256) as u8,
                ])
            });
            let p = dir.join(format!("photo{i}.png"));
            img.save(&p).unwrap();
            p
        })
        .collect()
}

fn query(index: &Path, q: &Path, extra: &[&str]) -> Vec<serde_json::Value> {
    let o = ok(retrieve()
        .arg("query")
        .arg("-i")
        .arg(index)
        .args(["--format", "jsonl"])
        .args(extra)
        .arg(q)
        .output()
        .unwrap());
    let line: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(line["query"].as_str().unwrap(), q.display().to_string());
    line["matches"].as_array().unwrap().clone()
}

fn export_embed(ckpt: &Path, out: &Path) {
    ok(Command::new(common::tool("ehm-export"))
        .arg("onnx")
        .arg(ckpt)
        .args(["--task", "embed", "-o"])
        .arg(out)
        .output()
        .unwrap());
}

#[test]
fn index_query_remove_compact_and_refusals() {
    let d = tempfile::tempdir().unwrap();
    let run = common::shared_micro().run.clone();
    let model = d.path().join("embed.onnx");
    export_embed(&run, &model);
    let photos = write_images(&d.path().join("photos"), 8);
    let ix = d.path().join("index");
    let o = ok(retrieve()
        .arg("index")
        .arg("-i")
        .arg(&ix)
        .arg("-m")
        .arg(&model)
        .arg("--json")
        .arg(d.path().join("photos"))
        .output()
        .unwrap());
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (
            s["added"].as_u64(),
            s["items"].as_u64(),
            s["vectors"].as_u64()
        ),
        (Some(8), Some(8), Some(48))
    );

    // an exact copy (other path, other format) finds its original at rank 1
    let copy = d.path().join("copy_of_3.jpg");
    image::open(&photos[3])
        .unwrap()
        .to_rgb8()
        .save(&copy)
        .unwrap();
    let m = query(&ix, &copy, &["-k", "3"]);
    assert_eq!(
        m[0]["path"].as_str().unwrap(),
        photos[3].canonicalize().unwrap().display().to_string()
    );
    assert!(m[0]["score"].as_f64().unwrap() > 0.95, "{m:?}");

    // re-indexing: nothing new; a changed file replaces its entry
    let o = ok(retrieve()
        .arg("index")
        .arg("-i")
        .arg(&ix)
        .arg("--json")
        .arg(d.path().join("photos"))
        .output()
        .unwrap());
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (s["added"].as_u64(), s["unchanged"].as_u64()),
        (Some(0), Some(8))
    );
    image::open(&photos[5])
        .unwrap()
        .fliph()
        .save(&photos[5])
        .unwrap();
    let o = ok(retrieve()
        .arg("index")
        .arg("-i")
        .arg(&ix)
        .arg("--json")
        .arg(d.path().join("photos"))
        .output()
        .unwrap());
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (
            s["replaced"].as_u64(),
            s["unchanged"].as_u64(),
            s["items"].as_u64()
        ),
        (Some(1), Some(7), Some(8))
    );
    // after an incremental update (rows appended, graph rebuilt, vectors put in its node order)
    // every photo still finds itself first
    for p in &photos {
        let m = query(&ix, p, &["-k", "1"]);
        assert_eq!(
            m[0]["path"].as_str().unwrap(),
            p.canonicalize().unwrap().display().to_string()
        );
    }
    // a generation holds its vectors once: the table and our graph file, no other copy
    let gen = ix.join(std::fs::read_to_string(ix.join("CURRENT")).unwrap().trim());
    let mut files: Vec<String> = std::fs::read_dir(&gen)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(
        files,
        ["graph.bin", "index.json", "items.jsonl", "vectors.f32"]
    );
    let graph_bytes = std::fs::metadata(gen.join("graph.bin")).unwrap().len();
    let vec_bytes = std::fs::metadata(gen.join("vectors.f32")).unwrap().len();
    assert!(graph_bytes < vec_bytes, "{graph_bytes} vs {vec_bytes}");

    // remove hides photo 3; compact drops the deleted entries and keeps the rest findable
    ok(retrieve()
        .arg("remove")
        .arg("-i")
        .arg(&ix)
        .arg(&photos[3])
        .output()
        .unwrap());
    let m = query(&ix, &copy, &["-k", "8"]);
    assert!(
        m.iter()
            .all(|x| !x["path"].as_str().unwrap().ends_with("photo3.png")),
        "{m:?}"
    );
    assert_eq!(m.len(), 7);
    ok(retrieve()
        .arg("compact")
        .arg("-i")
        .arg(&ix)
        .output()
        .unwrap());
    let info: serde_json::Value = serde_json::from_slice(
        &ok(retrieve().arg("info").arg("-i").arg(&ix).output().unwrap()).stdout,
    )
    .unwrap();
    assert_eq!(
        (
            info["items"].as_u64(),
            info["deleted"].as_u64(),
            info["vectors"].as_u64()
        ),
        (Some(7), Some(0), Some(42))
    );
    let m = query(&ix, &photos[6], &["-k", "1"]);
    assert!(m[0]["path"].as_str().unwrap().ends_with("photo6.png"));

    // a half-built generation (interrupted run) does not disturb the live one, and is swept
    std::fs::create_dir_all(ix.join("gen-999999")).unwrap();
    std::fs::write(ix.join("gen-999999/vectors.f32"), b"junk").unwrap();
    let m = query(&ix, &photos[6], &["-k", "1"]);
    assert!(m[0]["path"].as_str().unwrap().ends_with("photo6.png"));
    ok(retrieve()
        .arg("index")
        .arg("-i")
        .arg(&ix)
        .arg(&photos[3])
        .output()
        .unwrap());
    assert!(!ix.join("gen-999999").exists());

    // another model's vectors are refused
    let other = d.path().join("other.onnx");
    ok(Command::new(env!("CARGO_BIN_EXE_ehm-train"))
        .args(["init", "--model"])
        .arg(common::write_model(d.path()))
        .arg("-o")
        .arg(d.path().join("init"))
        .output()
        .unwrap());
    export_embed(&d.path().join("init"), &other);
    let o = retrieve()
        .arg("index")
        .arg("-i")
        .arg(&ix)
        .arg("-m")
        .arg(&other)
        .arg(&copy)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("another model") && e.lines().count() == 1, "{e}");

    // damaged or foreign index files: exit 2 and one line that says what is wrong
    let refused = |index: &Path, says: &[&str]| {
        let o = retrieve()
            .arg("query")
            .arg("-i")
            .arg(index)
            .arg(&copy)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2));
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(
            says.iter().all(|s| e.contains(s)) && e.lines().count() == 1,
            "{e}"
        );
    };
    let gen = std::fs::read_to_string(ix.join("CURRENT")).unwrap();
    let vec_file = ix.join(gen.trim()).join("vectors.f32");
    let bytes = std::fs::read(&vec_file).unwrap();
    std::fs::write(&vec_file, &bytes[..bytes.len() / 2]).unwrap();
    refused(&ix, &["vectors.f32", "checksum"]);
    // an index of the previous format (no checksum of index.json) is refused with what to do
    let meta_file = ix.join(gen.trim()).join("index.json");
    let meta = std::fs::read_to_string(&meta_file).unwrap();
    let older = meta.replace("ehm-index/3", "ehm-index/2");
    assert_ne!(older, meta);
    std::fs::write(&meta_file, older).unwrap();
    refused(&ix, &["ehm-index/2", "index the images again"]);
    std::fs::write(&meta_file, b"{\"hello\": 1}").unwrap();
    refused(&ix, &["not an ehm index"]);
    refused(&d.path().join("nowhere"), &["no index here"]);
}

#[test]
fn phash_index_and_dedup_report() {
    let d = tempfile::tempdir().unwrap();
    let photos = write_images(&d.path().join("photos"), 6);
    // two near-copies of photo 1 inside the collection: recompressed, and resized
    let img = image::open(&photos[1]).unwrap().to_rgb8();
    let mut jpg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpg, 30)
        .encode_image(&img)
        .unwrap();
    std::fs::write(d.path().join("photos/dup_jpeg.jpg"), jpg).unwrap();
    image::imageops::resize(&img, 150, 125, image::imageops::FilterType::Triangle)
        .save(d.path().join("photos/dup_big.png"))
        .unwrap();
    let ix = d.path().join("ph");
    ok(retrieve()
        .arg("index")
        .arg("-i")
        .arg(&ix)
        .args(["--descriptor", "phash", "--regions", "none"])
        .arg(d.path().join("photos"))
        .output()
        .unwrap());
    let m = query(&ix, &photos[4], &["-k", "1"]);
    assert!(m[0]["path"].as_str().unwrap().ends_with("photo4.png"));
    assert!((m[0]["score"].as_f64().unwrap() - 1.0).abs() < 1e-6);
    let report = d.path().join("dups.html");
    let o = ok(retrieve()
        .arg("dedup")
        .arg("-i")
        .arg(&ix)
        .args(["--threshold", "0.8", "--format", "jsonl", "--report"])
        .arg(&report)
        .output()
        .unwrap());
    let groups: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(groups.len(), 1, "{groups:?}");
    let names: Vec<String> = groups[0]["group"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            m["path"]
                .as_str()
                .unwrap()
                .rsplit('/')
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(names.len(), 3);
    for n in ["photo1.png", "dup_jpeg.jpg", "dup_big.png"] {
        assert!(names.contains(&n.to_string()), "{names:?}");
    }
    let html = std::fs::read_to_string(&report).unwrap();
    assert_eq!(html.matches("data:image/jpeg;base64,").count(), 3);
    // a query image that is not there: reported, exit 1
    let o = retrieve()
        .arg("query")
        .arg("-i")
        .arg(&ix)
        .arg(d.path().join("missing.png"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
}

/// The registry's WebP photos (GCompris), in listing order.
fn registry_webp_photos() -> Vec<PathBuf> {
    let photos = ehm::data::photos::collect(&ehm::files::cache_dir()).unwrap();
    ehm::data::folder::list_images(&photos)
        .unwrap()
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "webp"))
        .collect()
}

/// An index over `db` (linked into `dir/db`) with the shipped embedder, standard regions:
/// its path, `dir/idx`.
fn index_with_shipped_embedder(dir: &Path, db: &[PathBuf]) -> PathBuf {
    let dbdir = dir.join("db");
    std::fs::create_dir_all(&dbdir).unwrap();
    for p in db {
        std::os::unix::fs::symlink(p, dbdir.join(p.file_name().unwrap())).unwrap();
    }
    let index = dir.join("idx");
    let model =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("models/shipped/photos64_tiny_embed.onnx");
    ok(retrieve()
        .args(["index", "-i"])
        .arg(&index)
        .arg("-m")
        .arg(&model)
        .arg(&dbdir)
        .output()
        .unwrap());
    index
}

/// The shipped embedder given its `patch_tokens` output (`ehm-export patch-tokens`), in `dir`.
fn shipped_with_patch_tokens(dir: &Path) -> PathBuf {
    let out = dir.join("shipped_patch_tokens.onnx");
    ok(Command::new(common::tool("ehm-export"))
        .arg("patch-tokens")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("models/shipped/photos64_tiny_embed.onnx"))
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap());
    out
}

/// How many query images in `qdir` (named by their number in `db`) find their photo of `db`
/// at rank 1, all queried in one `ehm-retrieve query` call with `extra` arguments.
fn rank1_hits(index: &Path, qdir: &Path, db: &[PathBuf], extra: &[&str]) -> usize {
    let o = ok(retrieve()
        .arg("query")
        .arg("-i")
        .arg(index)
        .args(["-k", "1", "--format", "jsonl"])
        .args(extra)
        .arg(qdir)
        .output()
        .unwrap());
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let i: usize = Path::new(v["query"].as_str().unwrap())
                .file_stem()
                .unwrap()
                .to_string_lossy()
                .parse()
                .unwrap();
            v["matches"][0]["path"]
                .as_str()
                .is_some_and(|p| Path::new(p).file_name() == db[i].file_name())
        })
        .count()
}

#[test]
fn query_windows_find_photos_pasted_into_collages() {
    // the partial duplicate the whole-query descriptor misses: a registry photo pasted at
    // 12–30 % of the area into an unrelated photo (not in the index). With the shipped
    // embedder and the index's standard regions, the query's own windows must put clearly
    // more originals at rank 1 than the whole query does.
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};
    let mut all = registry_webp_photos();
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    all.shuffle(&mut r);
    let (db, backgrounds) = (&all[..60], &all[60..80]);
    let d = tempfile::tempdir().unwrap();
    let index = index_with_shipped_embedder(d.path(), db);
    let qdir = d.path().join("collages");
    std::fs::create_dir_all(&qdir).unwrap();
    let mut pasted = Vec::new(); // where each photo went: x, y, w, h in pixels of 640 × 480
    for (i, orig) in db.iter().take(30).enumerate() {
        let o = ehm::data::image_io::load_rgb(orig).unwrap();
        let bg = ehm::data::image_io::load_rgb(&backgrounds[i % backgrounds.len()]).unwrap();
        let mut canvas =
            image::imageops::resize(&bg, 640, 480, image::imageops::FilterType::Triangle);
        let area: f64 = r.random_range(0.12..0.30);
        let s = (area * 640.0 * 480.0 / (o.width() * o.height()) as f64).sqrt();
        let (w, h) = (
            (o.width() as f64 * s) as u32,
            (o.height() as f64 * s) as u32,
        );
        let inset = image::imageops::resize(&o, w, h, image::imageops::FilterType::Triangle);
        let (x, y) = (
            r.random_range(0..=640 - w.min(640)),
            r.random_range(0..=480 - h.min(480)),
        );
        image::imageops::overlay(&mut canvas, &inset, x as i64, y as i64);
        canvas.save(qdir.join(format!("{i:02}.png"))).unwrap();
        pasted.push((x as f64, y as f64, w.min(640) as f64, h.min(480) as f64));
    }
    // rank-1 hits over the 30 collages, all queried in one call
    let hits = |extra: &[&str]| rank1_hits(&index, &qdir, db, extra);
    let (whole, windows) = (hits(&["--query-regions", "none"]), hits(&[]));
    eprintln!("rank 1 of 30 collages: whole query {whole}, with query windows (auto) {windows}");
    assert!(windows >= whole + 10, "whole {whole}, windows {windows}");
    // local verification (the same embedding plus patch tokens: the index accepts the
    // upgraded file) lifts no fewer originals to rank 1, and where it verifies the original
    // it says where the pasted photo sits
    let model = shipped_with_patch_tokens(d.path());
    let m = model.to_str().unwrap();
    let verified = hits(&["-m", m, "--verify", "10"]);
    eprintln!("rank 1 of 30 collages with --verify 10: {verified}");
    assert!(
        verified >= windows,
        "windows {windows}, verified {verified}"
    );
    let (mut located, mut found) = (0, 0);
    for (i, (x, y, w, h)) in pasted.iter().enumerate() {
        let q = qdir.join(format!("{i:02}.png"));
        let top = query(&index, &q, &["-m", m, "--verify", "10", "-k", "1"]);
        if Path::new(top[0]["path"].as_str().unwrap()).file_name() != db[i].file_name() {
            continue;
        }
        found += 1;
        let Some(r) = top[0]["verification"]["region"].as_array() else {
            continue;
        };
        let r: Vec<f64> = r.iter().map(|v| v.as_f64().unwrap()).collect();
        let truth = [x / 640.0, y / 480.0, w / 640.0, h / 480.0];
        let ix = ((r[0] + r[2]).min(truth[0] + truth[2]) - r[0].max(truth[0])).max(0.0);
        let iy = ((r[1] + r[3]).min(truth[1] + truth[3]) - r[1].max(truth[1])).max(0.0);
        let inter = ix * iy;
        let iou = inter / (r[2] * r[3] + truth[2] * truth[3] - inter);
        located += (iou >= 0.3) as usize;
    }
    eprintln!("verified regions on the pasted photo (IoU ≥ 0.3): {located} of {found} found");
    assert!(found > 0 && located * 2 >= found, "{located} of {found}");
    // photos that are not in the index: their best match scores below dedup's default
    // threshold (normalised scores), so a thresholded query or dedup does not pair them
    let o = ok(retrieve()
        .arg("query")
        .arg("-i")
        .arg(&index)
        .args(["-k", "1", "--format", "jsonl"])
        .args(backgrounds)
        .output()
        .unwrap());
    let threshold = ehm::retrieval::default_dedup_threshold(
        ehm::retrieval::descriptor::DescriptorKind::Embed,
        true,
    );
    let mut top = Vec::new();
    for l in String::from_utf8_lossy(&o.stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        top.push(v["matches"][0]["score"].as_f64().unwrap());
    }
    assert_eq!(top.len(), backgrounds.len());
    let worst = top.iter().cloned().fold(f64::MIN, f64::max);
    eprintln!(
        "best normalised score of 20 photos not in the index: {worst:.3} (threshold {threshold})"
    );
    assert!(worst < threshold as f64, "{top:?}");
}

#[test]
fn tiny_thumbnails_are_found_by_their_phash() {
    // the copy a learned descriptor loses: a 40–64 px grey JPEG thumbnail (pHash reads luma
    // only; the shipped embedder loses most grey copies). The index keeps every image's pHash;
    // with --exact-copies phash (the default) nearly every thumbnail finds its photo at rank 1,
    // whatever the embedding says
    use rand::{Rng, SeedableRng};
    let mut all = registry_webp_photos();
    all.sort();
    let db: Vec<PathBuf> = all.iter().step_by(7).take(60).cloned().collect();
    let d = tempfile::tempdir().unwrap();
    let index = index_with_shipped_embedder(d.path(), &db);
    let qdir = d.path().join("thumbs");
    std::fs::create_dir_all(&qdir).unwrap();
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    for (i, p) in db.iter().enumerate().take(30) {
        let img = ehm::data::image_io::load_rgb(p).unwrap();
        let side = r.random_range(40..=64) as f32;
        let s = side / img.width().max(img.height()) as f32;
        let grey = image::DynamicImage::ImageLuma8(image::imageops::grayscale(&img)).to_rgb8();
        let t = image::imageops::resize(
            &grey,
            (img.width() as f32 * s).max(1.0) as u32,
            (img.height() as f32 * s).max(1.0) as u32,
            image::imageops::FilterType::Triangle,
        );
        let mut jpg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpg, r.random_range(40..=75))
            .encode_image(&t)
            .unwrap();
        std::fs::write(qdir.join(format!("{i:02}.jpg")), jpg).unwrap();
    }
    let hits = |extra: &[&str]| {
        let mut args = vec!["--query-regions", "none"];
        args.extend_from_slice(extra);
        rank1_hits(&index, &qdir, &db, &args)
    };
    let (embed_only, fused) = (hits(&["--exact-copies", "off"]), hits(&[]));
    eprintln!("rank 1 of 30 thumbnails: embedding alone {embed_only}, with pHash {fused}");
    // measured 2026-12-03: embedding alone 6, with pHash 29 (one 40-px thumbnail is 9+ bits off)
    assert!(
        fused >= 28,
        "with pHash {fused}, embedding alone {embed_only}"
    );
    assert!(
        fused >= embed_only + 15,
        "with pHash {fused}, embedding alone {embed_only}"
    );
}

#[test]
fn verification_never_drops_a_true_exact_copy() {
    // exact copies (the photo re-encoded as JPEG, and the file itself) of 30 indexed photos,
    // queried by the embedding alone (no pHash evidence): each is at rank 1 without
    // verification, and verifying the 10 best of each — which can only raise scores, and may
    // raise look-alikes — keeps it there, with its geometry found
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let mut all = registry_webp_photos();
    all.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(4));
    let db = &all[..60];
    let d = tempfile::tempdir().unwrap();
    let index = index_with_shipped_embedder(d.path(), db);
    let qdir = d.path().join("copies");
    std::fs::create_dir_all(&qdir).unwrap();
    for (i, p) in db.iter().enumerate().take(30) {
        if i % 2 == 0 {
            let img = ehm::data::image_io::load_rgb(p).unwrap();
            let mut jpg = Vec::new();
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpg, 85)
                .encode_image(&img)
                .unwrap();
            std::fs::write(qdir.join(format!("{i:02}.jpg")), jpg).unwrap();
        } else {
            std::fs::copy(p, qdir.join(format!("{i:02}.webp"))).unwrap();
        }
    }
    let model = shipped_with_patch_tokens(d.path());
    let m = model.to_str().unwrap();
    let plain = ["--exact-copies", "off", "--query-regions", "none"];
    let base = rank1_hits(&index, &qdir, db, &plain);
    let mut with_verify = plain.to_vec();
    with_verify.extend(["-m", m, "--verify", "10"]);
    let verified = rank1_hits(&index, &qdir, db, &with_verify);
    eprintln!("exact copies at rank 1 of 30: embedding {base}, verified {verified}");
    assert_eq!(
        base, 30,
        "the premise: the embedding finds every exact copy"
    );
    let o = ok(retrieve()
        .arg("query")
        .arg("-i")
        .arg(&index)
        .args(["-k", "2", "--format", "jsonl"])
        .args(&with_verify)
        .arg(&qdir)
        .output()
        .unwrap());
    for l in String::from_utf8_lossy(&o.stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        let q = Path::new(v["query"].as_str().unwrap());
        let i: usize = q.file_stem().unwrap().to_string_lossy().parse().unwrap();
        let top = Path::new(v["matches"][0]["path"].as_str().unwrap());
        assert_eq!(
            top.file_name(),
            db[i].file_name(),
            "verification dropped an exact copy: {v}"
        );
        let ver = &v["matches"][0]["verification"];
        let inliers = ver["inliers"].as_u64().unwrap();
        // the shipped embedder's grid is 8 × 8 patches
        assert!(inliers >= 32, "{}: {ver}", v["query"]);
        assert!(
            v["matches"][0]["score"].as_f64().unwrap() >= ver["global_score"].as_f64().unwrap()
        );
    }
}

#[test]
fn patch_tokens_upgrade_keeps_the_embedding_and_refuses_twice() {
    let d = tempfile::tempdir().unwrap();
    let shipped =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("models/shipped/photos64_tiny_embed.onnx");
    let up = shipped_with_patch_tokens(d.path());
    let c = ehm::contract::ModelContract::read(&up).unwrap();
    assert_eq!(c.outputs, ["embedding", "patch_tokens"]);
    assert_eq!(c.same_embedding_as.len(), 1);
    // same pixels through both files: the embedding is bit for bit the same, the tokens are
    // 8 × 8 unit vectors of the backbone's width
    let s = 64usize;
    let px: Vec<f32> = (0..2 * 3 * s * s)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    let mut a = ehm::infer::OrtModel::open(&shipped, 1).unwrap();
    let mut b = ehm::infer::OrtModel::open(&up, 1).unwrap();
    let ea = a.run(&px, 2, "embedding").unwrap();
    let out = b
        .run_outputs(&px, 2, &["embedding", "patch_tokens"])
        .unwrap();
    assert_eq!(ea.1, out[0].1);
    assert_eq!(out[1].0, [2, 64, 192]);
    for t in out[1].1.chunks(192) {
        let n: f32 = t.iter().map(|x| x * x).sum();
        assert!((n - 1.0).abs() < 1e-4, "{n}");
    }
    // a second upgrade, and an upgrade of a non-embed model, are refused with the reason
    let refused = |src: &Path, why: &str| {
        let o = Command::new(common::tool("ehm-export"))
            .arg("patch-tokens")
            .arg(src)
            .arg("-o")
            .arg(d.path().join("refused.onnx"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(why), "{err}");
    };
    refused(&up, "already has a patch_tokens output");
    refused(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("models/shipped/fmnist_tiny_classify.onnx"),
        "only embed models get patch tokens",
    );
}

/// A ViT-like graph that runs at any input size, as another framework exports it (DINOv2
/// interpolates its position embedding to the input; this one has none): patch Conv →
/// tokens, the mean token in the class slot, a nonlinearity. Declared input 3×16×16.
fn write_any_size_vit(path: &Path) {
    use ehm::export::graph::{attr_int, attr_ints, Graph};
    use ehm::onnx::{self, type_proto, ModelProto, TensorShapeProto, TypeProto, ValueInfoProto};
    use prost::Message;
    let (d, p) = (8i64, 4i64);
    let mut g = Graph::new(false);
    let w: Vec<f32> = (0..d * 3 * p * p)
        .map(|i| ((i * 37 % 23) as f32 - 11.0) / 40.0)
        .collect();
    let w = g.init_f32("patch.weight", &[d, 3, p, p], &w);
    let b = g.init_f32(
        "patch.bias",
        &[d],
        &(0..d).map(|i| i as f32 / 10.0).collect::<Vec<_>>(),
    );
    let x = g.op(
        "Conv",
        &["input_image", &w, &b],
        vec![attr_ints("strides", &[p, p])],
        "patch",
    );
    let shape = g.init_i64("flat", &[3], &[0, d, -1]);
    let x = g.op("Reshape", &[&x, &shape], vec![], "patch");
    let x = g.op(
        "Transpose",
        &[&x],
        vec![attr_ints("perm", &[0, 2, 1])],
        "patch",
    );
    let x = g.op("Tanh", &[&x], vec![], "patch");
    let cls = g.op("ReduceMean", &[&x], vec![attr_ints("axes", &[1])], "cls");
    g.op_named("Concat", &[&cls, &x], vec![attr_int("axis", 1)], "/tokens");
    let vi = |name: &str, dims: &[Option<i64>]| ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(1),
                shape: Some(TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|v| onnx::tensor_shape_proto::Dimension {
                            value: Some(match v {
                                Some(v) => onnx::tensor_shape_proto::dimension::Value::DimValue(*v),
                                None => {
                                    onnx::tensor_shape_proto::dimension::Value::DimParam("n".into())
                                }
                            }),
                            ..Default::default()
                        })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    };
    let m = ModelProto {
        ir_version: Some(8),
        opset_import: vec![onnx::OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(17),
        }],
        graph: Some(onnx::GraphProto {
            name: Some("any_size_vit".into()),
            node: g.nodes,
            initializer: g.initializers,
            input: vec![vi("input_image", &[None, Some(3), Some(32), Some(32)])],
            output: vec![vi("/tokens", &[None, None, Some(d)])],
            ..Default::default()
        }),
        ..Default::default()
    };
    std::fs::write(path, m.encode_to_vec()).unwrap();
}

/// An index keeps one pHash per image, so indexing hashes the whole image only; a query
/// hashes every window (each may frame an exact copy). Either way a hash is the pHash of the
/// view's pixels.
#[test]
fn an_index_hashes_the_whole_image_and_a_query_every_window() {
    use ehm::infer::Parallelism;
    use ehm::pipeline::{crop_view, HashViews, ViewSize, FULL};
    use ehm::retrieval::descriptor::{phash_bits, views, DescribeOptions, Describer, Regions};
    let d = tempfile::tempdir().unwrap();
    let model = d.path().join("embed.onnx");
    export_embed(&common::shared_micro().run, &model);
    let images = write_images(&d.path().join("db"), 3);
    let mut describer = Describer::embed(&model, Parallelism::single(1)).unwrap();
    for hashes in [HashViews::Whole, HashViews::Every] {
        let how = DescribeOptions {
            views: views(Regions::Standard),
            extra_views: None,
            hashes: Some(hashes),
            patch_tokens: false,
            view_size: ViewSize::Input,
            rescaled_whole: None,
            fit_rounding: Default::default(),
            batch: 2,
            threads: 1,
            progress: false,
        };
        let mut seen = 0;
        describer
            .describe(&images, &how, |r| {
                let r = r.unwrap();
                let img = image::open(&r.path).unwrap().to_rgb8();
                let hashed = match hashes {
                    HashViews::Whole => 1,
                    HashViews::Every => r.views.len(),
                };
                let want: Vec<u64> = r.views[..hashed]
                    .iter()
                    .map(|v| match *v == FULL {
                        true => phash_bits(&img),
                        false => phash_bits(&crop_view(&img, v)),
                    })
                    .collect();
                assert_eq!(r.views.len(), 6);
                assert_eq!(r.hashes, want, "{hashes:?} {}", r.path.display());
                seen += 1;
                Ok(())
            })
            .unwrap();
        assert_eq!(seen, 3);
    }
}

/// A model whose input size is open runs each call on a session made for that exact shape
/// (ONNX Runtime can then fold shape-dependent parts, such as a position-embedding resize, into
/// constants): the outputs equal the general session's for every size and image count, in
/// parallel lanes too, and past the cap of exact sessions the general one takes over.
#[test]
fn exact_shape_sessions_give_the_general_sessions_outputs() {
    use ehm::infer::{OrtModel, Parallelism};
    let d = tempfile::tempdir().unwrap();
    let foreign = d.path().join("foreign.onnx");
    write_any_size_vit(&foreign);
    let model = d.path().join("any.onnx");
    ok(Command::new(common::tool("ehm-export"))
        .arg("import")
        .arg(&foreign)
        .args([
            "--tokens",
            "/tokens",
            "--patch-size",
            "4",
            "--image-size",
            "32",
            "-o",
        ])
        .arg(&model)
        .output()
        .unwrap());
    let par = Parallelism::split(2, None);
    let mut exact = OrtModel::open_with(&model, par).unwrap();
    let mut general = OrtModel::open_with(&model, par)
        .unwrap()
        .with_exact_sessions(false);
    assert_eq!(
        exact.contract.input_dim_names[2..],
        [Some("height".to_string()), Some("width".to_string())]
    );
    let mut shapes = 0;
    for s in [8usize, 12, 16, 20, 32] {
        for n in [1usize, 3, 4] {
            let px: Vec<f32> = (0..n * 3 * s * s)
                .map(|i| ((i * 7919 % 251) as f32 / 125.0) - 1.0)
                .collect();
            let want = general
                .run_outputs_at(&px, n, s as u32, &["embedding", "patch_tokens"])
                .unwrap();
            let have = exact
                .run_outputs_at(&px, n, s as u32, &["embedding", "patch_tokens"])
                .unwrap();
            for ((ws, wv), (hs, hv)) in want.iter().zip(&have) {
                assert_eq!(ws, hs, "{n} images of {s}²");
                let diff = common::max_abs_diff(wv, hv);
                assert!(diff < 1e-5, "{n} images of {s}²: {diff}");
            }
            shapes += 1;
        }
    }
    assert_eq!(general.exact_session_count(), 0);
    // two lanes share each call: shapes (⌈n/2⌉, s) and (⌊n/2⌋, s); at most 8 per lane
    let made = exact.exact_session_count();
    assert!(
        made > shapes / 2 && made <= 16,
        "{made} exact sessions for {shapes} shapes"
    );
}

/// A model that runs at any size is adopted with its input size open, and an index runs its
/// regional views at their own size when asked (`--view-size fit`): every view's
/// vector is the model's output for that crop at that size, in the right order across a batch
/// that mixes sizes. A fixed-size model refuses `fit` in one line.
#[test]
fn crops_run_at_their_own_size_on_models_that_take_any_size() {
    use ehm::data::Preprocess;
    use ehm::infer::{OrtModel, Parallelism};
    use ehm::pipeline::{crop_view, fit_size, FitRounding, HashViews, ViewSize, FULL};
    use ehm::retrieval::descriptor::{DescribeOptions, Describer};
    let d = tempfile::tempdir().unwrap();
    let foreign = d.path().join("foreign.onnx");
    write_any_size_vit(&foreign);
    let model = d.path().join("any.onnx");
    let o = ok(Command::new(common::tool("ehm-export"))
        .arg("import")
        .arg(&foreign)
        .args([
            "--tokens",
            "/tokens",
            "--patch-size",
            "4",
            "--image-size",
            "32",
            "-o",
        ])
        .arg(&model)
        .output()
        .unwrap());
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("any multiple of its patch size"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let mut m = OrtModel::open(&model, 1).unwrap();
    assert!(m.contract.any_input_size);
    let px = |s: usize| vec![0.25f32; 3 * s * s];
    let (shape, _) = m
        .run_outputs_at(&px(8), 1, 8, &["embedding"])
        .unwrap()
        .remove(0);
    assert_eq!(shape, vec![1, 16]);
    let e = m
        .run_outputs_at(&px(10), 1, 10, &["embedding"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("patch size 4"), "{e}");

    // every view of every image, batched across images with mixed sizes, against the
    // model run on that one crop at its fitted size
    let images = write_images(&d.path().join("db"), 5);
    let views = vec![
        FULL,
        [0.0, 0.0, 0.6, 0.6],
        [0.5, 0.4, 0.5, 0.6],
        [0.1, 0.2, 0.55, 0.3],
        [0.0, 0.0, 0.9, 0.95],
    ];
    let mut describer = Describer::embed(&model, Parallelism::single(1)).unwrap();
    let pre = m.contract.config.preprocess.clone();
    // the model run on one image at side s, as the reference each view is held to
    let mut embed_at = |img: &image::RgbImage, s: u32| {
        let x = Preprocess {
            image_size: s,
            ..pre.clone()
        }
        .eval(img);
        m.run_outputs_at(&x, 1, s, &["embedding"])
            .unwrap()
            .remove(0)
            .1
    };
    // a 60 % crop of 32² is 19.2 px, 4.8 patches of 4: 5 to the nearest, 4 down
    for (rounding, want_sizes, rescaled) in [
        (FitRounding::Nearest, [32, 20, 16, 16, 28], 20),
        (FitRounding::Down, [32, 16, 16, 16, 28], 16),
    ] {
        let sizes: Vec<u32> = views
            .iter()
            .map(|v| {
                if *v == FULL {
                    32
                } else {
                    fit_size(v, 32, 4, rounding)
                }
            })
            .collect();
        assert_eq!(sizes, want_sizes);
        let how = DescribeOptions {
            views: views.clone(),
            extra_views: None,
            hashes: None,
            patch_tokens: false,
            view_size: ViewSize::Fit,
            rescaled_whole: None,
            fit_rounding: rounding,
            batch: 2,
            threads: 1,
            progress: false,
        };
        let mut got = Vec::new();
        describer
            .describe(&images, &how, |r| {
                got.push(r.unwrap());
                Ok(())
            })
            .unwrap();
        let mut checked = 0;
        for (desc, path) in got.iter().zip(&images) {
            assert_eq!(&desc.path, path);
            let img = image::open(path).unwrap().to_rgb8();
            for (k, (v, &s)) in views.iter().zip(&sizes).enumerate() {
                let part = if *v == FULL {
                    img.clone()
                } else {
                    crop_view(&img, v)
                };
                let want = embed_at(&part, s);
                let have = &desc.vectors[k * 16..(k + 1) * 16];
                let diff = common::max_abs_diff(have, &want);
                assert!(
                    diff < 1e-5,
                    "{rounding:?}: {} view {k} at {s}²: {diff}",
                    path.display()
                );
                checked += 1;
            }
        }
        assert_eq!(checked, 25);

        // a query of a fitted index also runs whole at a 60 % crop's fitted size: one
        // more view, last, whose vector is the whole image's at that size and whose hash is the
        // whole image's
        let query_how = DescribeOptions {
            views: views.clone(),
            hashes: Some(HashViews::Every),
            view_size: ViewSize::Input,
            rescaled_whole: Some(0.6),
            ..how
        };
        let mut queried = Vec::new();
        describer
            .describe(&images[..2], &query_how, |r| {
                queried.push(r.unwrap());
                Ok(())
            })
            .unwrap();
        for q in &queried {
            assert_eq!(q.views.len(), views.len() + 1);
            assert_eq!(q.views[views.len()], FULL);
            assert_eq!(q.hashes.len(), views.len() + 1);
            assert_eq!(q.hashes[views.len()], q.hashes[0]);
            let img = image::open(&q.path).unwrap().to_rgb8();
            let want = embed_at(&img, rescaled);
            let have = &q.vectors[views.len() * 16..];
            let diff = common::max_abs_diff(have, &want);
            assert!(
                diff < 1e-5,
                "{rounding:?}: {}: rescaled whole {diff}",
                q.path.display()
            );
            // the other views are as without it (at the input size)
            let whole = &q.vectors[..16];
            assert!(common::max_abs_diff(whole, &embed_at(&img, 32)) < 1e-5);
        }
    }

    // the index records it; an existing index refuses the other size; a fixed-size model
    // cannot fit
    let ix = d.path().join("ix");
    ok(retrieve()
        .args(["index", "-i"])
        .arg(&ix)
        .arg("-m")
        .arg(&model)
        .args(["--regions", "standard", "--view-size", "fit"])
        .args(&images)
        .output()
        .unwrap());
    let meta = std::fs::read_to_string(ix.join("gen-000001/index.json")).unwrap();
    assert!(meta.contains("\"view_size\": \"fit\""), "{meta}");
    // … with the rule its crops ran under: down, never upsampled
    assert!(meta.contains("\"fit_rounding\": \"down\""), "{meta}");
    let o = retrieve()
        .args(["index", "-i"])
        .arg(&ix)
        .args(["--view-size", "input"])
        .arg(&images[0])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--view-size"), "{err}");
    let run = common::shared_micro().run.clone();
    let fixed = d.path().join("fixed.onnx");
    export_embed(&run, &fixed);
    let o = retrieve()
        .args(["index", "-i"])
        .arg(d.path().join("ix_fixed"))
        .arg("-m")
        .arg(&fixed)
        .args(["--view-size", "fit"])
        .args(&images)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.trim().lines().count() == 1 && err.contains("own input size"),
        "{err}"
    );
    assert!(
        !d.path().join("ix_fixed/CURRENT").exists(),
        "nothing written"
    );
}
