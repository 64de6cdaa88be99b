"""The table of benches/compare_ehm.sh from its cells.jsonl: compare_table.py CELLS OUT.md
(mean ± std over seeds per model and masking; percentages for accuracies, scores as is)."""
import json, statistics as st, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
cols = [("knn_top1", "FMNIST kNN %", 100), ("retrieval_map", "retrieval mAP", 1),
        ("seg_object_iou", "object IoU %", 100), ("seg_miou", "seg mIoU %", 100), ("asa8", "ASA@8", 1), ("br8", "BR@8", 1),
        ("iou8", "best IoU@8", 1)]
def fmt(v, scale):
    v = [scale * x for x in v]
    digits = 1 if scale == 100 or max(v) > 10 else 3
    return f"{st.mean(v):.{digits}f} ± {st.stdev(v):.{digits}f}" if len(v) > 1 else f"{v[0]:.{digits}f}"
lines = ["| model | masking | seeds | " + " | ".join(c[1] for c in cols) + " |",
         "|---|---|---|" + "---|" * len(cols)]
for model in dict.fromkeys(r["model"] for r in rows):
    rm = [r for r in rows if r["model"] == model]
    for m in dict.fromkeys(r["masking"] for r in rm):
        rs = [r for r in rm if r["masking"] == m]
        name = "*untrained*" if m == "none" else m
        lines.append(f"| {model} | {name} | {len(rs)} | " + " | ".join(fmt([r[c] for r in rs], k) for c, _, k in cols) + " |")
    g = rm[0]
    lines.append(f"| {model} | *fixed grid, 8 blocks* | | | | | | {g['grid_asa8']:.3f} | {g['grid_br8']:.3f} | {g['grid_iou8']:.3f} |")
open(sys.argv[2], "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
