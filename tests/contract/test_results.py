"""The result builder: the wire shape of ``docs/protocol.md``, key for key and in order."""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from edge_agent.contract import results
from edge_agent.contract.protocol import decode_result, encode_dict


@dataclass(frozen=True)
class _Model:
    name: str = "yolo"
    version: str = "2"
    task: str = "yolo"


DETECTIONS = {"detections": [{"cls": 0, "label": "person", "score": 0.91,
                              "box": [0.12, 0.30, 0.25, 0.88]}]}


def _camera_result() -> dict[str, object]:
    lat = results.latencies(capture_to_start=1.2, preprocess=1.9, inference=31.0,
                            postprocess=0.3, end_to_end=34.6)
    return results.build_result(node="edge-01", camera="dock-door", ts=1764326400.125,
                                model=_Model(), width=1280, height=720, latency_ms=lat,
                                output=DETECTIONS)


def test_the_documented_example_byte_for_byte() -> None:
    res = _camera_result()
    res["seq"] = 1042  # the sink assigns it, last
    assert encode_dict(res) == orjson.dumps({
        "v": 1, "node": "edge-01", "camera": "dock-door", "ts": 1764326400.125,
        "model": {"name": "yolo", "version": "2"}, "task": "yolo",
        "frame": {"width": 1280, "height": 720},
        "latency_ms": {"capture_to_start": 1.2, "preprocess": 1.9, "inference": 31.0,
                       "postprocess": 0.3, "end_to_end": 34.6},
        **DETECTIONS, "seq": 1042})
    msg = decode_result(encode_dict(res))
    assert msg.camera == "dock-door" and msg.seq == 1042 and msg.detections
    assert list(msg.latency_ms.model_dump()) == list(results.STAGES)


def test_latencies_round_to_microseconds_and_leave_out_missing_stages() -> None:
    lat = results.latencies(preprocess=1.23449, inference=2.0004999, postprocess=0.00049)
    assert lat == {"preprocess": 1.234, "inference": 2.0, "postprocess": 0.0}
    assert list(lat) == ["preprocess", "inference", "postprocess"]
    full = results.latencies(capture_to_start=0.0, preprocess=1, inference=2, postprocess=3,
                             end_to_end=6)
    assert tuple(full) == results.STAGES


def test_an_upload_has_no_camera_and_a_batch_result_names_its_source() -> None:
    lat = results.latencies(preprocess=1, inference=2, postprocess=3)
    upload = results.build_result(node="n", camera=None, ts=1.0, model=_Model(), width=2,
                                  height=3, latency_ms=lat, output={"classes": []})
    assert list(upload) == ["v", "node", "ts", "model", "task", "frame", "latency_ms",
                            "classes"]
    src = {"path": "/in/a.png"}
    batch = results.build_result(node="n", camera="batch", ts=1.0, model=_Model(), width=2,
                                 height=3, latency_ms=lat, output=DETECTIONS, source=src)
    assert list(batch)[-2:] == ["source", "detections"] and batch["source"] == src
    # the latency dict stays the caller's: the relay stamps end_to_end into it later
    assert batch["latency_ms"] is lat
