"""Generic sources: any CSV (numeric label columns or a class column) and a bare folder."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrray.labels import MULTICLASS, LabelSpace
from cxrray.manifest import ManifestError
from cxrray.sources import load_source
from cxrray.sources.generic import load_csv, load_folder


def make_csv(tmp_path: Path, rows: list[dict], images: bool = True, name: str = "labels.csv") -> Path:
    df = pd.DataFrame(rows)
    if images:
        for p in df["path"]:
            f = tmp_path / p
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(b"png")
    df.to_csv(tmp_path / name, index=False)
    return tmp_path / name


ROWS = [
    {"path": "imgs/a.png", "pid": "p1", "split": "train", "mass": "1", "nodule": "0"},
    {"path": "imgs/b.png", "pid": "p1", "split": "training", "mass": "0", "nodule": ""},
    {"path": "imgs/c.png", "pid": "p2", "split": "val", "mass": "0.5", "nodule": "1"},
    {"path": "imgs/d.png", "pid": "p3", "split": "test", "mass": "0", "nodule": "1"},
]


def test_numeric_labels_patients_and_split(tmp_path):
    res = load_csv(make_csv(tmp_path, ROWS), label_cols=["mass", "nodule"], patient_col="pid", split_col="split")
    m = res.manifest
    assert res.label_space == LabelSpace(("mass", "nodule"))
    assert m["image_id"].tolist() == ["imgs/a.png", "imgs/b.png", "imgs/c.png", "imgs/d.png"]
    assert m["path"].iat[0] == str((tmp_path / "imgs/a.png").resolve())
    assert m["patient_id"].tolist() == ["p1", "p1", "p2", "p3"]
    assert m["split"].tolist() == ["train", "train", "valid", "test"]
    assert np.isnan(m["nodule"].iat[1]) and m["mass"].iat[2] == 0.5 and m["mass"].dtype == np.float32


def test_default_one_patient_per_image(tmp_path, caplog):
    res = load_csv(make_csv(tmp_path, ROWS), label_cols=["mass"])
    assert res.manifest["patient_id"].tolist() == res.manifest["image_id"].tolist()
    assert "own patient" in caplog.text
    assert res.manifest["split"].isna().all()


def test_bad_labels_and_missing_files_skipped(tmp_path):
    rows = ROWS + [{"path": "imgs/e.png", "pid": "p4", "split": "train", "mass": "yes", "nodule": "0"},
                   {"path": "imgs/f.png", "pid": "p5", "split": "train", "mass": "-1", "nodule": "0"},
                   {"path": "imgs/g.png", "pid": "p6", "split": "holdout", "mass": "0", "nodule": "0"}]
    csv = make_csv(tmp_path, rows)
    (tmp_path / "imgs/d.png").unlink()
    res = load_csv(csv, label_cols=["mass", "nodule"], split_col="split")
    assert len(res.manifest) == 3
    sk = res.skipped.frame().set_index("item")
    assert sk["reason"].to_dict() == {"imgs/g.png": "unknown_split", "imgs/e.png": "unknown_label_value",
                                      "imgs/f.png": "unknown_label_value", "imgs/d.png": "missing_file"}
    assert "mass='yes'" in sk.loc["imgs/e.png", "detail"]


def test_multiclass_numeric_must_be_one_hot(tmp_path):
    rows = [{"path": "a.png", "cat": "1", "dog": "0"}, {"path": "b.png", "cat": "1", "dog": "1"}]
    res = load_csv(make_csv(tmp_path, rows), label_cols=["cat", "dog"], task="multiclass")
    assert len(res.manifest) == 1 and res.skipped.counts() == {"unknown_label_value": 1}
    assert "exactly one 1" in res.skipped.frame()["detail"].iat[0]


def test_class_column(tmp_path):
    rows = [{"path": "a.png", "y": "cat"}, {"path": "b.png", "y": "dog"}, {"path": "c.png", "y": ""},
            {"path": "d.png", "y": "eel"}]
    res = load_csv(make_csv(tmp_path, rows), class_col="y", classes=["dog", "cat"])
    assert res.label_space == LabelSpace(("dog", "cat"), MULTICLASS)
    m = res.manifest.set_index("image_id")
    assert m.loc["a.png", ["dog", "cat"]].tolist() == [0.0, 1.0]
    assert m.loc[["c.png"], ["dog", "cat"]].isna().all().all()
    assert res.skipped.counts() == {"unknown_label_value": 1}


def test_root_and_absolute_paths(tmp_path):
    img_root = tmp_path / "elsewhere"
    rows = [{"path": "x/a.png", "m": "1"}, {"path": str(tmp_path / "abs.png"), "m": "0"}]
    (img_root / "x").mkdir(parents=True)
    (img_root / "x/a.png").write_bytes(b"1")
    (tmp_path / "abs.png").write_bytes(b"1")
    res = load_csv(make_csv(tmp_path, rows, images=False), root=img_root, label_cols=["m"])
    assert res.manifest["path"].tolist() == [str(img_root.resolve() / "x/a.png"), str(tmp_path / "abs.png")]


def test_errors(tmp_path):
    csv = make_csv(tmp_path, ROWS, images=False)
    with pytest.raises(ManifestError, match=r"labels.csv: column 'image' not found \(columns: path, pid, split"):
        load_csv(csv, path_col="image", label_cols=["mass"])
    with pytest.raises(ManifestError, match="column 'tumour' not found"):
        load_csv(csv, label_cols=["tumour"])
    with pytest.raises(ManifestError, match="label_cols"):
        load_csv(csv)
    (tmp_path / "bad.csv").write_text("path\ta\nx.png\t1\n")
    with pytest.raises(ManifestError, match="tab-separated"):
        load_csv(tmp_path / "bad.csv", label_cols=["a"])
    with pytest.raises(ManifestError, match="no such"):
        load_csv(tmp_path / "none.csv", label_cols=["a"])


def test_unlabelled_csv(tmp_path):
    res = load_csv(make_csv(tmp_path, ROWS), label_cols=[])
    assert res.label_space.num_classes == 0 and len(res.manifest) == 4


def test_folder(tmp_path):
    for rel in ["a.png", "sub/b.JPG", "sub/deep/c.dcm", "notes.txt", ".hidden.png"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    res = load_folder(tmp_path)
    assert res.manifest["image_id"].tolist() == ["a.png", "sub/b.JPG", "sub/deep/c.dcm"]
    assert res.label_space.num_classes == 0
    assert (res.manifest["patient_id"] == res.manifest["image_id"]).all()
    assert res.skipped.counts() == {"not_an_image": 1}
    assert load_folder(tmp_path, recursive=False).manifest["image_id"].tolist() == ["a.png"]
    assert len(load_source("folder", tmp_path, extensions=(".png",)).manifest) == 1
    with pytest.raises(ManifestError, match="not a folder"):
        load_folder(tmp_path / "a.png")


def test_folder_follows_linked_folders_and_reports_files_it_cannot_hold(tmp_path):
    """A Latin-1 name stopped the whole manifest (Parquet holds UTF-8) and a named pipe hung it;
    a linked folder was skipped without a word. Now: skipped with reasons, and followed."""
    import os

    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    (root / "a.png").write_bytes(b"x")
    (elsewhere / "b.png").write_bytes(b"x")
    (root / "linked").symlink_to(elsewhere)
    (root / os.fsdecode(b"caf\xe9.png")).write_bytes(b"x")
    os.mkfifo(root / "pipe.png")
    res = load_folder(root)
    assert res.manifest["image_id"].tolist() == ["a.png", "linked/b.png"]
    assert res.skipped.counts() == {"bad_name": 1, "not_a_file": 1}


def test_a_manifest_of_no_images_or_onto_a_folder_is_refused(tmp_path):
    from cxrray.config import ManifestConfig
    from cxrray.manifest_build import build_manifest
    from cxrray.storage import StorageError

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(ManifestError, match="no images for a manifest \\(1 not_an_image\\)"):
        build_manifest(ManifestConfig(source="folder", root=str(tmp_path / "empty"), out=str(tmp_path / "m.parquet")))
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(b"x")
    with pytest.raises(StorageError, match="is a folder; give a file name"):
        build_manifest(ManifestConfig(source="folder", root=str(tmp_path / "imgs"), out=str(tmp_path / "empty")))
    assert not (tmp_path / "m.parquet").exists()


def test_registry_csv(tmp_path):
    res = load_source("csv", make_csv(tmp_path, ROWS), label_cols=["mass"], patient_col="pid")
    assert res.manifest["patient_id"].nunique() == 3
