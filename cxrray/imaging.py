"""Decode chest X-ray bytes (PNG, JPEG, DICOM) to one float32 channel in [0, 1], shape (H, W).

The entry points. Every failure is an `ImageError` subclass with a short `reason` code and a
message `"<source>: <what is wrong>"` (`cxrray.image_errors`, re-exported here). The format
comes from magic bytes only, never from the file name (`cxrray.image_format`). Sizes are
checked from the header before any pixel is decoded. PNG and JPEG are decoded by
`cxrray.image_pil`; DICOM (with or without the 128-byte preamble) by `cxrray.dicom`.

`decode_bytes`/`load_image` return the array; `decode_bytes_info`/`load_image_info` return a
`DecodedImage` that also carries warnings (e.g. `multi_frame`) and the DICOM identity.
`decode_native` is the fast path behind the model input (`transforms.decode_resized`): 8-bit
pictures stay 8-bit ("L"), JPEG is reduced in the DCT domain; only 16-bit and DICOM become float.

Pure: numpy, Pillow and pydicom (pyarrow, lazily, for URIs). No Ray, no torch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from cxrray.image_errors import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    REASONS,
    CorruptImage,
    EmptyImage,
    ImageError,
    ImageTooLarge,
    MissingFile,
    NotAnImage,
    TruncatedImage,
    UnsupportedFormat,
    check_bytes,
    check_pixels,
)
from cxrray.image_format import SUPPORTED_FORMATS, bare_dicom_start, require_supported, sniff_format
from cxrray.image_pil import decode_pil, narrow_16bit, open_pil

# What callers import from here: the errors, caps and sniffing live in their own modules.
# _check_pixels: the name cxrray.dicom imports it under.
__all__ = [
    "DEFAULT_MAX_BYTES", "DEFAULT_MAX_PIXELS", "REASONS", "SUPPORTED_FORMATS", "CorruptImage", "DecodedImage",
    "EmptyImage", "ImageError", "ImageTooLarge", "MissingFile", "NotAnImage", "TruncatedImage",
    "UnsupportedFormat", "bare_dicom_start", "decode_bytes", "decode_bytes_info", "decode_native", "header_only",
    "load_image", "load_image_info", "narrow_16bit", "native_from_unit", "read_bytes", "sniff_format", "to_uint8",
]
_check_pixels = check_pixels


@dataclass(frozen=True)
class DecodedImage:
    """A decoded image and what a caller may want to record about it.

    `warnings` holds codes from `cxrray.dicom.WARNINGS` (`multi_frame`, `window_missing`, ...);
    `dicom` the DICOM identity (`cxrray.dicom.IDENTITY_KEYWORDS`: study/series/SOP instance UIDs,
    Modality, ViewPosition, BodyPartExamined, PhotometricInterpretation, TransferSyntaxUID), empty
    for PNG/JPEG. No patient attribute (name, ID, birth date) is ever read into it.
    """

    pixels: np.ndarray  # float32 (H, W) in [0, 1]; header-only placeholder from decode_native
    format: str  # "png", "jpeg" or "dicom"
    warnings: list[str] = field(default_factory=list)
    dicom: dict[str, str] = field(default_factory=dict)
    frames: int = 1  # frames in the file; only the first is decoded
    shape: tuple[int, ...] = ()  # (H, W) of the image in the file, whatever was decoded

    def __post_init__(self) -> None:
        if not self.shape:
            object.__setattr__(self, "shape", tuple(int(n) for n in self.pixels.shape[:2]))


def header_only(shape: tuple[int, int]) -> np.ndarray:
    """A zero-byte, read-only float32 array of `shape`: DecodedImage.pixels for decoders that never
    build the full-resolution float picture, so code reading `pixels.shape` (qa.assess) still
    sees the file's own size."""
    return np.broadcast_to(np.zeros((), np.float32), tuple(shape))


def decode_bytes(
    data: bytes, *, source: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode PNG/JPEG/DICOM bytes to a float32 (H, W) array in [0, 1]; raise ImageError."""
    return decode_bytes_info(data, source=source, max_pixels=max_pixels).pixels


def decode_bytes_info(
    data: bytes, *, source: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS
) -> DecodedImage:
    """decode_bytes, returning the pixels with their warnings and DICOM identity."""
    if not isinstance(data, bytes):
        data = bytes(data)  # bytearray / memoryview from callers; slicing below needs bytes
    fmt = require_supported(data, source)
    if fmt == "dicom":
        from cxrray.dicom import decode_dicom  # here: cxrray.dicom imports this module

        return decode_dicom(data, source, max_pixels)
    return DecodedImage(pixels=decode_pil(data, fmt, source, max_pixels), format=fmt)


def _read_sized(f, size: int, max_bytes: int) -> bytes:
    """A stream's bytes, read into a buffer of the size its file said it has, and past it (up to
    one byte over the cap) when it turns out longer: a pipe, a file that grew.

    Python's and pyarrow's read(n) both allocate n bytes: read(max_bytes + 1) allocated and gave
    back the whole 128 MiB cap for every file, 32 of a Kermany JPEG's ~200 us of decode."""
    data = f.read(size + 1)
    if len(data) > size:
        data += f.read(max_bytes + 1 - len(data))
    return data


def read_bytes(path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """Read a local path or a pyarrow-understood URI (s3://, file://, ...), refusing big files.

    Missing files raise MissingFile; network or credential failures on URIs propagate as
    OSError, since they are not a property of the file and should stop a batch job.
    """
    path = os.fspath(path)
    if "://" in path:
        return _read_uri(path, max_bytes)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            check_bytes(path, size, max_bytes)
            data = _read_sized(f, size, max_bytes)
    except FileNotFoundError:
        raise MissingFile(path, "no such file") from None
    except IsADirectoryError:
        raise MissingFile(path, "is a directory, not an image file") from None
    except PermissionError:
        raise MissingFile(path, "cannot read the file (permission denied)") from None
    check_bytes(path, len(data), max_bytes)  # the file may have grown since fstat
    return data


def _read_uri(uri: str, max_bytes: int) -> bytes:
    # Imported here: pyarrow takes a noticeable time to import and local paths never need it.
    import pyarrow.fs as pafs

    from cxrray import storage

    try:
        # storage caches one filesystem per bucket: building one per image costs a round trip.
        fs, path = storage.filesystem(uri)
    except storage.StorageError as e:
        raise MissingFile(uri, str(e)) from e
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise MissingFile(uri, "no such file")
    if info.type != pafs.FileType.File:
        raise MissingFile(uri, "is a directory, not an image file")
    check_bytes(uri, info.size, max_bytes)
    with fs.open_input_stream(path) as f:
        data = _read_sized(f, info.size, max_bytes)
    check_bytes(uri, len(data), max_bytes)
    return data


def load_image(
    path: str | os.PathLike[str],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> np.ndarray:
    """read_bytes + decode_bytes, with errors naming `path`."""
    return load_image_info(path, max_pixels=max_pixels, max_bytes=max_bytes).pixels


def load_image_info(
    path: str | os.PathLike[str],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> DecodedImage:
    """read_bytes + decode_bytes_info, with errors naming `path`."""
    data = read_bytes(path, max_bytes=max_bytes)
    return decode_bytes_info(data, source=os.fspath(path), max_pixels=max_pixels)


def decode_native(
    data: bytes, *, source: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int | None = None
) -> tuple[Image.Image, DecodedImage]:
    """Decode to a PIL image ready to resize: "L" for 8-bit pictures, "F" for 16-bit ones and
    for DICOM after its LUTs (see native_from_unit), plus the DecodedImage metadata (its `pixels` is `header_only`, its `shape` the file's own size).

    min_side: a JPEG is reduced in the DCT domain (Image.draft: 1/2, 1/4, 1/8) to the smallest
    scale whose sides are all >= min_side, and decodes luma only; PNG and DICOM decode at full
    size. DICOM goes through its Modality/VOI LUTs first (cxrray.dicom). Same checks and errors as decode_bytes_info.
    """
    if not isinstance(data, bytes):
        data = bytes(data)
    fmt = require_supported(data, source)
    if fmt == "dicom":
        from cxrray.dicom import decode_dicom

        info = decode_dicom(data, source, max_pixels)
        return native_from_unit(info.pixels), info
    im, shape = open_pil(data, fmt, source, max_pixels, min_side)
    return im, DecodedImage(pixels=header_only(shape), format=fmt, shape=shape)


def native_from_unit(img: np.ndarray) -> Image.Image:
    """A [0, 1] float image as the image to resize: "L" when every value is k/255 (an 8-bit
    source, exactly), otherwise "F" (float32; 16-bit and windowed DICOM values kept as they are).

    Both decoders (decode_native and the float decode_bytes) end here or in narrow_16bit with
    the same answer for the same values, so an image's model input depends only on its values,
    never on which decoder produced them.
    """
    x = np.asarray(img, dtype=np.float32)
    if _is_8bit(x):
        return Image.fromarray(np.rint(x * np.float32(255)).astype(np.uint8))
    # No clip: decoders give [0, 1] already, and the uint8 rounding after the resize clips anyway.
    return Image.fromarray(np.ascontiguousarray(x), mode="F")


def _is_8bit(x: np.ndarray) -> bool:
    def exact(v: np.ndarray) -> bool:
        return bool(np.array_equal(np.divide(np.rint(v * np.float32(255)), 255, dtype=np.float32), v))

    flat = x.reshape(-1)
    # A strided sample first: a windowed DICOM or 16-bit image fails it at once (no full passes).
    return exact(flat[:: max(1, flat.size // 4096)]) and exact(flat)


def to_uint8(img: np.ndarray) -> np.ndarray:
    """[0, 1] float image -> uint8 (rounded, values outside [0, 1] clipped), for shards/overlays."""
    return np.rint(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)
