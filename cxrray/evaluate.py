"""Evaluate an artifact on a manifest split: AUROC with bootstrap CIs, operating points at the
stored thresholds, ROC and training curves, a Grad-CAM gallery, a JSON and a Markdown report."""
from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from cxrray import storage
from cxrray.console import Progress
from cxrray.gallery import gradcam_gallery
from cxrray.heads import eval_targets
from cxrray.labels import sanitize
from cxrray.manifest import read_manifest
from cxrray.metrics import Metrics, compute_metrics
from cxrray.predict import Predictor, predict_paths
from cxrray.report import plot_roc_curves, plot_training_curves

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    metrics: Metrics
    n_images: int
    n_errors: int
    outputs: dict[str, str]
    model_id: str

    def to_dict(self) -> dict:
        return {"mean_auroc": self.metrics.mean_auroc, "accuracy": self.metrics.accuracy, "n_images": self.n_images,
                "n_errors": self.n_errors, "model_id": self.model_id, "outputs": self.outputs,
                "per_class": {c.name: {"auroc": c.auroc, "auroc_ci": c.auroc_ci, "n": c.n, "n_pos": c.n_pos,
                                       "note": c.note, "threshold": c.threshold, "sensitivity": c.sensitivity,
                                       "specificity": c.specificity, "f1": c.f1} for c in self.metrics.per_class}}


def markdown_report(res: EvalResult, split: str, manifest: str, gallery: Sequence[tuple[str, str]] = ()) -> str:
    """The report; `gallery` lists (class, PNG file name) pairs of the Grad-CAM gallery."""
    m = res.metrics
    lines = [f"# Evaluation of model {res.model_id}", "",
             f"Manifest `{manifest}`, split `{split}`: {res.n_images} images ({res.n_errors} unreadable).", "",
             f"**Mean AUROC: {m.mean_auroc:.4f}**" if m.mean_auroc is not None else "**Mean AUROC: n/a**"]
    if m.accuracy is not None:
        lines.append(f"\n**Accuracy: {m.accuracy:.4f}**")
    lines += ["", "| class | n | positives | AUROC | 95% CI | threshold | sensitivity | specificity | F1 |",
              "|---|---|---|---|---|---|---|---|---|"]

    def f(v):
        return "" if v is None else f"{v:.3f}"

    for c in m.per_class:
        ci = f"{c.auroc_ci[0]:.3f}-{c.auroc_ci[1]:.3f}" if c.auroc_ci else ""
        auroc = f(c.auroc) if c.auroc is not None else f"n/a ({c.note})"
        lines.append(f"| {c.name} | {c.n} | {c.n_pos} | {auroc} | {ci} | {f(c.threshold)} | {f(c.sensitivity)} | "
                     f"{f(c.specificity)} | {f(c.f1)} |")
    if m.confusion is not None:
        lines += ["", "Confusion matrix (rows: truth, columns: prediction):", "", "```"]
        lines += ["  ".join(f"{v:6d}" for v in row) for row in m.confusion] + ["```"]
    lines += ["", "![ROC curves](roc_curves.png)", "", "![Training curves](training_curves.png)", ""]
    if gallery:
        lines += ["## Grad-CAM gallery", "",
                  f"Per class, the most confident true positives (top row) and false positives (bottom row) "
                  f"of the `{split}` split at the stored operating point, with that class's Grad-CAM.", ""]
        for name, file in gallery:
            lines += [f"### {name}", "", f"![Grad-CAM gallery: {name}]({file})", ""]
    return "\n".join(lines)


def _predict(predictor: Predictor, paths: list[str], batch_size: int) -> dict[str, np.ndarray]:
    """predict_paths one batch at a time, for the progress report (a bar on a terminal, a log
    line every CXRRAY_PROGRESS_EVERY_S seconds otherwise)."""
    parts = []
    with Progress("evaluate", len(paths), unit="img", logger=log) as progress:
        for i in range(0, len(paths), batch_size):
            parts.append(predict_paths(predictor, paths[i : i + batch_size], batch_size=batch_size))
            progress.update(len(parts[-1]["error"]))
    if not parts:
        return predict_paths(predictor, [], batch_size=batch_size)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def evaluate(artifact: str | Path, manifest: str | Path, out_dir: str | Path, *, split: str = "test",
             bootstrap: int = 1000, batch_size: int = 64, gallery_k: int = 4) -> EvalResult:
    """gallery_k: true and false positives per class in the Grad-CAM gallery (0: no gallery)."""
    start = time.time()
    for what, path in (("--artifact", artifact), ("--manifest", manifest), ("--out", out_dir)):
        storage.check_store(path, what=what)  # a missing bucket is one line, before any work
    predictor = Predictor(artifact)
    df, manifest_space = read_manifest(manifest)
    space = predictor.label_space
    missing = [n for n in space.names if n not in manifest_space.names]
    if missing:
        raise ValueError(f"{manifest} has no labels for the model's classes {missing}")
    rows = df[df["split"] == split]
    if rows.empty:
        raise ValueError(f"{manifest}: split {split!r} is empty (splits: {df['split'].value_counts().to_dict()})")
    pred = _predict(predictor, rows["path"].tolist(), batch_size)
    ok = np.array([e is None for e in pred["error"]])
    probs = np.stack([pred[c] for c in space.prob_columns], axis=1)[ok]
    import torch

    targets = eval_targets(torch.from_numpy(rows[list(space.columns)].to_numpy(np.float32)[ok]), space).numpy()
    metrics = compute_metrics(space, targets, probs, thresholds=list(predictor.thresholds), bootstrap=bootstrap)
    out = storage.normalize(out_dir)
    with tempfile.TemporaryDirectory(prefix="cxrray-eval-") as tmp:
        # Written locally, then published file by file: out may be a bucket prefix.
        local = Path(tmp)
        files = {"roc_curves": plot_roc_curves(space, targets, probs, metrics, local / "roc_curves.png",
                                               title=f"ROC, {split} split")}
        curves = plot_training_curves(predictor.meta.summary.get("history", []), local / "training_curves.png")
        if curves:
            files["training_curves"] = curves
        gallery = []
        if gallery_k > 0:
            paths = rows["path"].to_numpy()[ok].tolist()
            for name, png in zip(space.names, gradcam_gallery(predictor, paths, targets, probs, local,
                                                              k=gallery_k, split=split)):
                files[f"gradcam_gallery_{sanitize(name)}"] = png
                gallery.append((name, png.name))
        outputs = {k: storage.join(out, p.name) for k, p in files.items()}
        res = EvalResult(metrics, int(len(rows)), int((~ok).sum()), outputs, predictor.model_id)
        outputs["json"] = storage.join(out, "metrics.json")
        outputs["markdown"] = storage.join(out, "report.md")
        (local / "metrics.json").write_text(json.dumps(res.to_dict(), indent=2))
        (local / "report.md").write_text(markdown_report(res, split, str(manifest), gallery))
        storage.upload_dir(local, out)
    log.info("evaluated %d images in %.1fs: mean AUROC %s", len(rows), time.time() - start, metrics.mean_auroc)
    return res
