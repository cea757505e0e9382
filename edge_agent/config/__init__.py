"""The agent's one typed settings object, built once in ``main()`` and passed down.

Sources, highest priority first: keyword arguments, environment (``EDGE_AGENT_`` prefix, nested
keys joined by ``__``, e.g. ``EDGE_AGENT_MQTT__HOST``), the YAML config file, field defaults.
Unknown keys are rejected everywhere, so a typo never silently runs with a default. Secrets
(passwords, tokens) are read from files named in the config, never written in it. How a file
and the environment become settings, and how errors are reported, is shared with the hub
(``edge_agent.common.settings``); this module says what the agent's settings are.

Camera URLs are validated here with the grammar of ``edge_agent.camera_urls`` (which also says
what of such a URL may be shown), so a typo is a config error with its field path.

Every field says its unit, its default and why that default. A camera's motion gating
(``config.motion``) and its zones, lines and tracking (``config.tracking``) have modules of their
own; ``config.files`` checks the files a config names (``edge-agent validate-config``).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from edge_agent.camera_urls import SourceSpec, parse_source, redact_text, redact_url, url_secrets
from edge_agent.common import httpserver
from edge_agent.common import mqtt as common_mqtt
from edge_agent.common import settings as common_settings
from edge_agent.config import tracking
from edge_agent.config.motion import MotionSettings
from edge_agent.config.tracking import Lines, PublishMode, TrackingSettings, Zones
from edge_agent.contract.protocol import DEFAULT_TOPIC_PREFIX, Name, Node
from edge_agent.errors import AgentError


class ConfigError(common_settings.ConfigError, AgentError):
    """A config that cannot be used. ``errors`` holds (field path, message, offending value)."""

    exit_code = 2


# ----------------------------------------------------------------------------- the settings


Provider = Literal["tensorrt", "cuda", "cpu"]


class EngineSettings(common_settings.Section):
    """ONNX Runtime settings shared by every model on this node."""

    #: Execution providers to try, in order, among those onnxruntime reports as available.
    #: Default: TensorRT > CUDA > CPU, the fastest first; CPU is always the last resort.
    providers: list[Provider] = Field(["tensorrt", "cuda", "cpu"])
    #: Threads inside one ``session.run`` (ORT intra-op). Default 1: on small edge CPUs, several
    #: concurrent runs with 1 thread each beat one run with all threads (measured ~1.45x on 2
    #: cores with a YOLOv8n-sized model, docs/engine.md, bench/engine.py).
    intra_op_threads: int = Field(1, ge=1, le=64)
    #: Concurrent ``session.run`` calls per model. 0 = one per CPU core (the measured optimum).
    concurrency: int = Field(0, ge=0, le=64)
    #: TensorRT: build fp16 engines (2x faster on Jetson/T4 class GPUs, negligible accuracy loss).
    trt_fp16: bool = True
    #: TensorRT engine cache folder (engines take minutes to build; a host path keeps them).
    trt_cache_dir: Path = Path("/var/lib/edge-agent/trt-cache")
    #: Warm-up runs before a model serves (first runs allocate arenas and build kernels).
    warmup_runs: int = Field(2, ge=0, le=100)


class ModelSpec(common_settings.Section):
    """A model served from a local manifest (the hub's desired state can replace it)."""

    #: Model name, as cameras and the hub refer to it (lowercase letters, digits, '-').
    name: Name
    #: Path to the model's manifest JSON (``models/build.py`` writes them).
    manifest: Path



class CameraSettings(common_settings.Section):
    """One camera stream."""

    #: Camera name, used in result topics (lowercase letters, digits, '-').
    name: Name
    #: Source URL: a file path or ``file://``, ``rtsp://``, ``http(s)://``, ``usb://0`` (device
    #: index), or ``test://pattern?width=640&height=480&fps=30`` (synthetic, for tests).
    url: str
    #: Name of the model (in ``models``) that processes this camera's frames.
    model: str
    #: Frames per second to process at most; 0 = as fast as frames come. Default 0.
    fps_cap: float = Field(0.0, ge=0.0, le=1000.0)
    #: Restart a video file at its end (demo and soak tests). Default false: a file ends.
    loop: bool = False
    #: How a video file is read (live sources always run at their own rate): ``native`` plays it
    #: at the file's frame rate like a camera (frames inference cannot keep up with are dropped
    #: and counted); ``max`` reads each frame only when inference took the previous one (no
    #: drops; replays and benchmarks). Default ``native``: a file stands in for a camera.
    rate: Literal["native", "max"] = "native"
    #: Seconds without a frame before a connected camera counts as stalled; it is also the
    #: FFmpeg read timeout that ends a blocked read so the camera reconnects. Default 10 s:
    #: several keyframe intervals of a typical RTSP camera, short enough to notice a dead link.
    stall_timeout_s: float = Field(10.0, gt=0, le=3600)
    #: Seconds to wait for a stream to open (FFmpeg open timeout). Default 10 s.
    open_timeout_s: float = Field(10.0, gt=0, le=3600)
    #: Reconnect backoff bounds, seconds: attempt k waits in [d/2, d], d = min(max, min * 2**k)
    #: (half fixed, half jitter). Defaults 0.5 s and 30 s: quick after a blip, gentle on a
    #: camera that is down for long.
    reconnect_min_s: float = Field(0.5, gt=0, le=3600)
    reconnect_max_s: float = Field(30.0, gt=0, le=3600)
    #: Motion gating: infer only frames where something moved, plus a keep-alive (section
    #: ``cameras[].motion``, ``edge_agent.config.motion``). Default off.
    motion: MotionSettings = MotionSettings()
    #: What this camera publishes: ``frames`` (a result per frame), ``events`` (track events
    #: and zone occupancy only: an order of magnitude fewer messages) or ``both``. Default
    #: ``frames``: what subscribers got before tracking existed (``edge_agent.config.tracking``,
    #: docs/events.md).
    publish: PublishMode = "frames"
    #: Zones (polygons in frame fractions) whose occupancy and visits are reported (events).
    zones: Zones = Field(default_factory=list)
    #: Lines (segments in frame fractions) whose crossings are reported with direction.
    lines: Lines = Field(default_factory=list)
    #: A JPEG crop of each track's best frame when it ends (``cameras[].snapshot``). Default off.
    snapshot: tracking.SnapshotSettings = tracking.SnapshotSettings()

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parse_source(v)  # raises ValueError naming the accepted forms
        return v

    @property
    def source(self) -> SourceSpec:
        """The parsed ``url`` (valid: the validator parsed it once already)."""
        return parse_source(self.url)

    @property
    def display_url(self) -> str:
        """``url`` without credentials (``redact_url``): what logs and APIs may show."""
        return redact_url(self.url)

    def redact(self, text: str) -> str:
        """``text`` with this camera's credentials replaced by ``***``."""
        return redact_text(text, url_secrets(self.url))


class PipelineSettings(common_settings.Section):
    """How frames from all cameras are scheduled onto inference and where results go."""

    #: Inference worker threads shared by all cameras (each runs one ``session.run`` at a time).
    #: 0 = measured at startup: 1..CPU count workers (and batch sizes, below) are timed on each
    #: model and the fastest is kept. Default 0, because the best value depends on the machine
    #: and model (on 2 CPU cores, two concurrent runs with one ORT thread each win).
    workers: int = Field(0, ge=0, le=64)
    #: Largest batch of frames from different cameras run in one ``session.run`` when the model
    #: has a dynamic batch axis. 0 = measured with ``workers``; 1 = never batch. Batching only
    #: takes frames that are already waiting, so it never delays a frame. Default 0.
    max_batch: int = Field(0, ge=0, le=64)
    #: Seconds the startup measurement spends per candidate configuration. Default 0.4 s: a
    #: few inferences of a YOLOv8n-sized model, so a first start grows by about 2 s per model;
    #: a restart reuses the layout stored in ``hub.cache_dir`` for the same model digest, CPUs
    #: and CPU quota, and measures again in the background (docs/pipeline.md).
    calibrate_s: float = Field(0.4, gt=0, le=60)
    #: Results waiting for the event loop before new ones are dropped (counted). Default 1000:
    #: ~20 s of one camera at 50 fps; only reached when the loop itself is stuck.
    max_pending_results: int = Field(1000, ge=1)
    #: ``/healthz`` fails when one inference has run longer than this, seconds. Default 60 s:
    #: far above any sane inference, so only a wedged runtime trips it.
    stuck_after_s: float = Field(60.0, gt=0)
    #: A camera counts as delivering (``/readyz``) when a frame arrived within this, seconds.
    #: Default 5 s.
    ready_frame_age_s: float = Field(5.0, gt=0)
    #: Where results go: ``mqtt`` = the durable outbox drained to the broker in ``mqtt``;
    #: ``jsonl`` = append JSON lines to ``jsonl_path`` (no broker needed: tests, demos, sites
    #: without MQTT). Default ``mqtt``, the production path.
    sink: Literal["mqtt", "jsonl"] = "mqtt"
    #: File for ``sink: jsonl``; per-camera seqs resume after those already in it.
    jsonl_path: Path = Path("/var/lib/edge-agent/results.jsonl")
    #: Re-evaluate measured layouts while serving (docs/pipeline.md). Default on: see there.
    retune: bool = True
    #: Seconds between periodic re-evaluations (+-10 % jitter), when saturated. Default 600.
    retune_interval_s: float = Field(600.0, ge=10, le=86_400)
    #: Seconds between looks at the live counters (a trigger must hold twice). Default 1.
    retune_check_s: float = Field(1.0, gt=0, le=600)
    #: Trigger below (1 - this) of the chosen layout's live fps, when saturated. Default 0.15.
    retune_drop_fraction: float = Field(0.15, gt=0, lt=1)
    #: Trigger when this many CPUs sit idle and unused by us while backed up. Default 0.5.
    retune_idle_cores: float = Field(0.5, gt=0, le=64)
    #: Least seconds between triggered re-evaluations (doubles while kept). Default 30.
    retune_cooldown_s: float = Field(30.0, ge=0, le=86_400)


class MqttSettings(common_mqtt.ConnectionSettings):
    """The broker the agent publishes to and takes its desired state from: over TLS with this
    node's own certificate by default, whose name the broker's ACL confines to this node's
    topics (docs/security.md)."""

    #: First topic level of every topic (docs/protocol.md). Default ``edge``.
    topic_prefix: str = DEFAULT_TOPIC_PREFIX
    #: QoS 1 messages in flight before waiting for PUBACKs. Default 100: enough to fill a
    #: 50 ms RTT link at ~2,000 msg/s; the duplicates after a broker crash are at most this many.
    max_inflight: int = Field(100, ge=1, le=65535)
    #: Seconds between telemetry messages. Default 10 s: the hub's gates judge over minutes.
    telemetry_interval_s: float = Field(10.0, gt=0)


class OutboxSettings(common_settings.Section):
    #: SQLite file on a host path that survives pod restarts.
    path: Path = Path("/var/lib/edge-agent/outbox.sqlite3")
    #: Milliseconds between commits of appended results. A crash can lose at most this window
    #: of results that were accepted but not yet committed. Default 50 ms.
    commit_interval_ms: int = Field(50, ge=0, le=10_000)
    #: Disk budget in bytes for queued results: the database file plus its WAL stay within it
    #: (+10 %). Default 256 MiB (~400k results of ~600 B). At least 1 MiB: below that, SQLite's
    #: fixed cost (schema pages, the smallest WAL) would be most of the budget.
    max_bytes: int = Field(256 * 1024 * 1024, ge=1024 * 1024)
    #: Row cap. Default 1,000,000.
    max_rows: int = Field(1_000_000, ge=1)
    #: Results older than this are dropped (counted as ``max_age``). Default 7 days.
    max_age_s: float = Field(7 * 24 * 3600, gt=0)
    #: When full: drop the oldest queued results, or refuse new ones. Both are counted.
    policy: Literal["drop-oldest", "reject-new"] = "drop-oldest"
    #: Bytes of accepted results held in memory while they cannot be committed (disk full,
    #: file unopenable); beyond it the policy drops (counted as ``disk_full``/``db_error``).
    #: Default 16 MiB: ~30,000 results, minutes of a busy node, small next to the agent's RSS.
    max_pending_bytes: int = Field(16 * 1024 * 1024, ge=64 * 1024)


class HttpSettings(httpserver.ServerLimits):
    """The agent's HTTP endpoints: probes, metrics, state, one-shot inference."""

    #: Listen address. Default 0.0.0.0 in a pod (probes come from the kubelet on the node IP);
    #: set 127.0.0.1 to listen on loopback only.
    host: str = "0.0.0.0"  # noqa: S104 - the kubelet probes the pod IP
    #: Port. Default 8080; 0 disables the HTTP server.
    port: int = Field(8080, ge=0, le=65535)
    #: Largest image accepted by ``POST /v1/infer``, bytes. Default 8 MiB (a 4K JPEG is ~3 MiB).
    max_upload_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    #: Largest image ``POST /v1/infer`` decodes, pixels (width x height, read from the image's
    #: header before anything is decoded). Default 16,777,216 (4096 x 4096, 48 MiB decoded):
    #: above 4K UHD, far below what a small PNG can claim (30000 x 30000 fits in 874 KB and
    #: would decode to 2.7 GB).
    max_image_pixels: int = Field(4096 * 4096, ge=64 * 64, le=1 << 30)
    #: File holding the bearer token ``POST /v1/infer`` requires. Without one, the endpoint is
    #: open when ``host`` is a loopback address and off (403) otherwise: inference on this
    #: node's models is not for everyone on the site network. Probes and metrics need none.
    token_file: Path | None = None
    #: Whether ``POST /v1/infer`` is served at all. Default true (see ``token_file``).
    infer: bool = True
    #: Connections open at once; one more is answered 503 and closed. Default 64: probes, a
    #: Prometheus scrape and a few uploads at a time.
    max_connections: int = Field(64, ge=1, le=65535)


class HubClientSettings(common_settings.Section):
    #: Hub base URL (``https://host:port``): artifacts are fetched from this origin only
    #: (scheme, host and port); a desired message naming any other is refused before a
    #: connection is made. None = no hub: serve local models only, take no desired state.
    url: str | None = None
    #: CA (PEM) the hub's certificate must verify against (the fleet CA). None: the system's
    #: trusted CAs.
    ca_file: Path | None = None
    #: This node's client certificate (PEM, role ``agent``, subject = the node name): how the
    #: agent proves who it is when it downloads. None: no certificate (a token, or a hub with
    #: open reads).
    cert_file: Path | None = None
    #: Private key of ``cert_file`` (PEM; refused when other users can read it). Re-read for
    #: every download, so a renewed certificate is used without a restart.
    key_file: Path | None = None
    #: File holding a bearer token for reads (a ``read`` token), for hubs where agents have no
    #: certificate; sent to the hub's origin only. Prefer ``cert_file``: one token shared by a
    #: fleet is a credential every box holds.
    token_file: Path | None = None
    #: ed25519 public key (PEM) that artifacts must be signed with; None = signatures not checked.
    public_key_file: Path | None = None
    #: Local model cache on a host path; previous versions stay for rollbacks without download.
    cache_dir: Path = Path("/var/lib/edge-agent/models")
    #: Cache budget in bytes; least recently used versions beyond it are pruned (never the
    #: active or previous one). Default 2 GiB.
    cache_max_bytes: int = Field(2 * 1024**3, ge=1024 * 1024)
    #: Previous versions per model that pruning never removes, so a rollback needs no download.
    #: Default 1 (the version before the active one); more costs disk, not memory.
    keep_previous: int = Field(1, ge=0, le=10)
    #: Seconds one artifact fetch may take in total, retries and backoff included. Default 600 s:
    #: a 300 MB model over a 5 MB/s site uplink with a few retries.
    download_timeout_s: float = Field(600.0, gt=0)
    #: Seconds to connect, or to wait for the next bytes of a response, before the attempt is
    #: abandoned and retried (resuming with Range). Default 30 s: a stalled link, not a slow one.
    stall_timeout_s: float = Field(30.0, gt=0)
    #: Retries after the first attempt for temporary failures (connection errors, timeouts, HTTP
    #: 408/429/5xx). Default 5: with the backoff below, rides out about a minute of hub outage.
    download_retries: int = Field(5, ge=0, le=100)
    #: Backoff bounds, seconds: retry k waits in [d/2, d], d = min(retry_max_s, retry_min_s *
    #: 2**k) (half fixed, half jitter, so a fleet does not retry in lockstep). Defaults 0.5/30 s.
    retry_min_s: float = Field(0.5, gt=0)
    retry_max_s: float = Field(30.0, gt=0)

    @field_validator("url")
    @classmethod
    def _hub_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http(s) URL with a host, e.g. https://edge-hub:8081")
        if parts.username is not None or parts.password is not None:
            raise ValueError("must not carry credentials (use cert_file or token_file)")
        return v


class ModelSyncSettings(common_settings.Section):
    """How a new model version is validated, switched in, watched and rolled back."""

    #: Validation inferences on a synthetic frame before the switch. Default 3: the first run
    #: after warm-up can still be slow; the median of three is judged against the budget.
    validation_runs: int = Field(3, ge=1, le=100)
    #: Median latency budget of one validation inference, milliseconds. Default 2000 ms: generous
    #: for the largest edge models on a small ARM CPU; it catches a pathological model, not a
    #: slightly slower one (the rollout's latency gates judge that).
    validation_latency_ms: float = Field(2000.0, gt=0)
    #: Inferences after the switch during which the previous version stays loaded for an instant
    #: switch back. Default 20 (under a second at camera rates).
    probation_frames: int = Field(20, ge=1, le=100_000)
    #: Failed inferences within the probation window that switch back to the previous version.
    #: Default 3: one transient error does not roll back, a broken model does within 3 frames.
    probation_failures: int = Field(3, ge=1, le=100_000)
    #: Seconds the probation lasts at most (no frames flowing, e.g. a model no camera uses);
    #: after it, the previous session is released. Default 60 s.
    probation_timeout_s: float = Field(60.0, gt=0)
    #: Seconds to wait for in-flight inferences on a replaced session before closing it anyway.
    #: Default 10 s: far above one inference, below the pod's termination grace period.
    drain_timeout_s: float = Field(10.0, gt=0)
    #: Seconds between checks of the config file for changes (a reload applies model and camera
    #: changes without a restart; SIGHUP does the same at once). 0 disables the watch. Default 2 s.
    reload_poll_s: float = Field(2.0, ge=0)
    #: A candidate run in shadow (``DesiredModel.shadow``) may spend at most this fraction of
    #: the active version's inference seconds on its own samples (frames beyond it are skipped
    #: and counted), so the active model's throughput drops by at most about this fraction while
    #: a rollout's shadow phase runs. Default 0.10: issue 13's budget; a shadow phase needs a few
    #: hundred samples, which a camera at 10 fps gives in minutes.
    shadow_max_slowdown: float = Field(0.10, gt=0, le=0.5)


def _default_node() -> str:
    # In a DaemonSet, NODE_NAME comes from the downward API (spec.nodeName).
    return os.environ.get("NODE_NAME") or socket.gethostname().lower()


class IdentitySettings(common_settings.Section):
    """This node's own certificate on K3s: asked of the hub at start, renewed before it ends."""

    #: Get this node's certificate from the hub (``POST /v1/pki/bootstrap``, the hub verified
    #: against ``hub.ca_file``) with the pod's projected ServiceAccount token, write it with a
    #: new key to ``mqtt.cert_file`` and ``mqtt.key_file`` (point ``hub.cert_file`` and
    #: ``hub.key_file`` at the same files), and renew it while running. Needs ``hub.url`` and
    #: ``mqtt.tls``. Default false: a static site installs certificates made by ``edge-hub pki
    #: issue``.
    bootstrap: bool = False
    #: The projected ServiceAccount token (audience ``edge-hub``) the kubelet keeps fresh; read
    #: anew for every request. Default: where the DaemonSet mounts it.
    token_file: Path = Path("/var/run/secrets/edge-hub/token")
    #: Renew when this fraction of the certificate's life has passed. Default 0.67: a 24 h
    #: certificate is renewed after 16 h, leaving 8 h for a hub that is down.
    renew_at: float = Field(0.67, ge=0.1, le=0.95)
    #: Backoff between failed requests, seconds (attempt k waits in [d/2, d], d = min(max,
    #: min * 2**k)). Defaults 1 s and 300 s: quick while a hub starts, gentle when it is down.
    retry_min_s: float = Field(1.0, gt=0)
    #: Upper bound of the backoff, seconds (see ``retry_min_s``).
    retry_max_s: float = Field(300.0, gt=0)
    #: Seconds one request to the hub may take. Default 30 s.
    timeout_s: float = Field(30.0, gt=0, le=600)


class AgentSettings(common_settings.ProgramSettings):
    """Everything the agent is configured with. See docs/configuration.md."""

    model_config = SettingsConfigDict(env_prefix="EDGE_AGENT_")

    #: This node's name (topics, labels). Default: $NODE_NAME, else the host name.
    node: Node = Field(default_factory=_default_node)
    engine: EngineSettings = EngineSettings()
    models: list[ModelSpec] = Field([])
    cameras: list[CameraSettings] = Field([])
    mqtt: MqttSettings = MqttSettings()
    outbox: OutboxSettings = OutboxSettings()
    http: HttpSettings = HttpSettings()
    hub: HubClientSettings = HubClientSettings()
    pipeline: PipelineSettings = PipelineSettings()
    model_sync: ModelSyncSettings = ModelSyncSettings()
    identity: IdentitySettings = IdentitySettings()
    #: Object tracking for track events and zones (``edge_agent.config.tracking``).
    tracking: TrackingSettings = TrackingSettings()
    #: Seconds SIGTERM waits for in-flight work and the outbox to drain before exiting. Default
    #: 20 s: below the pod's 30 s terminationGracePeriodSeconds, so we exit before SIGKILL.
    shutdown_timeout_s: float = Field(20.0, gt=0, le=600)

    def model_post_init(self, __context: Any) -> None:
        names = [m.name for m in self.models]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate model names: {sorted(dup)}")
        cams = [c.name for c in self.cameras]
        if len(set(cams)) != len(cams):
            raise ValueError("duplicate camera names")


def load_settings(path: Path | str | None = None, **overrides: Any) -> AgentSettings:
    """Build the settings from an optional YAML file, the environment and ``overrides``.

    Raises ConfigError listing every problem as (field path, message, value), the cross-field
    checks (``check_settings``) included.
    """
    try:
        settings = common_settings.load(AgentSettings, path, overrides, ConfigError)
    except ConfigError as exc:
        # an error quotes the offending value: never a camera's password
        raise ConfigError([(f, m, redact_url(v) if isinstance(v, str) else v)
                           for f, m, v in exc.errors]) from None
    check_settings(settings)
    return settings


def check_settings(settings: AgentSettings) -> None:
    """Cross-field checks the settings model cannot do alone; raise ``ConfigError``."""
    errors: list[tuple[str, str, Any]] = []
    models = {m.name for m in settings.models}
    for i, cam in enumerate(settings.cameras):
        # a model the hub may still send is fine; without a hub nothing else can provide it
        if cam.model not in models and settings.hub.url is None:
            errors.append((f"cameras.{i}.model", "no model of that name in models", cam.model))
    errors += _identity_problems(settings)
    errors += tracking.tracking_problems([cam.publish for cam in settings.cameras])
    errors += tracking.snapshot_problems([c.publish for c in settings.cameras],
                                         [c.snapshot.enabled for c in settings.cameras])
    if errors:
        raise ConfigError(errors)


def _identity_problems(settings: AgentSettings) -> list[tuple[str, str, Any]]:
    """A bootstrapped identity needs a hub to ask and TLS files to write."""
    if not settings.identity.bootstrap:
        return []
    m = settings.mqtt
    out: list[tuple[str, str, Any]] = []
    if settings.hub.url is None:
        out.append(("hub.url", "identity.bootstrap asks the hub for the certificate", None))
    if not m.tls:
        out.append(("mqtt.tls", "identity.bootstrap makes a TLS client certificate", m.tls))
    for name in ("cert_file", "key_file"):
        if getattr(m, name) is None:
            out.append((f"mqtt.{name}", "identity.bootstrap writes the certificate and key "
                        "there", None))
    return out
