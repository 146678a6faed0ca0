"""DICOM bytes -> one float32 channel in [0, 1], following the standard's grayscale pipeline.

Stored values (BitsStored/HighBit masked, sign-extended: pydicom does this) go through the
Modality LUT or Rescale Slope/Intercept, then the VOI LUT or the first Window Center/Width
(PS3.4 N.2), and are scaled to [0, 1] over the output range of that VOI step; MONOCHROME1 is
inverted so bone is bright. Without any VOI the image is scaled by its own min-max and the
result carries the `window_missing` warning. Colour (RGB, YBR, PALETTE COLOR) becomes ITU-R
601-2 luminance, as PNG/JPEG do. A multi-frame object gives its first frame (`multi_frame`).

Compressed syntaxes are decoded by pydicom's plugins: pylibjpeg with pylibjpeg-libjpeg (JPEG
baseline/extended/lossless, JPEG-LS), pylibjpeg-openjpeg (JPEG 2000, HTJ2K) and pylibjpeg-rle
(RLE; pydicom also has its own). Files without the 128-byte preamble or file meta are read too.

Every failure is an `imaging.ImageError`; `imaging.decode_bytes*` are the entry points.
"""
from __future__ import annotations

import io
import logging
import math
import re
import struct
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, get_decoder
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from cxrray.imaging import (
    CorruptImage,
    DecodedImage,
    ImageError,
    NotAnImage,
    TruncatedImage,
    UnsupportedFormat,
    _check_pixels,
    bare_dicom_start,
)

logger = logging.getLogger(__name__)

# DICOM attributes that identify the image and its acquisition, never the patient: these are the
# only ones cxrray hands on (PatientName/ID/BirthDate and the like are never read out).
IDENTITY_KEYWORDS: tuple[str, ...] = (
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "Modality", "ViewPosition",
    "BodyPartExamined", "PhotometricInterpretation", "TransferSyntaxUID",
)
# Codes in DecodedImage.warnings: the image decoded, but a caller may want to know this.
WARNINGS: dict[str, str] = {
    "multi_frame": "a multi-frame object; only its first frame was decoded",
    "window_missing": "no VOI LUT or window in the file; scaled by the image's own min-max",
    "window_invalid": "the VOI LUT or window is unusable; scaled by the image's own min-max",
    "colour": "a colour image (RGB/YBR/PALETTE COLOR), converted to luminance",
    "no_file_meta": "no transfer syntax in the file; the encoding was inferred from the data set",
    "stray_leading_byte": "one stray byte before a preamble-less data set was skipped",
    "non_finite_pixels": "Float Pixel Data holds NaN or infinite values; shown at the ends of the finite range",
}

_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # Pixel Data, Float and Double Float Pixel Data
_UNDEFINED_LENGTH = 0xFFFFFFFF
_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0"  # (FFFE,E0DD), ends encapsulated pixel data
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601-2, as PIL uses for PNG/JPEG
_REQUIRED = ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel", "PhotometricInterpretation")

# Which package decodes each compressed syntax (all are default dependencies of cxrray).
_LIBJPEG = "pylibjpeg + pylibjpeg-libjpeg"
_OPENJPEG = "pylibjpeg + pylibjpeg-openjpeg"
_CODEC_PACKAGES: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": _LIBJPEG, "1.2.840.10008.1.2.4.51": _LIBJPEG,  # baseline, extended
    "1.2.840.10008.1.2.4.57": _LIBJPEG, "1.2.840.10008.1.2.4.70": _LIBJPEG,  # lossless, SV1
    "1.2.840.10008.1.2.4.80": _LIBJPEG, "1.2.840.10008.1.2.4.81": _LIBJPEG,  # JPEG-LS
    "1.2.840.10008.1.2.4.90": _OPENJPEG, "1.2.840.10008.1.2.4.91": _OPENJPEG,  # JPEG 2000
    "1.2.840.10008.1.2.4.201": _OPENJPEG, "1.2.840.10008.1.2.4.202": _OPENJPEG,  # HTJ2K
    "1.2.840.10008.1.2.4.203": _OPENJPEG,
    RLELossless: "pydicom itself or pylibjpeg + pylibjpeg-rle",
}
_NOT_SUPPORTED = re.compile(r"does not support|not supported|unsupported", re.IGNORECASE)


def decode_dicom(data: bytes, source: str, max_pixels: int) -> DecodedImage:
    """Decode DICOM bytes (with or without preamble) to a DecodedImage; raise ImageError."""
    warnings: list[str] = []
    try:
        ds, start = _read(data, source, warnings)
        _check_complete(ds, data, start, source)
        _check_size(ds, source, max_pixels)
        frames = _frame_count(ds, source)
        if frames > 1:
            warnings.append("multi_frame")
        arr = _first_frame(ds, data, source)
        pixels = _to_unit(arr, ds, source, warnings)
    except (ImageError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001
        # pydicom converts elements lazily, so one bad value can surface as almost any error.
        logger.debug("%s: DICOM decode failed", source, exc_info=True)
        raise CorruptImage(source, f"corrupt DICOM ({type(e).__name__}: {e})") from e
    return DecodedImage(pixels=pixels, format="dicom", warnings=warnings,
                        dicom=identity(ds), frames=frames)


def identity(ds: Dataset) -> dict[str, str]:
    """The IDENTITY_KEYWORDS of `ds` as stripped strings ('' where absent); no patient data."""
    out = {}
    for keyword in IDENTITY_KEYWORDS:
        holder = ds.file_meta if keyword == "TransferSyntaxUID" else ds
        value = holder.get(keyword) if holder is not None else None
        out[keyword] = "" if value is None else str(value).strip()
    return out


# ---------------------------------------------------------------------------- reading


def _read(data: bytes, source: str, warnings: list[str]) -> tuple[Dataset, int]:
    """Parse the data set, make sure file_meta names a transfer syntax; also return its offset."""
    preamble = data[128:132] == b"DICM"
    start = 0 if preamble else (bare_dicom_start(data) or 0)
    if start:
        # Seen in the wild and in pydicom's own no_meta.dcm: one junk byte, then a clean data set.
        warnings.append("stray_leading_byte")
    # force: a data set without preamble is still DICOM (ACR-NEMA style, raw dumps, old PACS).
    ds = pydicom.dcmread(io.BytesIO(data[start:] if start else data), force=True)
    meta = ds.file_meta if ds.file_meta is not None else FileMetaDataset()
    if "TransferSyntaxUID" in meta:
        return ds, start
    if preamble:
        if len(meta) == 0:  # not even one group-2 element: garbage after "DICM"
            raise CorruptImage(source, "corrupt DICOM (no readable file meta information)")
        group_length = int(meta.get("FileMetaInformationGroupLength", 0) or 0)
        if not group_length or 144 + group_length > len(data):
            raise TruncatedImage(source, f"truncated DICOM (read {len(data):,} bytes; file meta cut short)")
    if len(ds) == 0:
        raise CorruptImage(source, "corrupt DICOM (no readable data elements)")
    # No transfer syntax: pydicom worked the encoding out while parsing; name it so pixels decode.
    implicit, little = ds.original_encoding
    syntax = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    meta.TransferSyntaxUID = syntax
    ds.file_meta = meta
    warnings.append("no_file_meta")
    return ds, start


def _check_complete(ds: Dataset, data: bytes, start: int, source: str) -> None:
    """Raise unless `ds` holds an image with all of its pixel data (touches no pixels)."""
    # pydicom reads a cut file without complaint: it drops or shortens the last element.
    tag = next((t for t in _PIXEL_TAGS if t in ds), None)
    if tag is None:
        if len(ds) == 0 or "Rows" in ds:
            detail = f"truncated DICOM (read {len(data):,} bytes; file ends before its pixel data is complete)"
            raise TruncatedImage(source, detail)
        sop = UID(str(ds.get("SOPClassUID", "")).strip())
        what = f"SOP class {sop.name} ({sop})" if sop else "no SOP Class UID"
        raise NotAnImage(source, f"DICOM object without pixel data ({what})")
    missing = [k for k in _REQUIRED if k not in ds]
    if missing:
        raise CorruptImage(source, f"corrupt DICOM (pixel data without {', '.join(missing)})")
    syntax = UID(str(ds.file_meta.TransferSyntaxUID))
    if syntax == DeflatedExplicitVRLittleEndian:
        return  # offsets are into the inflated stream; a short stream fails at decode instead
    raw = ds.get_item(tag)
    tell, length = getattr(raw, "value_tell", None), getattr(raw, "length", _UNDEFINED_LENGTH)
    if tell is not None and length != _UNDEFINED_LENGTH and start + tell + length > len(data):
        raise TruncatedImage(source, f"truncated DICOM (read {len(data):,} of {start + tell + length:,} bytes)")


def _check_size(ds: Dataset, source: str, max_pixels: int) -> None:
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows <= 0 or cols <= 0:
        raise CorruptImage(source, f"DICOM pixel data with invalid Rows/Columns ({rows}x{cols})")
    _check_pixels(source, "DICOM", cols, rows, max_pixels)


def _frame_count(ds: Dataset, source: str) -> int:
    raw = ds.get("NumberOfFrames", 1)
    try:
        frames = int(raw if raw not in (None, "") else 1)
    except (TypeError, ValueError):
        raise CorruptImage(source, f"corrupt DICOM (Number of Frames is {str(raw)!r}, not a number)") from None
    if frames < 1:
        raise CorruptImage(source, f"corrupt DICOM (Number of Frames is {frames})")
    return frames


# ---------------------------------------------------------------------------- pixels


def _first_frame(ds: Dataset, data: bytes, source: str) -> np.ndarray:
    syntax = UID(str(ds.file_meta.TransferSyntaxUID))
    decoder = _require_decoder(syntax, source)
    try:
        # Only frame 0: radiographs are single-frame; a multi-frame object must not
        # allocate every frame just to be reduced to one.
        return pydicom.pixels.pixel_array(ds, index=0)
    except (ValueError, RuntimeError, OSError, EOFError, KeyError, struct.error) as e:
        text = str(e)
        if "less than expected" in text or "ended before" in text:
            raise TruncatedImage(source, f"truncated DICOM pixel data ({text})") from e
        if syntax.is_compressed and _SEQUENCE_DELIMITER not in data[-64:]:
            detail = f"truncated DICOM (read {len(data):,} bytes; encapsulated pixel data not closed)"
            raise TruncatedImage(source, detail) from e
        if syntax.is_compressed:
            _unsupported_if_no_full_decoder(syntax, decoder, text, source)
        raise CorruptImage(source, f"corrupt DICOM pixel data ({text})") from e


def _require_decoder(syntax: UID, source: str) -> Any:
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise UnsupportedFormat(
            source,
            f"DICOM transfer syntax {syntax.name or 'unknown'} ({syntax}) has no pixel decoder in "
            f"pydicom {pydicom.__version__} or its plugins; transcode it first (dcmtk dcmdjpeg/dcmconv, gdcmconv --raw)",
        ) from None
    if not decoder.is_available:
        raise UnsupportedFormat(
            source,
            f"DICOM transfer syntax {syntax.name} ({syntax}) is compressed and no installed plugin "
            f"decodes it; install {_CODEC_PACKAGES.get(syntax, 'one of: ' + '; '.join(decoder.missing_dependencies))}",
        )
    return decoder


def _unsupported_if_no_full_decoder(syntax: UID, decoder: Any, text: str, source: str) -> None:
    """A failed decode is `unsupported`, not `corrupt`, when no capable plugin was there to try."""
    capable = {"pylibjpeg", "pydicom"} if syntax == RLELossless else {"pylibjpeg"}
    has_capable = bool(capable & set(decoder.available_plugins))
    plugin_lines = [line for line in text.splitlines()[1:] if ":" in line]
    all_refused = bool(plugin_lines) and all(_NOT_SUPPORTED.search(line) for line in plugin_lines)
    if has_capable and not all_refused:
        return
    needs = _CODEC_PACKAGES.get(syntax, "pylibjpeg and its plugins")
    tried = ", ".join(decoder.available_plugins) or "none"
    raise UnsupportedFormat(
        source,
        f"DICOM transfer syntax {syntax.name} ({syntax}): the installed plugins ({tried}) cannot decode "
        f"this variant ({text.splitlines()[-1].strip()}); {needs} decodes it",
    )


def _to_unit(arr: np.ndarray, ds: Dataset, source: str, warnings: list[str]) -> np.ndarray:
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)  # indices -> RGB of 8- or 16-bit entries
        full_scale = float(np.iinfo(arr.dtype).max) if arr.dtype.kind == "u" else 255.0
        out = (arr[..., :3] @ _LUMA) / full_scale
        warnings.append("colour")
    elif arr.ndim == 3:
        # pydicom already converted YBR to RGB; colour DICOM carries no modality/VOI LUT.
        full_scale = 2 ** int(ds.get("BitsStored", 8)) - 1
        out = (arr @ _LUMA) / full_scale
        warnings.append("colour")
    else:
        out = grayscale_to_unit(arr, ds, source, warnings)
        if photometric == "MONOCHROME1":
            out = 1.0 - out  # MONOCHROME1 stores bone dark; flip so bone is bright
    out = np.asarray(out, dtype=np.float32)
    if arr.dtype.kind == "f" and not np.isfinite(out).all():  # only Float Pixel Data has NaN/inf
        out = np.nan_to_num(out, nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(out, 0.0, 1.0, out=out)


def grayscale_to_unit(arr: np.ndarray, ds: Dataset, source: str, warnings: list[str]) -> np.ndarray:
    """Modality LUT (rescale), then VOI LUT or first window, then [0, 1] over the VOI output range."""
    values = _finite(_modality(arr, ds, source), source, warnings)
    try:
        windowed = _voi_to_unit(values, ds)
    except (ValueError, TypeError, IndexError, KeyError, AttributeError, NotImplementedError, struct.error) as e:
        logger.warning("%s: ignoring unusable VOI LUT/window (%s); using min-max", source, e)
        warnings.append("window_invalid")
        return _min_max(values)
    if windowed is None:
        warnings.append("window_missing")
        return _min_max(values)
    return windowed


def _modality(arr: np.ndarray, ds: Dataset, source: str) -> np.ndarray:
    """Modality LUT Sequence (pydicom's lookup) or Rescale Slope/Intercept, as pydicom applies them.
    A slope that is 0 or not a number leaves no picture to show: CorruptImage, rather than a
    black (or NaN) image scored as if it were one."""
    if ds.get("ModalityLUTSequence"):
        return apply_modality_lut(arr, ds)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is None or intercept is None:  # pydicom, too, rescales only with both
        return arr
    # float32, not pydicom's float64: exact for every 16-bit stored value times a short slope,
    # and half the memory traffic on a 3,000 x 3,000 radiograph.
    slope, intercept = float(slope), float(intercept)
    if slope == 0.0 or not (math.isfinite(slope) and math.isfinite(intercept)):
        raise CorruptImage(source, f"Rescale Slope {slope:g} and Intercept {intercept:g} leave no picture "
                                   "(both must be finite numbers, the slope not 0)")
    if slope == 1.0 and intercept == 0.0:  # the identity most DX/CR files declare: skip a pass
        return arr
    out = arr.astype(np.float32)
    if slope != 1.0:
        out *= np.float32(slope)
    if intercept != 0.0:
        out += np.float32(intercept)
    return out


def _finite(values: np.ndarray, source: str, warnings: list[str]) -> np.ndarray:
    """Float Pixel Data with NaN or infinities: each goes to an end of the finite values' range
    (NaN and -inf the low end, +inf the high end), so the window or min-max is computed over real
    values; with none finite, there is no picture (CorruptImage)."""
    if values.dtype.kind != "f":
        return values
    finite = np.isfinite(values)
    if finite.all():
        return values
    if not finite.any():
        raise CorruptImage(source, "no pixel value is a finite number (NaN or infinite Float Pixel Data)")
    warnings.append("non_finite_pixels")
    lo, hi = values[finite].min(), values[finite].max()
    return np.where(finite, values, np.where(values == np.inf, hi, lo)).astype(values.dtype, copy=False)


def _voi_to_unit(values: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """The VOI LUT (preferred, as pydicom does) or first window, scaled by its output range."""
    item = ds.VOILUTSequence[0] if ds.get("VOILUTSequence") else None  # empty sequence: no LUT
    if item is not None and "LUTDescriptor" in item and "LUTData" in item:
        lut = lut_table(item, ds)
        lo, hi = float(lut.min()), float(lut.max())
        if hi <= lo:
            raise ValueError(f"the VOI LUT maps everything to {lo:g}")
        out = apply_lut(values, lut, int(item.LUTDescriptor[1])).astype(np.float32)
        out -= np.float32(lo)
        out /= np.float32(hi - lo)
        return out
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        return window_to_unit(values, ds)
    return None


def _first_value(ds: Dataset, keyword: str) -> float:
    elem = ds[keyword]
    return float(elem.value[0] if elem.VM > 1 else elem.value)  # several windows: the first is the default


def window_to_unit(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """Window Center/Width (PS3.3 C.11.2.1.2-3) straight onto [0, 1].

    pydicom's apply_windowing maps the window onto the modality output range [y_min, y_max];
    scaling that to [0, 1] cancels y_min and y_max, so this is the same function, computed in
    float32 without the detour (tests/test_dicom.py checks it against pydicom).
    """
    center, width = _first_value(ds, "WindowCenter"), _first_value(ds, "WindowWidth")
    if not (math.isfinite(center) and math.isfinite(width)):  # NaN passes every comparison below
        raise ValueError(f"Window Center {center:g} and Width {width:g} are not both finite numbers")
    function = str(ds.get("VOILUTFunction", "") or "LINEAR").strip().upper()
    x = values.astype(np.float32, copy=False)
    if function == "LINEAR":
        if width < 1:
            raise ValueError(f"Window Width {width:g} is below 1 for a LINEAR window")
        if width == 1:  # a threshold: the standard's formula divides by width - 1
            return (x > center - 0.5).astype(np.float32)
        center, width = center - 0.5, width - 1
    elif function not in ("LINEAR_EXACT", "SIGMOID"):
        raise ValueError(f"VOI LUT Function {function!r} is not LINEAR, LINEAR_EXACT or SIGMOID")
    elif width <= 0:
        raise ValueError(f"Window Width {width:g} is not positive")
    if function == "SIGMOID":
        with np.errstate(over="ignore"):  # exp overflows far below the centre: 1 / inf is 0
            return 1.0 / (1.0 + np.exp(np.float32(-4.0 / width) * (x - np.float32(center))))
    out = x - np.float32(center)  # subtract first: exact for integer pixels, however far from 0
    out *= np.float32(1.0 / width)
    out += np.float32(0.5)
    return np.clip(out, 0.0, 1.0, out=out)


def lut_table(item: Dataset, ds: Dataset) -> np.ndarray:
    """The LUT Data of a VOI (or Modality) LUT item as an int64 array of its declared length."""
    n_entries, _first, bits = (int(v) for v in item.LUTDescriptor)
    n_entries = n_entries or 65536  # 0 means 2**16 (PS3.3 C.11.2.1.1)
    if bits not in (8, *range(10, 17)):
        raise NotImplementedError(f"{bits} bits per LUT entry is not allowed (8 or 10-16)")
    value = item.LUTData
    if isinstance(value, (bytes, bytearray)):  # OW: words in the data set's byte order
        little = ds.original_encoding[1] if ds.original_encoding[1] is not None else True
        if bits == 8 and len(value) == n_entries:  # some writers pack 8-bit entries two per word
            table = np.frombuffer(value, dtype=np.uint8)
        else:
            table = np.frombuffer(value[: 2 * n_entries], dtype="<u2" if little else ">u2")
    else:
        table = np.atleast_1d(np.asarray(value))
    if table.size < n_entries:
        raise ValueError(f"LUT Data has {table.size} entries, its descriptor says {n_entries}")
    return table[:n_entries].astype(np.int64)


def apply_lut(values: np.ndarray, table: np.ndarray, first: int) -> np.ndarray:
    """Look values up in `table` (first entry maps `first`), clamping at both ends (PS3.3 C.11.2.1.1).

    Indices are int64: pydicom 3.0.2's apply_voi indexes an 8-bit LUT with uint8, so entries past
    255 wrap around (a LUT of 4,096 8-bit entries maps input 256 to entry 0).
    """
    if values.dtype.kind == "f":
        values = np.floor(values)  # as pydicom's cast does; a LUT is indexed by integers
    index = np.clip(values.astype(np.int64) - first, 0, table.size - 1)
    return table[index]


def _min_max(values: np.ndarray) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.float32)  # constant image: black, not NaN
    out = values.astype(np.float32)  # a copy: `values` may be the decoder's own array
    out -= np.float32(lo)
    out /= np.float32(hi - lo)
    return out
