"""Kermany adapter: file naming (2 and 3 classes, patient ids), official splits, duplicates."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cxrray.labels import KERMANY_2, KERMANY_3, MULTICLASS
from cxrray.manifest import ManifestError
from cxrray.sources import load_source
from cxrray.sources.kermany import load_kermany, parse_name

FILES = {
    "train/NORMAL": ["IM-0011-0001.jpeg", "IM-0011-0001-0002.jpeg", "NORMAL2-IM-1234-0001.jpeg"],
    "train/PNEUMONIA": ["person12_bacteria_47.jpeg", "person12_bacteria_48.jpeg", "person1_virus_6.jpeg",
                        "person447_virus_921_1.jpeg"],
    "val/NORMAL": ["NORMAL2-IM-1427-0001.jpeg"],
    "val/PNEUMONIA": ["person1946_bacteria_4874.jpeg"],
    "test/NORMAL": ["IM-0001-0001.jpeg"],
    "test/PNEUMONIA": ["person100_virus_184.jpeg"],
}


def make_kermany(tmp_path: Path, files=FILES, extra: dict[str, bytes] | None = None) -> Path:
    base = tmp_path / "chest_xray"
    for folder, names in files.items():
        (base / folder).mkdir(parents=True, exist_ok=True)
        for n in names:
            (base / folder / n).write_bytes(f"jpeg:{folder}/{n}".encode())  # distinct contents
    for rel, data in (extra or {}).items():
        (base / rel).write_bytes(data)
    return tmp_path


def test_two_classes(tmp_path):
    res = load_kermany(make_kermany(tmp_path))
    m = res.manifest.set_index("image_id")
    assert res.label_space.names == KERMANY_2 and res.label_space.task == MULTICLASS
    assert len(m) == 11 and len(res.skipped) == 0
    assert m.loc["train/NORMAL/IM-0011-0001.jpeg", ["NORMAL", "PNEUMONIA"]].tolist() == [1.0, 0.0]
    assert m.loc["train/PNEUMONIA/person1_virus_6.jpeg", ["NORMAL", "PNEUMONIA"]].tolist() == [0.0, 1.0]
    assert (m[list(KERMANY_2)].sum(axis=1) == 1).all()
    assert m["split"].value_counts().to_dict() == {"train": 7, "valid": 2, "test": 2}
    assert Path(m["path"].iloc[0]).is_file()


def test_three_classes(tmp_path):
    m = load_kermany(make_kermany(tmp_path), classes=3).manifest.set_index("image_id")
    onehot = m[list(KERMANY_3)].to_numpy()
    assert (onehot.sum(axis=1) == 1).all() and onehot.dtype == np.float32
    assert m.loc["train/PNEUMONIA/person12_bacteria_47.jpeg", "BACTERIAL"] == 1.0
    assert m.loc["train/PNEUMONIA/person447_virus_921_1.jpeg", "VIRAL"] == 1.0
    assert m.loc["test/NORMAL/IM-0001-0001.jpeg", "NORMAL"] == 1.0
    with pytest.raises(ValueError, match="classes"):
        load_kermany(tmp_path, classes=4)


def test_patient_ids(tmp_path):
    m = load_kermany(make_kermany(tmp_path)).manifest.set_index("image_id")["patient_id"]
    assert m["train/PNEUMONIA/person12_bacteria_47.jpeg"] == m["train/PNEUMONIA/person12_bacteria_48.jpeg"] == "person12"
    # NORMAL files: the series number groups all of its images (err on the side of grouping).
    assert m["train/NORMAL/IM-0011-0001.jpeg"] == m["train/NORMAL/IM-0011-0001-0002.jpeg"] == "IM-0011"
    assert m["train/NORMAL/NORMAL2-IM-1234-0001.jpeg"] == "IM-1234"
    assert parse_name("NORMAL", "NORMAL2-IM-0011-0003.jpeg") == ("IM-0011", "normal")


def test_bad_names_skipped(tmp_path):
    files = {**FILES, "train/NORMAL": FILES["train/NORMAL"] + ["scan.jpeg", "person3_virus_1.jpeg", ".DS_Store"],
             "train/PNEUMONIA": FILES["train/PNEUMONIA"] + ["IM-0001-0001.jpeg"]}
    res = load_kermany(make_kermany(tmp_path, files))
    assert len(res.manifest) == 11
    sk = res.skipped.frame().set_index("item")
    assert set(sk["reason"]) == {"unparseable_path"} and len(sk) == 3
    assert "PNEUMONIA folder" in sk.loc["train/PNEUMONIA/IM-0001-0001.jpeg", "detail"]
    assert "NORMAL folder" in sk.loc["train/NORMAL/person3_virus_1.jpeg", "detail"]


def test_duplicates_reported(tmp_path):
    same = b"identical bytes"
    root = make_kermany(tmp_path, extra={"train/NORMAL/IM-0011-0001.jpeg": same, "test/NORMAL/IM-0001-0001.jpeg": same,
                                         "train/PNEUMONIA/person1_virus_6.jpeg": b"x",
                                         "train/PNEUMONIA/person447_virus_921_1.jpeg": b"x"})
    res = load_kermany(root)
    assert res.info["duplicate_groups"] == [
        ["test/NORMAL/IM-0001-0001.jpeg", "train/NORMAL/IM-0011-0001.jpeg"],
        ["train/PNEUMONIA/person1_virus_6.jpeg", "train/PNEUMONIA/person447_virus_921_1.jpeg"],
    ]
    assert "2 groups of byte-identical images" in res.info["summary"]
    assert res.manifest["sha1"].str.len().eq(40).all()
    assert "duplicate_groups" not in load_kermany(root, check_duplicates=False).info


def test_roots(tmp_path):
    root = make_kermany(tmp_path)
    assert len(load_kermany(root / "chest_xray").manifest) == 11
    assert len(load_source("kermany", root, classes=3, check_duplicates=False).manifest) == 11
    with pytest.raises(ManifestError, match="no train/"):
        load_kermany(tmp_path / "chest_xray" / "train" / "NORMAL")


@pytest.mark.realdata
def test_real_kermany(shared_data):
    res = load_kermany(shared_data / "kermany", classes=3)
    m = res.manifest
    assert len(res.skipped) == 0
    counts = m.groupby("split")[["NORMAL", "BACTERIAL", "VIRAL"]].sum().astype(int)
    assert counts.loc["train"].tolist() == [1341, 2530, 1345]
    assert counts.loc["test"].tolist() == [234, 242, 148]
    groups = res.info["duplicate_groups"]
    assert 25 <= len(groups) <= 35  # the README says ~32; sha1 of these files finds 30
