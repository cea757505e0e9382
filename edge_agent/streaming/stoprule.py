"""The stop rule: time candidate layouts in interleaved rounds until the answer is out of the noise.

One measurement of each candidate decides nothing on a shared machine: a neighbour's burst, a pod
loading beside us or a CPU hog at power-up can make the slower layout look faster for a second.
So both the start-up measurement (``calibration``, synthetic runs of the model) and the live
re-evaluation (``retune``, the real pipeline switched between layouts) run *rounds*: every round
times each candidate once, in an order rotated from round to round, so a change of load hits
every candidate alike; the figures of one round are *paired* (taken seconds apart).

The rule, for the leader L (highest median) against every other candidate C, on the per-round
log-ratios ``d = ln(fps_L / fps_C)``: with ``lead`` their median and ``noise`` their half-range
(half of max - min), the pair is settled when L's lead is outside the noise (``lead - noise > 0``:
with two rounds, L won both) or when the whole noise band lies inside the margin
(``|lead| + noise < ln(1 + margin)``: whichever is faster, the difference does not matter).
Rounds go on until every pair is settled (at least ``min_rounds``) or the round or time budget
is spent. The incumbent (the default at a first start, the running layout later) is replaced
only by a leader whose lead over it is outside the noise *and* above the margin, so an
unsettled or small difference keeps what runs.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

#: fps at or below this count as this (a candidate that completed nothing in its slice), so
#: log-ratios stay finite.
FLOOR_FPS = 1e-3


@dataclass(frozen=True)
class Verdict:
    """What the rounds so far say."""

    #: The candidate to run: the leader when it beat the incumbent out of the noise by the
    #: margin, else the incumbent.
    choice: str
    #: The candidate with the highest median fps.
    leader: str
    #: Every pair (leader, other) settled: more rounds would not change the answer.
    settled: bool
    #: Median and half-range of the leader's per-round log-ratio over the incumbent (0, 0 when
    #: the leader is the incumbent).
    lead: float
    noise: float


@dataclass
class Rounds:
    """Per-candidate fps, one figure per round, in the order the rounds ran."""

    candidates: list[str]
    figures: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, fps: float) -> None:
        """Record ``name``'s figure of the current round."""
        self.figures.setdefault(name, []).append(max(FLOOR_FPS, fps))

    @property
    def complete(self) -> int:
        """Rounds every candidate has a figure in."""
        return min((len(self.figures.get(c, [])) for c in self.candidates), default=0)

    def medians(self) -> dict[str, float]:
        """Each candidate's median fps over the complete rounds."""
        n = self.complete
        return {c: round(statistics.median(self.figures[c][:n]), 2) for c in self.candidates
                if n}

    def paired(self, a: str, b: str) -> tuple[float, float]:
        """Median and half-range of ``ln(fps_a / fps_b)`` over the complete rounds."""
        n = self.complete
        d = [math.log(x / y) for x, y in zip(self.figures[a][:n], self.figures[b][:n],
                                               strict=True)]
        return statistics.median(d), (max(d) - min(d)) / 2.0

    def verdict(self, incumbent: str, margin: float) -> Verdict:
        """The choice so far (see the module docstring for the rule)."""
        if self.complete == 0:
            return Verdict(incumbent, incumbent, False, 0.0, 0.0)
        med = self.medians()
        leader = max(self.candidates, key=lambda c: (med[c], c == incumbent))
        band = math.log1p(margin)
        settled = self.complete >= 2
        for other in self.candidates:
            if other == leader or not settled:
                continue
            lead, noise = self.paired(leader, other)
            settled = lead - noise > 0 or abs(lead) + noise < band
        if leader == incumbent:
            return Verdict(incumbent, leader, settled, 0.0, 0.0)
        lead, noise = self.paired(leader, incumbent)
        wins = self.complete >= 2 and lead - noise > 0 and lead > band
        return Verdict(leader if wins else incumbent, leader, settled, lead, noise)


@dataclass(frozen=True)
class Outcome:
    """The result of ``run_rounds``: the choice, each candidate's median and how it ended."""

    choice: str
    medians: dict[str, float]
    rounds: int
    settled: bool
    seconds: float
    verdict: Verdict
    #: Every figure, per candidate, per round.
    figures: dict[str, list[float]]


def run_rounds(
    candidates: Sequence[str],
    measure: Callable[[str], float],
    *,
    incumbent: str,
    margin: float,
    min_rounds: int = 2,
    max_rounds: int = 8,
    budget_s: float = 10.0,
    clock: Callable[[], float] = time.monotonic,
) -> Outcome:
    """Time ``candidates`` with ``measure(name) -> fps`` in rotated rounds until settled.

    Stops after a round when the verdict is settled (and ``min_rounds`` ran), after
    ``max_rounds``, or when the next round would likely end past ``budget_s`` (judged by the
    rounds so far). ``measure`` may raise to abort (the exception propagates).
    """
    cands = list(dict.fromkeys(candidates))
    if incumbent not in cands:
        raise ValueError(f"incumbent {incumbent!r} is not a candidate")
    rounds = Rounds(cands)
    t0 = clock()
    verdict = rounds.verdict(incumbent, margin)
    if len(cands) == 1:
        rounds.add(cands[0], measure(cands[0]))
        verdict = rounds.verdict(incumbent, margin)
        return Outcome(incumbent, rounds.medians(), 1, True, clock() - t0, verdict,
                       rounds.figures)
    for r in range(max(1, max_rounds)):
        k = r % len(cands)
        for name in cands[k:] + cands[:k]:  # rotated: no candidate is always first
            rounds.add(name, measure(name))
        verdict = rounds.verdict(incumbent, margin)
        done = r + 1
        if done >= min_rounds and verdict.settled:
            break
        spent = clock() - t0
        if spent + spent / done > budget_s and done >= min_rounds:
            break
    return Outcome(verdict.choice, rounds.medians(), rounds.complete, verdict.settled,
                   round(clock() - t0, 3), verdict, rounds.figures)
