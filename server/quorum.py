"""Reply collection that closes a round at quorum: Flower's grid, with one waiting rule changed.

Flower's `send_and_receive` waits until every site answered or the round timeout
passed, so one site that died mid-round holds the whole consortium for the full
timeout, every round it stays away. Here a round also closes `straggler_wait`
seconds after a quorum of sites answered. Everything else (pushing, pulling,
node lists) is Flower's own grid, unchanged.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from logging import WARNING

from flwr.app import Message
from flwr.common.logger import log
from flwr.serverapp import Grid


class QuorumGrid(Grid):
    def __init__(self, grid: Grid, quorum: int, straggler_wait: float, poll_interval: float = 0.25):
        """`straggler_wait` <= 0: wait for every site until the timeout (Flower's rule).

        `poll_interval`: a poll is one small request to the SuperLink for the pending reply ids, while
        each second of waiting past the last reply is a second of every site's round (Flower's own
        deployment grid sleeps 3 s between polls)."""
        self.grid = grid
        self.quorum = max(1, quorum)
        self.straggler_wait = straggler_wait
        self.poll_interval = poll_interval

    def set_run(self, run) -> None:
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self):
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Replies until all sites answered, `timeout` passed, or quorum + `straggler_wait` passed.

        Only successful replies count towards the quorum: a site's error reply is an answer,
        not a contribution. Replies that arrive after the round closed are never pulled."""
        messages = list(messages)
        if not messages:  # e.g. a round without federated evaluation
            return []
        pending = set(self.grid.push_messages(messages))
        asked = len(pending)
        need = min(self.quorum, asked)
        start = time.monotonic()
        deadline = start + timeout if timeout is not None else math.inf
        quorum_at: float | None = None
        replies: list[Message] = []
        while True:
            got = list(self.grid.pull_messages(pending))
            replies += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            now = time.monotonic()
            if not pending:
                return replies
            if quorum_at is None and sum(not m.has_error() for m in replies) >= need:
                quorum_at = now
            closes = deadline
            if quorum_at is not None and self.straggler_wait > 0:
                closes = min(closes, quorum_at + self.straggler_wait)
            if now >= closes:
                break
            time.sleep(max(0.0, min(self.poll_interval, closes - now)))
        why = "the round timeout" if quorum_at is None or now >= deadline else f"quorum + {self.straggler_wait:g} s"
        log(WARNING, "%s of %s sites had not answered after %.0f s (%s): the round goes on without them, "
            "and their late replies are discarded", len(pending), asked, now - start, why)
        return replies
