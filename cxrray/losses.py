"""Losses with NaN-masked targets, class-balance weights and rare-class up-sampling.

Targets are float32 [N, K] with NaN = no supervision (blank or uncertain under U-Ignore);
masked entries contribute nothing, and the mean is over supervised entries only.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from cxrray.heads import logits_to_probs
from cxrray.labels import MULTICLASS, LabelSpace

LOSSES = ("bce", "weighted_bce", "focal", "ce", "aucm")


@dataclass(frozen=True)
class ClassWeights:
    """Per-class weights of the positive and negative BCE terms (CheXNet-style balancing):
    w_pos = N_neg / N, w_neg = N_pos / N, so each class's positives and negatives weigh equally."""

    pos: tuple[float, ...]
    neg: tuple[float, ...]

    @classmethod
    def from_labels(cls, labels: np.ndarray) -> "ClassWeights":
        labels = np.asarray(labels, dtype=np.float64)
        sup = ~np.isnan(labels)
        n = np.maximum(sup.sum(axis=0), 1)
        npos = np.nansum(labels == 1, axis=0)
        pos_frac = np.clip(npos / n, 1e-3, 1 - 1e-3)  # a class with no positives must not give inf/0
        # Scaled by 2 so that a balanced class keeps weight 1 on both terms.
        return cls(tuple(2 * (1 - pos_frac)), tuple(2 * pos_frac))

    def tensors(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(self.pos, device=device), torch.tensor(self.neg, device=device)

    @property
    def prior(self) -> tuple[float, ...]:
        """Each class's positive fraction in the training labels (w_neg = 2 * prior)."""
        return tuple(n / 2 for n in self.neg)


def smooth_binary(targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Label smoothing for independent binary labels: 1 -> 1 - eps/2, 0 -> eps/2 (two outcomes,
    as cross-entropy's smoothing spreads eps over its classes); NaN stays NaN."""
    return targets * (1 - label_smoothing) + label_smoothing / 2 if label_smoothing else targets


def masked_bce(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weights: ClassWeights | None = None,
    focal_gamma: float = 0.0,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    mask = ~torch.isnan(targets)
    t = torch.nan_to_num(targets, nan=0.0)
    logits = logits.float()
    soft = smooth_binary(t, label_smoothing)
    loss = F.binary_cross_entropy_with_logits(logits, soft, reduction="none")
    if focal_gamma:
        # The focal factor reads the smoothed target too: on the hard one it vanishes as p -> 1
        # and the loss would drive scores to saturation regardless of eps.
        p = torch.sigmoid(logits)
        p_t = p * soft + (1 - p) * (1 - soft)
        loss = loss * (1 - p_t).pow(focal_gamma)
    if weights is not None:
        wp, wn = weights.tensors(logits.device)
        loss = loss * (t * wp + (1 - t) * wn)
    loss = loss * mask
    return loss.sum() / mask.sum().clamp(min=1)


def multiclass_ce(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """One-hot (or NaN) float targets -> cross-entropy over the rows that have a label."""
    valid = ~torch.isnan(targets).any(dim=1)
    if not valid.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[valid].float(), targets[valid].argmax(dim=1), label_smoothing=label_smoothing)


def uncertain_multiclass_ce(logits: torch.Tensor, targets: torch.Tensor, num_labels: int,
                            label_smoothing: float = 0.0) -> torch.Tensor:
    """U-MultiClass: a 3-way softmax per label over {0: negative, 1: positive, 2: uncertain}."""
    three = logits.float().view(-1, num_labels, 3).reshape(-1, 3)
    t = targets.reshape(-1)
    valid = ~torch.isnan(t)
    if not valid.any():
        return logits.sum() * 0.0
    return F.cross_entropy(three[valid], t[valid].long(), label_smoothing=label_smoothing)


def aucm_loss(probs: torch.Tensor, targets: torch.Tensor, prior: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """AUC-margin loss (Yuan et al. 2021, "Large-scale Robust Deep AUC Maximization", LibAUC's
    AUCMLoss), one-vs-rest per class, on scores in [0, 1]; NaN targets are masked.

    The paper's objective is min over (w, a, b), max over alpha >= 0 of
        (1-p) E[(h-a)^2 y] + p E[(h-b)^2 (1-y)] + 2 alpha (p(1-p) m + E[p h (1-y) - (1-p) h y]) - p(1-p) alpha^2
    with p the class prior. For fixed scores h the inner problems have closed forms: a and b are
    the positive and negative mean scores, alpha = max(0, g / (p(1-p))) with g the bracket. They
    are taken on each batch and held constant (Danskin: the gradient of the optimal value is the
    partial gradient at the optimum), so the loss trains with any optimiser instead of needing
    PESG's descent-ascent. What it optimises: small score variance within positives and within
    negatives, and a squared hinge pushing mean(positive) - mean(negative) towards the margin.
    """
    probs = probs.float()
    mask = ~torch.isnan(targets)
    y = torch.nan_to_num(targets.float(), nan=0.0)
    pos, neg = y * mask, (1 - y) * mask
    n = mask.sum(dim=0).clamp(min=1)
    p = prior.to(probs.device).float().clamp(1e-3, 1 - 1e-3)
    with torch.no_grad():
        a = (probs * pos).sum(0) / pos.sum(0).clamp(min=1e-6)
        b = (probs * neg).sum(0) / neg.sum(0).clamp(min=1e-6)
    var_pos = ((probs - a) ** 2 * pos).sum(0) / n
    var_neg = ((probs - b) ** 2 * neg).sum(0) / n
    g = p * (1 - p) * margin + (p * probs * neg - (1 - p) * probs * pos).sum(0) / n
    alpha = (g / (p * (1 - p))).clamp(min=0).detach()
    per_class = (1 - p) * var_pos + p * var_neg + 2 * alpha * g - p * (1 - p) * alpha ** 2
    supervised = mask.any(dim=0)
    if not supervised.any():
        return probs.sum() * 0.0
    return per_class[supervised].mean()


def make_loss(kind: str, space: LabelSpace, weights: ClassWeights | None = None, focal_gamma: float = 2.0,
              label_smoothing: float = 0.0):
    """Loss closure (logits, targets) -> scalar for the task; Inception's aux logits are handled
    by `engine.compute_loss`. `label_smoothing` (eps in [0, 0.5)) softens the cross-entropy
    targets of every loss but AUCM, whose objective is a margin between score means, not a
    target per image."""
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}; choose one of {LOSSES}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    eps = float(label_smoothing)
    if kind == "aucm":
        if eps:
            raise ValueError("label_smoothing does not apply to loss 'aucm' (a margin between score means, "
                             "not per-image targets); set it to 0")
        if space.uncertain_classes:
            raise ValueError("loss 'aucm' scores binary or one-vs-rest labels; U-MultiClass's 3-way heads need ce")
        if weights is None:
            raise ValueError("aucm needs the class priors of the training labels")
        prior = torch.tensor(weights.prior)
        # One-vs-rest on the reported probabilities: sigmoid per label, softmax for multi-class.
        return lambda logits, targets: aucm_loss(logits_to_probs(logits, space), targets, prior)
    if space.task == MULTICLASS or kind == "ce":
        if space.task != MULTICLASS:
            raise ValueError("loss 'ce' is for multi-class tasks; use bce/weighted_bce/focal for multi-label")
        return lambda logits, targets: multiclass_ce(logits, targets, eps)
    if space.uncertain_classes:
        return lambda logits, targets: uncertain_multiclass_ce(logits, targets, space.num_classes, eps)
    if kind == "weighted_bce":
        if weights is None:
            raise ValueError("weighted_bce needs class weights from the training labels")
        return lambda logits, targets: masked_bce(logits, targets, weights, label_smoothing=eps)
    if kind == "focal":
        return lambda logits, targets: masked_bce(logits, targets, weights, focal_gamma=focal_gamma,
                                                  label_smoothing=eps)
    return lambda logits, targets: masked_bce(logits, targets, label_smoothing=eps)


def upsample_rare(df: pd.DataFrame, space: LabelSpace, *, target_fraction: float = 0.25, max_factor: int = 8,
                  seed: int = 0) -> pd.DataFrame:
    """Repeat rows that are positive for rare classes until each class reaches `target_fraction`
    positives (capped at `max_factor` copies), the alternative to loss weighting."""
    rng = np.random.default_rng(seed)
    labels = df[list(space.columns)].to_numpy(dtype=np.float64)
    repeats = np.ones(len(df), dtype=np.int64)
    for k in range(space.num_classes):
        pos = labels[:, k] == 1
        frac = pos.mean() if len(df) else 0.0
        if 0 < frac < target_fraction:
            factor = int(min(max_factor, round(target_fraction / frac)))
            repeats[pos] = np.maximum(repeats[pos], factor)
    out = df.loc[df.index.repeat(repeats)].copy()
    # Duplicates need unique ids downstream; the suffix keeps the original id readable.
    dup_rank = out.groupby(level=0).cumcount()
    out["image_id"] = np.where(dup_rank > 0, out["image_id"].astype(str) + "#dup" + dup_rank.astype(str),
                               out["image_id"])
    return out.sample(frac=1.0, random_state=int(rng.integers(1 << 31))).reset_index(drop=True)
