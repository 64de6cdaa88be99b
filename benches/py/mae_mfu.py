"""Model FLOP utilisation of MAE steps from a step-throughput results file.

Counts the matrix-multiply FLOPs of one training image (forward × 3 for forward + backward) the
way the MFU literature does: every Linear (2·in·out per token), the attention products
(2·2·N·d per token and block), the patch embedding over all patches (MAE embeds every patch,
then drops the masked ones) and the decoder over all N + 1 tokens; layer norms, softmax and
the optimizer are left out. Model sizes as benches/py/mae_reference.py.

Usage: python3 benches/py/mae_mfu.py RESULTS.jsonl [--peak-tflops 790]
(790 TFLOP/s: the bf16 matrix rate an 8192³ product reached on the H200 here.)
"""
import argparse
import json

SIZES = {  # name: (embed_dim, depth, dec_dim, dec_depth) as mae_reference.py
    "tiny": (192, 12, 128, 4),
    "small": (384, 12, 256, 4),
    "base": (768, 12, 512, 8),
}


def block_flops(tokens, dim, mlp_ratio=4):
    linear = 2 * tokens * dim * (3 * dim + dim + 2 * mlp_ratio * dim)  # qkv, proj, fc1, fc2
    attention = 2 * 2 * tokens * tokens * dim  # q·kᵀ and attn·v
    return linear + attention


def train_flops_per_image(model, img, patch, mask_ratio=0.75):
    d, depth, dd, ddepth = SIZES[model]
    n = (img // patch) ** 2
    keep = int(n * (1 - mask_ratio))
    pix = patch * patch * 3
    fwd = 2 * n * pix * d  # patch embedding (all patches)
    fwd += depth * block_flops(keep + 1, d)  # encoder on the kept tokens + class token
    fwd += 2 * (keep + 1) * d * dd  # decoder embedding
    fwd += ddepth * block_flops(n + 1, dd)  # decoder on every position
    fwd += 2 * n * dd * pix  # prediction head
    return 3 * fwd


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results")
    ap.add_argument("--peak-tflops", type=float, default=790.0)
    a = ap.parse_args()
    print(f"{'impl':<18} {'model':<6} {'img':>4} {'masking':<8} {'compile':<7} {'img/s':>8} "
          f"{'GFLOP/img':>9} {'TFLOP/s':>8} {'MFU':>6}")
    for line in open(a.results):
        r = json.loads(line)
        if "model" not in r or r.get("model") not in SIZES:
            continue
        f = train_flops_per_image(r["model"], r["img"], r["patch"], r.get("mask_ratio", 0.75))
        tflops = f * r["images_per_s"] / 1e12
        print(f"{r['impl']:<18} {r['model']:<6} {r['img']:>4} {r.get('masking', 'random'):<8} "
              f"{str(r.get('compile', '')):<7} {r['images_per_s']:>8.0f} {f / 1e9:>9.1f} "
              f"{tflops:>8.1f} {tflops / a.peak_tflops:>6.1%}")


if __name__ == "__main__":
    main()
