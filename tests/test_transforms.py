"""Resize/augment presets: shapes, ranges, determinism, no horizontal flip by default."""
from __future__ import annotations

import numpy as np
import pytest

from cxrray.transforms import Augment, Preprocess, augment_image, preprocess_image, resize, train_image


def test_preprocess_gives_uint8_1xSxS():
    img = np.linspace(0, 1, 300 * 200, dtype=np.float32).reshape(300, 200)
    out = preprocess_image(img, Preprocess(size=64))
    assert out.shape == (1, 64, 64) and out.dtype == np.uint8
    assert out.min() <= 5 and out.max() >= 250  # full range kept


def test_resize_antialiases_a_fine_pattern():
    """A 1-px checkerboard shrunk 8x must average to grey, not alias to stripes."""
    board = (np.indices((512, 512)).sum(0) % 2).astype(np.float32)
    small = resize(board, 64)
    assert abs(small.mean() - 0.5) < 0.02 and small.std() < 0.05


def test_augment_keeps_range_and_size_and_varies():
    rng = np.random.default_rng(0)
    img = np.random.default_rng(1).random((128, 128)).astype(np.float32)
    a = augment_image(img, 64, Augment(), rng)
    b = augment_image(img, 64, Augment(), rng)
    assert a.shape == (64, 64) and 0 <= a.min() and a.max() <= 1
    assert not np.allclose(a, b)


def test_no_horizontal_flip_by_default():
    """The heart stays on the patient's left: with hflip off, a left-heavy image stays left-heavy."""
    img = np.zeros((64, 64), np.float32)
    img[:, 40:] = 1.0  # bright on the image's right side
    aug = Augment(scale=(1.0, 1.0), ratio=(1.0, 1.0), rotation=0, brightness=0, contrast=0)
    rng = np.random.default_rng(0)
    for _ in range(20):
        out = augment_image(img, 64, aug, rng)
        assert out[:, 40:].mean() > out[:, :24].mean()
    flips = Augment(scale=(1.0, 1.0), ratio=(1.0, 1.0), rotation=0, brightness=0, contrast=0, hflip=True)
    flipped = [augment_image(img, 64, flips, rng)[:, :24].mean() > 0.5 for _ in range(40)]
    assert any(flipped) and not all(flipped)


def test_train_image_without_augment_equals_preprocess():
    img = np.random.default_rng(0).random((100, 90)).astype(np.float32)
    pre = Preprocess(size=32, channels=1)
    assert np.array_equal(train_image(img, pre, None, np.random.default_rng()), preprocess_image(img, pre))


def test_preprocess_validates():
    with pytest.raises(ValueError):
        Preprocess(channels=2)
    assert Preprocess.from_dict(Preprocess(size=96, channels=1).to_dict()) == Preprocess(size=96, channels=1)
