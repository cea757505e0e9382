"""The whole-box Kalman filter gives norfair's own filter's numbers (it replaces it for speed),
and refuses what it cannot do (a partly measured box)."""

from __future__ import annotations

import numpy as np
import pytest
from norfair.filter import OptimizedKalmanFilterFactory

from edge_agent.tracking import kalman


def _full_h(dim_z: int) -> np.ndarray:
    # what norfair's TrackedObject.hit passes for a detection without per-point scores
    return np.hstack([np.identity(dim_z), np.zeros((dim_z, dim_z))])


def test_estimates_match_norfairs_filter_over_a_noisy_walk() -> None:
    rng = np.random.default_rng(7)
    start = np.array([[100.0, 50.0], [160.0, 130.0]])
    ours = kalman.BoxKalmanFactory().create_filter(start)
    theirs = OptimizedKalmanFilterFactory().create_filter(start)
    h = _full_h(4)
    box = start.reshape(-1, 1).copy()
    velocity = np.array([[3.0], [-1.0], [3.0], [-1.0]])
    for k in range(300):
        ours.predict()
        theirs.predict()
        box += velocity
        if k % 7 == 3:
            continue  # a missed detection: predict only
        z = box + rng.normal(0.0, 2.0, (4, 1))
        ours.update(z, None, h)
        theirs.update(z, None, h)
        np.testing.assert_allclose(ours.x, theirs.x, rtol=1e-9, atol=1e-9)
    # and the prediction it exists for: the velocity was learnt
    np.testing.assert_allclose(ours.x[4:], velocity, atol=0.5)


def test_a_partly_measured_box_is_refused() -> None:
    f = kalman.BoxKalman(np.zeros((2, 2)))
    h = _full_h(4)
    h[1, 1] = 0.0
    with pytest.raises(ValueError, match="whole boxes"):
        f.update(np.zeros((4, 1)), None, h)
    with pytest.raises(ValueError, match="whole boxes"):
        f.update(np.zeros((4, 1)), np.identity(4), None)
