"""CheXpert adapter: layouts, raw labels in the manifest and every uncertainty policy on every
value where targets are built, filters, typed errors."""
from __future__ import annotations

import gzip
import logging
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrray.labels import (
    CHEXPERT_5,
    CHEXPERT_14,
    SYNTHETIC_FINDINGS,
    Blank,
    LabelSpace,
    Policy,
    TargetMap,
    UncertaintyConfig,
    UnknownLabelValue,
)
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


# ----------------------------------------------------------------------------- raw labels, policies

VALUES = ["1.0", "0.0", "-1.0", ""]
EXPECTED = {  # policy -> targets for 1, 0, -1 (blank handled separately)
    Policy.IGNORE: [1.0, 0.0, NAN],
    Policy.ZEROS: [1.0, 0.0, 0.0],
    Policy.ONES: [1.0, 0.0, 1.0],
    Policy.MULTICLASS: [1.0, 0.0, 2.0],
}


def same(got, want) -> bool:
    return len(got) == len(want) and all((math.isnan(g) and math.isnan(w)) or g == w for g, w in zip(got, want))


@pytest.fixture
def edema_values(tmp_path):
    """A manifest from four rows whose Edema cell is 1, 0, -1 and blank."""
    rows = [row(f"CheXpert-v1.0-small/train/patient0000{i}/study1/view1_frontal.jpg", Edema=v)
            for i, v in enumerate(VALUES, start=1)]
    write_dataset(tmp_path, {"train": rows})
    return load_chexpert(tmp_path)


def test_the_manifest_keeps_the_labelers_raw_values(edema_values):
    # No policy is baked in: one manifest serves every training policy and an honest evaluation.
    assert same(edema_values.manifest["Edema"].tolist(), [1.0, 0.0, -1.0, NAN])
    assert edema_values.manifest["Edema"].dtype == np.float32
    space = edema_values.label_space
    assert space.raw_uncertain and not space.uncertain_classes and space.num_outputs == 14
    assert "1 with an uncertain label" in edema_values.info["summary"]


@pytest.mark.parametrize("blank", [Blank.ZERO, Blank.IGNORE])
@pytest.mark.parametrize("policy", list(Policy))
def test_every_policy_on_every_value(edema_values, policy, blank):
    space = edema_values.label_space.select(["Edema"])
    cfg = UncertaintyConfig(policy, blank=blank)
    got = TargetMap.training(space, cfg)(edema_values.manifest[["Edema"]].to_numpy())[:, 0].tolist()
    assert same(got, EXPECTED[policy] + [0.0 if blank == Blank.ZERO else NAN]), (policy, blank, got)
    model = space.for_model(cfg)
    assert model.uncertain_classes == (policy == Policy.MULTICLASS) and not model.raw_uncertain
    assert model.num_outputs == (3 if policy == Policy.MULTICLASS else 1)


@pytest.mark.parametrize("policy, want", [("certain", [1.0, 0.0, NAN, NAN]), ("blank_negative", [1.0, 0.0, NAN, 0.0]),
                                          ("train", [1.0, 0.0, 1.0, 0.0])])
def test_evaluation_policies_and_what_they_leave_out(edema_values, policy, want):
    space = edema_values.label_space.select(["Edema"])
    tmap = TargetMap.evaluation(space, policy, UncertaintyConfig(Policy.ONES))
    cells = edema_values.manifest[["Edema"]].to_numpy()
    assert same(tmap(cells)[:, 0].tolist(), want)
    left_out = {"certain": {"uncertain": 1, "blank": 1}, "blank_negative": {"uncertain": 1, "blank": 0},
                "train": {"uncertain": 0, "blank": 0}}[policy]
    assert tmap.excluded(cells, ["Edema"]) == {"Edema": left_out}


def test_per_label_overrides(tmp_path):
    write_dataset(tmp_path, {"train": [row("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg",
                                           Atelectasis="-1.0", Edema="-1.0", Cardiomegaly="-1.0", Pneumonia="-1.0")]})
    res = load_chexpert(tmp_path)
    cfg = UncertaintyConfig(Policy.ZEROS, {"Atelectasis": Policy.ONES, "Edema": Policy.ONES})
    targets = TargetMap.training(res.label_space, cfg)(res.manifest[list(CHEXPERT_14)].to_numpy())[0]
    got = {n: targets[CHEXPERT_14.index(n)] for n in ("Atelectasis", "Edema", "Cardiomegaly", "Pneumonia")}
    assert got == {"Atelectasis": 1.0, "Edema": 1.0, "Cardiomegaly": 0.0, "Pneumonia": 0.0}
    assert "Atelectasis: U-Ones" in TargetMap.training(res.label_space, cfg).name


def test_a_value_outside_the_raw_set_is_refused_where_targets_are_built(edema_values):
    space = edema_values.label_space.select(["Edema"])
    with pytest.raises(UnknownLabelValue, match="outside"):
        TargetMap.training(space, UncertaintyConfig())(np.array([[0.5]], np.float32))
    with pytest.raises(ValueError, match="U-MultiClass needs uncertain labels"):
        LabelSpace(("mass",)).for_model(UncertaintyConfig(Policy.MULTICLASS))


def test_a_manifest_with_a_baked_in_policy_is_refused_with_the_rebuild_command(tmp_path, edema_values):
    # What cxrray wrote before raw labels: targets under U-Ones, the policy in the info.
    old_space = LabelSpace(CHEXPERT_14)
    path = tmp_path / "old.parquet"
    write_manifest(edema_values.manifest.assign(Edema=[1.0, 0.0, 1.0, 0.0]), old_space, path,
                   {"dataset_dir": "/data/CheXpert-v1.0-small", "uncertainty": {"default": "U-Ones"}})
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    meta = dict(table.schema.metadata)
    meta[b"cxrray.label_space"] = b'{"names": %s, "task": "multilabel", "uncertain_classes": false}' % (
        str(list(CHEXPERT_14)).replace("'", '"').encode())
    pq.write_table(table.replace_schema_metadata(meta), path)
    with pytest.raises(ManifestError, match=r"U-Ones baked in.*cxrray manifest --source chexpert --root "
                                            r"/data/CheXpert-v1.0-small"):
        read_manifest(path)


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
    res = load_chexpert(tmp_path)
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
