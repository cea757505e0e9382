"""The hub's one typed settings object, built once in ``main()`` and passed down.

Sources, highest first: environment (``EDGE_HUB_`` prefix, nested keys joined by ``__``), the
YAML config file (``--config``), field defaults. Unknown keys are rejected. Secrets (the API
token, MQTT password) come from files. Every field says its unit, default and why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from edge_agent.contract.protocol import DEFAULT_LABEL_PREFIX, DEFAULT_TOPIC_PREFIX
from hub.errors import HubError


class ConfigError(HubError):
    """A config that cannot be used. ``errors`` holds (field path, message, offending value)."""

    code = "bad_config"
    exit_code = 2

    def __init__(self, errors: list[tuple[str, str, Any]]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{p}: {m} (got {v!r})" for p, m, v in errors))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ApiSettings(_Section):
    #: Listen address. Default 127.0.0.1: nothing listens beyond loopback unless configured
    #: (the k3s manifest sets 0.0.0.0 inside the pod).
    host: str = "127.0.0.1"
    #: Port. Default 8081 (the agent's HTTP port is 8080 on the same box in the demo).
    port: int = Field(8081, ge=0, le=65535)
    #: File holding the bearer token required by mutating endpoints. None with ``token`` unset
    #: refuses every mutating request (fail closed).
    token_file: Path | None = None
    #: The token itself (prefer token_file; env EDGE_HUB_API__TOKEN for tests and the demo).
    token: str | None = None
    #: Whether reads (list, show, download) need the token too. Default false: agents on the
    #: site network fetch artifacts, which are verified by sha256 anyway.
    read_requires_token: bool = False
    #: Largest model upload, bytes. Default 1 GiB (the largest edge models are ~300 MB).
    max_upload_bytes: int = Field(1024**3, ge=1024)
    #: Base URL agents use to reach this hub (artifact URLs in desired state). Default derived
    #: from host and port, which is only right on one machine.
    public_url: str | None = None


class StorageSettings(_Section):
    #: Folder for artifacts (content-addressed by sha256) and the SQLite database (a PVC).
    data_dir: Path = Path("/var/lib/edge-hub")


class SigningSettings(_Section):
    #: Refuse uploads without a valid ed25519 signature. Default false (opt-in).
    require_signed: bool = False
    #: PEM public keys that signatures are checked against.
    public_key_files: list[Path] = []


class MqttSettings(_Section):
    #: Broker host name or address. Default 127.0.0.1.
    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    #: First topic level, the same as the agents' ``mqtt.topic_prefix``. Default ``edge``.
    topic_prefix: str = DEFAULT_TOPIC_PREFIX
    #: Broker user name; None = anonymous.
    username: str | None = None
    #: File holding the broker password (a mounted Secret).
    password_file: Path | None = None
    #: Connect with TLS. Default false: a site-local broker.
    tls: bool = False
    #: CA bundle (PEM) that verifies the broker; None = the system store.
    ca_file: Path | None = None
    #: Seconds between keepalives. Default 15 s.
    keepalive_s: int = Field(15, ge=5, le=3600)


class ClusterSettings(_Section):
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
    #: First retry delay after a 409/429/5xx/timeout, seconds; doubles per attempt (with
    #: jitter) up to ``api_backoff_max_s``. Default 0.2 s: a conflict usually clears at once.
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


class TelemetrySettings(_Section):
    #: Sliding window over which per-node metrics are aggregated, seconds. Default 300 s.
    window_s: float = Field(300.0, gt=0)
    #: A node silent for this long is offline (the last will says so sooner). Default 60 s =
    #: six missed 10 s telemetry messages.
    offline_after_s: float = Field(60.0, gt=0)


class RolloutSettings(_Section):
    #: How often active rollouts are stepped even when no node state changed, seconds.
    #: Default 1 s: bake times and deadlines are minutes, a second of slack is nothing.
    tick_s: float = Field(1.0, gt=0)
    #: Nodes whose labels are patched per step of a wave. Default 500: a wave of thousands
    #: goes out in a few steps while pause/abort commands still get in between them.
    apply_batch: int = Field(500, ge=1)
    #: Seconds after start-up before rollouts are stepped, so the agents' retained states
    #: have arrived (otherwise every node would look offline and be skipped). Default 3 s.
    startup_grace_s: float = Field(3.0, ge=0)


class LogSettings(_Section):
    #: Minimum level of log lines. Default info.
    level: Literal["debug", "info", "warning", "error"] = "info"
    #: JSON lines (true), console (false), or by TTY (null, default).
    json_lines: bool | None = None


class HubSettings(BaseSettings):
    """Everything the hub is configured with. See docs/configuration.md."""

    model_config = SettingsConfigDict(
        env_prefix="EDGE_HUB_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    log: LogSettings = LogSettings()
    api: ApiSettings = ApiSettings()
    storage: StorageSettings = StorageSettings()
    signing: SigningSettings = SigningSettings()
    mqtt: MqttSettings = MqttSettings()
    cluster: ClusterSettings = ClusterSettings()
    telemetry: TelemetrySettings = TelemetrySettings()
    rollouts: RolloutSettings = RolloutSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (env_settings, init_settings)

    def api_token(self) -> str | None:
        """The bearer token for mutating endpoints (file wins over the inline value)."""
        if self.api.token_file is not None:
            return self.api.token_file.read_text(encoding="utf-8").strip() or None
        return self.api.token

    def public_url(self) -> str:
        """Base URL agents use to reach this hub."""
        if self.api.public_url:
            return self.api.public_url.rstrip("/")
        host = "127.0.0.1" if self.api.host in ("0.0.0.0", "") else self.api.host  # noqa: S104
        return f"http://{host}:{self.api.port}"


def load_settings(path: Path | str | None = None, **overrides: Any) -> HubSettings:
    """Build the hub settings; raise ConfigError listing each (field path, message, value)."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except OSError as exc:
            raise ConfigError([("(file)", f"cannot read config: {exc.strerror}", str(p))]) from exc
        except yaml.YAMLError as exc:
            raise ConfigError([("(file)", f"not valid YAML: {exc}", str(p))]) from exc
        if not isinstance(loaded, dict):
            raise ConfigError([("(root)", "config must be a mapping", type(loaded).__name__)])
        data = loaded
    data.update(overrides)
    try:
        return HubSettings(**data)
    except ValidationError as exc:
        errs = []
        for e in exc.errors():
            msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
            errs.append((".".join(str(x) for x in e["loc"]) or "(root)", msg, e.get("input")))
        raise ConfigError(errs) from exc
