"""Synthetic chest X-rays written in CheXpert-v1.0-small layout: the built-in dataset.

A model that learns it shows the pipeline works; a model that cannot learn it shows a bug.
Every code path that reads CheXpert reads it unchanged:

    OUT/CheXpert-v1.0-small/train.csv, valid.csv      (the real header and value style)
    OUT/CheXpert-v1.0-small/{train,valid}/patientNNNNN/studyK/view1_frontal.jpg (+ view2_lateral.jpg)
    OUT/CheXpert-v1.0-small/boxes.csv                  (Path,Finding,x,y,w,h; frontal positives)

Images are drawn with vectorised numpy in a patient coordinate frame (x right on the image,
y down, both about [-1, 1]), then posed (shift, scale, a few degrees of rotation), noised and
contrast-jittered. Each finding in SYNTHETIC_FINDINGS changes the picture in one known
place; its box is the bounding box of that change. Uncertain labels (-1) are drawn faintly
or not at all, so they are genuinely ambiguous. Same seed, same bytes.
"""
from __future__ import annotations

import csv
import logging
import math
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from cxrray.labels import CHEXPERT_14, SYNTHETIC_FINDINGS

log = logging.getLogger(__name__)

ROOT_NAME = "CheXpert-v1.0-small"
CSV_HEADER: tuple[str, ...] = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_14)
BOX_HEADER: tuple[str, ...] = ("Path", "Finding", "x", "y", "w", "h")
FRONTAL, LATERAL = "frontal", "lateral"
VALID_FIRST_ID = 64541  # the real CheXpert validation patients start here
Box = tuple[str, int, int, int, int]


@dataclass(frozen=True)
class SynthConfig:
    n_patients: int = 300
    size: int = 128
    seed: int = 0
    valid_fraction: float = 0.1
    lateral_fraction: float = 0.25  # fraction of studies that also get a lateral
    max_studies: int = 3
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        if self.n_patients < 1 or self.max_studies < 1:
            raise ValueError(f"n_patients and max_studies must be >= 1, got {self.n_patients}, {self.max_studies}")
        if self.size < 32:
            raise ValueError(f"size must be >= 32 px (findings vanish below that), got {self.size}")
        if not (0.0 <= self.valid_fraction < 1.0 and 0.0 <= self.lateral_fraction <= 1.0):
            raise ValueError("valid_fraction must be in [0, 1) and lateral_fraction in [0, 1]")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")


@dataclass
class SynthSummary:
    root: Path
    n_images: int
    n_patients: int
    train_csv: Path
    valid_csv: Path
    boxes_csv: Path
    prevalence: dict[str, float]
    seconds: float


# --------------------------------------------------------------------------- random draws


class _Draws:
    """A fixed block of uniforms handed out in order.

    Each part of the picture takes its own fixed-size block, so whether a finding is drawn
    never shifts anyone else's numbers: the same rng state rendered with and without a
    finding differs only where the finding is.
    """

    def __init__(self, values: np.ndarray) -> None:
        self._v, self._i = values, 0

    def u(self, lo: float = 0.0, hi: float = 1.0) -> float:
        x = float(self._v[self._i])
        self._i += 1
        return lo + (hi - lo) * x

    def block(self, n: int) -> "_Draws":
        b = _Draws(self._v[self._i : self._i + n])
        self._i += n
        return b


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class _Lung:
    cx: float
    top: float  # apex height
    ax: float  # half width at the base
    base: float  # diaphragm height at the lateral edge (the costophrenic angle)
    dome: float  # how far the diaphragm rises at the lung's middle
    side: int  # +1 when "lateral" (effusion meniscus, pneumothorax rim) is +x on the image


@dataclass(frozen=True)
class _Geom:
    lungs: tuple[_Lung, ...]
    heart: tuple[float, float, float, float, float]  # cx, cy, ax, ay, tilt (radians)
    body: tuple[tuple[float, float, float, float], ...]  # soft-tissue superellipses
    spine_x: float
    spine_w: float
    trachea: tuple[float, float]  # x, lowest y (carina)
    hila: tuple[float, float, float]  # left x, right x, y (one hilum on a lateral: both x equal)
    rib_curve: float
    rib_tilt: float
    rib_contrast: float
    frontal: bool  # two separate lungs, clavicles, aortic knob
    sternum_x: float | None
    devices: dict[str, tuple[tuple[float, float], ...]]  # polyline anchors per device kind
    weak: float  # how strongly findings show in this view


def _frontal_geom(d: _Draws) -> _Geom:
    w, tall = d.u(0.95, 1.05), d.u(0.95, 1.05)
    right = _Lung(-0.37 * w, -0.74 * tall, 0.29 * w, 0.54 * tall, d.u(0.1, 0.15), -1)  # patient's right
    left = _Lung(0.37 * w, -0.72 * tall, 0.28 * w, 0.6 * tall, d.u(0.09, 0.14), +1)
    # Tilted so the apex points down towards the patient's left, as a heart does.
    heart = (0.1 + d.u(-0.02, 0.02), 0.31 * tall, 0.3 * d.u(0.92, 1.08), 0.23 * d.u(0.95, 1.05), 0.35)
    body = ((0.0, 0.22, 0.88 * w, 1.3),)
    devices = {
        "et": ((0.0, -1.1), (0.0, -0.48)),
        "ng": ((0.02, -1.1), (0.02, -0.2), (0.06, 0.45), (0.3, 0.64)),
        "line": ((-0.62, -0.74), (-0.36, -0.6), (-0.1, -0.45), (-0.06, -0.15)),
        "pacer": ((0.52, -0.62), (0.3, -0.3), (0.22, 0.3)),
    }
    return _Geom(lungs=(right, left), heart=heart, body=body, spine_x=0.0, spine_w=0.07, trachea=(0.0, -0.38),
                 hila=(-0.17, 0.17, -0.08), rib_curve=1.0, rib_tilt=0.0, rib_contrast=0.06, frontal=True,
                 sternum_x=None, devices=devices, weak=1.0)


def _lateral_geom(d: _Draws) -> _Geom:
    # Patient faces image-left: sternum and heart anterior (-x), spine posterior (+x).
    w, tall = d.u(0.95, 1.05), d.u(0.95, 1.05)
    a = _Lung(0.0, -0.74 * tall, 0.52 * w, 0.50 * tall, d.u(0.1, 0.15), +1)
    b = _Lung(0.04, -0.70 * tall, 0.50 * w, 0.56 * tall, d.u(0.1, 0.15), +1)
    heart = (-0.22 + d.u(-0.02, 0.02), 0.3 * tall, 0.3 * d.u(0.92, 1.08), 0.26 * d.u(0.95, 1.05), 0.5)
    body = ((0.02, 0.2, 0.92 * w, 1.3),)
    devices = {
        "et": ((0.05, -1.1), (0.05, -0.45)),
        "ng": ((0.12, -1.1), (0.22, -0.2), (0.2, 0.45), (0.0, 0.66)),
        "line": ((-0.2, -0.8), (-0.1, -0.5), (-0.05, -0.15)),
        "pacer": ((-0.66, -0.62), (-0.45, -0.3), (-0.3, 0.3)),
    }
    return _Geom(lungs=(a, b), heart=heart, body=body, spine_x=0.66, spine_w=0.1, trachea=(0.05, -0.3),
                 hila=(0.12, 0.12, -0.1), rib_curve=0.0, rib_tilt=-0.25, rib_contrast=0.025, frontal=False,
                 sternum_x=-0.74, devices=devices, weak=0.6)


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = ((np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0).astype(np.float32)
    return np.broadcast_to(c[None, :], (size, size)), np.broadcast_to(c[:, None], (size, size))


def _pose(size: int, d: _Draws) -> tuple[np.ndarray, np.ndarray]:
    """Image grid -> patient frame: small shift, scale and rotation per image."""
    u, v = _grid(size)
    dx, dy, s = d.u(-0.05, 0.05), d.u(-0.05, 0.05), d.u(0.9, 1.05)
    th = math.radians(d.u(-4.0, 4.0))
    c, n = math.cos(th) / s, math.sin(th) / s
    x, y = u - dx, v - dy
    return (c * x - n * y).astype(np.float32), (n * x + c * y).astype(np.float32)


def _ramp(x: np.ndarray, width: float) -> np.ndarray:
    """Soft step from 0 to 1 over `width`, centred on x = 0 (cheaper than a sigmoid)."""
    return np.clip(x * (1.0 / width) + 0.5, 0.0, 1.0)


def _ellipse(X: np.ndarray, Y: np.ndarray, cx: float, cy: float, ax: float, ay: float, soft: float) -> np.ndarray:
    e = ((X - cx) / ax) ** 2 + ((Y - cy) / ay) ** 2
    return _ramp(1.0 - e, soft)


def _superellipse(X: np.ndarray, Y: np.ndarray, cx: float, cy: float, ax: float, ay: float) -> np.ndarray:
    # Exponent 2.6: a boxier trunk with shoulders, not an egg.
    e = np.abs((X - cx) / ax) ** 2.6 + np.abs((Y - cy) / ay) ** 2.6
    return _ramp(1.0 - e, 0.35)


def _heart(X: np.ndarray, Y: np.ndarray, cx: float, cy: float, ax: float, ay: float, tilt: float) -> np.ndarray:
    c, n = math.cos(tilt), math.sin(tilt)
    xr, yr = (X - cx) * c + (Y - cy) * n, (Y - cy) * c - (X - cx) * n
    body = _ramp(1.0 - (xr / ax) ** 2 - (yr / ay) ** 2, 0.3)
    # Below its middle the heart rests on the diaphragm: no lung may show underneath.
    base = _ramp(Y - cy, 0.05) * _ramp(cy + ay - Y, 0.05) * _ramp(1.0 - ((X - cx) / (0.85 * ax)) ** 2, 0.3)
    return np.maximum(body, base)


def _lung_mask(X: np.ndarray, Y: np.ndarray, lung: _Lung) -> np.ndarray:
    # Half width grows like a parabola from the apex, then the diaphragm cuts the base: a sharp
    # lateral costophrenic angle, which is what an effusion blunts.
    half = lung.ax * np.sqrt(np.clip((Y - lung.top) * (1.0 / 0.55), 0.0, 1.0))
    t = np.clip((X - lung.cx) / lung.ax, -1.0, 1.0)
    dia = lung.base - lung.dome * (1.0 - t * t)
    # The -0.025 puts the ramp's foot on the boundary, so nothing leaks above the apex.
    return _ramp(half - np.abs(X - lung.cx) - 0.025, 0.05) * _ramp(dia - Y, 0.03)


# --------------------------------------------------------------------------- anatomy


@dataclass
class _Scene:
    X: np.ndarray
    Y: np.ndarray
    geom: _Geom
    lungs: list[np.ndarray]
    hilum_phi: np.ndarray  # angle about the nearer hilum (vessels, air bronchograms radiate from it)
    hilum_dist: np.ndarray
    heart: np.ndarray
    dense: np.ndarray  # additive brightness (bone, devices, masses)
    air_keep: np.ndarray  # 1 = aerated, 0 = filled with fluid/tissue
    vessels: np.ndarray
    vessel_keep: np.ndarray  # 1 where lung markings show
    extra_air: np.ndarray  # pneumothorax: more air than normal lung


def _anatomy(X: np.ndarray, Y: np.ndarray, g: _Geom, d: _Draws) -> _Scene:
    body = np.maximum.reduce([_superellipse(X, Y, *e) for e in g.body])
    ax_ = np.abs(X - g.spine_x)
    spine = np.exp(-(((X - g.spine_x) / g.spine_w) ** 4)) * (0.8 + 0.2 * np.cos(Y * (2 * math.pi / d.u(0.12, 0.15))))
    # Posterior ribs: rise a little from the spine, then arc down to the chest wall.
    period, phase = d.u(0.15, 0.18), d.u(0, 1)
    t = (Y - g.rib_curve * ((ax_ - 0.25) ** 2 - 0.0625) - g.rib_tilt * X) / period + phase
    ribs = np.exp(3.0 * (np.cos(t * (2 * math.pi)) - 1.0)) * _ramp(ax_ - 0.08, 0.05) * _ramp(0.6 - Y, 0.3)
    dense = 0.5 * body + 0.13 * spine + g.rib_contrast * ribs * body
    if g.frontal:  # clavicles
        yc = -0.68 - 0.22 * (ax_ - 0.1) + d.u(-0.04, 0.04)
        dense += 0.1 * np.exp(-(((Y - yc) / 0.035) ** 2)) * _ramp(0.6 - ax_, 0.1) * _ramp(ax_ - 0.05, 0.05)
    if g.sternum_x is not None:
        dense += 0.07 * np.exp(-(((X - g.sternum_x) / 0.03) ** 2)) * _ramp(0.35 - Y, 0.1) * _ramp(Y + 0.6, 0.1)
    tx, tb = g.trachea
    dense -= 0.1 * np.exp(-(((X - tx) / 0.035) ** 2)) * _ramp(tb - Y, 0.05) * _ramp(Y + 1.0, 0.1)

    hx = np.where(X < 0.5 * (g.hila[0] + g.hila[1]), g.hila[0], g.hila[1]).astype(np.float32)
    dxh, dyh = X - hx, Y - g.hila[2]
    dist = np.sqrt(dxh * dxh + dyh * dyh)
    phi = np.arctan2(dyh, dxh)
    dense += 0.08 * np.exp(-((dist / 0.1) ** 2))
    heart = _heart(X, Y, *g.heart)
    # Lungs look denser at apex and base (overlapping soft tissue) than in the mid zones;
    # the aortic knob bulges into the upper mediastinum on a frontal.
    air_keep = 0.78 + 0.22 * np.exp(-(((Y + 0.1) / 0.45) ** 2))
    if g.frontal:
        air_keep *= 1.0 - _ellipse(X, Y, 0.11 + d.u(-0.02, 0.02), -0.36, 0.1, 0.08, soft=0.4)
    lungs = [_lung_mask(X, Y, lung) for lung in g.lungs]
    vessels = _vessels(phi, dist, d.block(8))
    return _Scene(X, Y, g, lungs, phi, dist, heart, dense, air_keep, vessels, np.ones_like(X), np.zeros_like(X))


def _vessels(phi: np.ndarray, dist: np.ndarray, d: _Draws) -> np.ndarray:
    """Branching-looking markings radiating from the hila, thinning towards the periphery."""
    sharp = 1.5 + 9.0 * dist
    out = np.zeros_like(phi)
    for n in (d.u(11, 15), d.u(17, 23)):
        wobble = 1.5 * np.sin(dist * d.u(5, 9) + d.u(0, 6.3))
        # The second factor breaks each line into segments, so they read as vessels, not spokes.
        seg = 0.55 + 0.45 * np.cos(dist * d.u(14, 20) + 3.0 * phi)
        out += 0.6 * np.exp((np.cos(n * phi + wobble) - 1.0) * sharp) * seg
    return out * np.exp(-dist * 2.0)


# --------------------------------------------------------------------------- findings
# Each takes its own draws block and a strength (0 = absent), edits the scene, and returns
# footprints: masks whose bounding boxes are that finding's boxes.


def _cardiomegaly(s: _Scene, d: _Draws, k: float) -> list[np.ndarray]:
    grow, shift = d.u(0.36, 0.44), d.u(0.04, 0.08)
    if k <= 0:
        return []
    cx, cy, ax, ay, tilt = s.geom.heart
    s.heart = _heart(s.X, s.Y, cx + shift * k, cy + 0.03 * k, ax * (1 + grow * k), ay * (1 + 0.12 * k), tilt)
    return [s.heart]


def _effusion(s: _Scene, d: _Draws, k: float) -> list[np.ndarray]:
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
        fluid = mask * _ramp(s.Y - surface, 0.03)
        s.air_keep *= 1.0 - fluid
        s.dense += 0.05 * fluid + 0.06 * mask * np.exp(-(((s.Y - surface) / 0.02) ** 2))
        out.append(fluid)
    return out


def _inside_point(
    s: _Scene, d: _Draws, lateral_lo: float, lateral_hi: float, y_lo: float, y_hi: float
) -> tuple[int, float, float]:
    """A lung (index) and a point in it; `lateral_*` in half-widths from the lung's middle."""
    # On a lateral both lungs overlap: one is enough.
    i = int(d.u() * len(s.lungs)) if s.geom.frontal else 0
    lung = s.geom.lungs[i]
    x0 = lung.cx + lung.side * d.u(lateral_lo, lateral_hi) * lung.ax
    return i, x0, d.u(y_lo, y_hi)


def _lesion(s: _Scene, d: _Draws, k: float) -> list[np.ndarray]:
    _, x0, y0 = _inside_point(s, d, -0.1, 0.6, -0.45, 0.1)
    r, ang = d.u(0.11, 0.16), d.u(0, 6.3)
    if k <= 0:
        return []
    # Two overlapping discs make a lobulated mass rather than a perfect circle.
    x1, y1 = x0 + 0.45 * r * math.cos(ang), y0 + 0.45 * r * math.sin(ang)
    blob = np.maximum(_disc(s, x0, y0, r), 0.85 * _disc(s, x1, y1, 0.7 * r))
    s.dense += 0.4 * k * blob
    return [blob]


def _disc(s: _Scene, x0: float, y0: float, r: float) -> np.ndarray:
    rr = np.sqrt((s.X - x0) ** 2 + (s.Y - y0) ** 2) / r
    return np.clip((1.0 - rr) * 2.5, 0.0, 1.0) ** 0.7


def _consolidation(s: _Scene, d: _Draws, k: float) -> list[np.ndarray]:
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
    region = _ramp(1.0 - (xr / ax) ** 2 - (yr / ay) ** 2, 0.5) * s.lungs[i]
    (a1, b1, p1), (a2, b2, p2) = f
    patch = 0.55 + 0.25 * np.cos(a1 * X + b1 * Y + p1) + 0.2 * np.cos(a2 * X - b2 * Y + p2)
    # Air bronchograms: branches that stay dark inside the opacity.
    air_bronchi = np.exp((np.cos(bronchi * s.hilum_phi + bph) - 1.0) * 10.0)
    fill = np.clip(region * (0.6 + 0.7 * patch), 0.0, 1.0) * (1.0 - 0.5 * air_bronchi) * min(1.0, k)
    s.air_keep *= 1.0 - fill
    return [region]


def _pneumothorax(s: _Scene, d: _Draws, k: float) -> list[np.ndarray]:
    i, _, _ = _inside_point(s, d, 0, 1, 0, 1)
    rim, bottom = d.u(0.12, 0.18), d.u(0.0, 0.3)
    if k <= 0:
        return []
    lung, mask = s.geom.lungs[i], s.lungs[i]
    half = lung.ax * np.sqrt(np.clip((s.Y - lung.top) * (1.0 / 0.55), 0.0, 1.0))
    off = lung.side * (s.X - lung.cx)  # > 0 towards the chest wall
    edge = half - rim * k  # the visceral pleural line, parallel to the chest wall
    gate = _ramp(off + 0.3 * lung.ax, 0.1) * _ramp(bottom - s.Y, 0.08) * mask
    region = _ramp(off - edge, 0.02) * gate
    s.vessel_keep *= 1.0 - region
    s.extra_air += 0.15 * region
    s.dense += 0.12 * np.exp(-(((off - edge) / 0.012) ** 2)) * gate
    return [region]


def _devices(s: _Scene, d: _Draws, k: float) -> list[np.ndarray]:
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
            box = _ramp(0.07 - np.abs(s.X - gx), 0.02) * _ramp(0.05 - np.abs(s.Y - gy), 0.02)
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
    return _ramp(half_width - np.sqrt(best), 0.012)


_FINDING_DRAW = {
    "Cardiomegaly": _cardiomegaly,
    "Lung Lesion": _lesion,
    "Consolidation": _consolidation,
    "Pneumothorax": _pneumothorax,
    "Pleural Effusion": _effusion,
    "Support Devices": _devices,
}


# --------------------------------------------------------------------------- rendering


def _strength(value: float, d: _Draws) -> float:
    """1 -> clearly present; -1 -> half the time faint, half the time absent; else absent."""
    full, coin, faint = d.u(0.85, 1.15), d.u(), d.u(0.3, 0.6)
    if value == 1.0:
        return full
    if value == -1.0:
        return faint if coin < 0.5 else 0.0
    return 0.0


def _bbox(mask: np.ndarray, frac: float = 0.15) -> tuple[int, int, int, int] | None:
    peak = float(mask.max())
    if peak <= 1e-3:
        return None
    on = mask >= frac * peak
    rows, cols = np.flatnonzero(on.any(axis=1)), np.flatnonzero(on.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)


def render_study(
    rng: np.random.Generator, findings: dict[str, float], size: int, view: str = FRONTAL
) -> tuple[np.ndarray, list[Box]]:
    """One grayscale uint8 radiograph and its boxes (finding, x, y, w, h) in pixel coordinates.

    `findings` maps names in SYNTHETIC_FINDINGS to 1.0 (positive), 0.0 (negative) or -1.0
    (uncertain; drawn faintly or not at all); missing names are negative. Boxes are returned
    for positives only. The rng is consumed identically whatever the findings.
    """
    img, boxes = render_study_unit(rng, findings, size, view)
    return (img * 255.0 + 0.5).astype(np.uint8), boxes


def render_study_unit(
    rng: np.random.Generator, findings: dict[str, float], size: int, view: str = FRONTAL
) -> tuple[np.ndarray, list[Box]]:
    """render_study before its 8-bit rounding: float32 (H, W) in [0, 1] and the same boxes.

    For writers that keep more than 8 bits (the DICOM fixture stores 12); the same rng state
    gives the same picture as render_study.
    """
    if view not in (FRONTAL, LATERAL):
        raise ValueError(f"view must be {FRONTAL!r} or {LATERAL!r}, got {view!r}")
    unknown = set(findings) - set(SYNTHETIC_FINDINGS)
    if unknown:
        raise ValueError(f"unknown findings {sorted(unknown)}; the generator draws {list(SYNTHETIC_FINDINGS)}")
    d = _Draws(rng.random(256))
    geom = (_frontal_geom if view == FRONTAL else _lateral_geom)(d.block(16))
    X, Y = _pose(size, d.block(8))
    scene = _anatomy(X, Y, geom, d.block(24))
    boxes: list[Box] = []
    for name in SYNTHETIC_FINDINGS:
        value = float(findings.get(name, 0.0))
        k = _strength(value, d.block(3)) * geom.weak
        for mask in _FINDING_DRAW[name](scene, d.block(16), k):
            box = _bbox(mask)
            if value == 1.0 and box is not None:
                boxes.append((name, *box))
    return _expose(scene, d.block(12), rng.standard_normal((size, size), dtype=np.float32)), boxes


def _expose(s: _Scene, d: _Draws, noise: np.ndarray) -> np.ndarray:
    """Scene -> film in [0, 1] (float32): air darkens, markings show in aerated lung, then
    exposure and noise."""
    air = np.maximum.reduce(s.lungs) * (1.0 - s.heart) * s.air_keep
    a = s.dense + 0.04 * s.heart + 0.04 - (0.34 + s.extra_air) * air
    a += 0.13 * s.vessels * air * s.vessel_keep
    for _ in range(2):  # low-frequency exposure non-uniformity
        a += d.u(0.0, 0.03) * np.cos(d.u(-3, 3) * s.X + d.u(-3, 3) * s.Y + d.u(0, 6.3))
    a = d.u(-0.05, 0.06) + d.u(0.85, 1.2) * a + d.u(0.012, 0.03) * noise
    return np.clip(a, 0.0, 1.0) ** d.u(0.85, 1.2)


# --------------------------------------------------------------------------- labels


@dataclass(frozen=True)
class _Rate:
    prevalence: float  # target share of train images labelled positive
    persist: float  # P(present in a study | the patient carries it): findings follow patients
    uncertain: float  # P(labelled -1) per train study
    explicit_negative: float  # P(a negative is written 0.0 rather than left blank)

    def carrier(self) -> float:
        return min(1.0, 0.8 * self.prevalence / self.persist)

    def background(self) -> float:
        q = self.carrier()
        return max(0.0, (self.prevalence - q * self.persist) / max(1e-9, 1.0 - q))


# Rare findings nudged up to ~10% so small test sets still hold positives.
RATES: dict[str, _Rate] = {
    "Cardiomegaly": _Rate(0.12, 0.9, 0.04, 0.15),
    "Lung Lesion": _Rate(0.1, 0.9, 0.03, 0.05),
    "Consolidation": _Rate(0.1, 0.55, 0.06, 0.15),
    "Pneumothorax": _Rate(0.09, 0.55, 0.04, 0.35),
    "Pleural Effusion": _Rate(0.38, 0.75, 0.06, 0.25),
    "Support Devices": _Rate(0.5, 0.85, 0.03, 0.05),
}
_PATHOLOGY = tuple(n for n in CHEXPERT_14 if n not in ("No Finding", "Support Devices"))


@dataclass(frozen=True)
class _Study:
    split: str
    patient: str
    patient_index: int
    study: int
    sex: str
    age: int
    ap_pa: str
    lateral: bool
    labels: dict[str, float | None]  # all 14 columns; None = blank

    def render_findings(self) -> dict[str, float]:
        return {n: (self.labels[n] if self.labels[n] is not None else 0.0) for n in SYNTHETIC_FINDINGS}


def _state(rng: np.random.Generator, rate: _Rate, carrier: bool, train: bool) -> float:
    unc, pos = rng.random(), rng.random()
    if train and unc < rate.uncertain:
        return -1.0
    return 1.0 if pos < (rate.persist if carrier else rate.background()) else 0.0


def _pick(rng: np.random.Generator, options: list[tuple[float, float]]) -> float | None:
    """Return the value of the first (probability, value) that fires, else blank."""
    x = rng.random()
    for p, value in options:
        if x < p:
            return value
        x -= p
    return None


def _derived(rng: np.random.Generator, s: dict[str, float]) -> dict[str, float | None]:
    """Columns the generator does not draw, labelled the way a report labeler would:
    from the drawn findings they go with, else blank. Edema, Pleural Other, Fracture: blank."""
    heart, consol = s["Cardiomegaly"], s["Consolidation"]
    if heart == 1.0:
        mediastinum = [(0.35, 1.0), (0.15, -1.0)]
    else:
        mediastinum = [(0.3, -1.0)] if heart == -1.0 else [(0.03, 0.0)]
    if consol != 0.0:
        opacity = [(0.85, 1.0)] if consol == 1.0 else [(0.5, -1.0)]
    elif s["Lung Lesion"] == 1.0 or s["Pleural Effusion"] == 1.0:
        opacity = [(0.3, 1.0)] if s["Lung Lesion"] == 1.0 else [(0.15, 1.0)]
    else:
        opacity = []
    out: dict[str, float | None] = dict.fromkeys(CHEXPERT_14)
    out["Enlarged Cardiomediastinum"] = _pick(rng, mediastinum)
    out["Lung Opacity"] = _pick(rng, opacity)
    out["Pneumonia"] = _pick(rng, [(0.25, 1.0), (0.35, -1.0)] if consol == 1.0 else [])
    # Compressive atelectasis next to an effusion.
    out["Atelectasis"] = _pick(rng, [(0.08, 1.0), (0.08, -1.0)] if s["Pleural Effusion"] == 1.0 else [])
    return out


def _labels(rng: np.random.Generator, states: dict[str, float], train: bool) -> dict[str, float | None]:
    out = _derived(rng, states)
    for name, value in states.items():
        explicit = rng.random() < RATES[name].explicit_negative
        out[name] = value if value != 0.0 or explicit else None
    sick = any(out[n] in (1.0, -1.0) for n in _PATHOLOGY)
    out["No Finding"] = None if sick else 1.0
    if not train:  # radiologist consensus: every column 0 or 1
        out = {n: 1.0 if v == 1.0 else 0.0 for n, v in out.items()}
    return out


def _plan_patient(config: SynthConfig, index: int, split: str, patient: str) -> list[_Study]:
    rng = np.random.default_rng([config.seed, index, 0])
    train = split == "train"
    sex = "Male" if rng.random() < 0.58 else "Female"
    age = int(np.clip(round(rng.normal(61.0, 17.0)), 18, 90))
    carrier = {n: bool(rng.random() < RATES[n].carrier()) for n in SYNTHETIC_FINDINGS}
    weights = 1.0 / np.arange(1, config.max_studies + 1) ** 1.2
    n_studies = 1 + int(rng.choice(config.max_studies, p=weights / weights.sum())) if train else 1
    studies = []
    for k in range(1, n_studies + 1):
        states = {n: _state(rng, RATES[n], carrier[n], train) for n in SYNTHETIC_FINDINGS}
        labels = _labels(rng, states, train)
        ap = "AP" if rng.random() < (0.85 if states["Support Devices"] == 1.0 else 0.55) else "PA"
        lateral = bool(rng.random() < config.lateral_fraction)
        studies.append(_Study(split, patient, index, k, sex, min(90, age + (k - 1) // 2), ap, lateral, labels))
    return studies


def plan_studies(config: SynthConfig) -> list[_Study]:
    """Every study the generator writes for `config` (patients, labels, views), in write order."""
    return _plan(config)


def image_rng(config: SynthConfig, st: _Study, view_no: int) -> np.random.Generator:
    """The rng that renders view `view_no` (1-based) of study `st`: one picture, whatever the writer."""
    return np.random.default_rng([config.seed, st.patient_index, st.study, view_no])


def study_images(st: _Study) -> list[tuple[int, str, str]]:
    """(view number, FRONTAL/LATERAL, CheXpert path of its JPEG) for each image of the study."""
    views = [FRONTAL, LATERAL] if st.lateral else [FRONTAL]
    return [(n, view, f"{ROOT_NAME}/{st.split}/{st.patient}/study{st.study}/view{n}_{view}.jpg")
            for n, view in enumerate(views, start=1)]


def _plan(config: SynthConfig) -> list[_Study]:
    n_valid = min(config.n_patients - 1, round(config.n_patients * config.valid_fraction))
    n_train = config.n_patients - n_valid
    first_valid = max(VALID_FIRST_ID, n_train + 1)
    studies: list[_Study] = []
    for i in range(config.n_patients):
        split, number = ("train", i + 1) if i < n_train else ("valid", first_valid + i - n_train)
        studies += _plan_patient(config, i, split, f"patient{number:05d}")
    return studies


# --------------------------------------------------------------------------- writing


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def _csv_row(rel: str, st: _Study, view: str) -> list[str]:
    frontal = view == FRONTAL
    head = [rel, st.sex, str(st.age), "Frontal" if frontal else "Lateral", st.ap_pa if frontal else ""]
    return head + [_fmt(st.labels[n]) for n in CHEXPERT_14]


def _write_csv(path: Path, header: tuple[str, ...], rows: list[list[str]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def write_synthetic_chexpert(
    out: str | Path, config: SynthConfig = SynthConfig(), progress: bool = False
) -> SynthSummary:
    """Generate the dataset under OUT/CheXpert-v1.0-small and return where everything is.

    Existing files are overwritten; stray images from an earlier, larger run stay on disk
    but are not listed in the CSVs, which define the dataset.
    """
    t0 = time.perf_counter()
    out = Path(out)
    root = out / ROOT_NAME
    root.mkdir(parents=True, exist_ok=True)
    studies = _plan(config)
    rows: dict[str, list[list[str]]] = {"train": [], "valid": []}
    boxes: list[list[str]] = []
    bar = _progress(len(studies), progress)
    for st in studies:
        for view_no, view, rel in study_images(st):
            img, bxs = render_study(image_rng(config, st, view_no), st.render_findings(), config.size, view)
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(out / rel, quality=config.jpeg_quality)
            rows[st.split].append(_csv_row(rel, st, view))
            if view == FRONTAL:
                boxes += [[rel, name, str(x), str(y), str(w), str(h)] for name, x, y, w, h in bxs]
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    paths = {name: root / f"{name}.csv" for name in ("train", "valid", "boxes")}
    _write_csv(paths["train"], CSV_HEADER, rows["train"])
    _write_csv(paths["valid"], CSV_HEADER, rows["valid"])
    _write_csv(paths["boxes"], BOX_HEADER, boxes)
    all_rows = rows["train"] + rows["valid"]
    cols = {n: CSV_HEADER.index(n) for n in SYNTHETIC_FINDINGS}
    prevalence = {n: sum(r[c] == "1.0" for r in all_rows) / max(1, len(all_rows)) for n, c in cols.items()}
    seconds = time.perf_counter() - t0
    log.info("synthetic CheXpert: %d images of %d patients in %.1fs -> %s",
             len(all_rows), config.n_patients, seconds, root)
    return SynthSummary(root, len(all_rows), config.n_patients, paths["train"], paths["valid"], paths["boxes"],
                        prevalence, seconds)


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="study", desc="synthetic CXR")
