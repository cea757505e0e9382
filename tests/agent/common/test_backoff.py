"""The one backoff rule (``edge_agent.common.backoff``), tested without sleeps."""

from __future__ import annotations

import random

import pytest

from edge_agent.common import backoff


def test_delay_doubles_within_half_fixed_half_jitter_bounds() -> None:
    assert backoff.delay(0, 0.5, 30.0, rand=lambda: 0.0) == 0.25
    assert backoff.delay(0, 0.5, 30.0, rand=lambda: 1.0) == 0.5
    assert backoff.delay(3, 0.5, 30.0, rand=lambda: 1.0) == 4.0
    assert backoff.delay(3, 0.5, 30.0, rand=lambda: 0.5) == pytest.approx(3.0)
    assert backoff.delay(50, 0.5, 30.0, rand=lambda: 1.0) == 30.0
    assert backoff.delay(10_000, 0.5, 30.0, rand=lambda: 0.0) == 15.0  # bounded, no overflow
    assert backoff.delay(5, 2.0, 1.0, rand=lambda: 1.0) == 2.0  # max below min: min wins
    assert backoff.delay(-3, 0.5, 30.0, rand=lambda: 1.0) == 0.5


def test_backoff_grows_with_jitter_is_capped_and_resets() -> None:
    b = backoff.Backoff(0.5, 8.0, random.Random(1).random)
    delays = [b.next_delay() for _ in range(8)]
    caps = [min(8.0, 0.5 * 2**k) for k in range(8)]
    for d, cap in zip(delays, caps, strict=True):
        assert cap / 2 <= d <= cap
    assert b.attempt == 8
    assert delays[-1] <= 8.0 and delays[3] > delays[0]
    assert len({round(d, 6) for d in delays}) == len(delays)  # jittered, not lockstep
    assert b.peek() <= 8.0 and b.attempt == 8  # peeking counts nothing
    b.reset()
    assert b.next_delay() <= 0.5


def test_a_fleet_spreads_its_retries() -> None:
    rngs = [random.Random(seed) for seed in range(50)]
    firsts = [backoff.delay(4, 0.5, 30.0, r.random) for r in rngs]
    assert min(firsts) >= 4.0 and max(firsts) <= 8.0
    assert max(firsts) - min(firsts) > 2.0  # not in lockstep
