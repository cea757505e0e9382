"""A forged or hostile desired state trying to send an agent, with its credentials, somewhere
else, and a hostile server trying to put its words into the node's state.

Model sync runs for real (real slots, real ONNX Runtime sessions) and takes desired messages as
the MQTT link would hand them over; the "hub" and the "elsewhere" are real HTTP servers on
loopback that record every request. Refused means: before any connection, so the server the
URL names receives no request at all (and no token, no certificate).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from edge_agent.config import (
    AgentSettings,
    EngineSettings,
    HubClientSettings,
    ModelSpec,
    ModelSyncSettings,
)
from edge_agent.contract.protocol import StateMessage
from edge_agent.modelsync.sync import ModelSync
from tests.support import fileserver
from tests.support import modelsync as ms
from tests.support.fileserver import FileServer
from tests.support.hub_client import write_secret

NODE = "n1"
SECRET_BODY = b"internal-db-password=hunter2 " + b"x" * 5000


@pytest.fixture
async def server() -> AsyncIterator[FileServer]:
    """The node's hub (its ``hub.url`` is this server's origin)."""
    async with fileserver.running() as s:
        yield s


@pytest.fixture
async def elsewhere() -> AsyncIterator[FileServer]:
    """A server the node must never contact."""
    async with fileserver.running() as s:
        yield s


class Node:
    """Model sync of one node whose hub is ``hub`` (None: no hub configured)."""

    def __init__(self, tmp: Path, hub: FileServer, hub_url: str | None) -> None:
        self.tmp, self.hub = tmp, hub
        self.v1 = ms.version_of(tmp / "art", "det", "1", anchors=64)
        self.v2 = ms.version_of(tmp / "art", "det", "2", anchors=65)
        hub.token = "node-token"
        self.states: list[StateMessage] = []
        self.settings = AgentSettings(
            node=NODE, engine=EngineSettings(providers=["cpu"], warmup_runs=1),
            models=[ModelSpec(name="det", manifest=self.v1.manifest_path)],
            hub=HubClientSettings(url=hub_url, cache_dir=tmp / "cache", retry_min_s=0.01,
                                  retry_max_s=0.05, download_retries=1,
                                  token_file=write_secret(tmp / "token", "node-token")),
            model_sync=ModelSyncSettings(probation_frames=5, probation_timeout_s=0.3),
        )
        self.sync = ModelSync(self.settings, publish_state=self.states.append)
        self.generation = 0
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Node:
        await self.sync.load_startup()
        self.task = asyncio.create_task(self.sync.run(), name="model-sync")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)

    def entry(self, url: str, manifest_url: str) -> dict[str, str]:
        self.hub.files["det-2.onnx"] = self.v2.onnx_bytes
        self.hub.files["det-2.json"] = self.v2.manifest_bytes
        return {"version": "2", "sha256": self.v2.sha256, "url": url,
                "manifest_url": manifest_url}

    async def desire(self, entry: dict[str, str]) -> Any:
        """Send one desired message and return the model's state once it was dealt with."""
        self.generation += 1
        self.sync.on_desired(f"edge/{NODE}/desired",
                             ms.desired(NODE, self.generation, {"det": entry}))
        await asyncio.wait_for(self.sync.idle.wait(), 10)
        return next(m for m in self.states[-1].models if m.name == "det")


def _off_origin(hub: FileServer, elsewhere: FileServer) -> list[tuple[str, str]]:
    """(artifact URL, manifest URL) pairs that leave the hub's origin in every way."""
    ours, theirs = hub.url("det-2.onnx"), elsewhere.url("det-2.onnx")
    return [
        (theirs, elsewhere.url("det-2.json")),  # another port on the same host
        (ours, elsewhere.url("det-2.json")),  # only the manifest elsewhere
        (theirs, hub.url("det-2.json")),  # only the artifact elsewhere
        # the hub's address as a user name in front of another host
        (f"http://127.0.0.1:{hub.port}@127.0.0.1:{elsewhere.port}/files/det-2.onnx",
         hub.url("det-2.json")),
        (ours.replace("http://", "https://"), hub.url("det-2.json")),  # another scheme
        (f"//127.0.0.1:{elsewhere.port}/files/det-2.onnx", hub.url("det-2.json")),
        (f"http://localhost:{hub.port}/files/det-2.onnx", hub.url("det-2.json")),  # name
        ("file:///etc/passwd", hub.url("det-2.json")),
    ]


async def test_urls_off_the_hubs_origin_are_refused_before_any_connection(
    tmp_path: Path, server: FileServer, elsewhere: FileServer,
) -> None:
    async with Node(tmp_path, server, server.base) as node:
        for url, manifest_url in _off_origin(server, elsewhere):
            st = await node.desire(node.entry(url, manifest_url))
            assert st.status == "failed" and st.version == "1", (url, st)
            assert "outside the configured hub" in (st.error or ""), st.error
        assert elsewhere.requests == [], "a server off the hub's origin was contacted"
        assert server.requests == [], "nothing is fetched at all from a refused message"
        # the same message on the hub's origin goes through, with the token
        st = await node.desire(node.entry(server.url("det-2.onnx"), "/files/det-2.json"))
        assert (st.status, st.version) == ("active", "2")
        assert {h.get("Authorization") for _, h in server.requests} == {"Bearer node-token"}


async def test_without_a_hub_no_desired_url_is_fetched(
    tmp_path: Path, server: FileServer,
) -> None:
    async with Node(tmp_path, server, None) as node:
        st = await node.desire(node.entry(server.url("det-2.onnx"), server.url("det-2.json")))
        assert st.status == "failed" and "no hub.url" in (st.error or "")
    assert server.requests == []


async def test_a_redirect_off_the_hub_is_not_followed(
    tmp_path: Path, server: FileServer, elsewhere: FileServer,
) -> None:
    async with Node(tmp_path, server, server.base) as node:
        server.redirect_to = elsewhere.url("det-2.json")
        st = await node.desire(node.entry(server.url("det-2.onnx"), server.url("det-2.json")))
        assert st.status == "failed" and "redirect" in (st.error or "")
    assert elsewhere.requests == []


async def test_a_foreign_error_body_never_reaches_the_state(
    tmp_path: Path, server: FileServer,
) -> None:
    async with Node(tmp_path, server, server.base) as node:
        server.error_body = SECRET_BODY
        entry = node.entry(server.url("missing.onnx"), server.url("missing.json"))
        with capture_logs() as logs:
            st = await node.desire(entry)
    assert st.status == "failed" and "HTTP 404" in (st.error or "")
    assert all(b"hunter2" not in s.model_dump_json().encode() for s in node.states)
    # the log keeps a bounded piece of it for whoever debugs the hub
    (event,) = [e for e in logs if e["event"] == "model_fetch_http_error"]
    assert event["status"] == 404 and len(event["body"]) <= 200
