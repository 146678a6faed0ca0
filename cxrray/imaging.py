"""Decode chest X-ray bytes (PNG, JPEG, DICOM) to one float32 channel in [0, 1], shape (H, W).

Every failure is an `ImageError` subclass with a short `reason` code (`missing`, `empty`,
`truncated`, `corrupt`, `not_an_image`, `unsupported`, `too_large`) and a message
`"<source>: <what is wrong>"`, so batch scoring can write an error row and the HTTP server
can pick a status code without parsing text. The format comes from magic bytes only, never
from the file name. Sizes are checked from the header before any pixel is decoded.
DICOM (with or without the 128-byte preamble) is decoded by `cxrray.dicom`.

`decode_bytes`/`load_image` return the array; `decode_bytes_info`/`load_image_info` return a
`DecodedImage` that also carries warnings (e.g. `multi_frame`) and the DICOM identity.
`decode_native` is the fast path behind the model input (`transforms.decode_resized`): 8-bit
pictures stay 8-bit ("L"), JPEG is reduced in the DCT domain; only 16-bit and DICOM become float.

Pure: numpy, Pillow and pydicom (pyarrow, lazily, for URIs). No Ray, no torch.
"""
from __future__ import annotations

import io
import logging
import os
import struct
import zlib
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
from PIL import Image, ImageFile, JpegImagePlugin, PngImagePlugin

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS: int = 40_000_000  # decompression-bomb cap on width * height
DEFAULT_MAX_BYTES: int = 128 * 1024 * 1024
SUPPORTED_FORMATS: tuple[str, ...] = ("png", "jpeg", "dicom")
REASONS: tuple[str, ...] = (
    "missing", "empty", "truncated", "corrupt", "not_an_image", "unsupported", "too_large",
)


class ImageError(ValueError):
    """An image that cannot be decoded; `reason` is a short machine code, str() says why."""

    reason: ClassVar[str]

    def __init__(self, source: str, detail: str) -> None:
        detail = " ".join(detail.split())  # one line: it ends up in CSV error rows and logs
        super().__init__(f"{source}: {detail}")
        self.source = source
        self.detail = detail

    def __reduce__(self) -> tuple[type[ImageError], tuple[str, str]]:
        # Ray pickles exceptions between processes; the default reduce would call
        # __init__(message) with one argument and fail on the other side.
        return (type(self), (self.source, self.detail))


class MissingFile(ImageError):
    reason = "missing"


class EmptyImage(ImageError):
    reason = "empty"


class TruncatedImage(ImageError):
    reason = "truncated"


class CorruptImage(ImageError):
    reason = "corrupt"


class NotAnImage(ImageError):
    reason = "not_an_image"


class UnsupportedFormat(ImageError):
    reason = "unsupported"


class ImageTooLarge(ImageError):
    reason = "too_large"


# ---------------------------------------------------------------------------- sniffing

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, _PNG_SIGNATURE, "png"),
    (0, b"\xff\xd8\xff", "jpeg"),
    (128, b"DICM", "dicom"),  # after the 128-byte preamble; preamble-less: see bare_dicom_start
    (0, b"GIF87a", "gif"),
    (0, b"GIF89a", "gif"),
    (0, b"II*\x00", "tiff"),
    (0, b"MM\x00*", "tiff"),
    (0, b"II+\x00", "tiff"),  # BigTIFF
    (0, b"MM\x00+", "tiff"),
    (0, b"\x00\x00\x00\x0cjP  \r\n\x87\n", "jpeg2000"),
    (0, b"\xffO\xffQ", "jpeg2000"),  # bare codestream
    (0, b"\x00\x00\x00\x0cJXL \r\n\x87\n", "jpegxl"),
    (0, b"8BPS", "psd"),
    (0, b"%PDF-", "pdf"),
    (0, b"PK\x03\x04", "zip"),
    (0, b"PK\x05\x06", "zip"),  # empty archive
    (0, b"\x1f\x8b", "gzip"),
)
_FTYP_BRANDS = {b"avif": "avif", b"avis": "avif", b"heic": "heif", b"heix": "heif", b"mif1": "heif"}
_NOT_IMAGES = {
    "pdf": "a PDF document, not an image",
    "zip": "a ZIP archive, not an image (extract it first)",
    "gzip": "a gzip stream, not an image (decompress it first)",
}


def sniff_format(data: bytes) -> str | None:
    """Name the format from magic bytes: a SUPPORTED_FORMATS entry, a known other format, or None."""
    for offset, magic, name in _SIGNATURES:
        if data[offset : offset + len(magic)] == magic:
            return name
    # Two-byte "BM" alone would match plenty of text; BMP's reserved header bytes are zero.
    if data[:2] == b"BM" and len(data) >= 14 and data[6:10] == b"\x00\x00\x00\x00":
        return "bmp"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[4:8] == b"ftyp":
        return _FTYP_BRANDS.get(data[8:12])
    if bare_dicom_start(data) is not None:
        return "dicom"
    return None


_EXPLICIT_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())  # 2 reserved bytes, 4-byte length


def bare_dicom_start(data: bytes) -> int | None:
    """Offset (0, or 1 after one stray byte) of a DICOM data set written without preamble, or None.

    The first three elements must parse, in ascending tag order, starting in group 0002 (file
    meta) or 0008 (identification, where every data set starts), as implicit VR little endian
    or explicit VR in either byte order. Text never starts with such bytes, and noise rarely does.
    """
    for start in (0, 1):
        for endian in "<>":
            if _elements_parse(data, start, endian):
                return start
    return None


def _elements_parse(data: bytes, pos: int, endian: str, want: int = 3) -> bool:
    prev = -1
    for n in range(want):
        if pos + 8 > len(data):
            return n > 0 and pos == len(data)  # a tiny but complete data set
        group, elem = struct.unpack_from(endian + "HH", data, pos)
        tag = group << 16 | elem
        if tag <= prev or (n == 0 and group not in (0x0002, 0x0008)):
            return False
        vr = data[pos + 4 : pos + 6]
        if vr in _LONG_VRS and data[pos + 6 : pos + 8] == b"\x00\x00" and pos + 12 <= len(data):
            (length,), header = struct.unpack_from(endian + "I", data, pos + 8), 12
        elif vr in _EXPLICIT_VRS:
            (length,), header = struct.unpack_from(endian + "H", data, pos + 6), 8
        elif endian == "<":  # implicit VR exists only in little endian
            (length,), header = struct.unpack_from("<I", data, pos + 4), 8
        else:
            return False
        if length == 0xFFFFFFFF:  # undefined-length sequence: cannot skip it, but it parsed
            return n > 0
        pos += header + length
        prev = tag
    return True


def _require_supported(data: bytes, source: str) -> str:
    """Return the format of `data`, or raise the error that says why it cannot be decoded."""
    if not data:
        raise EmptyImage(source, "empty file (0 bytes)")
    fmt = sniff_format(data)
    if fmt in SUPPORTED_FORMATS:
        return fmt
    if fmt is None and len(data) < len(_PNG_SIGNATURE) and _PNG_SIGNATURE.startswith(data):
        raise TruncatedImage(source, f"truncated PNG (read {len(data)} of the 8 signature bytes)")
    if fmt in _NOT_IMAGES:
        raise NotAnImage(source, _NOT_IMAGES[fmt])
    if fmt is not None:
        raise UnsupportedFormat(source, f"{fmt.upper()} image; supported formats: png, jpeg, dicom")
    raise NotAnImage(source, f"not a PNG, JPEG or DICOM file (starts with {data[:24]!r})")


# ---------------------------------------------------------------------------- public API


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
    fmt = _require_supported(data, source)
    if fmt == "dicom":
        from cxrray.dicom import decode_dicom  # here: cxrray.dicom imports this module

        return decode_dicom(data, source, max_pixels)
    return DecodedImage(pixels=_decode_pil(data, fmt, source, max_pixels), format=fmt)


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
            _check_bytes(path, os.fstat(f.fileno()).st_size, max_bytes)
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise MissingFile(path, "no such file") from None
    except IsADirectoryError:
        raise MissingFile(path, "is a directory, not an image file") from None
    except PermissionError:
        raise MissingFile(path, "cannot read the file (permission denied)") from None
    _check_bytes(path, len(data), max_bytes)  # the file may have grown since fstat
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
    fmt = _require_supported(data, source)
    if fmt == "dicom":
        from cxrray.dicom import decode_dicom

        info = decode_dicom(data, source, max_pixels)
        return native_from_unit(info.pixels), info
    im, shape = _open_pil(data, fmt, source, max_pixels, min_side)
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


def narrow_16bit(u16: np.ndarray) -> Image.Image:
    """16-bit samples -> "L" if all are multiples of 257 (8-bit values widened), else "F" of v / 65535
    (the float decode's own values, so native_from_unit of those gives this same image)."""
    if not np.any(u16 % np.uint16(257)):
        return Image.fromarray((u16 // np.uint16(257)).astype(np.uint8))
    return Image.fromarray(np.divide(u16, 65535, dtype=np.float32), mode="F")


def to_uint8(img: np.ndarray) -> np.ndarray:
    """[0, 1] float image -> uint8 (rounded, values outside [0, 1] clipped), for shards/overlays."""
    return np.rint(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


# ---------------------------------------------------------------------------- reading


def _check_bytes(source: str, size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise ImageTooLarge(source, f"file is {size:,} bytes, over the cap of {max_bytes:,} bytes")


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
    _check_bytes(uri, info.size, max_bytes)
    with fs.open_input_stream(path) as f:
        data = f.read(max_bytes + 1)
    _check_bytes(uri, len(data), max_bytes)
    return data


def _check_pixels(source: str, kind: str, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageTooLarge(
            source,
            f"{kind} declares {width:,}x{height:,} = {width * height:,} pixels, "
            f"over the cap of {max_pixels:,}",
        )


# ---------------------------------------------------------------------------- PNG / JPEG

# The plugin classes parse only the header. Image.open would also run PIL's global
# MAX_IMAGE_PIXELS check (a warning, then DecompressionBombError); our per-call cap replaces it.
_PIL_OPENERS = {"png": PngImagePlugin.PngImageFile, "jpeg": JpegImagePlugin.JpegImageFile}
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def _decode_pil(data: bytes, fmt: str, source: str, max_pixels: int) -> np.ndarray:
    return _pil_to_unit(_open_pil(data, fmt, source, max_pixels, None, native=False)[0])


def _open_pil(data: bytes, fmt: str, source: str, max_pixels: int, min_side: int | None,
              native: bool = True) -> tuple[Image.Image, tuple[int, int]]:
    """Open, check and load; native: also reduce a JPEG (draft) and bring the mode to L / F."""
    try:
        im = _PIL_OPENERS[fmt](io.BytesIO(data))
        _check_pixels(source, fmt.upper(), im.width, im.height, max_pixels)
        shape = (im.height, im.width)
        # PIL would return a half-decoded image if someone set this process-wide flag;
        # we do not reset their setting, but we refuse to hand back a partial image.
        if ImageFile.LOAD_TRUNCATED_IMAGES and (cut := _pil_truncation(data, fmt)):
            raise TruncatedImage(source, cut)
        if native and fmt == "jpeg":
            # DCT-domain scaling, and libjpeg's own YCbCr -> luma (no chroma upsampling).
            im.draft("L", (min_side, min_side) if min_side else im.size)
        im.load()
        return (_native_mode(im) if native else im), shape
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(source, str(e)) from e
    except _PIL_ERRORS as e:
        cut = _pil_truncation(data, fmt)
        if cut is None and "truncated" in str(e).lower():
            cut = f"truncated {fmt.upper()} ({e})"
        if cut is not None:
            raise TruncatedImage(source, cut) from e
        raise CorruptImage(source, f"corrupt {fmt.upper()} ({e})") from e


def _native_mode(im: Image.Image) -> Image.Image:
    """L stays L; 16-bit samples (I;16*, or I from older writers) -> narrow_16bit; others -> L."""
    if im.mode == "L":
        return im
    if im.mode in _SIXTEEN_BIT_MODES:
        return narrow_16bit(np.asarray(im).astype(np.uint16, copy=False))
    if im.mode == "I":
        return narrow_16bit(np.clip(np.asarray(im), 0, 65535).astype(np.uint16))
    return im.convert("L")  # ITU-R 601-2 luma, as _pil_to_unit


def _pil_to_unit(im: Image.Image) -> np.ndarray:
    # Fixed scaling by bit depth, not per-image min-max, so a value means the same in every image.
    if im.mode in _SIXTEEN_BIT_MODES:
        return np.divide(np.asarray(im), 65535, dtype=np.float32)
    if im.mode == "I":  # 32-bit container for 16-bit samples from older writers
        out = np.divide(np.asarray(im), 65535, dtype=np.float32)
        return np.clip(out, 0.0, 1.0, out=out)
    if im.mode != "L":
        # ITU-R 601-2 luma in C; drops alpha (NIH's RGBA PNGs are opaque) and resolves palettes.
        im = im.convert("L")
    return np.divide(np.asarray(im), 255, dtype=np.float32)


def _pil_truncation(data: bytes, fmt: str) -> str | None:
    """Say how `data` is cut short, or None if its structure looks complete (or is garbage)."""
    if fmt == "jpeg":
        if data.rstrip(b"\x00").endswith(b"\xff\xd9"):
            return None
        return f"truncated JPEG (read {len(data):,} bytes; no end-of-image marker)"
    return _png_truncation(data)


def _png_truncation(data: bytes) -> str | None:
    pos = len(_PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, ctype = struct.unpack_from(">I4s", data, pos)
        if length > 2**31 - 1 or not ctype.isalpha():
            return None  # a garbage chunk header is corruption, not truncation
        if ctype == b"IEND":
            return None
        end = pos + 12 + length  # length, type, data, CRC
        if end > len(data):
            return (
                f"truncated PNG (read {len(data):,} of at least {end:,} bytes; "
                f"{ctype.decode('ascii')} chunk cut short)"
            )
        pos = end
    return f"truncated PNG (read {len(data):,} bytes; no IEND chunk)"
