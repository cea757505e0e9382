"""Which nodes ``models quantize`` keeps in fp32: the first N compute nodes stay float in the
INT8 graph, unnamed nodes are named before being excluded, and the automatic choice measures
candidates on the calibration frames and keeps the first good and fast enough one (real ONNX
Runtime quantisation of the built models)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from edge_agent.commands import quantize as q
from edge_agent.contract import manifest as manifests


def _weights_in_fp32(model_file: Path) -> dict[str, bool]:
    """For each Conv/Gemm node: is its weight a float initializer (not dequantised int8)?"""
    graph = onnx.load(str(model_file)).graph
    floats = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    return {n.name: n.input[1] in floats for n in graph.node if n.op_type in ("Conv", "Gemm")}


@pytest.fixture(scope="module")
def sample_frames(models_dir: Path) -> list[np.ndarray]:
    return q.read_frames([models_dir / "samples" / "chelsea.png",
                          models_dir / "samples" / "coffee.png",
                          models_dir / "samples" / "carphone.mp4"], limit=6)


def test_the_first_compute_nodes_stay_fp32(models_dir: Path, tmp_path: Path,
                                           sample_frames: list[np.ndarray]) -> None:
    settings = q.Settings(fp32_first=3)
    manifest, names = q.quantize_nodes(models_dir / "efficientnet-lite0", tmp_path,
                                       sample_frames, settings, version="int8")
    assert names == ["/_conv_stem/Conv", "/_blocks.0/_depthwise_conv/Conv",
                     "/_blocks.0/_project_conv/Conv"]
    fp32 = _weights_in_fp32(manifest.parent / "model.onnx")
    assert [fp32[n] for n in names] == [True, True, True]
    assert fp32["/_blocks.1/_expand_conv/Conv"] is False and fp32["/_fc/Gemm"] is False
    report = settings.report(names)
    assert report.fp32_first_nodes == 3 and report.fp32_nodes == names
    assert "3 nodes in fp32" in manifests.load_manifest(manifest).description


def test_unnamed_nodes_are_named_before_they_are_excluded(
        models_dir: Path, tmp_path: Path, sample_frames: list[np.ndarray]) -> None:
    # CenterFace's nodes have no names: excluding "" would keep all of them in fp32
    _, names = q.quantize_nodes(models_dir / "centerface", tmp_path, sample_frames[:2],
                                q.Settings(fp32_first=2), version="int8")
    assert len(names) == 2 and all(names) and names[0] != names[1]
    fp32 = _weights_in_fp32(tmp_path / "model.onnx")
    assert [fp32[n] for n in names] == [True, True]
    assert sum(fp32.values()) == 2  # every other Conv is INT8


def test_the_choice_goes_past_all_int8_when_it_disagrees(models_dir: Path,
                                                         tmp_path: Path) -> None:
    # bikes.mp4 is where all-INT8 EfficientNet-Lite0 flips its top-1 (docs/registry.md)
    frames = q.read_frames([models_dir / "samples" / "bikes.mp4"], limit=24)
    settings, sel, folder, names = q.choose(
        models_dir / "efficientnet-lite0", tmp_path, frames, q.Settings(),
        q.Auto(target=0.95, min_speedup=0.0, candidates=(6, 0)), version="int8")
    assert [c.fp32_first_nodes for c in sel.candidates] == [0, 6]  # cheapest first
    all_int8, six = sel.candidates
    assert all_int8.agreement < 0.95 and six.agreement > all_int8.agreement
    assert sel.frames == 24 and sel.target_agreement == 0.95
    assert settings.fp32_first == 6 and len(names) == 6
    assert folder.name == "fp32-first-6" and (folder / "model.onnx").exists()
    assert sel.met == (six.agreement >= 0.95)


def test_a_candidate_below_the_speed_floor_ends_the_search(
        models_dir: Path, tmp_path: Path, sample_frames: list[np.ndarray]) -> None:
    settings, sel, _, names = q.choose(
        models_dir / "efficientnet-lite0", tmp_path, sample_frames[:3], q.Settings(),
        q.Auto(target=1.0, min_speedup=50.0, candidates=(0, 3, 6)), version="int8")
    # the first candidate is always measured and kept; the second is too slow, so 6 is never
    # tried, and nothing met a 50x floor
    assert [c.fp32_first_nodes for c in sel.candidates] == [0]
    assert sel.met is False and settings.fp32_first == 0 and names == []
    assert not (tmp_path / "fp32-first-6").exists()


def test_run_reports_the_choice_and_measures_on_heldout_frames(
        models_dir: Path, tmp_path: Path, sample_frames: list[np.ndarray]) -> None:
    calib, held = q.split(sample_frames, 3)
    report = q.run(models_dir / "efficientnet-lite0", tmp_path / "int8", version="int8",
                   calibration=calib, heldout=held, settings=q.Settings(),
                   sources=("a", "b"), rounds=1, seconds=0.2,
                   auto=q.Auto(target=0.0, min_speedup=0.0))
    assert report.selection is not None and report.selection.met
    # a target of 0 is met by the first candidate: all INT8
    assert [c.fp32_first_nodes for c in report.selection.candidates] == [0]
    assert report.settings.fp32_first_nodes == 0 and report.settings.fp32_nodes == []
    assert report.selection.frames == len(calib) and report.agreement.frames == len(held)
    assert sorted(p.name for p in (tmp_path / "int8").iterdir()) == ["manifest.json",
                                                                      "model.onnx"]
