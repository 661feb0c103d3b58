"""Reply polling with a short first pause: Flower's ``Grid.send_and_receive`` pulls the replies,
then sleeps 3 s between pulls, so every phase ends on average 1.5 s after its last reply arrived.

:class:`QuickPolling` wraps the Grid the ServerApp gets and answers ``send_and_receive`` with the
same Grid calls (``push_messages``, then ``pull_messages`` until every reply is in or the timeout
passes), pausing 0.1 s at first and backing off by 1.5x to ``fl.poll_interval``; it resets to
0.1 s whenever replies arrive, since the rest of a phase's replies tend to follow. Everything
else (node ids, the run, ...) is the wrapped Grid's. A Grid without ``push_messages`` /
``pull_messages`` keeps its own ``send_and_receive``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

FIRST_PAUSE = 0.1
BACKOFF = 1.5


class QuickPolling:
    def __init__(self, grid: Any, longest_pause: float):
        self.grid = grid
        self.longest_pause = max(FIRST_PAUSE, float(longest_pause))
        self.pulls = 0  # for tests and benchmarks: how often the SuperLink was asked

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None) -> list[Any]:
        if not (hasattr(self.grid, "push_messages") and hasattr(self.grid, "pull_messages")):
            return list(self.grid.send_and_receive(messages, timeout=timeout))
        waiting = set(self.grid.push_messages(messages))
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Any] = []
        pause = FIRST_PAUSE
        while waiting:
            got = list(self.grid.pull_messages(waiting))
            self.pulls += 1
            replies += got
            waiting -= {m.metadata.reply_to_message_id for m in got}
            left = None if end is None else end - time.monotonic()
            if not waiting or (left is not None and left <= 0):
                break
            pause = FIRST_PAUSE if got else min(pause * BACKOFF, self.longest_pause)
            time.sleep(pause if left is None else min(pause, left))
        return replies
