"""FedNova and FedDyn against hand computations (Wang et al. 2020; Acar et al. 2021)."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from server.aggregators import FedDyn, FedNova
from tests.flower_helpers import reply

W = {"a": np.array([1.0, 2.0], dtype=np.float32), "b": np.array([[0.5]], dtype=np.float32)}


def prime(strategy, arrays):
    """What configure_train records: the global model the clients started from."""
    strategy.current_arrays = {k: v.copy() for k, v in arrays.items()}


def test_fednova_matches_hand_computation():
    s = FedNova(weighted_by_key="num-examples", server_learning_rate=1.0)
    prime(s, W)
    c1 = {"a": np.array([0.0, 1.0], np.float32), "b": np.array([[1.5]], np.float32)}
    c2 = {"a": np.array([2.0, 2.0], np.float32), "b": np.array([[0.5]], np.float32)}
    replies = [reply(1, c1, {"num-examples": 30, "fednova-a": 2.0}), reply(2, c2, {"num-examples": 10, "fednova-a": 4.0})]
    arrays, _ = s.aggregate_train(1, replies)
    # p = (0.75, 0.25); d1 = (w - c1)/2 = ([0.5, 0.5], [[-0.5]]); d2 = (w - c2)/4 = ([-0.25, 0], [[0]])
    # tau_eff = 0.75*2 + 0.25*4 = 2.5; w' = w - 2.5 * (0.75 d1 + 0.25 d2)
    d = {"a": 0.75 * np.array([0.5, 0.5]) + 0.25 * np.array([-0.25, 0.0]), "b": 0.75 * np.array([[-0.5]])}
    for k in W:
        assert np.allclose(arrays[k].numpy(), W[k] - 2.5 * d[k], atol=1e-6)
        assert arrays[k].numpy().dtype == np.float32


def test_fednova_with_equal_steps_is_fedavg():
    from flwr.serverapp.strategy import FedAvg

    rng = np.random.default_rng(0)
    clients = [{k: (v + rng.normal(size=v.shape)).astype(np.float32) for k, v in W.items()} for _ in range(3)]
    replies = [reply(i + 1, c, {"num-examples": n, "fednova-a": 5.0}) for i, (c, n) in enumerate(zip(clients, (10, 20, 70), strict=True))]
    nova = FedNova(weighted_by_key="num-examples")
    prime(nova, W)
    a, _ = nova.aggregate_train(1, replies)
    b, _ = FedAvg(weighted_by_key="num-examples").aggregate_train(1, replies)
    for k in W:
        assert np.allclose(a[k].numpy(), b[k].numpy(), atol=1e-6)


def test_feddyn_matches_hand_computation():
    s = FedDyn(weighted_by_key="uniform-weight", alpha=0.5, num_clients=4)
    prime(s, W)
    c1 = {"a": np.array([2.0, 2.0], np.float32), "b": np.array([[1.5]], np.float32)}
    c2 = {"a": np.array([0.0, 4.0], np.float32), "b": np.array([[0.5]], np.float32)}
    replies = [reply(1, c1, {"uniform-weight": 1}), reply(2, c2, {"uniform-weight": 1})]
    arrays, _ = s.aggregate_train(1, replies)
    # sum of deltas: a: (1,0)+(-1,2) = (0,2); b: 1+0 = 1. h = 0 - 0.5 * sum / 4
    h = {"a": -0.5 * np.array([0.0, 2.0]) / 4, "b": -0.5 * np.array([[1.0]]) / 4}
    mean = {"a": np.array([1.0, 3.0]), "b": np.array([[1.0]])}
    for k in W:
        assert np.allclose(s.h[k], h[k])
        assert np.allclose(arrays[k].numpy(), mean[k] - h[k] / 0.5, atol=1e-6)
    # second round: h accumulates
    prime(s, {k: v.numpy() for k, v in arrays.items()})
    arrays2, _ = s.aggregate_train(2, [reply(1, {k: v.numpy() for k, v in arrays.items()}, {"uniform-weight": 1})])
    for k in W:  # a client that did not move leaves h unchanged: w' = w - h/alpha
        assert np.allclose(arrays2[k].numpy(), arrays[k].numpy() - s.h[k] / 0.5, atol=1e-6)


def test_feddyn_sends_alpha_to_clients():
    from tests.flower_helpers import set_identity

    set_identity()
    s = FedDyn(alpha=0.25)

    class Grid:
        def get_node_ids(self):
            return [11, 12]

    config = ConfigRecord({})
    messages = list(s.configure_train(1, ArrayRecord({k: Array(v) for k, v in W.items()}), config, Grid()))
    assert sorted(m.metadata.dst_node_id for m in messages) == [11, 12]
    assert all(m.content["config"]["feddyn-alpha"] == 0.25 for m in messages)
    assert np.array_equal(s.current_arrays["a"], W["a"])
