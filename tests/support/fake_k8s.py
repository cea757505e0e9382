"""A fake Kubernetes API server for nodes, which the real ``kubernetes`` client talks to.

The one stand-in the house rules allow: an aiohttp app on a free loopback port, in a thread of
its own (so a hub in a subprocess or in the test's loop can both use it), serving what the hub
needs: list (with ``labelSelector``), get, merge/strategic-merge patches of labels (with the
``resourceVersion`` precondition) and watches (ADDED/MODIFIED/DELETED as nodes enter or leave
the selector, bookmarks, 410 for a too-old resourceVersion). Faults can be injected per request:
an HTTP status (409, 429, 500…) or a request that hangs, optionally after it was applied (the
nasty case: the client times out but the change landed).

``label()`` plays ``kubectl label node``. ``effective_patches`` counts patches that changed a
node, ``requests`` logs every request, so tests can prove nothing was applied twice.

``identity`` (``tests/support/fake_k8s_auth.py``) serves what the certificate bootstrap asks:
TokenReviews of projected ServiceAccount tokens, and pods (``add_pod``, ``issue_token``).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import yaml
from aiohttp import web

from hub.cluster.selectors import SelectorError, parse_selector
from tests.support.broker import free_port
from tests.support.fake_k8s_auth import FakeIdentity


@dataclass
class Fault:
    method: str
    status: int | None = None
    hang: bool = False
    apply_first: bool = True
    times: int = 1
    node: str | None = None
    retry_after: float | None = None
    hit: int = 0


@dataclass
class _Event:
    rv: int
    kind: str
    old: dict[str, Any] | None
    new: dict[str, Any]


def _status(code: int, reason: str, message: str) -> web.Response:
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}
    return web.Response(status=code, body=orjson.dumps(body), content_type="application/json")


@dataclass
class FakeKube:
    """The fake API server. ``start()`` / ``stop()``; ``url`` once started."""

    port: int = field(default_factory=free_port)
    hang_s: float = 30.0
    history_limit: int = 100_000

    def __post_init__(self) -> None:
        self.nodes: dict[str, dict[str, Any]] = {}
        self.events: list[_Event] = []
        self.rv = 1
        self.compacted_rv = 0
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str, int]] = []
        self.effective_patches: dict[str, int] = {}
        self.watches = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Condition | None = None
        self._release: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        #: Pods and ServiceAccount tokens (TokenReview), for the certificate bootstrap.
        self.identity = FakeIdentity(self._log, self._read_fault)

    # ----------------------------------------------------------------------- lifecycle
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeKube:
        self._thread = threading.Thread(target=self._run, name="fake-k8s", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fake kubernetes API did not start")
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        finally:
            loop.close()

    async def _serve(self) -> None:
        self._changed = asyncio.Condition()
        self._release = asyncio.Event()
        app = web.Application()
        app.router.add_get("/api/v1/nodes", self._list)
        app.router.add_get("/api/v1/nodes/{name}", self._get)
        app.router.add_patch("/api/v1/nodes/{name}", self._patch)
        self.identity.add_routes(app)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self._ready.set()
        await self._release.wait()
        await self._notify()  # wake the watches so they end
        await self._runner.cleanup()

    def stop(self) -> None:
        if self._loop is None or self._release is None:
            return
        self._loop.call_soon_threadsafe(self._release.set)
        if self._thread is not None:
            self._thread.join(10)
        self._loop = None

    def write_kubeconfig(self, path: Path) -> Path:
        """A kubeconfig pointing the real client at this server."""
        cfg = {
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "hub", "user": {"token": "fake-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "hub"}}],
        }
        path.write_text(yaml.safe_dump(cfg))
        return path

    # ----------------------------------------------------------------- test-side controls
    def add_node(self, name: str, labels: dict[str, str] | None = None) -> None:
        """Create a node (as a kubelet registering would)."""
        with self._lock:
            self.rv += 1
            obj = {"apiVersion": "v1", "kind": "Node",
                   "metadata": {"name": name, "labels": dict(labels or {}),
                                "resourceVersion": str(self.rv), "uid": f"uid-{name}"},
                   "status": {"conditions": [{"type": "Ready", "status": "True"}]}}
            self.nodes[name] = obj
            self._record("ADDED", None, obj)

    def label(self, name: str, key: str, value: str | None) -> None:
        """``kubectl label node NAME key=value`` (None: ``key-``)."""
        with self._lock:
            self._set_labels(name, {key: value})

    def touch(self, name: str) -> None:
        """A status update (kubelet heartbeat): new resourceVersion, same labels."""
        with self._lock:
            obj = self.nodes[name]
            old = orjson.loads(orjson.dumps(obj))
            self.rv += 1
            obj["metadata"]["resourceVersion"] = str(self.rv)
            self._record("MODIFIED", old, obj)

    def labels(self, name: str) -> dict[str, str]:
        with self._lock:
            return dict(self.nodes[name]["metadata"]["labels"])

    def inject(self, method: str, status: int | None = None, *, hang: bool = False,
               apply_first: bool = True, times: int = 1, node: str | None = None,
               retry_after: float | None = None) -> Fault:
        """Make the next ``times`` matching requests fail with ``status`` or hang."""
        f = Fault(method.upper(), status, hang, apply_first, times, node, retry_after)
        with self._lock:
            self.faults.append(f)
        return f

    def compact(self) -> None:
        """Forget history, so watches from older resourceVersions get 410 Gone."""
        with self._lock:
            self.compacted_rv = self.rv
            self.events.clear()

    def count(self, method: str, node: str | None = None) -> int:
        """Requests of ``method`` (to ``node``) so far, whatever their outcome."""
        with self._lock:
            return sum(1 for m, p, _ in self.requests
                       if m == method and (node is None or p.endswith("/" + node)))

    # -------------------------------------------------------------------------- internals
    def _record(self, kind: str, old: dict[str, Any] | None, new: dict[str, Any]) -> None:
        snap = orjson.loads(orjson.dumps(new))
        self.events.append(_Event(self.rv, kind, old, snap))
        if len(self.events) > self.history_limit:
            drop = len(self.events) - self.history_limit
            self.compacted_rv = self.events[drop - 1].rv
            del self.events[:drop]
        if self._loop is not None and self._changed is not None:
            self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._notify()))

    async def _notify(self) -> None:
        assert self._changed is not None
        async with self._changed:
            self._changed.notify_all()

    def _set_labels(self, name: str, patch: dict[str, str | None]) -> bool:
        obj = self.nodes[name]
        labels = obj["metadata"]["labels"]
        new = dict(labels)
        for k, v in patch.items():
            if v is None:
                new.pop(k, None)
            else:
                new[k] = str(v)
        if new == labels:
            return False
        old = orjson.loads(orjson.dumps(obj))
        self.rv += 1
        obj["metadata"]["labels"] = new
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self._record("MODIFIED", old, obj)
        return True

    def _fault(self, method: str, name: str | None) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if f.method == method and f.hit < f.times and (f.node is None or f.node == name):
                    f.hit += 1
                    return f
        return None

    async def _failed(self, f: Fault) -> web.Response:
        assert f.status is not None
        resp = _status(f.status, {409: "Conflict", 429: "TooManyRequests"}.get(f.status,
                                                                            "InternalError"),
                       f"injected fault {f.status}")
        if f.retry_after is not None:
            resp.headers["Retry-After"] = str(f.retry_after)
        return resp

    async def _read_fault(self, request: web.Request, name: str | None) -> web.Response | None:
        """An injected fault for a GET: its error response, or None after any injected hang."""
        f = self._fault("GET", name)
        if f is not None and f.status:
            self._log(request, f.status)
            return await self._failed(f)
        if f is not None and f.hang:
            await self._hang()
        return None

    async def _hang(self) -> None:
        assert self._release is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._release.wait(), self.hang_s)

    def _log(self, request: web.Request, status: int) -> None:
        with self._lock:
            self.requests.append((request.method, request.path, status))

    async def _list(self, request: web.Request) -> web.StreamResponse:
        try:
            sel = parse_selector(request.query.get("labelSelector", ""))
        except SelectorError as exc:
            self._log(request, 400)
            return _status(400, "BadRequest", str(exc))
        if request.query.get("watch") in ("true", "1"):
            return await self._watch(request, sel)
        failed = await self._read_fault(request, None)
        if failed is not None:
            return failed
        with self._lock:
            items = [o for o in self.nodes.values() if sel.matches(o["metadata"]["labels"])]
            body = {"kind": "NodeList", "apiVersion": "v1",
                    "metadata": {"resourceVersion": str(self.rv)}, "items": items}
            data = orjson.dumps(body)
        self._log(request, 200)
        return web.Response(body=data, content_type="application/json")

    async def _get(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        failed = await self._read_fault(request, name)
        if failed is not None:
            return failed
        with self._lock:
            obj = self.nodes.get(name)
            data = orjson.dumps(obj) if obj else None
        if data is None:
            self._log(request, 404)
            return _status(404, "NotFound", f'nodes "{name}" not found')
        self._log(request, 200)
        return web.Response(body=data, content_type="application/json")

    async def _patch(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        ctype = request.content_type
        if ctype not in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            self._log(request, 415)
            return _status(415, "UnsupportedMediaType", f"unsupported patch type {ctype}")
        body = orjson.loads(await request.read())
        f = self._fault("PATCH", name)
        if f is not None and f.status:
            self._log(request, f.status)
            return await self._failed(f)
        if f is not None and f.hang and not f.apply_first:
            self._log(request, 0)
            await self._hang()  # lost before it landed: nothing applied
            return _status(504, "Timeout", "injected hang")
        with self._lock:
            obj = self.nodes.get(name)
            if obj is None:
                status, resp = 404, _status(404, "NotFound", f'nodes "{name}" not found')
            else:
                meta = body.get("metadata") or {}
                want_rv = meta.get("resourceVersion")
                if want_rv is not None and want_rv != obj["metadata"]["resourceVersion"]:
                    status, resp = 409, _status(
                        409, "Conflict", "the object has been modified; please apply your "
                        "changes to the latest version and try again")
                else:
                    if self._set_labels(name, meta.get("labels") or {}):
                        self.effective_patches[name] = self.effective_patches.get(name, 0) + 1
                    status = 200
                    resp = web.Response(body=orjson.dumps(obj), content_type="application/json")
        if f is not None and f.hang:
            self._log(request, 0)
            await self._hang()  # the change landed (apply_first) but the client never hears
            return resp
        self._log(request, status)
        return resp

    async def _watch(self, request: web.Request, sel: Any) -> web.StreamResponse:
        rv = int(request.query.get("resourceVersion") or 0)
        timeout = float(request.query.get("timeoutSeconds") or 60)
        bookmarks = request.query.get("allowWatchBookmarks") in ("true", "1")
        resp = web.StreamResponse()
        resp.content_type = "application/json"
        await resp.prepare(request)
        self._log(request, 200)
        with self._lock:
            self.watches += 1
        if rv and rv < self.compacted_rv:
            err = {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired",
                                                "message": "too old resource version"}}
            await resp.write(orjson.dumps(err) + b"\n")
            return resp
        deadline = time.monotonic() + timeout
        assert self._changed is not None and self._release is not None
        try:
            while time.monotonic() < deadline and not self._release.is_set():
                with self._lock:
                    pending = [e for e in self.events if e.rv > rv]
                for e in pending:
                    line = self._watch_line(e, sel)
                    rv = e.rv
                    if line is not None:
                        await resp.write(line)
                async with self._changed:
                    # checked under the condition's lock: a notify cannot slip in between
                    with self._lock:
                        newer = bool(self.events) and self.events[-1].rv > rv
                    if not newer:
                        try:
                            await asyncio.wait_for(
                                self._changed.wait(),
                                max(0.01, min(1.0, deadline - time.monotonic())))
                        except TimeoutError:
                            if bookmarks:
                                mark = {"type": "BOOKMARK", "object": {
                                    "kind": "Node", "metadata": {"resourceVersion": str(rv)}}}
                                await resp.write(orjson.dumps(mark) + b"\n")
        except (ConnectionResetError, asyncio.CancelledError):
            return resp
        return resp

    @staticmethod
    def _watch_line(e: _Event, sel: Any) -> bytes | None:
        new_match = sel.matches(e.new["metadata"]["labels"])
        old_match = e.old is not None and sel.matches(e.old["metadata"]["labels"])
        if e.kind == "ADDED":
            kind = "ADDED" if new_match else None
        elif new_match and old_match:
            kind = "MODIFIED"
        elif new_match:
            kind = "ADDED"
        elif old_match:
            kind = "DELETED"
        else:
            kind = None
        if kind is None:
            return None
        return orjson.dumps({"type": kind, "object": e.new}) + b"\n"
