"""Targets: which version a model should serve, and where that version's files come from.

A version arrives from the hub (a desired entry: fetched into the cache, its URLs checked to be
on the configured hub's origin before anything connects) or from the agent's config (a local
manifest, e.g. after a reload). Either way model sync needs a manifest path on disk and the
digest to expect before it loads anything; this module turns a ``Target`` into those, and
reads what a local manifest claims.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from edge_agent.config import ModelSpec
from edge_agent.contract.protocol import DesiredModel
from edge_agent.errors import ModelError
from edge_agent.modelsync import fetch
from edge_agent.modelsync.cache import ModelCache


@dataclass(frozen=True)
class Target:
    """A version to serve and where its files come from."""

    version: str
    source: Literal["hub", "config"]
    sha256: str | None = None
    desired: DesiredModel | None = None
    manifest: Path | None = None


def manifest_facts(path: Path) -> tuple[str | None, str | None]:
    """(version, sha256) a local manifest names, or (None, None) when unreadable (blocking)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return str(data["version"]), str(data["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return None, None


def check_origin(dm: DesiredModel, hub_url: str | None) -> DesiredModel:
    """Resolve relative URLs against the hub; refuse (``ModelError``) any URL off the hub's
    origin (scheme, host, port of ``hub.url``), and every URL when there is no hub.

    Artifacts come only from the configured hub, so a forged desired entry cannot make the
    agent connect, with its certificate or token, anywhere else: the refusal comes before
    any connection.
    """
    if hub_url is None:
        raise ModelError("no hub.url is configured: this agent takes no models from a hub")
    base = hub_url.rstrip("/")
    fixed = {k: base + u for k, u in (("url", dm.url), ("manifest_url", dm.manifest_url))
             if u.startswith("/") and not u.startswith("//")}
    dm = dm.model_copy(update=fixed) if fixed else dm
    for u in (dm.url, dm.manifest_url):
        if not fetch.same_origin(u, base):
            raise ModelError(f"URL {u[:120]} is outside the configured hub {base} "
                             "(another scheme, host or port): refused, nothing fetched")
    return dm


async def materialize(
    name: str,
    target: Target,
    *,
    cache: ModelCache,
    hub_url: str | None,
    spec: ModelSpec | None,
    protect: set[tuple[str, str]],
) -> tuple[Path, str | None]:
    """The manifest path to load ``target`` from and the sha256 to expect (None: the config's).

    A hub version that is byte for byte the config's own model (``spec``) loads from the
    config's file; any other is fetched into the cache (never evicting ``protect``).
    """
    if target.source == "config":
        assert target.manifest is not None
        return target.manifest, None
    dm = target.desired
    assert dm is not None
    dm = check_origin(dm, hub_url)
    if spec is not None:
        version, sha = await asyncio.to_thread(manifest_facts, spec.manifest)
        if (version, sha) == (dm.version, dm.sha256):
            return spec.manifest, dm.sha256  # the config's own file: nothing to download
    entry = await cache.fetch(name, dm, protect=protect)
    return entry.manifest_path, dm.sha256
