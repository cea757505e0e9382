"""One model version, loaded and verified, ready to serve frames from several threads at once.

``LoadedModel.load`` is the only way in: it reads the manifest, verifies the artifact's sha256
(against the manifest and, from the hub, the expected digest), creates the ONNX Runtime session
on the best provider available (``providers``), checks the graph against the manifest and warms
up. Anything wrong raises ``ModelRejectedError``/``ModelError`` before a single frame is served,
so a bad artifact never replaces a good one. The manifest and graph checks are the contract's
(``edge_agent.contract.manifest`` and ``graph``), the very code the hub runs on a push, and the
error carries the contract's ``Rejection`` (reason code and message) so both sides say the same.

After that, ``preprocess``, ``run`` and ``postprocess`` are thread-safe and may run concurrently
in worker threads (``InferenceSession.run`` is thread-safe; the rest holds no mutable state).
With ``intra_op_threads=1``, N concurrent calls use N cores with no thread-pool handoffs, which
measured faster than one call using N threads (docs/engine.md).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import structlog

from edge_agent.config import EngineSettings
from edge_agent.contract import graph
from edge_agent.contract import manifest as manifests
from edge_agent.contract.rejection import Rejection
from edge_agent.errors import ModelError, ModelRejectedError
from edge_agent.inference import providers as prov
from edge_agent.inference.postprocess import get_unit
from edge_agent.inference.postprocess.base import check_finite
from edge_agent.inference.preprocess import FrameMeta, Preprocessor

log = structlog.get_logger(__name__)

#: ONNX Runtime's run option that shrinks a device's arena at the end of that run.
ARENA_SHRINKAGE = "memory.enable_memory_arena_shrinkage"


@dataclass(frozen=True, slots=True)
class InferOutput:
    """One frame's result and where its time went."""

    #: ``{"classes": [...]}`` or ``{"detections": [...]}``, plain JSON types.
    output: dict[str, Any]
    preprocess_ms: float
    inference_ms: float
    postprocess_ms: float


class LoadedModel:
    """A verified, warmed-up ONNX Runtime session with its manifest's pre/post-processing."""

    def __init__(
        self,
        manifest: manifests.ModelManifest,
        session: ort.InferenceSession,
        providers: list[str],
        concurrency: int,
    ) -> None:
        self.manifest = manifest
        self.name = manifest.name
        self.version = manifest.version
        self.sha256 = manifest.sha256
        self.task = manifest.task
        #: Providers the session runs on, short names, preferred first (e.g. ``["cpu"]``).
        self.providers = providers
        self.batch_dynamic = manifest.input.batch == "dynamic"
        #: Fixed batch size of the graph, or None when dynamic.
        self.fixed_batch: int | None = (
            None if isinstance(manifest.input.batch, str) else manifest.input.batch
        )
        #: Concurrent ``run`` calls worth making (``EngineSettings.concurrency``, 0 = cores).
        self.concurrency = concurrency
        self._session: ort.InferenceSession | None = session
        self._input_name = manifest.input.name
        #: What each run fetches: the manifest's outputs, in the manifest's order.
        self._fetch = [o.name for o in manifest.outputs]
        self._pre = Preprocessor(manifest.input)
        self._post = get_unit(manifest.task)(manifest)

    @property
    def output_names(self) -> list[str]:
        """The graph's output names, in the graph's order (empty once closed)."""
        session = self._session
        return [o.name for o in session.get_outputs()] if session is not None else []

    # ---------------------------------------------------------------------------- loading

    @classmethod
    def load(
        cls,
        manifest_path: str | Path,
        settings: EngineSettings,
        *,
        expected_sha256: str | None = None,
    ) -> LoadedModel:
        """Load, verify and warm up a model; raise ``ModelRejectedError``/``ModelError``."""
        t0 = time.perf_counter()
        limit_heap_arenas()  # once per process, before the threads that serve it start
        try:
            manifest = manifests.load_manifest(manifest_path)
        except Rejection as exc:
            raise ModelError.rejected(exc) from exc
        path = manifests.model_path(manifest_path, manifest)
        try:
            data = path.read_bytes()  # verified bytes are the bytes loaded: no swap in between
        except FileNotFoundError as exc:
            raise ModelRejectedError(f"{path}: model file not found") from exc
        except OSError as exc:
            raise ModelRejectedError(f"{path}: cannot read model file: {exc.strerror}") from exc
        digest = hashlib.sha256(data).hexdigest()
        if digest != manifest.sha256:
            raise ModelRejectedError(
                f"{path}: sha256 does not match the manifest (corrupt or replaced file)", digest
            )
        if expected_sha256 is not None and digest != expected_sha256:
            raise ModelRejectedError(f"{path}: sha256 is not the expected one", digest)
        session, used = _create_session(data, manifest, settings)
        del data  # the session holds its own copy of the weights
        try:
            graph.check_signature(graph.signature(session), manifest)
        except Rejection as exc:
            raise ModelRejectedError(exc.message, digest, rejection=exc) from exc
        model = cls(manifest, session, used, settings.concurrency or (os.cpu_count() or 1))
        try:
            model._warm_up(max(1, settings.warmup_runs))
        except BaseException:
            model.close()
            raise
        release_freed_heap()
        log.info("model_loaded", model=model.name, version=model.version,
                 sha256=digest[:12], providers=used,
                 load_ms=round((time.perf_counter() - t0) * 1000.0, 1))
        return model

    def _blank(self) -> np.ndarray:
        """A batch of zeros of the graph's smallest batch size (1, or its fixed size)."""
        spec = self.manifest.input
        n = self.fixed_batch or 1
        shape = (n, 3, spec.height, spec.width) if spec.layout == "NCHW" else (
            n, spec.height, spec.width, 3)
        return np.zeros(shape, dtype=np.float32)

    def _warm_up(self, runs: int) -> None:
        """Run zeros through the graph: allocates arenas, and checks the real output shapes.

        Output values are not judged here (a model may legitimately output anything for a
        blank image); non-finite values fail each real inference instead.
        """
        x = self._blank()
        for _ in range(runs):
            outputs = self.run(x)
        try:
            graph.check_output_arrays(self.manifest, [out.shape for out in outputs])
        except Rejection as exc:
            raise ModelRejectedError(exc.message, self.sha256, rejection=exc) from exc

    # --------------------------------------------------------------------------- serving

    def preprocess(self, frame_bgr: np.ndarray) -> tuple[np.ndarray, FrameMeta]:
        """A ``[1, ...]`` input tensor for one BGR frame, and the geometry to undo it."""
        return self._pre(frame_bgr)

    def run(self, batch_tensor: np.ndarray) -> list[np.ndarray]:
        """Run a batch (``[B, ...]``) through the session; outputs in the manifest's order.

        A graph with a fixed batch size gets the batch in chunks of that size (the last one
        padded), so callers may always pass any ``B``.
        """
        session = self._session
        if session is None:
            raise ModelError(f"model {self.name} {self.version} is closed")
        n = self.fixed_batch
        b = batch_tensor.shape[0]
        try:
            if n is None or b == n:
                return list(session.run(self._fetch, {self._input_name: batch_tensor}))
            parts: list[list[np.ndarray]] = []
            for start in range(0, b, n):
                chunk = batch_tensor[start : start + n]
                real = chunk.shape[0]
                if real < n:
                    pad = np.zeros((n - real, *chunk.shape[1:]), dtype=chunk.dtype)
                    chunk = np.concatenate([chunk, pad])
                outs = session.run(self._fetch, {self._input_name: chunk})
                parts.append([o[:real] for o in outs])
            return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]
        except Exception as exc:  # onnxruntime's own types; a bad frame shape among them
            raise ModelError(f"inference failed: {graph.one_line(exc)}") from exc

    def postprocess(
        self, outputs: Sequence[np.ndarray], metas: Sequence[FrameMeta]
    ) -> list[dict[str, Any]]:
        """One result dict per frame; raises ``NonFiniteOutputError`` on NaN/Inf outputs."""
        check_finite(outputs)
        return self._post(outputs, metas)

    def infer(self, frame_bgr: np.ndarray) -> InferOutput:
        """Preprocess, run and postprocess one frame, timing each stage."""
        t0 = time.perf_counter()
        x, meta = self.preprocess(frame_bgr)
        t1 = time.perf_counter()
        outputs = self.run(x)
        t2 = time.perf_counter()
        result = self.postprocess(outputs, [meta])[0]
        t3 = time.perf_counter()
        return InferOutput(result, (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3)

    def shrink_arena(self) -> None:
        """Give back the CPU arena's free regions, e.g. after a measurement grew it.

        ONNX Runtime's CPU arena keeps every region it ever grew: the start-up calibration
        (several concurrent runs, batches of up to 4 frames) leaves it at the size of its
        largest candidate for the life of the session, although the layout chosen may need
        less. One run of the smallest batch with the arena shrinkage option frees, at its end,
        every region no run is using (concurrent runs keep theirs: the arena's lock), and the
        heap is trimmed after it. Runs that need more later grow the arena again: this trades
        nothing but that regrowth (docs/deploy.md, "Sizing"). A closed model does nothing.
        """
        session = self._session
        if session is None:
            return
        options = ort.RunOptions()
        options.add_run_config_entry(ARENA_SHRINKAGE, "cpu:0")
        try:
            session.run(self._fetch, {self._input_name: self._blank()}, options)
        except Exception as exc:  # onnxruntime's own types: serving goes on with the arena
            log.warning("arena_shrink_failed", model=self.name, error=graph.one_line(exc))
        release_freed_heap()

    def close(self) -> None:
        """Release the session (its memory goes once in-flight ``run`` calls return)."""
        self._session = None
        release_freed_heap()

    def __repr__(self) -> str:
        return f"<LoadedModel {self.name} {self.version} {self.providers}>"


# ------------------------------------------------------------------------------- helpers

@functools.cache
def _libc_malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None (other C libraries, other systems)."""
    if sys.platform != "linux":
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = (ctypes.c_size_t,)
    trim.restype = ctypes.c_int
    return trim


#: glibc's ``mallopt`` parameter for the most heaps (arenas) threads may spread over.
_M_ARENA_MAX = -8
#: The heaps the agent's threads share: glibc's default is 8 per core, one more each time a
#: thread finds the others busy, and each keeps what its threads freed.
HEAP_ARENAS = 2


@functools.cache
def limit_heap_arenas() -> bool:
    """Let the process's threads share ``HEAP_ARENAS`` glibc heaps; True when it was set.

    Decoder, capture, inference and executor threads each get a heap of their own by default,
    and memory one of them frees stays in that heap, resident, for the life of the process.
    Inference allocates little per frame (ONNX Runtime's arena does the rest), so sharing
    costs no throughput there. Threads that already have a heap keep it, so this counts in
    full only before any thread starts: the image sets ``MALLOC_ARENA_MAX=2`` for that
    (Dockerfile.arm64; 8-14 MB less for one camera and the YOLOv8n-sized model,
    docs/deploy.md "Sizing"), and an operator's ``MALLOC_ARENA_MAX`` wins. Called at the first
    model load, before any camera starts its threads, for agents run outside the image; other
    C libraries are left alone.
    """
    if sys.platform != "linux" or "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_ARENA_MAX, HEAP_ARENAS))


def release_freed_heap() -> bool:
    """Give the memory a model load or unload freed back to the kernel; True when some was.

    Loading a model frees far more than it keeps: the file's bytes, the parsed graph, the
    optimiser's copies, the warm-up's temporaries. glibc keeps freed blocks in its heaps, and
    after a load most of them sit below its (raised) mmap threshold, so they stay resident for
    the life of the process. ``malloc_trim`` hands the free pages back once, right after the
    load (and after a session is dropped on a hot swap); frames and tensors allocated later
    still reuse the heaps, so a frame faults no new pages in (docs/deploy.md, "Sizing":
    13-15 MB less for the YOLOv8n-sized model, same CPU per frame).
    """
    trim = _libc_malloc_trim()
    return bool(trim(0)) if trim is not None else False


def _session_options(settings: EngineSettings) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = settings.intra_op_threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # errors only: ORT's warnings are about graphs we do not own
    return so


def _create_session(
    data: bytes, manifest: manifests.ModelManifest, settings: EngineSettings
) -> tuple[ort.InferenceSession, list[str]]:
    """A session on the best provider that initialises; fallbacks are logged and counted."""
    chain, missing = prov.plan(settings.providers, prov.available_providers())
    for p in missing:
        prov.record_fallback(p, "unavailable", model=manifest.name, fallback_to=chain[0])
    failed: list[tuple[str, str]] = []
    while True:
        wanted = [(prov.ORT_NAMES[p], prov.provider_options(p, settings, manifest.sha256))
                  for p in chain]
        try:
            # onnxruntime warns (Python warning) and carries on without a provider it cannot
            # use; keep the text for our own fallback record instead of printing it
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                session = ort.InferenceSession(data, _session_options(settings), providers=wanted)
            break
        except Exception as exc:  # onnxruntime raises several unrelated types
            if len(chain) == 1:
                # even the CPU refused the graph: the artifact is bad, not the device
                rejection = graph.load_failure(exc)
                raise ModelRejectedError(
                    f"cannot load model {manifest.name} {manifest.version}: "
                    f"{rejection.message}", manifest.sha256, rejection=rejection,
                ) from exc
            failed.append((chain[0], graph.one_line(exc)))
            chain = chain[1:]
    used = [prov.short_name(p) for p in session.get_providers()]
    # onnxruntime may also drop a provider silently (e.g. CUDA libraries missing)
    for p in chain:
        if prov.ORT_NAMES[p] not in session.get_providers():
            why = [str(w.message) for w in caught if prov.ORT_NAMES[p] in str(w.message)]
            failed.append((p, " ".join(why[0].split())[:graph.MAX_ERROR_CHARS] if why
                           else "provider did not initialise"))
    for p, err in failed:
        prov.record_fallback(p, "init_failed", model=manifest.name, fallback_to=used[0],
                             error=err)
    return session, used
