"""The OpenAPI 3.0 document of the hub's REST API, served at ``GET /v1/openapi.json``.

Written by hand, next to the handlers' docstrings, because it is a contract: the CLI, agents
and operators' scripts rely on these paths, codes and shapes, and a property test
(schemathesis) checks the running hub against this document. Other API modules add their
paths with ``add_paths`` so that there is one document for the whole hub.
"""

from __future__ import annotations

import copy
from typing import Any

from edge_agent.contract import tasks
from edge_agent.contract.protocol import NAME_PATTERN, SHA256_PATTERN, VERSION_PATTERN
from hub import __version__

OPENAPI_PATH = "/v1/openapi.json"

_ERROR = {"$ref": "#/components/schemas/Error"}


def _err(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ERROR}}}


def _json(description: str, ref: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}},
    }


_BAD = _err("malformed name, version or request (code invalid_request)")
_UNAUTH = _err("no known bearer token and no client certificate (code unauthorized)")
_FORBIDDEN = _err("the token's scope is too small: changes need admin (code forbidden)")
_NOT_FOUND = _err("no such model version (code not_found)")
#: Reads need a token of any scope, or an agent's client certificate (mutual TLS, which
#: OpenAPI 3.0 cannot name); open to all only with ``api.read_requires_token: false``.
_READ_SECURITY: list[dict[str, list[str]]] = [{"bearerAuth": []}, {}]
_WRITE_SECURITY: list[dict[str, list[str]]] = [{"bearerAuth": []}]
_REF_PARAMS = [
    {"$ref": "#/components/parameters/name"},
    {"$ref": "#/components/parameters/version"},
]
_ETAG_HEADER = {"ETag": {"description": "quoted sha256", "schema": {"type": "string"}}}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string", "description": "stable, machine-readable"},
                    "message": {"type": "string", "description": "for people"},
                    "reason": {"type": "string", "description": (
                        "422 from the model checks: the contract's stable rejection reason, "
                        "the same an agent gives when it refuses the model")},
                },
            }
        },
    },
    "VersionSummary": {
        "type": "object",
        "required": ["name", "version", "task", "sha256", "size", "signed", "created_at",
                     "pushed_by", "notes"],
        "properties": {
            "name": {"type": "string", "pattern": NAME_PATTERN},
            "version": {"type": "string", "pattern": VERSION_PATTERN},
            "task": {"type": "string", "enum": list(tasks.names())},
            "sha256": {"type": "string", "pattern": SHA256_PATTERN},
            "size": {"type": "integer", "minimum": 0},
            "signed": {"type": "boolean"},
            "created_at": {"type": "string", "format": "date-time"},
            "pushed_by": {"type": "string"},
            "notes": {"type": "string"},
        },
    },
    "Version": {
        "allOf": [
            {"$ref": "#/components/schemas/VersionSummary"},
            {
                "type": "object",
                "required": ["manifest_sha256", "signature", "manifest", "artifact_url",
                             "manifest_url"],
                "properties": {
                    "manifest_sha256": {"type": "string", "pattern": SHA256_PATTERN},
                    "signature": {
                        "type": "string",
                        "nullable": True,
                        "description": "base64 ed25519 signature over "
                        "'edge-model-v1\\n{manifest_sha256}\\n{sha256}\\n'",
                    },
                    "manifest": {"$ref": "#/components/schemas/Manifest"},
                    "quantization": {
                        "type": "object",
                        "nullable": True,
                        "description": "an INT8 version's report (edge-hub models quantize: "
                        "edge_agent/contract/quantization.py), else null",
                    },
                    "artifact_url": {"type": "string"},
                    "manifest_url": {"type": "string"},
                },
            },
        ]
    },
    "VersionList": {
        "type": "object",
        "required": ["versions"],
        "properties": {
            "versions": {"type": "array", "items": {"$ref": "#/components/schemas/VersionSummary"}}
        },
    },
    "Deleted": {
        "type": "object",
        "required": ["deleted"],
        "properties": {"deleted": {"$ref": "#/components/schemas/VersionSummary"}},
    },
    "Manifest": {
        "type": "object",
        "description": "The model's manifest (the agent's ModelManifest); other fields kept.",
        "required": ["name", "version", "task", "file", "sha256", "input", "labels", "outputs"],
        "properties": {
            "name": {"type": "string", "pattern": NAME_PATTERN},
            "version": {"type": "string", "pattern": VERSION_PATTERN},
            "task": {"type": "string", "enum": list(tasks.names())},
            "file": {"type": "string"},
            "sha256": {"type": "string", "pattern": SHA256_PATTERN},
            "input": {
                "type": "object",
                "required": ["name", "width", "height", "layout"],
                "properties": {
                    "name": {"type": "string"},
                    "width": {"type": "integer", "minimum": 1, "maximum": 16384},
                    "height": {"type": "integer", "minimum": 1, "maximum": 16384},
                    "layout": {"type": "string", "enum": ["NCHW", "NHWC"]},
                    "color": {"type": "string", "enum": ["RGB", "BGR"]},
                    "mean": {"type": "array", "items": {"type": "number"}},
                    "std": {"type": "array", "items": {"type": "number"}},
                    "scale": {"type": "number"},
                    "letterbox": {"type": "boolean"},
                    "batch": {"oneOf": [{"type": "string", "enum": ["dynamic"]},
                                        {"type": "integer", "minimum": 1}]},
                },
            },
            "labels": {"type": "array", "items": {"type": "string"}},
            "outputs": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name", "shape"],
                    "properties": {"name": {"type": "string"}, "shape": {"type": "array"}},
                },
            },
            "postprocess": {"type": "object"},
        },
    },
    "Upload": {
        "type": "object",
        "required": ["artifact", "manifest"],
        "properties": {
            "artifact": {"type": "string", "format": "binary", "description": "the ONNX file"},
            "manifest": {"$ref": "#/components/schemas/Manifest"},
            "signature": {"type": "string", "description": "base64 ed25519 signature"},
            "notes": {"type": "string", "maxLength": 4096},
            "pushed_by": {"type": "string", "maxLength": 128},
            "quantization": {"type": "string", "description": (
                "JSON of an INT8 version's quantisation report "
                "(edge_agent/contract/quantization.py)")},
        },
    },
    "Health": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"type": "string", "enum": ["ok"]}},
    },
    "Ready": {
        "type": "object",
        "required": ["status", "database", "leader"],
        "properties": {
            "status": {"type": "string", "enum": ["ready", "unready"]},
            "database": {"type": "string", "description": "ok, or why it is unavailable"},
            "leader": {"type": "boolean", "description": (
                "whether this replica runs the rollouts and desired-state dispatch")},
            "epoch": {"type": "integer", "nullable": True, "description": (
                "the leadership epoch this replica holds (null on a follower)")},
        },
    },
}

_PATHS: dict[str, Any] = {
    "/v1/models": {
        "get": {
            "operationId": "listVersions",
            "summary": "List model versions (optionally of one model)",
            "security": _READ_SECURITY,
            "parameters": [{
                "name": "name", "in": "query", "required": False,
                "schema": {"type": "string", "pattern": NAME_PATTERN},
            }],
            "responses": {"200": _json("versions", "VersionList"), "400": _BAD, "401": _UNAUTH},
        }
    },
    "/v1/models/{name}/versions/{version}": {
        "parameters": _REF_PARAMS,
        "get": {
            "operationId": "showVersion",
            "summary": "One version with its manifest and download URLs",
            "security": _READ_SECURITY,
            "responses": {"200": _json("the version", "Version"), "400": _BAD,
                          "401": _UNAUTH, "404": _NOT_FOUND},
        },
        "put": {
            "operationId": "pushVersion",
            "summary": "Push a version (multipart: artifact + manifest [+ signature, notes])",
            "description": "Validated before it is stored: the ONNX file loads in onnxruntime, "
            "its input and outputs match the manifest, the manifest's sha256, name and version "
            "match the upload, the signature verifies. Send `Expect: 100-continue` to be "
            "refused before the body is sent.",
            "security": _WRITE_SECURITY,
            "requestBody": {
                "required": True,
                "content": {"multipart/form-data": {
                    "schema": {"$ref": "#/components/schemas/Upload"},
                    "encoding": {
                        "artifact": {"contentType": "application/octet-stream"},
                        "manifest": {"contentType": "application/json"},
                    },
                }},
            },
            "responses": {
                "200": _json("an exact repeat of an existing version", "Version"),
                "201": _json("stored", "Version"),
                "400": _BAD,
                "401": _UNAUTH,
                "403": _FORBIDDEN,
                "409": _err("the version exists with other bytes (code conflict)"),
                "413": _err("over api.max_upload_bytes (code too_large)"),
                "415": _err("not multipart/form-data, or compressed"),
                "422": _err("rejected: not_onnx, manifest_invalid, manifest_mismatch, "
                            "signature_rejected"),
                "507": _err("the data folder is full (code insufficient_storage)"),
            },
        },
        "delete": {
            "operationId": "deleteVersion",
            "summary": "Delete a version (refused while any node is assigned it)",
            "security": _WRITE_SECURITY,
            "responses": {"200": _json("deleted", "Deleted"), "400": _BAD, "401": _UNAUTH,
                          "403": _FORBIDDEN,
                          "404": _NOT_FOUND,
                          "409": _err("assigned to nodes (code conflict)")},
        },
    },
    "/v1/models/{name}/versions/{version}/artifact": {
        "parameters": _REF_PARAMS,
        "get": {
            "operationId": "downloadArtifact",
            "summary": "The ONNX file; ETag is the sha256; Range and If-None-Match honoured",
            "security": _READ_SECURITY,
            "parameters": [
                {"name": "Range", "in": "header", "required": False,
                 "schema": {"type": "string"}, "example": "bytes=1048576-"},
                {"name": "If-None-Match", "in": "header", "required": False,
                 "schema": {"type": "string"}},
                {"name": "If-Range", "in": "header", "required": False,
                 "schema": {"type": "string"}},
            ],
            "responses": {
                "200": {"description": "the whole file", "headers": _ETAG_HEADER,
                        "content": {"application/octet-stream": {
                            "schema": {"type": "string", "format": "binary"}}}},
                "206": {"description": "the requested byte range", "headers": _ETAG_HEADER,
                        "content": {"application/octet-stream": {
                            "schema": {"type": "string", "format": "binary"}}}},
                "304": {"description": "If-None-Match matched", "headers": _ETAG_HEADER},
                "400": _BAD, "401": _UNAUTH, "404": _NOT_FOUND,
                "416": _err("the range starts past the end (code range_not_satisfiable)"),
            },
        },
    },
    "/v1/models/{name}/versions/{version}/manifest": {
        "parameters": _REF_PARAMS,
        "get": {
            "operationId": "downloadManifest",
            "summary": "The manifest bytes exactly as pushed (the signature covers them)",
            "security": _READ_SECURITY,
            "parameters": [{"name": "If-None-Match", "in": "header", "required": False,
                            "schema": {"type": "string"}}],
            "responses": {
                "200": _json("the manifest", "Manifest"),
                "304": {"description": "If-None-Match matched", "headers": _ETAG_HEADER},
                "400": _BAD, "401": _UNAUTH, "404": _NOT_FOUND,
            },
        },
    },
    OPENAPI_PATH: {
        "get": {
            "operationId": "openapi",
            "summary": "This document",
            "security": [{}],
            "responses": {"200": {"description": "OpenAPI 3.0 document",
                                  "content": {"application/json": {"schema": {
                                      "type": "object"}}}}},
        }
    },
    "/healthz": {
        "get": {
            "operationId": "health",
            "summary": "Liveness: the process serves requests",
            "security": [{}],
            "responses": {"200": _json("alive", "Health")},
        }
    },
    "/readyz": {
        "get": {
            "operationId": "ready",
            "summary": "Readiness: the database answers (every replica, leader or not)",
            "security": [{}],
            "responses": {"200": _json("ready", "Ready"),
                          "503": _json("the database does not answer", "Ready")},
        }
    },
}


def build_document() -> dict[str, Any]:
    """A fresh copy of the registry's document (callers may add paths to it)."""
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "edge-hub",
            "version": __version__,
            "description": "Model registry and rollouts for edge inference agents. Errors "
            "are JSON: {\"error\": {\"code\", \"message\"}}. HTTPS. Changes need a bearer "
            "token of scope admin; reads a token of any scope, and model downloads also accept "
            "an agent's client certificate from the fleet CA (the empty security requirement "
            "below stands for that certificate).",
        },
        "paths": copy.deepcopy(_PATHS),
        "components": {
            "schemas": copy.deepcopy(_SCHEMAS),
            "parameters": {
                "name": {"name": "name", "in": "path", "required": True,
                         "schema": {"type": "string", "pattern": NAME_PATTERN}},
                "version": {"name": "version", "in": "path", "required": True,
                            "schema": {"type": "string", "pattern": VERSION_PATTERN}},
            },
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
        },
    }


def add_paths(
    doc: dict[str, Any], paths: dict[str, Any], schemas: dict[str, Any] | None = None
) -> None:
    """Merge another API module's paths (and component schemas) into ``doc``."""
    clash = set(paths) & set(doc["paths"])
    if clash:
        raise ValueError(f"paths already documented: {sorted(clash)}")
    doc["paths"].update(paths)
    doc["components"]["schemas"].update(schemas or {})
