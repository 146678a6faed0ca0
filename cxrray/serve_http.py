"""Serve's HTTP plumbing, apart from the model: reading uploads under a byte cap, JSON errors
in one shape, `target` parsing and the per-replica batch statistics. No model, no torch."""
# No `from __future__ import annotations`: FastAPI resolves these annotations at runtime.
import asyncio
import math
import threading
from collections import Counter
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

MiB = 1024 * 1024
# Status per imaging.ImageError.reason: the user's file is at fault (4xx), never the server.
STATUS_BY_REASON = {"too_large": 413, "unsupported": 415, "not_chest_radiograph": 422}
SUPPORTED = ("png", "jpeg", "dicom")
# An oversized body is read and discarded up to this many times the cap before answering 413,
# so an HTTP client that is still sending sees the 413 instead of a reset connection; beyond
# it the connection is dropped with the 413.
DRAIN_FACTOR = 4
# What every upload is called inside the server (error details, logs): a client's file name
# can be a patient's name or ID, and logs are no place for it. The client knows its own file.
UPLOAD = "<upload>"


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


def error(status: int, message: str, reason: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": message}
    if reason:
        body["reason"] = reason
    return JSONResponse(body, status_code=status, headers=headers)


class UploadError(Exception):
    def __init__(self, status: int, message: str, reason: str):
        super().__init__(message)
        self.status, self.reason = status, reason


async def _drain(request: Request, already: int, limit: int, idle_timeout_s: float) -> None:
    """Read and discard the rest of an oversized body, up to `limit` bytes in all."""
    seen = already
    try:
        async for chunk in _chunks(request, idle_timeout_s):
            seen += len(chunk)
            if seen > limit:
                return
    except (UploadError, RuntimeError):  # stalled, gone, or the body was complete: the 413 is the answer
        return


async def _chunks(request: Request, idle_timeout_s: float):
    """The body's chunks; UploadError 408 when none comes for idle_timeout_s, 400 on a hang-up.

    A request holds one of its replica's max_ongoing_requests slots from its headers on, so a
    client that sends headers and then stalls blocks a slot: 64 of them froze a 2-replica
    service, /healthz included, until Serve's own 60-s request timeout.
    """
    stream = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), idle_timeout_s)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise UploadError(408, f"the upload stalled: no data for {idle_timeout_s:g} s", "timeout") from None
        except ClientDisconnect:
            raise UploadError(400, "the client disconnected during the upload", "bad_request") from None
        yield chunk


async def read_upload(request: Request, cap: int, idle_timeout_s: float = 15.0) -> tuple[bytes, list[str]]:
    """(image bytes, targets from a multipart form) from a raw or multipart body.

    The byte cap is checked twice: on the declared Content-Length before reading anything,
    and on the bytes actually received (a chunked or lying client). A body that stops arriving
    for idle_timeout_s is a 408.
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
                await _drain(request, 0, DRAIN_FACTOR * cap, idle_timeout_s)
            raise UploadError(413, f"{too_big} (Content-Length {size:,})", "too_large")
    body = bytearray()
    async for chunk in _chunks(request, idle_timeout_s):
        body += chunk
        if len(body) > cap:
            await _drain(request, len(body), DRAIN_FACTOR * cap, idle_timeout_s)
            raise UploadError(413, f"{too_big} (received more than {cap:,} bytes)", "too_large")
    data = bytes(body)
    ctype = request.headers.get("content-type", "").lower()
    if not ctype.startswith("multipart/form-data"):
        return data, []
    return await _parse_multipart(request, data)


async def _parse_multipart(request: Request, data: bytes) -> tuple[bytes, list[str]]:
    async def replay() -> dict:  # the body was already consumed: hand it to the form parser
        return {"type": "http.request", "body": data, "more_body": False}

    try:
        form = await Request(request.scope, replay).form()
    except Exception as e:  # noqa: BLE001 - a malformed form is the client's error
        raise UploadError(400, f"unreadable multipart form: {e}", "bad_request") from None
    try:
        files = form.getlist("file")
        if not files:
            raise UploadError(400, "multipart upload needs the image in a form field named 'file'", "bad_request")
        if len(files) > 1:
            raise UploadError(400, f"one image per request: the form has {len(files)} 'file' fields", "bad_request")
        if isinstance(files[0], str):  # a part without a filename is a text field to the parser
            raise UploadError(400, "the form field 'file' is text, not a file: send it as a file part "
                                   "(with a filename, as curl -F file=@x.png does)", "bad_request")
        return await files[0].read(), [str(t) for t in form.getlist("target")]
    finally:
        await form.close()


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
