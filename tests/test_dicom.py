"""cxrray.dicom on pydicom's own test files and on files built here.

1. File by file over `pydicom/data/test_files/*.dcm`: whatever plain
   `pydicom.dcmread(force=True).pixel_array` decodes (with the pylibjpeg plugins cxrray installs),
   cxrray decodes too; the rest get a reason that is true of the file, never `corrupt` for a
   decodable one.
2. Pixel values against pydicom's own `apply_modality_lut` + `apply_voi_lut`, scaled to [0, 1]
   over the output range the standard gives (PS3.3 C.11.2.1.2). Tolerance: ATOL = 1e-5 on
   [0, 1] values (cxrray returns float32, whose rounding is ~6e-8 here; anything near 1e-5 is a
   real difference, e.g. one grey level of a 16-bit range is 1.5e-5).
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, apply_voi_lut, get_decoder
from pydicom.uid import JPEG2000Lossless, JPEGExtended12Bit, MPEG2MPML

from cxrray import dicom
from cxrray.image_errors import CorruptImage
from cxrray.imaging import (
    ImageError,
    decode_bytes,
    decode_bytes_info,
    load_image,
    load_image_info,
    sniff_format,
)
from dicom_files import dicom_bytes, dicom_dataset
from test_imaging import STORED, assert_unit, make_dicom

ATOL = 1e-5
TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
DCM_FILES = sorted(TEST_FILES.glob("*.dcm"))
LUMA = np.array([0.299, 0.587, 0.114])

# Files plain pydicom cannot decode, with the reason cxrray must give and a phrase it must say.
KNOWN_FAILURES: dict[str, tuple[str, str]] = {
    "ExplVR_LitEndNoMeta.dcm": ("not_an_image", "RT Ion Plan Storage"),  # preamble-less, read as DICOM
    "ExplVR_BigEndNoMeta.dcm": ("not_an_image", "RT Ion Plan Storage"),
    "rtstruct.dcm": ("not_an_image", "RT Structure Set Storage"),
    "rtplan.dcm": ("not_an_image", "RT Plan Storage"),
    "reportsi.dcm": ("not_an_image", "Basic Text SR Storage"),
    "waveform_ecg.dcm": ("not_an_image", "ECG Waveform Storage"),
    "UN_sequence.dcm": ("not_an_image", "no SOP Class UID"),
    "MR_truncated.dcm": ("truncated", "of 9,692 bytes"),
    "badVR.dcm": ("corrupt", "Number of Frames is '1A'"),
    # NEMA's NM1_JPLY: invalid SOS parameters for sequential JPEG; JPGExtended.dcm is its fixed copy.
    "JPEG-lossy.dcm": ("corrupt", "scan start must be zero"),
    # JPEG2000.dcm with 4 codestream bytes overwritten (pydicom's README: "not a valid JPEG anymore").
    "JPEG2000-embedded-sequence-delimiter.dcm": ("corrupt", "J2K"),
    "meta_missing_tsyntax.dcm": ("corrupt", "pixel data without Rows"),  # 2 bytes of Pixel Data, no module
    "nested_priv_SQ.dcm": ("corrupt", "pixel data without Rows"),
}
# Files plain pydicom cannot decode but cxrray can (a superset is allowed, never a subset).
CXRRAY_ONLY = {"no_meta.dcm"}  # CT_small.dcm without file meta, after one stray byte


def pydicom_pixels(path: Path) -> np.ndarray | None:
    try:
        return pydicom.dcmread(path, force=True).pixel_array
    except Exception:  # noqa: BLE001 - any failure means "plain pydicom cannot decode it"
        return None


def test_pydicom_test_files_are_there() -> None:
    assert len(DCM_FILES) >= 70, TEST_FILES
    assert set(KNOWN_FAILURES) | CXRRAY_ONLY <= {p.name for p in DCM_FILES}


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom's notes on the broken test files
@pytest.mark.parametrize("path", DCM_FILES, ids=lambda p: p.name)
def test_every_pydicom_test_file(path: Path) -> None:
    plain = pydicom_pixels(path)
    if plain is not None or path.name in CXRRAY_ONLY:
        info = load_image_info(path)  # must not raise
        assert_unit(info.pixels)
        assert info.format == "dicom"
        ds = pydicom.dcmread(path, force=True)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        assert info.frames == frames and (("multi_frame" in info.warnings) == (frames > 1))
        if plain is not None:
            assert info.pixels.shape == (ds.Rows, ds.Columns)
        return
    with pytest.raises(ImageError) as err:
        load_image(path)
    reason = err.value.reason
    assert reason in {"not_an_image", "truncated", "corrupt", "unsupported"}, str(err.value)
    assert path.name in KNOWN_FAILURES or reason == "not_an_image", (
        f"{path.name}: a new failure ({err.value}); say what is true of it in KNOWN_FAILURES")
    if path.name in KNOWN_FAILURES:
        want, phrase = KNOWN_FAILURES[path.name]
        assert (reason, True) == (want, phrase in str(err.value)), str(err.value)
    if reason == "not_an_image":
        ds = pydicom.dcmread(path, force=True)
        assert "PixelData" not in ds
        assert ("SOP class" in str(err.value)) == bool(ds.get("SOPClassUID"))


@pytest.mark.parametrize("name, syntax", [
    ("SC_rgb_jpeg_gdcm.dcm", "JPEG Lossless, Non-Hierarchical, First-Order Prediction"),
    ("JPGExtended.dcm", "JPEG Extended"),
    ("SC_rgb_jpeg_dcmtk.dcm", "JPEG Baseline"),
    ("MR_small_jpeg_ls_lossless.dcm", "JPEG-LS Lossless"),
    ("JPEGLSNearLossless_16.dcm", "JPEG-LS Lossy"),
    ("GDCMJ2K_TextGBR.dcm", "JPEG 2000 Image Compression"),
    ("MR_small_jp2klossless.dcm", "JPEG 2000 Image Compression (Lossless Only)"),
    ("MR_small_RLE.dcm", "RLE Lossless"),
    ("image_dfl.dcm", "Deflated Explicit VR Little Endian"),
    ("MR_small_bigendian.dcm", "Explicit VR Big Endian"),
])
def test_compressed_syntaxes_from_the_issue_decode(name: str, syntax: str) -> None:
    info = load_image_info(TEST_FILES / name)
    assert_unit(info.pixels)
    assert pydicom.uid.UID(info.dicom["TransferSyntaxUID"]).name.startswith(syntax)
    assert info.pixels.max() > info.pixels.min()


def test_preamble_less_files_are_dicom() -> None:
    ct = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    for name in ("no_meta.dcm", "ExplVR_LitEndNoMeta.dcm", "ExplVR_BigEndNoMeta.dcm", "rtstruct.dcm"):
        assert sniff_format((TEST_FILES / name).read_bytes()) == "dicom", name
    info = load_image_info(TEST_FILES / "no_meta.dcm")
    assert {"stray_leading_byte", "no_file_meta"} <= set(info.warnings)
    np.testing.assert_allclose(info.pixels, load_image(TEST_FILES / "CT_small.dcm"), atol=ATOL)
    assert info.dicom["SOPInstanceUID"] == ct.SOPInstanceUID


@pytest.mark.parametrize("implicit", [True, False])
@pytest.mark.parametrize("keep_meta", [True, False])
def test_written_without_preamble(implicit: bool, keep_meta: bool) -> None:
    ds = pydicom.dcmread(TEST_FILES / "MR_small.dcm")
    expected = decode_bytes((TEST_FILES / "MR_small.dcm").read_bytes())
    ds.preamble = None
    if implicit:
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    if not keep_meta:
        del ds.file_meta
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, implicit_vr=implicit, little_endian=True)
    data = buf.getvalue()
    assert data[128:132] != b"DICM" and sniff_format(data) == "dicom"
    info = decode_bytes_info(data)
    np.testing.assert_allclose(info.pixels, expected, atol=ATOL)
    assert ("no_file_meta" in info.warnings) is not keep_meta


def test_noise_and_text_are_not_taken_for_preamble_less_dicom() -> None:
    rng = np.random.default_rng(1)
    hits = sum(sniff_format(rng.integers(0, 256, 512, dtype=np.uint8).tobytes()) == "dicom" for _ in range(2000))
    assert hits == 0
    assert sniff_format(b"\x08\x00 Findings: no acute process") is None


# ------------------------------------------------------------------------------ pixel values


def pydicom_reference(ds: Dataset) -> np.ndarray:
    """pydicom's own modality + VOI LUT, scaled over the standard's output range, MONOCHROME1 inverted."""
    arr = ds.pixel_array
    arr = arr[0] if int(ds.get("NumberOfFrames", 1) or 1) > 1 else arr
    values = apply_modality_lut(arr, ds)
    out = apply_voi_lut(values, ds)  # the first window / LUT, as cxrray uses
    if ds.get("VOILUTSequence"):
        lut = ds.VOILUTSequence[0].LUTData
        lo, hi = float(np.min(lut)), float(np.max(lut))
    elif "WindowCenter" in ds:
        # PS3.3 C.11.2.1.2: the window maps onto the output range of the modality transform.
        bits, signed = int(ds.BitsStored), int(ds.PixelRepresentation)
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        if "RescaleSlope" in ds and "RescaleIntercept" in ds:
            lo, hi = (v * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for v in (lo, hi))
    else:
        lo, hi = float(values.min()), float(values.max())
    unit = (out - lo) / (hi - lo)
    return 1 - unit if ds.PhotometricInterpretation == "MONOCHROME1" else unit


def decode_ds(ds: Dataset) -> dict:
    buf = io.BytesIO()
    ds.save_as(buf)
    info = decode_bytes_info(buf.getvalue())
    return {"pixels": info.pixels, "warnings": info.warnings}


@pytest.mark.parametrize("name", [
    "MR_small.dcm",               # one window, signed 16-bit
    "693_J2KI.dcm",               # rescale + window, signed 14-bit, JPEG 2000
    "examples_overlay.dcm",       # two windows: the first is used
    "J2K_pixelrep_mismatch.dcm",  # three windows, rescale, 13-bit signed
    "MR_small_RLE.dcm",
    "CT_small.dcm",               # rescale, no window: min-max
    "JPGExtended.dcm",            # 12 of 16 bits, no window
])
def test_matches_pydicom_modality_and_voi_lut(name: str) -> None:
    ds = pydicom.dcmread(TEST_FILES / name)
    info = load_image_info(TEST_FILES / name)
    expected = np.clip(pydicom_reference(ds), 0, 1)
    np.testing.assert_allclose(info.pixels, expected, atol=ATOL)
    assert ("window_missing" in info.warnings) is ("WindowCenter" not in ds)


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
@pytest.mark.parametrize("center, width", [(600, 1600), (100.5, 1), (-20, 0.5)])
def test_window_functions_match_pydicom(function: str, center: float, width: float) -> None:
    ds = pydicom.dcmread(TEST_FILES / "MR_small.dcm")
    ds.VOILUTFunction, ds.WindowCenter, ds.WindowWidth = function, center, width
    ds.RescaleSlope, ds.RescaleIntercept = 0.5, -10
    if function == "LINEAR" and width < 1:  # pydicom refuses it; cxrray falls back, saying so
        assert "window_invalid" in decode_ds(ds)["warnings"]
        return
    np.testing.assert_allclose(decode_ds(ds)["pixels"], np.clip(pydicom_reference(ds), 0, 1), atol=ATOL)


def test_monochrome1_matches_pydicom_inverted() -> None:
    ds = pydicom.dcmread(TEST_FILES / "MR_small.dcm")
    ds.PhotometricInterpretation = "MONOCHROME1"
    got = decode_ds(ds)["pixels"]
    np.testing.assert_allclose(got, np.clip(pydicom_reference(ds), 0, 1), atol=ATOL)
    np.testing.assert_allclose(got, 1 - load_image(TEST_FILES / "MR_small.dcm"), atol=ATOL)


def voi_lut_item(table: np.ndarray, bits: int, first: int = 0, vr: str = "US") -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [len(table) % 65536, first, bits]
    item.add_new("LUTData", vr, table.astype("<u2").tobytes() if vr == "OW" else [int(v) for v in table])
    return item


@pytest.mark.parametrize("vr", ["US", "OW"])
def test_voi_lut_on_a_real_file_matches_pydicom(vr: str) -> None:
    ds = pydicom.dcmread(TEST_FILES / "JPGExtended.dcm")  # 12 bits stored, unsigned
    table = np.rint(4095 * (np.arange(4096) / 4095) ** 0.5).astype(np.uint16)  # a gamma curve
    ds.VOILUTSequence = [voi_lut_item(table, 12, vr=vr)]
    ds.WindowCenter, ds.WindowWidth = 100, 10  # ignored: the LUT is preferred, as in pydicom
    got = decode_ds(ds)["pixels"]
    expected = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds) / 4095
    np.testing.assert_allclose(got, expected, atol=ATOL)


def test_voi_lut_first_value_and_clamping() -> None:
    table = np.arange(100, 200, dtype=np.uint16)  # maps stored 1000..1099; clamps outside
    data = make_dicom(STORED, BitsStored=12, HighBit=11, VOILUTSequence=[voi_lut_item(table, 16, first=1000)])
    ds = pydicom.dcmread(io.BytesIO(data))
    expected = (apply_voi(ds.pixel_array, ds).astype(float) - 100) / 99
    np.testing.assert_allclose(decode_bytes(data), expected, atol=ATOL)


def test_8bit_voi_lut_longer_than_256_entries() -> None:
    """pydicom 3.0.2's apply_voi indexes an 8-bit LUT through uint8, so entry 256 wraps to 0."""
    table = (np.arange(4096) // 16).astype(np.uint16)  # 8-bit output values over 12-bit input
    data = make_dicom(STORED, BitsStored=12, HighBit=11, VOILUTSequence=[voi_lut_item(table, 8)])
    expected = (STORED // 16) / 255
    np.testing.assert_allclose(decode_bytes(data), expected, atol=ATOL)
    ds = pydicom.dcmread(io.BytesIO(data))
    if pydicom.__version__ == "3.0.2":  # the bug the workaround is for, still there in this release
        assert not np.array_equal(apply_voi(ds.pixel_array, ds), table[STORED])


def test_bits_stored_below_bits_allocated_masks_high_bits() -> None:
    # Old writers put overlays or junk in the unused high bits; only bits 0..HighBit are the pixel.
    junk = np.array([[0xF000, 0x3000], [0xA000, 0x0000]], dtype=np.uint16)
    values = np.array([[0, 4095], [1000, 3000]], dtype=np.uint16)
    img = decode_bytes(make_dicom(values | junk, BitsStored=12, HighBit=11))
    np.testing.assert_allclose(img, values / 4095, atol=ATOL)
    signed = np.array([[-2048, 2047], [-1, 0]], dtype=np.int16)
    raw = (signed.view(np.uint16) & 0x0FFF) | junk  # 12-bit two's complement, junk above
    img = decode_bytes(make_dicom(raw.view(np.int16), BitsStored=12, HighBit=11, WindowCenter=0, WindowWidth=4096))
    np.testing.assert_allclose(img, np.clip((signed + 0.5) / 4095 + 0.5, 0, 1), atol=ATOL)


def test_signed_pixels_with_rescale_and_window() -> None:
    arr = np.array([[-1024, -500], [0, 1500]], dtype=np.int16)
    data = make_dicom(arr, RescaleSlope=2, RescaleIntercept=-100, WindowCenter=-100, WindowWidth=2001)
    ds = pydicom.dcmread(io.BytesIO(data))
    np.testing.assert_allclose(decode_bytes(data), np.clip(pydicom_reference(ds), 0, 1), atol=ATOL)


def test_unusable_window_falls_back_to_min_max_and_says_so() -> None:
    info = decode_bytes_info(make_dicom(STORED, BitsStored=12, HighBit=11, WindowCenter=100, WindowWidth=0))
    np.testing.assert_allclose(info.pixels, STORED / 4095, atol=ATOL)
    assert "window_invalid" in info.warnings


def test_a_window_that_is_not_a_number_falls_back_to_min_max_and_says_so() -> None:
    """NaN passes every comparison (`width < 1` is False), so it needs its own check: without it
    the window made every pixel NaN, and the model scored a black image with no warning."""
    for center, width in (("NaN", 400), (100, "NaN"), (100, "inf")):
        with pytest.warns(UserWarning, match="Invalid value for VR DS"):  # pydicom says so, and reads it
            data = make_dicom(STORED, BitsStored=12, HighBit=11, WindowCenter=center, WindowWidth=width)
        info = decode_bytes_info(data)
        np.testing.assert_allclose(info.pixels, STORED / 4095, atol=ATOL)
        assert "window_invalid" in info.warnings


@pytest.mark.parametrize("slope, intercept", [("NaN", 0), (1, "inf"), (0, 5)])
def test_a_rescale_that_leaves_no_picture_is_corrupt(slope, intercept) -> None:
    """A slope of 0 maps every pixel to one value, and NaN or inf to none: an error, not a black
    (or NaN) image scored as if it were a radiograph."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # pydicom's "Invalid value for VR DS"
        data = make_dicom(STORED, BitsStored=12, HighBit=11, RescaleSlope=slope, RescaleIntercept=intercept)
    with pytest.raises(CorruptImage, match="Rescale Slope .* leave no picture"):
        decode_bytes_info(data)


def float_pixel_dicom(values: np.ndarray) -> bytes:
    """A data set with Float Pixel Data (7FE0,0008) instead of Pixel Data."""
    ds = dicom_dataset(np.zeros(values.shape, np.uint16))
    del ds.PixelData, ds.BitsStored, ds.HighBit, ds.PixelRepresentation  # not in the Float Pixel module
    ds.BitsAllocated = 32
    ds.FloatPixelData = values.astype("<f4").tobytes()
    return dicom_bytes(ds)


def test_float_pixels_that_are_not_finite_are_scaled_around_and_flagged() -> None:
    values = np.array([[0.0, 1.0, 2.0], [np.nan, np.inf, -np.inf]], np.float32)
    info = decode_bytes_info(float_pixel_dicom(values))
    # min-max over the finite values (0..2); NaN and -inf at the low end, +inf at the high end
    np.testing.assert_allclose(info.pixels, [[0.0, 0.5, 1.0], [0.0, 1.0, 0.0]], atol=ATOL)
    assert "non_finite_pixels" in info.warnings
    clean = decode_bytes_info(float_pixel_dicom(values[:1]))
    assert "non_finite_pixels" not in clean.warnings
    with pytest.raises(CorruptImage, match="no pixel value is a finite number"):
        decode_bytes_info(float_pixel_dicom(np.full((2, 2), np.nan, np.float32)))


def test_multi_frame_scores_the_first_frame_and_flags_it() -> None:
    frames = np.stack([STORED, 4095 - STORED, STORED // 2])
    info = decode_bytes_info(make_dicom(frames, BitsStored=12, HighBit=11, NumberOfFrames=3))
    np.testing.assert_allclose(info.pixels, STORED / 4095, atol=ATOL)
    assert info.frames == 3 and "multi_frame" in info.warnings
    ybr = load_image_info(TEST_FILES / "examples_ybr_color.dcm")  # 30 frames, YBR -> RGB
    first = pydicom.dcmread(TEST_FILES / "examples_ybr_color.dcm").pixel_array[0]
    np.testing.assert_allclose(ybr.pixels, (first @ LUMA) / 255, atol=ATOL)
    assert ybr.frames == 30 and {"multi_frame", "colour"} <= set(ybr.warnings)
    single = decode_bytes_info(make_dicom(STORED, BitsStored=12, HighBit=11))
    assert single.frames == 1 and "multi_frame" not in single.warnings


def test_palette_colour_becomes_luminance() -> None:
    ds = pydicom.dcmread(TEST_FILES / "examples_palette.dcm")
    rgb = apply_color_lut(ds.pixel_array, ds)  # 16-bit palette entries
    np.testing.assert_allclose(load_image(TEST_FILES / "examples_palette.dcm"), (rgb @ LUMA) / 65535, atol=ATOL)


# ------------------------------------------------------------------------------ identity, errors


def test_identity_has_the_image_not_the_patient() -> None:
    ds = pydicom.dcmread(TEST_FILES / "MR_small.dcm")
    info = load_image_info(TEST_FILES / "MR_small.dcm")
    assert tuple(info.dicom) == dicom.IDENTITY_KEYWORDS
    assert info.dicom["SOPInstanceUID"] == ds.SOPInstanceUID and info.dicom["Modality"] == "MR"
    assert info.dicom["StudyInstanceUID"] == ds.StudyInstanceUID
    assert info.dicom["PhotometricInterpretation"] == "MONOCHROME2"
    assert info.dicom["ViewPosition"] == ds.get("ViewPosition", "")
    patient = {str(ds.get(k, "")) for k in ("PatientName", "PatientID", "PatientBirthDate")} - {""}
    assert patient and not patient & set(info.dicom.values())
    assert not any(k.startswith("Patient") for k in info.dicom)
    png = io.BytesIO()
    Image.new("L", (4, 4)).save(png, "PNG")
    plain = decode_bytes_info(png.getvalue())
    assert plain.format == "png" and plain.dicom == {} and plain.warnings == [] and plain.frames == 1


def test_missing_plugin_is_unsupported_and_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(get_decoder(JPEG2000Lossless), "_available", {})
    with pytest.raises(ImageError) as err:
        load_image(TEST_FILES / "MR_small_jp2klossless.dcm")
    assert err.value.reason == "unsupported"
    assert "JPEG 2000 Image Compression (Lossless Only)" in str(err.value) and "pylibjpeg-openjpeg" in str(err.value)


def test_plugin_that_refuses_the_variant_is_unsupported_not_corrupt(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pillow alone cannot decode 12-bit JPEG Extended; the file is fine, so it is not `corrupt`.
    decoder = get_decoder(JPEGExtended12Bit)
    monkeypatch.setattr(decoder, "_available", {"pillow": decoder._available["pillow"]})
    with pytest.raises(ImageError) as err:
        load_image(TEST_FILES / "JPGExtended.dcm")
    assert err.value.reason == "unsupported", str(err.value)
    assert "JPEG Extended" in str(err.value) and "pylibjpeg-libjpeg" in str(err.value)


def test_syntax_without_any_decoder_is_unsupported() -> None:
    data = make_dicom(STORED, syntax=MPEG2MPML, pixel_bytes=pydicom.encaps.encapsulate([b"\x00\x00\x01\xb3" + bytes(8)]))
    with pytest.raises(ImageError) as err:
        decode_bytes(data, source="video.dcm")
    assert err.value.reason == "unsupported" and "MPEG2" in str(err.value) and "no pixel decoder" in str(err.value)


def test_truncated_preamble_less_and_deflated() -> None:
    data = (TEST_FILES / "ExplVR_LitEndNoMeta.dcm").read_bytes()
    assert sniff_format(data[:200]) == "dicom"
    ct = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    ct.preamble = None
    del ct.file_meta
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ct, implicit_vr=False, little_endian=True)
    with pytest.raises(ImageError) as err:
        decode_bytes(buf.getvalue()[:-300])  # CT_small has 138 bytes of elements after Pixel Data
    assert err.value.reason == "truncated", str(err.value)
    dfl = (TEST_FILES / "image_dfl.dcm").read_bytes()
    with pytest.raises(ImageError) as err:
        decode_bytes(dfl[: len(dfl) // 2])
    assert err.value.reason in {"truncated", "corrupt"}, str(err.value)
