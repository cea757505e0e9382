"""Calibration remembered: a restart reuses the stored layout and measures it again while serving.

The store is a real file; the agent tests run the real agent on a real ONNX model twice in the
same folder. The adoption rule is checked on a model whose ``run`` sleeps (it releases the GIL
like an ONNX session does), so two workers are surely twice as fast as one.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog

from edge_agent.app.compose import CALIBRATION_FILE, Agent
from edge_agent.streaming import calibration
from edge_agent.streaming.calibration import Calibrator, Key, Layout, Store, cpu_quota
from edge_agent.streaming.metrics import AgentMetrics
from edge_agent.streaming.scheduler import Scheduler
from edge_agent.streaming.slots import ModelSlot
from tests.support.pipeline import RecordingSink, agent_settings
from tests.support.waiting import until, wait_until


class SleepyModel:
    """Enough of a ``ServingModel`` for calibration: ``run`` takes 4 ms without the GIL."""

    sha256 = "ab" * 32
    providers = ("cpu",)
    batch_dynamic = False
    name = "sleepy"
    version = "1"

    def __init__(self) -> None:
        self.runs = 0

    def preprocess(self, frame: np.ndarray) -> tuple[np.ndarray, None]:
        return np.zeros((1, 3, 8, 8), np.float32), None

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        time.sleep(0.004)
        self.runs += 1
        return [x]


def key(**kw: Any) -> Key:
    base: dict[str, Any] = {"sha256": "ab" * 32, "providers": ("cpu",), "cpus": 2,
                            "cpu_quota": None, "workers": (1, 2), "batches": (1,)}
    return Key(**(base | kw))


# ------------------------------------------------------------------------------ the store


def test_store_keeps_a_layout_per_key_and_nothing_else(tmp_path: Path) -> None:
    store = Store(tmp_path / "state" / "calibration.json")  # folder made on the first write
    assert store.get(key()) is None
    assert store.put(key(), Layout(2, 1, {"w1b1": 10.0, "w2b1": 19.5}, 1.0e9))
    assert store.put(key(sha256="cd" * 32), Layout(1, 1, {"w1b1": 5.0}, 1.0e9 + 1))
    got = store.get(key())
    assert got == Layout(2, 1, {"w1b1": 10.0, "w2b1": 19.5}, 1.0e9)
    # what the layout depends on: any difference is another key, measured afresh
    for other in (key(cpus=4), key(cpu_quota=1.5), key(providers=("cuda", "cpu")),
                  key(workers=(1, 2, 3)), key(batches=(1, 2)), key(sha256="ef" * 32)):
        assert store.get(other) is None
    store.put(key(), Layout(1, 1, {"w1b1": 11.0}, 1.0e9 + 2))  # replaces, does not add
    entries = json.loads(store.path.read_text())["entries"]
    assert len(entries) == 2 and store.get(key()) == Layout(1, 1, {"w1b1": 11.0}, 1.0e9 + 2)


@pytest.mark.parametrize("body", [
    "{not json",
    json.dumps({"format": 99, "entries": []}),
    json.dumps([1, 2]),
    # an entry for this key whose layout is not one of its candidates (w3 of 1..2)
    json.dumps({"format": 1, "entries": [{"key": {"sha256": "ab" * 32, "providers": ["cpu"],
                                                  "cpus": 2, "cpu_quota": None,
                                                  "workers": [1, 2], "batches": [1]},
                                          "workers": 3, "max_batch": 1, "figures": {},
                                          "measured_at": 1.0}]}),
])
def test_a_bad_store_is_measured_afresh_and_then_replaced(tmp_path: Path, body: str) -> None:
    path = tmp_path / "calibration.json"
    path.write_text(body)
    store = Store(path)
    with structlog.testing.capture_logs() as logs:
        assert store.get(key()) is None
    assert logs and logs[0]["log_level"] == "warning"
    assert store.put(key(), Layout(2, 1, {"w2b1": 1.0}, 2.0))
    assert store.get(key()) == Layout(2, 1, {"w2b1": 1.0}, 2.0)


def test_a_store_that_cannot_be_written_is_logged_not_raised(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    store = Store(blocker / "calibration.json")  # its folder is a file
    with structlog.testing.capture_logs() as logs:
        assert store.put(key(), Layout(1, 1)) is False
    assert logs[-1]["event"] == "calibration_store_not_written"
    assert all(e["log_level"] == "warning" for e in logs)


@pytest.mark.parametrize(("files", "quota"), [
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.0),
    ({}, None),
])
def test_cpu_quota_reads_cgroup_v2_and_v1(tmp_path: Path, files: dict[str, str],
                                         quota: float | None) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cpu_quota(tmp_path) == quota


# --------------------------------------------------------------------------- the decision


def test_recheck_adopts_a_layout_only_when_it_beats_the_stored_one_by_the_margin(
    tmp_path: Path
) -> None:
    model = SleepyModel()
    k = key()
    store = Store(tmp_path / "c.json")
    # stored: one worker; measured again, two sleeping workers run twice as fast: adopted
    got = calibration.recheck(model, k, store, Layout(1, 1, {"w1b1": 1e9}), seconds=0.1)
    assert (got.workers, got.max_batch) == (2, 1)
    assert got.figures["w2b1"] > got.figures["w1b1"] * (1 + calibration.MARGIN)
    assert store.get(k) == got
    # stored: two workers, and the new measurement agrees: kept, figures refreshed
    again = calibration.recheck(model, k, store, got, seconds=0.1)
    assert (again.workers, again.max_batch) == (2, 1) and again.figures != got.figures


def test_recheck_stops_when_aborted(tmp_path: Path) -> None:
    abort = threading.Event()
    abort.set()
    with pytest.raises(calibration.CalibrationAborted):
        calibration.recheck(SleepyModel(), key(), Store(tmp_path / "c.json"), Layout(1, 1),
                            seconds=30, abort=abort)
    assert not (tmp_path / "c.json").exists()  # nothing half-measured is stored


async def test_calibrator_reuses_the_store_and_adopts_a_faster_layout_in_the_background(
    tmp_path: Path
) -> None:
    model = SleepyModel()
    slot = ModelSlot("sleepy", model)  # type: ignore[arg-type]
    store = Store(tmp_path / "c.json")
    first = Calibrator(store, seconds=0.05)
    assert first.choose("sleepy", model, [1, 2], [1]).workers == 2  # measured
    assert first.stored == {}
    # the stored layout is edited to a slow one, as if measured under a noisy neighbour
    k = Key.of(model, [1, 2], [1])  # type: ignore[arg-type]
    store.put(k, Layout(1, 1, {"w1b1": 1.0}, 1.0))
    second = Calibrator(store, seconds=0.05)
    runs = model.runs
    layout = second.choose("sleepy", model, [1, 2], [1])
    assert layout == Layout(1, 1, {"w1b1": 1.0}, 1.0) and model.runs == runs  # nothing ran
    adopted: list[tuple[str, Layout]] = []
    second.start_recheck({"sleepy": slot}, lambda n, lay: adopted.append((n, lay)))
    await until(lambda: bool(adopted), what="the background recheck to adopt")
    assert adopted[0][0] == "sleepy" and adopted[0][1].workers == 2
    assert second.workers == 2 and second.stored == {}
    assert slot.inflight(model) == 0  # the lease it held while measuring is back
    await second.aclose(5)


# --------------------------------------------------------------------------- the scheduler


def test_scheduler_resizes_its_worker_pool_while_running() -> None:
    sched = Scheduler(node="n", slots={}, workers=1, emit=lambda items: None,
                      metrics=AgentMetrics())

    def alive() -> int:
        return sum(t.is_alive() for t in threading.enumerate() if t.name.startswith("infer["))

    before = alive()
    sched.start()
    try:
        wait_until(lambda: alive() == before + 1, what="one worker")
        sched.resize(3)
        wait_until(lambda: alive() == before + 3, what="three workers")
        sched.resize(1)
        wait_until(lambda: alive() == before + 1, what="back to one worker")
        sched.set_batch_limit("m", 4)
        assert sched.workers == 1 and sched.batch_limits == {"m": 4}
        with pytest.raises(ValueError, match=">= 1"):
            sched.resize(0)
    finally:
        assert sched.stop(timeout=5)
    assert alive() == before


# --------------------------------------------------------------------------- the agent


def _calibrated(tmp_path: Path, models_dir: Path) -> Any:
    cam = {"name": "cam", "url": "test://pattern?width=320&height=240&fps=20",
           "model": "yolov8-head"}
    return agent_settings(tmp_path, models_dir, [cam], http=False,
                          pipeline={"workers": 0, "max_batch": 0, "calibrate_s": 0.05})


async def test_a_restarted_agent_is_ready_on_the_stored_layout_and_measures_after(
    tmp_path: Path, models_dir: Path
) -> None:
    s = _calibrated(tmp_path, models_dir)
    first = Agent(s, sink=RecordingSink())
    with structlog.testing.capture_logs() as logs:
        await first.start()
        await first.stop()
    assert "concurrency_measured" in [e["event"] for e in logs]  # nothing stored yet
    stored = tmp_path / "model-cache" / CALIBRATION_FILE
    assert stored.is_file()

    sink = RecordingSink()
    second = Agent(s, sink=sink)
    with structlog.testing.capture_logs() as logs:
        await second.start()
        # ready with what was stored: nothing was measured before start() returned
        events = [e["event"] for e in logs]
        assert "concurrency_reused" in events and "concurrency_measured" not in events
        assert events.index("concurrency_reused") < events.index("agent_started")
        try:
            await until(lambda: len(sink.results) >= 3, what="results")
            assert second.readiness() == (True, [])
            # and then measured again in the background, while serving
            await until(lambda: "concurrency_rechecked" in [e["event"] for e in logs],
                        timeout=20, what="the background re-measurement")
            n = len(sink.results)
            await until(lambda: len(sink.results) > n + 3, what="results after the recheck")
        finally:
            await second.stop()
    rechecked = next(e for e in logs if e["event"] == "concurrency_rechecked")
    assert second.pipeline is not None
    assert second.pipeline.scheduler.workers == max(1, rechecked["workers"])


async def test_stop_during_the_background_measurement_ends_it(tmp_path: Path,
                                                              models_dir: Path) -> None:
    s = _calibrated(tmp_path, models_dir)
    first = Agent(s, sink=RecordingSink())
    await first.start()
    await first.stop()
    # long candidates: the recheck is surely still measuring when the agent stops
    s.pipeline.calibrate_s = 30
    second = Agent(s, sink=RecordingSink())
    with structlog.testing.capture_logs() as logs:
        await second.start()
        assert list(second.calibrator.stored) == ["yolov8-head"]
        await until(lambda: any(t.name.startswith("calibrate[") for t in threading.enumerate()),
                    what="the background measurement to run")
        t0 = time.monotonic()
        await second.stop()
    assert time.monotonic() - t0 < 10  # not the 2 x 2 x 30 s the candidates would take
    assert not any(t.name.startswith("calibrate[") for t in threading.enumerate())
    events = [e["event"] for e in logs]
    assert "concurrency_rechecked" not in events and "calibration_recheck_not_stopped" not in events
