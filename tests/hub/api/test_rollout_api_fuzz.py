"""Property test of the rollout API against its OpenAPI paths (schemathesis), over HTTP to an
``edge-hub serve`` child with the fake Kubernetes API, a broker and simulated agents.

Whatever schemathesis sends (valid and invalid bodies, odd path segments, selectors, gates),
the hub must answer with a documented status, content type and body, and never a 5xx.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from hub.api.fleet_openapi import PATHS, SCHEMAS
from hub.api.openapi import add_paths, build_document
from tests.hub.rollouts.test_rollout_cli import Env, close_env, make_env
from tests.support.broker import Broker
from tests.support.hub_client import requests_verify
from tests.support.rollout_env import TOKEN

_doc = build_document()
_doc["paths"] = {}
add_paths(_doc, PATHS, SCHEMAS)
schema = schemathesis.openapi.from_dict(_doc)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory, broker: Broker,
        models_dir: Path) -> Iterator[Env]:
    e = make_env(tmp_path_factory.mktemp("fuzz"), broker, models_dir, {"f-0": "a", "f-1": "a"})
    yield e
    close_env(e)


@schema.parametrize()
@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_rollout_api_never_answers_5xx(case: schemathesis.Case, hub: Env) -> None:
    case.call_and_validate(
        base_url=hub.hub.url,
        headers={"Authorization": f"Bearer {TOKEN}"},
        verify=requests_verify(),
        timeout=10,
        checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                response_schema_conformance],
    )
