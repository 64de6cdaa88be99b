#!/usr/bin/env bash
# End-to-end classification speed on real photos (the 294 GCompris WebP images of the photo
# collection): ehm-classify vs the obvious Python (PIL + numpy + onnxruntime, benches/py/
# classify_ref.py), same model file, same thread count, same batch, same run. Prints a table of
# images/s and the ratio, and how often both give the same top-1 label.
# The models are untrained-backbone classifiers (init + a 1-epoch probe on 64 images): speed
# does not depend on the weights.
# A model written NAME:int8 is exported with --int8 (dynamic int8 weight matrices); both sides
# then run that same quantized file.
# Usage: benches/classify_speed.sh [OUTDIR]
#   (THREADS=2 BATCH=32 SESSIONS= MODELS="vit_tiny_p16_224 vit_small_p16_224 vit_tiny_p16_224:int8 vit_small_p16_224:int8")
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/classify_speed}
THREADS=${THREADS:-2}
BATCH=${BATCH:-32}
MODELS=${MODELS:-"vit_tiny_p16_224 vit_small_p16_224 vit_tiny_p16_224:int8 vit_small_p16_224:int8"}
tools/setup.sh all >&2; tools/setup.sh pydeps >&2
cargo build --release --bins >&2
CLS=./target/release/ehm-classify  # ehm-core's tool: no libtorch linked
SESSIONS=${SESSIONS:-}   # ehm-classify --sessions (default: one single-threaded session per thread)
SES=(); [ -n "$SESSIONS" ] && SES=(--sessions "$SESSIONS")
mkdir -p "$OUT"
ls -d "$PWD"/.cache/photos/gcompris_* > "$OUT/images.txt"
N=$(wc -l < "$OUT/images.txt")
PY=.cache/venv/bin/python
printf '%-20s %7s %7s %14s %14s %7s %9s\n' model threads images "ehm img/s" "python img/s" ratio same_top1
for spec in $MODELS; do
  a=${spec%%:*}; q=; [ "$spec" != "$a" ] && q=${spec#*:}
  m=$a${q:+_$q}
  if [ ! -f "$OUT/$m.onnx" ]; then
    if [ ! -f "$OUT/$a/probe/config.json" ]; then
      ./target/release/ehm-train init --model "$a" -o "$OUT/$a/init" >&2
      EHM_DEVICE=cpu ./target/release/ehm-train probe "$OUT/$a/init" -o "$OUT/$a/probe" \
        --train-limit 64 --test-limit 32 --epochs 1 --json >/dev/null
    fi
    ./target/release/ehm-export onnx "$OUT/$a/probe" --task classify ${q:+--$q} -o "$OUT/$m.onnx" >&2
  fi
  # warm the page cache and both runtimes once on a few images
  head -n 8 "$OUT/images.txt" | $CLS -m "$OUT/$m.onnx" --threads "$THREADS" --format jsonl - >/dev/null
  head -n 8 "$OUT/images.txt" > "$OUT/warm.txt"; $PY benches/py/classify_ref.py "$OUT/$m.onnx" "$THREADS" "$BATCH" "$OUT/warm.txt" >/dev/null
  t0=$(date +%s.%N)
  $CLS -m "$OUT/$m.onnx" --threads "$THREADS" --batch "$BATCH" "${SES[@]}" --format jsonl - \
    < "$OUT/images.txt" > "$OUT/$m.ehm.jsonl"
  t1=$(date +%s.%N)
  $PY benches/py/classify_ref.py "$OUT/$m.onnx" "$THREADS" "$BATCH" "$OUT/images.txt" > "$OUT/$m.py.jsonl"
  t2=$(date +%s.%N)
  python3 - "$m" "$THREADS" "$N" "$t0" "$t1" "$t2" "$OUT/$m.ehm.jsonl" "$OUT/$m.py.jsonl" <<'PY'
import json, sys
m, th, n, t0, t1, t2, a, b = sys.argv[1:]
n, t0, t1, t2 = int(n), float(t0), float(t1), float(t2)
top = lambda f: [json.loads(l)["top"][0]["label"] for l in open(f)]
ta, tb = top(a), top(b)
same = sum(x == y for x, y in zip(ta, tb)) / max(1, len(ta))
e, p = n / (t1 - t0), n / (t2 - t1)
print(f"{m:<20} {th:>7} {n:>7} {e:>14.1f} {p:>14.1f} {e / p:>6.2f}x {100 * same:>8.1f}%")
PY
done
# where the time goes (Python side) and ONNX Runtime per image by threads and call size
for spec in $MODELS; do m=${spec/:/_}; $PY benches/py/ort_breakdown.py "$OUT/$m.onnx" "$OUT/images.txt" 2>/dev/null; done
# start-up of the tool (10 runs of --help)
t0=$(date +%s.%N); for _ in 1 2 3 4 5 6 7 8 9 10; do $CLS --help >/dev/null; done; t1=$(date +%s.%N)
python3 -c "import sys; print(f'start-up {sys.argv[1]}: {(float(sys.argv[3]) - float(sys.argv[2])) / 10 * 1000:.0f} ms')" "$CLS" "$t0" "$t1"
