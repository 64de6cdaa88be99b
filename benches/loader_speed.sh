#!/usr/bin/env bash
# The training data path per core: ehm's loader (`ehm-train bench-loader`: decode +
# RandomResizedCrop(224, scale 0.2–1, bicubic) + flip → CHW bytes, whole batches per worker
# thread) vs torchvision's ImageFolder + DataLoader with PIL doing the same transform to uint8
# tensors (benches/py/loader_torchvision.py), on the same files and cores, alternated REPS
# times in one call. Three sets made from the registry photos: as shipped (JPEG wallpapers of
# ~5 MP, WebP and PNG), the JPEGs alone, and all of them re-encoded ImageNet-sized (shorter
# side 375 px, JPEG quality 90). Usage: benches/loader_speed.sh [OUT.jsonl]  (REPS=2 WORKERS="1 2")
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/loader_speed.jsonl}
REPS=${REPS:-2}; WORKERS=${WORKERS:-"1 2"}; BATCH=32
T=${BIN:-./target/release}/ehm-train
tools/setup.sh all >&2; tools/setup.sh torchref >&2
PY=.cache/torchref/bin/python
if [ -z "${BIN:-}" ]; then cargo build --release --bin ehm-train >&2; fi
mkdir -p "$(dirname "$OUT")"; : > "$OUT"
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
# the registry photos are unpacked on first use
[ -f .cache/photos/.complete ] || $T bench-loader --data photos --batches 1 >/dev/null
photos=.cache/photos
mkdir -p "$work/shipped/all" "$work/jpeg/all" "$work/imagenet_sized/all"
for f in "$photos"/*.jpg "$photos"/*.webp "$photos"/*.png; do ln -s "$(realpath "$f")" "$work/shipped/all/"; done
for f in "$photos"/*.jpg; do ln -s "$(realpath "$f")" "$work/jpeg/all/"; done
"$PY" - "$work/shipped/all" "$work/imagenet_sized/all" <<'PY'
import os, sys
from PIL import Image
src, dst = sys.argv[1:]
for f in sorted(os.listdir(src)):
    im = Image.open(os.path.join(src, f)).convert("RGB")
    w, h = im.size; s = 375 / min(w, h)
    im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)
    im.save(os.path.join(dst, os.path.splitext(f)[0] + ".jpg"), quality=90)
PY
batches() { case $1 in imagenet_sized) echo 24 ;; *) echo 6 ;; esac; }
for r in $(seq "$REPS"); do
  for set in shipped jpeg imagenet_sized; do
    for w in $WORKERS; do
      n=$(batches "$set")
      $T bench-loader --data "folder:$work/$set" --workers "$w" --batch $BATCH --batches "$n" \
        | python3 -c 'import json,sys; r=json.loads(sys.stdin.read()); r["set"]=sys.argv[1]; print(json.dumps(r))' "$set" >> "$OUT"
      OMP_NUM_THREADS=1 "$PY" -W ignore benches/py/loader_torchvision.py "$work/$set" --workers "$w" --batch $BATCH --batches "$n" \
        | python3 -c 'import json,sys; r=json.loads(sys.stdin.read()); r["set"]=sys.argv[1]; print(json.dumps(r))' "$set" >> "$OUT"
    done
  done
done
python3 - "$OUT" <<'PY'
import json, sys, statistics as st
rows = [json.loads(l) for l in open(sys.argv[1])]
keys = sorted({(r["set"], r["workers"]) for r in rows}, key=lambda k: (["shipped", "jpeg", "imagenet_sized"].index(k[0]), k[1]))
print(f"{'set':<15} {'workers':>7} {'ehm img/s':>18} {'torchvision img/s':>18} {'ehm / torchvision':>17} {'ehm per worker':>14}")
for s, w in keys:
    e = [r["images_per_s"] for r in rows if (r["set"], r["workers"], r["impl"]) == (s, w, "ehm")]
    t = [r["images_per_s"] for r in rows if (r["set"], r["workers"], r["impl"]) == (s, w, "torchvision")]
    fmt = lambda v: "/".join("%.0f" % x for x in v)
    print(f"{s:<15} {w:>7} {fmt(e):>18} {fmt(t):>18} {st.mean(e) / st.mean(t):>17.2f} {st.mean(e) / w:>14.1f}")
PY
