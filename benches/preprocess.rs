//! Preprocessing cost per image: JPEG decode (+ EXIF) → resize/crop → normalise to the model's
//! 224×224 CHW fp32, the exact path ehm-classify/ehm-segment/ehm-retrieve run per image.
//! `cargo bench --bench preprocess`
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ehm::data::image_io::decode_rgb;
use ehm::data::Preprocess;
use std::path::Path;

/// A photo-like JPEG (smooth gradients plus texture) of `w × h` pixels.
fn jpeg(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        let t = ((x * 7 + y * 13) % 31) as u8;
        image::Rgb([
            (x * 255 / w) as u8 ^ t,
            (y * 255 / h) as u8,
            ((x + y) % 256) as u8,
        ])
    });
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 85)
        .encode_image(&img)
        .unwrap();
    out
}

fn bench(c: &mut Criterion) {
    let pre = Preprocess::imagenet(224);
    let mut g = c.benchmark_group("decode_resize_normalise_224");
    g.throughput(Throughput::Elements(1));
    for (w, h) in [(256u32, 256u32), (640, 480), (1024, 768), (2048, 1536)] {
        let bytes = jpeg(w, h);
        let mut out = vec![0f32; pre.tensor_len()];
        g.bench_with_input(
            BenchmarkId::from_parameter(format!("{w}x{h}")),
            &bytes,
            |b, bytes| {
                b.iter(|| {
                    let img = decode_rgb(bytes, Path::new("bench.jpg")).unwrap();
                    pre.eval_into(&img, &mut out);
                })
            },
        );
        let img = decode_rgb(&bytes, Path::new("bench.jpg")).unwrap();
        g.bench_with_input(
            BenchmarkId::new("resize_normalise_only", format!("{w}x{h}")),
            &img,
            |b, img| b.iter(|| pre.eval_into(img, &mut out)),
        );
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
