"""What the demo watches: the results on MQTT (as a subscriber would) and the hub's REST API.

``ResultsWatcher`` is a downstream consumer built on ``hub.client.results.ResultSubscriber`` (the
de-duplicating subscriber the hub ships for consumers): it counts results per node and keeps a
short window of end-to-end latencies and arrival times, from which fps and p50/p99 are computed.
``HubApi`` reads the fleet and rollouts over the hub's HTTPS API (the hub verified against the
demo's CA, a token sent), nothing else.
"""

from __future__ import annotations

import math
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from demo.procs import DemoError
from hub.client.results import Gap, ResultSubscriber


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in [0, 1]) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


@dataclass
class NodeFigures:
    """One node as seen in its results over the last window."""

    node: str
    delivered: int = 0
    version: str | None = None
    fps: float = 0.0
    p50_ms: float | None = None
    p99_ms: float | None = None
    #: Seconds of results of ``version`` in the window (how settled the figures are).
    version_span_s: float = 0.0


@dataclass
class _Node:
    delivered: int = 0
    first_arrival: float = 0.0
    version: str | None = None
    #: (arrival monotonic time, model version, end-to-end latency ms)
    window: deque[tuple[float, str, float]] = field(default_factory=deque)


class ResultsWatcher:
    """Subscribe to every node's results and keep per-node figures (thread-safe)."""

    def __init__(self, port: int, tls: dict[str, Path], *, topic_prefix: str = "edge",
                 window_s: float = 5.0) -> None:
        self.window_s = window_s
        self.gaps = 0
        self.missing = 0
        self._nodes: dict[str, _Node] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # a consumer identity of its own (``tls``: ca_file, cert_file, key_file)
        self._sub = ResultSubscriber("127.0.0.1", port, topic_prefix=topic_prefix,
                                     on_gap=self._on_gap, **tls)
        self._thread = threading.Thread(target=self._run, name="demo-results", daemon=True)

    def start(self) -> ResultsWatcher:
        """Connect, subscribe (raises ResultsUnavailableError) and start consuming."""
        self._sub.start(timeout=10.0)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop consuming and disconnect."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)
        self._sub.close()

    def _on_gap(self, gap: Gap) -> None:
        self.gaps += 1
        self.missing += gap.count

    def _run(self) -> None:
        while not self._stop.is_set():
            got = self._sub.get(timeout=0.3)
            if got is None:
                continue
            m = got.message
            now = time.monotonic()
            with self._lock:
                n = self._nodes.setdefault(m.node, _Node(first_arrival=now))
                n.delivered += 1
                n.version = m.model.version
                n.window.append((now, m.model.version, m.latency_ms.end_to_end))
                while n.window and n.window[0][0] < now - self.window_s:
                    n.window.popleft()

    def stats(self) -> dict[str, int]:
        """The subscriber's counters (received, delivered, duplicates, malformed, gaps, …)."""
        return self._sub.stats.as_dict()

    def figures(self, node: str) -> NodeFigures:
        """``node``'s figures now: results of its current version in the last window."""
        now = time.monotonic()
        with self._lock:
            n = self._nodes.get(node)
            if n is None:
                return NodeFigures(node)
            recent = [(t, v, ms) for t, v, ms in n.window
                      if t >= now - self.window_s and v == n.version]
            out = NodeFigures(node, n.delivered, n.version)
        if recent:
            lat = [ms for _, _, ms in recent]
            out.p50_ms, out.p99_ms = percentile(lat, 0.50), percentile(lat, 0.99)
            out.version_span_s = now - recent[0][0]
            # over the whole window once the version has run that long, else since it started
            span = self.window_s if out.version_span_s >= self.window_s * 0.9 else max(
                out.version_span_s, 1.0)
            out.fps = len(recent) / span
        return out


class HubApi:
    """GET requests to the hub's REST API (the demo's reads; writes go through the CLI)."""

    def __init__(self, url: str, *, ca_file: Path, token_file: Path) -> None:
        self.url = url.rstrip("/")
        self.ca_file = ca_file
        self.token_file = token_file
        self._tls: ssl.SSLContext | None = None

    def get(self, path: str, timeout: float = 5.0) -> Any:
        """The decoded JSON body; DemoError when the hub does not answer or refuses."""
        if self._tls is None:
            self._tls = ssl.create_default_context(cafile=str(self.ca_file))
        token = self.token_file.read_text(encoding="utf-8").strip()
        req = urllib.request.Request(self.url + path,  # noqa: S310 - our own https URL
                                     headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self._tls) as r:  # noqa: S310
                return orjson.loads(r.read())
        except urllib.error.HTTPError as exc:
            body = exc.read()[:300].decode("utf-8", "replace")
            raise DemoError(f"hub answered {exc.code} to GET {path}: {body}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise DemoError(f"hub does not answer GET {path}: {exc}") from exc

    def ready(self) -> bool:
        """Whether the hub answers ``/healthz``."""
        try:
            self.get("/healthz", timeout=1.0)
        except DemoError:
            return False
        return True

    def nodes(self) -> dict[str, dict[str, Any]]:
        """``{name: node view}`` from ``GET /v1/nodes``."""
        return {n["name"]: n for n in self.get("/v1/nodes")["nodes"]}

    def rollout(self, rid: int) -> dict[str, Any]:
        """``GET /v1/rollouts/{id}``."""
        out: dict[str, Any] = self.get(f"/v1/rollouts/{rid}")["rollout"]
        return out
