"""Quiet mode for what native code writes straight to file descriptor 2, past Python.

Ray's core worker (C++) in the driver prints its ERROR-level lines to fd 2 as well as to its
log file (`python-core-driver-*.log`), and no setting lowers only that copy: the stderr sink's
level is fixed, and RAY_BACKEND_LOG_LEVEL would take the file's lines too. One such line comes
with every Ray Data actor pool (scoring, evaluation), once per process:

    [... E ...] core_worker.cc:2465: Actor with class name: 'MapWorker(MapBatches(...))' ... has
    constructor arguments in the object store and max_restarts > 0 ...

It warns about ray-project/ray#53727: an actor's restart fails if its arguments are lost. Ray
Data passes its context and transform by reference, owned by the driver, so they are lost only
with the driver, and then the job is lost anyway (a rerun resumes from the committed parts);
keeping Ray Data's actor restarts is worth more than the line. It needs no action from a cxrray
user, so quiet mode drops it from the console; the log file keeps it.

`filtered_native_stderr()` points fd 2 at a pipe whose reader forwards every line but the
known ones to the real stderr. Python's `sys.stderr` is moved onto a duplicate of the real
stream first, so cxrray's own lines, tracebacks and tqdm bars never pass through the pipe (a
terminal stays a terminal). Ray's own processes do not inherit the pipe: Ray gives each its own
stdout and stderr.
"""
from __future__ import annotations

import os
import re
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

# Lines from native code that need no action from a cxrray user (see the module docstring).
EXPECTED_NATIVE_LINE = re.compile(
    rb"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store"
)


def _forward(read_fd: int, write_fd: int) -> None:
    """Copy `read_fd` to `write_fd` line by line, dropping EXPECTED_NATIVE_LINE lines, until EOF.
    A partial line is forwarded at once unless it may be the start of a Ray log line ("[..."),
    so native output without newlines (a progress meter) is not held back."""
    pending = b""
    while True:
        try:
            chunk = os.read(read_fd, 65536)
        except OSError:
            chunk = b""
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        out = b"".join(line + b"\n" for line in lines if not EXPECTED_NATIVE_LINE.search(line))
        if pending and not pending.startswith(b"["):
            out, pending = out + pending, b""
        if out:
            _write_all(write_fd, out)
    if pending and not EXPECTED_NATIVE_LINE.search(pending):
        _write_all(write_fd, pending)


def _write_all(fd: int, data: bytes) -> None:
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError:  # the real stderr is gone (closed terminal): nothing left to tell
        pass


@contextmanager
def filtered_native_stderr(enabled: bool = True) -> Iterator[None]:
    """Within the block, native writes to fd 2 go through the line filter; on exit fd 2 is the
    real stderr again and everything written has been forwarded."""
    if not enabled:
        yield
        return
    try:
        sys.stderr.flush()
        real = os.dup(2)
    except (OSError, ValueError):  # no usable fd 2 (a closed or detached stderr)
        yield
        return
    python_stderr = sys.stderr
    moved = None
    try:
        # Only a stream that is fd 2 itself moves; a test's capture object or a file stays.
        if python_stderr.fileno() == 2:
            moved = os.fdopen(os.dup(real), "w", buffering=1, encoding=python_stderr.encoding,
                              errors=python_stderr.errors)
    except (AttributeError, OSError, ValueError):
        moved = None
    read_fd, write_fd = os.pipe()
    reader = threading.Thread(target=_forward, args=(read_fd, real), name="cxrray-native-stderr", daemon=True)
    reader.start()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    if moved is not None:
        sys.stderr = moved
    try:
        yield
    finally:
        if moved is not None:
            moved.flush()
            sys.stderr = python_stderr
            moved.close()
        os.dup2(real, 2)  # closes the pipe's last write end: the reader drains it and stops
        reader.join(timeout=5)
        os.close(read_fd)
        os.close(real)
