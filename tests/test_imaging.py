"""cxrray.imaging: every supported format/mode decodes to known values; every bad input
raises the right typed error naming its source. Files are generated here, in tmp_path."""
from __future__ import annotations

import io
import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageFile
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1

from cxrray import imaging
from cxrray.image_format import PNG_SIGNATURE
from cxrray.imaging import (
    DEFAULT_MAX_PIXELS,
    REASONS,
    ImageError,
    decode_bytes,
    load_image,
    read_bytes,
    sniff_format,
    to_uint8,
)
from dicom_files import make_dicom  # test_dicom, test_qa, test_score and test_serve import it from here

RNG = np.random.default_rng(0)
NOISE = RNG.integers(0, 256, (48, 64), dtype=np.uint8)


# ------------------------------------------------------------------------------ builders


def encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def png_chunk(ctype: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + ctype + payload + struct.pack(">I", zlib.crc32(ctype + payload))


def png_declaring(width: int, height: int) -> bytes:
    """A structurally valid PNG whose IHDR declares width x height but carries one tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (PNG_SIGNATURE + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + png_chunk(b"IEND", b""))


def luma(rgb: np.ndarray) -> np.ndarray:
    return (rgb[..., :3].astype(np.float64) @ [0.299, 0.587, 0.114]) / 255


def assert_unit(img: np.ndarray, shape: tuple[int, int] | None = None) -> None:
    """The decode contract: 2-D float32, finite, within [0, 1]."""
    assert img.dtype == np.float32 and img.ndim == 2
    assert np.isfinite(img).all() and img.min() >= 0.0 and img.max() <= 1.0
    if shape is not None:
        assert img.shape == shape


def expect_error(data: bytes, reason: str, **kw) -> ImageError:
    with pytest.raises(ImageError) as info:
        decode_bytes(data, source="case.bin", **kw)
    err = info.value
    assert err.reason == reason, str(err)
    assert str(err).startswith("case.bin: ") and err.source == "case.bin"
    return err


# ------------------------------------------------------------------------------ sniffing


@pytest.mark.parametrize("data, fmt", [
    (encode(Image.new("L", (4, 4))), "png"),
    (encode(Image.new("L", (4, 4)), "JPEG"), "jpeg"),
    (b"\x00" * 128 + b"DICM" + b"\x02\x00", "dicom"),
    (encode(Image.new("L", (4, 4)), "GIF"), "gif"),
    (encode(Image.new("L", (4, 4)), "BMP"), "bmp"),
    (encode(Image.new("L", (4, 4)), "TIFF"), "tiff"),
    (encode(Image.new("RGB", (4, 4)), "WEBP"), "webp"),
    (b"%PDF-1.7\n...", "pdf"),
    (b"PK\x03\x04" + b"\x00" * 26, "zip"),
    (b"BMI and chest X-ray notes", None),
    (b"hello, world\n", None),
    (b"", None),
])
def test_sniff_format_from_magic_bytes(data: bytes, fmt: str | None) -> None:
    assert sniff_format(data) == fmt


# ------------------------------------------------------------------------------ PNG / JPEG


def test_png_8bit_grayscale_is_exact() -> None:
    img = decode_bytes(encode(Image.fromarray(NOISE)))
    assert_unit(img, NOISE.shape)
    np.testing.assert_array_equal(img, NOISE.astype(np.float32) / 255)


def test_png_16bit_scales_by_bit_depth_not_min_max() -> None:
    arr = np.array([[0, 65535], [32768, 1000]], dtype=np.uint16)
    img = decode_bytes(encode(Image.fromarray(arr)))
    assert_unit(img, (2, 2))
    assert img[0, 0] == 0.0 and img[0, 1] == 1.0
    np.testing.assert_allclose(img[1], [32768 / 65535, 1000 / 65535], rtol=1e-6)
    # A dark image stays dark: no per-image stretching.
    dark = decode_bytes(encode(Image.fromarray(np.full((3, 3), 1000, np.uint16))))
    np.testing.assert_allclose(dark, 1000 / 65535, rtol=1e-6)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "P"])
def test_png_colour_modes_become_luminance(mode: str) -> None:
    rgb = RNG.integers(0, 256, (8, 10, 3), dtype=np.uint8)
    alpha = RNG.integers(0, 256, (8, 10), dtype=np.uint8)  # must be ignored
    if mode == "RGB":
        im, expected = Image.fromarray(rgb), luma(rgb)
    elif mode == "RGBA":
        im, expected = Image.fromarray(np.dstack([rgb, alpha])), luma(rgb)
    elif mode == "LA":
        im = Image.fromarray(np.dstack([rgb[..., 0], alpha]), mode="LA")
        expected = rgb[..., 0] / 255
    else:
        im = Image.fromarray(rgb).quantize(16)  # palette; expected from the quantized colours
        expected = luma(np.asarray(im.convert("RGB")))
    data = encode(im)
    assert Image.open(io.BytesIO(data)).mode == mode
    img = decode_bytes(data)
    assert_unit(img, (8, 10))
    np.testing.assert_allclose(img, expected, atol=1 / 255 + 1e-6)


def test_png_1bit_and_constant_images() -> None:
    bits = np.array([[0, 1], [1, 0]], dtype=bool)
    np.testing.assert_array_equal(decode_bytes(encode(Image.fromarray(bits))), bits.astype(np.float32))
    zeros = decode_bytes(encode(Image.new("L", (5, 7))))
    assert_unit(zeros, (7, 5))
    assert not zeros.any()


def test_jpeg_grayscale_rgb_and_cmyk() -> None:
    ramp = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (32, 1))
    gray = decode_bytes(encode(Image.fromarray(ramp), "JPEG", quality=100))
    assert_unit(gray, (32, 64))
    np.testing.assert_allclose(gray, ramp / 255, atol=3 / 255)

    rgb = np.full((16, 16, 3), (200, 100, 50), np.uint8)
    colour = decode_bytes(encode(Image.fromarray(rgb), "JPEG", quality=100))
    np.testing.assert_allclose(colour, luma(rgb), atol=3 / 255)

    cmyk = decode_bytes(encode(Image.new("CMYK", (16, 16), (0, 0, 0, 0)), "JPEG", quality=100))
    assert_unit(cmyk, (16, 16))
    assert cmyk.mean() > 0.95  # no ink is white


def test_format_comes_from_bytes_not_the_file_name(tmp_path: Path) -> None:
    png_as_jpg = tmp_path / "scan.jpg"
    png_as_jpg.write_bytes(encode(Image.fromarray(NOISE)))
    np.testing.assert_array_equal(load_image(png_as_jpg), NOISE / np.float32(255))
    text_as_png = tmp_path / "notes.png"
    text_as_png.write_text("Findings: no acute cardiopulmonary process.\n")
    with pytest.raises(imaging.NotAnImage, match="notes.png: not a PNG, JPEG or DICOM"):
        load_image(text_as_png)


def test_an_unrecognised_file_is_described_never_quoted(tmp_path: Path) -> None:
    """The error names the file's size and kind, never its bytes: a DICOM data set written
    without group 0008 starts with the patient's name, and the message reaches HTTP answers,
    error rows and logs."""
    from pydicom.dataset import Dataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    ds = Dataset()
    ds.PatientName, ds.PatientID = "DOE^JANE", "MRN123456"
    for implicit in (True, False):
        buf = DicomBytesIO()
        buf.is_implicit_VR, buf.is_little_endian = implicit, True
        write_dataset(buf, ds)  # the data set alone: no preamble, no file meta
        path = tmp_path / f"bare_{implicit}.dcm"
        path.write_bytes(buf.getvalue())
        with pytest.raises(imaging.NotAnImage) as err:
            load_image(path)
        assert "DOE" not in str(err.value) and "MRN" not in str(err.value), str(err.value)
        assert f"{len(buf.getvalue())} bytes of binary data" in str(err.value)
    notes = tmp_path / "notes.png"
    notes.write_text("Patient: DOE^JANE, MRN123456. Findings: none.\n")
    with pytest.raises(imaging.NotAnImage, match="bytes of text with no image signature") as err:
        load_image(notes)
    assert "DOE" not in str(err.value)


def test_accepts_bytearray_and_memoryview() -> None:
    data = encode(Image.fromarray(NOISE))
    for view in (bytearray(data), memoryview(data)):
        assert_unit(decode_bytes(view), NOISE.shape)


# ------------------------------------------------------------------------------ DICOM

STORED = np.array([[0, 1024, 1064], [2024, 3000, 4095]], dtype=np.uint16)  # 12-bit values


def test_dicom_uncompressed_without_window_is_min_max() -> None:
    img = decode_bytes(make_dicom(STORED, BitsStored=12, HighBit=11))
    assert_unit(img, STORED.shape)
    np.testing.assert_allclose(img, STORED / 4095, atol=1e-6)


def test_dicom_rescale_then_window() -> None:
    # Stored = HU + 1024; a soft-tissue window centred on 40 HU, 400 wide (LINEAR, PS3.3 C.11.2.1.2).
    data = make_dicom(STORED, BitsStored=12, HighBit=11, RescaleSlope=1, RescaleIntercept=-1024,
                      WindowCenter=40, WindowWidth=400)
    img = decode_bytes(data)
    assert_unit(img, STORED.shape)
    hu = STORED.astype(np.float64) - 1024
    expected = np.clip((hu - 39.5) / 399 + 0.5, 0, 1)
    np.testing.assert_allclose(img, expected, atol=1e-5)
    assert img[0, 0] == 0.0 and img[1, 0] == 1.0  # -1024 HU below, 1000 HU above the window


def test_dicom_window_on_signed_pixels() -> None:
    arr = np.array([[-2000, -100], [0, 100]], dtype=np.int16)
    img = decode_bytes(make_dicom(arr, WindowCenter=0, WindowWidth=201))
    np.testing.assert_allclose(img, np.clip((arr + 0.5) / 200 + 0.5, 0, 1), atol=1e-6)
    assert img[0, 0] == 0.0 and img[1, 1] == 1.0


def test_dicom_voi_lut_sequence() -> None:
    lut = Dataset()
    # 12 bits in, 0..2047 out: the result is scaled by the LUT's own output range.
    # (An 8-bit descriptor over 4096 entries trips a pydicom 3.0 index-overflow bug.)
    lut.LUTDescriptor = [4096, 0, 12]
    lut.add_new("LUTData", "US", [v // 2 for v in range(4096)])
    data = make_dicom(STORED, BitsStored=12, HighBit=11, VOILUTSequence=[lut])
    np.testing.assert_allclose(decode_bytes(data), (STORED // 2) / 2047, atol=1e-6)


def test_dicom_monochrome1_is_inverted_so_bone_is_bright() -> None:
    img = decode_bytes(make_dicom(STORED, photometric="MONOCHROME1", BitsStored=12, HighBit=11))
    np.testing.assert_allclose(img, 1 - STORED / 4095, atol=1e-6)
    assert img[0, 0] == 1.0 and img[1, 2] == 0.0


def test_dicom_rgb_becomes_luminance() -> None:
    rgb = RNG.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    img = decode_bytes(make_dicom(rgb, photometric="RGB"))
    assert_unit(img, (6, 5))
    np.testing.assert_allclose(img, luma(rgb), atol=1e-5)


def test_dicom_multiframe_uses_first_frame() -> None:
    frames = np.stack([STORED, 4095 - STORED])
    img = decode_bytes(make_dicom(frames, BitsStored=12, HighBit=11, NumberOfFrames=2))
    np.testing.assert_allclose(img, STORED / 4095, atol=1e-6)


def _jpeg2000_available() -> bool:
    return pydicom.pixels.get_decoder(JPEG2000Lossless).is_available


@pytest.mark.skipif(not _jpeg2000_available(), reason="no JPEG 2000 plugin for pydicom installed")
def test_dicom_jpeg2000_decodes_with_an_installed_plugin() -> None:
    stream = encode(Image.fromarray(STORED), "JPEG2000", irreversible=False)
    data = make_dicom(STORED, syntax=JPEG2000Lossless, pixel_bytes=encapsulate([stream]),
                      BitsStored=12, HighBit=11)
    np.testing.assert_allclose(decode_bytes(data), STORED / 4095, atol=1e-6)
    with pytest.warns(UserWarning, match="delimiter"):  # pydicom's own note on the cut sequence
        expect_error(data[:-40], "truncated")


def test_dicom_compressed_syntax_without_plugin_is_unsupported(monkeypatch: pytest.MonkeyPatch) -> None:
    # pylibjpeg-libjpeg is a default dependency now; hide every plugin to see the message.
    monkeypatch.setattr(pydicom.pixels.get_decoder(JPEGLosslessSV1), "_available", {})
    data = make_dicom(STORED, syntax=JPEGLosslessSV1, pixel_bytes=encapsulate([b"\xff\xd8dummy\xff\xd9"]))
    err = expect_error(data, "unsupported")
    assert "JPEG Lossless" in str(err) and "pylibjpeg" in str(err)


def test_dicom_without_pixel_data_is_not_an_image() -> None:
    ds = pydicom.dcmread(io.BytesIO(make_dicom(STORED)))
    del ds.PixelData, ds.Rows, ds.Columns
    buf = io.BytesIO()
    ds.save_as(buf)
    expect_error(buf.getvalue(), "not_an_image")


def test_dicom_truncated_and_corrupt() -> None:
    data = make_dicom(STORED)
    err = expect_error(data[:-5], "truncated")
    assert f"of {len(data):,} bytes" in str(err)
    expect_error(data[:300], "truncated")  # inside the file meta / header
    expect_error(data[:132] + RNG.integers(0, 256, 400, dtype=np.uint8).tobytes(), "corrupt")
    err = expect_error(make_dicom(STORED, BitsAllocated=7), "corrupt")  # pydicom refuses the header
    assert "\n" not in str(err)  # details are one line, for CSV error rows and logs


def test_dicom_pixel_cap_checked_before_reading_pixels() -> None:
    # Declares 60,000 x 60,000 (DICOM caps at 65,535) but carries 12 bytes: the cap must fire, not a decode.
    data = make_dicom(STORED, Rows=60_000, Columns=60_000)
    err = expect_error(data, "too_large")
    assert "60,000x60,000" in str(err) and f"{DEFAULT_MAX_PIXELS:,}" in str(err)


# ------------------------------------------------------------------------------ bad inputs


def test_empty_random_text_and_non_images() -> None:
    expect_error(b"", "empty")
    expect_error(RNG.integers(0, 256, 4096, dtype=np.uint8).tobytes(), "not_an_image")
    expect_error(b"PatientID,Finding\n1,Effusion\n", "not_an_image")
    expect_error(b"%PDF-1.4\n%...", "not_an_image")
    expect_error(b"PK\x03\x04" + bytes(100), "not_an_image")


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "WEBP"])
def test_known_other_image_formats_are_unsupported(fmt: str) -> None:
    err = expect_error(encode(Image.new("RGB", (8, 8)), fmt), "unsupported")
    assert fmt in str(err) and "png, jpeg, dicom" in str(err)


@pytest.mark.parametrize("keep", [5, 30, 40, 200, 0.5, -40])
def test_truncated_png(keep: float) -> None:
    data = encode(Image.fromarray(NOISE))
    cut = data[: int(len(data) * keep) if isinstance(keep, float) else keep]
    err = expect_error(cut, "truncated")
    assert "truncated PNG" in str(err) and f"{len(cut):,}" in str(err)


@pytest.mark.parametrize("keep", [100, 0.5, -2])
def test_truncated_jpeg(keep: float) -> None:
    data = encode(Image.fromarray(NOISE), "JPEG")
    cut = data[: int(len(data) * keep) if isinstance(keep, float) else keep]
    assert "truncated JPEG" in str(expect_error(cut, "truncated"))


def test_corrupt_png_and_jpeg() -> None:
    png = bytearray(encode(Image.fromarray(NOISE)))
    png[60:120] = bytes(60)  # zeroes inside the IDAT stream
    assert "corrupt PNG" in str(expect_error(bytes(png), "corrupt"))
    header_then_garbage = bytes(png[:33]) + b"\x12\x34" * 400
    expect_error(header_then_garbage, "corrupt")
    jpg = encode(Image.fromarray(NOISE), "JPEG")
    expect_error(jpg[:20] + RNG.integers(0, 256, 2000, dtype=np.uint8).tobytes() + b"\xff\xd9", "corrupt")


def test_truncation_is_caught_even_if_pil_is_told_to_allow_it(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # importing cxrray.imaging must not flip it
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = encode(Image.fromarray(NOISE))
    expect_error(data[: len(data) // 2], "truncated")


def test_png_declaring_huge_size_fails_fast() -> None:
    err = expect_error(png_declaring(100_000, 100_000), "too_large")
    assert "100,000x100,000" in str(err)
    small = encode(Image.fromarray(NOISE), "JPEG")
    assert "over the cap of 100" in str(expect_error(small, "too_large", max_pixels=100))


# ------------------------------------------------------------------------------ reading


def test_read_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.png"
    with pytest.raises(imaging.MissingFile) as info:
        load_image(missing)
    assert info.value.reason == "missing" and str(info.value).startswith(f"{missing}: ")
    with pytest.raises(imaging.MissingFile, match="directory"):
        read_bytes(tmp_path)
    big = tmp_path / "big.png"
    big.write_bytes(encode(Image.fromarray(NOISE)))
    with pytest.raises(imaging.ImageTooLarge, match="over the cap of 100 bytes") as info:
        load_image(big, max_bytes=100)
    assert info.value.reason == "too_large" and info.value.source == str(big)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(imaging.EmptyImage, match="empty.png: empty file"):
        load_image(empty)


def test_read_bytes_reads_past_the_size_fstat_gave_and_still_caps(tmp_path: Path) -> None:
    """The read buffer is sized from fstat; a source longer than that (a file that grew, a named
    pipe, whose fstat size is 0) is still read whole, and still refused over the cap."""
    import threading

    data = encode(Image.fromarray(NOISE))
    path = tmp_path / "exact.png"
    path.write_bytes(data)
    assert read_bytes(path, max_bytes=len(data)) == data  # a file of exactly the cap is fine
    with pytest.raises(imaging.ImageTooLarge):
        read_bytes(path, max_bytes=len(data) - 1)

    def through_a_pipe(max_bytes: int) -> bytes:
        fifo = tmp_path / f"pipe-{max_bytes}"
        os.mkfifo(fifo)

        def feed() -> None:
            with open(fifo, "wb") as f:
                try:
                    f.write(data)
                except BrokenPipeError:  # the reader stopped at the cap
                    pass

        writer = threading.Thread(target=feed)
        writer.start()
        try:
            return read_bytes(fifo, max_bytes=max_bytes)
        finally:
            writer.join(timeout=10)

    assert through_a_pipe(1 << 20) == data
    with pytest.raises(imaging.ImageTooLarge, match="over the cap of 100 bytes"):
        through_a_pipe(100)


def test_read_bytes_understands_file_uris(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(encode(Image.fromarray(NOISE)))
    assert read_bytes(path.as_uri()) == path.read_bytes()
    with pytest.raises(imaging.MissingFile):
        read_bytes((tmp_path / "b.png").as_uri())
    with pytest.raises(imaging.ImageTooLarge):
        read_bytes(path.as_uri(), max_bytes=10)


# ------------------------------------------------------------------------------ contract


def test_error_classes_reasons_and_pickling() -> None:
    # Only the decoders' own: cxrray.qa adds NotAChestRadiograph once any test module imports it.
    classes = [c for c in ImageError.__subclasses__() if c.__module__ == "cxrray.image_errors"]
    assert len(classes) == len(REASONS)
    assert sorted(c.reason for c in classes) == sorted(REASONS)
    for cls in classes:
        err = cls("s3://bucket/x.png", "something wrong")
        assert isinstance(err, ValueError) and str(err) == "s3://bucket/x.png: something wrong"
        back = pickle.loads(pickle.dumps(err))  # Ray ships exceptions between processes
        assert type(back) is cls and str(back) == str(err) and back.source == err.source


def test_to_uint8_round_trips() -> None:
    np.testing.assert_array_equal(to_uint8(NOISE / np.float32(255)), NOISE)
    np.testing.assert_array_equal(to_uint8(np.array([-0.5, 0.0, 0.5, 1.0, 2.0])), [0, 0, 128, 255, 255])


@pytest.mark.realdata
def test_nih_pngs_decode(shared_data: Path) -> None:
    folder = shared_data / "nih14" / "images"
    if not folder.is_dir():
        pytest.skip(f"../shared/data absent: {folder} not found")
    paths = sorted(folder.glob("*.png"))
    assert len(paths) == 200
    rgba = 0
    for path in paths:
        with Image.open(path) as im:
            rgba += im.mode == "RGBA"
        img = load_image(path)
        assert_unit(img)
        assert img.max() > img.min(), path
    assert rgba == 6
