"""Execution provider selection: TensorRT > CUDA > CPU, by what is installed and allowed.

The engine asks for the providers ``EngineSettings.providers`` allows, in that order, among those
onnxruntime reports as available; CPU is always the last resort. A provider that is allowed
but not installed, or that fails to initialise (missing CUDA libraries, an unsupported GPU),
is a *fallback*: logged once per model load (``provider_fallback``) and counted in
``FALLBACKS``, which the metrics module exports. A silent fallback from GPU to CPU is the
classic way an edge box ends up 10x slower without anyone noticing.

TensorRT engines take minutes to build, so they are cached on disk in a folder keyed by the
model's sha256, the GPU model and the TensorRT version: a new model version, a different GPU or
a TensorRT upgrade each get a fresh engine, never a stale or incompatible one.
"""

from __future__ import annotations

import ctypes.util
import functools
import importlib.metadata
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog

from edge_agent.config import EngineSettings

log = structlog.get_logger(__name__)

#: Config names -> onnxruntime provider names, fastest first.
ORT_NAMES: dict[str, str] = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
_SHORT = {v: k for k, v in ORT_NAMES.items()}

#: Process-wide fallback counts, keyed by (provider, reason); reason is ``unavailable`` (not
#: installed in this onnxruntime build) or ``init_failed`` (installed, failed to start).
#: Read it with ``fallback_counts()``; increments take ``_lock``.
FALLBACKS: dict[tuple[str, str], int] = {}
_lock = threading.Lock()


def fallback_counts() -> dict[tuple[str, str], int]:
    """A snapshot of ``FALLBACKS`` (safe to iterate while models load in other threads)."""
    with _lock:
        return dict(FALLBACKS)


def record_fallback(provider: str, reason: str, *, model: str, fallback_to: str,
                    error: str | None = None) -> None:
    """Count and log one fallback away from ``provider``."""
    with _lock:
        FALLBACKS[(provider, reason)] = FALLBACKS.get((provider, reason), 0) + 1
    # not installed is expected on CPU-only nodes with the default config (info); installed
    # but failing is a broken GPU setup somebody must look at (warning)
    emit = log.info if reason == "unavailable" else log.warning
    emit("provider_fallback", provider=provider, reason=reason, model=model,
         fallback_to=fallback_to, error=error)


def available_providers() -> list[str]:
    """Short names (``tensorrt``, ``cuda``, ``cpu``) of the providers onnxruntime offers."""
    import onnxruntime as ort  # noqa: PLC0415 - heavy; only the engine needs it

    return [_SHORT[p] for p in ort.get_available_providers() if p in _SHORT]


def plan(allowed: Sequence[str], available: Sequence[str]) -> tuple[list[str], list[str]]:
    """Providers to try, in order, and the allowed ones that are not available.

    CPU ends every plan, allowed or not: a model that cannot run on its preferred device still
    serves (counted as a fallback) rather than not at all.
    """
    order = [p for p in ORT_NAMES if p in allowed]  # always fastest first
    chain = [p for p in order if p in available]
    missing = [p for p in order if p not in available]
    if "cpu" not in chain:
        chain.append("cpu")
    return chain, missing


def short_name(ort_name: str) -> str:
    """``CUDAExecutionProvider`` -> ``cuda``; unknown names are returned unchanged."""
    return _SHORT.get(ort_name, ort_name)


# --------------------------------------------------------------------------- TensorRT cache


@functools.cache
def gpu_name() -> str:
    """The GPU model, from the NVIDIA driver or a Jetson's device tree; ``nogpu`` otherwise."""
    for info in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information")):
        try:
            for line in info.read_text().splitlines():
                if line.startswith("Model:"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            continue
    try:
        model = Path("/proc/device-tree/model").read_text().strip("\x00\n ")
        if "jetson" in model.lower() or "nvidia" in model.lower():
            return model
    except OSError:
        pass
    return "nogpu"


@functools.cache
def tensorrt_version() -> str:
    """The installed TensorRT version (Python package or ``libnvinfer`` soname), or unknown."""
    for dist in ("tensorrt", "tensorrt-libs", "tensorrt-cu12", "tensorrt-cu12-libs"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    lib = ctypes.util.find_library("nvinfer")  # e.g. libnvinfer.so.10
    if lib:
        m = re.search(r"\.so\.([\d.]+)$", lib)
        if m:
            return m.group(1)
    return "unknown"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower() or "x"


def trt_cache_dir(base: Path, sha256: str) -> Path:
    """The engine cache folder of one model on this GPU with this TensorRT."""
    return base / f"{sha256[:16]}-{_slug(gpu_name())}-trt{_slug(tensorrt_version())}"


def provider_options(provider: str, settings: EngineSettings, sha256: str) -> dict[str, Any]:
    """onnxruntime options for ``provider`` (creates the TensorRT cache folder)."""
    if provider == "tensorrt":
        cache = trt_cache_dir(settings.trt_cache_dir, sha256)
        cache.mkdir(parents=True, exist_ok=True)
        return {
            "trt_fp16_enable": settings.trt_fp16,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(cache),
        }
    if provider == "cuda":
        # heuristic algorithm search: exhaustive search costs seconds per new input shape
        return {"cudnn_conv_algo_search": "HEURISTIC"}
    return {}
