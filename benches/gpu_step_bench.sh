#!/usr/bin/env bash
# Step throughput on the GPU machine, one JSON line per run in $OUT/results.jsonl (one file, so
# it always comes back): PyTorch reference (eager bf16, with its affinity timing) and ehm-train
# bench with random masks, EHM (all blocks) and EHM with the affinity from blocks 0-3 and 0-2;
# then the reference with torch.compile (slowest, last; still owed from the first GPU session).
# Everything is printed at the end too, so the numbers come back in the tool's output tail even
# if the output folder does not.
# Usage (device tool, after benches/gpu_prepare.sh): bash benches/gpu_step_bench.sh
#   BLOCKS="none all 0,1,2,3 0,1,2" (ehm-train variants: random, then EHM with those affinity blocks)
#   PARTS="eager compile" (compile alone: PARTS=compile)
set -u
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__)+"/lib")')
R="$OUT/results.jsonl"
BLOCKS=${BLOCKS:-"none all 0,1,2,3 0,1,2"}; PARTS=${PARTS:-"eager compile"}
case " $PARTS " in *" eager "*) ;; *) CONFIGS_EAGER=0 ;; esac
[ "${CONFIGS_EAGER:-1}" = 1 ] && for c in "tiny 32 4 512" "small 224 16 256" "base 224 16 256"; do
  set -- $c
  timeout 90 python3 gpu/mae_reference.py --model $1 --img $2 --patch $3 --batch $4 --affinity --json "$R" > /dev/null 2>>"$OUT/err.txt"
  for blocks in $BLOCKS; do
    case $blocks in
      none) a=(--masking random) ;;
      all) a=(--masking ehm) ;;
      *) a=(--masking ehm --affinity-blocks $blocks) ;;
    esac
    timeout 90 gpu/ehm-train bench --model $1 --img $2 --patch $3 --batch $4 "${a[@]}" --json "$R" > /dev/null 2>>"$OUT/err.txt"
  done
done
case " $PARTS " in *" compile "*) ;; *) cat "$R"; exit 0 ;; esac
for c in "tiny 32 4 512" "small 224 16 256" "base 224 16 256"; do
  set -- $c
  timeout ${COMPILE_TIMEOUT:-150} python3 gpu/mae_reference.py --model $1 --img $2 --patch $3 --batch $4 --compile --json "$R" > /dev/null 2>>"$OUT/err.txt"
done
cat "$R"; tail -5 "$OUT/err.txt"
