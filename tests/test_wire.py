"""The packed wire format: one contiguous array per dtype under a key carrying the manifest's digest."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from common.tensors import Manifest, ManifestError, pack, unpack

STATE = {"visual.a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "text.b": torch.tensor([7.0, 8.0]), "scale": torch.tensor(2.5)}


def test_pack_is_one_flat_array_that_unpacks_exactly():
    m = Manifest.of(STATE.items())
    record = pack(STATE, m)
    assert list(record.keys()) == [f"packed-float32-{m.digest}"]
    flat = record[m.array_key("float32")].numpy()
    assert flat.shape == (9,) and flat.tolist() == [2.5, 7, 8, 0, 1, 2, 3, 4, 5]  # sorted by key: scale, text.b, visual.a
    out = unpack(record, m)
    assert set(out) == set(STATE) and all(torch.equal(out[k], STATE[k]) for k in STATE)
    assert Manifest.of(reversed(list(STATE.items()))) == m  # the order tensors are listed in does not matter
    assert Manifest.from_json(m.to_json()) == m


def test_the_digest_covers_every_key_shape_and_the_order():
    m = Manifest.of(STATE.items())
    others = [
        {**STATE, "text.b": torch.zeros(3)},  # a shape
        {("text.c" if k == "text.b" else k): v for k, v in STATE.items()},  # a name
    ]
    for other in others:
        o = Manifest.of(other.items())
        assert o.digest != m.digest
        with pytest.raises(ManifestError, match="another manifest"):
            unpack(pack(other), m)
    assert "'text.b' (2,) here vs 'text.b' (3,) there" in m.describe_difference(Manifest.of(others[0].items()))


def test_malformed_packed_arrays_are_refused():
    m = Manifest.of(STATE.items())
    key = m.array_key("float32")
    too_long = ArrayRecord({key: Array(np.zeros(10, np.float32))})
    with pytest.raises(ManifestError, match=r"shape \(10,\)"):
        unpack(too_long, m)
    wrong_dtype = ArrayRecord({key: Array(np.zeros(9, np.float64))})
    with pytest.raises(ManifestError, match="float64"):
        unpack(wrong_dtype, m)
    extra = pack(STATE, m)
    extra["bogus"] = Array(np.zeros(1, np.float32))
    with pytest.raises(ManifestError, match="do not match"):
        unpack(extra, m)
    with pytest.raises(ManifestError, match="shape"):
        pack({**STATE, "scale": torch.zeros(2)}, m)


def test_server_validation_rejects_a_reply_for_another_manifest_and_a_wrong_length():
    """The server checks packed replies with the same rules as any array: key, size, shape, finite."""
    from common import config
    from server.nodes import NodeInfo
    from server.validation import Rejection, check_train
    from tests.flower_helpers import reply as flower_reply
    from tests.test_strategy import train_metrics

    m = Manifest.of(STATE.items())
    reference = {k: a.numpy() for k, a in pack(STATE, m).items()}
    info = NodeInfo(1, 0, 2, "d", "seen", ["a"], {"train": 100, "val": 0, "test": 0})
    cfg = config.load(None)

    def reply(arrays):
        return flower_reply(1, {k: a.numpy() for k, a in arrays.items()}, train_metrics())

    ok = check_train(reply(pack({k: v + 1 for k, v in STATE.items()}, m)), 1, info, 1, reference, cfg)
    assert ok.arrays[m.array_key("float32")].shape == (9,)
    for arrays, reason in ((pack({**STATE, "text.b": torch.zeros(3)}), "keys"),
                           (ArrayRecord({m.array_key("float32"): Array(np.zeros(8, np.float32))}), "shape"),
                           (ArrayRecord({m.array_key("float32"): Array(np.full(9, np.nan, np.float32))}), "non-finite")):
        with pytest.raises(Rejection) as err:
            check_train(reply(arrays), 1, info, 1, reference, cfg)
        assert err.value.reason == reason
