"""What the model's outputs mean for each task kind. Pure torch.

- multi-label: one logit per class, sigmoid.
- multi-class: one logit per class, softmax over classes.
- U-MultiClass (CheXpert): 3 logits per label (negative, positive, uncertain); the probability
  reported is the softmax restricted to negative/positive, as in Irvin et al. 2019.
"""
from __future__ import annotations

import torch

from cxrray.labels import MULTICLASS, LabelSpace


def logits_to_probs(logits: torch.Tensor, space: LabelSpace) -> torch.Tensor:
    logits = logits.float()
    if space.task == MULTICLASS:
        return torch.softmax(logits, dim=1)
    if space.uncertain_classes:
        three = logits.view(logits.shape[0], space.num_classes, 3)
        return torch.softmax(three[..., :2], dim=-1)[..., 1]
    return torch.sigmoid(logits)


def eval_targets(targets: torch.Tensor, space: LabelSpace) -> torch.Tensor:
    """Targets for metrics: under U-MultiClass the uncertain state (2) has no ground truth."""
    if space.uncertain_classes:
        targets = targets.clone()
        targets[targets == 2] = float("nan")
    return targets
