"""Zones and lines geometry, a track's way through a scene, and bad zone settings."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from edge_agent.common import geometry
from edge_agent.config import AgentSettings
from edge_agent.config.tracking import LineSettings, ZoneSettings
from edge_agent.tracking import scene as geo

SQUARE = [(0.2, 0.2), (0.6, 0.2), (0.6, 0.6), (0.2, 0.6)]


def test_polygon_problems() -> None:
    assert geometry.polygon_problem(SQUARE) is None
    bow_tie = [(0.0, 0.0), (1.0, 1.0), (1.0, 0.0), (0.0, 1.0)]
    assert "intersects itself" in str(geometry.polygon_problem(bow_tie))
    assert "repeated" in str(geometry.polygon_problem([(0, 0), (1, 0), (0, 0)]))
    assert "no area" in str(geometry.polygon_problem([(0, 0), (0.5, 0.5), (1, 1)]))


def test_contains_and_crossing_direction() -> None:
    assert geometry.contains(SQUARE, (0.4, 0.4))
    assert not geometry.contains(SQUARE, (0.7, 0.4))
    a, b = (0.0, 0.5), (1.0, 0.5)  # drawn left to right: its right-hand side is below (y down)
    assert geometry.crossing(a, b, (0.5, 0.4), (0.5, 0.6)) == 1
    assert geometry.crossing(a, b, (0.5, 0.6), (0.5, 0.4)) == -1
    assert geometry.crossing(a, b, (0.5, 0.4), (0.5, 0.45)) == 0
    # past the segment's end: no crossing
    assert geometry.crossing((0.0, 0.5), (0.3, 0.5), (0.5, 0.4), (0.5, 0.6)) == 0


def test_a_path_enters_after_its_dwell_and_crosses_a_line() -> None:
    scene = geo.Scene.from_settings(
        [ZoneSettings(name="dock", polygon=SQUARE, min_dwell_s=0.5)],
        [LineSettings(name="gate", a=(0.1, 0.0), b=(0.1, 1.0))])
    path = geo.Path("person")
    entered, left, crossed = [], [], []
    for i in range(40):  # x from 0.05 to 0.83, 0.02 per 0.1 s
        moved = path.move(scene, (0.05 + 0.02 * i, 0.4), 0.1 * i)
        entered += [(n, i) for n in moved.entered]
        left += [(n, i) for n in moved.left]
        crossed += [(n, d, i) for n, d in moved.crossed]
    # inside from x > 0.2 (i = 8) to x > 0.6 (i = 28); dwell 0.5 s = 5 frames
    assert entered == [("dock", 13)] and left == [("dock", 28)]
    visit = path.visits[0]
    assert visit["entered"] == pytest.approx(0.8) and visit["left"] == pytest.approx(2.8)
    # a -> b points down the image: its right-hand side is the left of the frame
    assert crossed == [("gate", "right_to_left", 3)]


def test_labels_filter_zones() -> None:
    scene = geo.Scene.from_settings([ZoneSettings(name="z", polygon=SQUARE, labels=["car"])], [])
    path = geo.Path("person")
    assert not path.move(scene, (0.4, 0.4), 0.0)
    assert path.in_zones() == []


def _cam(**extra: object) -> dict[str, object]:
    return {"name": "cam0", "url": "test://pattern", "model": "m", **extra}


@pytest.mark.parametrize(("extra", "loc", "text"), [
    ({"zones": [{"name": "z", "polygon": [[0, 0], [1, 1], [1, 0], [0, 1]]}]},
     ("cameras", 0, "zones", 0, "polygon"), "intersects itself"),
    ({"zones": [{"name": "z", "polygon": [[0, 0], [1.5, 0], [1, 1]]}]},
     ("cameras", 0, "zones", 0, "polygon", 1, 0), "less than or equal to 1"),
    ({"lines": [{"name": "l", "a": [-0.1, 0], "b": [1, 1]}]},
     ("cameras", 0, "lines", 0, "a", 0), "greater than or equal to 0"),
    ({"zones": [{"name": "z", "polygon": SQUARE}, {"name": "z", "polygon": SQUARE}]},
     ("cameras", 0, "zones"), "two zones are named 'z'"),
    ({"publish": "everything"}, ("cameras", 0, "publish"), "'frames', 'events' or 'both'"),
])
def test_bad_zone_settings_name_the_field(extra: dict[str, object], loc: tuple[object, ...],
                                          text: str) -> None:
    with pytest.raises(ValidationError) as info:
        AgentSettings(cameras=[_cam(**extra)])
    errs = info.value.errors()
    assert [e["loc"] for e in errs] == [loc], errs
    assert text in errs[0]["msg"]
