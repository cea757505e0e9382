"""The wire contract: topics, names and payload validation."""

from __future__ import annotations

import orjson
import pytest

from edge_agent.contract import protocol as p


def test_topics_round_trip() -> None:
    assert p.parse_topic("edge", p.results_topic("edge", "n1", "cam0")) == ("n1", "results", "cam0")
    assert p.parse_topic("edge", p.state_topic("edge", "n1")) == ("n1", "state", None)
    with pytest.raises(p.ProtocolError):
        p.parse_topic("edge", "other/n1/state")
    with pytest.raises(p.ProtocolError):
        p.parse_topic("edge", "edge/n1/unknown")
    # a hub or consumer identity's name is never a node name: its topics are nobody's
    with pytest.raises(p.ProtocolError, match="not a node name"):
        p.parse_topic("edge", "edge/hub:edge-hub/state")


@pytest.mark.parametrize("version", ["../x", "..", "a/b", "", "-a", "a" * 70, "1..2"])
def test_bad_versions_refused(version: str) -> None:
    assert not p.is_valid_version(version)


@pytest.mark.parametrize("version", ["1", "1.0.2", "v2-rc.1", "2026_11_28"])
def test_good_versions(version: str) -> None:
    assert p.is_valid_version(version)


def _desired(**over: object) -> bytes:
    msg = {
        "v": 1,
        "node": "n1",
        "generation": 2,
        "models": {"det": {"version": "1", "sha256": "ab" * 32, "url": "u", "manifest_url": "m"}},
    }
    msg.update(over)
    return orjson.dumps(msg)


def test_desired_decodes_and_ignores_unknown_fields() -> None:
    msg = p.decode_desired(_desired(extra_field=1))
    assert msg.generation == 2 and msg.models["det"].version == "1"


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"[]",
        _desired(v=2),
        _desired(generation=-1),
        _desired(generation=2**63 - 1),
        _desired(generation=2**53),
        _desired(generation="7"),
        _desired(generation=7.0),
        _desired(generation=True),
        _desired(models={"Bad Name": {"version": "1", "sha256": "ab" * 32, "url": "u",
                                      "manifest_url": "m"}}),
        _desired(models={"det": {"version": "../1", "sha256": "ab" * 32, "url": "u",
                                 "manifest_url": "m"}}),
        _desired(models={"det": {"version": "1", "sha256": "XY", "url": "u", "manifest_url": "m"}}),
        b"{" + b" " * (p.MAX_PAYLOAD_BYTES + 1) + b"}",
    ],
)
def test_malformed_desired_rejected(payload: bytes) -> None:
    with pytest.raises(p.ProtocolError):
        p.decode_desired(payload)


def test_the_largest_generation_is_2_to_the_53_minus_1() -> None:
    assert p.decode_desired(_desired(generation=2**53 - 1)).generation == 2**53 - 1
    assert p.decode_state(orjson.dumps({"v": 1, "node": "n1", "online": True,
                                        "generation": 0})).generation == 0
