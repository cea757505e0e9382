"""The registry's REST API: push, list, show, delete versions; download artifacts and manifests.

Paths are fixed (agents and the CLI rely on them; see docs/registry.md). Uploads are
``multipart/form-data`` with parts ``manifest`` (JSON), ``artifact`` (the ONNX bytes),
optional ``signature``, ``notes``, ``pushed_by`` and ``quantization`` (an INT8 version's
report); the artifact is streamed to a temporary
file and hashed as it arrives, never held whole in memory. Downloads stream from disk in
256 KiB reads with ``ETag`` = the sha256, single ``Range`` requests (206/416) and
``If-None-Match`` (304), so a node on a slow link can resume where it stopped. Reads need the
``fetch`` scope (an agent's client certificate, or any token), changes an ``admin`` token
(``hub/api/httputil.py``).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
from typing import Any

import structlog
from aiohttp import BodyPartReader, hdrs, web
from aiohttp.http_exceptions import HttpProcessingError

from edge_agent.contract.quantization import MAX_REPORT_BYTES
from hub.api.httputil import (
    SETTINGS_KEY,
    RangeNotSatisfiableError,
    authorize,
    error_response,
    hub_error_response,
    if_range_allows,
    none_match,
    parse_range,
    quoted_etag,
)
from hub.errors import HubError, InvalidRequest, TooLarge
from hub.registry.artifacts import StagedArtifact, read_range
from hub.registry.service import (
    MAX_NOTES_CHARS,
    MAX_PUSHED_BY_CHARS,
    ModelVersion,
    Registry,
    artifact_path,
    check_ref,
    manifest_path,
    version_path,
)
from hub.registry.validation import MAX_MANIFEST_BYTES

log = structlog.get_logger(__name__)

REGISTRY_KEY = web.AppKey("hub_registry", Registry)

#: Multipart framing, part headers and the small text parts on top of artifact + manifest.
UPLOAD_OVERHEAD_BYTES = 64 * 1024
#: Bytes read from the request per multipart chunk.
UPLOAD_CHUNK = 256 * 1024
#: Largest of each small text part, bytes (UTF-8).
_TEXT_PARTS = {
    "manifest": MAX_MANIFEST_BYTES,
    "signature": 1024,
    "notes": MAX_NOTES_CHARS * 4,
    "pushed_by": MAX_PUSHED_BY_CHARS * 4,
    "quantization": MAX_REPORT_BYTES,
}
_IDENTITY_ENCODINGS = ("", "identity", "binary", "7bit", "8bit")


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, tz=dt.timezone.utc).isoformat().replace("+00:00", "Z")


def _base_url(request: web.Request) -> str:
    public = request.app[SETTINGS_KEY].api.public_url
    return public.rstrip("/") if public else str(request.url.origin())


def summary_json(v: ModelVersion) -> dict[str, Any]:
    """A version as listed (no manifest)."""
    return {
        "name": v.name,
        "version": v.version,
        "task": v.task,
        "sha256": v.sha256,
        "size": v.size,
        "signed": v.signature is not None,
        "created_at": _iso(v.created_at),
        "pushed_by": v.pushed_by,
        "notes": v.notes,
    }


def version_json(v: ModelVersion, base_url: str) -> dict[str, Any]:
    """A version in full, with the URLs its artifact and manifest are served at."""
    return {
        **summary_json(v),
        "manifest_sha256": v.manifest_sha256,
        "signature": v.signature,
        "manifest": v.manifest,
        "quantization": v.quantization,
        "artifact_url": base_url + artifact_path(v.name, v.version),
        "manifest_url": base_url + manifest_path(v.name, v.version),
    }


def _ref(request: web.Request) -> tuple[str, str]:
    name, version = request.match_info["name"], request.match_info["version"]
    check_ref(name, version)
    return name, version


# ---------------------------------------------------------------------------------- reads


async def list_versions(request: web.Request) -> web.Response:
    """``GET /v1/models[?name=N]``."""
    authorize(request, "fetch")
    name = request.query.get("name")
    versions = await request.app[REGISTRY_KEY].list(name)
    return web.json_response({"versions": [summary_json(v) for v in versions]})


async def show_version(request: web.Request) -> web.Response:
    """``GET /v1/models/{name}/versions/{version}``."""
    authorize(request, "fetch")
    v = await request.app[REGISTRY_KEY].get(*_ref(request))
    return web.json_response(version_json(v, _base_url(request)))


async def get_manifest(request: web.Request) -> web.Response:
    """``GET .../manifest``: the exact manifest bytes the signature covers."""
    authorize(request, "fetch")
    v = await request.app[REGISTRY_KEY].get(*_ref(request))
    headers = {hdrs.ETAG: quoted_etag(v.manifest_sha256), hdrs.CACHE_CONTROL: "no-cache"}
    if none_match(request.headers.get(hdrs.IF_NONE_MATCH), v.manifest_sha256):
        return web.Response(status=304, headers=headers)
    return web.Response(body=v.manifest_bytes, content_type="application/json", headers=headers)


async def get_artifact(request: web.Request) -> web.StreamResponse:
    """``GET|HEAD .../artifact``: the ONNX file, streamed, resumable."""
    authorize(request, "fetch")
    registry = request.app[REGISTRY_KEY]
    v = await registry.get(*_ref(request))
    headers = {
        hdrs.ETAG: quoted_etag(v.sha256),
        hdrs.ACCEPT_RANGES: "bytes",
        # content-addressed, but a version may be deleted and pushed again: revalidate
        hdrs.CACHE_CONTROL: "no-cache",
        "Repr-Digest": "sha-256=:" + base64.b64encode(bytes.fromhex(v.sha256)).decode() + ":",
    }
    if none_match(request.headers.get(hdrs.IF_NONE_MATCH), v.sha256):
        return web.Response(status=304, headers=headers)
    first, last, status = 0, v.size - 1, 200
    if if_range_allows(request.headers.get(hdrs.IF_RANGE), v.sha256):
        try:
            rng = parse_range(request.headers.get(hdrs.RANGE), v.size)
        except RangeNotSatisfiableError:
            return error_response(
                416, "range_not_satisfiable", f"the artifact has {v.size} bytes",
                {**headers, hdrs.CONTENT_RANGE: f"bytes */{v.size}"},
            )
        if rng is not None:
            first, last, status = rng[0], rng[1], 206
            headers[hdrs.CONTENT_RANGE] = f"bytes {first}-{last}/{v.size}"
    resp = web.StreamResponse(status=status, headers=headers)
    resp.content_type = "application/octet-stream"
    resp.content_length = last - first + 1
    headers_disposition = f'attachment; filename="{v.name}-{v.version}.onnx"'
    resp.headers[hdrs.CONTENT_DISPOSITION] = headers_disposition
    if request.method == "HEAD":
        await resp.prepare(request)
        return resp
    try:
        blob = await registry.artifacts.open_blob(v.sha256)
    except FileNotFoundError:
        log.error("artifact_missing", model=v.name, version=v.version, sha256=v.sha256)
        return error_response(500, "artifact_missing", "the artifact file is missing on the hub")
    try:
        await resp.prepare(request)
        async for chunk in read_range(blob, first, last - first + 1):
            await resp.write(chunk)  # waits for the socket to drain: memory stays flat
    finally:
        await asyncio.to_thread(blob.close)
    await resp.write_eof()
    return resp


# --------------------------------------------------------------------------------- writes


def _check_upload_headers(request: web.Request) -> None:
    ctype = request.headers.get(hdrs.CONTENT_TYPE, "")
    if not ctype.lower().startswith("multipart/form-data"):
        raise web.HTTPUnsupportedMediaType(text="an upload must be multipart/form-data")
    if request.headers.get(hdrs.CONTENT_ENCODING, "identity").lower() != "identity":
        raise web.HTTPUnsupportedMediaType(text="compressed uploads are not accepted")
    limit = request.app[REGISTRY_KEY].max_upload_bytes
    length = request.content_length
    if length is not None and length > limit + MAX_MANIFEST_BYTES + UPLOAD_OVERHEAD_BYTES:
        raise TooLarge(f"the upload of {length} bytes exceeds the limit of {limit} bytes")


async def expect_upload(request: web.Request) -> web.StreamResponse | None:
    """``Expect: 100-continue`` for uploads: refuse before the client sends the body."""
    if request.headers.get(hdrs.EXPECT, "").lower() != "100-continue":
        return error_response(417, "expectation_failed", "only Expect: 100-continue is known")
    try:
        authorize(request, "admin")
        _ref(request)
        _check_upload_headers(request)
    except HubError as exc:
        return hub_error_response(exc)
    except web.HTTPException as exc:
        return error_response(exc.status, "unsupported_media_type", exc.text or exc.reason)
    if request.version >= (1, 1):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0
    return None


async def _read_text(part: BodyPartReader, limit: int) -> bytes:
    data = bytearray()
    while chunk := await part.read_chunk(64 * 1024):
        data += chunk
        if len(data) > limit:
            raise TooLarge(f"part {part.name!r} is larger than {limit} bytes")
    return bytes(data)


async def _read_upload(request: web.Request, staged: StagedArtifact) -> dict[str, bytes]:
    """Read the multipart parts: the artifact into ``staged``, the rest into memory."""
    fields: dict[str, bytes] = {}
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise InvalidRequest("nested multipart bodies are not accepted")
            name = _part_name(part, fields)
            fields[name] = await _read_part(part, name, staged)
    except (ValueError, LookupError, AssertionError, EOFError, HttpProcessingError) as exc:
        # the parser's ways of saying "not well-formed": bad framing, part headers, encodings
        text = exc.message if isinstance(exc, HttpProcessingError) else str(exc)
        detail = text.strip().splitlines()[0][:200] if text.strip() else type(exc).__name__
        raise InvalidRequest(f"malformed multipart body: {detail}") from exc
    for required in ("artifact", "manifest"):
        if required not in fields:
            raise InvalidRequest(f"the upload has no {required!r} part")
    return fields


def _part_name(part: BodyPartReader, seen: dict[str, bytes]) -> str:
    """The part's name, once it is known to be new and not encoded."""
    name = part.name
    if name is None or name in seen:
        raise InvalidRequest(f"part {name!r}: missing or repeated part name")
    encoding = part.headers.get(hdrs.CONTENT_TRANSFER_ENCODING, "").lower()
    if encoding not in _IDENTITY_ENCODINGS or part.headers.get(
        hdrs.CONTENT_ENCODING, "identity"
    ).lower() != "identity":
        raise InvalidRequest(f"part {name!r}: encoded parts are not accepted")
    return name


async def _read_part(part: BodyPartReader, name: str, staged: StagedArtifact) -> bytes:
    """The artifact streamed into ``staged`` (b"" is kept for it), a text part into memory."""
    if name == "artifact":
        while chunk := await part.read_chunk(UPLOAD_CHUNK):
            await staged.write(chunk)
        await staged.finish()
        return b""
    if name in _TEXT_PARTS:
        return await _read_text(part, _TEXT_PARTS[name])
    raise InvalidRequest(
        f"unknown part {name!r}; expected artifact, manifest, signature, notes, pushed_by, "
        "quantization"
    )


def _text(fields: dict[str, bytes], name: str) -> str | None:
    if name not in fields:
        return None
    try:
        return fields[name].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"part {name!r} is not UTF-8 text") from exc


async def put_version(request: web.Request) -> web.Response:
    """``PUT /v1/models/{name}/versions/{version}``: push (201) or exact repeat (200)."""
    authorize(request, "admin")
    name, version = _ref(request)
    _check_upload_headers(request)
    registry = request.app[REGISTRY_KEY]
    staged = await registry.stage()
    try:
        fields = await _read_upload(request, staged)
        v, created = await registry.push(
            name,
            version,
            manifest_bytes=fields["manifest"],
            staged=staged,
            signature=_text(fields, "signature") or None,
            pushed_by=_text(fields, "pushed_by") or "",
            notes=_text(fields, "notes") or "",
            quantization=_text(fields, "quantization"),
        )
    finally:
        await staged.discard()
    return web.json_response(
        version_json(v, _base_url(request)),
        status=201 if created else 200,
        headers={hdrs.LOCATION: version_path(name, version)},
    )


async def delete_version(request: web.Request) -> web.Response:
    """``DELETE /v1/models/{name}/versions/{version}``: refused (409) while assigned."""
    authorize(request, "admin")
    v = await request.app[REGISTRY_KEY].delete(*_ref(request))
    return web.json_response({"deleted": summary_json(v)})


def setup(app: web.Application, registry: Registry) -> None:
    """Add the registry routes to ``app``."""
    app[REGISTRY_KEY] = registry
    app.router.add_get("/v1/models", list_versions)
    r = app.router.add_resource("/v1/models/{name}/versions/{version}")
    r.add_route("GET", show_version)
    r.add_route("PUT", put_version, expect_handler=expect_upload)
    r.add_route("DELETE", delete_version)
    app.router.add_get("/v1/models/{name}/versions/{version}/artifact", get_artifact)
    app.router.add_get("/v1/models/{name}/versions/{version}/manifest", get_manifest)
