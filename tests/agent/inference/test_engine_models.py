"""The real models built by models/build.py give the right answers on the sample images."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent.config import EngineSettings
from edge_agent.inference.engine import LoadedModel

CPU = EngineSettings(providers=["cpu"], warmup_runs=1)
#: The astronaut's face in scikit-image's 512x512 ``astronaut``, labelled by hand (pixels xyxy).
ASTRONAUT_FACE = (180, 60, 272, 180)


@pytest.fixture(scope="module")
def efficientnet(models_dir: Path) -> LoadedModel:
    return LoadedModel.load(models_dir / "efficientnet-lite0" / "manifest.json", CPU)


def _image(models_dir: Path, name: str) -> np.ndarray:
    frame = cv2.imread(str(models_dir / "samples" / f"{name}.png"))
    assert frame is not None
    return frame


@pytest.mark.parametrize(("image", "label"), [("chelsea", "Egyptian cat"),
                                              ("coffee", "espresso")])
def test_efficientnet_top1(efficientnet: LoadedModel, models_dir: Path, image: str,
                           label: str) -> None:
    out = efficientnet.infer(_image(models_dir, image)).output
    classes = out["classes"]
    assert classes[0]["label"] == label
    assert classes[0]["score"] > 0.5
    assert len(classes) == 5 and classes == sorted(classes, key=lambda c: -c["score"])


def test_efficientnet_manifest_has_imagenet_labels(efficientnet: LoadedModel) -> None:
    labels = efficientnet.manifest.labels
    assert len(labels) == 1000
    assert (labels[0], labels[285], labels[967]) == ("tench", "Egyptian cat", "espresso")
    assert efficientnet.batch_dynamic


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_centerface_finds_the_astronauts_face(models_dir: Path) -> None:
    model = LoadedModel.load(models_dir / "centerface" / "manifest.json", CPU)
    frame = _image(models_dir, "astronaut")
    h, w = frame.shape[:2]
    dets = model.infer(frame).output["detections"]
    assert len(dets) == 1, dets
    (face,) = dets
    assert face["label"] == "face" and face["score"] > 0.7
    box_px = (face["box"][0] * w, face["box"][1] * h, face["box"][2] * w, face["box"][3] * h)
    assert _iou(box_px, ASTRONAUT_FACE) > 0.7, box_px
    (lx, ly), (rx, ry), (nx, ny), (mlx, mly), (mrx, mry) = face["landmarks"]
    assert lx < nx < rx and mlx < mrx  # left eye / mouth corner left of the right ones
    assert max(ly, ry) < ny < min(mly, mry)  # eyes above the nose above the mouth
    x1, y1, x2, y2 = face["box"]
    assert all(x1 <= x <= x2 and y1 <= y <= y2 for x, y in face["landmarks"])


def test_centerface_on_a_frame_without_faces(models_dir: Path) -> None:
    model = LoadedModel.load(models_dir / "centerface" / "manifest.json", CPU)
    assert model.infer(np.full((480, 640, 3), 90, np.uint8)).output == {"detections": []}


def test_yolov8n_like_runs_batched(models_dir: Path) -> None:
    model = LoadedModel.load(models_dir / "yolov8n-like" / "manifest.json", CPU)
    frame = _image(models_dir, "astronaut")
    x, meta = model.preprocess(frame)
    (out,) = model.run(np.concatenate([x, x]))
    assert out.shape == (2, 84, 2100)
    a, b = model.postprocess([out], [meta, meta])
    assert a == b
    for d in a["detections"]:
        assert 0.25 <= d["score"] <= 1 and all(0.0 <= v <= 1.0 for v in d["box"])
