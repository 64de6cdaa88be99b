#!/usr/bin/env bash
# The EHM comparison (docs/benchmarks.md, "EHM vs the baselines"): for each grid (MODELS), each
# masking strategy and each seed, pretrain on the registry photo collection, then measure
#   - kNN top-1 on Fashion-MNIST (5,000 train / 1,000 test, through the model's own preprocessing),
#   - retrieval mAP on the partial-duplicate benchmark (embed export, no regional views),
#   - segmentation mIoU with a frozen backbone (linear head on the Tux Paint composite set),
#   - hierarchy quality of the model's own cut at 8 segments (ASA, boundary recall, best IoU;
#     `ehm-train hierarchy` with the EHM defaults, for every strategy: does EHM training give
#     a better hierarchy than random masking?) and a fixed grid's,
# and print one table of mean ± std over seeds (Markdown; per-cell JSON Lines in OUT/cells.jsonl).
# Resumable: a finished cell is skipped. Runs on the GPU machine unchanged (set EPOCHS, MODELS).
#
# Usage: benches/compare_ehm.sh [OUTDIR]
#   MODELS="vit_tiny_p8_photos64 vit_tiny_p4_photos64"  MASKINGS="random grid block ehm"
#   SEEDS="0 1 2"  EPOCHS="20 10" (one per model)  THREADS=2
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/compare_ehm}
MODELS=${MODELS:-"vit_tiny_p8_photos64 vit_tiny_p4_photos64"}
MASKINGS=${MASKINGS:-"random grid block ehm"}
SEEDS=${SEEDS:-"0 1 2"}
EPOCHS=(${EPOCHS:-20 10})
THREADS=${THREADS:-2}
SEG_EPOCHS=${SEG_EPOCHS:-4}
if [ -z "${BIN:-}" ]; then tools/setup.sh all >&2; cargo build --release --bins >&2; fi
B=${BIN:-./target/release}
mkdir -p "$OUT"
[ -f "$OUT/segdata/.complete" ] || { $B/ehm-train make-segdata -o "$OUT/segdata" --train 400 --val 200 --size 64 >&2; touch "$OUT/segdata/.complete"; }
[ -f "$OUT/bench/.complete" ] || $B/ehm-retrieve make-bench -o "$OUT/bench" --originals 100 >&2
CELLS="$OUT/cells.jsonl"
touch "$CELLS"
i=0
for model in $MODELS; do
  ep=${EPOCHS[$i]:-${EPOCHS[0]}}; i=$((i + 1))
  for m in $MASKINGS; do
    for s in $SEEDS; do
      d="$OUT/$model/$m/seed$s"
      [ -f "$d/cell.json" ] && continue
      mkdir -p "$d"
      echo "== $model $m seed $s ($ep epochs) $(date +%T)" >&2
      $B/ehm-train pretrain --model "$model" --masking "$m" --seed "$s" --epochs "$ep" --knn-every -1 \
        --out "$d/pretrain" --no-progress --json > "$d/pretrain.json"
      $B/ehm-train knn "$d/pretrain" --train-limit 5000 --test-limit 1000 --json > "$d/knn.json"
      $B/ehm-train hierarchy "$d/pretrain" --data "$OUT/segdata" --json > "$d/hierarchy.json"
      $B/ehm-export onnx "$d/pretrain" --task embed -o "$d/embed.onnx" >&2
      rm -rf "$d/index"
      $B/ehm-retrieve index -i "$d/index" -m "$d/embed.onnx" --regions none --threads "$THREADS" - \
        < "$OUT/bench/database.txt" >&2
      $B/ehm-retrieve eval -i "$d/index" --bench "$OUT/bench" --threads "$THREADS" --json > "$d/retrieval.json"
      $B/ehm-train segment "$d/pretrain" --data "$OUT/segdata" -o "$d/segment" --image-size 64 \
        --freeze-backbone --epochs "$SEG_EPOCHS" --batch-size 32 --seed "$s" --json > "$d/segment.json" 2>/dev/null
      python3 - "$d" "$model" "$m" "$s" "$ep" > "$d/cell.json" <<'PY'
import json, sys
d, model, m, s, ep = sys.argv[1:]
j = lambda k: json.load(open(f"{d}/{k}.json"))
h = j("hierarchy"); k = h["counts"].index(8)
print(json.dumps({"model": model, "masking": m, "seed": int(s), "epochs": float(ep),
  "pretrain_loss": j("pretrain")["final_loss"], "pretrain_s": j("pretrain")["seconds"],
  "knn_top1": j("knn")["knn_top1"], "retrieval_map": j("retrieval")["overall"]["map"],
  "seg_miou": j("segment")["miou"],
  "asa8": h["teacher"][k]["asa"], "br8": h["teacher"][k]["boundary_recall"], "iou8": h["teacher"][k]["best_iou"],
  "grid_asa8": h["grid"][k]["asa"], "grid_br8": h["grid"][k]["boundary_recall"], "grid_iou8": h["grid"][k]["best_iou"]}))
PY
      cat "$d/cell.json" >> "$CELLS"
    done
  done
done
python3 benches/py/compare_table.py "$CELLS" "$OUT/table.md"
