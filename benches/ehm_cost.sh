#!/usr/bin/env bash
# What EHM costs per step: `ehm-train bench` with random masking and with EHM under several
# affinity settings, in the same call on the same machine; prints images/s and the EHM / random
# step-time ratio (the goal: ≤ 1.25). CPU by default (fp32); on a GPU machine pass DTYPE=bf16.
# Usage: benches/ehm_cost.sh [OUT.jsonl]   (MODEL=tiny IMG=32 PATCH=4 BATCH=128 STEPS=20 WARMUP=5
#        VARIANTS="attention:all cosine:all cosine:first:3 cosine:first:4")
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/ehm_cost.jsonl}
MODEL=${MODEL:-tiny}; IMG=${IMG:-32}; PATCH=${PATCH:-4}; BATCH=${BATCH:-128}
STEPS=${STEPS:-20}; WARMUP=${WARMUP:-5}; DTYPE=${DTYPE:-fp32}
VARIANTS=${VARIANTS:-"attention:all cosine:all cosine:first:3 cosine:first:4"}
T=${BIN:-./target/release}/ehm-train
if [ -z "${BIN:-}" ]; then tools/setup.sh libs >&2; cargo build --release --bin ehm-train >&2; fi
mkdir -p "$(dirname "$OUT")"; : > "$OUT"
common=(bench --model "$MODEL" --img "$IMG" --patch "$PATCH" --batch "$BATCH" --steps "$STEPS" --warmup "$WARMUP" --dtype "$DTYPE" --json "$OUT")
# random first and last: the machine's drift during the call shows in their difference
$T "${common[@]}" --masking random >/dev/null
for v in $VARIANTS; do
  src=${v%%:*}; blocks=${v#*:}
  $T "${common[@]}" --masking ehm --affinity "$src" --affinity-blocks "$blocks" >/dev/null
done
$T "${common[@]}" --masking random >/dev/null
python3 - "$OUT" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
rand = [r for r in rows if r["masking"] == "random"]
# the faster random run is the base (a slow first run — clocks, a process still exiting — would
# flatter EHM); a spread over 10 % is flagged
base = min(r["step_s_mean"] for r in rand)
spread = max(r["step_s_mean"] for r in rand) / base - 1
r0 = rows[0]
print(f"{r0['device']} ViT-{r0['model']} {r0['img']}px/p{r0['patch']} batch {r0['batch']} {r0['dtype']}; "
      "random " + ", ".join("%.1f" % r["images_per_s"] for r in rand) + " img/s (first / last of the call)"
      + (f"; they differ by {spread:.0%}: ratios use the faster" if spread > 0.1 else ""))
print(f"{'masking':<8} {'affinity':<11} {'blocks':<9} {'img/s':>7} {'teacher s':>9} {'on device':>9} {'tree s':>7} {'step / random':>13}")
for r in rows:
    if r["masking"] != "ehm":
        continue
    b = r["affinity_blocks"]
    blocks = "all" if not b else (f"first:{len(b)}" if b == list(range(len(b))) else ",".join(map(str, b)))
    print(f"{'ehm':<8} {r['affinity']:<11} {blocks:<9} {r['images_per_s']:>7.1f} {r['teacher_s_mean']:>9.3f} {r.get('teacher_device_s_mean') or 0:>9.3f} "
          f"{r['hierarchy_s_mean']:>7.4f} {r['step_s_mean'] / base:>13.2f}")
PY
