"""norfair's Kalman filter for a box that is always measured whole: the same numbers, cheaper.

Why: norfair's ``OptimizedKalmanFilter`` keeps a variance per coordinate and handles
measurements of only some of them (a pose whose wrist was not seen), at about 25 us a call
in small NumPy operations. Our detections are boxes measured whole (two points, all four
coordinates, no per-point scores), so every coordinate's variances follow the same recursion
from the same start: three floats describe them all, and an update is a few operations on the
state vector. ``BoxKalmanFactory`` plugs into norfair's documented extension point
(``Tracker(filter_factory=...)``); the model is norfair's (constant velocity, the state's
positions moved by its velocities at each predict, process noise ``Q`` added at each
update, measurement noise ``R``) with its default parameters, and
tests/agent/tracking/test_kalman.py checks the estimates against norfair's own filter.

A measurement of only part of the box (an ``H`` whose diagonal is not all ones) would need the
per-coordinate variances; it cannot come from ``edge_agent.tracking.tracker`` (its detections
carry no scores), and is refused with ``ValueError`` rather than tracked wrongly.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

#: norfair's defaults (``OptimizedKalmanFilterFactory``): measurement noise, process noise,
#: and the initial position variance, position-velocity covariance and velocity variance.
R, Q, POS_VARIANCE, POS_VEL_COVARIANCE, VEL_VARIANCE = 4.0, 0.1, 10.0, 0.0, 1.0
#: Floor of the variances (norfair's guard against a division by zero).
FLOOR = 1e-12


class BoxKalman:
    """A constant-velocity Kalman filter over ``dim_z`` coordinates measured together.

    ``x`` is the state column ``[positions..., velocities...]`` (norfair reads and writes it);
    the covariance of each coordinate is the same 2x2 matrix, kept as three floats.
    """

    __slots__ = ("dim_z", "pos_variance", "pos_vel_covariance", "vel_variance", "x")

    def __init__(self, initial: NDArray[np.float64]) -> None:
        flat = np.asarray(initial, dtype=np.float64).reshape(-1, 1)
        self.dim_z = flat.shape[0]
        self.x: NDArray[np.float64] = np.zeros((2 * self.dim_z, 1))
        self.x[: self.dim_z] = flat
        self.pos_variance = POS_VARIANCE
        self.pos_vel_covariance = POS_VEL_COVARIANCE
        self.vel_variance = VEL_VARIANCE

    def predict(self) -> None:
        """One frame on: positions move by the velocities (norfair's predict)."""
        self.x[: self.dim_z] += self.x[self.dim_z:]

    def update(self, z: NDArray[np.float64], r: object = None,
               h: NDArray[np.float64] | None = None) -> None:
        """Fold in the measurement ``z`` (a column of ``dim_z`` positions).

        ``r`` must be None (the default noise); ``h``, norfair's measurement matrix, must
        measure every position (its diagonal all ones).
        """
        if r is not None or (h is not None and h.trace() != self.dim_z):
            raise ValueError("BoxKalman measures whole boxes with the default noise only")
        self._fold(z)

    def update_box(self, points: NDArray[np.float64]) -> None:
        """``update`` for a whole box given as norfair holds it (points x dimensions): the
        fast path of ``boxes.BoxTrackedObject.hit`` (no ``H`` to build or check)."""
        self._fold(points.reshape(self.dim_z, 1))

    def _fold(self, z: NDArray[np.float64]) -> None:
        dz = self.dim_z
        pv, pvc, vv = self.pos_variance, self.pos_vel_covariance, self.vel_variance
        # the innovation's variance, and the gains for position and velocity
        cross = pvc + vv
        s = max(pv + pvc + cross + Q + R, FLOOR)
        k_pos = 1.0 - R / s
        k_vel = cross / s
        err = z - self.x[:dz]
        self.x[:dz] += k_pos * err
        self.x[dz:] += k_vel * err
        self.pos_variance = k_pos * R
        self.pos_vel_covariance = k_vel * R
        self.vel_variance = max(vv + Q - k_vel * k_vel * s, FLOOR)


class BoxKalmanFactory:
    """norfair's ``FilterFactory`` for ``BoxKalman`` (``Tracker(filter_factory=...)``)."""

    def create_filter(self, initial_detection: NDArray[np.float64]) -> BoxKalman:
        """A filter starting at ``initial_detection`` (points x dimensions), at rest."""
        return BoxKalman(initial_detection)
