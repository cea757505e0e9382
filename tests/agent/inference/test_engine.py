"""Engine loading, refusals, provider selection and concurrency, on real ORT sessions."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from structlog.testing import capture_logs

from edge_agent.config import EngineSettings
from edge_agent.contract.manifest import load_manifest
from edge_agent.contract.rejection import Reason, Rejection
from edge_agent.errors import InputError, ModelError, ModelRejectedError
from edge_agent.inference import providers as prov
from edge_agent.inference.engine import LoadedModel
from edge_agent.inference.postprocess import NonFiniteOutputError
from edge_agent.inference.preprocess import Preprocessor
from models.generate import (
    input_mismatch_model,
    nan_model,
    output_mismatch_model,
    sha256_file,
    tiny_classifier,
    yolov8_head,
)

CPU = EngineSettings(providers=["cpu"], warmup_runs=1)


def _edit_manifest(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# ----------------------------------------------------------------------------- loading


def test_load_exposes_the_interface(tmp_path: Path) -> None:
    mp = tiny_classifier(tmp_path, "tiny", "2.1.0")
    m = LoadedModel.load(mp, CPU, expected_sha256=sha256_file(tmp_path / "model.onnx"))
    assert (m.name, m.version, m.task, m.providers) == ("tiny", "2.1.0", "classification", ["cpu"])
    assert m.sha256 == load_manifest(mp).sha256 and m.batch_dynamic
    assert m.manifest.input.width == 32
    m.close()
    with pytest.raises(ModelError, match="closed"):
        m.run(np.zeros((1, 3, 32, 32), np.float32))


def test_colour_order_follows_the_manifest(tmp_path: Path) -> None:
    red_bgr = np.zeros((40, 60, 3), np.uint8)
    red_bgr[..., 2] = 255
    rgb = LoadedModel.load(tiny_classifier(tmp_path / "rgb", "tiny", "1"), CPU)
    out = rgb.infer(red_bgr).output
    assert out["classes"][0]["label"] == "red"
    assert [c["id"] for c in out["classes"]] == [0, 1, 2]
    assert sum(c["score"] for c in out["classes"]) == pytest.approx(1.0, abs=1e-5)
    bgr = LoadedModel.load(tiny_classifier(tmp_path / "bgr", "tiny", "1", color="BGR"), CPU)
    assert bgr.infer(red_bgr).output["classes"][0]["label"] == "blue"


def test_sha256_mismatch_is_refused(tmp_path: Path) -> None:
    mp = tiny_classifier(tmp_path, "tiny", "1")
    with pytest.raises(ModelRejectedError, match="not the expected") as ei:
        LoadedModel.load(mp, CPU, expected_sha256="0" * 64)
    assert ei.value.digest == sha256_file(tmp_path / "model.onnx")
    with (tmp_path / "model.onnx").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelRejectedError, match="does not match the manifest"):
        LoadedModel.load(mp, CPU)


def test_corrupt_and_truncated_onnx_are_refused(tmp_path: Path) -> None:
    mp = yolov8_head(tmp_path, "head", "1")
    onnx_path = tmp_path / "model.onnx"
    data = onnx_path.read_bytes()
    for bad in (data[: len(data) // 2], b"\x08\x07garbage" * 50):
        onnx_path.write_bytes(bad)
        _edit_manifest(mp, sha256=sha256_file(onnx_path))  # so only the content is wrong
        with pytest.raises(ModelRejectedError, match="cannot load model head 1"):
            LoadedModel.load(mp, CPU)


def test_missing_model_file(tmp_path: Path) -> None:
    mp = tiny_classifier(tmp_path, "tiny", "1")
    (tmp_path / "model.onnx").unlink()
    with pytest.raises(ModelRejectedError, match="model file not found"):
        LoadedModel.load(mp, CPU)


def test_graph_that_disagrees_with_its_manifest_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelRejectedError, match=r"input 'images' has shape .*224, 224") as ei:
        LoadedModel.load(input_mismatch_model(tmp_path / "i", "bad", "1"), CPU)
    # the contract's verdict, as the hub would give it at push
    assert ei.value.reason == "input_shape" and ei.value.rejection is not None
    assert str(ei.value).startswith(ei.value.rejection.message)
    with pytest.raises(ModelRejectedError, match=r"output 'output0' has shape .*10, 5") as ei:
        LoadedModel.load(output_mismatch_model(tmp_path / "o", "bad", "1"), CPU)
    assert ei.value.reason == "output_shape"
    mp = tiny_classifier(tmp_path / "n", "tiny", "1")
    data = json.loads(mp.read_text())
    data["input"]["name"] = "pixels"
    mp.write_text(json.dumps(data))
    with pytest.raises(ModelRejectedError, match="no input 'pixels'"):
        LoadedModel.load(mp, CPU)
    mp = tiny_classifier(tmp_path / "b", "tiny", "1", batch=1)
    data = json.loads(mp.read_text())
    data["input"]["batch"] = "dynamic"
    mp.write_text(json.dumps(data))
    with pytest.raises(ModelRejectedError, match="batch is fixed at 1"):
        LoadedModel.load(mp, CPU)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"task": "segmentation"}, "task: .*unknown task 'segmentation'"),
        ({"sha256": "xyz"}, "sha256: .*64 lowercase hex"),
        ({"name": "Bad Name"}, "name: "),
        ({"file": "../etc/passwd"}, "file: .*plain file name"),
        ({"colour": "RGB"}, "colour: unknown key"),
        ({"postprocess": {"top_k": 0}}, "postprocess.top_k"),
        ({"postprocess": {"layout": "v9"}}, "postprocess.layout"),
    ],
)
def test_bad_manifest_is_a_model_error(tmp_path: Path, change: dict, message: str) -> None:
    mp = tiny_classifier(tmp_path, "tiny", "1")
    _edit_manifest(mp, **change)
    with pytest.raises(ModelError, match=message):
        LoadedModel.load(mp, CPU)


def test_unreadable_manifests(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"nope\.json: manifest not found") as ei:
        LoadedModel.load(tmp_path / "nope.json", CPU)
    assert ei.value.reason == "manifest_unreadable"
    (tmp_path / "m.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON") as ei:
        LoadedModel.load(tmp_path / "m.json", CPU)
    assert ei.value.reason == "manifest_not_json"
    (tmp_path / "m.json").write_text("[1, 2]")
    with pytest.raises(ModelError, match="must be a JSON object") as ei:
        LoadedModel.load(tmp_path / "m.json", CPU)
    assert ei.value.reason == "manifest_not_object"
    # the contract's own function says the same, without the agent's wrapper
    with pytest.raises(Rejection, match="must be a JSON object") as rj:
        load_manifest(tmp_path / "m.json")
    assert rj.value.reason is Reason.MANIFEST_NOT_OBJECT
    assert rj.value.source == str(tmp_path / "m.json")


def test_nan_model_loads_then_every_inference_fails(tmp_path: Path) -> None:
    model = LoadedModel.load(nan_model(tmp_path, "nan", "1"), CPU)
    with pytest.raises(NonFiniteOutputError):
        model.infer(np.full((100, 100, 3), 50, np.uint8))
    assert issubclass(NonFiniteOutputError, ModelError)


def test_bad_frames_are_input_errors(tmp_path: Path) -> None:
    model = LoadedModel.load(tiny_classifier(tmp_path, "tiny", "1"), CPU)
    for bad in (np.zeros((0, 0, 3), np.uint8), np.zeros((4, 4, 3), np.float32),
                np.zeros((4, 4, 5), np.uint8)):
        with pytest.raises(InputError):
            model.preprocess(bad)
    # grey and BGRA frames are converted, not refused
    assert model.infer(np.zeros((10, 10), np.uint8)).output["classes"]
    assert model.infer(np.zeros((10, 10, 4), np.uint8)).output["classes"]


def test_preprocess_nhwc_layout_and_normalization(tmp_path: Path) -> None:
    spec = load_manifest(tiny_classifier(tmp_path, "tiny", "1")).input.model_copy(
        update={"layout": "NHWC", "mean": (1.0, 2.0, 3.0), "std": (2.0, 2.0, 2.0), "scale": 1.0,
                "width": 8, "height": 4, "letterbox": True})
    frame = np.full((4, 4, 3), (10, 20, 30), np.uint8)  # BGR
    x, meta = Preprocessor(spec)(frame)
    assert x.shape == (1, 4, 8, 3) and x.dtype == np.float32
    # RGB order: (30 - 1) / 2, (20 - 2) / 2, (10 - 3) / 2 in the content, padding elsewhere
    assert x[0, 0, 4].tolist() == [14.5, 9.0, 3.5]
    assert x[0, 0, 0].tolist() == [(114 - 1) / 2, (114 - 2) / 2, (114 - 3) / 2]
    assert (meta.pad_x, meta.pad_y, meta.scale_x) == (2.0, 0.0, 1.0)


# ---------------------------------------------------------------------------- providers


def test_plan_orders_fastest_first_and_always_ends_with_cpu() -> None:
    assert prov.plan(["cpu", "cuda", "tensorrt"], ["cuda", "tensorrt", "cpu"]) == (
        ["tensorrt", "cuda", "cpu"], [])
    assert prov.plan(["tensorrt"], ["cpu"]) == (["cpu"], ["tensorrt"])
    assert prov.plan(["cuda"], ["cuda", "cpu"]) == (["cuda", "cpu"], [])


def test_tensorrt_requested_with_only_cpu_falls_back_logged_and_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if prov.available_providers() != ["cpu"]:  # a GPU build: make it a CPU-only box
        monkeypatch.setattr(prov, "available_providers", lambda: ["cpu"])
    mp = tiny_classifier(tmp_path, "tiny", "1")
    before = prov.fallback_counts().get(("tensorrt", "unavailable"), 0)
    settings = EngineSettings(providers=["tensorrt"], trt_cache_dir=tmp_path / "trt")
    with capture_logs() as logs:
        model = LoadedModel.load(mp, settings)
    assert model.providers == ["cpu"]
    assert model.infer(np.zeros((8, 8, 3), np.uint8)).output["classes"]
    assert prov.fallback_counts()[("tensorrt", "unavailable")] == before + 1
    events = [e for e in logs if e["event"] == "provider_fallback"]
    assert events == [{
        "event": "provider_fallback", "log_level": "info", "provider": "tensorrt",
        "reason": "unavailable", "model": "tiny", "fallback_to": "cpu", "error": None,
    }]


def test_provider_that_fails_to_initialise_is_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pretend this onnxruntime build lists CUDA: the real session then fails to use it.
    monkeypatch.setattr(prov, "available_providers", lambda: ["cuda", "cpu"])
    before = prov.fallback_counts().get(("cuda", "init_failed"), 0)
    with capture_logs() as logs:
        model = LoadedModel.load(tiny_classifier(tmp_path, "tiny", "1"),
                                 EngineSettings(providers=["cuda", "cpu"]))
    assert model.providers == ["cpu"]
    assert prov.fallback_counts()[("cuda", "init_failed")] == before + 1
    (event,) = [e for e in logs if e["event"] == "provider_fallback"]
    assert event["log_level"] == "warning" and event["provider"] == "cuda"
    assert "CUDAExecutionProvider" in event["error"]


def test_tensorrt_options_and_cache_key(tmp_path: Path) -> None:
    s = EngineSettings(trt_cache_dir=tmp_path, trt_fp16=False)
    sha = "ab" * 32
    opts = prov.provider_options("tensorrt", s, sha)
    cache = Path(opts["trt_engine_cache_path"])
    assert cache.is_dir() and cache.parent == tmp_path
    assert cache.name.startswith("abababababababab-")
    assert f"trt{prov.tensorrt_version()}".lower() in cache.name
    assert opts["trt_fp16_enable"] is False and opts["trt_engine_cache_enable"] is True
    assert prov.trt_cache_dir(tmp_path, "cd" * 32) != cache  # another model, another engine


# ---------------------------------------------------------------------------- concurrency


def test_concurrent_calls_give_the_serial_results(tmp_path: Path) -> None:
    model = LoadedModel.load(yolov8_head(tmp_path, "head", "1"), CPU)
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 255, (int(rng.integers(50, 400)), int(rng.integers(50, 400)), 3),
                           dtype=np.uint8) for _ in range(24)]
    serial = [model.infer(f).output for f in frames]
    results: list[object] = [None] * len(frames)
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for i in range(k, len(frames), 4):
                results[i] = model.infer(frames[i]).output
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors and results == serial
