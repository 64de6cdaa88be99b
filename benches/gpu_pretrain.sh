#!/usr/bin/env bash
# All GPU checks of the pretraining issue in one call (run by the device tool, results in $OUT):
#  1. smoke test of the carried binary against the machine's PyTorch;
#  2. images/s: PyTorch reference (eager bf16) vs ehm-train bench (random, ehm, ehm on blocks 0-3)
#     at tiny/32/p4 (batch 512), small/224/p16 and base/224/p16 (batch 256);
#  3. Fashion-MNIST pretraining, EHM vs random, same epochs and seed, kNN top-1 of each;
#  4. the reference with torch.compile (slowest, so last).
# Usage: benches/gpu_pretrain.sh [EPOCHS]   (after benches/gpu_prepare.sh)
set -u
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
EPOCHS=${1:-10}
LIB=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__)+"/lib")')
export LD_LIBRARY_PATH="$LIB"
export EHM_CACHE=$PWD/gpu/cache
BIN=gpu/ehm-train
REF=gpu/mae_reference.py
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/log.txt"; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c 'import torch;print(torch.__version__, torch.version.cuda)' >> "$OUT/gpu.txt"
log "smoke"
if ! timeout 120 $BIN bench --model tiny --img 32 --patch 4 --batch 64 --steps 3 --warmup 1 --masking ehm > "$OUT/smoke.txt" 2>&1; then
  log "smoke test failed"; cat "$OUT/smoke.txt"; exit 1
fi
cat "$OUT/smoke.txt"
CONFIGS=("tiny 32 4 512" "small 224 16 256" "base 224 16 256")
for c in "${CONFIGS[@]}"; do
  set -- $c
  log "reference eager $c"
  timeout 120 python3 $REF --model $1 --img $2 --patch $3 --batch $4 --affinity --json "$OUT/ref.jsonl" >> "$OUT/ref.log" 2>&1
  for m in random ehm; do
    log "tch $m $c"
    timeout 120 $BIN bench --model $1 --img $2 --patch $3 --batch $4 --masking $m --json "$OUT/tch.jsonl" >> "$OUT/tch.log" 2>&1
  done
  log "tch ehm(blocks 0-3) $c"
  timeout 120 $BIN bench --model $1 --img $2 --patch $3 --batch $4 --masking ehm --affinity-blocks 0,1,2,3 --json "$OUT/tch_ehm_b03.jsonl" >> "$OUT/tch.log" 2>&1
done
for m in ehm random; do
  log "fashion-mnist pretrain $m, $EPOCHS epochs"
  timeout 240 $BIN pretrain --model models/vit_tiny_p4_fmnist.toml --masking $m --epochs $EPOCHS --warmup-epochs 1 \
    --out "$OUT/fmnist_$m" --workers 12 --knn-train-limit 60000 --knn-test-limit 10000 --save-every 100000 \
    --log-every 50 --no-progress --json > "$OUT/fmnist_$m.json" 2> "$OUT/fmnist_$m.log"
  rm -f "$OUT/fmnist_$m/resume.safetensors"
done
for c in "${CONFIGS[@]}"; do
  set -- $c
  log "reference compile $c"
  timeout 150 python3 $REF --model $1 --img $2 --patch $3 --batch $4 --compile --json "$OUT/ref_compile.jsonl" >> "$OUT/ref_compile.log" 2>&1
done
log "done"
