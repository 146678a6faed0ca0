"""Grad-CAM (Captum `LayerGradCam`) and overlay rendering. Pure torch/captum/PIL: no Ray.

Grad-CAM weights a convolutional layer's activations by the spatially averaged gradient of
one output logit, sums over channels and keeps the positive part (Selvaraju et al. 2017).
The layer comes from the artifact (`meta.gradcam_layer`, a path inside `CXRModel`), so the
serving code never hard-codes an architecture.

Maps are normalised per image by their maximum (after the ReLU the minimum is already >= 0),
so 0 means "no positive evidence" and 1 the strongest evidence in that image; an all-zero
map stays all zero rather than being stretched into noise.

Overlays are drawn on the decoded upload at its own resolution (capped by `max_side`), not on
the small model input: `render_overlay` stretches the layer's low-resolution map onto the
picture, which is the exact inverse of the preprocessing (`transforms.preprocess_image`
squashes the whole image into the S x S input: no padding, no crop).
"""
from __future__ import annotations

import struct
import zlib
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from cxrray.imaging import to_uint8
from cxrray.labels import LabelSpace

_EPS = 1e-12
# zlib level for overlay PNGs: 1 encodes a 1024 px overlay several times faster than the
# usual 6 for ~15% more bytes, the better trade on an interactive endpoint.
_PNG_LEVEL = 1


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

    members = getattr(model, "members", None)
    if members is not None:
        # An ensemble (cxrray.ensemble): each member's map at its own layer on the unaugmented
        # image, averaged and normalised again; the layer path is the members' own.
        parts = [gradcam(m, images, layer_path, class_indices) for m in members]
        if len(parts) == 1:
            return parts[0]
        maps = _normalise(torch.from_numpy(np.mean([p[0] for p in parts], axis=0)))
        low = _normalise(torch.from_numpy(np.mean([p[1] for p in parts], axis=0)))
        return maps.numpy(), low.numpy()
    # A read-only array (a view of Ray's object store, a frozen upload) is copied: torch warns on
    # such arrays, and the maps need the input's gradient anyway.
    x = torch.as_tensor(np.require(images, requirements=("WRITEABLE",)) if isinstance(images, np.ndarray) else images)
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


@lru_cache(maxsize=8)
def _blend_lut(cmap: str, alpha: float) -> np.ndarray:
    """[256 heat levels, 256 grey levels, 3] uint8: every blend precomputed once, so an overlay
    of a 1024 px picture is one table lookup instead of float arithmetic on 3 M values."""
    heat = np.arange(256, dtype=np.float32) / 255.0
    w = (alpha * heat)[:, None, None]
    grey = np.arange(256, dtype=np.float32)[None, :, None]
    colour = _colormap(cmap).astype(np.float32)[:, None, :]
    lut = np.clip(grey * (1.0 - w) + colour * w + 0.5, 0, 255).astype(np.uint8)
    lut.flags.writeable = False
    return lut


def overlay_rgb(
    image: np.ndarray, heatmap: np.ndarray, *, alpha: float = 0.6, cmap: str = "jet"
) -> np.ndarray:
    """uint8 (H, W) grey image + [0,1] (H, W) heatmap -> uint8 (H, W, 3) blend.

    The blend weight grows with the heat (alpha * heat), so regions without evidence show the
    radiograph untouched instead of under a uniform colour cast. The heat is quantised to 256
    levels (as the colour map already is) before blending.
    """
    image = np.asarray(image)
    heat = np.clip(np.nan_to_num(np.asarray(heatmap, dtype=np.float32)), 0.0, 1.0)
    if image.ndim == 3 and image.shape[0] == 1:
        image = image[0]
    if image.shape != heat.shape:
        raise ValueError(f"image {image.shape} and heatmap {heat.shape} differ in shape")
    if image.dtype != np.uint8:
        image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    index = np.rint(heat * 255.0).astype(np.intp) << 8  # row heat level, column grey level
    index |= image
    return np.take(_blend_lut(cmap, float(alpha)).reshape(-1, 3), index, axis=0)


def overlay_png(
    image: np.ndarray, heatmap: np.ndarray, *, alpha: float = 0.6, cmap: str = "jet", size: int | None = None
) -> bytes:
    """The Grad-CAM overlay as PNG bytes; `size` upscales it (bilinear) for display."""
    rgb = overlay_rgb(image, heatmap, alpha=alpha, cmap=cmap)
    if size and size != rgb.shape[1]:
        rgb = np.asarray(Image.fromarray(rgb, mode="RGB").resize((size, size), Image.BILINEAR))
    return encode_png(rgb)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def encode_png(pixels: np.ndarray, level: int = _PNG_LEVEL) -> bytes:
    """uint8 (H, W) grey or (H, W, 3) RGB -> PNG bytes, every row Sub-filtered (each byte minus
    the one a pixel to its left, mod 256), then zlib.

    Why not PIL: its encoder tries all five PNG filters on every row, which at 1024 px costs
    more than the deflate itself; one fixed filter is about twice as fast for the same size on
    radiographs and overlays, and encoding was the largest part of a full-resolution /explain.
    """
    arr = np.ascontiguousarray(pixels)
    if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise ValueError(f"need uint8 (H, W) or (H, W, 3), got {arr.dtype} {arr.shape}")
    h, w = arr.shape[:2]
    c = 1 if arr.ndim == 2 else 3
    rows = arr.reshape(h, w * c)
    raw = np.empty((h, w * c + 1), np.uint8)
    raw[:, 0] = 1  # filter type Sub
    raw[:, 1 : c + 1] = rows[:, :c]
    np.subtract(rows[:, c:], rows[:, :-c], out=raw[:, c + 1 :])  # uint8 wraps: PNG's mod 256
    header = struct.pack(">IIBBBBB", w, h, 8, 0 if c == 1 else 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(raw.tobytes(), level)) + _png_chunk(b"IEND", b""))


def display_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """(h, w) of a picture of `height` x `width` shown with its long side at most `max_side`,
    aspect ratio kept (each side rounded, never below 1 px); never upscaled."""
    if max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def display_image(pixels: np.ndarray, max_side: int = 1024) -> np.ndarray:
    """Decoded [0,1] float (H, W) image (as `imaging.decode_bytes` returns it) -> uint8 (h, w)
    for display, downscaled (PIL bilinear, antialiased when shrinking) only when its long side
    exceeds `max_side`."""
    img = np.asarray(pixels)
    if img.ndim == 3 and img.shape[0] == 1:
        img = img[0]
    if img.ndim != 2:
        raise ValueError(f"a grey (H, W) image is needed, got shape {img.shape}")
    grey = img if img.dtype == np.uint8 else to_uint8(img)
    h, w = display_size(*grey.shape, max_side)
    if (h, w) == grey.shape:
        return np.ascontiguousarray(grey)
    return np.asarray(Image.fromarray(np.ascontiguousarray(grey), mode="L").resize((w, h), Image.BILINEAR))


def upsample_map(low: np.ndarray, height: int, width: int) -> np.ndarray:
    """A low-resolution Grad-CAM map [h, w] -> float32 [height, width] in [0, 1].

    Bilinear with half-pixel centres (`align_corners=False`, what Captum uses to bring the map
    to the model input), straight from the layer's grid to the picture: the model input is the
    whole picture squashed to S x S, so the map's extent is the picture's extent on each axis
    and a non-square picture simply stretches it. Renormalised to peak 1 (a zero map stays 0).
    """
    import torch.nn.functional as F

    t = torch.as_tensor(np.asarray(low, dtype=np.float32))
    if t.ndim != 2:
        raise ValueError(f"a [h, w] map is needed, got shape {tuple(t.shape)}")
    up = F.interpolate(t[None, None], size=(int(height), int(width)), mode="bilinear", align_corners=False)
    return _normalise(up[0].clamp_min(0.0)).numpy()[0]


def render_overlay(
    pixels: np.ndarray, low: np.ndarray, *, max_side: int = 1024, alpha: float = 0.6, cmap: str = "jet"
) -> bytes:
    """The Grad-CAM overlay PNG on the decoded picture at its own resolution (long side capped
    at `max_side`), the low-resolution map upsampled onto it. `pixels` is a [0,1] float or a
    uint8 image; pass a uint8 one already through `display_image` to reuse it across maps."""
    grey = display_image(pixels, max_side)
    return overlay_png(grey, upsample_map(low, *grey.shape), alpha=alpha, cmap=cmap)


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
