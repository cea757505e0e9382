"""Config reload: apply model and camera changes from the config file without a restart.

An operator edits the agent's config (a ConfigMap in K3s, a file on a bare box) and sends SIGHUP,
or just waits: the file is checked every ``model_sync.reload_poll_s``. The new file is validated
exactly like at startup; a bad one is refused with every error logged and nothing changes (the
running config stays, as a bad config must never start half-working). A good one is applied:

- a model whose manifest changed (another path, or another version/digest in the same file) goes
  through model sync's shadow load, validation and switch, like a hub version;
- a camera that was added starts, one that was removed stops, one whose settings changed is
  restarted (its other cameras keep streaming);
- changes to any other section (MQTT, outbox, HTTP, engine...) need a restart, which is logged
  with the section names.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import signal
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import structlog

from edge_agent.config import AgentSettings, CameraSettings, ConfigError, load_settings
from edge_agent.streaming.slots import ModelSlot

if TYPE_CHECKING:
    from edge_agent.modelsync.sync import ModelSync
    from edge_agent.streaming.pipeline import Pipeline

log = structlog.get_logger(__name__)

#: Sections a reload applies; a change anywhere else is logged as needing a restart.
APPLIED = frozenset({"models", "cameras"})


class ReloadTarget(Protocol):
    """What the reloader needs of the agent (``edge_agent.app.compose.Agent``)."""

    settings: AgentSettings
    slots: dict[str, ModelSlot]
    sync: ModelSync | None
    pipeline: Pipeline | None


def _file_digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _manifest_key(path: Path) -> tuple[str, str | None]:
    # what identifies a configured model version: the manifest's path and content
    return str(path), _file_digest(path)


class ConfigReloader:
    """Watches one config file; ``reload()`` applies it to a running agent."""

    def __init__(self, agent: ReloadTarget, path: Path | str) -> None:
        self.agent = agent
        self.path = Path(path)
        self._wake = asyncio.Event()
        self._digest: str | None = None
        self._models: dict[str, tuple[str, str | None]] = {}
        #: reloads, refused, unchanged, restart_required (tests and logs).
        self.counters: Counter[str] = Counter()
        self._lock = asyncio.Lock()
        #: Set once ``run`` has recorded the file the agent started with.
        self.primed = asyncio.Event()

    async def prime(self) -> None:
        """Remember the file and manifests the agent started with (call after startup)."""
        self._digest = await asyncio.to_thread(_file_digest, self.path)
        self._models = {
            m.name: await asyncio.to_thread(_manifest_key, m.manifest)
            for m in self.agent.settings.models
        }

    def trigger(self) -> None:
        """Reload soon (the SIGHUP handler)."""
        self._wake.set()

    def install_sighup(self) -> None:
        """Reload on SIGHUP (main thread only; a no-op where signals are unavailable)."""
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.trigger)

    async def run(self) -> None:
        """The ``config-reload`` task: reload on SIGHUP, or when the file's content changes."""
        await self.prime()
        self.primed.set()
        poll = self.agent.settings.model_sync.reload_poll_s
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), poll if poll > 0 else None)
            forced = self._wake.is_set()
            self._wake.clear()
            digest = await asyncio.to_thread(_file_digest, self.path)
            if forced or (digest is not None and digest != self._digest):
                await self.reload("sighup" if forced else "file_changed")

    async def reload(self, reason: str = "requested") -> bool:
        """Validate the file and apply it; False (nothing changed) when it is refused."""
        async with self._lock:
            return await self._reload(reason)

    async def _reload(self, reason: str) -> bool:
        digest = await asyncio.to_thread(_file_digest, self.path)
        try:
            new = await asyncio.to_thread(load_settings, self.path)
        except ConfigError as exc:
            self.counters["refused"] += 1
            self._digest = digest  # do not retry the same bad file every poll
            log.error("config_reload_refused", path=str(self.path), reason=reason,
                      errors=[f"{p}: {m} (got {v!r})" for p, m, v in exc.errors][:20])
            return False
        self._digest = digest
        cur = self.agent.settings
        restart = sorted(k for k in type(cur).model_fields
                         if k not in APPLIED and getattr(new, k) != getattr(cur, k))
        if restart:
            self.counters["restart_required"] += 1
            log.warning("config_reload_restart_required", sections=restart)
        models = await self._apply_models(new)
        cameras = await self._apply_cameras(new)
        self.counters["reloads"] += 1
        if not (models or cameras):
            self.counters["unchanged"] += 1
        log.info("config_reloaded", reason=reason, models=models, cameras=cameras)
        return True

    def _slot(self, name: str) -> ModelSlot:
        slot = self.agent.slots.get(name)
        if slot is None:
            slot = self.agent.slots[name] = ModelSlot(name)
            slot.bind_loop(asyncio.get_running_loop())
        return slot

    async def _apply_models(self, new: AgentSettings) -> list[str]:
        changed: list[str] = []
        keys: dict[str, tuple[str, str | None]] = {}
        for spec in new.models:
            key = keys[spec.name] = await asyncio.to_thread(_manifest_key, spec.manifest)
            if self._models.get(spec.name) == key:
                continue
            self._slot(spec.name)
            assert self.agent.sync is not None  # a reloader starts after the models loaded
            self.agent.sync.request_local(spec.name, spec.manifest)
            changed.append(spec.name)
        # model sync reads the config's models (startup choice, "is this the config's file")
        self.agent.settings.models = list(new.models)
        self._models = keys
        return changed

    async def _apply_cameras(self, new: AgentSettings) -> list[str]:
        pipeline = self.agent.pipeline
        old: dict[str, CameraSettings] = {c.name: c for c in self.agent.settings.cameras}
        want: dict[str, CameraSettings] = {c.name: c for c in new.cameras}
        stop = [n for n in old if n not in want or want[n] != old[n]]
        start = [n for n in want if n not in old or want[n] != old[n]]
        if pipeline is None:
            return []
        for name in stop:
            await pipeline.remove_camera(name)
        for name in start:
            self._slot(want[name].model)
            await pipeline.add_camera(want[name])
        self.agent.settings.cameras = list(new.cameras)
        return sorted(set(stop) | set(start))
