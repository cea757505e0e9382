"""Property test of the running hub against its own OpenAPI document (schemathesis).

Schemathesis generates requests for every documented operation, valid and invalid (bad path
segments, odd headers, random multipart bodies), and sends them over HTTP to an
``edge-hub serve`` child process. Whatever it sends, the hub must answer with a documented
status code, a documented content type and body, and never a 5xx. The example count is
bounded so the whole test takes seconds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from hub.api.openapi import build_document
from tests.support.hub_client import AUTH, HubProcess, hub_process, requests_verify
from tests.support.hub_models import write_model

schema = schemathesis.openapi.from_dict(build_document())


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    tmp = tmp_path_factory.mktemp("fuzz")
    with hub_process(tmp) as h:
        # one real version under the document's example name, so reads also hit 200s
        onnx, manifest = write_model(tmp / "m", name="yolov8n", version="1.2.0")
        with onnx.open("rb") as f, contextlib.closing(requests.Session()) as s:
            s.trust_env = False  # REQUESTS_CA_BUNDLE would win over the session's CA
            s.verify = requests_verify()
            r = s.put(f"{h.url}/v1/models/yolov8n/versions/1.2.0", headers=AUTH, files={
                "manifest": ("manifest.json", manifest.read_bytes(), "application/json"),
                "artifact": ("model.onnx", f, "application/octet-stream"),
            }, timeout=30)
        assert r.status_code == 201, r.text
        yield h
        log = h.log_text()
    # the fuzzer reached the handlers (refusals are logged), and nothing failed inside
    assert log.count('"status": 4') > 50, log[-3000:]
    assert "request_failed" not in log and '"status": 5' not in log, log[-3000:]


@schema.parametrize()
@settings(max_examples=10, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_api_never_answers_5xx(case: schemathesis.Case, hub: HubProcess) -> None:
    case.call_and_validate(
        base_url=hub.url,
        headers=AUTH,
        verify=requests_verify(),
        timeout=10,
        checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                response_schema_conformance],
    )


def test_document_paths_match_the_fuzzed_operations() -> None:
    ops = {(op.ok().method.lower(), op.ok().path) for op in schema.get_all_operations()}
    assert ("put", "/v1/models/{name}/versions/{version}") in ops
    assert ("get", "/readyz") in ops
    assert len(ops) == 9
    assert Path(__file__).name.startswith("test_hub_api")
