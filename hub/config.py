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

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from edge_agent.common import mqtt as common_mqtt
from edge_agent.common import settings as common_settings
from edge_agent.contract.protocol import DEFAULT_LABEL_PREFIX, DEFAULT_TOPIC_PREFIX
from hub.errors import HubError


class ConfigError(common_settings.ConfigError, HubError, code="bad_config", exit_code=2):
    """A config that cannot be used. ``errors`` holds (field path, message, offending value)."""


class ApiSettings(common_settings.Section):
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


class StorageSettings(common_settings.Section):
    #: Folder for artifacts (content-addressed by sha256) and the SQLite database (a PVC).
    data_dir: Path = Path("/var/lib/edge-hub")


class SigningSettings(common_settings.Section):
    #: Refuse uploads without a valid ed25519 signature. Default false (opt-in).
    require_signed: bool = False
    #: PEM public keys that signatures are checked against.
    public_key_files: list[Path] = Field([])


class MqttSettings(common_mqtt.ConnectionSettings):
    """The broker the hub takes the agents' state and telemetry from and sends desired state to."""

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

    def api_token(self) -> str | None:
        """The bearer token for mutating endpoints (file wins over the inline value).

        Blocking when ``api.token_file`` is set; raises ``OSError`` when it cannot be read.
        """
        if self.api.token_file is not None:
            return common_settings.read_secret(self.api.token_file) or None
        return self.api.token

    def public_url(self) -> str:
        """Base URL agents use to reach this hub."""
        if self.api.public_url:
            return self.api.public_url.rstrip("/")
        host = "127.0.0.1" if self.api.host in ("0.0.0.0", "") else self.api.host  # noqa: S104
        return f"http://{host}:{self.api.port}"


def load_settings(path: Path | str | None = None, **overrides: Any) -> HubSettings:
    """Build the hub settings; raise ConfigError listing each (field path, message, value)."""
    return common_settings.load(HubSettings, path, overrides, ConfigError)
