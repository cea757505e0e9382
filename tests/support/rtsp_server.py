"""A real RTSP camera for tests: GStreamer's RTSP server library streaming a clip in a loop.

Run with Debian's system Python (``/usr/bin/python3``), which has the GObject bindings
(``python3-gi``) and ``gir1.2-gst-rtsp-server-1.0`` that ``scripts/setup.sh`` installs; the
project's virtualenv has neither, so tests start this file as a separate process
(``tests.support.streams.RtspCamera``), the way a camera on the network is a separate box.

The clip's H.264 access units are read once (``qtdemux ! h264parse``, no re-encoding) and pushed
into the served pipeline at the clip's frame rate with live timestamps, looping for ever, so a
client sees a camera that never ends. Clients speak RTSP with RTP over TCP or UDP.

Signals make the faults a test needs: ``SIGUSR1`` stalls the stream (sessions and sockets stay
open, no more frames are sent), ``SIGUSR2`` resumes it; ``SIGTERM``/``SIGINT`` stop the server.
A restart is a new process on the same port. The process prints one ``ready URL`` line when it
accepts connections, and ``stalled``/``resumed`` lines when told, so the test can wait on them.
"""

from __future__ import annotations

import argparse
import signal
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402


def read_clip(path: str) -> tuple[list[tuple[bytes, bool]], Gst.Caps, int]:
    """The clip's access units (bytes, is keyframe), their caps and the frame duration (ns)."""
    pipe = Gst.parse_launch(
        f'filesrc location="{path}" ! qtdemux ! h264parse ! '
        "video/x-h264,stream-format=byte-stream,alignment=au ! appsink name=out sync=false"
    )
    sink = pipe.get_by_name("out")
    pipe.set_state(Gst.State.PLAYING)
    units: list[tuple[bytes, bool]] = []
    caps = None
    while True:
        sample = sink.emit("pull-sample")
        if sample is None:
            break
        caps = sample.get_caps()
        buf = sample.get_buffer()
        units.append((buf.extract_dup(0, buf.get_size()),
                      not buf.has_flags(Gst.BufferFlags.DELTA_UNIT)))
    pipe.set_state(Gst.State.NULL)
    if not units or caps is None:
        raise SystemExit(f"rtsp_server: no H.264 frames in {path}")
    st = caps.get_structure(0)
    ok, num, den = st.get_fraction("framerate")
    if not ok or num <= 0:
        num, den = 25, 1
    return units, caps, Gst.SECOND * den // num


class Camera:
    """Feeds every prepared media from one clock-driven loop over the clip."""

    def __init__(self, units: list[tuple[bytes, bool]], caps: Gst.Caps, period_ns: int) -> None:
        self.units = units
        self.caps = caps
        self.period_ms = max(1, period_ns // Gst.MSECOND)
        self.stalled = False
        #: appsrc of each prepared media -> index of the next access unit it gets
        self.sources: dict[Gst.Element, int] = {}

    def configure(self, _factory: GstRtspServer.RTSPMediaFactory,
                  media: GstRtspServer.RTSPMedia) -> None:
        src = media.get_element().get_child_by_name("src")
        src.set_property("caps", self.caps)
        self.sources[src] = 0  # a new media starts at the clip's first (key) frame
        media.connect("unprepared", lambda _m: self.sources.pop(src, None))

    def tick(self) -> bool:
        if not self.stalled:
            for src, i in list(self.sources.items()):
                data, _key = self.units[i]
                src.emit("push-buffer", Gst.Buffer.new_wrapped(data))
                self.sources[src] = (i + 1) % len(self.units)
        return True  # keep the timer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=True, help="TCP port of the RTSP listener")
    ap.add_argument("--path", default="/cam", help="mount point (default /cam)")
    ap.add_argument("--clip", required=True, help="an MP4 file with an H.264 video track")
    args = ap.parse_args()
    Gst.init(None)
    units, caps, period = read_clip(args.clip)
    cam = Camera(units, caps, period)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    factory = GstRtspServer.RTSPMediaFactory()
    # live timestamps from the pipeline clock: pushes pace the stream, a stall is silence
    factory.set_launch("( appsrc name=src is-live=true format=time do-timestamp=true "
                       "! h264parse ! rtph264pay name=pay0 pt=96 config-interval=-1 )")
    factory.set_shared(True)
    factory.connect("media-configure", cam.configure)
    server.get_mount_points().add_factory(args.path, factory)
    if server.attach(None) == 0:
        print(f"rtsp_server: cannot listen on 127.0.0.1:{args.port}", file=sys.stderr)
        return 1
    loop = GLib.MainLoop()

    def on_signal(signum: int) -> bool:
        if signum == signal.SIGUSR1:
            cam.stalled = True
            print("stalled", flush=True)
        elif signum == signal.SIGUSR2:
            cam.stalled = False
            print("resumed", flush=True)
        else:
            loop.quit()
        return True

    for signum in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_HIGH, signum, on_signal, signum)
    GLib.timeout_add(cam.period_ms, cam.tick)
    print(f"ready rtsp://127.0.0.1:{args.port}{args.path} frames={len(units)} "
          f"period_ms={cam.period_ms}", flush=True)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
