"""The six findings the synthetic generator draws, each in one known place.

Every finding edits the phantom's `Scene` (`cxrray.sources.synthetic_phantom`) where the real
one shows (an enlarged heart, fluid at a lung base, a mass, an opacity with air bronchograms,
a rim of air at the chest wall, tubes and lines) and returns its footprints, whose bounding
boxes are its boxes in boxes.csv. Keys of FINDING_DRAW are labels.SYNTHETIC_FINDINGS.
"""
from __future__ import annotations

import math

import numpy as np

from cxrray.sources.synthetic_phantom import Draws, Scene, heart_mask, ramp

# Each takes its own draws block and a strength (0 = absent), edits the scene, and returns
# footprints: masks whose bounding boxes are that finding's boxes.


def _cardiomegaly(s: Scene, d: Draws, k: float) -> list[np.ndarray]:
    grow, shift = d.u(0.36, 0.44), d.u(0.04, 0.08)
    if k <= 0:
        return []
    cx, cy, ax, ay, tilt = s.geom.heart
    s.heart = heart_mask(s.X, s.Y, cx + shift * k, cy + 0.03 * k, ax * (1 + grow * k), ay * (1 + 0.12 * k), tilt)
    return [s.heart]


def _effusion(s: Scene, d: Draws, k: float) -> list[np.ndarray]:
    first, both = int(d.u() * len(s.lungs)), d.u() < 0.35
    heights = (d.u(0.3, 0.5), d.u(0.25, 0.45))
    if k <= 0:
        return []
    picks = range(len(s.lungs)) if both and s.geom.frontal else [first]
    out = []
    for i in picks:
        lung, mask = s.geom.lungs[i], s.lungs[i]
        lateral = np.clip((lung.side * (s.X - lung.cx) / lung.ax + 1.0) * 0.5, 0.0, 1.0)
        surface = lung.base - heights[i % 2] * k * (0.45 + 0.55 * lateral * lateral)  # meniscus rises laterally
        fluid = mask * ramp(s.Y - surface, 0.03)
        s.air_keep *= 1.0 - fluid
        s.dense += 0.05 * fluid + 0.06 * mask * np.exp(-(((s.Y - surface) / 0.02) ** 2))
        out.append(fluid)
    return out


def _inside_point(
    s: Scene, d: Draws, lateral_lo: float, lateral_hi: float, y_lo: float, y_hi: float
) -> tuple[int, float, float]:
    """A lung (index) and a point in it; `lateral_*` in half-widths from the lung's middle."""
    # On a lateral both lungs overlap: one is enough.
    i = int(d.u() * len(s.lungs)) if s.geom.frontal else 0
    lung = s.geom.lungs[i]
    x0 = lung.cx + lung.side * d.u(lateral_lo, lateral_hi) * lung.ax
    return i, x0, d.u(y_lo, y_hi)


def _lesion(s: Scene, d: Draws, k: float) -> list[np.ndarray]:
    _, x0, y0 = _inside_point(s, d, -0.1, 0.6, -0.45, 0.1)
    r, ang = d.u(0.11, 0.16), d.u(0, 6.3)
    if k <= 0:
        return []
    # Two overlapping discs make a lobulated mass rather than a perfect circle.
    x1, y1 = x0 + 0.45 * r * math.cos(ang), y0 + 0.45 * r * math.sin(ang)
    blob = np.maximum(_disc(s, x0, y0, r), 0.85 * _disc(s, x1, y1, 0.7 * r))
    s.dense += 0.4 * k * blob
    return [blob]


def _disc(s: Scene, x0: float, y0: float, r: float) -> np.ndarray:
    rr = np.sqrt((s.X - x0) ** 2 + (s.Y - y0) ** 2) / r
    return np.clip((1.0 - rr) * 2.5, 0.0, 1.0) ** 0.7


def _consolidation(s: Scene, d: Draws, k: float) -> list[np.ndarray]:
    # Kept off the heart and the costophrenic recess, where it would be hidden (retrocardiac,
    # behind fluid): fine for realism, bad for a check of whether the pipeline learns.
    i, x0, y0 = _inside_point(s, d, -0.05, 0.5, -0.45, 0.15)
    ax, ay, tilt = d.u(0.15, 0.24), d.u(0.13, 0.21), d.u(-0.5, 0.5)
    f = [(d.u(14, 30), d.u(14, 30), d.u(0, 6.3)) for _ in range(2)]
    bronchi, bph = d.u(18, 26), d.u(0, 6.3)
    if k <= 0:
        return []
    X, Y = s.X - x0, s.Y - y0
    xr, yr = X * math.cos(tilt) + Y * math.sin(tilt), Y * math.cos(tilt) - X * math.sin(tilt)
    region = ramp(1.0 - (xr / ax) ** 2 - (yr / ay) ** 2, 0.5) * s.lungs[i]
    (a1, b1, p1), (a2, b2, p2) = f
    patch = 0.55 + 0.25 * np.cos(a1 * X + b1 * Y + p1) + 0.2 * np.cos(a2 * X - b2 * Y + p2)
    # Air bronchograms: branches that stay dark inside the opacity.
    air_bronchi = np.exp((np.cos(bronchi * s.hilum_phi + bph) - 1.0) * 10.0)
    fill = np.clip(region * (0.6 + 0.7 * patch), 0.0, 1.0) * (1.0 - 0.5 * air_bronchi) * min(1.0, k)
    s.air_keep *= 1.0 - fill
    return [region]


def _pneumothorax(s: Scene, d: Draws, k: float) -> list[np.ndarray]:
    i, _, _ = _inside_point(s, d, 0, 1, 0, 1)
    rim, bottom = d.u(0.12, 0.18), d.u(0.0, 0.3)
    if k <= 0:
        return []
    lung, mask = s.geom.lungs[i], s.lungs[i]
    half = lung.ax * np.sqrt(np.clip((s.Y - lung.top) * (1.0 / 0.55), 0.0, 1.0))
    off = lung.side * (s.X - lung.cx)  # > 0 towards the chest wall
    edge = half - rim * k  # the visceral pleural line, parallel to the chest wall
    gate = ramp(off + 0.3 * lung.ax, 0.1) * ramp(bottom - s.Y, 0.08) * mask
    region = ramp(off - edge, 0.02) * gate
    s.vessel_keep *= 1.0 - region
    s.extra_air += 0.15 * region
    s.dense += 0.12 * np.exp(-(((off - edge) / 0.012) ** 2)) * gate
    return [region]


def _devices(s: Scene, d: Draws, k: float) -> list[np.ndarray]:
    kinds = sorted(s.geom.devices)
    first, second, two = int(d.u() * len(kinds)), int(d.u() * (len(kinds) - 1)), d.u() < 0.4
    jx, jy = d.u(-0.03, 0.03), d.u(-0.03, 0.03)
    if k <= 0:
        return []
    chosen = [kinds[first]] + ([[x for x in kinds if x != kinds[first]][second]] if two else [])
    out = []
    for kind in chosen:
        pts = [(x + jx, y + jy) for x, y in s.geom.devices[kind]]
        tube = _polyline(s.X, s.Y, pts, 0.022 if kind == "et" else 0.014)
        if kind == "pacer":  # the generator box
            (gx, gy) = pts[0]
            box = ramp(0.07 - np.abs(s.X - gx), 0.02) * ramp(0.05 - np.abs(s.Y - gy), 0.02)
            tube = np.maximum(tube, box)
        s.dense += 0.38 * min(k, 1.0) * tube
        out.append(tube)
    return out


def _polyline(X: np.ndarray, Y: np.ndarray, pts: list[tuple[float, float]], half_width: float) -> np.ndarray:
    best = None
    for (ax, ay), (bx, by) in zip(pts[:-1], pts[1:]):
        vx, vy = bx - ax, by - ay
        t = np.clip(((X - ax) * vx + (Y - ay) * vy) / (vx * vx + vy * vy), 0.0, 1.0)
        ddx, ddy = X - ax - t * vx, Y - ay - t * vy
        dd = ddx * ddx + ddy * ddy
        best = dd if best is None else np.minimum(best, dd)
    return ramp(half_width - np.sqrt(best), 0.012)


FINDING_DRAW = {
    "Cardiomegaly": _cardiomegaly,
    "Lung Lesion": _lesion,
    "Consolidation": _consolidation,
    "Pneumothorax": _pneumothorax,
    "Pleural Effusion": _effusion,
    "Support Devices": _devices,
}
