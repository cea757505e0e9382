"""The MQTT client base that the agent's link, the hub's link and the results consumer build on.

All three talk to the same broker with paho-mqtt 2.x, and each needs the same things done the
same way: a client id, a login whose password comes from a file (``settings.read_secret``),
TLS with an optional client certificate, MQTT 5 or 3.1.1 with CONNECT properties, reconnects
spaced by the one backoff with jitter (``backoff``), and paho's callbacks guarded so that an
exception can never kill paho's network thread. ``MqttClient`` does those once; a subclass adds
what it is for by overriding the ``_connection_up``/``_message``/... hooks, which all run on
paho's network thread.

How reconnects are spaced: paho reconnects by itself (``loop_start``) and waits between attempts
by its own doubling rule; before each attempt (``on_pre_connect``) this module re-arms that
wait with the next jittered delay, the wait paho uses if the attempt fails, and after a
successful connection it arms the first, shortest one.

Closing: paho closes its wake-up socket pair only when the client is garbage collected;
``close_sync`` (and ``release``, for plain paho clients in tests) closes it at once, so no file
descriptor outlives a client. ``drop_connection`` cuts the link the way a crash does (no
DISCONNECT, so the broker publishes the last will): fault injection for tests and demos.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import ssl
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions
from pydantic import Field, model_validator

from edge_agent.common import backoff, settings

log = structlog.get_logger(__name__)


class ConnectionSettings(settings.Section):
    """How to reach and log in to the MQTT broker (both programs' ``mqtt`` section).

    TLS is the default: the client verifies the broker against ``ca_file`` and presents its own
    certificate (``cert_file``/``key_file``), whose common name is its identity on the broker
    (docs/security.md). A plain connection only when asked for (``tls: false``, port 1883).
    """

    #: Broker host name or address; with TLS it must match the broker certificate's names.
    #: Default 127.0.0.1 (a broker on the same box).
    host: str = "127.0.0.1"
    #: Broker port. Default 8883, the MQTT-over-TLS port (1883 for ``tls: false``).
    port: int = Field(8883, ge=1, le=65535)
    #: 5 or 3 (3.1.1). Default 5: reason codes, flow control and shared subscriptions.
    protocol: Literal[5, 3] = 5
    #: Seconds between keepalive pings; a dead link is detected after 1.5x this. Default 15 s:
    #: fast enough to notice a cut within ~20 s, cheap on metered links.
    keepalive_s: int = Field(15, ge=5, le=3600)
    #: Broker user name; None = the certificate's identity (or anonymous without TLS).
    username: str | None = None
    #: File holding the password (a mounted Secret), never the password itself.
    password_file: Path | None = None
    #: Connect with TLS and verify the broker. Default true: every node proves who it is with
    #: its certificate, and nobody on the site network reads or forges results in transit.
    tls: bool = True
    #: CA bundle (PEM) that verifies the broker, normally the hub's CA (``edge-hub pki``);
    #: None = the system store.
    ca_file: Path | None = None
    #: This client's certificate (PEM): its identity on the broker, which requires one.
    #: None = no client certificate (a broker that takes passwords instead).
    cert_file: Path | None = None
    #: Private key (PEM) of ``cert_file``; set both or neither.
    key_file: Path | None = None
    #: Reconnect backoff bounds, seconds: attempt k waits in [d/2, d], d = min(max, min * 2**k)
    #: (half fixed, half jitter, so a fleet that lost its broker does not return in lockstep).
    #: Defaults 0.5 s and 30 s: quick after a blip, gentle on a broker that is down for long.
    reconnect_min_s: float = Field(0.5, gt=0)
    #: Upper bound of the reconnect delay, seconds (see ``reconnect_min_s``).
    reconnect_max_s: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _cert_and_key(self) -> ConnectionSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together: set both or neither")
        return self

    def tls_problems(self, prefix: str = "mqtt.") -> list[settings.FieldError]:
        """What is wrong with the TLS files, one (field, message, value) each (blocking).

        Empty when TLS is off or every named file can be read; ``validate-config`` and
        ``open_sync`` both report these.
        """
        if not self.tls:
            return []
        out: list[settings.FieldError] = []
        for name in ("ca_file", "cert_file", "key_file"):
            path: Path | None = getattr(self, name)
            if path is None:
                continue
            try:
                with path.open("rb") as f:
                    f.read(1)
            except OSError as exc:
                out.append((f"{prefix}{name}", f"cannot read TLS file: {exc.strerror}",
                            str(path)))
        return out


def tls_context(s: ConnectionSettings) -> ssl.SSLContext:
    """A client TLS context: the broker verified against ``ca_file`` (or the system store) and
    its host name checked, TLS 1.2 at least, our certificate presented when configured.

    Blocking (reads the files); raises ``OSError``/``ssl.SSLError`` for files that cannot be used.
    """
    ctx = ssl.create_default_context(cafile=None if s.ca_file is None else str(s.ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if s.cert_file is not None and s.key_file is not None:
        ctx.load_cert_chain(str(s.cert_file), str(s.key_file))
    return ctx


class PahoClient(paho.Client):
    """paho's client, except that a TLS handshake that fails closes its socket at once.

    paho 2.x leaves the socket of a failed handshake (a broker whose certificate we do not
    trust, one that refuses ours) to the garbage collector, which closes it with a
    ``ResourceWarning``; a fleet retrying against a misconfigured broker would do that on
    every attempt. Same steps as paho's own wrap otherwise: SNI and host name checked by the
    context (``tls_context`` turns ``check_hostname`` on), the connect timeout on the handshake.
    The reason of the last failed handshake is kept in ``tls_error`` (None after a good one),
    so a log line can tell "the broker's certificate is not trusted" from "no broker".
    """

    tls_error: str | None = None

    def _ssl_wrap_socket(self, tcp_sock: socket.socket) -> ssl.SSLSocket:
        ctx = self._ssl_context
        if ctx is None or not ctx.check_hostname:
            return super()._ssl_wrap_socket(tcp_sock)  # a context we did not make: paho's way
        ssl_sock = ctx.wrap_socket(tcp_sock, server_hostname=self._host,
                                   do_handshake_on_connect=False)
        try:
            ssl_sock.settimeout(self._connect_timeout)
            ssl_sock.do_handshake()
        except BaseException as exc:
            self.tls_error = str(exc)[:200] or type(exc).__name__
            ssl_sock.close()
            raise
        self.tls_error = None
        return ssl_sock

    def loop_start(self) -> MQTTErrorCode:
        # paho opens a new wake-up socket pair on every start and leaves the previous one to the
        # garbage collector: a restart (``reconnect_with_new_identity_sync``) closes it first
        if self._thread is None:
            self._reset_sockets(sockpair_only=True)
        return super().loop_start()


def release(client: paho.Client) -> None:
    """Stop a paho client's network thread and close every socket it holds, now.

    For plain paho clients (tests' recorders and simulators) after ``disconnect()``; paho's
    public ``reinitialise`` is what closes the socket pair outside garbage collection.
    """
    client.loop_stop()
    client.reinitialise()


def drop(client: paho.Client) -> None:
    """Cut a paho client's link without a DISCONNECT, as a killed process would.

    The broker sees the connection end and publishes the client's last will. Fault injection.
    """
    sock = client.socket()
    client.loop_stop()
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    client.reinitialise()


class MqttClient:
    """One paho client with identity, credentials, TLS, MQTT 5 properties and jittered reconnect.

    Lifecycle: ``open_sync()`` (blocking: reads the password and TLS files, then connects in
    paho's thread and returns at once; the broker may be down), ``close_sync()``. Async owners
    call both through ``asyncio.to_thread`` and may ``attach_loop`` to get ``_call_in_loop``.

    ``properties`` are MQTT 5 CONNECT properties by name (``{"ReceiveMaximum": 100}``);
    ``persistent`` keeps the broker session (MQTT 5 clean start off, 3.1.1 clean session off);
    ``password`` overrides ``settings.password_file``; ``field_prefix`` names the settings in
    errors (``mqtt.`` gives ``mqtt.password_file``); ``rand`` makes the jitter reproducible.
    """

    def __init__(
        self,
        settings_: ConnectionSettings,
        client_id: str,
        *,
        password: str | None = None,
        properties: Mapping[str, int] | None = None,
        persistent: bool = False,
        manual_ack: bool = False,
        max_inflight: int = 20,
        field_prefix: str = "mqtt.",
        rand: backoff.Rand = random.random,
    ) -> None:
        self.settings = settings_
        self.client_id = client_id
        self.v5 = settings_.protocol == 5
        self._password = password
        self._properties = dict(properties or {})
        self._persistent = persistent
        self._field_prefix = field_prefix
        self._backoff = backoff.Backoff(settings_.reconnect_min_s, settings_.reconnect_max_s, rand)
        self._connected = threading.Event()
        self._running = False
        #: The TLS context paho connects with, kept so a renewed certificate can be loaded.
        self._tls: ssl.SSLContext | None = None
        #: Held while paho's thread is stopped and started again for a renewed certificate,
        #: so a close never lands in between (and nothing restarts a closed client).
        self._restart_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client = PahoClient(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if self.v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if self.v5 else not persistent,
            manual_ack=manual_ack,
        )
        c = self._client
        # at most this many unacknowledged on the wire: what a broker crash can duplicate
        c.max_inflight_messages_set(max_inflight)
        c.max_queued_messages_set(0)
        c.connect_timeout = float(min(10, settings_.keepalive_s))
        c.suppress_exceptions = True
        c.on_pre_connect = self._guard(self._on_pre_connect)
        c.on_connect = self._guard(self._on_connect)
        c.on_connect_fail = self._guard(self._on_connect_fail)
        c.on_disconnect = self._guard(self._on_disconnect)
        c.on_message = self._guard(self._message)
        c.on_publish = self._guard(self._published)
        c.on_subscribe = self._guard(self._subscribed)

    # ------------------------------------------------------------------ lifecycle

    @property
    def connected(self) -> bool:
        """True while a CONNACK-accepted connection is up."""
        return self._connected.is_set()

    @property
    def running(self) -> bool:
        """Between ``open_sync`` and ``close_sync``/``drop_connection``."""
        return self._running

    def attach_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop that ``_call_in_loop`` hands work to."""
        self._loop = loop

    def open_sync(self) -> None:
        """Log in and connect in paho's thread (blocking file reads; returns before CONNACK).

        Raises ``settings.ConfigError`` naming the field when the password or TLS files cannot
        be used.
        """
        self._configure_security()
        self._connect_async()
        self._client.loop_start()
        self._running = True

    def _connect_async(self) -> None:
        props = None
        if self.v5 and self._properties:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            for name, value in self._properties.items():
                setattr(props, name, value)
        kw: dict[str, Any] = {"clean_start": not self._persistent} if self.v5 else {}
        s = self.settings
        self._client.connect_async(s.host, s.port, keepalive=s.keepalive_s, properties=props,
                                   **kw)

    def reconnect_with_new_identity_sync(self) -> None:
        """Present ``cert_file``/``key_file`` as they are now (a renewed certificate) and
        connect again with them: a clean DISCONNECT (the broker publishes no last will), then a
        new connection at once; unacknowledged messages are sent again on it, as after any
        reconnect. Blocking (reads the files, joins paho's thread): from a worker thread.

        Raises ``settings.ConfigError`` when the files cannot be used (the old certificate then
        stays loaded).
        """
        s = self.settings
        if self._tls is None or s.cert_file is None or s.key_file is None:
            return
        try:
            self._tls.load_cert_chain(str(s.cert_file), str(s.key_file))
        except (OSError, ssl.SSLError) as exc:
            raise settings.ConfigError([(f"{self._field_prefix}cert_file",
                                         f"renewed certificate cannot be used: {exc}",
                                         str(s.cert_file))]) from exc
        with self._restart_lock:
            if not self._running:  # closed meanwhile: nothing to reconnect
                return
            self._client.disconnect()
            self._client.loop_stop()
            self._connect_async()
            self._client.loop_start()

    def close_sync(self) -> None:
        """Disconnect cleanly, stop paho's thread and close its sockets (blocking)."""
        with self._restart_lock:
            self._running = False
        with contextlib.suppress(Exception):
            self._client.disconnect()
        release(self._client)
        self._connected.clear()

    def drop_connection(self) -> None:
        """Vanish without a DISCONNECT, as a killed process would: the broker publishes the
        last will and no reconnect follows. For fault injection (tests, demos)."""
        with self._restart_lock:
            self._running = False
        drop(self._client)
        self._connected.clear()

    @property
    def tls_error(self) -> str | None:
        """Why the last TLS handshake failed (None after a good one or before any)."""
        return self._client.tls_error if isinstance(self._client, PahoClient) else None

    def socket(self) -> socket.socket | None:
        """The connected network socket, None between connections (fault tests watch it)."""
        sock = self._client.socket()
        return sock if isinstance(sock, socket.socket) else None

    def _configure_security(self) -> None:
        s = self.settings
        if s.username is not None:
            password = self._password
            if password is None and s.password_file is not None:
                try:
                    password = settings.read_secret(s.password_file)
                except OSError as exc:
                    raise settings.ConfigError([(
                        f"{self._field_prefix}password_file", f"cannot read: {exc.strerror}",
                        str(s.password_file),
                    )]) from exc
            self._client.username_pw_set(s.username, password)
        if s.tls:
            problems = s.tls_problems(self._field_prefix)
            if problems:
                raise settings.ConfigError(problems)
            try:
                # verifies the broker's chain and host name; presents our certificate
                self._tls = tls_context(s)
                self._client.tls_set_context(self._tls)
            except (OSError, ssl.SSLError, ValueError) as exc:
                field = "cert_file" if s.cert_file is not None else "ca_file"
                raise settings.ConfigError([(
                    f"{self._field_prefix}{field}", f"TLS files cannot be used: {exc}",
                    str(s.cert_file or s.ca_file),
                )]) from exc

    # ------------------------------------------------------------------ helpers

    def _subscribe(self, filters: list[tuple[str, int]]) -> None:
        """Subscribe to (filter, qos) pairs in one SUBSCRIBE."""
        if not filters:
            return
        if self.v5:
            self._client.subscribe([(f, SubscribeOptions(qos=q)) for f, q in filters])
        else:
            self._client.subscribe(filters)

    def _call_in_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the attached event loop (from paho's thread); dropped when the
        loop is gone."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        # the loop may close between the check and the call
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(fn, *args)

    def _guard(self, fn: Callable[..., None]) -> Callable[..., None]:
        def wrapper(*args: Any) -> None:
            try:
                fn(*args)
            except Exception:
                log.exception("mqtt_callback_failed", callback=fn.__name__,
                              client_id=self.client_id)
        return wrapper

    # ------------------------------------------------------------------ paho callbacks

    def _on_pre_connect(self, client: paho.Client, _userdata: Any) -> None:
        # re-arm paho's reconnect wait with a jittered delay before each attempt: it is the
        # wait paho uses if this attempt fails
        delay = self._backoff.next_delay()
        client.reconnect_delay_set(delay, delay)  # type: ignore[arg-type]
        self._before_connect()

    def _on_connect(self, client: paho.Client, _userdata: Any, _flags: Any,
                    reason: ReasonCode, props: Properties | None) -> None:
        if reason.is_failure:
            self._connect_refused(reason)
            return
        self._backoff.reset()
        first = self._backoff.peek()  # the wait before the first attempt after a drop
        client.reconnect_delay_set(first, first)  # type: ignore[arg-type]
        self._connection_up(props)
        self._connected.set()
        self._connection_ready()

    def _on_connect_fail(self, _client: paho.Client, _userdata: Any) -> None:
        self._connect_failed()

    def _on_disconnect(self, _client: paho.Client, _userdata: Any, _flags: Any,
                       reason: ReasonCode, _props: Properties | None) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        self._connection_down(reason, was)

    # ------------------------------------------------------------------ hooks (paho's thread)

    def _before_connect(self) -> None:
        """Before each connection attempt (set the last will here)."""

    def _connection_up(self, props: Properties | None) -> None:
        """An accepted CONNACK, before ``connected`` turns true (subscribe here)."""

    def _connection_ready(self) -> None:
        """After ``connected`` turned true."""

    def _connect_refused(self, reason: ReasonCode) -> None:
        """The broker refused the connection (bad login, not authorised)."""
        log.warning("mqtt_connect_refused", reason=str(reason), client_id=self.client_id)

    def _connect_failed(self) -> None:
        """A connection attempt failed before any CONNACK (no broker, TLS failure)."""

    def _connection_down(self, reason: ReasonCode, was_connected: bool) -> None:
        """The connection ended (``was_connected``: it had been accepted)."""

    def _message(self, _client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        """An inbound message."""

    def _published(self, _client: paho.Client, _userdata: Any, mid: int,
                   reason: ReasonCode, _props: Properties | None) -> None:
        """The broker acknowledged (QoS 1: PUBACK) the message with id ``mid``."""

    def _subscribed(self, _client: paho.Client, _userdata: Any, mid: int,
                    codes: list[ReasonCode], _props: Properties | None) -> None:
        """The broker answered a SUBSCRIBE; ``codes`` per filter."""
