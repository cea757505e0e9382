"""YOLO decoding through real ONNX Runtime sessions on generated heads with known outputs.

The heads (models/generate.py) emit constant boxes in model-input pixels, so every expected
value below is computed here from the encoded boxes and the letterbox geometry, independently
of the engine's code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_agent.config import EngineSettings
from edge_agent.inference.engine import LoadedModel
from models.generate import (
    DEFAULT_BOXES,
    DEFAULT_KEPT,
    DEFAULT_LABELS,
    EncodedBox,
    yolov5_head,
    yolov8_head,
)

SETTINGS = EngineSettings(providers=["cpu"], warmup_runs=1)
HEADS = {"v8": yolov8_head, "v5": yolov5_head}


def load(path: Path) -> LoadedModel:
    return LoadedModel.load(path, SETTINGS)


def expected(
    boxes: list[EncodedBox], frame_w: int, frame_h: int, in_w: int, in_h: int
) -> list[tuple[int, float, list[float]]]:
    """(cls, score, normalized xyxy) of ``boxes`` for a letterboxed frame."""
    r = min(in_w / frame_w, in_h / frame_h)
    nw, nh = round(frame_w * r), round(frame_h * r)
    px, py = (in_w - nw) // 2, (in_h - nh) // 2
    sx, sy = nw / frame_w, nh / frame_h
    out = []
    for b in boxes:
        x1, y1, x2, y2 = b.box
        norm = [
            (x1 - px) / sx / frame_w, (y1 - py) / sy / frame_h,
            (x2 - px) / sx / frame_w, (y2 - py) / sy / frame_h,
        ]
        out.append((b.cls, b.score, [min(max(v, 0.0), 1.0) for v in norm]))
    return out


def assert_dets(dets: list[dict], want: list[tuple[int, float, list[float]]]) -> None:
    assert len(dets) == len(want), dets
    for d, (cls, score, box) in zip(dets, want, strict=True):
        assert d["cls"] == cls
        assert d["label"] == DEFAULT_LABELS[cls]
        assert d["score"] == pytest.approx(score, abs=1e-5)
        assert d["box"] == pytest.approx(box, abs=1e-5)
        assert "landmarks" not in d


@pytest.mark.parametrize("layout", ["v8", "v5"])
def test_default_boxes_square_frame(tmp_path: Path, layout: str) -> None:
    """Same-class overlap suppressed, other class kept, low score dropped, best first."""
    model = load(HEADS[layout](tmp_path, "head", "1"))
    frame = np.zeros((320, 320, 3), np.uint8)
    dets = model.infer(frame).output["detections"]
    kept = [DEFAULT_BOXES[i] for i in DEFAULT_KEPT]
    assert_dets(dets, expected(kept, 320, 320, 320, 320))
    # the numbers themselves, not only the helper: A is (40, 60, 140, 200) / 320
    assert dets[0]["box"] == pytest.approx([0.125, 0.1875, 0.4375, 0.625], abs=1e-6)


@pytest.mark.parametrize("layout", ["v8", "v5"])
@pytest.mark.parametrize(("fw", "fh"), [(640, 360), (300, 600), (1280, 720), (333, 111)])
def test_boxes_map_back_through_letterbox(tmp_path: Path, layout: str, fw: int, fh: int) -> None:
    """Non-square frames: boxes come back in the frame's normalized coordinates."""
    r = min(320 / fw, 320 / fh)
    nw, nh = round(fw * r), round(fh * r)
    px, py = (320 - nw) // 2, (320 - nh) // 2
    # boxes inside the image content, plus one reaching into the padding (clipped to [0, 1])
    boxes = [
        EncodedBox(0, 0.9, (px + 0.1 * nw, py + 0.2 * nh, px + 0.4 * nw, py + 0.7 * nh)),
        EncodedBox(1, 0.8, (px + 0.5 * nw, py + 0.1 * nh, px + 0.9 * nw, py + 0.5 * nh)),
        EncodedBox(2, 0.7, (max(px - 5, 0.0), max(py - 5, 0.0), px + 0.2 * nw, py + 0.2 * nh)),
    ]
    model = load(HEADS[layout](tmp_path, "head", "1", boxes=boxes))
    dets = model.infer(np.zeros((fh, fw, 3), np.uint8)).output["detections"]
    want = expected(boxes, fw, fh, 320, 320)
    assert_dets(dets, want)
    assert dets[2]["box"][:2] == [0.0, 0.0]  # the part in the padding was clipped


def test_non_square_model_input(tmp_path: Path) -> None:
    model = load(yolov8_head(tmp_path, "head", "1", input_size=(480, 256)))
    dets = model.infer(np.zeros((720, 1280, 3), np.uint8)).output["detections"]
    kept = [DEFAULT_BOXES[i] for i in DEFAULT_KEPT]
    assert_dets(dets, expected(kept, 1280, 720, 480, 256))


@pytest.mark.parametrize("layout", ["v8", "v5"])
def test_thresholds_from_manifest(tmp_path: Path, layout: str) -> None:
    """conf_threshold inclusive, class-agnostic NMS, max_detections."""
    m = load(HEADS[layout](tmp_path / "a", "head", "1", conf_threshold=0.1))
    assert [d["score"] for d in m.infer(np.zeros((64, 64, 3), np.uint8)).output[
        "detections"]] == pytest.approx([0.9, 0.7, 0.6, 0.55, 0.1], abs=1e-5)
    m = load(HEADS[layout](tmp_path / "b", "head", "1", class_agnostic=True))
    # C has A's box: suppressed across classes now
    assert [d["score"] for d in m.infer(np.zeros((64, 64, 3), np.uint8)).output[
        "detections"]] == pytest.approx([0.9, 0.6, 0.55], abs=1e-5)
    m = load(HEADS[layout](tmp_path / "c", "head", "1", max_detections=2))
    assert len(m.infer(np.zeros((64, 64, 3), np.uint8)).output["detections"]) == 2
    m = load(HEADS[layout](tmp_path / "d", "head", "1", conf_threshold=0.95))
    assert m.infer(np.zeros((64, 64, 3), np.uint8)).output == {"detections": []}


def test_iou_just_below_threshold_keeps_both(tmp_path: Path) -> None:
    # IoU of these two is 0.4 (< 0.45): both stay; at 0.5 the second one goes
    a = EncodedBox(0, 0.9, (0.0, 0.0, 100.0, 100.0))
    b = EncodedBox(0, 0.8, (0.0, 0.0, 100.0, 40.0))  # inter 4000 / union 10000 = 0.4
    c = EncodedBox(0, 0.7, (0.0, 0.0, 100.0, 50.0))  # IoU with a = 0.5: suppressed
    m = load(yolov8_head(tmp_path, "head", "1", boxes=[a, b, c]))
    scores = [d["score"] for d in m.infer(np.zeros((320, 320, 3), np.uint8)).output[
        "detections"]]
    assert scores == pytest.approx([0.9, 0.8], abs=1e-6)


def test_batch_of_frames_keeps_each_frames_geometry(tmp_path: Path) -> None:
    model = load(yolov8_head(tmp_path, "head", "1"))
    assert model.batch_dynamic
    frames = [np.zeros((h, w, 3), np.uint8) for w, h in ((320, 320), (640, 360), (200, 400))]
    pre = [model.preprocess(f) for f in frames]
    outputs = model.run(np.concatenate([t for t, _ in pre]))
    assert outputs[0].shape[0] == 3
    results = model.postprocess(outputs, [m for _, m in pre])
    kept = [DEFAULT_BOXES[i] for i in DEFAULT_KEPT]
    for res, f in zip(results, frames, strict=True):
        assert_dets(res["detections"], expected(kept, f.shape[1], f.shape[0], 320, 320))


def test_fixed_batch_graph_gets_chunks(tmp_path: Path) -> None:
    model = load(yolov8_head(tmp_path, "head", "1", batch=2))
    assert not model.batch_dynamic and model.fixed_batch == 2
    x = np.concatenate([model.preprocess(np.zeros((50, 80, 3), np.uint8))[0]] * 3)
    outputs = model.run(x)  # 3 frames through a batch-2 graph: 2 + (1 padded)
    assert outputs[0].shape == (3, 7, 64)
