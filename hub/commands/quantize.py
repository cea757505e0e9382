"""``edge-hub models quantize``: an INT8 version of a pushed fp32 one, with its cost measured.

A client verb, run on the operator's machine, not in the hub: it pulls NAME VERSION like
``models pull``, quantises it locally (ONNX Runtime static QDQ, calibrated on the operator's
frames preprocessed exactly as the agent does for that manifest; by default the first compute
nodes stay fp32, as many as the calibration frames show are needed for 95 % agreement at a
1.3x speed-up), measures the INT8 graph against its parent on held-out frames (agreement with
the shadow gate's semantics, fps of both in interleaved rounds) and pushes it as VERSION2 like
``models push`` (``--sign`` signs locally) with the report as the version's ``quantization``
field, which ``models show`` prints. Why not in the hub: calibration needs the operator's
frames (a video is large and stays where it is), takes minutes of CPU the hub's request
handlers should not spend, and the signing key never leaves the operator's machine; the
result is an ordinary version the hub checks like any push.

The engine half is ``edge_agent.commands.quantize``, imported lazily inside the verb: it needs
the agent's pre-processing, engine and agreement, which the hub may not import, and the
``quantize`` extra (onnx, OpenCV). pyproject.toml's import contracts list this one edge.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from hub.client import http
from hub.client.output import note, print_fields, print_json, say
from hub.errors import HubError, InvalidRequest
from hub.registry.service import check_ref

#: ``models pull``'s download and ``models push``'s upload (``hub.commands.models``).
Download = Callable[[argparse.Namespace, Path], Awaitable[dict[str, Any]]]
Upload = Callable[..., Awaitable[tuple[int, dict[str, Any]]]]
METHODS = ("minmax", "entropy", "percentile")


class QuantizationFailed(HubError, code="quantization_failed"):
    """The frames or the model could not be quantised or measured (nothing was pushed)."""


class AgreementTooLow(HubError, code="agreement_too_low"):
    """The INT8 version agrees with its parent less than ``--min-agreement`` (not pushed)."""


def register(acts: Any, *, download: Download, upload: Upload) -> None:
    """Add ``models quantize`` (``download``/``upload``: ``models pull``'s and ``push``'s)."""
    p = http.add_client_verb(
        acts, "quantize", functools.partial(_quantize, download=download, upload=upload),
        help="make, measure and push an INT8 version of a version",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument("name")
    p.add_argument("version", help="the fp32 version to quantise")
    p.add_argument("--to", required=True, metavar="VERSION2", help="the INT8 version to push")
    p.add_argument("--calibration", required=True, type=Path, action="append", metavar="PATH",
                   help="images or videos (files or folders; repeatable) to calibrate on; the "
                   "frames not picked for calibration are the held-out set")
    p.add_argument("--heldout", type=Path, action="append", metavar="PATH",
                   help="measure on these frames instead of the calibration source's rest")
    p.add_argument("--calibration-frames", type=int, default=64, metavar="N",
                   help="frames to calibrate on, spread evenly over the source (default 64)")
    p.add_argument("--heldout-frames", type=int, default=300, metavar="N",
                   help="most held-out frames to measure on (default 300)")
    p.add_argument("--method", choices=METHODS, default="minmax",
                   help="activation ranges: minmax (the default), percentile (99.999) or "
                   "entropy (docs/registry.md has the measurements)")
    p.add_argument("--per-tensor", action="store_true",
                   help="one scale per weight tensor instead of per output channel")
    p.add_argument("--keep-fp32", default="", metavar="OPS",
                   help="comma-separated op types left in fp32 (e.g. Gemm,Softmax)")
    p.add_argument("--keep-fp32-first", default="auto", metavar="N|auto",
                   help="leave the first N compute nodes (Conv, Gemm, MatMul) in fp32; auto "
                   "(the default) tries 0, 3, 6, 9, 12 and keeps the first whose agreement on "
                   "the calibration frames reaches --target-agreement at a speed-up of at "
                   "least --min-speedup (else the best agreement)")
    p.add_argument("--target-agreement", type=float, default=0.95, metavar="X",
                   help="what auto aims for, in [0, 1] (default 0.95)")
    p.add_argument("--min-speedup", type=float, default=1.3, metavar="X",
                   help="auto never keeps a candidate slower than X times fp32 (default 1.3)")
    p.add_argument("--min-agreement", type=float, default=0.0, metavar="X",
                   help="push only when the agreement is at least X in [0, 1] (exit 1)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved speed rounds (default 5)")
    p.add_argument("--keep", type=Path, metavar="DIR",
                   help="also keep the INT8 model folder (model.onnx, manifest.json) in DIR")
    p.add_argument("--sign", type=Path, metavar="KEY", help="ed25519 private key (PEM)")
    p.add_argument("--notes", default="", help="free text stored with the version")
    p.add_argument("--pushed-by", default=None, help="who pushes (default user@host)")
    p.add_argument("--verify-key", type=Path, metavar="PUB",
                   help="verify the fp32 version's signature with this public key first")


def _check(args: argparse.Namespace) -> None:
    check_ref(args.name, args.version)
    check_ref(args.name, args.to)
    if args.to == args.version:
        raise InvalidRequest("--to must name a new version, not the one quantised")
    if not 1 <= args.calibration_frames <= 10_000:
        raise InvalidRequest("--calibration-frames: 1 to 10000")
    if not 1 <= args.heldout_frames <= 100_000:
        raise InvalidRequest("--heldout-frames: 1 to 100000")
    if not 0.0 <= args.min_agreement <= 1.0:
        raise InvalidRequest("--min-agreement: a fraction in [0, 1]")
    _check_fp32_choice(args)
    if not 1 <= args.rounds <= 100:
        raise InvalidRequest("--rounds: 1 to 100")
    for p in [*args.calibration, *(args.heldout or [])]:
        if not p.exists():
            raise InvalidRequest(f"no such file or folder: {p}")



def _check_fp32_choice(args: argparse.Namespace) -> None:
    if not 0.0 <= args.target_agreement <= 1.0:
        raise InvalidRequest("--target-agreement: a fraction in [0, 1]")
    if not 0.0 <= args.min_speedup <= 100.0:
        raise InvalidRequest("--min-speedup: 0 to 100")
    if args.keep_fp32_first != "auto" and not (
            args.keep_fp32_first.isdigit() and int(args.keep_fp32_first) <= 10_000):
        raise InvalidRequest(f"--keep-fp32-first: auto or a count 0 to 10000 "
                             f"(got {args.keep_fp32_first!r})")


def _engine() -> Any:
    """The engine half, or a clear error when the ``quantize`` extra is not installed."""
    try:
        from onnxruntime import quantization  # noqa: F401, PLC0415 - needs the onnx package

        from edge_agent.commands import quantize  # noqa: PLC0415 - heavy; the client only
    except ImportError as exc:
        raise InvalidRequest(
            f"models quantize needs onnx, OpenCV and numpy ({exc.name} is missing): "
            "pip install 'edge-inference-agent[agent,quantize]'"
        ) from exc
    return quantize


def _make(args: argparse.Namespace, fp32_dir: Path, int8_dir: Path) -> dict[str, Any]:
    """Read frames, quantise and measure (blocking: runs in a thread); the report as JSON."""
    q = _engine()
    # the engine's log lines (model_loaded) go to stderr: stdout carries the result (--json)
    with contextlib.redirect_stdout(sys.stderr):
        return _measure(q, args, fp32_dir, int8_dir)


def _measure(q: Any, args: argparse.Namespace, fp32_dir: Path, int8_dir: Path) -> dict[str, Any]:
    try:
        if args.heldout:  # two sources: every frame read from the first calibrates
            calib = q.read_frames(args.calibration, limit=args.calibration_frames)
            held = q.read_frames(args.heldout, limit=args.heldout_frames)
        else:  # one source: calibration frames spread over it, the others held out
            frames = q.read_frames(args.calibration,
                                   limit=args.calibration_frames + args.heldout_frames)
            calib, held = q.split(frames, args.calibration_frames, args.heldout_frames)
        sources = (", ".join(map(str, args.calibration)),
                   ", ".join(map(str, args.heldout)) if args.heldout
                   else "the calibration source's other frames")
        auto = args.keep_fp32_first == "auto"
        settings = q.Settings(per_channel=not args.per_tensor, calibration=args.method,
                              fp32_op_types=tuple(o for o in args.keep_fp32.split(",") if o),
                              fp32_first=0 if auto else int(args.keep_fp32_first))
        report = q.run(fp32_dir, int8_dir, version=args.to, calibration=calib, heldout=held,
                       settings=settings, sources=sources, rounds=args.rounds,
                       auto=q.Auto(target=args.target_agreement, min_speedup=args.min_speedup)
                       if auto else None)
    except q.QuantizeError as exc:
        raise QuantizationFailed(str(exc)) from exc
    data: dict[str, Any] = report.model_dump(mode="json")
    return data


async def _quantize(args: argparse.Namespace, *, download: Download, upload: Upload) -> int:
    """Pull NAME VERSION, quantise it to INT8 on this machine, measure it and push it as
    VERSION2 with the report (``models show NAME VERSION2`` prints it)."""
    _check(args)
    _engine()  # fail before downloading anything
    with tempfile.TemporaryDirectory(prefix="edge-hub-quantize-") as work:
        fp32_dir, int8_dir = Path(work) / "fp32", args.keep or Path(work) / "int8"
        pulled = await download(args, fp32_dir)
        note(f"pulled {args.name} {args.version} ({pulled['sha256'][:12]}); quantising "
             "and measuring (minutes)")
        report = await asyncio.to_thread(_make, args, Path(pulled["manifest"]).parent,
                                         int8_dir)
        agree = report["agreement"]["value"]
        if agree < args.min_agreement:
            _print(args, report, None)
            raise AgreementTooLow(f"agreement {agree:.3f} < --min-agreement "
                                  f"{args.min_agreement}; {args.to} was not pushed")
        push_args = argparse.Namespace(**{
            **vars(args), "version": args.to, "file": int8_dir / "model.onnx",
            "manifest": int8_dir / "manifest.json",
        })
        status, body = await upload(push_args, quantization=json.dumps(report))
    _print(args, report, (status, body))
    return 0


def _print(args: argparse.Namespace, report: dict[str, Any],
           pushed: tuple[int, dict[str, Any]] | None) -> None:
    if args.json:
        print_json({"pushed": pushed[1] if pushed else None, "quantization": report})
        return
    print_fields(report_fields(report))
    if pushed is not None:
        status, body = pushed
        what = "pushed" if status == 201 else "already present (identical)"
        say(f"{what}: {body['name']} {body['version']} sha256={body['sha256']} "
            f"signed={str(body['signed']).lower()}")


def _selection(sel: dict[str, Any] | None) -> list[tuple[str, str]]:
    if not sel:
        return []
    tried = ", ".join(f"{c['fp32_first_nodes']} fp32: {c['agreement']:.3f} {c['speedup']:.2f}x"
                      for c in sel["candidates"])
    return [("chosen on", f"{sel['frames']} calibration frames, target "
             f"{sel['target_agreement']} at >= {sel['min_speedup']}x "
             f"({'met' if sel['met'] else 'not met: best kept'}); {tried}")]


def report_fields(r: dict[str, Any]) -> Sequence[tuple[str, str]]:
    """A quantisation report as ``models show`` lines (``print_fields`` pairs)."""
    s, a, v = r["settings"], r["agreement"], r["speed"]
    ranges = s["calibration"] + (f" {s['percentile']}" if s.get("percentile") else "")
    agree = f"{a['value']:.3f} {a['metric']} over {a['frames']} held-out frames"
    if a.get("confident_frames"):
        agree += (f"; {a['confident_value']:.3f} over the {a['confident_frames']} where fp32's "
                  f"top-1 score >= {a['confident_min_score']}")
    return [
        ("quantized from", f"{r['parent_version']} ({r['parent_sha256'][:12]})"),
        ("quantization", f"{s['format']} {s['weights']} weights "
                         f"({'per-channel' if s['per_channel'] else 'per-tensor'}), "
                         f"{s['activations']} activations, {ranges} ranges"
                         + (", reduce_range" if s.get("reduce_range") else "")
                         + (f", fp32 ops: {','.join(s['fp32_op_types'])}"
                            if s["fp32_op_types"] else "")
                         + (f", first {s['fp32_first_nodes']} compute nodes fp32"
                            if s.get("fp32_first_nodes") else "")),
        *_selection(r.get("selection")),
        ("calibration", f"{r['calibration']['frames']} frames of {r['calibration']['source']}"),
        ("agreement", agree),
        ("speed", f"{v['speedup']:.2f}x ({v['int8_fps']:.1f} vs {v['fp32_fps']:.1f} fps fp32, "
                  f"batch 1, {v['intra_op_threads']} thread, {v['rounds']} rounds, "
                  f"{v['cpu'] or 'unknown CPU'}, {v['cores']} cores)"),
        ("onnxruntime", r["onnxruntime"]),
    ]
