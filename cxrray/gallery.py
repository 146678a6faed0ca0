"""A Grad-CAM gallery for an evaluation: for each class, the split's most confident true
positives and false positives with that class's heatmap, one PNG per class (matplotlib, Agg).

A reviewer sees in one picture whether the model looks at the finding on the cases it gets
right, and what misleads it on the cases it gets wrong. "True positive" and "false positive"
mean what they mean at the artifact's operating point (`Predictor.decisions`: the stored
per-class thresholds, or the arg max for a multi-class head): an image below the threshold is
never shown as a positive, so a class can have fewer than k of either, or none.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: jobs and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cxrray.explain import display_image, gradcam, logit_index, overlay_rgb, upsample_map  # noqa: E402
from cxrray.imaging import ImageError, load_image  # noqa: E402
from cxrray.labels import MULTICLASS, sanitize  # noqa: E402
from cxrray.transforms import load_resized  # noqa: E402

if TYPE_CHECKING:
    from cxrray.predict import Predictor

log = logging.getLogger(__name__)

KINDS = ("TP", "FP")


def pick_examples(targets: np.ndarray, probs: np.ndarray, decisions: np.ndarray, k: int) -> list[dict[str, list[int]]]:
    """Per class {"TP": rows, "FP": rows}: the k true positives (truth 1, predicted positive)
    and the k false positives (truth 0, predicted positive) with the highest probability of
    that class, highest first (ties: the earlier row). NaN truth (unknown) is neither."""
    targets, probs, decisions = np.asarray(targets), np.asarray(probs), np.asarray(decisions, bool)
    if not (targets.shape == probs.shape == decisions.shape) or targets.ndim != 2:
        raise ValueError(f"targets {targets.shape}, probs {probs.shape}, decisions {decisions.shape}: "
                         "need three [N, K] arrays")
    out = []
    for c in range(targets.shape[1]):
        order = np.argsort(-probs[:, c], kind="stable")
        picks = {}
        for kind, truth in zip(KINDS, (1.0, 0.0)):
            chosen = order[(targets[order, c] == truth) & decisions[order, c]]
            picks[kind] = [int(i) for i in chosen[:k]]
        out.append(picks)
    return out


def _short(path: str, width: int = 30) -> str:
    """The last parts of a path, enough to find the file (CheXpert's names repeat per study)."""
    tail = "/".join(str(path).replace("\\", "/").split("/")[-3:])
    return tail if len(tail) <= width else "…" + tail[-(width - 1):]


def _decode(predictor: Predictor, paths: Sequence[str], rows: Sequence[int], max_side: int) -> dict[int, tuple]:
    """row -> (model input uint8 [1,S,S], picture uint8 (h, w)); the model input made exactly
    as scoring makes it (transforms.load_resized), the picture from the full decode.
    Unreadable files are left out."""
    out = {}
    for i in rows:
        limits = {"max_pixels": predictor.max_pixels, "max_bytes": predictor.max_bytes}
        try:
            image, _ = load_resized(paths[i], predictor.preprocess, **limits)
            pixels = load_image(paths[i], **limits)
        except ImageError as e:
            log.warning("gallery: skipping %s: %s", paths[i], e)
            continue
        out[i] = (image, display_image(pixels, max_side))
    return out


def _low_maps(predictor: Predictor, images: dict[int, tuple], jobs: list[tuple[int, int]], batch_size: int) -> list[np.ndarray]:
    """Low-resolution Grad-CAM maps for (row, class) jobs, computed in batches."""
    space, layer = predictor.label_space, predictor.meta.gradcam_layer
    maps: list[np.ndarray] = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        x = np.stack([images[i][0] for i, _ in chunk])
        _, low = gradcam(predictor.model, x, layer, [logit_index(space, c) for _, c in chunk])
        maps.extend(low)
    return maps


def _figure(name: str, subtitle: str, cells: dict[str, list[tuple]], k: int, out: Path) -> Path:
    """One class: a row of true positives over a row of false positives, k columns."""
    # Constrained layout keeps the two-line titles clear of the suptitle and of each other.
    fig, axes = plt.subplots(2, k, figsize=(3.3 * k, 7.6), dpi=110, squeeze=False, layout="constrained")
    for r, kind in enumerate(KINDS):
        label = "true positive" if kind == "TP" else "false positive"
        for j in range(k):
            ax = axes[r, j]
            ax.set_axis_off()
            if j < len(cells[kind]):
                rgb, prob, path = cells[kind][j]
                ax.imshow(rgb, interpolation="antialiased")
                colour = "tab:green" if kind == "TP" else "tab:red"
                ax.set_title(f"{kind} · p = {prob:.3f}\n{_short(path)}", fontsize=10, color=colour)
            elif j == 0:
                ax.text(0.5, 0.5, f"no {label}\nat the operating point", ha="center", va="center",
                        fontsize=11, color="grey", transform=ax.transAxes)
    fig.suptitle(f"Grad-CAM · {name}\n{subtitle}", fontsize=12)
    fig.savefig(out)
    plt.close(fig)
    return out


def gradcam_gallery(
    predictor: Predictor,
    paths: Sequence[str],
    targets: np.ndarray,
    probs: np.ndarray,
    out_dir: str | Path,
    *,
    k: int = 4,
    max_side: int = 512,
    split: str = "test",
    prefix: str = "gradcam_gallery",
    batch_size: int = 16,
) -> list[Path]:
    """Write `{prefix}_{class}.png` per class into `out_dir` and return the paths, in the
    model's class order (one per class, also for a class with nothing to show).

    predictor: a `cxrray.predict.Predictor`; paths, targets [N, K] (1/0/NaN) and probs [N, K]
    row-aligned (the readable rows of an evaluation). Heatmaps are the class's Grad-CAM,
    drawn on each picture at its own resolution with the long side capped at `max_side`.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    space = predictor.label_space
    probs = np.asarray(probs, np.float32)
    picks = pick_examples(targets, probs, predictor.decisions(probs), k)
    rows = sorted({i for p in picks for kind in KINDS for i in p[kind]})
    images = _decode(predictor, list(paths), rows, max_side)
    jobs = [(i, c) for c, p in enumerate(picks) for kind in KINDS for i in p[kind] if i in images]
    maps = dict(zip(jobs, _low_maps(predictor, images, jobs, batch_size)))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for c, name in enumerate(space.names):
        cells = {}
        for kind in KINDS:
            cells[kind] = []
            for i in picks[c][kind]:
                if (i, c) in maps:
                    picture = images[i][1]
                    rgb = overlay_rgb(picture, upsample_map(maps[(i, c)], *picture.shape))
                    cells[kind].append((rgb, float(probs[i, c]), str(paths[i])))
        point = "arg max" if space.task == MULTICLASS else f"threshold {float(predictor.thresholds[c]):.3f}"
        subtitle = f"most confident true positives (top) and false positives (bottom), {split} split, {point}"
        written.append(_figure(name, subtitle, cells, k, out_dir / f"{prefix}_{sanitize(name)}.png"))
    log.info("gallery: %d Grad-CAM maps over %d images, %d figures in %s", len(jobs), len(images), len(written),
             out_dir)
    return written
