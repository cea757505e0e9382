"""Where the camera nodes and their labels come from, and where model assignments are written.

The hub is the only component that talks to the Kubernetes API. Node labels are the source of
truth for which model version each node should run (one label per model name, value = version,
so ``kubectl get nodes -L edge.ai/model.det`` shows the fleet), and a change made by hand with
``kubectl label`` is picked up like one made by a rollout. Two backends implement ``Cluster``:

* ``KubernetesCluster`` (``hub/cluster/kubernetes.py``): the real ``kubernetes`` client, list +
  watch + label patches with retries, every call in a worker thread;
* ``StaticCluster`` (here): a YAML inventory file for sites without Kubernetes; the hub rewrites
  it atomically when it assigns a version, and picks up edits made by hand by polling it.

Both keep an in-memory cache of the nodes they see (restricted to the camera nodes when
``cluster.camera_nodes_only``) and tell the ``on_change`` callback they were built with about
changes in batches, on the event loop.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import structlog
import yaml

from edge_agent.contract.protocol import camera_node_label, is_valid_node
from hub.cluster.selectors import Selector, SelectorError, equals, validate_key, validate_value
from hub.config import ClusterSettings
from hub.errors import Conflict, HubError

log = structlog.get_logger(__name__)

#: Label changes: a value sets the label, None removes it.
LabelPatch = Mapping[str, str | None]


class ClusterError(HubError, code="cluster_error", http_status=503):
    """The cluster backend failed (API unreachable after retries, unreadable inventory)."""


class LabelPreconditionFailed(Conflict, code="label_conflict"):
    """A compare-and-set label patch found the node changed by someone else."""


@dataclass(frozen=True)
class Node:
    """A node as the hub sees it: its name, labels and the backend's change marker."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    resource_version: str = ""

    def satisfies(self, patch: LabelPatch) -> bool:
        """True when applying ``patch`` would change nothing."""
        return all(self.labels.get(k) == v for k, v in patch.items())


@dataclass(frozen=True)
class NodeEvent:
    """A node appeared/changed (``upsert``) or disappeared from the hub's view (``delete``)."""

    kind: Literal["upsert", "delete"]
    node: Node


Listener = Callable[[list[NodeEvent]], None]


def _older(rv: str, than: str) -> bool:
    """Whether resourceVersion ``rv`` predates ``than``. Kubernetes calls them opaque, but
    they are etcd revisions (integers) in every real cluster; anything else is never older."""
    return rv.isdigit() and than.isdigit() and int(rv) < int(than)


def validate_patch(patch: LabelPatch) -> None:
    """Refuse label keys or values Kubernetes would reject, before any request is made."""
    for k, v in patch.items():
        try:
            validate_key(k)
            if v is not None:
                validate_value(v)
        except SelectorError as exc:
            raise ClusterError(str(exc)) from exc


class Cluster(abc.ABC):
    """The interface the rollouts, the desired-state dispatcher and the control plane use."""

    def __init__(self, settings: ClusterSettings, *, on_change: Listener | None = None) -> None:
        self.settings = settings
        #: Every node outside this selector is invisible to the hub.
        self.base_selector = (
            equals({camera_node_label(settings.label_prefix): "true"})
            if settings.camera_nodes_only
            else Selector(())
        )
        self._cache: dict[str, Node] = {}
        #: Told about changes in batches, on the event loop (the desired-state dispatcher).
        self._on_change = on_change
        self._loop: asyncio.AbstractEventLoop | None = None
        self.ready = asyncio.Event()
        #: Asked before every label write; raises to refuse it (a hub that is not the leader
        #: among replicas must not patch, ``hub.storage.leader``). None: always allowed.
        self.write_guard: Callable[[], None] | None = None

    # ---------------------------------------------------------------------------- lifecycle
    @abc.abstractmethod
    async def start(self) -> None:
        """Load every node, then follow changes in the background."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Stop following changes and release connections."""

    async def __aenter__(self) -> Cluster:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------------------ reading
    def nodes(self) -> dict[str, Node]:
        """A snapshot of the cache (safe to iterate while the cache changes)."""
        return dict(self._cache)

    def get(self, name: str) -> Node | None:
        """The cached node, or None."""
        return self._cache.get(name)

    def select(self, selector: Selector) -> list[Node]:
        """Cached nodes matching ``selector``, sorted by name."""
        return sorted(
            (n for n in list(self._cache.values()) if selector.matches(n.labels)),
            key=lambda n: n.name,
        )

    # ------------------------------------------------------------------------------ writing
    def check_write(self) -> None:
        """Raise what ``write_guard`` raises when a label write is not allowed now."""
        if self.write_guard is not None:
            self.write_guard()

    @abc.abstractmethod
    async def patch_labels(
        self, name: str, patch: LabelPatch, *, expect: LabelPatch | None = None
    ) -> Node:
        """Apply ``patch`` to one node's labels (idempotent: nothing is sent when it holds).

        ``expect`` makes it a compare-and-set: when the node's labels do not hold ``expect``
        (and the patch is not already applied) ``LabelPreconditionFailed`` is raised.
        """

    async def patch_many(
        self, patches: Mapping[str, LabelPatch], *, expect: Mapping[str, LabelPatch] | None = None
    ) -> dict[str, Node | HubError]:
        """Patch many nodes; each result is the new node or the error for that node."""
        self.check_write()
        out: dict[str, Node | HubError] = {}
        for name, patch in patches.items():
            try:
                out[name] = await self.patch_labels(
                    name, patch, expect=(expect or {}).get(name)
                )
            except HubError as exc:
                out[name] = exc
        return out

    # ------------------------------------------------------------------------------ helpers
    def observe(self, nodes: Iterable[Node], deleted: Iterable[str] = ()) -> None:
        """Take in nodes as the backend saw them (a watch event, a relist, a patch's answer)
        and tell ``on_change`` about real changes. Loop thread only.

        A node older than the cached one (by resourceVersion) is ignored: a late watch event
        must not undo what a patch's answer already told us.
        """
        events = [e for node in nodes if (e := self._take(node)) is not None]
        for name in deleted:
            gone = self._cache.pop(name, None)
            if gone is not None:
                events.append(NodeEvent("delete", gone))
        if events and self._on_change is not None:
            try:
                self._on_change(events)
            except Exception:
                log.exception("cluster_listener_failed")

    def _take(self, node: Node) -> NodeEvent | None:
        """Cache ``node``; the event it makes (None when nothing the hub sees changed)."""
        if not self.base_selector.matches(node.labels):
            gone = self._cache.pop(node.name, None)
            return NodeEvent("delete", node) if gone is not None else None
        old = self._cache.get(node.name)
        if old is not None and _older(node.resource_version, old.resource_version):
            # a watch event or relist older than what a patch response already told us:
            # taking it would briefly undo our own change (and send the old version again)
            return None
        self._cache[node.name] = node
        if old is None or dict(old.labels) != dict(node.labels):
            return NodeEvent("upsert", node)
        return None

    def _apply_threadsafe(self, nodes: list[Node], deleted: list[str] | None = None) -> None:
        """``observe`` from a worker thread."""
        if self._loop is None or self._loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # loop closing
            self._loop.call_soon_threadsafe(self.observe, nodes, deleted or [])

    def _replace_all_threadsafe(self, nodes: list[Node]) -> None:
        """``_replace_all`` from a worker thread (after a relist)."""
        if self._loop is None or self._loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._replace_all, nodes)

    def _replace_all(self, nodes: list[Node]) -> None:
        """Make the cache exactly ``nodes`` (after a relist), with events for differences."""
        present = {n.name for n in nodes}
        self.observe(nodes, [n for n in list(self._cache) if n not in present])


# ------------------------------------------------------------------------------ static backend


def load_inventory(path: Path) -> dict[str, dict[str, str]]:
    """Read an inventory YAML (``nodes: [{name, labels}]``); raise ClusterError when invalid."""
    try:
        data: Any = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ClusterError(f"cannot read inventory {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ClusterError(f"inventory {path} is not valid YAML: {exc}") from exc
    items = data.get("nodes", []) if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise ClusterError(f"inventory {path}: expected 'nodes:' with a list of nodes")
    out: dict[str, dict[str, str]] = {}
    for i, item in enumerate(items):
        where = f"inventory {path}: nodes[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ClusterError(f"{where}: each node needs a 'name' string")
        name = item["name"]
        if not is_valid_node(name):
            raise ClusterError(f"{where}: invalid node name {name!r}")
        if name in out:
            raise ClusterError(f"{where}: node {name!r} is listed twice")
        labels = item.get("labels") or {}
        if not isinstance(labels, dict):
            raise ClusterError(f"{where}: 'labels' must be a mapping")
        clean = {str(k): "" if v is None else str(v) for k, v in labels.items()}
        try:
            validate_patch(clean)
        except ClusterError as exc:
            raise ClusterError(f"{where}: {exc}") from exc
        out[name] = clean
    return out


def write_inventory(path: Path, nodes: Mapping[str, Mapping[str, str]]) -> None:
    """Write the inventory atomically (temp file + rename), so a reader never sees half."""
    body = {"nodes": [{"name": n, "labels": dict(sorted(nodes[n].items()))} for n in sorted(nodes)]}
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump(body, f, sort_keys=False, default_flow_style=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class StaticCluster(Cluster):
    """Nodes and labels from a YAML file; label patches rewrite it."""

    def __init__(self, settings: ClusterSettings, *, on_change: Listener | None = None) -> None:
        super().__init__(settings, on_change=on_change)
        #: None: no inventory configured, so no nodes (the registry still works; rollouts
        #: refuse with "matches no camera nodes").
        self.path = Path(settings.inventory_file) if settings.inventory_file else None
        self._lock = threading.Lock()  # serializes read-modify-write of the file
        self._rv = 0
        self._stamp: tuple[int, int, int] | None = None
        self._task: asyncio.Task[None] | None = None
        #: Polls that found the file unreadable or invalid (the last good view was kept).
        self.invalid_reads = 0

    def _stat(self) -> tuple[int, int, int] | None:
        if self.path is None:
            return None
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _load(self) -> dict[str, dict[str, str]]:
        return load_inventory(self.path) if self.path is not None else {}

    def _read(self) -> list[Node]:
        with self._lock:
            stamp = self._stat()
            raw = self._load()
            self._stamp = stamp
            self._rv += 1
            return [Node(n, labels, str(self._rv)) for n, labels in raw.items()]

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        nodes = await asyncio.to_thread(self._read)
        self._replace_all(nodes)
        self.ready.set()
        if self.path is None:
            log.warning("inventory_missing", effect="no nodes; set cluster.inventory_file")
            return
        self._task = asyncio.create_task(self._poll(), name="cluster-static-poll")
        log.info("cluster_started", backend="static", nodes=len(self._cache), path=str(self.path))

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _poll(self) -> None:
        """Pick up edits made by hand: reload whenever the file's stamp changes."""
        while True:
            await asyncio.sleep(self.settings.inventory_poll_s)
            try:
                if await asyncio.to_thread(self._stat) == self._stamp:
                    continue
                nodes = await asyncio.to_thread(self._read)
            except ClusterError as exc:
                # a half-edited file: keep the last good view and say so
                self.invalid_reads += 1
                log.warning("inventory_invalid", error=str(exc))
                continue
            self._replace_all(nodes)

    async def list_nodes(self, selector: Selector | None = None) -> list[Node]:
        """Fresh from the file (also refreshes the cache)."""
        nodes = await asyncio.to_thread(self._read)
        self._replace_all(nodes)
        sel = self.base_selector.and_(selector or Selector(()))
        return sorted((n for n in nodes if sel.matches(n.labels)), key=lambda n: n.name)

    def _write_patches(
        self, patches: Mapping[str, LabelPatch], expect: Mapping[str, LabelPatch]
    ) -> tuple[list[Node], dict[str, HubError]]:
        with self._lock:
            raw = self._load()
            changed: list[Node] = []
            errors: dict[str, HubError] = {}
            dirty = False
            self._rv += 1
            for name, patch in patches.items():
                labels = raw.get(name)
                if labels is None:
                    errors[name] = ClusterError(f"node {name!r} is not in the inventory")
                    continue
                node = Node(name, labels)
                if node.satisfies(patch):
                    changed.append(Node(name, dict(labels), str(self._rv)))
                    continue
                want = expect.get(name)
                if want is not None and not node.satisfies(want):
                    errors[name] = LabelPreconditionFailed(
                        f"node {name!r} labels changed: expected {dict(want)}"
                    )
                    continue
                for k, v in patch.items():
                    if v is None:
                        labels.pop(k, None)
                    else:
                        labels[k] = v
                dirty = True
                changed.append(Node(name, dict(labels), str(self._rv)))
            if dirty and self.path is not None:
                write_inventory(self.path, raw)
            self._stamp = self._stat()
            return changed, errors

    async def patch_labels(
        self, name: str, patch: LabelPatch, *, expect: LabelPatch | None = None
    ) -> Node:
        result = await self.patch_many({name: patch}, expect={name: expect} if expect else None)
        got = result[name]
        if isinstance(got, HubError):
            raise got
        return got

    async def patch_many(
        self, patches: Mapping[str, LabelPatch], *, expect: Mapping[str, LabelPatch] | None = None
    ) -> dict[str, Node | HubError]:
        """All patches in one rewrite of the file (a wave of 5,000 nodes is one write)."""
        self.check_write()
        for p in patches.values():
            validate_patch(p)
        nodes, errors = await asyncio.to_thread(self._write_patches, patches, expect or {})
        self.observe(nodes)
        out: dict[str, Node | HubError] = {n.name: n for n in nodes}
        out.update(errors)
        return out
