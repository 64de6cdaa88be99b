"""The table of benches/compare_masking.sh (mean ± std over seeds) from its cells.jsonl:
grid_table.py CELLS OUT.md"""
import json, statistics as st, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
cols = [("knn_top1", "kNN top-1 %"), ("probe_top1", "linear probe top-1 %"),
        ("finetune_top1", "fine-tune top-1 %"), ("seg_miou", "seg mIoU %"),
        ("seg_pixel_acc", "seg pixel acc %")]
def fmt(v):
    v = [100 * x for x in v]
    return f"{st.mean(v):.2f} ± {st.stdev(v):.2f}" if len(v) > 1 else f"{v[0]:.2f}"
lines = ["| masking | seeds | " + " | ".join(c[1] for c in cols) + " |",
         "|---|---|" + "---|" * len(cols)]
for m in dict.fromkeys(r["masking"] for r in rows):
    rs = [r for r in rows if r["masking"] == m]
    lines.append(f"| {m} | {len(rs)} | " + " | ".join(fmt([r[c] for r in rs]) for c, _ in cols) + " |")
open(sys.argv[2], "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
