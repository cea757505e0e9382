"""Shared fixtures: the test CA, a real Mosquitto broker with TLS and the production ACL,
unique topic prefixes, generated models."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from tests.support.broker import Broker
from tests.support.hub_client import default_pki
from tests.support.pki import TestPki
from tests.support.postgres import PostgresServer, shared_server

ROOT = Path(__file__).resolve().parent.parent
#: Where models/build.py writes real and generated models (git-ignored).
MODELS_OUT = ROOT / "models" / "out"


@pytest.fixture(autouse=True, scope="session")
def _structlog_never_caches() -> Iterator[None]:
    """CLI verbs run in-process configure structlog; loggers must not stay cached past that.

    ``configure_logging`` caches loggers on first use (right for a process, wrong for a test
    session): a logger cached by one test would ignore ``capture_logs`` in every later test, so
    which tests pass would depend on their order.
    """
    real = structlog.configure

    def configure(**kwargs: object) -> None:
        kwargs["cache_logger_on_first_use"] = False
        real(**kwargs)  # type: ignore[arg-type]

    mp = pytest.MonkeyPatch()
    mp.setattr(structlog, "configure", configure)
    yield
    mp.undo()


@pytest.fixture(scope="session")
def pki() -> TestPki:
    """The session's fleet CA (the hub's own CA code), the one test hubs use too
    (``hub_client.default_pki``): certificates for nodes, the hub, consumers and servers, issued
    once per name (``pki.identity(name, role)``, ``pki.server()``)."""
    return default_pki()


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory, pki: TestPki) -> Iterator[Broker]:
    """One real mosquitto process for the whole session, on a free loopback port, configured
    as in production: TLS, client certificates from ``pki`` required, the production ACL
    (``tests.support.broker``). ``broker.settings(name)`` / ``broker.client(name)`` log in as
    a node, ``HUB``, ``CONSUMER`` or the read-only ``OBSERVER``."""
    b = Broker(tmp_path_factory.mktemp("mosquitto"), pki=pki)
    b.start()
    yield b
    b.stop()


@pytest.fixture
def topic_prefix() -> str:
    """A topic prefix unique to the test, so tests sharing a broker never see each other."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """Attach the broker's log to a failing test's report."""
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call" and rep.failed:
        for name in ("broker", "own_broker"):
            b = getattr(item, "funcargs", {}).get(name)
            if isinstance(b, Broker):
                rep.sections.append((f"mosquitto log ({name})", b.log_text()[-4000:]))


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """The built models folder; skip-free: fail loudly when models/build.py was not run."""
    manifest = MODELS_OUT / "index.json"
    if not manifest.exists():
        pytest.fail("models are not built: run `python models/build.py` (the README's test "
                    "command does it)")
    return MODELS_OUT


@pytest.fixture(scope="session")
def postgres() -> PostgresServer:
    """A real PostgreSQL server (Debian's package) on a free loopback port, for the session."""
    return shared_server()
