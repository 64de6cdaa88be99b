"""The table of benches/retrieval_bench.sh from its results.jsonl: retrieval_table.py RESULTS OUT.md"""
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
fams = ["crop", "rotate_free", "rotate90", "gray", "jitter", "text", "border", "strong",
        "inset", "inset_edit", "collage", "thumbnail"]
head = (["descriptor", "index regions", "query windows", "verify", "mAP", "µAP", "µAP norm.", "R@1"]
        + [f"mAP {f}" for f in fams] + ["index img/s", "query p50 ms", "verify p50 ms", "HNSW R@10"])
lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
for r in rows:
    o = r["overall"]
    cells = [r["descriptor"], r["regions"], r.get("query_regions", "none"), str(r.get("verify", 0)), f'{o["map"]:.3f}',
             f'{r["micro_ap"]:.3f}', f'{r.get("micro_ap_normalised", float("nan")):.3f}', f'{o["recall_at_1"]:.3f}']
    cells += [f'{r["per_family"][f]["map"]:.3f}' if f in r["per_family"] else "–" for f in fams]
    cells += [f'{r["index_images_per_s"]:.1f}', f'{r["query_ms_p50"]:.2f}', f'{r.get("verify_ms_p50", 0):.1f}', f'{r["hnsw_recall_at_10"]:.4f}']
    lines.append("| " + " | ".join(cells) + " |")
# operating points: the threshold for 95 % precision, raw and normalised
lines += ["", "| descriptor | index regions | query windows | verify | scores | threshold @ P 0.90 | recall | threshold @ P 0.95 | recall | threshold @ P 0.99 | recall |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
for r in rows:
    for kind in ["raw", "normalised"]:
        pts = {p["precision"]: p for p in r.get("operating_points", []) if p["scores"] == kind}
        if not pts:
            continue
        cell = lambda p: (f'{pts[p]["threshold"]:.3f}' if pts[p]["threshold"] is not None else "–", f'{pts[p]["recall"]:.3f}')
        c = [x for p in (0.9, 0.95, 0.99) for x in cell(p)]
        lines.append(f'| {r["descriptor"]} | {r["regions"]} | {r.get("query_regions", "none")} | {r.get("verify", 0)} | {kind} | ' + " | ".join(c) + " |")
open(sys.argv[2], "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
