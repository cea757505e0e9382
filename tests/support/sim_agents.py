"""Lightweight simulated agents that speak the wire contract over a real broker.

A ``SimAgent`` is one node: its own paho connection, with the node's own certificate from the
broker's CA (so the broker's ACL gives it exactly a real agent's rights), the agent's last will
(retained ``online: false`` state), a subscription to its ``desired`` topic, a retained
``state`` that follows what it was told (loading, then active, or failed for versions it is told
to fail, or stuck loading for versions that never come up), and ``telemetry`` every
``interval_s`` with the latency, error rate and fps configured per version. Everything it
received is kept in ``desired_log`` so tests can check that no node was sent two versions.
A desired model with a ``shadow`` candidate is loaded beside the active version (or fails to,
for versions in ``Behaviour.shadow_fail``) and reported in the state's shadow fields; telemetry
then carries ``ModelTelemetry.shadow`` with the agreement configured per candidate version.
``ever_active`` records every (model, version) that ever served, so a test can prove a
candidate never did.

``measure_latency_ms`` times real ONNX Runtime sessions, so "a version 3× slower" can be a real
generated model rather than a number typed into a test.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from paho.mqtt import client as mqtt
from paho.mqtt.enums import MQTTProtocolVersion

from edge_agent.common import mqtt as mqtt_base
from edge_agent.contract import protocol
from edge_agent.contract.protocol import (
    CameraTelemetry,
    LatencySummary,
    ModelState,
    ModelTelemetry,
    ShadowTelemetry,
    StateMessage,
    TelemetryMessage,
)
from tests.support.broker import Broker


def measure_latency_ms(*model_paths: Path, runs: int = 7) -> list[float]:
    """Median latency of one ONNX Runtime inference of each model, on this machine.

    The models' runs are interleaved, so a busy neighbour slows them all alike.
    """
    sessions = []
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    for path in model_paths:
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0]
        shape = [d if isinstance(d, int) else 1 for d in inp.shape]
        x = np.random.default_rng(0).random(shape, dtype=np.float32)
        sess.run(None, {inp.name: x})
        sessions.append((sess, {inp.name: x}))
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for i, (sess, feed) in enumerate(sessions):
            t0 = time.perf_counter()
            sess.run(None, feed)
            times[i].append((time.perf_counter() - t0) * 1000)
    return [sorted(t)[len(t) // 2] for t in times]


@dataclass
class Behaviour:
    """How a node behaves per model version."""

    latency_ms: dict[str, float] = field(default_factory=dict)
    default_latency_ms: float = 20.0
    error_rate: dict[str, float] = field(default_factory=dict)
    fps: float = 10.0
    fail: set[str] = field(default_factory=set)
    stuck: set[str] = field(default_factory=set)
    load_s: float = 0.02
    #: Per-frame agreement of a shadow candidate with the active version, by candidate.
    shadow_agreement: dict[str, float] = field(default_factory=dict)
    default_shadow_agreement: float = 1.0
    #: Candidate versions whose shadow session fails to load.
    shadow_fail: set[str] = field(default_factory=set)
    #: Compared frames per telemetry message (0: the frames of the window).
    shadow_samples: int = 0
    #: Its camera's tracking figures in telemetry (None: a camera that does not track).
    active_tracks: int | None = None
    events_per_s: float | None = None


class SimAgent:
    """One simulated node on ``broker`` under topic ``prefix``, logged in as ``node``."""

    def __init__(self, broker: Broker, prefix: str, node: str, *,
                 models: dict[str, str] | None = None, behaviour: Behaviour | None = None,
                 interval_s: float = 0.05) -> None:
        self.broker = broker
        self.prefix = prefix
        self.node = node
        self.behaviour = behaviour or Behaviour()
        self.interval_s = interval_s
        self.lock = threading.Lock()
        self.models: dict[str, ModelState] = {
            m: ModelState(name=m, version=v, status="active") for m, v in (models or {}).items()
        }
        self.generation = 0
        self.desired_log: list[tuple[int, dict[str, str]]] = []
        self.shadow_log: list[tuple[int, dict[str, str]]] = []
        self.ever_active: set[tuple[str, str]] = {
            (m, v) for m, v in (models or {}).items() if v}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: mqtt.Client | None = None
        self._connected = threading.Event()

    # ---------------------------------------------------------------------------- lifecycle
    def start(self) -> SimAgent:
        c = self.broker.client(self.node, client_id=f"sim-{self.prefix}-{self.node}",
                               protocol=MQTTProtocolVersion.MQTTv311)
        will = protocol.encode(StateMessage(node=self.node, online=False, ts=time.time()))
        c.will_set(protocol.state_topic(self.prefix, self.node), will, qos=1, retain=True)
        c.on_connect = self._on_connect
        c.on_message = self._on_message
        self._client = c  # before connecting: on_connect publishes the state through it
        c.connect("127.0.0.1", self.broker.port, keepalive=5)
        c.loop_start()
        if not self._connected.wait(10):
            raise RuntimeError(f"sim agent {self.node} could not connect")
        self._stop.clear()
        self._thread = threading.Thread(target=self._telemetry_loop, daemon=True,
                                        name=f"sim-{self.node}")
        self._thread.start()
        return self

    def kill(self) -> None:
        """Vanish without a DISCONNECT: the broker publishes the last will."""
        self._stop.set()
        c = self._client
        if c is not None:
            mqtt_base.drop(c)
            self._client = None
        if self._thread is not None:
            self._thread.join(5)
        self._connected.clear()

    def stop(self) -> None:
        """Disconnect cleanly (tests' teardown)."""
        self._stop.set()
        c = self._client
        if c is not None:
            c.disconnect()
            mqtt_base.release(c)
            self._client = None
        if self._thread is not None:
            self._thread.join(5)

    # -------------------------------------------------------------------------------- wire
    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, reason: object,
                    properties: object) -> None:
        client.subscribe(protocol.desired_topic(self.prefix, self.node), qos=1)
        self._publish_state()
        self._connected.set()

    def _publish_state(self) -> None:
        c = self._client
        if c is None:
            return
        with self.lock:
            msg = StateMessage(node=self.node, online=True, ts=time.time(),
                               generation=self.generation, agent_version="sim",
                               providers=["CPUExecutionProvider"],
                               models=[m.model_copy() for m in self.models.values()])
        c.publish(protocol.state_topic(self.prefix, self.node), protocol.encode(msg), qos=1,
                  retain=True)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        desired = protocol.decode_desired(msg.payload)
        with self.lock:
            self.desired_log.append((desired.generation,
                                     {m: d.version for m, d in desired.models.items()}))
            self.shadow_log.append((desired.generation, {
                m: d.shadow.version for m, d in desired.models.items() if d.shadow}))
            if desired.generation <= self.generation:
                return
            self.generation = desired.generation
            loads: list[tuple[str, str]] = []
            shadows: list[tuple[str, str]] = []
            for name in list(self.models):
                if name not in desired.models:
                    del self.models[name]
            for name, d in desired.models.items():
                cur = self.models.get(name)
                if cur is not None and cur.version == d.version and cur.status == "active":
                    want = d.shadow.version if d.shadow is not None else None
                    if cur.shadow_version != want:
                        self.models[name] = cur.model_copy(update={
                            "shadow_version": want, "shadow_error": None,
                            "shadow_status": "loading" if want else None})
                        if want:
                            shadows.append((name, want))
                    continue
                self.models[name] = ModelState(
                    name=name, version=cur.version if cur else None, status="loading",
                    target_version=d.version)
                loads.append((name, d.version))
        self._publish_state()
        for name, version in loads:
            timer = threading.Timer(self.behaviour.load_s, self._loaded, (name, version))
            timer.daemon = True
            timer.start()
        for name, version in shadows:
            timer = threading.Timer(self.behaviour.load_s, self._shadow_loaded, (name, version))
            timer.daemon = True
            timer.start()

    def _shadow_loaded(self, name: str, version: str) -> None:
        with self.lock:
            cur = self.models.get(name)
            if cur is None or cur.shadow_version != version or cur.shadow_status != "loading":
                return
            failed = version in self.behaviour.shadow_fail
            self.models[name] = cur.model_copy(update={
                "shadow_status": "failed" if failed else "active",
                "shadow_error": "shadow session creation failed (simulated)" if failed else None})
        self._publish_state()

    def _loaded(self, name: str, version: str) -> None:
        b = self.behaviour
        with self.lock:
            cur = self.models.get(name)
            if cur is None or cur.target_version != version or version in b.stuck:
                return
            if version in b.fail:
                self.models[name] = ModelState(name=name, version=cur.version, status="failed",
                                               target_version=version,
                                               error="session creation failed (simulated)")
            else:
                self.models[name] = ModelState(name=name, version=version, status="active")
                self.ever_active.add((name, version))
        self._publish_state()

    def telemetry(self) -> TelemetryMessage:
        """One telemetry message for the current models."""
        b = self.behaviour
        frames = max(1, round(b.fps * self.interval_s))
        models = []
        with self.lock:
            for m in self.models.values():
                if m.status == "loading" and m.version is None:
                    continue
                ver = m.version or ""
                lat = b.latency_ms.get(ver, b.default_latency_ms)
                errors = round(frames * b.error_rate.get(ver, 0.0))
                models.append(ModelTelemetry(
                    name=m.name, version=ver, frames=frames, errors=errors,
                    latency_ms=LatencySummary(p50=lat * 0.8, p95=lat * 0.95, p99=lat),
                    shadow=self._shadow_telemetry(m, frames)))
        return TelemetryMessage(
            node=self.node, ts=time.time(), interval_s=self.interval_s, agent_version="sim",
            models=models, cameras=[CameraTelemetry(camera="cam0", connected=True, fps=b.fps,
                                                    active_tracks=b.active_tracks,
                                                    events_per_s=b.events_per_s)])

    def _shadow_telemetry(self, m: ModelState, frames: int) -> ShadowTelemetry | None:
        """The shadow's window (None unless a candidate is loaded beside an active version)."""
        b = self.behaviour
        if m.status != "active" or m.shadow_status != "active" or not m.shadow_version:
            return None
        n = b.shadow_samples or frames
        agree = b.shadow_agreement.get(m.shadow_version, b.default_shadow_agreement)
        return ShadowTelemetry(version=m.shadow_version, samples=n, agreement_sum=n * agree,
                               busy_s=0.001 * n, active_busy_s=0.001 * frames)

    def shadow_versions(self, model: str) -> list[str | None]:
        """The distinct consecutive shadow candidates of ``model`` this node was sent."""
        out: list[str | None] = []
        with self.lock:
            for _, shadows in self.shadow_log:
                v = shadows.get(model)
                if not out or out[-1] != v:
                    out.append(v)
        return out

    def _telemetry_loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            c = self._client
            if c is None:
                return
            c.publish(protocol.telemetry_topic(self.prefix, self.node),
                      protocol.encode(self.telemetry()), qos=0)

    # ------------------------------------------------------------------------------ checks
    def versions_sent(self, model: str) -> list[str | None]:
        """The distinct consecutive versions of ``model`` this node was sent."""
        out: list[str | None] = []
        with self.lock:
            for _, models in self.desired_log:
                v = models.get(model)
                if not out or out[-1] != v:
                    out.append(v)
        return out

    def active_version(self, model: str) -> str | None:
        with self.lock:
            m = self.models.get(model)
            return m.version if m is not None and m.status == "active" else None


def start_fleet(broker: Broker, prefix: str, names: list[str], *, models: dict[str, str],
                behaviour: Callable[[str], Behaviour] | None = None,
                interval_s: float = 0.05) -> dict[str, SimAgent]:
    """Start one SimAgent per name."""
    return {n: SimAgent(broker, prefix, n, models=models,
                        behaviour=behaviour(n) if behaviour else None,
                        interval_s=interval_s).start() for n in names}
