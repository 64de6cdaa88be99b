"""Where the time of the Python yardstick goes, and what ONNX Runtime costs per image with one or
two threads at calls of 1, 8 and 32 images (random input): the numbers behind the session-pool
design of ehm-classify; then ONNX Runtime's own profile (one thread, calls of 8): the share of
kernel time by operator type. ort_breakdown.py MODEL.onnx LISTFILE  → tables on stdout."""
import collections, json, os, sys, tempfile, time
import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image, ImageOps

model_path, listfile = sys.argv[1], sys.argv[2]
cfg = json.loads({p.key: p.value for p in onnx.load(model_path, load_external_data=False).metadata_props}["ehm.config"])["preprocess"]
size = cfg["image_size"]
paths = [l.strip() for l in open(listfile) if l.strip()][:100]
t = time.perf_counter()
ims = [ImageOps.exif_transpose(Image.open(p)).convert("RGB") for p in paths]
dec = (time.perf_counter() - t) / len(paths)
t = time.perf_counter()
for im in ims:
    np.asarray(im.resize((size, size), Image.BICUBIC), np.float32)
rs = (time.perf_counter() - t) / len(paths)
print(f"{model_path}: PIL decode {1000 * dec:.1f} ms/img, resize + to float {1000 * rs:.1f} ms/img")
print(f"{'threads':>7} {'images/call':>11} {'ms/img (wall)':>14} {'core-ms/img':>12}")
for threads in (1, 2):
    for bs in (1, 8, 32):
        o = ort.SessionOptions()
        o.intra_op_num_threads, o.inter_op_num_threads = threads, 1
        s = ort.InferenceSession(model_path, o, providers=["CPUExecutionProvider"])
        x = np.random.RandomState(0).randn(bs, 3, size, size).astype(np.float32)
        s.run(None, {"pixel_values": x})
        calls = max(2, 64 // bs)
        t = time.perf_counter()
        for _ in range(calls):
            s.run(None, {"pixel_values": x})
        ms = 1000 * (time.perf_counter() - t) / (calls * bs)
        print(f"{threads:>7} {bs:>11} {ms:>14.1f} {ms * threads:>12.1f}")
o = ort.SessionOptions()
o.intra_op_num_threads, o.inter_op_num_threads = 1, 1
o.enable_profiling = True
o.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "ort")
s = ort.InferenceSession(model_path, o, providers=["CPUExecutionProvider"])
x = np.random.RandomState(0).randn(8, 3, size, size).astype(np.float32)
for _ in range(3):
    s.run(None, {"pixel_values": x})
share = collections.Counter()
for e in json.load(open(s.end_profiling())):
    if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
        share[e["args"]["op_name"]] += e["dur"]
total = sum(share.values())
print("kernel time by operator (1 thread, calls of 8): " + ", ".join(
    f"{op} {100 * t / total:.1f} %" for op, t in share.most_common(6)))
