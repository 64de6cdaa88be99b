"""The reference for `ehm-train bench-loader`: torchvision's ImageFolder + DataLoader with PIL,
doing MAE's pretraining transform (RandomResizedCrop(size, scale=(0.2, 1), bicubic) + flip)
and stopping at uint8 CHW tensors, as ehm's loader stops at CHW bytes. Prints one JSON line.
Usage: loader_torchvision.py ROOT --workers W --batch B --batches N [--image-size 224]"""
import argparse, json, time

import torch
import torchvision.transforms as T
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

ap = argparse.ArgumentParser()
ap.add_argument("root")
ap.add_argument("--workers", type=int, default=1)
ap.add_argument("--batch", type=int, default=32)
ap.add_argument("--batches", type=int, default=8)
ap.add_argument("--image-size", type=int, default=224)
a = ap.parse_args()
torch.set_num_threads(1)
tf = T.Compose([
    T.RandomResizedCrop(a.image_size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
    T.RandomHorizontalFlip(),
    T.PILToTensor(),
])
ds = ImageFolder(a.root, transform=tf)
dl = DataLoader(ds, batch_size=a.batch, shuffle=True, num_workers=a.workers, drop_last=True,
                generator=torch.Generator().manual_seed(0))
it = iter(dl)
next(it)  # untimed: the workers' start
t0 = time.perf_counter()
images = 0
for _ in range(a.batches):
    try:
        x, _ = next(it)
    except StopIteration:
        it = iter(dl)
        x, _ = next(it)
    images += x.shape[0]
secs = time.perf_counter() - t0
print(json.dumps({"impl": "torchvision", "data": a.root, "files": len(ds), "image_size": a.image_size,
                  "workers": a.workers, "batch": a.batch, "images": images, "seconds": secs,
                  "images_per_s": images / secs}))
