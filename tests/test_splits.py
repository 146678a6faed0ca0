"""Patient-grouped stratified splits and the leakage check."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrray.labels import LabelSpace
from cxrray.sources import load_source
from cxrray.splits import SPLITS, LeakageReport, assign_splits, check_leakage

SPACE = LabelSpace(("common", "rare", "never"))


def synthetic_manifest(n_patients: int = 400, seed: int = 0, rare_patients: int = 12) -> pd.DataFrame:
    """1-4 images per patient; 'rare' positive for exactly `rare_patients` patients."""
    rng = np.random.default_rng(seed)
    rows = []
    rare = set(rng.choice(n_patients, rare_patients, replace=False).tolist())
    for p in range(n_patients):
        for k in range(int(rng.integers(1, 5))):
            rows.append({"image_id": f"p{p:04d}/img{k}.png", "path": f"/nowhere/p{p:04d}/img{k}.png",
                         "patient_id": f"p{p:04d}", "split": None,
                         "common": float(rng.random() < 0.4), "rare": float(p in rare and k == 0),
                         "never": np.nan if rng.random() < 0.3 else 0.0})
    return pd.DataFrame(rows)


def test_no_patient_in_two_splits_and_fractions():
    df = synthetic_manifest()
    out = assign_splits(df, SPACE, fractions=(0.7, 0.15, 0.15), seed=3)
    assert (out.groupby("patient_id")["split"].nunique() == 1).all()
    share = out["split"].value_counts(normalize=True)
    assert share["train"] == pytest.approx(0.7, abs=0.03)
    assert share["valid"] == pytest.approx(0.15, abs=0.03) and share["test"] == pytest.approx(0.15, abs=0.03)
    assert len(out) == len(df) and out["image_id"].tolist() == df["image_id"].tolist()
    assert check_leakage(out, hash_images=False).ok


def test_reproducible_by_seed_and_row_order():
    df = synthetic_manifest()
    a = assign_splits(df, SPACE, seed=7)
    b = assign_splits(df, SPACE, seed=7)
    c = assign_splits(df, SPACE, seed=8)
    shuffled = assign_splits(df.sample(frac=1.0, random_state=0), SPACE, seed=7).sort_index()
    assert a["split"].tolist() == b["split"].tolist() == shuffled["split"].tolist()
    assert a["split"].tolist() != c["split"].tolist()


@pytest.mark.parametrize("seed", range(5))
def test_rare_label_in_every_split(seed):
    df = synthetic_manifest(seed=seed, rare_patients=6)
    out = assign_splits(df, SPACE, seed=seed)
    per_split = out.groupby("split")["rare"].sum()
    assert all(per_split.get(s, 0) >= 1 for s in SPLITS), per_split.to_dict()
    common = out.groupby("split")["common"].mean()
    assert common.max() - common.min() < 0.06  # label prevalence kept across splits


def test_unlabelled_and_zero_fraction():
    df = synthetic_manifest().drop(columns=["common", "rare", "never"])
    out = assign_splits(df, LabelSpace(()), fractions=(0.9, 0.1, 0.0))
    assert set(out["split"]) == {"train", "valid"}
    with pytest.raises(ValueError, match="fractions"):
        assign_splits(df, LabelSpace(()), fractions=(0.5, 0.5, 0.5))


def test_respect_existing_keeps_official_test():
    df = synthetic_manifest()
    patients = sorted(df["patient_id"].unique())
    test_patients = set(patients[::5])
    df["split"] = np.where(df["patient_id"].isin(test_patients), "test", "train")
    out = assign_splits(df, SPACE, fractions=(0.8, 0.1, 0.1), respect_existing=True)
    assert (out.loc[df["split"] == "test", "split"] == "test").all()
    assert set(out.loc[df["split"] == "train", "split"]) == {"train", "valid"}
    carved = (out["split"] == "valid").sum() / (df["split"] == "train").sum()
    assert carved == pytest.approx(0.1 / 0.9, abs=0.03)
    assert out["source_split"].tolist() == df["split"].tolist()
    assert check_leakage(out, hash_images=False).ok


def test_respect_existing_pulls_patient_into_official_split():
    df = synthetic_manifest(n_patients=50)
    first = df["patient_id"] == "p0000"
    df.loc[df.index[first][0], "split"] = "test"  # one image of p0000 officially in test
    out = assign_splits(df, SPACE, respect_existing=True)
    assert set(out.loc[first, "split"]) == {"test"}


# ----------------------------------------------------------------------------- leakage


def _write_images(tmp_path: Path, df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    df["path"] = [str(tmp_path / f"{i}.png") for i in range(len(df))]
    for i, p in enumerate(df["path"]):
        Path(p).write_bytes(f"image {i}".encode())
    return df


def test_leakage_catches_shared_patient_and_identical_image(tmp_path):
    df = assign_splits(synthetic_manifest(n_patients=60), SPACE, seed=0)
    df = _write_images(tmp_path, df)
    assert check_leakage(df).ok

    leaky = df.copy()
    victim = leaky.index[leaky["split"] == "test"][0]
    moved_patient = leaky.loc[leaky.index[leaky["split"] == "train"][0], "patient_id"]
    leaky.loc[victim, "patient_id"] = moved_patient  # a train patient also in test
    dup_train = leaky.index[leaky["split"] == "train"][5]
    dup_valid = leaky.index[leaky["split"] == "valid"][0]
    Path(leaky.loc[dup_valid, "path"]).write_bytes(Path(leaky.loc[dup_train, "path"]).read_bytes())
    report = check_leakage(leaky, max_workers=2)

    assert isinstance(report, LeakageReport) and not report.ok
    assert report.shared_patients["train-test"] == [moved_patient]
    assert report.shared_patients["train-valid"] == [] and report.n_shared_patients == 1
    assert report.duplicate_images == [sorted([leaky.loc[dup_train, "image_id"], leaky.loc[dup_valid, "image_id"]])]
    assert report.hashed == len(df) and report.unreadable == 0
    text = report.summary()
    assert "1 patients appear in more than one split" in text and "train-test 1" in text and "LEAK" in text
    d = report.to_dict()
    assert json.loads(json.dumps(d))["ok"] is False and d["shared_patients"]["train-test"] == [moved_patient]


def test_leakage_same_image_within_one_split_is_not_leakage(tmp_path):
    df = _write_images(tmp_path, assign_splits(synthetic_manifest(n_patients=30), SPACE))
    train = df.index[df["split"] == "train"]
    Path(df.loc[train[1], "path"]).write_bytes(Path(df.loc[train[0], "path"]).read_bytes())
    Path(df.loc[train[2], "path"]).unlink()
    report = check_leakage(df)
    assert report.ok and report.duplicates_within_split == 1 and report.unreadable == 1
    assert "1 unreadable" in report.summary()


def test_leakage_ignores_unassigned_rows():
    df = synthetic_manifest(n_patients=20)
    report = check_leakage(df, hash_images=False)
    assert report.ok and report.unassigned == len(df) and report.split_counts == {}


@pytest.mark.realdata
def test_real_nih64_leakage_flagged(shared_data):
    res = load_source("csv", shared_data / "nih14_64px" / "labels.csv", path_col="relpath", class_col="folder_class",
                      patient_col="Patient ID", split_col="split")
    assert len(res.manifest) == 1000 and len(res.skipped) == 0
    report = check_leakage(res.manifest)
    counts = {k: len(v) for k, v in report.shared_patients.items()}
    assert counts == {"train-valid": 15, "train-test": 8, "valid-test": 9}
    assert not report.ok and report.hashed == 1000
    fixed = assign_splits(res.manifest, res.label_space, seed=0)
    assert check_leakage(fixed, hash_images=False).ok
