"""Helpers for the hub's tests: a hub on a real loopback port (in-process or as an
``edge-hub serve`` subprocess), upload requests, and a snapshot of what the hub stored.

Every test hub serves HTTPS with a server certificate from a test CA (``tests.support.pki``)
and asks for client certificates from the same CA, as in production; ``TOKEN`` is its admin
token and ``READ_TOKEN`` its read-scope token. ``hub_session`` / ``client_ssl`` /
``requests_verify`` give test clients the CA (and, when asked, a node's certificate).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import io
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from hub.config import HubSettings, load_settings
from hub.server import app as server_app
from hub.server.app import build_app
from tests.support import children
from tests.support.broker import free_port, wait_port
from tests.support.pki import Identity, TestPki
from tests.support.postgres import storage_env, storage_for

TOKEN = "t0ken-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
READ_TOKEN = "r3ad-only-t0ken"
READ_AUTH = {"Authorization": f"Bearer {READ_TOKEN}"}
ROOT = Path(__file__).resolve().parents[2]


@functools.cache
def default_pki() -> TestPki:
    """The CA of test hubs and their clients: one per test process, removed at exit."""
    folder = Path(tempfile.mkdtemp(prefix="edge-test-hub-pki-"))
    atexit.register(shutil.rmtree, folder, True)
    return TestPki(folder)


def client_ssl(identity: Identity | None = None, pki: TestPki | None = None) -> ssl.SSLContext:
    """A TLS context that trusts the test CA and presents ``identity``'s certificate."""
    ctx = ssl.create_default_context(cafile=str((pki or default_pki()).ca_file))
    if identity is not None:
        ctx.load_cert_chain(identity.cert_file, identity.key_file)
    return ctx


def hub_session(identity: Identity | None = None, **kw: Any) -> aiohttp.ClientSession:
    """An aiohttp session for a test hub (its CA trusted, ``identity`` presented)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ssl(identity)), **kw)


def requests_verify() -> str:
    """``verify=`` for ``requests`` (and schemathesis) calls to a test hub."""
    return str(default_pki().ca_file)


def write_secret(path: Path, value: str) -> Path:
    """A secret file as a careful operator writes one: mode 0600 (the hub refuses others)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(value + "\n")
    path.chmod(0o600)
    return path


def tls_api(pki: TestPki | None = None) -> dict[str, str]:
    """The ``api`` settings of a hub serving HTTPS and asking for client certificates."""
    pki = pki or default_pki()
    server = pki.server()
    return {"tls_cert_file": str(server.cert_file), "tls_key_file": str(server.key_file),
            "client_ca_file": str(pki.ca_file)}


@dataclass
class InProcessHub:
    url: str
    settings: HubSettings
    app: web.Application

    @property
    def data_dir(self) -> Path:
        return self.settings.storage.data_dir


def hub_settings(data_dir: Path, *, storage: dict[str, Any] | None = None,
                 **api: Any) -> HubSettings:
    """Settings for a test hub: HTTPS with client certificates, admin token ``TOKEN``, read
    token ``READ_TOKEN`` (in a file beside ``data_dir``), port 0, data under ``data_dir``
    (``storage`` replaces the storage settings: a PostgreSQL database replicas share)."""
    read_file = write_secret(data_dir.parent / f"{data_dir.name}-read-token", READ_TOKEN)
    api_cfg = {"token": TOKEN, "port": 0, **tls_api(),
               "tokens": [{"file": str(read_file), "scope": "read", "name": "ci"}], **api}
    return load_settings(None, storage=storage or storage_for(data_dir), api=api_cfg)


@contextlib.asynccontextmanager
async def running_hub(settings: HubSettings, **components: Any) -> AsyncIterator[InProcessHub]:
    """The hub's app served on 127.0.0.1 on a free port, in this event loop, through the same
    guarded (TLS) listener ``edge-hub serve`` uses."""
    app = build_app(settings, **components)
    runner = web.AppRunner(app)
    await runner.setup()
    tls = server_app.ssl_context(settings)
    site = await server_app.listen(runner, "127.0.0.1", 0, tls)
    scheme = "https" if tls is not None else "http"
    try:
        yield InProcessHub(f"{scheme}://127.0.0.1:{site.port}", settings, app)
    finally:
        await runner.cleanup()


def upload_form(
    artifact: bytes | Path, manifest: bytes | Path, **fields: str
) -> aiohttp.MultipartWriter:
    """The multipart body of a push."""
    form = aiohttp.MultipartWriter("form-data")
    mbytes = manifest.read_bytes() if isinstance(manifest, Path) else manifest
    part = form.append(mbytes, {"Content-Type": "application/json"})
    part.set_content_disposition("form-data", name="manifest")
    for k, v in fields.items():
        form.append(v).set_content_disposition("form-data", name=k)
    abytes = artifact.read_bytes() if isinstance(artifact, Path) else artifact
    apart = form.append(io.BytesIO(abytes), {"Content-Type": "application/octet-stream"})
    apart.set_content_disposition("form-data", name="artifact", filename="model.onnx")
    return form


async def push(
    http: aiohttp.ClientSession, url: str, artifact: bytes | Path, manifest: bytes | Path,
    headers: dict[str, str] | None = None, **fields: str,
) -> tuple[int, Any]:
    """PUT a version (as admin unless ``headers`` say otherwise): (status, JSON body)."""
    async with http.put(url, data=upload_form(artifact, manifest, **fields),
                        headers=AUTH if headers is None else headers) as r:
        return r.status, await r.json()


def version_url(base_url: str, name: str = "tiny", version: str = "1", tail: str = "") -> str:
    """The registry URL of one version (``tail``: ``/artifact``, ``/manifest``)."""
    return f"{base_url}/v1/models/{name}/versions/{version}{tail}"


def stored_files(data_dir: Path) -> set[str]:
    """Every artifact and temporary file under the data folder (not the database)."""
    out: set[str] = set()
    for sub in ("artifacts", "tmp"):
        d = data_dir / sub
        if d.exists():
            out |= {str(p.relative_to(data_dir)) for p in d.rglob("*") if p.is_file()}
    return out


class HubProcess:
    """``edge-hub serve`` as a child process on a free port, serving HTTPS (``tls_api``), with
    the admin token in ``token_file`` and ``READ_TOKEN`` (through the environment)."""

    def __init__(self, data_dir: Path, token_file: Path, *extra: str,
                 env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.data_dir = data_dir
        self.log_path = data_dir.parent / f"hub-{self.port}.log"
        tls = tls_api()
        read_file = write_secret(data_dir.parent / f"read-token-{self.port}", READ_TOKEN)
        tokens = f'[{{"file": "{read_file}", "scope": "read", "name": "ci"}}]'
        self.argv = [
            sys.executable, "-m", "hub", "serve", "--host", "127.0.0.1",
            "--port", str(self.port), "--data-dir", str(data_dir),
            "--token-file", str(token_file), "--tls-cert-file", tls["tls_cert_file"],
            "--tls-key-file", tls["tls_key_file"], "--client-ca-file", tls["client_ca_file"],
            *extra,
        ]
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGE_HUB_API__TOKENS": tokens,
                    **storage_env(data_dir), **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> HubProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                     env=self.env, cwd=ROOT)
        log.close()
        deadline = time.monotonic() + 30
        while True:
            try:
                wait_port(self.port, timeout=0.2)
                return self
            except TimeoutError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("hub did not start:\n" + self.log_text()) from None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> int | None:
        return None if self.proc is None else children.stop(self.proc)


def cli_env(hub_url: str, token: str | None = TOKEN) -> dict[str, str]:
    """The environment an ``edge-hub`` CLI needs for a test hub: URL, token, the CA."""
    env = {"EDGE_HUB_URL": hub_url, "EDGE_HUB_CA_FILE": str(default_pki().ca_file)}
    if token is not None:
        env["EDGE_HUB_TOKEN"] = token
    return env


@contextlib.contextmanager
def hub_process(tmp_path: Path, *extra: str) -> Iterator[HubProcess]:
    """A running ``edge-hub serve`` with admin token ``TOKEN``, stopped afterwards."""
    token_file = write_secret(tmp_path / "token", TOKEN)
    hub = HubProcess(tmp_path / "data", token_file, *extra).start()
    try:
        yield hub
    finally:
        rc = hub.stop()
        assert rc == 0, f"hub exited with {rc}:\n{hub.log_text()[-3000:]}"
