"""run a model over a folder of images or a video file, write JSON lines

Run MODEL over every image of a folder (sorted by name) or every frame of a video file, and write
one result per image or frame to OUTPUT in input order (JSON lines, the results wire format plus
a 'source' field: {"path": ..., "frame": N}). MODEL is a model folder, a manifest.json or an
.onnx with manifest.json beside it. This is the mode the batch CronJob uses: no cameras, broker
or hub. A progress bar shows on a terminal.

Exit status: 0 when every input succeeded, 1 when the model or some input failed (one line on
stderr per failed input, the others still run), 2 for a bad config.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_agent.contract import results
from edge_agent.contract.protocol import is_valid_name
from edge_agent.errors import InputError, ModelError

if TYPE_CHECKING:
    from edge_agent.streaming.sinks import JsonLinesSink
    from edge_agent.streaming.slots import ServingModel

#: Image file suffixes taken from an input folder (others are skipped, and counted).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def arguments(parser: argparse.ArgumentParser) -> None:
    """Model, input, output, and the config and workers to run with."""
    parser.add_argument("--model", required=True, metavar="MODEL", help="model folder or manifest")
    parser.add_argument("--input", required=True, metavar="PATH", help="image folder or video file")
    parser.add_argument("--output", required=True, metavar="FILE.jsonl", help="results file "
                        "(replaced)")
    parser.add_argument("--config", metavar="FILE", help="agent config YAML (engine section, node)")
    parser.add_argument("--camera", default="batch", help="camera name in the results "
                        "(default: batch)")
    parser.add_argument("--workers", type=int, default=0, help="inference threads (default: the "
                        "config's pipeline.workers, else one per CPU)")
    parser.add_argument("--log-level", default="warning",
                        choices=["debug", "info", "warning", "error"])


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _video_frames(path: Path) -> Iterator[tuple[int, Any]]:
    import cv2  # noqa: PLC0415

    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    if not cap.isOpened():
        raise InputError(f"{path}: not a readable video (and not a folder of images)")
    try:
        i = 0
        while True:
            ok, frame = cap.read()
            if not ok:
                return
            yield i, frame
            i += 1
    finally:
        cap.release()


def _frame_count(path: Path) -> int | None:
    import cv2  # noqa: PLC0415

    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    try:
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    finally:
        cap.release()
    return n if n > 0 else None


def _progress(total: int | None) -> Any:
    from rich.console import Console  # noqa: PLC0415
    from rich.progress import (  # noqa: PLC0415
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    console = Console(file=sys.stderr)
    return Progress(TextColumn("batch"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[fps]:.1f} fps"), TimeRemainingColumn(),
                    console=console, disable=not console.is_terminal, transient=False)


class _Batch:
    """One batch run: inputs in order, a bounded window of inferences, results to the sink.

    Only the main thread touches the counters: workers just run ``infer``.
    """

    def __init__(self, model: ServingModel, sink: JsonLinesSink, *, node: str,
                 camera: str) -> None:
        self.model = model
        self.sink = sink
        self.node = node
        self.camera = camera
        #: Inputs that failed (unreadable image, failed inference) / inputs finished.
        self.failed = 0
        self.done = 0

    def work(self, source: dict[str, Any], frame: Any) -> dict[str, Any]:
        """Infer one image or frame (a worker thread): the result, with its ``source``."""
        ts = time.time()
        out = self.model.infer(frame)
        h, w = frame.shape[:2]
        # no capture and no queue: the result's end-to-end is its three stages
        lat = results.latencies(
            capture_to_start=0.0, preprocess=out.preprocess_ms, inference=out.inference_ms,
            postprocess=out.postprocess_ms,
            end_to_end=out.preprocess_ms + out.inference_ms + out.postprocess_ms)
        return results.build_result(node=self.node, camera=self.camera, ts=ts,
                                    model=self.model, width=w, height=h, latency_ms=lat,
                                    output=out.output, source=source)

    def images(self, paths: list[Path], read: Callable[[str], Any]
               ) -> Iterator[tuple[dict[str, Any], Any]]:
        """Decoded images with their source; an unreadable one is reported and skipped."""
        for p in paths:
            try:
                yield {"path": str(p)}, read(str(p))
            except InputError as exc:
                print(f"edge-agent: error: {exc}", file=sys.stderr, flush=True)
                self.failed += 1

    def run(self, inputs: Iterator[tuple[dict[str, Any], Any]], workers: int,
            total: int | None) -> None:
        """Infer every input on ``workers`` threads; publish results in input order."""
        t0 = time.perf_counter()
        window: collections.deque[tuple[dict[str, Any], Future[dict[str, Any]]]] = (
            collections.deque())
        with ThreadPoolExecutor(workers, thread_name_prefix="batch") as pool, \
                _progress(total) as bar:
            task = bar.add_task("batch", total=total, fps=0.0)

            def finish() -> None:
                self._finish_one(window.popleft())
                fps = self.done / max(1e-9, time.perf_counter() - t0)
                bar.update(task, advance=1, fps=fps)

            for source, frame in inputs:
                window.append((source, pool.submit(self.work, source, frame)))
                if len(window) >= 2 * workers:  # bounded: decoding never runs far ahead
                    finish()
            while window:
                finish()

    def _finish_one(self, item: tuple[dict[str, Any], Future[dict[str, Any]]]) -> None:
        source, fut = item
        try:
            self.sink.publish(fut.result())
        except (InputError, ModelError) as exc:
            print(f"edge-agent: error: {source['path']}: {exc}", file=sys.stderr, flush=True)
            self.failed += 1
        self.done += 1


def _list_inputs(src: Path) -> tuple[list[Path] | None, int | None]:
    """The folder's images (None for a video file) and how many inputs to expect."""
    if not src.exists():
        raise InputError(f"{src}: no such file or folder")
    images = _images(src) if src.is_dir() else None
    if images is not None and not images:
        raise InputError(f"{src}: no images ({', '.join(IMAGE_SUFFIXES)}) in the folder")
    return images, len(images) if images is not None else _frame_count(src)


def run(args: argparse.Namespace) -> int:
    """Run the batch; return the exit status.

    Frames are decoded in this thread while a small pool of worker threads runs inference (one
    ``session.run`` each, like the agent's workers); results go through the same
    ``JsonLinesSink`` the agent uses, built by ``contract.results`` like the agent's.
    """
    import cv2  # noqa: PLC0415

    from edge_agent.commands.infer import _quiet_logging, read_image, resolve_manifest  # noqa: PLC0415
    from edge_agent.config import ConfigError, load_settings  # noqa: PLC0415
    from edge_agent.inference.engine import LoadedModel  # noqa: PLC0415
    from edge_agent.streaming.sinks import JsonLinesSink  # noqa: PLC0415

    _quiet_logging(args.log_level)
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    if not is_valid_name(args.camera):
        raise ConfigError([("--camera", "must be lowercase letters, digits and '-'",
                            args.camera)])
    settings = load_settings(args.config)
    src = Path(args.input)
    images, total = _list_inputs(src)
    model = LoadedModel.load(resolve_manifest(args.model), settings.engine)
    workers = args.workers or settings.pipeline.workers or settings.engine.concurrency or (
        os.cpu_count() or 1)
    sink = JsonLinesSink(args.output, append=False).open_sync()
    batch = _Batch(model, sink, node=settings.node, camera=args.camera)
    inputs = (batch.images(images, read_image) if images is not None else
              (({"path": str(src), "frame": i}, frame) for i, frame in _video_frames(src)))
    t0 = time.perf_counter()
    try:
        batch.run(inputs, workers, total)
    finally:
        sink.close_sync()
        model.close()
    took = time.perf_counter() - t0
    print(f"edge-agent: batch: {sink.written} results, {batch.failed} failed, "
          f"{took:.1f} s ({sink.written / max(took, 1e-9):.1f} fps) -> {args.output}",
          file=sys.stderr)
    return 1 if batch.failed else 0
