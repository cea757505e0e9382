"""Candidates in shadow: a version loaded beside the active one, compared, never serving.

A rollout's shadow phase names a candidate in the desired message (``DesiredModel.shadow``).
It is fetched into the same cache, verified (sha256, signature when a key is configured) and
checked (``modelsync.check``) exactly like a version about to serve, and refused by the same
rules; then its session goes to the streaming side's ``ShadowRunner``, which feeds it a sample
of the frames the active version serves and scores their agreement. It never becomes active
here: a candidate that passes its shadow phase is switched in later by a desired message that
names it as the version (the cache still holds it, so that switch downloads nothing).

A desired message without a ``shadow`` for a model, or naming another candidate, unloads the
one running; a candidate that is (or becomes) the active version is unloaded too. A failing
candidate (download, digest, signature, load or checks) only reports ``shadow_status: failed``
with the reason; the active version serves on untouched, and a refused artifact leaves the cache.
An artifact refused for what it is (digest, signature, load, checks) is not tried again while
the desired state names it; one that could not be had (hub unreachable) is tried again with the
next desired generation.

The wanted candidates are persisted in the sync state, so a restarted agent (whose retained
desired message is not newer than what it applied) loads them again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import structlog

from edge_agent.config import AgentSettings
from edge_agent.contract.protocol import DesiredModel, ModelArtifact, ModelState
from edge_agent.errors import AgentError, ModelError, TemporaryError
from edge_agent.modelsync import targets
from edge_agent.modelsync.cache import ModelCache
from edge_agent.streaming.shadow import ShadowRunner
from edge_agent.streaming.slots import ServingModel

log = structlog.get_logger(__name__)

#: Loads, warms up and validates a version (manifest path, expected sha256); blocking.
Loader = Callable[[Path, "str | None"], ServingModel]


class ShadowSync:
    """Loads and unloads the candidates of model sync's desired state into a ``ShadowRunner``.

    ``ModelSync`` calls ``take`` and ``drop_unwanted`` before it switches active versions (frees
    memory first) and ``load_wanted`` after; ``with_fields`` adds a model's shadow part to its
    state.
    """

    def __init__(
        self,
        settings: AgentSettings,
        runner: ShadowRunner | None,
        *,
        cache: ModelCache,
        loader: Loader,
        changed: Callable[[], None],
        short: Callable[[BaseException | str], str],
    ) -> None:
        self.settings = settings
        self.runner = runner
        self.cache = cache
        self._loader = loader
        self._changed = changed
        self._short = short
        #: What the last applied desired message asked for, per model.
        self.wanted: dict[str, ModelArtifact] = {}
        #: Per model: (version, sha256) loaded, and (version, status, error) to report.
        self._loaded: dict[str, tuple[str, str]] = {}
        self._status: dict[str, tuple[str, str, str | None]] = {}
        #: The artifact that failed last per model (not tried again while it is the one named).
        self._failed: dict[str, tuple[str, str]] = {}

    # ----------------------------------------------------------------------------- state

    def fields(self, name: str) -> dict[str, Any]:
        """The shadow fields of ``ModelState`` for ``name`` (all None without a candidate)."""
        st = self._status.get(name)
        if st is None:
            return {"shadow_version": None, "shadow_status": None, "shadow_error": None}
        return {"shadow_version": st[0], "shadow_status": st[1], "shadow_error": st[2]}

    def with_fields(self, st: ModelState) -> ModelState:
        """``st`` with its model's shadow fields filled in."""
        extra = self.fields(st.name)
        return st if all(v is None for v in extra.values()) else st.model_copy(update=extra)

    def protected(self) -> set[tuple[str, str]]:
        """Candidate versions loaded or wanted: the cache must not prune them."""
        return ({(n, v) for n, (v, _) in self._loaded.items()}
                | {(n, a.version) for n, a in self.wanted.items()})

    def record(self) -> dict[str, Any]:
        """The wanted candidates for the persisted sync state."""
        return {n: a.model_dump() for n, a in sorted(self.wanted.items())}

    def restore(self, record: Mapping[str, Any]) -> None:
        """Want again the candidates a previous run persisted (``record``'s output)."""
        for name, data in record.items():
            try:
                self.wanted[name] = ModelArtifact.model_validate(data)
            except ValueError as exc:
                log.warning("shadow_record_unreadable", model=name, error=self._short(exc))

    def _set(self, name: str, version: str | None, status: str = "", error: str | None = None
             ) -> None:
        if version is None:
            self._status.pop(name, None)
        else:
            self._status[name] = (version, status, error)
        self._changed()

    # ------------------------------------------------------------------------ apply

    def take(self, models: Mapping[str, DesiredModel]) -> None:
        """Adopt the candidates a desired message names (applied by the next two calls)."""
        self.wanted = {n: dm.shadow for n, dm in models.items() if dm.shadow is not None}

    async def drop_unwanted(self, active: Callable[[str], str | None]) -> None:
        """Unload every candidate not wanted any more, or that is the active version now."""
        for name in sorted(set(self._loaded) | set(self._status)):
            want = self.wanted.get(name)
            loaded = self._loaded.get(name)
            if want is not None and (want.version, want.sha256) == loaded \
                    and active(name) != want.version:
                continue
            if want is not None and loaded is None and active(name) != want.version:
                continue  # not loaded (failed or pending): ``load_wanted`` decides
            await self._unload(name)

    async def load_wanted(
        self, active: Callable[[str], str | None], superseded: Callable[[], bool]
    ) -> bool:
        """Unload what is not wanted (``drop_unwanted``: a version switched in since may be a
        candidate), then load the wanted candidates not loaded yet; False when newer work
        interrupted it."""
        await self.drop_unwanted(active)
        for name, art in sorted(self.wanted.items()):
            if superseded():
                return False
            key = (art.version, art.sha256)
            if self._loaded.get(name) == key or self._failed.get(name) == key:
                continue
            if active(name) == art.version:
                continue  # the candidate serves already: nothing to compare it with
            if name in self._loaded:
                await self._unload(name)
            await self._load(name, art, active)
        return True

    async def _forget(self, name: str, version: str, active: Callable[[str], str | None]
                      ) -> None:
        """Drop a refused candidate from the cache, unless a model uses or keeps that version."""
        if active(name) == version:
            return
        try:
            if (name, version) in await asyncio.to_thread(self.cache.protected):
                return
            await asyncio.to_thread(self.cache.remove, name, version)
        except (OSError, ModelError) as exc:
            log.warning("model_cache_remove_failed", model=name, version=version,
                        error=self._short(exc))

    async def _load(self, name: str, art: ModelArtifact, active: Callable[[str], str | None]
                    ) -> None:
        self._set(name, art.version, "loading")
        t0 = time.monotonic()
        target = targets.Target(art.version, "hub", art.sha256,
                                desired=DesiredModel(**art.model_dump()))
        try:
            if self.runner is None:
                raise AgentError("this agent runs no streaming pipeline: no shadow possible")
            path, sha = await targets.materialize(
                name, target, cache=self.cache, hub_url=self.settings.hub.url,
                spec=None, protect=self.protected())
            box = [await asyncio.to_thread(self._loader, path, sha)]
        except Exception as exc:  # whatever the cause, the active version serves on
            reason = self._short(exc)
            if not isinstance(exc, AgentError):
                log.exception("shadow_load_crashed", model=name, version=art.version)
            log.warning("shadow_refused", model=name, version=art.version, reason=reason)
            if not isinstance(exc, TemporaryError):
                self._failed[name] = (art.version, art.sha256)
            self._set(name, art.version, "failed", reason)
            await self._forget(name, art.version, active)
            return
        self._failed.pop(name, None)
        self._loaded[name] = (art.version, art.sha256)
        old = [m for m in [self.runner.swap(name, box.pop())] if m is not None]
        log.info("shadow_loaded", model=name, version=art.version,
                 seconds=round(time.monotonic() - t0, 3))
        self._set(name, art.version, "active")
        await self.runner.retire(name, old, self.settings.model_sync.drain_timeout_s)

    async def _unload(self, name: str) -> None:
        loaded = self._loaded.pop(name, None)
        self._failed.pop(name, None)
        self._set(name, None)
        if self.runner is None or loaded is None:
            return
        old = [m for m in [self.runner.swap(name, None)] if m is not None]
        log.info("shadow_unloaded", model=name, version=loaded[0])
        await self.runner.retire(name, old, self.settings.model_sync.drain_timeout_s)
