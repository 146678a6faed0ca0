"""The synthetic DICOM fixture: valid CR/DX files in every writable syntax that decode to the phantom.

Tolerances (display values in [0, 1], decoded by cxrray.imaging, against expected_display =
round(phantom * 4095) / 4095, the 12-bit phantom every flavour encodes):
- lossless syntaxes: exact up to float32 rounding of the window arithmetic, |error| <= 1e-6;
- JPEG-LS near-lossless: |error| <= 2 / 4095 (its NEAR=2 bound in stored units) + 1e-6;
- JPEG 2000 lossy (PSNR 50 dB): mean |error| <= 0.005 and max <= 0.05.
"""
from __future__ import annotations

import csv
import io
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest

from cxrray.cli import main
from cxrray.imaging import decode_bytes_info, load_image, load_image_info
from cxrray.labels import SYNTHETIC_FINDINGS
from cxrray.sources.synthetic import FRONTAL, LATERAL, SynthConfig, plan_studies, write_synthetic_chexpert
from cxrray.sources.synthetic_dicom import (
    CR_STORAGE,
    DX_STORAGE,
    FLAVOURS,
    FULL_SCALE,
    JPEG_LS_NEAR_ERROR,
    SYNTAXES,
    available_syntaxes,
    expected_display,
    render_dataset,
    stored_values,
    write_synthetic_dicom,
)

AVAILABLE, UNAVAILABLE = available_syntaxes()
CONFIG = SynthConfig(n_patients=24, size=64, seed=5)


def tolerance_ok(syntax_key: str, decoded: np.ndarray, expected: np.ndarray) -> tuple[bool, str]:
    err = np.abs(decoded.astype(np.float64) - expected)
    text = f"max {err.max():.3g}, mean {err.mean():.3g}"
    if syntax_key == "jpeg2000":
        return err.mean() <= 0.005 and err.max() <= 0.05, text
    if syntax_key == "jpeg-ls-near":
        return err.max() <= JPEG_LS_NEAR_ERROR / FULL_SCALE + 1e-6, text
    return err.max() <= 1e-6, text


def to_bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    out = tmp_path_factory.mktemp("sdicom")
    return out, write_synthetic_dicom(out, CONFIG)


@pytest.fixture(scope="module")
def files(fixture) -> dict[str, pydicom.Dataset]:
    out, s = fixture
    return {p.relative_to(s.root).as_posix(): pydicom.dcmread(p) for p in sorted(s.root.rglob("*.dcm"))}


# --------------------------------------------------------------------------- pixels round trip


@pytest.mark.parametrize("flavour", FLAVOURS, ids=lambda f: f.key)
@pytest.mark.parametrize("key", list(AVAILABLE))  # the others: see test_every_writable_syntax_is_written...
def test_every_syntax_and_flavour_decodes_to_the_phantom(key, flavour):
    st = plan_studies(CONFIG)[0]
    ds, unit = render_dataset(CONFIG, st, 1, FRONTAL, flavour, AVAILABLE[key], "DX")
    info = decode_bytes_info(to_bytes(ds))
    assert info.format == "dicom" and info.warnings == []  # no window_missing/invalid: every VOI was used
    assert info.dicom["TransferSyntaxUID"] == SYNTAXES[key].uid
    assert info.dicom["PhotometricInterpretation"] == flavour.photometric
    ok, text = tolerance_ok(key, info.pixels, expected_display(unit))
    assert ok, f"{key} / {flavour.key}: {text}"
    if SYNTAXES[key].lossy_method is None:
        assert np.abs(info.pixels - unit).max() <= 0.5 / FULL_SCALE + 1e-6  # only the 12-bit rounding
        assert ds.LossyImageCompression == "00"
    else:
        assert ds.LossyImageCompression == "01" and ds.LossyImageCompressionMethod == SYNTAXES[key].lossy_method


def test_monochrome1_displays_like_monochrome2():
    st = plan_studies(CONFIG)[1]
    lossless = AVAILABLE["explicit"]
    shown, stored = {}, {}
    for flavour in FLAVOURS:
        ds, unit = render_dataset(CONFIG, st, 1, FRONTAL, flavour, lossless, "CR")
        shown[flavour.key] = decode_bytes_info(to_bytes(ds)).pixels
        stored[flavour.key] = ds.pixel_array
    mono2, mono1 = "mono2-window", "mono1-rescale-two-windows"
    assert np.array_equal(stored[mono1], FULL_SCALE - stored[mono2])  # bone is dark in the stored values
    assert stored[mono2].max() <= FULL_SCALE < 2**16 - 1  # 12 bits in 16
    for key, img in shown.items():
        assert np.abs(img - shown[mono2]).max() <= 1e-6, key
    assert np.abs(stored_values(unit, FLAVOURS[0]) / FULL_SCALE - expected_display(unit)).max() < 1e-6


def test_the_dicom_shows_the_picture_of_its_jpeg_twin(fixture, tmp_path):
    out, s = fixture
    write_synthetic_chexpert(tmp_path, CONFIG)
    with open(s.labels_csv, newline="") as f:
        rows = list(csv.DictReader(f))[:8]
    for row, other in zip(rows, rows[1:] + rows[:1]):
        dcm = load_image(s.root / row["Path"])
        jpg = load_image(tmp_path / row["chexpert_path"])
        assert np.abs(dcm - jpg).mean() < 0.02, row["Path"]  # 8-bit JPEG q90 noise only (~0.01 at 64 px)
        assert np.abs(dcm - load_image(tmp_path / other["chexpert_path"])).mean() > 0.03  # not just any X-ray


# --------------------------------------------------------------------------- files and structure


def test_every_writable_syntax_is_written_and_the_rest_reported(fixture, files):
    _, s = fixture
    written = {ds.file_meta.TransferSyntaxUID.name for ds in files.values()}
    assert written == {syn.name for syn in AVAILABLE.values()} == set(s.syntaxes)
    assert sum(s.syntaxes.values()) == s.n_images == len(files)
    assert set(s.unavailable) == {syn.name for k, syn in SYNTAXES.items() if k not in AVAILABLE}
    for must in ("explicit", "deflated", "rle", "jpeg2000-lossless", "jpeg2000"):  # default dependencies
        assert must in AVAILABLE, UNAVAILABLE
    assert set(s.flavours) == {f.key for f in FLAVOURS}


def test_files_are_valid_cr_dx_with_patient_study_series_structure(fixture, files):
    _, s = fixture
    studies: dict[str, set] = defaultdict(set)
    series: dict[str, set] = defaultdict(set)
    for rel, ds in files.items():
        split, patient, study, name = rel.split("/")
        assert ds.SOPClassUID in (CR_STORAGE, DX_STORAGE)
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.Modality == ("CR" if ds.SOPClassUID == CR_STORAGE else "DX")
        assert ds.preamble is not None and ds.BodyPartExamined == "CHEST"
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 12, 11, 0)
        number = patient.removeprefix("patient")
        assert str(ds.PatientName) == f"SYNTH^PATIENT{number}" and ds.PatientID == f"SYN-{number}"
        assert len(ds.PatientBirthDate) == 8
        assert ds.ViewPosition in (("PA", "AP") if name.endswith(f"_{FRONTAL}.dcm") else ("LL",))
        assert name.endswith((f"_{FRONTAL}.dcm", f"_{LATERAL}.dcm"))
        for uid in (ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID):
            assert uid.is_valid and uid.startswith("2.25.")
        studies[f"{patient}/{study}"].add((ds.StudyInstanceUID, ds.AccessionNumber, ds.Modality))
        series[ds.StudyInstanceUID].add(ds.SeriesInstanceUID)
        if ds.Modality == "DX":
            assert ds.PresentationIntentType == "FOR PRESENTATION"
    assert len({ds.SOPInstanceUID for ds in files.values()}) == len(files)
    assert all(len(v) == 1 for v in studies.values())  # one study UID, accession, modality per study
    assert len({next(iter(v))[0] for v in studies.values()}) == len(studies) == s.n_studies
    for uid, found in series.items():
        dx = any(ds.Modality == "DX" for ds in files.values() if ds.StudyInstanceUID == uid)
        n = sum(ds.StudyInstanceUID == uid for ds in files.values())
        assert len(found) == (1 if dx else n)  # DX: a series per study; CR: a series per image
    photometric = {ds.PhotometricInterpretation for ds in files.values()}
    assert photometric == {"MONOCHROME1", "MONOCHROME2"}
    assert any("VOILUTSequence" in ds for ds in files.values())
    assert any("WindowCenter" in ds and ds["WindowCenter"].VM == 2 for ds in files.values())
    assert {ds.get("RescaleSlope") for ds in files.values()} >= {1, 2}


def test_every_file_decodes_within_tolerance(fixture, files):
    _, s = fixture
    key_of = {syn.uid: k for k, syn in SYNTAXES.items()}
    for rel, ds in files.items():
        info = load_image_info(s.root / rel)
        ok, text = tolerance_ok(key_of[ds.file_meta.TransferSyntaxUID], info.pixels, expected_display(
            _phantom_of(rel)))
        assert ok and not info.warnings, f"{rel}: {text} {info.warnings}"


def _phantom_of(rel: str) -> np.ndarray:
    from cxrray.sources.synthetic import image_rng, render_study_unit, study_images

    for st in plan_studies(CONFIG):
        for view_no, view, jpeg in study_images(st):
            if jpeg.removeprefix("CheXpert-v1.0-small/").removesuffix(".jpg") == rel.removesuffix(".dcm"):
                return render_study_unit(image_rng(CONFIG, st, view_no), st.render_findings(), CONFIG.size, view)[0]
    raise KeyError(rel)


def test_labels_csv_lists_every_file_with_its_findings(fixture, files, tmp_path):
    _, s = fixture
    with open(s.labels_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["SOPInstanceUID", "AccessionNumber", "Path", "chexpert_path", *SYNTHETIC_FINDINGS]
    assert sorted(r["Path"] for r in rows) == sorted(files)
    chexpert = write_synthetic_chexpert(tmp_path, CONFIG)
    truth = {}
    for p in (chexpert.train_csv, chexpert.valid_csv):
        with open(p, newline="") as f:
            truth.update({r["Path"]: r for r in csv.DictReader(f)})
    for r in rows:
        ds = files[r["Path"]]
        assert (r["SOPInstanceUID"], r["AccessionNumber"]) == (ds.SOPInstanceUID, ds.AccessionNumber)
        for name in SYNTHETIC_FINDINGS:
            raw = truth[r["chexpert_path"]][name]
            assert r[name] == {"1.0": "1", "-1.0": ""}.get(raw, "0"), (r["Path"], name, raw)
        assert "SYN-" not in ",".join(r.values())


def test_same_config_same_bytes_and_a_subset(fixture, tmp_path):
    out, s = fixture
    again = write_synthetic_dicom(tmp_path / "again", CONFIG)
    for p in sorted(s.root.rglob("*.dcm"))[:10]:
        assert (again.root / p.relative_to(s.root)).read_bytes() == p.read_bytes()
    with open(s.labels_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    wanted = [r["chexpert_path"] for r in rows[::3]]
    sub = write_synthetic_dicom(tmp_path / "sub", CONFIG, image_ids=wanted)
    assert sub.n_images == len(wanted)
    assert sorted(p.relative_to(sub.root).as_posix() for p in sub.root.rglob("*.dcm")) == sorted(
        r["Path"] for r in rows[::3])
    assert len(sub.syntaxes) == min(len(AVAILABLE), len(wanted))


def test_syntax_selection_errors_name_the_fix():
    with pytest.raises(ValueError, match="unknown transfer syntax 'webp'"):
        write_synthetic_dicom("/nonexistent", CONFIG, syntaxes=["webp"])
    missing = [k for k in SYNTAXES if k not in AVAILABLE]
    if missing:
        with pytest.raises(ValueError, match="cannot write"):
            write_synthetic_dicom("/nonexistent", CONFIG, syntaxes=[missing[0]])


def test_chosen_syntaxes_only(tmp_path):
    s = write_synthetic_dicom(tmp_path, SynthConfig(n_patients=4, size=48, seed=1), syntaxes=["rle", "explicit"])
    assert set(s.syntaxes) == {SYNTAXES["rle"].name, SYNTAXES["explicit"].name}


def test_cli_synth_dicom(tmp_path, capsys):
    import json

    rc = main(["synth", "--out", str(tmp_path), "--n-patients", "5", "--size", "48", "--dicom", "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["dicom"]["n_images"] == summary["n_images"]
    assert Path(summary["dicom"]["labels_csv"]).is_file()
    assert set(summary["dicom"]["syntaxes"]) <= {syn.name for syn in AVAILABLE.values()}
