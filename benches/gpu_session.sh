#!/usr/bin/env bash
# Every GPU check owed, in one device call (after benches/gpu_prepare.sh staged gpu/ here and
# the call carries it), most wanted first, each part time-boxed so the call ends inside 600 s:
# (1) step throughput, PyTorch reference eager bf16 vs ehm-train random and EHM (all blocks) at
#     tiny/32, small/224, base/224 (benches/gpu_step_bench.sh);
# (2) the reference with torch.compile at the same sizes (the yardstick owed since 2026-11-26);
# (3) what EHM costs per step in bf16 at base/224, several affinity settings (benches/ehm_cost.sh);
# (4) data-parallel equality and speed on the GPU, Gloo and NCCL (benches/gpu_ddp_check.sh).
# Results: $OUT/results.jsonl, $OUT/ehm_cost.jsonl, logs in $OUT/log.txt; printed at the end too.
# Usage (device tool): bash benches/gpu_session.sh   (then benches/gpu_compare.sh while warm)
set -u
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
export OUT
export LD_LIBRARY_PATH=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__)+"/lib")')
export EHM_CACHE=$PWD/gpu/cache
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*" | tee -a "$OUT/log.txt"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1
python3 -c 'import torch;print("torch", torch.__version__)' >> "$OUT/gpu.txt" 2>&1
stamp "step bench, eager"
timeout 170 env BLOCKS="none all" PARTS=eager bash benches/gpu_step_bench.sh >> "$OUT/log.txt" 2>&1
stamp "step bench, torch.compile"
timeout 200 env PARTS=compile COMPILE_TIMEOUT=90 bash benches/gpu_step_bench.sh >> "$OUT/log.txt" 2>&1
stamp "EHM cost at base/224 bf16"
timeout 100 env BIN=gpu DTYPE=bf16 MODEL=base IMG=224 PATCH=16 BATCH=256 STEPS=10 WARMUP=3 \
  VARIANTS="cosine:all attention:all cosine:first:4" \
  bash benches/ehm_cost.sh "$OUT/ehm_cost.jsonl" >> "$OUT/log.txt" 2>&1
stamp "data parallel"
timeout 90 env BIN=gpu/ehm-train DTYPE=fp32 bash benches/gpu_ddp_check.sh >> "$OUT/log.txt" 2>&1
stamp "done"
cat "$OUT/gpu.txt" "$OUT/results.jsonl" "$OUT/ehm_cost.jsonl" 2>/dev/null; tail -25 "$OUT/log.txt"
