"""Shadow load and validation of a model version before it may serve a single frame.

The engine's own checks at load (digest, ONNX parses, input and outputs fit the manifest) catch
most bad artifacts; what they cannot see is what a model *does*. So before a switch, the new
session runs real inferences on a synthetic frame through the same preprocess/run/postprocess
path the pipeline uses, and the version is refused when an output's name or shape is not what
the manifest says, when any output holds NaN or infinity, when post-processing fails, or when
the median latency is over the configured budget. Everything here is blocking (ONNX Runtime):
call ``load_checked`` in a worker thread; the running model keeps serving meanwhile.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import structlog

from edge_agent.config import EngineSettings, ModelSyncSettings
from edge_agent.contract import graph
from edge_agent.contract.rejection import Rejection
from edge_agent.errors import ModelError, ModelRejectedError

if TYPE_CHECKING:  # the engine (onnxruntime) is imported only when a version loads
    from edge_agent.inference.engine import LoadedModel

log = structlog.get_logger(__name__)


def check_outputs(model: LoadedModel, outputs: Sequence[np.ndarray]) -> None:
    """Outputs must be what the manifest says (names, count, shapes, what the task reads; the
    contract's ``graph.check_output_arrays``) and finite."""
    specs = model.manifest.outputs
    sha = model.sha256
    if len(outputs) != len(specs):
        raise ModelRejectedError(
            f"validation: model returned {len(outputs)} outputs, manifest says {len(specs)}", sha
        )
    names = model.output_names
    if [s.name for s in specs] != names[: len(specs)]:
        raise ModelRejectedError(
            f"validation: output names {names} differ from the manifest's "
            f"{[s.name for s in specs]}", sha,
        )
    try:
        graph.check_output_arrays(model.manifest, [np.shape(out) for out in outputs])
    except Rejection as exc:
        raise ModelRejectedError(f"validation: {exc.message}", sha, rejection=exc) from exc
    for spec, out in zip(specs, outputs, strict=True):
        arr = np.asarray(out)
        if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
            raise ModelRejectedError(f"validation: output {spec.name} contains NaN or Inf", sha)


def validate(model: LoadedModel, settings: ModelSyncSettings) -> float:
    """Run the validation inferences; return the median latency (ms) or raise."""
    spec = model.manifest.input
    sha = model.sha256
    rng = np.random.default_rng(0)
    # a non-square frame of another size than the input exercises resize/letterbox too
    frame = rng.integers(0, 256, (spec.height * 3 // 4 + 1, spec.width + 7, 3), dtype=np.uint8)
    times: list[float] = []
    for _ in range(settings.validation_runs):
        t0 = time.perf_counter()
        try:
            tensor, meta = model.preprocess(frame)
            outputs = model.run(tensor)
        except ModelError:
            raise
        except Exception as exc:  # any runtime failure refuses the version
            raise ModelRejectedError(f"validation inference failed: {exc}"[:300], sha) from exc
        times.append((time.perf_counter() - t0) * 1000.0)
        check_outputs(model, outputs)
        try:
            results = model.postprocess(outputs, [meta])
        except Exception as exc:  # e.g. NonFiniteOutputError
            raise ModelRejectedError(
                f"validation post-processing failed: {type(exc).__name__}: {exc}"[:300], sha
            ) from exc
        if len(results) != 1 or not isinstance(results[0], dict):
            raise ModelRejectedError("validation: post-processing returned no result", sha)
    median = statistics.median(times)
    if median > settings.validation_latency_ms:
        raise ModelRejectedError(
            f"validation: median latency {median:.0f} ms over the budget of "
            f"{settings.validation_latency_ms:g} ms", sha,
        )
    return median


def load_checked(
    manifest_path: Path,
    engine: EngineSettings,
    sync: ModelSyncSettings,
    expected_sha256: str | None = None,
) -> LoadedModel:
    """Load a version next to the running one, warm it up and validate it (blocking).

    Returns the ``LoadedModel``; on any refusal its session is closed and ModelRejectedError
    (or ModelError for an unreadable manifest) is raised with the reason.
    """
    from edge_agent.inference.engine import LoadedModel  # noqa: PLC0415 - onnxruntime is heavy

    t0 = time.perf_counter()
    try:
        model = LoadedModel.load(manifest_path, engine, expected_sha256=expected_sha256)
    except ModelError:
        raise
    except Exception as exc:  # onnxruntime raises its own types
        raise ModelRejectedError(f"load failed: {type(exc).__name__}: {exc}"[:300],
                                 expected_sha256) from exc
    try:
        median = validate(model, sync)
    except BaseException:
        model.close()
        raise
    log.info("model_validated", name=model.name, version=model.version,
             load_ms=round((time.perf_counter() - t0) * 1000.0, 1),
             median_ms=round(median, 2), providers=model.providers)
    return model
