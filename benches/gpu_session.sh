#!/usr/bin/env bash
# Every GPU check owed, in one device call (after benches/gpu_prepare.sh staged gpu/ here and
# the call carries it): (1) data-parallel equality and speed on the GPU (benches/gpu_ddp_check.sh:
# 2 ranks × 64 vs 1 × 128, fp32); (2) what the EHM step costs in bf16 (benches/ehm_cost.sh);
# (3) step throughput vs the PyTorch reference, eager, then torch.compile last
# (benches/gpu_step_bench.sh). Each part is time-boxed so the call fits the 600 s limit; all
# results go to $OUT (results.jsonl, ehm_cost.jsonl) and are printed at the end.
# Usage (device tool): bash benches/gpu_session.sh
set -u
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
export OUT
export LD_LIBRARY_PATH=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__)+"/lib")')
export EHM_CACHE=$PWD/gpu/cache
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt" 2>&1
timeout 120 env BIN=gpu/ehm-train DTYPE=fp32 bash benches/gpu_ddp_check.sh >> "$OUT/log.txt" 2>&1
timeout 120 env BIN=gpu DTYPE=bf16 MODEL=base IMG=224 PATCH=16 BATCH=256 STEPS=10 WARMUP=3 \
  bash benches/ehm_cost.sh "$OUT/ehm_cost.jsonl" >> "$OUT/log.txt" 2>&1
timeout 330 bash benches/gpu_step_bench.sh >> "$OUT/log.txt" 2>&1
cat "$OUT/gpu.txt" "$OUT/results.jsonl" "$OUT/ehm_cost.jsonl" 2>/dev/null; tail -20 "$OUT/log.txt"
