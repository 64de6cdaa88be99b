//! The bad-input battery: what hostile or careless input must not do. Each test here failed
//! before its fix. Writers of an index exclude each other; CSV fields are quoted; non-UTF-8
//! file names survive every tool; a closed stdout ends a tool quietly; an output that is one
//! of the inputs, an impossible size, untrustworthy model metadata, another model than the
//! index's, a hand-edited index, a truncated image, a FIFO or a huge file, bad HNSW
//! parameters and nonsense flag values are each a clear error (or a failed input) before any
//! work; a corrupt first image does not stop pretraining; a `models/` folder in the working
//! directory does not hide the zoo.
mod common;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn shipped(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models/shipped")
        .join(name)
}

fn cmd(tool: &str) -> Command {
    let exe = if tool == "ehm-train" {
        PathBuf::from(env!("CARGO_BIN_EXE_ehm-train"))
    } else {
        common::tool(tool)
    };
    let mut c = Command::new(exe);
    c.env("EHM_DEVICE", "cpu");
    c
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(o: Output) -> Output {
    assert!(o.status.success(), "{}", stderr(&o));
    o
}

/// The run failed with `code`, said something containing `want` on stderr, and did not panic.
fn refused(o: &Output, code: i32, want: &str) {
    let e = stderr(o);
    assert_eq!(o.status.code(), Some(code), "{e}");
    assert!(e.contains(want), "expected '{want}' in: {e}");
    assert!(!e.contains("panicked") && !e.contains("backtrace"), "{e}");
}

/// As `refused`, and the message is one line (our own errors; clap's usage errors add a hint).
fn refused_one_line(o: &Output, code: i32, want: &str) {
    refused(o, code, want);
    assert_eq!(stderr(o).trim().lines().count(), 1, "{}", stderr(o));
}

/// Distinct small photos-like images (colour gradients with a few blocks).
fn write_image(path: &Path, seed: u64, w: u32, h: u32) {
    use rand::{Rng, SeedableRng};
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let (a, b): (u32, u32) = (r.random_range(0..255), r.random_range(1..6));
    let blocks: Vec<(u32, u32, [u8; 3])> = (0..4)
        .map(|_| (r.random_range(0..w), r.random_range(0..h), r.random()))
        .collect();
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        for &(bx, by, c) in &blocks {
            if x.abs_diff(bx) < w / 6 && y.abs_diff(by) < h / 6 {
                return image::Rgb(c);
            }
        }
        image::Rgb([((a + x * b) % 256) as u8, ((y * 3) % 256) as u8, 90])
    });
    img.save(path).unwrap();
}

fn write_images(dir: &Path, prefix: &str, n: usize, seed: u64) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    (0..n)
        .map(|i| {
            let p = dir.join(format!("{prefix}{i}.png"));
            write_image(&p, seed + i as u64, 72, 60);
            p
        })
        .collect()
}

fn index_cmd(ix: &Path, extra: &[&str]) -> Command {
    let mut c = cmd("ehm-retrieve");
    c.arg("index").arg("-i").arg(ix).arg("-m");
    c.arg(shipped("photos64_tiny_embed.onnx")).args(extra);
    c
}

fn info(ix: &Path) -> serde_json::Value {
    let o = ok(cmd("ehm-retrieve")
        .arg("info")
        .arg("-i")
        .arg(ix)
        .output()
        .unwrap());
    serde_json::from_slice(&o.stdout).unwrap()
}

/// Wait for a child at most `limit`; kill it and fail if it takes longer.
fn wait_at_most(mut child: std::process::Child, limit: Duration, what: &str) -> Output {
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > limit {
            child.kill().unwrap();
            panic!("{what} still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn index_writers_exclude_each_other_and_readers_keep_working() {
    let d = tempfile::tempdir().unwrap();
    let ix = d.path().join("index");
    write_images(&d.path().join("base"), "base", 4, 100);
    ok(index_cmd(&ix, &[])
        .arg(d.path().join("base"))
        .output()
        .unwrap());
    let a = write_images(&d.path().join("a"), "a", 5, 200);
    write_images(&d.path().join("b"), "b", 5, 300);

    // another writer holds the index: index, remove and compact refuse at once, exit 2
    let lock = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(ix.join("LOCK"))
        .unwrap();
    lock.lock().unwrap();
    let o = index_cmd(&ix, &[])
        .arg(d.path().join("a"))
        .output()
        .unwrap();
    refused_one_line(&o, 2, "another ehm-retrieve");
    for sub in ["remove", "compact"] {
        let mut c = cmd("ehm-retrieve");
        c.arg(sub).arg("-i").arg(&ix);
        if sub == "remove" {
            c.arg(d.path().join("base/base0.png"));
        }
        refused_one_line(&c.output().unwrap(), 2, "another ehm-retrieve");
    }
    // readers are not blocked by a writer
    let o = ok(cmd("ehm-retrieve")
        .args(["query", "--format", "jsonl", "-i"])
        .arg(&ix)
        .arg(d.path().join("base/base1.png"))
        .output()
        .unwrap());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["matches"][0]["path"]
        .as_str()
        .unwrap()
        .ends_with("base1.png"));
    // --wait waits for the lock instead
    let waiting = index_cmd(&ix, &["--wait"])
        .arg(&a[0])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    drop(lock);
    ok(wait_at_most(
        waiting,
        Duration::from_secs(120),
        "index --wait",
    ));
    assert_eq!(info(&ix)["items"], 5);

    // two writers at once, both waiting: neither one's images are lost
    let spawn = |dir: &str| {
        index_cmd(&ix, &["--wait"])
            .arg(d.path().join(dir))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (x, y) = (spawn("a"), spawn("b"));
    ok(wait_at_most(x, Duration::from_secs(120), "index a"));
    ok(wait_at_most(y, Duration::from_secs(120), "index b"));
    assert_eq!(info(&ix)["items"], 14, "4 + 5 + 5 images");
}

/// Parse CSV output (RFC 4180) with the csv crate: the tools' quoting must round-trip.
fn csv_rows(bytes: &[u8]) -> Vec<Vec<String>> {
    csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(bytes)
        .records()
        .map(|r| r.unwrap().iter().map(String::from).collect())
        .collect()
}

#[test]
fn csv_fields_are_quoted_and_non_utf8_file_names_survive() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("odd");
    std::fs::create_dir_all(&dir).unwrap();
    let names: Vec<&[u8]> = vec![
        b"plain.png",
        b"a,b.png",
        b"say \"hi\".png",
        b"two\nlines.png",
        b"caf\xe9.png", // Latin-1, not UTF-8
    ];
    let paths: Vec<PathBuf> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let p = dir.join(OsStr::from_bytes(n));
            write_image(&p, 500 + i as u64, 72, 60);
            p
        })
        .collect();
    std::fs::copy(&paths[0], dir.join("copy of plain.png")).unwrap();
    let ix = d.path().join("index");
    ok(index_cmd(&ix, &[]).arg(&dir).output().unwrap());
    assert_eq!(info(&ix)["items"], 6);

    let o = ok(cmd("ehm-retrieve")
        .args(["query", "-k", "2", "--format", "csv", "-i"])
        .arg(&ix)
        .args(&paths)
        .output()
        .unwrap());
    let rows = csv_rows(&o.stdout);
    assert_eq!(rows.len(), 2 * paths.len());
    for (q, p) in paths.iter().enumerate() {
        let (r, r2) = (&rows[2 * q], &rows[2 * q + 1]);
        assert_eq!((r.len(), r2.len()), (5, 5), "{r:?}");
        let lossy = p.to_string_lossy();
        assert_eq!((r[0].as_str(), r[1].as_str()), (lossy.as_ref(), "1"));
        // an image finds itself first (plain.png ties with its exact copy)
        assert!(r[2] == lossy || (q == 0 && r2[2] == lossy), "{r:?}");
    }
    let o = ok(cmd("ehm-retrieve")
        .args(["query", "--format", "jsonl", "-i"])
        .arg(&ix)
        .args(&paths)
        .output()
        .unwrap());
    let lines: Vec<serde_json::Value> = String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), paths.len());
    assert_eq!(lines[4]["query"], paths[4].to_string_lossy().as_ref());

    let o = ok(cmd("ehm-retrieve")
        .args(["dedup", "--threshold", "0.99", "--format", "csv", "-i"])
        .arg(&ix)
        .output()
        .unwrap());
    let rows = csv_rows(&o.stdout);
    let group: Vec<&str> = rows.iter().map(|r| r[1].as_str()).collect();
    assert!(group.contains(&paths[0].to_str().unwrap()), "{rows:?}");
    assert!(rows.iter().all(|r| r.len() == 4), "{rows:?}");

    // the non-UTF-8 path is stored losslessly: remove finds it by its bytes
    let o = ok(cmd("ehm-retrieve")
        .arg("remove")
        .arg("-i")
        .arg(&ix)
        .arg(&paths[4])
        .output()
        .unwrap());
    assert!(String::from_utf8_lossy(&o.stdout).contains("marked 1"));
    assert_eq!(info(&ix)["items"], 5);

    // ehm-classify's CSV and JSON lines with the same names
    let classify = |format: &str| {
        ok(cmd("ehm-classify")
            .arg("-m")
            .arg(shipped("fmnist_tiny_classify.onnx"))
            .args(["--top-k", "1", "--format", format])
            .args(&paths)
            .output()
            .unwrap())
    };
    let rows = csv_rows(&classify("csv").stdout);
    let got: Vec<String> = rows.iter().map(|r| r[0].clone()).collect();
    let want: Vec<String> = paths
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    assert_eq!(got, want);
    let o = classify("jsonl");
    assert_eq!(String::from_utf8(o.stdout).unwrap().lines().count(), 5);
}

/// A checkpoint of the micro model (untrained weights; enough for export).
fn micro_checkpoint(dir: &Path) -> PathBuf {
    let model = common::write_model(dir);
    let out = dir.join("ck");
    ok(cmd("ehm-train")
        .arg("init")
        .arg("--model")
        .arg(&model)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap());
    out
}

fn sha(p: &Path) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(std::fs::read(p).unwrap()).to_vec()
}

#[test]
fn export_refuses_to_overwrite_its_input_and_impossible_sizes() {
    let d = tempfile::tempdir().unwrap();
    let ck = micro_checkpoint(d.path());
    for victim in ["checkpoint.safetensors", "config.json"] {
        let before = sha(&ck.join(victim));
        let o = common::export_onnx(&ck, "embed", &[], &ck.join(victim));
        refused_one_line(&o, 1, "is one of the inputs");
        assert_eq!(sha(&ck.join(victim)), before, "{victim} untouched");
    }
    // the same file under another name is still the same file
    let o = common::export_onnx(
        &ck.join("checkpoint.safetensors"),
        "embed",
        &[],
        &d.path().join("ck/../ck/checkpoint.safetensors"),
    );
    refused_one_line(&o, 1, "is one of the inputs");
    // and so is a hard link to it
    let link = d.path().join("linked.safetensors");
    std::fs::hard_link(ck.join("checkpoint.safetensors"), &link).unwrap();
    let o = common::export_onnx(&ck, "embed", &[], &link);
    refused_one_line(&o, 1, "is one of the inputs");
    // import: output = the model it reads
    let m = d.path().join("m.onnx");
    ok(common::export_onnx(&ck, "backbone", &[], &m));
    let before = sha(&m);
    let o = cmd("ehm-export")
        .arg("import")
        .arg(&m)
        .args(["--tokens", "last_hidden_state", "--patch-size", "4"])
        .args(["--image-size", "16", "-o"])
        .arg(&m)
        .output()
        .unwrap();
    refused_one_line(&o, 1, "is one of the inputs");
    assert_eq!(sha(&m), before);

    for size in ["0", "40000", "18"] {
        let out = d.path().join(format!("s{size}.onnx"));
        let t0 = Instant::now();
        let o = common::export_onnx(&ck, "embed", &["--image-size", size], &out);
        refused_one_line(&o, 1, "image size");
        assert!(!out.exists());
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "refused before work"
        );
    }
}

/// A copy of `src` with its `ehm.*` metadata changed by `edit` (key → JSON value).
fn edit_metadata(src: &Path, dst: &Path, edit: impl Fn(&str, &mut serde_json::Value)) {
    use prost::Message;
    let mut m = ehm_core::onnx::ModelProto::decode(&std::fs::read(src).unwrap()[..]).unwrap();
    for p in &mut m.metadata_props {
        let key = p.key.clone().unwrap();
        if let Some(text) = p.value.as_mut() {
            if let Ok(mut v) = serde_json::from_str::<serde_json::Value>(text) {
                edit(&key, &mut v);
                *text = v.to_string();
            }
        }
    }
    std::fs::write(dst, m.encode_to_vec()).unwrap();
}

#[test]
fn model_metadata_is_validated_field_by_field() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("x.png");
    write_image(&img, 1, 40, 40);
    let src = shipped("fmnist_tiny_classify.onnx");
    type Edit = fn(&str, &mut serde_json::Value);
    let cases: [(&str, Edit, &str); 6] = [
        (
            "few_labels",
            |k, v| {
                if k == "ehm.labels" {
                    v.as_array_mut().unwrap().truncate(3)
                }
            },
            "ehm.labels",
        ),
        (
            "crop",
            |k, v| {
                if k == "ehm.config" {
                    v["preprocess"]["crop_pct"] = (-0.5).into()
                }
            },
            "crop_pct",
        ),
        (
            "huge",
            |k, v| {
                if k == "ehm.config" {
                    v["preprocess"]["image_size"] = 100000.into()
                }
            },
            "image_size",
        ),
        (
            "std0",
            |k, v| {
                if k == "ehm.config" {
                    v["preprocess"]["std"] = serde_json::json!([0.0, 0.0, 0.0])
                }
            },
            "std",
        ),
        (
            "patch0",
            |k, v| {
                if k == "ehm.config" {
                    v["patch_size"] = 0.into()
                }
            },
            "patch_size",
        ),
        (
            "size_vs_patch",
            |k, v| {
                if k == "ehm.config" {
                    v["preprocess"]["image_size"] = 30.into()
                }
            },
            "image_size",
        ),
    ];
    for (name, edit, field) in cases {
        let bad = d.path().join(format!("{name}.onnx"));
        edit_metadata(&src, &bad, edit);
        let o = cmd("ehm-classify")
            .arg("-m")
            .arg(&bad)
            .arg(&img)
            .output()
            .unwrap();
        refused_one_line(&o, 2, field);
        assert!(
            stderr(&o).contains(&format!("{name}.onnx")),
            "names the file"
        );
    }
}

#[test]
fn query_refuses_another_model_and_a_hand_edited_index() {
    let d = tempfile::tempdir().unwrap();
    let photos = write_images(&d.path().join("p"), "p", 3, 700);
    let ix = d.path().join("index");
    ok(index_cmd(&ix, &[])
        .arg(d.path().join("p"))
        .output()
        .unwrap());
    // same dimension, other file (other metadata → other sha256)
    let other = d.path().join("other.onnx");
    edit_metadata(&shipped("photos64_tiny_embed.onnx"), &other, |k, v| {
        if k == "ehm.config" {
            v["arch"] = "renamed".into()
        }
    });
    // another dimension altogether
    let ck = micro_checkpoint(d.path());
    let micro = d.path().join("micro.onnx");
    ok(common::export_onnx(&ck, "embed", &[], &micro));
    for m in [&other, &micro] {
        let o = cmd("ehm-retrieve")
            .arg("query")
            .arg("-i")
            .arg(&ix)
            .arg("-m")
            .arg(m)
            .arg(&photos[0])
            .output()
            .unwrap();
        refused_one_line(&o, 2, "another model");
    }
    // a hand-edited index.json is refused by its checksum
    let gen = ix.join(std::fs::read_to_string(ix.join("CURRENT")).unwrap().trim());
    let meta = gen.join("index.json");
    let text = std::fs::read_to_string(&meta).unwrap();
    let edited = text.replace("\"ef_search\": 64", "\"ef_search\": 65");
    assert_ne!(text, edited);
    std::fs::write(&meta, edited).unwrap();
    let o = cmd("ehm-retrieve")
        .arg("query")
        .arg("-i")
        .arg(&ix)
        .arg(&photos[0])
        .output()
        .unwrap();
    refused_one_line(&o, 2, "checksum");
}

#[test]
fn truncated_images_are_failed_inputs() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("in");
    std::fs::create_dir_all(&dir).unwrap();
    // a detailed photo-like JPEG of some tens of kB, and its first 700 bytes
    use rand::{Rng, SeedableRng};
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let noisy = image::RgbImage::from_fn(160, 120, |x, y| {
        image::Rgb([
            (x * 2) as u8 ^ (r.random::<u8>() / 4),
            (y * 2) as u8,
            r.random(),
        ])
    });
    let full = dir.join("full.jpg");
    noisy.save(&full).unwrap();
    let bytes = std::fs::read(&full).unwrap();
    assert!(bytes.len() > 10_000);
    std::fs::write(dir.join("cut.jpg"), &bytes[..700]).unwrap();
    let png = dir.join("full.png");
    noisy.save(&png).unwrap();
    let pbytes = std::fs::read(&png).unwrap();
    std::fs::write(dir.join("cut.png"), &pbytes[..pbytes.len() / 2]).unwrap();
    let o = cmd("ehm-classify")
        .arg("-m")
        .arg(shipped("fmnist_tiny_classify.onnx"))
        .args(["--format", "jsonl"])
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("cut.jpg") && e.contains("truncated"), "{e}");
    assert!(e.contains("cut.png"), "{e}");
    let done: Vec<serde_json::Value> = String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(done.len(), 2, "the two whole files are classified");
    // the index counts it as failed, too
    let o = index_cmd(&d.path().join("ix"), &["--json"])
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (s["added"].as_u64(), s["failed"].as_u64()),
        (Some(2), Some(2))
    );
}

#[test]
fn fifos_and_huge_files_are_refused_without_reading_them() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("in");
    std::fs::create_dir_all(&dir).unwrap();
    write_image(&dir.join("good.png"), 9, 40, 40);
    let fifo = std::ffi::CString::new(dir.join("x.jpg").as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    let big = std::fs::File::create(dir.join("big.jpg")).unwrap();
    big.set_len(3 << 30).unwrap(); // sparse: 3 GB declared, nothing on disk
    let child = cmd("ehm-classify")
        .arg("-m")
        .arg(shipped("fmnist_tiny_classify.onnx"))
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let o = wait_at_most(child, Duration::from_secs(60), "ehm-classify on a FIFO");
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("x.jpg") && e.contains("not a regular file"),
        "{e}"
    );
    assert!(e.contains("big.jpg") && e.contains("--max-file-mb"), "{e}");
    let child = index_cmd(&d.path().join("ix"), &[])
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let o = wait_at_most(
        child,
        Duration::from_secs(60),
        "ehm-retrieve index on a FIFO",
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    // the cap is a flag: a 1.5 MB PNG passes by default and fails under --max-file-mb 1
    use rand::{Rng, SeedableRng};
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let noise = image::RgbImage::from_fn(720, 720, |_, _| image::Rgb(r.random()));
    let heavy = d.path().join("heavy.png");
    noise.save(&heavy).unwrap();
    assert!(std::fs::metadata(&heavy).unwrap().len() > 1 << 20);
    let run = |extra: &[&str]| {
        cmd("ehm-classify")
            .arg("-m")
            .arg(shipped("fmnist_tiny_classify.onnx"))
            .args(extra)
            .arg(&heavy)
            .output()
            .unwrap()
    };
    ok(run(&[]));
    let o = run(&["--max-file-mb", "1"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("larger than"), "{}", stderr(&o));
}

#[test]
fn index_parameters_are_checked_before_any_work() {
    let d = tempfile::tempdir().unwrap();
    write_images(&d.path().join("p"), "p", 3, 900);
    for bad in [
        ["--m", "100000"],
        ["--m", "1"],
        ["--ef-construction", "0"],
        ["--ef-search", "0"],
        ["--batch", "0"],
    ] {
        let ix = d.path().join(format!("ix{}", bad[1]));
        let o = index_cmd(&ix, &bad)
            .arg(d.path().join("p"))
            .output()
            .unwrap();
        refused(&o, 2, bad[0]);
        assert!(
            o.stdout.is_empty(),
            "stdout stays clean: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        assert!(!ix.join("CURRENT").exists(), "nothing written");
    }
    let ix = d.path().join("ix");
    ok(index_cmd(&ix, &[])
        .arg(d.path().join("p"))
        .output()
        .unwrap());
    // settings fixed at creation: the same value is fine, another one is refused
    ok(index_cmd(&ix, &["--m", "16", "--regions", "standard"])
        .arg(d.path().join("p"))
        .output()
        .unwrap());
    for bad in [
        ["--m", "32"],
        ["--regions", "none"],
        ["--descriptor", "phash"],
    ] {
        let o = index_cmd(&ix, &bad)
            .arg(d.path().join("p"))
            .output()
            .unwrap();
        refused_one_line(&o, 2, bad[0]);
    }
    let o = cmd("ehm-retrieve")
        .args(["query", "-k", "0", "-i"])
        .arg(&ix)
        .arg(d.path().join("p/p0.png"))
        .output()
        .unwrap();
    refused(&o, 2, "-k");
}

#[test]
fn nonsense_flag_values_are_refused_up_front() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("x.png");
    write_image(&img, 2, 40, 40);
    let m = shipped("fmnist_tiny_classify.onnx");
    let model = common::write_model(d.path());
    let out = d.path().join("out");
    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        ("ehm-classify", vec!["--top-k", "0"], "--top-k"),
        ("ehm-classify", vec!["--batch", "0"], "--batch"),
        ("ehm-classify", vec!["--threads", "0"], "--threads"),
        ("ehm-segment", vec!["--alpha", "5"], "--alpha"),
        ("ehm-segment", vec!["--alpha", "nan"], "--alpha"),
        ("ehm-segment", vec!["--batch", "0"], "--batch"),
    ];
    for (tool, flags, want) in cases {
        let o = cmd(tool)
            .arg("-m")
            .arg(&m)
            .args(&flags)
            .arg(&img)
            .output()
            .unwrap();
        refused(&o, 2, want);
    }
    let train = |args: &[&str]| cmd("ehm-train").args(args).output().unwrap();
    for (flags, want) in [
        (vec!["--k", "0"], "--k"),
        (vec!["--temperature", "0"], "--temperature"),
        (vec!["--temperature", "nan"], "--temperature"),
    ] {
        let mut a = vec!["knn", "nowhere"];
        a.extend(flags);
        refused(&train(&a), 2, want);
    }
    let model_s = model.to_str().unwrap();
    let out_s = out.to_str().unwrap();
    for (flags, want) in [
        (vec!["--epochs", "0"], "--epochs"),
        (vec!["--epochs", "inf"], "--epochs"),
        (vec!["--blr", "-1"], "--blr"),
        (vec!["--blr", "nan"], "--blr"),
        (vec!["--mask-ratio", "0"], "--mask-ratio"),
        (vec!["--mask-ratio", "1"], "--mask-ratio"),
        (vec!["--batch-size", "0"], "--batch-size"),
    ] {
        let mut a = vec!["pretrain", "--model", model_s, "--out", out_s];
        a.extend(flags);
        refused(&train(&a), 2, want);
        assert!(!out.exists(), "nothing started");
    }
    // a mask ratio of 0 in a zoo file is refused by the config check, one line
    let zero = d.path().join("zero.toml");
    std::fs::write(
        &zero,
        std::fs::read_to_string(&model).unwrap() + "mask_ratio = 0.0\n",
    )
    .unwrap();
    let o = train(&[
        "pretrain",
        "--model",
        zero.to_str().unwrap(),
        "--out",
        out_s,
    ]);
    refused_one_line(&o, 1, "mask_ratio");
    for (flags, want) in [
        (vec!["--lr", "nan"], "--lr"),
        (vec!["--lr", "0"], "--lr"),
        (vec!["--epochs", "0"], "--epochs"),
    ] {
        let mut a = vec!["probe", "nowhere", "-o", out_s];
        a.extend(flags);
        refused(&train(&a), 2, want);
    }
}

#[test]
fn a_closed_stdout_ends_the_tools_quietly() {
    let d = tempfile::tempdir().unwrap();
    let closed = || {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        writer
    };
    let model = common::write_model(d.path());
    let ck = d.path().join("ck");
    let classifier = shipped("fmnist_tiny_classify.onnx");
    let runs: [(&str, [&OsStr; 2]); 2] = [
        ("ehm-train", ["init".as_ref(), "--model".as_ref()]),
        ("ehm-export", ["inspect".as_ref(), classifier.as_os_str()]),
    ];
    for (tool, args) in runs {
        let mut c = cmd(tool);
        c.args(args);
        if tool == "ehm-train" {
            c.arg(&model).arg("-o").arg(&ck);
        }
        let o = c.stdout(closed()).output().unwrap();
        assert_eq!(o.status.code(), Some(0), "{tool}: {}", stderr(&o));
        assert!(!stderr(&o).contains("panicked"), "{tool}: {}", stderr(&o));
    }
    let onnx = d.path().join("e.onnx");
    let o = cmd("ehm-export")
        .arg("onnx")
        .arg(&ck)
        .args(["--task", "embed", "-o"])
        .arg(&onnx)
        .stdout(closed())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(onnx.exists(), "the work is done before the summary");
    common::write_cifar(d.path());
    let o = common::pretrain_cmd(&model, d.path(), &d.path().join("run"))
        .args(["--epochs", "1", "--knn-every", "-1"])
        .stdout(closed())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
}

#[test]
fn a_corrupt_first_image_does_not_stop_pretraining() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("photos");
    write_images(&dir, "img", 40, 1000);
    std::fs::write(dir.join("000_broken.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let model = common::write_model(d.path());
    let o = cmd("ehm-train")
        .args(["pretrain", "--model"])
        .arg(&model)
        .arg("--data")
        .arg(format!("folder:{}", dir.display()))
        .arg("--out")
        .arg(d.path().join("run"))
        .args([
            "--epochs",
            "1",
            "--knn-every",
            "-1",
            "--no-progress",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("000_broken.png"),
        "reported: {}",
        stderr(&o)
    );
    assert!(d.path().join("run/masks.png").exists());
}

#[test]
fn a_models_folder_in_the_working_directory_does_not_hide_the_zoo() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(d.path().join("models")).unwrap();
    std::fs::write(d.path().join("models/notes.txt"), "mine").unwrap();
    let o = cmd("ehm-train")
        .current_dir(d.path())
        .args(["init", "--model", "vit_tiny_p4_fmnist", "-o", "ck"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(d.path().join("ck/checkpoint.safetensors").exists());
}
