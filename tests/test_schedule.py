"""One phase per round (``fl.schedule = "one-phase"``) against today's two phases: the same records
and the same final state, in fewer phases.

Whole runs of fedcal's real ServerApp flow against its real ClientApp functions in this process
(tests/local_grid.py), on pacs-mini with the tiny CLIP: 4 PACS domains, sketch held out, train and
evaluate samples that differ (so a phase holds train messages that evaluate first, train messages
that do not, and evaluate-only messages), federated temperature scaling at the end.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from common import config
from server.records import read_records
from tests import local_grid

TIMING = {"time", "train_seconds", "seconds", "eval_round", "eval_clients", "eval_sampled"}
ROUND_FIELDS = ("round", "train_sampled", "train_valid", "aggregated")


def run_config(pacs_dir, tmp_path, name: str, **extra) -> dict:
    settings = dict(model__name="fedcal-tiny", model__pretrained="", method__name="lora", data__path=str(pacs_dir),
                    data__partitioner="domain", data__heldout_domains="sketch", data__max_per_client=40, data__cache_dir=str(tmp_path / "cache"),
                    optim__local_steps=2, optim__batch_size=8, optim__eval_batch_size=32, optim__num_threads=1,
                    fl__rounds=3, fl__min_train_nodes=1, fl__min_available_nodes=4, fl__fraction_train=0.67, fl__fraction_evaluate=0.67,
                    eval__splits="val,test", eval__diagrams=False, monitoring__enabled=False,
                    output__dir=str(tmp_path / "runs"), output__run_name=name)
    cfg = config.load(None, **{**settings, **extra})
    return cfg.flat()


def comparable(run_dir) -> list[str]:
    """Every record row less its timings, in a fixed order (the phases write them in another order)."""
    rows = []
    for r in read_records(run_dir):
        if r["kind"] == "round":
            r = {k: r.get(k) for k in ROUND_FIELDS} | {"kind": "round"}
        rows.append(json.dumps({k: v for k, v in r.items() if k not in TIMING}, sort_keys=True))
    return sorted(rows)


def both(pacs_dir, tmp_path, **extra):
    out = {}
    for schedule in ("two-phase", "one-phase"):
        summary, grid = local_grid.run(run_config(pacs_dir, tmp_path, schedule, fl__schedule=schedule, **extra), 4)
        out[schedule] = (tmp_path / "runs" / schedule, summary, grid.phase_kinds())
    return out


def assert_same_run(a, b) -> None:
    (dir_a, sum_a, _), (dir_b, sum_b, _) = a, b
    assert comparable(dir_a) == comparable(dir_b)
    sa, sb = load_file(str(dir_a / "final" / "global.safetensors")), load_file(str(dir_b / "final" / "global.safetensors"))
    assert sa.keys() == sb.keys() and all(np.array_equal(sa[k], sb[k]) for k in sa)
    assert sum_a["pooled"] == sum_b["pooled"] and sum_a["best"] == sum_b["best"]


def test_one_phase_records_equal_two_phase_in_fewer_phases(pacs_dir, tmp_path):
    """Partition 2 crashes whenever it trains (fault.plan): in one phase its train reply still
    returns the evaluation it did first, and the training failure is recorded beside it."""
    runs = both(pacs_dir, tmp_path, fault__plan="2:crash")
    assert_same_run(runs["two-phase"], runs["one-phase"])
    outcomes = sorted((r["round"], r["phase"], r["kind"]) for r in read_records(runs["one-phase"][0]) if r.get("partition") == 2 and r["kind"] != "client")
    assert [o for o in outcomes if o[1] == "train"] == [(2, "train", "failed"), (3, "train", "failed")]
    assert [o for o in outcomes if o[1] == "evaluate"] == [(1, "evaluate", "evaluated"), (2, "evaluate", "evaluated"), (3, "evaluate", "evaluated")]
    # the records are not empty: every round evaluated, both message kinds, TS at the end
    rows = read_records(runs["one-phase"][0])
    assert {r["round"] for r in rows if r["kind"] == "client"} == {1, 2, 3}
    assert {r["round"] for r in rows if r["kind"] == "train"} == {1, 2, 3}
    assert [r["round"] for r in rows if r["kind"] == "temperature"] == [3]
    assert {r["role"] for r in rows if r["kind"] == "client"} == {"seen", "unseen"}
    assert runs["two-phase"][2] == ["info", "train", "evaluate", "train", "evaluate", "train", "nll-grid", "evaluate"]
    # rounds 2 and 3 each carry the previous round's evaluation; the end adds the TS grid and one evaluation
    assert runs["one-phase"][2] == ["info", "train", "evaluate+train", "evaluate+train", "nll-grid", "evaluate"]


def test_one_phase_keeps_evaluate_every_and_per_client_state(pacs_dir, tmp_path):
    """Every other round evaluated, TS after every evaluation, a personal temperature (persisted
    client state that evaluation writes and training carries on): still the same records."""
    runs = both(pacs_dir, tmp_path, fl__rounds=4, fl__evaluate_every=2, eval__temperature_scaling="per-client", eval__ts_every_round=True)
    assert_same_run(runs["two-phase"], runs["one-phase"])
    rows = read_records(runs["one-phase"][0])
    assert {r["round"] for r in rows if r["kind"] == "client"} == {2, 4}
    assert {r["ts"] for r in rows if r["kind"] == "client"} == {"none", "per-client"}
    # round 2's grid is its own phase (before round 3's), its evaluation rides in round 3's phase
    assert runs["one-phase"][2] == ["info", "train", "train", "nll-grid", "evaluate+train", "train", "nll-grid", "evaluate"]


def test_a_resumed_one_phase_run_redoes_the_checkpointed_rounds_evaluation(pacs_dir, tmp_path):
    """Stopped after round 2's checkpoint but after round 3's phase had recorded round 2's
    evaluation (a crash before checkpoint 3): on resume those rows are cut and done again."""
    base = run_config(pacs_dir, tmp_path, "cut", fault__stop_after_round=2)
    with pytest.raises(Exception, match="stop_after_round"):
        local_grid.run(base, 4)
    run_dir = tmp_path / "runs" / "cut"
    rows = read_records(run_dir)
    assert not [r for r in rows if r["kind"] == "client" and r["round"] == 2]
    # what a crash late in round 3 leaves: round 2's evaluation rows already written
    full, _ = local_grid.run(run_config(pacs_dir, tmp_path, "full"), 4)
    late = [r for r in read_records(tmp_path / "runs" / "full") if r["round"] == 2 and r["kind"] in ("client", "pooled", "evaluated")]
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in late)
    resumed, _ = local_grid.run({**base, "fault.stop_after_round": 0, "output.resume": str(run_dir)}, 4)
    assert comparable(run_dir) == comparable(tmp_path / "runs" / "full")
    assert resumed["pooled"] == full["pooled"]
