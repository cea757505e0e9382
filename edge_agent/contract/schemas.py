"""JSON Schemas of the MQTT payloads, made from the contract's models.

For subscribers who do not use ``hub.client``: one JSON Schema (draft 2020-12) per payload, in
the wire's form (``protocol.encode``: JSON, ``None`` fields left out). Generated, never written
by hand, so they cannot drift from the models the agent and the hub decode with; the copies in
``docs/schemas/`` are checked against this module by the tests, and ``edge-agent schemas``
writes or checks them. Unknown fields are allowed (no ``additionalProperties: false``): a
newer agent may add fields within protocol version 1, and a validating subscriber must not
break on them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from edge_agent.contract import events, protocol, snapshots, telemetry

DRAFT = "https://json-schema.org/draft/2020-12/schema"


@dataclass(frozen=True, slots=True)
class Payload:
    """One payload of the contract: its model, topic and delivery."""

    name: str
    model: type[BaseModel]
    topic: str
    retained: bool
    sender: str


PAYLOADS: tuple[Payload, ...] = (
    Payload("result", protocol.ResultMessage, "{prefix}/{node}/results/{camera}", False,
            "agent"),
    Payload("telemetry", telemetry.TelemetryMessage, "{prefix}/{node}/telemetry", False,
            "agent"),
    Payload("state", protocol.StateMessage, "{prefix}/{node}/state", True, "agent"),
    Payload("desired", protocol.DesiredMessage, "{prefix}/{node}/desired", True, "hub"),
    Payload("event", events.EventMessage, "{prefix}/{node}/events/{camera}", False, "agent"),
    Payload("zone", events.ZoneOccupancy, "{prefix}/{node}/zones/{camera}/{zone}", True,
            "agent"),
    Payload("snapshot", snapshots.SnapshotMessage, "{prefix}/{node}/snapshots/{camera}",
            False, "agent"),
)


def schema(payload: Payload) -> dict[str, Any]:
    """The JSON Schema of one payload, with its topic and delivery in the description."""
    body = payload.model.model_json_schema(mode="serialization")
    # every payload carries the protocol version (decoders refuse one without it)
    body["required"] = ["v", *(f for f in body.get("required", []) if f != "v")]
    doc = (body.pop("description", "") or "").strip()
    delivery = "retained" if payload.retained else "not retained"
    head = (f"MQTT topic {payload.topic}, QoS 1, {delivery}, sent by the {payload.sender}. "
            f"Protocol version {protocol.PROTOCOL_VERSION} (field v); docs/protocol.md.")
    return {"$schema": DRAFT, "$id": f"{payload.name}.schema.json",
            "title": payload.model.__name__,
            "description": f"{head} {doc}".strip(), **body}


def render(payload: Payload) -> str:
    """The schema file's text: sorted keys, two-space indent, one trailing newline."""
    return json.dumps(schema(payload), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def file_name(payload: Payload) -> str:
    """``{name}.schema.json``."""
    return f"{payload.name}.schema.json"


def stale(directory: Path) -> list[str]:
    """The schema files in ``directory`` that are missing or differ from the models."""
    out = []
    for p in PAYLOADS:
        path = directory / file_name(p)
        if not path.is_file() or path.read_text(encoding="utf-8") != render(p):
            out.append(file_name(p))
    return out


def write(directory: Path) -> list[Path]:
    """Write every schema into ``directory`` (made if missing); the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for p in PAYLOADS:
        path = directory / file_name(p)
        path.write_text(render(p), encoding="utf-8")
        paths.append(path)
    return paths
