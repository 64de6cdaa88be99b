#!/usr/bin/env bash
# Export time and file size for tiny/small/base at 224 px (initial weights; the graph and the
# sizes do not depend on training). Prints a table. Usage: benches/export_sizes.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins >&2
T=$(mktemp -d)
printf '%-18s %-6s %10s %10s %9s\n' model dtype params_M size_MB export_s
for m in vit_tiny_p16_224 vit_small_p16_224 vit_base_p16_224; do
  ./target/release/ehm-train init --model $m --out "$T/$m" >/dev/null
  for f in fp32 fp16; do
    flag=""; [ $f = fp16 ] && flag=--fp16
    s=$(date +%s.%N)
    j=$(./target/release/ehm-export onnx "$T/$m" --task embed $flag -o "$T/$m.$f.onnx" --json)
    e=$(date +%s.%N)
    python3 -c "import json,sys; j=json.loads(sys.argv[1]); print(f'{sys.argv[2]:<18} {sys.argv[3]:<6} {j[\"parameters\"]/1e6:>10.2f} {j[\"bytes\"]/1e6:>10.1f} {float(sys.argv[5])-float(sys.argv[4]):>9.2f}')" "$j" $m $f $s $e
  done
done
rm -rf "$T"
