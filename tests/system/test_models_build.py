"""models/build.py: the index matches the files, reruns are no-ops, damage is rebuilt."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edge_agent.contract.manifest import load_manifest
from models import build
from models.generate import sha256_file

EXPECTED_MODELS = {
    "efficientnet-lite0", "centerface", "yolov8n-like", "yolov8n-like-slow", "yolov8-head",
    "yolov5-head", "tiny-classifier", "bad-nan", "bad-output-mismatch", "bad-input-mismatch",
}
#: models/variants.py: (folder, model name, version) of the real models' variants
EXPECTED_VARIANTS = {
    *((f"efficientnet-lite0-{v}", "efficientnet-lite0", f"1.0.0-{v}")
      for v in ("bgr", "norm", "shuffled", "reexport", "int8")),
    *((f"centerface-{v}", "centerface", f"1.0.0-{v}") for v in ("bgr", "norm", "reexport")),
}
EXPECTED_SAMPLES = {"chelsea.png", "astronaut.png", "coffee.png", "bikes.mp4", "carphone.mp4",
                    "synthetic-720p.mp4", "faces-street.mp4", "faces-street.json"}


def test_index_lists_every_file_with_its_sha256(models_dir: Path) -> None:
    index = json.loads((models_dir / "index.json").read_text())
    assert index["format"] == 1
    # one folder (= step) per model version; a variant shares its parent's name
    models = {e["step"]: e for e in index["items"] if e["kind"] == "model"}
    assert set(models) == EXPECTED_MODELS | {v[0] for v in EXPECTED_VARIANTS}
    assert {(step, models[step]["name"], models[step]["version"]) for step, *_ in
            EXPECTED_VARIANTS} == EXPECTED_VARIANTS
    samples = {Path(f["path"]).name for e in index["items"] if e["kind"] == "samples"
               for f in e["files"]}
    assert samples == EXPECTED_SAMPLES
    for e in index["items"]:
        for f in e["files"]:
            p = models_dir / f["path"]
            assert p.stat().st_size == f["size"] and sha256_file(p) == f["sha256"], p
    for step, e in models.items():
        m = load_manifest(models_dir / e["manifest"])
        assert (m.name, m.version, m.task, m.sha256) == (e["name"], e["version"], e["task"],
                                                         e["sha256"])
        assert sha256_file(models_dir / step / m.file) == m.sha256


def test_rerun_changes_nothing(models_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (models_dir / "index.json").read_text()
    build.build(models_dir)
    lines = capsys.readouterr().out.splitlines()
    assert all(line.endswith("up to date") for line in lines[:-1]), lines
    assert (models_dir / "index.json").read_text() == before


def test_damaged_or_missing_outputs_are_rebuilt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # only the cheap generated steps, in a folder of the test's own
    cheap = [s for s in build.steps() if s[0] in ("tiny-classifier", "yolov8-head")]
    monkeypatch.setattr(build, "steps", lambda: cheap)
    build.build(tmp_path)
    capsys.readouterr()
    (tmp_path / "tiny-classifier" / "model.onnx").write_bytes(b"damaged")
    shutil.rmtree(tmp_path / "yolov8-head")
    build.build(tmp_path)
    out = capsys.readouterr().out
    assert "tiny-classifier: built" in out and "yolov8-head: built" in out
    load_manifest(tmp_path / "tiny-classifier" / "manifest.json")
    build.build(tmp_path)
    assert capsys.readouterr().out.count("up to date") == 2
