"""The hub's one typed settings object, built once in ``main()`` and passed down.

Sources, highest first: environment (``EDGE_HUB_`` prefix, nested keys joined by ``__``), the
YAML config file (``--config``), field defaults. Unknown keys are rejected. Secrets (the API
token, MQTT password) come from files. How a file and the environment become settings, and how
errors are reported, is shared with the agent (``edge_agent.common.settings``); this module says
what the hub's settings are. Every field says its unit, default and why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from edge_agent.common import httpserver
from edge_agent.common import mqtt as common_mqtt
from edge_agent.common import settings as common_settings
from edge_agent.contract.protocol import DEFAULT_LABEL_PREFIX, DEFAULT_TOPIC_PREFIX
from hub.errors import HubError


class ConfigError(common_settings.ConfigError, HubError, code="bad_config", exit_code=2):
    """A config that cannot be used. ``errors`` holds (field path, message, offending value)."""


#: What an API token may do (``hub.api.httputil``): ``admin`` changes things, ``read`` reads.
TokenScope = Literal["admin", "read"]


class TokenSettings(common_settings.Section):
    """One API token: the file that holds it and what it may do."""

    #: File holding the token (a mounted Secret; refused when other users can read it, see
    #: ``secret_files``).
    file: Path
    #: What the token may do: ``admin`` pushes, deletes and rolls out (and reads);
    #: ``read`` reads everything (models with their notes, artifacts, nodes, rollouts,
    #: ``/metrics``) and is refused (403) on every change. Give CI and dashboards ``read``.
    scope: TokenScope
    #: Who holds it, in the hub's log and as the default actor of a rollout command.
    #: Default: the file's name.
    name: str | None = Field(None, min_length=1, max_length=64)


class ApiSettings(httpserver.ServerLimits):
    """The REST API: where it listens, TLS, who may call it, and its limits."""

    #: Listen address. Default 127.0.0.1: nothing listens beyond loopback unless configured
    #: (the k3s manifest sets 0.0.0.0 inside the pod).
    host: str = "127.0.0.1"
    #: Port. Default 8081 (the agent's HTTP port is 8080 on the same box in the demo).
    port: int = Field(8081, ge=0, le=65535)
    #: Serve plain HTTP instead of HTTPS. Default false: tokens and artifacts cross the site
    #: network, so plain HTTP is only for a hub behind a TLS-terminating proxy on the same host.
    plain_http: bool = False
    #: The hub's server certificate (PEM, with its chain), e.g. from ``edge-hub pki issue
    #: hub-server --role server --dns ...``; required unless ``plain_http``.
    tls_cert_file: Path | None = None
    #: The private key of ``tls_cert_file`` (PEM; refused when other users can read it).
    tls_key_file: Path | None = None
    #: The fleet CA (PEM). When set, the hub asks every client for a certificate (optional
    #: for the client), and one signed by this CA for the role ``agent`` may download models
    #: (list, show, manifest, artifact) without a token, and nothing else: how agents fetch.
    #: None (default): tokens only.
    client_ca_file: Path | None = None
    #: API tokens, each from its own file with its scope (``admin`` or ``read``).
    tokens: list[TokenSettings] = Field([])
    #: A file holding an ``admin`` token (kept for configs written before ``tokens``; the
    #: same as a ``tokens`` entry with scope admin and the name ``admin``).
    token_file: Path | None = None
    #: An ``admin`` token written inline (prefer a file; env EDGE_HUB_API__TOKEN for tests).
    token: str | None = None
    #: Whether reads need a token or a client certificate. Default true (401 without):
    #: model notes, the fleet and the rollouts are nobody else's business. False opens every
    #: read to anyone who can reach the port.
    read_requires_token: bool = True
    #: Largest model upload, bytes. Default 1 GiB (the largest edge models are ~300 MB).
    max_upload_bytes: int = Field(1024**3, ge=1024)
    #: Base URL agents use to reach this hub (artifact URLs in desired state). Default derived
    #: from host and port, which is only right on one machine.
    public_url: str | None = None


class StorageSettings(common_settings.Section):
    """Where the hub keeps its state: artifacts on a folder, everything else in a database."""

    #: Folder for artifacts (content-addressed by sha256) and, without ``database_url``, the
    #: SQLite databases (a PVC; ReadWriteMany when several replicas share it).
    data_dir: Path = Path("/var/lib/edge-hub")
    #: The database for the registry, rollouts and desired state. None (default): SQLite files
    #: in ``data_dir``, which allows one hub process. ``postgresql://USER@HOST:PORT/DB`` (with
    #: ``?sslmode=verify-full&sslrootcert=...`` across a network): PostgreSQL, shared by any
    #: number of replicas, one of which leads (docs/deploy.md). Never put the password here.
    database_url: str | None = Field(None, pattern=r"^(postgresql|postgres)://")
    #: File holding the database password (a mounted Secret; refused when other users can read
    #: it). None: no password (peer/certificate authentication, or ``~/.pgpass``).
    database_password_file: Path | None = None
    #: Connections each replica opens for API requests and the controller (PostgreSQL only),
    #: beside the one that holds leadership.
    database_pool_size: int = Field(4, ge=1, le=64)
    #: Seconds a leader that stopped answering keeps leadership (PostgreSQL only): the database
    #: ends its session after this long idle, which frees the lock for a follower, and the
    #: leader stops acting on its own after half of it without a heartbeat. Shorter fails over
    #: faster; longer tolerates longer database hiccups.
    leader_lease_s: float = Field(10.0, ge=1.0, le=300.0)

    @field_validator("database_url")
    @classmethod
    def _no_password_in_url(cls, url: str | None) -> str | None:
        """A password in the URL would travel with every copy of the config (and the
        ConfigMap): refused, with where it goes instead."""
        if url is None:
            return None
        parts = urlsplit(url)
        if parts.password is not None or "password" in parse_qs(parts.query):
            raise ValueError("holds a password: put it in the file named by "
                             "storage.database_password_file (a mounted Secret) instead")
        if not parts.hostname or not parts.path.strip("/"):
            raise ValueError("needs a host and a database: postgresql://USER@HOST:PORT/DB")
        return url



class SigningSettings(common_settings.Section):
    #: Refuse uploads without a valid ed25519 signature. Default false (opt-in).
    require_signed: bool = False
    #: PEM public keys that signatures are checked against.
    public_key_files: list[Path] = Field([])


class MqttSettings(common_mqtt.ConnectionSettings):
    """The broker the hub takes the agents' state and telemetry from and sends desired state to:
    over TLS with the hub's own certificate (``hub:...``, the identity the broker's ACL lets
    write desired state; docs/security.md)."""

    #: First topic level, the same as the agents' ``mqtt.topic_prefix``. Default ``edge``.
    topic_prefix: str = DEFAULT_TOPIC_PREFIX


class ClusterSettings(common_settings.Section):
    #: Where nodes and labels come from: the Kubernetes API, or a static inventory file for
    #: sites without Kubernetes.
    backend: Literal["kubernetes", "static"] = "static"
    #: Static inventory (YAML: nodes with labels), for backend=static.
    inventory_file: Path | None = None
    #: kubeconfig for backend=kubernetes outside a cluster; None = in-cluster config.
    kubeconfig: Path | None = None
    #: Prefix of the node labels the hub reads and writes: ``{prefix}/camera-node`` and one
    #: ``{prefix}/model.<name>`` per model. Default ``edge.ai`` (the wire contract's).
    label_prefix: str = DEFAULT_LABEL_PREFIX
    #: Retries of a Kubernetes API call on 409/429/5xx/timeouts, with exponential backoff.
    api_retries: int = Field(5, ge=0, le=20)
    #: Seconds one Kubernetes API request may take. Default 10 s.
    api_timeout_s: float = Field(10.0, gt=0)
    #: Backoff after a 409/429/5xx/timeout, seconds: retry k waits in [d/2, d], d =
    #: min(api_backoff_max_s, api_backoff_s * 2**k) (half fixed, half jitter). Default 0.2 s: a
    #: conflict usually clears at once.
    api_backoff_s: float = Field(0.2, gt=0)
    #: Largest retry delay, seconds (a 429's Retry-After is capped to it). Default 5 s.
    api_backoff_max_s: float = Field(5.0, gt=0)
    #: Label patches in flight at once (one worker thread each). Default 8: enough to patch a
    #: wave of thousands of nodes in seconds without hammering the API server.
    api_concurrency: int = Field(8, ge=1, le=64)
    #: Server-side length of one watch request, seconds; the watch is renewed after it.
    #: Default 300 s (the API server's own default is 30-60 min; shorter bounds stale state).
    watch_timeout_s: int = Field(300, ge=1)
    #: Only nodes labelled ``{label_prefix}/camera-node=true`` are visible to the hub (the
    #: DaemonSet runs agents only there). Default true: a rollout never assigns a model to a
    #: node without an agent.
    camera_nodes_only: bool = True
    #: How often the static inventory file is checked for edits made by hand, seconds.
    #: Default 2 s.
    inventory_poll_s: float = Field(2.0, gt=0)


class TelemetrySettings(common_settings.Section):
    #: Sliding window over which per-node metrics are aggregated, seconds. Default 300 s.
    window_s: float = Field(300.0, gt=0)
    #: A node silent for this long is offline (the last will says so sooner). Default 60 s =
    #: six missed 10 s telemetry messages.
    offline_after_s: float = Field(60.0, gt=0)


class RolloutSettings(common_settings.Section):
    #: How often active rollouts are stepped even when no node state changed, seconds.
    #: Default 1 s: bake times and deadlines are minutes, a second of slack is nothing.
    tick_s: float = Field(1.0, gt=0)
    #: Nodes whose labels are patched per step of a wave. Default 500: a wave of thousands
    #: goes out in a few steps while pause/abort commands still get in between them.
    apply_batch: int = Field(500, ge=1)
    #: Seconds after start-up before rollouts are stepped, so the agents' retained states
    #: have arrived (otherwise every node would look offline and be skipped). Default 3 s.
    startup_grace_s: float = Field(3.0, ge=0)


class BootstrapSettings(common_settings.Section):
    """Certificates for agent pods on K3s, for the node the API server says they run on."""

    #: Answer ``POST /v1/pki/bootstrap``: an agent pod proves with its projected ServiceAccount
    #: token (checked by a TokenReview) which node it runs on and gets a certificate for that
    #: node. Needs ``cluster.backend: kubernetes``. Default false: a hub signs nothing unless
    #: asked to (the K3s manifests turn it on).
    enabled: bool = False
    #: The audience the agents' projected tokens are minted for; a token for any other
    #: audience (the API server's own included) is refused. Default ``edge-hub``.
    audience: str = Field("edge-hub", min_length=1, max_length=253)
    #: Namespace of the agent DaemonSet. Default ``edge-ai`` (the manifests').
    namespace: str = Field("edge-ai", min_length=1, max_length=63)
    #: ServiceAccount the agent pods run under; a pod under any other is refused.
    #: Default ``edge-agent`` (the manifests').
    service_account: str = Field("edge-agent", min_length=1, max_length=253)
    #: Life of a bootstrapped certificate, seconds. Default 86400 (24 h): a stolen key is
    #: useless a day later, and the agent renews at 2/3 of the life, so a hub may be down for
    #: 8 h without any agent losing its certificate.
    cert_ttl_s: int = Field(86400, ge=600, le=30 * 86400)
    #: Bootstrap requests checked at once (each makes two Kubernetes API calls); more get 429
    #: and retry with backoff. Default 16: a whole site restarting is served in seconds
    #: without flooding the API server.
    concurrency: int = Field(16, ge=1, le=256)


class PkiSettings(common_settings.Section):
    """The hub's CA: where it lives and whom it signs for without a human (docs/security.md)."""

    #: Folder of the hub's CA (``ca.crt``, ``ca.key`` mode 0600), made by ``edge-hub pki
    #: init``. None (default): ``<storage.data_dir>/pki``. On K3s a Secret mounted read-only.
    dir: Path | None = None
    bootstrap: BootstrapSettings = BootstrapSettings()


class HubSettings(common_settings.ProgramSettings):
    """Everything the hub is configured with. See docs/configuration.md."""

    model_config = SettingsConfigDict(env_prefix="EDGE_HUB_")

    api: ApiSettings = ApiSettings()
    storage: StorageSettings = StorageSettings()
    signing: SigningSettings = SigningSettings()
    mqtt: MqttSettings = MqttSettings()
    cluster: ClusterSettings = ClusterSettings()
    telemetry: TelemetrySettings = TelemetrySettings()
    rollouts: RolloutSettings = RolloutSettings()
    pki: PkiSettings = PkiSettings()

    def api_tokens(self) -> list[tuple[str, TokenScope, str]]:
        """Every API token as (token, scope, holder's name): ``api.tokens``, then the admin
        token of ``api.token_file`` or ``api.token``.

        Blocking; raises ``ConfigError`` naming the field when a file cannot be read (or is
        readable by other users, ``secret_files``) or holds nothing.
        """
        out: list[tuple[str, TokenScope, str]] = []
        files: list[tuple[str, Path, TokenScope, str]] = [
            (f"api.tokens.{i}.file", t.file, t.scope, t.name or t.file.name)
            for i, t in enumerate(self.api.tokens)]
        if self.api.token_file is not None:
            files.append(("api.token_file", self.api.token_file, "admin", "admin"))
        for field, path, scope, name in files:
            try:
                token = common_settings.read_secret(path, self.secret_files)
            except OSError as exc:
                raise ConfigError([(field, f"cannot read: {exc.strerror or exc}",
                                    str(path))]) from exc
            if not token.strip():
                raise ConfigError([(field, "the file holds no token", str(path))])
            out.append((token, scope, name))
        if self.api.token_file is None and self.api.token:
            out.append((self.api.token, "admin", "admin"))
        return out

    def pki_dir(self) -> Path:
        """The CA's folder: ``pki.dir``, else ``<storage.data_dir>/pki``."""
        return self.pki.dir if self.pki.dir is not None else self.storage.data_dir / "pki"

    def public_url(self) -> str:
        """Base URL agents use to reach this hub."""
        if self.api.public_url:
            return self.api.public_url.rstrip("/")
        host = "127.0.0.1" if self.api.host in ("0.0.0.0", "") else self.api.host  # noqa: S104
        scheme = "http" if self.api.plain_http else "https"
        return f"{scheme}://{host}:{self.api.port}"


def load_settings(path: Path | str | None = None, **overrides: Any) -> HubSettings:
    """Build the hub settings; raise ConfigError listing each (field path, message, value)."""
    return common_settings.load(HubSettings, path, overrides, ConfigError)
