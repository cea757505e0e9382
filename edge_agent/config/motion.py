"""A camera's motion gating settings (``cameras[].motion``), kept beside ``edge_agent.config``.

A section of its own because ``config`` is the agent's largest settings file and every helper
of a subsystem adds to it; the detector these settings tune is ``edge_agent.capture.motion``.
Every field says its unit, its default and why that default, like ``config``.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from edge_agent.common import settings as common_settings

#: Corners a mask polygon may have.
MAX_CORNERS = 64


class MotionSettings(common_settings.Section):
    """Motion gating: the model runs only on frames where something moved, plus a keep-alive.

    A cheap frame-difference detector (``edge_agent.capture.motion``) runs in the camera's
    capture thread on a small grayscale copy of each frame, before preprocessing; frames with
    no motion are not offered to inference and publish no result (counted as ``frames_still``).
    """

    #: Gate this camera's frames on motion. Default false: every frame is inferred, as before;
    #: turn it on for fixed cameras that mostly watch an empty scene.
    enabled: bool = False
    #: Width of the grayscale copy the detector compares, pixels (the height keeps the aspect
    #: ratio). Default 160: a person at 1080p is still several pixels wide, and one check costs
    #: about 0.1 ms whatever the camera's resolution.
    width: int = Field(160, ge=32, le=1920)
    #: Change of a pixel's gray level (0-255) against the background that counts as changed.
    #: Default 25: above sensor noise and compression flicker after the 5x5 blur, below the
    #: contrast of a person against a floor.
    threshold: int = Field(25, ge=1, le=255)
    #: Fraction of the frame (masks excluded) that must change, after dilation, to count as
    #: motion. Default 0.002 (29 pixels of a 160x90 copy): a small object's first step, not a
    #: flickering pixel.
    min_area: float = Field(0.002, gt=0.0, le=1.0)
    #: Weight of each new frame in the running background average, per checked frame (pixels
    #: that did not change since the previous frame follow faster, so an object that stops
    #: leaves the background within 2-3 frames and stops the model). Default 0.2: a background
    #: a few frames deep, so a change that builds up over ~5 frames (a slow mover) still counts;
    #: lower it to catch slower motion, at the cost of a longer tail after motion ends.
    background_alpha: float = Field(0.2, gt=0.0, le=1.0)
    #: Iterations of a 3x3 dilation of the changed pixels (joins an object's edges into one
    #: area). Default 2.
    dilate: int = Field(2, ge=0, le=10)
    #: Longest time without an inference, seconds: a frame is inferred at least this often even
    #: without motion, so a still object is re-checked and re-reported. Seconds of video for a
    #: file (a replay at ``rate: max`` gates like the camera would), the wall clock for live
    #: sources. Default 5 s.
    keepalive_s: float = Field(5.0, gt=0.0, le=3600.0)
    #: Regions where motion is ignored (trees, a road beyond the fence, a clock on the wall):
    #: polygons of 3 to 64 ``[x, y]`` corners in fractions of the frame's width and height
    #: (0-1, so a mask survives a resolution change). Default none; at most 32.
    masks: list[list[tuple[float, float]]] = Field([], max_length=32)

    @field_validator("masks")
    @classmethod
    def _masks(cls, v: list[list[tuple[float, float]]]) -> list[list[tuple[float, float]]]:
        for i, poly in enumerate(v):
            if not 3 <= len(poly) <= MAX_CORNERS:
                raise ValueError(f"mask {i} has {len(poly)} corners; a polygon needs 3 to "
                                 f"{MAX_CORNERS}")
            for k, (x, y) in enumerate(poly):
                if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
                    raise ValueError(f"mask {i} corner {k} [{x}, {y}] is outside the frame: "
                                     "corners are fractions of its width and height, 0 to 1")
            # shoelace formula: twice the signed area; 0 when every corner is on one line
            twice = sum(x0 * y1 - x1 * y0
                        for (x0, y0), (x1, y1) in zip(poly, poly[1:] + poly[:1], strict=True))
            if abs(twice) < 1e-9:
                raise ValueError(f"mask {i} has no area (all its corners lie on one line)")
        return v
