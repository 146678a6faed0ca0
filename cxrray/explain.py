"""Grad-CAM (Captum `LayerGradCam`) and overlay rendering. Pure torch/captum/PIL: no Ray.

Grad-CAM weights a convolutional layer's activations by the spatially averaged gradient of
one output logit, sums over channels and keeps the positive part (Selvaraju et al. 2017).
The layer comes from the artifact (`meta.gradcam_layer`, a path inside `CXRModel`), so the
serving code never hard-codes an architecture.

Maps are normalised per image by their maximum (after the ReLU the minimum is already >= 0),
so 0 means "no positive evidence" and 1 the strongest evidence in that image; an all-zero
map stays all zero rather than being stretched into noise.
"""
from __future__ import annotations

import io
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from cxrray.labels import LabelSpace

_EPS = 1e-12


def logit_index(space: LabelSpace, class_index: int) -> int:
    """The output logit that stands for class `class_index` being present.

    Multi-label and multi-class heads have one logit per class; a CheXpert U-MultiClass head
    has three per label (negative, positive, uncertain) and the positive one is k*3+1.
    """
    if not 0 <= class_index < space.num_classes:
        raise IndexError(f"class index {class_index} outside 0..{space.num_classes - 1}")
    return class_index * 3 + 1 if space.uncertain_classes else class_index


def resolve_targets(space: LabelSpace, names: Sequence[str]) -> list[int]:
    """Class names -> class indices, with an error that lists the valid names."""
    unknown = [n for n in names if n not in space.names]
    if unknown:
        raise KeyError(f"unknown class(es) {unknown}; this model's classes are {list(space.names)}")
    return [space.names.index(n) for n in names]


def _normalise(maps: torch.Tensor) -> torch.Tensor:
    """[N, H, W] non-negative maps -> each divided by its own maximum (zeros stay zeros)."""
    peak = maps.flatten(1).amax(dim=1).clamp_min(_EPS).view(-1, 1, 1)
    return (maps / peak).clamp_(0.0, 1.0)


def gradcam(
    model: nn.Module,
    images: torch.Tensor | np.ndarray,
    layer_path: str,
    class_indices: Sequence[int] | int,
) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM of `model` at `layer_path` for one output logit per image.

    images: uint8 (or float in [0,1]) [N, 1, S, S], the Predictor's model input.
    class_indices: the output (logit) index to explain, one per image or one for all; use
      `logit_index` to map a class to its logit. To explain several classes of one image,
      repeat the image once per class.
    Returns (maps float32 [N, S, S] upsampled bilinearly to the input size, low-resolution maps
    float32 [N, h, w] at the layer's resolution), both normalised to [0, 1].
    """
    from captum.attr import LayerAttribution, LayerGradCam

    x = torch.as_tensor(np.asarray(images) if isinstance(images, np.ndarray) else images)
    if x.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(x.shape)}")
    n, size = x.shape[0], tuple(x.shape[-2:])
    if isinstance(class_indices, int):
        class_indices = [class_indices] * n
    targets = [int(t) for t in class_indices]
    if len(targets) != n:
        raise ValueError(f"{len(targets)} targets for {n} images")
    if n == 0:
        return np.zeros((0, *size), np.float32), np.zeros((0, 0, 0), np.float32)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    # Float input that requires grad: the layer's output then always joins the autograd
    # graph, even when every parameter before it is frozen (transfer learning).
    x = x.to(device)
    x = (x.float() / 255.0 if x.dtype == torch.uint8 else x.float()).requires_grad_(True)
    was_training = model.training
    model.eval()  # BatchNorm on running stats, dropout off, Inception returns plain logits
    try:
        with torch.enable_grad(), torch.inference_mode(False):
            attr = LayerGradCam(model, model.get_submodule(layer_path)).attribute(
                x, target=targets, relu_attributions=True
            )
            up = LayerAttribution.interpolate(attr, size, interpolate_mode="bilinear")
    finally:
        model.train(was_training)
    low = _normalise(attr.detach()[:, 0].float())
    maps = _normalise(up.detach()[:, 0].float())
    return maps.cpu().numpy(), low.cpu().numpy()


@lru_cache(maxsize=8)
def _colormap(name: str) -> np.ndarray:
    """A 256x3 uint8 lookup table from matplotlib (no pyplot, no backend); read-only, cached."""
    import matplotlib

    lut = matplotlib.colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3]
    lut = (lut * 255.0 + 0.5).astype(np.uint8)
    lut.flags.writeable = False
    return lut


def overlay_rgb(
    image: np.ndarray, heatmap: np.ndarray, *, alpha: float = 0.6, cmap: str = "jet"
) -> np.ndarray:
    """uint8 (H, W) grey image + [0,1] (H, W) heatmap -> uint8 (H, W, 3) blend.

    The blend weight grows with the heat (alpha * heat), so regions without evidence show the
    radiograph untouched instead of under a uniform colour cast.
    """
    image = np.asarray(image)
    heat = np.clip(np.nan_to_num(np.asarray(heatmap, dtype=np.float32)), 0.0, 1.0)
    if image.ndim == 3 and image.shape[0] == 1:
        image = image[0]
    if image.shape != heat.shape:
        raise ValueError(f"image {image.shape} and heatmap {heat.shape} differ in shape")
    grey = np.repeat(image.astype(np.float32)[..., None], 3, axis=2)
    colour = _colormap(cmap)[np.rint(heat * 255).astype(np.int64)].astype(np.float32)
    w = (alpha * heat)[..., None]
    return np.clip(grey * (1.0 - w) + colour * w + 0.5, 0, 255).astype(np.uint8)


def overlay_png(
    image: np.ndarray, heatmap: np.ndarray, *, alpha: float = 0.6, cmap: str = "jet", size: int | None = None
) -> bytes:
    """The Grad-CAM overlay as PNG bytes; `size` upscales it (bilinear) for display."""
    pil = Image.fromarray(overlay_rgb(image, heatmap, alpha=alpha, cmap=cmap), mode="RGB")
    if size and size != pil.width:
        pil = pil.resize((size, size), Image.BILINEAR)
    buf = io.BytesIO()
    pil.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def pointing_hit(
    heatmap: np.ndarray, boxes: Sequence[tuple[float, float, float, float]], tolerance: float = 0.0
) -> bool:
    """Pointing game (Zhang et al. 2016): does the map's maximum fall inside one of the boxes
    (x, y, w, h, in the heatmap's pixel coordinates), allowing `tolerance` pixels around each
    box? The original protocol allows 15 px at ~224 px, i.e. about 7% of the image side.
    Ties count as a hit if any maximum is inside; an all-zero map points nowhere (a miss)."""
    heat = np.asarray(heatmap)
    if not np.isfinite(heat).all() or heat.max() <= 0:
        return False
    ys, xs = np.nonzero(heat >= heat.max() - 1e-6)
    cx, cy = xs + 0.5, ys + 0.5  # pixel centres
    for x, y, w, h in boxes:
        t = tolerance
        if np.any((cx >= x - t) & (cx <= x + w + t) & (cy >= y - t) & (cy <= y + h + t)):
            return True
    return False
