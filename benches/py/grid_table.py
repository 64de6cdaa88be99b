"""The table of benches/compare_masking.sh (mean ± std over seeds) from its cells.jsonl:
grid_table.py CELLS OUT.md. A column appears when its stage ran (STAGES)."""
import json, statistics as st, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
# (key, header, scale, decimals)
cols = [("steps", "steps", 1, 0), ("first_loss", "first loss", 1, 3),
        ("pretrain_loss", "last loss", 1, 3),
        ("pretrain_images_per_s", "pretrain images/s", 1, 1),
        ("knn_top1", "kNN top-1 %", 100, 2), ("probe_top1", "linear probe top-1 %", 100, 2),
        ("finetune_top1", "fine-tune top-1 %", 100, 2), ("seg_miou", "seg mIoU %", 100, 2),
        ("seg_pixel_acc", "seg pixel acc %", 100, 2)]
cols = [c for c in cols if all(c[0] in r for r in rows)]
def fmt(v, scale, dec):
    v = [scale * x for x in v]
    if len(v) > 1 and st.stdev(v) > 0:
        return f"{st.mean(v):.{dec}f} ± {st.stdev(v):.{dec}f}"
    return f"{st.mean(v):.{dec}f}"
lines = ["| masking | seeds | " + " | ".join(c[1] for c in cols) + " |",
         "|---|---|" + "---:|" * len(cols)]
for m in dict.fromkeys(r["masking"] for r in rows):
    rs = [r for r in rows if r["masking"] == m]
    lines.append(f"| {m} | {len(rs)} | "
                 + " | ".join(fmt([r[k] for r in rs], sc, d) for k, _, sc, d in cols) + " |")
open(sys.argv[2], "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
