"""Resize, augment and pack images; the one preprocessing definition. Pure: numpy + PIL.

Images travel through the pipeline as uint8 [1, S, S] (4x smaller than float32 and a third
of a 3-channel copy). Intensity normalisation and channel replication happen inside the
model (`models.InputNorm`), so training, scoring and serving cannot disagree on them: the
`Preprocess` stored in the artifact is the whole contract.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping

import numpy as np
from PIL import Image

# ImageNet statistics of the grey channel replicated to RGB: matching them keeps ImageNet
# weights meaningful; for models trained from scratch any fixed values would do.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
    """Square resize of a float [0,1] image. PIL's 'F' mode resize antialiases when shrinking,
    so a 1024 px PNG does not alias at 224 px."""
    if img.shape == (size, size):
        return img.astype(np.float32, copy=False)
    pil = Image.fromarray(np.ascontiguousarray(img, dtype=np.float32), mode="F")
    return np.asarray(pil.resize((size, size), Image.BILINEAR), dtype=np.float32)


def to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


def preprocess_image(img: np.ndarray, pre: Preprocess) -> np.ndarray:
    """Decoded [0,1] (H, W) float -> uint8 [1, S, S], ready for the model."""
    return to_uint8(resize(img, pre.size))[None]


def augment_image(img: np.ndarray, size: int, aug: Augment, rng: np.random.Generator) -> np.ndarray:
    """Random resized crop + small rotation + brightness/contrast on a [0,1] image -> (size, size)."""
    h, w = img.shape
    area = h * w * rng.uniform(*aug.scale)
    log_r = rng.uniform(math.log(aug.ratio[0]), math.log(aug.ratio[1]))
    ratio = math.exp(log_r)
    cw = int(round(min(w, math.sqrt(area * ratio))))
    ch = int(round(min(h, math.sqrt(area / ratio))))
    x0 = int(rng.integers(0, w - cw + 1))
    y0 = int(rng.integers(0, h - ch + 1))
    pil = Image.fromarray(np.ascontiguousarray(img, dtype=np.float32), mode="F")
    pil = pil.crop((x0, y0, x0 + cw, y0 + ch)).resize((size, size), Image.BILINEAR)
    if aug.rotation:
        # Fill with the image's mean so rotation corners are not black wedges a model can key on.
        fill = float(np.mean(img))
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
