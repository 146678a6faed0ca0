"""NIH ChestX-ray14 adapter: the real header quirks, No Finding, official lists, boxes."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from cxrray.labels import NIH_14
from cxrray.manifest import ManifestError
from cxrray.sources import load_source
from cxrray.sources.nih import load_nih, rename_columns

# The first lines of Data_Entry_subset.csv as shipped (CRLF, unquoted bracket headers).
SUBSET_CSV = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\r\n"
    "00000100_000.png,Atelectasis|Effusion|Infiltration,0,100,60,M,PA,2500,2048,0.171,0.171\r\n"
    "00000284_000.png,Hernia,5,284,86,F,PA,2992,2991,0.14300000000000002,0.14300000000000002\r\n"
    "00000427_000.png,No Finding,0,427,77,F,PA,2830,2889,0.14300000000000002,0.14300000000000002\r\n"
    "00000427_001.png,Pleural_Thickening|Mass,1,427,78,F,AP,2500,2048,0.168,0.168\r\n"
)
# The original 2017 release ends every line with a comma: an empty 12th column.
ORIGINAL_2017 = "".join(line.rstrip("\r") + ",\n" for line in SUBSET_CSV.split("\n") if line)
BOXES_CSV = (
    "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
    "00000100_000.png,Atelectasis,225.08,547.01,86.77,79.18\n"
    "00000100_000.png,Infiltrate,686.1,131.5,185.4,313.4\n"
    "00000284_000.png,Cardiomegaly,337.0,276.3,553.7,386.8\n"
    "99999999_000.png,Mass,1,2,3,4\n"
)


def make_nih(tmp_path: Path, csv_text: str = SUBSET_CSV, csv_name: str = "Data_Entry_2017.csv",
             boxes: bool = True, images: bool = True) -> Path:
    root = tmp_path / "nih"
    (root / "images").mkdir(parents=True)
    (root / csv_name).write_text(csv_text, newline="")
    if boxes:
        (root / "BBox_List_2017.csv").write_text(BOXES_CSV)
    if images:
        for line in csv_text.splitlines()[1:]:
            (root / "images" / line.split(",")[0]).write_bytes(b"\x89PNG")
    return root


@pytest.mark.parametrize("text", [SUBSET_CSV, ORIGINAL_2017], ids=["subset_crlf", "original_trailing_comma"])
def test_real_header_parsed(tmp_path, text):
    res = load_nih(make_nih(tmp_path, text))
    m = res.manifest.set_index("image_id")
    assert len(m) == 4 and len(res.skipped) == 0
    assert res.label_space.names == NIH_14
    first = m.loc["00000100_000.png"]
    assert (first["patient_id"], first["view"], first["age"], first["sex"]) == ("100", "PA", 60.0, "M")
    assert (first["orig_width"], first["orig_height"]) == (2500.0, 2048.0)
    assert first["pixel_spacing_x"] == pytest.approx(0.171) and first["pixel_spacing_y"] == pytest.approx(0.171)
    assert [first[n] for n in ("Atelectasis", "Effusion", "Infiltration", "Hernia")] == [1.0, 1.0, 1.0, 0.0]
    assert not any(c.startswith("Unnamed") for c in m.columns)
    assert m.loc["00000427_001.png", "Pleural_Thickening"] == 1.0
    assert m["path"].map(lambda p: Path(p).is_file()).all()


def test_rename_by_position():
    cols = ["Image Index", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]", "Unnamed: 11"]
    assert rename_columns(cols) == {"Image Index": "image_index", "OriginalImage[Width": "orig_width",
                                    "Height]": "orig_height", "OriginalImagePixelSpacing[x": "pixel_spacing_x",
                                    "y]": "pixel_spacing_y"}


def test_no_finding_is_all_zeros(tmp_path):
    m = load_nih(make_nih(tmp_path)).manifest.set_index("image_id")
    row = m.loc["00000427_000.png", list(NIH_14)].to_numpy(dtype=np.float32)
    assert row.shape == (14,) and (row == 0).all()


def test_unknown_and_conflicting_findings_skipped(tmp_path):
    text = SUBSET_CSV + ("00000500_000.png,Cardiomegaly|Tuberculosis,0,500,50,M,PA,1,1,0.1,0.1\r\n"
                         "00000501_000.png,No Finding|Mass,0,501,50,M,PA,1,1,0.1,0.1\r\n"
                         "00000502_000.png,,0,502,50,M,PA,1,1,0.1,0.1\r\n")
    res = load_nih(make_nih(tmp_path, text))
    assert len(res.manifest) == 4
    sk = res.skipped.frame().set_index("item")
    assert set(sk["reason"]) == {"unknown_label_value"}
    assert "Tuberculosis" in sk.loc["00000500_000.png", "detail"]
    assert "No Finding" in sk.loc["00000501_000.png", "detail"]
    assert "empty" in sk.loc["00000502_000.png", "detail"]


def test_official_lists(tmp_path):
    root = make_nih(tmp_path)
    (root / "train_val_list.txt").write_text("00000100_000.png\n00000284_000.png\n")
    (root / "test_list.txt").write_text("00000427_000.png\n00000427_001.png\n")
    m = load_nih(root).manifest.set_index("image_id")  # auto-found in root
    assert m["split"].to_dict() == {"00000100_000.png": "train", "00000284_000.png": "train",
                                    "00000427_000.png": "test", "00000427_001.png": "test"}
    assert load_nih(root, train_val_list=False, test_list=False).manifest["split"].isna().all()


def test_split_lists_gz_with_label_columns(tmp_path):
    """The CheXNet lists: `image 14x{0,1}` per line, gzipped."""
    root = make_nih(tmp_path)
    for split, names in (("train", ["00000100_000.png"]), ("valid", ["00000284_000.png"]),
                         ("test", ["00000427_000.png", "00000427_001.png"])):
        with gzip.open(root / f"{split}.txt.gz", "wt") as f:
            f.writelines(f"{n} " + " ".join(["0"] * 14) + "\n" for n in names)
    lists = {s: f"{s}.txt.gz" for s in ("train", "valid", "test")}
    m = load_nih(root, split_lists=lists).manifest
    assert m["split"].value_counts().to_dict() == {"test": 2, "train": 1, "valid": 1}


def test_image_in_two_lists_skipped(tmp_path):
    root = make_nih(tmp_path)
    (root / "train_val_list.txt").write_text("00000100_000.png\n")
    (root / "test_list.txt").write_text("00000100_000.png\n")
    res = load_nih(root)
    assert res.skipped.counts() == {"conflicting_split": 1}


def test_boxes_attached(tmp_path):
    res = load_nih(make_nih(tmp_path))
    m = res.manifest.set_index("image_id")
    boxes = json.loads(m.loc["00000100_000.png", "boxes"])
    assert [b["label"] for b in boxes] == ["Atelectasis", "Infiltration"]  # 'Infiltrate' renamed
    assert boxes[0] == {"label": "Atelectasis", "x": 225.08, "y": 547.01, "w": 86.77, "h": 79.18}
    assert m["boxes"].notna().sum() == 2
    assert (res.info["images_with_boxes"], res.info["boxes"]) == (2, 3)
    assert "boxes" not in load_nih(make_nih(tmp_path / "b"), bbox_csv=False).info


def test_missing_files_and_kaggle_layout(tmp_path):
    root = make_nih(tmp_path, images=False)
    (root / "images").rmdir()
    for i, name in enumerate(["00000100_000.png", "00000284_000.png", "00000427_000.png"]):
        d = root / f"images_{i + 1:03d}" / "images"
        d.mkdir(parents=True)
        (d / name).write_bytes(b"\x89PNG")
    res = load_nih(root)
    assert len(res.manifest) == 3 and res.skipped.counts() == {"missing_file": 1}
    assert res.manifest.set_index("image_id")["path"]["00000284_000.png"].endswith("images_002/images/00000284_000.png")
    assert len(load_nih(root, check_files=False).manifest) == 4


def test_errors(tmp_path):
    with pytest.raises(ManifestError, match="no Data_Entry"):
        load_nih(tmp_path)
    root = make_nih(tmp_path / "x", "Image,Labels\r\na.png,Mass\r\n")
    with pytest.raises(ManifestError, match="column 'image_index' not found.*Image Index"):
        load_nih(root)
    root = make_nih(tmp_path / "y")
    (root / "BBox_List_2017.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ManifestError, match="BBox_List_2017.csv: expected a header"):
        load_nih(root)


def test_registry(tmp_path):
    assert len(load_source("nih", make_nih(tmp_path), bbox_csv=False).manifest) == 4


@pytest.mark.realdata
def test_real_subset(shared_data):
    res = load_nih(shared_data / "nih14", csv="Data_Entry_subset.csv")
    m = res.manifest
    assert len(m) == 200 and len(res.skipped) == 0 and m["patient_id"].is_unique
    assert res.info["images_with_boxes"] == 12 and m["boxes"].notna().sum() == 12
    assert set(m["view"]) <= {"PA", "AP"}
    nf = m["findings"] == "No Finding"
    assert nf.any() and (m.loc[nf, list(NIH_14)] == 0).all().all()


@pytest.mark.realdata
def test_real_full_metadata(shared_data):
    res = load_nih(shared_data / "nih14", csv="Data_Entry_2017_v2020.csv.gz", check_files=False)
    assert len(res.manifest) == 112_120 and res.manifest["patient_id"].nunique() == 30_805
    assert (res.info["images_with_boxes"], res.info["boxes"]) == (880, 984)
