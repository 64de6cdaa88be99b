#!/usr/bin/env bash
# CPU pretraining check (2 cores): vit_tiny_p4_fmnist, 1 epoch on a fixed 2,000-image
# Fashion-MNIST subset, random vs EHM masking; prints a table of loss, kNN top-1 and images/s.
# Usage: benches/cpu_pretrain.sh [OUTDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/cpu_pretrain}
tools/setup.sh libs >&2; tools/setup.sh data >&2
cargo build --release --bin ehm-train >&2
printf '%-8s %8s %10s %10s %10s %9s\n' masking steps first_loss last_loss knn_top1 img/s
for m in random ehm; do
  ./target/release/ehm-train pretrain --model vit_tiny_p4_fmnist --masking $m --limit 2000 --epochs 1 \
    --batch-size 128 --warmup-epochs 0.2 --log-every 1 --knn-train-limit 5000 --knn-test-limit 1000 \
    --out "$OUT/$m" --fresh --no-progress --json > "$OUT.$m.json"
  python3 - "$OUT/$m/metrics.jsonl" "$OUT.$m.json" "$m" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
loss = [r for r in rows if "loss" in r]
s = json.load(open(sys.argv[2]))
# training images/s: steps × batch over the time of the training loop (kNN excluded)
train_s = loss[-1]["elapsed_s"]
print(f'{sys.argv[3]:<8} {s["steps"]:>8} {loss[0]["loss"]:>10.4f} {loss[-1]["loss"]:>10.4f} {s["knn_top1"]:>10.4f} {s["steps"]*128/train_s:>9.1f}')
PY
done
