//! HNSW speed and recall: our index's graph (`retrieval::hnsw`, built exactly as `ehm-retrieve
//! index` builds it, then searched by `FlatGraph`) on clustered unit vectors; prints one JSON
//! line per ef with build time, single-thread queries/s and recall@10 against exact search,
//! and how many of the indexed rows a search for their own vector (ef 64) does not find.
//! `benches/hnsw_speed.sh` runs it next to Python hnswlib on the same vectors (written to the
//! file given as argument; cargo runs benches in the package folder, so give an absolute
//! path). Builds from ehm-core alone (no libtorch):
//! `cargo bench -p ehm-core --bench hnsw -- OUT.f32 [N] [DIM] [QUERIES] [M] [EF_CONSTRUCTION] [EF…]`
use ehm_core::retrieval::graph::Scratch;
use ehm_core::retrieval::hnsw::{build_hnsw, HnswParams};
use ehm_core::retrieval::simd::dot;
use rand::{Rng, SeedableRng};
use std::io::Write;

fn unit(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= n);
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let out = args.first().cloned().unwrap_or_else(|| {
        let p = std::env::temp_dir().join("hnsw_vectors.f32");
        p.to_string_lossy().into_owned()
    });
    let num = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (n, dim, nq, m, efc) = (
        num(1, 50_000),
        num(2, 384),
        num(3, 1000),
        num(4, 16),
        num(5, 200),
    );
    let efs: Vec<usize> = if args.len() > 6 {
        args[6..].iter().filter_map(|s| s.parse().ok()).collect()
    } else {
        vec![16, 32, 64, 128]
    };
    // clustered data: 500 centres, points = centre + noise, unit length (like image embeddings)
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let centres: Vec<Vec<f32>> = (0..500)
        .map(|_| (0..dim).map(|_| r.random::<f32>() - 0.5).collect())
        .collect();
    let draw = |r: &mut rand_chacha::ChaCha8Rng| {
        let c = &centres[r.random_range(0..centres.len())];
        let mut v: Vec<f32> = c
            .iter()
            .map(|x| x + 0.35 * (r.random::<f32>() - 0.5))
            .collect();
        unit(&mut v);
        v
    };
    let data: Vec<f32> = (0..n).flat_map(|_| draw(&mut r)).collect();
    let queries: Vec<f32> = (0..nq).flat_map(|_| draw(&mut r)).collect();
    let mut f = std::io::BufWriter::new(std::fs::File::create(&out).unwrap());
    for v in data.iter().chain(&queries) {
        f.write_all(&v.to_le_bytes()).unwrap();
    }
    drop(f);
    // exact top-10
    let truth: Vec<Vec<usize>> = queries
        .chunks(dim)
        .map(|q| {
            let mut s: Vec<(f32, usize)> = data
                .chunks(dim)
                .enumerate()
                .map(|(i, v)| (dot(q, v), i))
                .collect();
            s.select_nth_unstable_by(10, |a, b| b.0.total_cmp(&a.0));
            s[..10].iter().map(|x| x.1).collect()
        })
        .collect();
    // build time includes the copy into the flat, breadth-first-renumbered graph
    let t0 = std::time::Instant::now();
    let flat = build_hnsw(
        &data,
        dim,
        &HnswParams {
            m,
            ef_construction: efc,
            ef_search: 64,
        },
    );
    let build_s = t0.elapsed().as_secs_f64();
    // the vectors in the graph's node order, as an index stores them
    let table = flat.node_ordered(|r| &data[r * dim..(r + 1) * dim]);
    let mut scratch = Scratch::new(n);
    // a row the graph cannot lead to: parallel builds that link a node before its lists are
    // set leave small islands of these (not timed)
    let unfound = (0..n)
        .filter(|&r| {
            let v = &data[r * dim..(r + 1) * dim];
            flat.search(&table, v, 1, 64, &|_| true, &mut scratch)[0].0 != r
        })
        .count();
    for ef in efs {
        let t0 = std::time::Instant::now();
        let mut hit = 0;
        for (q, t) in queries.chunks(dim).zip(&truth) {
            let res = flat.search(&table, q, 10, ef, &|_| true, &mut scratch);
            hit += res.iter().filter(|(r, _)| t.contains(r)).count();
        }
        let secs = t0.elapsed().as_secs_f64();
        println!(
            "{}",
            serde_json::json!({"impl": "ehm (retrieval::hnsw)", "n": n, "dim": dim, "m": m, "ef_construction": efc,
                "build_s": build_s, "threads_build": rayon::current_num_threads(), "ef": ef,
                "queries_per_s": nq as f64 / secs, "recall_at_10": hit as f64 / (10 * nq) as f64,
                "unfound_at_ef64": unfound})
        );
    }
}
