"""Candidates in shadow through model sync: a real file server, real ONNX Runtime sessions.

A desired message's ``shadow`` is fetched, verified and checked like a version to serve, handed
to a real ``ShadowRunner`` and reported in the node's state; it never serves.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.modelsync.sync import ModelSync
from edge_agent.streaming.shadow import ShadowRunner
from tests.agent.modelsync.test_modelsync import Harness
from tests.support import modelsync as ms
from tests.support.fileserver import FileServer
from tests.support.waiting import until


class ShadowHarness(Harness):
    """The model-sync harness with a shadow runner over its slots."""

    runner: ShadowRunner

    async def start(self) -> ModelSync:
        self.sync = ModelSync(self.settings, publish_state=self.states.append,
                              shadow=ShadowRunner({}, max_slowdown=0.1))
        self.runner = self.sync.shadows.runner  # type: ignore[assignment]
        self.runner.active = self.sync.slots
        await self.sync.load_startup()
        self.task = asyncio.create_task(self.sync.run(), name="model-sync")
        return self.sync

    async def stop(self) -> None:
        await super().stop()
        self.runner.close()

    def active(self, shadow: dict[str, str] | None = None,
               base: dict[str, str] | None = None) -> dict[str, Any]:
        """The desired entry of ``det``: ``base`` (v1 when None) with ``shadow``."""
        entry: dict[str, Any] = dict(base or self.publish(self.v1))
        if shadow is not None:
            entry["shadow"] = shadow
        return entry


@pytest.fixture
async def h(tmp_path: Path, server: FileServer) -> AsyncIterator[ShadowHarness]:
    harness = ShadowHarness(tmp_path, server)
    await harness.start()
    yield harness
    await harness.stop()


def shadow_fields(h: ShadowHarness) -> tuple[Any, Any, Any]:
    st = h.last_model_state()
    return st.shadow_version, st.shadow_status, st.shadow_error


async def test_candidate_loads_beside_the_active_and_unloads_when_not_named(
    h: ShadowHarness,
) -> None:
    v2 = ms.version_of(h.tmp / "art", "det", "2", anchors=65)
    h.send({"det": h.active(shadow=h.publish(v2))})
    await h.settled()
    assert h.slot.version == "1" and h.runner.candidate("det") == "2"
    assert shadow_fields(h) == ("2", "active", None)
    seen = [(m.shadow_version, m.shadow_status) for s in h.states for m in s.models]
    assert ("2", "loading") in seen
    st = h.last_model_state()
    assert (st.version, st.status) == ("1", "active")  # the candidate never serves
    assert (h.tmp / "cache" / "det" / "2" / "model.onnx").read_bytes() == v2.onnx_bytes
    ref = weakref.ref(h.runner.slots["det"].model)
    h.send({"det": h.active()})  # no shadow any more
    await h.settled()
    assert h.runner.candidate("det") is None and shadow_fields(h) == (None, None, None)
    assert ref() is None, "the candidate's session is still referenced"
    assert h.slot.version == "1"


async def test_failing_candidate_reports_failed_and_the_active_serves_on(
    h: ShadowHarness,
) -> None:
    bad = ms.bad_outputs(h.tmp / "art", "det", "2")
    h.send({"det": h.active(shadow=h.publish(bad))})
    await h.settled()
    version, status, error = shadow_fields(h)
    assert (version, status) == ("2", "failed") and "manifest says" in (error or ""), error
    st = h.last_model_state()
    assert (st.version, st.status) == ("1", "active") and h.slot.version == "1"
    assert h.runner.candidate("det") is None
    assert not (h.tmp / "cache" / "det" / "2").exists()  # a refused candidate leaves the cache
    # the same artifact again (a new generation) is not tried again
    n = len(h.server.requests)
    h.send({"det": h.active(shadow=h.publish(bad))})
    await h.settled()
    assert len(h.server.requests) == n and shadow_fields(h)[1] == "failed"
    # a digest that does not match is refused the same way
    v3 = ms.version_of(h.tmp / "art", "det", "3", anchors=66)
    h.send({"det": h.active(shadow={**h.publish(v3), "sha256": "0" * 64})})
    await h.settled()
    assert shadow_fields(h)[:2] == ("3", "failed") and "sha256" in (shadow_fields(h)[2] or "")
    assert h.slot.version == "1"


async def test_another_candidate_replaces_the_first(h: ShadowHarness) -> None:
    v2 = ms.version_of(h.tmp / "art", "det", "2", anchors=65)
    v3 = ms.version_of(h.tmp / "art", "det", "3", anchors=66)
    h.send({"det": h.active(shadow=h.publish(v2))})
    await h.settled()
    ref = weakref.ref(h.runner.slots["det"].model)
    h.send({"det": h.active(shadow=h.publish(v3))})
    await h.settled()
    assert h.runner.candidate("det") == "3" and shadow_fields(h) == ("3", "active", None)
    assert ref() is None


async def test_active_swap_keeps_the_shadow_and_promotion_unloads_it(
    h: ShadowHarness,
) -> None:
    v2 = ms.version_of(h.tmp / "art", "det", "2", anchors=65)
    v3 = ms.version_of(h.tmp / "art", "det", "3", anchors=66)
    h.send({"det": h.active(shadow=h.publish(v3))})
    await h.settled()
    session = h.runner.slots["det"].model
    # the active version changes while the candidate runs: the candidate stays as it is
    h.send({"det": h.active(shadow=h.publish(v3), base=h.publish(v2))})
    await h.settled()
    assert h.slot.version == "2" and h.runner.slots["det"].model is session
    del session
    # the candidate passes and becomes the version: out of the shadow, from the cache
    n_onnx = sum(1 for name, _ in h.server.requests if name.endswith(".onnx"))
    h.send({"det": h.publish(v3)})
    await h.settled()
    assert h.slot.version == "3" and h.runner.candidate("det") is None
    assert shadow_fields(h) == (None, None, None)
    assert sum(1 for name, _ in h.server.requests if name.endswith(".onnx")) == n_onnx


async def test_a_restart_loads_the_wanted_candidate_again(
    h: ShadowHarness, tmp_path: Path, server: FileServer
) -> None:
    v2 = ms.version_of(h.tmp / "art", "det", "2", anchors=65)
    h.send({"det": h.active(shadow=h.publish(v2))})
    await h.settled()
    await h.stop()
    again = ShadowHarness(tmp_path, server)
    again.v1 = h.v1
    await again.start()
    try:
        # the retained desired message (same generation) is ignored; the record brings it back
        again.send({"det": again.active(shadow=again.publish(v2))}, generation=1)
        await until(lambda: again.runner.candidate("det") == "2", what="the candidate again")
        await again.settled()
        assert shadow_fields(again) == ("2", "active", None)
    finally:
        await again.stop()
