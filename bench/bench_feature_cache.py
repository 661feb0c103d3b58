"""Frozen-feature cache: time of one federated round (evaluate + train) with and without it.

In deployment every message is a fresh process, so without the cache a client re-encodes all its
images every round. Prints seconds per round for: no cache, a cold cache (first round: encode and
store), a warm cache (later rounds), and the warm/no-cache ratio. Method: FedCLIP's adapter.

    python bench/bench_feature_cache.py [--model ViT-B-32] [--images 512]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

from _util import client, row, sync, torch

from client.runtime import ClientRuntime
from common import config


def one_round(cfg, data, device) -> float:
    sync(device)
    t = time.perf_counter()
    node = config.parse_node_config({"partition-id": 0, "num-partitions": 1})
    rt = ClientRuntime.create(cfg, node, data=data)  # a fresh process would rebuild everything too
    state = rt.method.trainable_state()
    rt.train(state, server_round=1, fl_config={})
    rt.evaluate_split("test")
    sync(device)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--images", type=int, default=512)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cache = tempfile.mkdtemp(prefix="fedcal-bench-")
    try:
        base = dict(model__name=args.model, model__pretrained="", method__name="adapter", optim__local_epochs=1,
                    optim__batch_size=32, data__cache_dir=cache, optim__name="adam", optim__lr=5e-5)
        on = config.load(None, **base, data__feature_cache=True)
        off = config.load(None, **base, data__feature_cache=False)
        data = client(on, n=args.images)
        one_round(off, data, device)  # warm-up: imports, kernels
        t_off = min(one_round(off, data, device) for _ in range(2))
        t_cold = one_round(on, data, device)
        t_warm = min(one_round(on, data, device) for _ in range(2))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    print(row("round", "seconds"))
    print(row("no cache", f"{t_off:.3f}"))
    print(row("cold cache", f"{t_cold:.3f}"))
    print(row("warm cache", f"{t_warm:.3f}"))
    print(f"warm cache / no cache: x{t_warm / t_off:.3f} ({args.model}, {args.images} images, {device.type})")


if __name__ == "__main__":
    main()
