//! Readers against real set-up data and against broken files made here.
use ehm::data::image_io::{decode_rgb, load_rgb};
use ehm::data::{self, Dataset};
use std::path::Path;

fn png_bytes(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 7]));
    let mut v = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut v), image::ImageFormat::Png)
        .unwrap();
    v
}

fn jpeg_bytes(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, _| {
        image::Rgb([if x < w / 2 { 250 } else { 5 }, 100, 100])
    });
    let mut v = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut v), image::ImageFormat::Jpeg)
        .unwrap();
    v
}

#[test]
fn broken_images_give_clear_errors() {
    let d = tempfile::tempdir().unwrap();
    let jpg = jpeg_bytes(64, 48);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("zero.jpg", vec![]),
        ("text.png", b"hello, I am not an image".to_vec()),
        ("truncated.jpg", jpg[..jpg.len() / 3].to_vec()),
        ("truncated.png", png_bytes(40, 40)[..60].to_vec()),
    ];
    for (name, bytes) in cases {
        let p = d.path().join(name);
        std::fs::write(&p, &bytes).unwrap();
        let e = load_rgb(&p).unwrap_err().to_string();
        assert!(e.contains(name), "{name}: {e}");
        assert!(!e.contains('\n'), "one line: {e}");
    }
    assert!(load_rgb(&d.path().join("missing.png"))
        .unwrap_err()
        .to_string()
        .contains("missing.png"));
}

#[test]
fn huge_declared_size_is_refused_without_allocating() {
    // A valid PNG whose header claims 30000×30000 pixels.
    let mut png = png_bytes(4, 4);
    // IHDR data starts at byte 16: width, height (big-endian), then CRC over type+data.
    png[16..20].copy_from_slice(&30000u32.to_be_bytes());
    png[20..24].copy_from_slice(&30000u32.to_be_bytes());
    let crc = crc32fast::hash(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    let e = decode_rgb(&png, Path::new("huge.png"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("huge.png")
            && (e.contains("limit") || e.contains("Limit") || e.contains("large")),
        "{e}"
    );
}

#[test]
fn exif_orientation_is_applied() {
    // JPEG 4:2 with an EXIF APP1 segment saying "rotate 90° clockwise" (orientation 6).
    let jpg = jpeg_bytes(64, 32);
    let mut tiff = b"MM\x00\x2a\x00\x00\x00\x08".to_vec();
    tiff.extend_from_slice(&1u16.to_be_bytes()); // one IFD entry
    tiff.extend_from_slice(&0x0112u16.to_be_bytes()); // Orientation
    tiff.extend_from_slice(&3u16.to_be_bytes()); // SHORT
    tiff.extend_from_slice(&1u32.to_be_bytes());
    tiff.extend_from_slice(&[0, 6, 0, 0]);
    tiff.extend_from_slice(&0u32.to_be_bytes());
    let mut app1 = b"Exif\x00\x00".to_vec();
    app1.extend(tiff);
    let mut out = jpg[..2].to_vec();
    out.extend_from_slice(&[0xFF, 0xE1]);
    out.extend_from_slice(&((app1.len() + 2) as u16).to_be_bytes());
    out.extend(app1);
    out.extend_from_slice(&jpg[2..]);
    let img = decode_rgb(&out, Path::new("rotated.jpg")).unwrap();
    assert_eq!(
        img.dimensions(),
        (32, 64),
        "EXIF rotation must swap the sides"
    );
    // The bright left half ends up on top after a 90° clockwise turn.
    assert!(img.get_pixel(16, 5).0[0] > 200 && img.get_pixel(16, 58).0[0] < 60);
}

fn setup_data_present() -> bool {
    data::fashion_mnist_dir().exists()
}

#[test]
fn real_fashion_mnist_test_split() {
    assert!(
        setup_data_present(),
        "run tools/setup.sh data first (the test command does)"
    );
    let ds = data::fashion_mnist(&data::fashion_mnist_dir(), "test").unwrap();
    assert_eq!(ds.len(), 10_000);
    let mut counts = [0usize; 10];
    for i in 0..ds.len() {
        counts[ds.label(i).unwrap()] += 1;
    }
    assert!(counts.iter().all(|&c| c == 1000), "{counts:?}");
    assert_eq!(ds.image(0).unwrap().dimensions(), (28, 28));
}

#[test]
fn real_gcompris_bundles_and_photo_collection() {
    let cache = ehm::files::cache_dir();
    let rcc = cache.join("data/gcompris-qt-data/usr/share/gcompris-qt/rcc");
    assert!(rcc.exists(), "run tools/setup.sh data first");
    let mut jpegs = 0;
    for e in std::fs::read_dir(&rcc).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "rcc") {
            let (entries, _) = ehm::data::rcc::read_rcc(&p).unwrap_or_else(|e| panic!("{e}"));
            jpegs += entries.iter().filter(|e| e.path.ends_with(".webp")).count();
        }
    }
    assert!(
        jpegs > 500,
        "only {jpegs} WebP images in the GCompris bundles"
    );
    let photos = ehm::data::photos::collect(&cache).unwrap();
    let ds = ehm::data::folder::ImageFolder::open(&photos).unwrap();
    assert!(ds.len() > 200, "{} photos", ds.len());
    let img = ds.image(0).unwrap();
    assert!(img.width().min(img.height()) >= ehm::data::photos::MIN_SIDE);
}
