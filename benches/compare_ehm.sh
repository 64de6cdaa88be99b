#!/usr/bin/env bash
# The EHM comparison (docs/benchmarks.md, "EHM vs the baselines"): for each grid (MODELS), each
# masking strategy and each seed, pretrain on the registry photo collection, then measure
#   - kNN top-1 on Fashion-MNIST (5,000 train / 1,000 test, through the model's own preprocessing),
#   - retrieval mAP on the partial-duplicate benchmark (embed export, no regional views),
#   - object segmentation with a frozen backbone: a linear head on the Tux Paint composite set
#     labelled object vs background (`make-segdata --objects-only`; the 13 stamp categories are
#     out of reach of a backbone this small — its head predicts background only), object IoU
#     and mIoU on the val split,
#   - hierarchy quality of the model's own cut at 8 segments (ASA, boundary recall, best IoU;
#     `ehm-train hierarchy` with the EHM defaults, for every strategy: does EHM training give
#     a better hierarchy than random masking?) and a fixed grid's,
# and print one table of mean ± std over seeds (Markdown; per-cell JSON in OUT/MODEL/MASKING/seedS/
# cell.json, all cells in OUT/cells.jsonl). MASKINGS may include `none`: the untrained
# initialisation, measured the same way (what pretraining adds at all).
# Resumable per stage: a stage whose JSON exists is skipped, an interrupted pretrain resumes.
# Runs on the GPU machine unchanged (set EPOCHS, MODELS).
#
# Usage: benches/compare_ehm.sh [OUTDIR]
#   MODELS="vit_tiny_p8_photos64 vit_tiny_p4_photos64"  MASKINGS="none random grid block ehm"
#   SEEDS="0 1 2"  EPOCHS="20 10" (one per model)  THREADS=2  SEG_EPOCHS=10  SEG_BLR=2
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/compare_ehm}
MODELS=${MODELS:-"vit_tiny_p8_photos64 vit_tiny_p4_photos64"}
MASKINGS=${MASKINGS:-"none random grid block ehm"}
SEEDS=${SEEDS:-"0 1 2"}
EPOCHS=(${EPOCHS:-20 10})
THREADS=${THREADS:-2}
SEG_EPOCHS=${SEG_EPOCHS:-10}
SEG_BLR=${SEG_BLR:-2}
if [ -z "${BIN:-}" ]; then tools/setup.sh all >&2; cargo build --release --bins >&2; fi
B=${BIN:-./target/release}
mkdir -p "$OUT"
[ -f "$OUT/segdata/.complete" ] || $B/ehm-train make-segdata -o "$OUT/segdata" --train 400 --val 200 --size 64 >&2
[ -f "$OUT/segdata_fg/.complete" ] || $B/ehm-train make-segdata -o "$OUT/segdata_fg" --train 400 --val 200 --size 64 --objects-only >&2
[ -f "$OUT/bench/.complete" ] || $B/ehm-retrieve make-bench -o "$OUT/bench" --originals 100 >&2
# stage NAME CMD…: run CMD with stdout to $d/NAME.json unless that holds JSON already
stage() {
  local f="$d/$1.json"; shift
  python3 -c 'import json,sys; json.load(open(sys.argv[1]))' "$f" 2>/dev/null && return 0
  "$@" > "$f.tmp" && mv "$f.tmp" "$f"
}
i=0
for model in $MODELS; do
  ep=${EPOCHS[$i]:-${EPOCHS[0]}}; i=$((i + 1))
  for m in $MASKINGS; do
    seeds=$SEEDS; [ "$m" = none ] && seeds=${SEEDS%% *}   # one untrained model is enough
    for s in $seeds; do
      d="$OUT/$model/$m/seed$s"
      [ -f "$d/cell.json" ] && continue
      mkdir -p "$d"
      echo "== $model $m seed $s ($ep epochs) $(date +%T)" >&2
      if [ "$m" = none ]; then
        [ -f "$d/pretrain/checkpoint.safetensors" ] || $B/ehm-train init --model "$model" -o "$d/pretrain" >&2
        echo '{"final_loss": null, "seconds": 0}' > "$d/pretrain.json"
      else
        stage pretrain $B/ehm-train pretrain --model "$model" --masking "$m" --seed "$s" --epochs "$ep" \
          --knn-every -1 --out "$d/pretrain" --no-progress --json
      fi
      stage knn $B/ehm-train knn "$d/pretrain" --train-limit 5000 --test-limit 1000 --json
      stage hierarchy $B/ehm-train hierarchy "$d/pretrain" --data "$OUT/segdata" --json
      if ! python3 -c 'import json,sys; json.load(open(sys.argv[1]))' "$d/retrieval.json" 2>/dev/null; then
        $B/ehm-export onnx "$d/pretrain" --task embed -o "$d/embed.onnx" >&2
        rm -rf "$d/index"
        $B/ehm-retrieve index -i "$d/index" -m "$d/embed.onnx" --regions none --threads "$THREADS" - \
          < "$OUT/bench/database.txt" >&2
        stage retrieval $B/ehm-retrieve eval -i "$d/index" --bench "$OUT/bench" --threads "$THREADS" --json
      fi
      stage segment_fg $B/ehm-train segment "$d/pretrain" --data "$OUT/segdata_fg" -o "$d/segment_fg" \
        --image-size 64 --freeze-backbone --epochs "$SEG_EPOCHS" --blr "$SEG_BLR" --batch-size 32 \
        --seed "$s" --fresh --json
      python3 - "$d" "$model" "$m" "$s" "$ep" > "$d/cell.json.tmp" <<'PY'
import json, sys
d, model, m, s, ep = sys.argv[1:]
j = lambda k: json.load(open(f"{d}/{k}.json"))
h = j("hierarchy"); k = h["counts"].index(8)
seg = j("segment_fg"); iou = dict(seg["per_class_iou"])
print(json.dumps({"model": model, "masking": m, "seed": int(s), "epochs": 0.0 if m == "none" else float(ep),
  "pretrain_loss": j("pretrain")["final_loss"], "pretrain_s": j("pretrain")["seconds"],
  "knn_top1": j("knn")["knn_top1"], "retrieval_map": j("retrieval")["overall"]["map"],
  "seg_miou": seg["miou"], "seg_object_iou": iou["object"],
  "asa8": h["teacher"][k]["asa"], "br8": h["teacher"][k]["boundary_recall"], "iou8": h["teacher"][k]["best_iou"],
  "grid_asa8": h["grid"][k]["asa"], "grid_br8": h["grid"][k]["boundary_recall"], "grid_iou8": h["grid"][k]["best_iou"]}))
PY
      mv "$d/cell.json.tmp" "$d/cell.json"
    done
  done
done
# all finished cells, in the order of the loops above
for model in $MODELS; do for m in $MASKINGS; do for s in $SEEDS; do
  [ -f "$OUT/$model/$m/seed$s/cell.json" ] && cat "$OUT/$model/$m/seed$s/cell.json"
done; done; done > "$OUT/cells.jsonl"
python3 benches/py/compare_table.py "$OUT/cells.jsonl" "$OUT/table.md"
