"""Model slots: leases, switch between frames, idle wait, probation outcomes."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import pytest

from edge_agent.errors import ModelError
from edge_agent.streaming.slots import ModelSlot, Probation


@dataclass
class Stub:
    """Stands in for a LoadedModel in these unit tests: only identity and version matter."""

    name: str
    version: str
    closed: bool = False

    def close(self) -> None:
        self.closed = True


def test_empty_slot_refuses_a_lease() -> None:
    with pytest.raises(ModelError, match="not loaded"):
        ModelSlot("det").acquire()


async def test_frames_in_flight_finish_on_the_old_model_and_new_frames_get_the_new() -> None:
    a, b = Stub("det", "1"), Stub("det", "2")
    slot = ModelSlot("det", a)
    slot.bind_loop(asyncio.get_running_loop())
    held = slot.acquire()
    assert slot.swap(b) is a
    assert held is a and slot.acquire() is b and slot.version == "2"
    waiter = asyncio.create_task(slot.wait_idle(a, 5.0))
    await asyncio.sleep(0)
    assert not waiter.done() and slot.inflight(a) == 1
    # the lease comes back from a worker thread, as the pipeline's inference threads do
    t = threading.Thread(target=slot.release, args=(a,))
    t.start()
    t.join()
    assert await asyncio.wait_for(waiter, 5.0) is True
    assert slot.inflight(a) == 0


async def test_wait_idle_times_out_with_a_lease_out() -> None:
    a = Stub("det", "1")
    slot = ModelSlot("det", a)
    slot.bind_loop(asyncio.get_running_loop())
    slot.acquire()
    assert await slot.wait_idle(a, 0.05) is False


async def test_probation_fails_after_the_failure_limit() -> None:
    loop = asyncio.get_running_loop()
    a, b = Stub("det", "1"), Stub("det", "2")
    slot = ModelSlot("det", a)
    slot.bind_loop(loop)
    failed: asyncio.Future[str] = loop.create_future()
    p = Probation(b, frames=10, failures=2, on_fail=failed.set_result,
                  on_pass=lambda: failed.set_result("passed"))
    slot.swap(b, p)
    with pytest.raises(RuntimeError), slot.lease():
        raise RuntimeError("boom 1")
    with slot.lease():
        pass
    m = slot.acquire()
    await asyncio.to_thread(slot.release, m, False, "boom 2")
    assert await asyncio.wait_for(failed, 5.0) == "boom 2"
    assert p.seen == 3 and p.failed == 2 and p.done


async def test_probation_passes_after_n_frames_and_ignores_the_old_model() -> None:
    loop = asyncio.get_running_loop()
    a, b = Stub("det", "1"), Stub("det", "2")
    slot = ModelSlot("det", a)
    slot.bind_loop(loop)
    old_lease = slot.acquire()
    passed = asyncio.Event()
    p = Probation(b, frames=3, failures=1, on_fail=lambda e: None, on_pass=passed.set)
    slot.swap(b, p)
    slot.release(old_lease, ok=False)  # a failure of the old version is not the new one's
    for _ in range(3):
        with slot.lease():
            pass
    await asyncio.wait_for(passed.wait(), 5.0)
    assert p.failed == 0


async def test_many_threads_leasing_while_swapping_never_lose_a_count() -> None:
    loop = asyncio.get_running_loop()
    models = [Stub("det", str(i)) for i in range(20)]
    slot = ModelSlot("det", models[0])
    slot.bind_loop(loop)
    stop = threading.Event()
    seen: set[str] = set()

    def worker() -> None:
        while not stop.is_set():
            with slot.lease() as m:
                seen.add(m.version)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for m in models[1:]:
            old = slot.swap(m)
            assert await slot.wait_idle(old, 5.0)
            await asyncio.sleep(0.002)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert all(slot.inflight(m) == 0 for m in models)
    assert len(seen) > 5
