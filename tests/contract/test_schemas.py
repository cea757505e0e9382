"""The JSON Schemas in docs/schemas/ are the contract's models, up to date, and they accept what
the agent sends and what docs/protocol.md shows, and refuse what the decoders refuse."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from jsonschema import Draft202012Validator

from edge_agent.cli import main as agent_main
from edge_agent.config.tracking import TrackingSettings
from edge_agent.contract import events, protocol, results, schemas
from edge_agent.tracking import camera as cams
from edge_agent.tracking import scene as geo
from tests.contract.test_protocol_docs import examples

DOCS = Path(__file__).resolve().parents[2] / "docs" / "schemas"
BY_NAME = {p.name: p for p in schemas.PAYLOADS}


def _validator(name: str) -> Draft202012Validator:
    body = json.loads((DOCS / f"{name}.schema.json").read_text())
    Draft202012Validator.check_schema(body)
    return Draft202012Validator(body)


def _kind(ex: dict[str, Any]) -> str | None:
    for key, kind in (("jpeg", "snapshot"), ("track", "event"), ("count", "zone"),
                      ("seq", "result"), ("interval_s", "telemetry"), ("online", "state"),
                      ("generation", "desired")):
        if key in ex:
            return kind
    return None


def test_the_committed_schemas_are_the_models_of_today() -> None:
    # a model changed without `edge-agent schemas --out docs/schemas` fails here
    assert schemas.stale(DOCS) == []
    assert sorted(p.name for p in DOCS.glob("*.schema.json")) == sorted(
        schemas.file_name(p) for p in schemas.PAYLOADS)


def test_every_documented_example_is_valid_under_its_schema() -> None:
    seen = set()
    for ex in examples():
        kind = _kind(ex)
        if kind is None:
            continue
        errors = [e.message for e in _validator(kind).iter_errors(ex)]
        assert errors == [], (kind, ex)
        seen.add(kind)
    assert {"result", "telemetry", "state", "desired", "event", "zone", "snapshot"} <= seen


def test_what_the_agent_sends_is_valid_and_its_breakages_are_not() -> None:
    class Model:
        name, version, task = "yolo", "2", "yolo"

    res = results.build_result(
        node="edge-01", camera="dock", ts=1764326400.0, model=Model(), width=1280,
        height=720, latency_ms=results.latencies(capture_to_start=1.0, preprocess=2.0,
                                                 inference=30.0, postprocess=0.5),
        output={"detections": [{"cls": 0, "label": "person", "score": 0.9,
                                "box": [0.1, 0.5, 0.3, 0.9]}]})
    res["seq"] = 7
    wire = orjson.loads(protocol.encode_dict(res))
    assert list(_validator("result").iter_errors(wire)) == []
    # the events a real camera tracker makes from three frames, seq as the outbox adds it
    tracks = cams.CameraTracks("edge-01", "dock", TrackingSettings(min_hits=2),
                               geo.Scene.from_settings([], []), next_id=100)
    made: list[dict[str, Any]] = []
    for k in range(3):
        frame = dict(res, ts=1764326400.0 + k / 10)
        made += tracks.observe(frame).events
    made += tracks.close_all("stopped", 1764326401.0).events
    assert [e["type"] for e in made] == ["new", "end"]
    event_schema = _validator("event")
    for seq, ev in enumerate(made):
        payload = orjson.loads(protocol.encode_dict({**ev, "seq": seq}))
        assert list(event_schema.iter_errors(payload)) == [], payload
        events.decode_event(orjson.dumps(payload))  # and the decoder agrees
    # what a decoder refuses, the schema refuses too
    good = orjson.loads(protocol.encode_dict({**made[0], "seq": 0}))
    for broken in ({**good, "type": "moved"}, {**good, "track": -1},
                   {k: v for k, v in good.items() if k != "label"}, {**good, "box": [0, 0, 1]}):
        assert list(event_schema.iter_errors(broken)), broken
        with pytest.raises(protocol.ProtocolError):
            events.decode_event(orjson.dumps(broken))
    assert list(_validator("result").iter_errors({**wire, "seq": "7"}))
    zone = orjson.loads(protocol.encode_dict(events.build_zone(
        node="edge-01", camera="dock", zone="loading", ts=1764326400.0,
        labels={"person": 2, "forklift": 1})))
    assert list(_validator("zone").iter_errors(zone)) == []
    assert list(_validator("zone").iter_errors({**zone, "count": -1}))


def test_unknown_fields_are_allowed_for_newer_agents() -> None:
    for ex in examples():
        kind = _kind(ex)
        if kind is not None:
            assert list(_validator(kind).iter_errors({**ex, "added_in_a_later_agent": 1})) == []


def test_the_command_writes_checks_and_prints(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert agent_main(["schemas", "--out", str(tmp_path)]) == 0
    assert schemas.stale(tmp_path) == []
    assert agent_main(["schemas", "--check", str(tmp_path)]) == 0
    (tmp_path / "event.schema.json").write_text("{}\n")
    (tmp_path / "zone.schema.json").unlink()
    capsys.readouterr()
    assert agent_main(["schemas", "--check", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "event.schema.json" in out and "zone.schema.json" in out
    assert "result.schema.json" not in out
    assert agent_main(["schemas", "--payload", "zone"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == schemas.schema(BY_NAME["zone"])
    assert printed["$schema"] == schemas.DRAFT and "v" in printed["required"]
    with pytest.raises(SystemExit) as exc:
        agent_main(["schemas", "--payload", "zone", "--out", str(tmp_path)])
    assert exc.value.code == 2
