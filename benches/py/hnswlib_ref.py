"""hnswlib on the vectors benches/hnsw.rs wrote (same N, dim, M, ef_construction, same queries):
build time with all threads, single-thread queries/s and recall@10 per ef, and how many indexed
rows a search for their own vector (ef 64) does not find. JSON lines."""
import json, sys, time
import numpy as np
import hnswlib

path, n, dim, nq, m, efc = sys.argv[1], *map(int, sys.argv[2:7])
efs = [int(x) for x in sys.argv[7:]] or [16, 32, 64, 128]
allv = np.fromfile(path, dtype="<f4").reshape(-1, dim)
data, queries = allv[:n], allv[n:n + nq]
sims = queries @ data.T
truth = np.argpartition(-sims, 10, axis=1)[:, :10]
idx = hnswlib.Index(space="ip", dim=dim)
idx.init_index(max_elements=n, M=m, ef_construction=efc, random_seed=7)
t0 = time.perf_counter()
idx.add_items(data, np.arange(n))
build = time.perf_counter() - t0
idx.set_ef(64)  # not timed
labels, _ = idx.knn_query(data, k=1)
unfound = int((labels[:, 0] != np.arange(n)).sum())
idx.set_num_threads(1)
for ef in efs:
    idx.set_ef(max(ef, 10))
    t0 = time.perf_counter()
    hit = 0
    for q, t in zip(queries, truth):
        labels, _ = idx.knn_query(q, k=10)
        hit += len(set(labels[0].tolist()) & set(t.tolist()))
    secs = time.perf_counter() - t0
    print(json.dumps({"impl": "hnswlib", "n": n, "dim": dim, "m": m, "ef_construction": efc, "build_s": build,
                      "ef": ef, "queries_per_s": nq / secs, "recall_at_10": hit / (10 * nq),
                      "unfound_at_ef64": unfound}))
