"""cxrray.gallery: the Grad-CAM gallery picks the right images (true positives are positives
with the highest probabilities, false positives negatives), writes readable PNGs, and
`evaluate` publishes and links them. Small untrained models on generated images; Ray only
where `evaluate` scores the split (a local cluster it starts itself)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrray.gallery import gradcam_gallery, pick_examples
from cxrray.labels import LabelSpace, sanitize

NAMES = ("Cardiomegaly", "Pleural Effusion", "Pneumothorax")


def brute_force(targets, probs, decisions, k):
    """The definition, spelled out: per class, sort by probability and keep the first k."""
    out = []
    for c in range(targets.shape[1]):
        rows = sorted(range(len(probs)), key=lambda i: (-probs[i, c], i))
        out.append({"TP": [i for i in rows if targets[i, c] == 1 and decisions[i, c]][:k],
                    "FP": [i for i in rows if targets[i, c] == 0 and decisions[i, c]][:k]})
    return out


def test_pick_examples_equals_the_definition() -> None:
    rng = np.random.default_rng(0)
    for trial in range(20):
        n, kk = int(rng.integers(0, 40)), int(rng.integers(1, 6))
        targets = rng.choice([0.0, 1.0, np.nan], size=(n, 3), p=[0.5, 0.35, 0.15])
        probs = np.round(rng.random((n, 3)), 1)  # rounded: ties must break on the earlier row
        decisions = probs >= rng.random(3)
        assert pick_examples(targets, probs, decisions, kk) == brute_force(targets, probs, decisions, kk), trial


def test_pick_examples_on_a_hand_made_case() -> None:
    targets = np.array([[1], [1], [0], [0], [1], [np.nan], [0]], float)
    probs = np.array([[0.2], [0.9], [0.95], [0.1], [0.7], [0.99], [0.6]])
    decisions = probs >= 0.5
    (picks,) = pick_examples(targets, probs, decisions, 2)
    assert picks == {"TP": [1, 4], "FP": [2, 6]}  # row 0 is a positive below threshold; row 5 unknown
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        pick_examples(targets, probs[:3], decisions, 2)


# ------------------------------------------------------------------------------ gallery on a model


def chest(seed: int, height: int, width: int) -> np.ndarray:
    """A generated grey chest-ish picture, uint8 (h, w): lungs, a heart, a seeded blob."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    y, x = y / height, x / width
    img = 0.8 - 0.45 * ((((x - 0.3) / 0.15) ** 2 + ((y - 0.45) / 0.3) ** 2) < 1)
    img = img - 0.45 * ((((x - 0.7) / 0.15) ** 2 + ((y - 0.45) / 0.3) ** 2) < 1)
    bx, by, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.15)
    img = img + 0.3 * ((((x - bx) / r) ** 2 + ((y - by) / r) ** 2) < 1)
    img = np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1)
    return (img * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """An untrained tiny_cnn artifact over NAMES and 24 generated PNGs of mixed sizes with
    random labels (a few unknown): (predictor, paths, targets, probs, tmp)."""
    import torch

    from cxrray.artifact import ModelMeta, save_artifact
    from cxrray.models import build_model, gradcam_layer_path
    from cxrray.predict import Predictor, predict_paths
    from cxrray.transforms import Preprocess

    tmp = tmp_path_factory.mktemp("gallery")
    torch.manual_seed(0)
    space = LabelSpace(NAMES)
    pre = Preprocess(size=48, channels=1, mean=(0.5,), std=(0.25,))
    meta = ModelMeta("tiny_cnn", space, pre, [0.5] * len(NAMES), gradcam_layer_path("tiny_cnn"))
    artifact = save_artifact(tmp / "artifact", build_model("tiny_cnn", space.num_outputs, pre), meta)
    predictor = Predictor(artifact, device="cpu", num_threads=1)
    rng = np.random.default_rng(1)
    paths = []
    for i in range(24):
        h, w = [(64, 64), (120, 90), (80, 160)][i % 3]
        p = tmp / "img" / f"p{i:02d}" / "view1_frontal.png"
        p.parent.mkdir(parents=True)
        Image.fromarray(chest(i, h, w)).save(p)
        paths.append(str(p))
    targets = rng.choice([0.0, 1.0, np.nan], size=(24, len(NAMES)), p=[0.5, 0.4, 0.1])
    pred = predict_paths(predictor, paths)
    probs = np.stack([pred[c] for c in space.prob_columns], axis=1)
    # Operating points at each class's median: about half the images are called positive, so
    # both kinds exist and some positives fall below the threshold (never shown as TPs).
    predictor.meta.thresholds = [float(t) for t in np.median(probs, axis=0)]
    return predictor, paths, targets, probs, tmp


def test_gallery_shows_the_most_confident_true_and_false_positives(world, tmp_path, monkeypatch) -> None:
    import cxrray.gallery as gallery

    predictor, paths, targets, probs, _ = world
    shown, coloured = {}, []
    real_figure = gallery._figure

    def spy(name, subtitle, cells, k, out):
        shown[name] = {kind: [(p, prob) for _, prob, p in cells[kind]] for kind in cells}
        for kind in cells:
            for rgb, _, p in cells[kind]:
                # Each cell is drawn at the picture's own size (all are under max_side here).
                assert rgb.shape[:2] == Image.open(p).size[::-1] and rgb.dtype == np.uint8
                coloured.append((np.abs(rgb[..., 0].astype(int) - rgb[..., 2]) > 60).mean())
        return real_figure(name, subtitle, cells, k, out)

    monkeypatch.setattr(gallery, "_figure", spy)
    k = 3
    written = gradcam_gallery(predictor, paths, targets, probs, tmp_path / "out", k=k, split="valid")
    assert [p.name for p in written] == [f"gradcam_gallery_{sanitize(n)}.png" for n in NAMES]
    decisions = probs >= predictor.thresholds[None, :]
    for c, name in enumerate(NAMES):
        for kind, truth in (("TP", 1.0), ("FP", 0.0)):
            got = shown[name][kind]
            candidates = [i for i in range(len(paths)) if targets[i, c] == truth and decisions[i, c]]
            best = sorted(candidates, key=lambda i: -probs[i, c])[:k]
            assert [p for p, _ in got] == [paths[i] for i in best], (name, kind)
            assert all(prob >= predictor.thresholds[c] for _, prob in got)
            # Nothing left out ranks above what is shown.
            rest = [probs[i, c] for i in candidates if i not in best]
            assert not rest or max(rest) <= min(prob for _, prob in got)
        assert shown[name]["TP"], f"{name}: the fixture should give true positives"
    for png in written:
        im = Image.open(png)
        im.load()
        assert im.format == "PNG" and im.size[0] >= 900 and im.size[1] >= 700  # readable: ~350 px a cell
        assert np.asarray(im.convert("L")).std() > 5  # drawn, not blank
    assert max(coloured) > 0.05  # some cell carries a heatmap (an untrained model's maps are often empty)


def test_gallery_handles_a_class_without_examples(world, tmp_path) -> None:
    predictor, paths, targets, probs, _ = world
    none_positive = targets.copy()
    none_positive[:, 0] = 0.0  # no positives for class 0: an empty TP row with a note, not a crash
    written = gradcam_gallery(predictor, paths[:5], none_positive[:5], probs[:5], tmp_path, k=1)
    assert len(written) == len(NAMES) and all(p.stat().st_size > 5_000 for p in written)
    with pytest.raises(ValueError, match="k must be"):
        gradcam_gallery(predictor, paths, targets, probs, tmp_path, k=0)


@pytest.mark.ray
def test_evaluate_writes_and_links_the_gallery(world, tmp_path) -> None:
    from cxrray.cli import main
    from cxrray.manifest import write_manifest

    predictor, paths, targets, _, tmp = world
    space = predictor.label_space
    df = pd.DataFrame({"image_id": [f"img{i}" for i in range(len(paths))], "path": paths,
                       "patient_id": [f"p{i}" for i in range(len(paths))], "split": "test"})
    for c, name in enumerate(NAMES):
        df[name] = targets[:, c]
    manifest = write_manifest(df, space, tmp_path / "manifest.parquet")
    out = tmp_path / "eval"
    assert main(["evaluate", "--artifact", str(tmp / "artifact"), "--manifest", str(manifest),
                 "--out", str(out), "--bootstrap", "0", "--gallery-k", "2"]) == 0
    pngs = sorted(out.glob("gradcam_gallery*.png"))
    assert [p.name for p in pngs] == sorted(f"gradcam_gallery_{sanitize(n)}.png" for n in NAMES)
    report = (out / "report.md").read_text()
    assert "## Grad-CAM gallery" in report
    for name in NAMES:
        assert f"![Grad-CAM gallery: {name}](gradcam_gallery_{sanitize(name)}.png)" in report
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["outputs"][f"gradcam_gallery_{sanitize(NAMES[0])}"].endswith(f"gradcam_gallery_{sanitize(NAMES[0])}.png")
    # 0 turns it off.
    off = tmp_path / "eval_off"
    assert main(["evaluate", "--artifact", str(tmp / "artifact"), "--manifest", str(manifest),
                 "--out", str(off), "--bootstrap", "0", "--gallery-k", "0"]) == 0
    assert not list(off.glob("gradcam_gallery*")) and "Grad-CAM gallery" not in (off / "report.md").read_text()
