"""A/B of how the exporter writes GELU, on one model file: as exported (x / √2 → Erf, which ONNX
Runtime's optimizer fuses into one Gelu / BiasGelu kernel) against the same graph with the Div
turned into a Mul by 1/√2 (the earlier form, left unfused). ONNX Runtime, one thread, calls of 8
random images, the two alternated three times.  gelu_form_ab.py MODEL.onnx → a table on stdout."""
import sys, tempfile, time
import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

path = sys.argv[1]
m = onnx.load(path)
m.graph.initializer.append(numpy_helper.from_array(np.array(1 / np.sqrt(2.0), np.float32), "ab.inv_sqrt2"))
changed = 0
for n in m.graph.node:
    if n.op_type == "Div" and "const.sqrt2" in n.input:
        n.op_type, n.input[1] = "Mul", "ab.inv_sqrt2"
        changed += 1
if changed == 0:
    sys.exit(f"{path}: no Div by const.sqrt2 (exported before the fusable GELU form?)")
mul_form = tempfile.mktemp(suffix=".onnx")
onnx.save(m, mul_form)
size = [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim][2]
x = np.random.RandomState(0).randn(8, 3, size, size).astype(np.float32)
def session(p):
    o = ort.SessionOptions()
    o.intra_op_num_threads, o.inter_op_num_threads = 1, 1
    s = ort.InferenceSession(p, o, providers=["CPUExecutionProvider"])
    s.run(None, {"pixel_values": x})
    return s
sessions = {"div (fused Gelu)": session(path), "mul (unfused)": session(mul_form)}
times = {k: [] for k in sessions}
for _ in range(3):
    for k, s in sessions.items():
        t = time.perf_counter()
        for _ in range(4):
            s.run(None, {"pixel_values": x})
        times[k].append(1000 * (time.perf_counter() - t) / 32)
print(f"{path}: {changed} GELUs; ms/img, 1 thread, calls of 8, three alternated rounds")
for k, v in times.items():
    print(f"  {k:<18} " + "  ".join(f"{t:6.1f}" for t in v))
