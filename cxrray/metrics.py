"""AUROC, F1-optimal thresholds, bootstrap intervals, confusion matrices. Pure numpy/sklearn.

NaN targets are masked per class. A class whose supervised targets hold a single value has
no AUROC; it is reported with a reason instead of a NaN that crashes a report downstream.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

from cxrray.labels import MULTICLASS, LabelSpace


@dataclass
class ClassMetrics:
    name: str
    n: int
    n_pos: int
    auroc: float | None
    note: str = ""  # why auroc is None
    auroc_ci: tuple[float, float] | None = None
    threshold: float | None = None
    sensitivity: float | None = None
    specificity: float | None = None
    f1: float | None = None


@dataclass
class Metrics:
    per_class: list[ClassMetrics]
    mean_auroc: float | None
    accuracy: float | None = None
    confusion: list[list[int]] | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)

    def auroc_by_class(self) -> dict[str, float | None]:
        return {c.name: c.auroc for c in self.per_class}


def _supervised(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m = ~np.isnan(y)
    return y[m], p[m]


def auroc(y: np.ndarray, p: np.ndarray) -> tuple[float | None, str]:
    y, p = _supervised(np.asarray(y, np.float64), np.asarray(p, np.float64))
    if len(y) == 0:
        return None, "no supervised labels"
    if len(np.unique(y)) < 2:
        return None, f"only one label value ({int(y[0])}) in {len(y)} images"
    return float(roc_auc_score(y, p)), ""


def best_f1_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The probability cut that maximises F1 (0.5 when undefined)."""
    y, p = _supervised(np.asarray(y, np.float64), np.asarray(p, np.float64))
    if len(y) == 0 or y.sum() == 0 or y.sum() == len(y):
        return 0.5
    order = np.argsort(-p)
    ps, ys = p[order], y[order]
    tp = np.cumsum(ys)
    fp = np.cumsum(1 - ys)
    f1 = 2 * tp / (tp + fp + ys.sum())
    # Only cut between distinct scores, so the threshold reproduces the counted F1.
    distinct = np.r_[ps[1:] != ps[:-1], True]
    i = int(np.argmax(np.where(distinct, f1, -1)))
    nxt = ps[i + 1] if i + 1 < len(ps) else ps[i] - 1e-6
    return float((ps[i] + nxt) / 2) if i + 1 < len(ps) else float(ps[i])


def best_f1_thresholds(targets: np.ndarray, probs: np.ndarray) -> list[float]:
    return [best_f1_threshold(targets[:, k], probs[:, k]) for k in range(targets.shape[1])]


def operating_point(y: np.ndarray, p: np.ndarray, threshold: float) -> tuple[float | None, float | None, float | None]:
    y, p = _supervised(np.asarray(y, np.float64), np.asarray(p, np.float64))
    pred = p >= threshold
    tp = float(np.sum(pred & (y == 1)))
    fn = float(np.sum(~pred & (y == 1)))
    tn = float(np.sum(~pred & (y == 0)))
    fp = float(np.sum(pred & (y == 0)))
    sens = tp / (tp + fn) if tp + fn else None
    spec = tn / (tn + fp) if tn + fp else None
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None
    return sens, spec, f1


def bootstrap_auroc_ci(y: np.ndarray, p: np.ndarray, *, n_boot: int = 1000, seed: int = 0,
                       alpha: float = 0.05) -> tuple[float, float] | None:
    """Percentile bootstrap over images (a patient-level bootstrap would need patient ids)."""
    y, p = _supervised(np.asarray(y, np.float64), np.asarray(p, np.float64))
    if len(np.unique(y)) < 2:
        return None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(y), size=(n_boot, len(y)))
    stats = []
    for row in idx:
        yb = y[row]
        if 0 < yb.sum() < len(yb):
            stats.append(roc_auc_score(yb, p[row]))
    if not stats:
        return None
    lo, hi = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def compute_metrics(
    space: LabelSpace,
    targets: np.ndarray,
    probs: np.ndarray,
    *,
    thresholds: list[float] | None = None,
    bootstrap: int = 0,
    seed: int = 0,
) -> Metrics:
    """Per-class AUROC (+CI), operating points at `thresholds`, mean AUROC; multi-class adds
    accuracy and a confusion matrix. `targets` are eval targets (NaN masked)."""
    targets = np.asarray(targets, np.float64)
    probs = np.asarray(probs, np.float64)
    per = []
    for k, name in enumerate(space.names):
        y = targets[:, k]
        a, note = auroc(y, probs[:, k])
        sup = y[~np.isnan(y)]
        cm = ClassMetrics(name, int(len(sup)), int(np.sum(sup == 1)), a, note)
        if bootstrap and a is not None:
            cm.auroc_ci = bootstrap_auroc_ci(y, probs[:, k], n_boot=bootstrap, seed=seed)
        if thresholds is not None:
            cm.threshold = float(thresholds[k])
            cm.sensitivity, cm.specificity, cm.f1 = operating_point(y, probs[:, k], thresholds[k])
        per.append(cm)
    valid = [c.auroc for c in per if c.auroc is not None]
    out = Metrics(per, float(np.mean(valid)) if valid else None)
    if space.task == MULTICLASS:
        rows = ~np.isnan(targets).any(axis=1)
        yt, yp = targets[rows].argmax(1), probs[rows].argmax(1)
        out.accuracy = float(np.mean(yt == yp)) if rows.any() else None
        out.confusion = confusion_matrix(yt, yp, labels=list(range(space.num_classes))).tolist()
    return out


def roc_points(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    y, p = _supervised(np.asarray(y, np.float64), np.asarray(p, np.float64))
    if len(np.unique(y)) < 2:
        return None
    fpr, tpr, _ = roc_curve(y, p)
    return fpr, tpr
