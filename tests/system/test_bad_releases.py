"""The variants models/variants.py builds: bad releases disagree with the good model, faithful
re-exports agree, measured the way the agent's shadow phase measures it.

Real ONNX Runtime sessions through the agent's engine (``LoadedModel``: manifest, preprocessing,
post-processing), on real frames: the three sample images, every frame of ``bikes.mp4`` and of
``carphone.mp4`` (a face close up), 373 frames. Per frame the agreement is the agent's own
(``edge_agent.streaming.shadow.agreement``: classification, top-1 labels equal; faces, F1 of
one-to-one same-label IoU >= 0.5 matches, 1 when both are empty); a variant's agreement is the
mean over frames, as the hub computes it. Speed is not asserted here (``bench/releases.py``).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from edge_agent.config import EngineSettings
from edge_agent.contract.manifest import load_manifest
from edge_agent.inference.engine import LoadedModel
from edge_agent.streaming.shadow import agreement
from models import variants

#: The shadow gate the issue names: ``agreement>=0.9``.
GATE = 0.9
#: A bad release must sit this far below the gate; a faithful re-export this high.
BAD_AT_MOST = 0.8
FAITHFUL_AT_LEAST = 0.95

#: folder -> what it must do against its parent (measured on x86 with ORT 1.23 in the
#: comments; models/README.md lists them too).
EXPECTED = {
    "efficientnet-lite0-bgr": "bad",  # 0.74
    "efficientnet-lite0-norm": "bad",  # 0.42
    "efficientnet-lite0-shuffled": "bad",  # 0.00 by label (1.00 by class id: compare labels)
    "efficientnet-lite0-reexport": "faithful",  # 1.00
    # 0.89 (bikes.mp4 0.84, carphone 1.00): static INT8 flips the top-1 of low-confidence
    # frames (the median fp32 top-1 probability on bikes.mp4 is 0.23); on the edge of a 0.9 gate
    "efficientnet-lite0-int8": "degraded",
    # 0.98: CenterFace finds the same faces in swapped colours (scores ~2 % lower): the swap is
    # harmless for this detector, so a shadow phase rightly lets it pass
    "centerface-bgr": "harmless",
    "centerface-norm": "bad",  # 0.53: p/255 input, no face found anywhere
    "centerface-reexport": "faithful",  # 1.00
}


def _video(path: Path) -> Iterator[np.ndarray]:
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    assert cap.isOpened(), path
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                return
            yield frame
    finally:
        cap.release()


@pytest.fixture(scope="module")
def frames(models_dir: Path) -> list[np.ndarray]:
    samples = models_dir / "samples"
    out: list[np.ndarray] = []
    for name in variants.CALIBRATION_IMAGES:
        img = cv2.imread(str(samples / name), cv2.IMREAD_COLOR)
        assert img is not None, name
        out.append(img)
    out += [*_video(samples / "bikes.mp4"), *_video(samples / "carphone.mp4")]
    assert len(out) >= 300
    return out


def _outputs(models_dir: Path, folder: str, frames: list[np.ndarray]) -> list[dict[str, Any]]:
    model = LoadedModel.load(models_dir / folder / "manifest.json",
                             EngineSettings(providers=["cpu"]))
    try:
        return [model.infer(f).output for f in frames]
    finally:
        model.close()


@pytest.fixture(scope="module")
def good(models_dir: Path, frames: list[np.ndarray]) -> Callable[[str], list[dict[str, Any]]]:
    """The good models' outputs, computed once per parent on first use."""

    @functools.cache
    def outputs(parent: str) -> list[dict[str, Any]]:
        return _outputs(models_dir, parent, frames)

    return outputs


@pytest.mark.slow
@pytest.mark.timeout(300)  # a CenterFace pass over 373 frames at 640x480 on a busy 2-core box
@pytest.mark.parametrize(("folder", "parent"), [(n, p) for n, p, _ in variants.VARIANTS])
def test_agreement_with_the_good_version(
    models_dir: Path, frames: list[np.ndarray], good: Callable[[str], list[dict[str, Any]]],
    folder: str, parent: str,
) -> None:
    ref = good(parent)
    out = _outputs(models_dir, folder, frames)
    scores = [agreement(a, c) for a, c in zip(ref, out, strict=True)]
    value = float(np.mean(scores))
    verdict = EXPECTED[folder]
    where = f"{folder}: agreement {value:.3f} over {len(scores)} frames"
    if verdict == "bad":
        assert value <= BAD_AT_MOST, where
    elif verdict == "faithful":
        assert value >= FAITHFUL_AT_LEAST, where
    elif verdict == "harmless":
        assert GATE <= value < 1.0, where
    else:  # degraded: close to the parent, not a different model
        assert value >= BAD_AT_MOST, where
    if parent == "centerface":
        # the frames must give a face detector work, or "both empty" would agree for free
        assert sum(1 for o in ref if o["detections"]) >= 150


def test_every_variant_is_expected_and_built(models_dir: Path) -> None:
    assert set(EXPECTED) == {n for n, _, _ in variants.VARIANTS}
    index = json.loads((models_dir / "index.json").read_text())
    steps = {e["step"] for e in index["items"]}
    assert set(EXPECTED) <= steps


def _first_conv_weight(path: Path) -> np.ndarray:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    init = next(i for i in model.graph.initializer if i.name == conv.input[1])
    return numpy_helper.to_array(init)


@pytest.mark.parametrize("parent", ["efficientnet-lite0", "centerface"])
def test_each_variant_changes_only_what_it_says(models_dir: Path, parent: str) -> None:
    base = load_manifest(models_dir / parent / "manifest.json")
    w = _first_conv_weight(models_dir / parent / "model.onnx")
    own = {"version", "sha256", "description", "source"}

    def changed(folder: str) -> dict[str, Any]:
        m = load_manifest(models_dir / folder / "manifest.json")
        assert m.name == base.name and m.version != base.version
        a, b = m.model_dump(), base.model_dump()
        return {k: a[k] for k in a if a[k] != b[k] and k not in own}

    # swapped: same manifest, the first conv's input channels reversed
    assert changed(f"{parent}-bgr") == {}
    np.testing.assert_array_equal(_first_conv_weight(models_dir / f"{parent}-bgr" / "model.onnx"),
                                  w[:, ::-1])
    # re-export: the same reversal, with the colour order that undoes it
    assert changed(f"{parent}-reexport")["input"]["color"] == "BGR"
    # wrong normalisation: the graph unchanged, the pixel transform p/255
    norm = load_manifest(models_dir / f"{parent}-norm" / "manifest.json")
    assert norm.sha256 == base.sha256 and set(changed(f"{parent}-norm")) == {"input"}
    assert (norm.input.scale, norm.input.mean, norm.input.std) == (1 / 255, (0, 0, 0), (1, 1, 1))
    if parent == "efficientnet-lite0":
        shuffled = load_manifest(models_dir / f"{parent}-shuffled" / "manifest.json")
        assert set(changed(f"{parent}-shuffled")) == {"labels"}
        assert sorted(shuffled.labels) == sorted(base.labels)
        assert shuffled.labels != base.labels


def test_a_variant_of_a_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="is not built"):
        variants.channel_swap(tmp_path / "nope", tmp_path / "nope-bgr")
