"""Serve's HTTP plumbing, apart from the model: reading uploads under a byte cap, JSON errors
in one shape, `target` parsing and the per-replica batch statistics. No model, no torch."""
# No `from __future__ import annotations`: FastAPI resolves these annotations at runtime.
import math
import threading
from collections import Counter
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

MiB = 1024 * 1024
# Status per imaging.ImageError.reason: the user's file is at fault (4xx), never the server.
STATUS_BY_REASON = {"too_large": 413, "unsupported": 415, "not_chest_radiograph": 422}
SUPPORTED = ("png", "jpeg", "dicom")
# An oversized body is read and discarded up to this many times the cap before answering 413,
# so an HTTP client that is still sending sees the 413 instead of a reset connection; beyond
# it the connection is dropped with the 413.
DRAIN_FACTOR = 4


def json_safe(obj: Any) -> Any:
    """NaN/inf (e.g. an AUROC undefined for a class without positives) -> None: JSON has no NaN."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy scalar
        return json_safe(obj.item())
    return obj


def error(status: int, message: str, reason: str | None = None) -> JSONResponse:
    body = {"error": message}
    if reason:
        body["reason"] = reason
    return JSONResponse(body, status_code=status)


class UploadError(Exception):
    def __init__(self, status: int, message: str, reason: str):
        super().__init__(message)
        self.status, self.reason = status, reason


async def _drain(request: Request, already: int, limit: int) -> None:
    """Read and discard the rest of an oversized body, up to `limit` bytes in all."""
    seen = already
    try:
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > limit:
                return
    except Exception:  # noqa: BLE001 - the client may hang up; the 413 is the answer either way
        return


async def read_upload(request: Request, cap: int) -> tuple[bytes, list[str], str]:
    """(image bytes, targets from a multipart form, source name) from a raw or multipart body.

    The byte cap is checked twice: on the declared Content-Length before reading anything,
    and on the bytes actually received (a chunked or lying client).
    """
    declared = request.headers.get("content-length")
    too_big = f"upload over the {cap:,}-byte limit"
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise UploadError(400, f"bad Content-Length {declared!r}", "bad_request") from None
        if size > cap:
            if size <= DRAIN_FACTOR * cap:
                await _drain(request, 0, DRAIN_FACTOR * cap)
            raise UploadError(413, f"{too_big} (Content-Length {size:,})", "too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > cap:
            await _drain(request, len(body), DRAIN_FACTOR * cap)
            raise UploadError(413, f"{too_big} (received more than {cap:,} bytes)", "too_large")
    data = bytes(body)
    ctype = request.headers.get("content-type", "").lower()
    if not ctype.startswith("multipart/form-data"):
        return data, [], "<upload>"
    return await _parse_multipart(request, data)


async def _parse_multipart(request: Request, data: bytes) -> tuple[bytes, list[str], str]:
    async def replay() -> dict:  # the body was already consumed: hand it to the form parser
        return {"type": "http.request", "body": data, "more_body": False}

    try:
        form = await Request(request.scope, replay).form()
    except Exception as e:  # noqa: BLE001 - a malformed form is the client's error
        raise UploadError(400, f"unreadable multipart form: {e}", "bad_request") from None
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise UploadError(400, "multipart upload needs the image in a form field named 'file'", "bad_request")
    targets = [str(t) for t in form.getlist("target")]
    payload = await upload.read()
    await form.close()
    return payload, targets, upload.filename or "<upload>"


def parse_targets(values: list[str]) -> list[str]:
    """`target=A&target=B` and `target=A,B` both name two classes; order kept, duplicates dropped."""
    out: list[str] = []
    for v in values:
        for name in v.split(","):
            name = name.strip()
            if name and name not in out:
                out.append(name)
    return out


class BatchStats:
    """Batch sizes seen by one replica, per endpoint: proof that batching batches."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sizes: dict[str, Counter] = {"predict": Counter(), "explain": Counter()}

    def record(self, kind: str, size: int) -> None:
        with self._lock:
            self._sizes[kind][size] += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            out = {}
            for kind, c in self._sizes.items():
                n = sum(c.values())
                reqs = sum(k * v for k, v in c.items())
                out[kind] = {
                    "batches": n,
                    "requests": reqs,
                    "max_batch": max(c) if c else 0,
                    "mean_batch": reqs / n if n else 0.0,
                    "histogram": {str(k): c[k] for k in sorted(c)},
                }
            return out
