"""The fleet benchmark's simulated side (``bench/fleet.py``): the agents' telemetry bodies,
the child process that plays 5,000 agents over one MQTT connection, and the child that serves
the fake Kubernetes API with one Node per simulated agent; and the bare-paho baselines (a
subscriber timing telemetry, a publisher sending the desired payloads)."""

from __future__ import annotations

import math
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
from paho.mqtt import client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_agent.common import mqtt as mqtt_base  # noqa: E402
from edge_agent.contract import protocol  # noqa: E402
from edge_agent.contract.sketch import Sketch  # noqa: E402
from tests.support.broker import HUB, Broker  # noqa: E402
from tests.support.fake_k8s import FakeKube  # noqa: E402
from tests.support.mqtt_recorder import listen  # noqa: E402

MODEL = "det"
CAM = "edge.ai/camera-node"
LABEL = f"edge.ai/model.{MODEL}"
INTERVAL_S = 10.0
#: The simulator's identity on the broker (every topic: it speaks for every simulated node).
FLEET = "bench:fleet"
#: Distinct telemetry bodies the simulator cycles through (real sketches, made once).
VARIANTS = 16


def telemetry_models(version: str, variant: int, *, legacy: bool) -> list[dict[str, Any]]:
    """One model's telemetry as an agent sends it: 100 frames in 10 s, lognormal latency
    around 20 ms; with sketches (unless ``legacy``) and output statistics of a detector
    finding about 3 boxes a frame over 5 labels."""
    rng = random.Random(variant)
    lat = [rng.lognormvariate(math.log(20.0), 0.25) for _ in range(100)]
    ordered = sorted(lat)
    model: dict[str, Any] = {
        "name": MODEL, "version": version, "frames": 100, "errors": 0,
        "latency_ms": {"p50": round(ordered[49], 3), "p95": round(ordered[94], 3),
                       "p99": round(ordered[98], 3)}}
    if legacy:
        return [model]
    sk = Sketch()
    sk.extend(lat)
    boxes = [rng.betavariate(5, 2) for _ in range(rng.randint(250, 350))]
    scores = Sketch()
    scores.extend(boxes)
    labels = ["person", "car", "bicycle", "dog", "truck"]
    classes: dict[str, int] = {}
    for i in range(len(boxes)):
        k = labels[min(4, int(rng.expovariate(1.0)))] if i else labels[0]
        classes[k] = classes.get(k, 0) + 1
    model["latency"] = sk.to_wire().model_dump()
    model["outputs"] = {"frames": 100, "detections": len(boxes),
                        "scores": scores.to_wire().model_dump(), "classes": classes}
    return [model]


def telemetry_payload(node: str, models: list[dict[str, Any]]) -> bytes:
    return protocol.encode_dict({
        "v": 1, "node": node, "ts": time.time(), "interval_s": INTERVAL_S,
        "agent_version": "sim", "models": models,
        "cameras": [{"camera": "cam0", "connected": True, "fps": 10.0}],
        "outbox": {"depth": 0}, "rss_bytes": 123456789})


def telemetry_sizes() -> dict[str, Any]:
    """Bytes of a node's telemetry message before and after the sketches (mean of variants)."""
    node = node_name(0)
    old = [len(telemetry_payload(node, telemetry_models("1.0", v, legacy=True)))
           for v in range(VARIANTS)]
    new = [len(telemetry_payload(node, telemetry_models("1.0", v, legacy=False)))
           for v in range(VARIANTS)]
    out: dict[str, Any] = {"telemetry_bytes_before": round(sum(old) / len(old)),
           "telemetry_bytes_after": round(sum(new) / len(new))}
    out["telemetry_bytes_ratio"] = round(out["telemetry_bytes_after"]
                                         / out["telemetry_bytes_before"], 2)
    return out


def tls_client(conn: dict[str, Any], client_id: str) -> mqtt.Client:
    """A paho client with the TLS settings ``conn`` (``Broker.settings``), not connected."""
    c = mqtt_base.PahoClient(CallbackAPIVersion.VERSION2, client_id=client_id)
    c.tls_set_context(mqtt_base.tls_context(mqtt_base.ConnectionSettings(**conn)))
    return c


def node_name(i: int) -> str:
    return f"node-{i:05d}"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


# ------------------------------------------------------------------------- child: Kubernetes
def run_fake_kube(port: int, nodes: int, ready: Any, stop: Any) -> None:
    kube = FakeKube(port=port, history_limit=10 * nodes + 1000).start()
    for i in range(nodes):
        kube.add_node(node_name(i), {CAM: "true", LABEL: "1.0", "site": "bench"})
    ready.set()
    stop.wait()
    kube.stop()


# ----------------------------------------------------------------------- child: the agents
class Simulator:
    """Thousands of nodes over one paho connection (no per-node will: offline is not tested)."""

    def __init__(self, mqtt_conn: dict[str, Any], prefix: str, base_prefix: str, nodes: int,
                 conn: Any, legacy: bool) -> None:
        self.prefix, self.base_prefix, self.nodes, self.conn = prefix, base_prefix, nodes, conn
        self.models = {(version, v): telemetry_models(version, v, legacy=legacy)
                       for version in ("1.0", "2.0") for v in range(VARIANTS)}
        self.version: dict[str, str] = {node_name(i): "1.0" for i in range(nodes)}
        self.generation: dict[str, int] = {}
        self.got_new: set[str] = set()
        self.got_base: set[str] = set()
        self.got_initial: set[str] = set()
        self.lock = threading.Lock()
        self.c = tls_client(mqtt_conn, f"sim-{prefix}")
        self.c.max_inflight_messages_set(1000)
        self.c.max_queued_messages_set(0)
        self.c.on_message = self.on_message
        self.c.connect(mqtt_conn["host"], mqtt_conn["port"], keepalive=30)
        self.c.subscribe([(f"{prefix}/+/desired", 1), (f"{base_prefix}/+/desired", 1)])
        self.c.loop_start()

    def state(self, node: str) -> bytes:
        return protocol.encode_dict({
            "v": 1, "node": node, "online": True, "ts": time.time(),
            "generation": self.generation.get(node, 0), "agent_version": "sim",
            "models": [{"name": MODEL, "version": self.version[node], "status": "active"}]})

    def on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        now = time.time()
        data = orjson.loads(msg.payload)
        node, version = data["node"], data["models"][MODEL]["version"]
        if msg.topic.startswith(self.base_prefix + "/"):
            with self.lock:
                self.got_base.add(node)
                if len(self.got_base) == self.nodes:
                    self.conn.send(("baseline_done", now))
            return
        with self.lock:
            if data["generation"] <= self.generation.get(node, 0):
                return
            self.generation[node] = data["generation"]
            if version == "1.0":
                self.got_initial.add(node)
                if len(self.got_initial) == self.nodes:
                    self.conn.send(("initial_done", now))
            else:
                self.got_new.add(node)
                if len(self.got_new) == self.nodes:
                    self.conn.send(("wave_done", now))
            self.version[node] = version
        client.publish(f"{self.prefix}/{node}/state", self.state(node), qos=1, retain=True)

    def publish_states(self) -> None:
        for i in range(self.nodes):
            node = node_name(i)
            self.c.publish(f"{self.prefix}/{node}/state", self.state(node), qos=1, retain=True)

    def telemetry(self, seconds: float) -> int:
        """One message per node every INTERVAL_S, spread evenly; returns messages sent."""
        per_s = self.nodes / INTERVAL_S
        start = time.monotonic()
        sent = 0
        while (elapsed := time.monotonic() - start) < seconds:
            due = int(elapsed * per_s) + 1
            while sent < due:
                node = node_name(sent % self.nodes)
                payload = telemetry_payload(
                    node, self.models[(self.version[node], sent % VARIANTS)])
                self.c.publish(f"{self.prefix}/{node}/telemetry", payload, qos=0)
                sent += 1
            time.sleep(0.005)
        return sent


def run_simulator(mqtt_conn: dict[str, Any], prefix: str, base_prefix: str, nodes: int,
                  conn: Any, legacy: bool) -> None:
    sim = Simulator(mqtt_conn, prefix, base_prefix, nodes, conn, legacy)
    sim.publish_states()
    conn.send(("states_sent", time.time()))
    while True:
        cmd = conn.recv()
        if cmd[0] == "telemetry":
            conn.send(("telemetry_done", sim.telemetry(cmd[1])))
        elif cmd[0] == "stop":
            break
    sim.c.disconnect()
    sim.c.loop_stop()


# ------------------------------------------------------------------------- the baselines
class LagProbe:
    """The baseline subscriber: bare paho + orjson, receipt minus sent time."""

    def __init__(self, broker: Broker, prefix: str) -> None:
        self.lags: list[float] = []
        self.c = listen(broker, f"{prefix}/+/telemetry", self.on_message, qos=0,
                        client_id=f"probe-{prefix}")

    def on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        self.lags.append(time.time() - orjson.loads(msg.payload)["ts"])

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def bare_publish(broker: Broker, prefix: str, payloads: list[tuple[str, bytes]]) -> None:
    # the hub's identity, as the hub's own publishes: TLS on both sides of the comparison
    c = broker.client(HUB, client_id=f"bare-{prefix}")
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    broker.connect(c)
    c.loop_start()
    infos = [c.publish(f"{prefix}/{node}/desired", p, qos=1, retain=True) for node, p in payloads]
    for info in infos:
        info.wait_for_publish(60)
    c.disconnect()
    c.loop_stop()
