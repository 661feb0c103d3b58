"""The ServerApp's reply polling (server/polling.py) against a Grid whose replies arrive late."""

from __future__ import annotations

import time
from types import SimpleNamespace

from server.polling import FIRST_PAUSE, QuickPolling


class SlowGrid:
    """push_messages / pull_messages like Flower's Grid; reply i is ready ``delays[i]`` s after the push."""

    def __init__(self, delays):
        self.delays = delays
        self.pulled_at: list[float] = []

    def push_messages(self, messages):
        self.t0 = time.monotonic()
        self.left = {f"m{i}" for i in range(len(self.delays))}
        return sorted(self.left)

    def pull_messages(self, ids):
        now = time.monotonic() - self.t0
        self.pulled_at.append(now)
        ready = [i for i in sorted(ids) if i in self.left and self.delays[int(i[1:])] <= now]
        self.left -= set(ready)
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in ready]

    def get_node_ids(self):
        return [1, 2]


def test_every_reply_is_collected_soon_after_it_arrives():
    grid = SlowGrid([0.05, 0.3, 1.2])
    quick = QuickPolling(grid, longest_pause=0.5)
    t = time.monotonic()
    replies = quick.send_and_receive([object()] * 3, timeout=30)
    took = time.monotonic() - t
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    assert 1.2 <= took <= 1.2 + 0.5 + 0.3  # at most one longest pause after the last reply (Flower's: up to 3 s)
    pauses = [b - a for a, b in zip(grid.pulled_at, grid.pulled_at[1:], strict=False)]
    assert max(pauses) <= 0.5 + 0.1 and min(pauses) >= FIRST_PAUSE * 0.9
    assert quick.get_node_ids() == [1, 2]  # everything else is the wrapped Grid's


def test_the_timeout_bounds_the_wait_and_the_pulls():
    grid = SlowGrid([0.0, 99.0])
    t = time.monotonic()
    replies = QuickPolling(grid, longest_pause=0.2).send_and_receive([object()] * 2, timeout=1.0)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert 1.0 <= time.monotonic() - t <= 1.4
    assert len(grid.pulled_at) <= 1 + 1.0 / FIRST_PAUSE


def test_a_grid_without_push_and_pull_keeps_its_own_send_and_receive():
    grid = SimpleNamespace(send_and_receive=lambda messages, timeout=None: ["own"])
    assert QuickPolling(grid, 1.0).send_and_receive([1], timeout=5) == ["own"]
