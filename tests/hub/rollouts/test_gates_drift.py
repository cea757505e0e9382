"""Output-drift gates (detections_per_frame, score_p50, class_shift) and the shadow phase's
agreement gate: parsing, refusals, judging against a baseline (live figures or the rollout's
stored snapshot, old snapshots without a histogram included), and v1 telemetry still judged on
latency while output gates wait."""

from __future__ import annotations

import orjson
import pytest

from hub.fleet.aggregate import Metrics
from hub.rollouts import machine
from hub.rollouts.gates import Gate, GateError, judge, parse_gate, parse_gates


def test_new_metrics_parse_in_their_allowed_directions() -> None:
    assert parse_gate("agreement>=0.9") == Gate("agreement", ">=", 0.9)
    assert parse_gate("detections_per_frame>=0.7x") == Gate("detections_per_frame", ">=", 0.7,
                                                            relative=True)
    assert parse_gate("detections_per_frame<=1.5x").op == "<="
    assert parse_gate("detections_per_frame<=40") == Gate("detections_per_frame", "<=", 40.0)
    assert parse_gate("score_p50>=0.8x") == Gate("score_p50", ">=", 0.8, relative=True)
    assert parse_gate("score_p50<0.99") == Gate("score_p50", "<=", 0.99)
    assert parse_gate("class_shift<=0.15") == Gate("class_shift", "<=", 0.15)
    # a band in both directions is two gates, not a duplicate
    band = parse_gates(["detections_per_frame>=0.7x", "detections_per_frame<=1.5x",
                        "detections_per_frame>=0.5"])
    assert [str(g) for g in band] == ["detections_per_frame>=0.7x", "detections_per_frame<=1.5x",
                                      "detections_per_frame>=0.5"]


@pytest.mark.parametrize(("text", "message"), [
    ("agreement>=0.9x", "absolute threshold only"),
    ("agreement<=0.9", "lower bound"),
    ("agreement>=1.2", r"fraction in \[0, 1\]"),
    ("class_shift>=0.1", "upper bound"),
    ("class_shift<=1.1x", "absolute threshold only"),
    ("class_shift<=1.5", "fraction"),
    ("score_p50>=1.5", "fraction"),
    ("detections_per_frame>=0x", "positive"),
    ("detections_per_frame==1", "a bound"),
])
def test_new_metrics_refuse_what_makes_no_sense(text: str, message: str) -> None:
    with pytest.raises(GateError, match=message):
        parse_gate(text)


def test_duplicates_of_metric_direction_and_kind_are_refused() -> None:
    with pytest.raises(GateError, match="more than one relative >= gate on score_p50"):
        parse_gates(["score_p50>=0.8x", "score_p50>=0.9x"])
    with pytest.raises(GateError, match="more than one absolute <= gate on class_shift"):
        parse_gates(["class_shift<=0.1", "class_shift<=0.2"])


def _m(p99: float | None = 40.0, *, dpf: float | None = 2.0, score: float | None = 0.7,
       classes: dict[str, int] | None = None) -> Metrics:
    return Metrics(100, 0, 10.0, None if p99 is None else p99 / 2, p99, p99, 3, True, dpf, score,
                   classes if classes is not None else {"person": 60, "car": 40})


BASE = {"p99_ms": 40.0, "fps": 10.0, "detections_per_frame": 2.0, "score_p50": 0.7,
        "classes": {"person": 600, "car": 400}}


def test_detections_per_frame_is_judged_in_both_directions() -> None:
    gates = parse_gates(["detections_per_frame>=0.7x", "detections_per_frame<=1.5x"])
    assert judge(gates, {"a": _m()}, _m(dpf=1.5), BASE).ok is True
    v = judge(gates, {"a": _m()}, _m(dpf=1.0), BASE)  # the model went quiet
    assert (v.ok, v.metric, v.value, v.limit, v.baseline) == (False, "detections_per_frame",
                                                              1.0, 1.4, 2.0)
    v = judge(gates, {"a": _m()}, _m(dpf=9.0), BASE)  # the model exploded into boxes
    assert (v.ok, v.gate, v.limit) == (False, "detections_per_frame<=1.5x", 3.0)
    # absolute gates: the worst node decides, in the gate's direction
    low = parse_gates(["detections_per_frame>=1"])
    v = judge(low, {"a": _m(dpf=3.0), "b": _m(dpf=0.2)}, _m(), BASE)
    assert (v.ok, v.node, v.value) == (False, "b", 0.2)


def test_score_p50_relative_and_absolute() -> None:
    gates = parse_gates(["score_p50>=0.8x", "score_p50<=0.99"])
    assert judge(gates, {"a": _m()}, _m(score=0.6), BASE).ok is True
    v = judge(gates, {"a": _m()}, _m(score=0.4), BASE)
    assert (v.ok, v.metric, v.limit) == (False, "score_p50", 0.56)
    v = judge(gates, {"a": _m(score=1.0)}, _m(), BASE)
    assert (v.ok, v.gate, v.node) == (False, "score_p50<=0.99", "a")


def test_class_shift_is_the_total_variation_distance_of_the_wave() -> None:
    gates = parse_gates(["class_shift<=0.15"])
    # 0.5 * (|0.5 - 0.6| + |0.5 - 0.4|) = 0.1
    assert judge(gates, {"a": _m()}, _m(classes={"person": 500, "car": 500}), BASE).ok is True
    # a shuffled class list: the same frames, other labels: 0.5 * (0.6 + 0.4 + 1.0) = 1.0
    v = judge(gates, {"a": _m()}, _m(classes={"dog": 600, "cat": 400}), BASE)
    assert (v.ok, v.metric, v.value, v.limit) == (False, "class_shift", 1.0, 0.15)
    assert "total variation" in v.message
    # no histogram on either side: undecidable, never passed
    assert judge(gates, {"a": _m()}, _m(classes={}), BASE).ok is None
    # too few answers on the wave's side: sampling noise alone would move the distance
    v = judge(gates, {"a": _m()}, _m(classes={"dog": 60, "cat": 40}), BASE)
    assert v.ok is None and "waits for 600 answers" in v.message, v
    old_row = {k: v for k, v in BASE.items() if k != "classes"}
    verdict = judge(gates, {"a": _m()}, _m(), old_row)
    assert verdict.ok is None and "histogram" in verdict.message


def test_agreement_is_left_to_the_shadow_phase() -> None:
    """A bake has no shadow telemetry: ``judge`` skips agreement gates (H4's shadow phase
    judges them); the other gates still decide."""
    gates = parse_gates(["agreement>=0.9", "p99_ms<=80"])
    assert judge(gates, {"a": _m()}, _m(), BASE).ok is True
    assert judge(gates, {"a": _m(p99=90)}, _m(), BASE).ok is False


def test_v1_telemetry_is_still_judged_on_latency_while_output_gates_wait() -> None:
    v1 = Metrics(100, 0, 10.0, 20.0, 30.0, 60.0, 3)  # no sketch, no output statistics
    gates = parse_gates(["p99_ms<=50", "detections_per_frame>=0.7x"])
    v = judge(gates, {"a": v1}, v1, BASE)
    assert (v.ok, v.metric, v.value) == (False, "p99_ms", 60.0)
    ok_latency = Metrics(100, 0, 10.0, 20.0, 30.0, 45.0, 3)
    v = judge(gates, {"a": ok_latency}, ok_latency, BASE)
    assert v.ok is None and v.metric == "detections_per_frame"


def test_baseline_snapshot_carries_the_histogram_through_json() -> None:
    snap = machine.snapshot(_m(classes={"person": 3, "car": 1}))
    assert snap["classes"] == {"person": 3, "car": 1}
    assert snap["detections_per_frame"] == 2.0 and snap["score_p50"] == 0.7
    back = orjson.loads(orjson.dumps(snap))  # as the rollouts table stores it
    gates = parse_gates(["class_shift<=0.15", "score_p50>=0.8x"])
    assert judge(gates, {"a": _m()}, _m(classes={"person": 300, "car": 100}), back).ok is None
    snap = machine.snapshot(_m(classes={"person": 600, "car": 200}))
    back = orjson.loads(orjson.dumps(snap))
    assert judge(gates, {"a": _m()}, _m(classes={"person": 600, "car": 200}), back).ok is True
    # a snapshot of a fleet without output statistics has no histogram key at all
    assert "classes" not in machine.snapshot(Metrics(100, 0, 10.0, 1.0, 2.0, 3.0, 3))
