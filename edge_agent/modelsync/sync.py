"""Model sync: make the models this node serves follow the hub's desired state, safely.

The hub publishes, per node, a retained ``desired`` message: a generation number and, per model
name, a version with its sha256 and artifact URL. This module turns that into served models
without restarting the pod, dropping a stream or serving a bad model:

1. ``on_desired`` parses the message (malformed: logged, counted, ignored; a generation not
   newer than the last one seen: ignored) and hands the newest one to the ``model-sync`` task.
2. For each model whose version changes, the task fetches and verifies the artifact into the
   local cache (``modelcache``), loads it *next to* the running session in a worker thread,
   warms it up and validates it (``modelcheck``); any refusal leaves the old version serving and
   reports ``failed`` with the reason.
3. The switch is one assignment in the model's ``ModelSlot`` between frames (``modelsync.switch``).
   The previous session stays loaded during a short probation: if too many of the first
   inferences of the new version fail, the slot switches back on its own. Then the previous
   session is closed, once its last in-flight frame is done.
4. Every change is published in the retained ``state`` message (per model: serving version,
   ``loading``/``active``/``failed`` with the reason, the applied generation) and persisted in
   the cache's ``sync-state.json``, so a restart with hub and broker down serves the last good
   versions from the cache (``load_startup``).

A candidate named as ``shadow`` runs beside the active version and never serves
(``modelsync.shadow``); its status is part of the model's state.

Config reloads use the same path (``request_local``): a model whose manifest changed in the
config file is shadow-loaded, validated and switched in exactly like a hub version.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from edge_agent import __version__
from edge_agent.config import AgentSettings, ModelSpec
from edge_agent.contract.protocol import (
    DesiredMessage,
    ModelState,
    ProtocolError,
    StateMessage,
    decode_desired,
    desired_topic,
)
from edge_agent.errors import AgentError, ModelError
from edge_agent.modelsync import switch as switching
from edge_agent.modelsync import targets
from edge_agent.modelsync.cache import ModelCache
from edge_agent.modelsync.check import load_checked
from edge_agent.modelsync.shadow import ShadowSync
from edge_agent.streaming.shadow import ShadowRunner
from edge_agent.streaming.slots import ModelSlot, ServingModel

log = structlog.get_logger(__name__)

#: Longest error text put into ``state`` (the reason must fit a dashboard cell, not a log).
MAX_ERROR_CHARS = 300
#: Previous versions remembered per model in the sync state (the cache keeps the files).
MAX_PREVIOUS = 5

#: Loads, warms up and validates a version (manifest path, expected sha256); blocking.
Loader = Callable[[Path, "str | None"], ServingModel]
PublishState = Callable[[StateMessage], Any]


def _short(exc: BaseException | str) -> str:
    text = exc if isinstance(exc, str) else (str(exc) or type(exc).__name__)
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


class ModelSync:
    """Owns the model slots' contents after startup; see the module docstring."""

    def __init__(
        self,
        settings: AgentSettings,
        slots: dict[str, ModelSlot] | None = None,
        *,
        cache: ModelCache | None = None,
        publish_state: PublishState | None = None,
        loader: Loader | None = None,
        shadow: ShadowRunner | None = None,
    ) -> None:
        self.settings = settings
        self.slots: dict[str, ModelSlot] = slots if slots is not None else {}
        self.cache = cache or ModelCache(settings.hub, exposed_files=settings.secret_files)
        self.publish_cb = publish_state
        self._loader: Loader = loader or (
            lambda path, sha: load_checked(path, settings.engine, settings.model_sync, sha)
        )
        #: The persisted sync state (read by ``load_startup``).
        self._record: dict[str, Any] = {"models": {}}
        #: The desired generation applied last (persisted, so a restart ignores a repeat).
        self.generation = 0
        self._seen_generation = 0
        self._pending: DesiredMessage | None = None
        self._local: dict[str, targets.Target] = {}
        self._wake = asyncio.Event()
        self._status: dict[str, ModelState] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        #: desired_received/_malformed/_stale, swaps, refused, rollbacks, released,
        #: closed_while_referenced (tests, metrics, logs).
        self.counters: Counter[str] = Counter()
        self.idle = asyncio.Event()
        self.idle.set()
        self._bg: set[asyncio.Future[Any]] = set()
        #: Candidates in shadow (``modelsync.shadow``), run by ``shadow`` (None: refused).
        self.shadows = ShadowSync(settings, shadow, cache=self.cache, loader=self._loader,
                                  changed=self.publish_state, short=_short)

    # ------------------------------------------------------------------------------ startup

    def _config_specs(self) -> dict[str, ModelSpec]:
        return {m.name: m for m in self.settings.models}

    async def load_startup(self) -> dict[str, ModelSlot]:
        """Load every model into its slot: last good cached version, else the config's.

        The cached version wins unless the config's manifest for that model changed since it
        was recorded (an operator's edit is newer intent). A config model that loads from
        nowhere raises (the agent must not start half-working); a hub-only model is reported
        ``failed``.
        """
        self._loop = asyncio.get_running_loop()
        self._record = await asyncio.to_thread(self.cache.load_state)
        self._record.setdefault("models", {})
        self.shadows.restore(self._record.get("shadows", {}))
        self.generation = self._seen_generation = int(self._record.get("generation", 0))
        specs = self._config_specs()
        names = sorted(set(specs) | set(self._record["models"]))
        for name in names:
            rec = self._record["models"].get(name, {})
            spec = specs.get(name)
            candidates: list[targets.Target] = []
            cfg_version, cfg_sha = (None, None)
            if spec is not None:
                cfg_version, cfg_sha = await asyncio.to_thread(targets.manifest_facts,
                                                               spec.manifest)
            entry = await asyncio.to_thread(self.cache.last_good, name)
            if entry is not None and (spec is None or rec.get("config_sha256") == cfg_sha):
                candidates.append(targets.Target(entry.version, "hub", entry.sha256,
                                                 manifest=entry.manifest_path))
            if spec is not None:
                candidates.append(targets.Target(cfg_version or "?", "config",
                                                 manifest=spec.manifest))
            model, error = await self._load_first(name, candidates)
            slot = self.slots.get(name) or ModelSlot(name)
            slot.bind_loop(self._loop)
            slot.swap(model)
            self.slots[name] = slot
            if model is None:
                if spec is not None:
                    raise ModelError(f"model {name}: {error}")
                self._status[name] = ModelState(name=name, status="failed",
                                                target_version=rec.get("active"), error=error)
                continue
            self._status[name] = ModelState(name=name, version=model.version, status="active")
            if rec.get("status") == "failed" and rec.get("target_version") != model.version:
                # the last attempt before the restart failed: keep saying so
                self._status[name] = ModelState(
                    name=name, version=model.version, status="failed",
                    target_version=rec.get("target_version"), error=rec.get("error"))
        return self.slots

    async def _load_first(
        self, name: str, candidates: list[targets.Target]
    ) -> tuple[ServingModel | None, str | None]:
        error: str | None = "no model source (not in the config, not in the cache)"
        for t in candidates:
            assert t.manifest is not None
            try:
                model = await asyncio.to_thread(self._loader, t.manifest, t.sha256)
            except AgentError as exc:
                error = _short(exc)
                log.warning("model_startup_load_failed", model=name, version=t.version,
                            source=t.source, error=error)
                continue
            log.info("model_startup_loaded", model=name, version=model.version, source=t.source)
            return model, None
        return None, error

    # --------------------------------------------------------------------------- desired in

    def attach(self, link: Any) -> None:
        """Take desired state from, and publish state through, the agent's ``MqttLink``.

        Subscribes to this node's retained desired topic (the broker sends the retained message
        on every (re)subscribe; repeats are ignored by generation) and publishes the current
        state, which the link re-sends on every reconnect. Without ``hub.url`` the agent serves
        its configured models only and does not subscribe at all: a desired message could
        otherwise send it (and its credentials) to any URL it names.
        """
        self.publish_cb = link.publish_state
        if self.settings.hub.url is not None:
            link.subscribe(desired_topic(link.topic_prefix, self.settings.node),
                           self.on_desired, qos=1)
        else:
            log.info("desired_state_off", reason="no hub.url: serving the configured models")
        self.publish_state()

    def on_desired(self, topic: str, payload: bytes) -> None:
        """MQTT callback for the retained desired topic (event loop or client thread)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is not loop:
                loop.call_soon_threadsafe(self._take_desired, topic, bytes(payload))
                return
        self._take_desired(topic, bytes(payload))

    def _take_desired(self, topic: str, payload: bytes) -> None:
        self.counters["desired_received"] += 1
        try:
            msg = decode_desired(payload)
            if msg.node != self.settings.node:
                raise ProtocolError(f"desired state is for node {msg.node!r}")
        except ProtocolError as exc:
            self.counters["desired_malformed"] += 1
            log.warning("desired_malformed", topic=topic, error=_short(exc), bytes=len(payload),
                        total=self.counters["desired_malformed"])
            return
        if msg.generation <= self._seen_generation:
            self.counters["desired_stale"] += 1
            log.info("desired_ignored", generation=msg.generation,
                     applied=self.generation, seen=self._seen_generation)
            return
        self._seen_generation = msg.generation
        self._pending = msg
        self.idle.clear()
        self._wake.set()
        log.info("desired_received", generation=msg.generation, models=sorted(msg.models))

    def request_local(self, name: str, manifest: Path) -> None:
        """Serve ``name`` from a local manifest (a config reload); applied by the task."""
        self._local[name] = targets.Target("?", "config", manifest=manifest)
        self.idle.clear()
        self._wake.set()

    # ---------------------------------------------------------------------------- the task

    async def run(self) -> None:
        """The ``model-sync`` task: apply config changes and the newest desired state."""
        self._loop = asyncio.get_running_loop()
        for slot in self.slots.values():
            slot.bind_loop(self._loop)
        if self.shadows.wanted:  # wanted before a restart (the retained desired is not newer)
            self.idle.clear()
            await self.shadows.load_wanted(self._active_version,
                                           lambda: self._pending is not None)
        while True:
            if not (self._local or self._pending):
                self.idle.set()
                await self._wake.wait()
            self._wake.clear()
            while self._local:
                name, target = self._local.popitem()
                await self._apply_one(name, target)
            msg, self._pending = self._pending, None
            if msg is not None:
                await self._apply_desired(msg)

    async def _apply_desired(self, msg: DesiredMessage) -> None:
        self.shadows.take(msg.models)
        await self.shadows.drop_unwanted(self._active_version)  # frees memory first
        for name, dm in sorted(msg.models.items()):
            if self._pending is not None:
                log.info("desired_superseded", generation=msg.generation,
                         by=self._pending.generation)
                return  # a newer generation arrived: apply that one instead
            if self._serving(name) == (dm.version, dm.sha256):
                st = self._status.get(name)
                if st is not None and st.status != "active":  # e.g. rolled back to this one
                    self._set_status(ModelState(name=name, version=dm.version, status="active"))
                continue
            await self._apply_one(name, targets.Target(dm.version, "hub", dm.sha256,
                                                       desired=dm))
        if not await self.shadows.load_wanted(self._active_version,
                                              lambda: self._pending is not None):
            return
        self.generation = msg.generation
        self._record["generation"] = msg.generation
        self._record["shadows"] = self.shadows.record()
        await self._save()
        self.publish_state()
        log.info("desired_applied", generation=msg.generation)

    def _active_version(self, name: str) -> str | None:
        slot = self.slots.get(name)
        return None if slot is None else slot.version

    def _serving(self, name: str) -> tuple[str, str] | None:
        # (version, sha256) serving now; no reference to the model outlives this call, so a
        # caller awaiting afterwards cannot keep a replaced session alive
        slot = self.slots.get(name)
        model = slot.model if slot is not None else None
        return None if model is None else (str(model.version), str(model.sha256))

    async def _apply_one(self, name: str, target: targets.Target) -> None:
        assert self._loop is not None
        slot = self.slots.get(name)
        if slot is None:
            slot = self.slots[name] = ModelSlot(name)
            slot.bind_loop(self._loop)
        serving = slot.version
        if target.source == "config" and target.manifest is not None:
            version, _ = await asyncio.to_thread(targets.manifest_facts, target.manifest)
            target = dataclasses.replace(target, version=version or "?")
        self._set_status(ModelState(name=name, version=serving, status="loading",
                                    target_version=target.version))
        t0 = time.monotonic()
        try:
            path, sha = await targets.materialize(
                name, target, cache=self.cache, hub_url=self.settings.hub.url,
                spec=self._config_specs().get(name), protect=self._protected())
            new = await asyncio.to_thread(self._loader, path, sha)
        except Exception as exc:  # whatever the cause, the old version serves on
            self.counters["refused"] += 1
            reason = _short(exc)
            if not isinstance(exc, AgentError):
                log.exception("model_load_crashed", model=name, version=target.version)
            log.warning("model_refused", model=name, version=target.version, reason=reason,
                        serving=serving)
            self._set_status(ModelState(name=name, version=serving, status="failed",
                                        target_version=target.version, error=reason))
            await self._save_status(name)
            await self._forget(name, target)
            return
        log.info("model_ready", model=name, version=new.version,
                 seconds=round(time.monotonic() - t0, 3))
        box = [new]
        del new
        retired = await self._switch(name, slot, box, target)
        await self._retire(slot, retired)
        if self._status[name].status == "failed":  # switched back during probation
            await self._forget(name, target)

    async def _forget(self, name: str, target: targets.Target) -> None:
        """Drop a refused hub version from the cache (unless it is serving or protected)."""
        if target.source != "hub" or (name, target.version) in self._protected():
            return
        if (name, target.version) in self.cache.protected():
            return
        try:
            await asyncio.to_thread(self.cache.remove, name, target.version)
        except (OSError, ModelError) as exc:
            log.warning("model_cache_remove_failed", model=name, version=target.version,
                        error=_short(exc))

    def _protected(self) -> set[tuple[str, str]]:
        return ({(n, s.version) for n, s in self.slots.items() if s.version is not None}
                | self.shadows.protected())

    async def _switch(
        self, name: str, slot: ModelSlot, box: list[ServingModel], target: targets.Target
    ) -> list[ServingModel]:
        """Switch ``box[0]`` in, await its probation; return a box with the model to retire.

        Models travel in one-element lists so that no local variable keeps a replaced session
        alive after this returns (``_retire`` waits for the last reference to go).
        """
        assert self._loop is not None
        cfg = self.settings.model_sync
        sw = switching.Switch(slot, box, cfg, self._loop)
        self.counters["swaps"] += 1
        log.info("model_switched", model=name, version=sw.version, previous=sw.previous,
                 source=target.source)
        self._set_status(ModelState(name=name, version=sw.version, status="active"))
        verdict = await sw.verdict(self._wake)
        if not verdict.passed:
            self.counters["rollbacks"] += 1
            reason = _short(f"switched back after {cfg.probation_failures} failed "
                            f"inferences: {verdict.detail}")
            log.warning("model_rolled_back", model=name, version=sw.version, to=sw.previous,
                        reason=reason)
            self._set_status(ModelState(name=name, version=sw.previous, status="failed",
                                        target_version=sw.version, error=reason))
            await self._save_status(name)
            return sw.roll_back()
        await self._remember_active(name, sw.version, sw.sha256, sw.previous, target)
        return sw.keep()

    async def _retire(self, slot: ModelSlot, box: list[ServingModel]) -> None:
        outcome = await slot.retire(box, self.settings.model_sync.drain_timeout_s)
        if outcome is not None:
            self.counters[outcome] += 1

    # ------------------------------------------------------------------------- persistence

    async def _remember_active(
        self, name: str, version: str, sha256: str, old_version: str | None,
        target: targets.Target,
    ) -> None:
        rec = self._record["models"].setdefault(name, {})
        spec = self._config_specs().get(name)
        cfg_sha = None
        if spec is not None:
            cfg_sha = (await asyncio.to_thread(targets.manifest_facts, spec.manifest))[1]
        previous = [v for v in rec.get("previous", []) if v != version]
        if old_version is not None and old_version != version:
            previous = [old_version, *[v for v in previous if v != old_version]]
        rec.update(
            active=version, active_sha256=sha256, active_source=target.source,
            config_sha256=cfg_sha, previous=previous[:MAX_PREVIOUS], status="active",
            target_version=None, error=None,
        )
        entry = None
        if target.source == "hub":
            entry = await asyncio.to_thread(self.cache.get, name, version, sha256)
        await self._save()
        if entry is not None:
            await asyncio.to_thread(self.cache.touch, entry)
        await asyncio.to_thread(self.cache.prune, self._protected())

    async def _save_status(self, name: str) -> None:
        st = self._status[name]
        rec = self._record["models"].setdefault(name, {})
        rec.update(status=st.status, target_version=st.target_version, error=st.error)
        await self._save()

    async def _save(self) -> None:
        snapshot = json.loads(json.dumps(self._record))
        try:
            await asyncio.to_thread(self.cache.save_state, snapshot)
        except OSError as exc:
            log.error("model_sync_state_not_saved", error=str(exc))

    # ---------------------------------------------------------------------------- state out

    def _set_status(self, st: ModelState) -> None:
        self._status[st.name] = st
        self.publish_state()

    def model_states(self) -> list[ModelState]:
        """Per model: serving version and status, for ``state`` and ``/v1/models``.

        A slot with nothing loaded and no attempt yet (a camera's model that only the hub can
        provide) is ``loading``: it waits for a desired version.
        """
        return [self.shadows.with_fields(self._status.get(n, ModelState(
            name=n, version=s.version, status="active" if s.version else "loading")))
            for n, s in sorted(self.slots.items())]

    def providers(self) -> list[str]:
        """Execution providers in use by the loaded models (first seen first)."""
        out: list[str] = []
        for slot in self.slots.values():
            for p in getattr(slot.model, "providers", None) or []:
                if p not in out:
                    out.append(p)
        return out

    def state_message(self) -> StateMessage:
        """The node's retained state as model sync sees it."""
        return StateMessage(
            node=self.settings.node, online=True, ts=time.time(), generation=self.generation,
            agent_version=__version__, providers=self.providers(), models=self.model_states(),
        )

    def publish_state(self) -> None:
        """Hand the current state to the MQTT link (retained; a no-op without a link)."""
        if self.publish_cb is None:
            return
        try:
            res = self.publish_cb(self.state_message())
            if inspect.isawaitable(res):
                task = asyncio.ensure_future(res)
                self._bg.add(task)
                task.add_done_callback(self._bg.discard)
        except Exception as exc:  # a broken link must not stop model sync
            log.warning("state_publish_failed", error=_short(exc))
