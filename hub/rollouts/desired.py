"""Desired state out: node labels in, one retained ``desired`` message per node out.

A node's model labels (``edge.ai/model.<name>=<version>``) say what it should run, whoever set
them (a rollout, or an operator with ``kubectl label``). Whenever they change, the dispatcher
builds the node's desired message (every model assigned to it, each with version, sha256,
signature and the registry's artifact and manifest URLs) and, when it differs from the last one,
gives it the next ``generation`` (which only grows), writes it to the database first and then
publishes it retained with QoS 1. The broker's acknowledgement is recorded, so a hub that was
killed between the write and the publish sends exactly the unacknowledged ones again on start.
Nodes whose labels did not change get nothing: a restart or a wave never re-sends to bystanders.

A shadow label (``edge.ai/shadow.<name>=<version>``, set by a rollout's shadow phase) adds
``shadow`` (the candidate's version, sha256, signature and URLs) to that model's entry: the agent
runs it beside the assigned version and compares their answers. A shadow label on a node without
that model's label (nothing to compare with), naming the assigned version itself, or naming a
version the registry does not hold, is left out, logged and counted in ``shadows_ignored``.

One node never holds up the others: a node whose desired message cannot be decided (its agent
claims a generation at the top of the contract's range, [0, 2^53), or anything else fails for
it alone) is logged, counted in ``failed`` and left out of the batch, and the rest of the batch
is written and published as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

import orjson
import structlog

from edge_agent.contract import protocol
from edge_agent.contract.protocol import DesiredModel, model_from_label, shadow_from_label
from hub.cluster.base import Cluster, NodeEvent
from hub.errors import HubError
from hub.fleet.view import Fleet
from hub.rollouts.store import DesiredRow, RolloutStore
from hub.transport.mqtt import HubMqtt

log = structlog.get_logger(__name__)


class CatalogEntry(Protocol):
    """What the dispatcher needs of a registry version (``hub.registry.metadata.ModelVersion``)."""

    @property
    def sha256(self) -> str: ...
    @property
    def signature(self) -> str | None: ...


class Catalog(Protocol):
    """The registry as the rollout side sees it."""

    def get(self, name: str, version: str) -> Awaitable[CatalogEntry]: ...


def assigned_models(labels: dict[str, str] | Any, label_prefix: str) -> dict[str, str]:
    """``{model: version}`` from a node's labels."""
    out: dict[str, str] = {}
    for key, value in labels.items():
        model = model_from_label(key, label_prefix)
        if model is not None and protocol.is_valid_name(model):
            out[model] = value
    return out


def assigned_shadows(labels: dict[str, str] | Any, label_prefix: str) -> dict[str, str]:
    """``{model: candidate version}`` from a node's shadow labels."""
    out: dict[str, str] = {}
    for key, value in labels.items():
        model = shadow_from_label(key, label_prefix)
        if model is not None and protocol.is_valid_name(model):
            out[model] = value
    return out


def digest(models: dict[str, dict[str, Any]]) -> str:
    """A stable fingerprint of a desired model set."""
    return hashlib.sha256(orjson.dumps(models, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]


class Dispatcher:
    """Keeps every node's retained desired message in step with its labels.

    Two inputs, both handed to the link and the cluster by the composition root
    (``hub/server/control.py``): ``nodes_changed`` (label events, the one trigger of a sync)
    and ``acknowledged`` (the broker has a desired message).
    """

    def __init__(self, *, store: RolloutStore, cluster: Cluster, mqtt: HubMqtt, catalog: Catalog,
                 fleet: Fleet, public_url: str, label_prefix: str,
                 guard: Callable[[], None] | None = None) -> None:
        self.store = store
        #: Asked before every desired message goes out; raises to hold it (not the leader).
        self.guard = guard
        self.cluster = cluster
        self.mqtt = mqtt
        self.catalog = catalog
        self.fleet = fleet
        self.public_url = public_url.rstrip("/")
        self.label_prefix = label_prefix
        self.rows: dict[str, DesiredRow] = {}
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._acked: list[tuple[str, int]] = []
        self._flush_task: asyncio.Task[None] | None = None
        self._closed = False
        self.sent = 0
        self.unknown_versions = 0
        #: Nodes left out of a sync because their message could not be decided.
        self.failed = 0
        #: Shadow labels left out of a desired message (no model label, same or unknown version).
        self.shadows_ignored = 0

    # ---------------------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Load what was published before, catch up with the labels, re-send unacknowledged."""
        self._closed = False
        self.rows = await self.store.load_desired()
        self._dirty.clear()  # the catch-up below covers every node seen so far
        self._wake.clear()
        changed = await self._sync(list(self.cluster.nodes()))
        resend = [r for n, r in self.rows.items() if not r.published and n not in changed]
        for row in resend:
            self._publish(row)
        log.info("desired_started", nodes=len(self.rows), changed=len(changed),
                 resent=len(resend))
        self._task = asyncio.create_task(self._run(), name="desired-dispatch")

    async def aclose(self) -> None:
        """Stop syncing (a leader stepping down, or shutdown); ``start`` again to resume."""
        self._closed = True  # acknowledgements after this are re-sent on the next start
        for task in (self._task, self._flush_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._flush_task = None
        try:
            await self._flush()
        except HubError as exc:  # fenced: the next leader re-sends what was not recorded
            log.warning("desired_acks_not_recorded", error=str(exc)[:200])

    # ------------------------------------------------------------------------------- inputs
    def nodes_changed(self, events: Iterable[NodeEvent]) -> None:
        """Labels changed (a rollout's patch, ``kubectl label``, an inventory edit): the one
        trigger of a desired-state sync. The named nodes are synced soon, in one batch."""
        for e in events:
            if e.kind == "upsert":
                self._dirty.add(e.node.name)
        if self._dirty:
            self._wake.set()

    def acknowledged(self, token: Any) -> None:
        """The broker acknowledged the desired message ``token`` = (node, generation)."""
        if self._closed:
            return
        node, gen = token
        row = self.rows.get(node)
        if row is not None and row.generation == gen:
            row.published = True
        self._acked.append((node, gen))
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = asyncio.create_task(self._flush_soon(), name="desired-acks")

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            names, self._dirty = self._dirty, set()
            try:
                await self._sync(names)
            except Exception:
                log.exception("desired_sync_failed", nodes=len(names))
                self._dirty |= names
                await asyncio.sleep(1.0)
                self._wake.set()

    # --------------------------------------------------------------------------------- core
    async def _entries(self, pairs: set[tuple[str, str]]) -> dict[tuple[str, str], dict[str, Any]]:
        """Registry lookups for distinct (model, version) pairs; missing ones are absent."""

        async def one(model: str, version: str) -> tuple[tuple[str, str], dict[str, Any] | None]:
            try:
                v = await self.catalog.get(model, version)
            except HubError as exc:
                log.error("desired_unknown_version", model=model, version=version,
                          error=str(exc))
                return (model, version), None
            base = f"{self.public_url}/v1/models/{model}/versions/{version}"
            entry = DesiredModel(version=version, sha256=v.sha256, url=base + "/artifact",
                                 manifest_url=base + "/manifest", signature=v.signature)
            return (model, version), entry.model_dump(mode="json", exclude_none=True)

        found = await asyncio.gather(*(one(m, v) for m, v in sorted(pairs)))
        return {k: e for k, e in found if e is not None}

    async def _sync(self, names: Iterable[str]) -> dict[str, int]:
        """Bring the named nodes' desired messages in line with their labels.

        Returns ``{node: generation}`` for the nodes that got a new desired message.
        """
        async with self._lock:
            wanted: dict[str, dict[str, str]] = {}
            shadows: dict[str, dict[str, str]] = {}
            for name in names:
                node = self.cluster.get(name)
                if node is not None:
                    wanted[name] = assigned_models(node.labels, self.label_prefix)
                    shadows[name] = assigned_shadows(node.labels, self.label_prefix)
            pairs = {(m, v) for a in (*wanted.values(), *shadows.values()) for m, v in a.items()}
            entries = await self._entries(pairs)
            new_rows = [row for name, assigned in wanted.items()
                        if (row := self._decide_one(name, assigned, entries,
                                                    shadows[name])) is not None]
            if not new_rows:
                return {}
            # the database first: a generation once decided is never reused
            await self.store.save_desired(new_rows)
            for row in new_rows:
                self.rows[row.node] = row
                self._publish(row)
            log.info("desired_published", nodes=len(new_rows))
            return {r.node: r.generation for r in new_rows}

    def _decide_one(self, name: str, assigned: dict[str, str],
                    entries: dict[tuple[str, str], dict[str, Any]],
                    shadows: dict[str, str]) -> DesiredRow | None:
        """``_decide`` for one node, whose failure is that node's alone (logged, counted)."""
        try:
            return self._decide(name, assigned, entries, shadows)
        except Exception as exc:
            self.failed += 1
            log.error("desired_node_failed", node=name, error=str(exc)[:200],
                      failed_total=self.failed)
            return None

    def _decide(self, name: str, assigned: dict[str, str],
                entries: dict[tuple[str, str], dict[str, Any]],
                shadows: dict[str, str]) -> DesiredRow | None:
        """The node's next desired row, or None when it would say nothing new."""
        old = self.rows.get(name)
        models: dict[str, dict[str, Any]] = {}
        for model, version in assigned.items():
            entry = entries.get((model, version))
            if entry is None:
                # an unknown version (a typo in kubectl label): keep what it had
                self.unknown_versions += 1
                if old is not None and model in old.models:
                    # its shadow (if any) is decided from the labels below, like any other
                    models[model] = {k: v for k, v in old.models[model].items() if k != "shadow"}
                continue
            models[model] = entry
        self._add_shadows(name, models, entries, shadows)
        d = digest(models)
        if old is not None and old.digest == d:
            return None
        if old is None and not models:
            return None  # never assigned anything: nothing to say yet
        gen = max(old.generation if old else 0, self.fleet.generation(name)) + 1
        if gen >= protocol.MAX_GENERATION:
            # only the node itself can claim such a generation (its own retained state): it
            # cannot be sent anything newer, and nobody else is held up by it
            raise HubError(f"generation {gen} is beyond the contract's range [0, 2^53) "
                           "(the node's state claims an impossible applied generation)")
        return DesiredRow(name, gen, models, d, False)

    def _add_shadows(self, name: str, models: dict[str, dict[str, Any]],
                     entries: dict[tuple[str, str], dict[str, Any]],
                     shadows: dict[str, str]) -> None:
        """Put each shadow candidate into its model's entry (a copy: entries are shared)."""
        for model, version in shadows.items():
            entry = entries.get((model, version))
            current = models.get(model)
            if current is None or entry is None or current["version"] == version:
                self.shadows_ignored += 1
                reason = ("no model label" if current is None else
                          "unknown version" if entry is None else "same as assigned")
                log.warning("desired_shadow_ignored", node=name, model=model,
                            version=version[:80], reason=reason, total=self.shadows_ignored)
                continue
            models[model] = {**current, "shadow": entry}

    def _publish(self, row: DesiredRow) -> None:
        if self.guard is not None:
            self.guard()
        payload = protocol.encode_dict(
            {"v": protocol.PROTOCOL_VERSION, "node": row.node, "generation": row.generation,
             "models": row.models}
        )
        self.mqtt.publish_desired(row.node, payload, token=(row.node, row.generation))
        self.sent += 1

    async def _flush_soon(self) -> None:
        await asyncio.sleep(0.05)  # gather a burst of acknowledgements into one write
        await self._flush()

    async def _flush(self) -> None:
        acked, self._acked = self._acked, []
        if acked:
            await self.store.mark_published(acked)

    # ------------------------------------------------------------------------------ queries
    def desired(self, node: str) -> DesiredRow | None:
        """The last desired state decided for ``node``."""
        return self.rows.get(node)

    def shadow_generation(self, node: str, model: str, version: str) -> int | None:
        """The generation of ``node``'s latest desired message when it carries ``version`` of
        ``model`` as the shadow candidate (None when it does not)."""
        row = self.rows.get(node)
        if row is None or row.models.get(model, {}).get("shadow", {}).get("version") != version:
            return None
        return row.generation

    def all_published(self, names: Iterable[str]) -> bool:
        """Whether the broker acknowledged the latest desired message of every named node."""
        return all((r := self.rows.get(n)) is not None and r.published for n in names)
