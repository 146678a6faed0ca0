"""One synthetic radiograph: phantom, findings at the strength their label asks for, exposure.

`render_study` is the whole picture for one rng state: the same state gives the same bytes,
and the state is consumed identically whatever the findings, so a picture with and without a
finding differs only where the finding is. A label of -1 (uncertain) is drawn faintly or not
at all, so it is genuinely ambiguous.
"""
from __future__ import annotations

import numpy as np

from cxrray.labels import SYNTHETIC_FINDINGS
from cxrray.sources.synthetic_findings import FINDING_DRAW
from cxrray.sources.synthetic_phantom import Draws, Scene, anatomy, frontal_geom, lateral_geom, pose

FRONTAL, LATERAL = "frontal", "lateral"
Box = tuple[str, int, int, int, int]


def _strength(value: float, d: Draws) -> float:
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
    img, boxes, _ = render_study_truth(rng, findings, size, view)
    return img, boxes


def render_study_truth(
    rng: np.random.Generator, findings: dict[str, float], size: int, view: str = FRONTAL
) -> tuple[np.ndarray, list[Box], dict[str, str]]:
    """render_study, plus what was actually drawn per finding: "present" (a positive label),
    "faint" (an uncertain label that drew the finding weakly) or "absent" (a negative, or an
    uncertain label that drew nothing). The generator writes it as truth.csv."""
    img, boxes, truth = _render(rng, findings, size, view)
    return (img * 255.0 + 0.5).astype(np.uint8), boxes, truth


def render_study_unit(
    rng: np.random.Generator, findings: dict[str, float], size: int, view: str = FRONTAL
) -> tuple[np.ndarray, list[Box]]:
    """render_study before its 8-bit rounding: float32 (H, W) in [0, 1] and the same boxes.

    For writers that keep more than 8 bits (the DICOM fixture stores 12); the same rng state
    gives the same picture as render_study.
    """
    unit, boxes, _ = _render(rng, findings, size, view)
    return unit, boxes


def _render(rng: np.random.Generator, findings: dict[str, float], size: int,
            view: str) -> tuple[np.ndarray, list[Box], dict[str, str]]:
    if view not in (FRONTAL, LATERAL):
        raise ValueError(f"view must be {FRONTAL!r} or {LATERAL!r}, got {view!r}")
    unknown = set(findings) - set(SYNTHETIC_FINDINGS)
    if unknown:
        raise ValueError(f"unknown findings {sorted(unknown)}; the generator draws {list(SYNTHETIC_FINDINGS)}")
    d = Draws(rng.random(256))
    geom = (frontal_geom if view == FRONTAL else lateral_geom)(d.block(16))
    X, Y = pose(size, d.block(8))
    scene = anatomy(X, Y, geom, d.block(24))
    boxes: list[Box] = []
    truth: dict[str, str] = {}
    for name in SYNTHETIC_FINDINGS:
        value = float(findings.get(name, 0.0))
        strength = _strength(value, d.block(3))
        truth[name] = "absent" if strength == 0.0 else "present" if value == 1.0 else "faint"
        for mask in FINDING_DRAW[name](scene, d.block(16), strength * geom.weak):
            box = _bbox(mask)
            if value == 1.0 and box is not None:
                boxes.append((name, *box))
    return _expose(scene, d.block(12), rng.standard_normal((size, size), dtype=np.float32)), boxes, truth


def _expose(s: Scene, d: Draws, noise: np.ndarray) -> np.ndarray:
    """Scene -> film in [0, 1] (float32): air darkens, markings show in aerated lung, then
    exposure and noise."""
    air = np.maximum.reduce(s.lungs) * (1.0 - s.heart) * s.air_keep
    a = s.dense + 0.04 * s.heart + 0.04 - (0.34 + s.extra_air) * air
    a += 0.13 * s.vessels * air * s.vessel_keep
    for _ in range(2):  # low-frequency exposure non-uniformity
        a += d.u(0.0, 0.03) * np.cos(d.u(-3, 3) * s.X + d.u(-3, 3) * s.Y + d.u(0, 6.3))
    a = d.u(-0.05, 0.06) + d.u(0.85, 1.2) * a + d.u(0.012, 0.03) * noise
    return np.clip(a, 0.0, 1.0) ** d.u(0.85, 1.2)
