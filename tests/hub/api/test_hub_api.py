"""The registry's REST API over real HTTP on loopback: push, list, show, resumable download,
and every refusal (4xx JSON, nothing stored).

Most tests share one ``edge-hub serve`` child process (each under a model name of its own, and
"nothing stored" means no file appeared during the test); those that need other settings run
the app in this process.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from openapi_spec_validator import validate
from yarl import URL

from hub.server.app import build_app
from tests.support.hub_client import (
    AUTH,
    READ_AUTH,
    HubProcess,
    InProcessHub,
    hub_process,
    hub_session,
    hub_settings,
    push,
    running_hub,
    stored_files,
    upload_form,
    version_url,
)
from tests.support.hub_models import make_classifier, make_manifest, sha256_file, write_model

LIMIT = 64 * 1024


@dataclass
class Hub:
    url: str
    data_dir: Path
    #: A model name of the test's own.
    name: str
    #: The files the hub had stored when the test started.
    before: set[str]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    tmp = tmp_path_factory.mktemp("api")
    config = tmp / "hub.yaml"
    config.write_text(f"api:\n  max_upload_bytes: {LIMIT}\n")
    with hub_process(tmp, "--config", str(config)) as h:
        yield h


@pytest.fixture
def hub(served: HubProcess) -> Hub:
    return Hub(served.url, served.data_dir, "t" + uuid.uuid4().hex[:10],
               stored_files(served.data_dir))


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client of the test hubs: their CA trusted, the read token by default (a request
    that passes ``AUTH`` acts as admin)."""
    async with hub_session(headers=READ_AUTH) as s:
        yield s


@pytest.fixture
def model(hub: Hub, tmp_path: Path) -> tuple[Path, Path]:
    """A model (and manifest) named after the test's model name."""
    # unique weights too, so no other test's blob can hide a file this test stored
    return write_model(tmp_path / "m", name=hub.name, seed=int(hub.name[1:], 16) % 2**32)


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[Path, Path]:
    """A model named ``tiny``, for the tests that run a hub of their own."""
    return write_model(tmp_path / "m")


def v_url(hub: Hub | InProcessHub, version: str = "1", tail: str = "") -> str:
    return version_url(hub.url, hub.name if isinstance(hub, Hub) else "tiny", version, tail)


async def test_push_list_show_and_resumed_download(
    hub: Hub, http: aiohttp.ClientSession, model: tuple[Path, Path]
) -> None:
    onnx_path, manifest_path = model
    sha = sha256_file(onnx_path)
    status, body = await push(http, v_url(hub), onnx_path, manifest_path, notes="first")
    assert status == 201, body
    assert body["sha256"] == sha and body["size"] == onnx_path.stat().st_size
    assert body["notes"] == "first" and body["signed"] is False

    async with http.get(f"{hub.url}/v1/models") as r:
        listed = (await r.json())["versions"]
    assert [(v["version"], v["sha256"]) for v in listed if v["name"] == hub.name] == [
        ("1", sha)]
    async with http.get(f"{hub.url}/v1/models", params={"name": hub.name}) as r:
        assert [v["name"] for v in (await r.json())["versions"]] == [hub.name]
    async with http.get(f"{hub.url}/v1/models", params={"name": "other"}) as r:
        assert (await r.json())["versions"] == []

    async with http.get(v_url(hub)) as r:
        shown = await r.json()
    assert shown["manifest"] == json.loads(manifest_path.read_bytes())
    assert shown["artifact_url"] == v_url(hub, tail="/artifact")

    # a download cut after 100 bytes, resumed with Range + If-Range
    size = onnx_path.stat().st_size
    async with http.get(shown["artifact_url"], headers={"Range": "bytes=0-99"}) as r:
        assert r.status == 206
        assert r.headers["Content-Range"] == f"bytes 0-99/{size}"
        etag = r.headers["ETag"]
        first = await r.read()
    assert etag == f'"{sha}"' and len(first) == 100
    async with http.get(shown["artifact_url"],
                        headers={"Range": "bytes=100-", "If-Range": etag}) as r:
        assert r.status == 206
        rest = await r.read()
    assert hashlib.sha256(first + rest).hexdigest() == sha

    async with http.get(v_url(hub, tail="/manifest")) as r:
        mbytes = await r.read()
    assert mbytes == manifest_path.read_bytes()
    assert hashlib.sha256(mbytes).hexdigest() == shown["manifest_sha256"]


async def test_conditional_and_range_edge_cases(
    hub: Hub, http: aiohttp.ClientSession, model: tuple[Path, Path]
) -> None:
    onnx_path, manifest_path = model
    data = onnx_path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    assert (await push(http, v_url(hub), onnx_path, manifest_path))[0] == 201
    art = v_url(hub, tail="/artifact")
    for inm in (f'"{sha}"', f'W/"{sha}"', f'"nope", "{sha}"', "*"):
        async with http.get(art, headers={"If-None-Match": inm}) as r:
            assert r.status == 304 and await r.read() == b""
    async with http.get(art, headers={"If-None-Match": '"other"'}) as r:
        assert r.status == 200 and await r.read() == data
    async with http.get(art, headers={"Range": "bytes=-10"}) as r:
        assert r.status == 206 and await r.read() == data[-10:]
    async with http.get(art, headers={"Range": f"bytes={len(data)}-"}) as r:
        assert r.status == 416
        assert r.headers["Content-Range"] == f"bytes */{len(data)}"
        assert (await r.json())["error"]["code"] == "range_not_satisfiable"
    # a stale If-Range (the file changed) gets the whole file, not a spliced range
    async with http.get(art, headers={"Range": "bytes=5-", "If-Range": '"old"'}) as r:
        assert r.status == 200 and await r.read() == data
    # several ranges or bad syntax: ignored, whole file
    for rng in ("bytes=0-1,5-6", "bytes=x-y", "items=0-1", "bytes=9-3"):
        async with http.get(art, headers={"Range": rng}) as r:
            assert r.status == 200 and await r.read() == data
    async with http.head(art) as r:
        assert r.status == 200 and int(r.headers["Content-Length"]) == len(data)
        assert await r.read() == b""
    async with http.get(v_url(hub, tail="/manifest"),
                        headers={"If-None-Match": '"' + hashlib.sha256(
                            manifest_path.read_bytes()).hexdigest() + '"'}) as r:
        assert r.status == 304
    # pushing the identical version again is an idempotent 200
    status, body = await push(http, v_url(hub), onnx_path, manifest_path)
    assert status == 200 and body["sha256"] == sha


def _case_corrupt(tmp: Path, onnx: Path, man: dict[str, Any]) -> tuple[bytes, bytes]:
    data = onnx.read_bytes()[: onnx.stat().st_size // 2]
    return data, _json({**man, "sha256": hashlib.sha256(data).hexdigest()})


def _case_not_onnx(tmp: Path, onnx: Path, man: dict[str, Any]) -> tuple[bytes, bytes]:
    data = b"this is not a model\n" * 50
    return data, _json({**man, "sha256": hashlib.sha256(data).hexdigest()})


def _case_input_mismatch(tmp: Path, onnx: Path, man: dict[str, Any]) -> tuple[bytes, bytes]:
    return onnx.read_bytes(), _json({**man, "input": {**man["input"], "width": 64}})


def _case_output_mismatch(tmp: Path, onnx: Path, man: dict[str, Any]) -> tuple[bytes, bytes]:
    return onnx.read_bytes(), _json({**man, "outputs": [{"name": "probs", "shape": ["N", 4]}]})


def _case_digest_mismatch(tmp: Path, onnx: Path, man: dict[str, Any]) -> tuple[bytes, bytes]:
    return onnx.read_bytes(), _json({**man, "sha256": "0" * 64})


def _case_name_mismatch(tmp: Path, onnx: Path, man: dict[str, Any]) -> tuple[bytes, bytes]:
    return onnx.read_bytes(), _json({**man, "name": "other"})


def _case_fixed_batch(tmp: Path, onnx: Path, man: dict[str, Any]) -> tuple[bytes, bytes]:
    fixed = make_classifier(tmp / "fixed.onnx", batch=1)
    return fixed.read_bytes(), _json({**man, "sha256": sha256_file(fixed)})


def _case_bad_json(tmp: Path, onnx: Path, man: dict[str, Any]) -> tuple[bytes, bytes]:
    return onnx.read_bytes(), b"{not json"


def _case_missing_field(tmp: Path, onnx: Path, man: dict[str, Any]) -> tuple[bytes, bytes]:
    return onnx.read_bytes(), _json({k: v for k, v in man.items() if k != "outputs"})


def _case_traversal_file(tmp: Path, onnx: Path, man: dict[str, Any]) -> tuple[bytes, bytes]:
    return onnx.read_bytes(), _json({**man, "file": "../../etc/passwd"})


def _json(obj: Any) -> bytes:
    return json.dumps(obj).encode()


@pytest.mark.parametrize(
    ("case", "code"),
    [
        (_case_corrupt, "not_onnx"),
        (_case_not_onnx, "not_onnx"),
        (_case_input_mismatch, "manifest_mismatch"),
        (_case_output_mismatch, "manifest_mismatch"),
        (_case_digest_mismatch, "manifest_mismatch"),
        (_case_name_mismatch, "manifest_mismatch"),
        (_case_fixed_batch, "manifest_mismatch"),
        (_case_bad_json, "manifest_invalid"),
        (_case_missing_field, "manifest_invalid"),
        (_case_traversal_file, "manifest_invalid"),
    ],
)
async def test_bad_uploads_are_refused_and_nothing_is_stored(
    hub: Hub, http: aiohttp.ClientSession, tmp_path: Path,
    model: tuple[Path, Path], case: Any, code: str,
) -> None:
    onnx_path, manifest_path = model
    artifact, manifest = case(tmp_path, onnx_path, json.loads(manifest_path.read_bytes()))
    status, body = await push(http, v_url(hub), artifact, manifest)
    assert status == 422, body
    assert body["error"]["code"] == code and body["error"]["message"]
    assert stored_files(hub.data_dir) == hub.before
    async with http.get(f"{hub.url}/v1/models", params={"name": hub.name}) as r:
        assert (await r.json())["versions"] == []


async def test_duplicate_version_with_other_bytes_is_refused(
    hub: Hub, http: aiohttp.ClientSession, tmp_path: Path, model: tuple[Path, Path]
) -> None:
    onnx_path, manifest_path = model
    assert (await push(http, v_url(hub), onnx_path, manifest_path))[0] == 201
    before = stored_files(hub.data_dir)
    other_onnx, other_manifest = write_model(tmp_path / "other", name=hub.name, seed=7)
    status, body = await push(http, v_url(hub), other_onnx, other_manifest)
    assert status == 409 and body["error"]["code"] == "conflict"
    assert stored_files(hub.data_dir) == before
    async with http.get(v_url(hub, tail="/artifact")) as r:
        assert await r.read() == onnx_path.read_bytes()
    # same bytes, other notes: still the same version (notes are not content)
    status, _ = await push(http, v_url(hub), onnx_path, manifest_path, notes="x")
    assert status == 200


@pytest.mark.parametrize(
    ("path", "statuses"),
    [
        ("/v1/models/..%2Fx/versions/1", {400, 404}),
        ("/v1/models/../x/versions/1", {400, 404}),
        ("/v1/models/tiny/versions/..", {400, 404}),
        ("/v1/models/tiny/versions/a..b", {400}),
        ("/v1/models/Tiny/versions/1", {400}),
        ("/v1/models/tiny/versions/%2E%2E%2F%2E%2E", {400, 404}),
    ],
)
async def test_traversal_names_are_refused(
    hub: Hub, http: aiohttp.ClientSession, model: tuple[Path, Path],
    path: str, statuses: set[int],
) -> None:
    onnx_path, manifest_path = model
    url = URL(hub.url + path, encoded=True)
    async with http.put(url, data=upload_form(onnx_path, manifest_path), headers=AUTH) as r:
        assert r.status in statuses
        assert "code" in (await r.json())["error"]
    async with http.get(url) as r:
        assert r.status in statuses
    assert stored_files(hub.data_dir) == hub.before
    assert not list(hub.data_dir.parent.glob("x*"))


async def test_oversize_uploads_are_refused(
    hub: Hub, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    # over the limit but under the Content-Length pre-check: refused while streaming
    big = make_classifier(tmp_path / "big.onnx", pad_bytes=LIMIT + 4096)
    man = _json(make_manifest(big, name=hub.name))
    status, body = await push(http, v_url(hub), big, man)
    assert status == 413 and body["error"]["code"] == "too_large"
    # far over: refused from Content-Length, before the body (Expect: 100-continue)
    huge = b"\0" * (2 * 1024 * 1024 + LIMIT)
    async with http.put(v_url(hub), data=upload_form(huge, man), headers=AUTH,
                        expect100=True) as r:
        assert r.status == 413 and (await r.json())["error"]["code"] == "too_large"

    # chunked (no Content-Length): the streaming limit still holds
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"\1" * (LIMIT // 2)

    form = aiohttp.MultipartWriter("form-data")
    form.append(man, {"Content-Type": "application/json"}).set_content_disposition(
        "form-data", name="manifest")
    form.append(chunks()).set_content_disposition("form-data", name="artifact")
    async with http.put(v_url(hub), data=form, headers=AUTH) as r:
        assert r.status == 413
    assert stored_files(hub.data_dir) == hub.before


@pytest.mark.parametrize(
    ("headers", "status"),
    [({}, 401), ({"Authorization": "Bearer wrong"}, 401),
     ({"Authorization": "Basic dXNlcjpwYXNz"}, 401), ({"Authorization": "Bearer"}, 401),
     (READ_AUTH, 403)],
    ids=["missing", "wrong", "basic", "empty", "read-scope"],
)
async def test_writes_need_the_admin_token(
    hub: Hub, http: aiohttp.ClientSession, model: tuple[Path, Path], headers: dict[str, str],
    status: int,
) -> None:
    code = {401: "unauthorized", 403: "forbidden"}[status]
    onnx_path, manifest_path = model
    async with hub_session() as bare:
        got, body = await push(bare, v_url(hub), onnx_path, manifest_path, headers=headers)
        assert got == status and body["error"]["code"] == code
        # with Expect: 100-continue the refusal comes before the body is sent
        async with bare.put(v_url(hub), data=upload_form(onnx_path, manifest_path),
                            headers=headers, expect100=True) as r:
            assert r.status == status
            if status == 401:
                assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert stored_files(hub.data_dir) == hub.before
        assert (await push(http, v_url(hub), onnx_path, manifest_path))[0] == 201
        async with bare.delete(v_url(hub), headers=headers) as r:
            assert r.status == status
    async with http.get(v_url(hub)) as r:
        assert r.status == 200  # the version is still there


async def test_malformed_upload_requests(
    hub: Hub, http: aiohttp.ClientSession, model: tuple[Path, Path]
) -> None:
    onnx_path, manifest_path = model
    async with http.put(v_url(hub), data=onnx_path.read_bytes(), headers=AUTH) as r:
        assert r.status == 415
    form = aiohttp.MultipartWriter("form-data")
    form.append(manifest_path.read_bytes()).set_content_disposition("form-data", name="manifest")
    async with http.put(v_url(hub), data=form, headers=AUTH) as r:
        assert r.status == 400 and "artifact" in (await r.json())["error"]["message"]
    for extra in ({"colour": "red"}, {"signature": "not base64!"}):
        status, body = await push(http, v_url(hub), onnx_path, manifest_path, **extra)
        assert status == 400, body
    broken = (b"--xyz\r\nContent-Disposition: form-data; name=\"manifest\"\r\n\r\n{}"
              b"\r\n--xyz\r\nContent-Disposition: form-data; name=\"artifact\"\r\n\r\nabc")
    async with http.put(v_url(hub), data=broken, headers={
            **AUTH, "Content-Type": "multipart/form-data; boundary=xyz"}) as r:
        assert 400 <= r.status < 500
    # a NUL in a part header (found by the fuzzer: the parser raised a non-ValueError)
    nul = (b"--xyz\r\nContent-Disposition: form-data; name=\"a\x00b\"\r\n\r\n{}\r\n"
           b"--xyz--\r\n")
    async with http.put(v_url(hub), data=nul, headers={
            **AUTH, "Content-Type": "multipart/form-data; boundary=xyz"}) as r:
        assert r.status == 400
        assert "malformed multipart" in (await r.json())["error"]["message"]
    assert stored_files(hub.data_dir) == hub.before


async def test_delete_refused_while_assigned(
    tmp_path: Path, http: aiohttp.ClientSession, tiny: tuple[Path, Path]
) -> None:
    assigned = {("tiny", "1"): ["node-a", "node-b"]}

    async def is_assigned(name: str, version: str) -> list[str]:
        return assigned.get((name, version), [])

    settings = hub_settings(tmp_path / "data")
    async with running_hub(settings, is_assigned=is_assigned) as hub:
        onnx_path, manifest_path = tiny
        assert (await push(http, v_url(hub), onnx_path, manifest_path))[0] == 201
        async with http.delete(v_url(hub), headers=AUTH) as r:
            body = await r.json()
            assert r.status == 409 and "node-a" in body["error"]["message"]
        assert len(stored_files(hub.data_dir)) == 1
        assigned.clear()
        async with http.delete(v_url(hub), headers=AUTH) as r:
            assert r.status == 200
        async with http.get(v_url(hub, tail="/artifact")) as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"
        async with http.delete(v_url(hub), headers=AUTH) as r:
            assert r.status == 404
        assert stored_files(hub.data_dir) == set()


async def test_errors_are_json(hub: Hub, http: aiohttp.ClientSession) -> None:
    for method, path, status in [
        ("GET", "/nope", 404),
        ("POST", "/v1/models", 405),
        ("GET", "/v1/models/tiny/versions/9", 404),
        ("GET", "/v1/models?name=BAD", 400),
    ]:
        async with http.request(method, hub.url + path) as r:
            assert r.status == status
            assert r.content_type == "application/json"
            err = (await r.json())["error"]
            assert isinstance(err["code"], str) and isinstance(err["message"], str)


async def test_openapi_document_validates_and_covers_every_route(
    hub: Hub, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    async with http.get(f"{hub.url}/v1/openapi.json") as r:
        doc = await r.json()
    validate(doc)
    app = build_app(hub_settings(tmp_path / "data"))  # built, not started: only its routes
    routes = {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None and route.method not in ("HEAD", "*")
    }
    documented = {(m, p) for p, ops in doc["paths"].items() for m in ops if m != "parameters"}
    assert routes == documented
    # a catch-all (404 for what does not exist, 405 for a wrong method) only on documented paths
    catch_all = {r.resource.canonical for r in app.router.routes()
                 if r.resource is not None and r.method == "*"}
    assert catch_all <= {p for _, p in documented}, catch_all


async def test_a_lost_artifact_file_is_a_json_error_not_a_broken_stream(
    hub: Hub, http: aiohttp.ClientSession, model: tuple[Path, Path]
) -> None:
    onnx_path, manifest_path = model
    status, body = await push(http, v_url(hub), onnx_path, manifest_path)
    assert status == 201
    blob = hub.data_dir / "artifacts" / "sha256" / body["sha256"][:2] / body["sha256"]
    blob.unlink()  # someone cleaned the volume by hand
    async with http.get(v_url(hub, tail="/artifact")) as r:
        assert r.status == 500
        assert (await r.json())["error"]["code"] == "artifact_missing"
    async with http.get(f"{hub.url}/healthz") as r:
        assert r.status == 200
