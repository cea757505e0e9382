"""``edge-agent infer``: JSON lines on stdout, one-line errors and exit codes for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from edge_agent.cli import main
from models.generate import sha256_file

ROOT = Path(__file__).resolve().parents[3]


def infer(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[dict], list[str]]:
    rc = main(["infer", *args])
    out, err = capsys.readouterr()
    return rc, [orjson.loads(line) for line in out.splitlines()], err.splitlines()


def test_classifies_samples(models_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s = models_dir / "samples"
    rc, objs, err = infer(capsys, "--model", str(models_dir / "efficientnet-lite0"),
                          str(s / "chelsea.png"), str(s / "coffee.png"))
    assert rc == 0 and err == []
    assert [o["classes"][0]["label"] for o in objs] == ["Egyptian cat", "espresso"]
    o = objs[0]
    assert o["model"] == {"name": "efficientnet-lite0", "version": "1.0.0"}
    assert o["provider"] == "cpu" and o["task"] == "classification"
    assert o["frame"] == {"width": 451, "height": 300}
    assert set(o["latency_ms"]) == {"preprocess", "inference", "postprocess"}


def test_model_given_as_onnx_or_manifest(models_dir: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    img = str(models_dir / "samples" / "astronaut.png")
    for model in ("centerface/model.onnx", "centerface/manifest.json"):
        rc, (obj,), _ = infer(capsys, "--model", str(models_dir / model), img)
        assert rc == 0 and obj["detections"][0]["label"] == "face"


def test_bad_images_each_get_one_line_and_the_rest_run(
    models_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "text.png").write_text("not an image at all")
    good = (models_dir / "samples" / "chelsea.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(good[:3000])
    rc, objs, err = infer(
        capsys, "--model", str(models_dir / "tiny-classifier"), str(tmp_path / "text.png"),
        str(tmp_path / "missing.png"), str(tmp_path / "truncated.png"), str(tmp_path),
        str(models_dir / "samples" / "coffee.png"),
    )
    assert rc == 1
    assert [o["image"] for o in objs] == [str(models_dir / "samples" / "coffee.png")]
    assert err == [
        f"edge-agent: error: {tmp_path / 'text.png'}: not an image (or a corrupt one)",
        f"edge-agent: error: {tmp_path / 'missing.png'}: no such file",
        f"edge-agent: error: {tmp_path / 'truncated.png'}: not an image (or a corrupt one)",
        f"edge-agent: error: {tmp_path}: is a directory, not an image",
    ]


def _one_error(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    rc, objs, err = infer(capsys, *args)
    assert objs == [] and len(err) == 1, err
    assert err[0].startswith("edge-agent: error: ")
    return rc, err[0]


def test_bad_models(models_dir: Path, tmp_path: Path,
                    capsys: pytest.CaptureFixture[str]) -> None:
    img = str(models_dir / "samples" / "coffee.png")
    rc, line = _one_error(capsys, "--model", str(models_dir / "bad-input-mismatch"), img)
    assert rc == 1 and "input 'images' has shape" in line
    rc, line = _one_error(capsys, "--model", str(models_dir / "bad-output-mismatch"), img)
    assert rc == 1 and "output 'output0' has shape" in line
    rc, line = _one_error(capsys, "--model", str(tmp_path / "nothing"), img)
    assert rc == 1 and "manifest not found" in line
    # a truncated .onnx whose manifest digest matches (so onnxruntime itself must refuse it)
    src = models_dir / "tiny-classifier"
    (tmp_path / "model.onnx").write_bytes((src / "model.onnx").read_bytes()[:100])
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["sha256"] = sha256_file(tmp_path / "model.onnx")
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    rc, line = _one_error(capsys, "--model", str(tmp_path / "model.onnx"), img)
    assert rc == 1 and "cannot load model tiny-classifier" in line
    manifest["task"] = "pose"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    rc, line = _one_error(capsys, "--model", str(tmp_path), img)
    assert rc == 1 and "unknown task 'pose'" in line


def test_nan_outputs_fail_per_image(models_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = str(models_dir / "samples" / "coffee.png")
    rc, line = _one_error(capsys, "--model", str(models_dir / "bad-nan"), img)
    assert rc == 1 and line == f"edge-agent: error: {img}: model output 0 contains NaN or " \
        "infinite values"


def test_bad_config_exits_2(models_dir: Path, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("engine:\n  intra_op_threads: 0\n")
    img = str(models_dir / "samples" / "coffee.png")
    rc, line = _one_error(capsys, "--config", str(cfg), "--model",
                          str(models_dir / "tiny-classifier"), img)
    assert rc == 2 and "engine.intra_op_threads" in line
    rc, line = _one_error(capsys, "--providers", "gpu", "--model",
                          str(models_dir / "tiny-classifier"), img)
    assert rc == 2 and "--providers" in line


def test_installed_command_end_to_end(models_dir: Path, tmp_path: Path) -> None:
    """The console script itself: clean JSON on stdout, no traceback on stderr."""
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    exe = Path(sys.executable).parent / "edge-agent"
    proc = subprocess.run(
        [str(exe), "infer", "--model", str(models_dir / "efficientnet-lite0"),
         str(models_dir / "samples" / "chelsea.png"), str(bad)],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
        env={**os.environ, "EDGE_AGENT_ENGINE__PROVIDERS": '["cpu"]'},
    )
    assert proc.returncode == 1
    (line,) = proc.stdout.splitlines()
    assert json.loads(line)["classes"][0]["label"] == "Egyptian cat"
    assert proc.stderr.splitlines() == [
        f"edge-agent: error: {bad}: not an image (or a corrupt one)"
    ]


def test_a_missing_only_allowed_provider_is_warned(models_dir: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is installed here: nothing is missing")
    image = str(models_dir / "samples" / "chelsea.png")
    rc, objs, err = infer(capsys, "--providers", "cuda", "--model",
                          str(models_dir / "tiny-classifier"), image)
    assert rc == 0 and objs[0]["provider"] == "cpu"
    assert err == ["edge-agent: warning: none of the allowed providers (cuda) is available "
                   "here; running on cpu"]
    # allowing cpu as well is a choice: no warning
    rc, objs, err = infer(capsys, "--providers", "cuda,cpu", "--model",
                          str(models_dir / "tiny-classifier"), image)
    assert rc == 0 and err == []
