"""How local verification's constants were chosen (retrieval::verify: MIN_INLIERS, FULL_SHARE,
WEIGHT), on a tuning benchmark that is not the one reported:

    ehm-retrieve make-bench -o dev --originals 30 --seed 7
    ehm-retrieve index -i ix -m MODEL_WITH_PATCH_TOKENS.onnx --regions standard - < dev/database.txt
    cut -d'"' -f4 dev/ground_truth.jsonl | ehm-retrieve query -i ix --verify 10 -k 10 --format jsonl - > q.jsonl
    python3 benches/py/verify_tuning.py dev/ground_truth.jsonl q.jsonl PATCHES   (64 shipped, 256 DINOv2-S/14)

Prints the inlier distributions of true and unrelated (query, candidate) pairs, then the mAP
(one right image per query, top 10) without verification and with the score rule
score + (1 − score) · w · clamp((inliers − min) / (max(share · PATCHES, min + 4) − min), 0, 1)
re-applied to each match's global score over a grid of (w, min, share)."""
import collections, json, os, sys

truth = {json.loads(l)["query"]: json.loads(l) for l in open(sys.argv[1])}
patches = int(sys.argv[3])
queries = []  # (family, [(global score, inliers, exact, is the original)])
for l in open(sys.argv[2]):
    r = json.loads(l)
    t = truth[r["query"]]
    orig = os.path.realpath(t["original"])
    ms = []
    for m in r["matches"]:
        v = m.get("verification") or {}
        ms.append((v.get("global_score", m["score"]), v.get("inliers", 0), m.get("exact", False),
                   os.path.realpath(m["path"]) == orig))
    queries.append((t["family"], ms))


def percentiles(xs, name):
    xs = sorted(xs)
    if xs:
        q = lambda p: xs[min(len(xs) - 1, int(p * len(xs)))]
        print(f"{name:24s} n={len(xs):5d}  inliers p50 {q(.5):3d}  p90 {q(.9):3d}  p99 {q(.99):3d}  max {xs[-1]:3d}")


percentiles([m[1] for _, ms in queries for m in ms if m[3]], "the original")
percentiles([m[1] for _, ms in queries for m in ms if not m[3]], "unrelated candidates")


def mean_ap(w, lo, share):
    fam = collections.defaultdict(list)
    full = max(share * patches, lo + 4)
    for f, ms in queries:
        def key(m):
            g, inl, exact, _ = m
            e = min(1.0, max(0.0, (inl - lo) / (full - lo)))
            return g + max(0.0, 1 - g) * w * e + (4 if exact else 0)
        ranked = sorted(ms, key=key, reverse=True)
        fam[f].append(next((1 / (i + 1) for i, m in enumerate(ranked) if m[3]), 0.0))
    every = [a for v in fam.values() for a in v]
    return sum(every) / len(every), {f: round(sum(v) / len(v), 3) for f, v in sorted(fam.items())}


base, per = mean_ap(0, 0, 1)
print(f"no verification: mAP {base:.4f}", per)
print("w    min  share 0.10  0.15  0.20  0.30  0.50")
for w in (0.3, 0.5, 0.7, 1.0):
    for lo in (4, 6, 8, 10):
        print(f"{w:<4} {lo:<4}      " + "  ".join(f"{mean_ap(w, lo, s)[0]:.4f}" for s in (0.1, 0.15, 0.2, 0.3, 0.5)))
m, per = mean_ap(0.5, 6, 0.15)
print(f"chosen (w 0.5, min 6, share 0.15): mAP {m:.4f}", per)
