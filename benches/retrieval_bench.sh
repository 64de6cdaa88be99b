#!/usr/bin/env bash
# Partial-duplicate retrieval benchmark (Copydays-style, built from the registry photos by
# `ehm-retrieve make-bench`): pHash vs our embed models from `random` and `ehm` pretraining of
# vit_tiny_p8_photos64, each with and without regional views. Prints one table (mAP, µAP,
# recall@1/@10, a few attack families, index images/s, query latency, HNSW recall@10 vs exact).
# Usage: benches/retrieval_bench.sh [OUTDIR]   (EPOCHS=20 THREADS=2 ORIGINALS=100)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/retrieval_bench}
EPOCHS=${EPOCHS:-20}
THREADS=${THREADS:-2}
ORIGINALS=${ORIGINALS:-100}
tools/setup.sh all >&2
cargo build --release --bins >&2
R=./target/release/ehm-retrieve
mkdir -p "$OUT"
[ -f "$OUT/data/.complete" ] || $R make-bench -o "$OUT/data" --originals "$ORIGINALS" >&2
for m in random ehm; do
  if [ ! -f "$OUT/$m.onnx" ]; then
    ./target/release/ehm-train pretrain --model vit_tiny_p8_photos64 --masking "$m" --epochs "$EPOCHS" \
      --knn-every -1 --out "$OUT/pretrain_$m" --no-progress --json > "$OUT/pretrain_$m.json"
    ./target/release/ehm-export onnx "$OUT/pretrain_$m" --task embed -o "$OUT/$m.onnx" >&2
  fi
done
: > "$OUT/results.jsonl"
for cfg in phash:none phash:standard random:none random:standard ehm:none ehm:standard; do
  d=${cfg%%:*}; reg=${cfg##*:}; ix="$OUT/index_${d}_${reg}"
  rm -rf "$ix"
  if [ "$d" = phash ]; then desc=(--descriptor phash); else desc=(-m "$OUT/$d.onnx"); fi
  $R index -i "$ix" "${desc[@]}" --regions "$reg" --threads "$THREADS" --json - < "$OUT/data/database.txt" > "$ix.build.json"
  $R eval -i "$ix" --bench "$OUT/data" --threads "$THREADS" --json > "$ix.eval.json"
  python3 - "$d" "$reg" "$ix.build.json" "$ix.eval.json" >> "$OUT/results.jsonl" <<'PY'
import json, sys
d, reg, b, e = sys.argv[1:]
b, e = json.load(open(b)), json.load(open(e))
print(json.dumps({"descriptor": d, "regions": reg, "index_images_per_s": b["images_per_s"], **e}))
PY
done
python3 benches/py/retrieval_table.py "$OUT/results.jsonl" "$OUT/table.md"
