"""Re-evaluating the layout while the agent serves: the start-up choice is not final.

The start-up measurement (``calibration``) runs at the worst moment on a real box: after a
power cut every pod starts at once, and a layout chosen under that load (one worker where two
serve better) would otherwise stay for the agent's whole life. So while serving, every
``retune_check_s`` the ``Retuner`` looks at the last window of the live pipeline:

- **saturated**: cameras dropped frames, or the workers waited for a frame less than
  ``SATURATED_IDLE`` of their time (a file read at ``rate: max`` never drops: it waits for
  room). Only then can a layout serve more; an idle pipeline is left alone.
- **throughput_drop**: saturated, and the frames per second fell below
  ``(1 - retune_drop_fraction)`` of what the chosen layout delivered live, twice in a row;
- **backlog_idle_cpu**: saturated while the process used at least ``retune_idle_cores`` less
  CPU than it may (the CPUs of its affinity mask, or its cgroup quota) *and* that much of its
  CPUs sat idle (a neighbour using them is no reason), twice in a row: the queue backs up
  while cores sit idle;
- **periodic**: every ``retune_interval_s`` (+-10 % jitter, so pods started together do not
  measure together), when saturated.

A re-evaluation switches the live pipeline between the candidate layouts (the running one, its
neighbours in worker count and its batch sizes) in interleaved rounds with the stop rule of
``stoprule``, each slice timed from every worker's completion to its next (``Scheduler.progress``),
and keeps the running layout unless another beats it out of the noise by ``MARGIN``. Switching
happens between frames: ``Scheduler.resize`` starts workers at once and retires surplus ones
when they next look for work, after their batch; ``set_batch_limit`` applies from the next
batch; no frame taken is lost. Triggered re-evaluations keep ``retune_cooldown_s`` apart, and
the cooldown doubles (up to the interval) each time one keeps the layout, so a box that is
simply busy is not measured over and over.

The sampling (``sample``/``trigger``) is pure arithmetic on counters with an injected clock;
the measurement runs in a thread that only sleeps and reads counters.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import psutil
import structlog

from edge_agent.config import PipelineSettings
from edge_agent.contract.telemetry import LayoutTelemetry
from edge_agent.streaming import calibration, stoprule
from edge_agent.streaming.metrics import AgentMetrics
from edge_agent.streaming.scheduler import Scheduler

log = structlog.get_logger(__name__)

#: A re-measured layout must beat the running one by this much (the start-up rule's margin).
MARGIN = 0.05
#: Workers waiting for a frame less than this fraction of their time: the queue backs up.
SATURATED_IDLE = 0.05
#: Consecutive windows a condition must hold before it triggers (one noisy window does not).
CONFIRM = 2
#: Choices kept for ``history``.
HISTORY = 20
#: Seconds the live pipeline runs each candidate per round: tens of frames per worker, timed
#: from completion to completion.
SLICE_S = 0.5
#: Seconds one re-evaluation may take before it keeps the best answer so far (>= 2 rounds).
MAX_S = 8.0


class RetuneAborted(Exception):
    """The agent stops: a re-evaluation in progress ends (the running layout is restored)."""


@dataclass(frozen=True)
class Choice:
    """A layout decision and the measurement behind it."""

    workers: int
    #: Largest batch for the models that batch (each capped at its own candidates).
    batch: int
    #: Frames per second the chosen layout delivered when chosen (live, or at start-up the
    #: synthetic measurement's figure; replaced by the live figure once saturated).
    fps_measured: float
    #: ``startup``, ``stored``, ``recheck``, ``throughput_drop``, ``backlog_idle_cpu``,
    #: ``periodic``.
    reason: str
    #: Unix time of the decision.
    at: float
    changed: bool = False
    #: Median fps per candidate (``w2b1``) of that measurement.
    figures: dict[str, float] = field(default_factory=dict)
    rounds: int = 0
    settled: bool = True

    @property
    def name(self) -> str:
        """The layout's candidate name (``w2b1``)."""
        return f"w{self.workers}b{self.batch}"


@dataclass(frozen=True)
class Sample:
    """The live pipeline over one check window."""

    seconds: float
    #: Frames inferred per second.
    fps: float
    #: Frames cameras dropped in the window.
    drops: int
    #: Fraction of the workers' time spent waiting for a frame.
    idle: float
    #: CPUs' worth of time the process used.
    cpu: float
    #: CPUs' worth of time the CPUs this process may run on sat idle (any process's).
    idle_cpus: float = 0.0

    @property
    def saturated(self) -> bool:
        """The workers could not keep up: frames dropped or no worker ever waited."""
        return self.drops > 0 or self.idle < SATURATED_IDLE


@dataclass
class _Counters:
    t: float
    frames: int
    idle_s: float
    drops: int
    cpu_s: float
    idle_cpu_s: float


class Retuner:
    """Watches the live pipeline and re-evaluates its layout (see the module docstring)."""

    def __init__(
        self,
        settings: PipelineSettings,
        scheduler: Scheduler,
        *,
        workers: Sequence[int],
        batches: Mapping[str, Sequence[int]],
        current: Choice,
        dropped: Callable[[], int],
        cpu_budget: float,
        on_choice: Callable[[Choice], None] = lambda c: None,
        busy: Callable[[], bool] = lambda: False,
        slice_s: float = SLICE_S,
        max_s: float = MAX_S,
        clock: Callable[[], float] = time.monotonic,
        cpu_clock: Callable[[], float] = time.process_time,
        idle_clock: Callable[[], float] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.scheduler = scheduler
        #: Worker counts that may be tried, and per batching model its batch sizes.
        self.worker_cands = sorted(set(workers))
        self.batch_cands = {m: sorted(set(b)) for m, b in batches.items()}
        self.current = current
        #: The live fps of the current layout (set by a measurement, or the first saturated
        #: window after a start-up choice); None until known.
        self.reference: float | None = current.fps_measured if current.reason not in (
            "startup", "stored") else None
        self.history: list[Choice] = [current]
        self.cpu_budget = cpu_budget
        self._dropped = dropped
        self._on_choice = on_choice
        self.slice_s, self.max_s = slice_s, max_s
        #: True while another measurement runs (the start-up recheck): no trial meanwhile.
        self._busy = busy
        self._clock = clock
        self._cpu_clock = cpu_clock
        self._idle_clock = idle_clock or cpus_idle_s
        self._rng = rng or random.Random()
        self._abort = threading.Event()
        self._last = self._counters()
        self._streak: dict[str, int] = {}
        self._cooldown = settings.retune_cooldown_s
        # no cooldown before the first: a busy start-up's choice is corrected at once
        self._last_eval = float("-inf")
        self._next_periodic = clock() + self._jittered()
        #: Re-evaluations per (reason, "changed" | "kept"), for metrics.
        self.evaluations: dict[tuple[str, str], int] = {}

    # ------------------------------------------------------------------ watching

    def _jittered(self) -> float:
        return self.settings.retune_interval_s * self._rng.uniform(0.9, 1.1)

    def _counters(self) -> _Counters:
        tally = self.scheduler.tally()
        return _Counters(self._clock(), tally.frames, tally.idle_s, self._dropped(),
                         self._cpu_clock(), self._idle_clock())

    def sample(self) -> Sample | None:
        """The window since the previous call (None when no time passed)."""
        now = self._counters()
        last, self._last = self._last, now
        dt = now.t - last.t
        if dt <= 0:
            return None
        workers = max(1, self.scheduler.workers)
        return Sample(dt, (now.frames - last.frames) / dt, now.drops - last.drops,
                      min(1.0, (now.idle_s - last.idle_s) / (workers * dt)),
                      (now.cpu_s - last.cpu_s) / dt, (now.idle_cpu_s - last.idle_cpu_s) / dt)

    def _confirmed(self, name: str, holds: bool) -> bool:
        self._streak[name] = self._streak.get(name, 0) + 1 if holds else 0
        return self._streak[name] >= CONFIRM

    def trigger(self, s: Sample) -> str | None:
        """The reason to re-evaluate now, or None (updates the streaks and the reference)."""
        s_ = self.settings
        now = self._clock()
        if not s.saturated:
            self._streak.clear()
            return None
        if self.reference is None:
            self.reference = s.fps  # the chosen layout's live figure
        dropped = self._confirmed(
            "throughput_drop", s.fps < (1.0 - s_.retune_drop_fraction) * self.reference)
        idle = self._confirmed("backlog_idle_cpu",
                               s.cpu < self.cpu_budget - s_.retune_idle_cores
                               and s.idle_cpus >= s_.retune_idle_cores)
        cooled = now - self._last_eval >= self._cooldown
        if dropped and cooled:
            return "throughput_drop"
        if idle and cooled:
            return "backlog_idle_cpu"
        if now >= self._next_periodic:
            return "periodic"
        return None

    async def run(self) -> None:
        """Check every ``retune_check_s`` and re-evaluate when triggered (until cancelled)."""
        await asyncio.to_thread(self.sample)
        while True:
            await asyncio.sleep(self.settings.retune_check_s)
            # in a thread: the CPU times come from reading /proc (a file read off the loop)
            s = await asyncio.to_thread(self.sample)
            reason = None if s is None or self._busy() else self.trigger(s)
            if reason is None:
                continue
            try:
                await asyncio.to_thread(self.evaluate, reason)
            except RetuneAborted:
                return

    def adopted(self, workers: int, batch: int, figures: Mapping[str, float], at: float) -> None:
        """Another measurement (the start-up recheck) changed the layout: run on from it."""
        self.current = Choice(workers, batch, figures.get(f"w{workers}b{batch}", 0.0),
                              "recheck", at, True, dict(figures))
        self.history = [*self.history, self.current][-HISTORY:]
        self.reference = None  # its live figure comes with the next saturated window
        self._last = self._counters()

    def telemetry(self, model: str) -> LayoutTelemetry:
        """The serving layout of ``model`` for its telemetry entries."""
        c = self.current
        return LayoutTelemetry(
            workers=max(1, self.scheduler.workers),
            batch=max(1, self.scheduler.batch_limits.get(model, 1)),
            fps_measured=max(0.0, round(c.fps_measured, 2)), reason=c.reason, at=c.at,
            figures=dict(list(c.figures.items())[:64]),
            evaluations=sum(self.evaluations.values()),
            changes=sum(n for (_, o), n in self.evaluations.items() if o == "changed"))

    def stop(self) -> None:
        """End a re-evaluation in progress (the agent stops)."""
        self._abort.set()

    # ------------------------------------------------------------------ measuring

    def candidates(self) -> list[tuple[int, int]]:
        """The running layout, its neighbours in worker count and its batch sizes."""
        w, b = self.current.workers, self.current.batch
        wc = self.worker_cands
        ws = {x for x in (w // 2, w - 1, w, w + 1, 2 * w, max(wc)) if x in wc} | {w}
        bs = sorted({x for c in self.batch_cands.values() for x in c} | {1}) \
            if self.batch_cands else [1]
        out = [(x, b) for x in sorted(ws)] + [(w, y) for y in bs if y != b]
        return list(dict.fromkeys(out))

    def apply(self, workers: int, batch: int) -> None:
        """Run ``workers`` workers and this batch limit from the next frame on."""
        for model, cands in self.batch_cands.items():
            self.scheduler.set_batch_limit(model, max([c for c in cands if c <= batch],
                                                      default=1))
        if workers != self.scheduler.workers:
            self.scheduler.resize(workers)

    def _sleep(self, seconds: float) -> None:
        if self._abort.wait(seconds):
            raise RetuneAborted

    def measure(self, workers: int, batch: int) -> float:
        """Frames per second of the live pipeline in this layout over one slice."""
        self.apply(workers, batch)
        t_switch = time.perf_counter()
        settle_until = time.monotonic() + max(1.0, 2 * self.slice_s)
        # settled when as many workers as now run finished a batch since the switch
        while time.monotonic() < settle_until and sum(
                1 for _, t in self.scheduler.progress()
                if t is not None and t > t_switch) < workers:
            self._sleep(0.005)
        start = self.scheduler.progress()
        self._sleep(self.slice_s)
        end = self.scheduler.progress()
        fps = 0.0
        for (n0, t0), (n1, t1) in zip(start, end[:len(start)], strict=True):
            if t0 is not None and t1 is not None and n1 > n0 and t1 > t0:
                fps += (n1 - n0) / (t1 - t0)
        # a worker born during the slice: from its first completion is unknown, count none
        return fps

    def evaluate(self, reason: str) -> Choice:
        """Measure the candidates live (a thread), run the winner, record the choice."""
        cands = {f"w{w}b{b}": (w, b) for w, b in self.candidates()}
        inc = self.current.name
        try:
            out = stoprule.run_rounds(
                list(cands), lambda n: self.measure(*cands[n]), incumbent=inc, margin=MARGIN,
                min_rounds=2, max_rounds=8, budget_s=self.max_s)
        except RetuneAborted:
            self.apply(self.current.workers, self.current.batch)
            raise
        w, b = cands[out.choice]
        self.apply(w, b)
        changed = out.choice != inc
        choice = Choice(w, b, out.medians[out.choice], reason, time.time(), changed,
                        out.medians, out.rounds, out.settled)
        self.current = choice
        self.reference = choice.fps_measured
        self.history = [*self.history, choice][-HISTORY:]
        self._streak.clear()
        self._last_eval = self._clock()
        self._next_periodic = self._last_eval + self._jittered()
        base = self.settings.retune_cooldown_s
        self._cooldown = base if changed else min(2 * self._cooldown,
                                                  max(base, self.settings.retune_interval_s))
        key = (reason, "changed" if changed else "kept")
        self.evaluations[key] = self.evaluations.get(key, 0) + 1
        self._last = self._counters()  # the trial's windows are not the new layout's
        log.info("layout_evaluated", reason=reason, workers=w, max_batch=b, changed=changed,
                 fps=out.medians, rounds=out.rounds, settled=out.settled,
                 seconds=out.seconds)
        self._on_choice(choice)
        return choice


# ------------------------------------------------------------------------ wiring (the agent)


def cpus_idle_s() -> float:
    """Seconds the CPUs of this process's affinity mask have been idle, summed (Linux; a
    machine without per-CPU times reports 0, so the idle-CPU trigger never fires there)."""
    try:
        allowed = os.sched_getaffinity(0)
        times = psutil.cpu_times(percpu=True)
    except (AttributeError, OSError, psutil.Error):
        return 0.0
    return float(sum(t.idle + getattr(t, "iowait", 0.0) for i, t in enumerate(times)
                     if i in allowed))


def cpu_budget() -> float:
    """CPUs' worth of time this process may use: its affinity mask, capped by a cgroup quota."""
    cpus = float(calibration.allowed_cpus())
    quota = calibration.cpu_quota()
    return cpus if quota is None else min(cpus, quota)


def report(metrics: AgentMetrics, choice: Choice, limits: Mapping[str, int]) -> None:
    """Show a choice in ``/metrics`` (any thread: the client library locks)."""
    metrics.workers.set(choice.workers)
    for model, limit in limits.items():
        metrics.layout_max_batch.labels(model).set(limit)
    if choice.figures:
        metrics.layout_fps.clear()
        for name, fps in choice.figures.items():
            metrics.layout_fps.labels(name).set(fps)
    metrics.layout_chosen_fps.set(choice.fps_measured)
    metrics.layout_chosen_at.set(choice.at)
    if choice.reason in ("throughput_drop", "backlog_idle_cpu", "periodic"):
        metrics.layout_evaluations.labels(choice.reason,
                                          "changed" if choice.changed else "kept").inc()


def for_agent(settings: PipelineSettings, scheduler: Scheduler,
              calibrator: calibration.Calibrator, batches: Mapping[str, Sequence[int]], *,
              dropped: Callable[[], int], metrics: AgentMetrics) -> Retuner | None:
    """The agent's re-evaluation of the layouts ``calibrator`` chose; None when off or fixed."""
    layouts = calibrator.layouts
    if not settings.retune or not layouts:
        return None
    name, first = max(layouts.items(), key=lambda kv: kv[1].workers)
    batch = max(scheduler.batch_limits.get(m, 1) for m in layouts)
    current = Choice(scheduler.workers, batch, first.figures.get(first.name, 0.0),
                     "stored" if name in calibrator.stored else "startup",
                     first.measured_at or time.time(), False, dict(first.figures))
    batching = {m: list(b) for m, b in batches.items() if len(b) > 1}

    def on_choice(choice: Choice) -> None:
        for model, lay in list(calibrator.layouts.items()):
            cands = batching.get(model, [lay.max_batch])
            limit = max([c for c in cands if c <= choice.batch], default=min(cands))
            calibrator.record(model, calibration.Layout(choice.workers, limit,
                                                        dict(choice.figures), choice.at))
        report(metrics, choice, dict(scheduler.batch_limits))

    report(metrics, current, dict(scheduler.batch_limits))
    return Retuner(settings, scheduler, workers=calibration.worker_candidates(),
                   batches=batching, current=current, dropped=dropped,
                   cpu_budget=cpu_budget(), on_choice=on_choice,
                   busy=lambda: calibrator.rechecking)
