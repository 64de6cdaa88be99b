#!/usr/bin/env bash
# The main job, end to end on the small embedded default (README command 1): set-up, build,
# a short EHM pretraining run of vit_tiny_p4_fmnist on 2,000 Fashion-MNIST images with its
# mask-evolution picture and kNN monitor, a linear probe, and export of an ONNX embedder and
# classifier. Later stages (classify, segment, retrieve tools) join this script as they are built.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/demo}
start=$(date +%s)
tools/setup.sh all
cargo build --release --bins
echo "== pretraining (EHM) → $OUT/pretrain"
./target/release/ehm-train pretrain --model vit_tiny_p4_fmnist --masking ehm --limit 2000 --epochs 2 \
  --batch-size 128 --warmup-epochs 0.2 --log-every 5 --save-every 10 \
  --knn-train-limit 5000 --knn-test-limit 1000 --out "$OUT/pretrain"
echo "== linear probe on the frozen backbone → $OUT/probe"
./target/release/ehm-train probe "$OUT/pretrain" --out "$OUT/probe" --train-limit 5000 --test-limit 1000 --epochs 20
echo "== export to ONNX → $OUT/tiny_fmnist_embed.onnx, $OUT/tiny_fmnist_classify.onnx"
./target/release/ehm-export onnx "$OUT/pretrain" --task embed -o "$OUT/tiny_fmnist_embed.onnx"
./target/release/ehm-export onnx "$OUT/probe" --task classify -o "$OUT/tiny_fmnist_classify.onnx"
./target/release/ehm-export inspect "$OUT/tiny_fmnist_classify.onnx"
cat <<TXT

== demo finished in $(( $(date +%s) - start )) s. Outputs:
  checkpoint (timm names)   $OUT/pretrain/checkpoint.safetensors (+ config.json)
  mask-evolution picture    $OUT/pretrain/masks.png  (history: $OUT/pretrain/masks/)
  training metrics          $OUT/pretrain/metrics.jsonl
  summary                   $OUT/pretrain/summary.json
  linear probe              $OUT/probe/probe.json, confusion.csv, confusion.png
  ONNX embedder             $OUT/tiny_fmnist_embed.onnx (preprocessing and source inside)
  ONNX classifier           $OUT/tiny_fmnist_classify.onnx (labels inside)
Not built yet in this version: ehm-classify, ehm-segment, ehm-retrieve, fine-tuning and segmentation heads (see README).
TXT
