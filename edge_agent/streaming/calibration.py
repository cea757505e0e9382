"""Calibration: measure, at start-up, how many workers and how large a batch serve fastest.

The right layout depends on the machine (cores, a GPU), the model and the neighbours on a
shared node, so the agent times the candidates on the real session before any camera starts,
unless the config fixes them. It runs once, in a thread off the event loop; the scheduler
(``streaming.scheduler``) only receives the numbers.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence

import numpy as np

from edge_agent.streaming.slots import ServingModel

#: How much faster than the default (one worker per CPU, no batching) another configuration
#: must measure at start-up to be chosen.
MARGIN = 0.05


def _throughput(model: ServingModel, x: np.ndarray, workers: int, seconds: float) -> float:
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
    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(workers)]
    for t in threads:
        t.start()
    barrier.wait()
    stop.wait(seconds)
    stop.set()
    for t in threads:
        t.join()
    return float(sum((len(ts) - 1) * n / (ts[-1] - ts[0]) for ts in stamps if len(ts) >= 2))


def calibrate(
    model: ServingModel,
    *,
    workers: Sequence[int],
    batches: Sequence[int] = (1,),
    seconds: float = 0.4,
    passes: int = 2,
    sample: np.ndarray | None = None,
) -> tuple[int, int, dict[str, float]]:
    """Time each (workers, batch) candidate on ``model``; return the best and all figures.

    Every candidate runs ``passes`` times, interleaved, and keeps its best figure, so a burst
    of other work on a shared machine does not decide. The default, one worker per CPU
    (``max(workers)``) without batching, is what single-threaded sessions are built for; any
    other candidate must beat it by ``MARGIN`` to be chosen, so noise at start-up (another pod
    loading, a neighbour's burst) cannot talk the agent out of it, while a model or device that
    really prefers fewer workers (a GPU) or batches still gets them. Runs in the calling thread
    (startup, off the event loop).
    """
    if sample is None:
        rng = np.random.default_rng(0)
        sample = rng.integers(0, 255, (720, 1280, 3), dtype=np.uint8)
    one, _ = model.preprocess(sample)
    cands = [(w, b) for b in sorted(set(batches)) for w in sorted(set(workers))]
    figures: dict[str, float] = {}
    for _ in range(max(1, passes)):
        for w, b in cands:
            x = one if b == 1 else np.concatenate([one] * b)
            key = f"w{w}b{b}"
            figures[key] = round(max(figures.get(key, 0.0), _throughput(model, x, w, seconds)),
                                 2)
    w0, b0 = max(workers), min(batches)
    best = (figures[f"w{w0}b{b0}"], w0, b0)
    for w, b in cands:
        fps = figures[f"w{w}b{b}"]
        if fps > best[0] * (1.0 + MARGIN) and fps > figures[f"w{w0}b{b0}"] * (1.0 + MARGIN):
            best = (fps, w, b)
    return best[1], best[2], figures


def worker_candidates() -> list[int]:
    """1 up to the CPUs this process may use (at most 8)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return list(range(1, min(n, 8) + 1))
