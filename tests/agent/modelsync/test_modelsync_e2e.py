"""Model sync end to end: a real broker, a real hub (the registry app on a loopback port) and a
real agent (``edge_agent.app.compose.Agent`` in this process, its camera a live test pattern).

The agent runs its production path (``pipeline.sink: mqtt``): results through the durable
outbox to the broker, desired state in and state out through its own MQTT link. The test plays
the hub's rollout side: it publishes the retained ``desired`` message naming the hub's artifact
and manifest URLs, as ``hub/rollouts/desired.py`` does, and watches the agent's retained ``state``
and its results with independent MQTT subscribers.

Bad artifacts the hub refuses at push (not ONNX, wrong input shape, outputs not matching the
manifest) are planted in the hub's own storage and database, bypassing its validation, as a hub
with an older validator or a corrupted store would serve them: the agent must refuse them on its
own. A truncated file is made by truncating the hub's stored blob.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import itertools
import os
import statistics
import time
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import psutil
import pytest

from edge_agent.app.compose import Agent
from edge_agent.config import AgentSettings, load_settings
from edge_agent.contract.protocol import (
    StateMessage,
    decode_state,
    desired_topic,
    results_filter,
    state_topic,
)
from hub.registry.metadata import ModelVersion
from hub.registry.service import Registry
from tests.support import modelsync as ms
from tests.support.broker import HUB, Broker
from tests.support.hub_client import (
    AUTH,
    default_pki,
    hub_session,
    hub_settings,
    running_hub,
    upload_form,
)
from tests.support.mqtt_recorder import Recorder
from tests.support.waiting import until

NODE = "edge-01"
FPS = 25
PATTERN = f"test://pattern?width=320&height=240&fps={FPS}"




class World:
    """Broker + hub + agent for one test."""

    def __init__(self, tmp: Path, broker: Broker, prefix: str) -> None:
        self.tmp, self.broker, self.prefix = tmp, broker, prefix
        self.hub_url = ""
        self.registry: Registry | None = None
        self.agent: Agent | None = None
        self.states: Recorder | None = None
        self.results_rec: Recorder | None = None
        self.generation = 0
        self.v1 = ms.version_of(tmp / "art", "det", "1", anchors=64)
        self._pub: paho.Client | None = None

    # ----------------------------------------------------------------------------- setup

    def settings(self, hub: dict[str, Any] | None = None, **sync: Any) -> AgentSettings:
        node = default_pki().identity(NODE, "agent")
        return load_settings(
            None,
            node=NODE,
            engine={"providers": ["cpu"], "warmup_runs": 1},
            models=[{"name": "det", "manifest": str(self.v1.manifest_path)}],
            cameras=[{"name": "cam0", "url": PATTERN, "model": "det"}],
            pipeline={"workers": 1, "max_batch": 1, "sink": "mqtt"},
            outbox={"path": str(self.tmp / "outbox.sqlite3"), "commit_interval_ms": 10},
            http={"port": 0},
            mqtt={**self.broker.settings(NODE), "topic_prefix": self.prefix,
                  "reconnect_min_s": 0.05, "reconnect_max_s": 0.5},
            hub={"url": self.hub_url or None, "cache_dir": str(self.tmp / "cache"),
                 "retry_min_s": 0.01, "retry_max_s": 0.1, "download_retries": 2,
                 # the node's own certificate proves who it is to the hub (mutual TLS)
                 "ca_file": str(node.ca_file), "cert_file": str(node.cert_file),
                 "key_file": str(node.key_file), **(hub or {})},
            model_sync={"probation_frames": 5, "probation_timeout_s": 5.0, **sync},
        )

    async def start_agent(self, hub: dict[str, Any] | None = None, **sync: Any) -> Agent:
        self.agent = Agent(self.settings(hub, **sync))
        await self.agent.start()
        return self.agent

    async def stop_agent(self) -> None:
        if self.agent is not None:
            await self.agent.stop()
            self.agent = None

    def watch(self) -> None:
        """Subscribe to the node's state and results (before the agent starts)."""
        self.states = Recorder(self.broker, [state_topic(self.prefix, NODE)]).start()
        self.results_rec = Recorder(self.broker,
                                    [results_filter(self.prefix, NODE)]).start()

    def stop_watching(self) -> None:
        for rec in (self.states, self.results_rec):
            if rec is not None:
                rec.stop()

    # ------------------------------------------------------------------------------ hub

    async def push(self, art: ms.Artifact) -> None:
        url = f"{self.hub_url}/v1/models/{art.name}/versions/{art.version}"
        async with hub_session() as http, http.put(
            url, data=upload_form(art.onnx_bytes, art.manifest_bytes), headers=AUTH
        ) as r:
            assert r.status == 201, await r.text()

    async def plant(self, art: ms.Artifact) -> None:
        """Store a version in the hub without its upload checks (see the module docstring)."""
        reg = self.registry
        assert reg is not None
        staged = reg.artifacts.stage(1 << 30)
        await staged.write(art.onnx_bytes)
        sha, size = await staged.finish()
        await asyncio.to_thread(reg.artifacts.adopt_sync, staged)
        mbytes = art.manifest_bytes
        row = ModelVersion(name=art.name, version=art.version, task="yolo", sha256=sha,
                           size=size, manifest_sha256=hashlib.sha256(mbytes).hexdigest(),
                           manifest_bytes=mbytes, signature=None, created_at=time.time(),
                           pushed_by="planted-by-test", notes="")
        await reg.metadata.insert(row)

    def entry(self, art: ms.Artifact, sha256: str | None = None) -> dict[str, str]:
        base = f"{self.hub_url}/v1/models/{art.name}/versions/{art.version}"
        return {"version": art.version, "sha256": sha256 or art.sha256,
                "url": base + "/artifact", "manifest_url": base + "/manifest"}

    # -------------------------------------------------------------------------- desired

    def publish_raw(self, payload: bytes) -> None:
        if self._pub is None:
            self._pub = self.broker.client(HUB)  # desired state comes from the hub
            self.broker.connect(self._pub)
            self._pub.loop_start()
        info = self._pub.publish(desired_topic(self.prefix, NODE), payload, qos=1, retain=True)
        info.wait_for_publish(10)

    def desire(self, models: dict[str, dict[str, str]], generation: int | None = None) -> int:
        self.generation = generation if generation is not None else self.generation + 1
        self.publish_raw(ms.desired(NODE, self.generation, models))
        return self.generation

    def close_publisher(self) -> None:
        if self._pub is not None:
            self._pub.loop_stop()
            self._pub.disconnect()

    # --------------------------------------------------------------------------- observe

    def state_messages(self) -> list[StateMessage]:
        assert self.states is not None
        return [decode_state(p) for _, p, _ in list(self.states.messages)]

    def det_state(self, msg: StateMessage) -> Any:
        return next(m for m in msg.models if m.name == "det")

    async def wait_state(self, pred: Callable[[StateMessage, Any], bool], timeout: float,
                         what: str) -> StateMessage:
        deadline = time.monotonic() + timeout
        while True:
            for msg in reversed(self.state_messages()):
                if msg.online and any(m.name == "det" for m in msg.models) and pred(
                        msg, self.det_state(msg)):
                    return msg
            if time.monotonic() > deadline:
                raise AssertionError(f"no state {what} within {timeout}s: "
                                     f"{[self.det_state(m) for m in self.state_messages()[-3:]]}")
            await asyncio.sleep(0.01)

    def results(self) -> list[dict[str, Any]]:
        """Results received over MQTT, de-duplicated by (camera, seq), in seq order."""
        if self.results_rec is None:
            return []
        unique = {(r["camera"], r["seq"]): r for r in self.results_rec.results()}
        return [unique[k] for k in sorted(unique)]


@pytest.fixture
async def world(tmp_path: Path, broker: Broker, topic_prefix: str) -> AsyncIterator[World]:
    w = World(tmp_path, broker, topic_prefix)
    async with AsyncExitStack() as stack:
        hs = hub_settings(tmp_path / "hub")
        w.registry = Registry(hs)
        hub = await stack.enter_async_context(running_hub(hs, registry=w.registry))
        w.hub_url = hub.url
        try:
            yield w
        finally:
            await w.stop_agent()
            w.close_publisher()
            w.stop_watching()


def _retained_rss(proc: psutil.Process) -> int:
    """RSS after glibc returned its free pages (what is still held, not allocator slack)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return int(proc.memory_info().rss)


def _loss(agent: Agent) -> int:
    """Frames read but without a result so far: dropped by capture/scheduler, or failed."""
    assert agent.pipeline is not None
    cams = agent.pipeline.cameras.values()
    return sum(c.dropped + c.errors for c in cams) + agent.pipeline.scheduler.tally().errors


async def test_swap_under_a_running_stream(world: World) -> None:
    """At most 2 frames lost, new version in results right after the switch, old released."""
    v2 = ms.version_of(world.tmp / "art", "det", "2", anchors=65)
    await world.push(world.v1)
    await world.push(v2)
    world.watch()
    agent = await world.start_agent()
    await world.wait_state(lambda m, d: d.status == "active" and d.version == "1", 10, "v1")
    await until(lambda: len(world.results()) >= FPS, what="a second of v1 results")
    old = weakref.ref(agent.slots["det"].model)
    loss0, n0 = _loss(agent), len(world.results())
    t_desire = time.time()
    world.desire({"det": world.entry(v2)})
    msg = await world.wait_state(lambda m, d: d.status == "active" and d.version == "2"
                                 and m.generation == 1, 10, "v2 active")
    await until(lambda: agent.sync.counters["released"] == 1, 10, "old session released")
    await until(lambda: len(world.results()) >= n0 + FPS, what="a second of v2 results")
    assert old() is None and agent.sync.counters["closed_while_referenced"] == 0
    lost = _loss(agent) - loss0
    assert lost <= 2, f"{lost} frames lost during the swap"
    versions = [r["model"]["version"] for r in world.results() if r["camera"] == "cam0"]
    first_v2 = versions.index("2")
    assert set(versions[:first_v2]) == {"1"} and set(versions[first_v2:]) == {"2"}
    # results right after the switch: the first v2 frame was captured within a few frame
    # periods of the desired message's arrival plus the (measured) load time
    rows = [r for r in world.results() if r["camera"] == "cam0"]
    seqs = [r["seq"] for r in rows]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "a result went missing"
    around = rows[first_v2 - 5 : first_v2 + 5]
    gaps = [b["ts"] - a["ts"] for a, b in itertools.pairwise(around)]
    assert max(gaps) < 3.5 / FPS, f"the stream stalled at the switch: gaps {gaps}"
    assert rows[first_v2]["ts"] >= t_desire and msg.providers == ["cpu"]


@pytest.mark.slow
async def test_fifty_swaps_do_not_grow_memory(world: World) -> None:
    # versions with ~1 MB of weights each, so a session that is never released shows in RSS
    # (~2.5 MB per leaked session, measured) far above the allocator's noise (a few MB)
    a = ms.version_of(world.tmp / "art", "det", "2", anchors=40_000)
    b = ms.version_of(world.tmp / "art", "det", "3", anchors=40_001)
    await world.push(a)
    await world.push(b)
    world.watch()
    agent = await world.start_agent(probation_frames=2)
    proc = psutil.Process()
    rss: list[int] = []
    for i in range(1, 51):
        target = a if i % 2 else b
        gen = world.desire({"det": world.entry(target)})
        await until(lambda g=gen: agent.sync.generation == g
                       and agent.sync.counters["released"] >= g, 20, f"swap {gen}")
        assert agent.slots["det"].version == target.version
        rss.append(_retained_rss(proc))
    assert agent.sync.counters["closed_while_referenced"] == 0
    assert agent.sync.counters["swaps"] == 50
    growth = (statistics.median(rss[-5:]) - statistics.median(rss[5:15])) / 1e6
    assert growth < 20, f"RSS grew {growth:.1f} MB after swap 10: {[r // 10**6 for r in rss]}"
    assert _loss(agent) <= 2 * 50


async def test_bad_artifacts_are_refused_while_the_old_version_serves(world: World) -> None:
    root = world.tmp / "art"
    good = ms.version_of(root, "det", "2", anchors=65)
    rotten = ms.version_of(root, "det", "3", anchors=66)
    nan = ms.nan_outputs(root, "det", "4")
    not_onnx = ms.with_bytes(root, good, "5", b"\x08\x07 this is not an ONNX protobuf" * 40)
    wrong_in = ms.bad_input_shape(root, "det", "6")
    wrong_out = ms.bad_outputs(root, "det", "7")
    # pushed cut short: its manifest was written for the truncated bytes
    truncated = ms.with_bytes(root, good, "8", good.onnx_bytes[: len(good.onnx_bytes) // 2])
    for art in (world.v1, good, rotten, nan):
        await world.push(art)  # the hub accepts these (NaN only shows when it runs)
    for art in (not_onnx, wrong_in, wrong_out, truncated):
        await world.plant(art)
    # and one that rotted in the hub's storage after the push (the hub notices mid-download)
    assert world.registry is not None
    blob = world.registry.artifacts.path(rotten.sha256)
    os.chmod(blob, 0o640)
    blob.write_bytes(rotten.onnx_bytes[: len(rotten.onnx_bytes) // 2])
    world.watch()
    # the hub leaves a body it cannot finish hanging: the stall timeout ends each attempt
    agent = await world.start_agent(hub={"stall_timeout_s": 0.5})
    await world.wait_state(lambda m, d: d.version == "1", 10, "v1")
    cases = [
        ("wrong sha256", world.entry(good, sha256=hashlib.sha256(b"x").hexdigest()),
         "sha256 differs"),
        ("truncated file", world.entry(truncated), "INVALID_PROTOBUF"),
        ("truncated in the hub's storage", world.entry(rotten), "giving up after 3 attempts"),
        ("not ONNX", world.entry(not_onnx), "INVALID_PROTOBUF"),
        ("wrong input shape", world.entry(wrong_in), "model input 'images' has shape"),
        ("outputs not matching", world.entry(wrong_out), "model output 'output0' has shape"),
        ("NaN outputs", world.entry(nan), "NaN"),
    ]
    for what, entry, reason in cases:
        n = len(world.results())
        t0 = time.monotonic()
        gen = world.desire({"det": entry})
        st = await world.wait_state(
            lambda m, d, g=gen: m.generation == g and d.status == "failed", 5.0, what)
        elapsed = time.monotonic() - t0
        d = world.det_state(st)
        assert d.version == "1" and d.target_version == entry["version"], what
        assert reason in (d.error or ""), (what, d.error)
        assert elapsed < 5.0
        await until(lambda n=n: len(world.results()) >= n + 5, what=f"serving after {what}")
        assert {r["model"]["version"] for r in world.results()[n:]} == {"1"}, what
    assert agent.sync.counters["refused"] == len(cases)
    assert agent.slots["det"].version == "1"


async def test_restart_with_broker_and_hub_down_serves_the_cached_version(
    tmp_path: Path, own_broker: Broker, topic_prefix: str
) -> None:
    w = World(tmp_path, own_broker, topic_prefix)
    v2 = ms.version_of(tmp_path / "art", "det", "2", anchors=65)
    hs = hub_settings(tmp_path / "hub")
    async with running_hub(hs) as hub:
        w.hub_url = hub.url
        await w.push(w.v1)
        await w.push(v2)
        agent = await w.start_agent()
        w.desire({"det": w.entry(v2)})
        await until(lambda: agent.sync.generation == 1
                       and agent.slots["det"].version == "2", 15, "v2 applied")
        await w.stop_agent()
        w.close_publisher()
    own_broker.kill()  # the hub stopped above; now the broker is gone too
    agent = await w.start_agent()
    try:
        assert agent.slots["det"].version == "2"
        assert agent.mqtt is not None and not agent.mqtt.link.connected
        assert agent.pipeline is not None
        frames: dict[str, int] = {}

        def served() -> dict[str, int]:
            for t in agent.pipeline.telemetry_models():  # per version, since the last call
                frames[t.version] = frames.get(t.version, 0) + t.frames
            return frames

        await until(lambda: served().get("2", 0) >= 10, what="frames served offline")
        assert set(frames) == {"2"}
        # the broker comes back: what the node serves reaches subscribers, still version 2
        own_broker.start()
        w.watch()
        await until(lambda: len(w.results()) >= 10, what="results after the broker returned")
        assert {r["model"]["version"] for r in w.results()} == {"2"}
    finally:
        await w.stop_agent()
        w.stop_watching()


async def test_stale_and_malformed_desired_messages_change_nothing(world: World) -> None:
    v2 = ms.version_of(world.tmp / "art", "det", "2", anchors=65)
    v3 = ms.version_of(world.tmp / "art", "det", "3", anchors=66)
    for art in (world.v1, v2, v3):
        await world.push(art)
    world.watch()
    agent = await world.start_agent()
    world.desire({"det": world.entry(v2)}, generation=7)
    await world.wait_state(lambda m, d: m.generation == 7 and d.version == "2", 10, "gen 7")
    await until(agent.sync.idle.is_set, what="idle")
    n_states = len(world.state_messages())
    cache_root = agent.sync.cache.root
    bad = [
        b"{not json", b'{"v": 1}', b'{"v": 9, "node": "edge-01", "generation": 99}',
        ms.desired("another-node", 99, {"det": world.entry(v3)}),
        ms.desired(NODE, 99, {"det": {**world.entry(v3), "sha256": "nope"}}),
        ms.desired(NODE, 99, {"det": {**world.entry(v3), "version": "../../etc"}}),
        ms.desired(NODE, 7, {"det": world.entry(v3)}),  # repeated generation
        ms.desired(NODE, 3, {"det": world.entry(v3)}),  # older generation
    ]
    received = agent.sync.counters["desired_received"]
    for p in bad:
        world.publish_raw(p)
    await until(lambda: agent.sync.counters["desired_received"] == received + len(bad),
                   what="all desired messages delivered")
    await asyncio.sleep(0.3)  # anything wrongly started would show within this
    assert agent.sync.counters["desired_malformed"] == 6
    assert agent.sync.counters["desired_stale"] == 2
    assert agent.sync.idle.is_set() and agent.sync.generation == 7
    assert agent.slots["det"].version == "2"
    assert len(world.state_messages()) == n_states, "state changed"
    assert not (cache_root / "det" / "3").exists(), "v3 was downloaded"
