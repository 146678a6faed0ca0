"""A plain in-memory trainer for tests: no Ray, no Ray Data, single process.

It decodes a small manifest into memory and trains with the engine's own epoch functions
(`cxrray.engine`), so tests that need a trained artifact (scoring, Grad-CAM, the engine's
learning check) get one in seconds to minutes without a cluster. Not for real data sizes:
`cxrray.train` is the trainer.

Imported by tests as `from quick_train import quick_train` (pytest puts tests/ on sys.path,
as for clusters.py). Not importable inside a Ray worker: code that runs there builds its own
batches.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import torch

from cxrray.artifact import ModelMeta, save_artifact
from cxrray.engine import Batch, cosine_lr, predict_batches, score_predictions, set_lr, train_one_epoch
from cxrray.imaging import load_image
from cxrray.labels import LabelSpace, TargetMap, UncertaintyConfig
from cxrray.losses import ClassWeights, make_loss
from cxrray.models import build_model, gradcam_layer_path
from cxrray.transforms import Preprocess, preprocess_image

log = logging.getLogger(__name__)


def load_arrays(df: pd.DataFrame, space: LabelSpace, size: int,
                targets: TargetMap | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decode and resize every image of a (small) manifest into memory as uint8 [N,1,S,S],
    with its labels through `targets` (default: U-Zeros, blank zero, as cxrray.data)."""
    pre = Preprocess(size=size, channels=1)
    images = np.stack([preprocess_image(load_image(p), pre) for p in df["path"]])
    targets = targets or TargetMap.training(space, UncertaintyConfig())
    return images, targets(df[list(space.columns)].to_numpy(np.float32))


def iterate(images: np.ndarray, labels: np.ndarray, batch_size: int, rng: np.random.Generator | None = None) -> Iterator[Batch]:
    """Batch dicts sliced from in-memory arrays; in a new random order per call when rng is given."""
    order = rng.permutation(len(images)) if rng is not None else np.arange(len(images))
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        yield {"image": torch.from_numpy(images[idx]), "labels": torch.from_numpy(labels[idx])}


def quick_train(
    manifest: pd.DataFrame,
    space: LabelSpace,
    out_dir: str | Path,
    *,
    model: str = "small_cnn",
    size: int = 64,
    epochs: int = 6,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    loss: str = "bce",
    uncertainty: str = "U-Zeros",
    val_labels: str = "certain",
    warm_size: int | None = None,
    warm_epochs: int = 0,
) -> Path:
    """Train on the manifest's `train` split under the `uncertainty` policy, pick thresholds on
    `valid` under `val_labels` (as cxrray.train does), save an artifact.
    Single process and in memory: for small sets only.

    Progressive resizing: the first `warm_epochs` of the `epochs` run at `warm_size` (a fully
    convolutional model with global pooling takes any size), the rest at `size`. An epoch at half
    the side costs a quarter of the convolutions."""
    if warm_epochs and not warm_size:
        raise ValueError("warm_epochs needs a warm_size")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    pre = Preprocess(size=size, channels=1, mean=(0.5,), std=(0.25,))
    train_df = manifest[manifest["split"] == "train"]
    valid_df = manifest[manifest["split"] == "valid"]
    policy = UncertaintyConfig(uncertainty)
    model_space = space.for_model(policy)
    xtr, ytr = load_arrays(train_df, space, size, TargetMap.training(space, policy))
    xwarm = load_arrays(train_df, space, warm_size, TargetMap.training(space, policy))[0] if warm_epochs else None
    xva, yva = load_arrays(valid_df, space, size, TargetMap.evaluation(space, val_labels, policy))
    space = model_space
    # channels_last: 20-40% faster convolutions on this CPU (small_cnn, 128 px, batch 16).
    net = build_model(model, space.num_outputs, pre).to(memory_format=torch.channels_last)
    loss_fn = make_loss(loss, space, ClassWeights.from_labels(ytr))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    device = torch.device("cpu")
    history = []
    for epoch in range(epochs):
        set_lr(opt, cosine_lr(epoch, epochs, lr))
        x = xwarm if epoch < warm_epochs else xtr
        stats = train_one_epoch(net, iterate(x, ytr, batch_size, rng), opt, loss_fn, device=device,
                                channels_last=True)
        probs, targets, vloss = predict_batches(net, iterate(xva, yva, 128), space, loss_fn, device=device)
        metrics, thresholds = score_predictions(space, probs, targets)
        history.append({"epoch": epoch + 1, "train_loss": stats["loss"], "val_loss": vloss,
                        "val_mean_auroc": metrics.mean_auroc})
        log.info("quick_train epoch %d/%d loss %.4f val_auroc %s", epoch + 1, epochs, stats["loss"], metrics.mean_auroc)
    meta = ModelMeta(model, space, pre, [float(t) for t in thresholds], gradcam_layer_path(model),
                     summary={"epochs": epochs, "history": history, "val_mean_auroc": metrics.mean_auroc,
                              "val_auroc": metrics.auroc_by_class(), "trainer": "quick_train"},
                     config={"uncertainty": policy.to_dict(), "val_labels": val_labels})
    return save_artifact(out_dir, net, meta)
