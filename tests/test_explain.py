"""cxrray.explain: Grad-CAM shapes and invariants, a model whose right answer is known, overlay
rendering, and the pointing game on a model trained here on the synthetic data. No Ray."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cxrray.explain import (
    display_image,
    display_size,
    encode_png,
    gradcam,
    logit_index,
    overlay_png,
    overlay_rgb,
    pointing_hit,
    render_overlay,
    resolve_targets,
    upsample_map,
)
from cxrray.labels import MULTICLASS, LabelSpace
from cxrray.models import build_model, gradcam_layer_path
from cxrray.transforms import Preprocess, preprocess_image

PRE64 = Preprocess(size=64, channels=1, mean=(0.5,), std=(0.25,))


def images(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 1, size, size), dtype=np.uint8))


class SpotDetector(nn.Module):
    """Logit 0 = mean brightness above 0.5 after a 1x1 conv: Grad-CAM must light up bright pixels
    and nothing else. Logit 1 = the same for darkness."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU())
        with torch.no_grad():
            self.features[0].weight.copy_(torch.tensor([[[[1.0]]], [[[-1.0]]]]))
            self.features[0].bias.copy_(torch.tensor([-0.5, 0.5]))
        self.head = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x
        return self.head(self.features(x).mean(dim=(2, 3)))


def test_gradcam_points_at_the_evidence_of_a_known_model() -> None:
    img = np.full((2, 1, 32, 32), 100, np.uint8)
    img[0, 0, 4:10, 20:28] = 250  # one bright patch
    img[1, 0, 20:30, 2:8] = 250
    maps, low = gradcam(SpotDetector(), torch.from_numpy(img), "features", [0, 0])
    assert maps.shape == (2, 32, 32) and low.shape == (2, 32, 32)
    for m, box in zip(maps, [(20, 4, 8, 6), (2, 20, 6, 10)]):
        assert pointing_hit(m, [box])
        x, y, w, h = box
        inside = np.zeros_like(m, bool)
        inside[y : y + h, x : x + w] = True
        assert m[inside].min() > 0.99 and m[~inside].max() < 1e-6
    # The darkness logit highlights everything but the patch.
    dark, _ = gradcam(SpotDetector(), torch.from_numpy(img), "features", [1, 1])
    assert dark[0, 5, 22] == 0 and dark[0, 20, 5] == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["small_cnn", "resnet50"])
def test_gradcam_shapes_range_and_mode(name: str) -> None:
    torch.manual_seed(0)
    pre = PRE64 if name == "small_cnn" else Preprocess(size=64, channels=3)
    model = build_model(name, 5, pre).train()
    x = images(3)
    maps, low = gradcam(model, x, gradcam_layer_path(name), [0, 2, 4])
    assert maps.shape == (3, 64, 64) and maps.dtype == np.float32
    assert low.ndim == 3 and low.shape[0] == 3 and low.shape[1] == low.shape[2] < 64
    for arr in (maps, low):
        assert np.isfinite(arr).all() and arr.min() >= 0 and arr.max() <= 1
        assert all(a.max() == pytest.approx(1.0) or a.max() == 0 for a in arr)
    assert model.training  # restored after the eval-mode explanation
    assert all(p.grad is None for p in model.parameters())  # no gradient left on the weights


def test_gradcam_uint8_equals_float_input_and_one_target_for_all() -> None:
    torch.manual_seed(0)
    model = build_model("small_cnn", 4, PRE64).eval()
    x = images(2, seed=1)
    a, la = gradcam(model, x, "backbone.features", 1)
    b, lb = gradcam(model, x.float() / 255.0, "backbone.features", [1, 1])
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(la, lb, atol=1e-5)


def test_gradcam_takes_a_read_only_array_without_a_warning_and_leaves_it_alone() -> None:
    """Serve's uploads and Ray's batches reach Grad-CAM as read-only arrays; torch warned on each."""
    import warnings

    torch.manual_seed(0)
    model = build_model("small_cnn", 4, PRE64).eval()
    x = images(2, seed=1).numpy()
    frozen = x.copy()
    frozen.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        maps, low = gradcam(model, frozen, "backbone.features", 1)
    want_maps, want_low = gradcam(model, x, "backbone.features", 1)
    np.testing.assert_allclose(maps, want_maps, atol=1e-6)
    np.testing.assert_allclose(low, want_low, atol=1e-6)
    np.testing.assert_array_equal(frozen, x)


def test_gradcam_batch_equals_one_by_one() -> None:
    """Serving batches several images into one Grad-CAM call: that must not change any map."""
    torch.manual_seed(0)
    model = build_model("small_cnn", 4, PRE64).eval()
    x = images(3, seed=2)
    together, _ = gradcam(model, x, "backbone.features", [0, 3, 1])
    for i, t in enumerate([0, 3, 1]):
        alone, _ = gradcam(model, x[i : i + 1], "backbone.features", [t])
        np.testing.assert_allclose(together[i], alone[0], atol=1e-5)


def test_gradcam_with_a_frozen_backbone_and_inside_inference_mode() -> None:
    torch.manual_seed(0)
    model = build_model("small_cnn", 3, PRE64, freeze_backbone=True).eval()
    for p in model.parameters():
        p.requires_grad = False  # everything frozen: the input's grad keeps the graph alive
    with torch.inference_mode():
        maps, _ = gradcam(model, images(1), "backbone.features", [0])
    assert maps.max() in (0.0, pytest.approx(1.0))


def test_gradcam_on_inception_in_train_mode_runs_in_eval_mode() -> None:
    torch.manual_seed(0)
    model = build_model("inception_v3", 2, Preprocess(size=75, channels=3)).train()
    maps, low = gradcam(model, images(2, size=75), gradcam_layer_path("inception_v3"), [0, 1])
    assert maps.shape == (2, 75, 75) and np.isfinite(maps).all() and model.training


def test_gradcam_rejects_bad_arguments() -> None:
    model = build_model("small_cnn", 3, PRE64)
    with pytest.raises(ValueError, match="targets"):
        gradcam(model, images(2), "backbone.features", [0])
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        gradcam(model, images(1)[0], "backbone.features", [0])
    with pytest.raises(AttributeError):
        gradcam(model, images(1), "backbone.nope", [0])
    maps, low = gradcam(model, images(0), "backbone.features", [])
    assert maps.shape == (0, 64, 64)


def test_logit_index_for_each_head_kind() -> None:
    names = ("A", "B", "C")
    assert [logit_index(LabelSpace(names), k) for k in range(3)] == [0, 1, 2]
    assert [logit_index(LabelSpace(names, MULTICLASS), k) for k in range(3)] == [0, 1, 2]
    assert [logit_index(LabelSpace(names, uncertain_classes=True), k) for k in range(3)] == [1, 4, 7]
    with pytest.raises(IndexError):
        logit_index(LabelSpace(names), 3)
    assert resolve_targets(LabelSpace(names), ["C", "A"]) == [2, 0]
    with pytest.raises(KeyError, match="'A', 'B', 'C'"):
        resolve_targets(LabelSpace(names), ["Z"])


def test_u_multiclass_targets_the_positive_logit() -> None:
    """For a 3-way head the map for class k is the map of logit k*3+1, not of logit k."""
    torch.manual_seed(0)
    space = LabelSpace(("A", "B"), uncertain_classes=True)
    model = build_model("small_cnn", space.num_outputs, PRE64).eval()
    x = images(1, seed=3)
    via_class, _ = gradcam(model, x, "backbone.features", [logit_index(space, 1)])
    direct, _ = gradcam(model, x, "backbone.features", [4])
    np.testing.assert_array_equal(via_class, direct)


def test_overlay_png_is_a_png_of_the_right_size_and_blend() -> None:
    grey = np.tile(np.linspace(0, 255, 48, dtype=np.uint8), (48, 1))
    heat = np.zeros((48, 48), np.float32)
    heat[10:20, 30:40] = 1.0
    png = overlay_png(grey, heat)
    im = Image.open(io.BytesIO(png))
    assert im.format == "PNG" and im.size == (48, 48) and im.mode == "RGB"
    rgb = np.asarray(im).astype(int)
    # No heat: the radiograph untouched (grey); full heat: coloured.
    cold = rgb[heat == 0]
    assert (cold[:, 0] == cold[:, 1]).all() and (cold[:, 1] == cold[:, 2]).all()
    assert np.abs(cold[:, 0] - grey[heat == 0]).max() <= 1
    hot = rgb[heat == 1]
    assert (np.abs(hot[:, 0] - hot[:, 2]) > 50).all()
    np.testing.assert_array_equal(overlay_rgb(grey, heat), rgb)
    big = Image.open(io.BytesIO(overlay_png(grey, heat, size=96)))
    assert big.size == (96, 96)
    with pytest.raises(ValueError, match="shape"):
        overlay_png(grey, heat[:10])


# ------------------------------------------------------------------------------ full-resolution overlays


def picture(height: int, width: int) -> np.ndarray:
    """A smooth [0,1] float picture (as `imaging.decode_bytes` returns one): two dark lungs."""
    y, x = np.mgrid[0:height, 0:width]
    y, x = y / height, x / width
    img = 0.8 - 0.5 * ((((x - 0.3) / 0.15) ** 2 + ((y - 0.45) / 0.3) ** 2) < 1)
    img = img - 0.5 * ((((x - 0.7) / 0.15) ** 2 + ((y - 0.45) / 0.3) ** 2) < 1)
    return (img + 0.1 * x).astype(np.float32)


def png_size(png: bytes) -> tuple[int, int]:
    im = Image.open(io.BytesIO(png))
    assert im.format == "PNG" and im.mode == "RGB"
    return im.size


@pytest.mark.parametrize(("height", "width", "expected"), [
    (1024, 1024, (1024, 1024)),  # the bar: a 1024 px upload gives a 1024 px overlay
    (1500, 2000, (1024, 768)),   # capped on the long side, aspect kept (PIL sizes are (w, h))
    (2000, 1500, (768, 1024)),
    (96, 160, (160, 96)),        # smaller than the cap: never upscaled
])
def test_render_overlay_is_at_the_pictures_own_resolution(height, width, expected) -> None:
    low = np.random.default_rng(0).random((6, 6)).astype(np.float32)
    assert png_size(render_overlay(picture(height, width), low, max_side=1024)) == expected
    assert display_size(height, width, 1024)[::-1] == expected


def test_display_image_is_the_decoded_picture_downscaled_only_past_the_cap() -> None:
    img = picture(300, 200)
    same = display_image(img, 1024)
    assert same.dtype == np.uint8 and same.shape == (300, 200)
    assert np.abs(same.astype(int) - np.rint(np.clip(img, 0, 1) * 255)).max() == 0
    small = display_image(img, 150)
    assert small.shape == (150, 100)
    # Antialiased: the small one is the big one averaged, not decimated.
    assert abs(float(small.mean()) - float(same.mean())) < 1.0
    with pytest.raises(ValueError, match="max_side"):
        display_size(10, 10, 0)


@pytest.mark.parametrize(("height", "width"), [(1024, 1024), (768, 1024), (1024, 600)])
def test_upsampled_peak_lands_on_the_low_res_peak(height, width) -> None:
    """Geometry: a low-res map [h, w] whose only peak is cell (i, j) covers the whole picture,
    so the upsampled peak sits at that cell's centre, ((i + 0.5) H / h, (j + 0.5) W / w), on
    each axis separately (the model input squashes a non-square picture). Tolerance: 1 output
    pixel (the continuous peak falls between two pixel centres)."""
    h, w = 6, 8
    for i, j in [(0, 0), (2, 5), (5, 7), (3, 1)]:
        low = np.zeros((h, w), np.float32)
        low[i, j] = 1.0
        up = upsample_map(low, height, width)
        assert up.shape == (height, width) and up.dtype == np.float32
        assert up.max() == pytest.approx(1.0) and up.min() >= 0
        py, px = np.unravel_index(np.argmax(up), up.shape)
        cy, cx = (i + 0.5) * height / h - 0.5, (j + 0.5) * width / w - 0.5  # in pixel-index units
        if i == 0:
            cy = min(cy, py)  # bilinear holds the edge value out to the border: any pixel up to the centre
        if j == 0:
            cx = min(cx, px)
        assert abs(py - cy) <= 1 and abs(px - cx) <= 1, ((i, j), (py, px), (cy, cx))
    assert not upsample_map(np.zeros((4, 4)), 50, 70).any()  # no evidence stays no evidence


@pytest.mark.parametrize(("height", "width"), [(200, 400), (400, 200), (300, 300)])
def test_overlay_heat_falls_on_the_evidence_in_the_original_geometry(height, width) -> None:
    """End to end through the real preprocessing: a bright patch in a non-square picture,
    squashed into the 32 px model input, explained by a model whose answer is known
    (SpotDetector), then drawn back on the picture. The heat must cover the patch where it
    is in the picture, not where it would be under a pad or a centre-crop."""
    img = np.full((height, width), 0.4, np.float32)
    y0, x0, bh, bw = height // 5, int(width * 0.65), height // 4, width // 6
    img[y0 : y0 + bh, x0 : x0 + bw] = 1.0
    x = preprocess_image(img, Preprocess(size=32, channels=1, mean=(0.5,), std=(0.25,)))
    _, low = gradcam(SpotDetector(), x[None], "features", [0])
    heat = upsample_map(low[0], height, width)
    inside = np.zeros_like(heat, bool)
    inside[y0 : y0 + bh, x0 : x0 + bw] = True
    py, px = np.unravel_index(np.argmax(heat), heat.shape)
    assert inside[py, px]
    assert heat[inside].mean() > 0.8 and heat[~inside].mean() < 0.05
    # The overlay is coloured on the patch and leaves the rest of the picture grey.
    rgb = np.asarray(Image.open(io.BytesIO(render_overlay(img, low[0])))).astype(int)
    assert rgb.shape == (height, width, 3)
    colour = np.abs(rgb[..., 0] - rgb[..., 2])
    assert colour[inside].mean() > 40 and colour[~inside].mean() < 5


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (64, 47), (5, 7, 3), (1, 9, 3), (130, 90, 3)])
def test_encode_png_round_trips_through_pil(shape) -> None:
    arr = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    im = Image.open(io.BytesIO(encode_png(arr)))
    assert im.format == "PNG" and im.mode == ("L" if len(shape) == 2 else "RGB")
    np.testing.assert_array_equal(np.asarray(im), arr)
    with pytest.raises(ValueError, match="uint8"):
        encode_png(arr.astype(np.float32))


def test_overlay_rgb_is_the_float_blend_within_rounding() -> None:
    """The lookup-table blend equals alpha * heat blending done in floating point."""
    from cxrray.explain import _colormap

    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (40, 50), dtype=np.uint8)
    heat = rng.random((40, 50)).astype(np.float32)
    w = (0.6 * heat)[..., None]
    colour = _colormap("jet")[np.rint(heat * 255).astype(int)].astype(np.float32)
    ref = grey[..., None].astype(np.float32) * (1 - w) + colour * w
    assert np.abs(overlay_rgb(grey, heat).astype(np.float32) - ref).max() <= 1.0


def test_pointing_hit() -> None:
    m = np.zeros((10, 10))
    m[2, 7] = 1.0
    assert pointing_hit(m, [(6, 1, 2, 2)])
    assert not pointing_hit(m, [(0, 0, 3, 3)])
    assert pointing_hit(m, [(0, 0, 3, 3), (7, 2, 1, 1)])
    assert not pointing_hit(m, [(5, 1, 1, 1)]) and pointing_hit(m, [(5, 1, 1, 1)], tolerance=2)
    assert not pointing_hit(np.zeros((10, 10)), [(0, 0, 10, 10)])  # no evidence points nowhere


# ------------------------------------------------------------------------------ pointing game
#
# Explanations must be right, not just present: train a small model on the synthetic data
# (which knows where every finding is drawn), then for each held-out true positive check that
# the Grad-CAM maximum falls in that finding's box (pointing game, Zhang et al. 2016).
#
# Resolution decides what a pointing game can measure: small_cnn pools four times, so at 64 px
# its last block is 4x4 and the bilinear map can only peak at 4 points per axis. The test
# trains at 128 px (an 8x8 last block) and keeps the protocol's tolerance (15 px at 224 px,
# about 7% of the side). Class-balanced BCE gives the rare findings positive logits on their
# positives; with plain BCE a rare finding's logit can stay below zero on a true positive, and
# ReLU(Grad-CAM) is then empty everywhere.
#
# Scored over every finding that has boxes, Support Devices (a thin tube) included. Budget
# matters: with 300 patients a model detects the tube from the tissue around it (Support
# Devices 0.1-0.3, lesions alone 0.79-0.86 over seeds); with 800 patients and 12 epochs the
# maps move onto the findings (all findings 0.86-0.96, lesions 0.91-0.98 over two seeds), in
# 3-4 min of training on an idle 2-core CPU.
#
# Cheaper budgets tried against this fixture (2026-12-01, seed 0, all findings / the weak ones):
# small_cnn at 96 px 0.804 (Lung Lesion 0.50, Pneumothorax 0.32) in 141 s of training; small_cnn
# at 8 epochs 0.870 but Lung Lesion 0.09 and Consolidation 0.22 (the mean hides them) in 179 s;
# tiny_cnn at 128 px 0.686 (44 s), 24 epochs 0.683, 1,600 patients 0.688: Support Devices
# 0.33-0.63, too thin a tube for a quarter of the width. None keeps every finding on its box.
# Progressive resizing (2026-12-07, `benchmarks/pointing_budget.py warm_epochs=8`: 8 epochs at
# 64 px, then 4 at 128) trains in 91-93 s on half the convolutions, and seed 0 gives 0.919 with
# every finding >= 0.71; but training seed 1 gives 0.830 with Consolidation 0.13 and Lung Lesion
# 0.38, so it too would let a mean hide findings that point off their boxes. Kept out.

POINTING = dict(n_patients=800, valid_fraction=0.25, size=128, model="small_cnn", epochs=12, batch_size=16,
                lr=3e-3, loss="weighted_bce")


@pytest.fixture(scope="module")
def pointing_model(tmp_path_factory):
    from quick_train import quick_train
    from cxrray.predict import Predictor
    from cxrray.sources import load_source
    from cxrray.sources.synthetic import SynthConfig, write_synthetic_chexpert

    cfg = POINTING
    out = tmp_path_factory.mktemp("pointing")
    synth = write_synthetic_chexpert(out / "data", SynthConfig(
        n_patients=cfg["n_patients"], size=cfg["size"], seed=0, valid_fraction=cfg["valid_fraction"],
        lateral_fraction=0.0,
        max_studies=1))
    source = load_source("synthetic", out / "data", check_files=False)
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    artifact = quick_train(source.manifest, source.label_space, out / "artifact", model=cfg["model"],
                           size=cfg["size"], epochs=cfg["epochs"], batch_size=cfg["batch_size"], lr=cfg["lr"],
                           seed=0, loss=cfg["loss"])
    return Predictor(artifact, device="cpu"), source.manifest, synth.boxes_csv


def pointing_game(predictor, manifest, boxes_csv, size: int) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """Hits per held-out true positive with boxes, the same maps against another image's boxes,
    and the hit rate per class. Also run by benchmarks/pointing_budget.py on other budgets."""
    import pandas as pd

    space = predictor.label_space
    valid = manifest[manifest["split"] == "valid"].reset_index(drop=True)
    boxes = pd.read_csv(boxes_csv)  # Path is the manifest's image_id
    # Decode the held-out images exactly as serving does, then one batched forward pass.
    imgs = np.stack([predictor.prepare_bytes(open(p, "rb").read()) for p in valid["path"]])
    probs = predictor.predict_images(imgs)
    positive = predictor.decisions(probs)
    by_image = {k: g for k, g in boxes.groupby("Path")}
    rows, targets, truth = [], [], []
    for i, image_id in enumerate(valid["image_id"]):
        g = by_image.get(image_id)
        if g is None:
            continue
        for finding, fb in g.groupby("Finding"):
            k = space.names.index(finding)
            if positive[i, k]:  # a true positive with ground-truth boxes
                rows.append(i)
                targets.append(logit_index(space, k))
                truth.append([tuple(b) for b in fb[["x", "y", "w", "h"]].to_numpy(float)])
    maps, _ = gradcam(predictor.model, imgs[rows], predictor.meta.gradcam_layer, targets)
    tolerance = 15 / 224 * size
    hits = np.array([pointing_hit(m, b, tolerance) for m, b in zip(maps, truth)])
    targets = np.array(targets)
    per_class = {space.names[k]: f"{hits[targets == k].mean():.2f} of {(targets == k).sum()}"
                 for k in sorted(set(targets.tolist()))}
    # The same maps against the boxes of another image: what a map that ignores the image scores.
    shuffled = np.array([pointing_hit(m, b, tolerance) for m, b in zip(maps, truth[1:] + truth[:1])])
    return hits, shuffled, per_class


@pytest.mark.slow
@pytest.mark.timeout(2400)  # 3-4 min of training on an idle 2-core CPU; a shared one is several times slower
def test_pointing_game_on_synthetic_findings(pointing_model) -> None:
    hits, shuffled, per_class = pointing_game(*pointing_model, POINTING["size"])
    print(f"\npointing game {hits.mean():.3f} over {len(hits)} true positives; per class {per_class}; "
          f"boxes of another image {shuffled.mean():.3f}")
    assert len(hits) >= 100, f"only {len(hits)} true positives with boxes: the model did not learn"
    assert hits.mean() >= 0.8, per_class
    assert shuffled.mean() < 0.5  # the maps follow the image, not a fixed place
