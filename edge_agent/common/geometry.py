"""Plane geometry for zones and lines: simple polygons, point in polygon, segment crossings.

Why it exists: the same few predicates decide whether a zone definition is valid (the agent's
settings, ``edge_agent.config.tracking``) and whether a tracked object is in a zone or crossed a
line (``edge_agent.tracking``); one implementation keeps the two from ever disagreeing. Points
are ``(x, y)`` tuples in any consistent unit (the agent uses frame fractions); image
coordinates (y down) or maths coordinates make no difference to any answer here except
``side``'s sign, which callers interpret.

Pure Python on purpose: a zone has a handful of corners and these run a few times per tracked
object per frame, where numpy's call overhead would cost more than the arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence

Point = tuple[float, float]

#: Tolerance for "on the line" decisions, in the points' unit (frame fractions: 1e-12 of a
#: frame is far below a pixel).
EPS = 1e-12


def cross(o: Point, a: Point, b: Point) -> float:
    """The z component of (a - o) x (b - o): > 0 when o→a→b turns counter-clockwise in
    maths coordinates (clockwise on screen, where y grows downwards)."""
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def side(a: Point, b: Point, p: Point) -> int:
    """Which side of the directed line a→b ``p`` is on: 1, -1, or 0 when on it.

    In image coordinates (y down), 1 is the right-hand side looking from ``a`` towards ``b``.
    """
    c = cross(a, b, p)
    return 1 if c > EPS else -1 if c < -EPS else 0


def _on_segment(a: Point, b: Point, p: Point) -> bool:
    return (min(a[0], b[0]) - EPS <= p[0] <= max(a[0], b[0]) + EPS
            and min(a[1], b[1]) - EPS <= p[1] <= max(a[1], b[1]) + EPS)


def segments_intersect(p1: Point, p2: Point, q1: Point, q2: Point) -> bool:
    """True when segments p1-p2 and q1-q2 share a point (touching counts)."""
    d1, d2 = side(q1, q2, p1), side(q1, q2, p2)
    d3, d4 = side(p1, p2, q1), side(p1, p2, q2)
    if d1 * d2 < 0 and d3 * d4 < 0:
        return True
    return ((d1 == 0 and _on_segment(q1, q2, p1)) or (d2 == 0 and _on_segment(q1, q2, p2))
            or (d3 == 0 and _on_segment(p1, p2, q1)) or (d4 == 0 and _on_segment(p1, p2, q2)))


def area(poly: Sequence[Point]) -> float:
    """The polygon's signed area (shoelace formula)."""
    n = len(poly)
    return 0.5 * sum(poly[i][0] * poly[(i + 1) % n][1] - poly[(i + 1) % n][0] * poly[i][1]
                     for i in range(n))


def polygon_problem(poly: Sequence[Point]) -> str | None:
    """Why ``poly`` is not a simple polygon (a zone must be one), or None.

    Checks: at least 3 corners, no repeated corner, a non-zero area, and no two edges that
    meet anywhere but at their shared corner (a self-intersecting "bow tie" has no clear
    inside). O(n^2) in the corners: a zone has a few dozen at most.
    """
    n = len(poly)
    if n < 3:
        return "a polygon needs at least 3 points"
    if len({(float(x), float(y)) for x, y in poly}) != n:
        return "a point is repeated"
    edges = [(poly[i], poly[(i + 1) % n]) for i in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            if j == i + 1 or (i == 0 and j == n - 1):
                # neighbours share a corner: they may only meet there (not fold back)
                a, b = edges[i]
                c, d = edges[j]
                shared = b if j == i + 1 else a
                other_i = a if j == i + 1 else b
                other_j = d if j == i + 1 else c
                if side(shared, other_i, other_j) == 0 and _on_segment(shared, other_i, other_j):
                    return f"edges {i} and {j} overlap"
                continue
            if segments_intersect(*edges[i], *edges[j]):
                return f"the polygon intersects itself (edges {i} and {j} cross)"
    if abs(area(poly)) <= EPS:
        return "the polygon has no area (its points are on one line)"
    return None


def contains(poly: Sequence[Point], p: Point) -> bool:
    """True when ``p`` is inside ``poly`` (even-odd rule; a point on an edge may go either way)."""
    x, y = p
    inside = False
    n = len(poly)
    j = n - 1
    for i in range(n):
        xi, yi = poly[i]
        xj, yj = poly[j]
        if (yi > y) != (yj > y) and x < (xj - xi) * (y - yi) / (yj - yi) + xi:
            inside = not inside
        j = i
    return inside


def crossing(a: Point, b: Point, p0: Point, p1: Point) -> int:
    """Whether moving from ``p0`` to ``p1`` crosses the segment a-b, and which way.

    Returns 1 when the move goes from the left of a→b to its right, -1 for right to left (as
    seen from ``a`` looking at ``b`` in image coordinates, y down), 0 when it does not cross.
    Touching the line without passing it is not a crossing; a move that starts exactly on the
    line counts from the side it came from, which the caller tracks (see ``edge_agent.tracking``).
    """
    s0, s1 = side(a, b, p0), side(a, b, p1)
    if s0 == 0 or s1 in (0, s0):
        return 0
    # the move changes sides of the infinite line; it crosses the segment when a and b lie on
    # different sides of the move (or one is on it)
    t0, t1 = side(p0, p1, a), side(p0, p1, b)
    if t0 * t1 > 0:
        return 0
    return 1 if s1 > 0 else -1
