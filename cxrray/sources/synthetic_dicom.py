"""The synthetic chest X-rays written as CR/DX DICOM: the fixture for DICOM decoding and sources.

    write_synthetic_dicom("out", SynthConfig(n_patients=20, size=96))
    out/dicom/{train,valid}/patientNNNNN/studyK/viewN_{frontal,lateral}.dcm
    out/dicom_labels.csv     SOPInstanceUID, AccessionNumber, Path, chexpert_path, the six findings

Same phantoms as `cxrray.sources.synthetic` (same plan, same rng per image, so each file shows
the picture of its JPEG twin `chexpert_path`), stored the way CR and DX exports store them:

- SOP classes CR Image Storage and DX Image Storage - For Presentation; deterministic UIDs
  (2.25.<uuid5>), one study per CheXpert study (Study/Accession per study), a DX study's
  images in one series, a CR study's in one series each; PA/AP/LL views, BodyPart CHEST.
- 12 bits stored in 16, and four pixel "flavours" in rotation (FLAVOURS), each built so that
  the standard grayscale pipeline (rescale -> VOI -> [0, 1] -> MONOCHROME1 inverted) shows
  round(phantom * 4095) / 4095: MONOCHROME2 + one window; MONOCHROME1 + rescale -1024 + two
  windows; MONOCHROME2 + a VOI LUT sequence (16-bit entries, no window); MONOCHROME1 + rescale
  slope 2 + a LINEAR_EXACT window.
- Transfer syntaxes in rotation over every one this install can write (SYNTAXES; probed at run
  time: pydicom's writer for the uncompressed and deflated ones, `Dataset.compress` with its
  encoder plugins for RLE, JPEG-LS and JPEG 2000; no pip-installable encoder writes JPEG
  Lossless or HTJ2K, so those are reported as unavailable, never silently dropped).
  Flavours and syntaxes live in cxrray.sources.synthetic_dicom_pixels.
- Fake PHI to test that none leaks: PatientName SYNTH^PATIENT00001, PatientID SYN-00001, a
  birth date and sex. Labels: 1/0 per finding, uncertain (-1) left blank (no supervision).
"""
from __future__ import annotations

import csv
import datetime as dt
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from cxrray.labels import SYNTHETIC_FINDINGS
from cxrray.sources.synthetic import (
    FRONTAL,
    SynthConfig,
    image_rng,
    plan_studies,
    render_study_unit,
    study_images,
)
# The pixels and their transfer syntaxes have their own module; the names tests and callers
# use (FLAVOURS, SYNTAXES, available_syntaxes, ...) stay importable from here too.
from cxrray.sources.synthetic_dicom_pixels import (  # noqa: F401
    BITS_STORED,
    FLAVOURS,
    FULL_SCALE,
    JPEG_LS_NEAR_ERROR,
    SYNTAXES,
    Flavour,
    Syntax,
    available_syntaxes,
    encode,
    expected_display,
    pixels_dataset,
    select_syntaxes,
    stored_values,
)

log = logging.getLogger(__name__)

DICOM_ROOT_NAME = "dicom"
LABELS_NAME = "dicom_labels.csv"
CR_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")  # Computed Radiography Image Storage
DX_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1.1")  # Digital X-Ray Image Storage - For Presentation
_UID_NAMESPACE = uuid.UUID("6f1c1c5e-8d0e-4a51-9d7e-0c8f3b2a7d10")  # fixed: same seed, same UIDs


@dataclass
class DicomSummary:
    root: Path
    labels_csv: Path
    n_images: int
    n_patients: int
    n_studies: int
    syntaxes: dict[str, int]  # transfer syntax name -> files written
    unavailable: dict[str, str]  # transfer syntax name -> why this install cannot write it
    flavours: dict[str, int]
    seconds: float


# --------------------------------------------------------------------------- identity


def _uid(*parts: object) -> UID:
    """A deterministic 2.25 UID (PS3.5 B.2: the integer form of a UUID, here a name-based one)."""
    return UID(f"2.25.{uuid.uuid5(_UID_NAMESPACE, '/'.join(map(str, parts))).int}")


def fake_phi(patient: str, age: int, seed: int) -> dict[str, str]:
    """The fixture's made-up patient identity for CheXpert name `patientNNNNN` (tests look for it)."""
    number = patient.removeprefix("patient")
    rng = np.random.default_rng([seed, int(number), 7])
    birth = dt.date(2024 - age, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365)))
    return {"PatientName": f"SYNTH^PATIENT{number}", "PatientID": f"SYN-{number}",
            "PatientBirthDate": birth.strftime("%Y%m%d")}


def _dataset(st, view_no: int, view: str, flavour: Flavour, modality: str, seed: int) -> Dataset:
    """Patient, study, series, equipment and image identity of one image (no pixels)."""
    sop_class = CR_STORAGE if modality == "CR" else DX_STORAGE
    study_uid = _uid(seed, st.patient, st.study, "study")
    series_no = view_no if modality == "CR" else 1  # CR: a series per plate; DX: one per study
    date = dt.date(2024, 1, 1) + dt.timedelta(days=(st.patient_index * 37 + st.study * 61) % 700)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = _uid(seed, st.patient, st.study, view_no, "image")
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian  # until encode() picks the real one
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = f"{9 + st.study % 8:02d}{view_no * 7:02d}00"
    ds.AccessionNumber = f"A{seed % 1000:03d}{st.patient_index:06d}{st.study:02d}"
    ds.Modality = modality
    ds.Manufacturer, ds.ManufacturerModelName = "cxrray", "synthetic phantom"
    ds.InstitutionName = "CXRRAY SYNTHETIC HOSPITAL"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "XR CHEST"
    ds.SeriesDescription = f"CHEST {'LAT' if view != FRONTAL else st.ap_pa}"
    for key, value in fake_phi(st.patient, st.age, seed).items():
        setattr(ds, key, value)
    ds.PatientSex = "M" if st.sex == "Male" else "F"
    ds.PatientAge = f"{st.age:03d}Y"
    ds.PatientIdentityRemoved = "NO"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = st.ap_pa if view == FRONTAL else "LL"
    # Rows run towards the patient's left on a frontal, posterior on the lateral (faces image-left).
    ds.PatientOrientation = ["L", "F"] if view == FRONTAL else ["P", "F"]
    ds.ImageLaterality = "U"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = _uid(seed, st.patient, st.study, series_no, "series")
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = str(st.study), series_no, view_no if modality == "DX" else 1
    ds.KVP = "110" if view == FRONTAL else "125"
    ds.BurnedInAnnotation = "NO"
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PixelIntensityRelationship = "LOG"
        # +1: higher values mean more X-rays reached the detector (air), as MONOCHROME1 shows dark.
        ds.PixelIntensityRelationshipSign = 1 if flavour.photometric == "MONOCHROME1" else -1
    return ds


def render_dataset(config: SynthConfig, st, view_no: int, view: str, flavour: Flavour, syntax: Syntax,
                   modality: str) -> tuple[Dataset, np.ndarray]:
    """One image of study `st` as a complete DICOM data set, and the [0, 1] phantom it shows."""
    unit, _ = render_study_unit(image_rng(config, st, view_no), st.render_findings(), config.size, view)
    stored = stored_values(unit, flavour)
    ds = _dataset(st, view_no, view, flavour, modality, config.seed)
    ds.update(pixels_dataset(stored, flavour))
    spacing = f"{350.0 / config.size:.4f}"  # a 35 cm detector, whatever the size
    if modality == "DX":
        ds.ImagerPixelSpacing = [spacing, spacing]
    else:
        ds.PixelSpacing = [spacing, spacing]
    encode(ds, stored, syntax)
    return ds, unit


# --------------------------------------------------------------------------- writing


def write_synthetic_dicom(
    out: str | Path,
    config: SynthConfig = SynthConfig(),
    *,
    syntaxes: Sequence[str] | None = None,
    image_ids: Iterable[str] | None = None,
    progress: bool = False,
) -> DicomSummary:
    """Write the synthetic dataset of `config` as DICOM under OUT/dicom, labels in OUT/dicom_labels.csv.

    syntaxes: keys of SYNTAXES (or UIDs) to rotate through; None = every one this install can
    write (see DicomSummary.unavailable for the rest). image_ids: only these images, named by
    their CheXpert path (a manifest's image_id from `write_synthetic_chexpert` with the same
    config), e.g. to copy a test split. Same config and syntaxes, same bytes.
    """
    t0 = time.perf_counter()
    chosen, missing = select_syntaxes(syntaxes)
    wanted = None if image_ids is None else set(map(str, image_ids))
    out = Path(out)
    root = out / DICOM_ROOT_NAME
    root.mkdir(parents=True, exist_ok=True)
    studies = plan_studies(config)
    rows: list[list[str]] = []
    written: dict[str, int] = {}
    flavours: dict[str, int] = {}
    patients: set[str] = set()
    n_studies = 0
    bar = _progress(len(studies), progress)
    i = 0  # images written: drives the rotations, so a subset still covers every syntax
    for st in studies:
        modality = "DX" if (st.patient_index + st.study) % 2 else "CR"
        labels = _label_cells(st)
        study_written = False
        for view_no, view, jpeg_rel in study_images(st):
            if wanted is not None and jpeg_rel not in wanted:
                continue
            syntax = chosen[i % len(chosen)]
            # Offset by the syntax round, so each syntax meets every flavour over the rotation.
            flavour = FLAVOURS[(i + i // len(chosen)) % len(FLAVOURS)]
            ds, _ = render_dataset(config, st, view_no, view, flavour, syntax, modality)
            rel = f"{st.split}/{st.patient}/study{st.study}/view{view_no}_{view}.dcm"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(root / rel, enforce_file_format=True)
            rows.append([ds.SOPInstanceUID, ds.AccessionNumber, rel, jpeg_rel, *labels])
            written[syntax.name] = written.get(syntax.name, 0) + 1
            flavours[flavour.key] = flavours.get(flavour.key, 0) + 1
            patients.add(st.patient)
            study_written = True
            i += 1
        n_studies += study_written
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    labels_csv = out / LABELS_NAME
    with open(labels_csv, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["SOPInstanceUID", "AccessionNumber", "Path", "chexpert_path", *SYNTHETIC_FINDINGS])
        w.writerows(rows)
    seconds = time.perf_counter() - t0
    log.info("synthetic DICOM: %d images of %d patients in %.1fs -> %s (%s)", len(rows), len(patients), seconds,
             root, ", ".join(f"{k} {v}" for k, v in written.items()))
    return DicomSummary(root, labels_csv, len(rows), len(patients), n_studies, written, missing, flavours, seconds)


def _label_cells(st) -> list[str]:
    """1/0 per finding as drawn; uncertain (-1) blank: the picture may or may not show it."""
    cells = []
    for name in SYNTHETIC_FINDINGS:
        value = st.labels[name]
        cells.append("" if value == -1.0 else ("1" if value == 1.0 else "0"))
    return cells


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="study", desc="synthetic DICOM")
