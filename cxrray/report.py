"""Plots people would rather look at than read: ROC curves and training curves (matplotlib)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: jobs and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cxrray.labels import LabelSpace  # noqa: E402
from cxrray.metrics import Metrics, roc_points  # noqa: E402


def plot_roc_curves(space: LabelSpace, targets: np.ndarray, probs: np.ndarray, metrics: Metrics,
                    out: str | Path, title: str = "ROC curves") -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 6), dpi=110)
    for k, name in enumerate(space.names):
        pts = roc_points(targets[:, k], probs[:, k])
        cm = metrics.per_class[k]
        if pts is None:
            continue
        ci = f" [{cm.auroc_ci[0]:.2f}-{cm.auroc_ci[1]:.2f}]" if cm.auroc_ci else ""
        line, = ax.plot(*pts, lw=1.8, label=f"{name}: {cm.auroc:.3f}{ci}")
        if cm.sensitivity is not None and cm.specificity is not None:
            ax.plot(1 - cm.specificity, cm.sensitivity, "o", color=line.get_color(), ms=5)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    mean = f" (mean AUROC {metrics.mean_auroc:.3f})" if metrics.mean_auroc is not None else ""
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title + mean, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8, title="AUROC [95% CI]; dot = threshold")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_training_curves(history: list[dict], out: str | Path) -> Path | None:
    if not history:
        return None
    epochs = [r["epoch"] for r in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    a1.plot(epochs, [r.get("train_loss") for r in history], "o-", label="train loss")
    a1.plot(epochs, [r.get("val_loss") for r in history], "o-", label="validation loss")
    a1.set(xlabel="epoch", ylabel="loss", title="Loss")
    a1.legend()
    a2.plot(epochs, [r.get("val_mean_auroc") for r in history], "o-", color="tab:green")
    a2.set(xlabel="epoch", ylabel="mean AUROC", title="Validation mean AUROC", ylim=(0.4, 1.0))
    for a in (a1, a2):
        a.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out)
    plt.close(fig)
    return out
