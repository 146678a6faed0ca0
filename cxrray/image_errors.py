"""What can be wrong with an image file, as typed errors, and the size caps every decoder checks.

Every failure is an `ImageError` subclass with a short `reason` code (`missing`, `empty`,
`truncated`, `corrupt`, `not_an_image`, `unsupported`, `too_large`) and a message
`"<source>: <what is wrong>"`, so batch scoring can write an error row and the HTTP server
can pick a status code without parsing text. Sizes are checked from the header before any
pixel is decoded. `cxrray.imaging` re-exports all of it; no import beyond the standard library.
"""
from __future__ import annotations

from typing import Any, ClassVar

DEFAULT_MAX_PIXELS: int = 40_000_000  # decompression-bomb cap on width * height
DEFAULT_MAX_BYTES: int = 128 * 1024 * 1024
REASONS: tuple[str, ...] = (
    "missing", "empty", "truncated", "corrupt", "not_an_image", "unsupported", "too_large",
)


class ImageError(ValueError):
    """An image that cannot be decoded; `reason` is a short machine code, str() says why.

    A subclass names its code in the class line, `class X(ImageError, reason="..."):`, or as a
    class attribute `reason = "..."` (as cxrray.qa does).
    """

    reason: ClassVar[str]

    def __init_subclass__(cls, reason: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if reason is not None:
            cls.reason = reason

    def __init__(self, source: str, detail: str) -> None:
        detail = " ".join(detail.split())  # one line: it ends up in CSV error rows and logs
        super().__init__(f"{source}: {detail}")
        self.source = source
        self.detail = detail

    def __reduce__(self) -> tuple[type[ImageError], tuple[str, str]]:
        # Ray pickles exceptions between processes; the default reduce would call
        # __init__(message) with one argument and fail on the other side.
        return (type(self), (self.source, self.detail))


class MissingFile(ImageError, reason="missing"):
    """No file at the path or URI, a directory, or a file this process may not read."""


class EmptyImage(ImageError, reason="empty"):
    """A file of zero bytes."""


class TruncatedImage(ImageError, reason="truncated"):
    """Cut short: a PNG without its IEND chunk, a JPEG without its end-of-image marker, a DICOM
    whose pixel data ends early."""


class CorruptImage(ImageError, reason="corrupt"):
    """The format is known, but its decoder rejects the bytes."""


class NotAnImage(ImageError, reason="not_an_image"):
    """Not a picture at all: text, a PDF, an archive, a DICOM object without pixel data."""


class UnsupportedFormat(ImageError, reason="unsupported"):
    """A picture in a format cxrray does not read (GIF, TIFF, WebP, ...), or a DICOM transfer
    syntax whose decoder plugin is not installed."""


class ImageTooLarge(ImageError, reason="too_large"):
    """Over the byte cap (file size) or the pixel cap (width x height from the header)."""


def check_bytes(source: str, size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise ImageTooLarge(source, f"file is {size:,} bytes, over the cap of {max_bytes:,} bytes")


def check_pixels(source: str, kind: str, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageTooLarge(
            source,
            f"{kind} declares {width:,}x{height:,} = {width * height:,} pixels, "
            f"over the cap of {max_pixels:,}",
        )
