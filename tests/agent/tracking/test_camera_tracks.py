"""One camera's tracks with the real tracker: event rules, a hot swap, the outbox's stream state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edge_agent.config import OutboxSettings
from edge_agent.config.tracking import LineSettings, TrackingSettings, ZoneSettings
from edge_agent.contract import events as wire
from edge_agent.outbox.facade import Outbox
from edge_agent.tracking import camera as cams
from edge_agent.tracking import scene as geo

ZONE = ZoneSettings(name="right", polygon=[(0.5, 0.0), (1.0, 0.0), (1.0, 1.0), (0.5, 1.0)])
LINE = LineSettings(name="mid", a=(0.5, 1.0), b=(0.5, 0.0))


def _result(i: int, xs: list[float], version: str = "1") -> dict[str, Any]:
    return {"v": 1, "node": "n", "camera": "c", "ts": 100.0 + i / 10,
            "model": {"name": "m", "version": version}, "task": "yolo",
            "frame": {"width": 640, "height": 480},
            "detections": [{"cls": 0, "label": "person", "score": 0.9,
                            "box": [x, 0.4, x + 0.1, 0.6]} for x in xs]}


def _run(tracks: cams.CameraTracks, frames: range, swap_at: int = 10**9) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i in frames:
        version = "2" if i >= swap_at else "1"
        out += tracks.observe(_result(i, [0.1 + 0.01 * i, 0.8 - 0.005 * i], version)).events
    return out


def test_new_updates_end_and_a_hot_swap_keeps_ids() -> None:
    s = TrackingSettings(update_interval_s=100.0, min_update_s=0.0)
    tracks = cams.CameraTracks("n", "c", s, geo.Scene.from_settings([ZONE], [LINE]), next_id=50)
    evs = _run(tracks, range(60), swap_at=30)
    evs += tracks.observe({**_result(200, []), "ts": 120.0}).events  # both lost by then
    kinds = [(e["track"], e["type"], e.get("reason")) for e in evs]
    assert sorted({t for t, _, _ in kinds}) == [50, 51], kinds  # one id per object, swap or not
    for tid in (50, 51):
        mine = [(k, r) for t, k, r in kinds if t == tid]
        assert mine[0] == ("new", None) and mine[-1] == ("end", "lost"), mine
    mover = next(e for e in evs if e["track"] == 50 and e["type"] == "end")
    # a -> b points up the image: its right-hand side is the right of the frame
    assert [c["direction"] for c in mover["crossings"]] == ["left_to_right"]
    assert [v["zone"] for v in mover["zones"]] == ["right"] and mover["zones"][0]["left"]
    assert mover["model"] == {"name": "m", "version": "2"}
    for e in evs:
        assert wire.EventMessage.model_validate({**e, "seq": 0}).track in (50, 51)


def test_restart_closes_what_the_outbox_kept(tmp_path: Path) -> None:
    settings = OutboxSettings(path=tmp_path / "o.sqlite3", commit_interval_ms=0)
    tracks = cams.CameraTracks("n", "c", TrackingSettings(), geo.Scene(), next_id=7)
    evs = _run(tracks, range(10))
    assert [e["type"] for e in evs] == ["new", "new"]
    box = Outbox(settings, topic_prefix="p").open()
    for e in evs:
        box.publish_to(wire.events_stream("c"), wire.events_topic("p", "n", "c"), e,
                       state=tracks.state())
    assert box.flush()
    box.close()
    box = Outbox(settings, topic_prefix="p").open()
    try:
        nxt, open_tracks = cams.load_state(box.stream_states()[wire.events_stream("c")])
    finally:
        box.close()
    assert nxt == 9 and sorted(t["track"] for t in open_tracks) == [7, 8]
    ends = cams.restart_ends("n", "c", open_tracks, 500.0)
    assert {(e["type"], e["reason"]) for e in ends} == {("end", "restart")}
