"""docs/protocol.md's examples are what the wire carries: each decodes with the contract, and
the names in them are the names agents send."""

from __future__ import annotations

import re
from pathlib import Path

import orjson

from edge_agent.contract import events, protocol, snapshots
from edge_agent.inference.providers import ORT_NAMES

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def examples() -> list[dict[str, object]]:
    blocks = re.findall(r"```json\n(.*?)```", DOC.read_text(), flags=re.S)
    return [b for b in (orjson.loads(x) for x in blocks) if isinstance(b, dict)]


def test_every_payload_example_decodes_with_the_contract() -> None:
    kinds = []
    for ex in examples():
        raw = orjson.dumps(ex)
        if "jpeg" in ex:
            snapshots.decode_snapshot(raw)
            kinds.append("snapshot")
        elif "track" in ex:
            events.decode_event(raw)
            kinds.append("event")
        elif "seq" in ex:
            protocol.decode_result(raw)
            kinds.append("result")
        elif "interval_s" in ex:
            protocol.decode_telemetry(raw)
            kinds.append("telemetry")
        elif "online" in ex:
            protocol.decode_state(raw)
            kinds.append("state")
        elif "generation" in ex:
            protocol.decode_desired(raw)
            kinds.append("desired")
    assert {"result", "telemetry", "state", "desired", "event", "snapshot"} <= set(kinds), kinds


def test_provider_names_are_the_short_names_agents_send() -> None:
    states = [ex for ex in examples() if "online" in ex]
    assert states
    for st in states:
        providers = st.get("providers", [])
        assert isinstance(providers, list)
        assert set(providers) <= set(ORT_NAMES), providers
