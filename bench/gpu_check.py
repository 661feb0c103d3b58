"""GPU checks that CI (CPU only) cannot make: bf16 autocast training and evaluation on CUDA.

For each method on ViT-B-16 (random weights) on the GPU with model.precision = auto (bf16
autocast): two local rounds on pacs-mini images must give a finite loss and a changed fp32 CPU
state with the same keys; the bf16 evaluation logits must match fp32 ones to bf16 accuracy; the
frozen-feature cache must give identical logits on CUDA; peak CUDA memory is reported.
Exit status 1 if a check fails.

    python bench/gpu_check.py
"""

from __future__ import annotations

import math
import sys
import tempfile

from _util import client, row, torch

from client.runtime import ClientRuntime
from client.train import SplitInputs, predict
from common import config


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    failures = []
    cache = tempfile.mkdtemp(prefix="fedcal-gpu-")
    print(row("method", "loss", "train s/round", "peak MiB", "bf16 vs fp32 rel err", "ok"))
    for name, loss in (("lora", "ce"), ("lora", "carot"), ("adapter", "flyp"), ("coop", "ce"), ("kgcoop", "ce"), ("linear", "ce"), ("full", "carot")):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        cfg = config.load(None, model__name="ViT-B-16", model__pretrained="", method__name=name, loss__name=loss,
                          loss__carot__teacher_every=1, optim__local_steps=4, optim__batch_size=32, optim__name="adamw",
                          optim__lr=1e-5 if name == "full" else 1e-3, data__cache_dir=cache)
        node = config.parse_node_config({"partition-id": 0, "num-partitions": 1})
        rt = ClientRuntime.create(cfg, node, data=client(cfg, n=192))
        s0 = rt.method.trainable_state()
        import time

        t = time.perf_counter()
        out = rt.train(s0, server_round=1, fl_config={"proximal-mu": 0.01})
        out2 = rt.train(out.state, server_round=2, fl_config={}, teacher=out.teacher, carot_step=out.carot_step)
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - t) / 2
        peak = torch.cuda.max_memory_allocated() / 2**20
        ok = math.isfinite(out2.metrics["train-loss"]) and set(out2.state) == set(s0)
        ok &= all(v.dtype == torch.float32 and v.device.type == "cpu" and torch.isfinite(v).all() for v in out2.state.values())
        ok &= any(not torch.equal(out2.state[k], s0[k]) for k in s0)
        rt.method.load_trainable_state(out2.state)
        inputs = SplitInputs(rt.method, rt.cfg, rt.data, "test", rt.clip.preprocess_eval, rt.device, cacheable=False)
        bf16_logits, _ = predict(rt.method, rt.cfg, inputs, rt.device)
        fp32_cfg = rt.cfg.model_copy(update={"model": rt.cfg.model.model_copy(update={"precision": "fp32"})})
        fp32_logits, _ = predict(rt.method, fp32_cfg, inputs, rt.device)
        rel = ((bf16_logits - fp32_logits).norm() / fp32_logits.norm()).item()
        ok &= rel < 3e-2
        if rt.method.image_tower_frozen:
            cached = SplitInputs(rt.method, rt.cfg, rt.data, "test", rt.clip.preprocess_eval, rt.device, cacheable=True)
            cached_logits, _ = predict(rt.method, rt.cfg, cached, rt.device)
            same = torch.equal(cached_logits, bf16_logits)
            ok &= same
        print(row(name, loss, f"{seconds:.3f}", f"{peak:.0f}", f"{rel:.2e}", "yes" if ok else "NO"))
        if not ok:
            failures.append(f"{name}/{loss}")
        del rt
    print("GPU checks: " + ("all passed" if not failures else "FAILED: " + ", ".join(failures)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
