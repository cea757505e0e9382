"""Model sync against a real HTTP server and real ONNX Runtime sessions (no broker here).

These drive ``ModelSync.on_desired`` directly; tests/agent/modelsync/test_modelsync_e2e.py does the
same through a real broker, a real hub and a real agent.
"""

from __future__ import annotations

import asyncio
import json
import time
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.config import (
    AgentSettings,
    EngineSettings,
    HubClientSettings,
    ModelSpec,
    ModelSyncSettings,
)
from edge_agent.contract.protocol import StateMessage
from edge_agent.modelsync.sync import ModelSync
from tests.support import modelsync as ms
from tests.support.fileserver import FileServer
from tests.support.waiting import until

NODE = "n1"




class Harness:
    """A ModelSync over real slots, fed by a real file server."""

    def __init__(self, tmp: Path, server: FileServer, **sync_over: Any) -> None:
        self.tmp = tmp
        self.server = server
        self.v1 = ms.version_of(tmp / "art", "det", "1", anchors=64)
        self.states: list[StateMessage] = []
        self.settings = AgentSettings(
            node=NODE,
            engine=EngineSettings(providers=["cpu"], warmup_runs=1),
            models=[ModelSpec(name="det", manifest=self.v1.manifest_path)],
            hub=HubClientSettings(url=server.base, cache_dir=tmp / "cache", retry_min_s=0.01,
                                  retry_max_s=0.05, download_retries=1),
            model_sync=ModelSyncSettings(**{"probation_frames": 5, "probation_timeout_s": 0.3,
                                            "drain_timeout_s": 2.0, **sync_over}),
        )
        self.sync: ModelSync | None = None
        self.task: asyncio.Task[None] | None = None
        self.generation = 0

    async def start(self) -> ModelSync:
        self.sync = ModelSync(self.settings, publish_state=self.states.append)
        await self.sync.load_startup()
        self.task = asyncio.create_task(self.sync.run(), name="model-sync")
        return self.sync

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    def publish(self, art: ms.Artifact, data: bytes | None = None,
                manifest: bytes | None = None) -> dict[str, str]:
        key = f"{art.name}-{art.version}"
        self.server.files[key + ".onnx"] = art.onnx_bytes if data is None else data
        self.server.files[key + ".json"] = art.manifest_bytes if manifest is None else manifest
        return {"version": art.version, "sha256": art.sha256, "url": self.server.url(key + ".onnx"),
                "manifest_url": self.server.url(key + ".json")}

    def send(self, models: dict[str, dict[str, str]], generation: int | None = None) -> None:
        assert self.sync is not None
        self.generation = generation if generation is not None else self.generation + 1
        self.sync.on_desired("edge/n1/desired", ms.desired(NODE, self.generation, models))

    @property
    def slot(self) -> Any:
        assert self.sync is not None
        return self.sync.slots["det"]

    def last_model_state(self) -> Any:
        return next(m for m in self.states[-1].models if m.name == "det")

    async def settled(self, timeout: float = 10.0) -> None:
        assert self.sync is not None
        await asyncio.wait_for(self.sync.idle.wait(), timeout)


@pytest.fixture
async def h(tmp_path: Path, server: FileServer) -> AsyncIterator[Harness]:
    harness = Harness(tmp_path, server)
    await harness.start()
    yield harness
    await harness.stop()


async def test_new_version_is_fetched_validated_switched_and_old_released(h: Harness) -> None:
    v1_ref = weakref.ref(h.slot.model)
    v2 = ms.version_of(h.tmp / "art", "det", "2", anchors=65)
    h.send({"det": h.publish(v2)})
    await h.settled()
    assert h.slot.version == "2"
    statuses = [(m.status, m.version, m.target_version) for s in h.states for m in s.models]
    assert ("loading", "1", "2") in statuses
    assert h.states[-1].generation == 1 and h.last_model_state().status == "active"
    assert h.states[-1].models[0].version == "2" and h.states[-1].providers == ["cpu"]
    assert v1_ref() is None, "the replaced session is still referenced"
    assert h.sync is not None and h.sync.counters["released"] == 1
    assert h.sync.counters["closed_while_referenced"] == 0
    record = json.loads((h.tmp / "cache" / "sync-state.json").read_text())
    assert record["generation"] == 1
    assert record["models"]["det"]["active"] == "2"
    assert record["models"]["det"]["previous"] == ["1"]
    assert (h.tmp / "cache" / "det" / "2" / "model.onnx").read_bytes() == v2.onnx_bytes


async def test_stale_and_malformed_desired_messages_change_nothing(h: Harness) -> None:
    assert h.sync is not None
    v2 = ms.version_of(h.tmp / "art", "det", "2", anchors=65)
    v3 = ms.version_of(h.tmp / "art", "det", "3", anchors=66)
    h.send({"det": h.publish(v2)}, generation=5)
    await h.settled()
    n_states, n_requests = len(h.states), len(h.server.requests)
    bad_payloads = [
        b"not json", b"[]", b'{"v": 2}',
        ms.desired("other-node", 9, {"det": h.publish(v3)}),
        ms.desired(NODE, 9, {"Bad_Name": h.publish(v3)}),
        ms.desired(NODE, 9, {"det": {**h.publish(v3), "sha256": "xyz"}}),
        ms.desired(NODE, 9, {"det": {**h.publish(v3), "version": "../3"}}),
        b"x" * 300_000,
    ]
    for p in bad_payloads:
        h.sync.on_desired("edge/n1/desired", p)
    h.send({"det": h.publish(v3)}, generation=5)  # repeated generation
    h.send({"det": h.publish(v3)}, generation=4)  # older generation
    await asyncio.sleep(0.2)  # let anything that (wrongly) started run; then check nothing did
    await h.settled()
    assert h.sync.counters["desired_malformed"] == len(bad_payloads)
    assert h.sync.counters["desired_stale"] == 2
    assert h.slot.version == "2" and h.sync.generation == 5
    assert len(h.states) == n_states and len(h.server.requests) == n_requests


def _bad_cases(h: Harness) -> dict[str, tuple[dict[str, str], str]]:
    root = h.tmp / "art"
    good = ms.version_of(root, "det", "9", anchors=70)
    wrong_sha = h.publish(good, data=b"other bytes than the manifest says")
    truncated = h.publish(good := ms.version_of(root, "det", "10", anchors=71),
                          data=good.onnx_bytes[: len(good.onnx_bytes) // 2])
    trunc_consistent = ms.with_bytes(root, good, "11", good.onnx_bytes[:300])
    not_onnx = ms.with_bytes(root, good, "12", b"\x00\x01 definitely not a protobuf" * 50)
    return {
        "wrong-sha256": (wrong_sha, "sha256 mismatch"),
        "truncated-in-transit": (truncated, "sha256 mismatch"),
        "truncated-file": (h.publish(trunc_consistent), "cannot load model"),
        "not-onnx": (h.publish(not_onnx), "cannot load model"),
        "wrong-input-shape": (h.publish(ms.bad_input_shape(root, "det", "13")), "model input"),
        "outputs-not-matching": (h.publish(ms.bad_outputs(root, "det", "14")), "model output"),
        "nan-outputs": (h.publish(ms.nan_outputs(root, "det", "15")), "NaN"),
    }


async def test_bad_artifacts_are_refused_and_the_old_version_keeps_serving(h: Harness) -> None:
    assert h.sync is not None
    for kind, (entry, reason) in _bad_cases(h).items():
        t0 = time.monotonic()
        h.send({"det": entry})
        await h.settled()
        st = h.last_model_state()
        assert st.status == "failed", kind
        assert st.version == "1" and st.target_version == entry["version"], kind
        assert reason in (st.error or ""), (kind, st.error)
        assert time.monotonic() - t0 < 5.0, kind
        assert h.slot.version == "1", kind
        with h.slot.lease() as model:  # the old version still infers
            assert model.version == "1"
    assert h.sync.counters["refused"] == 7
    assert not list((h.tmp / "cache").glob("det/1[0-5]")), "a refused artifact stayed cached"


async def test_first_inferences_failing_switch_back_on_their_own(h: Harness) -> None:
    assert h.sync is not None
    h.settings.model_sync.probation_timeout_s = 30.0
    h.settings.model_sync.probation_failures = 3
    v2 = ms.version_of(h.tmp / "art", "det", "2", anchors=65)
    h.send({"det": h.publish(v2)})
    await until(lambda: h.slot.version == "2", what="switch to 2")
    new = h.slot.model
    for _ in range(3):  # outcomes come from inference worker threads
        await asyncio.to_thread(h.slot.report, new, 1, RuntimeError("boom"))
    del new
    await h.settled()
    assert h.slot.version == "1"
    st = h.last_model_state()
    assert (st.status, st.version, st.target_version) == ("failed", "1", "2")
    assert "switched back" in (st.error or "") and "boom" in (st.error or "")
    assert h.sync.counters["rollbacks"] == 1


async def test_restart_without_hub_serves_the_last_good_version_from_cache(
    tmp_path: Path, server: FileServer
) -> None:
    first = Harness(tmp_path, server)
    await first.start()
    v2 = ms.version_of(tmp_path / "art", "det", "2", anchors=65)
    first.send({"det": first.publish(v2)}, generation=3)
    await first.settled()
    await first.stop()
    await server.stop()  # the hub is gone
    second = Harness(tmp_path, server)
    sync = await second.start()
    try:
        assert second.slot.version == "2" and sync.generation == 3
        sync.on_desired("edge/n1/desired", ms.desired(NODE, 3, {"det": first.publish(v2)}))
        assert sync.counters["desired_stale"] == 1
    finally:
        await second.stop()
    # an operator edit of the config file since then wins over the cached hub version
    v3 = ms.version_of(tmp_path / "art", "det", "3", anchors=66)
    third = Harness(tmp_path, server)
    third.settings.models[0].manifest = v3.manifest_path
    await third.start()
    try:
        assert third.slot.version == "3"
    finally:
        await third.stop()


async def test_config_change_is_applied_through_the_same_checks(h: Harness) -> None:
    assert h.sync is not None
    v3 = ms.version_of(h.tmp / "art", "det", "3", anchors=66)
    h.sync.request_local("det", v3.manifest_path)
    await h.settled()
    assert h.slot.version == "3"
    bad = ms.nan_outputs(h.tmp / "art", "det", "4")
    h.sync.request_local("det", bad.manifest_path)
    await h.settled()
    st = h.last_model_state()
    assert h.slot.version == "3" and (st.status, st.target_version) == ("failed", "4")


async def test_urls_outside_the_configured_hub_are_refused(h: Harness) -> None:
    h.settings.hub.url = "http://hub.example:8081"
    v2 = ms.version_of(h.tmp / "art", "det", "2", anchors=65)
    h.send({"det": h.publish(v2)})
    await h.settled()
    st = h.last_model_state()
    assert st.status == "failed" and "outside the configured hub" in (st.error or "")
    assert h.server.requests == []
