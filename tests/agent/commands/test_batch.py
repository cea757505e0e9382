"""``edge-agent batch`` as a real process: image folders and a real H.264 video."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import orjson

from edge_agent.contract.protocol import decode_result, encode_dict
from tests.support.streams import write_video


def _batch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_agent", "batch", *args],
                          capture_output=True, text=True, timeout=120, check=False)


def _lines(path: Path) -> list[dict[str, object]]:
    return [orjson.loads(x) for x in path.read_bytes().splitlines()]


def test_folder_of_images_in_order_with_bad_files_reported(tmp_path: Path,
                                                           models_dir: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("astronaut.png", "chelsea.png", "coffee.png"):
        shutil.copy(models_dir / "samples" / name, folder / name)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    (folder / "notes.txt").write_text("skipped: not an image suffix")
    out = tmp_path / "out.jsonl"
    r = _batch("--model", str(models_dir / "tiny-classifier"), "--input", str(folder),
               "--output", str(out), "--camera", "archive")
    assert r.returncode == 1  # one input failed
    assert "broken.jpg" in r.stderr and "Traceback" not in r.stderr
    lines = _lines(out)
    assert [Path(str(x["source"]["path"])).name for x in lines] == [  # type: ignore[index]
        "astronaut.png", "chelsea.png", "coffee.png"]
    assert [x["seq"] for x in lines] == [0, 1, 2]
    for x in lines:
        msg = decode_result(encode_dict(x))
        assert msg.camera == "archive" and msg.classes and msg.task == "classification"


def test_video_gives_one_result_per_frame(tmp_path: Path, models_dir: Path) -> None:
    video = write_video(tmp_path / "clip.mp4", frames=12)
    out = tmp_path / "out.jsonl"
    r = _batch("--model", str(models_dir / "yolov8-head" / "manifest.json"), "--input",
               str(video), "--output", str(out), "--workers", "2")
    assert r.returncode == 0, r.stderr
    lines = _lines(out)
    assert [x["source"]["frame"] for x in lines] == list(range(12))  # type: ignore[index]
    assert all(x["frame"] == {"width": 320, "height": 240} for x in lines)
    assert all(x["detections"] for x in lines)
    assert "12 results, 0 failed" in r.stderr


def test_h264_sample_video(tmp_path: Path, models_dir: Path) -> None:
    out = tmp_path / "out.jsonl"
    r = _batch("--model", str(models_dir / "yolov8-head"), "--input",
               str(models_dir / "samples" / "synthetic-720p.mp4"), "--output", str(out))
    assert r.returncode == 0, r.stderr
    lines = _lines(out)
    assert len(lines) == 300 and lines[0]["frame"] == {"width": 1280, "height": 720}


def test_missing_input_and_bad_model_fail_cleanly(tmp_path: Path, models_dir: Path) -> None:
    out = tmp_path / "out.jsonl"
    r = _batch("--model", str(models_dir / "tiny-classifier"), "--input",
               str(tmp_path / "nope"), "--output", str(out))
    assert r.returncode == 1 and "no such file or folder" in r.stderr
    assert "Traceback" not in r.stderr and not out.exists()
    r = _batch("--model", str(tmp_path), "--input", str(models_dir / "samples"),
               "--output", str(out))
    assert r.returncode == 1 and "manifest not found" in r.stderr
    r = _batch("--model", str(models_dir / "tiny-classifier"), "--input",
               str(models_dir / "samples"), "--output", str(out), "--camera", "Bad Name")
    assert r.returncode == 2 and "--camera" in r.stderr
