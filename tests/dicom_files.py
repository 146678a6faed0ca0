"""Minimal DICOM files built in memory, for tests and benchmarks (one builder, so every DICOM
fixture is the same kind of object: a DX For Presentation image with preamble and file meta).

Tests import it as `from dicom_files import ...` (or `make_dicom` through test_imaging, as
before); benchmarks put tests/ on sys.path first.
"""
from __future__ import annotations

import io

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid


def dicom_dataset(arr: np.ndarray, *, syntax=ExplicitVRLittleEndian, pixel_bytes: bytes | None = None,
                  photometric: str = "MONOCHROME2", **attrs) -> Dataset:
    """A minimal DX-like data set around `arr` (frames, H, W[, 3]); `attrs` (DICOM keywords) are
    set last, so they override the defaults (e.g. BitsStored=12, HighBit=11)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray for Presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    colour = photometric == "RGB"
    ds.Rows, ds.Columns = arr.shape[-3:-1] if colour else arr.shape[-2:]
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = ds.BitsStored = arr.dtype.itemsize * 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(arr.dtype.kind == "i")
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = arr.tobytes() if pixel_bytes is None else pixel_bytes
    return ds


def dicom_bytes(ds: Dataset) -> bytes:
    """The data set as a Part 10 file (preamble, DICM, file meta)."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def make_dicom(arr: np.ndarray, **kwargs) -> bytes:
    """dicom_dataset(arr, **kwargs) as file bytes."""
    return dicom_bytes(dicom_dataset(arr, **kwargs))
