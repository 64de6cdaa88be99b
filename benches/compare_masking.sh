#!/usr/bin/env bash
# The downstream comparison grid: for each masking strategy and seed, pretrain the same backbone
# the same way, then kNN, linear probe, fine-tune and segmentation (frozen backbone, linear
# head) — and one table of mean ± std over seeds (Markdown, also as JSON Lines per cell).
# Every cell also reports the pretraining itself: steps, first and last logged loss, and the
# training loop's images/s (from metrics.jsonl: monitors and set-up excluded).
#
# Usage: benches/compare_masking.sh [OUTDIR]
# Size knobs (environment; defaults are the small CPU grid, about 2–3 min per cell on 2 cores):
#   MASKINGS="random block ehm"  SEEDS="0 1"  MODEL=vit_tiny_p4_fmnist
#   STAGES="knn probe finetune segment"   (what runs after pretraining; STAGES=knn is the quick
#                                          pretraining check: loss, kNN and loop speed only)
#   PRETRAIN_LIMIT=5000 PRETRAIN_EPOCHS=2 BATCH=128 WARMUP=   (warm-up epochs; empty: the zoo's)
#   EVAL_TRAIN=5000 EVAL_TEST=1000      (kNN / probe / fine-tune subsets of Fashion-MNIST)
#   FT_LIMIT=1000 FT_EPOCHS=4 FT_BATCH=32 FT_BLR=5e-3   (fine-tune on a subset: the costly step on CPU)
#   SEG_TRAIN=400 SEG_VAL=100 SEG_SIZE=64 SEG_EPOCHS=4
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/compare}
MASKINGS=${MASKINGS:-"random block ehm"}
SEEDS=${SEEDS:-"0 1"}
MODEL=${MODEL:-vit_tiny_p4_fmnist}
STAGES=${STAGES:-"knn probe finetune segment"}
WARMUP=${WARMUP:-}
PRETRAIN_LIMIT=${PRETRAIN_LIMIT:-5000}
PRETRAIN_EPOCHS=${PRETRAIN_EPOCHS:-2}
BATCH=${BATCH:-128}
EVAL_TRAIN=${EVAL_TRAIN:-5000}
EVAL_TEST=${EVAL_TEST:-1000}
FT_LIMIT=${FT_LIMIT:-1000}
FT_EPOCHS=${FT_EPOCHS:-4}
FT_BATCH=${FT_BATCH:-32}
FT_BLR=${FT_BLR:-5e-3}
SEG_TRAIN=${SEG_TRAIN:-400}
SEG_VAL=${SEG_VAL:-100}
SEG_SIZE=${SEG_SIZE:-64}
SEG_EPOCHS=${SEG_EPOCHS:-4}
tools/setup.sh libs >&2; tools/setup.sh data >&2
cargo build --release --bin ehm-train >&2
T=./target/release/ehm-train
mkdir -p "$OUT"
has() { [[ " $STAGES " == *" $1 "* ]]; }
has segment && { [ -f "$OUT/segdata/.complete" ] || $T make-segdata -o "$OUT/segdata" --train "$SEG_TRAIN" --val "$SEG_VAL" --size "$SEG_SIZE" >&2; }
WARM=(); [ -n "$WARMUP" ] && WARM=(--warmup-epochs "$WARMUP")
EVAL=(--train-limit "$EVAL_TRAIN" --test-limit "$EVAL_TEST")
CELLS="$OUT/cells.jsonl"
: > "$CELLS"
for m in $MASKINGS; do
  for s in $SEEDS; do
    d="$OUT/$m/seed$s"; mkdir -p "$OUT/$m"
    echo "== $m seed $s" >&2
    rm -f "$d".*.json  # a stage left out this time must not report an older run
    $T pretrain --model "$MODEL" --masking "$m" --seed "$s" --limit "$PRETRAIN_LIMIT" \
      --epochs "$PRETRAIN_EPOCHS" --batch-size "$BATCH" "${WARM[@]}" --log-every 1 --knn-every -1 \
      --out "$d/pretrain" --fresh --no-progress --json > "$d.pretrain.json"
    has knn && $T knn "$d/pretrain" "${EVAL[@]}" --json > "$d.knn.json"
    has probe && $T probe "$d/pretrain" -o "$d/probe" "${EVAL[@]}" --seed "$s" --json > "$d.probe.json"
    has finetune && $T finetune "$d/pretrain" -o "$d/finetune" --train-limit "$FT_LIMIT" --test-limit "$EVAL_TEST" \
      --epochs "$FT_EPOCHS" --batch-size "$FT_BATCH" --blr "$FT_BLR" --warmup-epochs 0.5 --min-crop 0.35 \
      --seed "$s" --json > "$d.finetune.json" 2>/dev/null
    has segment && $T segment "$d/pretrain" --data "$OUT/segdata" -o "$d/segment" --image-size "$SEG_SIZE" \
      --freeze-backbone --epochs "$SEG_EPOCHS" --batch-size 32 --seed "$s" --json \
      > "$d.segment.json" 2>/dev/null
    python3 - "$d" "$m" "$s" "$BATCH" >> "$CELLS" <<'PY'
import json, os, sys
d, m, s, batch = sys.argv[1:]
j = lambda k: json.load(open(f"{d}.{k}.json")) if os.path.exists(f"{d}.{k}.json") else None
pre = j("pretrain")
loss = [r for r in map(json.loads, open(f"{d}/pretrain/metrics.jsonl")) if "loss" in r]
cell = {"masking": m, "seed": int(s), "steps": pre["steps"], "first_loss": loss[0]["loss"],
  "pretrain_loss": pre["final_loss"],
  # the training loop's images/s: its steps over the time to the last logged step
  "pretrain_images_per_s": pre["steps"] * int(batch) / loss[-1]["elapsed_s"]}
for k, key, field in [("knn", "knn_top1", "knn_top1"), ("probe", "probe_top1", "top1"),
                      ("finetune", "finetune_top1", "top1"), ("segment", "seg_miou", "miou"),
                      ("segment", "seg_pixel_acc", "pixel_accuracy")]:
    if j(k):
        cell[key] = j(k)[field]
print(json.dumps(cell))
PY
  done
done
python3 benches/py/grid_table.py "$CELLS" "$OUT/table.md"
