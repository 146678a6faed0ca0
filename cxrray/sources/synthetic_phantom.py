"""The synthetic phantom: a normal chest drawn in a patient coordinate frame.

x runs right on the image, y down, both about [-1, 1]. Each image gets its own pose (shift,
scale, a few degrees of rotation), its own build (frontal or lateral geometry) and its own
anatomy (body, spine, ribs, clavicles, trachea, hila, heart, lungs, vessels), all drawn with
vectorised numpy from fixed blocks of uniforms (`Draws`), so that what one part of the picture
draws never moves another's numbers. `cxrray.sources.synthetic_findings` edits the `Scene` this
builds; `cxrray.sources.synthetic_render` exposes it onto film.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

# --------------------------------------------------------------------------- random draws


class Draws:
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

    def block(self, n: int) -> "Draws":
        b = Draws(self._v[self._i : self._i + n])
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


def frontal_geom(d: Draws) -> _Geom:
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


def lateral_geom(d: Draws) -> _Geom:
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


def pose(size: int, d: Draws) -> tuple[np.ndarray, np.ndarray]:
    """Image grid -> patient frame: small shift, scale and rotation per image."""
    u, v = _grid(size)
    dx, dy, s = d.u(-0.05, 0.05), d.u(-0.05, 0.05), d.u(0.9, 1.05)
    th = math.radians(d.u(-4.0, 4.0))
    c, n = math.cos(th) / s, math.sin(th) / s
    x, y = u - dx, v - dy
    return (c * x - n * y).astype(np.float32), (n * x + c * y).astype(np.float32)


def ramp(x: np.ndarray, width: float) -> np.ndarray:
    """Soft step from 0 to 1 over `width`, centred on x = 0 (cheaper than a sigmoid)."""
    return np.clip(x * (1.0 / width) + 0.5, 0.0, 1.0)


def _ellipse(X: np.ndarray, Y: np.ndarray, cx: float, cy: float, ax: float, ay: float, soft: float) -> np.ndarray:
    e = ((X - cx) / ax) ** 2 + ((Y - cy) / ay) ** 2
    return ramp(1.0 - e, soft)


def _superellipse(X: np.ndarray, Y: np.ndarray, cx: float, cy: float, ax: float, ay: float) -> np.ndarray:
    # Exponent 2.6: a boxier trunk with shoulders, not an egg.
    e = np.abs((X - cx) / ax) ** 2.6 + np.abs((Y - cy) / ay) ** 2.6
    return ramp(1.0 - e, 0.35)


def heart_mask(X: np.ndarray, Y: np.ndarray, cx: float, cy: float, ax: float, ay: float, tilt: float) -> np.ndarray:
    c, n = math.cos(tilt), math.sin(tilt)
    xr, yr = (X - cx) * c + (Y - cy) * n, (Y - cy) * c - (X - cx) * n
    body = ramp(1.0 - (xr / ax) ** 2 - (yr / ay) ** 2, 0.3)
    # Below its middle the heart rests on the diaphragm: no lung may show underneath.
    base = ramp(Y - cy, 0.05) * ramp(cy + ay - Y, 0.05) * ramp(1.0 - ((X - cx) / (0.85 * ax)) ** 2, 0.3)
    return np.maximum(body, base)


def _lung_mask(X: np.ndarray, Y: np.ndarray, lung: _Lung) -> np.ndarray:
    # Half width grows like a parabola from the apex, then the diaphragm cuts the base: a sharp
    # lateral costophrenic angle, which is what an effusion blunts.
    half = lung.ax * np.sqrt(np.clip((Y - lung.top) * (1.0 / 0.55), 0.0, 1.0))
    t = np.clip((X - lung.cx) / lung.ax, -1.0, 1.0)
    dia = lung.base - lung.dome * (1.0 - t * t)
    # The -0.025 puts the ramp's foot on the boundary, so nothing leaks above the apex.
    return ramp(half - np.abs(X - lung.cx) - 0.025, 0.05) * ramp(dia - Y, 0.03)


# --------------------------------------------------------------------------- anatomy


@dataclass
class Scene:
    X: np.ndarray
    Y: np.ndarray
    geom: _Geom
    lungs: list[np.ndarray]
    hilum_phi: np.ndarray  # angle about the nearer hilum (vessels, air bronchograms radiate from it)
    heart: np.ndarray
    dense: np.ndarray  # additive brightness (bone, devices, masses)
    air_keep: np.ndarray  # 1 = aerated, 0 = filled with fluid/tissue
    vessels: np.ndarray
    vessel_keep: np.ndarray  # 1 where lung markings show
    extra_air: np.ndarray  # pneumothorax: more air than normal lung


def anatomy(X: np.ndarray, Y: np.ndarray, g: _Geom, d: Draws) -> Scene:
    body = np.maximum.reduce([_superellipse(X, Y, *e) for e in g.body])
    ax_ = np.abs(X - g.spine_x)
    spine = np.exp(-(((X - g.spine_x) / g.spine_w) ** 4)) * (0.8 + 0.2 * np.cos(Y * (2 * math.pi / d.u(0.12, 0.15))))
    # Posterior ribs: rise a little from the spine, then arc down to the chest wall.
    period, phase = d.u(0.15, 0.18), d.u(0, 1)
    t = (Y - g.rib_curve * ((ax_ - 0.25) ** 2 - 0.0625) - g.rib_tilt * X) / period + phase
    ribs = np.exp(3.0 * (np.cos(t * (2 * math.pi)) - 1.0)) * ramp(ax_ - 0.08, 0.05) * ramp(0.6 - Y, 0.3)
    dense = 0.5 * body + 0.13 * spine + g.rib_contrast * ribs * body
    if g.frontal:  # clavicles
        yc = -0.68 - 0.22 * (ax_ - 0.1) + d.u(-0.04, 0.04)
        dense += 0.1 * np.exp(-(((Y - yc) / 0.035) ** 2)) * ramp(0.6 - ax_, 0.1) * ramp(ax_ - 0.05, 0.05)
    if g.sternum_x is not None:
        dense += 0.07 * np.exp(-(((X - g.sternum_x) / 0.03) ** 2)) * ramp(0.35 - Y, 0.1) * ramp(Y + 0.6, 0.1)
    tx, tb = g.trachea
    dense -= 0.1 * np.exp(-(((X - tx) / 0.035) ** 2)) * ramp(tb - Y, 0.05) * ramp(Y + 1.0, 0.1)

    hx = np.where(X < 0.5 * (g.hila[0] + g.hila[1]), g.hila[0], g.hila[1]).astype(np.float32)
    dxh, dyh = X - hx, Y - g.hila[2]
    dist = np.sqrt(dxh * dxh + dyh * dyh)
    phi = np.arctan2(dyh, dxh)
    dense += 0.08 * np.exp(-((dist / 0.1) ** 2))
    heart = heart_mask(X, Y, *g.heart)
    # Lungs look denser at apex and base (overlapping soft tissue) than in the mid zones;
    # the aortic knob bulges into the upper mediastinum on a frontal.
    air_keep = 0.78 + 0.22 * np.exp(-(((Y + 0.1) / 0.45) ** 2))
    if g.frontal:
        air_keep *= 1.0 - _ellipse(X, Y, 0.11 + d.u(-0.02, 0.02), -0.36, 0.1, 0.08, soft=0.4)
    lungs = [_lung_mask(X, Y, lung) for lung in g.lungs]
    vessels = _vessels(phi, dist, d.block(8))
    return Scene(X, Y, g, lungs, phi, heart, dense, air_keep, vessels, np.ones_like(X), np.zeros_like(X))


def _vessels(phi: np.ndarray, dist: np.ndarray, d: Draws) -> np.ndarray:
    """Branching-looking markings radiating from the hila, thinning towards the periphery."""
    sharp = 1.5 + 9.0 * dist
    out = np.zeros_like(phi)
    for n in (d.u(11, 15), d.u(17, 23)):
        wobble = 1.5 * np.sin(dist * d.u(5, 9) + d.u(0, 6.3))
        # The second factor breaks each line into segments, so they read as vessels, not spokes.
        seg = 0.55 + 0.45 * np.cos(dist * d.u(14, 20) + 3.0 * phi)
        out += 0.6 * np.exp((np.cos(n * phi + wobble) - 1.0) * sharp) * seg
    return out * np.exp(-dist * 2.0)
