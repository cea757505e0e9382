"""``edge-agent batch``: run a model over a folder of images or a video file, once.

The mode the batch CronJob uses: no cameras, broker or hub. Frames are decoded in the main
thread while a small pool of worker threads runs inference (one ``session.run`` each, like the
agent's workers), and results are written in input order to a JSON-lines file through the
same ``JsonLinesSink`` the agent uses, in the results wire format plus a ``source`` field
(``{"path": ..., "frame": N}``). A progress bar shows on a TTY (rich, on stderr).

Exit status: 0 when every input succeeded, 1 when the model or some input failed (one line on
stderr per failed image, the others still run), 2 for a bad config.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from edge_agent.contract.protocol import is_valid_name
from edge_agent.errors import InputError, ModelError

#: Image file suffixes taken from an input folder (others are skipped, and counted).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def register(sub: Any) -> None:
    """Add the ``batch`` verb."""
    p = sub.add_parser(
        "batch",
        help="run a model over a folder of images or a video file, write JSON lines",
        description="Run MODEL over every image of a folder (sorted by name) or every frame "
        "of a video file, and write one result per image or frame to OUTPUT (JSON lines, the "
        "results wire format plus a 'source' field). MODEL is a model folder, a manifest.json "
        "or an .onnx with manifest.json beside it. Exit 0 when everything succeeded, 1 when "
        "the model or some input failed, 2 for a bad config.",
    )
    p.add_argument("--model", required=True, metavar="MODEL", help="model folder or manifest")
    p.add_argument("--input", required=True, metavar="PATH", help="image folder or video file")
    p.add_argument("--output", required=True, metavar="FILE.jsonl", help="results file "
                   "(replaced)")
    p.add_argument("--config", metavar="FILE", help="agent config YAML (engine section, node)")
    p.add_argument("--camera", default="batch", help="camera name in the results "
                   "(default: batch)")
    p.add_argument("--workers", type=int, default=0, help="inference threads (default: the "
                   "config's pipeline.workers, else one per CPU)")
    p.add_argument("--log-level", default="warning",
                   choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=run)


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


def run(args: argparse.Namespace) -> int:  # noqa: PLR0915 - one linear procedure
    """Run the batch; return the exit status."""
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
    if not src.exists():
        raise InputError(f"{src}: no such file or folder")
    images = _images(src) if src.is_dir() else None
    if images is not None and not images:
        raise InputError(f"{src}: no images ({', '.join(IMAGE_SUFFIXES)}) in the folder")
    total = len(images) if images is not None else _frame_count(src)
    model = LoadedModel.load(resolve_manifest(args.model), settings.engine)
    workers = args.workers or settings.pipeline.workers or settings.engine.concurrency or (
        os.cpu_count() or 1)
    sink = JsonLinesSink(args.output, append=False).open_sync()
    node = settings.node
    ref = {"name": model.name, "version": model.version}
    failed = done = 0

    def work(source: dict[str, Any], frame: Any) -> dict[str, Any]:
        ts = time.time()
        out = model.infer(frame)
        h, w = frame.shape[:2]
        lat = {"capture_to_start": 0.0, "preprocess": round(out.preprocess_ms, 3),
               "inference": round(out.inference_ms, 3),
               "postprocess": round(out.postprocess_ms, 3)}
        lat["end_to_end"] = round(out.preprocess_ms + out.inference_ms + out.postprocess_ms, 3)
        res: dict[str, Any] = {"v": 1, "node": node, "camera": args.camera, "ts": ts,
                               "model": ref, "task": model.task,
                               "frame": {"width": w, "height": h}, "latency_ms": lat,
                               "source": source}
        res.update(out.output)
        return res

    def inputs() -> Iterator[tuple[dict[str, Any], Any]]:
        nonlocal failed
        if images is not None:
            for p in images:
                try:
                    yield {"path": str(p)}, read_image(str(p))
                except InputError as exc:
                    print(f"edge-agent: error: {exc}", file=sys.stderr, flush=True)
                    failed += 1
        else:
            for i, frame in _video_frames(src):
                yield {"path": str(src), "frame": i}, frame

    t0 = time.perf_counter()
    window: collections.deque[tuple[dict[str, Any], Future[dict[str, Any]]]] = (
        collections.deque())
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="batch") as pool, \
                _progress(total) as bar:
            task = bar.add_task("batch", total=total, fps=0.0)

            def finish_one() -> None:
                nonlocal failed, done
                source, fut = window.popleft()
                try:
                    sink.publish(fut.result())
                except (InputError, ModelError) as exc:
                    print(f"edge-agent: error: {source['path']}: {exc}",
                          file=sys.stderr, flush=True)
                    failed += 1
                done += 1
                bar.update(task, advance=1, fps=done / max(1e-9, time.perf_counter() - t0))

            for source, frame in inputs():
                window.append((source, pool.submit(work, source, frame)))
                if len(window) >= 2 * workers:  # bounded: decoding never runs far ahead
                    finish_one()
            while window:
                finish_one()
    finally:
        sink.close_sync()
        model.close()
    took = time.perf_counter() - t0
    print(f"edge-agent: batch: {sink.written} results, {failed} failed, "
          f"{took:.1f} s ({sink.written / max(took, 1e-9):.1f} fps) -> {args.output}",
          file=sys.stderr)
    return 1 if failed else 0
