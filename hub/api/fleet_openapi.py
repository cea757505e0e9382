"""OpenAPI paths and schemas of the rollout side (merged into ``GET /v1/openapi.json``).

Written by hand next to ``hub/api/fleet.py`` because the paths, codes and shapes are a contract
the ``edge-hub rollout`` / ``nodes`` verbs and operators' scripts rely on.
"""

from __future__ import annotations

from typing import Any

_ERROR = {"$ref": "#/components/schemas/Error"}
#: Reads need a token of any scope (an agent's certificate reads none of this); open to
#: all only with ``api.read_requires_token: false`` (the empty requirement).
_READ: list[dict[str, list[str]]] = [{"bearerAuth": []}, {}]
_WRITE: list[dict[str, list[str]]] = [{"bearerAuth": []}]


def _err(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ERROR}}}


def _ok(description: str, ref: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}}


_BAD = _err("invalid request: invalid_request, invalid_selector, invalid_gate, "
            "unknown_model_version")
_UNAUTH = _err("no known bearer token (code unauthorized)")
_FORBIDDEN = _err("the token's scope is too small (code forbidden): changes need admin, "
                  "reads read; an agent's certificate reads only models")
_ID = {"name": "id", "in": "path", "required": True,
       "schema": {"type": "string", "pattern": "^[0-9]{1,12}$"}}
_OBJ: dict[str, Any] = {"type": "object", "additionalProperties": True}

SCHEMAS: dict[str, Any] = {
    "FleetNode": {
        "type": "object",
        "required": ["name", "labels", "assigned", "online", "generation"],
        "properties": {
            "name": {"type": "string"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "assigned": {"type": "object", "additionalProperties": {"type": "string"},
                         "description": "model -> version from the node's labels"},
            "online": {"type": "boolean"},
            "last_seen": {"type": "number", "nullable": True},
            "generation": {"type": "object", "properties": {
                "desired": {"type": "integer"}, "published": {"type": "boolean"},
                "applied": {"type": "integer"}}},
            "agent_version": {"type": "string"},
            "providers": {"type": "array", "items": {"type": "string"}},
            "models": {"type": "object", "additionalProperties": _OBJ,
                       "description": "what the agent reports per model (state message)"},
            "metrics": {"type": "object", "additionalProperties": _OBJ,
                        "description": "model@version -> fps, error_rate, p50/p95/p99_ms "
                                       "(exact: from merged sketches), detections_per_frame, "
                                       "score_p50, top classes"},
            "cameras": {"type": "array", "items": {"$ref": "#/components/schemas/Camera"},
                        "description": "each camera as of the node's last telemetry (empty "
                                       "before the first)"},
        },
    },
    "Camera": {
        "type": "object", "required": ["camera", "connected"],
        "description": "one camera over the node's last telemetry window (docs/protocol.md)",
        "properties": {
            "camera": {"type": "string"},
            "connected": {"type": "boolean"},
            "fps": {"type": "number"},
            "drops": {"type": "integer"},
            "frames_still": {"type": "integer"},
            "active_tracks": {"type": "integer", "nullable": True,
                              "description": "confirmed tracks open now (tracking cameras)"},
            "events_per_s": {"type": "number", "nullable": True,
                             "description": "track events per second over the window"},
            "snapshots": {"type": "integer", "nullable": True},
            "snapshots_dropped": {"type": "integer", "nullable": True},
        },
    },
    "NodeList": {"type": "object", "required": ["nodes"],
                 "properties": {"nodes": {"type": "array",
                                          "items": {"$ref": "#/components/schemas/FleetNode"}},
                                "versions": {
                                    "type": "array", "items": _OBJ,
                                    "description": "per model version over the listed nodes: "
                                                   "node count and merged figures (latency "
                                                   "sketches merged, output statistics)"}}},
    "RolloutSpec": {
        "type": "object",
        "required": ["model", "version"],
        "additionalProperties": False,
        "properties": {
            "model": {"type": "string"},
            "version": {"type": "string"},
            "selector": {"type": "string", "example": "site=a,line in (1,2)"},
            "canary": {"type": "integer", "minimum": 0, "nullable": True},
            "canary_percent": {"type": "number", "nullable": True},
            "waves": {"type": "array", "items": {"type": "number"}, "example": [25, 50, 100]},
            "bake_s": {"type": "number", "minimum": 0},
            "gates": {"type": "array", "items": {"type": "string"},
                      "example": ["p99_ms<=80", "error_rate<=0.01", "fps>=0.9x"]},
            "deadline_s": {"type": "number"},
            "offline_wait_s": {"type": "number", "minimum": 0},
            "min_samples": {"type": "integer", "minimum": 1},
            "shadow": {"$ref": "#/components/schemas/ShadowSpec"},
            "dry_run": {"type": "boolean", "description": "only return the plan"},
        },
    },
    "ShadowSpec": {
        "type": "object", "nullable": True,
        "additionalProperties": False,
        "description": "start every wave with a shadow phase (null: none): the candidate "
                       "runs beside each node's version on a sample of the same frames, "
                       "compared, never serving; the wave is switched only when the pooled "
                       "agreement passes the gate",
        "properties": {
            "gate": {"type": "string", "default": "agreement>=0.9",
                     "pattern": "^\\s*agreement\\s*>=?", "example": "agreement>=0.9"},
            "min_samples": {"type": "integer", "minimum": 1, "maximum": 10_000_000,
                            "default": 200,
                            "description": "frames the wave's nodes compare together before "
                                           "the gate is judged"},
            "timeout_s": {"type": "number", "minimum": 0, "exclusiveMinimum": True,
                          "maximum": 604800, "default": 600},
        },
    },
    "ShadowFigures": {
        "type": "object",
        "properties": {
            "samples": {"type": "integer", "description": "frames compared"},
            "agreement": {"type": "number", "nullable": True,
                          "description": "sum of per-frame agreements / samples"},
            "ci_low": {"type": "number", "nullable": True,
                       "description": "Wilson 95 % interval, low end"},
            "ci_high": {"type": "number", "nullable": True},
            "status": {"type": "string", "nullable": True,
                       "description": "the node's shadow status: loading, active, failed "
                                      "(nodes only)"},
        },
        "additionalProperties": True,
    },
    "ShadowPhase": {
        "type": "object", "nullable": True,
        "description": "the latest shadow phase: its wave, state and pooled figures (samples, "
                       "agreement, ci_low, ci_high), per node",
        "additionalProperties": True,
        "properties": {
            "samples": {"type": "integer"},
            "agreement": {"type": "number", "nullable": True},
            "ci_low": {"type": "number", "nullable": True},
            "ci_high": {"type": "number", "nullable": True},
            "wave": {"type": "integer"},
            "state": {"type": "string", "enum": ["running", "passed", "failed"]},
            "gate": {"type": "string"}, "min_samples": {"type": "integer"},
            "timeout_s": {"type": "number"}, "started_at": {"type": "number"},
            "nodes": {"type": "object",
                      "additionalProperties": {"$ref": "#/components/schemas/ShadowFigures"}},
            "cause": {"type": "object", "additionalProperties": True},
        },
    },
    "RolloutSummary": {
        "type": "object",
        "required": ["id", "model", "version", "state", "wave", "waves"],
        "properties": {
            "id": {"type": "integer"}, "model": {"type": "string"},
            "version": {"type": "string"}, "selector": {"type": "string"},
            "state": {"type": "string", "enum": [
                "pending", "shadowing", "applying", "baking", "waiting", "paused",
                "rolling_back", "succeeded", "aborted", "rolled_back"]},
            "wave": {"type": "integer"}, "waves": {"type": "integer"},
            "cause": {"type": "object", "nullable": True, "additionalProperties": True,
                      "description": "reason (gate, node_failed, deadline, manual, aborted, "
                                     "shadow_gate, shadow_failed, shadow_timeout, "
                                     "shadow_impossible), metric, value, limit, node; for "
                                     "shadow causes gate, agreement, ci_low, ci_high, "
                                     "samples, min_samples"},
            "shadow": {"$ref": "#/components/schemas/ShadowPhase"},
            "message": {"type": "string"},
            "progress": {"type": "object", "additionalProperties": True,
                         "description": "GET /v1/rollouts/{id} only: wave (number 1-based, of, "
                                        "canary), bake (bake_s, elapsed_s, remaining_s), gates "
                                        "(gate, value, limit, baseline, node, ok, message), "
                                        "judged (nodes, ready, samples, min_samples), canary "
                                        "and baseline figures"},
        },
        "additionalProperties": True,
    },
    "RolloutList": {"type": "object", "required": ["rollouts"], "properties": {
        "rollouts": {"type": "array", "items": {"$ref": "#/components/schemas/RolloutSummary"}}}},
    "RolloutDoc": {"type": "object", "required": ["rollout"], "properties": {
        "rollout": {"$ref": "#/components/schemas/RolloutSummary"}}},
    "RolloutPlan": {"type": "object", "required": ["plan"], "properties": {"plan": _OBJ}},
}

PATHS: dict[str, Any] = {
    "/v1/nodes": {"get": {
        "operationId": "listNodes", "summary": "The camera nodes: labels, online, health",
        "security": _READ,
        "parameters": [{"name": "selector", "in": "query", "required": False,
                        "schema": {"type": "string"}}],
        "responses": {"200": _ok("nodes", "NodeList"), "400": _BAD, "401": _UNAUTH,
                      "403": _FORBIDDEN},
    }},
    "/v1/nodes/{node}": {"get": {
        "operationId": "showNode", "summary": "One camera node", "security": _READ,
        "parameters": [{"name": "node", "in": "path", "required": True,
                        "schema": {"type": "string"}}],
        "responses": {"200": _ok("the node", "FleetNode"), "401": _UNAUTH, "403": _FORBIDDEN,
                      "404": _err("not a camera node of this hub")},
    }},
    "/v1/rollouts": {
        "get": {
            "operationId": "listRollouts", "summary": "Rollouts, newest first",
            "security": _READ,
            "parameters": [{"name": "limit", "in": "query", "required": False,
                            "schema": {"type": "integer", "minimum": 1, "maximum": 1000}}],
            "responses": {"200": _ok("rollouts", "RolloutList"), "400": _BAD,
                          "401": _UNAUTH, "403": _FORBIDDEN},
        },
        "post": {
            "operationId": "startRollout",
            "summary": "Start a rollout (or, with dry_run, return its plan)",
            "security": _WRITE,
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/RolloutSpec"}}}},
            "responses": {"200": _ok("the plan (dry run)", "RolloutPlan"),
                          "201": _ok("started", "RolloutDoc"), "400": _BAD, "401": _UNAUTH,
                          "403": _FORBIDDEN,
                          "409": _err("another active rollout of the model covers some of "
                                      "the nodes (code conflict)")},
        },
    },
    "/v1/rollouts/{id}": {"get": {
        "operationId": "showRollout",
        "summary": "A rollout: plan, per-node progress and live metrics, events",
        "security": _READ, "parameters": [_ID],
        "responses": {"200": _ok("the rollout", "RolloutDoc"), "400": _BAD, "401": _UNAUTH,
                      "403": _FORBIDDEN,
                      "404": _err("no such rollout")},
    }},
    "/v1/rollouts/{id}/{command}": {"post": {
        "operationId": "rolloutCommand",
        "summary": "pause, resume, promote (skip the rest of the bake), abort (stop, keep "
                   "versions), rollback (every touched node to its previous version)",
        "security": _WRITE,
        "parameters": [_ID, {"name": "command", "in": "path", "required": True, "schema": {
            "type": "string", "enum": ["pause", "resume", "promote", "abort", "rollback"]}}],
        "responses": {"200": _ok("the rollout after the command", "RolloutDoc"),
                      "400": _BAD, "401": _UNAUTH, "403": _FORBIDDEN,
                      "404": _err("no such rollout or command (also for another method)"),
                      "405": _err("another method than POST on a real rollout's command"),
                      "409": _err("not possible in the rollout's state (code conflict; "
                                  "promote while the wave's nodes are still applying)")},
    }},
    "/metrics": {"get": {
        "operationId": "metrics", "summary": "Prometheus metrics (fleet, rollouts, hub)",
        "security": _READ,
        "responses": {"200": {"description": "text exposition format",
                              "content": {"text/plain": {"schema": {"type": "string"}}}}},
    }},
}
