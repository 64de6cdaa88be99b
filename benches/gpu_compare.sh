#!/usr/bin/env bash
# The masking comparison at a size the 2-core CPU grid cannot reach, on the GPU machine: random,
# grid, block and EHM pretraining of vit_tiny_p4_fmnist on all 60 000 Fashion-MNIST training
# images, the same epochs, batch and seed for each, then kNN top-1 (20-NN on the whole 60k train
# set, the 10k test set). The four maskings of one seed run side by side on the one GPU (so their
# images/s are no speed figures); seeds run one after another while BUDGET seconds last, and each
# finished run appends its summary line to $OUT/compare.jsonl at once, so a cut-off call still
# returns the seeds it completed. A mean ± std table is printed at the end.
# Usage (device tool, after benches/gpu_prepare.sh staged gpu/):
#   EPOCHS=2 SEEDS="0 1 2" BUDGET=200 bash benches/gpu_compare.sh
#   (MASKINGS="random grid block ehm" WARMUP=0.5 WORKERS=3; the 2026-11-26 H100 run, one seed of
#   EHM and random for 10 epochs, is EPOCHS=10 SEEDS=0 MASKINGS="ehm random" WARMUP=1 WORKERS=12)
set -u
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
EPOCHS=${EPOCHS:-2}; SEEDS=${SEEDS:-"0 1 2"}; BUDGET=${BUDGET:-200}
MASKINGS=${MASKINGS:-"random grid block ehm"}; WARMUP=${WARMUP:-0.5}; WORKERS=${WORKERS:-3}
export LD_LIBRARY_PATH=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__)+"/lib")')${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export EHM_CACHE=${EHM_CACHE:-$PWD/gpu/cache}
BIN=${BIN:-gpu/ehm-train}
R="$OUT/compare.jsonl"
W=$(mktemp -d)   # run folders and their logs stay on the machine (only 8 files come back)
start=$(date +%s); round_s=0
for s in $SEEDS; do
  left=$((BUDGET - ($(date +%s) - start)))
  # a seed starts only if a round like the last one still fits (the first always starts)
  if [ "$round_s" -gt 0 ] && [ "$left" -lt $((round_s + 5)) ]; then
    echo "seed $s skipped: ${left}s left, a round took ${round_s}s" | tee -a "$OUT/compare_log.txt"; break
  fi
  t0=$(date +%s)
  for m in $MASKINGS; do
    ( if RAYON_NUM_THREADS=4 timeout "$left" "$BIN" pretrain --model vit_tiny_p4_fmnist --masking "$m" --seed "$s" \
          --epochs "$EPOCHS" --warmup-epochs "$WARMUP" --workers "$WORKERS" --out "$W/${m}_$s" --save-every 100000 \
          --log-every 100 --knn-train-limit "${KNN_TRAIN:-60000}" --knn-test-limit "${KNN_TEST:-10000}" --no-progress --json \
          > "$W/${m}_$s.json" 2> "$W/${m}_$s.log"; then
        python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); r["seed"]=int(sys.argv[2]); print(json.dumps(r))' \
          "$W/${m}_$s.json" "$s" >> "$R"
      else
        { echo "$m seed $s failed:"; tail -n 5 "$W/${m}_$s.log"; } >> "$OUT/compare_log.txt"
      fi ) &
  done
  wait
  round_s=$(($(date +%s) - t0))
  echo "seed $s: ${round_s}s" | tee -a "$OUT/compare_log.txt"
done
python3 - "$R" <<'PY'
import json, statistics as st, sys
rows = [json.loads(l) for l in open(sys.argv[1])] if __import__("os").path.exists(sys.argv[1]) else []
print(f"{'masking':<8} {'seeds':>5} {'kNN top-1 mean ± std':>22} {'final loss':>10}")
for m in ["random", "grid", "block", "ehm"]:
    r = [x for x in rows if x["masking"] == m]
    if not r:
        continue
    k = [x["knn_top1"] for x in r]
    sd = st.stdev(k) if len(k) > 1 else 0.0
    print(f"{m:<8} {len(r):>5} {st.mean(k):>14.4f} ± {sd:.4f} {st.mean(x['final_loss'] for x in r):>10.4f}")
PY
