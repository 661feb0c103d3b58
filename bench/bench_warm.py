"""P2 and P4: what a client round costs cold, warm, and as deployed.

P2 - one client round (an evaluate message then a train message, FedCLIP's adapter or the linear
head on ViT-B-32 loaded from a local checkpoint file) as a deployed node computes it:
  cold    = a fresh process per message (what Flower does without a warm worker), no feature cache;
  cold, cached = the same with a warm feature cache: the process builds the method on the stored
            text features and never loads CLIP (it still imports torch and open_clip);
  warm    = the node's warm worker (`fedcal worker`) with a warm feature cache, over its socket.
Printed: seconds per round and cold / warm.

P4 - a deployed run (real flower-superlink + flower-supernodes on loopback, LoRA ViT-B-32 from the
checkpoint file, 2 clients, `fl.rounds` rounds) with warm workers (one phase per round, and the
two-phase schedule) and without, against the same local work (every client's evaluate + train of
every round) in one bare process. Printed: seconds per round from the run's records (round 1,
the steady rounds 2..R-1, the last round with the final evaluation phase) and the ratios.

    python bench/bench_warm.py p2 [--method adapter|linear] [--images 128]
    python bench/bench_warm.py p4 [--rounds 4] [--repeat 2] [--setups warm,two-phase,cold,executor]
    python bench/bench_warm.py floor [--rounds 10] [--repeat 2]

floor - Flower's per-round floor alone: the same deployment with negligible local work (the tiny
CLIP, one step on 8 images), with fedcal's quick executor and ServerApp polls and with 1 s polls.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _util import DATA, ROOT, torch

BIN = Path(sys.executable).parent


def checkpoint_file(arch: str, folder: Path) -> Path:
    """A ViT checkpoint file (random weights: the cost does not depend on them) standing in for the weights cache."""
    from common.model import open_clip_lib

    path = folder / f"{arch}.pt"
    if not path.exists():
        torch.manual_seed(0)
        torch.save(open_clip_lib().create_model(arch, pretrained=None).state_dict(), path)
    return path


def run_config(ckpt: Path, arch: str, method: str, cache: Path, images: int, **extra) -> dict:
    from common import config

    settings = dict(model__name=arch, model__pretrained=str(ckpt), method__name=method, data__path=str(DATA), data__partitioner="iid",
                    data__max_per_client=images, data__cache_dir=str(cache), optim__local_epochs=1, optim__batch_size=32, eval__splits="test")
    return config.load(None, **{**settings, **extra}).flat()


def requests(flat: dict, node: dict, rnd: int):
    from client.handlers import manifest_of
    from client.relay import Request
    from client.runtime import ClientRuntime
    from common import config
    from common.tensors import pack_arrays

    rt = ClientRuntime.create(config.from_flat(flat), config.parse_node_config(node))
    arrays = pack_arrays(rt.method.trainable_state(), manifest_of(rt))
    return [Request("evaluate", flat, node, {"server-round": rnd, "ts-mode": "none"}, arrays),
            Request("train", flat, node, {"server-round": rnd}, arrays)]


COLD = """
import pickle, sys
from client.handlers import PROCESS_RUNTIMES, handle
req = pickle.load(open(sys.argv[1], "rb"))
resp = handle(req)
assert resp.error is None, resp.error
print("headless" if all(type(rt.method.clip).__name__ == "HeadlessClip" for rt in PROCESS_RUNTIMES.items.values()) else "clip")
"""


def cold_round(reqs, tmp: Path, expect: str | None = None) -> float:
    """Seconds for the messages of one round, each in a fresh process; ``expect``: whether each
    process must have loaded CLIP ("clip") or run without it ("headless")."""
    import pickle

    t = time.perf_counter()
    for i, req in enumerate(reqs):
        path = tmp / f"req-{i}.pkl"
        path.write_bytes(pickle.dumps(req))
        res = subprocess.run([sys.executable, "-c", COLD, str(path)], cwd=ROOT, check=True, capture_output=True, text=True)
        got = res.stdout.strip().splitlines()[-1]
        if expect is not None and got != expect:
            raise RuntimeError(f"a cold process ran with {got}, expected {expect}")
    return time.perf_counter() - t


def warm_round(sock: Path, reqs) -> tuple[float, float]:
    """(round seconds through the warm worker, 0)."""
    from client import relay

    t = time.perf_counter()
    for req in reqs:
        resp = relay.call(sock, req, timeout=3600)
        assert resp.error is None, resp.error
    return time.perf_counter() - t, 0.0


def relay_overhead(sock: Path, flat: dict, node: dict) -> float:
    import numpy as np

    from client import relay
    from client.relay import Request

    arrays = {"packed-float32-x": np.zeros(184_320, np.float32)}  # FL²oRA's LoRA on ViT-B-16
    times = []
    for _ in range(20):
        t = time.perf_counter()
        resp = relay.call(sock, Request("no-op", flat, node, {}, arrays), timeout=60)  # answered with an error, nothing computed
        times.append(time.perf_counter() - t)
        assert resp.error is not None
    return sorted(times)[len(times) // 2]


def p2(args) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="fedcal-p2-"))
    ckpt = checkpoint_file(args.model, tmp)
    node = {"partition-id": 0, "num-partitions": 1}
    cold_cfg = run_config(ckpt, args.model, args.method, tmp / "nocache", args.images, data__feature_cache=False)
    warm_cfg = run_config(ckpt, args.model, args.method, tmp / "cache", args.images)
    cold = [cold_round(requests(cold_cfg, node, r), tmp, "clip") for r in (1, 2)]
    cached_cfg = run_config(ckpt, args.model, args.method, tmp / "cold-cache", args.images)
    cold_round(requests(cached_cfg, node, 1), tmp, "clip")  # a first cold round fills the feature and text caches
    cold_cached = [cold_round(requests(cached_cfg, node, r), tmp, "headless") for r in (2, 3)]
    sock = Path(f"/tmp/fedcal-bench-{os.getpid()}/w.sock")
    worker = subprocess.Popen([str(BIN / "fedcal"), "worker", "--socket", str(sock)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not sock.is_socket():
            time.sleep(0.1)
        first, _ = warm_round(sock, requests(warm_cfg, node, 1))  # builds the runtime and fills the feature cache
        warm = [warm_round(sock, requests(warm_cfg, node, r))[0] for r in (2, 3, 4)]
        overhead = relay_overhead(sock, warm_cfg, node)
    finally:
        worker.terminate()
        worker.wait()
    c, w = sum(cold) / len(cold), sorted(warm)[len(warm) // 2]
    print(f"## P2: one {args.method} client round ({args.model}, {args.images} images), evaluate + train messages\n")
    print("| path | s / round |\n|---|---|")
    print(f"| cold: a fresh process per message, no feature cache (mean of 2) | {c:.2f} |")
    print(f"| cold: a fresh process per message, warm feature cache (CLIP not loaded; mean of 2) | {sum(cold_cached) / 2:.2f} |")
    print(f"| warm worker, first round (builds CLIP, fills the cache) | {first:.2f} |")
    print(f"| warm worker, warm cache (median of 3) | {w:.3f} |")
    print(f"\ncold / warm = **{c / w:.1f}x**; cold without cache / cold with a warm cache = {c / (sum(cold_cached) / 2):.1f}x")
    print(f"\nfedcal's own per-message overhead (ClientApp -> worker -> ClientApp: pickling a request carrying a FL²oRA-sized "
          f"packed state, the socket both ways, the worker parsing the configuration; no compute): median {1000 * overhead:.1f} ms")


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def deployed(tmp: Path, flat: dict, warm: bool, rounds: int, schedule: str = "one-phase", slow_polls: bool = False, name_suffix: str = "",
             executor: bool = False) -> list[float]:
    """Round seconds of a deployed run; ``slow_polls``: Flower's 1 s executor poll and a 1 s
    ServerApp reply poll, as before fedcal shortened both."""
    from deploy.cluster import start_cluster
    from tests.processes import base_env, free_port, preset

    env = base_env(tmp, HOME=str(tmp), **({"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "1.0"} if slow_polls else {}))
    name = ("warm" if warm else "cold") + f"-{schedule}" + ("-slow-polls" if slow_polls else "") + ("-executor" if executor else "") + name_suffix
    cluster = start_cluster(tmp / f"cluster-{name}", 2, str(DATA), port=free_port(), node_port=free_port(), env=env, warm=warm, executor=executor)
    try:
        cfg = preset(ROOT / "configs" / "offline-smoke.toml", tmp / f"{name}.toml", **{
            **{k: v for k, v in flat.items() if k.startswith(("model.", "method.", "optim.", "data."))},
            "data.path": str(DATA), "data.partitioner": "iid", "data.heldout_domains": "", "fl.rounds": rounds,
            "fl.min_train_nodes": 2, "fl.min_available_nodes": 2, "eval.temperature_scaling": "none", "fl.schedule": schedule,
            # the 2 nodes compute at the same time: each gets half the cores (the bare process has them all, one client after the other)
            "optim.num_threads": max(1, (os.cpu_count() or 2) // 2),
            "output.dir": str(tmp / "runs"), "output.run_name": name, "monitoring.enabled": False,
            **({"fl.poll_interval": 1.0} if slow_polls else {})})
        res = cluster.flwr("run", str(ROOT), cluster.connection, "--stream", "--run-config", str(cfg), timeout=3600)
        rows = _records(tmp / "runs" / name)
        secs = [r["seconds"] for r in rows if r["kind"] == "round"]
        if len(secs) != rounds:
            raise RuntimeError((res.stdout + res.stderr)[-3000:])
        return secs
    finally:
        cluster.stop()


def bare(flat: dict, rounds: int) -> list[float]:
    """The same local work in one process: per round, each client evaluates then trains."""
    from client.handlers import WarmRuntimes, handle

    runtimes = WarmRuntimes()
    out = []
    for rnd in range(1, rounds + 1):
        t = time.perf_counter()
        for pid in range(2):
            for req in requests(flat, {"partition-id": pid, "num-partitions": 2}, rnd):
                assert handle(req, runtimes).error is None
        out.append(time.perf_counter() - t)
    return out


P4_SETUPS = {
    "warm": ("deployed, warm workers, one phase per round", dict(warm=True)),
    "two-phase": ("deployed, warm workers, two phases per round", dict(warm=True, schedule="two-phase")),
    "cold": ("deployed, no worker (cold), one phase per round", dict(warm=False)),
    "executor": ("deployed, warm workers as the nodes' executors (`--executor warm`), one phase", dict(warm=True, executor=True)),
}


def p4(args) -> None:
    """Each repetition runs the bare process and then every chosen deployment, so drifts of the
    shared machine's load hit all of them; the steady rounds (2..R-1) of all repetitions are pooled."""
    tmp = Path(tempfile.mkdtemp(prefix="fedcal-p4-"))
    ckpt = checkpoint_file(args.model, tmp)
    flat = run_config(ckpt, args.model, "lora", tmp / "cache", args.images, optim__local_steps=args.steps, optim__batch_size=8)
    chosen = [k.strip() for k in args.setups.split(",") if k.strip()]
    rows: dict[str, list[list[float]]] = {"bare": []} | {k: [] for k in chosen}
    for rep in range(args.repeat):
        rows["bare"].append(bare(flat, args.rounds))
        for key in chosen:
            rows[key].append(deployed(tmp, flat, rounds=args.rounds, name_suffix=f"-{rep}", **P4_SETUPS[key][1]))
    steady = {k: [x for run in runs for x in run[1:-1]] for k, runs in rows.items()}
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    base = mean(steady["bare"])
    print(f"## P4: a deployed LoRA round ({args.model} from a checkpoint file, 2 clients, {args.steps} steps, {args.images} images, "
          f"{args.repeat} x {args.rounds} rounds)\n")
    print("| | round 1 s | rounds 2..R-1 s (mean) | last round s | rounds 2..R-1 / bare | per repetition | s over bare |\n|---|---|---|---|---|---|---|")
    for key, runs in rows.items():
        label = "bare process (same local work: evaluate + train per client)" if key == "bare" else P4_SETUPS[key][0]
        per_rep = ", ".join(f"x{mean(r[1:-1]) / mean(b[1:-1]):.2f}" for r, b in zip(runs, rows["bare"], strict=True))
        print(f"| {label} | {mean([r[0] for r in runs]):.1f} | {mean(steady[key]):.1f} | {mean([r[-1] for r in runs]):.1f} | "
              f"x{mean(steady[key]) / base:.2f} | {per_rep} | {mean(steady[key]) - base:+.1f} |")


def floor(args) -> None:
    """Flower's per-round floor: deployed rounds whose local work is negligible (the tiny CLIP,
    one step on a few images), interleaved: the warm worker behind Flower's executor (a
    flwr-clientapp process per message relaying to it) with fedcal's 0.25 s executor poll and with
    1 s polls, and the warm worker as the node's executor (no process per message)."""
    tmp = Path(tempfile.mkdtemp(prefix="fedcal-floor-"))
    flat = run_config("", "fedcal-tiny", "lora", tmp / "cache", 8, optim__local_steps=1, optim__batch_size=4)
    setups = [("warm worker behind Flower's executor (flwr-clientapp per message), executor poll 0.25 s, reply poll to 0.25 s", {}),
              ("the same with 1 s executor and reply polls", {"slow_polls": True}),
              ("warm worker as the node's executor (`--executor warm`: no process per message)", {"executor": True})]
    rounds: dict[str, list[float]] = {label: [] for label, _ in setups}
    for rep in range(args.repeat):
        for i, (label, kw) in enumerate(setups):
            rounds[label] += deployed(tmp, flat, True, args.rounds, name_suffix=f"-{i}-{rep}", **kw)[1:-1]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    sd = lambda xs: (sum((x - mean(xs)) ** 2 for x in xs) / max(1, len(xs) - 1)) ** 0.5  # noqa: E731
    print(f"## Flower's floor: deployed one-phase rounds with negligible local work (fedcal-tiny, 2 nodes, {args.repeat} x {args.rounds - 2} steady rounds each)\n")
    print("| setup | s / round (mean +- sd) | min | max |\n|---|---|---|---|")
    for label, xs in rounds.items():
        print(f"| {label} | {mean(xs):.2f} +- {sd(xs):.2f} | {min(xs):.2f} | {max(xs):.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("which", choices=["p2", "p4", "floor"])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--method", default="adapter")
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--setups", default="warm,two-phase,cold,executor", help="p4: which deployments, comma list of " + ", ".join(P4_SETUPS))
    args = ap.parse_args()
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    {"p2": p2, "p4": p4, "floor": floor}[args.which](args)


if __name__ == "__main__":
    main()
