#!/usr/bin/env bash
# What `--int8` costs on a trained classifier: the demo's Fashion-MNIST linear probe
# (runs/demo/probe, made by tools/demo.sh; PROBE= for another) exported fp32 and --int8, both run
# by ehm-classify on the Fashion-MNIST test set (LIMIT=10000 images): top-1 of each, how often
# their top-1 labels agree, the largest difference of the top-1 probability, and images/s.
# Prints the CPU it ran on (model name; AVX2 / AVX-512 / VNNI flags): int8 kernels differ by CPU.
# Usage: benches/int8_accuracy.sh [OUTDIR]   (PROBE=runs/demo/probe LIMIT=10000 THREADS=2;
# BIN=folder of other ehm binaries to measure, e.g. an older build)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/int8_accuracy}
PROBE=${PROBE:-runs/demo/probe}
LIMIT=${LIMIT:-10000}
THREADS=${THREADS:-2}
[ -f "$PROBE/config.json" ] || { echo "no probe checkpoint at $PROBE: run tools/demo.sh first (or set PROBE=)" >&2; exit 1; }
tools/setup.sh all >&2
cargo build --release --bins >&2
T=${BIN:-./target/release}
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'); flags: $(grep -m1 -o -w -E 'avx2|avx512f|avx512bw|avx512_vnni|avx_vnni' /proc/cpuinfo | sort -u | tr '\n' ' ')" 
mkdir -p "$OUT"
[ -f "$OUT/images/.done$LIMIT" ] || {
  rm -rf "$OUT/images"
  $T/ehm-train dump-images --data fashion-mnist:test --limit "$LIMIT" -o "$OUT/images" >&2
  touch "$OUT/images/.done$LIMIT"
}
for w in fp32 int8; do
  flag=(); [ $w = int8 ] && flag=(--int8)
  $T/ehm-export onnx "$PROBE" --task classify "${flag[@]}" -o "$OUT/$w.onnx" >&2
  t0=$(date +%s.%N)
  $T/ehm-classify -m "$OUT/$w.onnx" --threads "$THREADS" --format jsonl --top-k 1 "$OUT/images" > "$OUT/$w.jsonl"
  t1=$(date +%s.%N)
  python3 -c "import sys; print(f'{(float(sys.argv[2]) - float(sys.argv[1])):.3f}')" "$t0" "$t1" > "$OUT/$w.seconds"
done
python3 - "$OUT" <<'PY'
import json, os, re, sys
out = sys.argv[1]
def load(w):
    rows = {}
    for line in open(f"{out}/{w}.jsonl"):
        d = json.loads(line)
        rows[d["path"]] = (d["top"][0]["label"], d["top"][0]["probability"])
    return rows
a, b = load("fp32"), load("int8")
truth = {p: re.match(r".*/\d+_(.*)\.png$", p).group(1) for p in a}
norm = lambda l: l.replace("/", "-").replace(" ", "-")
n = len(a)
top1 = {w: 100 * sum(norm(r[p][0]) == truth[p] for p in r) / n for w, r in (("fp32", a), ("int8", b))}
agree = 100 * sum(a[p][0] == b[p][0] for p in a) / n
dp = max(abs(a[p][1] - b[p][1]) for p in a if a[p][0] == b[p][0])
secs = {w: float(open(f"{out}/{w}.seconds").read()) for w in ("fp32", "int8")}
size = {w: os.path.getsize(f"{out}/{w}.onnx") / 1e6 for w in ("fp32", "int8")}
print(f"{'weights':<8} {'file MB':>8} {'top-1':>7} {'img/s':>8}")
for w in ("fp32", "int8"):
    print(f"{w:<8} {size[w]:>8.1f} {top1[w]:>6.2f}% {n / secs[w]:>8.0f}")
print(f"{n} Fashion-MNIST test images; top-1 labels agree on {agree:.2f} %; "
      f"largest top-1 probability difference where they agree {dp:.4f}")
PY
