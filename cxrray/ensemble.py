"""Ensembles of seeds and test-time augmentation (TTA), as one artifact.

An ensemble artifact is an artifact like any other: `model.pt` holds every member's weights
(keys `members.<i>.…`), `model.json` says how many members there are and which TTA views they
see (`ModelMeta.members`, `ModelMeta.tta`), and `artifact.load_artifact` rebuilds it as an
`Ensemble` module. The Predictor, bulk scoring, evaluation and Serve call it like a single
model: its output is the mean logit over members and views. Grad-CAM explains it as the mean of
its members' maps on the unaugmented image (`explain.gradcam`).

Its thresholds and validation AUROC are the ensemble's own: `build_ensemble` scores the
validation split with the combined model through the scoring pipeline (`evaluate`), then
chooses F1-optimal thresholds on certain validation labels, as training does for one model.
"""
from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cxrray import storage

log = logging.getLogger(__name__)

# Deterministic, anatomy-preserving views (no flips: they move the heart), inside the range the
# default training augmentation already shows the model (±7° rotation, 85-100% area crops).
TTA_VIEWS: dict[str, tuple[float, float]] = {  # name -> (rotation in degrees, zoom: >1 magnifies)
    "identity": (0.0, 1.0),
    "rotate+5": (5.0, 1.0),
    "rotate-5": (-5.0, 1.0),
    "zoom1.05": (0.0, 1.05),
}
DEFAULT_TTA: tuple[str, ...] = tuple(TTA_VIEWS)


def apply_view(x: torch.Tensor, view: str) -> torch.Tensor:
    """One TTA view of a [N, C, H, W] batch (uint8, or float in [0, 1]) as float in [0, 1]."""
    if view not in TTA_VIEWS:
        raise ValueError(f"unknown TTA view {view!r}; views: {', '.join(TTA_VIEWS)}")
    x = x.float().div(255.0) if x.dtype == torch.uint8 else x.float()
    degrees, zoom = TTA_VIEWS[view]
    if degrees == 0.0 and zoom == 1.0:
        return x
    a = math.radians(degrees)
    theta = torch.tensor([[math.cos(a) / zoom, -math.sin(a) / zoom, 0.0],
                          [math.sin(a) / zoom, math.cos(a) / zoom, 0.0]], dtype=x.dtype, device=x.device)
    grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    # border: the film's edge continues outwards instead of a black wedge the model never saw.
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class Ensemble(nn.Module):
    """The mean logit of `members` (CXRModels of one architecture), each over the TTA `views`.
    Logits, not probabilities, are averaged so every consumer keeps one output convention
    (heads.logits_to_probs) and Grad-CAM has one logit to explain."""

    def __init__(self, members: Sequence[nn.Module], views: Sequence[str] = ("identity",)):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        for v in views:
            apply_view(torch.zeros(1, 1, 4, 4), v)  # an unknown view fails here, not on the first batch
        self.members = nn.ModuleList(members)
        self.views = tuple(views) or ("identity",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [member(apply_view(x, v)) for v in self.views for member in self.members]
        return torch.stack([o if isinstance(o, torch.Tensor) else o[0] for o in outs]).mean(dim=0)


def build_ensemble(members: Sequence[str], manifest: str, out: str, *, tta: Sequence[str] = (),
                   val_labels: str = "certain", actors: int | None = None, ray_address: str | None = None) -> str:
    """Combine member artifacts (one architecture, classes and preprocessing) into the ensemble
    artifact `out`; with `tta`, the views each member sees. Its thresholds and validation AUROC
    come from scoring the manifest's `valid` split with the ensemble itself (into
    `<out>/validation`, with its report), under `val_labels`. Returns `out`."""
    from cxrray.artifact import ModelMeta, load_artifact, read_meta, save_artifact
    from cxrray.evaluate import evaluate, join_predictions, label_targets, split_rows
    from cxrray.metrics import best_f1_thresholds, compute_metrics
    from cxrray.score.store import read_predictions

    if not members:
        raise ValueError("build_ensemble needs at least one member artifact")
    metas = [read_meta(m) for m in members]
    first = metas[0]
    for m, meta in zip(members, metas):
        if (meta.architecture, meta.label_space, meta.preprocess) != (first.architecture, first.label_space,
                                                                        first.preprocess):
            raise ValueError(f"{m}: model {meta.architecture} with classes {list(meta.label_space.names)} at "
                             f"{meta.preprocess.size} px cannot join {members[0]} ({first.architecture}, "
                             f"{list(first.label_space.names)}, {first.preprocess.size} px)")
        if meta.members > 1:
            raise ValueError(f"{m} is an ensemble already; combine its members instead")
    model = Ensemble([load_artifact(m)[0] for m in members], tuple(tta) or ("identity",))
    out = storage.normalize(out)
    summary = {"members": [{"artifact": storage.normalize(m), "model_id": meta.model_id,
                            "val_mean_auroc": meta.summary.get("val_mean_auroc")} for m, meta in zip(members, metas)],
               "tta": list(tta), "labels": first.summary.get("labels", {}), "history": []}
    candidate = ModelMeta(first.architecture, first.label_space, first.preprocess, list(first.thresholds),
                          first.gradcam_layer, summary=dict(summary), config=dict(first.config),
                          members=len(members), tta=list(tta))
    validation = storage.join(out, "validation")
    candidate_dir = storage.join(validation, "candidate")  # thresholds not yet chosen: scored, then replaced
    save_artifact(candidate_dir, model, candidate)
    ev = evaluate(candidate_dir, manifest, validation, split="valid", bootstrap=0, gallery_k=0, actors=actors,
                  ray_address=ray_address, label_policy=val_labels)
    meta = read_meta(candidate_dir)
    rows, data_space = split_rows(manifest, "valid", meta)
    space = meta.label_space
    preds = read_predictions(storage.join(validation, "predictions"),
                             columns=["image_id", *space.prob_columns, "model_id", "error"])
    probs, ok = join_predictions(rows, preds, space.prob_columns)
    targets, labels = label_targets(rows[list(space.names)].to_numpy("float32")[ok], data_space, meta, val_labels)
    thresholds = best_f1_thresholds(targets, probs[ok])
    metrics = compute_metrics(space, targets, probs[ok], thresholds=thresholds)
    summary.update(val_mean_auroc=metrics.mean_auroc, val_auroc=metrics.auroc_by_class(),
                   n_valid=int(ok.sum()), validation_report=ev.outputs.get("markdown"))
    final = replace(candidate, thresholds=[float(t) for t in thresholds], summary=summary, model_id="",
                    weights_sha256="", created="")
    published = save_artifact(out, model, final)
    storage.delete_dir(candidate_dir)
    log.info("ensemble of %d %s model(s)%s -> %s: validation mean AUROC %s (members: %s)", len(members),
             first.architecture, f" x {len(tta)} TTA views" if tta else "", out,
             f"{metrics.mean_auroc:.4f}" if metrics.mean_auroc is not None else "n/a",
             ", ".join(f"{s['val_mean_auroc']:.4f}" if s["val_mean_auroc"] is not None else "n/a"
                       for s in summary["members"]))
    return str(published)
