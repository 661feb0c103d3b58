"""Cost of splitting open_clip's packed attention into q/k/v/out linear layers.

fedcal runs every method on CLIP with split attention (so LoRA can sit on q, k and v separately
and B = 0 is exactly zero-shot). Prints the median image-encoder forward time (inference, batch
64) of open_clip's original model and the split one, the ratio, and the largest difference of the
embeddings.

    python bench/bench_attention.py [--model ViT-B-16] [--batch 64]
"""

from __future__ import annotations

import argparse

from _util import row, timed, torch

from common.methods.attention import split_attention
from common.model import autocast, load_clip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = "bf16" if device.type == "cuda" else "fp32"
    ref = load_clip(args.model, None, device=device).model
    split = load_clip(args.model, None, device=device).model
    split_attention(split)
    size = ref.visual.image_size
    size = size if isinstance(size, int) else size[0]
    images = torch.randn(args.batch, 3, size, size, device=device)

    @torch.no_grad()
    def run(model):
        with autocast(precision, device):
            return model.encode_image(images)

    t_ref = timed(lambda: run(ref), device, repeat=10, warmup=3)
    t_split = timed(lambda: run(split), device, repeat=10, warmup=3)
    diff = (run(ref).float() - run(split).float()).abs().max().item()
    print(row("attention", "s/forward"))
    print(row("open_clip (packed MHA)", f"{t_ref:.4f}"))
    print(row("split q/k/v/out", f"{t_split:.4f}"))
    print(f"split / packed: x{t_split / t_ref:.3f}; max |diff| {diff:.2e} ({args.model}, batch {args.batch}, {precision}, {device.type})")


if __name__ == "__main__":
    main()
