"""The one owner of the agent's long-lived asyncio tasks, and of its shutdown.

A task that is nobody's is a task whose death nobody notices: the camera monitor stops, the
outbox stops draining, and the pod looks healthy. So every long-lived task is spawned here with
a name (``pipeline``, ``http``, ``outbox-drain``...). A task that ends with an exception is
logged; when it is a *root* task (the agent cannot work without it) the supervisor stops
everything else within ``shutdown_timeout_s`` and the process exits non-zero, so Kubernetes
restarts it. SIGTERM and SIGINT only set an event; the shutdown then cancels the tasks, runs the
registered steps in order (drain the pipeline, close the sink, stop HTTP), all within the same
bound, and exits 0.

``LoopLagProbe`` measures how late the event loop wakes up, which is how ``/healthz`` knows the
loop is not stuck and how a test proves nothing blocks it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import structlog

log = structlog.get_logger(__name__)

#: Exit status when a root task died (Kubernetes restarts the pod).
EXIT_TASK_DIED = 1


@dataclass
class _Step:
    name: str
    fn: Callable[[], Awaitable[None]]


class Supervisor:
    """Runs named tasks until a stop is requested or a root task dies, then shuts down.

    Usage::

        sup = Supervisor(shutdown_timeout_s=20)
        sup.spawn("pipeline", pipeline.run())
        sup.on_shutdown("sink", sink.aclose)
        sup.install_signal_handlers()
        code = await sup.run()
    """

    def __init__(self, *, shutdown_timeout_s: float) -> None:
        self.shutdown_timeout_s = shutdown_timeout_s
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self._roots: set[str] = set()
        self._drained: set[str] = set()
        self._steps: list[_Step] = []
        self._stop: asyncio.Event | None = None
        self._stop_reason: str | None = None
        self._failed: str | None = None
        self._signals: list[int] = []

    # ------------------------------------------------------------------ registration

    def _event(self) -> asyncio.Event:
        if self._stop is None:
            self._stop = asyncio.Event()
        return self._stop

    def spawn(
        self, name: str, coro: Coroutine[Any, Any, Any], *, root: bool = True,
        drained: bool = False,
    ) -> asyncio.Task[Any]:
        """Start ``coro`` as the task ``name``; ``root`` tasks stop the agent when they end.

        At shutdown tasks are cancelled before the shutdown steps run, except ``drained`` ones:
        they keep running while the steps run (a step closes what they serve, e.g. the outbox
        drain finishing its in-flight messages) and are cancelled only after the steps.
        """
        if name in self._tasks and not self._tasks[name].done():
            coro.close()
            raise ValueError(f"a task named {name!r} is already running")
        self._event()
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks[name] = task
        if drained:
            self._drained.add(name)
        else:
            self._drained.discard(name)
        if root:
            self._roots.add(name)
        else:
            self._roots.discard(name)
        task.add_done_callback(lambda t: self._on_done(name, t))
        return task

    def on_shutdown(self, name: str, fn: Callable[[], Awaitable[None]]) -> None:
        """Register a shutdown step; steps run in registration order after tasks are cancelled."""
        self._steps.append(_Step(name, fn))

    @property
    def tasks(self) -> dict[str, asyncio.Task[Any]]:
        """The tasks by name (finished ones included)."""
        return dict(self._tasks)

    @property
    def stopping(self) -> bool:
        """A stop was requested or a root task died."""
        return self._stop is not None and self._stop.is_set()

    # ------------------------------------------------------------------ stopping

    def request_stop(self, reason: str = "requested") -> None:
        """Ask for a graceful shutdown (idempotent; safe from a signal handler)."""
        stop = self._event()
        if not stop.is_set():
            self._stop_reason = reason
            log.info("shutdown_requested", reason=reason)
            stop.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT request a graceful stop (they only set an event)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, signal.Signals(sig).name)
            self._signals.append(sig)

    def _remove_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in self._signals:
            loop.remove_signal_handler(sig)
        self._signals.clear()

    def _on_done(self, name: str, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            if not self.stopping:
                log.warning("task_cancelled", task=name)
            return
        exc = task.exception()
        if exc is not None:
            log.error("task_died", task=name, root=name in self._roots,
                      error=repr(exc)[:500], exc_info=exc)
        elif not self.stopping:
            log.warning("task_exited", task=name, root=name in self._roots)
        else:
            return
        if name in self._roots and not self.stopping and self._failed is None:
            self._failed = name
            self.request_stop(f"task {name} ended")

    # ------------------------------------------------------------------ running

    async def run(self) -> int:
        """Wait for a stop or a root task's death, shut down, return the exit status."""
        await self._event().wait()
        await self.shutdown()
        return EXIT_TASK_DIED if self._failed is not None else 0

    async def shutdown(self) -> None:
        """Cancel every task, then run the shutdown steps, all within ``shutdown_timeout_s``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.shutdown_timeout_s
        t0 = time.monotonic()
        timed_out: list[str] = []
        await self._cancel([n for n in self._tasks if n not in self._drained], deadline,
                           timed_out)
        for step in self._steps:
            left = deadline - loop.time()
            if left <= 0:
                timed_out.append(step.name)
                continue
            try:
                await asyncio.wait_for(step.fn(), timeout=left)
            except asyncio.TimeoutError:
                timed_out.append(step.name)
            except Exception as exc:
                log.error("shutdown_step_failed", step=step.name, error=repr(exc)[:500],
                          exc_info=exc)
        await self._cancel(list(self._drained), deadline, timed_out)
        with contextlib.suppress(RuntimeError, NotImplementedError):
            self._remove_signal_handlers()
        took = round(time.monotonic() - t0, 3)
        if timed_out:
            log.error("shutdown_timed_out", unfinished=timed_out, took_s=took,
                      bound_s=self.shutdown_timeout_s)
        else:
            log.info("shutdown_done", took_s=took, reason=self._stop_reason)


    async def _cancel(self, names: list[str], deadline: float, timed_out: list[str]) -> None:
        pending = [t for n, t in self._tasks.items() if n in names and not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            loop = asyncio.get_running_loop()
            _, still = await asyncio.wait(pending, timeout=max(0.0, deadline - loop.time()))
            timed_out += [t.get_name() for t in still]


class LoopLagProbe:
    """Sleeps ``interval_s`` in a loop and records how late each wake-up was.

    A lag of more than a few milliseconds means something ran on the event loop thread for that
    long: blocking I/O, a CPU-heavy call, or a lock wait.
    """

    def __init__(self, interval_s: float = 0.1) -> None:
        self.interval_s = interval_s
        #: Largest lag seen since the last ``reset``, seconds.
        self.max_lag_s = 0.0
        #: The most recent lag, seconds.
        self.last_lag_s = 0.0
        #: ``time.monotonic()`` of the last wake-up (liveness of the loop).
        self.last_tick = time.monotonic()
        self.samples = 0
        self._observers: list[Callable[[float], None]] = []

    def observe(self, fn: Callable[[float], None]) -> None:
        """Call ``fn(lag_s)`` on every sample (e.g. a histogram's ``observe``)."""
        self._observers.append(fn)

    def reset(self) -> None:
        """Forget the maximum."""
        self.max_lag_s = 0.0
        self.samples = 0

    async def run(self) -> None:
        """Sample forever (a supervised task)."""
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(self.interval_s)
            lag = max(0.0, loop.time() - start - self.interval_s)
            self.last_lag_s = lag
            self.max_lag_s = max(self.max_lag_s, lag)
            self.last_tick = time.monotonic()
            self.samples += 1
            for fn in self._observers:
                fn(lag)
