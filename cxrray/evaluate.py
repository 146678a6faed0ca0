"""Evaluate an artifact on a manifest split: AUROC with bootstrap CIs, operating points at the
stored thresholds, ROC and training curves, a Grad-CAM gallery, a JSON and a Markdown report.

The split is scored by the bulk-scoring pipeline (`cxrray.score`: Ray Data, a Predictor actor
pool, exactly-once parts) into `<out>/predictions`, so a 20k-image test split is evaluated as
fast as the cluster scores it, and a re-run after a crash scores only the images without a
committed row. The rows are joined back to the manifest's labels by `image_id`; a row with an
error (an unreadable file) counts as unreadable and stays out of the metrics.

Labels are read under an evaluation policy (`label_policy`, cxrray.labels.EVAL_LABEL_POLICIES):
by default only certain labels count, so a model trained under U-Ones is not scored against
U-Ones' guesses; the report says per class how many images were left out and why.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from cxrray import storage
from cxrray.artifact import ModelMeta, read_meta
from cxrray.gallery import gradcam_gallery
from cxrray.heads import eval_targets
from cxrray.labels import LabelSpace, TargetMap, UncertaintyConfig, sanitize
from cxrray.manifest import read_manifest, require_split_column
from cxrray.metrics import Metrics, compute_metrics
from cxrray.report import plot_roc_curves, plot_training_curves
from cxrray.score.errors import OutputConflict, ScoreError
from cxrray.score.pipeline import DEFAULT_CHUNK, ScoreConfig, score
from cxrray.score.store import read_predictions

log = logging.getLogger(__name__)

PREDICTIONS = "predictions"  # evaluate's own predictions folder, inside out_dir
INPUTS = "inputs.parquet"  # the split's image_id + path: the scoring input, kept beside the report


class EvaluationError(ValueError):
    """The evaluation cannot run (or finish) as asked; the message says what to do."""


@dataclass
class EvalResult:
    metrics: Metrics
    n_images: int
    n_errors: int
    outputs: dict[str, str]
    model_id: str
    scoring: dict = field(default_factory=dict)  # the scoring job's summary (cxrray.score.score)
    labels: dict = field(default_factory=dict)  # the label policy, its targets and the exclusions per class

    def to_dict(self) -> dict:
        return {"mean_auroc": self.metrics.mean_auroc, "accuracy": self.metrics.accuracy, "n_images": self.n_images,
                "n_errors": self.n_errors, "model_id": self.model_id, "outputs": self.outputs, "labels": self.labels,
                "per_class": {c.name: {"auroc": c.auroc, "auroc_ci": c.auroc_ci, "n": c.n, "n_pos": c.n_pos,
                                       "note": c.note, "threshold": c.threshold, "sensitivity": c.sensitivity,
                                       "specificity": c.specificity, "f1": c.f1} for c in self.metrics.per_class},
                "scoring": self.scoring}


def markdown_report(res: EvalResult, split: str, manifest: str, gallery: Sequence[tuple[str, str]] = ()) -> str:
    """The report; `gallery` lists (class, PNG file name) pairs of the Grad-CAM gallery."""
    m = res.metrics
    lines = [f"# Evaluation of model {res.model_id}", "",
             f"Manifest `{manifest}`, split `{split}`: {res.n_images} images ({res.n_errors} unreadable).", "",
             f"Labels: {res.labels.get('targets', 'as given')} (`label_policy: {res.labels.get('policy', '-')}`; "
             f"the model trained on {res.labels.get('training', 'its own policy')}).", "",
             f"**Mean AUROC: {m.mean_auroc:.4f}**" if m.mean_auroc is not None else "**Mean AUROC: n/a**"]
    if m.accuracy is not None:
        lines.append(f"\n**Accuracy: {m.accuracy:.4f}**")
    lines += ["", "| class | n | positives | left out (uncertain / blank) | AUROC | 95% CI | threshold | sensitivity | "
                  "specificity | F1 |", "|---|---|---|---|---|---|---|---|---|---|"]
    excluded = res.labels.get("excluded", {})

    def f(v):
        return "" if v is None else f"{v:.3f}"

    for c in m.per_class:
        ci = f"{c.auroc_ci[0]:.3f}-{c.auroc_ci[1]:.3f}" if c.auroc_ci else ""
        auroc = f(c.auroc) if c.auroc is not None else f"n/a ({c.note})"
        out = excluded.get(c.name, {"uncertain": 0, "blank": 0})
        lines.append(f"| {c.name} | {c.n} | {c.n_pos} | {out['uncertain']} / {out['blank']} | {auroc} | {ci} | "
                     f"{f(c.threshold)} | {f(c.sensitivity)} | {f(c.specificity)} | {f(c.f1)} |")
    if m.confusion is not None:
        lines += ["", "Confusion matrix (rows: truth, columns: prediction):", "", "```"]
        lines += ["  ".join(f"{v:6d}" for v in row) for row in m.confusion] + ["```"]
    if "predictions" in res.outputs:
        lines += ["", f"Per-image predictions (one Parquet row per image, errors included): "
                      f"`{res.outputs['predictions']}`"]
    lines += ["", "![ROC curves](roc_curves.png)", "", "![Training curves](training_curves.png)", ""]
    if gallery:
        lines += ["## Grad-CAM gallery", "",
                  f"Per class, the most confident true positives (top row) and false positives (bottom row) "
                  f"of the `{split}` split at the stored operating point, with that class's Grad-CAM.", ""]
        for name, file in gallery:
            lines += [f"### {name}", "", f"![Grad-CAM gallery: {name}]({file})", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------- scoring the split


def split_rows(manifest: str | Path, split: str, meta: ModelMeta) -> tuple[pd.DataFrame, LabelSpace]:
    """The manifest's rows of `split` and its label space for the model's classes, checked
    before any work."""
    df, manifest_space = read_manifest(manifest)
    missing = [n for n in meta.label_space.names if n not in manifest_space.names]
    if missing:
        raise ValueError(f"{manifest} has no labels for the model's classes {missing}")
    require_split_column(df, manifest)
    rows = df[df["split"] == split].reset_index(drop=True)
    if rows.empty:
        raise ValueError(f"{manifest}: split {split!r} is empty (splits: {df['split'].value_counts().to_dict()})")
    return rows, manifest_space.select(meta.label_space.names)


def training_policy(meta: ModelMeta) -> UncertaintyConfig:
    """The uncertainty policy the model was trained under (U-Zeros, blank zero if unrecorded)."""
    return UncertaintyConfig.from_dict((meta.config or {}).get("uncertainty"))


def label_targets(cells: np.ndarray, data_space: LabelSpace, meta: ModelMeta, policy: str) -> tuple[np.ndarray, dict]:
    """Metric targets of the manifest's label cells under the evaluation `policy`, and what
    that left out per class (uncertain / blank), as recorded in metrics.json."""
    import torch

    tmap = TargetMap.evaluation(data_space, policy, training_policy(meta))
    targets = eval_targets(torch.from_numpy(tmap(cells)), meta.label_space).numpy()
    trained = (meta.summary or {}).get("labels", {}).get("train") or training_policy(meta).describe()
    return targets, {"policy": policy, "targets": tmap.name, "training": trained,
                     "excluded": tmap.excluded(cells, data_space.names)}


def input_table(rows: pd.DataFrame) -> pa.Table:
    """image_id + path, the scoring input. A relative local path meant the working directory
    (where the manifest was used); the list lives in out_dir, against which the scorer would
    resolve it, so it is made absolute here."""
    paths = [p if storage.is_uri(p) or os.path.isabs(p) else os.path.abspath(p) for p in rows["path"].astype(str)]
    return pa.table({"image_id": rows["image_id"].astype(str).tolist(), "path": paths})


def score_split(cfg: ScoreConfig, *, own: bool, split: str) -> dict:
    """Score (or finish scoring) the split into cfg.out; returns the scoring summary."""
    try:
        summary = score(cfg)  # on the caller's Ray, else one joined or started for the images left to score
    except OutputConflict as e:
        # e.g. rows of images outside this split: an earlier evaluation of another split or manifest
        fix = "; evaluate into a new out dir" if own else "; pass another predictions folder"
        raise EvaluationError(f"{cfg.out} cannot hold the scores of split {split!r} of this manifest ({e}){fix}") from None
    except ScoreError as e:
        raise EvaluationError(str(e)) from None
    if not summary["complete"]:
        raise EvaluationError(f"{cfg.out}: scoring left {summary['missing']} of {summary['images']} images without "
                              "a committed row; run evaluate again (it resumes)")
    return summary


def join_predictions(rows: pd.DataFrame, preds: pd.DataFrame, prob_columns: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(probs [N, K] float32 in the order of `rows`, ok [N]) from prediction rows with
    image_id, model_id, error and `prob_columns`: ok is False where the row has an error (an
    unreadable file), and those probabilities are NaN, to be left out of the metrics."""
    by_id = preds.set_index("image_id").reindex(rows["image_id"].astype(str))
    absent = by_id["model_id"].isna()  # every written row names its model, errors included
    if absent.any():
        raise EvaluationError(f"{int(absent.sum())} images of the split have no prediction row (e.g. "
                              f"{absent[absent].index[0]!r}); run evaluate again (it resumes)")
    return by_id[list(prob_columns)].to_numpy(np.float32), by_id["error"].isna().to_numpy()


# ------------------------------------------------------------------------------- evaluate


def evaluate(artifact: str | Path, manifest: str | Path, out_dir: str | Path, *, split: str = "test",
             bootstrap: int = 1000, batch_size: int = 64, gallery_k: int = 4, actors: int | None = None,
             predictions: str | Path | None = None, chunk_size: int = DEFAULT_CHUNK,
             ray_address: str | None = None, label_policy: str = "certain") -> EvalResult:
    """Score `split` of `manifest` with `artifact` on Ray Data, then report into `out_dir`.

    gallery_k: true and false positives per class in the Grad-CAM gallery (0: no gallery).
    actors, batch_size, chunk_size: the scoring pool (default: fill the cluster), its batch,
    and the images per committed part (the unit a re-run resumes from).
    predictions: score into (or reuse) this predictions folder instead of `<out_dir>/predictions`,
    e.g. a bulk-scoring output of the same split; it must hold this model's rows of no other images.
    ray_address: the cluster to join when Ray is not initialised (default: RAY_ADDRESS, else a
    local one for the duration of the scoring).
    label_policy: which labels count (cxrray.labels.EVAL_LABEL_POLICIES): certain (uncertain
    and blank masked), blank_negative (uncertain masked) or train (the model's training policy).
    """
    start = time.time()
    checks = [("--artifact", artifact), ("--manifest", manifest), ("--out", out_dir)]
    for what, path in checks + ([("predictions", predictions)] if predictions is not None else []):
        storage.check_store(path, what=what)  # a missing bucket is one line, before any work
    storage.check_target(out_dir, folder=True, what="--out")
    meta = read_meta(artifact)
    space = meta.label_space
    rows, data_space = split_rows(manifest, split, meta)
    TargetMap.evaluation(data_space, label_policy)  # an unknown policy fails before the scoring
    out = storage.normalize(out_dir)
    own = predictions is None
    pred_dir = storage.join(out, PREDICTIONS) if own else storage.normalize(predictions)
    inputs = storage.write_parquet(input_table(rows), storage.join(out, INPUTS))
    # evaluate's own folder is a by-product of this out_dir's report: a new model's evaluation
    # replaces the old model's rows, as it replaces the report. A folder the caller names may be
    # a bulk-scoring output of its own, so another model's rows there are refused instead.
    scoring = score_split(ScoreConfig(artifact=str(artifact), input=inputs, out=pred_dir, batch_size=batch_size,
                                      chunk_size=chunk_size, actors=actors, force_model=own, ray_address=ray_address),
                          own=own, split=split)
    preds = read_predictions(pred_dir, columns=["image_id", *space.prob_columns, "model_id", "error"])
    probs, ok = join_predictions(rows, preds, space.prob_columns)
    probs = probs[ok]
    targets, labels = label_targets(rows[list(space.columns)].to_numpy(np.float32)[ok], data_space, meta,
                                    label_policy)
    # float32, as the Predictor holds them: a probability equal to its threshold decides alike.
    thresholds = list(np.asarray(meta.thresholds, dtype=np.float32))
    metrics = compute_metrics(space, targets, probs, thresholds=thresholds, bootstrap=bootstrap)
    res = EvalResult(metrics, int(len(rows)), int((~ok).sum()), {}, meta.model_id, scoring, labels)
    paths = rows["path"].to_numpy()[ok].tolist()
    _publish(res, artifact, meta, targets, probs, paths, out, split=split, manifest=str(manifest),
             gallery_k=gallery_k, extra={"predictions": pred_dir, "inputs": inputs})
    auroc = f"{metrics.mean_auroc:.4f}" if metrics.mean_auroc is not None else "n/a"
    left_out = {k: v["uncertain"] + v["blank"] for k, v in labels["excluded"].items() if v["uncertain"] + v["blank"]}
    log.info("evaluated %d images (%d unreadable, %d scored this run) in %.1fs: mean AUROC %s on %s%s", len(rows),
             res.n_errors, scoring["scored_this_run"], time.time() - start, auroc, labels["targets"],
             f" (left out per class: {', '.join(f'{k} {n}' for k, n in left_out.items())})" if left_out else "")
    return res


def _publish(res: EvalResult, artifact: str | Path, meta: ModelMeta, targets: np.ndarray, probs: np.ndarray,
             paths: list[str], out: str, *, split: str, manifest: str, gallery_k: int, extra: dict[str, str]) -> None:
    """Plots, the gallery, metrics.json and report.md: drawn locally, then published file by
    file (out may be a bucket prefix). Fills res.outputs."""
    space = meta.label_space
    with tempfile.TemporaryDirectory(prefix="cxrray-eval-") as tmp:
        local = Path(tmp)
        files = {"roc_curves": plot_roc_curves(space, targets, probs, res.metrics, local / "roc_curves.png",
                                               title=f"ROC, {split} split")}
        curves = plot_training_curves(meta.summary.get("history", []), local / "training_curves.png")
        if curves:
            files["training_curves"] = curves
        gallery = []
        if gallery_k > 0:
            from cxrray.predict import Predictor

            # Grad-CAM of a few dozen images on the driver: the examples are picked from the
            # whole split's scores, which only exist once the pool is done.
            predictor = Predictor(artifact)
            for name, png in zip(space.names, gradcam_gallery(predictor, paths, targets, probs, local,
                                                              k=gallery_k, split=split)):
                files[f"gradcam_gallery_{sanitize(name)}"] = png
                gallery.append((name, png.name))
        res.outputs.update({k: storage.join(out, p.name) for k, p in files.items()})
        res.outputs.update(extra)
        res.outputs["json"] = storage.join(out, "metrics.json")
        res.outputs["markdown"] = storage.join(out, "report.md")
        (local / "metrics.json").write_text(json.dumps(res.to_dict(), indent=2))
        (local / "report.md").write_text(markdown_report(res, split, manifest, gallery))
        storage.upload_dir(local, out)
