#!/usr/bin/env bash
# The main job, end to end on the small embedded default (README command 1), ≈ 6–8 min on 2 cores:
# set-up and build; a short EHM pretraining run of vit_tiny_p4_fmnist on 2,000 Fashion-MNIST
# images with its mask-evolution picture; a linear probe; export to ONNX; ehm-classify on
# Fashion-MNIST test images; a segmentation head on the Tux Paint composite set and ehm-segment
# on its val images; ehm-retrieve index + query on the photo benchmark with the shipped embedder;
# and a summary of where every output went.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/demo}
start=$(date +%s)
tools/setup.sh all
cargo build --release --bins
T=./target/release
mkdir -p "$OUT"
stage() { echo; echo "== [$(( $(date +%s) - start )) s] $*"; }

stage "pretraining (EHM) → $OUT/pretrain"
$T/ehm-train pretrain --model vit_tiny_p4_fmnist --masking ehm --limit 2000 --epochs 2 \
  --batch-size 128 --warmup-epochs 0.2 --log-every 5 --save-every 10 \
  --knn-train-limit 5000 --knn-test-limit 1000 --out "$OUT/pretrain"

stage "linear probe on the frozen backbone → $OUT/probe"
$T/ehm-train probe "$OUT/pretrain" --out "$OUT/probe" --train-limit 5000 --test-limit 1000 --epochs 20

stage "export to ONNX"
$T/ehm-export onnx "$OUT/pretrain" --task embed -o "$OUT/tiny_fmnist_embed.onnx"
$T/ehm-export onnx "$OUT/probe" --task classify -o "$OUT/tiny_fmnist_classify.onnx"
$T/ehm-export inspect "$OUT/tiny_fmnist_classify.onnx"

stage "ehm-classify on 12 Fashion-MNIST test images → $OUT/classify.jsonl"
$T/ehm-train dump-images --data fashion-mnist:test --limit 12 -o "$OUT/fmnist_images"
$T/ehm-classify -m "$OUT/tiny_fmnist_classify.onnx" --top-k 3 "$OUT/fmnist_images"
$T/ehm-classify -m "$OUT/tiny_fmnist_classify.onnx" --format jsonl "$OUT/fmnist_images" > "$OUT/classify.jsonl"

stage "segmentation: composite set, head on the frozen backbone, ehm-segment → $OUT/segment_out"
[ -f "$OUT/segdata/.complete" ] || $T/ehm-train make-segdata -o "$OUT/segdata" --train 300 --val 60 --size 64
$T/ehm-train segment "$OUT/pretrain" --data "$OUT/segdata" -o "$OUT/segment" --image-size 64 \
  --freeze-backbone --epochs 4 --batch-size 32
$T/ehm-export onnx "$OUT/segment" --task segment -o "$OUT/tiny_segment.onnx"
ls "$OUT"/segdata/images/val/0000{0,1,2,3,4,5}.png | $T/ehm-segment -m "$OUT/tiny_segment.onnx" -o "$OUT/segment_out" - \
  > "$OUT/segment.jsonl"

stage "retrieval: photo benchmark, index with the shipped embedder, query attacked copies → $OUT/retrieval"
EMBED=models/shipped/photos64_tiny_embed.onnx
[ -f "$OUT/retrieval/bench/.complete" ] || $T/ehm-retrieve make-bench -o "$OUT/retrieval/bench" --originals 20
rm -rf "$OUT/retrieval/index"
$T/ehm-retrieve index -i "$OUT/retrieval/index" -m "$EMBED" - < "$OUT/retrieval/bench/database.txt"
$T/ehm-retrieve query -i "$OUT/retrieval/index" -k 3 "$OUT"/retrieval/bench/queries/{crop,text,strong}/0000.jpg
# local verification needs the model's patch tokens: the same embedding with that output added
# (the index accepts it); the match sheet shows where each copy sits in its query
rm -f "$OUT/retrieval/shipped_patch_tokens.onnx"
$T/ehm-export patch-tokens "$EMBED" -o "$OUT/retrieval/shipped_patch_tokens.onnx"
$T/ehm-retrieve query -i "$OUT/retrieval/index" -m "$OUT/retrieval/shipped_patch_tokens.onnx" -k 3 --verify 10 \
  --report "$OUT/retrieval/matches.html" --format jsonl "$OUT"/retrieval/bench/queries/{collage,inset,crop}/000{0,1}.jpg \
  > "$OUT/retrieval/verified.jsonl"
$T/ehm-retrieve eval -i "$OUT/retrieval/index" --bench "$OUT/retrieval/bench" | tee "$OUT/retrieval/eval.txt"
# near-identical copies inside the collection (the same wallpaper in other aspect ratios): pHash
# scores are calibrated (1 − 2·hamming/64); the demo-scale embedder's are not, see docs/retrieve.md
rm -rf "$OUT/retrieval/phash_index"
$T/ehm-retrieve index -i "$OUT/retrieval/phash_index" --descriptor phash --regions none - < "$OUT/retrieval/bench/database.txt"
$T/ehm-retrieve dedup -i "$OUT/retrieval/phash_index" --scores raw --threshold 0.75 --format jsonl \
  --report "$OUT/retrieval/dedup.html" > "$OUT/retrieval/dedup.jsonl"

cat <<TXT

== demo finished in $(( $(date +%s) - start )) s. Outputs:
  checkpoint (timm names)   $OUT/pretrain/checkpoint.safetensors (+ config.json)
  mask-evolution picture    $OUT/pretrain/masks.png  (history: $OUT/pretrain/masks/)
  training metrics          $OUT/pretrain/metrics.jsonl, summary $OUT/pretrain/summary.json
  linear probe              $OUT/probe/probe.json, confusion.csv, confusion.png
  ONNX models               $OUT/tiny_fmnist_embed.onnx, tiny_fmnist_classify.onnx, tiny_segment.onnx
  classification            $OUT/classify.jsonl (inputs: $OUT/fmnist_images/)
  segmentation head         $OUT/segment/segment.json, predictions.png (a Fashion-MNIST backbone
                            trained for 30 steps knows nothing of photos: expect mostly background)
  ehm-segment outputs       $OUT/segment_out/*.classes.png, *.overlay.png, $OUT/segment.jsonl
  retrieval                 $OUT/retrieval/index/, eval.txt; verified matches: verified.jsonl,
                            match sheet matches.html; duplicates (pHash): dedup.jsonl, dedup.html
TXT
