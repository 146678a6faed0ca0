"""Losses mask NaN targets and weight classes; metrics handle degenerate classes."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from cxrray.engine import cosine_lr
from cxrray.heads import logits_to_probs
from cxrray.labels import MULTICLASS, LabelSpace
from cxrray.losses import ClassWeights, aucm_loss, make_loss, masked_bce, upsample_rare
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


# ----------------------------------------------------------------------------- AUC-margin loss


def _aucm_objective(h, y, p, a, b, alpha, m=1.0):
    """Yuan et al.'s min-max objective for one class, written out from the paper (numpy)."""
    return ((1 - p) * np.mean((h - a) ** 2 * y) + p * np.mean((h - b) ** 2 * (1 - y))
            + 2 * alpha * (p * (1 - p) * m + np.mean(p * h * (1 - y) - (1 - p) * h * y)) - p * (1 - p) * alpha ** 2)


def test_aucm_loss_is_the_papers_min_max_objective_at_its_optimum():
    rng = np.random.default_rng(0)
    h = rng.uniform(0, 1, 40)
    y = (rng.uniform(0, 1, 40) < 0.3).astype(float)
    p = 0.25
    # The objective separates into a term in a, one in b and one in alpha: search each on a grid.
    grid = np.linspace(-1, 2, 3001)
    best_a = min(_aucm_objective(h, y, p, a, 0, 0) - _aucm_objective(h, y, p, 0, 0, 0) for a in grid)
    best_b = min(_aucm_objective(h, y, p, 0, b, 0) - _aucm_objective(h, y, p, 0, 0, 0) for b in grid)
    best_alpha = max(_aucm_objective(h, y, p, 0, 0, al) - _aucm_objective(h, y, p, 0, 0, 0)
                     for al in np.linspace(0, 5, 5001))
    want = _aucm_objective(h, y, p, 0, 0, 0) + best_a + best_b + best_alpha
    got = float(aucm_loss(torch.tensor(h)[:, None], torch.tensor(y)[:, None], torch.tensor([p])))
    assert got == pytest.approx(want, abs=1e-5)


def test_aucm_loss_trains_a_scorer_to_rank_positives_above_negatives():
    """From a random start on imbalanced (10% positive), noisy data, AUCM alone learns a linear
    scorer whose AUROC is close to the Bayes ranking's; NaN targets are ignored."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    n, d = 2000, 8
    y = (rng.uniform(size=n) < 0.1).astype(np.float32)
    x = rng.normal(size=(n, d)).astype(np.float32)
    x[:, 0] += 1.5 * y  # the one informative feature
    targets = torch.tensor(y)[:, None].clone()
    targets[:100] = float("nan")  # unsupervised rows: masked, not negatives
    xt = torch.tensor(x)
    model = torch.nn.Linear(d, 1)
    prior = torch.tensor([y[100:].mean()])
    before = roc_auc_score(y, model(xt).detach().numpy()[:, 0])
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(300):
        idx = torch.randint(0, n, (128,))
        loss = aucm_loss(torch.sigmoid(model(xt[idx])), targets[idx], prior)
        opt.zero_grad()
        loss.backward()
        opt.step()
    scores = model(xt).detach().numpy()[:, 0]
    after, bayes = roc_auc_score(y, scores), roc_auc_score(y, x[:, 0])
    assert after > bayes - 0.02 and after > before + 0.2, (before, after, bayes)
    assert scores[y == 1].mean() > scores[y == 0].mean()


def test_aucm_in_make_loss_one_vs_rest_and_its_limits():
    space = LabelSpace(("a", "b"))
    w = ClassWeights.from_labels(np.array([[1, 0], [0, 0], [0, 1], [0, 0]], np.float32))
    assert w.prior == pytest.approx((0.25, 0.25))
    logits = torch.tensor([[3.0, -3.0], [-3.0, -3.0], [-3.0, 3.0], [-3.0, -3.0]], requires_grad=True)
    targets = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    good = make_loss("aucm", space, w)(logits, targets)
    bad = make_loss("aucm", space, w)(-logits, targets)
    assert float(good.detach()) < float(bad.detach())  # ranking positives first costs less
    good.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    multi = LabelSpace(("x", "y", "z"), MULTICLASS)
    one_hot = torch.eye(3)[[0, 1, 2, 0]]
    loss = make_loss("aucm", multi, ClassWeights.from_labels(one_hot.numpy()))(torch.randn(4, 3), one_hot)
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="U-MultiClass"):
        make_loss("aucm", LabelSpace(("a",), uncertain_classes=True), w)
    with pytest.raises(ValueError, match="class priors"):
        make_loss("aucm", space)


def _fitted_probability(loss_fn, targets: torch.Tensor, *, softmax: bool) -> torch.Tensor:
    """The probability a free logit settles at when it minimises loss_fn on fixed targets."""
    logits = torch.zeros_like(targets, requires_grad=True)
    opt = torch.optim.SGD([logits], lr=2.0)
    for _ in range(500):
        opt.zero_grad()
        loss_fn(logits, targets).backward()
        opt.step()
    with torch.no_grad():
        return torch.softmax(logits, dim=1) if softmax else torch.sigmoid(logits)


@pytest.mark.parametrize("kind", ["bce", "weighted_bce", "focal"])
def test_label_smoothing_stops_binary_scores_short_of_saturation(kind):
    space = LabelSpace(("a", "b"))
    targets = torch.tensor([[1.0, 0.0], [0.0, float("nan")]])
    w = ClassWeights.from_labels(np.array([[1, 0], [0, 1]], np.float32))
    # Scores near saturation (0.999 on a positive, 0.001 on a negative): without smoothing the
    # loss still pushes them outwards, with eps = 0.1 it pulls them back (its optimum is finite:
    # 0.95 for BCE, ~0.995 for focal, whose factor flattens the loss near the target).
    for eps, outwards in ((0.0, True), (0.1, False)):
        logits = torch.logit(torch.tensor([[0.999, 0.001], [0.5, 0.5]]).double()).float().requires_grad_()
        make_loss(kind, space, w, label_smoothing=eps)(logits, targets).backward()
        grad = logits.grad
        assert bool(grad[0, 0] < 0) == outwards and bool(grad[0, 1] > 0) == outwards, (eps, grad)
        assert grad[1, 1] == 0  # masked
    if kind != "focal":
        # BCE's optimum is p = 1 - eps/2 for a positive and eps/2 for a negative (class weights
        # scale a label's terms, not where their sum is smallest).
        p = _fitted_probability(make_loss(kind, space, w, label_smoothing=0.1), targets, softmax=False)
        assert p[0, 0] == pytest.approx(0.95, abs=0.01) and p[0, 1] == pytest.approx(0.05, abs=0.01)


def test_label_smoothing_in_multiclass_ce_matches_torch_and_its_optimum():
    space = LabelSpace(("x", "y", "z"), MULTICLASS)
    one_hot = torch.eye(3)[[0, 2]]
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    got = make_loss("ce", space, label_smoothing=0.2)(logits, one_hot)
    assert got.item() == pytest.approx(F.cross_entropy(logits, torch.tensor([0, 2]), label_smoothing=0.2).item())
    p = _fitted_probability(make_loss("ce", space, label_smoothing=0.3), one_hot, softmax=True)
    # eps spread over the 3 classes: the true class keeps 1 - eps + eps/3.
    assert p[0, 0] == pytest.approx(0.8, abs=0.01) and p[0, 1] == pytest.approx(0.1, abs=0.01)
    unc = LabelSpace(("a",), uncertain_classes=True)
    three = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    assert make_loss("bce", unc, label_smoothing=0.1)(three, torch.tensor([[0.0], [2.0]])).item() == pytest.approx(
        F.cross_entropy(three, torch.tensor([0, 2]), label_smoothing=0.1).item())


def test_label_smoothing_is_refused_where_it_has_no_meaning():
    space = LabelSpace(("a",))
    w = ClassWeights.from_labels(np.array([[1], [0]], np.float32))
    with pytest.raises(ValueError, match="does not apply to loss 'aucm'"):
        make_loss("aucm", space, w, label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        make_loss("bce", space, label_smoothing=0.5)


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
