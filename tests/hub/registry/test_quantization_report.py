"""The ``quantization`` report a version may carry: checked against the contract's schema,
stored, read back, and a registry database from before the field (schema 1) keeps its rows."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.contract.quantization import MAX_REPORT_BYTES
from hub.errors import InvalidRequest
from hub.registry.metadata import DB_FILE, SCHEMA_VERSION, SqliteMetadataStore
from hub.registry.service import Registry, parse_quantization
from tests.support.hub_client import hub_settings
from tests.support.hub_models import write_model

REPORT: dict[str, Any] = {
    "parent_version": "1.0.0", "parent_sha256": "ab" * 32, "onnxruntime": "1.23.0",
    "settings": {"per_channel": True, "calibration": "percentile", "percentile": 99.999},
    "calibration": {"frames": 32, "source": "clips/"},
    "heldout": {"frames": 300, "source": "the calibration source's other frames"},
    "agreement": {"metric": "top1", "value": 0.9, "frames": 300, "confident_min_score": 0.3,
                  "confident_value": 0.98, "confident_frames": 200},
    "speed": {"fp32_fps": 50.0, "int8_fps": 90.0, "speedup": 1.8, "rounds": 5,
              "intra_op_threads": 1, "cpu": "x86", "cores": 2},
    "elapsed_s": 42.0,
}


def test_reports_are_checked_against_the_contract() -> None:
    stored = parse_quantization(json.dumps(REPORT))
    assert stored is not None
    assert stored["settings"]["format"] == "QDQ" and stored["settings"]["fp32_op_types"] == []
    assert stored["agreement"]["value"] == 0.9
    assert parse_quantization(None) is None and parse_quantization("  ") is None
    bad = {**REPORT, "agreement": {**REPORT["agreement"], "value": 1.5}}
    with pytest.raises(InvalidRequest, match=r"agreement\.value"):
        parse_quantization(json.dumps(bad))
    chosen = {**REPORT, "settings": {**REPORT["settings"], "fp32_first_nodes": 6,
                                     "fp32_nodes": ["/_conv_stem/Conv"]},
              "selection": {"target_agreement": 0.95, "min_speedup": 1.3, "frames": 64,
                            "met": True, "candidates": [
                                {"fp32_first_nodes": 0, "agreement": 0.89, "speedup": 2.0},
                                {"fp32_first_nodes": 6, "agreement": 0.97, "speedup": 1.8}]}}
    stored = parse_quantization(json.dumps(chosen))
    assert stored is not None and stored["selection"]["candidates"][1]["agreement"] == 0.97
    assert parse_quantization(json.dumps(REPORT))["selection"] is None  # type: ignore[index]
    bad_pick = {**chosen, "selection": {**chosen["selection"], "candidates": [
        {"fp32_first_nodes": -1, "agreement": 0.9, "speedup": 2.0}]}}
    with pytest.raises(InvalidRequest, match=r"selection\.candidates\.0\.fp32_first_nodes"):
        parse_quantization(json.dumps(bad_pick))
    with pytest.raises(InvalidRequest, match="speedup_typo"):
        parse_quantization(json.dumps({**REPORT, "speedup_typo": 2}))
    with pytest.raises(InvalidRequest, match="quantization report"):
        parse_quantization("[1, 2")
    with pytest.raises(InvalidRequest, match=f"over {MAX_REPORT_BYTES} bytes"):
        parse_quantization(json.dumps({**REPORT, "pad": "x" * MAX_REPORT_BYTES}))


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[Registry]:
    reg = Registry(hub_settings(tmp_path / "data"))
    yield reg
    await reg.aclose()


async def _push(reg: Registry, folder: Path, version: str, **kw: Any) -> Any:
    onnx, manifest = await asyncio.to_thread(write_model, folder, name="qm", version=version)
    staged = await reg.stage()
    await staged.write(onnx.read_bytes())
    await staged.finish()
    return await reg.push("qm", version, manifest_bytes=manifest.read_bytes(), staged=staged,
                          **kw)


async def test_a_pushed_report_is_stored_and_a_bad_one_stores_nothing(
        registry: Registry, tmp_path: Path) -> None:
    v, created = await _push(registry, tmp_path / "a", "1-int8",
                             quantization=json.dumps(REPORT))
    assert created and v.quantization["speed"]["speedup"] == 1.8
    again = await registry.get("qm", "1-int8")
    assert again.quantization == v.quantization
    plain, _ = await _push(registry, tmp_path / "b", "1")
    assert (await registry.get("qm", "1")).quantization is None and plain.quantization is None
    with pytest.raises(InvalidRequest, match="parent_sha256"):
        await _push(registry, tmp_path / "c", "2-int8",
                    quantization=json.dumps({**REPORT, "parent_sha256": "nope"}))
    assert [x.version for x in await registry.list("qm")] == ["1-int8", "1"]


async def test_a_schema_1_database_gets_the_column_and_keeps_its_rows(tmp_path: Path) -> None:
    db = tmp_path / DB_FILE
    conn = sqlite3.connect(db)
    conn.executescript("""
        CREATE TABLE model_versions (
            name TEXT NOT NULL, version TEXT NOT NULL, task TEXT NOT NULL,
            sha256 TEXT NOT NULL, size INTEGER NOT NULL, manifest BLOB NOT NULL,
            manifest_sha256 TEXT NOT NULL, signature TEXT, created_at REAL NOT NULL,
            pushed_by TEXT NOT NULL, notes TEXT NOT NULL DEFAULT '',
            PRIMARY KEY (name, version));
        PRAGMA user_version=1;
    """)
    conn.execute("INSERT INTO model_versions VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                 ("old", "1", "classification", "cd" * 32, 10, b"{}", "ef" * 32, None, 1.0,
                  "me", "before the field"))
    conn.commit()
    conn.close()
    store = SqliteMetadataStore(db)
    try:
        await store.open()
        row = await store.get("old", "1")
        assert row is not None and row.notes == "before the field" and row.quantization is None
    finally:
        await store.close()
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    conn.close()
