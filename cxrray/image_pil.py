"""PNG and JPEG through Pillow, with cxrray's checks and errors.

The pixel cap is checked from the header before any pixel is decoded; a truncated file is
named as such even where Pillow would hand back a half-decoded image; every Pillow failure
becomes an `ImageError`. Two outputs: `decode_pil`, float32 in [0, 1] scaled by bit depth
(the float decode), and `open_pil`, the native image ("L" for 8-bit pictures, "F" or "L" for
16-bit ones through narrow_16bit; a JPEG reduced in the DCT domain) that the model input is
resized from.
"""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image, ImageFile, JpegImagePlugin, PngImagePlugin

from cxrray.image_errors import CorruptImage, ImageError, ImageTooLarge, TruncatedImage, check_pixels
from cxrray.image_format import PNG_SIGNATURE

# The plugin classes parse only the header. Image.open would also run PIL's global
# MAX_IMAGE_PIXELS check (a warning, then DecompressionBombError); our per-call cap replaces it.
_PIL_OPENERS = {"png": PngImagePlugin.PngImageFile, "jpeg": JpegImagePlugin.JpegImageFile}
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def decode_pil(data: bytes, fmt: str, source: str, max_pixels: int) -> np.ndarray:
    """PNG/JPEG bytes -> float32 (H, W) in [0, 1] at full resolution."""
    return _pil_to_unit(open_pil(data, fmt, source, max_pixels, None, native=False)[0])


def open_pil(data: bytes, fmt: str, source: str, max_pixels: int, min_side: int | None,
             native: bool = True) -> tuple[Image.Image, tuple[int, int]]:
    """Open, check and load; native: also reduce a JPEG (draft) and bring the mode to L / F."""
    try:
        im = _PIL_OPENERS[fmt](io.BytesIO(data))
        check_pixels(source, fmt.upper(), im.width, im.height, max_pixels)
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


def narrow_16bit(u16: np.ndarray) -> Image.Image:
    """16-bit samples -> "L" if all are multiples of 257 (8-bit values widened), else "F" of v / 65535
    (the float decode's own values, so imaging.native_from_unit of those gives this same image)."""
    if not np.any(u16 % np.uint16(257)):
        return Image.fromarray((u16 // np.uint16(257)).astype(np.uint8))
    return Image.fromarray(np.divide(u16, 65535, dtype=np.float32), mode="F")


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
    pos = len(PNG_SIGNATURE)
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
