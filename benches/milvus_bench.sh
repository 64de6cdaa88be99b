#!/usr/bin/env bash
# The same retrieval benchmark through both backends: the local HNSW index and a Milvus 2.3.5
# standalone server on loopback (`ehm-retrieve milvus-server`, tools/setup.sh milvus). The
# shipped embedder, standard regions, the benchmark of `ehm-retrieve make-bench`; per backend:
# index images/s (database.txt), eval mAP / µAP / recall@1 (query windows QUERY_REGIONS), search
# latency p50/p99 per query (all its windows), and the search's recall@10 against an exact
# search over the same vectors. Prints one table; the JSON of each run stays in OUTDIR.
# Usage: benches/milvus_bench.sh [OUTDIR]   (ORIGINALS=50 THREADS=2 QUERY_REGIONS="none auto")
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/milvus_bench}
ORIGINALS=${ORIGINALS:-50}
THREADS=${THREADS:-2}
QUERY_REGIONS=${QUERY_REGIONS:-none auto}
tools/setup.sh data >&2
tools/setup.sh milvus >&2
cargo build --release -p ehm-core --bins >&2
R=./target/release/ehm-retrieve
M=models/shipped/photos64_tiny_embed.onnx
mkdir -p "$OUT"
[ -f "$OUT/data/.complete" ] || $R make-bench -o "$OUT/data" --originals "$ORIGINALS" >&2
rm -rf "$OUT/server" "$OUT/local"
$R milvus-server --dir "$OUT/server" > "$OUT/server.uri" 2> "$OUT/server.log" &
SRV=$!
trap 'kill $SRV 2>/dev/null; wait $SRV 2>/dev/null || true' EXIT
for _ in $(seq 1 240); do [ -s "$OUT/server.uri" ] && break; kill -0 $SRV || { cat "$OUT/server.log" >&2; exit 1; }; sleep 0.5; done
URI="$(head -n1 "$OUT/server.uri")/bench"
for b in local milvus; do
  if [ $b = local ]; then ix="$OUT/local"; else ix="$URI"; fi
  $R index -i "$ix" -m "$M" --threads "$THREADS" --json - < "$OUT/data/database.txt" > "$OUT/$b.index.json"
  for q in $QUERY_REGIONS; do
    $R eval -i "$ix" --bench "$OUT/data" --threads "$THREADS" --query-regions "$q" --json > "$OUT/$b.eval.$q.json"
  done
done
python3 - "$OUT" $QUERY_REGIONS <<'PY'
import json, sys
out, qs = sys.argv[1], sys.argv[2:]
print(f"{'backend':8} {'query':6} {'mAP':>6} {'µAP':>6} {'R@1':>6} {'index img/s':>11} {'p50 ms':>7} {'p99 ms':>7} {'recall@10 vs exact':>18}")
for b in ("local", "milvus"):
    ix = json.load(open(f"{out}/{b}.index.json"))
    for q in qs:
        e = json.load(open(f"{out}/{b}.eval.{q}.json"))
        o = e["overall"]
        print(f"{b:8} {q:6} {o['map']:6.3f} {e['micro_ap']:6.3f} {o['recall_at_1']:6.3f} {ix['images_per_s']:11.1f} "
              f"{e['query_ms_p50']:7.2f} {e['query_ms_p99']:7.2f} {e['hnsw_recall_at_10']:18.4f}")
# the local index's bytes per vector and per image, from its files (what it holds in memory)
import os
g = os.path.join(out, "local", open(os.path.join(out, "local", "CURRENT")).read().strip())
m = json.load(open(os.path.join(g, "index.json")))
size = lambda f: os.path.getsize(os.path.join(g, f))
n = m["vectors"]
print(f"local index: {n} vectors of {m['dim']}: vectors.f32 {size('vectors.f32') / n:.1f} B, graph.bin "
      f"{size('graph.bin') / n:.1f} B per vector; items.jsonl {size('items.jsonl') / m['items']:.1f} B per image")
PY
