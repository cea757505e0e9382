"""The telemetry sketch: quantiles within the stated relative error, exact merges, bounded wire."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from edge_agent.contract.sketch import MAX_BINS, Sketch, SketchWire


def exact(values: np.ndarray, q: float) -> float:
    """The rank convention of ``Sketch.quantile``: rank floor(q * (n - 1))."""
    return float(np.sort(values)[math.floor(q * (len(values) - 1))])


@pytest.mark.parametrize("dist", ["lognormal", "uniform", "bimodal"])
def test_quantiles_within_relative_error(dist: str) -> None:
    rng = np.random.default_rng(7)
    if dist == "lognormal":
        x = rng.lognormal(2.0, 0.8, 20_000)
    elif dist == "uniform":
        x = rng.uniform(0.5, 400.0, 20_000)
    else:
        x = np.concatenate([rng.normal(5, 0.5, 19_000).clip(0.1), rng.normal(900, 50, 1_000)])
    s = Sketch(0.01)
    s.extend(x.tolist())
    for q in (0.0, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0):
        got = s.quantile(q)
        assert got is not None
        assert abs(got - exact(x, q)) <= 0.01 * exact(x, q) + 1e-12, (q, got, exact(x, q))


def test_merge_equals_sketch_of_union_exactly() -> None:
    rng = np.random.default_rng(3)
    parts = [rng.lognormal(1 + i / 3, 0.5, 1_000 + 500 * i) for i in range(5)]
    merged = Sketch()
    for p in parts:
        one = Sketch()
        one.extend(p.tolist())
        merged.merge(Sketch.from_wire(one.to_wire()))  # through the wire, as the hub does
    union = Sketch()
    union.extend(np.concatenate(parts).tolist())
    assert merged.to_wire() == union.to_wire()
    assert merged.count == sum(len(p) for p in parts)


def test_zeros_and_empty() -> None:
    s = Sketch()
    assert s.quantile(0.5) is None and s.mean() is None
    s.add(0.0, 3)
    s.add(10.0)
    assert s.quantile(0.5) == 0.0 and s.count == 4 and s.zeros == 3
    assert s.quantile(1.0) == pytest.approx(10.0, rel=0.01)


def test_merge_refuses_other_accuracy() -> None:
    with pytest.raises(ValueError, match="accuracy"):
        Sketch(0.01).merge(Sketch(0.02))


def test_wide_sketch_collapses_low_buckets_and_keeps_the_tail() -> None:
    s = Sketch(0.01)
    for e in range(-5, 30):
        s.add(10.0**e, 10)
    w = s.to_wire()
    assert len(w.c) <= MAX_BINS
    back = Sketch.from_wire(w)
    assert back.count == s.count
    assert back.quantile(1.0) == pytest.approx(1e29, rel=0.01)
    assert back.quantile(0.0) > 1e-5  # the lowest buckets were collapsed upwards


def test_wire_is_bounded_and_refuses_negative_counts() -> None:
    with pytest.raises(ValidationError):
        SketchWire(c=[1] * (MAX_BINS + 1))
    with pytest.raises(ValueError, match="negative"):
        Sketch.from_wire(SketchWire(o=0, c=[1, -1]))
