"""Experiment tracking: TensorBoard event files in ``<run folder>/tensorboard/``, one step per round.

Scalars: ``<split>/<group>/<metric>`` for the pooled, seen / unseen and per-domain figures (raw and
after temperature scaling), ``round/seconds`` and ``round/bytes_*``, and the reply outcomes of the
round. Open with ``tensorboard --logdir <output.dir>`` to compare runs.
"""

from __future__ import annotations

from pathlib import Path

METRICS = ("accuracy", "ece", "ece10", "mce", "classwise_ece", "nll", "brier")


class TensorBoardLog:
    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def round(self, rnd: int, pooled: list[dict], round_row: dict) -> None:
        for r in pooled:
            group = r["group"] if r["kind"] != "domain" else f"domain-{r['group']}"
            suffix = "" if r["ts"] == "none" else f"-ts-{r['ts']}"
            for m in METRICS:
                if r.get(m) is not None:
                    self.writer.add_scalar(f"{r['split']}{suffix}/{group}/{m}", r[m], r.get("round", rnd))  # one-phase: the previous round's
        for key in ("seconds", "bytes_sent", "bytes_received", "train_valid", "train_sampled", "eval_clients"):
            if isinstance(round_row.get(key), (int, float)):
                self.writer.add_scalar(f"round/{key}", round_row[key], rnd)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
