"""Which format a file is, from its magic bytes only, never from its name.

PNG, JPEG and DICOM are decoded; other pictures (GIF, TIFF, JPEG 2000, WebP, ...) are named so
the error can say what was sent, and documents and archives are told apart from pictures.
DICOM is recognised with its 128-byte preamble and "DICM", or, for files written without
them, by the first data elements parsing as DICOM (`bare_dicom_start`).
"""
from __future__ import annotations

import struct

from cxrray.image_errors import EmptyImage, NotAnImage, TruncatedImage, UnsupportedFormat

SUPPORTED_FORMATS: tuple[str, ...] = ("png", "jpeg", "dicom")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, PNG_SIGNATURE, "png"),
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


def require_supported(data: bytes, source: str) -> str:
    """Return the format of `data`, or raise the error that says why it cannot be decoded."""
    if not data:
        raise EmptyImage(source, "empty file (0 bytes)")
    fmt = sniff_format(data)
    if fmt in SUPPORTED_FORMATS:
        return fmt
    if fmt is None and len(data) < len(PNG_SIGNATURE) and PNG_SIGNATURE.startswith(data):
        raise TruncatedImage(source, f"truncated PNG (read {len(data)} of the 8 signature bytes)")
    if fmt in _NOT_IMAGES:
        raise NotAnImage(source, _NOT_IMAGES[fmt])
    if fmt is not None:
        raise UnsupportedFormat(source, f"{fmt.upper()} image; supported formats: png, jpeg, dicom")
    # What the file looks like, never what it says: its first bytes may be a patient's name (a
    # DICOM data set that starts at group 0010, a CSV of patients), and this message reaches
    # error rows, logs and HTTP answers.
    head = data[:64]
    kind = "text" if all(32 <= b < 127 or b in b"\t\r\n" for b in head) else "binary data"
    raise NotAnImage(source, f"not a PNG, JPEG or DICOM file ({len(data):,} bytes of {kind} "
                             "with no image signature)")
