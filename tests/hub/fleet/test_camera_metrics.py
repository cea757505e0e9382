"""Per-camera series on /metrics: connected, fps, drops, and tracking figures only where a camera
tracks; camera names come from agents, so only valid ones become labels, a bounded number."""

from __future__ import annotations

from edge_agent.contract.telemetry import CameraTelemetry
from hub.server.metrics import MAX_CAMERAS_PER_NODE, CameraFamilies


def _samples(fams: CameraFamilies) -> dict[str, dict[tuple[str, str], float]]:
    return {name: {(s.labels["node"], s.labels["camera"]): s.value for s in f.samples}
            for name, f in fams.families.items()}


def test_each_camera_its_figures_and_tracking_only_where_it_tracks() -> None:
    fams = CameraFamilies()
    fams.add("n1", [CameraTelemetry(camera="dock", connected=True, fps=14.5, drops=2,
                                    active_tracks=3, events_per_s=0.4),
                    CameraTelemetry(camera="gate", connected=False)])
    got = _samples(fams)
    assert got["connected"] == {("n1", "dock"): 1.0, ("n1", "gate"): 0.0}
    assert got["fps"] == {("n1", "dock"): 14.5, ("n1", "gate"): 0.0}
    assert got["drops"] == {("n1", "dock"): 2.0, ("n1", "gate"): 0.0}
    assert got["active_tracks"] == {("n1", "dock"): 3.0}
    assert got["events_per_second"] == {("n1", "dock"): 0.4}
    assert {f.name for f in fams.families.values()} == {
        "edge_hub_camera_connected", "edge_hub_camera_fps", "edge_hub_camera_drops",
        "edge_hub_camera_active_tracks", "edge_hub_camera_events_per_second"}


def test_names_an_agent_makes_up_are_bounded() -> None:
    # a node that lists thousands of cameras, invalid names and duplicates cannot grow the
    # hub's series beyond the cap
    fams = CameraFamilies()
    junk = [CameraTelemetry(camera=name, connected=True) for name in
            ("Bad Name", "x" * 300, "../etc", "", "dock")]
    many = [CameraTelemetry(camera=f"cam-{i}", connected=True) for i in range(5000)]
    fams.add("n1", [*junk, CameraTelemetry(camera="dock", connected=False), *many])
    got = _samples(fams)["connected"]
    assert len(got) == MAX_CAMERAS_PER_NODE
    assert got[("n1", "dock")] == 1.0  # the first of a duplicated name counts
    assert all(cam == "dock" or cam.startswith("cam-") for _, cam in got)
