//! Hierarchy build + mask sampling on CPU: batch 256 at N = 64 (32 px / patch 4) and
//! N = 196 (224 px / patch 16), against random masking as the floor.
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use ehm::config::{EhmConfig, MaskingKind};
use ehm::masking::{Grid, MaskSampler};
use rand::{Rng, SeedableRng};

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("masks_batch256");
    g.sample_size(10);
    for side in [8usize, 14] {
        let n = side * side;
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let aff: Vec<f32> = (0..256 * n * n).map(|_| r.random()).collect();
        for kind in [MaskingKind::Random, MaskingKind::Block, MaskingKind::Ehm] {
            let p = MaskSampler {
                kind,
                grid: Grid::square(side),
                mask_ratio: 0.75,
                ehm: EhmConfig::default(),
                seed: 1,
            };
            g.bench_with_input(BenchmarkId::new(kind.to_string(), n), &n, |b, _| {
                b.iter(|| p.sample(256, 0.5, 3, Some(&aff)))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
