"""A clip with known ground truth for the tracker: faces moving along scripted paths on a street.

    python models/clips.py [--samples models/out/samples] [--check]

``faces_street`` composites three faces cut from the sample images (``astronaut.png`` and two
frames of ``carphone.mp4``) over a moving street scene (frames of ``bikes.mp4``) and writes

- ``faces-street.mp4``: 200 frames, 640x272, 25 fps, H.264 (CRF 16, so the faces keep the detail
  a face detector needs);
- ``faces-street.json``: the script it was drawn from (``SCRIPT_FORMAT``): per object its label,
  first and last frame and its face box on every frame in between (normalised xyxy); one zone
  polygon and one line (normalised); and, derived from the boxes with the anchor named in the
  script (``ANCHOR``), each object's zone enter/leave frames and its line crossings with their
  direction. ``tests/system/test_tracking_accuracy.py`` and ``bench/events.py`` read it.

What is in the clip, and why:

- The background is the street of ``bikes.mp4``, but only its frames 137-249, played forward and
  then backward: the cyclists in its frames 30-136 show real faces (CenterFace finds them), which
  would be objects with no ground truth. The chosen frames have none (``--check`` proves it with
  the real model on the finished clip: every detection must match a scripted face).
- ``astronaut`` walks left to right and ``caller`` right to left at a slightly lower height, so
  their paths cross at frame 95 with ``caller`` drawn in front: the astronaut's chin is covered
  for a few frames (the case that makes trackers swap ids). Both cross the ``gate`` line (one
  each way) and pass through the ``middle`` zone.
- ``visitor`` comes down from the top right into the zone, stays there for 2 s (dwell), and
  leaves to the right; it never crosses the line.
- A face appears whole at its first frame and disappears at its last (no half faces at the
  frame's edge, whose detection is a matter of luck, not of tracking).

The face boxes are where CenterFace puts each face in its source image (measured once with
``models/out/centerface``, recorded in ``SPRITES``), scaled and moved with the face, so a track
matches its object by IoU without a human's idea of where a face ends.

Used by ``models/build.py`` (step ``faces-street``) after ``samples``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SCRIPT_FORMAT = 1
CLIP_NAME = "faces-street"
FPS = 25
FRAMES = 200
WIDTH, HEIGHT = 640, 272
#: bikes.mp4 frames without faces of their own (see the module docstring).
BACKGROUND_FRAMES = (137, 249)
#: The point of a box that decides zone membership and line crossings: its bottom centre,
#: where an object stands (``edge_agent.contract.events``; for a face, the chin).
ANCHOR = "bottom_center"
#: Zone polygon and line, normalised (x right, y down). The line runs from ``a`` at the bottom
#: to ``b`` at the top, so seen from ``a`` towards ``b`` its left is the image's left.
ZONES = {"middle": [(0.42, 0.20), (0.66, 0.16), (0.70, 0.97), (0.40, 0.99)]}
LINES = {"gate": [(0.25, 0.96), (0.25, 0.04)]}
Box = tuple[float, float, float, float]
Point = tuple[float, float]


@dataclass(frozen=True)
class Sprite:
    """A face cut from a sample: source, frame (video), CenterFace's face box in source pixels."""

    source: str
    frame: int
    face: Box
    #: Face height in the clip, pixels.
    height: int


#: Face boxes as CenterFace (models/out/centerface, threshold 0.5) reports them on the source.
SPRITES = {
    "astronaut": Sprite("astronaut.png", 0, (177.8, 56.0, 270.9, 178.6), 66),
    "caller": Sprite("carphone.mp4", 0, (64.3, 37.1, 113.0, 98.5), 62),
    "visitor": Sprite("carphone.mp4", 90, (35.1, 34.6, 89.6, 96.1), 56),
}


def _lerp(a: Point, b: Point, t: float) -> Point:
    return (a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t)


def _path(legs: Sequence[tuple[int, Point]]) -> Callable[[int], Point]:
    """Piecewise-linear path through (frame, centre in pixels) keyframes."""

    def at(f: int) -> Point:
        for (f0, p0), (f1, p1) in itertools.pairwise(legs):
            if f0 <= f <= f1:
                return _lerp(p0, p1, (f - f0) / max(1, f1 - f0))
        raise ValueError(f"frame {f} outside the path")

    return at


def _astronaut(f: int) -> Point:
    x, _ = _lerp((70.0, 0.0), (570.0, 0.0), (f - 5) / 170)
    return (x, 96.0 + 8.0 * math.sin(f / 12.0))


#: (object, first frame, last frame, centre of the face in pixels per frame), back to front.
PATHS: list[tuple[str, int, int, Callable[[int], Point]]] = [
    ("visitor", 40, 190, _path([(40, (205.0, 224.0)), (90, (352.0, 226.0)),
                                 (140, (356.0, 222.0)), (190, (590.0, 228.0))])),
    ("astronaut", 5, 175, _astronaut),
    ("caller", 15, 185, _path([(15, (570.0, 146.0)), (185, (70.0, 146.0))])),
]


# ------------------------------------------------------------------------- geometry (script)


def anchor_point(box: Box) -> Point:
    """The point of ``box`` (normalised xyxy) that zones and lines judge (``ANCHOR``)."""
    return ((box[0] + box[2]) / 2, box[3])


def inside(poly: Sequence[Point], p: Point) -> bool:
    """Even-odd rule: is ``p`` inside the polygon?"""
    x, y = p
    hit = False
    for (x1, y1), (x2, y2) in zip(poly, [*poly[1:], poly[0]], strict=True):
        if (y1 > y) != (y2 > y) and x < x1 + (y - y1) * (x2 - x1) / (y2 - y1):
            hit = not hit
    return hit


def side(line: Sequence[Point], p: Point) -> int:
    """-1 left, +1 right of the line, seen from its ``a`` looking towards ``b``.

    In image coordinates (y down) the cross product of (b - a) and (p - a) is positive on the
    right: facing up the image (``gate``), +x is the right hand.
    """
    (x1, y1), (x2, y2) = line
    c = (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1)
    return 1 if c > 0 else -1


def _zone_visits(poly: Sequence[Point], boxes: dict[int, Box]) -> list[dict[str, Any]]:
    """Enter frame (first frame inside) and leave frame (first frame outside; None: never)."""
    visits: list[dict[str, Any]] = []
    was = False
    for f in sorted(boxes):
        now = inside(poly, anchor_point(boxes[f]))
        if now and not was:
            visits.append({"enter": f, "leave": None})
        elif was and not now:
            visits[-1]["leave"] = f
        was = now
    return visits


def _crossings(line: Sequence[Point], boxes: dict[int, Box]) -> list[dict[str, Any]]:
    """Frames where the anchor is first on the other side of the line, with the direction."""
    out: list[dict[str, Any]] = []
    prev: int | None = None
    for f in sorted(boxes):
        s = side(line, anchor_point(boxes[f]))
        if prev is not None and s != prev:
            out.append({"frame": f, "direction": "left_to_right" if prev < 0
                        else "right_to_left"})
        prev = s
    return out


def script() -> dict[str, Any]:
    """The ground truth, without drawing anything (the clip is drawn from the same numbers)."""
    objects = []
    for name, first, last, at in PATHS:
        sp = SPRITES[name]
        fw, fh = sp.face[2] - sp.face[0], sp.face[3] - sp.face[1]
        h = float(sp.height)
        w = h * fw / fh
        boxes: dict[int, Box] = {}
        for f in range(first, last + 1):
            cx, cy = at(f)
            boxes[f] = (round((cx - w / 2) / WIDTH, 5), round((cy - h / 2) / HEIGHT, 5),
                        round((cx + w / 2) / WIDTH, 5), round((cy + h / 2) / HEIGHT, 5))
        objects.append({
            "id": name, "label": "face", "source": f"{sp.source}#{sp.frame}",
            "first": first, "last": last,
            "boxes": [list(boxes[f]) for f in range(first, last + 1)],
            "zones": {z: _zone_visits(poly, boxes) for z, poly in ZONES.items()},
            "lines": {n: _crossings(seg, boxes) for n, seg in LINES.items()},
        })
    return {
        "format": SCRIPT_FORMAT, "clip": f"{CLIP_NAME}.mp4", "fps": FPS, "frames": FRAMES,
        "width": WIDTH, "height": HEIGHT, "anchor": ANCHOR,
        "background": f"bikes.mp4 frames {BACKGROUND_FRAMES[0]}-{BACKGROUND_FRAMES[1]}, "
                      "forward then backward",
        "zones": {z: [list(p) for p in poly] for z, poly in ZONES.items()},
        "lines": {n: [list(p) for p in seg] for n, seg in LINES.items()},
        "objects": objects,
    }


# --------------------------------------------------------------------------------- drawing


def _read_frames(path: Path, wanted: set[int]) -> dict[int, np.ndarray]:
    import cv2

    cap = cv2.VideoCapture(str(path))
    got: dict[int, np.ndarray] = {}
    i = 0
    while len(got) < len(wanted):
        ok, frame = cap.read()
        if not ok:
            break
        if i in wanted:
            got[i] = frame
        i += 1
    cap.release()
    if len(got) != len(wanted):
        raise SystemExit(f"models: error: {path} has fewer frames than the clip needs")
    return got


def _cut(samples: Path, sp: Sprite) -> tuple[np.ndarray, np.ndarray, Box]:
    """The sprite (BGR), its alpha (float 0..1, a feathered ellipse) and its face box in it."""
    import cv2

    if sp.source.endswith(".png"):
        img = cv2.imread(str(samples / sp.source))
        if img is None:
            raise SystemExit(f"models: error: cannot read {samples / sp.source}")
    else:
        img = _read_frames(samples / sp.source, {sp.frame})[sp.frame]
    x1, y1, x2, y2 = sp.face
    fw, fh = x2 - x1, y2 - y1
    # a margin of hair, ears and neck around the face: the detector needs context
    mx, my = 0.35 * fw, 0.3 * fh
    cx1, cy1 = max(0, int(x1 - mx)), max(0, int(y1 - my))
    cx2, cy2 = min(img.shape[1], int(x2 + mx)), min(img.shape[0], int(y2 + my))
    scale = sp.height / fh
    crop = img[cy1:cy2, cx1:cx2]
    size = (round(crop.shape[1] * scale), round(crop.shape[0] * scale))
    sprite = cv2.resize(crop, size, interpolation=cv2.INTER_AREA if scale < 1 else
                        cv2.INTER_CUBIC)
    alpha = np.zeros(sprite.shape[:2], np.float32)
    h, w = alpha.shape
    cv2.ellipse(alpha, (w // 2, h // 2), (int(w * 0.47), int(h * 0.47)), 0, 0, 360, 1.0, -1)
    k = max(3, (min(w, h) // 8) | 1)
    alpha = cv2.GaussianBlur(alpha, (k, k), 0)
    face = ((x1 - cx1) * scale, (y1 - cy1) * scale, (x2 - cx1) * scale, (y2 - cy1) * scale)
    return sprite, alpha, face


def _paste(frame: np.ndarray, sprite: np.ndarray, alpha: np.ndarray, x: int, y: int) -> None:
    h, w = alpha.shape
    fy1, fx1 = max(0, y), max(0, x)
    fy2, fx2 = min(frame.shape[0], y + h), min(frame.shape[1], x + w)
    if fy2 <= fy1 or fx2 <= fx1:
        return
    a = alpha[fy1 - y : fy2 - y, fx1 - x : fx2 - x, None]
    s = sprite[fy1 - y : fy2 - y, fx1 - x : fx2 - x].astype(np.float32)
    region = frame[fy1:fy2, fx1:fx2].astype(np.float32)
    frame[fy1:fy2, fx1:fx2] = (s * a + region * (1 - a)).astype(np.uint8)


def faces_street(samples: Path) -> list[Path]:
    """Draw ``faces-street.mp4`` and write ``faces-street.json`` into ``samples``."""
    import av

    lo, hi = BACKGROUND_FRAMES
    order = list(range(lo, hi + 1)) + list(range(hi - 1, lo, -1))
    bg = _read_frames(samples / "bikes.mp4", set(order))
    if bg[lo].shape[:2] != (HEIGHT, WIDTH):
        raise SystemExit(f"models: error: bikes.mp4 is not {WIDTH}x{HEIGHT}")
    sprites = {name: _cut(samples, sp) for name, sp in SPRITES.items()}
    truth = script()
    by_id = {o["id"]: o for o in truth["objects"]}
    tmp = samples / f"{CLIP_NAME}.tmp.mp4"
    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height = WIDTH, HEIGHT
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "medium", "crf": "16", "threads": "1"}
        for f in range(FRAMES):
            frame = bg[order[f % len(order)]].copy()
            for name, first, last, _ in PATHS:  # back to front
                if not first <= f <= last:
                    continue
                sprite, alpha, face = sprites[name]
                x1, y1, _, _ = by_id[name]["boxes"][f - first]
                _paste(frame, sprite, alpha, round(x1 * WIDTH - face[0]),
                       round(y1 * HEIGHT - face[1]))
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="bgr24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    clip = samples / f"{CLIP_NAME}.mp4"
    tmp.replace(clip)
    meta = samples / f"{CLIP_NAME}.json"
    meta.write_text(json.dumps(truth, indent=1) + "\n", encoding="utf-8")
    return [clip, meta]


# ------------------------------------------------------------------------------------ check


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two xyxy boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def check(samples: Path, manifest: Path) -> dict[str, Any]:
    """Run CenterFace on every frame: per object, frames found (IoU >= 0.5); stray detections."""
    import cv2

    from edge_agent.config import EngineSettings
    from edge_agent.inference.engine import LoadedModel

    truth = json.loads((samples / f"{CLIP_NAME}.json").read_text())
    model = LoadedModel.load(manifest, EngineSettings())
    cap = cv2.VideoCapture(str(samples / truth["clip"]))
    found = {o["id"]: 0 for o in truth["objects"]}
    missed: dict[str, list[int]] = {o["id"]: [] for o in truth["objects"]}
    stray: list[int] = []
    ious: list[float] = []
    for f in range(truth["frames"]):
        ok, img = cap.read()
        if not ok:
            raise SystemExit(f"clip ends at frame {f}")
        dets = [d["box"] for d in model.infer(img).output["detections"]]
        for o in truth["objects"]:
            if not o["first"] <= f <= o["last"]:
                continue
            gt = o["boxes"][f - o["first"]]
            best = max((iou(gt, d) for d in dets), default=0.0)
            if best >= 0.5:
                found[o["id"]] += 1
                ious.append(best)
                dets = [d for d in dets if iou(gt, d) != best]
            else:
                missed[o["id"]].append(f)
        stray.extend(f for _ in dets)
    cap.release()
    model.close()
    return {"found": found, "missed": missed, "stray_frames": stray,
            "iou_mean": round(float(np.mean(ious)), 3), "iou_min": round(min(ious), 3)}


def main(argv: list[str] | None = None) -> int:
    """Build the clip into ``--samples``; with ``--check``, run CenterFace on it and report."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    root = Path(__file__).resolve().parent.parent
    ap.add_argument("--samples", type=Path, default=root / "models" / "out" / "samples")
    ap.add_argument("--check", action="store_true",
                    help="run models/out/centerface on the clip and print what it finds")
    args = ap.parse_args(argv)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    if not args.check:
        for p in faces_street(args.samples):
            print(p)
        return 0
    print(json.dumps(check(args.samples, root / "models" / "out" / "centerface" /
                           "manifest.json"), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
