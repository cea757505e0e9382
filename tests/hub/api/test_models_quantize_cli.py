"""``edge-hub models quantize`` against a real ``edge-hub serve`` child: the fp32 version is
pulled, quantised with ONNX Runtime on real sample frames, measured, pushed signed with its
report, and ``models show`` prints the report; bad input is refused before anything is pushed.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import onnx
import pytest

from hub.cli import main
from tests.support.hub_client import TOKEN, HubProcess, default_pki, hub_process
from tests.support.inproc import Result, run_main


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    with hub_process(tmp_path_factory.mktemp("hub")) as h:
        yield h


def cli(hub: HubProcess, *argv: str) -> Result:
    env = {"EDGE_HUB_URL": hub.url, "EDGE_HUB_CA_FILE": str(default_pki().ca_file),
           "EDGE_HUB_TOKEN": TOKEN}
    return run_main(main, argv, env=env, clear_prefix="EDGE_HUB_")


def _push_fp32(hub: HubProcess, models_dir: Path, folder: str, name: str) -> None:
    r = cli(hub, "models", "push", str(models_dir / folder / "model.onnx"), "--name", name,
            "--version", "1.0.0")
    assert r.returncode == 0, r.stderr


def test_quantize_pushes_a_measured_signed_int8_version(
        hub: HubProcess, models_dir: Path, tmp_path: Path) -> None:
    _push_fp32(hub, models_dir, "efficientnet-lite0", "q-effnet")
    assert cli(hub, "keygen", str(tmp_path / "rel")).returncode == 0
    calib = tmp_path / "frames"
    calib.mkdir()
    for f in ("chelsea.png", "coffee.png", "carphone.mp4"):
        shutil.copy(models_dir / "samples" / f, calib / f)
    keep = tmp_path / "int8"

    r = cli(hub, "models", "quantize", "q-effnet", "1.0.0", "--to", "1.0.0-int8",
            "--calibration", str(calib), "--calibration-frames", "8", "--heldout-frames", "24",
            "--rounds", "1", "--sign", str(tmp_path / "rel.key"), "--keep", str(keep))
    assert r.returncode == 0, r.stderr
    assert "pushed: q-effnet 1.0.0-int8" in r.stdout and "signed=true" in r.stdout
    assert "agreement" in r.stdout and "top1 over 24 held-out frames" in r.stdout

    r = cli(hub, "models", "show", "q-effnet", "1.0.0-int8", "--json")
    v = json.loads(r.stdout)
    fp32 = json.loads(cli(hub, "models", "show", "q-effnet", "1.0.0", "--json").stdout)
    q = v["quantization"]
    assert fp32["quantization"] is None
    assert q["parent_version"] == "1.0.0" and q["parent_sha256"] == fp32["sha256"]
    settings, sel = q["settings"], q["selection"]
    # --keep-fp32-first auto (the default): candidates from all-INT8 up, measured on the 8
    # calibration frames, the kept one the last tried (met) or the best agreement
    tried = [c["fp32_first_nodes"] for c in sel["candidates"]]
    assert tried == [0, 3, 6, 9, 12][:len(tried)] and sel["frames"] == 8
    assert sel["target_agreement"] == 0.95 and sel["min_speedup"] == 1.3
    assert settings["fp32_first_nodes"] in tried
    assert len(settings["fp32_nodes"]) == settings["fp32_first_nodes"]
    assert {k: v for k, v in settings.items() if not k.startswith("fp32_")} == {
        "format": "QDQ", "per_channel": True, "calibration": "minmax", "percentile": None,
        "activations": "QUInt8", "weights": "QInt8", "reduce_range": False}
    assert q["calibration"]["frames"] == 8 and q["heldout"]["frames"] == 24
    assert q["agreement"]["metric"] == "top1" and 0.0 <= q["agreement"]["value"] <= 1.0
    assert q["speed"]["fp32_fps"] > 0 and q["speed"]["int8_fps"] > 0
    assert v["signed"] is True and v["manifest"]["version"] == "1.0.0-int8"
    # what was pushed is the INT8 graph kept locally: QDQ nodes, a quarter of the bytes
    assert v["sha256"] == json.loads((keep / "manifest.json").read_text())["sha256"]
    ops = {n.op_type for n in onnx.load(str(keep / "model.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert v["size"] < fp32["size"] / 2

    text = cli(hub, "models", "show", "q-effnet", "1.0.0-int8").stdout
    assert "quantized from" in text and "per-channel" in text and "minmax ranges" in text
    assert "chosen on" in text and "8 calibration frames" in text
    assert "held-out frames" in text and "fps fp32" in text


def test_quantize_detector_scores_box_f1(hub: HubProcess, models_dir: Path,
                                         tmp_path: Path) -> None:
    _push_fp32(hub, models_dir, "centerface", "q-faces")
    r = cli(hub, "models", "quantize", "q-faces", "1.0.0", "--to", "2-int8", "--calibration",
            str(models_dir / "samples" / "astronaut.png"), "--calibration", str(
                models_dir / "samples" / "carphone.mp4"), "--calibration-frames", "4",
            "--heldout-frames", "6", "--rounds", "1", "--method", "percentile", "--keep-fp32",
            "Sigmoid", "--keep-fp32-first", "2", "--json")
    assert r.returncode == 0, r.stderr
    q = json.loads(r.stdout)["quantization"]
    assert q["agreement"]["metric"] == "box_f1" and q["agreement"]["frames"] == 6
    assert q["agreement"]["confident_value"] is None
    s = q["settings"]
    assert s["calibration"] == "percentile" and s["percentile"] == 99.999
    assert s["fp32_op_types"] == ["Sigmoid"] and s["fp32_first_nodes"] == 2
    # the two leading Convs and every Sigmoid, by the names given to CenterFace's unnamed nodes
    assert len(s["fp32_nodes"]) > 2 and all(s["fp32_nodes"])
    assert sum(n.startswith("Conv_") for n in s["fp32_nodes"]) == 2
    assert q["selection"] is None  # a count given, nothing chosen


def test_quantize_refuses_bad_input_and_pushes_nothing(
        hub: HubProcess, models_dir: Path, tmp_path: Path) -> None:
    _push_fp32(hub, models_dir, "tiny-classifier", "q-tiny")
    base = ["models", "quantize", "q-tiny", "1.0.0"]
    r = cli(hub, *base, "--to", "1.0.0", "--calibration", str(tmp_path))
    assert r.returncode == 2 and "new version" in r.stderr
    r = cli(hub, *base, "--to", "2", "--calibration", str(tmp_path / "missing"))
    assert r.returncode == 2 and "no such file or folder" in r.stderr
    r = cli(hub, *base, "--to", "2", "--calibration", str(tmp_path), "--min-agreement", "2")
    assert r.returncode == 2 and "--min-agreement" in r.stderr
    r = cli(hub, *base, "--to", "2", "--calibration", str(tmp_path), "--keep-fp32-first", "-1")
    assert r.returncode == 2 and "--keep-fp32-first: auto or a count" in r.stderr
    r = cli(hub, *base, "--to", "2", "--calibration", str(tmp_path), "--target-agreement", "9")
    assert r.returncode == 2 and "--target-agreement" in r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    r = cli(hub, *base, "--to", "2", "--calibration", str(empty))
    assert r.returncode == 1 and "no frames" in r.stderr
    (empty / "notes.txt").write_text("not a frame")
    r = cli(hub, *base, "--to", "2", "--calibration", str(empty / "notes.txt"))
    assert r.returncode == 1 and "not an image or video" in r.stderr
    bomb = empty / "bomb.png"  # a PNG header claiming 100000 x 100000 pixels
    bomb.write_bytes(bytes.fromhex("89504e470d0a1a0a0000000d49484452") +
                     (100000).to_bytes(4, "big") * 2 + bytes.fromhex("0802000000") + b"\0" * 8)
    r = cli(hub, *base, "--to", "2", "--calibration", str(bomb))
    assert r.returncode == 1 and "exceeds the limit" in r.stderr
    # per-tensor weights wreck EfficientNet-Lite0's depthwise convolutions (docs/registry.md):
    # far below the asked agreement, so nothing is pushed
    _push_fp32(hub, models_dir, "efficientnet-lite0", "q-effnet")
    r = cli(hub, "models", "quantize", "q-effnet", "1.0.0", "--to", "pt-int8", "--calibration",
            str(models_dir / "samples" / "bikes.mp4"), "--calibration-frames", "8",
            "--heldout-frames", "24", "--rounds", "1", "--per-tensor", "--min-agreement", "0.99",
            "--keep-fp32-first", "0")
    assert r.returncode == 1 and "was not pushed" in r.stderr, r.stderr
    assert "per-tensor" in r.stdout  # the report is still shown
    shown = cli(hub, "models", "show", "q-effnet", "pt-int8")
    assert shown.returncode == 1 and "not found" in shown.stderr
