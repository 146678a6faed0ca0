"""The Pixel Data of the synthetic CR/DX DICOM (cxrray.sources.synthetic_dicom) and how it is encoded.

- Flavours: four arrangements of stored values, Modality LUT (rescale) and VOI (windows, a
  VOI LUT sequence, LINEAR_EXACT), each built so that the standard grayscale pipeline shows
  round(phantom * 4095) / 4095 - what `expected_display` returns.
- Syntaxes: every transfer syntax the writer may use, which of them this install can write
  (`available_syntaxes` probes the encoders), and `encode`, which puts the pixels into a data
  set in one of them with the lossy-compression attributes.

Kept apart from synthetic_dicom (which makes up the patient, study and series identity and
writes the files): this part is all a decoder test needs to know of what a file's pixels show.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

BITS_STORED = 12
FULL_SCALE = 2**BITS_STORED - 1  # 4095
JPEG_LS_NEAR_ERROR = 2  # stored units; the display error bound is 2 / 4095


@dataclass(frozen=True)
class Syntax:
    """A transfer syntax the writer may use: how to encode it and whether it loses information."""

    key: str
    uid: UID
    options: dict = field(default_factory=dict)  # passed to Dataset.compress
    lossy_method: str | None = None  # LossyImageCompressionMethod when lossy

    @property
    def name(self) -> str:
        return self.uid.name


# In rotation order; compressed ones are written only where an encoder is installed.
SYNTAXES: dict[str, Syntax] = {s.key: s for s in (
    Syntax("explicit", ExplicitVRLittleEndian),
    Syntax("implicit", ImplicitVRLittleEndian),
    Syntax("deflated", DeflatedExplicitVRLittleEndian),
    Syntax("rle", RLELossless),
    Syntax("jpeg-ls", JPEGLSLossless),
    Syntax("jpeg-ls-near", JPEGLSNearLossless, {"jls_error": JPEG_LS_NEAR_ERROR}, "ISO_14495_1"),
    Syntax("jpeg2000-lossless", JPEG2000Lossless),
    # A PSNR target, not a ratio: the error stays put whatever the image size.
    Syntax("jpeg2000", JPEG2000, {"j2k_psnr": [50.0]}, "ISO_15444_1"),  # ~0.002 mean error
    Syntax("jpeg-lossless-sv1", JPEGLosslessSV1),
    Syntax("htj2k-lossless", HTJ2KLossless),
)}
_NATIVE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian)


@dataclass(frozen=True)
class Flavour:
    """How stored values, Modality LUT and VOI are arranged; every flavour displays the same."""

    key: str
    photometric: str
    slope: float
    intercept: float
    voi: str  # "window", "two_windows", "lut" or "linear_exact"


FLAVOURS: tuple[Flavour, ...] = (
    Flavour("mono2-window", "MONOCHROME2", 1.0, 0.0, "window"),
    Flavour("mono1-rescale-two-windows", "MONOCHROME1", 1.0, -1024.0, "two_windows"),
    Flavour("mono2-voi-lut", "MONOCHROME2", 1.0, 0.0, "lut"),
    Flavour("mono1-slope2-linear-exact", "MONOCHROME1", 2.0, -4096.0, "linear_exact"),
)


# --------------------------------------------------------------------------- syntaxes


def available_syntaxes() -> tuple[dict[str, Syntax], dict[str, str]]:
    """(key -> Syntax this install can write, syntax name -> why not) by encoding a tiny image."""
    ok: dict[str, Syntax] = {}
    missing: dict[str, str] = {}
    # 64 x 64: openjpeg refuses images smaller than its resolution levels (16 x 16 fails).
    probe = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    for key, syn in SYNTAXES.items():
        if syn.uid in _NATIVE:
            ok[key] = syn
            continue
        try:
            encoder = pydicom.pixels.get_encoder(syn.uid)
        except NotImplementedError:
            missing[syn.name] = f"pydicom {pydicom.__version__} has no encoder for it"
            continue
        if not encoder.is_available:
            missing[syn.name] = "no encoder plugin installed (" + "; ".join(encoder.missing_dependencies) + ")"
            continue
        try:
            pixels_dataset(probe, FLAVOURS[0]).compress(syn.uid, probe, **syn.options)
        except Exception as e:  # noqa: BLE001 - any refusal means: not writable here
            missing[syn.name] = f"its encoder refused a 12-bit image ({str(e).splitlines()[0]})"
            continue
        ok[key] = syn
    return ok, missing


def select_syntaxes(syntaxes: Iterable[str] | None) -> tuple[list[Syntax], dict[str, str]]:
    """The Syntax of each of `syntaxes` (keys, UIDs or names; None = every writable one), and what is not."""
    ok, missing = available_syntaxes()
    if syntaxes is None:
        return list(ok.values()), missing
    chosen = []
    for s in syntaxes:
        key = next((k for k, v in SYNTAXES.items() if s in (k, v.uid, v.name)), None)
        if key is None:
            raise ValueError(f"unknown transfer syntax {s!r}; use one of {', '.join(SYNTAXES)} (or their UIDs)")
        if key not in ok:
            raise ValueError(f"cannot write {SYNTAXES[key].name}: {missing[SYNTAXES[key].name]}")
        chosen.append(ok[key])
    if not chosen:
        raise ValueError("syntaxes is empty; pass None for every available one")
    return chosen, missing


# --------------------------------------------------------------------------- pixels


def stored_values(unit: np.ndarray, flavour: Flavour) -> np.ndarray:
    """[0, 1] display image -> 12-bit stored values (uint16) for `flavour` (inverted for MONOCHROME1)."""
    display = np.rint(np.clip(unit, 0.0, 1.0) * FULL_SCALE).astype(np.uint16)
    return (FULL_SCALE - display).astype(np.uint16) if flavour.photometric == "MONOCHROME1" else display


def expected_display(unit: np.ndarray) -> np.ndarray:
    """What a conforming viewer shows for any flavour, lossless syntax: the 12-bit phantom in [0, 1]."""
    return (np.rint(np.clip(unit, 0.0, 1.0) * FULL_SCALE) / FULL_SCALE).astype(np.float32)


def pixels_dataset(stored: np.ndarray, flavour: Flavour) -> Dataset:
    """Image Pixel, Modality LUT (rescale) and VOI LUT modules for `stored` in `flavour`."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = flavour.photometric
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, BITS_STORED, BITS_STORED - 1, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = f"{flavour.intercept:g}", f"{flavour.slope:g}", "US"
    # The modality values span [lo, lo + 4095 * slope]; each VOI maps exactly that onto [0, 1].
    lo, span = flavour.intercept, FULL_SCALE * flavour.slope
    if flavour.voi in ("window", "two_windows"):
        full = (lo + 0.5 + span / 2.0, span + 1.0)  # LINEAR: (x - (c - 0.5)) / (w - 1) + 0.5
        if flavour.voi == "window":
            ds.WindowCenter, ds.WindowWidth = f"{full[0]:g}", f"{full[1]:g}"
            ds.WindowCenterWidthExplanation = "FULL"
        else:  # the first window is the default; the second a narrower "lung" window
            ds.WindowCenter = [f"{full[0]:g}", f"{lo + 0.35 * span:g}"]
            ds.WindowWidth = [f"{full[1]:g}", f"{0.4 * span:g}"]
            ds.WindowCenterWidthExplanation = ["FULL", "LUNG"]
    elif flavour.voi == "linear_exact":
        ds.WindowCenter, ds.WindowWidth = f"{lo + span / 2.0:g}", f"{span:g}"  # (x - c) / w + 0.5
        ds.VOILUTFunction = "LINEAR_EXACT"
    elif flavour.voi == "lut":
        if flavour.slope != 1.0 or flavour.intercept != 0.0:
            raise ValueError("the VOI LUT flavour maps stored values 0..4095 directly")
        item = Dataset()
        item.LUTDescriptor = [FULL_SCALE + 1, 0, 16]  # entries, first value mapped, bits per entry
        item.LUTExplanation = "LINEAR 12 TO 16 BIT"
        item.LUTData = (np.arange(FULL_SCALE + 1, dtype=np.uint16) * 16).tolist()  # 0..65520: i / 4095
        item["LUTDescriptor"].VR, item["LUTData"].VR = "US", "US"
        ds.VOILUTSequence = DicomSequence([item])
    else:
        raise ValueError(f"unknown VOI kind {flavour.voi!r}")
    ds.PixelData = stored.astype("<u2").tobytes()
    ds["PixelData"].VR = "OW"
    return ds


def encode(ds: Dataset, stored: np.ndarray, syntax: Syntax) -> None:
    """Put `stored` into `ds` in `syntax` (in place), with the lossy-compression attributes."""
    if syntax.uid in _NATIVE:
        ds.file_meta.TransferSyntaxUID = syntax.uid  # pydicom's writer encodes (and deflates)
    else:
        raw_bytes = stored.size * 2
        # Keep our deterministic SOP Instance UID: this is the only instance ever written.
        ds.compress(syntax.uid, stored, generate_instance_uid=False, **syntax.options)
        if syntax.lossy_method:
            ratio = raw_bytes / max(1, len(ds.PixelData))
            ds.LossyImageCompressionRatio = f"{ratio:.2f}"[:16]
            ds.LossyImageCompressionMethod = syntax.lossy_method
    ds.LossyImageCompression = "01" if syntax.lossy_method else "00"
