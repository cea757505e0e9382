"""The Kubernetes backend of ``Cluster``: list, watch and label nodes through the real client.

Every call of the synchronous ``kubernetes`` client runs in a bounded worker pool, so the event
loop never waits on the API server; the watch has a thread of its own. Retries are ours (the
client's urllib3 retries are switched off so that nothing is retried twice): 409, 429, 5xx,
connection errors and timeouts are retried with exponential backoff and jitter (a 429's
``Retry-After`` is honoured, capped), anything else is permanent.

A label patch is never applied twice: before each retry the node is read again, and when the
failed attempt did land (a request that hung after the server applied it) nothing more is sent.
Patches are JSON merge patches of ``metadata.labels`` (a value sets, null removes); a
compare-and-set patch (``expect=``) carries the ``resourceVersion`` it was checked against, so
the server refuses it with 409 when anyone changed the node in between.

For the certificate bootstrap (``hub.pki.bootstrap``) it also reviews tokens (TokenReview) and
reads pods, returning their JSON as the API server sends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import orjson
import structlog
import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from edge_agent.common import backoff
from hub.cluster.base import (
    Cluster,
    ClusterError,
    LabelPatch,
    LabelPreconditionFailed,
    Listener,
    Node,
    validate_patch,
)
from hub.cluster.selectors import Selector
from hub.config import ClusterSettings

log = structlog.get_logger(__name__)
T = TypeVar("T")

_MERGE_PATCH = "application/merge-patch+json"


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, ApiException):
        status = int(exc.status or 0)
        return status in (0, 409, 429) or status >= 500
    return isinstance(exc, urllib3.exceptions.HTTPError | OSError | TimeoutError)


def _describe(exc: BaseException) -> str:
    """A short, bounded description (foreign error bodies are truncated)."""
    if isinstance(exc, ApiException):
        body = (exc.body or "")[:200] if isinstance(exc.body, str) else ""
        return f"HTTP {exc.status} {exc.reason or ''} {body}".strip()
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def node_from(obj: Mapping[str, Any]) -> Node:
    """A ``Node`` from the JSON of a Kubernetes Node object."""
    meta = obj.get("metadata") or {}
    return Node(
        name=str(meta.get("name", "")),
        labels={str(k): str(v) for k, v in (meta.get("labels") or {}).items()},
        resource_version=str(meta.get("resourceVersion", "")),
    )


def _lines(resp: Any) -> Iterator[bytes]:
    """Split a streamed watch response into JSON lines as they arrive."""
    buf = b""
    for chunk in resp.stream(amt=None, decode_content=True):
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line.strip():
                yield line
    if buf.strip():
        yield buf


def load_api_client(settings: ClusterSettings) -> client.ApiClient:
    """kubeconfig when configured, else in-cluster config, else the default kubeconfig."""
    cfg = client.Configuration()
    try:
        if settings.kubeconfig is not None:
            config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=str(settings.kubeconfig), client_configuration=cfg)
        else:
            try:
                config.load_incluster_config(  # type: ignore[no-untyped-call]
                    client_configuration=cfg)
            except config.ConfigException:
                config.load_kube_config(  # type: ignore[no-untyped-call]
                    client_configuration=cfg)
    except (config.ConfigException, OSError, TypeError, ValueError) as exc:
        raise ClusterError(
            f"cannot configure the Kubernetes client: {exc} (set cluster.kubeconfig, or run "
            "in a pod with a service account)"
        ) from exc
    # our retry loop is the only one: a PATCH retried inside urllib3 could land twice
    cfg.retries = False
    cfg.client_go_retries = False
    cfg.connection_pool_maxsize = settings.api_concurrency + 2
    return client.ApiClient(cfg)


class KubernetesCluster(Cluster):
    """Nodes from the Kubernetes API (list + watch), labels written with merge patches."""

    def __init__(self, settings: ClusterSettings, *, on_change: Listener | None = None) -> None:
        super().__init__(settings, on_change=on_change)
        self._api_client: client.ApiClient | None = None
        self._api: client.CoreV1Api | None = None
        self._pool = ThreadPoolExecutor(
            max_workers=settings.api_concurrency + 1, thread_name_prefix="k8s-api"
        )
        self._sem = asyncio.Semaphore(settings.api_concurrency)
        self._stop = threading.Event()
        self._watch_thread: threading.Thread | None = None
        self._watch_resp: Any = None
        self._rv: str | None = None
        self.patch_requests = 0  # PATCH requests sent (tests and metrics)

    # ---------------------------------------------------------------------------- plumbing
    @property
    def api(self) -> client.CoreV1Api:
        if self._api is None:
            raise ClusterError("cluster is not started")
        return self._api

    @property
    def _timeout(self) -> tuple[float, float]:
        t = self.settings.api_timeout_s
        return (t, t)

    def _backoff(self, attempt: int, exc: BaseException | None = None) -> float:
        s = self.settings
        delay = backoff.delay(attempt - 1, s.api_backoff_s, s.api_backoff_max_s)
        if isinstance(exc, ApiException) and exc.status == 429 and exc.headers:
            with contextlib.suppress(TypeError, ValueError):
                delay = max(delay, float(exc.headers.get("Retry-After", 0)))
        return float(min(delay, s.api_backoff_max_s))

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """One API call in the worker pool, bounded by ``api_concurrency``."""
        async with self._sem:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _retrying(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """An idempotent call (list/get) with retries on temporary errors."""
        attempt = 0
        while True:
            try:
                return await self._run(fn, *args)
            except ApiException as exc:
                if exc.status == 404:
                    raise ClusterError(f"{what}: not found") from exc
                if not _retryable(exc) or attempt >= self.settings.api_retries:
                    raise ClusterError(f"{what} failed: {_describe(exc)}") from exc
                err: BaseException = exc
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                if attempt >= self.settings.api_retries:
                    raise ClusterError(f"{what} failed: {_describe(exc)}") from exc
                err = exc
            attempt += 1
            delay = self._backoff(attempt, err)
            log.warning("k8s_retry", call=what, attempt=attempt, delay_s=round(delay, 3),
                        error=_describe(err))
            await asyncio.sleep(delay)

    # ------------------------------------------------------------------------ raw API calls
    def _list_raw(self, selector: str) -> tuple[list[Node], str]:
        resp: Any = self.api.list_node(
            label_selector=selector or None, _preload_content=False,
            _request_timeout=self._timeout,
        )
        data = orjson.loads(resp.data)
        items = data.get("items") or []
        rv = str((data.get("metadata") or {}).get("resourceVersion", ""))
        return [node_from(o) for o in items], rv

    def _get_raw(self, name: str) -> Node:
        resp: Any = self.api.read_node(name, _preload_content=False, _request_timeout=self._timeout)
        return node_from(orjson.loads(resp.data))

    def _patch_raw(self, name: str, body: dict[str, Any]) -> Node:
        self.patch_requests += 1
        resp: Any = self.api.patch_node(
            name, body, _content_type=_MERGE_PATCH, _preload_content=False,
            _request_timeout=self._timeout,
        )
        return node_from(orjson.loads(resp.data))

    def _review_raw(self, body: client.V1TokenReview) -> dict[str, Any]:
        if self._api_client is None:
            raise ClusterError("cluster is not started")
        resp: Any = client.AuthenticationV1Api(self._api_client).create_token_review(
            body, _preload_content=False, _request_timeout=self._timeout)
        data = orjson.loads(resp.data)
        return data if isinstance(data, dict) else {}

    def _pod_raw(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            resp: Any = self.api.read_namespaced_pod(name, namespace, _preload_content=False,
                                                     _request_timeout=self._timeout)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        data = orjson.loads(resp.data)
        return data if isinstance(data, dict) else {}

    # ---------------------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._api_client = await asyncio.to_thread(load_api_client, self.settings)
        self._api = client.CoreV1Api(self._api_client)
        nodes, self._rv = await self._retrying("list nodes", self._list_raw,
                                               str(self.base_selector))
        self._replace_all(nodes)
        self.ready.set()
        self._stop.clear()
        self._watch_thread = threading.Thread(target=self._watch_loop, name="k8s-watch",
                                              daemon=True)
        self._watch_thread.start()
        log.info("cluster_started", backend="kubernetes", nodes=len(self._cache))

    async def aclose(self) -> None:
        self._stop.set()
        resp = self._watch_resp
        if resp is not None:
            try:
                resp.shutdown()  # wakes the watch thread blocked in a read
            except Exception:  # best effort on an already closed socket
                log.debug("watch_shutdown_failed")
        if self._watch_thread is not None:
            await asyncio.to_thread(self._watch_thread.join, self.settings.api_timeout_s + 1)
            self._watch_thread = None
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._api_client is not None:
            await asyncio.to_thread(self._api_client.close)
            self._api_client = None

    # -------------------------------------------------------------------------------- watch
    def _watch_loop(self) -> None:
        """Follow node changes; relist when the resourceVersion is too old (410)."""
        rv = self._rv
        failures = 0
        selector = str(self.base_selector) or None
        while not self._stop.is_set():
            try:
                if rv is None:
                    nodes, rv = self._list_raw(selector or "")
                    self._replace_all_threadsafe(nodes)
                resp = self.api.list_node(
                    watch=True, label_selector=selector, resource_version=rv,
                    allow_watch_bookmarks=True, timeout_seconds=self.settings.watch_timeout_s,
                    _preload_content=False,
                    _request_timeout=(self.settings.api_timeout_s,
                                      self.settings.watch_timeout_s + self.settings.api_timeout_s),
                )
                self._watch_resp = resp
                rv = self._consume(resp, rv)
                failures = 0
            except ApiException as exc:
                if exc.status == 410:
                    rv = None
                    continue
                failures += 1
                log.warning("k8s_watch_failed", error=_describe(exc), failures=failures)
            except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
                if self._stop.is_set():
                    break
                failures += 1
                log.warning("k8s_watch_failed", error=_describe(exc), failures=failures)
            finally:
                self._watch_resp = None
            if failures:
                self._stop.wait(self._backoff(failures))

    def _consume(self, resp: Any, rv: str | None) -> str | None:
        """Apply the events of one watch response; the resourceVersion to resume from."""
        try:
            for line in _lines(resp):
                if self._stop.is_set():
                    break
                event = orjson.loads(line)
                kind = event.get("type")
                obj = event.get("object") or {}
                if kind == "ERROR":
                    # 410 Gone: our resourceVersion is too old; relist
                    log.info("k8s_watch_error", code=obj.get("code"), reason=obj.get("reason"))
                    return None
                new_rv = str((obj.get("metadata") or {}).get("resourceVersion", "")) or rv
                if kind == "BOOKMARK":
                    rv = new_rv
                    continue
                node = node_from(obj)
                if kind == "DELETED":
                    self._apply_threadsafe([], [node.name])
                elif kind in ("ADDED", "MODIFIED"):
                    self._apply_threadsafe([node])
                rv = new_rv
        finally:
            resp.release_conn()
        return rv

    # ------------------------------------------------------------------------------ reading
    async def list_nodes(self, selector: Selector | None = None) -> list[Node]:
        sel = self.base_selector.and_(selector or Selector(()))
        nodes, _ = await self._retrying("list nodes", self._list_raw, str(sel))
        return sorted(nodes, key=lambda n: n.name)

    async def _get(self, name: str) -> Node:
        return await self._retrying(f"read node {name}", self._get_raw, name)

    async def review_token(self, token: str, audiences: Sequence[str]) -> dict[str, Any]:
        """The ``status`` of a TokenReview of ``token`` for ``audiences``: ``authenticated``,
        ``user`` (``username``, ``extra``…), ``audiences``, ``error``. The answer's ``spec``
        echoes the token and is dropped here, so nothing downstream can log it."""
        body = client.V1TokenReview(
            api_version="authentication.k8s.io/v1", kind="TokenReview",
            spec=client.V1TokenReviewSpec(token=token, audiences=list(audiences)))
        data = await self._retrying("token review", self._review_raw, body)
        status = data.get("status")
        return status if isinstance(status, dict) else {}

    async def get_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The Pod object ``namespace/name``, None when there is none."""
        return await self._retrying(f"read pod {namespace}/{name}", self._pod_raw,
                                    namespace, name)

    # ------------------------------------------------------------------------------ writing
    async def patch_labels(
        self, name: str, patch: LabelPatch, *, expect: LabelPatch | None = None
    ) -> Node:
        self.check_write()
        validate_patch(patch)
        node = self._cache.get(name) or await self._get(name)
        attempt = 0
        while True:
            if node.satisfies(patch):
                self.observe([node])
                return node
            if expect is not None and not node.satisfies(expect):
                raise LabelPreconditionFailed(
                    f"node {name!r} labels changed: expected {dict(expect)}, "
                    f"found {dict((k, node.labels.get(k)) for k in expect)}"
                )
            outcome = await self._send_patch(name, node, patch, expect)
            if isinstance(outcome, Node):
                self.observe([outcome])
                return outcome
            attempt += 1
            await self._before_retry(name, attempt, outcome)
            # re-read before trying again: the failed attempt may have been applied
            node = await self._get(name)

    async def _send_patch(self, name: str, node: Node, patch: LabelPatch,
                          expect: LabelPatch | None) -> Node | BaseException:
        """One PATCH: the new node, or the error worth a retry (permanent ones raise)."""
        meta: dict[str, Any] = {"labels": dict(patch)}
        if expect is not None:
            meta["resourceVersion"] = node.resource_version
        try:
            return await self._run(self._patch_raw, name, {"metadata": meta})
        except ApiException as exc:
            if exc.status == 404:
                raise ClusterError(f"node {name!r} does not exist") from exc
            if not _retryable(exc):
                raise ClusterError(f"patching node {name!r}: {_describe(exc)}") from exc
            return exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            return exc  # the outcome is unknown: the re-read before the retry tells

    async def _before_retry(self, name: str, attempt: int, err: BaseException) -> None:
        """Give up after ``api_retries``; otherwise wait the backoff (a 409 retries at once)."""
        if attempt > self.settings.api_retries:
            raise ClusterError(
                f"patching node {name!r} failed after {attempt} attempts: {_describe(err)}"
            ) from err
        delay = 0.0 if isinstance(err, ApiException) and err.status == 409 else \
            self._backoff(attempt, err)
        log.warning("k8s_patch_retry", node=name, attempt=attempt, delay_s=round(delay, 3),
                    error=_describe(err))
        if delay:
            await asyncio.sleep(delay)

    async def patch_many(
        self, patches: Mapping[str, LabelPatch], *, expect: Mapping[str, LabelPatch] | None = None
    ) -> dict[str, Node | Any]:
        """Patch nodes concurrently (``api_concurrency`` at a time)."""
        self.check_write()
        names = list(patches)

        async def one(name: str) -> Node | ClusterError | LabelPreconditionFailed:
            try:
                return await self.patch_labels(name, patches[name],
                                               expect=(expect or {}).get(name))
            except (ClusterError, LabelPreconditionFailed) as exc:
                return exc

        results = await asyncio.gather(*(one(n) for n in names))
        return dict(zip(names, results, strict=True))
