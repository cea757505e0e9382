"""A real Mosquitto broker process for tests, on a free loopback port, TLS by default.

Used by the session fixture in conftest.py and by fault tests that kill -9 and restart it (the
same port and persistence file survive a restart, as a real broker's would).

By default the broker is configured as in production (k3s/base/mosquitto): a TLS listener that
requires a client certificate from the test CA (``tests.support.pki``), the certificate's
common name as the user name, and the ACL file rendered by ``edge_agent.contract.acl`` (the
same function renders the K3s file). The topic prefix level of the ACL is ``+`` here, because
tests share one broker under their own prefixes; the rights below it are the production ones.
Two test-only differences, both about the tests' observers rather than the parties under test:

* ``test:observer`` may read every topic (``Recorder`` uses it to see what really arrived);
* the client id is the client's own choice (not ``use_username_as_clientid``), so several
  observers and a test's many consumers can share one identity. tests/security checks the
  production setting on a broker that has it (``clientid_from_identity=True``).

``identity``, ``settings`` and ``client`` give a test the certificate files, the ``mqtt``
settings section, or a ready (unconnected) paho client for any party: a node by its name, the
hub (``HUB``), a consumer (``CONSUMER``), the observer (``OBSERVER``). ``tls=False`` starts a
plain, anonymous broker for the few tests that say why they need one.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from edge_agent.common import mqtt as mqtt_base
from edge_agent.contract import acl
from tests.support.pki import Identity, TestPki

#: The hub's and the consumers' identities on test brokers (never valid node names).
HUB = "hub:test"
CONSUMER = "consumer:test"
#: Reads everything; only tests' recorders use it.
OBSERVER = "test:observer"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    """Wait until something accepts TCP connections on ``port``; raise TimeoutError if not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


def role_of(name: str) -> str:
    """The certificate role a test identity has: ``hub:``/``consumer:`` names, the observer
    (a consumer certificate), else a node (``agent``)."""
    head = name.split(":", 1)[0] if ":" in name else ""
    return head if head in ("hub", "consumer") else ("consumer" if head else "agent")


def test_acl(prefix: str = "+", extra_users: Mapping[str, acl.Rights] | None = None) -> str:
    """The production ACL for ``prefix`` plus the tests' read-only observer (and
    ``extra_users``: a benchmark's simulator speaking for thousands of nodes at once)."""
    return acl.render(prefix, hubs=[HUB], consumers=[CONSUMER],
                      extra={OBSERVER: [("read", "#")], **(extra_users or {})})


class Broker:
    """A mosquitto process with its own config, log and persistence in ``workdir``.

    ``pki`` is the CA its clients' certificates come from (default: a new one in ``workdir``).
    """

    def __init__(self, workdir: Path, port: int | None = None, persistence: bool = True, *,
                 tls: bool = True, pki: TestPki | None = None,
                 clientid_from_identity: bool = False,
                 extra_users: Mapping[str, acl.Rights] | None = None) -> None:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(exe).exists():
            raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
        self.exe = exe
        self.workdir = workdir
        self.port = port or free_port()
        self.tls = tls
        self.pki = pki if pki is not None or not tls else TestPki(workdir / "pki")
        self.log = workdir / "mosquitto.log"
        self.conf = workdir / "mosquitto.conf"
        lines = [
            # as root, mosquitto drops to user "mosquitto", which cannot write pytest's private
            # temp folders (no log on failure); stay the user we are
            *(["user root"] if os.geteuid() == 0 else []),
            "per_listener_settings false",
            f"listener {self.port} 127.0.0.1",
            f"log_dest file {self.log}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "max_inflight_messages 1000",
            "max_queued_messages 1000000",
        ]
        if self.pki is not None:
            server = self.pki.server()
            (workdir / "acl").write_text(test_acl(extra_users=extra_users))
            lines += [
                f"cafile {self.pki.ca_file}",
                f"certfile {server.cert_file}",
                f"keyfile {server.key_file}",
                "require_certificate true",
                "use_identity_as_username true",
                *(["use_username_as_clientid true"] if clientid_from_identity else []),
                "allow_anonymous false",
                f"acl_file {workdir / 'acl'}",
            ]
        else:
            lines.append("allow_anonymous true")
        if persistence:
            lines += ["persistence true", f"persistence_location {workdir}/", "autosave_interval 1"]
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------ identities

    def identity(self, name: str) -> Identity:
        """The certificate files of ``name`` (issued once), its role from ``role_of``."""
        if self.pki is None:
            raise RuntimeError("a plain broker has no identities")
        return self.pki.identity(name, role_of(name))

    def settings(self, name: str = OBSERVER, **extra: Any) -> dict[str, Any]:
        """The ``mqtt`` settings section (agent, hub, ``ConnectionSettings``) for ``name``."""
        out: dict[str, Any] = {"host": "127.0.0.1", "port": self.port, "tls": self.tls}
        if self.pki is not None:
            ident = self.identity(name)
            out |= {"ca_file": ident.ca_file, "cert_file": ident.cert_file,
                    "key_file": ident.key_file}
        return out | extra

    def connection(self, name: str = OBSERVER, **extra: Any) -> mqtt_base.ConnectionSettings:
        """``settings`` as a ``ConnectionSettings``."""
        return mqtt_base.ConnectionSettings(**self.settings(name, **extra))

    def client(self, name: str = OBSERVER, *, client_id: str | None = None,
               protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5,
               **kw: Any) -> paho.Client:
        """A paho client with ``name``'s certificate, not connected yet (``connect(port)``)."""
        c = mqtt_base.PahoClient(CallbackAPIVersion.VERSION2,
                                 client_id=client_id
                                 or f"{name.replace(':', '-')}-{uuid.uuid4().hex[:8]}",
                                 protocol=protocol, **kw)
        if self.pki is not None:
            c.tls_set_context(mqtt_base.tls_context(self.connection(name)))
        return c

    def connect(self, c: paho.Client, keepalive: int = 60) -> None:
        """Connect ``c`` (blocking) to this broker."""
        c.connect("127.0.0.1", self.port, keepalive=keepalive)

    def cli_args(self, name: str = CONSUMER) -> list[str]:
        """``edge-hub results tail`` flags that log in as ``name``."""
        s = self.settings(name)
        out = ["--host", s["host"], "--port", str(s["port"])]
        if self.pki is not None:
            out += ["--ca-file", str(s["ca_file"]), "--cert-file", str(s["cert_file"]),
                    "--key-file", str(s["key_file"])]
        return out

    # ------------------------------------------------------------------ process

    def start(self) -> None:
        """Start the broker and wait until it accepts connections."""
        self.proc = subprocess.Popen(
            [self.exe, "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port)

    def kill(self) -> None:
        """kill -9 the broker (a crash, not a clean shutdown)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def stop(self) -> None:
        """Terminate the broker cleanly."""
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
            self.proc = None

    def log_text(self) -> str:
        """The broker's log so far (shown when a test fails)."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class Publishers:
    """Publish as the node a topic names (``{prefix}/{node}/...``), one connection per node,
    made on first use: what each agent may publish under the production ACL."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self._clients: dict[str, paho.Client] = {}

    def client(self, node: str) -> paho.Client:
        """The connected client of ``node``."""
        c = self._clients.get(node)
        if c is None:
            c = self._clients[node] = self.broker.client(node)
            self.broker.connect(c)
            c.loop_start()
        return c

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                timeout: float = 5.0) -> paho.MQTTMessageInfo:
        """Publish as the topic's node and wait for the broker's answer."""
        info = self.client(topic.split("/")[1]).publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(timeout)
        return info

    def close(self) -> None:
        """Disconnect every client and release its sockets."""
        for c in self._clients.values():
            c.disconnect()
            mqtt_base.release(c)
        self._clients.clear()
