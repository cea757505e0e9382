"""run a model on image files, print one JSON object per image

Run a model on image files and print one JSON object per image on stdout: image path, model name
and version, provider, frame size, per-stage latency (ms), and the task's output ("classes" with
id/label/score, or "detections" with cls/label/score and a normalized xyxy box in [0, 1] of the
image). The quickest way to see a model work on this node, or to check a new version by hand: no
camera, broker or hub involved. Errors and logs go to stderr, so 'edge-agent infer ... | jq'
stays clean.

MODEL is a model folder (holding manifest.json), a manifest file, or an .onnx file with
manifest.json beside it. Engine settings (providers, threads) come from --config and
EDGE_AGENT_ENGINE__* variables like the agent's; --providers overrides them.

Exit status: 0 when every image succeeded, 1 when a model or an image failed (one line on stderr
each, no traceback; a bad image stops only itself, a bad model stops before any image), 2 for a
bad config.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import structlog

from edge_agent.contract import results
from edge_agent.contract.manifest import MANIFEST_NAME
from edge_agent.errors import InputError, ModelError

#: Largest image file read, bytes: a guard against pointing the command at a disk image.
MAX_IMAGE_BYTES = 256 * 1024 * 1024


def arguments(parser: argparse.ArgumentParser) -> None:
    """Model, images, and the config and providers to run with."""
    parser.add_argument("--model", required=True, metavar="MODEL",
                        help="model folder, manifest.json, or .onnx with manifest.json beside it")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    parser.add_argument("--config", metavar="FILE", help="agent config YAML (its engine section)")
    parser.add_argument("--providers", metavar="LIST",
                        help="comma-separated providers to allow, e.g. 'cpu' or "
                        "'tensorrt,cuda,cpu'")
    parser.add_argument("--log-level", default="warning",
                        choices=["debug", "info", "warning", "error"],
                        help="log level on stderr (default: warning)")


def resolve_manifest(model: str) -> Path:
    """The manifest path for a ``--model`` argument; ``ModelError`` when there is none."""
    p = Path(model)
    if p.is_dir():
        p = p / MANIFEST_NAME
    elif p.suffix == ".onnx":
        if not p.exists():
            raise ModelError(f"{p}: model file not found")
        p = p.with_name(MANIFEST_NAME)
    if not p.is_file():
        raise ModelError(f"{p}: manifest not found")
    return p


def read_image(path: str) -> Any:
    """Decode an image file to a BGR array; ``InputError`` with a one-line reason."""
    import cv2  # noqa: PLC0415 - keep `edge-agent --help` fast
    import numpy as np  # noqa: PLC0415

    p = Path(path)
    if not p.exists():
        raise InputError(f"{path}: no such file")
    if p.is_dir():
        raise InputError(f"{path}: is a directory, not an image")
    try:
        size = p.stat().st_size
        if size > MAX_IMAGE_BYTES:
            raise InputError(f"{path}: {size} bytes is larger than {MAX_IMAGE_BYTES}")
        data = p.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from exc
    frame = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if frame is None or frame.size == 0:
        raise InputError(f"{path}: not an image (or a corrupt one)")
    return frame


def _quiet_logging(level: str) -> None:
    """Logs to stderr: stdout carries only the JSON results."""
    from edge_agent.common.logs import configure_logging  # noqa: PLC0415

    configure_logging(level, json=None if sys.stderr.isatty() else True)
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.StreamHandler):
            h.setStream(sys.stderr)


def run(args: argparse.Namespace) -> int:
    """Load the model, run every image, print results; return the exit status."""
    import cv2  # noqa: PLC0415
    import orjson  # noqa: PLC0415
    from pydantic import ValidationError  # noqa: PLC0415

    from edge_agent.config import ConfigError, EngineSettings, load_settings  # noqa: PLC0415
    from edge_agent.inference.engine import LoadedModel  # noqa: PLC0415

    _quiet_logging(args.log_level)
    # OpenCV's own decoder warnings would break the one-line errors
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    engine = load_settings(args.config).engine
    if args.providers:
        wanted = [p.strip() for p in args.providers.split(",") if p.strip()]
        try:
            engine = EngineSettings.model_validate({**engine.model_dump(), "providers": wanted})
        except ValidationError as exc:
            raise ConfigError([("--providers", exc.errors()[0]["msg"], args.providers)]) from exc
    model = LoadedModel.load(resolve_manifest(args.model), engine)
    if model.providers[0] not in engine.providers:
        # the engine keeps a model serving on CPU; a person who asked for a GPU must hear it
        print(f"edge-agent: warning: none of the allowed providers "
              f"({','.join(engine.providers)}) is available here; running on "
              f"{model.providers[0]}", file=sys.stderr, flush=True)
    failed = 0
    try:
        for image in args.images:
            try:
                frame = read_image(image)
                res = model.infer(frame)
            except InputError as exc:  # the message names the file
                print(f"edge-agent: error: {exc}", file=sys.stderr, flush=True)
                failed += 1
                continue
            except ModelError as exc:  # e.g. NaN outputs for this image
                print(f"edge-agent: error: {image}: {exc}", file=sys.stderr, flush=True)
                failed += 1
                continue
            # not a result message (no node, camera or seq): a person's view of one image,
            # with the file and the provider it ran on; the stages are the wire's
            obj: dict[str, Any] = {
                "image": image,
                "model": {"name": model.name, "version": model.version},
                "task": model.task,
                "provider": model.providers[0],
                "frame": {"width": int(frame.shape[1]), "height": int(frame.shape[0])},
                "latency_ms": results.latencies(preprocess=res.preprocess_ms,
                                                inference=res.inference_ms,
                                                postprocess=res.postprocess_ms),
                **res.output,
            }
            sys.stdout.write(orjson.dumps(obj).decode() + "\n")
            sys.stdout.flush()
    finally:
        model.close()
    return 1 if failed else 0
