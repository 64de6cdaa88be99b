"""The obvious Python way to classify a folder with an ehm classify model: PIL decode + EXIF
orientation + resize/crop as the model's metadata says, numpy normalisation, onnxruntime in
batches, softmax, top-5. The yardstick for benches/classify_speed.sh (same thread count).
Usage: classify_ref.py MODEL.onnx THREADS BATCH LISTFILE  → prints JSON lines {path, top}."""
import json, sys
import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image, ImageOps

model_path, threads, batch, listfile = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
meta = {p.key: p.value for p in onnx.load(model_path, load_external_data=False).metadata_props}
cfg = json.loads(meta["ehm.config"])["preprocess"]
labels = json.loads(meta["ehm.labels"])
size = cfg["image_size"]
resample = Image.BICUBIC if cfg["interpolation"] == "bicubic" else Image.BILINEAR
mean = np.array(cfg["mean"], np.float32).reshape(3, 1, 1)
std = np.array(cfg["std"], np.float32).reshape(3, 1, 1)

def load(path):
    im = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    if cfg["resize"] == "stretch":
        im = im.resize((size, size), resample)
    else:
        short = size / cfg["crop_pct"]
        w, h = im.size
        s = short / min(w, h)
        im = im.resize((max(size, round(w * s)), max(size, round(h * s))), resample)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
    x = np.asarray(im, np.float32).transpose(2, 0, 1) / 255.0
    return (x - mean) / std

opts = ort.SessionOptions()
opts.intra_op_num_threads = threads
opts.inter_op_num_threads = 1
sess = ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])
paths = [l.strip() for l in open(listfile) if l.strip()]
out = sys.stdout
for i in range(0, len(paths), batch):
    chunk = paths[i:i + batch]
    x = np.stack([load(p) for p in chunk]).astype(np.float32)
    logits = sess.run(["logits"], {"pixel_values": x})[0]
    e = np.exp(logits - logits.max(1, keepdims=True))
    probs = e / e.sum(1, keepdims=True)
    for p, row in zip(chunk, probs):
        top = np.argsort(-row)[:5]
        out.write(json.dumps({"path": p, "top": [{"label": labels[j], "probability": float(row[j])} for j in top]}) + "\n")
