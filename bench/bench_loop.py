"""P3: fedcal's local training loop against a bare PyTorch loop doing the same work.

Both train FL²oRA's LoRA on the same CLIP (random weights: the cost does not depend on them) for
the same number of steps on the same pacs-mini batches (the same data path: fedcal's SplitInputs
with RRC + flip augmentation), with AdamW at the same learning rate:

  fedcal = client.train.local_train: the Objective (named terms), the lr schedule, the finiteness
           check, the tallies, the progress line;
  bare   = for x, y in batches: loss = cross_entropy(logits(x), y); zero_grad; backward; step.

They run interleaved (fedcal, bare, fedcal, bare, ...) so that a shared machine slows both alike.
Printed: steps per second of each (median) and fedcal / bare (goal >= 0.9).

    python bench/bench_loop.py [--model ViT-B-32] [--steps 10] [--batch 16] [--repeat 3] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

from _util import DATA, sync, torch


def runtime(model: str, batch: int, steps: int, device: str):
    from client.runtime import ClientRuntime
    from common import config

    cfg = config.load(None, model__name=model, model__pretrained="", model__device=device, method__name="lora", data__path=str(DATA),
                      data__partitioner="iid", data__max_per_client=batch * steps, optim__batch_size=batch, optim__local_steps=steps,
                      optim__name="adamw", optim__lr=1e-4, optim__schedule="constant", fl__rounds=1)
    return ClientRuntime.create(cfg, config.parse_node_config({"partition-id": 0, "num-partitions": 1}))


def fedcal_loop(rt, state: dict) -> float:
    t = time.perf_counter()
    rt.train(state, server_round=1, fl_config={})
    sync(rt.device)
    return time.perf_counter() - t


def bare_loop(rt, state: dict) -> float:
    """The same steps with nothing but the forward, the loss and the optimizer step."""
    rt.method.load_trainable_state(state)
    params = [p for _, p in rt.method.trainable_named_parameters()]
    optimizer = torch.optim.AdamW(params, lr=rt.cfg.optim.lr, weight_decay=rt.cfg.optim.weight_decay)
    inputs = rt.inputs("train", train=True)
    generator = torch.Generator().manual_seed(0)
    rt.method.train()
    t = time.perf_counter()
    done = 0
    while done < rt.cfg.optim.local_steps:
        for x, y in inputs.batches(rt.cfg.optim.batch_size, shuffle=True, generator=generator):
            x, y = x.to(rt.device), y.to(rt.device)
            loss = torch.nn.functional.cross_entropy(rt.method.logits_from_embeddings(inputs.embed(x)), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done += 1
            if done >= rt.cfg.optim.local_steps:
                break
    sync(rt.device)
    rt.method.eval()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    rt = runtime(args.model, args.batch, args.steps, args.device)
    state = rt.method.trainable_state()
    fedcal_loop(rt, state)  # warm-up: allocator, kernels, the data path
    ours, bare = [], []
    for _ in range(args.repeat):
        ours.append(fedcal_loop(rt, state))
        bare.append(bare_loop(rt, state))
    a, b = statistics.median(ours), statistics.median(bare)
    print(f"## P3: local training loop, LoRA on {args.model}, {args.steps} steps of batch {args.batch}, {args.device}\n")
    print(f"| loop | steps / s (median of {args.repeat}) |\n|---|---|")
    print(f"| fedcal local_train | {args.steps / a:.3f} |")
    print(f"| bare PyTorch loop | {args.steps / b:.3f} |")
    print(f"\nfedcal / bare = **{b / a:.3f}x** (goal >= 0.9)")


if __name__ == "__main__":
    main()
