"""What a benchmark records beside its numbers, and how it hands its result back.

A result is one JSON document: the benchmark's name and settings, the machine and library
versions it ran on (`environment`), then its measurements. `publish` prints it and, with
--out, writes the same text to a file, so a recorded result is exactly what the run printed.

Imported as `from _report import ...`: running `python benchmarks/bench_x.py` puts this folder
on sys.path.
"""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def environment(**versions: str) -> dict[str, object]:
    """The host's core count and Python version, then `versions` (library name -> version):
    a shared machine's numbers mean little without them."""
    return {"host_cores": os.cpu_count(), "python": platform.python_version(), **versions}


def publish(result: dict, out: str | Path | None, *, indent: int | None = None) -> int:
    """Print `result` as JSON and write it to `out` too when given; returns main's exit code (0).
    Numpy scalars are written as floats."""
    text = json.dumps(result, indent=indent, default=float)
    if out:
        Path(out).write_text(text)
    print(text)
    return 0
