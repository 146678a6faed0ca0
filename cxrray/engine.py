"""Training and evaluation over any iterable of batch dicts. No Ray here.

The Ray Train worker loop (`cxrray.train`) calls these functions, and so does the tests'
in-memory trainer (tests/quick_train.py), so the training logic runs and is tested without
a cluster.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from cxrray.console import Progress
from cxrray.heads import eval_targets, logits_to_probs
from cxrray.labels import LabelSpace
from cxrray.metrics import Metrics, best_f1_thresholds, compute_metrics

Batch = dict[str, torch.Tensor]
AUX_WEIGHT = 0.4  # Inception-V3's auxiliary classifier weight (Szegedy et al. 2016)


@dataclass(frozen=True)
class Precision:
    """Autocast settings. bf16 needs no loss scaling; fp16 does (GradScaler)."""

    dtype: torch.dtype | None  # None = full fp32

    @classmethod
    def resolve(cls, setting: str, device: torch.device) -> "Precision":
        if setting == "off" or device.type != "cuda":
            # Autocast on CPU is slower than fp32 for these convnets; only GPUs gain.
            return cls(None)
        if setting in ("auto", "bf16"):
            if torch.cuda.is_bf16_supported():
                return cls(torch.bfloat16)
            return cls(torch.float16)
        if setting == "fp16":
            return cls(torch.float16)
        raise ValueError(f"precision must be auto/bf16/fp16/off, got {setting!r}")

    def autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=self.dtype) if self.dtype is not None else nullcontext()

    @property
    def needs_scaler(self) -> bool:
        return self.dtype == torch.float16


def to_device(batch: Batch, device: torch.device, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x = batch["image"].to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, batch["labels"].to(device, non_blocking=True).float()


def compute_loss(outputs, targets: torch.Tensor, loss_fn: Callable) -> torch.Tensor:
    if isinstance(outputs, tuple):  # Inception-V3 in training mode: (logits, aux_logits)
        main, aux = outputs
        return loss_fn(main, targets) + AUX_WEIGHT * loss_fn(aux, targets)
    return loss_fn(outputs, targets)


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable,
    *,
    device: torch.device,
    precision: Precision = Precision(None),
    scaler: torch.amp.GradScaler | None = None,
    grad_clip: float | None = None,
    channels_last: bool = False,
    max_steps: int | None = None,
    progress: Progress | None = None,
) -> dict[str, float]:
    """progress: reports steps (and images/s, loss) within the epoch; the default is a tqdm bar
    on a terminal and a log line every CXRRAY_PROGRESS_EVERY_S seconds otherwise, with an ETA
    when the number of steps is known (`len(batches)` or max_steps)."""
    if progress is None:
        progress = Progress("train", _known_len(batches, max_steps), unit="steps", rate_unit="img")
    model.train()
    total, images, steps = 0.0, 0, 0
    start = time.perf_counter()
    with progress:
        for batch in batches:
            loss_value, n = _train_step(model, batch, optimizer, loss_fn, device=device, precision=precision,
                                        scaler=scaler, grad_clip=grad_clip, channels_last=channels_last)
            total += loss_value * n
            images += n
            steps += 1
            progress.update(1, amount=n, loss=total / images)
            if max_steps and steps >= max_steps:
                break
    seconds = time.perf_counter() - start
    return {"loss": total / max(images, 1), "images": images, "seconds": seconds,
            "images_per_s": images / seconds if seconds > 0 else 0.0}


def _known_len(batches: Iterable, max_steps: int | None) -> int | None:
    try:
        n = len(batches)  # type: ignore[arg-type]
    except TypeError:  # a generator or a Ray Data iterator: unknown
        return max_steps or None
    return min(n, max_steps) if max_steps else n


def _train_step(model: nn.Module, batch: Batch, optimizer: torch.optim.Optimizer, loss_fn: Callable, *,
                device: torch.device, precision: Precision, scaler: torch.amp.GradScaler | None,
                grad_clip: float | None, channels_last: bool) -> tuple[float, int]:
    """One optimiser step; returns (mean loss, batch size)."""
    x, y = to_device(batch, device, channels_last)
    with precision.autocast(device):
        loss = compute_loss(model(x), y, loss_fn)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return float(loss.detach()), len(x)


@torch.no_grad()
def predict_batches(
    model: nn.Module,
    batches: Iterable[Batch],
    space: LabelSpace,
    loss_fn: Callable | None = None,
    *,
    device: torch.device,
    precision: Precision = Precision(None),
    channels_last: bool = False,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Probabilities, raw targets and mean loss over the batches."""
    model.eval()
    probs, targets, total, n = [], [], 0.0, 0
    for batch in batches:
        x, y = to_device(batch, device, channels_last)
        with precision.autocast(device):
            logits = model(x)
        if loss_fn is not None:
            total += float(loss_fn(logits.float(), y)) * len(x)
        n += len(x)
        probs.append(logits_to_probs(logits, space).cpu().numpy())
        targets.append(y.cpu().numpy())
    k = space.num_classes
    p = np.concatenate(probs) if probs else np.zeros((0, k), np.float32)
    t = np.concatenate(targets) if targets else np.zeros((0, k), np.float32)
    return p, t, total / max(n, 1)


def score_predictions(space: LabelSpace, probs: np.ndarray, targets: np.ndarray,
                      thresholds: list[float] | None = None, bootstrap: int = 0) -> tuple[Metrics, list[float]]:
    """Metrics plus F1-optimal thresholds chosen on these (validation) predictions."""
    t = eval_targets(torch.from_numpy(targets), space).numpy()
    chosen = thresholds if thresholds is not None else best_f1_thresholds(t, probs)
    return compute_metrics(space, t, probs, thresholds=chosen, bootstrap=bootstrap), chosen


def cosine_lr(epoch: int, total_epochs: int, base_lr: float, warmup_epochs: int = 0, min_lr_ratio: float = 0.01) -> float:
    """Cosine decay with optional linear warm-up; a pure function so a resumed run picks up
    exactly where it stopped."""
    if warmup_epochs and epoch < warmup_epochs:
        return base_lr * (epoch + 1) / warmup_epochs
    progress = (epoch - warmup_epochs) / max(1, total_epochs - warmup_epochs)
    return base_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
