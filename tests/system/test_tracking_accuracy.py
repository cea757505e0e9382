"""Tracking accuracy against ground truth: the scripted faces clip (models/clips.py) through the
real agent (CenterFace, the tracker, events through the outbox to a real Mosquitto), scored
with ``tests.support.ground_truth``.

- Every object gets one track: id switches and fragmentations counted against the script
  (at most one of each per object; the figures are printed).
- Zone enter/leave within 3 frames of the script; line crossings with the right direction
  and count.
- A hot swap of the model mid-clip (CenterFace, the faithful re-export: another version)
  keeps the track ids: objects on screen at the swap keep one track across both versions.

The scoring itself is checked first on synthetic tracks built from the script (fast tests):
perfect tracks score zero, a swap at the crossing is two id switches, a track that ends and
is replaced is a fragmentation, a track on nothing is a false track, a zone visit late by four
frames is an error of four, a wrong direction fails.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from edge_agent.contract import events as wire
from hub.client.events import Event, EventSubscriber
from hub.client.results import Received, ResultSubscriber
from tests.support.agent_process import AgentProcess, _plain, agent_config
from tests.support.broker import CONSUMER, Broker
from tests.support.ground_truth import (
    FrameClock,
    Obs,
    Truth,
    check_lines,
    check_zones,
    score_tracks,
)
from tests.support.waiting import wait_until

NODE = "node-gt"
CAMERA = "street"
SWAP_AT = 60  # frames processed before the config names the other model version


@pytest.fixture(scope="module")
def truth(models_dir: Path) -> Truth:
    return Truth.load(models_dir / "samples" / "faces-street.json")


# ------------------------------------------------------------------- the scoring, synthetic


def perfect(truth: Truth, every: int = 1) -> list[Obs]:
    """Observations of a perfect tracker: object k is track 100 + k on every ``every`` frame."""
    return [Obs(f, 100 + k, box) for k, boxes in enumerate(truth.boxes.values())
            for f, box in boxes.items() if f % every == 0]


def test_perfect_tracks_score_zero(truth: Truth) -> None:
    s = score_tracks(truth, perfect(truth, every=5))
    assert (s.id_switches, s.fragmentations, s.false_tracks, s.unmatched) == (0, 0, [], 0)
    assert [o.tracks for o in s.objects.values()] == [[100], [101], [102]]


def test_a_swap_at_the_crossing_is_an_id_switch_for_each_object(truth: Truth) -> None:
    # astronaut and caller swap ids after frame 100
    obs = [Obs(ob.frame, 203 - ob.track, ob.box) if ob.frame > 100 and ob.track in (101, 102)
           else ob for ob in perfect(truth)]
    s = score_tracks(truth, obs)
    assert s.objects["astronaut"].id_switches == 1 and s.objects["caller"].id_switches == 1
    assert s.objects["visitor"].id_switches == 0 and s.fragmentations == 0


def test_a_track_replaced_after_a_loss_is_a_fragmentation(truth: Truth) -> None:
    obs = [ob for ob in perfect(truth) if not (ob.track == 100 and 100 <= ob.frame < 110)]
    obs = [Obs(ob.frame, 999, ob.box) if ob.track == 100 and ob.frame >= 110 else ob
           for ob in obs]
    obs.append(Obs(50, 555, (0.0, 0.0, 0.05, 0.05)))  # a box on nothing
    s = score_tracks(truth, obs)
    assert s.objects["visitor"].fragmentations == 1 and s.objects["visitor"].id_switches == 0
    assert s.objects["visitor"].tracks == [100, 999]
    assert s.false_tracks == [555] and s.unmatched == 1


def test_zone_and_line_checks_measure_frames_and_directions(truth: Truth) -> None:
    clock = FrameClock([1000.0 + f / 25 for f in range(truth.frames)])
    ts = clock.ts
    visits: dict[int, list[dict[str, Any]]] = {}
    crossings: dict[int, list[dict[str, Any]]] = {}
    tracks = {}
    for k, name in enumerate(truth.boxes):
        tracks[name] = [100 + k]
        visits[100 + k] = [{"zone": z, "entered": ts[e], "left": None if lv is None else ts[lv]}
                           for z, vs in truth.zones[name].items() for e, lv in vs]
        crossings[100 + k] = [{"line": n, "ts": ts[f], "direction": d}
                              for n, cs in truth.lines[name].items() for f, d in cs]
    assert check_zones(truth, tracks, visits, clock).max_error == 0
    assert all(r["ok"] for r in check_lines(truth, tracks, crossings, clock))
    v = visits[101][0]
    v["entered"] = ts[clock.frame(v["entered"]) + 4]
    assert check_zones(truth, tracks, visits, clock).max_error == 4
    visits[101][0]["left"] = None
    assert check_zones(truth, tracks, visits, clock).max_error == 10**6
    crossings[102][0]["direction"] = "left_to_right"  # the caller walks right to left
    assert [r["ok"] for r in check_lines(truth, tracks, crossings, clock)] == [True, True, False]
    with pytest.raises(ValueError, match="increase"):
        FrameClock([1.0, 1.0])


# ------------------------------------------------------------------ the real pipeline


def _camera(truth: Truth, models_dir: Path) -> dict[str, Any]:
    raw = truth.raw
    return {
        "name": CAMERA, "url": str(models_dir / "samples" / raw["clip"]), "model": "centerface",
        # every frame, in order (no drops): result k is frame k
        "rate": "max", "publish": "both",
        "zones": [{"name": z, "polygon": poly} for z, poly in raw["zones"].items()],
        "lines": [{"name": n, "a": seg[0], "b": seg[1]} for n, seg in raw["lines"].items()],
    }


def _swap(agent: AgentProcess, models_dir: Path) -> None:
    """Name the re-exported CenterFace (version 1.0.0-reexport) in the config; SIGHUP."""
    cfg = dict(agent.config)
    cfg["models"] = [{"name": "centerface",
                      "manifest": str(models_dir / "centerface-reexport" / "manifest.json")}]
    agent.path.write_text(yaml.safe_dump(_plain(cfg)))
    assert agent.proc is not None
    os.kill(agent.proc.pid, signal.SIGHUP)


def run_clip(tmp: Path, models_dir: Path, broker: Broker, prefix: str,
             truth: Truth) -> tuple[list[Received], list[Event]]:
    """The clip through a real agent, a hot swap at frame ``SWAP_AT``: results and events."""
    cfg = agent_config(
        tmp, models_dir, models=("centerface",), node=NODE, cameras=[_camera(truth, models_dir)],
        pipeline={"sink": "mqtt", "workers": 1, "max_batch": 1},
        outbox={"path": str(tmp / "outbox.sqlite3")},
        # an update on every frame (no throttle): each event is a (frame, track, box) sample
        tracking={"update_interval_s": 0.001, "min_update_s": 0.0},
        model_sync={"reload_poll_s": 0},
        mqtt={**broker.settings(NODE), "topic_prefix": prefix})
    results: list[Received] = []
    events: list[Event] = []
    kw = {**broker.settings(CONSUMER), "topic_prefix": prefix, "node": NODE}
    with ResultSubscriber(**kw) as rsub, EventSubscriber(**kw) as esub:
        agent = AgentProcess(tmp, cfg).start("/readyz", timeout=120)
        swapped = False
        try:
            def clip_done() -> bool:
                nonlocal swapped
                while (r := rsub.get(timeout=0.05)) is not None:
                    results.append(r)
                if not swapped and len(results) >= SWAP_AT:
                    _swap(agent, models_dir)
                    swapped = True
                return len(results) >= truth.frames

            wait_until(clip_done, 240, f"{truth.frames} results")
        finally:
            code = agent.stop()  # a clean stop ends the open tracks (reason stopped)
        assert code == 0, agent.log_text()[-3000:]

        def all_ended() -> bool:
            while (e := esub.get(timeout=0.05)) is not None:
                assert isinstance(e, Event)
                events.append(e)
            new = {e.message.track for e in events if e.message.type == "new"}
            return bool(new) and new <= {e.message.track for e in events
                                         if e.message.type == "end"}

        try:
            wait_until(all_ended, 30, "an end event for every track")
        except AssertionError as exc:
            kinds = Counter(f"{e.message.type}:{e.message.reason}" for e in events)
            raise AssertionError(f"{exc}; events {dict(kinds)}; agent log:\n"
                                 f"{agent.log_text()[-3000:]}") from None
    assert rsub.stats.gaps == 0 and esub.stats.gaps == 0
    return results, events


@pytest.mark.slow
def test_the_scripted_clip_through_the_real_agent(
    broker: Broker, topic_prefix: str, tmp_path: Path, models_dir: Path, truth: Truth
) -> None:
    results, events = run_clip(tmp_path, models_dir, broker, topic_prefix, truth)
    results.sort(key=lambda r: r.message.seq)
    assert len(results) == truth.frames, "one result per frame (rate max)"
    clock = FrameClock([r.message.ts for r in results])
    versions = [r.message.model.version for r in results]
    swap = versions.index("1.0.0-reexport") if "1.0.0-reexport" in versions else None
    assert swap is not None and 0 < swap < truth.frames - 20, f"no swap mid-clip: {swap}"
    assert set(versions[swap:]) == {"1.0.0-reexport"}

    msgs = [e.message for e in events]
    obs = [Obs(clock.frame(m.last_seen), m.track, m.box) for m in msgs]
    obs += [Obs(clock.frame(m.best.ts), m.track, m.best.box) for m in msgs]
    score = score_tracks(truth, obs)
    last: dict[int, wire.EventMessage] = {}
    for m in msgs:
        last[m.track] = m if m.track not in last or m.seq > last[m.track].seq else last[m.track]
    tracks = {name: o.tracks for name, o in score.objects.items()}
    zones = check_zones(truth, tracks, {t: [v.model_dump() for v in m.zones]
                                        for t, m in last.items()}, clock)
    lines = check_lines(truth, tracks, {t: [c.model_dump() for c in m.crossings]
                                        for t, m in last.items()}, clock)
    report = {name: (o.tracks, o.id_switches, o.fragmentations) for name, o in
              score.objects.items()}
    print(f"tracking: {report} false={score.false_tracks} unmatched={score.unmatched} "
          f"swap_frame={swap}")
    print("zones:", [(r["object"], r["want"], r["got"], r["error"]) for r in zones.rows])
    print("lines:", [(r["object"], r["want"], r["got"]) for r in lines])
    for name, o in score.objects.items():
        assert o.tracks, f"{name} was never tracked"
        assert o.id_switches <= 1 and o.fragmentations <= 1, (name, report)
    assert not score.false_tracks, score.false_tracks
    assert zones.max_error <= 3, zones.rows
    assert all(r["ok"] for r in lines), lines
    # the hot swap kept the ids: objects on screen at the swap have one track, whose events
    # name both versions
    for name, boxes in truth.boxes.items():
        if min(boxes) < swap - 5 and max(boxes) > swap + 5:
            (track,) = score.objects[name].tracks
            seen = {m.model.version for m in msgs if m.track == track and m.model}
            assert seen == {"1.0.0", "1.0.0-reexport"}, (name, track, seen)
