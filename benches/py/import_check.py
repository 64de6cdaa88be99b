"""Check an `ehm-export import` embed model against its source: run the source model in Python
onnxruntime with the cut tensor added as an output, compute CLS ⊕ GeM(p=4) + L2 in numpy, compare
with the adopted model's `embedding` on the same random batch. Prints one JSON line.
import_check.py SOURCE.onnx TOKENS ADOPTED.onnx IMAGE_SIZE"""
import json, sys
import numpy as np
import onnx
import onnxruntime as ort

src, tokens, adopted, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
m = onnx.load(src)
m.graph.output.append(onnx.helper.make_tensor_value_info(tokens, onnx.TensorProto.FLOAT, None))
s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
x = np.random.RandomState(0).randn(2, 3, size, size).astype(np.float32)
t = s.run([tokens], {s.get_inputs()[0].name: x})[0]
gem = (np.maximum(t[:, 1:], 1e-6) ** 4).mean(1) ** 0.25
e = np.concatenate([t[:, 0], gem], 1)
e /= np.linalg.norm(e, axis=1, keepdims=True)
a = ort.InferenceSession(adopted, providers=["CPUExecutionProvider"]).run(["embedding"], {"pixel_values": x})[0]
print(json.dumps({"source": src, "tokens": tokens, "tokens_shape": list(t.shape),
                  "embedding_shape": list(a.shape), "max_abs_diff": float(np.abs(a - e).max())}))
