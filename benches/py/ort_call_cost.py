"""One ONNX model's call cost in Python onnxruntime, one thread: the median time of a call at
224² (a session with open input size, as Python users make it), ONNX Runtime's own profile of
that call by operator, and 5 calls of one 140² image against one call of a batch of 5 at 140²
(sessions made for those exact shapes). Run it under tools/avx2_only.sh to see the AVX2 code
paths. Usage: ort_call_cost.py MODEL.onnx   (prints a few lines)"""
import collections, json, os, sys, tempfile, time
import numpy as np
import onnxruntime as ort

model = sys.argv[1]


def session(shape=None, profile=None):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = profile
    if shape:
        names = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"]).get_inputs()[0].shape
        for d, v in zip(names, shape):
            if isinstance(d, str):
                so.add_free_dimension_override_by_name(d, v)
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def median_ms(s, x, calls=1, reps=15):
    name = s.get_inputs()[0].name
    for _ in range(2):
        s.run(None, {name: x})
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(calls):
            s.run(None, {name: x})
        ts.append(time.perf_counter() - t)
    return 1000 * float(np.median(ts))


rng = np.random.default_rng(0)
x224 = rng.random((1, 3, 224, 224), dtype=np.float32)
print(f"{os.path.basename(model)}: one 224² call {median_ms(session(), x224):.1f} ms (median of 15)")

with tempfile.TemporaryDirectory() as tmp:
    s = session(profile=os.path.join(tmp, "p"))
    name = s.get_inputs()[0].name
    for _ in range(10):
        s.run(None, {name: x224})
    events = json.load(open(s.end_profiling()))
per_op = collections.Counter()
for e in events:
    if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
        per_op[e["args"]["op_name"]] += e["dur"]
total = sum(per_op.values())
print("profile of a 224² call (10 calls), by operator:")
for op, us in per_op.most_common(6):
    print(f"  {op:24s} {100 * us / total:5.1f} %  {us / 10 / 1000:6.1f} ms per call")

x140 = rng.random((1, 3, 140, 140), dtype=np.float32)
one = median_ms(session((1, 3, 140, 140)), x140, calls=5, reps=9)
five = median_ms(session((5, 3, 140, 140)), np.repeat(x140, 5, axis=0), reps=9)
print(f"140², exact-shape sessions: 5 calls of 1 image {one:.1f} ms, 1 call of 5 images {five:.1f} ms")
