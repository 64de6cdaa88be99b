#!/usr/bin/env bash
# HNSW: our index's graph (retrieval::hnsw, benches/hnsw.rs) vs Python hnswlib on the same clustered
# unit vectors (N × DIM, M, ef_construction), same run: build time (all threads), single-thread
# queries/s (one query at a time) and recall@10 vs exact search per ef. Prints a table with the
# queries/s ratio at each ef, and how many indexed rows a search for their own vector misses.
# Usage: benches/hnsw_speed.sh   (N=50000 DIM=384 Q=1000 M=16 EFC=200)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-50000}; DIM=${DIM:-384}; Q=${Q:-1000}; M=${M:-16}; EFC=${EFC:-200}
tools/setup.sh pydeps >&2
PY=.cache/venv/bin/python
$PY -c "import hnswlib" 2>/dev/null || .cache/venv/bin/pip install -q hnswlib==0.8.0 >&2
OUT=$PWD/runs/hnsw_speed; mkdir -p "$OUT"  # absolute: cargo runs the bench in crates/ehm-core
cargo bench -p ehm-core --bench hnsw -- "$OUT/vectors.f32" "$N" "$DIM" "$Q" "$M" "$EFC" 16 32 64 128 > "$OUT/ehm.jsonl"
$PY benches/py/hnswlib_ref.py "$OUT/vectors.f32" "$N" "$DIM" "$Q" "$M" "$EFC" 16 32 64 128 > "$OUT/hnswlib.jsonl"
python3 - "$OUT/ehm.jsonl" "$OUT/hnswlib.jsonl" <<'PY'
import json, sys
a = [json.loads(l) for l in open(sys.argv[1])]
b = {r["ef"]: r for r in map(json.loads, open(sys.argv[2]))}
print(f'N={a[0]["n"]} dim={a[0]["dim"]} M={a[0]["m"]} efC={a[0]["ef_construction"]}; build: ehm {a[0]["build_s"]:.1f} s, hnswlib {b[a[0]["ef"]]["build_s"]:.1f} s')
print(f'rows a search for their own vector misses (ef 64): ehm {a[0]["unfound_at_ef64"]}, hnswlib {b[a[0]["ef"]]["unfound_at_ef64"]}')
print(f'{"ef":>5} {"ehm q/s":>10} {"ehm R@10":>9} {"hnswlib q/s":>12} {"hnswlib R@10":>13} {"q/s ratio":>10}')
for r in a:
    h = b[r["ef"]]
    print(f'{r["ef"]:>5} {r["queries_per_s"]:>10.0f} {r["recall_at_10"]:>9.4f} {h["queries_per_s"]:>12.0f} {h["recall_at_10"]:>13.4f} {r["queries_per_s"]/h["queries_per_s"]:>9.2f}x')
PY
