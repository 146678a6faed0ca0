"""Losses mask NaN targets and weight classes; metrics handle degenerate classes."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from cxrray.engine import cosine_lr
from cxrray.heads import logits_to_probs
from cxrray.labels import MULTICLASS, LabelSpace
from cxrray.losses import ClassWeights, make_loss, masked_bce, upsample_rare
from cxrray.metrics import best_f1_threshold, bootstrap_auroc_ci, compute_metrics, operating_point


def test_masked_bce_ignores_nan_targets():
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    full = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    masked = torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]])
    ref = torch.nn.functional.binary_cross_entropy_with_logits(logits[[0, 1], [0, 1]], full[[0, 1], [0, 1]])
    assert torch.allclose(masked_bce(logits, masked), ref)
    assert masked_bce(logits, full).item() != pytest.approx(ref.item())


def test_all_nan_targets_give_zero_loss_with_gradient():
    logits = torch.zeros(3, 2, requires_grad=True)
    loss = masked_bce(logits, torch.full((3, 2), float("nan")))
    loss.backward()
    assert loss.item() == 0.0 and logits.grad is not None


def test_class_weights_balance_positive_and_negative_terms():
    labels = np.array([[1, 0], [0, 0], [0, 1], [0, np.nan]], dtype=np.float32)
    w = ClassWeights.from_labels(labels)
    # Class 0: 1 of 4 positive; class 1: 1 of 3 supervised positive.
    assert w.pos[0] == pytest.approx(1.5) and w.neg[0] == pytest.approx(0.5)
    assert w.pos[1] == pytest.approx(2 * 2 / 3) and w.neg[1] == pytest.approx(2 / 3)
    # Weighted, total positive weight equals total negative weight per class.
    pos_total = w.pos[0] * 1
    neg_total = w.neg[0] * 3
    assert pos_total == pytest.approx(neg_total)


def test_multiclass_and_u_multiclass_losses():
    mc = LabelSpace(("A", "B", "C"), MULTICLASS)
    loss = make_loss("ce", mc)
    logits = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    t = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert loss(logits, t).item() < 0.02
    um = LabelSpace(("Edema", "Atelectasis"), uncertain_classes=True)
    loss3 = make_loss("bce", um)
    logits3 = torch.zeros(2, 6)
    logits3[0, 2] = 10  # label 0 of image 0 predicted uncertain
    t3 = torch.tensor([[2.0, float("nan")], [float("nan"), float("nan")]])
    assert loss3(logits3, t3).item() < 1e-3
    probs = logits_to_probs(logits3, um)
    assert probs.shape == (2, 2) and torch.allclose(probs[1], torch.tensor([0.5, 0.5]))


def test_focal_loss_downweights_easy_examples():
    logits = torch.tensor([[4.0], [0.1]])
    t = torch.tensor([[1.0], [1.0]])
    bce = masked_bce(logits, t)
    focal = masked_bce(logits, t, focal_gamma=2.0)
    assert focal < bce


def test_auroc_matches_sklearn_and_reports_single_value_classes():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=(200, 3)).astype(np.float32)
    p = np.clip(y * 0.2 + rng.random((200, 3)) * 0.8, 0, 1)
    y[:, 2] = 0  # a class with only negatives
    y[:10, 0] = np.nan
    space = LabelSpace(("a", "b", "c"))
    m = compute_metrics(space, y, p, thresholds=[0.5] * 3, bootstrap=200)
    mask = ~np.isnan(y[:, 0])
    assert m.per_class[0].auroc == pytest.approx(roc_auc_score(y[mask, 0], p[mask, 0]))
    assert m.per_class[2].auroc is None and "only one label value" in m.per_class[2].note
    assert m.mean_auroc == pytest.approx(np.mean([m.per_class[0].auroc, m.per_class[1].auroc]))
    lo, hi = m.per_class[1].auroc_ci
    assert lo < m.per_class[1].auroc < hi


def test_best_f1_threshold_separates_perfectly_separable_scores():
    y = np.array([0, 0, 0, 1, 1], dtype=float)
    p = np.array([0.1, 0.2, 0.3, 0.7, 0.9])
    t = best_f1_threshold(y, p)
    assert 0.3 < t <= 0.7
    sens, spec, f1 = operating_point(y, p, t)
    assert (sens, spec, f1) == (1.0, 1.0, 1.0)


def test_multiclass_metrics_include_accuracy_and_confusion():
    space = LabelSpace(("N", "B", "V"), MULTICLASS)
    y = np.eye(3)[[0, 1, 2, 1]].astype(np.float32)
    p = np.eye(3)[[0, 1, 1, 1]] * 0.8 + 0.05
    m = compute_metrics(space, y, p)
    assert m.accuracy == pytest.approx(0.75)
    assert m.confusion == [[1, 0, 0], [0, 2, 0], [0, 1, 0]]


def test_bootstrap_ci_none_for_single_class():
    assert bootstrap_auroc_ci(np.zeros(10), np.random.rand(10)) is None


def test_upsample_rare_raises_rare_class_share():
    space = LabelSpace(("rare", "common"))
    df = pd.DataFrame({"image_id": [f"i{i}" for i in range(100)], "rare": [1.0] * 5 + [0.0] * 95,
                       "common": [1.0] * 50 + [0.0] * 50})
    up = upsample_rare(df, space, target_fraction=0.25, seed=0)
    assert up["image_id"].is_unique
    assert (up["rare"] == 1).mean() > 0.15
    assert len(up) > len(df)


def test_cosine_lr_schedule():
    assert cosine_lr(0, 10, 1.0) == pytest.approx(1.0)
    assert cosine_lr(10, 10, 1.0) == pytest.approx(0.01)
    assert cosine_lr(0, 10, 1.0, warmup_epochs=2) == pytest.approx(0.5)
    assert cosine_lr(5, 10, 1.0) < cosine_lr(4, 10, 1.0)
