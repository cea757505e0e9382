"""OpenAPI paths of the fleet page and its change stream (merged into ``/v1/openapi.json``)."""

from __future__ import annotations

from typing import Any

_ERROR = {"$ref": "#/components/schemas/Error"}
_READ: list[dict[str, list[str]]] = [{"bearerAuth": []}, {}]


def _err(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ERROR}}}


def _file(description: str, types: list[str]) -> dict[str, Any]:
    return {"description": description,
            "content": {t: {"schema": {"type": "string"}} for t in types}}


PATHS: dict[str, Any] = {
    "/": {"get": {
        "summary": "The fleet page (public HTML; its data comes from the API with a token)",
        "operationId": "dashboardPage", "tags": ["dashboard"], "security": [{}],
        "responses": {"200": _file("the page", ["text/html"]),
                      "304": {"description": "not modified (If-None-Match)"}}}},
    "/ui/{name}": {"get": {
        "summary": "A script, style sheet or icon of the fleet page",
        "operationId": "dashboardAsset", "tags": ["dashboard"], "security": [{}],
        "parameters": [{"name": "name", "in": "path", "required": True,
                        "schema": {"type": "string"}}],
        "responses": {"200": _file("the file", ["text/javascript", "text/css",
                                                "image/svg+xml"]),
                      "304": {"description": "not modified (If-None-Match)"},
                      "404": _err("no such file (code not_found)")}}},
    "/v1/stream": {"get": {
        "summary": "Change notices for the fleet page (newline-delimited JSON, long-lived)",
        "description": "One JSON object a line: snapshot (fleet counts and digest, rollout "
                       "summaries) when something changed and every 2 s while a rollout is "
                       "active, ping every 15 s, bye before the hub ends the stream "
                       "(after 10 minutes, or on shutdown). docs/dashboard.md.",
        "operationId": "dashboardStream", "tags": ["dashboard"], "security": _READ,
        "responses": {"200": _file("the stream", ["application/x-ndjson"]),
                      "401": _err("no known bearer token (code unauthorized)"),
                      "503": _err("too many streams open (code too_many_streams); "
                                  "Retry-After says when to try again")}}},
}
