"""``controller.gate_row``: each gate's current value, limit and verdict, decided by ``judge`` on
the same figures the state machine judges (no hub needed)."""

from __future__ import annotations

from hub.fleet.aggregate import Metrics, combine
from hub.rollouts.controller import gate_row, has_canary
from hub.rollouts.gates import judge, parse_gate
from hub.rollouts.model import parse_spec


def _m(p99: float, errors: int = 0, samples: int = 3) -> Metrics:
    return Metrics(frames=100, errors=errors, fps=10.0, p50_ms=p99 / 2, p95_ms=p99 * 0.9,
                   p99_ms=p99, samples=samples)


def test_absolute_gate_shows_the_worst_node_and_fails_like_judge() -> None:
    ready = {"a": _m(40.0), "b": _m(95.0)}
    gate = parse_gate("p99_ms<=80")
    row = gate_row(gate, combine(ready.values()), ready, {})
    assert (row["value"], row["node"], row["limit"], row["ok"]) == (95.0, "b", 80.0, False)
    assert row["message"] == judge([gate], ready, combine(ready.values()), {}).message
    ok = gate_row(parse_gate("p99_ms<=100"), combine(ready.values()), ready, {})
    assert ok["ok"] is True and ok["value"] == 95.0


def test_relative_gate_shows_the_baseline_and_its_limit() -> None:
    ready = {"a": _m(30.0)}
    row = gate_row(parse_gate("p99_ms<=1.5x"), combine(ready.values()), ready,
                   {"p99_ms": 25.0})
    assert row["baseline"] == 25.0 and row["limit"] == 37.5
    assert row["value"] == 30.0 and row["ok"] is True
    none = gate_row(parse_gate("p99_ms<=1.5x"), combine(ready.values()), ready, {})
    assert none["ok"] is None and none["limit"] is None
    assert none["message"] == "no baseline to compare with"


def test_no_ready_node_is_pending_not_passing() -> None:
    row = gate_row(parse_gate("error_rate<=0.01"), None, {}, {})
    assert row["ok"] is None and row["value"] is None
    assert row["message"] == "too few telemetry samples yet"


def test_has_canary_follows_the_plan_rule() -> None:
    assert has_canary(parse_spec({"model": "m", "version": "1"}))
    assert not has_canary(parse_spec({"model": "m", "version": "1", "canary": 0}))
    assert has_canary(parse_spec({"model": "m", "version": "1", "canary": 0,
                                  "canary_percent": 5}))
