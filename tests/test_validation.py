"""The server trusts nothing it can check: forged, late, duplicated and huge replies of every kind
go through the strategy as real Flower messages and are rejected with their reason; the round goes
on, the aggregate is that of the honest replies, every recorded figure stays in range, and the
ledger's totals equal the records' and Prometheus's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from common import config
from common.calibration import CalibrationStats, default_temperature_grid, nll_at_temperatures
from server import checkpoint
from server.ledger import totals_from_rows
from server.monitoring import Monitor
from server.nodes import NodeRegistry
from server.records import RunDirectory, RunFolderBusy, read_records
from server.temperature import fit_global_temperature
from server.validation import check_evaluate
from tests.flower_helpers import reply, set_identity
from tests.test_strategy import CLASSES, GLOBAL, client_state, make, train_metrics


def eval_reply_metrics(x, y, rnd=1, splits=("val", "test"), n_bins=15):
    from client.train import evaluate_logits

    m = {"num-examples": 0, "server-round": rnd}
    for s in splits:
        m.update(evaluate_logits(s, x, y, n_bins).metrics(f"{s}-"))
        m["num-examples"] += len(y)
    return m


def logits(seed, n=20, k=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 3, torch.randint(0, k, (n,), generator=g)


@pytest.fixture()
def setup(tmp_path):
    strategy, run, reg = make(tmp_path, fl__min_train_nodes=1, eval__splits="val,test")
    return strategy, run, reg, reg.seen(reg.info)


def test_forged_training_replies_are_rejected_and_honest_ones_aggregated(setup):
    strategy, run, reg, seen = setup
    honest = {seen[0]: (client_state(1), 30), seen[1]: (client_state(2), 10)}
    replies = [reply(n, s, train_metrics(k)) for n, (s, k) in honest.items()]
    bad = [
        (seen[2], train_metrics(10**9), "weight"),  # claims 1e9 examples
        (seen[3], train_metrics(-5), "weight"),
    ]
    replies += [reply(n, client_state(9), m) for n, m, _ in bad]
    # a second round of forgeries from the same nodes: these are duplicates in this phase
    replies.append(reply(seen[0], client_state(7), train_metrics(30)))
    out, _ = strategy.aggregate_train(1, replies)
    rows = read_records(run.path)
    assert sorted(r["reason"] for r in rows if r["kind"] == "rejected") == ["duplicate", "weight", "weight"]
    (a, na), (b, nb) = honest.values()
    for k in GLOBAL:
        assert np.allclose(out[k].numpy(), (na * a[k] + nb * b[k]) / (na + nb), atol=1e-6)


@pytest.mark.parametrize("forge, reason", [
    (lambda m: {**m, "partition": 99}, "metrics"),  # a metric named like a record field
    (lambda m: {k: v for k, v in m.items() if k != "lr"}, "metrics"),
    (lambda m: {**m, "train-loss": float("nan")}, "metrics"),
    (lambda m: {**m, "num-examples": 0}, "weight"),
    (lambda m: {**m, "num-examples": 101}, "weight"),  # above the declared train split (100)
    (lambda m: {**m, "server-round": 0}, "round"),  # late / replayed
    (lambda m: {**m, "uniform-weight": 7}, "weight"),
    (lambda m: {**m, "fednova-a": 1e9}, "metrics"),
    (lambda m: {**m, "local-steps": 2.5}, "metrics"),
])
def test_each_forged_training_metric_is_rejected(setup, forge, reason):
    strategy, run, reg, seen = setup
    a, b = client_state(1), client_state(2)
    out, _ = strategy.aggregate_train(1, [reply(seen[0], a, train_metrics(40)), reply(seen[1], b, forge(train_metrics(20)))])
    rows = read_records(run.path)
    assert [r["reason"] for r in rows if r["kind"] == "rejected"] == [reason]
    for k in GLOBAL:  # the aggregate is the honest reply alone
        assert np.allclose(out[k].numpy(), a[k], atol=1e-7)
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["partition"] for r in train] == [0] and train[0]["round"] == 1


def test_oversized_array_is_rejected_before_decoding(setup):
    strategy, run, reg, seen = setup
    huge = {"w": np.zeros((2, 3000), np.float32), "b": GLOBAL["b"]}
    strategy.aggregate_train(1, [reply(seen[0], client_state(1), train_metrics()), reply(seen[1], huge, train_metrics())])
    rej = [r for r in read_records(run.path) if r["kind"] == "rejected"]
    assert [r["reason"] for r in rej] == ["size"]


def test_unsampled_and_extra_record_replies_are_rejected(setup):
    strategy, run, reg, seen = setup
    strategy.sampled["train"] = {seen[0], seen[1]}
    extra = reply(seen[1], client_state(2), train_metrics())
    extra.content["more"] = MetricRecord({"x": 1.0})
    strategy.aggregate_train(1, [reply(seen[0], client_state(1), train_metrics()), extra, reply(seen[2], client_state(3), train_metrics())])
    rows = read_records(run.path)
    assert sorted(r["reason"] for r in rows if r["kind"] == "rejected") == ["format", "unsampled"]


# ------------------------------------------------------------------ evaluation
def honest_eval(strategy, reg, rnd=1):
    out = {}
    for i, node in enumerate(sorted(reg.info, key=lambda n: reg.info[n].partition_id)):
        x, y = logits(i)
        splits = ("test",) if reg.info[node].role == "unseen" else tuple(strategy.cfg.eval.split_list())
        out[node] = eval_reply_metrics(x, y, rnd, splits)
    return out


def _scale(key, f):
    return lambda m: {**m, key: [f(v) for v in m[key]]}


@pytest.mark.parametrize("forge, reason", [
    (_scale("test-bin-conf-sum", lambda v: 3 * v + 1), "calibration"),  # confidence sum above the count
    (_scale("test-bin-correct-sum", lambda v: v + 5), "calibration"),
    (_scale("test-bin-count", lambda v: -v - 1), "calibration"),  # negative counts
    (lambda m: {**m, "test-nll-sum": float("nan")}, "calibration"),
    (lambda m: {**m, "test-nll-sum": -4.0}, "calibration"),
    (lambda m: {**m, "test-total": m["test-total"] + 3}, "calibration"),  # total != sum of the bins
    (lambda m: {**m, "test-correct": m["test-total"] + 1}, "calibration"),
    (lambda m: {**m, "test-n-bins": 20}, "bins"),
    (lambda m: {**m, "test-n-classes": 4}, "classes"),
    (lambda m: {**m, "test-adaptive-ece": 3.0}, "calibration"),
    (lambda m: {**m, "server-round": 0}, "round"),
    (lambda m: {**m, "num-examples": 1}, "weight"),
    (lambda m: {**m, "test-brier-sum": 1e9}, "calibration"),
    (lambda m: {k: v for k, v in m.items() if k != "test-temperature"}, "metrics"),
    (lambda m: {**m, "val-total": 3}, "calibration"),
    (_scale("test-cw-label-sum", lambda v: v * 2), "calibration"),
])
def test_forged_evaluations_are_rejected_and_figures_stay_in_range(setup, forge, reason):
    strategy, run, reg, seen = setup
    replies = honest_eval(strategy, reg)
    strategy.sampled["evaluate"], strategy.eval_round = set(reg.info), 1
    msgs = [reply(n, None, forge(m) if n == seen[1] else m, message_type="evaluate") for n, m in replies.items()]
    strategy.aggregate_evaluate(1, msgs)
    rows = read_records(run.path)
    assert [(r["reason"], r["partition"]) for r in rows if r["kind"] == "rejected"] == [(reason, 1)]
    clients = [r for r in rows if r["kind"] == "client"]
    assert 1 not in {r["partition"] for r in clients} and len({r["partition"] for r in clients}) == 4
    for r in rows:
        if r["kind"] in ("client", "pooled", "group", "domain"):
            assert all(0 <= r[k] <= 1 for k in ("accuracy", "ece", "mce", "ece10") if r[k] is not None), r
            assert r["n"] >= 0 and r["nll"] >= 0
    json.dumps(rows, allow_nan=False)


def test_evaluation_identity_comes_from_the_registry(setup):
    """A seen client claiming to be the held-out one changes nothing: its rows carry its registered identity."""
    strategy, run, reg, seen = setup
    replies = honest_eval(strategy, reg)
    strategy.sampled["evaluate"], strategy.eval_round = set(reg.info), 1
    msgs = [reply(n, None, m, client={"partition-id": 4, "domain": "d4", "role": "unseen"}, message_type="evaluate") for n, m in replies.items()]
    strategy.aggregate_evaluate(1, msgs)
    rows = read_records(run.path)
    clients = [r for r in rows if r["kind"] == "client"]
    assert sorted({(r["partition"], r["domain"], r["role"]) for r in clients}) == [(p, f"d{p}", "seen" if p < 4 else "unseen") for p in range(5)]
    unseen = next(r for r in rows if r["kind"] == "group" and r["group"] == "unseen" and r["split"] == "test")
    assert unseen["clients"] == 1


# ------------------------------------------------------------------ temperature scaling
class NllGrid:
    """send_and_receive answers from a table (the unit under test is the server's handling)."""

    def __init__(self, answers):
        self.answers = answers

    def send_and_receive(self, messages, timeout):
        set_identity()
        out = []
        for m in messages:
            sums, n = self.answers[m.metadata.dst_node_id]
            out.append(Message(RecordDict({"metrics": MetricRecord({"nll-sums": sums, "num-examples": n})}), reply_to=m))
        return out


def test_forged_nll_sums_cannot_move_the_federated_temperature(tmp_path):
    strategy, run, reg = make(tmp_path)
    seen = reg.seen(reg.info)
    grid = default_temperature_grid(61)
    honest = {}
    for i, node in enumerate(seen[:3]):
        x, y = logits(i, n=reg.info[node].sizes["val"])
        honest[node] = (nll_at_temperatures(x, y, grid), len(y))
    forged = {**honest, seen[3]: ([-1e6] * 61, 50)}
    set_identity()
    arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    ref = fit_global_temperature(NllGrid(honest), seen[:3], arrays, 10, 61, registry=reg)
    got = fit_global_temperature(NllGrid(forged), seen, arrays, 10, 61, registry=reg, ledger=strategy.ledger, rnd=2)
    assert got.temperature == ref.temperature and got.clients == 3 and got.examples == ref.examples
    assert seen[3] in got.errors
    for bad in ([1.0] * 60, 50), ([1.0] * 61, 49), ([float("inf")] + [1.0] * 60, 50):
        got = fit_global_temperature(NllGrid({**honest, seen[3]: bad}), seen, arrays, 10, 61, registry=reg)
        assert got.clients == 3 and got.temperature == ref.temperature


# ------------------------------------------------------------------ join
class InfoGrid:
    def __init__(self, identities):
        self.identities = identities

    def get_node_ids(self):
        return list(self.identities)

    def send_and_receive(self, messages, timeout):
        set_identity()
        return [Message(RecordDict({"client": ConfigRecord(self.identities[m.metadata.dst_node_id])}), reply_to=m) for m in messages]


def identity(pid, n=4, classes=CLASSES, **over):
    return {"partition-id": pid, "num-partitions": n, "domain": "photo", "role": "seen", "class-names": classes,
            "train-size": 10, "val-size": 5, "test-size": 5, **over}


def test_rogue_nodes_cannot_end_the_federation(tmp_path):
    strategy, run, _ = make(tmp_path)
    reg = NodeRegistry()
    ids = {11: identity(0), 12: identity(1), 13: identity(2), 14: identity(3)}
    ids.update({21: identity(1), 22: identity(2, classes=["x", "y", "z"]), 23: {k: v for k, v in identity(3).items() if k != "partition-id"},
                24: identity(9), 25: identity(2, n=5), 26: identity(0, **{"train-size": -1}), 27: identity(0, role="boss")})
    reg.discover(InfoGrid(ids), strategy.ledger, 0)
    strategy.ledger.flush()
    assert sorted(reg.info) == [11, 12, 13, 14]
    rows = read_records(run.path)
    assert sorted(r["node_id"] for r in rows if r["kind"] == "rejected") == [21, 22, 23, 24, 25, 26, 27]
    assert all(r["reason"] == "identity" for r in rows if r["kind"] == "rejected")
    assert len([r for r in rows if r["kind"] == "joined"]) == 4
    # a later discovery does not ask the refused nodes again, nor fail
    assert reg.discover(InfoGrid(ids), strategy.ledger, 1) == []


# ------------------------------------------------------------------ one ledger
def test_ledger_totals_agree_with_records_checkpoint_and_prometheus(tmp_path):
    cfg = config.load(None, output__dir=str(tmp_path), output__run_name="ledger", monitoring__port=0)
    run = RunDirectory.create(cfg)
    monitor = Monitor(cfg, run.name)
    from server.strategy import build_strategy
    from tests.test_strategy import registry

    reg = registry()
    strategy = build_strategy(cfg, run, reg, monitor)
    strategy.reference = {k: v.copy() for k, v in GLOBAL.items()}
    seen = reg.seen(reg.info)
    strategy.sampled["train"] = set(seen)
    strategy.aggregate_train(1, [reply(seen[0], client_state(1), train_metrics()), reply(seen[1], client_state(2), train_metrics(10**9))])
    strategy.sampled["evaluate"], strategy.eval_round = set(reg.info), 1
    ev = honest_eval(strategy, reg)
    strategy.aggregate_evaluate(1, [reply(n, None, {**m, "test-n-bins": 3} if n == seen[2] else m, message_type="evaluate") for n, m in ev.items()])
    strategy.end_of_round(1, ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}))
    rows = read_records(run.path)
    saved = json.loads((run.path / "checkpoints" / "round-00001" / "state.json").read_text())["totals"]
    assert saved == strategy.ledger.totals == totals_from_rows(rows)
    assert saved["rejected"] == {"weight": 1, "bins": 1} and saved["trained"] == {"train": 1} and saved["missing"] == {"train": 2}
    assert saved["evaluated"] == {"evaluate": 4}
    for outcome, counts in saved.items():
        for label, n in counts.items():
            assert monitor.registry.get_sample_value("fedcal_replies_total", {"run": "ledger", "outcome": outcome, "label": label}) == n
    from server.report import build

    summary = build(run.path, diagrams=False)
    assert summary["rejected_updates"] == 2 and summary["replies"] == saved
    monitor.finish()
    run.close()


# ------------------------------------------------------------------ records and checkpoints
def test_one_writer_per_run_folder(tmp_path):
    cfg = config.load(None, output__dir=str(tmp_path), output__run_name="busy")
    first = RunDirectory.create(cfg)
    resume = config.load(None, output__resume=str(tmp_path / "busy"))
    with pytest.raises(RunFolderBusy, match=r"in use by pid \d+"):
        RunDirectory.create(resume)
    first.close()
    RunDirectory.create(resume).close()  # free again once the writer is gone


def test_resume_cuts_torn_lines_and_later_rounds(tmp_path):
    cfg = config.load(None, output__dir=str(tmp_path), output__run_name="torn")
    run = RunDirectory.create(cfg)
    run.write([{"kind": "joined", "round": 0, "phase": "join"}, {"kind": "train", "round": 1, "x": float("nan")},
               {"kind": "round", "round": 1}, {"kind": "train", "round": 2}])
    run.close()
    with open(tmp_path / "torn" / "metrics.jsonl", "a") as fh:
        fh.write('{"kind": "client", "round": 2, "acc')  # kill -9 inside a write
    run = RunDirectory.create(config.load(None, output__resume=str(tmp_path / "torn")))
    kept = run.keep_rounds_up_to(1)
    run.write([{"kind": "train", "round": 2, "again": True}])
    run.close()
    rows = read_records(tmp_path / "torn")
    assert [(r["kind"], r["round"]) for r in rows] == [("train", 1), ("round", 1), ("train", 2)]
    assert rows[0]["x"] is None and rows[-1]["again"] and len(kept) == 2
    for line in (tmp_path / "torn" / "metrics.jsonl").read_text().splitlines():
        json.loads(line)  # strict JSON: no NaN, no torn line


def test_unusable_output_and_config_files_are_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(config.ConfigError, match="output.dir: cannot create the run folder"):
        RunDirectory.create(config.load(None, output__dir=str(tmp_path / "file"), output__run_name="r"))
    run = RunDirectory.create(config.load(None, output__dir=str(tmp_path), output__run_name="r"))
    run.close()
    (tmp_path / "r" / "config.json").write_text("{garbled")
    with pytest.raises(config.ConfigError, match=r"config.json is unreadable"):
        RunDirectory.create(config.load(None, output__resume=str(tmp_path / "r")))


@pytest.mark.parametrize("damage", ["bitflip", "truncate", "state", "nosums"])
def test_damaged_checkpoints_are_refused_in_one_line(tmp_path, damage):
    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    folder = checkpoint.save(tmp_path, 1, state, {}, {"best": None})
    assert torch.equal(checkpoint.load(folder).global_state["w"], state["w"])
    target = folder / "global.safetensors"
    data = bytearray(target.read_bytes())
    if damage == "bitflip":
        data[-3] ^= 0x01
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "state":
        (folder / "state.json").write_text("{")
    else:
        meta = json.loads((folder / "state.json").read_text())
        del meta["sha256"]
        (folder / "state.json").write_text(json.dumps(meta))
    with pytest.raises(config.ConfigError) as err:
        checkpoint.load(folder)
    assert "\n" not in str(err.value) and str(folder) in str(err.value)


def test_stats_invariants_hold_for_honest_statistics():
    for seed in range(5):
        x, y = logits(seed, n=50, k=4)
        for t in (0.3, 1.0, 4.0):
            assert CalibrationStats.from_logits(x, y, 15, t).inconsistency() is None
    assert CalibrationStats.empty(15, 3).inconsistency() is None


def test_a_nan_update_is_rejected_as_non_finite_whatever_its_metrics_say(setup):
    strategy, run, reg, seen = setup
    bad = client_state(2)
    bad["w"][0, 0] = np.nan
    strategy.aggregate_train(1, [reply(seen[0], client_state(1), train_metrics()), reply(seen[1], bad, train_metrics(**{"update-norm": float("nan")}))])
    assert [r["reason"] for r in read_records(run.path) if r["kind"] == "rejected"] == ["non-finite"]


def test_every_client_failing_two_rounds_running_ends_the_run_with_the_reason(setup):
    from server.nodes import FederationError
    from tests.flower_helpers import error_reply

    strategy, run, reg, seen = setup
    strategy.sampled["train"] = set(seen)
    errors = [error_reply(n, "partition 0: data folder missing") for n in seen]
    strategy.aggregate_train(1, errors)
    ok = [reply(seen[0], client_state(1), train_metrics(rnd=2))] + errors[1:]
    strategy.aggregate_train(2, ok)  # one client recovers: the count starts again
    strategy.aggregate_train(3, errors)
    with pytest.raises(FederationError, match="rounds 3 and 4, e.g. partition 0: data folder missing"):
        strategy.aggregate_train(4, errors)
    assert len([r for r in read_records(run.path) if r["kind"] == "failed" and r["round"] == 4]) == len(seen)


def test_pooled_figures_do_not_depend_on_reply_order(setup):
    """Float sums are not associative: pooling runs in partition order, so a resumed run records the same bits."""
    import random

    from server.records import pool

    strategy, run, reg, seen = setup
    replies = honest_eval(strategy, reg)
    evals = []
    for node, m in replies.items():
        evals += check_evaluate(reply(node, None, m, message_type="evaluate"), node, reg.info[node], 1, strategy.cfg, 3, "none")
    reference = pool(evals, 1)
    for seed in range(5):
        shuffled = list(evals)
        random.Random(seed).shuffle(shuffled)
        assert json.dumps(pool(shuffled, 1), sort_keys=True) == json.dumps(reference, sort_keys=True)
