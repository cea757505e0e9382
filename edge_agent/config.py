"""The agent's one typed settings object, built once in ``main()`` and passed down.

Sources, highest priority first: keyword arguments, environment (``EDGE_AGENT_`` prefix, nested
keys joined by ``__``, e.g. ``EDGE_AGENT_MQTT__HOST``), the YAML config file, field defaults.
Unknown keys are rejected everywhere, so a typo never silently runs with a default. Secrets
(passwords, tokens) are read from files named in the config, never written in it. How a file
and the environment become settings, and how errors are reported, is shared with the hub
(``edge_agent.common.settings``); this module says what the agent's settings are.

It also owns the grammar of camera source URLs (``parse_source``): a URL is validated here, so a
typo is a config error with its field path, and capture opens what this grammar accepted.

Every field says its unit, its default and why that default.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import SplitResult, parse_qs, urlsplit

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from edge_agent.common import mqtt as common_mqtt
from edge_agent.common import settings as common_settings
from edge_agent.contract.protocol import DEFAULT_TOPIC_PREFIX, Name, Node
from edge_agent.errors import AgentError


class ConfigError(common_settings.ConfigError, AgentError):
    """A config that cannot be used. ``errors`` holds (field path, message, offending value)."""

    exit_code = 2


# ----------------------------------------------------------------------- camera source URLs

SourceKind = Literal["file", "stream", "usb", "test"]
_STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https")
#: Test pattern parameters: name -> (lowest, highest, default).
_TEST_PARAMS = {"width": (16, 7680, 640), "height": (16, 4320, 480), "fps": (0.1, 1000, 30)}


@dataclass(frozen=True)
class SourceSpec:
    """A parsed camera source URL."""

    kind: SourceKind
    #: File path, stream URL, device index (as text) or ``pattern``.
    target: str
    #: Test pattern parameters (width, height, fps).
    params: dict[str, float] = field(default_factory=dict)

    @property
    def live(self) -> bool:
        """Live sources pace themselves; only files are paced (or not) by the reader."""
        return self.kind != "file"


def parse_source(url: str) -> SourceSpec:
    """Parse a camera URL; raise ``ValueError`` with a message that says what is accepted."""
    if not url or not url.strip():
        raise ValueError("camera URL is empty")
    if "://" not in url:
        return SourceSpec("file", url)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    parse = _SCHEMES.get("stream" if scheme in _STREAM_SCHEMES else scheme)
    if parse is None:
        raise ValueError(
            f"unsupported source scheme {scheme!r}: use a file path, file://, rtsp://, "
            "http(s)://, rtmp://, usb://N or test://pattern"
        )
    return parse(url, parts)


def _file_source(url: str, parts: SplitResult) -> SourceSpec:
    path = parts.path if not parts.netloc else parts.netloc + parts.path
    if not path:
        raise ValueError("file:// URL has no path")
    return SourceSpec("file", path)


def _stream_source(url: str, parts: SplitResult) -> SourceSpec:
    if not parts.hostname:
        raise ValueError(f"{parts.scheme.lower()}:// URL has no host")
    return SourceSpec("stream", url)


def _usb_source(url: str, parts: SplitResult) -> SourceSpec:
    idx = parts.netloc or parts.path.lstrip("/")
    if not idx.isdigit():
        raise ValueError("usb:// needs a device index, e.g. usb://0")
    return SourceSpec("usb", idx)


def _test_source(url: str, parts: SplitResult) -> SourceSpec:
    if parts.netloc != "pattern":
        raise ValueError("test:// supports only test://pattern")
    params: dict[str, float] = {}
    for key, values in parse_qs(parts.query, strict_parsing=False).items():
        if key not in _TEST_PARAMS:
            raise ValueError(f"test://pattern: unknown parameter {key!r}")
        lo, hi, _ = _TEST_PARAMS[key]
        try:
            val = float(values[-1])
        except ValueError:
            raise ValueError(f"test://pattern: {key} must be a number") from None
        if not lo <= val <= hi:
            raise ValueError(f"test://pattern: {key} must be in [{lo}, {hi}]")
        params[key] = val
    for key, (_, _, default) in _TEST_PARAMS.items():
        params.setdefault(key, float(default))
    return SourceSpec("test", "pattern", params)


_SCHEMES = {"file": _file_source, "stream": _stream_source, "usb": _usb_source,
            "test": _test_source}


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

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parse_source(v)  # raises ValueError naming the accepted forms
        return v

    @property
    def source(self) -> SourceSpec:
        """The parsed ``url`` (valid: the validator parsed it once already)."""
        return parse_source(self.url)


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
    #: few inferences of a YOLOv8n-sized model, so startup grows by about 2-3 s per model.
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


class MqttSettings(common_mqtt.ConnectionSettings):
    """The broker the agent publishes to and takes its desired state from."""

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


class HttpSettings(common_settings.Section):
    #: Listen address. Default 0.0.0.0 in a pod (probes come from the kubelet on the node IP);
    #: set 127.0.0.1 to listen on loopback only.
    host: str = "0.0.0.0"  # noqa: S104 - the kubelet probes the pod IP
    #: Port. Default 8080; 0 disables the HTTP server.
    port: int = Field(8080, ge=0, le=65535)
    #: Largest image accepted by ``POST /v1/infer``, bytes. Default 8 MiB (a 4K JPEG is ~3 MiB).
    max_upload_bytes: int = Field(8 * 1024 * 1024, ge=1024)


class HubClientSettings(common_settings.Section):
    #: Hub base URL for artifact downloads (the desired state names full URLs; this is a
    #: fallback and the origin check). None = no hub: serve local models only.
    url: str | None = None
    #: File holding the bearer token for reads, if the hub requires one.
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


def _default_node() -> str:
    # In a DaemonSet, NODE_NAME comes from the downward API (spec.nodeName).
    return os.environ.get("NODE_NAME") or socket.gethostname().lower()


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
    settings = common_settings.load(AgentSettings, path, overrides, ConfigError)
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
    if errors:
        raise ConfigError(errors)
