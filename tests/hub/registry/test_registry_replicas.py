"""Two hub replicas on one PostgreSQL database and one shared data folder (the ReadWriteMany
volume): a push through one is downloadable from the other at once; concurrent pushes of the
same version store one blob and one record; different bytes under one version: one wins, the
other gets 409."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from tests.support.hub_client import (
    AUTH,
    hub_session,
    hub_settings,
    push,
    running_hub,
    stored_files,
    version_url,
)
from tests.support.hub_models import write_model
from tests.support.postgres import PostgresServer


def shared_storage(tmp_path: Path, postgres: PostgresServer) -> dict[str, Any]:
    return {"data_dir": str(tmp_path / "shared"), "database_url": postgres.new_database(),
            "database_password_file": str(postgres.password_file(tmp_path))}


async def test_pushes_and_downloads_across_replicas(tmp_path: Path,
                                                    postgres: PostgresServer) -> None:
    storage = shared_storage(tmp_path, postgres)
    sa = hub_settings(tmp_path / "a", storage=storage)
    sb = hub_settings(tmp_path / "b", storage=storage)
    onnx, manifest = write_model(tmp_path / "m", name="tiny", version="1")
    other_onnx, other_manifest = write_model(tmp_path / "o", name="tiny", version="2", seed=7)
    clash_onnx, clash_manifest = write_model(tmp_path / "c", name="tiny", version="2", seed=9)
    async with running_hub(sa) as a, running_hub(sb) as b, hub_session(headers=AUTH) as http:
        # through A, then from B at once
        assert (await push(http, version_url(a.url), onnx, manifest))[0] == 201
        async with http.get(version_url(b.url, tail="/artifact")) as r:
            assert r.status == 200 and await r.read() == onnx.read_bytes()
        async with http.get(version_url(b.url)) as r:
            assert r.status == 200
        # the same bytes through both at the same time: both succeed, one record, one blob
        statuses = await asyncio.gather(*(
            push(http, version_url(h.url, version="3"), *write_model(
                tmp_path / f"same-{i}", name="tiny", version="3", seed=3))
            for i, h in enumerate((a, b, a, b))))
        assert sorted(s for s, _ in statuses) == [200, 200, 200, 201], statuses
        async with http.get(f"{b.url}/v1/models") as r:
            listed = [v for v in (await r.json())["versions"] if v["version"] == "3"]
        assert len(listed) == 1
        # different bytes under one version on the two replicas: one wins, the other 409
        results = await asyncio.gather(
            push(http, version_url(a.url, version="2"), other_onnx, other_manifest),
            push(http, version_url(b.url, version="2"), clash_onnx, clash_manifest))
        codes = sorted(s for s, _ in results)
        assert codes == [201, 409], results
        winner = other_onnx if results[0][0] == 201 else clash_onnx
        for h in (a, b):
            async with http.get(version_url(h.url, version="2", tail="/artifact")) as r:
                assert await r.read() == winner.read_bytes()
    # three versions, three blobs: nothing of the loser or the duplicates is left behind
    blobs = {p for p in stored_files(Path(storage["data_dir"])) if p.startswith("artifacts/")}
    assert len(blobs) == 3, blobs
    assert not [p for p in stored_files(Path(storage["data_dir"])) if p.startswith("tmp/")]
