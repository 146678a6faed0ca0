"""The dicom source: header-only manifests with hashed patients, label joins, skipped files, no PHI out."""
from __future__ import annotations

import csv
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pydicom
import pytest
from pydicom.data import get_testdata_file

from cxrray.cli import main
from cxrray.labels import SYNTHETIC_FINDINGS, LabelSpace
from cxrray.manifest import ManifestError, read_manifest
from cxrray.sources import SOURCES, load_source
from cxrray.sources.dicom import DEFAULT_SALT, SALT_ENV, load_dicom, normalise_view, patient_hash
from cxrray.sources.synthetic import SynthConfig
from cxrray.sources.synthetic_dicom import write_synthetic_dicom
from cxrray.splits import assign_splits, check_leakage

CONFIG = SynthConfig(n_patients=20, size=48, seed=11)
JUNK = {
    "notes/readme.txt": "not_dicom",
    "rtplan.dcm": "not_an_image",
    "empty.dcm": "unreadable",
    "cut/truncated.dcm": "unreadable",
    "cut/header_only.dcm": "unreadable",
    "picture.png": "not_dicom",
    "train/patient00001/study1/view1_frontal_copy.dcm": "duplicate_id",
}


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """The synthetic fixture plus every kind of file a real archive folder also holds."""
    out = tmp_path_factory.mktemp("archive")
    s = write_synthetic_dicom(out, CONFIG)
    root = s.root
    images = sorted(root.rglob("*.dcm"))
    first = images[0]
    explicit = next(p for p in images if pydicom.dcmread(p).file_meta.TransferSyntaxUID.name.startswith("Explicit"))
    (root / "notes").mkdir()
    (root / "notes/readme.txt").write_text("exported from PACS; patient SYN-00001 is a test\n")
    shutil.copy(get_testdata_file("rtplan.dcm"), root / "rtplan.dcm")
    (root / "empty.dcm").write_bytes(b"")
    (root / "cut").mkdir()
    data = explicit.read_bytes()
    (root / "cut/truncated.dcm").write_bytes(data[: len(data) - 500])
    ds = pydicom.dcmread(first, stop_before_pixels=True)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "2.25.1234"
    ds.save_as(root / "cut/header_only.dcm", enforce_file_format=True)  # image attributes, no pixels
    (root / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    shutil.copy(first, root / "train/patient00001/study1/view1_frontal_copy.dcm")  # a copy beside it
    (root / ".hidden.dcm").write_bytes(b"ignored")
    return out, s


@pytest.fixture(scope="module")
def truth(archive) -> dict[str, pydicom.Dataset]:
    """Headers of the fixture's images, read with pydicom: the fake PHI the outputs must not hold."""
    _, s = archive
    with open(s.labels_csv, newline="") as f:
        return {r["Path"]: pydicom.dcmread(s.root / r["Path"], stop_before_pixels=True) for r in csv.DictReader(f)}


def phi_strings(truth) -> set[str]:
    out = set()
    for ds in truth.values():
        out |= {str(ds.PatientName), ds.PatientID, ds.PatientBirthDate, ds.AccessionNumber}
        out.add(str(ds.PatientName).replace("^", " "))
    return out


def test_registered_and_options_checked(archive):
    out, s = archive
    assert "dicom" in SOURCES
    with pytest.raises(ManifestError, match="takes no option"):
        load_source("dicom", s.root, views=["frontal"])
    with pytest.raises(ManifestError, match="not a folder"):
        load_dicom(out / "nope")
    with pytest.raises(ManifestError, match="join_on"):
        load_dicom(s.root, join_on="PatientID")


def test_manifest_from_headers(archive, truth):
    out, s = archive
    res = load_source("dicom", s.root, salt="pepper")
    m = res.manifest.set_index("image_id")
    assert res.label_space == LabelSpace(())
    assert sorted(m.index) == sorted(truth)
    for rel, ds in truth.items():
        row = m.loc[rel]
        assert row["path"] == str(s.root / rel) and Path(row["path"]).is_absolute()
        assert row["patient_id"] == patient_hash(ds.PatientID, "pepper")
        assert re.fullmatch(r"[0-9a-f]{16}", row["patient_id"])
        assert row["study_id"] == ds.StudyInstanceUID and row["sop_uid"] == ds.SOPInstanceUID
        assert row["series_uid"] == ds.SeriesInstanceUID
        assert row["modality"] == ds.Modality and row["body_part"] == "CHEST"
        assert row["view"] == {"PA": "PA", "AP": "AP", "LL": "LL"}[ds.ViewPosition]
    assert m["split"].isna().all()
    # One id per fixture patient folder, distinct across patients.
    folder = m.index.str.split("/").str[1]
    assert (m.groupby(folder)["patient_id"].nunique() == 1).all()
    assert m["patient_id"].nunique() == folder.nunique() == s.n_patients
    assert "accession" not in res.manifest.columns and "AccessionNumber" not in res.manifest.columns
    assert res.info["salt"] == "option" and res.info["files"] == len(truth) + len(JUNK)


def test_every_other_file_is_skipped_with_its_reason(archive):
    _, s = archive
    res = load_dicom(s.root)
    sk = res.skipped.frame().set_index("item")
    assert sk["reason"].to_dict() == JUNK
    assert "RT Plan Storage" in sk.loc["rtplan.dcm", "detail"]
    assert "PNG" in sk.loc["picture.png", "detail"]
    assert "truncated" in sk.loc["cut/truncated.dcm", "detail"]
    assert "no Pixel Data element" in sk.loc["cut/header_only.dcm", "detail"]
    assert sk.loc["train/patient00001/study1/view1_frontal_copy.dcm", "detail"] == (
        "same SOPInstanceUID as train/patient00001/study1/view1_frontal.dcm")
    assert res.skipped.counts() == {"not_dicom": 2, "not_an_image": 1, "unreadable": 3, "duplicate_id": 1}


def test_salt_option_env_and_stable_default(archive, monkeypatch, caplog):
    _, s = archive
    monkeypatch.delenv(SALT_ENV, raising=False)
    default = load_dicom(s.root).manifest.set_index("image_id")["patient_id"]
    assert default.equals(load_dicom(s.root).manifest.set_index("image_id")["patient_id"])  # reproducible
    monkeypatch.setenv(SALT_ENV, "site-secret")
    env = load_dicom(s.root)
    assert env.info["salt"] == "env"
    ids = env.manifest.set_index("image_id")["patient_id"]
    assert not (ids == default).any()
    assert ids.equals(load_dicom(s.root, salt="site-secret").manifest.set_index("image_id")["patient_id"])
    rel = default.index[0]
    pid = pydicom.dcmread(s.root / rel, stop_before_pixels=True).PatientID
    assert default[rel] == patient_hash(pid, DEFAULT_SALT)


def test_view_normalisation():
    assert [normalise_view(v) for v in ("pa", " AP ", "LL", "RL", "LATERAL", "LAT", "", "AP AXIAL", "LLD")] == [
        "PA", "AP", "LL", "RL", "LATERAL", "LATERAL", None, None, None]


@pytest.mark.parametrize("join_on", ["SOPInstanceUID", "AccessionNumber"])
def test_labels_join(archive, join_on):
    _, s = archive
    res = load_dicom(s.root, labels_csv=s.labels_csv, join_on=join_on)
    assert res.label_space == LabelSpace(tuple(SYNTHETIC_FINDINGS))
    m = res.manifest.set_index("image_id")
    labels = pd.read_csv(s.labels_csv, dtype=str, keep_default_na=False).set_index("Path")
    assert sorted(m.index) == sorted(labels.index)
    for name in SYNTHETIC_FINDINGS:
        want = pd.to_numeric(labels.loc[m.index, name].replace("", np.nan)).to_numpy(dtype=np.float32)
        np.testing.assert_array_equal(m[name].to_numpy(), want)
    assert res.info["join_on"] == join_on and res.info["labels_unmatched"] == 0
    assert set(res.skipped.counts()) == set(JUNK.values())  # only the junk: every image found its row


def test_label_join_problems_are_reported(archive, tmp_path, caplog):
    _, s = archive
    df = pd.read_csv(s.labels_csv, dtype=str, keep_default_na=False)
    dropped, bad = df["Path"].iat[0], df["Path"].iat[1]
    df.loc[1, "Cardiomegaly"] = "yes"
    df = pd.concat([df.iloc[1:], df.iloc[[2]].assign(Pneumothorax="1" if df["Pneumothorax"].iat[2] != "1" else "0"),
                    pd.DataFrame([{"SOPInstanceUID": "2.25.999", "Path": "gone.dcm"}])]).fillna("")
    csv_path = tmp_path / "labels.csv"
    df.to_csv(csv_path, index=False)
    res = load_dicom(s.root, labels_csv=csv_path, label_cols=["Cardiomegaly", "Pneumothorax"])
    sk = res.skipped.frame().set_index("item")
    assert sk.loc[dropped, "reason"] == "no_label_row"
    assert sk.loc[bad, "reason"] == "unknown_label_value" and "Cardiomegaly='yes'" in sk.loc[bad, "detail"]
    assert sk.loc[df["Path"].iat[1], "reason"] == "conflicting_labels"
    assert res.info["labels_unmatched"] == 1 and "match no image" in caplog.text
    assert res.label_space.names == ("Cardiomegaly", "Pneumothorax")
    with pytest.raises(ManifestError, match="column 'AccessionNumber' not found"):
        load_dicom(s.root, labels_csv=csv_path.write_text("x,Edema\n1,0\n") and csv_path, join_on="AccessionNumber")


def test_patient_split_has_no_leakage(archive):
    _, s = archive
    res = load_dicom(s.root, labels_csv=s.labels_csv)
    df = assign_splits(res.manifest, res.label_space, (0.6, 0.2, 0.2), seed=3)
    report = check_leakage(df)
    assert report.ok, report.summary()
    folder = df["image_id"].str.split("/").str[1]
    assert (df.groupby(folder)["split"].nunique() == 1).all()  # every fixture patient sits in one split
    assert set(df["split"]) == {"train", "valid", "test"}


def test_no_patient_id_falls_back_to_the_study(tmp_path):
    s = write_synthetic_dicom(tmp_path, SynthConfig(n_patients=3, size=32, seed=2), syntaxes=["explicit"])
    for p in s.root.rglob("*.dcm"):
        ds = pydicom.dcmread(p)
        ds.PatientID = ""
        ds.save_as(p, enforce_file_format=True)
    m = load_dicom(s.root).manifest
    assert m["patient_id"].str.fullmatch(r"[0-9a-f]{16}").all()
    assert (m.groupby("study_id")["patient_id"].nunique() == 1).all()
    assert m["patient_id"].nunique() == m["study_id"].nunique()


def test_preamble_less_file_and_check_pixels(tmp_path):
    s = write_synthetic_dicom(tmp_path, SynthConfig(n_patients=2, size=32, seed=4), syntaxes=["explicit"])
    files = sorted(s.root.rglob("*.dcm"))
    bare = pydicom.dcmread(files[0])
    bare.SOPInstanceUID = "2.25.42"
    del bare.file_meta  # an old PACS dump: no preamble, no file meta, implicit VR
    bare.preamble = None
    pydicom.dcmwrite(s.root / "bare.dcm", bare, implicit_vr=True, little_endian=True, enforce_file_format=False)
    assert (s.root / "bare.dcm").read_bytes()[128:132] != b"DICM"
    bad = files[-1]
    ds = pydicom.dcmread(bad)
    ds.Rows = ds.Rows * 2  # the header is complete, but the pixels are half of what it declares
    ds.save_as(bad, enforce_file_format=True)
    rel = bad.relative_to(s.root).as_posix()
    quick = load_dicom(s.root)
    assert "bare.dcm" in set(quick.manifest["image_id"]) and rel in set(quick.manifest["image_id"])
    full = load_dicom(s.root, check_pixels=True)
    sk = full.skipped.frame().set_index("item")
    assert sk.loc[rel, "reason"] == "unreadable" and rel not in set(full.manifest["image_id"])
    assert "bare.dcm" in set(full.manifest["image_id"])


def test_cli_outputs_and_logs_hold_no_phi(archive, truth, tmp_path, capsys, caplog):
    """Patient names, IDs, birth dates (and accession numbers) never reach the manifest, the
    skipped CSV, stdout/stderr or the log; the fixture's files do hold them."""
    _, s = archive
    phi = phi_strings(truth)
    assert any(p.startswith("SYN-") for p in phi) and any(p.startswith("SYNTH^PATIENT") for p in phi)
    raw = b"".join((s.root / rel).read_bytes() for rel in truth)
    assert all(p.encode() in raw for p in phi if "^" in p or p.startswith("SYN-"))  # the PHI is really there
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "m.parquet"
    rc = main(["-v", "manifest", "--source", "dicom", "--root", str(s.root), "--out", str(out), "--labels-csv",
               str(s.labels_csv), "--join-on", "AccessionNumber", "--split", "0.6,0.2,0.2", "--json"])
    assert rc == 0
    printed = capsys.readouterr()
    summary = json.loads(printed.out.strip().splitlines()[-1])
    assert summary["n_images"] == len(truth) and summary["leakage"]["ok"]
    df, _ = read_manifest(out)
    skipped_csv = tmp_path / "m.skipped.csv"
    # Raw file bytes, and decoded cells + metadata (Parquet pages are compressed: bytes alone prove little).
    table = pq.read_table(out)
    decoded = "\n".join([json.dumps({k.decode(): v.decode() for k, v in table.schema.metadata.items()}),
                         df.astype(str).to_csv(index=False)])
    texts = {"parquet bytes": out.read_bytes().decode("latin-1"), "parquet cells": decoded,
             "skipped csv": skipped_csv.read_text(), "stdout": printed.out, "stderr": printed.err,
             "log": caplog.text}
    for where, text in texts.items():
        leaked = sorted(p for p in phi if p and p in text)
        assert not leaked, f"{where} holds PHI: {leaked[:5]}"
    assert "SYN-00001" in (s.root / "notes/readme.txt").read_text()  # a file's content is never echoed


def test_from_an_s3_prefix_like_a_local_folder(archive, s3_bucket):
    """URIs: one listing, then one ranged read of each object's first 64 KiB (the whole object
    only where a header is longer); the manifest equals the local one but for the paths."""
    from cxrray import storage

    _, s = archive
    storage.upload_dir(s.root, f"{s3_bucket}/dicom")
    remote = load_dicom(f"{s3_bucket}/dicom", labels_csv=s.labels_csv, salt="pepper")
    local = load_dicom(s.root, labels_csv=s.labels_csv, salt="pepper")
    assert remote.manifest["path"].str.startswith(f"{s3_bucket}/dicom/").all()
    cols = [c for c in local.manifest.columns if c != "path"]
    pd.testing.assert_frame_equal(remote.manifest[cols], local.manifest[cols])
    assert remote.skipped.frame().equals(local.skipped.frame())
