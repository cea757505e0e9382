"""The one backoff with jitter that every retry loop of both programs uses.

Cameras reconnect, the MQTT clients reconnect, model downloads and Kubernetes calls retry; each
waits between attempts so that a component that is down is not hammered, and a fleet that lost
the same broker or hub does not come back in lockstep. One rule for all of them, so the docs
can state it once:

    attempt k (0-based) waits a delay in [d/2, d], d = min(max_s, min_s * 2**k)

Half of the delay is fixed (a flapping peer is never retried in a hot loop), half is random (the
spread that breaks the lockstep). Delays are bounded by ``max_s`` whatever the attempt count.
The random source is injected, so the rule is tested without wall-clock sleeps.
"""

from __future__ import annotations

import random
from collections.abc import Callable

#: A source of uniform floats in [0, 1): ``random.random`` or a seeded ``Random().random``.
Rand = Callable[[], float]


def delay(attempt: int, min_s: float, max_s: float, rand: Rand = random.random) -> float:
    """Seconds to wait before retry ``attempt`` (0 = the first retry): in [d/2, d]."""
    d = min(max(max_s, min_s), min_s * 2.0 ** min(max(attempt, 0), 60))
    return d / 2 + rand() * d / 2


class Backoff:
    """Counts attempts and hands out their delays; ``reset()`` after a success.

    Not thread-safe: one loop (one thread) owns an instance.
    """

    def __init__(self, min_s: float, max_s: float, rand: Rand = random.random) -> None:
        self.min_s = min_s
        self.max_s = max(max_s, min_s)
        #: Attempts counted since the last ``reset()``.
        self.attempt = 0
        self._rand = rand

    def next_delay(self) -> float:
        """The delay before the next attempt (and count the attempt)."""
        d = delay(self.attempt, self.min_s, self.max_s, self._rand)
        self.attempt += 1
        return d

    def peek(self) -> float:
        """The delay the next attempt would wait, without counting it."""
        return delay(self.attempt, self.min_s, self.max_s, self._rand)

    def reset(self) -> None:
        """Back to the shortest delay (after a connection or a request succeeded)."""
        self.attempt = 0
