"""Merged fleet percentiles: known latency distributions spread over simulated nodes and
telemetry windows go through the hub's real ingest (``Fleet.on_telemetry``), and the hub's
p50/p95/p99 of the wave are compared with the exact percentiles of the union of the raw
samples, within the sketch's stated 1 % relative error. One node carries the whole tail in one
window: the old frame-weighted mean of per-window p99s misses it, the merged sketch does not.
Also: agents without sketches (fallback), a mix, output statistics, and the per-series cache
(incremental merges equal a merge from scratch)."""

from __future__ import annotations

import math
import random
import time

import numpy as np
import pytest

from edge_agent.contract.protocol import LatencySummary, ModelTelemetry, TelemetryMessage
from edge_agent.contract.sketch import DEFAULT_ACCURACY, Sketch
from edge_agent.contract.telemetry import OutputStats
from hub.commands.nodes import version_rows
from hub.config import TelemetrySettings
from hub.fleet import series as windows
from hub.fleet.aggregate import Metrics, Sample, aggregate, combine, total_variation
from hub.fleet.sketches import Dist, merge
from hub.fleet.view import Fleet
from hub.server.metrics import version_families
from tests.support.rollout_env import ManualClock

QS = (0.5, 0.95, 0.99)


def exact_quantile(values: list[float], q: float) -> float:
    """The sketch's rank convention on raw values: sorted[floor(q * (n - 1))]."""
    ordered = sorted(values)
    return ordered[math.floor(q * (len(ordered) - 1))]


def window_percentile(values: list[float], q: float) -> float:
    """What an agent before the sketch put in ``latency_ms`` for one window."""
    return float(np.percentile(values, q * 100))


def telemetry(node: str, values: list[float], *, sketch: bool = True,
              outputs: OutputStats | None = None, version: str = "2.0") -> TelemetryMessage:
    s = Sketch()
    s.extend(values)
    return TelemetryMessage(node=node, ts=time.time(), interval_s=10.0, models=[ModelTelemetry(
        name="det", version=version, frames=len(values), errors=0,
        latency_ms=LatencySummary(p50=window_percentile(values, 0.5),
                                  p95=window_percentile(values, 0.95),
                                  p99=window_percentile(values, 0.99)),
        latency=s.to_wire() if sketch else None, outputs=outputs)])


def fleet_with_tail(rng: random.Random, *, legacy: frozenset[str] = frozenset()
                    ) -> tuple[Fleet, list[str], list[float], list[list[float]]]:
    """8 nodes x 6 windows of 200 frames (lognormal body around 20 ms, one node 30 ms);
    node n7's last window is 192 frames at 400-600 ms: 2 % of all frames, the whole tail."""
    clock = ManualClock(10_000.0)
    fleet = Fleet(TelemetrySettings(window_s=300, offline_after_s=60), clock)
    nodes = [f"n{i}" for i in range(8)]
    union: list[float] = []
    windows_raw: list[list[float]] = []
    for w in range(6):
        for node in nodes:
            mu = math.log(30.0 if node == "n3" else 20.0)
            values = [rng.lognormvariate(mu, 0.25) for _ in range(200)]
            if node == "n7" and w == 5:
                values = [rng.uniform(400, 600) for _ in range(192)] + values[:8]
            union.extend(values)
            windows_raw.append(values)
            fleet.on_telemetry(node, telemetry(node, values, sketch=node not in legacy))
        clock.advance(10)
    return fleet, nodes, union, windows_raw


def test_merged_percentiles_match_the_union_within_the_stated_error() -> None:
    fleet, nodes, union, raw = fleet_with_tail(random.Random(13))
    per_node = [fleet.metrics(n, "det", "2.0") for n in nodes]
    group = combine(per_node)
    assert group.exact and group.frames == len(union) == 9600
    hub = (group.p50_ms, group.p95_ms, group.p99_ms)
    for q, got in zip(QS, hub, strict=True):
        want = exact_quantile(union, q)
        assert got is not None
        assert abs(got - want) <= DEFAULT_ACCURACY * want + 1e-9, (q, got, want)
    assert group.p99_ms is not None and group.p99_ms > 390  # the tail is the fleet's p99
    # the old figure: the frame-weighted mean of every window's p99 misses the tail by 10x
    mean_p99 = sum(window_percentile(v, 0.99) * len(v) for v in raw) / len(union)
    assert mean_p99 < 0.2 * exact_quantile(union, 0.99)
    # and so does combining per-node figures percentile by percentile
    legacy = combine(Metrics(m.frames, m.errors, m.fps, m.p50_ms, m.p95_ms, m.p99_ms, m.samples)
                     for m in per_node)
    assert not legacy.exact
    assert legacy.p99_ms is not None and legacy.p99_ms < 0.5 * exact_quantile(union, 0.99)
    # one node's own figures are exact too (its windows merged)
    n7 = fleet.metrics("n7", "det", "2.0")
    n7_raw = [x for i, v in enumerate(raw) if i % 8 == 7 for x in v]
    assert n7.p99_ms is not None
    assert abs(n7.p99_ms - exact_quantile(n7_raw, 0.99)) <= 0.01 * exact_quantile(n7_raw, 0.99)


def test_agents_without_sketches_fall_back_and_a_mix_is_marked_inexact() -> None:
    rng = random.Random(7)
    fleet, nodes, union, raw = fleet_with_tail(rng, legacy=frozenset({f"n{i}" for i in range(8)}))
    group = combine(fleet.metrics(n, "det", "2.0") for n in nodes)
    mean_p99 = sum(window_percentile(v, 0.99) * len(v) for v in raw) / len(union)
    assert not group.exact
    assert group.p99_ms == pytest.approx(mean_p99)  # exactly the old figure, still judged
    # a mix: n7 (the tail) sends sketches, the rest do not
    fleet, nodes, union, raw = fleet_with_tail(
        random.Random(7), legacy=frozenset(f"n{i}" for i in range(7)))
    mixed = combine(fleet.metrics(n, "det", "2.0") for n in nodes)
    n7 = [x for i, v in enumerate(raw) if i % 8 == 7 for x in v]
    others = [v for i, v in enumerate(raw) if i % 8 != 7]
    sketched_p99 = exact_quantile(n7, 0.99)
    legacy_sum = sum(window_percentile(v, 0.99) * len(v) for v in others)
    want = (sketched_p99 * len(n7) + legacy_sum) / len(union)
    assert not mixed.exact
    assert mixed.p99_ms == pytest.approx(want, rel=DEFAULT_ACCURACY)


def test_output_statistics_merge_across_nodes_and_windows() -> None:
    clock = ManualClock(1000.0)
    fleet = Fleet(TelemetrySettings(window_s=300, offline_after_s=60), clock)
    scores: list[float] = []
    rng = random.Random(3)
    for _ in range(4):
        for node, dets in (("a", 2), ("b", 4)):
            s = [rng.uniform(0.3, 0.95) for _ in range(10 * dets)]
            scores.extend(s)
            sk = Sketch()
            sk.extend(s)
            out = OutputStats(frames=10, detections=10 * dets, scores=sk.to_wire(),
                              classes={"person": 6 * dets, "car": 4 * dets})
            fleet.on_telemetry(node, telemetry(node, [20.0] * 10, outputs=out))
        clock.advance(10)
    g = combine([fleet.metrics("a", "det"), fleet.metrics("b", "det")])
    assert g.detections_per_frame == pytest.approx(3.0)  # (80 + 160) / 80 frames
    want = exact_quantile(scores, 0.5)
    assert g.score_p50 is not None and abs(g.score_p50 - want) <= 0.01 * want
    assert dict(g.classes) == {"person": 6 * 24, "car": 4 * 24}
    assert g.as_dict()["classes"] == {"person": 144, "car": 96}
    # v1 telemetry has no output statistics: nothing to judge them by, not zero
    fleet.on_telemetry("c", telemetry("c", [20.0] * 10))
    assert fleet.metrics("c", "det").detections_per_frame is None
    assert fleet.metrics("c", "det").score_p50 is None


def test_sketches_the_hub_cannot_merge_are_dropped_and_counted() -> None:
    fleet = Fleet(TelemetrySettings(window_s=300, offline_after_s=60), ManualClock(1000.0))
    msg = telemetry("a", [10.0, 12.0, 50.0])
    assert msg.models[0].latency is not None
    msg.models[0].latency.a = 0.02  # another accuracy: cannot merge with 1 % sketches
    msg.models[0].outputs = OutputStats(frames=3, detections=1, classes={"x": -4})
    fleet.on_telemetry("a", msg)
    m = fleet.metrics("a", "det")
    assert m.frames == 3 and not m.exact and m.p99_ms == pytest.approx(49.24)  # percentiles
    assert m.detections_per_frame is None
    assert fleet.rejected["latency_sketch"] == fleet.rejected["output_stats"] == 1


def test_incremental_series_merges_equal_merges_from_scratch() -> None:
    """The per-series cache (merges extended by new samples, dropped on eviction) gives the
    same figures as aggregating the chosen samples afresh, at every step."""
    rng = random.Random(5)
    series = windows.Series()
    kept: list[Sample] = []
    t = 0.0
    for step in range(120):
        values = [rng.lognormvariate(3, 0.5) for _ in range(rng.randint(0, 40))]
        sample = Sample(t, 10.0, len(values), 0, 1.0, 2.0, 3.0,
                        Dist.from_values(values) if values else None)
        horizon = t - 100
        series.append(sample, horizon)
        kept = [s for s in [*kept, sample] if s.t >= horizon]
        for since in (horizon, 50.0, 400.0, t - 30):
            start = max(horizon, since)
            want = aggregate(s for s in kept if s.t >= start)
            got = series.metrics(start)
            assert (got.frames, got.samples, got.p50_ms, got.p99_ms, got.exact) == (
                want.frames, want.samples, want.p50_ms, want.p99_ms, want.exact), step
        t += 10.0


def test_dist_matches_the_contract_sketch_and_merges_exactly() -> None:
    rng = random.Random(1)
    parts = [[rng.expovariate(0.05) for _ in range(rng.randint(1, 300))] for _ in range(20)]
    merged = merge([Dist.from_values(p) for p in parts])
    assert merged is not None
    ref = Sketch()
    for p in parts:
        ref.extend(p)
    for q in (0.0, 0.1, 0.5, 0.9, 0.99, 1.0):
        assert merged.quantile(q) == pytest.approx(ref.quantile(q))
    assert merged.to_wire().c == ref.to_wire().c


def test_total_variation_on_known_histograms() -> None:
    assert total_variation({"a": 50, "b": 50}, {"a": 80, "b": 20}) == pytest.approx(0.3)
    assert total_variation({"a": 1}, {"b": 7}) == pytest.approx(1.0)
    assert total_variation({"a": 3, "b": 1}, {"a": 30, "b": 10}) == pytest.approx(0.0)
    assert total_variation({"a": 1, "b": 1, "c": 2}, {"a": 2, "b": 1, "c": 1}) \
        == pytest.approx(0.25)
    assert total_variation({}, {"a": 1}) is None


def test_per_version_figures_for_the_api_the_cli_and_metrics() -> None:
    """``Fleet.versions`` merges every node's window per version (the API's ``versions``,
    ``edge-hub nodes --versions``); ``/metrics`` exports the same, labelled by model and
    version only."""
    fleet, nodes, union, _ = fleet_with_tail(random.Random(13))
    fleet.on_telemetry("old", telemetry("old", [5.0] * 50, version="1.0", sketch=False))
    per = fleet.versions([*nodes, "old", "unknown"])
    assert list(per) == [("det", "1.0"), ("det", "2.0")]
    count, merged = per[("det", "2.0")]
    assert count == 8 and merged.exact and merged.frames == len(union)
    want = exact_quantile(union, 0.99)
    assert merged.p99_ms is not None and abs(merged.p99_ms - want) <= 0.01 * want
    assert not per[("det", "1.0")][1].exact
    row = version_rows([{"model": "det", "version": "2.0", "nodes": count,
                          **merged.as_dict()}])[0]
    assert row[:2] == ["det@2.0", "8"] and not row[4].endswith("~")
    old = version_rows([{"model": "det", "version": "1.0", "nodes": 1,
                          **per[("det", "1.0")][1].as_dict()}])[0]
    assert old[4] == "5.0~"  # a mean of window percentiles is marked
    families = {f.name: f for f in version_families({k: [fleet.metrics(n, *k) for n in nodes]
                                              for k in [("det", "2.0")]})}
    p99 = [s for s in families["edge_hub_version_latency_ms"].samples
           if s.labels["quantile"] == "0.99"]
    assert len(p99) == 1 and p99[0].labels == {"model": "det", "version": "2.0",
                                               "quantile": "0.99"}
    assert abs(p99[0].value - want) <= 0.01 * want
    assert families["edge_hub_version_latency_exact"].samples[0].value == 1.0
    assert families["edge_hub_version_nodes"].samples[0].value == 8.0
