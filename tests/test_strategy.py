"""fedcal's strategy as a unit: reply validation, exact pooling, sampling, records, state."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from common import config
from common.calibration import CalibrationStats
from server.monitoring import Monitor
from server.nodes import NodeInfo, NodeRegistry
from server.records import RunDirectory, read_records
from server.strategy import build_strategy
from tests.flower_helpers import error_reply, reply, set_identity

GLOBAL = {"w": np.zeros((2, 3), dtype=np.float32), "b": np.ones(3, dtype=np.float32)}
CLASSES = ["a", "b", "c"]


def registry(n_seen=4, n_unseen=1, offset=100):
    reg = NodeRegistry()
    for p in range(n_seen + n_unseen):
        node = offset + 7 * (n_seen + n_unseen - p)  # node ids in the reverse order of partitions
        reg.info[node] = NodeInfo(node, p, n_seen + n_unseen, f"d{p}", "seen" if p < n_seen else "unseen", CLASSES, {"train": 100, "val": 50, "test": 50})
    return reg


def make(tmp_path, reg=None, **overrides):
    cfg = config.load(None, output__dir=str(tmp_path), output__run_name="unit", monitoring__enabled=False, **overrides)
    run = RunDirectory.create(cfg)
    reg = reg or registry()
    strategy = build_strategy(cfg, run, reg, Monitor(cfg, run.name))
    strategy.reference = {k: v.copy() for k, v in GLOBAL.items()}
    strategy.sampled["train"] = set(reg.seen(reg.info))
    return strategy, run, reg


def train_metrics(n=10, rnd=1, **over):
    """A complete, honest training MetricRecord (exactly common.replies.TRAIN_METRIC_KEYS)."""
    from common.replies import TRAIN_METRIC_KEYS

    m = {k: 0.5 for k in TRAIN_METRIC_KEYS}
    m.update({"num-examples": n, "local-steps": 3, "uniform-weight": 1, "server-round": rnd, "fednova-a": 3.0})
    m.update(over)
    return m


def client_state(seed):
    rng = np.random.default_rng(seed)
    return {k: (v + rng.normal(size=v.shape)).astype(np.float32) for k, v in GLOBAL.items()}


def test_bad_replies_are_rejected_and_the_round_completes(tmp_path):
    strategy, run, reg = make(tmp_path, fl__max_update_norm=100.0, fl__min_train_nodes=2)
    seen = reg.seen(reg.info)
    honest = {seen[0]: client_state(1), seen[1]: client_state(2)}
    bad_nan = client_state(3)
    bad_nan["w"][0, 0] = np.nan
    bad_shape = {"w": np.zeros((3, 3), np.float32), "b": GLOBAL["b"]}
    extra = {**client_state(4), "bogus": np.zeros(1, np.float32)}
    huge = {k: v + 1e6 for k, v in GLOBAL.items()}
    replies = [reply(n, s, train_metrics(10 * (i + 1))) for i, (n, s) in enumerate(honest.items())]
    replies += [reply(seen[2], bad_nan, train_metrics()),
                reply(seen[3], bad_shape, train_metrics()),
                reply(999, extra, train_metrics()),
                reply(998, huge, train_metrics()),
                error_reply(997, "partition 9: data folder missing")]
    strategy.sampled["train"] |= {997, 998, 999}
    for node in (997, 998, 999):
        reg.info[node] = NodeInfo(node, node, 1000, "x", "seen", CLASSES, {"train": 100, "val": 50, "test": 50})
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None
    expected = {k: (10 * honest[seen[0]][k] + 20 * honest[seen[1]][k]) / 30 for k in GLOBAL}
    for k in GLOBAL:
        assert np.isfinite(arrays[k].numpy()).all()
        assert np.allclose(arrays[k].numpy(), expected[k], atol=1e-6)
    rows = read_records(run.path)
    reasons = sorted(r["reason"] for r in rows if r["kind"] == "rejected")
    assert reasons == ["keys", "non-finite", "norm", "shape"]
    assert [r["reason"] for r in rows if r["kind"] == "failed"] == ["partition 9: data folder missing"]
    assert strategy.ledger.totals["rejected"] == {"non-finite": 1, "shape": 1, "keys": 1, "norm": 1}
    assert strategy.ledger.totals["trained"] == {"train": 2} and strategy.ledger.totals["failed"] == {"train": 1}


def test_too_few_valid_replies_keep_the_global_state(tmp_path):
    strategy, run, reg = make(tmp_path, fl__min_train_nodes=3)
    seen = reg.seen(reg.info)
    replies = [reply(seen[0], client_state(1), train_metrics(5))]
    assert strategy.aggregate_train(1, replies) == (None, None)
    rows = read_records(run.path)
    assert {r["partition"] for r in rows if r["kind"] == "missing"} == {1, 2, 3}


def test_uniform_weighting(tmp_path):
    strategy, _, reg = make(tmp_path, fl__weighting="uniform")
    seen = reg.seen(reg.info)
    a, b = client_state(1), client_state(2)
    arrays, _ = strategy.aggregate_train(1, [reply(seen[0], a, train_metrics(1)), reply(seen[1], b, train_metrics(99))])
    assert np.allclose(arrays["w"].numpy(), (a["w"] + b["w"]) / 2, atol=1e-6)


def eval_metrics(logits, labels, prefix):
    from client.train import evaluate_logits

    return {**evaluate_logits(prefix.rstrip("-"), logits, labels, 15).metrics(prefix), "num-examples": len(labels), "server-round": 1}


def test_pooled_evaluation_is_exact_and_recorded(tmp_path):
    strategy, run, reg = make(tmp_path)
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(n, 3, generator=g) * 3 for n in (17, 5, 30, 11, 23)]
    labels = [torch.randint(0, 3, (len(x),), generator=g) for x in logits]
    replies = []
    for node, x, y in zip(sorted(reg.info, key=lambda n: reg.info[n].partition_id), logits, labels, strict=True):
        info = reg.info[node]
        replies.append(reply(node, None, eval_metrics(x, y, "test-"), client={"partition-id": info.partition_id, "domain": info.domain, "role": info.role}, message_type="evaluate"))
    strategy.sampled["evaluate"], strategy.eval_round = set(reg.info), 1
    strategy.aggregate_evaluate(1, replies)
    rows = read_records(run.path)
    pooled = next(r for r in rows if r["kind"] == "pooled" and r["split"] == "test")
    concat = CalibrationStats.from_logits(torch.cat(logits), torch.cat(labels), n_bins=15)
    assert pooled["ece"] == pytest.approx(concat.ece(), abs=1e-12)
    assert pooled["nll"] == pytest.approx(concat.nll(), abs=1e-12)
    assert pooled["clients"] == 5 and pooled["n"] == 86
    summed = sum(CalibrationStats.from_metrics(r["stats"]) for r in rows if r["kind"] == "client")
    assert summed.ece() == pytest.approx(pooled["ece"], abs=1e-12)
    unseen = next(r for r in rows if r["kind"] == "group" and r["group"] == "unseen")
    assert unseen["n"] == 23 and unseen["clients"] == 1
    assert len([r for r in rows if r["kind"] == "domain"]) == 5
    json.dumps(rows)  # every line is plain JSON


class FakeGrid:
    """The node list of a SuperLink (unit test of sampling only)."""

    def __init__(self, ids):
        self.ids = ids

    def get_node_ids(self):
        return list(self.ids)


def test_sampling_is_seeded_by_partition_and_never_picks_unseen(tmp_path):
    set_identity()
    picks = []
    for offset in (100, 5000):  # different node ids, same partitions
        reg = registry(n_seen=6, n_unseen=2, offset=offset)
        strategy, _, _ = make(tmp_path / str(offset), reg=reg, fl__fraction_train=0.5, fl__schedule="two-phase")
        strategy.registry.discover = lambda *a, **k: []
        arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
        msgs = strategy.configure_train(3, arrays, ConfigRecord({}), FakeGrid(reg.info))
        parts = sorted(reg.info[m.metadata.dst_node_id].partition_id for m in msgs)
        assert len(parts) == 3 and all(p < 6 for p in parts)
        picks.append(parts)
        evals = strategy.configure_evaluate(3, arrays, ConfigRecord({}), FakeGrid(reg.info))
        assert {6, 7} <= {reg.info[m.metadata.dst_node_id].partition_id for m in evals}
    assert picks[0] == picks[1]


def test_strategy_state_round_trip(tmp_path):
    strategy, _, _ = make(tmp_path, fl__aggregator="fedadam")
    strategy.m_t = {"w": np.ones((2, 3))}
    strategy.v_t = {"w": np.full((2, 3), 2.0)}
    saved = strategy.strategy_arrays()
    fresh, _, _ = make(tmp_path / "b", fl__aggregator="fedadam")
    fresh.load_strategy_arrays(saved)
    assert np.array_equal(fresh.m_t["w"], strategy.m_t["w"]) and np.array_equal(fresh.v_t["w"], strategy.v_t["w"])
    m, _, _ = make(tmp_path / "c", fl__aggregator="fedavgm", fl__server_momentum=0.9)
    m.momentum_vector = [np.ones(2), np.zeros(3)]
    again, _, _ = make(tmp_path / "d", fl__aggregator="fedavgm", fl__server_momentum=0.9)
    again.load_strategy_arrays(m.strategy_arrays())
    assert [a.tolist() for a in again.momentum_vector] == [[1.0, 1.0], [0.0, 0.0, 0.0]]


@pytest.mark.parametrize("aggregator", ["fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedmedian", "fedtrimmedavg", "krum", "feddyn", "fednova"])
def test_every_aggregator_aggregates_valid_replies(tmp_path, aggregator):
    set_identity()
    strategy, _, reg = make(tmp_path, fl__aggregator=aggregator)
    strategy.registry.discover = lambda *a, **k: []
    arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    config_record = ConfigRecord({})
    msgs = strategy.configure_train(1, arrays, config_record, FakeGrid(reg.info))
    if aggregator == "fedprox":
        assert config_record["proximal-mu"] == 0.01
    replies = [reply(m.metadata.dst_node_id, client_state(i), train_metrics()) for i, m in enumerate(msgs)]
    out, _ = strategy.aggregate_train(1, replies)
    assert out is not None and all(np.isfinite(a.numpy()).all() and a.numpy().shape == GLOBAL[k].shape for k, a in out.items())


def test_superlink_generated_error_replies_are_attributed_to_their_node(tmp_path):
    """The SuperLink answers for a dead node ("node unavailable") from its own id; the record must
    name the dead node, not the SuperLink."""
    from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

    set_identity()
    strategy, run, reg = make(tmp_path)
    strategy.registry.discover = lambda *a, **k: []
    arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    msgs = list(strategy.configure_train(1, arrays, ConfigRecord({}), FakeGrid(reg.info)))
    for i, m in enumerate(msgs):
        m.metadata.__dict__["_message_id"] = f"id-{i}"  # what the Grid does when it pushes
    dead = msgs[-1]
    replies = [reply(m.metadata.dst_node_id, client_state(i), train_metrics()) for i, m in enumerate(msgs[:-1])]
    replies.append(create_message_error_unavailable_res_message(dead.metadata, "node_unavail"))
    assert replies[-1].metadata.src_node_id != dead.metadata.dst_node_id
    strategy.aggregate_train(1, replies)
    rows = read_records(run.path)
    failed = [r for r in rows if r["kind"] == "failed"]
    assert [r["node_id"] for r in failed] == [dead.metadata.dst_node_id] and failed[0]["partition"] == reg.info[dead.metadata.dst_node_id].partition_id
    assert not [r for r in rows if r["kind"] == "missing"]


def test_one_phase_train_messages_carry_the_evaluation_two_phase_would_send(tmp_path):
    """The clients that evaluate round 3 are the ones two-phase's evaluate phase would pick; those
    that also train in round 4 are asked inside their train message, the rest get evaluate messages."""
    set_identity()
    reg = registry(n_seen=6, n_unseen=2)
    arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    picks = {}
    for schedule in ("two-phase", "one-phase"):
        strategy, _, _ = make(tmp_path / schedule, reg=reg, fl__fraction_train=0.5, fl__fraction_evaluate=0.5, fl__schedule=schedule)
        strategy.registry.discover = lambda *a, **k: []
        if schedule == "two-phase":
            picks["evaluate"] = {m.metadata.dst_node_id for m in strategy.configure_evaluate(3, arrays, ConfigRecord({}), FakeGrid(reg.info))}
            picks["train"] = {m.metadata.dst_node_id for m in strategy.configure_train(4, arrays, ConfigRecord({}), FakeGrid(reg.info))}
            continue
        msgs = strategy.configure_train(4, arrays, ConfigRecord({}), FakeGrid(reg.info))
        assert strategy.configure_evaluate(4, arrays, ConfigRecord({}), FakeGrid(reg.info)) == []  # round 4's rides in round 5
    sent = {m.metadata.dst_node_id: (m.metadata.message_type, dict(m.content["config"])) for m in msgs}
    assert len(sent) == len(msgs)  # one message per node
    assert {n for n, (kind, _) in sent.items() if kind == "train"} == picks["train"]
    assert {n for n, (kind, c) in sent.items() if kind == "evaluate" or "evaluate-round" in c} == picks["evaluate"]
    assert picks["evaluate"] - picks["train"] and picks["evaluate"] & picks["train"] and picks["train"] - picks["evaluate"]  # all three cases
    for n, (kind, c) in sent.items():
        if kind == "evaluate":
            assert c["server-round"] == 3 and c["ts-mode"] == "none"
        elif n in picks["evaluate"]:
            assert (c["server-round"], c["evaluate-round"], c["evaluate-ts-mode"]) == (4, 3, "none")
        else:
            assert "evaluate-round" not in c


def test_a_folded_evaluation_is_validated_apart_from_its_training(tmp_path):
    from flwr.app import MetricRecord

    strategy, run, reg = make(tmp_path)
    seen, unseen = reg.seen(reg.info), reg.unseen(reg.info)
    g = torch.Generator().manual_seed(1)
    honest = eval_metrics(torch.randn(7, 3, generator=g), torch.randint(0, 3, (7,), generator=g), "test-")
    strategy.sampled["train"] = {seen[0], seen[1], seen[2]}
    strategy.sampled["evaluate"], strategy.eval_round = {seen[0], seen[1], seen[3], unseen[0]}, 1

    def trained(node, evaluation):
        msg = reply(node, client_state(node), train_metrics(rnd=2))
        if evaluation is not None:
            msg.content["eval-metrics"] = MetricRecord(evaluation)
        return msg

    replies = [trained(seen[0], honest), trained(seen[1], None), trained(seen[2], None),
               reply(seen[3], None, honest, message_type="evaluate"), reply(unseen[0], None, {**honest, "server-round": 5}, message_type="evaluate")]
    arrays, _ = strategy.aggregate_train(2, replies)
    assert arrays is not None  # seen[0] and seen[2] trained
    rows = read_records(run.path)
    outcome = {(r["phase"], r["partition"]): (r["kind"], r.get("reason")) for r in rows if r["kind"] in ("train", "evaluated", "rejected")}
    part = {n: reg.info[n].partition_id for n in reg.info}
    assert outcome[("evaluate", part[seen[0]])] == ("evaluated", None) and outcome[("train", part[seen[0]])] == ("train", None)
    assert outcome[("evaluate", part[seen[1]])] == ("rejected", "format") and outcome[("train", part[seen[1]])] == ("rejected", "format")
    assert outcome[("train", part[seen[2]])] == ("train", None) and ("evaluate", part[seen[2]]) not in outcome
    assert outcome[("evaluate", part[seen[3]])] == ("evaluated", None) and ("train", part[seen[3]]) not in outcome
    assert outcome[("evaluate", part[unseen[0]])] == ("rejected", "round")
    assert {r["round"] for r in rows if r["kind"] in ("client", "pooled")} == {1}
