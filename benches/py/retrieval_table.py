"""The table of benches/retrieval_bench.sh from its results.jsonl: retrieval_table.py RESULTS OUT.md"""
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
fams = ["crop", "rotate_free", "rotate90", "text", "object", "border", "jpeg", "strong"]
head = ["descriptor", "regions", "mAP", "µAP", "R@1", "R@10"] + [f"mAP {f}" for f in fams] + ["index img/s", "query p50 ms", "p99 ms", "HNSW R@10"]
lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
for r in rows:
    o = r["overall"]
    cells = [r["descriptor"], r["regions"], f'{o["map"]:.3f}', f'{r["micro_ap"]:.3f}', f'{o["recall_at_1"]:.3f}', f'{o["recall_at_10"]:.3f}']
    cells += [f'{r["per_family"][f]["map"]:.3f}' for f in fams]
    cells += [f'{r["index_images_per_s"]:.1f}', f'{r["query_ms_p50"]:.2f}', f'{r["query_ms_p99"]:.2f}', f'{r["hnsw_recall_at_10"]:.4f}']
    lines.append("| " + " | ".join(cells) + " |")
open(sys.argv[2], "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
