"""The hub's upload checks: the contract's verdicts, mapped to the hub's errors unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from onnx import TensorProto

from edge_agent.contract import manifest as manifests
from hub.registry import validation
from tests.contract.corpus import graph_bytes, manifest


def test_facts_of_a_good_manifest(tmp_path: Path) -> None:
    data = graph_bytes()
    raw = json.dumps(manifest("tiny", data)).encode()
    facts = validation.parse_manifest(raw)
    assert (facts.name, facts.version, facts.task) == ("tiny", "1", "classification")
    assert facts.data == json.loads(raw)
    (tmp_path / "m.onnx").write_bytes(data)
    # the registry passes the decoded object; the validated manifest works as well
    validation.check_onnx(tmp_path / "m.onnx", facts.data)
    validation.check_onnx(tmp_path / "m.onnx", facts.manifest)


def test_the_size_cap_is_the_hubs_own() -> None:
    big = b" " * validation.MAX_MANIFEST_BYTES + b"{}"
    with pytest.raises(validation.ManifestInvalid, match="larger than") as exc:
        validation.parse_manifest(big)
    assert exc.value.reason is None


def test_refusals_carry_the_contracts_reason_and_message(tmp_path: Path) -> None:
    with pytest.raises(validation.ManifestInvalid) as bad:
        validation.parse_manifest(json.dumps(manifest("tiny", b"", task="seg")).encode())
    assert bad.value.reason == "unknown_task" and str(bad.value).startswith(
        "invalid manifest: task: unknown task 'seg'")

    data = graph_bytes((("images", TensorProto.INT8, ["N", 3, 32, 32]),))
    (tmp_path / "int8.onnx").write_bytes(data)
    man = manifests.parse_manifest(manifest("tiny", data))
    with pytest.raises(validation.ManifestMismatch) as mismatch:
        validation.check_onnx(tmp_path / "int8.onnx", man)
    assert mismatch.value.reason == "input_type"
    assert str(mismatch.value) == "model input type tensor(int8) is not tensor(float)"

    (tmp_path / "junk.onnx").write_bytes(b"junk" * 10)
    with pytest.raises(validation.NotOnnx) as junk:
        validation.check_onnx(tmp_path / "junk.onnx", man)
    assert junk.value.reason == "not_onnx" and junk.value.code == "not_onnx"
