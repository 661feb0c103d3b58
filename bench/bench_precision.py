"""bf16 autocast vs fp32: the local training step, and what feeding it costs.

1. Step compute: median seconds and peak CUDA memory of one training step (forward, loss,
   backward, optimizer) on a fixed batch of real pacs-mini images already on the device, for
   model.precision fp32 and bf16 (autocast), and their ratio. ViT-B-16, random weights (the cost
   does not depend on them).
2. Input pipeline: seconds to decode and augment one batch with data.num_workers = 0 and = W.
   On a GPU the pipeline, not the step, usually bounds LoRA training: raise data.num_workers.
On a CPU only fp32 is measured (bf16 autocast is a GPU feature here).

    python bench/bench_precision.py [--model ViT-B-16] [--method lora] [--batch 32] [--workers 8]
"""

from __future__ import annotations

import argparse
import time

from _util import client, row, sync, timed, torch

from client import losses
from client.runtime import ClientRuntime
from common import config
from common.model import autocast


def runtime(model, method, precision, batch, workers=0):
    cfg = config.load(None, model__name=model, model__pretrained="", model__precision=precision, method__name=method,
                      optim__batch_size=batch, data__feature_cache=False, data__num_workers=workers)
    node = config.parse_node_config({"partition-id": 0, "num-partitions": 1})
    return ClientRuntime.create(cfg, node, data=client(cfg, n=max(8 * batch, 256)))


def step_cost(model, method, precision, batch):
    rt = runtime(model, method, precision, batch)
    inputs = rt.inputs("train", train=True)
    x, y = next(inputs.batches(batch, shuffle=True, generator=torch.Generator().manual_seed(0)))
    params = [p for _, p in rt.method.trainable_named_parameters()]
    opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    rt.method.train()

    def step():
        with autocast(precision, rt.device):
            logits = rt.method.logits_from_embeddings(inputs.embed(x)).float()
            loss = losses.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = timed(step, rt.device, repeat=10, warmup=3)
    peak = torch.cuda.max_memory_allocated() / 2**20 if rt.device.type == "cuda" else float("nan")
    return seconds, peak


def pipeline_cost(model, method, batch, workers):
    rt = runtime(model, method, "fp32", batch, workers)
    inputs = rt.inputs("train", train=True)
    it = inputs.batches(batch, shuffle=True, generator=torch.Generator().manual_seed(0))
    next(it)  # start the workers
    sync(rt.device)
    t = time.perf_counter()
    n = 0
    for _ in it:
        n += 1
    sync(rt.device)
    return (time.perf_counter() - t) / max(n, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--method", default="lora")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=8)
    args = ap.parse_args()
    precisions = ["fp32", "bf16"] if torch.cuda.is_available() else ["fp32"]
    results = {p: step_cost(args.model, args.method, p, args.batch) for p in precisions}
    print(row("precision", "s/step", "peak MiB"))
    for p, (s, m) in results.items():
        print(row(p, f"{s:.4f}", f"{m:.0f}"))
    if len(results) == 2:
        (s32, m32), (s16, m16) = results["fp32"], results["bf16"]
        print(f"bf16/fp32 step: time x{s16 / s32:.2f}, peak memory x{m16 / m32:.2f} ({args.method}, {args.model}, batch {args.batch})")
    p0 = pipeline_cost(args.model, args.method, args.batch, 0)
    pw = pipeline_cost(args.model, args.method, args.batch, args.workers)
    print(row("input pipeline", "s/batch"))
    print(row("num_workers=0", f"{p0:.4f}"))
    print(row(f"num_workers={args.workers}", f"{pw:.4f}"))
    print(f"pipeline with {args.workers} workers / without: x{pw / p0:.2f}; step/pipeline(0 workers) = {results['fp32'][0] / p0:.2f}")


if __name__ == "__main__":
    main()
