"""CheXpert adapter: layouts, every uncertainty policy on every value, filters, typed errors."""
from __future__ import annotations

import gzip
import logging
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrray.labels import CHEXPERT_5, CHEXPERT_14, SYNTHETIC_FINDINGS, Blank, Policy, UncertaintyConfig
from cxrray.manifest import BASE_COLUMNS, ManifestError, read_manifest, write_manifest
from cxrray.sources import SOURCES, load_source
from cxrray.sources.chexpert import load_chexpert

HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_14]
NAN = float("nan")


def row(path: str, fl: str = "Frontal", appa: str = "AP", **labels: str) -> dict:
    """One CSV row; labels by name with '_' for spaces, blank by default."""
    r = {"Path": path, "Sex": "Female", "Age": "68", "Frontal/Lateral": fl, "AP/PA": appa if fl == "Frontal" else ""}
    r.update({n: "" for n in CHEXPERT_14})
    r.update({k.replace("_", " "): v for k, v in labels.items()})
    return r


def write_dataset(base: Path, rows: dict[str, list[dict]], layout: str = "CheXpert-v1.0-small",
                  images: bool = True, gz: bool = False) -> Path:
    """base/<layout>/{train,valid}.csv and (optionally) a stub file per image; returns the dataset folder."""
    ddir = base / layout
    ddir.mkdir(parents=True, exist_ok=True)
    for name, rs in rows.items():
        df = pd.DataFrame(rs, columns=HEADER)
        target = ddir / f"{name}.csv{'.gz' if gz else ''}"
        df.to_csv(target, index=False, compression="gzip" if gz else None)
        if images:
            for r in rs:
                p = base / r["Path"]
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(b"\xff\xd8jpeg")
    return ddir


def small_rows(prefix: str = "CheXpert-v1.0-small") -> dict[str, list[dict]]:
    t = f"{prefix}/train"
    return {
        "train": [
            row(f"{t}/patient00001/study1/view1_frontal.jpg", "Frontal", "AP", No_Finding="1.0", Support_Devices="1.0"),
            row(f"{t}/patient00002/study2/view1_frontal.jpg", "Frontal", "PA", Edema="-1.0", Cardiomegaly="1.0"),
            row(f"{t}/patient00002/study1/view1_frontal.jpg", "Frontal", "LL", Atelectasis="-1.0"),
            row(f"{t}/patient00002/study1/view2_lateral.jpg", "Lateral", Cardiomegaly="-1.0"),
        ],
        "valid": [row(f"{prefix}/valid/patient64541/study1/view1_frontal.jpg", "Frontal", "AP",
                      **{n.replace(" ", "_"): "0.0" for n in CHEXPERT_14})],
    }


# ----------------------------------------------------------------------------- policies

VALUES = ["1.0", "0.0", "-1.0", ""]
EXPECTED = {  # policy -> targets for 1, 0, -1 (blank handled separately)
    Policy.IGNORE: [1.0, 0.0, NAN],
    Policy.ZEROS: [1.0, 0.0, 0.0],
    Policy.ONES: [1.0, 0.0, 1.0],
    Policy.MULTICLASS: [1.0, 0.0, 2.0],
}


@pytest.mark.parametrize("blank", [Blank.ZERO, Blank.IGNORE])
@pytest.mark.parametrize("policy", list(Policy))
def test_every_policy_on_every_value(tmp_path, policy, blank):
    rows = [row(f"CheXpert-v1.0-small/train/patient0000{i}/study1/view1_frontal.jpg", Edema=v)
            for i, v in enumerate(VALUES, start=1)]
    write_dataset(tmp_path, {"train": rows})
    res = load_chexpert(tmp_path, uncertainty=UncertaintyConfig(policy, blank=blank))
    got = res.manifest["Edema"].tolist()
    want = EXPECTED[policy] + [0.0 if blank == Blank.ZERO else NAN]
    assert len(got) == 4
    for g, w in zip(got, want):
        assert (math.isnan(g) and math.isnan(w)) or g == w, (policy, blank, got, want)
    assert res.manifest["Edema"].dtype == np.float32
    assert res.label_space.uncertain_classes == (policy == Policy.MULTICLASS)
    assert res.label_space.num_outputs == 14 * (3 if policy == Policy.MULTICLASS else 1)


def test_per_label_overrides(tmp_path):
    write_dataset(tmp_path, {"train": [row("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg",
                                           Atelectasis="-1.0", Edema="-1.0", Cardiomegaly="-1.0", Pneumonia="-1.0")]})
    cfg = UncertaintyConfig(Policy.ZEROS, {"Atelectasis": Policy.ONES, "Edema": Policy.ONES})
    m = load_chexpert(tmp_path, uncertainty=cfg).manifest.iloc[0]
    assert (m["Atelectasis"], m["Edema"], m["Cardiomegaly"], m["Pneumonia"]) == (1.0, 1.0, 0.0, 0.0)


def test_policy_by_name(tmp_path):
    write_dataset(tmp_path, {"train": [row("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg",
                                           Edema="-1.0")]})
    assert load_chexpert(tmp_path, uncertainty="U-Ones").manifest["Edema"].iat[0] == 1.0
    assert np.isnan(load_chexpert(tmp_path, uncertainty="ignore").manifest["Edema"].iat[0])


def test_chexpert5_selection(tmp_path):
    write_dataset(tmp_path, small_rows())
    res = load_chexpert(tmp_path, labels="chexpert5")
    assert res.label_space.names == CHEXPERT_5
    assert "No Finding" not in res.manifest.columns
    assert list(res.manifest.columns[: len(BASE_COLUMNS) + 5]) == [*BASE_COLUMNS, *CHEXPERT_5]
    with pytest.raises(ValueError, match="not CheXpert"):
        load_chexpert(tmp_path, labels=["Hernia"])


# ----------------------------------------------------------------------------- layout, ids, views


@pytest.mark.parametrize("layout", ["CheXpert-v1.0-small", "CheXpert-v1.0"])
@pytest.mark.parametrize("which_root", ["parent", "dataset", "csv"])
def test_layouts_and_roots(tmp_path, layout, which_root):
    ddir = write_dataset(tmp_path, small_rows(layout), layout=layout)
    root = {"parent": tmp_path, "dataset": ddir, "csv": ddir / "train.csv"}[which_root]
    res = load_chexpert(root)
    m = res.manifest
    assert len(res.skipped) == 0, res.skipped.frame()
    assert len(m) == (4 if which_root == "csv" else 5)
    assert all(Path(p).is_file() for p in m["path"])
    assert m["image_id"].iat[0] == f"{layout}/train/patient00001/study1/view1_frontal.jpg"


def test_gz_csv_and_renamed_folder(tmp_path):
    """A CSV in a folder not named like the dataset (the shared data's chexpert/train.csv.gz)."""
    ddir = write_dataset(tmp_path, {"train": small_rows()["train"]}, layout="chexpert", images=False, gz=True)
    res = load_chexpert(ddir / "train.csv.gz", check_files=False)
    assert len(res.manifest) == 4
    assert res.manifest["path"].iat[0] == str(ddir.resolve() / "train/patient00001/study1/view1_frontal.jpg")


def test_ids_views_and_official_split(tmp_path):
    write_dataset(tmp_path, small_rows())
    m = load_chexpert(tmp_path).manifest.set_index("image_id")
    lat = m.loc["CheXpert-v1.0-small/train/patient00002/study1/view2_lateral.jpg"]
    assert (lat["patient_id"], lat["study_id"], lat["view"]) == ("patient00002", "patient00002/study1", "LATERAL")
    assert m["view"].tolist() == ["AP", "PA", "LL", "LATERAL", "AP"]
    assert m["split"].tolist() == ["train"] * 4 + ["valid"]
    assert m["sex"].iat[0] == "Female" and m["age"].iat[0] == 68.0
    assert load_chexpert(tmp_path, official_split=False).manifest["split"].isna().all()
    assert len(load_chexpert(tmp_path, csvs=["valid"]).manifest) == 1


def test_view_filters(tmp_path):
    write_dataset(tmp_path, small_rows())
    frontal = load_chexpert(tmp_path, views=("frontal",))
    assert len(frontal.manifest) == 4 and (frontal.manifest["view"] != "LATERAL").all()
    assert frontal.info["filtered_out"] == {"views": 1}
    lateral = load_chexpert(tmp_path, views="lateral").manifest
    assert lateral["view"].tolist() == ["LATERAL"]
    appa = load_chexpert(tmp_path, ap_pa=("AP", "PA")).manifest
    assert sorted(appa["view"]) == ["AP", "AP", "PA"]
    with pytest.raises(ValueError, match="views"):
        load_chexpert(tmp_path, views=("oblique",))


# ----------------------------------------------------------------------------- skipped rows


def test_unknown_values_skipped_with_reason(tmp_path):
    rows = small_rows()
    rows["train"][1]["Edema"] = "2.0"
    rows["train"][2]["Cardiomegaly"] = "yes"
    write_dataset(tmp_path, rows)
    res = load_chexpert(tmp_path)
    assert len(res.manifest) == 3
    sk = res.skipped.frame()
    assert sk["reason"].tolist() == ["unknown_label_value"] * 2
    assert "Edema='2.0'" in sk["detail"].iat[0] and "Cardiomegaly='yes'" in sk["detail"].iat[1]
    assert "unknown_label_value 2" in res.info["summary"]


def test_missing_files_skipped_with_reason(tmp_path):
    write_dataset(tmp_path, small_rows())
    gone = tmp_path / "CheXpert-v1.0-small/train/patient00002/study1/view2_lateral.jpg"
    gone.unlink()
    res = load_chexpert(tmp_path)
    assert len(res.manifest) == 4
    assert res.skipped.counts() == {"missing_file": 1}
    assert res.skipped.frame()["detail"].iat[0] == str(gone)
    assert len(load_chexpert(tmp_path, check_files=False).manifest) == 5


def test_unparseable_and_duplicate_paths(tmp_path):
    rows = small_rows()
    rows["train"].append(row("CheXpert-v1.0-small/train/somebody/view1_frontal.jpg"))
    rows["train"].append(dict(rows["train"][0]))
    write_dataset(tmp_path, rows, images=False)
    res = load_chexpert(tmp_path, check_files=False)
    assert res.skipped.counts() == {"unparseable_path": 1, "duplicate_id": 1}
    assert len(res.manifest) == 5 and res.manifest["image_id"].is_unique


# ----------------------------------------------------------------------------- typed errors


def test_missing_path_column(tmp_path):
    ddir = tmp_path / "CheXpert-v1.0-small"
    ddir.mkdir()
    pd.DataFrame({"a": ["x"], "b": ["y"]}).to_csv(ddir / "train.csv", index=False)
    with pytest.raises(ManifestError, match=r"train\.csv: column 'Path' not found \(columns: a, b\).*--source csv"):
        load_chexpert(tmp_path)


def test_missing_label_column(tmp_path):
    ddir = write_dataset(tmp_path, small_rows(), images=False)
    pd.read_csv(ddir / "train.csv").drop(columns=["Edema"]).to_csv(ddir / "train.csv", index=False)
    with pytest.raises(ManifestError, match="column 'Edema' not found"):
        load_chexpert(tmp_path, check_files=False)


def test_malformed_csvs(tmp_path):
    ddir = tmp_path / "ds"
    ddir.mkdir()
    (ddir / "train.csv").write_text("Path,Edema\na.jpg,1.0\nb.jpg,1.0,0.0,extra\n")
    with pytest.raises(ManifestError, match=r"train\.csv: not a readable CheXpert CSV"):
        load_chexpert(ddir / "train.csv")
    (ddir / "train.csv").write_text(";".join(HEADER) + "\n" + ";".join(["x"] * len(HEADER)) + "\n")
    with pytest.raises(ManifestError, match="semicolon-separated"):
        load_chexpert(ddir / "train.csv")
    (ddir / "train.csv").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe binary")
    with pytest.raises(ManifestError, match="not a readable"):
        load_chexpert(ddir / "train.csv")
    with gzip.open(ddir / "valid.csv.gz", "wb") as f:
        f.write(b"Path,Edema\n" * 100)
    (ddir / "valid.csv.gz").write_bytes((ddir / "valid.csv.gz").read_bytes()[:20])  # truncated gzip
    with pytest.raises(ManifestError, match="valid.csv.gz"):
        load_chexpert(ddir / "valid.csv.gz")


def test_no_csv_found(tmp_path):
    with pytest.raises(ManifestError, match="no train.csv or valid.csv"):
        load_chexpert(tmp_path)
    with pytest.raises(ManifestError, match="no such file"):
        load_chexpert(tmp_path / "nope")


# ----------------------------------------------------------------------------- registry, round trip


def test_registry(tmp_path):
    write_dataset(tmp_path, small_rows())
    assert set(SOURCES) == {"chexpert", "synthetic", "nih", "kermany", "csv", "folder", "dicom"}
    assert len(load_source("chexpert", tmp_path, labels="chexpert5").manifest) == 5
    assert load_source("synthetic", tmp_path).label_space.names == SYNTHETIC_FINDINGS
    with pytest.raises(ManifestError, match="unknown source"):
        load_source("mimic", tmp_path)
    with pytest.raises(ManifestError, match="no option"):
        load_source("chexpert", tmp_path, classes=3)


def test_manifest_round_trip(tmp_path):
    write_dataset(tmp_path, small_rows())
    res = load_chexpert(tmp_path, uncertainty="U-Ignore")
    out = write_manifest(res.manifest, res.label_space, tmp_path / "m.parquet", res.info)
    df, space = read_manifest(out)
    assert space == res.label_space
    pd.testing.assert_frame_equal(df, res.manifest, check_dtype=False)


# ----------------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_real_train_csv(shared_data, caplog):
    caplog.set_level(logging.INFO)
    start = time.perf_counter()
    res = load_chexpert(shared_data / "chexpert" / "train.csv.gz", check_files=False)
    seconds = time.perf_counter() - start
    logging.getLogger(__name__).info("real CheXpert train.csv -> manifest in %.2f s", seconds)
    print(f"real CheXpert train.csv (223,414 rows) -> manifest in {seconds:.2f} s")
    m = res.manifest
    assert len(m) == 223_414 and m["patient_id"].nunique() == 64_540
    assert len(res.skipped) == 0
    assert (m["split"] == "train").all()
    assert set(m["view"].dropna()) == {"AP", "PA", "LATERAL", "LL", "RL"}
    assert seconds < 15, f"parsing took {seconds:.1f} s"


@pytest.mark.realdata
def test_real_valid_csv(shared_data):
    res = load_chexpert(shared_data / "chexpert" / "valid.csv", check_files=False, labels="chexpert5")
    assert len(res.manifest) == 234 and res.manifest["patient_id"].nunique() == 200
    assert set(np.unique(res.manifest[list(CHEXPERT_5)].to_numpy())) <= {0.0, 1.0}
