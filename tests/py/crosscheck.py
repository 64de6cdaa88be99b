"""Independent check of an ehm ONNX file: the official checker (full check, with shape
inference) and Python onnxruntime on one thread. Reads N preprocessed images as raw float32,
writes the named output as raw float32.

    python crosscheck.py MODEL.onnx INPUT.bin N OUTPUT_NAME OUT.bin
"""
import sys

import numpy as np
import onnx
import onnxruntime as ort

model_path, inp, n, output, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
onnx.checker.check_model(model_path, full_check=True)
meta = {p.key: p.value for p in onnx.load(model_path).metadata_props}
assert meta["ehm.task"] in ("backbone", "embed", "classify", "segment"), meta
opts = ort.SessionOptions()
opts.intra_op_num_threads = 1
sess = ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])
shape = sess.get_inputs()[0].shape
x = np.fromfile(inp, dtype=np.float32).reshape(n, 3, shape[2], shape[3])
(y,) = sess.run([output], {"pixel_values": x})
y.astype(np.float32).tofile(out)
print("ok", model_path, y.shape)
