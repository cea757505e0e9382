"""Events vs frames on the wire, and the tracker's cost per frame.

    .venv/bin/python bench/events.py [--quick]

1. **Traffic** on the scripted faces clip (``models/out/samples/faces-street.mp4``, 200 frames
   at 25 fps, three faces crossing a zone and a line; models/clips.py). CenterFace
   (``models/out/centerface``) runs on every frame; each frame's result, stamped with the
   clip's own time (frame k at k / 25 s), goes through the agent's real code:

   - ``frames`` (the baseline, same run): one result message per frame, serialized as the
     outbox sends it (``protocol.encode_dict`` plus the seq field);
   - ``events``: ``edge_agent.tracking.sink.TrackingSink`` with the camera's zone and line and
     the default tracking settings; each event as the outbox sends it, and each retained zone
     occupancy as the ``ZoneBoard`` hands it to the link (looked at every 0.2 s of clip
     time, as its task does; at most one per zone per ``zone_min_interval_s``, default 1 s);
     a clean stop at the end (``end`` for the open tracks).

   Messages and bytes (payload + topic) per second of video; ``events_over_frames_msgs`` is
   the ratio of the message rates (the issue's bar: at most 0.1).
2. **Tracker cost**: ``ObjectTracker.step`` (norfair behind our ids) on synthetic scenes of 5,
   20 and 100 objects moving across a 1920x1080 frame (5 % of detections missed, 1 px of box
   noise, a new object now and then), timed per frame in the thread's CPU time (wall time
   too: on a shared machine it includes time taken by others); p50 and p99 in ms, and the same for
   ``CameraTracks.observe`` (tracking plus a zone, a line and the event rules: what the event
   loop spends per result). Baselines in the same run: CenterFace's inference per frame from
   part 1, so ``track_over_infer_at_20`` says what tracking adds to a frame's work; and the
   same tracker on norfair as shipped (its own Kalman filter, objects and IoU distance instead
   of ``tracking.kalman`` and ``tracking.boxes``), stepped on the same frames interleaved with
   ours (``track_over_stock_norfair_at_20``). Rounds (3 quick, 5 full), each on fresh
   trackers and a scene of its own; the figures are the medians of the rounds' p50s, with
   their spread.

Writes ``bench/out/events.json``; the last line is
``events_over_frames_msgs=... track_ms_p50_at_20=...`` with the other figures after them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from edge_agent.config import CameraSettings, EngineSettings  # noqa: E402
from edge_agent.config.tracking import TrackingSettings  # noqa: E402
from edge_agent.contract import protocol, results  # noqa: E402
from edge_agent.inference.engine import LoadedModel  # noqa: E402
from edge_agent.tracking import camera as cams  # noqa: E402
from edge_agent.tracking import scene as geo  # noqa: E402
from edge_agent.tracking.sink import TrackingSink  # noqa: E402
from edge_agent.tracking.tracker import ObjectTracker  # noqa: E402
from edge_agent.tracking.zones_out import PUBLISH_INTERVAL_S, ZoneBoard  # noqa: E402

SAMPLES = ROOT / "models" / "out" / "samples"
MODEL = ROOT / "models" / "out" / "centerface" / "manifest.json"
NODE, CAMERA, PREFIX = "bench-node", "street", "edge"
OBJECT_COUNTS = (5, 20, 100)


# ---------------------------------------------------------------------------------- traffic


class Tally:
    """Messages and bytes (payload + topic) handed to the broker, by kind."""

    def __init__(self) -> None:
        self.msgs: dict[str, int] = {}
        self.bytes: dict[str, int] = {}

    def add(self, kind: str, topic: str, payload: bytes) -> None:
        self.msgs[kind] = self.msgs.get(kind, 0) + 1
        self.bytes[kind] = self.bytes.get(kind, 0) + len(payload) + len(topic)

    def total(self) -> tuple[int, int]:
        return sum(self.msgs.values()), sum(self.bytes.values())


class _Outbox:
    """The outbox as far as the wire sees it: each message serialized with its seq."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self.seq = 0

    def publish_to(self, stream: str, topic: str, message: dict[str, Any], *,
                   state: bytes | None = None) -> None:
        body = protocol.encode_dict(message)
        self.tally.add("events", topic, results.with_seq(body, self.seq))
        self.seq += 1


class _Results:
    """The result sink (frames): a result per frame on its topic, with its seq."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self.seq = 0

    def publish(self, result: dict[str, Any]) -> int:
        topic = protocol.results_topic(PREFIX, result["node"], result["camera"])
        self.tally.add("results", topic, results.with_seq(protocol.encode_dict(result),
                                                           self.seq))
        self.seq += 1
        return self.seq - 1

    async def aclose(self) -> None:
        return None


class _Link:
    """The MQTT link as the zone board uses it: always connected, counts what it is given."""

    connected = True

    def __init__(self, tally: Tally) -> None:
        self.tally = tally

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                on_ack: Any = None, token: Any = None) -> bool:
        self.tally.add("zones", topic, payload)
        return True


def detect_clip(truth: dict[str, Any]) -> tuple[list[dict[str, Any]], list[float]]:
    """CenterFace on every frame of the clip: result dicts (clip time) and inference ms."""
    import cv2  # noqa: PLC0415 - only this part reads video

    model = LoadedModel.load(MODEL, EngineSettings(warmup_runs=2))
    cap = cv2.VideoCapture(str(SAMPLES / truth["clip"]))
    out: list[dict[str, Any]] = []
    infer_ms: list[float] = []
    t0 = 1_800_000_000.0
    for k in range(truth["frames"]):
        ok, img = cap.read()
        if not ok:
            raise SystemExit(f"bench: error: the clip ends at frame {k}")
        r = model.infer(img)
        infer_ms.append(r.inference_ms)
        out.append(results.build_result(
            node=NODE, camera=CAMERA, ts=t0 + k / truth["fps"], model=model,
            width=img.shape[1], height=img.shape[0],
            latency_ms=results.latencies(preprocess=r.preprocess_ms,
                                         inference=r.inference_ms,
                                         postprocess=r.postprocess_ms, end_to_end=1.0),
            output=r.output))
    cap.release()
    model.close()
    return out, infer_ms


def traffic(truth: dict[str, Any], frames: list[dict[str, Any]], publish: str) -> Tally:
    """What one camera publishing ``publish`` hands to the broker for the clip."""
    tally = Tally()
    cam = CameraSettings.model_validate({
        "name": CAMERA, "url": str(SAMPLES / truth["clip"]), "model": "centerface",
        "publish": publish,
        "zones": [{"name": z, "polygon": p} for z, p in truth["zones"].items()],
        "lines": [{"name": n, "a": s[0], "b": s[1]} for n, s in truth["lines"].items()]})
    clip_now = [frames[0]["ts"]]
    settings = TrackingSettings()
    board = ZoneBoard(_Link(tally), prefix=PREFIX, node=NODE, refresh_s=settings.zone_refresh_s,
                      min_interval_s=settings.zone_min_interval_s, connects=lambda: 1,
                      clock=lambda: clip_now[0])
    sink = TrackingSink(_Results(tally), _Outbox(tally), node=NODE, topic_prefix=PREFIX,
                        settings=settings, camera=lambda _: cam, board=board,
                        clock=lambda: clip_now[0])
    next_flush = clip_now[0]
    for r in frames:
        clip_now[0] = r["ts"]
        sink.publish(dict(r))
        if r["ts"] >= next_flush:
            board.flush()
            next_flush = r["ts"] + PUBLISH_INTERVAL_S
    sink.stop_all()
    board.flush()
    return tally


# ------------------------------------------------------------------------------ tracker cost


def scene(n: int, frames: int, seed: int = 1) -> list[tuple[np.ndarray, list[float]]]:
    """Per frame: boxes (pixels) of ``n`` objects walking across a 1920x1080 frame."""
    rng = np.random.default_rng(seed)
    w, h = 1920.0, 1080.0
    size = rng.uniform(40, 120, n)
    pos = np.stack([rng.uniform(0, w, n), rng.uniform(0, h, n)], axis=1)
    vel = rng.uniform(-6, 6, (n, 2))
    out = []
    for _ in range(frames):
        pos += vel
        # walk off one edge, come back at the other (a new object, as far as a tracker knows)
        pos[:, 0] %= w
        pos[:, 1] %= h
        seen = rng.random(n) > 0.05
        half = size[seen, None] / 2
        c = pos[seen] + rng.normal(0, 1.0, (int(seen.sum()), 2))
        boxes = np.concatenate([c - half, c + half], axis=1)
        out.append((boxes, list(rng.uniform(0.5, 0.95, int(seen.sum())))))
    return out


class StockNorfairTracker(ObjectTracker):
    """The baseline: the same tracker on norfair as shipped (its own Kalman filter, tracked
    objects and ``"iou"`` distance) instead of ``tracking.kalman`` and ``tracking.boxes``
    (the same tracks and estimates: tests/agent/tracking/test_boxes.py, test_kalman.py)."""

    def _new_norfair(self) -> Any:
        import norfair  # noqa: PLC0415 - the tracker imports it on first use too

        # its "iou" warns of every estimated box that came out inverted (a track's estimate
        # over a few frames of noise); ours computes the same distance without the warning
        logging.getLogger("norfair.distances").setLevel(logging.ERROR)

        return norfair.Tracker(distance_function="iou",
                               distance_threshold=self.settings.max_distance,
                               hit_counter_max=self._frames_for_age(),
                               initialization_delay=self.settings.min_hits - 1,
                               past_detections_length=0)


def _pct(xs: list[float], q: float) -> float:
    return round(float(np.percentile(xs, q)), 4)


def _step_round(data: list[tuple[np.ndarray, list[float]]], warm: int,
                settings: TrackingSettings) -> dict[str, list[float]]:
    """One round: fresh trackers, ours and the baseline stepped on each frame in turn (the
    order alternating), so both see the same load. CPU ms per frame after ``warm`` frames."""
    trackers = {"ours": ObjectTracker(settings, next_id=1),
                "stock": StockNorfairTracker(settings, next_id=1)}
    out: dict[str, list[float]] = {"ours": [], "stock": [], "ours_wall": []}
    for k, (boxes, scores) in enumerate(data):
        labels = ["person"] * len(scores)
        for name in (("ours", "stock") if k % 2 else ("stock", "ours")):
            t, c = time.perf_counter(), time.thread_time()
            trackers[name].step(k / 25, boxes, scores, labels)
            if k >= warm:
                out[name].append((time.thread_time() - c) * 1000)
                if name == "ours":
                    out["ours_wall"].append((time.perf_counter() - t) * 1000)
    out["active_end"] = [float(len(trackers["ours"].active))]
    return out


def _observe_round(data: list[tuple[np.ndarray, list[float]]], warm: int,
                   settings: TrackingSettings) -> list[float]:
    """CPU ms per frame of ``CameraTracks.observe`` (tracking, a zone, a line, event rules)."""
    zone = {"name": "door", "polygon": [[0.3, 0.3], [0.7, 0.3], [0.7, 0.7], [0.3, 0.7]]}
    line = {"name": "gate", "a": [0.5, 0.0], "b": [0.5, 1.0]}
    cam = CameraSettings.model_validate({"name": "c", "url": "test://pattern?width=1920&"
                                         "height=1080&fps=25", "model": "m",
                                         "publish": "events", "zones": [zone],
                                         "lines": [line]})
    tracks = cams.CameraTracks(NODE, "c", settings, geo.Scene.from_settings(cam.zones,
                                                                           cam.lines),
                               next_id=1)
    cpu: list[float] = []
    for k, (boxes, scores) in enumerate(data):
        res = {"ts": k / 25, "frame": {"width": 1920, "height": 1080},
               "model": {"name": "m", "version": "1"},
               "detections": [{"label": "person", "score": s,
                               "box": [b[0] / 1920, b[1] / 1080, b[2] / 1920, b[3] / 1080]}
                              for b, s in zip(boxes.tolist(), scores, strict=True)]}
        c = time.thread_time()
        tracks.observe(res)
        if k >= warm:
            cpu.append((time.thread_time() - c) * 1000)
    return cpu


def tracker_cost(n: int, frames: int, warm: int, rounds: int) -> dict[str, Any]:
    """ms per frame of ``ObjectTracker.step`` and of the baseline (``StockNorfairTracker``),
    interleaved, and of ``CameraTracks.observe``, in ``rounds`` rounds (each on fresh trackers
    and a scene of its own): the figure is the median of the rounds' p50s, with their spread.
    CPU time of the thread is the cost; wall time adds what the machine's other processes
    took from us meanwhile (both are kept)."""
    settings = TrackingSettings()
    per_round: list[dict[str, float]] = []
    for r in range(rounds):
        data = scene(n, frames + warm, seed=1 + r)
        step = _step_round(data, warm, settings)
        obs = _observe_round(data, warm, settings)
        per_round.append({"step_p50_ms": _pct(step["ours"], 50),
                          "step_p99_ms": _pct(step["ours"], 99),
                          "stock_p50_ms": _pct(step["stock"], 50),
                          "ratio": _pct(step["ours"], 50) / _pct(step["stock"], 50),
                          "step_wall_p50_ms": _pct(step["ours_wall"], 50),
                          "observe_p50_ms": _pct(obs, 50), "observe_p99_ms": _pct(obs, 99),
                          "active_tracks_end": step["active_end"][0]})

    def med(key: str) -> float:
        return round(statistics.median(r[key] for r in per_round), 4)

    def spread(key: str) -> list[float]:
        return [round(min(r[key] for r in per_round), 4),
                round(max(r[key] for r in per_round), 4)]

    out: dict[str, Any] = {"objects": n, "frames": frames, "rounds": rounds}
    for key in ("step_p50_ms", "step_p99_ms", "stock_p50_ms", "ratio", "step_wall_p50_ms",
                "observe_p50_ms", "observe_p99_ms", "active_tracks_end"):
        out[key] = med(key)
    out["step_p50_spread_ms"] = spread("step_p50_ms")
    out["ratio_spread"] = spread("ratio")
    out["per_round"] = per_round
    return out


def main() -> int:
    """Run both parts, print the figures, write bench/out/events.json."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="fewer tracker frames (under a minute in all)")
    args = ap.parse_args()
    truth = json.loads((SAMPLES / "faces-street.json").read_text())
    load_before = os.getloadavg()[0]
    t_all = time.perf_counter()
    frames, infer_ms = detect_clip(truth)
    seconds = truth["frames"] / truth["fps"]
    modes = {}
    for publish in ("frames", "events", "both"):
        tally = traffic(truth, frames, publish)
        msgs, size = tally.total()
        modes[publish] = {"msgs": msgs, "bytes": size, "msgs_per_s": round(msgs / seconds, 2),
                          "bytes_per_s": round(size / seconds, 1), "by_kind": tally.msgs,
                          "bytes_by_kind": tally.bytes}
        print(f"{publish:6s}: {msgs:4d} messages ({msgs / seconds:6.2f}/s), {size:7d} B "
              f"({size / seconds / 1024:6.2f} KiB/s) {tally.msgs}")
    ratio_msgs = modes["events"]["msgs"] / modes["frames"]["msgs"]
    ratio_bytes = modes["events"]["bytes"] / modes["frames"]["bytes"]
    n_frames, warm, rounds = (300, 30, 3) if args.quick else (1500, 100, 5)
    cost = []
    for n in OBJECT_COUNTS:
        c = tracker_cost(n, n_frames, warm, rounds)
        cost.append(c)
        lo, hi = c["step_p50_spread_ms"]
        rlo, rhi = c["ratio_spread"]
        print(f"tracker at {c['objects']:3d} objects (CPU ms/frame, median of {rounds} rounds' "
              f"p50s): step {c['step_p50_ms']:.3f} ({lo:.3f}-{hi:.3f}), p99 "
              f"{c['step_p99_ms']:.3f}; stock norfair {c['stock_p50_ms']:.3f}, ratio "
              f"{c['ratio']:.3f} ({rlo:.3f}-{rhi:.3f}); observe p50 {c['observe_p50_ms']:.3f} "
              f"p99 {c['observe_p99_ms']:.3f}; wall step p50 {c['step_wall_p50_ms']:.3f}; "
              f"{c['active_tracks_end']:.0f} tracks open at the end", flush=True)
    infer_p50 = statistics.median(infer_ms)
    at20 = next(c for c in cost if c["objects"] == 20)
    out = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick, "cpus": os.cpu_count(), "loadavg_before": round(load_before, 2),
        "loadavg_after": round(os.getloadavg()[0], 2),
        "clip": {"file": truth["clip"], "frames": truth["frames"], "fps": truth["fps"],
                 "objects": len(truth["objects"])},
        "traffic": modes, "events_over_frames_msgs": round(ratio_msgs, 4),
        "events_over_frames_bytes": round(ratio_bytes, 4),
        "infer_ms_p50": round(infer_p50, 2), "tracker": cost,
        "track_over_infer_at_20": round(at20["observe_p50_ms"] / infer_p50, 5),
        "seconds": round(time.perf_counter() - t_all, 1),
    }
    (ROOT / "bench" / "out").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "out" / "events.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"centerface inference p50 {infer_p50:.1f} ms/frame (the baseline of the tracker's "
          f"cost); load {out['loadavg_before']} -> {out['loadavg_after']}; "
          f"{out['seconds']} s")
    at100 = cost[-1]
    print(f"events_over_frames_msgs={ratio_msgs:.3f} track_ms_p50_at_20={at20['step_p50_ms']:.3f} "
          f"events_over_frames_bytes={ratio_bytes:.3f} "
          f"track_ms_p50_at_5={cost[0]['step_p50_ms']:.3f} "
          f"track_ms_p50_at_100={at100['step_p50_ms']:.3f} "
          f"observe_ms_p50_at_20={at20['observe_p50_ms']:.3f} "
          f"track_over_infer_at_20={out['track_over_infer_at_20']:.4f} "
          f"track_over_stock_norfair_at_20={at20['ratio']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
