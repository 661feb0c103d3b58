"""P1 and P5: the trainable state on the wire, and the server's work on 100 replies.

P1 - bytes on the wire per client-round, counted as Flower 1.42 serialises a message (the sum of
its inflatable objects: records, arrays, array chunks), for the packed format (one contiguous
array per dtype + manifest digest) and for the former one-Array-per-tensor format, divided by the
raw fp32 bytes of the trainable tensors and compared with a full-model FedAvg message.
P5 - CPU seconds of the server's validation (decode, size/shape/finite checks, update norm) and
FedAvg aggregation of 100 LoRA replies, packed vs per tensor, measured in the same run.

    python bench/bench_wire.py [--replies 100]
"""

from __future__ import annotations

import argparse
import time

from _util import np, row, torch

from common import config
from common.methods import build_method
from common.model import load_clip
from common.tensors import Manifest, pack, to_record


def wire_bytes(arrays) -> tuple[int, int]:
    """(bytes, objects) of a train reply carrying ``arrays``, as Flower ships it."""
    from flwr.app import Message, MetricRecord, RecordDict
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    msg = Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 32, "train-loss": 0.5})}), dst_node_id=1, message_type="train")
    objects = get_all_nested_objects(msg)
    return sum(len(o.deflate()) for o in objects.values()), len(objects)


def state_of(arch: str, method: str):
    cfg = config.load(None, model__name=arch, model__pretrained="", method__name=method)
    clip = load_clip(arch, None)
    m = build_method(cfg, clip, [f"class {i}" for i in range(7)])
    # a trained update: every tensor differs (Flower stores identical objects once, e.g. LoRA's B = 0 at init)
    g = torch.Generator().manual_seed(1)
    update = {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in m.trainable_state().items()}
    return update, {k: v.detach().clone() for k, v in clip.model.state_dict().items()}


def p1() -> None:
    print("## P1: bytes on the wire per client-round\n")
    print(row("| model, method", "tensors", "raw fp32 bytes", "per-tensor bytes (objects)", "packed bytes (objects)", "per-tensor / raw", "packed / raw", "full-model message / packed |"))
    print("|---|---|---|---|---|---|---|---|")
    for arch, method in (("ViT-B-16", "lora"), ("ViT-B-32", "adapter")):
        state, full = state_of(arch, method)
        raw = sum(v.numel() * 4 for v in state.values())
        old, old_n = wire_bytes(to_record(state))
        new, new_n = wire_bytes(pack(state))
        full_bytes, _ = wire_bytes(to_record({k: v.float() for k, v in full.items()}))
        print(row(f"| {arch}, {method}", len(state), f"{raw:,}", f"{old:,} ({old_n})", f"{new:,} ({new_n})", f"{old / raw:.4f}", f"{new / raw:.4f}", f"{full_bytes / new:.1f}x |"))
    print()


def p5(n: int) -> None:
    from flwr.app import Message, MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from server.nodes import NodeInfo
    from server.validation import check_train

    state, _ = state_of("ViT-B-16", "lora")
    cfg = config.load(None, model__name="ViT-B-16", model__pretrained="")
    info = NodeInfo(1, partition_id=0, num_partitions=n, domain="all", role="seen", class_names=["a"], sizes={"train": 64, "val": 0, "test": 0})
    g = torch.Generator().manual_seed(0)
    metrics = {"num-examples": 32, "local-steps": 2, "train-seconds": 1.0, "train-loss": 0.5, "train-accuracy": 0.5, "lr": 1e-3, "fednova-a": 2.0,
               "uniform-weight": 1, "update-norm": 0.1, "server-round": 1}
    from common.replies import TRAIN_METRIC_KEYS

    metrics.update({k: 0.0 for k in TRAIN_METRIC_KEYS if k not in metrics})
    updates = [{k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in state.items()} for _ in range(n)]
    results = {}
    for label, encode in (("per tensor", to_record), ("packed", lambda s: pack(s, Manifest.of(state.items())))):
        reference = {k: a.numpy() for k, a in encode(state).items()}
        replies = [Message(RecordDict({"arrays": encode(u), "metrics": MetricRecord(metrics)}), dst_node_id=1, message_type="train") for u in updates]
        t = time.process_time()
        for msg in replies:
            check_train(msg, 1, info, 1, reference, cfg)
        aggregate_arrayrecords([m.content for m in replies], "num-examples")
        results[label] = time.process_time() - t
    print(f"## P5: server validation + FedAvg of {n} LoRA ViT-B-16 replies (CPU seconds, same run)\n")
    print("| format | CPU s | vs per tensor |\n|---|---|---|")
    for label, secs in results.items():
        print(f"| {label} | {secs:.3f} | x{secs / results['per tensor']:.3f} |")
    print()


def main() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # a Message needs them outside Flower's runtime
    ap = argparse.ArgumentParser()
    ap.add_argument("--replies", type=int, default=100)
    args = ap.parse_args()
    torch.manual_seed(0)
    np.random.seed(0)
    p1()
    p5(args.replies)


if __name__ == "__main__":
    main()
