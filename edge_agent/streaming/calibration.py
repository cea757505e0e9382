"""Calibration: how many workers and how large a batch serve fastest, measured and remembered.

The right layout depends on the machine (cores, a GPU, the CPU quota), the model and the
neighbours on a shared node, so the agent times the candidates on the real session before any
camera starts, unless the config fixes them. That measurement is most of a start-up (about
1.6 s per model at the default ``calibrate_s``), and a restarted agent would only find the same
answer again: so each answer is stored (``Store``, a JSON file on the agent's volume) under what
it depends on (``Key``: the model's sha256 and providers, the CPUs this process may use, the
cgroup CPU quota and the candidates tried), reused at the next start of the same model on the
same machine (``choose``), and measured again in the background once the agent serves
(``recheck``): a new layout is adopted only if it beats the stored one by ``MARGIN`` in that
new measurement, the same rule that protects the default at a first start.

Measurements run in a thread off the event loop; the scheduler (``streaming.scheduler``) only
receives the numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import structlog

from edge_agent.errors import ModelError
from edge_agent.streaming import stoprule
from edge_agent.streaming.slots import ModelSlot, ServingModel

log = structlog.get_logger(__name__)

#: How much faster than the default (one worker per CPU, no batching) another configuration
#: must measure at start-up to be chosen; and how much faster than a stored layout a new
#: measurement must find another one to replace it.
MARGIN = 0.05
#: Version of the stored file's meaning; a file of another version is measured afresh.
FORMAT = 1
#: Stored layouts kept (one per model digest, machine and candidates); the oldest go first.
MAX_ENTRIES = 32


@runtime_checkable
class ShrinksArena(Protocol):
    """A model whose inference arena can give back what a measurement grew
    (``inference.engine.LoadedModel.shrink_arena``)."""

    def shrink_arena(self) -> None:
        """Free the arena's regions no run is using."""
        ...


class CalibrationAborted(Exception):
    """A measurement was told to stop (the agent shuts down) before it finished."""


def _throughput(model: ServingModel, x: np.ndarray, workers: int, seconds: float,
                abort: threading.Event | None = None) -> float:
    """Frames per second of ``workers`` threads running ``model.run(x)`` back to back.

    Each thread is timed from its first completion to its last, so a short window does not
    gain or lose a fraction of an inference at its edges (at 0.4 s and 30 ms an inference,
    plain counting would be off by up to 8 %).
    """
    stop = threading.Event()
    # one list per thread, appended only by that thread; read after every thread joined
    stamps: list[list[float]] = [[] for _ in range(workers)]
    n = x.shape[0]

    def loop(i: int) -> None:
        model.run(x)  # warm-up for this shape and thread, not timed
        barrier.wait()
        mine = stamps[i]
        mine.append(time.perf_counter())
        while not stop.is_set():
            model.run(x)
            mine.append(time.perf_counter())

    barrier = threading.Barrier(workers + 1)
    threads = [threading.Thread(target=loop, args=(i,), name=f"calibrate[{i}]", daemon=True)
               for i in range(workers)]
    for t in threads:
        t.start()
    barrier.wait()
    if abort is None:
        stop.wait(seconds)
    else:
        abort.wait(seconds)
    stop.set()
    for t in threads:
        t.join()
    if abort is not None and abort.is_set():
        raise CalibrationAborted
    return float(sum((len(ts) - 1) * n / (ts[-1] - ts[0]) for ts in stamps if len(ts) >= 2))


def calibrate(
    model: ServingModel,
    *,
    workers: Sequence[int],
    batches: Sequence[int] = (1,),
    seconds: float = 0.4,
    min_rounds: int = 2,
    max_s: float | None = None,
    incumbent: tuple[int, int] | None = None,
    sample: np.ndarray | None = None,
    abort: threading.Event | None = None,
) -> tuple[int, int, dict[str, float]]:
    """Time each (workers, batch) candidate on ``model``; return the best and the medians.

    The candidates run in interleaved rounds until the stop rule (``stoprule``) says the
    leader's lead is outside the noise of the rounds, or ties within ``MARGIN``, or the budget
    ``max_s`` (default: 4 rounds' worth, at least 2 rounds) is spent; a burst of other work on
    a shared machine hits every candidate of a round alike. The incumbent (default: one worker
    per CPU, ``max(workers)``, without batching, what single-threaded sessions are built for)
    is kept unless another candidate beats it out of the noise by ``MARGIN``, so noise at
    start-up cannot talk the agent out of it, while a model or device that really prefers
    fewer workers (a GPU) or batches still gets them. Runs in the calling thread (startup,
    off the event loop); ``abort`` set ends it with ``CalibrationAborted``.
    """
    if sample is None:
        rng = np.random.default_rng(0)
        sample = rng.integers(0, 255, (720, 1280, 3), dtype=np.uint8)
    one, _ = model.preprocess(sample)
    cands = {f"w{w}b{b}": (w, b) for b in sorted(set(batches)) for w in sorted(set(workers))}
    w0, b0 = incumbent if incumbent is not None else (max(workers), min(batches))

    def measure_one(name: str) -> float:
        w, b = cands[name]
        x = one if b == 1 else np.concatenate([one] * b)
        return _throughput(model, x, w, seconds, abort)

    budget = max_s if max_s is not None else 4 * seconds * len(cands)
    out = stoprule.run_rounds(list(cands), measure_one, incumbent=f"w{w0}b{b0}",
                              margin=MARGIN, min_rounds=min_rounds,
                              max_rounds=max(min_rounds, 12), budget_s=budget)
    log.debug("calibration_rounds", rounds=out.rounds, settled=out.settled,
              seconds=out.seconds, choice=out.choice, leader=out.verdict.leader)
    w, b = cands[out.choice]
    return w, b, out.medians


def allowed_cpus() -> int:
    """CPUs this process may run on (its affinity mask; the CPU count off Linux)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def worker_candidates() -> list[int]:
    """1 up to the CPUs this process may use (at most 8)."""
    return list(range(1, min(allowed_cpus(), 8) + 1))


def cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs' worth of time the cgroup grants per period (``resources.limits.cpu``); None: none.

    cgroup v2 says it in ``cpu.max`` ("max 100000" or "150000 100000"), v1 in
    ``cpu/cpu.cfs_quota_us`` (-1 for none) over ``cpu/cpu.cfs_period_us``. A pod's limit changes
    the best layout without changing the CPU count, hence part of the key.
    """
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else round(int(quota) / int(period), 3)
    except (OSError, ValueError):
        pass
    try:
        q = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        p = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if q <= 0 or p <= 0 else round(q / p, 3)


# ------------------------------------------------------------------------ remembered layouts


@dataclass(frozen=True)
class Key:
    """What a measured layout depends on: the same key measures the same answer again."""

    #: The ONNX file's sha256 (``ServingModel.sha256``).
    sha256: str
    #: Execution providers of the session, preferred first (a GPU changes everything).
    providers: tuple[str, ...]
    #: CPUs the process may run on (``allowed_cpus``).
    cpus: int
    #: cgroup CPU quota in CPUs (``cpu_quota``), None when unlimited.
    cpu_quota: float | None
    #: Worker counts and batch sizes tried (they follow the config and the camera count).
    workers: tuple[int, ...]
    batches: tuple[int, ...]

    @classmethod
    def of(cls, model: ServingModel, workers: Sequence[int], batches: Sequence[int]) -> Key:
        """The key of ``model`` with these candidates on this machine, now."""
        return cls(model.sha256, tuple(model.providers), allowed_cpus(), cpu_quota(),
                   tuple(sorted(set(workers))), tuple(sorted(set(batches))))


@dataclass(frozen=True)
class Layout:
    """A chosen layout and the figures (frames per second per candidate) it was chosen from."""

    workers: int
    max_batch: int
    figures: dict[str, float] = field(default_factory=dict)
    #: Unix time of the measurement.
    measured_at: float = 0.0

    @property
    def name(self) -> str:
        """The candidate's name in ``figures`` (``w2b1``)."""
        return f"w{self.workers}b{self.max_batch}"


class Store:
    """Layouts by key in one JSON file, written whole and atomically (temp file + rename).

    A missing, unreadable or foreign file is an empty store (the agent measures, as on a first
    start) and is replaced at the next write; a write that fails (read-only volume) is logged
    and changes nothing. Reads and writes run in the calibration thread, never on the loop.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def _entries(self) -> list[dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            log.warning("calibration_store_unreadable", path=str(self.path), error=str(exc))
            return []
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            log.warning("calibration_store_ignored", path=str(self.path),
                        reason=f"not format {FORMAT}")
            return []
        entries = data.get("entries")
        return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []

    def get(self, key: Key) -> Layout | None:
        """The layout stored for ``key``, or None (also for an entry that does not parse)."""
        want = _key_json(key)
        for e in self._entries():
            if e.get("key") != want:
                continue
            layout = _layout(e, key)
            if layout is None:
                log.warning("calibration_entry_invalid", path=str(self.path), entry=str(e)[:200])
            return layout
        return None

    def put(self, key: Key, layout: Layout) -> bool:
        """Store ``layout`` for ``key`` (replacing its old one); False when it could not."""
        want = _key_json(key)
        entries = [e for e in self._entries() if e.get("key") != want]
        entries.append({"key": want, **asdict(layout)})
        entries.sort(key=lambda e: e.get("measured_at", 0) if isinstance(
            e.get("measured_at"), int | float) else 0)
        body = json.dumps({"format": FORMAT, "entries": entries[-MAX_ENTRIES:]}, indent=1)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(body + "\n", encoding="utf-8")
            tmp.replace(self.path)
        except OSError as exc:
            log.warning("calibration_store_not_written", path=str(self.path), error=str(exc))
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            return False
        return True


def _key_json(key: Key) -> dict[str, Any]:
    d = asdict(key)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _layout(entry: dict[str, Any], key: Key) -> Layout | None:
    """The entry's layout when it is one ``key`` could have produced, else None."""
    w, b, figs, at = (entry.get(k) for k in ("workers", "max_batch", "figures", "measured_at"))
    if not (isinstance(w, int) and isinstance(b, int) and w in key.workers
            and b in key.batches and isinstance(figs, dict)
            and isinstance(at, int | float) and math.isfinite(at)):
        return None
    if not all(isinstance(k, str) and isinstance(v, int | float) for k, v in figs.items()):
        return None
    return Layout(w, b, {k: float(v) for k, v in figs.items()}, float(at))


def measure(model: ServingModel, key: Key, *, seconds: float,
            abort: threading.Event | None = None,
            incumbent: tuple[int, int] | None = None, max_s: float | None = None) -> Layout:
    """Time ``key``'s candidates on ``model`` now (``calibrate``) and return the choice."""
    try:
        w, b, figures = calibrate(model, workers=key.workers, batches=key.batches,
                                  seconds=seconds, abort=abort, incumbent=incumbent, max_s=max_s)
    finally:
        # the candidates grew the arena to the largest of them; the layout chosen regrows
        # only what it needs (docs/deploy.md, "Sizing": 15 MB for the YOLOv8n-sized model)
        if isinstance(model, ShrinksArena):
            model.shrink_arena()
    return Layout(w, b, figures, time.time())


def choose(model: ServingModel, key: Key, store: Store, *,
           seconds: float, max_s: float | None = None) -> tuple[Layout, bool]:
    """The layout to start with and whether it came from ``store`` (else measured and stored)."""
    cached = store.get(key)
    if cached is not None:
        return cached, True
    layout = measure(model, key, seconds=seconds, max_s=max_s)
    store.put(key, layout)
    return layout, False


def recheck(model: ServingModel, key: Key, store: Store, current: Layout, *, seconds: float,
            abort: threading.Event | None = None) -> Layout:
    """Measure again while serving; return the layout to use from now on, and store it.

    The new measurement's choice replaces ``current`` only when, in that same measurement, it
    beats ``current`` out of the rounds' noise and by ``MARGIN`` (``current`` is the stop
    rule's incumbent): both ran under the same load (the live cameras included), so a small
    difference is noise and the agent keeps what it runs.
    """
    new = measure(model, key, seconds=seconds, abort=abort,
                  incumbent=(current.workers, current.max_batch))
    store.put(key, new)
    return new


class Calibrator:
    """The agent's layouts: chosen at start (stored or measured), stored ones measured again.

    ``choose`` runs in the start-up thread, once per model; ``start_recheck`` starts, on the
    event loop once the agent serves, one short task that measures each stored layout again
    (holding a lease on the model, so a hot swap cannot close the session under it) and calls
    ``adopt`` with each layout that changed; ``aclose`` stops a measurement in progress (the
    agent shuts down) and waits for it.
    """

    def __init__(self, store: Store, *, seconds: float, floor: int = 1,
                 max_s: float | None = None) -> None:
        self.store = store
        self.seconds = seconds
        #: Budget of one start-up measurement (None: four rounds' worth).
        self.max_s = max_s
        #: The key of each chosen model (what a live re-evaluation stores its answer under).
        self.keys: dict[str, Key] = {}
        #: The fewest workers whatever the layouts say (the config's fixed count, or 1).
        self.floor = floor
        #: The layout in use per model name.
        self.layouts: dict[str, Layout] = {}
        #: Models whose layout came from the store, with its key: measured again after start.
        self.stored: dict[str, Key] = {}
        self._abort = threading.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def workers(self) -> int:
        """Worker threads the layouts need together (the largest of them)."""
        return max([self.floor, *(lay.workers for lay in self.layouts.values())])

    def choose(self, name: str, model: ServingModel, workers: Sequence[int],
               batches: Sequence[int]) -> Layout:
        """The layout for model ``name``: stored for its key, else measured now (a thread)."""
        key = Key.of(model, workers, batches)
        layout, stored = choose(model, key, self.store, seconds=self.seconds, max_s=self.max_s)
        self.layouts[name] = layout
        self.keys[name] = key
        if stored:
            self.stored[name] = key
        log.info("concurrency_reused" if stored else "concurrency_measured", model=name,
                 workers=layout.workers, max_batch=layout.max_batch, fps=layout.figures)
        return layout

    @property
    def rechecking(self) -> bool:
        """The background re-measurement of stored layouts still runs."""
        return self._task is not None and not self._task.done()

    def record(self, name: str, layout: Layout) -> None:
        """A live re-evaluation chose ``layout`` for ``name``: use and store it (any thread)."""
        self.layouts[name] = layout
        key = self.keys.get(name)
        if key is not None and layout.workers in key.workers and layout.max_batch in key.batches:
            self.store.put(key, layout)

    def start_recheck(self, slots: Mapping[str, ModelSlot],
                      adopt: Callable[[str, Layout], None]) -> None:
        """Measure the stored layouts again in the background (on the running loop)."""
        if self.stored and self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._recheck(slots, adopt), name="calibration-recheck")

    async def _recheck(self, slots: Mapping[str, ModelSlot],
                       adopt: Callable[[str, Layout], None]) -> None:
        for name, key in list(self.stored.items()):
            slot = slots.get(name)
            try:
                if slot is None:
                    continue
                model = slot.acquire()
            except ModelError:  # unloaded meanwhile
                continue
            try:
                if model.sha256 != key.sha256:  # swapped since the start: not this key's model
                    continue
                layout = await asyncio.to_thread(recheck, model, key, self.store,
                                                 self.layouts[name], seconds=self.seconds,
                                                 abort=self._abort)
            except CalibrationAborted:
                return
            except Exception as exc:  # the agent serves on with the stored layout
                log.warning("concurrency_recheck_failed", model=name, error=repr(exc)[:300])
                continue
            finally:
                slot.release(model, None)
                self.stored.pop(name, None)
            changed = layout.name != self.layouts[name].name
            self.layouts[name] = layout
            log.info("concurrency_rechecked", model=name, workers=layout.workers,
                     max_batch=layout.max_batch, changed=changed, fps=layout.figures)
            if changed:
                adopt(name, layout)

    async def aclose(self, timeout: float) -> None:
        """Stop a measurement in progress and wait (at most ``timeout`` s) for its thread."""
        self._abort.set()
        task, self._task = self._task, None
        if task is not None:
            done, _ = await asyncio.wait({task}, timeout=timeout)
            if not done:
                task.cancel()
                log.warning("calibration_recheck_not_stopped", timeout_s=timeout)
            elif not task.cancelled() and task.exception() is not None:
                log.error("calibration_recheck_died", error=repr(task.exception())[:300])
