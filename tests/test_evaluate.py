"""cxrray.evaluate: the split is scored by the bulk-scoring pipeline (Ray Data) into
`<out>/predictions`; a re-run resumes from its committed parts; unreadable files are counted
and left out of the metrics. The join is pure (milliseconds); the rest runs an untrained
small_cnn on generated PNGs on the session cluster. The AUROC-equals-the-scoring-Parquet check
is in test_score.py; the report and gallery checks in test_train.py and test_gallery.py."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrray.evaluate import EvaluationError, input_table, join_predictions
from tests.test_score import make_artifact, write_png

N_TEST, N_VALID, CHUNK = 22, 4, 4


# --------------------------------------------------------------------------- the join, no Ray


def test_join_follows_the_manifest_order_and_marks_errors() -> None:
    rows = pd.DataFrame({"image_id": ["c", "a", "b"]})
    preds = pd.DataFrame({"image_id": ["a", "b", "c"], "p_x": np.array([0.1, np.nan, 0.3], np.float32),
                          "model_id": "m", "error": [None, "truncated: read 10 of 900 bytes", None]})
    probs, ok = join_predictions(rows, preds, ["p_x"])
    assert ok.tolist() == [True, True, False]
    assert probs.dtype == np.float32 and probs[ok, 0].tolist() == pytest.approx([0.3, 0.1])
    with pytest.raises(EvaluationError, match="1 images of the split have no prediction row.*'d'.*again"):
        join_predictions(pd.DataFrame({"image_id": ["a", "d"]}), preds, ["p_x"])


def test_the_scoring_input_keeps_ids_and_makes_local_paths_absolute(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    rows = pd.DataFrame({"image_id": ["p1/a.png", "p2/b.png", "p3/c.png"],
                         "path": ["rel/a.png", "/abs/b.png", "s3://bucket/c.png"]})
    t = input_table(rows).to_pydict()
    assert t["image_id"] == ["p1/a.png", "p2/b.png", "p3/c.png"]
    assert t["path"] == [str(tmp_path / "rel" / "a.png"), "/abs/b.png", "s3://bucket/c.png"]


# --------------------------------------------------------------------------- on the session cluster


def manifest_of(paths: list[str], splits: list[str], out: Path, seed: int = 0, raw: bool = False) -> str:
    """A cxrray manifest over `paths` with random 0/1 labels (a few blank); raw: CheXpert-style
    cells, a quarter of them uncertain (-1)."""
    from cxrray.labels import CHEXPERT_VALUES, SYNTHETIC_FINDINGS, TARGET_VALUES, LabelSpace
    from cxrray.manifest import write_manifest

    space = LabelSpace(SYNTHETIC_FINDINGS, values=CHEXPERT_VALUES if raw else TARGET_VALUES)
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"image_id": [f"p{i:02d}/view1.png" for i in range(len(paths))], "path": paths,
                       "patient_id": [f"p{i:02d}" for i in range(len(paths))], "split": splits})
    for name in space.names:
        values, p = ([0.0, 1.0, -1.0, np.nan], [0.35, 0.3, 0.25, 0.1]) if raw else ([0.0, 1.0, np.nan], [0.5, 0.4, 0.1])
        df[name] = rng.choice(values, size=len(paths), p=p)
    return write_manifest(df, space, out)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("evaluate")
    paths = [str(write_png(tmp / "img" / f"{i:02d}.png", size=40 + i % 3 * 12, seed=i)) for i in range(N_TEST + N_VALID)]
    splits = ["test"] * N_TEST + ["valid"] * N_VALID
    return {"tmp": tmp, "paths": paths, "splits": splits, "artifact": make_artifact(tmp / "art"),
            "manifest": manifest_of(paths, splits, tmp / "manifest.parquet")}


def _records(pred: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((pred / "_commits").glob("*.json"))}


@pytest.mark.ray
@pytest.mark.slow
def test_a_second_evaluate_resumes_from_the_committed_predictions(ray_session, world, tmp_path) -> None:
    from cxrray.evaluate import evaluate

    art, manifest, out = world["artifact"], world["manifest"], tmp_path / "eval"
    first = evaluate(art, manifest, out, bootstrap=0, gallery_k=0, chunk_size=CHUNK, actors=2)
    pred = out / "predictions"
    before = _records(pred)
    assert first.scoring["scored_this_run"] == N_TEST and first.n_images == N_TEST and first.n_errors == 0
    assert len(before) == math.ceil(N_TEST / CHUNK) and Path(first.outputs["predictions"]) == pred.resolve()
    assert first.scoring["resources"]["actors"] == 1  # 22 images are one batch of 64: no second actor to start
    assert any(v is not None for v in first.metrics.auroc_by_class().values())

    # The run died between writing part 1 and its commit record: only those images are scored again.
    lost = sorted(pred.glob("part-*.parquet"))[1]
    (pred / "_commits" / lost.name.replace(".parquet", ".json")).unlink()
    second = evaluate(art, manifest, out, bootstrap=0, gallery_k=0, chunk_size=CHUNK, actors=2)
    assert second.scoring["already_done"] == N_TEST - CHUNK and second.scoring["scored_this_run"] == CHUNK
    after = _records(pred)
    kept = {k: v for k, v in before.items() if k != lost.name.replace(".parquet", ".json")}
    assert {k: after[k] for k in kept} == kept and len(after) == len(before)  # committed records untouched
    for name, auroc in first.metrics.auroc_by_class().items():
        assert (auroc is None) == (second.metrics.auroc_by_class()[name] is None)
        if auroc is not None:
            assert second.metrics.auroc_by_class()[name] == pytest.approx(auroc, abs=1e-6), name

    # Everything committed: nothing is scored, no actor pool runs.
    third = evaluate(art, manifest, out, bootstrap=0, gallery_k=0, chunk_size=CHUNK)
    assert third.scoring["scored_this_run"] == 0 and third.scoring["resources"] is None
    assert _records(pred) == after and third.metrics.mean_auroc == second.metrics.mean_auroc
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["scoring"]["already_done"] == N_TEST and saved["mean_auroc"] == third.metrics.mean_auroc
    assert len(pd.read_parquet(pred)) == N_TEST

    # Another split into the same out dir would mix two inputs in one predictions folder: refused.
    with pytest.raises(EvaluationError, match="cannot hold the scores of split 'valid'.*input changed.*evaluate into a new out dir"):
        evaluate(art, manifest, out, split="valid", bootstrap=0, gallery_k=0)
    # Another model: a predictions folder the caller names is not evaluate's to replace ...
    other = make_artifact(world["tmp"] / "other_art", seed=1)
    with pytest.raises(EvaluationError, match="holds predictions of model.*another predictions folder"):
        evaluate(other, manifest, tmp_path / "eval_other", bootstrap=0, gallery_k=0, predictions=pred)
    # ... but its own folder is a by-product of the report, replaced with it.
    replaced = evaluate(other, manifest, out, bootstrap=0, gallery_k=0, chunk_size=CHUNK)
    assert replaced.model_id != first.model_id and replaced.scoring["scored_this_run"] == N_TEST
    df = pd.read_parquet(pred)
    assert len(df) == N_TEST and set(df["model_id"]) == {replaced.model_id}


@pytest.mark.ray
@pytest.mark.slow
def test_an_unreadable_image_is_counted_and_left_out_of_the_metrics(ray_session, world, tmp_path) -> None:
    from cxrray.evaluate import evaluate
    from cxrray.heads import eval_targets
    from cxrray.manifest import read_manifest
    from cxrray.metrics import compute_metrics
    from cxrray.predict import Predictor, predict_paths

    import torch

    paths = list(world["paths"])
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(Path(paths[3]).read_bytes()[:120])  # a PNG cut off mid-stream
    paths[3], paths[7] = str(truncated), str(tmp_path / "gone.png")  # and a file that is not there
    manifest = manifest_of(paths, world["splits"], tmp_path / "manifest.parquet")
    out = tmp_path / "eval"
    res = evaluate(world["artifact"], manifest, out, bootstrap=0, gallery_k=0)
    assert res.n_images == N_TEST and res.n_errors == 2
    assert res.scoring["errors"] == 2 and res.scoring["complete"]

    # The metrics are those of the readable images alone, as the plain-Python reference scores them.
    df, space = read_manifest(manifest)
    test = df[df["split"] == "test"].reset_index(drop=True)
    readable = ~test.index.isin([3, 7])
    predictor = Predictor(world["artifact"], device="cpu")
    ref = predict_paths(predictor, test["path"][readable].tolist())
    assert all(e is None for e in ref["error"])
    probs = np.stack([ref[c] for c in space.prob_columns], axis=1)
    targets = eval_targets(torch.from_numpy(test[list(space.columns)].to_numpy(np.float32)[readable]), space).numpy()
    want = compute_metrics(space, targets, probs, thresholds=list(predictor.thresholds))
    assert [c.n for c in res.metrics.per_class] == [c.n for c in want.per_class]
    for got, ref_c in zip(res.metrics.per_class, want.per_class):
        assert (got.auroc is None) == (ref_c.auroc is None), got.name
        if got.auroc is not None:
            assert got.auroc == pytest.approx(ref_c.auroc, abs=1e-6), got.name

    # The error rows are in the predictions, with their reasons and no probabilities.
    preds = pd.read_parquet(out / "predictions").set_index("image_id")
    bad = preds.loc[test["image_id"][~readable]]
    assert bad["error"].notna().all() and bad[list(space.prob_columns)].isna().all().all()
    assert preds.loc[test["image_id"][readable], "error"].isna().all()
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["n_errors"] == 2 and saved["n_images"] == N_TEST
    assert f"{N_TEST} images (2 unreadable)" in (out / "report.md").read_text()


@pytest.mark.ray
@pytest.mark.slow
def test_a_u_ones_model_is_scored_on_certain_labels_and_says_what_it_left_out(ray_session, world, tmp_path,
                                                                               capsys) -> None:
    """Issue 11's done-when: `cxrray evaluate` on a U-Ones-trained model masks uncertain (and
    blank) labels and says how many, per class; --label-policy train scores what the loss saw."""
    from cxrray.cli import main
    from cxrray.labels import SYNTHETIC_FINDINGS
    from cxrray.manifest import read_manifest
    from cxrray.metrics import auroc

    art = make_artifact(tmp_path / "u_ones", config={"uncertainty": {"default": "U-Ones", "blank": "zero"}})
    manifest = manifest_of(world["paths"], world["splits"], tmp_path / "raw.parquet", seed=1, raw=True)
    df, _ = read_manifest(manifest)
    test = df[df["split"] == "test"].reset_index(drop=True)
    cells = test[list(SYNTHETIC_FINDINGS)].to_numpy(np.float32)
    results = {}
    for policy in ("certain", "train"):
        out = tmp_path / policy
        assert main(["evaluate", "--artifact", str(art), "--manifest", manifest, "--out", str(out), "--bootstrap",
                     "0", "--gallery-k", "0", "--label-policy", policy, "--json"]) == 0
        capsys.readouterr()
        results[policy] = json.loads((out / "metrics.json").read_text())
    probs = pd.read_parquet(tmp_path / "certain" / "predictions").set_index("image_id").loc[test["image_id"]]

    certain = results["certain"]
    assert certain["labels"]["policy"] == "certain" and "uncertain and blank masked" in certain["labels"]["targets"]
    assert certain["labels"]["training"].startswith("U-Ones")
    for k, name in enumerate(SYNTHETIC_FINDINGS):
        col = cells[:, k]
        n_unc, n_blank = int((col == -1).sum()), int(np.isnan(col).sum())
        assert certain["labels"]["excluded"][name] == {"uncertain": n_unc, "blank": n_blank}, name
        assert certain["per_class"][name]["n"] == len(col) - n_unc - n_blank
        known = (col == 0) | (col == 1)
        want, _ = auroc(col[known], probs[f"p_{name.lower().replace(' ', '_')}"].to_numpy()[known])
        got = certain["per_class"][name]["auroc"]
        assert (got is None) == (want is None) and (got is None or got == pytest.approx(want, abs=1e-6)), name
        # Under the training policy (U-Ones, blank zero) nothing is left out and -1 counts as positive.
        trained = results["train"]["per_class"][name]
        assert trained["n"] == len(col) and trained["n_pos"] == int(((col == 1) | (col == -1)).sum()), name
    assert results["train"]["labels"]["excluded"]["Cardiomegaly"] == {"uncertain": 0, "blank": 0}
    report = (tmp_path / "certain" / "report.md").read_text()
    assert "certain labels (uncertain and blank masked)" in report and "left out (uncertain / blank)" in report
