"""Resize, augment and pack images; the one preprocessing definition. Pure: numpy + PIL.

`decode_resized(data, pre)` / `load_resized(path, pre)` are the one entry point from bytes to
model input, used by training (`data.py`), scoring and Serve (`predict.py`): a JPEG is reduced
in the DCT domain to >= 2x the model size, and every image is resized in its own integer mode
(8-bit "L"; 16-bit and DICOM in float, which keeps their precision), never as a full-
resolution float copy of an 8-bit picture. `preprocess_image` (a
decoded float picture) goes through the same integer resize, so an image decoded either way
gives the same bytes unless a JPEG was draft-reduced (benchmarks/results/decode.md measures
that difference: PSNR > 40 dB against the full-resolution float path).

Images travel through the pipeline as uint8 [1, S, S] (4x smaller than float32 and a third
of a 3-channel copy). Intensity normalisation and channel replication happen inside the
model (`models.InputNorm`), so training, scoring and serving cannot disagree on them: the
`Preprocess` stored in the artifact is the whole contract.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Mapping

import numpy as np
from PIL import Image

from cxrray.imaging import (
    DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, DecodedImage, decode_native, native_from_unit, read_bytes,
)

# ImageNet statistics of the grey channel replicated to RGB: matching them keeps ImageNet
# weights meaningful; for models trained from scratch any fixed values would do.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Large downscales: box-reduce by an integer factor first while the remaining bilinear step
# still shrinks >= 2x (Pillow's reducing_gap). Against one full bilinear pass: PSNR > 50 dB.
REDUCING_GAP = 2.0
# A JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) at or above DRAFT_FACTOR x size.
DRAFT_FACTOR = 2


@dataclass(frozen=True)
class Preprocess:
    """Everything needed to turn a decoded [0,1] grayscale image into model input."""

    size: int = 224
    channels: int = 3  # 3: grey replicated (ImageNet models); 1: first conv adapted
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.size < 16:
            raise ValueError(f"image size {self.size} is too small (min 16)")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean)[: self.channels])
        object.__setattr__(self, "std", tuple(float(s) for s in self.std)[: self.channels])

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "Preprocess":
        return cls(int(d["size"]), int(d.get("channels", 3)), tuple(d["mean"]), tuple(d["std"]))


@dataclass(frozen=True)
class Augment:
    """Training-time augmentation. Horizontal flip is off by default: it mirrors the anatomy
    (the heart moves to the wrong side), which a chest X-ray model should never see."""

    scale: tuple[float, float] = (0.85, 1.0)  # random resized crop, fraction of area kept
    ratio: tuple[float, float] = (0.9, 1.1)
    rotation: float = 7.0  # degrees, either way
    brightness: float = 0.1  # additive, fraction of full range
    contrast: float = 0.1  # multiplicative around the mean
    hflip: bool = False


def resize(img: np.ndarray, size: int) -> np.ndarray:
    """Square resize of a float [0,1] image, in float (for callers that need floats; the model
    input goes through `resize_native`). PIL's 'F' resize antialiases when shrinking."""
    if img.shape == (size, size):
        return img.astype(np.float32, copy=False)
    pil = Image.fromarray(np.ascontiguousarray(img, dtype=np.float32), mode="F")
    return np.asarray(pil.resize((size, size), Image.BILINEAR), dtype=np.float32)


def to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _resample(im: Image.Image, size: int, box: tuple[int, int, int, int] | None = None) -> Image.Image:
    """Antialiased bilinear resize to (size, size) in the image's own mode ("L" or "F")."""
    if box is None and im.size == (size, size):
        return im
    return im.resize((size, size), Image.BILINEAR, box=box, reducing_gap=REDUCING_GAP)


def _native_to_uint8(im: Image.Image) -> np.ndarray:
    a = np.asarray(im)
    return a if im.mode == "L" else to_uint8(a)


def _native_to_unit(im: Image.Image) -> np.ndarray:
    a = np.asarray(im)
    return np.divide(a, 255, dtype=np.float32) if im.mode == "L" else a.astype(np.float32, copy=False)


def resize_native(im: Image.Image, size: int) -> np.ndarray:
    """An "L" (8-bit) or "F" ([0, 1]) image from decode_native -> uint8 (size, size), the model input."""
    return _native_to_uint8(_resample(im, size))


def preprocess_image(img: np.ndarray, pre: Preprocess) -> np.ndarray:
    """Decoded [0,1] (H, W) float -> uint8 [1, S, S], ready for the model: the float picture is
    brought back to its integer image (`imaging.native_from_unit`) and resized as decode_resized does."""
    return resize_native(native_from_unit(img), pre.size)[None]


def decode_resized(
    data: bytes, pre: Preprocess, *, aug: Augment | None = None, rng: np.random.Generator | None = None,
    source: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[np.ndarray, DecodedImage]:
    """Image bytes -> (uint8 [1, S, S] model input, augmented when `aug` is given; the decode's
    metadata, `shape` being the file's own size). The one path training, scoring and Serve use."""
    im, info = decode_native(data, source=source, max_pixels=max_pixels, min_side=DRAFT_FACTOR * pre.size)
    if aug is None:
        return resize_native(im, pre.size)[None], info
    return to_uint8(augment_native(im, pre.size, aug, rng or np.random.default_rng()))[None], info


def load_resized(
    path: str | os.PathLike[str], pre: Preprocess, *, aug: Augment | None = None,
    rng: np.random.Generator | None = None, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES,
) -> tuple[np.ndarray, DecodedImage]:
    """read_bytes + decode_resized, with errors naming `path`."""
    data = read_bytes(path, max_bytes=max_bytes)
    return decode_resized(data, pre, aug=aug, rng=rng, source=os.fspath(path), max_pixels=max_pixels)


def augment_image(img: np.ndarray, size: int, aug: Augment, rng: np.random.Generator) -> np.ndarray:
    """Random resized crop + small rotation + brightness/contrast on a [0,1] image -> (size, size)."""
    return augment_native(native_from_unit(img), size, aug, rng)


def augment_native(im: Image.Image, size: int, aug: Augment, rng: np.random.Generator) -> np.ndarray:
    """augment_image on a decode_native image ("L" / "F"): the crop is resized in its own mode
    (at reduced scale for a draft-decoded JPEG: the crop is a fraction of the picture, so the
    distribution is the same), then rotation and intensity run in float at (size, size)."""
    w, h = im.size
    area = h * w * rng.uniform(*aug.scale)
    log_r = rng.uniform(math.log(aug.ratio[0]), math.log(aug.ratio[1]))
    ratio = math.exp(log_r)
    cw = int(round(min(w, math.sqrt(area * ratio))))
    ch = int(round(min(h, math.sqrt(area / ratio))))
    x0 = int(rng.integers(0, w - cw + 1))
    y0 = int(rng.integers(0, h - ch + 1))
    # Fill with the image's mean so rotation corners are not black wedges a model can key on.
    fill = float(np.mean(np.asarray(im))) / (255.0 if im.mode == "L" else 1.0)
    crop = _resample(im, size, box=(x0, y0, x0 + cw, y0 + ch))
    pil = Image.fromarray(_native_to_unit(crop), mode="F")
    if aug.rotation:
        pil = pil.rotate(rng.uniform(-aug.rotation, aug.rotation), Image.BILINEAR, fillcolor=fill)
    out = np.asarray(pil, dtype=np.float32)
    if aug.hflip and rng.random() < 0.5:
        out = out[:, ::-1]
    if aug.contrast:
        m = out.mean()
        out = (out - m) * rng.uniform(1 - aug.contrast, 1 + aug.contrast) + m
    if aug.brightness:
        out = out + rng.uniform(-aug.brightness, aug.brightness)
    return np.clip(out, 0.0, 1.0)


def train_image(img: np.ndarray, pre: Preprocess, aug: Augment | None, rng: np.random.Generator) -> np.ndarray:
    """Decoded image -> uint8 [1, S, S], augmented when `aug` is given."""
    if aug is None:
        return preprocess_image(img, pre)
    return to_uint8(augment_image(img, pre.size, aug, rng))[None]
