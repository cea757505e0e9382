"""The hub accepts a model exactly when an agent loads it, and both give the same reason.

Every case of ``corpus.CASES`` (manifests and ONNX files at the edges of the contract) is pushed
to one running ``edge-hub serve`` over HTTP and loaded by the agent's engine
(``LoadedModel.load``, the gate every model passes, from model sync and from a local folder)
from the very same bytes. For each: both accept, or both refuse with the same reason code and
the same message, and that reason is the one the case was written for.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from edge_agent.config import EngineSettings
from edge_agent.contract.rejection import Reason, Rejection
from edge_agent.errors import ModelError
from edge_agent.inference.engine import LoadedModel
from tests.contract.corpus import CASES, Case
from tests.support.hub_client import (
    AUTH,
    READ_AUTH,
    HubProcess,
    hub_process,
    hub_session,
    upload_form,
)

CPU = EngineSettings(providers=["cpu"], warmup_runs=1)
#: The hub's broad error code for a reason (TASK_OUTPUTS: either, by where it is seen).
_CODES = {
    **dict.fromkeys([Reason.MANIFEST_NOT_JSON, Reason.MANIFEST_NOT_OBJECT, Reason.MISSING_FIELD,
                     Reason.UNKNOWN_KEY, Reason.INVALID_FIELD, Reason.UNKNOWN_TASK,
                     Reason.POSTPROCESS_PARAMS], "manifest_invalid"),
    **dict.fromkeys([Reason.INPUT_COUNT, Reason.INPUT_NAME, Reason.INPUT_TYPE,
                     Reason.INPUT_SHAPE, Reason.INPUT_BATCH, Reason.OUTPUT_MISSING,
                     Reason.OUTPUT_SHAPE], "manifest_mismatch"),
    Reason.NOT_ONNX: "not_onnx",
}


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    with hub_process(tmp_path_factory.mktemp("corpus-hub")) as h:
        yield h


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with hub_session(headers=READ_AUTH) as s:
        yield s


def test_the_corpus_covers_the_edges() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 25
    assert sum(c.expect is None for c in CASES) >= 10
    # every reason the two sides can share is exercised (MANIFEST_UNREADABLE is the agent's
    # own file-system case: the hub receives bytes)
    assert {c.expect for c in CASES} >= set(Reason) - {Reason.MANIFEST_UNREADABLE}


async def _push(http: aiohttp.ClientSession, hub: HubProcess, case: Case, data: bytes,
                raw: bytes) -> tuple[int, dict[str, str]]:
    url = f"{hub.url}/v1/models/{case.name}/versions/1"
    async with http.put(url, data=upload_form(data, raw), headers=AUTH) as r:
        body = await r.json()
        return r.status, body.get("error", {})


def _load(folder: Path, data: bytes, raw: bytes) -> Rejection | None:
    folder.mkdir()
    (folder / "model.onnx").write_bytes(data)
    (folder / "manifest.json").write_bytes(raw)
    try:
        LoadedModel.load(folder / "manifest.json", CPU).close()
    except ModelError as exc:
        assert exc.rejection is not None, f"refused outside the contract: {exc}"
        return exc.rejection
    return None


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_hub_and_agent_agree(
    case: Case, hub: HubProcess, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    data, raw = case.files()
    status, error = await _push(http, hub, case, data, raw)
    refused = _load(tmp_path / "agent", data, raw)
    if refused is None:
        assert status == 201, f"the agent loads it, the hub refuses it: {error}"
    else:
        assert status == 422, (
            f"the agent refuses it ({refused.reason}: {refused.message}), the hub: {status}")
        assert (error["reason"], error["message"]) == (refused.reason.value, refused.message)
        # the broad code says where the check sits: the manifest, the load, or the graph
        assert error["code"] == _CODES.get(refused.reason, error["code"])
    assert (None if refused is None else refused.reason) == case.expect, (
        refused and refused.message)


async def test_accepted_versions_are_served_back_verbatim(
    hub: HubProcess, http: aiohttp.ClientSession
) -> None:
    # (runs after the parametrised cases in file order; pushes its own case if alone)
    case = next(c for c in CASES if c.id == "missing_layout")
    data, raw = case.files()
    status, _ = await _push(http, hub, case, data, raw)
    assert status in (200, 201)  # 200: the identical repeat of the corpus push
    url = f"{hub.url}/v1/models/{case.name}/versions/1"
    async with http.get(url) as r:
        shown = await r.json()
    assert shown["manifest"] == json.loads(raw)
    assert "layout" not in shown["manifest"]["input"]  # the agent's default, not required
