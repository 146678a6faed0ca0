"""Ensembles of seeds and test-time augmentation (cxrray.ensemble): one artifact that the
Predictor, bulk scoring, evaluation and Grad-CAM load like any other, its thresholds chosen on
the ensemble's own validation scores; and `cxrray train seeds=2 tta=true` publishing one."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cxrray.artifact import ModelMeta, load_artifact, read_meta, save_artifact
from cxrray.ensemble import DEFAULT_TTA, Ensemble, apply_view
from cxrray.explain import gradcam
from cxrray.labels import SYNTHETIC_FINDINGS, LabelSpace
from cxrray.models import build_model, gradcam_layer_path
from cxrray.transforms import Preprocess

PRE = Preprocess(size=32, channels=1, mean=(0.5,), std=(0.25,))
SPACE = LabelSpace(SYNTHETIC_FINDINGS)


def member(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("small_cnn", SPACE.num_outputs, PRE).eval()


def blob(n: int = 2, size: int = 32) -> torch.Tensor:
    """uint8 [n, 1, size, size]: a bright disc of radius size/6 in the middle."""
    yy, xx = np.mgrid[:size, :size]
    disc = ((yy - size / 2 + 0.5) ** 2 + (xx - size / 2 + 0.5) ** 2 < (size / 6) ** 2) * 200 + 20
    return torch.from_numpy(np.repeat(disc[None, None].astype(np.uint8), n, axis=0))


# ------------------------------------------------------------------------------ the module, no Ray


def test_views_keep_the_picture_and_its_range():
    x = blob()
    assert torch.equal(apply_view(x, "identity"), x.float() / 255.0)
    flat = torch.full((1, 1, 16, 16), 77, dtype=torch.uint8)
    for view in DEFAULT_TTA:
        out = apply_view(x, view)
        assert out.shape == x.shape and 0.0 <= float(out.min()) and float(out.max()) <= 1.0, view
        # border padding: a uniform film stays uniform (no black wedges the model never saw)
        assert torch.allclose(apply_view(flat, view), torch.full_like(flat, 77, dtype=torch.float32) / 255, atol=1e-5)
    bright = lambda t: float((t > 0.5).float().sum())  # noqa: E731 - the disc's area
    big = blob(1, 96)  # a disc of ~200 px: 1.05x magnification adds ~10% to its area
    assert bright(apply_view(big, "zoom1.05")) > 1.05 * bright(apply_view(big, "identity"))
    assert not torch.equal(apply_view(x, "rotate+5"), apply_view(x, "rotate-5"))
    with pytest.raises(ValueError, match="unknown TTA view"):
        Ensemble([member(0)], ["flip"])


def test_the_ensemble_is_the_mean_logit_over_members_and_views():
    a, b, x = member(0), member(1), blob()
    with torch.no_grad():
        assert torch.allclose(Ensemble([a, b])(x), (a(x) + b(x)) / 2, atol=1e-6)
        want = torch.stack([m(apply_view(x, v)) for v in DEFAULT_TTA for m in (a, b)]).mean(0)
        assert torch.allclose(Ensemble([a, b], DEFAULT_TTA)(x), want, atol=1e-6)


def test_an_ensemble_artifact_loads_like_any_other_and_grad_cam_averages_its_members(tmp_path):
    from cxrray.predict import Predictor

    a, b = member(0), member(1)
    ens = Ensemble([a, b], ["identity", "rotate+5"])
    meta = ModelMeta("small_cnn", SPACE, PRE, [0.5] * SPACE.num_classes, gradcam_layer_path("small_cnn"),
                     members=2, tta=["identity", "rotate+5"])
    single = save_artifact(tmp_path / "single", a, ModelMeta("small_cnn", SPACE, PRE, [0.5] * 6,
                                                            gradcam_layer_path("small_cnn")))
    path = save_artifact(tmp_path / "ens", ens, meta)
    loaded, got = load_artifact(path)
    assert isinstance(loaded, Ensemble) and got.members == 2 and got.tta == ["identity", "rotate+5"]
    assert got.model_id != read_meta(single).model_id  # other views of other weights: another model
    x = blob(3)
    with torch.no_grad():
        assert torch.allclose(loaded(x), ens(x), atol=1e-6)
    probs = Predictor(path, device="cpu").predict_images(x.numpy())
    assert np.allclose(probs, torch.sigmoid(ens(x)).detach().numpy(), atol=1e-5)
    maps, low = gradcam(loaded, x, got.gradcam_layer, 1)
    ma, la = gradcam(a, x, got.gradcam_layer, 1)
    mb, lb = gradcam(b, x, got.gradcam_layer, 1)
    assert maps.shape == ma.shape and 0 <= maps.min() and maps.max() <= 1
    mean = (ma + mb) / 2
    peak = mean.reshape(len(mean), -1).max(axis=1).reshape(-1, 1, 1)
    assert np.allclose(maps, mean / np.maximum(peak, 1e-12), atol=1e-5)


# ------------------------------------------------------------------------------ with Ray


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """160 synthetic patients at 48 px, split 60/20/20 by patient, and two quick_train seeds."""
    from quick_train import quick_train
    from cxrray.manifest import write_manifest
    from cxrray.sources import load_source
    from cxrray.sources.synthetic import SynthConfig, write_synthetic_chexpert
    from cxrray.splits import assign_splits

    tmp = tmp_path_factory.mktemp("ensemble")
    write_synthetic_chexpert(tmp / "syn", SynthConfig(n_patients=160, size=48, seed=4), progress=False)
    res = load_source("synthetic", tmp / "syn", views=["frontal"], official_split=False)
    df = assign_splits(res.manifest, res.label_space, (0.6, 0.2, 0.2), seed=0)
    manifest = write_manifest(df, res.label_space, tmp / "manifest.parquet")
    members = [str(quick_train(df, res.label_space, tmp / f"seed{s}", size=48, epochs=3, seed=s)) for s in (0, 1)]
    return tmp, manifest, members


@pytest.mark.ray
@pytest.mark.slow
def test_cxrray_ensemble_picks_its_thresholds_on_its_own_validation_scores(ray_session, synthetic, capsys):
    from cxrray.cli import main
    from cxrray.evaluate import label_targets, split_rows
    from cxrray.metrics import best_f1_thresholds
    from cxrray.predict import Predictor, predict_paths

    tmp, manifest, members = synthetic
    out = tmp / "ens"
    assert main(["ensemble", "--members", ",".join(members), "--manifest", manifest, "--out", str(out), "--tta",
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    meta = read_meta(out)
    assert summary["members"] == meta.members == 2 and meta.tta == list(DEFAULT_TTA)
    assert [m["artifact"] for m in meta.summary["members"]] == members
    # The thresholds are F1-optimal on the ensemble's own certain-label validation scores,
    # recomputed here with the Predictor, not copied from a member.
    rows, data_space = split_rows(manifest, "valid", meta)
    ref = predict_paths(Predictor(out, device="cpu"), rows["path"].tolist())
    probs = np.stack([ref[c] for c in meta.label_space.prob_columns], axis=1)
    targets, labels = label_targets(rows[list(SPACE.names)].to_numpy(np.float32), data_space, meta, "certain")
    assert meta.thresholds == pytest.approx(best_f1_thresholds(targets, probs), abs=1e-4)
    member_aurocs = [m["val_mean_auroc"] for m in meta.summary["members"]]
    assert meta.summary["val_mean_auroc"] >= min(member_aurocs) - 0.01, (meta.summary["val_mean_auroc"], member_aurocs)
    assert (out / "validation" / "report.md").exists() and not (out / "validation" / "candidate").exists()
    # Bulk scoring loads it like any other artifact: the same probabilities as the Predictor.
    from cxrray.score.pipeline import ScoreConfig, score

    test = pd.read_parquet(manifest)
    test = test[test["split"] == "test"][["image_id", "path"]]
    test.to_parquet(tmp / "test_input.parquet")
    s = score(ScoreConfig(artifact=str(out), input=str(tmp / "test_input.parquet"), out=str(tmp / "scores"),
                          actors=1))
    assert s["rows"] == len(test) and s["errors"] == 0
    scored = pd.read_parquet(tmp / "scores").set_index("image_id").loc[test["image_id"]]
    direct = predict_paths(Predictor(out, device="cpu"), test["path"].tolist())
    for c in meta.label_space.prob_columns:
        np.testing.assert_allclose(scored[c].to_numpy(), np.asarray(direct[c]), atol=1e-5)
    with pytest.raises(ValueError, match="cannot join"):
        from cxrray.ensemble import build_ensemble

        other = save_artifact(tmp / "other", member(3), ModelMeta("small_cnn", SPACE, PRE, [0.5] * 6,
                                                                  gradcam_layer_path("small_cnn")))
        build_ensemble([members[0], str(other)], manifest, tmp / "bad")


# ------------------------------------------------------------------------------ init_from (two-stage recipes)


def test_init_from_must_fit_the_run(synthetic):
    from cxrray.config import TrainConfig, build
    from cxrray.train import check_init_from

    tmp, manifest, members = synthetic
    base = {"manifest": manifest, "model": "small_cnn", "channels": 1, "init_from": members[0]}
    check_init_from(build(TrainConfig, base), SPACE)  # the same model and classes: fine
    with pytest.raises(ValueError, match="model small_cnn, not tiny_cnn"):
        check_init_from(build(TrainConfig, {**base, "model": "tiny_cnn"}), SPACE)
    with pytest.raises(ValueError, match="classes"):
        check_init_from(build(TrainConfig, base), SPACE.select(["Cardiomegaly"]))
    with pytest.raises(ValueError, match="input channels"):
        check_init_from(build(TrainConfig, {**base, "channels": 3}), SPACE)


@pytest.mark.ray
@pytest.mark.slow
def test_train_with_seeds_from_a_stage_one_artifact_publishes_their_ensemble(ray_session, synthetic):
    """`cxrray train seeds=2 tta=true init_from=...` (AUCM as a stage 2): one run per seed under
    <run>/members/, each starting from the stage-1 weights (with a vanishing learning rate they
    end where it was, not at a fresh initialisation), and their ensemble as artifacts/best."""
    from cxrray.config import TrainConfig, build
    from cxrray.train import train

    tmp, manifest, members = synthetic
    cfg = build(TrainConfig, {"manifest": manifest, "model": "small_cnn", "image_size": 48, "channels": 1,
                              "epochs": 1, "max_steps_per_epoch": 1, "num_workers": 1, "batch_size": 16, "lr": 1e-12,
                              "grad_clip": None, "storage_path": str(tmp / "runs"), "run_name": "ens", "seeds": 2,
                              "tta": True, "init_from": members[0], "loss": "aucm", "tracking": False})
    res = train(cfg)
    meta = read_meta(res.best_artifact)
    assert Path(res.best_artifact) == tmp / "runs" / "ens" / "artifacts" / "best"
    assert meta.members == 2 and meta.tta == list(DEFAULT_TTA) and meta.architecture == "small_cnn"
    runs = [m["artifact"] for m in meta.summary["members"]]
    assert [read_meta(r).config["seed"] for r in runs] == [0, 1] and all("/members/seed" in r for r in runs)
    assert res.best_val_mean_auroc == meta.summary["val_mean_auroc"] and res.epochs_done == 2
    assert (tmp / "runs" / "ens" / "config.yaml").exists()
    start = load_artifact(members[0])[0].state_dict()
    fresh = build_model("small_cnn", SPACE.num_outputs, PRE).state_dict()
    for run in runs:
        end, m = load_artifact(run)
        assert m.config["loss"] == "aucm" and m.config["init_from"] == members[0]
        for (name, a), b in zip(start.items(), end.state_dict().values()):
            if a.dtype.is_floating_point and a.numel() > 1 and "running" not in name:
                assert torch.allclose(a, b, atol=1e-6), (run, name)
    assert not all(torch.allclose(a, c) for a, c in zip(start.values(), fresh.values()))
