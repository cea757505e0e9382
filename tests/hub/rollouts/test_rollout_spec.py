"""Rollout inputs: label selectors (Kubernetes grammar), gates, specs and wave plans."""

from __future__ import annotations

import pytest

from hub.cluster.selectors import SelectorError, parse_selector
from hub.fleet.aggregate import Metrics
from hub.rollouts.gates import Gate, GateError, judge, parse_gate, parse_gates
from hub.rollouts.model import RolloutSpec, parse_spec, plan_waves

LABELS = {"site": "a", "line": "2", "edge.ai/camera-node": "true", "gpu": ""}


@pytest.mark.parametrize(("text", "expected"), [
    ("", True),
    ("site=a", True),
    ("site==a", True),
    ("site!=a", False),
    ("site!=b", True),
    ("missing!=b", True),  # != matches nodes without the key, as in Kubernetes
    ("site in (a,b)", True),
    ("line in (1, 3)", False),
    ("line notin (1,3)", True),
    ("missing notin (x)", True),
    ("edge.ai/camera-node", True),
    ("!edge.ai/camera-node", False),
    ("!retired", True),
    ("gpu=", True),
    ("site=a,line in (1,2),!retired", True),
    ("  site = a ,  line  in ( 2 )  ", True),
    ("site=a,line=1", False),
])
def test_selector_matches_like_kubernetes(text: str, expected: bool) -> None:
    assert parse_selector(text).matches(LABELS) is expected


def test_selector_canonical_form_round_trips() -> None:
    sel = parse_selector("site = a, line in (2,1,2), !retired, gpu")
    assert str(sel) == "site=a,line in (1,2),!retired,gpu"
    assert parse_selector(str(sel)) == sel


@pytest.mark.parametrize(("text", "message"), [
    ("site in (a", "ends unexpectedly"),
    ("site in a", "expected '\\('"),
    ("site ~ a", "unknown operator"),
    ("site=a=b", "expected ','"),
    ("=a", "expected a label key"),
    ("site=a,,line=1", "expected a label key"),
    ("Bad Key=a", "unknown operator|expected"),
    ("UPPER.example.com/x=1", "prefix must be a DNS subdomain"),
    ("-bad=1", "invalid label key"),
    ("site=" + "v" * 64, "invalid label value"),
    ("site=a b", "unknown operator|expected ','"),
    ("site in ()", "at least one value"),
    ("k" * 64, "invalid label key"),
])
def test_invalid_selectors_are_refused_clearly(text: str, message: str) -> None:
    with pytest.raises(SelectorError, match=message) as info:
        parse_selector(text)
    assert info.value.exit_code == 2 and info.value.http_status == 400


def test_gates_parse_and_refuse() -> None:
    assert parse_gate("p99_ms<=80") == Gate("p99_ms", "<=", 80.0)
    assert parse_gate(" p99_ms <= 1.5x ") == Gate("p99_ms", "<=", 1.5, relative=True)
    assert parse_gate("fps>=0.9*baseline") == Gate("fps", ">=", 0.9, relative=True)
    assert parse_gate("error_rate<0.01") == Gate("error_rate", "<=", 0.01)
    assert str(parse_gate("fps>=0.9×")) == "fps>=0.9x"
    for bad, message in (("p99<=80", "unknown gate metric"), ("fps<=3", "lower bound"),
                         ("error_rate>=0.1", "upper bound"), ("p99_ms<=", "cannot parse"),
                         ("error_rate<=2", "fraction"), ("p99_ms<=0x", "positive"),
                         ("", "non-empty")):
        with pytest.raises(GateError, match=message):
            parse_gate(bad)
    with pytest.raises(GateError, match="more than one"):
        parse_gates(["p99_ms<=80", "p99_ms<=90"])


def _m(p99: float | None, errors: int = 0, frames: int = 100, fps: float = 10.0) -> Metrics:
    return Metrics(frames, errors, fps, None if p99 is None else p99 / 2, p99, p99, 3)


def test_judge_names_the_worst_node_and_the_baseline() -> None:
    gates = parse_gates(["p99_ms<=80", "error_rate<=0.01", "fps>=0.9x", "p99_ms<=1.5x"])
    nodes = {"a": _m(50), "b": _m(90)}
    v = judge(gates, nodes, _m(70), {"fps": 10.0, "p99_ms": 60})
    assert (v.ok, v.metric, v.node, v.value, v.limit) == (False, "p99_ms", "b", 90, 80)
    v = judge(gates, {"a": _m(50, errors=5)}, _m(50), {"fps": 10.0, "p99_ms": 60})
    assert (v.ok, v.metric, v.value) == (False, "error_rate", 0.05)
    v = judge(gates, {"a": _m(50)}, _m(50, fps=8.0), {"fps": 10.0, "p99_ms": 60})
    assert (v.ok, v.metric, v.value, v.limit, v.baseline) == (False, "fps", 8.0, 9.0, 10.0)
    v = judge(gates, {"a": _m(50)}, _m(95), {"fps": 10.0, "p99_ms": 60})
    assert (v.ok, v.metric, v.limit) == (False, "p99_ms", 90.0)
    assert judge(gates, {"a": _m(50)}, _m(50), {"fps": 10.0, "p99_ms": 60}).ok is True
    # undecidable: no baseline, or no frames
    assert judge(gates, {"a": _m(50)}, _m(50), {"fps": None, "p99_ms": 60}).ok is None
    assert judge(gates, {"a": _m(None, frames=0)}, _m(50), {"fps": 10, "p99_ms": 60}).ok is None


def test_spec_validation_and_plans() -> None:
    spec = parse_spec({"model": "det", "version": "2.0", "selector": "site = a"})
    assert spec.selector == "site=a" and spec.canary == 1 and spec.waves == [25, 50, 100]
    nodes = [f"n{i}" for i in range(10)]
    assert [len(w) for w in plan_waves(spec, nodes)] == [1, 2, 2, 5]
    pct = RolloutSpec(model="det", version="2", canary_percent=10, waves=[100])
    assert [len(w) for w in plan_waves(pct, nodes)] == [1, 9]
    small = RolloutSpec(model="det", version="2", canary=1, waves=[25, 50, 100])
    assert plan_waves(small, ["a", "b", "c"]) == [["a"], ["b"], ["c"]]  # empty waves dropped
    none = RolloutSpec(model="det", version="2", canary=0, waves=[100])
    assert plan_waves(none, ["a", "b"]) == [["a", "b"]]
    for body, message in (({"model": "Det", "version": "1"}, "model: .*lowercase letters"),
                          ({"model": "det", "version": "../1"}, "version"),
                          ({"model": "det", "version": "1", "waves": []}, "at least one"),
                          ({"model": "det", "version": "1", "waves": [0, 100]}, r"\(0, 100\]"),
                          ({"model": "det", "version": "1", "deadline_s": 0}, "deadline_s"),
                          ({"model": "det", "version": "1", "canary": -1}, "canary"),
                          ({"model": "det"}, "version: Field required"),
                          ([], "JSON object")):
        with pytest.raises(Exception, match=message) as info:
            parse_spec(body)
        assert getattr(info.value, "exit_code", None) == 2
