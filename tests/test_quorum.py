"""A round closes at quorum + straggler wait, not only at the round timeout (server/quorum.py).

The grid below stands in for Flower's runtime: each site answers after a set
delay (None = it died). QuorumGrid's waiting rule is what is under test; the
loopback deployment test shows the same with real processes.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

pytest.importorskip("flwr")
from flwr.serverapp import Grid  # noqa: E402

from server.quorum import QuorumGrid  # noqa: E402


class TimedSites(Grid):
    """Message i is answered `delays[i]` seconds after the push (None: never), with an error if i in `errors`."""

    def __init__(self, delays: list[float | None], errors: frozenset[int] = frozenset()):
        self.delays, self.errors, self.pushed_at = delays, errors, 0.0
        self.pulls = 0

    def set_run(self, run):
        pass

    @property
    def run(self):
        return None

    def create_message(self, *args, **kwargs):
        raise NotImplementedError

    def get_node_ids(self):
        return list(range(len(self.delays)))

    def push_messages(self, messages):
        self.pushed_at = time.monotonic()
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, message_ids):
        self.pulls += 1
        now = time.monotonic() - self.pushed_at
        out = []
        for mid in message_ids:
            i = int(mid[1:])
            if self.delays[i] is not None and now >= self.delays[i]:
                out.append(SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=mid),
                                           site=i, has_error=lambda i=i: i in self.errors))
            # a reply is pulled once: the caller stops asking for it
        return out

    def send_and_receive(self, messages, *, timeout=None):
        raise AssertionError("QuorumGrid must collect replies itself")


def collect(delays, quorum, wait, timeout, errors=frozenset()) -> tuple[list[int], float]:
    grid = QuorumGrid(TimedSites(delays, errors), quorum=quorum, straggler_wait=wait, poll_interval=0.05)
    start = time.monotonic()
    replies = grid.send_and_receive([object()] * len(delays), timeout=timeout)
    return sorted(r.site for r in replies), time.monotonic() - start


def test_a_dead_site_costs_the_straggler_wait_not_the_round_timeout():
    sites, seconds = collect([0.0, 0.1, None], quorum=2, wait=0.5, timeout=60)
    assert sites == [0, 1]
    assert 0.5 <= seconds < 5  # closed ~0.5 s after the quorum, far from the 60 s timeout


def test_a_straggler_inside_the_wait_is_kept():
    sites, seconds = collect([0.0, 0.1, 0.4], quorum=2, wait=3.0, timeout=60)
    assert sites == [0, 1, 2]
    assert seconds < 2.5  # returned as soon as everyone answered, not after the wait


def test_without_a_straggler_wait_the_round_waits_for_the_timeout():
    sites, seconds = collect([0.0, 0.0, None], quorum=2, wait=0.0, timeout=1.0)
    assert sites == [0, 1]
    assert seconds >= 1.0


def test_error_replies_do_not_make_a_quorum():
    # two sites answer with errors, the third is dead: no quorum, so the full timeout is waited
    sites, seconds = collect([0.0, 0.0, None], quorum=2, wait=0.2, timeout=1.0, errors=frozenset({0, 1}))
    assert sites == [0, 1]
    assert seconds >= 1.0


def test_quorum_larger_than_the_sites_asked_means_all_of_them():
    sites, seconds = collect([0.0, 0.3], quorum=5, wait=0.1, timeout=60)
    assert sites == [0, 1] and seconds < 5
