#!/usr/bin/env bash
# Measures the shipped models (models/shipped/) through the tools, as a user runs them:
# the Fashion-MNIST classifier's top-1 with ehm-classify on a fixed 1,000-image subset of the
# test set, and the photo embedder's retrieval scores with ehm-retrieve on the benchmark of
# benches/retrieval_bench.sh (built here if missing).  Usage: benches/shipped_models.sh [OUTDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/shipped}
tools/setup.sh all >&2
cargo build --release --bins >&2
T=./target/release
mkdir -p "$OUT"
rm -rf "$OUT/fmnist1000"
$T/ehm-train dump-images --data fashion-mnist:test --limit 1000 -o "$OUT/fmnist1000" >&2
$T/ehm-classify -m models/shipped/fmnist_tiny_classify.onnx --format jsonl --top-k 1 "$OUT/fmnist1000" \
  | python3 -c '
import json, re, sys
n = right = 0
for line in sys.stdin:
    d = json.loads(line); n += 1
    truth = re.match(r".*/\d+_(.*)\.png$", d["path"]).group(1)
    right += truth == d["top"][0]["label"].replace("/", "-").replace(" ", "-")
print(f"fmnist_tiny_classify: top-1 {100 * right / n:.1f} % on {n} Fashion-MNIST test images (ehm-classify)")'
B=runs/retrieval_bench/data
[ -f "$B/.complete" ] || $T/ehm-retrieve make-bench -o "$B" --originals 100 >&2
rm -rf "$OUT/index"
$T/ehm-retrieve index -i "$OUT/index" -m models/shipped/photos64_tiny_embed.onnx - < "$B/database.txt" >&2
echo "photos64_tiny_embed (regions standard) on the retrieval benchmark:"
$T/ehm-retrieve eval -i "$OUT/index" --bench "$B"
