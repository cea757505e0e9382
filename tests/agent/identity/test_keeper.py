"""The agent's side of the certificate bootstrap (``edge_agent.identity``), against a real hub
on HTTPS that asks the fake Kubernetes API. Time is a clock the tests move (no sleeps)."""

from __future__ import annotations

import asyncio
import stat
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec

from edge_agent.config import AgentSettings, ConfigError, load_settings
from edge_agent.identity import files, keeper
from hub.pki import ca
from tests.support.bootstrap import Pod, agent_pod, hub_settings, signing_ca
from tests.support.broker import Broker
from tests.support.fake_k8s import FakeKube
from tests.support.hub_client import InProcessHub, default_pki, running_hub


class Clock:
    """Wall time that moves only when the keeper sleeps."""

    def __init__(self) -> None:
        self.now = time.time()
        self.sleeps: list[float] = []
        self.on_sleep: list[Any] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        for hook in list(self.on_sleep):
            hook(len(self.sleeps))
        await asyncio.sleep(0)


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    k = FakeKube().start()
    yield k
    k.stop()


@pytest.fixture
async def hub(tmp_path: Path, kube: FakeKube, broker: Broker) -> AsyncIterator[InProcessHub]:
    async with running_hub(hub_settings(tmp_path, kube, broker)) as h:
        yield h


def settings_for(tmp: Path, hub_url: str, pod: Pod, **identity: Any) -> AgentSettings:
    d = tmp / "identity"
    return load_settings(
        None, node=pod.node,
        hub={"url": hub_url, "ca_file": str(default_pki().ca_file),
             "cache_dir": str(tmp / "cache")},
        mqtt={"tls": True, "ca_file": str(default_pki().ca_file),
              "cert_file": str(d / "tls.crt"), "key_file": str(d / "tls.key")},
        identity={"bootstrap": True, "token_file": str(pod.token_file), "retry_min_s": 1,
                  "retry_max_s": 8, **identity})


def on_disk(s: AgentSettings) -> files.Held | None:
    assert s.mqtt.cert_file is not None and s.mqtt.key_file is not None
    return files.Held.load(s.mqtt.cert_file, s.mqtt.key_file)


async def test_a_fresh_node_gets_its_certificate_with_a_private_key(
        tmp_path: Path, hub: InProcessHub, kube: FakeKube) -> None:
    pod = agent_pod(kube, tmp_path / "pod", "node-x")
    s = settings_for(tmp_path, hub.url, pod)
    k = keeper.IdentityKeeper(s)
    with structlog.testing.capture_logs() as logs:
        held = await k.ensure()
    assert held.node == "node-x" and on_disk(s) == held
    assert s.mqtt.key_file is not None and s.mqtt.cert_file is not None
    assert stat.S_IMODE(s.mqtt.key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(s.mqtt.key_file.parent.stat().st_mode) == 0o700
    assert ca.identity(s.mqtt.cert_file.read_bytes()) == ("node-x", "agent")
    life = held.not_after - held.not_before
    assert held.due(0.67 * (1 - keeper.JITTER)) <= k.due <= held.due(0.67)
    assert 3600 <= life <= 3600 + 600
    assert pod.token_file.read_text() not in repr(logs)
    assert [e["event"] for e in logs if e["event"].startswith("identity_")] == ["identity_issued"]


async def test_a_certificate_on_disk_is_kept_until_due_and_a_wrong_one_replaced(
        tmp_path: Path, hub: InProcessHub, kube: FakeKube) -> None:
    pod = agent_pod(kube, tmp_path / "pod", "node-x")
    s = settings_for(tmp_path, hub.url, pod)
    first = await keeper.IdentityKeeper(s).ensure()
    again = keeper.IdentityKeeper(s)  # a restart
    assert await again.ensure() == first and again.stats.requests == 0
    # another node's certificate (a volume moved between boxes): replaced
    other = signing_ca().issue("node-y", "agent", days=1)
    assert other.key_pem is not None and s.mqtt.cert_file and s.mqtt.key_file
    s.mqtt.cert_file.write_bytes(other.cert_pem)
    s.mqtt.key_file.write_bytes(other.key_pem)
    k = keeper.IdentityKeeper(s)
    held = await k.ensure()
    assert k.stats.requests == 1 and held.node == "node-x"
    # a crash between the two renames: the certificate does not match the key
    s.mqtt.key_file.write_bytes(signing_ca().issue("node-x", "agent", days=1).key_pem or b"")
    k = keeper.IdentityKeeper(s)
    assert (await k.ensure()).serial not in (first.serial, held.serial)
    assert k.stats.requests == 1


async def test_refusals_back_off_and_nothing_is_written_until_the_hub_signs(
        tmp_path: Path, hub: InProcessHub, kube: FakeKube) -> None:
    wrong = agent_pod(kube, tmp_path / "pod", "node-y")  # the token is a node-y pod's
    s = settings_for(tmp_path, hub.url, Pod(wrong.name, "node-x", wrong.token_file))
    clock = Clock()

    def fix_after_three(n: int) -> None:
        assert on_disk(s) is None
        if n == 3:
            agent_pod(kube, tmp_path / "pod", "node-x")  # rewrites the token file

    clock.on_sleep.append(fix_after_three)
    k = keeper.IdentityKeeper(s, clock=clock, sleep=clock.sleep, rand=lambda: 1.0)
    with structlog.testing.capture_logs() as logs:
        held = await k.ensure()
    assert held.node == "node-x"
    assert clock.sleeps == [1.0, 2.0, 4.0]  # min 1 s, doubling (rand 1.0: the full delay)
    failed = [e for e in logs if e["event"] == "identity_bootstrap_failed"]
    assert len(failed) == 3 and "403" in failed[0]["error"] and "node-y" in failed[0]["error"]
    assert k.stats.failures == 3 and k.stats.issued == 1


async def test_renewal_at_two_thirds_of_the_life_then_the_link_is_told(
        tmp_path: Path, hub: InProcessHub, kube: FakeKube) -> None:
    pod = agent_pod(kube, tmp_path / "pod", "node-x")
    s = settings_for(tmp_path, hub.url, pod)
    clock = Clock()
    told = asyncio.Event()

    async def renewed() -> None:
        told.set()

    k = keeper.IdentityKeeper(s, on_renewed=renewed, clock=clock, sleep=clock.sleep)
    first = await k.ensure()
    due = k.due
    assert s.mqtt.key_file is not None
    key_before = s.mqtt.key_file.read_bytes()
    task = asyncio.ensure_future(k.run())
    try:
        await asyncio.wait_for(told.wait(), 10)
    finally:
        task.cancel()
    assert clock.now == pytest.approx(due)  # renewed at the due time, not before or later
    assert all(w <= keeper.MAX_WAIT_S for w in clock.sleeps)
    second = on_disk(s)
    assert second is not None and second.serial != first.serial and second == k.held
    assert s.mqtt.key_file.read_bytes() != key_before  # a new key with each certificate
    assert second.not_after >= first.not_after


async def test_a_failed_renewal_keeps_the_certificate_and_retries(
        tmp_path: Path, hub: InProcessHub, kube: FakeKube) -> None:
    pod = agent_pod(kube, tmp_path / "pod", "node-x")
    s = settings_for(tmp_path, hub.url, pod)
    clock = Clock()
    told = asyncio.Event()

    async def renewed() -> None:
        told.set()

    k = keeper.IdentityKeeper(s, on_renewed=renewed, clock=clock, sleep=clock.sleep)
    first = await k.ensure()
    pod.refresh(kube, expires_in=-1)  # the kubelet failed to refresh it: expired
    seen: list[files.Held | None] = []

    def heal(n: int) -> None:
        if k.stats.issued == 1:  # not renewed yet
            seen.append(on_disk(s))
        if k.stats.failures == 2:
            pod.refresh(kube)

    clock.on_sleep.append(heal)
    task = asyncio.ensure_future(k.run())
    try:
        await asyncio.wait_for(told.wait(), 10)
    finally:
        task.cancel()
    assert k.stats.failures == 2 and k.stats.issued >= 2
    # the old certificate stayed in place meanwhile (the wait until due, two backoffs)
    assert len(seen) == 3 and all(h == first for h in seen)
    assert on_disk(s) != first


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def test_the_token_never_follows_a_redirect(tmp_path: Path, kube: FakeKube) -> None:
    """A hub URL that redirects elsewhere: the other server receives no request at all."""
    got: list[str] = []

    async def elsewhere(request: web.Request) -> web.Response:
        got.append(request.headers.get("Authorization", ""))
        return web.json_response({})

    trap = web.Application()
    trap.router.add_route("*", "/{tail:.*}", elsewhere)
    trap_runner, trap_url = await _serve(trap)

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(trap_url + request.path)

    fake = web.Application()
    fake.router.add_post("/v1/pki/bootstrap", redirect)
    fake_runner, fake_url = await _serve(fake)
    try:
        pod = agent_pod(kube, tmp_path / "pod", "node-x")
        k = keeper.IdentityKeeper(settings_for(tmp_path, fake_url, pod))
        with pytest.raises(keeper.IdentityError):
            await k.renew()
        assert got == []
    finally:
        for r in (fake_runner, trap_runner):
            await r.cleanup()


async def test_an_answer_for_another_node_or_key_is_not_taken(
        tmp_path: Path, kube: FakeKube) -> None:
    authority = signing_ca()
    lies = ["other name", "other key"]

    async def lying_hub(request: web.Request) -> web.Response:
        csr = (await request.json())["csr"].encode()
        if lies.pop(0) == "other name":  # our key, but someone else's name
            cert = authority.sign_csr(csr, "node-y", "agent", ttl_s=600).cert_pem
        else:  # our name, someone else's key
            cert = authority.issue("node-x", "agent").cert_pem
        return web.json_response({"certificate": cert.decode()})

    app = web.Application()
    app.router.add_post("/v1/pki/bootstrap", lying_hub)
    runner, url = await _serve(app)
    try:
        pod = agent_pod(kube, tmp_path / "pod", "node-x")
        s = settings_for(tmp_path, url, pod)
        k = keeper.IdentityKeeper(s)
        with pytest.raises(keeper.UnavailableError, match="for 'node-y'"):
            await k.renew()
        with pytest.raises(keeper.UnavailableError, match="not for the key"):
            await k.renew()
        assert on_disk(s) is None and k.held is None
    finally:
        await runner.cleanup()


def test_bootstrap_needs_a_hub_and_tls_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(None, node="node-x", mqtt={"tls": False},
                      identity={"bootstrap": True})
    fields = {e[0] for e in exc.value.errors}
    assert fields == {"hub.url", "mqtt.tls", "mqtt.cert_file", "mqtt.key_file"}


def test_a_new_key_each_time_and_a_csr_the_hub_can_check() -> None:
    k1, k2 = files.new_key(), files.new_key()
    assert k1.public_key() != k2.public_key()
    assert isinstance(k1.curve, ec.SECP256R1)
    csr = ca.load_csr(files.csr_pem(k1, "node-x").encode())
    assert csr.public_key() == k1.public_key()
